"""What the mock provider answers, apart from any HTTP framework: the Starlette
app (inside Serve) and the lean standalone server (benchmarks, tests) both
serve these answers, so the two surfaces cannot drift apart.

A call is answered in up to two steps. ``admit`` reads the request, counts it
and tells how long to wait (the configured latency, or a hang); the fault
decision and the answer come after that wait, so a fault changed at run time
applies to calls that are still waiting, as it would upstream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import ValidationError

from deployments.tokens import estimate_rerank_tokens
from serve_app.mock_provider.behaviour import MockBehaviour, MockConfig, max_tokens
from serve_app.mock_provider.responses import PREFIX as RESPONSE_PREFIX
from serve_app.mock_provider.responses import MockResponses

JSON = "application/json"
_MODERATED = ("harassment", "hate", "violence")
SSE = "text/event-stream"


@dataclass(frozen=True, slots=True)
class MockAnswer:
    status: int = 200
    body: bytes = b""
    content_type: str = JSON
    headers: tuple[tuple[str, str], ...] = ()
    stream: AsyncGenerator[bytes, None] | None = None  # SSE chunks, sent instead of ``body``


@dataclass(frozen=True, slots=True)
class Admitted:
    """A counted call: ``finish()`` gives its answer once ``delay_s`` has passed."""

    delay_s: float
    finish: Callable[[], MockAnswer]


def _json(payload: Any, status: int = 200, headers: tuple[tuple[str, str], ...] = ()) -> MockAnswer:
    return MockAnswer(status, orjson.dumps(payload), JSON, headers)


def error(status: int, message: str, retry_after: float | None = None) -> MockAnswer:
    headers = (("retry-after", f"{retry_after:g}"),) if retry_after is not None else ()
    kind = "rate_limit_error" if status == 429 else "api_error"
    body = {"error": {"message": message, "type": kind, "param": None, "code": f"mock_{status}"}}
    return _json(body, status, headers)


def _over_window(body: dict[str, Any], window: int) -> MockAnswer | None:
    """OpenAI's answer to a request that does not fit the model's context window."""
    prompt = MockBehaviour.prompt_tokens(body)
    wanted = prompt + max_tokens(body)
    if wanted <= window:
        return None
    message = (
        f"This model's maximum context length is {window} tokens. However, you requested "
        f"{wanted} tokens ({prompt} in the messages). Please reduce the length of the messages."
    )
    envelope = {
        "message": message,
        "type": "invalid_request_error",
        "param": "messages",
        "code": "context_length_exceeded",
    }
    return _json({"error": envelope}, 400)


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


# One streamed piece of an answer: its text ("" with a finish reason: the last one).
_Piece = Callable[[str, str | None], dict[str, Any]]


def _chat_piece(base: dict[str, Any]) -> _Piece:
    def piece(text: str, finish: str | None) -> dict[str, Any]:
        delta = {"content": text} if text else {}
        return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    return piece


def _text_piece(base: dict[str, Any]) -> _Piece:
    def piece(text: str, finish: str | None) -> dict[str, Any]:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {**base, "choices": [choice]}

    return piece


def _role_delta() -> dict[str, Any]:
    return {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}


# A model call's answer, from its body's hash, its parsed body and its model.
_Then = Callable[[str, dict[str, Any], str], MockAnswer]


def _object(raw: bytes) -> dict[str, Any] | MockAnswer:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return error(400, "mock: body is not JSON")
    if not isinstance(body, dict):
        return error(400, "mock: body must be a JSON object")
    return body


class MockProvider:
    """The mock's endpoints: ``routes`` maps each path to its method and handler."""

    def __init__(self, behaviour: MockBehaviour | None = None) -> None:
        self.behaviour = behaviour or MockBehaviour()
        self.responses = MockResponses(lambda: self.behaviour)
        chat, text, embeddings = "/v1/chat/completions", "/v1/completions", "/v1/embeddings"
        responses = "/v1/responses"
        self.routes: dict[str, tuple[str, Callable[[bytes], MockAnswer | Admitted]]] = {
            chat: ("POST", lambda raw: self._call(chat, raw, self._chat)),
            text: ("POST", lambda raw: self._call(text, raw, self._text)),
            responses: ("POST", lambda raw: self._call(responses, raw, self._response)),
            "/v1/rerank": ("POST", lambda raw: self._call("/v1/rerank", raw, self._rerank)),
            "/v1/moderations": (
                "POST",
                lambda raw: self._call("/v1/moderations", raw, self._moderation),
            ),
            embeddings: ("POST", lambda raw: self._call(embeddings, raw, self._embeddings)),
            "/v1/models": ("GET", self._models),
            "/_mock/stats": ("GET", self._stats),
            "/_mock/faults": ("POST", self._set_faults),
            "/_mock/reset": ("POST", self._reset),
        }

    def admit(self, method: str, path: str, raw: bytes) -> MockAnswer | Admitted:
        route = self.routes.get(path)
        if route is None and path.startswith(RESPONSE_PREFIX):
            return _json(*reversed(self.responses.by_id(method, path)))
        if route is None:
            return error(404, f"mock: no route {path}")
        allowed, handler = route
        if method != allowed:
            return error(405, f"mock: {method} not allowed on {path}")
        return handler(raw)

    async def answer(self, method: str, path: str, raw: bytes) -> MockAnswer:
        """``admit`` and, when it asks for one, the wait before the answer."""
        result = self.admit(method, path, raw)
        if isinstance(result, MockAnswer):
            return result
        if result.delay_s:  # sleep(0) would still yield a loop turn
            await asyncio.sleep(result.delay_s)
        return result.finish()

    def _call(self, path: str, raw: bytes, then: _Then) -> MockAnswer | Admitted:
        """A model call: count it, wait, then a fault or ``then``'s answer."""
        body = _object(raw)
        if isinstance(body, MockAnswer):
            return body
        model = str(body.get("model", ""))
        digest = self.behaviour.record(path, model, raw)
        delay = self.behaviour.delay_s(model)
        return Admitted(delay, lambda: self._fault(model) or then(digest, body, model))

    def _fault(self, model: str) -> MockAnswer | None:
        decision = self.behaviour.decide(model)
        if decision == "error":
            faults = self.behaviour.faults_for(model)
            return error(faults.error_status, "mock: injected fault", faults.retry_after_s)
        if decision == "malformed":
            return MockAnswer(200, b'{"choices": [')
        return None

    def _over_context(self, body: dict[str, Any], model: str) -> MockAnswer | None:
        window = self.behaviour.faults_for(model).context_tokens
        return _over_window(body, window) if window is not None else None

    def _chat(self, digest: str, body: dict[str, Any], model: str) -> MockAnswer:
        if (too_long := self._over_context(body, model)) is not None:
            return too_long
        words = self.behaviour.answer_words(body)
        usage = self.behaviour.usage(body, len(words))
        base = {"id": "chatcmpl-mock-" + digest, "created": int(time.time()), "model": model}
        if body.get("stream"):
            base["object"] = "chat.completion.chunk"
            opening = {**base, "choices": [_role_delta()]}
            return self._streamed(body, model, words, usage, _chat_piece(base), opening)
        message = {"role": "assistant", "content": " ".join(words)}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        return _json({**base, "object": "chat.completion", "choices": [choice], "usage": usage})

    def _text(self, digest: str, body: dict[str, Any], model: str) -> MockAnswer:
        """A legacy text completion (``/v1/completions``), as vLLM and Ollama serve it."""
        if (too_long := self._over_context(body, model)) is not None:
            return too_long
        words = self.behaviour.answer_words(body)
        usage = self.behaviour.usage(body, len(words))
        base = {
            "id": "cmpl-mock-" + digest,
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
        }
        if body.get("stream"):
            return self._streamed(body, model, words, usage, _text_piece(base), None)
        choice = {"index": 0, "text": " ".join(words), "logprobs": None, "finish_reason": "stop"}
        return _json({**base, "choices": [choice], "usage": usage})

    def _response(self, digest: str, body: dict[str, Any], model: str) -> MockAnswer:
        """A Responses API call (``serve_app/mock_provider/responses.py``)."""
        if (too_long := self._over_context(body, model)) is not None:
            return too_long
        words = self.behaviour.answer_words(body)
        status, response = self.responses.create(body, model, words)
        if status != 200 or not body.get("stream"):
            return _json(response, status)
        cut_after = self.behaviour.faults_for(model).cut_stream_after
        return MockAnswer(200, content_type=SSE, stream=self.responses.events(response, cut_after))

    def _streamed(
        self,
        body: dict[str, Any],
        model: str,
        words: list[str],
        usage: dict[str, int],
        piece: _Piece,
        opening: dict[str, Any] | None,
    ) -> MockAnswer:
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        chunks = self._stream(model, words, usage if include_usage else None, piece, opening)
        return MockAnswer(200, content_type=SSE, stream=chunks)

    async def _stream(
        self,
        model: str,
        words: list[str],
        usage: dict[str, int] | None,
        piece: _Piece,
        opening: dict[str, Any] | None,
    ) -> AsyncGenerator[bytes, None]:
        per_token_s = self.behaviour.config.latency.per_token_ms / 1000
        cut_after = self.behaviour.faults_for(model).cut_stream_after
        if opening is not None:
            yield _sse(opening)
        for index, word in enumerate(words):
            if cut_after is not None and index >= cut_after:
                raise ConnectionAbortedError("mock: stream cut by fault injection")
            if per_token_s:
                await asyncio.sleep(per_token_s)
            yield _sse(piece(word if index == 0 else " " + word, None))
        last = piece("", "stop")
        yield _sse(last)
        if usage is not None:
            yield _sse({**last, "choices": [], "usage": usage})
        yield b"data: [DONE]\n\n"

    def _embeddings(self, digest: str, body: dict[str, Any], model: str) -> MockAnswer:
        inputs = body.get("input")
        texts = [inputs] if isinstance(inputs, str) else [str(i) for i in inputs or []]
        data = [
            {"object": "embedding", "index": i, "embedding": self.behaviour.embedding(t)}
            for i, t in enumerate(texts)
        ]
        tokens = sum(max(1, len(t) // 4) for t in texts)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return _json({"object": "list", "data": data, "model": model, "usage": usage})

    def _rerank(self, digest: str, body: dict[str, Any], model: str) -> MockAnswer:
        """vLLM's (and Jina's) rerank: each document scored against the query, best first."""
        query = str(body.get("query", ""))
        documents = body.get("documents")
        if not isinstance(documents, list) or not documents:
            return error(400, "mock: documents must be a non-empty list")
        texts = [d if isinstance(d, str) else str((d or {}).get("text", "")) for d in documents]
        scored = [
            {
                "index": i,
                "document": {"text": t},
                "relevance_score": self.behaviour.relevance(query, t),
            }
            for i, t in enumerate(texts)
        ]
        scored.sort(key=lambda r: (-r["relevance_score"], r["index"]))
        top_n = body.get("top_n")
        if isinstance(top_n, int) and top_n > 0:
            scored = scored[:top_n]
        if body.get("return_documents") is False:
            for result in scored:
                del result["document"]
        tokens = estimate_rerank_tokens(query, texts)
        usage = {"total_tokens": tokens}
        return _json(
            {"id": "rerank-mock-" + digest, "model": model, "usage": usage, "results": scored}
        )

    def _moderation(self, digest: str, body: dict[str, Any], model: str) -> MockAnswer:
        """OpenAI's moderation: one verdict per input, flagged when it says a flagged word."""
        given = body.get("input")
        inputs = given if isinstance(given, list) else [given]
        results = []
        for item in inputs:
            text = item if isinstance(item, str) else str((item or {}).get("text", ""))
            hits = {c: self.behaviour.moderation_score(c, text) for c in _MODERATED}
            categories = {c: score >= 0.5 for c, score in hits.items()}
            results.append(
                {
                    "flagged": any(categories.values()),
                    "categories": categories,
                    "category_scores": hits,
                }
            )
        return _json({"id": "modr-mock-" + digest, "model": model, "results": results})

    def _models(self, raw: bytes) -> MockAnswer:
        data = [
            {"id": m, "object": "model", "created": 0, "owned_by": "mock"}
            for m in self.behaviour.config.models
        ]
        return _json({"object": "list", "data": data})

    def _stats(self, raw: bytes) -> MockAnswer:
        return _json(self.behaviour.stats.as_dict())

    def _set_faults(self, raw: bytes) -> MockAnswer:
        """Replace latency and/or faults at run time (body: a partial MockConfig)."""
        try:
            update = orjson.loads(raw or b"{}")
            merged = {**self.behaviour.config.model_dump(), **update}
            self.behaviour.config = MockConfig.model_validate(merged)
        except (orjson.JSONDecodeError, ValidationError, TypeError) as exc:
            return error(400, f"mock: bad fault config: {exc}")
        return _json(self.behaviour.config.model_dump())

    def _reset(self, raw: bytes) -> MockAnswer:
        self.behaviour.reset()
        return _json({"reset": True})
