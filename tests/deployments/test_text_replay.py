"""Text completions (``/v1/completions``) between a body and its SSE stream: a
replayed answer reassembles to itself, and only complete streams are kept."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from deployments.sse_replay import StreamAssembler
from deployments.text_replay import (
    TextStreamAssembler,
    is_complete_text_completion,
    replay_text_sse,
    text_chunks,
)

ANSWER: dict[str, Any] = {
    "id": "cmpl-1",
    "object": "text_completion",
    "created": 7,
    "model": "m",
    "choices": [
        {
            "index": 0,
            "text": "there was a quiet old house by the sea",
            "logprobs": None,
            "finish_reason": "stop",
        },
        {"index": 1, "text": "", "logprobs": None, "finish_reason": "length"},
    ],
    "usage": {"prompt_tokens": 4, "completion_tokens": 9, "total_tokens": 13},
}


def _reassembled(events: list[bytes], slice_bytes: int) -> dict[str, Any] | None:
    raw = b"".join(events)
    assembler = TextStreamAssembler()
    for start in range(0, len(raw), slice_bytes):
        assembler.feed(raw[start : start + slice_bytes])
    return assembler.completion()


@pytest.mark.parametrize("slice_bytes", [1, 7, 10_000])
def test_a_replayed_answer_reassembles_to_itself(slice_bytes: int) -> None:
    events = list(replay_text_sse(orjson.dumps(ANSWER), include_usage=True))
    assert events[-1] == b"data: [DONE]\n\n"
    chunks = [orjson.loads(e[6:]) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert len([c for c in chunks if c["choices"] and c["choices"][0]["index"] == 0]) > 2
    assert chunks[-1] == {
        **{k: ANSWER[k] for k in ("id", "created", "model")},
        "object": "text_completion",
        "choices": [],
        "usage": ANSWER["usage"],
    }
    assert _reassembled(events, slice_bytes) == ANSWER


def test_without_usage_asked_no_chunk_carries_it() -> None:
    chunks = list(text_chunks(ANSWER))
    assert all("usage" not in c for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["index"] == 1] == [
        "length"
    ]


def test_logprobs_are_joined_token_by_token() -> None:
    def event(text: str, offset: int, finish: str | None) -> bytes:
        logprobs = {
            "tokens": [text],
            "token_logprobs": [-0.5],
            "top_logprobs": [{text: -0.5}],
            "text_offset": [offset],
        }
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return (
            b"data: " + orjson.dumps({"object": "text_completion", "choices": [choice]}) + b"\n\n"
        )

    assembler = TextStreamAssembler()
    for raw in (event("a", 0, None), event(" b", 1, "stop"), b"data: [DONE]\n\n"):
        assembler.feed(raw)
    completion = assembler.completion()
    assert completion is not None
    choice = completion["choices"][0]
    assert choice["text"] == "a b"
    assert choice["logprobs"] == {
        "tokens": ["a", " b"],
        "token_logprobs": [-0.5, -0.5],
        "top_logprobs": [{"a": -0.5}, {" b": -0.5}],
        "text_offset": [0, 1],
    }


@pytest.mark.parametrize(
    "tail",
    [
        b"",  # no [DONE]: cut short
        b'data: {"error": {"message": "boom"}}\n\ndata: [DONE]\n\n',
        b"data: {not json\n\ndata: [DONE]\n\n",
        b'data: {"choices": [{"index": "0", "text": "x"}]}\n\ndata: [DONE]\n\n',
    ],
)
def test_only_a_complete_clean_stream_is_kept(tail: bytes) -> None:
    events = list(replay_text_sse(orjson.dumps(ANSWER)))[:-1]  # everything but [DONE]
    assembler = TextStreamAssembler()
    assembler.feed(b"".join(events) + tail)
    assert assembler.completion() is None and assembler.body() is None


def test_a_choice_without_a_finish_reason_is_not_complete() -> None:
    unfinished = {**ANSWER, "choices": [{"index": 0, "text": "half", "finish_reason": None}]}
    assert not is_complete_text_completion(unfinished)
    assert not is_complete_text_completion({**ANSWER, "object": "chat.completion"})
    assert is_complete_text_completion(ANSWER)


def test_a_chat_stream_with_a_choice_no_provider_sends_is_not_kept() -> None:
    """A choice that is not an object, or whose index is not a number, made the chat
    assembler raise mid-stream; now the stream is relayed and just not stored."""
    for bad in (b'["x"]', b'[{"index": "0", "delta": {"content": "x"}}]'):
        assembler = StreamAssembler()
        assembler.feed(b'data: {"choices": ' + bad + b"}\n\ndata: [DONE]\n\n")
        assert assembler.completion() is None
