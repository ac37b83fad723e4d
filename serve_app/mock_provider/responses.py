"""The mock's Responses API (``/v1/responses``), as OpenAI serves it: a response is
an object with an id, kept (unless ``store`` is false) so that a later request can
continue it (``previous_response_id``) and ``GET``/``DELETE /v1/responses/{id}``
find it. A streamed response is a sequence of typed events, ``event:`` line and
all, ending with ``response.completed`` (there is no ``[DONE]``).

A continued response's input tokens include the conversation it continues, as an
upstream bills them.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from typing import Any

from deployments.response_replay import response_events, sse
from serve_app.mock_provider.behaviour import STORED_RESPONSES, MockBehaviour

Event = Callable[..., bytes]
PREFIX = "/v1/responses/"


def not_found(response_id: str, param: str | None = None) -> tuple[int, dict[str, Any]]:
    message = (
        f"Previous response with id '{response_id}' not found."
        if param
        else f"No response found with id '{response_id}'."
    )
    code = "previous_response_not_found" if param else None
    envelope = {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    return (400 if param else 404), {"error": envelope}


def _usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


def _message(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": []}] if text else []
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": content,
    }


def _input_items(value: Any) -> list[Any]:
    """The input as OpenAI lists it back: messages with their text as input_text parts."""
    items = [{"role": "user", "content": value}] if isinstance(value, str) else value
    out = []
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict) and isinstance(item.get("content"), str):
            text = {"type": "input_text", "text": item["content"]}
            item = {"type": "message", "status": "completed", **item, "content": [text]}
        out.append(item)
    return out


class MockResponses:
    def __init__(self, behaviour: Callable[[], MockBehaviour]) -> None:
        self._behaviour = behaviour  # read at each call: tests swap the mock's config

    @property
    def stored(self) -> Any:
        return self._behaviour().responses

    def create(self, body: dict[str, Any], model: str, words: list[str]) -> tuple[int, Any]:
        """The response object (status and JSON), or an error; stored unless ``store`` is
        false. Streamed, the caller sends it as events (``events``)."""
        behaviour = self._behaviour()
        previous_id = body.get("previous_response_id")
        carried = 0
        if previous_id is not None:
            found = self.stored.get(previous_id)
            if found is None:
                return not_found(str(previous_id), "previous_response_id")
            carried = found[0]["usage"]["total_tokens"]
        response_id = "resp_" + uuid.uuid4().hex
        text = " ".join(words)
        response = {
            "id": response_id,
            "object": "response",
            "created_at": int(time.time()),
            "status": "completed",
            "error": None,
            "incomplete_details": None,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "model": model,
            "output": [_message("msg_" + response_id[5:], text)],
            "previous_response_id": previous_id,
            "store": body.get("store") is not False,
            "usage": _usage(carried + behaviour.prompt_tokens(body), len(words)),
        }
        if response["store"]:
            self.stored[response_id] = (response, _input_items(body.get("input")))
            while len(self.stored) > STORED_RESPONSES:
                self.stored.popitem(last=False)
        return 200, response

    def by_id(self, method: str, path: str) -> tuple[int, Any]:
        """``GET``/``DELETE /v1/responses/{id}`` and ``GET .../{id}/input_items``."""
        response_id, _, rest = path.removeprefix(PREFIX).partition("/")
        found = self.stored.get(response_id)
        if found is None or rest not in ("", "input_items"):
            return not_found(response_id)
        response, items = found
        if method == "GET" and rest == "":
            return 200, response
        if method == "GET":
            data = [{"id": f"msg_in_{i}", **item} for i, item in enumerate(items)]
            return 200, {
                "object": "list",
                "data": data,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
                "has_more": False,
            }
        if method == "DELETE" and rest == "":
            del self.stored[response_id]
            return 200, {"id": response_id, "object": "response.deleted", "deleted": True}
        return 405, {"error": {"message": f"mock: {method} not allowed on {path}"}}

    async def events(
        self, response: dict[str, Any], cut_after: int | None
    ) -> AsyncGenerator[bytes, None]:
        """The response as OpenAI streams it, one typed event at a time, a word a delta."""
        per_token_s = self._behaviour().config.latency.per_token_ms / 1000
        deltas = 0
        for kind, payload in response_events(response, _words):
            if kind == "response.output_text.delta":
                if cut_after is not None and deltas >= cut_after:
                    raise ConnectionAbortedError("mock: stream cut by fault injection")
                deltas += 1
                if per_token_s:
                    await asyncio.sleep(per_token_s)
            yield sse(kind, payload)


def _words(text: str) -> list[str]:
    words = text.split(" ")
    return [words[0], *(" " + w for w in words[1:])]
