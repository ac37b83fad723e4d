"""The mock provider's HTTP surface (Starlette): an OpenAI-compatible upstream
for local use, tests and benchmarks, plus ``/_mock/*`` controls."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from serve_app.mock_provider.behaviour import MockBehaviour, MockConfig, body_hash


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(payload), status, headers, media_type="application/json")


def _error(status: int, message: str, retry_after: float | None = None) -> Response:
    headers = {"retry-after": f"{retry_after:g}"} if retry_after is not None else None
    kind = "rate_limit_error" if status == 429 else "api_error"
    body = {"error": {"message": message, "type": kind, "param": None, "code": f"mock_{status}"}}
    return _json(body, status, headers)


def _chunk(cid: str, created: int, model: str, delta: dict[str, Any], finish: str | None) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    payload = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [choice],
    }
    return b"data: " + orjson.dumps(payload) + b"\n\n"


class MockProvider:
    def __init__(self, behaviour: MockBehaviour) -> None:
        self.behaviour = behaviour

    async def _read(self, request: Request) -> tuple[bytes, dict[str, Any]] | Response:
        raw = await request.body()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return _error(400, "mock: body is not JSON")
        if not isinstance(body, dict):
            return _error(400, "mock: body must be a JSON object")
        return raw, body

    async def _gate(self, path: str, raw: bytes, model: str) -> Response | None:
        """Count the call, wait the configured latency, inject the configured fault."""
        self.behaviour.record(path, model, raw)
        if delay := self.behaviour.delay_s(model):  # sleep(0) would still yield a loop turn
            await asyncio.sleep(delay)
        decision = self.behaviour.decide(model)
        if decision == "error":
            faults = self.behaviour.faults_for(model)
            return _error(faults.error_status, "mock: injected fault", faults.retry_after_s)
        if decision == "malformed":
            return Response(b'{"choices": [', 200, media_type="application/json")
        return None

    async def chat(self, request: Request) -> Response:
        read = await self._read(request)
        if isinstance(read, Response):
            return read
        raw, body = read
        model = str(body.get("model", ""))
        if (fault := await self._gate("/v1/chat/completions", raw, model)) is not None:
            return fault
        words = self.behaviour.answer_words(body)
        usage = self.behaviour.usage(body, len(words))
        cid = "chatcmpl-mock-" + body_hash(raw)
        created = int(time.time())
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(
                self._stream(cid, created, model, words, usage if include_usage else None),
                media_type="text/event-stream",
            )
        message = {"role": "assistant", "content": " ".join(words)}
        return _json(
            {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": usage,
            }
        )

    async def _stream(
        self, cid: str, created: int, model: str, words: list[str], usage: dict[str, int] | None
    ) -> AsyncIterator[bytes]:
        per_token_s = self.behaviour.config.latency.per_token_ms / 1000
        cut_after = self.behaviour.faults_for(model).cut_stream_after
        yield _chunk(cid, created, model, {"role": "assistant", "content": ""}, None)
        for index, word in enumerate(words):
            if cut_after is not None and index >= cut_after:
                raise ConnectionAbortedError("mock: stream cut by fault injection")
            if per_token_s:
                await asyncio.sleep(per_token_s)
            text = word if index == 0 else " " + word
            yield _chunk(cid, created, model, {"content": text}, None)
        yield _chunk(cid, created, model, {}, "stop")
        if usage is not None:
            payload = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [],
                "usage": usage,
            }
            yield b"data: " + orjson.dumps(payload) + b"\n\n"
        yield b"data: [DONE]\n\n"

    async def embeddings(self, request: Request) -> Response:
        read = await self._read(request)
        if isinstance(read, Response):
            return read
        raw, body = read
        model = str(body.get("model", ""))
        if (fault := await self._gate("/v1/embeddings", raw, model)) is not None:
            return fault
        inputs = body.get("input")
        texts = [inputs] if isinstance(inputs, str) else [str(i) for i in inputs or []]
        data = [
            {"object": "embedding", "index": i, "embedding": self.behaviour.embedding(t)}
            for i, t in enumerate(texts)
        ]
        tokens = sum(max(1, len(t) // 4) for t in texts)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return _json({"object": "list", "data": data, "model": model, "usage": usage})

    async def models(self, request: Request) -> Response:
        data = [
            {"id": m, "object": "model", "created": 0, "owned_by": "mock"}
            for m in self.behaviour.config.models
        ]
        return _json({"object": "list", "data": data})

    async def stats(self, request: Request) -> Response:
        return _json(self.behaviour.stats.as_dict())

    async def set_faults(self, request: Request) -> Response:
        """Replace latency and/or faults at run time (body: a partial MockConfig)."""
        try:
            update = orjson.loads(await request.body() or b"{}")
            merged = {**self.behaviour.config.model_dump(), **update}
            self.behaviour.config = MockConfig.model_validate(merged)
        except (orjson.JSONDecodeError, ValidationError, TypeError) as exc:
            return _error(400, f"mock: bad fault config: {exc}")
        return _json(self.behaviour.config.model_dump())

    async def reset(self, request: Request) -> Response:
        self.behaviour.reset()
        return _json({"reset": True})


def create_app(behaviour: MockBehaviour | None = None) -> Starlette:
    provider = MockProvider(behaviour or MockBehaviour())
    routes = [
        Route("/v1/chat/completions", provider.chat, methods=["POST"]),
        Route("/v1/embeddings", provider.embeddings, methods=["POST"]),
        Route("/v1/models", provider.models, methods=["GET"]),
        Route("/_mock/stats", provider.stats, methods=["GET"]),
        Route("/_mock/faults", provider.set_faults, methods=["POST"]),
        Route("/_mock/reset", provider.reset, methods=["POST"]),
    ]
    app = Starlette(routes=routes)
    app.state.provider = provider
    return app
