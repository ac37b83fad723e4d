"""The Responses API (``POST /v1/responses``, ``/v1/responses/{id}``), after admission:

    limits and budget -> breaker/provider (retries, fallbacks) -> cost

A response is a stored object upstream (``store`` defaults to true) with an id a
later request continues (``previous_response_id``). Serving one from a cache, or
one upstream call to several clients, would hand each the same id and the same
conversation: so a stored response is never cached nor coalesced (``x-cache:
BYPASS``). A stateless one (``store: false``, continuing none) is a value like a
chat answer: the exact tier serves it under the chat policy (temperature 0 or an
opt-in), replayed as events to a streaming client when its output is text
messages. What the route adds to a passthrough:

- each stored response's id is recorded with the tenant that made it and the
  upstream that holds it (``deployments/response_index.py``): only that tenant can
  continue, read or delete it, and a continuation goes to that upstream only;
- limits, budgets, breakers, retries, fallbacks and billing as on chat; a streamed
  response is relayed event by event and billed from its ``response.completed``
  (whose usage then carries the gateway's cost, as chat's usage chunk does).

``background: true`` is refused: such a response is billed when it ends, after the
request that made it, and the gateway would have nothing to bill it from.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import parse_qsl, quote, urlencode

import orjson
from starlette.responses import Response, StreamingResponse

from deployments.cache_policy import CacheStatus, cache_headers
from deployments.provider import ProviderClient, UpstreamStream
from deployments.resilience import ResilienceResult, Target
from deployments.response_index import RESPONSE_ID, ResponseIndex, ResponseOwner
from deployments.response_replay import replayable, response_events, sse
from deployments.tokens import answer_text, reported_total
from serve_app.completion import ChatPipeline, Plan, require_json, upstream_payload
from serve_app.context import Principal, RequestContext
from serve_app.errors import (
    GatewayError,
    InvalidRequestError,
    NotFoundError,
    StoreUnavailableError,
    UpstreamError,
)
from serve_app.settings import ModelSettings
from serve_app.streaming import EventSplitter, RelayResponse, event_data
from serve_app.ticket import Ticket, in_background

log = logging.getLogger(__name__)

PATH = "/responses"
JSON = "application/json"
# The events that end a streamed response; each carries the whole response, usage too.
TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
BYPASS = {"x-cache": "BYPASS"}
T = TypeVar("T")
Targets = tuple[list[Target], list[Target]]  # a chain, and where an overlong request goes


def _previous_not_found(response_id: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"Previous response with id '{response_id}' not found.",
        param="previous_response_id",
        code="previous_response_not_found",
    )


class ResponsesPipeline:
    def __init__(self, chat: ChatPipeline, index: ResponseIndex, provider: ProviderClient) -> None:
        self.chat = chat
        self.stages = chat.stages
        self.index = index
        self.provider = provider

    async def run(self, ctx: RequestContext, model: ModelSettings) -> Response:
        plan = self._plan(ctx, model)
        targets = await self._targets(ctx, model)  # before any quota is spent
        ticket = await Ticket.admit(ctx, self.stages)
        with ticket.failing():
            if ctx.stream:
                return await self._stream(ctx, targets, ticket, plan)
            return await self._complete(ctx, targets, ticket, plan)

    def _plan(self, ctx: RequestContext, model: ModelSettings) -> Plan | None:
        """The exact tier's plan for a stateless response (``store: false``, continuing
        none): its answer is a value, cached under the chat policy (temperature 0 or an
        opt-in). A stored one is an object with an id of its own: never cached."""
        body = ctx.body
        if body.get("store") is False and body.get("previous_response_id") is None:
            return self.chat.plan(ctx, model)
        body.pop("cache", None)  # the gateway's cache controls: nothing to control here
        return None

    async def _targets(self, ctx: RequestContext, model: ModelSettings) -> Targets:
        """The model's chain and context overflow; for a continuation only the targets
        on the upstream that holds the response it continues (no other knows its id)."""
        chain = self.chat.chain(model)
        overflow = self.stages.resilience.overflow(model.name)
        previous = ctx.body.get("previous_response_id")
        if previous is None:
            return chain, overflow
        owner = await self.index.find(previous)
        if owner is None or owner.tenant != ctx.principal.tenant:
            raise _previous_not_found(previous)
        # The upstream reads the whole conversation again: its holds and quotas count it.
        ctx.prompt_tokens_estimate += owner.context_tokens
        pinned = [t for t in chain if t.upstream == owner.upstream]
        if not pinned:
            raise InvalidRequestError(
                f"Previous response '{previous}' is held by an upstream that does not serve"
                f" model '{model.name}' (it was made with '{owner.model}').",
                param="previous_response_id",
            )
        return pinned, [t for t in overflow if t.upstream == owner.upstream]

    async def record_owner(self, ctx: RequestContext, target: Target, response: Any) -> None:
        """Record a response the upstream stored, so its tenant can come back to it."""
        if not isinstance(response, dict):
            return
        # What the upstream says it did: some (vLLM) store nothing by default.
        if response.get("store", ctx.body.get("store") is not False) is not True:
            return
        response_id = response.get("id")
        if not isinstance(response_id, str) or not RESPONSE_ID.fullmatch(response_id):
            return
        owner = ResponseOwner(
            tenant=ctx.principal.tenant,
            upstream=target.upstream,
            model=ctx.model,
            key_id=ctx.principal.key_id,
            context_tokens=reported_total(response.get("usage")) or 0,
        )
        try:
            await self.index.remember(response_id, owner)
        except StoreUnavailableError:
            # The answer stands (and is billed); only going back to it through the
            # gateway is lost, which the client learns when it tries.
            log.warning("response %s could not be recorded: the store is unreachable", response_id)

    # -- non-streamed ----------------------------------------------------

    async def _call(
        self, ctx: RequestContext, targets: Targets, attempt: Callable[[Target], Awaitable[T]]
    ) -> ResilienceResult[T]:
        chain, overflow = targets
        return await self.stages.resilience.call(
            chain,
            attempt,
            self.chat.args.request_timeout_s,
            stream=ctx.stream,
            overflow=overflow,
            tokens=self.chat.target_tokens(ctx),
        )

    async def _complete(
        self, ctx: RequestContext, targets: Targets, ticket: Ticket, plan: Plan | None
    ) -> Response:
        if plan is not None:
            cached = await self.chat.cached_answer(ctx, plan, ticket)
            if cached is not None:
                return cached

        async def attempt(target: Target) -> tuple[bytes, dict[str, Any]]:
            response = await self.chat.timed(
                "gateway_upstream_duration_seconds",
                target,
                self.provider.post(
                    target.upstream, PATH, upstream_payload(ctx.body, target), ctx.request_id
                ),
            )
            return response.body, require_json(response.body)

        result = await self._call(ctx, targets, attempt)
        body, parsed = result.value
        usage = parsed.get("usage")
        usage = usage if isinstance(usage, dict) else None
        result.settle(reported_total(usage))
        status = _cache_status(plan)
        self.stages.metrics.inc("gateway_cache_results_total", 1, {"result": status["x-cache"]})
        # Billed before the store round trips below: a client that leaves during them
        # has had its answer made, and paid for, all the same.
        charge = ticket.finish(
            usage,
            served_by="upstream",
            cache=status["x-cache"].lower(),
            upstream=result.target.upstream,
            upstream_model=result.target.model,
            attempts=result.attempts,
            written=lambda: answer_text(parsed),
        )
        await self.record_owner(ctx, result.target, parsed)
        if plan is not None and parsed.get("store") is not True:  # not kept upstream after all
            await self.chat.remember(plan, body)
        headers = {**ctx.response_headers, **result.headers(), **status}
        if charge is not None:
            headers["x-request-cost"] = charge.header_value()
        return Response(body, 200, headers, media_type=JSON)

    # -- streamed --------------------------------------------------------

    async def _stream(
        self, ctx: RequestContext, targets: Targets, ticket: Ticket, plan: Plan | None
    ) -> Response:
        sse_headers = {"cache-control": "no-cache"}
        if plan is not None and (hit := await self.chat.exact_hit(plan)) is not None:
            body, cached = hit
            response = orjson.loads(body)
            if replayable(response):
                charge = self.chat.finish_hit(ticket, body)
                cost = charge.usage_fields() if charge is not None else {}
                headers = {**ctx.response_headers, **cached, **sse_headers}
                if charge is not None:
                    headers["x-request-cost"] = charge.header_value()
                return StreamingResponse(
                    _replay(response, cost), headers=headers, media_type="text/event-stream"
                )

        async def attempt(target: Target) -> UpstreamStream:
            return await self.chat.timed(
                "gateway_upstream_ttft_seconds",
                target,
                self.provider.open_stream(
                    target.upstream, PATH, upstream_payload(ctx.body, target), ctx.request_id
                ),
            )

        result = await self._call(ctx, targets, attempt)
        relay = _ResponseRelay(self, ctx, ticket, result, plan)
        try:
            first = await relay.first()  # errors before the first byte stay HTTP errors
        except BaseException:
            in_background(relay.close())
            raise
        status = _cache_status(plan)
        self.stages.metrics.inc("gateway_cache_results_total", 1, {"result": status["x-cache"]})
        headers = {**ctx.response_headers, **result.headers(), **status, **sse_headers}
        return RelayResponse(relay.run(first), lambda: relay.started, headers)

    # -- stored responses ------------------------------------------------

    async def owned(self, response_id: str, principal: Principal) -> ResponseOwner:
        """The owner of a response the caller's tenant made, on an upstream the gateway
        still has; else OpenAI's 404, which does not tell another tenant's response
        from one that does not exist."""
        owner = await self.index.find(response_id)
        if owner is None or owner.tenant != principal.tenant:
            raise NotFoundError(
                f"No response found with id '{response_id}'.", code="response_not_found"
            )
        if owner.upstream not in self.chat.args.upstreams:
            raise NotFoundError(
                f"The response '{response_id}' is held by an upstream this gateway no longer has.",
                code="response_not_found",
            )
        return owner

    async def stored(
        self,
        method: str,
        response_id: str,
        suffix: str,
        query: str,
        principal: Principal,
        request_id: str,
    ) -> Response:
        """``GET``/``DELETE /v1/responses/{id}`` and ``GET .../input_items``, sent to the
        upstream that holds the response. Each is a request against the key's request
        quotas (for the response's model), writing nothing: else a key could call the
        upstream past its rpm by reading."""
        owner = await self.owned(response_id, principal)
        ctx = RequestContext(request_id, principal, "responses", owner.model, {}, max_tokens=0)
        decision = await self.stages.limiter.acquire(ctx)  # raises 429 with its headers
        self.stages.limiter.settle_soon(decision, 0)  # it reserved no tokens
        headers = self.stages.limiter.headers(decision)
        path = f"{PATH}/{quote(response_id)}{suffix}" + passed_query(query)
        timeout_s = self.chat.args.request_timeout_s
        answer = await self.provider.send(method, owner.upstream, path, timeout_s)
        gone = method == "DELETE" and (answer.status < 400 or answer.status == 404)
        if gone:  # deleted, or the upstream no longer had it: either way, not there
            try:
                await self.index.forget(response_id)
            except StoreUnavailableError:
                log.warning(
                    "deleted response %s is still indexed: the store is unreachable", response_id
                )
        if answer.status >= 400:
            error = UpstreamError(
                f"upstream answered {answer.status}",
                status_code=answer.status,
                upstream_body=answer.body,
            )
            error.headers = {**headers, **error.headers}
            raise error
        return Response(answer.body, 200, headers, media_type=JSON)


# What a stored response's routes pass on of a query: pagination and includes (not
# ``stream``, which would turn the JSON answer into events).
PASSED_QUERY = frozenset({"after", "before", "limit", "order", "include", "include[]"})


def passed_query(query: str) -> str:
    pairs = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k in PASSED_QUERY]
    return "?" + urlencode(pairs) if pairs else ""


class _ResponseRelay:
    """Passes a streamed response to the client event by event (``event:`` lines and
    all), records its id from ``response.created`` and bills from its terminal event.
    A stream that ends without one gets an ``error`` event, as OpenAI sends one; a
    client that leaves is billed what the upstream had produced (as an error)."""

    def __init__(
        self,
        pipeline: ResponsesPipeline,
        ctx: RequestContext,
        ticket: Ticket,
        result: ResilienceResult[UpstreamStream],
        plan: Plan | None = None,
    ) -> None:
        self.pipeline, self.ctx, self.ticket, self.result = pipeline, ctx, ticket, result
        self.plan = plan  # a stateless response's: a completed one is stored
        self.chunks = aiter(result.value.chunks())
        self.splitter = EventSplitter()
        self.text: list[str] = []
        self.usage: dict[str, Any] | None = None
        self.done = False
        self.failed = False
        self.sequence = -1
        self.closed = False
        self.started = False  # ``run`` began (``RelayResponse``)

    async def first(self) -> bytes:
        try:
            return await anext(self.chunks)
        except StopAsyncIteration:
            raise UpstreamError("The upstream stream ended before any data.") from None

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            await self.result.value.aclose()
        finally:
            self.result.release()

    async def run(self, first: bytes) -> AsyncGenerator[bytes, None]:
        self.started = True
        left = False
        try:
            raw: bytes | None = first
            while raw is not None:
                self.ticket.touch()
                for event in self.splitter.feed(raw):
                    yield await self._event(event)
                raw = await anext(self.chunks, None)
            if not self.done:
                raise UpstreamError(
                    "The upstream stream ended before the response was complete.",
                    code="upstream_stream_cut",
                )
        except GatewayError as exc:
            self.failed = True
            yield self._error(exc)
        except (asyncio.CancelledError, GeneratorExit):
            left = True
            raise
        finally:
            in_background(self.close())
            self._bill("error" if left or self.failed or not self.done else "ok")

    async def _event(self, event: bytes) -> bytes:
        """What the client gets for one upstream event: the event, with the gateway's
        cost in a terminal one's usage."""
        data = event_data(event)
        try:
            payload = orjson.loads(data) if data is not None else None
        except orjson.JSONDecodeError:
            payload = None
        if not isinstance(payload, dict):
            return event + b"\n\n"
        kind = payload.get("type")
        if isinstance(payload.get("sequence_number"), int):
            self.sequence = payload["sequence_number"]
        if kind == "response.output_text.delta" and isinstance(payload.get("delta"), str):
            self.text.append(payload["delta"])
        elif kind == "response.created":
            await self.pipeline.record_owner(self.ctx, self.result.target, payload.get("response"))
        elif kind == "error":
            self.done = self.failed = True
        elif kind in TERMINAL:
            self.done = True
            self.failed = kind == "response.failed"
            response = payload.get("response")
            if not isinstance(response, dict):
                return event + b"\n\n"
            stateless = response.get("store") is not True
            usage = response.get("usage")
            charge = None
            if isinstance(usage, dict):  # billed first: a client may leave during the writes
                self.usage = usage
                charge = self._bill("error" if self.failed else "ok")
            if self.plan is not None and kind == "response.completed" and stateless:
                await self.pipeline.chat.remember(self.plan, orjson.dumps(response))
            if not stateless and reported_total(usage):  # recorded at its start, sizeless
                await self.pipeline.record_owner(self.ctx, self.result.target, response)
            if charge is not None:
                assert isinstance(usage, dict)
                response["usage"] = {**usage, **charge.usage_fields()}
                return sse(kind, payload)
        return event + b"\n\n"

    def _error(self, error: GatewayError) -> bytes:
        self.sequence += 1
        detail = error.to_dict()["error"]
        payload = {
            "type": "error",
            "code": detail["code"],
            "message": detail["message"],
            "param": detail["param"],
            "sequence_number": self.sequence,
        }
        return sse("error", payload)

    def _bill(self, status: str) -> Any:
        if self.ticket.settled:
            return None
        self.result.settle(reported_total(self.usage))
        target = self.result.target
        return self.ticket.finish(
            self.usage,
            served_by="upstream",
            cache=_cache_status(self.plan)["x-cache"].lower(),
            upstream=target.upstream,
            upstream_model=target.model,
            attempts=self.result.attempts,
            status=status,
            written=lambda: "".join(self.text),
        )


def _cache_status(plan: Plan | None) -> dict[str, str]:
    """``x-cache`` (and its key) for an answer fetched upstream."""
    if plan is None:
        return BYPASS
    status = CacheStatus.MISS if plan.decision.lookup else CacheStatus.BYPASS
    return cache_headers(status, plan.digest)


async def _replay(response: dict[str, Any], cost: dict[str, Any]) -> AsyncIterator[bytes]:
    """A cached response as events; its usage carries the (zero) cost like a live one."""
    for kind, payload in response_events(response):
        if kind == "response.completed" and cost and isinstance(response.get("usage"), dict):
            payload["response"] = {**response, "usage": {**response["usage"], **cost}}
        yield sse(kind, payload)


__all__ = ["ResponsesPipeline"]
