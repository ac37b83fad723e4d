from __future__ import annotations

from serve_app.streaming import EventSplitter, StreamResult, event_data, inspect_event


def test_events_split_across_reads_are_reassembled() -> None:
    splitter = EventSplitter()
    out = list(splitter.feed(b'data: {"a"'))
    assert out == []
    out = list(splitter.feed(b": 1}\n\ndata: [DO"))
    assert out == [b'data: {"a": 1}']
    assert list(splitter.feed(b"NE]\r\n\r\n")) == [b"data: [DONE]"]


def test_event_data_ignores_comments_and_joins_lines() -> None:
    assert event_data(b": keep-alive") is None
    assert event_data(b"data: a\ndata: b") == b"a\nb"


def test_usage_only_chunk_is_recorded_and_flagged() -> None:
    result = StreamResult()
    assert inspect_event(b'{"choices": [{"delta": {"content": "x"}}]}', result)
    assert not inspect_event(b'{"choices": [], "usage": {"total_tokens": 5}}', result)
    assert inspect_event(b"[DONE]", result)
    assert result.done and result.usage == {"total_tokens": 5}
    assert result.last == {"choices": [], "usage": {"total_tokens": 5}}
    assert result.completion_text() == "x"


def test_only_the_streamed_text_is_kept() -> None:
    result = StreamResult()
    for i in range(1000):
        inspect_event(b'{"choices": [{"index": 0, "delta": {"content": "w%d "}}]}' % i, result)
    inspect_event(b'{"choices": [{"delta": {"role": "assistant"}}, "odd"]}', result)
    assert result.completion_text() == "".join(f"w{i} " for i in range(1000))
    assert result.last == {"choices": [{"delta": {"role": "assistant"}}, "odd"]}
