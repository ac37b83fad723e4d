"""A Responses API response as the typed events OpenAI streams it in, built from the
complete response object: how the gateway replays a cached response to a streaming
client, and how the mock provider streams its own.

Only responses whose output is messages of text can be replayed (``replayable``):
tool calls and reasoning items stream as events of their own kinds, which a stored
object does not say enough to rebuild faithfully.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import orjson


def sse(kind: str, payload: Mapping[str, Any]) -> bytes:
    """One event of a response stream: its ``event:`` line and its data."""
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def replayable(response: Any) -> bool:
    """A completed response whose every output item is a message of text parts."""
    if not isinstance(response, Mapping) or response.get("status") != "completed":
        return False
    output = response.get("output")
    return isinstance(output, list) and all(
        isinstance(item, Mapping)
        and item.get("type") == "message"
        and isinstance(item.get("id"), str)
        and isinstance(item.get("content"), list)
        and all(
            isinstance(part, Mapping)
            and part.get("type") == "output_text"
            and isinstance(part.get("text"), str)
            for part in item["content"]
        )
        for item in output
    )


def response_events(
    response: Mapping[str, Any], pieces: Callable[[str], list[str]] = lambda text: [text]
) -> Iterator[tuple[str, dict[str, Any]]]:
    """The events of a ``replayable`` response, each ``(type, payload)`` with its
    sequence number; ``pieces`` cuts a text into its deltas (default: one)."""
    numbers = itertools.count()

    def event(kind: str, **fields: Any) -> tuple[str, dict[str, Any]]:
        return kind, {"type": kind, "sequence_number": next(numbers), **fields}

    started = {**response, "status": "in_progress", "output": [], "usage": None}
    yield event("response.created", response=started)
    yield event("response.in_progress", response=started)
    for index, item in enumerate(response["output"]):
        opened = {**item, "status": "in_progress", "content": []}
        yield event("response.output_item.added", output_index=index, item=opened)
        for part_index, part in enumerate(item["content"]):
            where = {"item_id": item["id"], "output_index": index, "content_index": part_index}
            empty = {**part, "text": ""}
            yield event("response.content_part.added", **where, part=empty)
            for delta in pieces(part["text"]):
                yield event("response.output_text.delta", **where, delta=delta)
            yield event("response.output_text.done", **where, text=part["text"])
            yield event("response.content_part.done", **where, part=part)
        yield event("response.output_item.done", output_index=index, item=item)
    yield event("response.completed", response=dict(response))


def is_complete_response(answer: Any) -> bool:
    """A completed Responses API answer with its output (what the exact tier may keep;
    a stream's final event may leave the output to the events before it)."""
    return (
        isinstance(answer, Mapping)
        and answer.get("object") == "response"
        and answer.get("status") == "completed"
        and not answer.get("error")
        and isinstance(answer.get("output"), list)
    )


__all__ = ["is_complete_response", "replayable", "response_events", "sse"]
