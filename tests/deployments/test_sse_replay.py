"""Cached answers replay as real SSE streams; live streams assemble to bodies."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from deployments.sse_replay import (
    DONE,
    StreamAssembler,
    is_complete_completion,
    replay_sse,
    split_text,
)

TEXT = "The boiling point of water at sea level is 100 degrees Celsius, or 212 Fahrenheit."
COMPLETION: dict[str, Any] = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "gpt-4o-mini",
    "system_fingerprint": "fp_1",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": TEXT},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 9, "completion_tokens": 20, "total_tokens": 29},
}
TOOL_COMPLETION: dict[str, Any] = {
    **COMPLETION,
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "convert", "arguments": '{"value": 30, "to": "F"}'},
                    }
                ],
            },
            "logprobs": None,
            "finish_reason": "tool_calls",
        }
    ],
}


def _events(body: dict[str, Any], include_usage: bool) -> list[bytes]:
    return list(replay_sse(orjson.dumps(body), include_usage=include_usage))


def test_split_text_joins_back_word_aligned() -> None:
    pieces = split_text(TEXT, 16)
    assert "".join(pieces) == TEXT and len(pieces) > 3
    assert all(p.endswith(" ") for p in pieces[:-1])


def test_replay_is_a_proper_stream() -> None:
    events = _events(COMPLETION, include_usage=False)
    assert events[-1] == DONE
    chunks = [orjson.loads(e.removeprefix(b"data: ")) for e in events[:-1]]
    assert all(e.startswith(b"data: ") and e.endswith(b"\n\n") for e in events)
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == "chatcmpl-1" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == TEXT
    assert len(chunks) > 4  # not one big chunk
    assert chunks[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert all("usage" not in c for c in chunks)


def test_usage_chunk_only_when_asked() -> None:
    events = _events(COMPLETION, include_usage=True)
    last = orjson.loads(events[-2].removeprefix(b"data: "))
    assert last["choices"] == [] and last["usage"] == COMPLETION["usage"]
    earlier = [orjson.loads(e.removeprefix(b"data: ")) for e in events[:-2]]
    assert all(c["usage"] is None for c in earlier)


@pytest.mark.parametrize("completion", [COMPLETION, TOOL_COMPLETION])
@pytest.mark.parametrize("slice_size", [1, 7, 10_000])
def test_replay_then_assemble_round_trips(completion: dict[str, Any], slice_size: int) -> None:
    stream = b"".join(_events(completion, include_usage=True))
    assembler = StreamAssembler()
    for start in range(0, len(stream), slice_size):
        assembler.feed(stream[start : start + slice_size])
    assert assembler.done
    assert assembler.completion() == completion


def test_stream_without_done_is_not_stored() -> None:
    stream = b"".join(_events(COMPLETION, include_usage=False)[:-1])
    assembler = StreamAssembler()
    assembler.feed(stream)
    assert not assembler.done and assembler.completion() is None


def test_stream_with_error_is_not_stored() -> None:
    events = _events(COMPLETION, include_usage=False)
    assembler = StreamAssembler()
    assembler.feed(events[0] + b'data: {"error": {"message": "overloaded"}}\n\n' + DONE)
    assert assembler.completion() is None


def test_unfinished_choice_is_not_stored() -> None:
    events = _events(COMPLETION, include_usage=False)
    assembler = StreamAssembler()
    assembler.feed(b"".join(events[:-2]) + DONE)  # drop the finish chunk
    assert assembler.completion() is None


def test_is_complete_completion() -> None:
    assert is_complete_completion(COMPLETION)
    assert not is_complete_completion({"error": {"message": "x"}})
    unfinished = {**COMPLETION, "choices": [{**COMPLETION["choices"][0], "finish_reason": None}]}
    assert not is_complete_completion(unfinished)
    assert not is_complete_completion({**COMPLETION, "choices": []})
