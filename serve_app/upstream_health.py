"""``GET /admin/health``: whether each upstream answers, and whether each model
is there, checked now rather than learnt from the next failed request (LiteLLM's
``/health``, Kong's active health checks).

Every upstream is asked for ``GET /models`` (free): reachable, key accepted, and
which configured models it lists, and which of the models that balance groups,
fallbacks and context fallbacks name (``targets``). With ``?call=true`` each configured model also
gets the smallest real call (a one-token chat or completion, a one-word
embedding): it costs a few tokens, and it is the only proof for an upstream that
lists no models. Checks bypass limits, budgets, caches and breakers, and are not
billed to anyone: they are the operator's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from deployments.provider import ProviderClient
from deployments.resilience_settings import Target
from serve_app.errors import GatewayError
from serve_app.settings import GatewayArgs, ModelSettings

PROBE_BODIES = {
    "chat": {"messages": [{"role": "user", "content": "ping"}], "max_tokens": 1},
    "embeddings": {"input": "ping"},
    "rerank": {"query": "ping", "documents": ["pong"]},
    "moderation": {"input": "ping"},
}
# Where each kind of model is called; chat models at their chat route.
PROBE_PATHS = {"embeddings": "/embeddings", "rerank": "/rerank", "moderation": "/moderations"}


def _elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


def _failure(exc: BaseException) -> str:
    if isinstance(exc, GatewayError):
        return exc.message
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"


def _listed_ids(body: bytes) -> set[str] | None:
    try:
        data = orjson.loads(body).get("data")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    if not isinstance(data, list):
        return None
    return {str(m["id"]) for m in data if isinstance(m, dict) and "id" in m}


async def _list_models(
    provider: ProviderClient, upstream: str, timeout_s: float
) -> tuple[dict[str, Any], set[str] | None]:
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            answer = await provider.send("GET", upstream, "/models", timeout_s)
    except Exception as exc:  # unreachable, refused, timed out: that is the finding
        report = {"upstream": upstream, "ok": False, "status": None, "error": _failure(exc)}
        return {**report, "latency_ms": _elapsed_ms(started)}, None
    ids = _listed_ids(answer.body) if answer.status < 400 else None
    report = {
        "upstream": upstream,
        # Reachable and the key accepted; an upstream without a /models route is not down.
        "ok": answer.status < 400 or answer.status in (404, 405),
        "status": answer.status,
        "error": None if answer.status < 400 else answer.body[:200].decode(errors="replace"),
        "latency_ms": _elapsed_ms(started),
    }
    return report, ids


async def _call(provider: ProviderClient, model: ModelSettings, timeout_s: float) -> dict[str, Any]:
    body = {**PROBE_BODIES[model.kind], "model": model.target_model}
    path = PROBE_PATHS.get(model.kind, "/chat/completions")
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            answer = await provider.post(model.upstream, path, orjson.dumps(body))
    except Exception as exc:
        status = exc.status_code if isinstance(exc, GatewayError) else None
        return {
            "ok": False,
            "status": status,
            "error": _failure(exc),
            "latency_ms": _elapsed_ms(started),
        }
    return {"ok": True, "status": answer.status, "error": None, "latency_ms": _elapsed_ms(started)}


async def check(
    args: GatewayArgs, provider: ProviderClient, *, call: bool, timeout_s: float
) -> dict[str, Any]:
    upstreams = sorted(args.upstreams)
    listings = await asyncio.gather(*(_list_models(provider, u, timeout_s) for u in upstreams))
    listed = {u: ids for u, (_, ids) in zip(upstreams, listings, strict=True)}
    models = [m for m in args.models if not m.name.endswith("*")]
    calls = await asyncio.gather(*(_call(provider, m, timeout_s) for m in models if call))
    calls_by_model = dict(zip((m.name for m in models), calls, strict=False)) if call else {}
    model_reports = []
    for model in models:
        ids = listed[model.upstream]
        model_reports.append(
            {
                "model": model.name,
                "upstream": model.upstream,
                "upstream_model": model.target_model,
                "listed": _is_listed(ids, model.target_model),
                "call": calls_by_model.get(model.name),
            }
        )
    target_reports = [
        {
            "model": name,
            "section": section,
            "upstream": target.upstream,
            "upstream_model": target.model,
            "listed": _is_listed(listed[target.upstream], target.model),
        }
        for section, name, target in _routed_targets(args)
    ]
    upstream_reports = [report for report, _ in listings]
    healthy = (
        all(r["ok"] for r in upstream_reports)
        and all(r["listed"] is not False for r in target_reports)
        and all(
            r["listed"] is not False and (r["call"] is None or r["call"]["ok"])
            for r in model_reports
        )
    )
    return {
        "healthy": healthy,
        "upstreams": upstream_reports,
        "models": model_reports,
        "targets": target_reports,
    }


def _is_listed(ids: set[str] | None, model: str) -> bool | None:
    """None: the upstream lists no models (or could not be asked)."""
    return None if ids is None else model in ids


def _routed_targets(args: GatewayArgs) -> list[tuple[str, str, Target]]:
    """Every target a balance group, fallback chain or context fallback names."""
    resilience = args.resilience
    chains: list[tuple[str, Mapping[str, Sequence[Target]]]] = [
        ("balance", {m: g.targets for m, g in resilience.balance.items()}),
        ("fallbacks", resilience.fallbacks),
        ("context_fallbacks", resilience.context_fallbacks),
    ]
    return [
        (section, name, target)
        for section, by_model in chains
        for name, targets in sorted(by_model.items())
        for target in targets
    ]
