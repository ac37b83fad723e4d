"""Between a legacy ``text_completion`` body (``/v1/completions``) and its SSE
stream, both ways: what ``sse_replay`` is for chat.

- ``replay_text_sse``: a cached answer replayed as a stream: each choice's text
  in word-aligned pieces, a finish chunk, a usage chunk when the request asked
  for ``stream_options.include_usage``, then ``data: [DONE]``.
- ``TextStreamAssembler``: the chunks of a live stream put back together as one
  ``text_completion`` body to store; None unless the stream reached ``[DONE]``
  with every choice finished and no error.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import orjson

from deployments.sse_replay import DONE, ChunkAssembler, chunk_base, split_text, sse_event

_ROOT_FIELDS = ("id", "created", "model", "system_fingerprint")
# A choice's legacy logprobs: parallel lists, one entry per token.
_LOGPROB_LISTS = ("tokens", "token_logprobs", "top_logprobs", "text_offset")


def is_complete_text_completion(completion: Any) -> bool:
    """A successful text completion that ran to its end: safe to store and replay."""
    if not isinstance(completion, Mapping) or completion.get("object") != "text_completion":
        return False
    choices = completion.get("choices")
    if "error" in completion or not isinstance(choices, list) or not choices:
        return False
    return all(
        isinstance(c, Mapping) and isinstance(c.get("text"), str) and c.get("finish_reason")
        for c in choices
    )


def text_chunks(
    completion: Mapping[str, Any], *, include_usage: bool = False, piece_chars: int = 24
) -> Iterator[dict[str, Any]]:
    """The chunks a provider would have streamed for ``completion``."""
    base = chunk_base(completion, _ROOT_FIELDS, "text_completion", include_usage)

    def chunk(index: int, text: str, logprobs: Any, finish: str | None) -> dict[str, Any]:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return {**base, "choices": [choice]}

    for choice in completion.get("choices", []):
        index = choice.get("index", 0)
        logprobs = choice.get("logprobs")  # all of them ride on the first piece
        text = choice.get("text") or ""
        if text:
            for piece in split_text(text, piece_chars):
                yield chunk(index, piece, logprobs, None)
                logprobs = None
        yield chunk(index, "", logprobs, choice.get("finish_reason"))
    if include_usage and completion.get("usage") is not None:
        yield {**base, "choices": [], "usage": completion["usage"]}


def replay_text_sse(body: bytes, *, include_usage: bool = False) -> Iterator[bytes]:
    """A stored ``text_completion`` body as SSE events ending in ``[DONE]``."""
    for chunk in text_chunks(orjson.loads(body), include_usage=include_usage):
        yield sse_event(chunk)
    yield DONE


class _TextChoice:
    def __init__(self) -> None:
        self.text: list[str] = []
        self.logprobs: dict[str, list[Any]] | None = None
        self.finish_reason: str | None = None

    def add(self, choice: Mapping[str, Any]) -> None:
        if isinstance(text := choice.get("text"), str):
            self.text.append(text)
        if isinstance(logprobs := choice.get("logprobs"), Mapping):
            merged = self.logprobs or {name: [] for name in _LOGPROB_LISTS}
            for name in _LOGPROB_LISTS:
                if isinstance(values := logprobs.get(name), list):
                    merged[name].extend(values)
            self.logprobs = merged
        self.finish_reason = choice.get("finish_reason") or self.finish_reason


class TextStreamAssembler(ChunkAssembler):
    """A text-completion stream put back together."""

    root_fields = _ROOT_FIELDS

    def _new_choice(self) -> _TextChoice:
        return _TextChoice()

    def completion(self) -> dict[str, Any] | None:
        """The whole answer as a ``text_completion``, or None if it is not complete."""
        if not self.done or self.failed or not self._choices:
            return None
        choices = [
            {
                "index": index,
                "text": "".join(choice.text),
                "logprobs": choice.logprobs,
                "finish_reason": choice.finish_reason,
            }
            for index, choice in sorted(self._choices.items())
        ]
        completion = {**self._root, "object": "text_completion", "choices": choices}
        if self._usage is not None:
            completion["usage"] = self._usage
        return completion if is_complete_text_completion(completion) else None
