import json

import pytest

from bench.sse import SseTimer


def _chunk(content: str | None = None, usage: dict | None = None) -> str:
    choices = [] if content is None else [{"index": 0, "delta": {"content": content}}]
    body: dict = {"object": "chat.completion.chunk", "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return "data: " + json.dumps(body)


def test_times_first_content_and_gaps_between_chunks() -> None:
    timer = SseTimer(t0=10.0)
    timer.feed('data: {"choices": [{"delta": {"role": "assistant", "content": ""}}]}', 10.01)
    timer.feed(_chunk("Hel"), 10.05)
    timer.feed("", 10.05)
    timer.feed(": keep-alive", 10.06)
    timer.feed(_chunk("lo"), 10.07)
    timer.feed(_chunk("!"), 10.09)
    timer.feed(_chunk(usage={"prompt_tokens": 3, "cost": "0.000123"}), 10.1)
    timer.feed("data: [DONE]", 10.1)
    read = timer.result()
    assert read.ttft_ms == pytest.approx(50.0)  # the empty role chunk does not count
    assert read.itl_ms == pytest.approx(20.0)
    assert (read.chunks, read.cost, read.error) == (3, 0.000123, None)


def test_a_stream_without_done_is_an_error() -> None:
    timer = SseTimer(t0=0.0)
    timer.feed(_chunk("a"), 0.1)
    assert timer.result().error == "stream: no [DONE] or response.completed"
    assert timer.result("stream: ConnectionResetError").error == "stream: ConnectionResetError"


def test_garbage_lines_are_ignored() -> None:
    timer = SseTimer(t0=0.0)
    for line in ("data: {not json", "data: [1, 2]", "event: ping", _chunk(usage={"cost": "n/a"})):
        timer.feed(line, 0.1)
    timer.feed("data: [DONE]", 0.2)
    read = timer.result()
    assert (read.ttft_ms, read.itl_ms, read.chunks, read.cost, read.error) == (
        None,
        None,
        0,
        None,
        None,
    )


def _event(kind: str, **fields: object) -> list[str]:
    return [f"event: {kind}", "data: " + json.dumps({"type": kind, **fields}), ""]


def test_a_responses_stream_is_timed_by_its_text_deltas_and_ends_completed() -> None:
    timer = SseTimer(t0=1.0)
    lines = [
        (_event("response.created", response={"status": "in_progress"}), 1.01),
        (_event("response.output_text.delta", delta="Hel"), 1.04),
        (_event("response.output_text.delta", delta="lo"), 1.06),
        (_event("response.output_text.done", text="Hello"), 1.07),
        (_event("response.completed", response={"usage": {"cost": "0.5"}}), 1.08),
    ]
    for event, at in lines:
        for line in event:
            timer.feed(line, at)
    read = timer.result()
    assert read.ttft_ms == pytest.approx(40.0) and read.itl_ms == pytest.approx(20.0)
    assert (read.chunks, read.cost, read.error) == (2, 0.5, None)
    cut = SseTimer(t0=0.0)
    for line in _event("response.output_text.delta", delta="a"):
        cut.feed(line, 0.1)
    assert cut.result().error == "stream: no [DONE] or response.completed"
