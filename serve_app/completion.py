"""The chat-completion path through the DAG, after admission:

    exact cache -> dedup (single flight) -> semantic cache -> breaker/provider -> cost

Only the leader of a flight runs the semantic lookup and the upstream call;
followers, here or on another replica, get the leader's bytes. The value a
flight carries is ``meta-json \\n body`` so followers also learn how the
answer was served (MISS or SEMANTIC_HIT).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterator,
)
from typing import Any, TypeVar

import orjson
from starlette.responses import Response, StreamingResponse

from deployments.adaptive_limit import AdaptiveLimit
from deployments.cache_policy import (
    CacheDecision,
    CacheStatus,
    cache_headers,
    decide,
    parse_controls,
)
from deployments.cost import Charge
from deployments.dedup import ChunkReader, Flight, Role, StreamFlight
from deployments.provider import ProviderClient, UpstreamStream
from deployments.request_key import RequestKey, RequestKeys
from deployments.resilience import ResilienceResult, Target
from deployments.resilience_settings import SharedBreakerTarget
from deployments.sse_replay import ChunkAssembler, StreamAssembler, replay_sse
from deployments.text_replay import TextStreamAssembler, replay_text_sse
from deployments.tokens import answer_text, reported_total
from serve_app.context import RequestContext
from serve_app.errors import GatewayError, UpstreamError
from serve_app.model_routes import ModelRoutes
from serve_app.settings import GatewayArgs, ModelSettings
from serve_app.stages import Stages
from serve_app.streaming import (
    EventSplitter,
    RelayResponse,
    StreamResult,
    encode_event,
    error_event,
    event_data,
    inspect_event,
)
from serve_app.ticket import Ticket, in_background

log = logging.getLogger(__name__)
T = TypeVar("T")
JSON = "application/json"


class Plan:
    """What the cache policy decided for a request, and its key, derived only when a
    cache tier or the single flight needs it (a BYPASS answer has none to show)."""

    __slots__ = ("_ctx", "_key", "_keys", "_model", "coalesce", "decision")

    def __init__(
        self,
        decision: CacheDecision,
        coalesce: bool,
        ctx: RequestContext,
        model: str,
        keys: RequestKeys,
    ) -> None:
        self.decision = decision
        self.coalesce = coalesce
        self._ctx = ctx
        self._model = model
        self._keys = keys
        self._key: RequestKey | None = None

    @property
    def key(self) -> RequestKey:
        if self._key is None:
            ctx = self._ctx
            self._key = self._keys.key(
                ctx.body,
                ctx.raw_body,
                namespace=self.decision.namespace,
                model=self._model,
                route=ctx.route,
            )
        return self._key

    @property
    def digest(self) -> str | None:
        """The key's digest for ``x-cache-key``, when the request has one."""
        return self.key.digest if self.decision.cacheable or self.coalesce else None


def pack(meta: dict[str, Any], body: bytes) -> bytes:
    return orjson.dumps(meta) + b"\n" + body


def unpack(value: bytes) -> tuple[dict[str, Any], bytes]:
    meta, _, body = value.partition(b"\n")
    return orjson.loads(meta), body


def require_json(body: bytes) -> dict[str, Any]:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        raise UpstreamError(
            "The upstream returned a malformed (non-JSON) body.", code="upstream_malformed_response"
        )
    return parsed


def _parsed(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def usage_of(body: bytes) -> dict[str, Any] | None:
    try:
        usage = orjson.loads(body).get("usage")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return usage if isinstance(usage, dict) else None


class ChatPipeline:
    def __init__(
        self,
        args: GatewayArgs,
        stages: Stages,
        provider: ProviderClient,
        routes: ModelRoutes | None = None,
    ) -> None:
        self.args = args
        self.routes = routes or ModelRoutes(args.models)
        self.stages = stages
        self.provider = provider
        self.keys = RequestKeys()
        semantic = args.semantic_cache
        self.semantic_limit = AdaptiveLimit(
            semantic.max_concurrent_lookups, target_s=semantic.lookup_latency_target_s
        )

    def plan(self, ctx: RequestContext, model: ModelSettings) -> Plan:
        controls = parse_controls(ctx.body.pop("cache", None), ctx.headers.get("cache-control"))
        decision = decide(
            ctx.body,
            controls,
            ctx.principal.tenant,
            self.args.cache.policy,
            deterministic=model.kind in ("embeddings", "rerank", "moderation"),  # no sampling
        )
        coalesce = self.args.dedup.enabled and self.args.dedup.should_coalesce(decision.cacheable)
        return Plan(decision, coalesce, ctx, model.target_model, self.keys)

    async def run(self, ctx: RequestContext, model: ModelSettings) -> Response:
        ticket = await Ticket.admit(ctx, self.stages)
        with ticket.failing():
            plan = self.plan(ctx, model)
            if ctx.stream:
                return await self._stream(ctx, model, plan, ticket)
            return await self._complete(ctx, model, plan, ticket)

    # -- shared steps ----------------------------------------------------

    def chain(self, model: ModelSettings) -> list[Target]:
        """The model's upstream, then its configured fallbacks."""
        entry = self.routes.entry(model.name)
        if entry == model.name:
            primary = Target(upstream=model.upstream, model=model.target_model)
        else:
            primary = SharedBreakerTarget(
                upstream=model.upstream, model=model.target_model, shared_breaker=entry
            )
        return self.stages.resilience.chain(model.name, primary=primary)

    async def exact_hit(self, plan: Plan) -> tuple[bytes, dict[str, str]] | None:
        if not plan.decision.lookup:
            return None
        hit = await self.stages.exact.lookup(plan.key, plan.decision.max_age_s)
        if hit is None:
            return None
        return hit.body, cache_headers(CacheStatus.HIT, plan.key.digest, age_s=hit.age_s)

    async def _semantic_hit(self, plan: Plan) -> tuple[bytes, dict[str, Any]] | None:
        semantic = self.stages.semantic
        if semantic is None or not plan.decision.lookup:
            return None
        key = plan.key
        if key.final_user_text is None:
            return None
        if not self.semantic_limit.try_acquire():
            return self._semantic_failed("shed")
        started = time.perf_counter()
        ok: bool | None = None  # None: the request was cancelled, which says nothing of the tier
        try:
            async with asyncio.timeout(self.args.semantic_cache.lookup_timeout_s):
                hit = await semantic.check(
                    key.scope,
                    key.final_user_text,
                    plan.decision.namespace,
                    max_age_s=plan.decision.max_age_s,
                )
            ok = True
        except TimeoutError:
            ok = False
            return self._semantic_failed("timeout")
        except Exception:  # the semantic tier is an optimisation: any failure is a miss
            ok = False
            log.warning("semantic cache lookup failed", exc_info=True)
            return self._semantic_failed("error")
        finally:
            elapsed = time.perf_counter() - started
            self.semantic_limit.release(elapsed, ok)
            self.stages.metrics.observe(
                "gateway_stage_duration_seconds", elapsed, {"stage": "semantic"}
            )
        if hit is None:
            return None
        in_background(self.stages.exact.record(plan.decision.namespace, "semantic_hits"))
        meta = {"cache": "SEMANTIC_HIT", "similarity": hit.similarity, "created": hit.created}
        return hit.body, meta

    def _semantic_failed(self, reason: str) -> None:
        self.stages.metrics.inc("gateway_semantic_lookup_failures_total", 1, {"reason": reason})

    async def remember(self, plan: Plan, body: bytes) -> None:
        """Store a complete answer in both tiers (before the flight ends, so a
        request arriving right after finds it)."""
        if not plan.decision.store:
            return
        await self.stages.exact.store(plan.key, body, plan.decision.ttl_s)
        semantic, key = self.stages.semantic, plan.key
        if semantic is not None and key.final_user_text is not None:
            in_background(
                semantic.store(
                    key.scope,
                    key.final_user_text,
                    plan.decision.namespace,
                    body,
                    ttl=plan.decision.ttl_s,
                )
            )

    def _served(self, role: Role | None, meta: dict[str, Any]) -> tuple[str, CacheStatus]:
        if meta.get("cache") == "SEMANTIC_HIT":
            return (
                "coalesced" if role is Role.FOLLOWER else "semantic_cache"
            ), CacheStatus.SEMANTIC_HIT
        status = CacheStatus(meta.get("cache", "MISS"))
        return ("coalesced" if role is Role.FOLLOWER else "upstream"), status

    def _headers(
        self,
        ctx: RequestContext,
        plan: Plan,
        status: CacheStatus,
        meta: dict[str, Any],
        role: Role | None,
    ) -> dict[str, str]:
        age = None
        if status is CacheStatus.SEMANTIC_HIT and meta.get("created"):
            age = max(0, int(time.time() - float(meta["created"])))
        headers = {
            **ctx.response_headers,
            **cache_headers(status, plan.digest, age_s=age, similarity=meta.get("similarity")),
        }
        if role is not None:
            headers["x-dedup"] = role.value
        if role is not Role.FOLLOWER and meta.get("upstream"):
            headers["x-upstream"] = meta["upstream"]
            headers["x-attempts"] = str(meta.get("attempts", 1))
        self.stages.metrics.inc("gateway_cache_results_total", 1, {"result": status.value})
        if role is not None:
            self.stages.metrics.inc("gateway_dedup_requests_total", 1, {"role": role.value})
        return headers

    # -- non-streamed ----------------------------------------------------

    async def cached_answer(
        self, ctx: RequestContext, plan: Plan, ticket: Ticket
    ) -> Response | None:
        """The exact tier's answer, billed as served from the cache; None: a miss."""
        if (hit := await self.exact_hit(plan)) is None:
            return None
        body, headers = hit
        charge = self.finish_hit(ticket, body)
        headers = {**ctx.response_headers, **headers}
        if charge is not None:
            headers["x-request-cost"] = charge.header_value()
        return Response(body, 200, headers, media_type=JSON)

    def finish_hit(self, ticket: Ticket, body: bytes) -> Charge | None:
        """Settle a request the exact tier answered."""
        self.stages.metrics.inc("gateway_cache_results_total", 1, {"result": "HIT"})
        return ticket.finish(usage_of(body), served_by="cache", cache="hit")

    async def _complete(
        self, ctx: RequestContext, model: ModelSettings, plan: Plan, ticket: Ticket
    ) -> Response:
        if (cached := await self.cached_answer(ctx, plan, ticket)) is not None:
            return cached

        async def fetch() -> bytes:
            return await self._fetch(ctx, model, plan, ticket)

        def abandoned(call: asyncio.Future[Flight[bytes]]) -> None:
            ticket.hand_over()
            call.add_done_callback(lambda done: self._settle_abandoned(ticket, done))

        role: Role | None = None
        if plan.coalesce:
            flight = await self.stages.dedup.flight(plan.key.digest, fetch, abandoned)
            value, role = flight.value, flight.role
        else:
            value = await fetch()
        meta, body = unpack(value)
        served_by, status = self._served(role, meta)
        charge = self._finish(ticket, meta, body, served_by, status)
        headers = self._headers(ctx, plan, status, meta, role)
        if charge is not None:
            headers["x-request-cost"] = charge.header_value()
        return Response(body, 200, headers, media_type=JSON)

    @staticmethod
    def _finish(
        ticket: Ticket,
        meta: dict[str, Any],
        body: bytes,
        served_by: str,
        status: CacheStatus,
        outcome: str = "ok",
    ) -> Charge | None:
        usage = meta["usage"] if "usage" in meta else usage_of(body)
        return ticket.finish(
            usage,
            # no usage reported: the answer's tokens are estimated from what it wrote
            written=lambda: answer_text(_parsed(body)),
            served_by=served_by,  # type: ignore[arg-type]
            cache=status.value.lower(),
            upstream=meta.get("upstream", ""),
            upstream_model=meta.get("upstream_model"),
            attempts=meta.get("attempts", 0) if served_by == "upstream" else 0,
            status=outcome,
        )

    def _settle_abandoned(self, ticket: Ticket, call: asyncio.Future[Flight[bytes]]) -> None:
        """The flight of a request whose client left has ended. An upstream call it
        made is billed to it (an error: the client got nothing), or leaving early
        would fill the cache for free; an answer that cost nothing is refunded."""
        if call.cancelled() or call.exception() is not None:
            ticket.abort()  # a call answered before it failed is paid for
            return
        flight = call.result()
        meta, body = unpack(flight.value)
        served_by, status = self._served(flight.role, meta)
        if served_by != "upstream":
            ticket.fail()
            return
        self._finish(ticket, meta, body, served_by, status, outcome="error")

    async def _fetch(
        self, ctx: RequestContext, model: ModelSettings, plan: Plan, ticket: Ticket
    ) -> bytes:
        if (semantic := await self._semantic_hit(plan)) is not None:
            body, meta = semantic
            return pack(meta, body)

        async def attempt(target: Target) -> tuple[bytes, Any]:
            response = await self.timed(
                "gateway_upstream_duration_seconds",
                target,
                self.provider.post(
                    target.upstream,
                    UPSTREAM_PATHS[ctx.route],
                    upstream_payload(ctx.body, target),
                    ctx.request_id,
                ),
            )
            return response.body, require_json(response.body).get("usage")

        resilience = self.stages.resilience
        result = await resilience.call(
            self.chain(model),
            attempt,
            self.args.request_timeout_s,
            overflow=resilience.overflow(model.name),
            tokens=self.target_tokens(ctx),
        )
        body, usage = result.value
        result.settle(reported_total(usage))
        status = CacheStatus.MISS if plan.decision.lookup else CacheStatus.BYPASS
        meta = {
            "cache": status.value,
            "upstream": result.target.upstream,
            "upstream_model": result.target.model,
            "attempts": result.attempts,
            "usage": usage if isinstance(usage, dict) else None,  # spares parsing the body again
        }
        # Paid for now: a request that ends before its own billing (its client left while
        # the cache write was under way) is billed for it, not refunded.
        ticket.answered = lambda: self._finish(
            ticket, meta, body, "upstream", status, outcome="error"
        )
        await self.remember(plan, body)
        return pack(meta, body)

    # -- streamed --------------------------------------------------------

    async def _stream(
        self, ctx: RequestContext, model: ModelSettings, plan: Plan, ticket: Ticket
    ) -> Response:
        want_usage = bool((ctx.body.get("stream_options") or {}).get("include_usage"))
        sse = {"cache-control": "no-cache"}
        hit: tuple[bytes, dict[str, Any]] | None = None
        if (exact := await self.exact_hit(plan)) is not None:
            hit = (exact[0], {"cache": "HIT"})
            status, served_by, headers = CacheStatus.HIT, "cache", exact[1]
        elif (semantic := await self._semantic_hit(plan)) is not None:
            hit = semantic
            status, served_by = CacheStatus.SEMANTIC_HIT, "semantic_cache"
            headers = self._headers(ctx, plan, status, semantic[1], None)
        if hit is not None:
            body = hit[0]
            charge = ticket.finish(usage_of(body), served_by=served_by, cache=status.value.lower())  # type: ignore[arg-type]
            if status is CacheStatus.HIT:
                self.stages.metrics.inc("gateway_cache_results_total", 1, {"result": "HIT"})
            headers = {**ctx.response_headers, **headers, **sse}
            cost: dict[str, Any] = {}
            if charge is not None:
                headers["x-request-cost"] = charge.header_value()
                cost = charge.usage_fields()
            replay = _replay(REPLAYS[ctx.route](body, include_usage=want_usage), cost)
            return StreamingResponse(replay, headers=headers, media_type="text/event-stream")

        holder: dict[str, ResilienceResult[UpstreamStream]] = {}
        upstream_body = {**ctx.body}
        upstream_body["stream_options"] = {
            **(ctx.body.get("stream_options") or {}),
            "include_usage": True,
        }
        open_upstream = self._upstream_bytes(ctx, model, upstream_body, holder)
        relay = _StreamRelay(self, ctx, plan, ticket, want_usage, holder)
        if plan.coalesce:
            key = plan.key.digest + ":stream"
            flight = await self.stages.dedup.stream(key, open_upstream, relay.abandoned)
            chunks, relay.role = flight.chunks, flight.role
        else:
            chunks = open_upstream()
        iterator = aiter(chunks)
        try:
            first = await anext(iterator)  # errors before the first byte stay HTTP errors
        except StopAsyncIteration:
            raise UpstreamError("The upstream stream ended before any data.") from None
        except asyncio.CancelledError:
            relay.walk_away(iterator)
            raise
        relay.note_upstream()
        if relay.role is Role.FOLLOWER and relay.made_call:
            relay.role = Role.LEADER  # it took a dead leader's place, or waited it out
        status = CacheStatus(relay.meta["cache"])
        headers = {**self._headers(ctx, plan, status, relay.meta, relay.role), **sse}
        return RelayResponse(relay.run(first, iterator), lambda: relay.started, headers)

    def target_tokens(self, ctx: RequestContext) -> int:
        """What a call may use, for targets with a tpm (none: not worked out)."""
        return self.stages.limiter.reservation(ctx) if self.stages.resilience.target_limits else 0

    async def timed(self, metric: str, target: Target, call: Awaitable[T]) -> T:
        """Await an upstream call and record how long it took (whole answer, or first byte)."""
        started = time.perf_counter()
        value = await call
        elapsed = time.perf_counter() - started
        self.stages.metrics.observe(metric, elapsed, {"upstream": target.upstream})
        return value

    def _upstream_bytes(
        self,
        ctx: RequestContext,
        model: ModelSettings,
        body: dict[str, Any],
        holder: dict[str, ResilienceResult[UpstreamStream]],
    ) -> Callable[[], AsyncIterator[bytes]]:
        async def attempt(target: Target) -> UpstreamStream:
            return await self.timed(
                "gateway_upstream_ttft_seconds",
                target,
                self.provider.open_stream(
                    target.upstream,
                    UPSTREAM_PATHS[ctx.route],
                    upstream_payload(body, target),
                    ctx.request_id,
                ),
            )

        async def generate() -> AsyncIterator[bytes]:
            resilience = self.stages.resilience
            result = await resilience.call(
                self.chain(model),
                attempt,
                self.args.request_timeout_s,
                stream=True,
                overflow=resilience.overflow(model.name),
                tokens=self.target_tokens(ctx),
            )
            holder["result"] = result
            try:
                async for chunk in result.value.chunks():
                    yield chunk
            finally:
                await result.value.aclose()
                result.release()

        return generate


async def _replay(events: Iterator[bytes], cost: dict[str, Any]) -> AsyncIterator[bytes]:
    """A cached answer's SSE; its usage chunk carries the (zero) cost like a live one."""
    for event in events:
        data = event_data(event.strip())
        if cost and data and data != b"[DONE]":
            chunk = orjson.loads(data)
            if not chunk.get("choices") and chunk.get("usage"):
                event = encode_event({**chunk, "usage": {**chunk["usage"], **cost}})
        yield event


class _StreamRelay:
    """Passes a (possibly shared) upstream stream to one client, event by event:
    bills from the usage chunk, stores a complete answer, reports a broken one.

    When the client leaves first, a coalesced stream goes on only for whoever else
    reads it; its leader reads on unseen and is billed for all the call produced
    (an error: the client got part of it), and a complete answer is still stored.
    """

    def __init__(
        self,
        pipeline: ChatPipeline,
        ctx: RequestContext,
        plan: Plan,
        ticket: Ticket,
        want_usage: bool,
        holder: dict[str, ResilienceResult[UpstreamStream]],
    ) -> None:
        self.pipeline, self.ctx, self.plan, self.ticket = pipeline, ctx, plan, ticket
        self.want_usage, self.holder = want_usage, holder
        self.role: Role | None = None
        self.meta: dict[str, Any] = {"cache": "MISS" if plan.decision.lookup else "BYPASS"}
        self.result = StreamResult()
        self.assembler = ASSEMBLERS[ctx.route]()
        self.splitter = EventSplitter()
        self.received = False
        self.left = False  # the client went away before the end
        self.started = False  # ``run`` began (``RelayResponse``)
        self.draining = False  # ... and the rest is read unseen, to bill (``_drain``)

    @property
    def made_call(self) -> bool:
        """Whether this request's own upstream call produced the stream: a follower on
        another replica's flight calls upstream itself when that leader died, or when
        it waited past its deadline; it pays for, and may store, what it fetched."""
        return self.role is not Role.FOLLOWER or "result" in self.holder

    @property
    def served_by(self) -> str:
        return "upstream" if self.made_call else "coalesced"

    def note_upstream(self) -> None:
        """Which upstream answered, once one did."""
        if (result := self.holder.get("result")) is not None:
            target = result.target
            self.meta.update(
                upstream=target.upstream, upstream_model=target.model, attempts=result.attempts
            )

    def _bill(self, status: str) -> Any:
        self.note_upstream()
        if (result := self.holder.get("result")) is not None:
            result.settle(reported_total(self.result.usage))  # a target's tpm: once
        return self.ticket.finish(
            self.result.usage,
            served_by=self.served_by,  # type: ignore[arg-type]
            cache=self.meta["cache"].lower(),
            upstream=self.meta.get("upstream", ""),
            upstream_model=self.meta.get("upstream_model"),
            attempts=self.meta.get("attempts", 0) if self.served_by == "upstream" else 0,
            status="error" if self.left else status,
            written=self.result.completion_text,
        )

    def _event(self, data: bytes) -> bytes | None:
        """What the client gets for one upstream event (None: nothing)."""
        if inspect_event(data, self.result):
            return b"data: " + data + b"\n\n"
        # The usage-only chunk: bill now, show it (with the cost) only if asked.
        charge = self._bill("ok")
        if not self.want_usage:
            return None
        chunk = self.result.last
        assert chunk is not None  # inspect_event just parsed it
        if charge is not None:
            chunk["usage"] = {**chunk["usage"], **charge.usage_fields()}
        return encode_event(chunk)

    @property
    def _keep(self) -> bool:
        # Only an answer that may be stored is assembled whole (a follower's never is).
        return self.plan.decision.store and self.made_call

    def _feed(self, raw: bytes) -> Iterator[bytes]:
        """The client's events for ``raw`` (``b""``: those left in the splitter when a
        client that left stopped taking them mid-chunk)."""
        if raw:
            self.received = True
            self.ticket.touch()
            if self._keep:
                self.assembler.feed(raw)
        for event in self.splitter.feed(raw):
            data = event_data(event)
            if data is not None and (out := self._event(data)) is not None:
                yield out

    async def _ended(self) -> None:
        if not self.result.done:
            raise UpstreamError("The upstream stream ended before [DONE].")
        if self._keep and (body := self.assembler.body()) is not None:
            await self.pipeline.remember(self.plan, body)

    async def run(self, first: bytes, rest: AsyncIterator[bytes]) -> AsyncGenerator[bytes, None]:
        self.started = True
        try:
            raw: bytes | None = first
            while raw is not None:
                for out in self._feed(raw):
                    yield out
                raw = await anext(rest, None)
            await self._ended()
        except GatewayError as exc:
            self.result.error = exc
            yield error_event(exc)
        except (asyncio.CancelledError, GeneratorExit):
            self.walk_away(rest)
            raise
        finally:
            if not self.draining:
                self._bill("ok" if self.result.done and self.result.error is None else "error")

    def walk_away(self, rest: AsyncIterator[bytes]) -> None:
        """The client left before the end. A coalesced leader reads on, unseen (only
        what someone else still reads goes on), and is billed when it ends; any other
        stream is closed, and billed what was sent."""
        self.left = True
        if self.made_call and isinstance(rest, ChunkReader):
            rest.detach()
            self._read_on(self._drain(rest))
        elif isinstance(rest, ChunkReader):
            rest.close()
        elif (close := getattr(rest, "aclose", None)) is not None:
            in_background(close())  # an upstream left half-read is closed now, not at GC

    def abandoned(self, opened: asyncio.Future[StreamFlight]) -> None:
        """The client left before the flight it leads opened (``SingleFlight.stream``)."""
        self.left = True
        self._read_on(self._drain_when_open(opened))

    def _read_on(self, drain: Coroutine[Any, Any, None]) -> None:
        """The rest is read unseen in the background, which settles the ticket."""
        self.ticket.hand_over()
        self.draining = True
        in_background(drain)

    async def _drain_when_open(self, opened: asyncio.Future[StreamFlight]) -> None:
        try:
            flight = await opened
        except Exception:
            self.ticket.fail()
            return
        self.role = flight.role
        if flight.role is Role.LEADER:
            await self._drain(flight.chunks)
        else:  # another replica makes the call: nothing to pay, nothing to read
            try:
                await flight.chunks.aclose()  # type: ignore[attr-defined]
            finally:
                self.ticket.fail()

    async def _drain(self, rest: AsyncIterator[bytes]) -> None:
        try:
            for _ in self._feed(b""):
                pass
            async for raw in rest:
                for _ in self._feed(raw):
                    pass
            await self._ended()
        except GatewayError:  # stopped (nobody else read it), failed or cut
            pass
        finally:
            if self.received:
                self._bill("error")
            else:  # it never produced anything: as if it had failed before the first byte
                self.ticket.fail()


# The upstream route each of the gateway's routes calls (non-streamed answers share one path:
# cache tiers, single flight, billing).
UPSTREAM_PATHS = {
    "chat": "/chat/completions",
    "completions": "/completions",
    "embeddings": "/embeddings",
    "rerank": "/rerank",
    "moderations": "/moderations",
}
# How each streamed route's answers are replayed from the cache and put back together.
REPLAYS: dict[str, Callable[..., Iterator[bytes]]] = {
    "chat": replay_sse,
    "completions": replay_text_sse,
}
ASSEMBLERS: dict[str, Callable[[], ChunkAssembler]] = {
    "chat": StreamAssembler,
    "completions": TextStreamAssembler,
}


def upstream_payload(body: dict[str, Any], target: Target) -> bytes:
    """The request as the target upstream gets it: its own model name."""
    return orjson.dumps({**body, "model": target.model})


__all__ = [
    "ChatPipeline",
    "Plan",
    "pack",
    "require_json",
    "unpack",
    "upstream_payload",
    "usage_of",
]
