"""Between a ``chat.completion`` body and its SSE stream, both ways.

- ``replay_sse``: a cached (non-streamed) answer replayed as a proper stream:
  a role chunk, the content in word-aligned pieces, tool calls and refusals as
  deltas, a finish chunk, a usage chunk when the request asked for
  ``stream_options.include_usage``, then ``data: [DONE]``.
- ``StreamAssembler``: the chunks of a live stream put back together as one
  ``chat.completion`` body to store; ``completion()`` is None unless the stream
  reached ``[DONE]`` with every choice finished and no error.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

import orjson

DONE = b"data: [DONE]\n\n"
_WORDS = re.compile(r"\S*\s*")
_ROOT_FIELDS = ("id", "created", "model", "system_fingerprint", "service_tier")


def is_complete_completion(completion: Any) -> bool:
    """A successful answer that ran to its end: safe to store and replay."""
    if not isinstance(completion, Mapping) or completion.get("object") != "chat.completion":
        return False
    choices = completion.get("choices")
    if "error" in completion or not isinstance(choices, list) or not choices:
        return False
    return all(isinstance(c, Mapping) and c.get("finish_reason") for c in choices)


def chunk_base(
    completion: Mapping[str, Any], fields: tuple[str, ...], kind: str, include_usage: bool
) -> dict[str, Any]:
    """What every replayed chunk repeats: the answer's root ``fields``, its ``object``
    kind and, when usage was asked for, ``usage: null`` until the usage chunk."""
    base = {k: completion[k] for k in fields if k in completion}
    base["object"] = kind
    if include_usage:
        base["usage"] = None
    return base


def split_text(text: str, piece_chars: int = 24) -> list[str]:
    """Word-aligned pieces of about ``piece_chars`` that join back to ``text``."""
    pieces, current = [], ""
    for word in _WORDS.findall(text):
        current += word
        if len(current) >= piece_chars:
            pieces.append(current)
            current = ""
    if current or not pieces:
        pieces.append(current)
    return pieces


def sse_event(payload: Mapping[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _choice_deltas(choice: Mapping[str, Any], piece_chars: int) -> Iterator[dict[str, Any]]:
    message = choice.get("message") or {}
    content = message.get("content")
    yield {"role": message.get("role", "assistant"), "content": "" if content is not None else None}
    if content:
        for piece in split_text(content, piece_chars):
            yield {"content": piece}
    if message.get("refusal"):
        for piece in split_text(message["refusal"], piece_chars):
            yield {"refusal": piece}
    for index, call in enumerate(message.get("tool_calls") or []):
        function = call.get("function") or {}
        head = {"name": function.get("name"), "arguments": ""}
        yield {
            "tool_calls": [
                {"index": index, "id": call.get("id"), "type": "function", "function": head}
            ]
        }
        for piece in split_text(function.get("arguments") or "", piece_chars):
            yield {"tool_calls": [{"index": index, "function": {"arguments": piece}}]}


def completion_chunks(
    completion: Mapping[str, Any], *, include_usage: bool = False, piece_chars: int = 24
) -> Iterator[dict[str, Any]]:
    """The ``chat.completion.chunk`` objects a provider would have streamed."""
    base = chunk_base(completion, _ROOT_FIELDS, "chat.completion.chunk", include_usage)

    def chunk(index: int, delta: dict[str, Any], finish: str | None, logprobs: Any) -> dict:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {**base, "choices": [choice]}

    for choice in completion.get("choices", []):
        index = choice.get("index", 0)
        logprobs = choice.get("logprobs")  # all of them ride on the first delta
        for delta in _choice_deltas(choice, piece_chars):
            yield chunk(index, delta, None, logprobs)
            logprobs = None
        yield chunk(index, {}, choice.get("finish_reason"), None)
    if include_usage and completion.get("usage") is not None:
        yield {**base, "choices": [], "usage": completion["usage"]}


def replay_sse(body: bytes, *, include_usage: bool = False) -> Iterator[bytes]:
    """A stored ``chat.completion`` body as SSE events ending in ``[DONE]``."""
    for chunk in completion_chunks(orjson.loads(body), include_usage=include_usage):
        yield sse_event(chunk)
    yield DONE


class _Choice:
    def __init__(self) -> None:
        self.role = "assistant"
        self.content: list[str] = []
        self.refusal: list[str] = []
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.logprobs: list[Any] | None = None
        self.finish_reason: str | None = None

    def add(self, choice: Mapping[str, Any]) -> None:
        delta = choice.get("delta") or {}
        self.role = delta.get("role") or self.role
        if delta.get("content"):
            self.content.append(delta["content"])
        if delta.get("refusal"):
            self.refusal.append(delta["refusal"])
        for call in delta.get("tool_calls") or []:
            self._add_tool_call(call)
        if (logprobs := choice.get("logprobs")) and logprobs.get("content") is not None:
            self.logprobs = (self.logprobs or []) + list(logprobs["content"])
        self.finish_reason = choice.get("finish_reason") or self.finish_reason

    def _add_tool_call(self, call: Mapping[str, Any]) -> None:
        slot = self.tool_calls.setdefault(
            call.get("index", 0), {"id": None, "type": "function", "name": "", "arguments": []}
        )
        slot["id"] = call.get("id") or slot["id"]
        function = call.get("function") or {}
        slot["name"] += function.get("name") or ""
        slot["arguments"].append(function.get("arguments") or "")

    def message(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": self.role, "content": "".join(self.content) or None}
        if self.refusal:
            message["refusal"] = "".join(self.refusal)
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": slot["id"],
                    "type": slot["type"],
                    "function": {"name": slot["name"], "arguments": "".join(slot["arguments"])},
                }
                for _, slot in sorted(self.tool_calls.items())
            ]
        elif message["content"] is None:
            message["content"] = ""
        return message


class ChunkAssembler:
    """Feed it the raw SSE bytes of a stream, in any slicing: it keeps the root
    fields, the usage and each choice (``_new_choice`` makes one with ``add``)."""

    root_fields: tuple[str, ...] = _ROOT_FIELDS

    def __init__(self) -> None:
        self._buffer = b""
        self._root: dict[str, Any] = {}
        self._choices: dict[int, Any] = {}
        self._usage: Any = None
        self.done = False
        self.failed = False

    def _new_choice(self) -> Any:
        raise NotImplementedError

    def feed(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            self._line(line.rstrip(b"\r"))

    def _line(self, line: bytes) -> None:
        if not line.startswith(b"data:") or self.done:
            return  # comments, event names, and anything after [DONE]
        payload = line[5:].strip()
        if payload == b"[DONE]":
            self.done = True
            return
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            self.failed = True
            return
        if not isinstance(chunk, dict) or "error" in chunk:
            self.failed = True
            return
        for name in self.root_fields:
            if name in chunk and name not in self._root:
                self._root[name] = chunk[name]
        if chunk.get("usage") is not None:
            self._usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            index = choice.get("index", 0) if isinstance(choice, Mapping) else None
            if not isinstance(index, int):  # a choice no provider sends: not storable
                self.failed = True
                return
            if index not in self._choices:
                self._choices[index] = self._new_choice()
            self._choices[index].add(choice)

    def completion(self) -> dict[str, Any] | None:
        raise NotImplementedError

    def body(self) -> bytes | None:
        completion = self.completion()
        return orjson.dumps(completion) if completion is not None else None


class StreamAssembler(ChunkAssembler):
    """A ``chat.completion.chunk`` stream put back together."""

    def _new_choice(self) -> _Choice:
        return _Choice()

    def completion(self) -> dict[str, Any] | None:
        """The whole answer as a ``chat.completion``, or None if it is not complete."""
        if not self.done or self.failed or not self._choices:
            return None
        completion: dict[str, Any] = {**self._root, "object": "chat.completion", "choices": []}
        for index, choice in sorted(self._choices.items()):
            logprobs = {"content": choice.logprobs} if choice.logprobs is not None else None
            completion["choices"].append(
                {
                    "index": index,
                    "message": choice.message(),
                    "logprobs": logprobs,
                    "finish_reason": choice.finish_reason,
                }
            )
        if self._usage is not None:
            completion["usage"] = self._usage
        return completion if is_complete_completion(completion) else None
