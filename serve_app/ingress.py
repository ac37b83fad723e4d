"""The OpenAI-compatible ingress: a plain class whose Starlette app runs the
request DAG in order. The Ray wrapper (``serve_app.app``) only builds it.

Every response carries ``x-request-id``; every failure becomes the OpenAI
error envelope in one place (``_endpoint``), so a bad request can never take
the replica down.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from deployments.counts import parse_count
from deployments.provider import ProviderClient
from deployments.resilience import Target
from deployments.response_index import ResponseIndex
from deployments.tokens import (
    estimate_chat_tokens,
    estimate_input_tokens,
    estimate_rerank_tokens,
    estimate_response_tokens,
    estimate_text_tokens,
)
from serve_app import store as store_module
from serve_app.admin import Admin
from serve_app.auth import KeyRing, unknown_key
from serve_app.completion import ChatPipeline
from serve_app.context import Principal, RequestContext, new_request_id
from serve_app.errors import (
    GatewayError,
    InvalidRequestError,
    ModelNotFoundError,
    NotFoundError,
    PayloadTooLargeError,
    StoreUnavailableError,
)
from serve_app.key_info import key_info
from serve_app.metrics import MetricSink, NullMetrics
from serve_app.model_routes import ModelRoutes
from serve_app.prompt_decorator import PromptDecorator
from serve_app.prompt_guard import PromptGuard
from serve_app.prompt_templates import PromptTemplates
from serve_app.replica_stats import ReplicaStats
from serve_app.responses import ResponsesPipeline
from serve_app.runtime_keys import RuntimeKeys
from serve_app.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingsRequest,
    ModerationRequest,
    RerankRequest,
    ResponsesRequest,
    validate,
)
from serve_app.settings import GatewayArgs, ModelSettings
from serve_app.stages import SemanticCacheClient, Stages
from serve_app.store import Store
from serve_app.ticket import drain_background

log = logging.getLogger(__name__)

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
Handler = Callable[[Request, str], Awaitable[Response]]
CHAT_PATH = "/v1/chat/completions"
RESPONSE_PATH = "/v1/responses/{response_id}"
# The kind of model each route serves (the rest: chat).
KINDS = {"embeddings": "embeddings", "rerank": "rerank", "moderations": "moderation"}
SHALLOW_BRACKETS = 200  # a body with no more brackets than this cannot nest too deeply


def json_response(
    payload: Any, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(orjson.dumps(payload), status, headers, media_type="application/json")


def _too_large(limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"Request body exceeds the gateway's limit of {limit} bytes.", status_code=413
    )


def error_response(error: GatewayError) -> Response:
    return Response(error.body(), error.status_code, error.headers, media_type="application/json")


class Gateway:
    def __init__(
        self,
        args: GatewayArgs,
        *,
        store: Store | None = None,
        provider: ProviderClient | None = None,
        stamp_request_id: bool = True,
        metrics: MetricSink | None = None,
        semantic: SemanticCacheClient | None = None,
    ) -> None:
        self.args = args
        self.stamp_request_id = stamp_request_id
        self.metrics = metrics or NullMetrics()
        self.replica_stats = ReplicaStats()
        self.semantic = semantic
        self.keys = KeyRing(args.api_keys, args.tenant_models())
        self.routes = ModelRoutes(args.models)
        self.guard = PromptGuard(args.prompt_guard, self.metrics)
        self.decorator = PromptDecorator(args.prompt_decorator)
        self.templates = PromptTemplates(args.prompt_templates)
        self.moderation_models = [
            m.name for m in args.models if m.kind == "moderation" and not m.name.endswith("*")
        ]
        self.provider = provider or ProviderClient(args.upstreams)
        self.store = store

    async def start(self) -> None:
        if self.store is None:
            self.store = await store_module.connect(self.args.store)
        self.stages = Stages.build(self.args, self.store, self.metrics, self.semantic)
        # Admin calls reach any replica: each knows every breaker, not only those it has called.
        resilience = self.args.resilience
        routed = {m for m, chain in resilience.fallbacks.items() if chain} | {*resilience.balance}
        for m in self.routes.exact.values():
            if m.name in routed:
                continue
            self.stages.resilience.breaker_name(Target(upstream=m.upstream, model=m.target_model))
        await self.stages.start()
        self.pipeline = ChatPipeline(self.args, self.stages, self.provider, self.routes)
        index = ResponseIndex(self.stages.redis, self.args.responses.retention_s)
        self.responses = ResponsesPipeline(self.pipeline, index, self.provider)
        self.runtime_keys = RuntimeKeys(
            self.stages.redis,
            reserved_names=[k.name for k in self.args.api_keys],
            models=[m.name for m in self.args.models],
            tenant_models=self.args.tenant_models(),
        )
        self.runtime_keys.start()
        self.admin = Admin(self)
        self.admin.start()

    async def aclose(self) -> None:
        await self.admin.stop()
        await self.runtime_keys.stop()
        await drain_background()
        await self.stages.aclose()
        await self.provider.aclose()
        if self.store is not None:
            await self.store.aclose()

    # -- admission -------------------------------------------------------

    async def _read_body(self, request: Request) -> tuple[dict[str, Any], bytes]:
        """The JSON object the body holds, and the bytes as received."""
        limit = self.args.max_body_bytes
        declared = request.headers.get("content-length", "")
        if (length := parse_count(declared)) is not None and length > limit:
            raise _too_large(limit)
        parts: list[bytes] = []
        size = 0
        async for part in request.stream():
            size += len(part)
            if size > limit:
                raise _too_large(limit)
            parts.append(part)
        raw = b"".join(parts)
        try:
            payload = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise InvalidRequestError(
                f"We could not parse the JSON body of your request: {exc.msg}."
            ) from None
        if not isinstance(payload, dict):
            raise InvalidRequestError("The request body must be a JSON object.")
        # orjson parses 1,024 levels deep but writes only ~250: a body deeper than that
        # could never be sent upstream (nor its tools estimated). Counting brackets is
        # cheap, and only a body with enough of them can be that deep.
        if raw.count(b"[") + raw.count(b"{") > SHALLOW_BRACKETS:
            try:
                orjson.dumps(payload)
            except orjson.JSONEncodeError:
                raise InvalidRequestError("The JSON body is nested too deeply.") from None
        return payload, raw

    async def principal(self, request: Request) -> Principal:
        """Who sends the request: a configured key's holder (no await), else a key
        created at run time (``serve_app/runtime_keys.py``)."""
        found = self.keys.resolve(request.headers.get("authorization"))
        if not isinstance(found, str):
            return found
        principal = await self.runtime_keys.principal(found)
        if principal is None:
            raise unknown_key()
        return principal

    def _visible(self, name: str, principal: Principal) -> ModelSettings:
        """The model, if it exists and the key may use it; else OpenAI's 404, which does
        not tell a model that exists from one that does not."""
        model = self.routes.get(name)
        if model is None or not principal.may_use(name, self.routes.entry(name)):
            raise ModelNotFoundError(
                f"The model '{name}' does not exist or you do not have access to it.",
                param="model",
            )
        return model

    def _default_moderation(self, principal: Principal) -> str | None:
        """The first moderation model the caller may use (OpenAI's SDK names none)."""
        return next((m for m in self.moderation_models if principal.may_use(m)), None)

    def _model(self, name: str, kind: str, principal: Principal) -> ModelSettings:
        model = self._visible(name, principal)
        if model.kind != kind:
            raise InvalidRequestError(
                f"The model '{name}' is a {model.kind} model and cannot serve this endpoint.",
                param="model",
            )
        return model

    # -- routes ----------------------------------------------------------

    async def _serve(
        self,
        request: Request,
        request_id: str,
        route: str,
        read: Callable[[dict[str, Any]], tuple[str, dict[str, Any]]],
    ) -> Response:
        """A model call on ``route``: ``read`` validates the body and gives its model
        name and what the stages need to know of it (``RequestContext`` fields)."""
        principal = await self.principal(request)
        body, raw = await self._read_body(request)
        if route == "moderations" and "model" not in body:
            if (default := self._default_moderation(principal)) is not None:
                body["model"] = default
        if self.templates.enabled and self.templates.expand(route, body, principal.tenant):
            raw = b""  # the bytes no longer say what is asked: no request-key memo
        name, fields = read(body)
        model = self._model(name, KINDS.get(route, "chat"), principal)
        # A label: what a wildcard matched is the client's to choose, so its entry's name.
        request.state.model = self.routes.entry(model.name)
        if self.guard.enabled:
            self.guard.check(route, body, principal.tenant)
        if self.decorator.enabled and route in ("chat", "responses"):
            chat = route == "chat"
            if self.decorator.decorate(body, principal.tenant, "messages" if chat else "input"):
                fields["prompt_tokens_estimate"] = (
                    estimate_chat_tokens(body) if chat else estimate_response_tokens(body)
                )
                raw = b""  # the bytes no longer say what is asked: no request-key memo
        if model.upstream_model is not None:
            fields["target_model"] = model.upstream_model
        ctx = RequestContext(
            request_id=request_id,
            principal=principal,
            route=route,
            model=model.name,
            body=body,
            headers={"cache-control": request.headers.get("cache-control", "")},
            raw_body=raw,
            tags=spend_tags(request.headers.get(TAGS_HEADER)),
            **fields,
        )
        if route == "responses":
            return await self.responses.run(ctx, model)
        return await self.pipeline.run(ctx, model)

    async def chat(self, request: Request, request_id: str) -> Response:
        return await self._serve(request, request_id, "chat", _read_chat)

    async def completions(self, request: Request, request_id: str) -> Response:
        """``/v1/completions``: a prompt to a text-generation (``kind: chat``) model,
        through the same stages as chat (the semantic tier, which compares chat
        messages, aside)."""
        return await self._serve(request, request_id, "completions", _read_completion)

    async def create_response(self, request: Request, request_id: str) -> Response:
        """``/v1/responses``: OpenAI's Responses API, for ``kind: chat`` models, through
        limits, budgets, breakers, fallbacks and billing; never coalesced, and cached
        only when stateless (``serve_app/responses.py``)."""
        return await self._serve(request, request_id, "responses", _read_response)

    def stored_response(self, method: str, suffix: str = "") -> Handler:
        """A stored response's own route, for the tenant that made it."""

        async def handler(request: Request, request_id: str) -> Response:
            principal = await self.principal(request)
            response_id = request.path_params["response_id"]
            return await self.responses.stored(
                method, response_id, suffix, request.url.query, principal, request_id
            )

        return handler

    async def moderations(self, request: Request, request_id: str) -> Response:
        """``/v1/moderations`` for ``kind: moderation`` models (the first one when the
        body names none, as OpenAI's SDK sends it): cached and coalesced with no opt-in."""
        return await self._serve(request, request_id, "moderations", _read_moderation)

    async def rerank(self, request: Request, request_id: str) -> Response:
        """``/v1/rerank`` (and Cohere's ``/v2/rerank``) for ``kind: rerank`` models:
        deterministic, so cached and coalesced with no opt-in, as embeddings are."""
        return await self._serve(request, request_id, "rerank", _read_rerank)

    async def embeddings(self, request: Request, request_id: str) -> Response:
        # deterministic: cached and coalesced with no opt-in
        return await self._serve(request, request_id, "embeddings", _read_embeddings)

    async def list_models(self, request: Request, request_id: str) -> Response:
        principal = await self.principal(request)
        data = [_model_object(m) for m in self.routes.listed() if principal.may_use(m.name)]
        return json_response({"object": "list", "data": data})

    async def retrieve_model(self, request: Request, request_id: str) -> Response:
        """``GET /v1/models/{model}`` (the SDKs' ``models.retrieve``); a name may hold slashes."""
        principal = await self.principal(request)
        model = self._visible(request.path_params["model"], principal)
        return json_response(_model_object(model))

    async def key_info(self, request: Request, request_id: str) -> Response:
        """``GET /v1/key``: the calling key's own limits, budgets and spend."""
        return json_response(await key_info(self, request))

    async def healthz(self, request: Request, request_id: str) -> Response:
        return json_response({"status": "ok"})

    async def readyz(self, request: Request, request_id: str) -> Response:
        if self.store is None or not await self.store.healthy():
            raise StoreUnavailableError("The state store (Redis) is not reachable.")
        return json_response({"status": "ready", "store": "ok"})

    def _endpoint(self, path: str, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        """Renders errors as the envelope, counts the request, feeds the autoscaler's
        replica stats. ``x-request-id`` is added here only outside Serve (its proxy
        and HAProxy already add it to every response)."""
        route_label = path.removeprefix("/v1/")

        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            self.replica_stats.begin()
            supplied = request.headers.get("x-request-id", "")
            request_id = supplied if _REQUEST_ID.match(supplied) else new_request_id()
            try:
                response = await handler(request, request_id)
            except GatewayError as exc:
                response = error_response(exc)
            except Exception:
                log.exception("request %s failed unexpectedly", request_id)
                response = error_response(GatewayError("The gateway failed to handle the request."))
            finally:
                elapsed = time.perf_counter() - started
                self.replica_stats.end(elapsed)
            if self.stamp_request_id:
                response.headers["x-request-id"] = request_id
            model = getattr(request.state, "model", "")
            self.metrics.inc(
                "gateway_requests_total",
                1,
                {"route": route_label, "model": model, "status": str(response.status_code)},
            )
            self.metrics.observe(
                "gateway_request_duration_seconds", elapsed, {"route": route_label, "model": model}
            )
            return response

        return endpoint

    def asgi(self) -> Starlette:
        def route(path: str, handler: Handler, method: str) -> Route:
            return Route(path, self._endpoint(path, handler), methods=[method])

        chat = self._endpoint(CHAT_PATH, self.chat)
        routes = [
            Route(CHAT_PATH, chat, methods=["POST"]),
            route("/v1/completions", self.completions, "POST"),
            route("/v1/embeddings", self.embeddings, "POST"),
            route("/v1/responses", self.create_response, "POST"),
            route("/v1/rerank", self.rerank, "POST"),
            route("/v1/moderations", self.moderations, "POST"),
            route("/v2/rerank", self.rerank, "POST"),
            route(RESPONSE_PATH, self.stored_response("GET"), "GET"),
            route(RESPONSE_PATH, self.stored_response("DELETE"), "DELETE"),
            route(
                f"{RESPONSE_PATH}/input_items", self.stored_response("GET", "/input_items"), "GET"
            ),
            route("/v1/models", self.list_models, "GET"),
            route("/v1/key", self.key_info, "GET"),
            route("/v1/models/{model:path}", self.retrieve_model, "GET"),
            route("/healthz", self.healthz, "GET"),
            route("/readyz", self.readyz, "GET"),
        ]
        admin = self.admin
        for path, handler, method in (
            ("/admin/limits", admin.get_limits, "GET"),
            ("/admin/limits", admin.put_limits, "PUT"),
            ("/admin/limits", admin.reset_limits, "DELETE"),
            ("/admin/budgets", admin.get_budgets, "GET"),
            ("/admin/budgets", admin.put_budgets, "PUT"),
            ("/admin/budgets", admin.reset_budgets, "DELETE"),
            ("/admin/breakers", admin.breakers, "GET"),
            ("/admin/breakers/{action}", admin.breaker_action, "POST"),
            ("/admin/balance", admin.balance, "GET"),
            ("/admin/health", admin.health, "GET"),
            ("/admin/audit", admin.audit_log, "GET"),
            ("/admin/cache/stats", admin.cache_stats, "GET"),
            ("/admin/cache", admin.cache_delete, "DELETE"),
            ("/admin/cache/flush", admin.cache_flush, "POST"),
            ("/admin/scaling", admin.scaling, "GET"),
            ("/admin/keys", admin.list_keys, "GET"),
            ("/admin/keys", admin.create_key, "POST"),
            ("/admin/keys/{name}", admin.revoke_key, "DELETE"),
            ("/admin/keys/{name}", admin.update_key, "PATCH"),
            ("/admin/keys/{name}/rotate", admin.rotate_key, "POST"),
            ("/v1/cost/summary", admin.cost_summary, "GET"),
            ("/v1/cost/recommendations", admin.cost_recommendations, "GET"),
        ):
            routes.append(route(path, admin.guarded(handler), method))
        return _GatewayApp(
            chat,
            routes=routes,
            exception_handlers={HTTPException: _http_exception},
        )


class _GatewayApp(Starlette):
    """Starlette, but the hot route (a POST to ``CHAT_PATH``) goes straight to
    its endpoint, past the middleware stack and the router: the endpoint renders
    every error itself (``Gateway._endpoint``), so they only cost it CPU (~7 % of
    the gateway's own per request, measured in process). Serve still sees a
    Starlette app, whose routes name the request in its metrics."""

    def __init__(self, chat: Callable[[Request], Awaitable[Response]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._chat = chat

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and _route_path(scope) == CHAT_PATH
        ):
            scope["app"] = self
            response = await self._chat(Request(scope, receive, send))
            await response(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def _model_object(model: ModelSettings) -> dict[str, Any]:
    return {"id": model.name, "object": "model", "created": 0, "owned_by": model.owned_by}


def _route_path(scope: Scope) -> str:
    """The path below the app's mount point (Serve mounts it at its route prefix)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


async def _http_exception(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    if status == 405:
        error = InvalidRequestError(
            f"Method {request.method} is not allowed here.", status_code=405
        )
    else:
        error = NotFoundError(f"Unknown path: {request.url.path}", status_code=status)
    response = error_response(error)
    response.headers["x-request-id"] = new_request_id()
    return response


def _read_chat(body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    parsed = validate(ChatCompletionRequest, body)
    return parsed.model, {
        "stream": parsed.stream,
        "end_user": parsed.user,
        "prompt_tokens_estimate": estimate_chat_tokens(body),
        "max_tokens": parsed.max_completion_tokens or parsed.max_tokens,
        "choices": parsed.n or 1,
    }


def _read_completion(body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    parsed = validate(CompletionRequest, body)
    return parsed.model, {
        "stream": parsed.stream,
        "end_user": parsed.user,
        "prompt_tokens_estimate": estimate_input_tokens(parsed.prompt),
        "max_tokens": parsed.max_tokens,
        "choices": max(parsed.n or 1, parsed.best_of or 1) * parsed.prompts,
    }


def _read_response(body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    parsed = validate(ResponsesRequest, body)
    if parsed.background:
        raise InvalidRequestError(
            "The gateway does not serve background responses: they end after the request"
            " that makes them, and it could not bill or limit them.",
            param="background",
        )
    # Both name what the upstream keeps for every tenant of the gateway's one key, and
    # the gateway cannot tell whose it is (its own ids, previous_response_id, it can).
    if body.get("conversation") is not None:
        raise InvalidRequestError(
            "The gateway does not pass on 'conversation': continue a response with"
            " 'previous_response_id' instead.",
            param="conversation",
        )
    if isinstance(parsed.input, list) and any(_is_reference(item) for item in parsed.input):
        raise InvalidRequestError(
            "The gateway does not pass on input items of type 'item_reference': send the"
            " item itself, or continue with 'previous_response_id'.",
            param="input",
        )
    return parsed.model, {
        "stream": parsed.stream,
        "end_user": parsed.user,
        "prompt_tokens_estimate": estimate_response_tokens(body),
        "max_tokens": parsed.max_output_tokens,
    }


def _is_reference(item: dict[str, Any]) -> bool:
    """An input item naming one the upstream keeps: ``item_reference``, whose type the
    API lets a client leave out (an item with an id and no type is one)."""
    kind = item.get("type")
    return kind == "item_reference" or (kind is None and "id" in item)


def _read_moderation(body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    parsed = validate(ModerationRequest, body)
    texts = parsed.input if isinstance(parsed.input, list) else [parsed.input]
    text = " ".join(t if isinstance(t, str) else str(t.get("text", "")) for t in texts)
    return parsed.model, {"prompt_tokens_estimate": estimate_text_tokens(text), "max_tokens": 0}


def _read_rerank(body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    parsed = validate(RerankRequest, body)
    return parsed.model, {
        "end_user": parsed.user,
        "prompt_tokens_estimate": estimate_rerank_tokens(parsed.query, parsed.documents),
        "max_tokens": 0,  # it writes nothing: no output is held against a budget
    }


def _read_embeddings(body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    parsed = validate(EmbeddingsRequest, body)
    return parsed.model, {
        "end_user": parsed.user,
        "prompt_tokens_estimate": estimate_input_tokens(parsed.input),
        "max_tokens": 0,  # it writes nothing: no output is held against a budget
    }


TAGS_HEADER = "x-gateway-tags"
MAX_TAGS = 10
_TAG = re.compile(r"[A-Za-z0-9._:=/-]{1,64}")


def spend_tags(header: str | None) -> tuple[str, ...]:
    """``x-gateway-tags: search,env=prod``: the tags the ledger sums this request's spend
    under (``/v1/cost/summary?group_by=tag``), each once, in the order given."""
    if not header:
        return ()
    tags = tuple(dict.fromkeys(t.strip() for t in header.split(",") if t.strip()))
    bad = [t for t in tags if not _TAG.fullmatch(t)]
    if bad or len(tags) > MAX_TAGS:
        raise InvalidRequestError(
            f"{TAGS_HEADER} takes at most {MAX_TAGS} comma-separated tags of 1 to 64 letters,"
            f" digits and . _ : = / - (refused: {bad[:3] or 'too many'}).",
            param=TAGS_HEADER,
        )
    return tags


__all__ = ["Gateway", "error_response", "json_response"]
