"""A whole Responses API response as the events OpenAI streams it in."""

from __future__ import annotations

from typing import Any

from deployments.response_replay import is_complete_response, replayable, response_events

MESSAGE = {
    "id": "msg_1",
    "type": "message",
    "status": "completed",
    "role": "assistant",
    "content": [{"type": "output_text", "text": "hello there", "annotations": []}],
}
RESPONSE: dict[str, Any] = {
    "id": "resp_1",
    "object": "response",
    "status": "completed",
    "output": [MESSAGE],
    "usage": {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5},
}


def test_events_rebuild_the_text_and_end_with_the_whole_response() -> None:
    events = list(response_events(RESPONSE, lambda text: text.partition(" ")[::2]))
    kinds = [kind for kind, _ in events]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [p["sequence_number"] for _, p in events] == list(range(len(events)))
    assert events[0][1]["response"]["output"] == [] and events[0][1]["response"]["usage"] is None
    assert [p["delta"] for k, p in events if k.endswith(".delta")] == ["hello", "there"]
    assert events[-1][1]["response"] == RESPONSE


def test_only_completed_text_messages_are_replayed_and_kept() -> None:
    assert replayable(RESPONSE) and is_complete_response(RESPONSE)
    call = {"type": "function_call", "id": "fc_1", "call_id": "c", "name": "f", "arguments": "{}"}
    assert not replayable({**RESPONSE, "output": [MESSAGE, call]})
    assert not replayable({**RESPONSE, "status": "incomplete"})
    assert not is_complete_response({**RESPONSE, "status": "failed", "error": {"code": "x"}})
    assert not is_complete_response({"object": "chat.completion"})
    assert not is_complete_response({**RESPONSE, "output": None})  # left to the events
