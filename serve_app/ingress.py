"""The OpenAI-compatible ingress: a plain class whose Starlette app runs the
request DAG in order. The Ray wrapper (``serve_app.app``) only builds it.

Every response carries ``x-request-id``; every failure becomes the OpenAI
error envelope in one place (``_endpoint``), so a bad request can never take
the replica down.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from deployments.provider import ProviderClient, UpstreamStream
from deployments.tokens import estimate_prompt_tokens
from serve_app import store as store_module
from serve_app.auth import KeyRing
from serve_app.context import RequestContext
from serve_app.errors import (
    GatewayError,
    InvalidRequestError,
    ModelNotFoundError,
    NotFoundError,
    PayloadTooLargeError,
    StoreUnavailableError,
    UpstreamError,
)
from serve_app.schemas import ChatCompletionRequest, EmbeddingsRequest, validate
from serve_app.settings import GatewayArgs, ModelSettings
from serve_app.store import Store
from serve_app.streaming import (
    EventSplitter,
    StreamResult,
    error_event,
    event_data,
    inspect_event,
)

log = logging.getLogger(__name__)

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
Handler = Callable[[Request, str], Awaitable[Response]]


def json_response(
    payload: Any, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(orjson.dumps(payload), status, headers, media_type="application/json")


def error_response(error: GatewayError) -> Response:
    return Response(error.body(), error.status_code, error.headers, media_type="application/json")


def _endpoint(handler: Handler, stamp: bool) -> Callable[[Request], Awaitable[Response]]:
    """Renders errors as the envelope. ``stamp``: add ``x-request-id`` ourselves
    (Serve's proxy and HAProxy already add it to every response under Ray)."""

    async def endpoint(request: Request) -> Response:
        supplied = request.headers.get("x-request-id", "")
        request_id = supplied if _REQUEST_ID.match(supplied) else uuid.uuid4().hex
        try:
            response = await handler(request, request_id)
        except GatewayError as exc:
            response = error_response(exc)
        except Exception:
            log.exception("request %s failed unexpectedly", request_id)
            response = error_response(GatewayError("The gateway failed to handle the request."))
        if stamp:
            response.headers["x-request-id"] = request_id
        return response

    return endpoint


class Gateway:
    def __init__(
        self,
        args: GatewayArgs,
        *,
        store: Store | None = None,
        provider: ProviderClient | None = None,
        stamp_request_id: bool = True,
    ) -> None:
        self.args = args
        self.stamp_request_id = stamp_request_id
        self.keys = KeyRing(args.api_keys)
        self.models: dict[str, ModelSettings] = {m.name: m for m in args.models}
        self.provider = provider or ProviderClient(args.upstreams)
        self.store = store

    async def start(self) -> None:
        if self.store is None:
            self.store = await store_module.connect(self.args.store)

    async def aclose(self) -> None:
        await self.provider.aclose()
        if self.store is not None:
            await self.store.aclose()

    # -- admission -------------------------------------------------------

    async def _read_json(self, request: Request) -> dict[str, Any]:
        limit = self.args.max_body_bytes
        declared = request.headers.get("content-length", "")
        too_large = PayloadTooLargeError(
            f"Request body exceeds the gateway's limit of {limit} bytes.", status_code=413
        )
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        parts: list[bytes] = []
        size = 0
        async for part in request.stream():
            size += len(part)
            if size > limit:
                raise too_large
            parts.append(part)
        try:
            payload = orjson.loads(b"".join(parts))
        except orjson.JSONDecodeError as exc:
            raise InvalidRequestError(
                f"We could not parse the JSON body of your request: {exc.msg}."
            ) from None
        if not isinstance(payload, dict):
            raise InvalidRequestError("The request body must be a JSON object.")
        return payload

    def _model(self, name: str, kind: str) -> ModelSettings:
        model = self.models.get(name)
        if model is None:
            raise ModelNotFoundError(
                f"The model '{name}' does not exist or you do not have access to it.",
                param="model",
            )
        if model.kind != kind:
            raise InvalidRequestError(
                f"The model '{name}' is a {model.kind} model and cannot serve this endpoint.",
                param="model",
            )
        return model

    # -- routes ----------------------------------------------------------

    async def chat(self, request: Request, request_id: str) -> Response:
        principal = self.keys.authenticate(request.headers.get("authorization"))
        body = await self._read_json(request)
        parsed = validate(ChatCompletionRequest, body)
        model = self._model(parsed.model, "chat")
        ctx = RequestContext(
            request_id=request_id,
            principal=principal,
            route="chat",
            model=parsed.model,
            body=body,
            stream=parsed.stream,
            end_user=parsed.user,
            prompt_tokens_estimate=estimate_prompt_tokens(body["messages"]),
            max_tokens=parsed.max_completion_tokens or parsed.max_tokens,
        )
        upstream_body = {**body, "model": model.target_model}
        if ctx.stream:
            return await self._stream_chat(ctx, model, upstream_body)
        response = await self.provider.post(
            model.upstream, "/chat/completions", orjson.dumps(upstream_body), request_id
        )
        _require_json(response.body)
        return Response(response.body, 200, ctx.response_headers, media_type="application/json")

    async def _stream_chat(
        self, ctx: RequestContext, model: ModelSettings, upstream_body: dict[str, Any]
    ) -> Response:
        # Always ask the upstream for usage (accounting needs it); the client
        # only sees the usage chunk when it asked for one.
        client_options = upstream_body.get("stream_options") or {}
        want_usage = bool(client_options.get("include_usage"))
        upstream_body["stream_options"] = {**client_options, "include_usage": True}
        stream = await self.provider.open_stream(
            model.upstream, "/chat/completions", orjson.dumps(upstream_body), ctx.request_id
        )
        headers = {**ctx.response_headers, "cache-control": "no-cache"}
        return StreamingResponse(
            self._relay(stream, want_usage), media_type="text/event-stream", headers=headers
        )

    async def _relay(self, stream: UpstreamStream, want_usage: bool) -> AsyncIterator[bytes]:
        result = StreamResult()
        splitter = EventSplitter()
        try:
            async for raw in stream.chunks():
                for event in splitter.feed(raw):
                    data = event_data(event)
                    if data is None:
                        continue
                    if inspect_event(data, result) or want_usage:
                        yield event + b"\n\n"
            if not result.done:
                raise UpstreamError("The upstream stream ended before [DONE].")
        except GatewayError as exc:
            result.error = exc
            yield error_event(exc)
        finally:
            await stream.aclose()

    async def embeddings(self, request: Request, request_id: str) -> Response:
        self.keys.authenticate(request.headers.get("authorization"))
        body = await self._read_json(request)
        parsed = validate(EmbeddingsRequest, body)
        model = self._model(parsed.model, "embeddings")
        response = await self.provider.post(
            model.upstream,
            "/embeddings",
            orjson.dumps({**body, "model": model.target_model}),
            request_id,
        )
        _require_json(response.body)
        return Response(response.body, 200, media_type="application/json")

    async def list_models(self, request: Request, request_id: str) -> Response:
        self.keys.authenticate(request.headers.get("authorization"))
        data = [
            {"id": m.name, "object": "model", "created": 0, "owned_by": m.owned_by}
            for m in self.models.values()
        ]
        return json_response({"object": "list", "data": data})

    async def healthz(self, request: Request, request_id: str) -> Response:
        return json_response({"status": "ok"})

    async def readyz(self, request: Request, request_id: str) -> Response:
        if self.store is None or not await self.store.healthy():
            raise StoreUnavailableError("The state store (Redis) is not reachable.")
        return json_response({"status": "ready", "store": "ok"})

    def asgi(self) -> Starlette:
        def route(path: str, handler: Handler, method: str) -> Route:
            return Route(path, _endpoint(handler, self.stamp_request_id), methods=[method])

        routes = [
            route("/v1/chat/completions", self.chat, "POST"),
            route("/v1/embeddings", self.embeddings, "POST"),
            route("/v1/models", self.list_models, "GET"),
            route("/healthz", self.healthz, "GET"),
            route("/readyz", self.readyz, "GET"),
        ]
        return Starlette(
            routes=routes,
            exception_handlers={HTTPException: _http_exception},
        )


def _require_json(body: bytes) -> None:
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError:
        raise UpstreamError(
            "The upstream returned a malformed (non-JSON) body.", code="upstream_malformed_response"
        ) from None


async def _http_exception(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    if status == 405:
        error = InvalidRequestError(
            f"Method {request.method} is not allowed here.", status_code=405
        )
    else:
        error = NotFoundError(f"Unknown path: {request.url.path}", status_code=status)
    response = error_response(error)
    response.headers["x-request-id"] = uuid.uuid4().hex
    return response


__all__ = ["Gateway", "error_response", "json_response"]
