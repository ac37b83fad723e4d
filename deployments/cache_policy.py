"""What a request allows the cache tiers to do: controls, namespace, policy.

Shared by the exact and the semantic tier, so both read a request the same way.

Controls come from the body (``cache: {"no-cache", "no-store", "ttl",
"s-maxage", "namespace"}``, LiteLLM's names) and the ``Cache-Control`` request
header (``no-cache``, ``no-store``, ``max-age=N``); the stricter one wins.
- ``no-cache``: do not serve from the cache (the fresh answer may still be stored);
- ``no-store``: do not store the answer;
- ``ttl``: how long to keep the stored answer (capped by ``max_ttl_s``);
- ``max-age``/``s-maxage``: serve only an entry at most this many seconds old
  (``0`` is ``no-cache``).

Temperature policy. A request with ``temperature`` above 0 samples, so a cached
answer is one draw the client would not otherwise get twice. By default such
answers are neither served nor stored unless the request opts in. A *missing*
temperature means the provider's default, which is 1 for OpenAI-compatible
APIs, so it counts as sampled (``missing_temperature_is_zero`` flips that).
A request opts in by stating a lifetime: a body ``cache.ttl`` or a positive
``max-age``/``s-maxage`` says "an answer this old is fine for me".

Namespaces isolate tenants: the effective namespace is ``t/<tenant>`` or
``t/<tenant>/<name>`` for a body ``cache.namespace``. Only names listed in
``shared_namespaces`` (or every request when ``tenant_isolation`` is off) map
to a cross-tenant ``s/<name>``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from deployments.counts import parse_count
from serve_app.errors import InvalidRequestError

SHARED_DEFAULT = "default"


class CachePolicySettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    default_ttl_s: int = Field(3600, gt=0)
    max_ttl_s: int = Field(86_400, gt=0)
    cache_sampled: bool = False  # serve/store answers at temperature > 0 without opt-in
    missing_temperature_is_zero: bool = False
    tenant_isolation: bool = True
    shared_namespaces: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class CacheControls:
    no_cache: bool = False
    no_store: bool = False
    ttl_s: int | None = None
    max_age_s: int | None = None
    namespace: str | None = None

    @property
    def opted_in(self) -> bool:
        return self.ttl_s is not None or bool(self.max_age_s)


class CacheStatus(StrEnum):
    """The ``x-cache`` response header."""

    HIT = "HIT"
    SEMANTIC_HIT = "SEMANTIC_HIT"
    MISS = "MISS"
    BYPASS = "BYPASS"


@dataclass(frozen=True, slots=True)
class CacheDecision:
    lookup: bool  # may an answer be served from a cache tier
    store: bool  # may the fresh answer be stored
    ttl_s: int
    max_age_s: int | None
    namespace: str
    reason: str  # why lookup/store is off, for logs ("" when both are on)

    @property
    def cacheable(self) -> bool:
        return self.lookup or self.store


def _non_negative_int(value: Any, param: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise InvalidRequestError(f"{param} must be a non-negative number", param=param)
    return int(value)


def _flag(value: Any, param: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidRequestError(f"{param} must be a boolean", param=param)
    return value


def _header_directives(header: str | None) -> dict[str, str | None]:
    directives: dict[str, str | None] = {}
    for part in (header or "").split(","):
        name, _, arg = part.strip().partition("=")
        if name:
            directives[name.strip().lower()] = arg.strip().strip('"') or None
    return directives


def _header_max_age(directives: Mapping[str, str | None]) -> int | None:
    raw = directives.get("max-age")
    # A malformed directive is ignored, and an overlong one saturates, as HTTP caches do.
    return None if raw is None else parse_count(raw)


def parse_controls(body_cache: Any, cache_control: str | None = None) -> CacheControls:
    """Controls from the body's ``cache`` object and the ``Cache-Control`` header.

    Raises ``InvalidRequestError`` for a malformed body object (the header is
    lenient, like any HTTP cache).
    """
    if body_cache is None:
        body_cache = {}
    if not isinstance(body_cache, Mapping):
        raise InvalidRequestError("cache must be an object", param="cache")
    directives = _header_directives(cache_control)
    ttl = body_cache.get("ttl")
    max_age = body_cache.get("s-maxage", body_cache.get("max-age"))
    namespace = body_cache.get("namespace")
    if namespace is not None and (not isinstance(namespace, str) or not namespace):
        raise InvalidRequestError("cache.namespace must be a non-empty string", param="cache")
    ages = [_non_negative_int(max_age, "cache.s-maxage")] if max_age is not None else []
    if (header_age := _header_max_age(directives)) is not None:
        ages.append(header_age)
    return CacheControls(
        no_cache=_flag(body_cache.get("no-cache", False), "cache.no-cache")
        or "no-cache" in directives,
        no_store=_flag(body_cache.get("no-store", False), "cache.no-store")
        or "no-store" in directives,
        ttl_s=_non_negative_int(ttl, "cache.ttl") if ttl is not None else None,
        max_age_s=min(ages) if ages else None,
        namespace=namespace,
    )


def resolve_namespace(tenant: str, requested: str | None, settings: CachePolicySettings) -> str:
    if not settings.tenant_isolation:
        return f"s/{requested or SHARED_DEFAULT}"
    if requested is not None and requested in settings.shared_namespaces:
        return f"s/{requested}"
    return f"t/{tenant}" if requested is None else f"t/{tenant}/{requested}"


def _sampled(body: Mapping[str, Any], settings: CachePolicySettings) -> bool:
    temperature = body.get("temperature")
    if temperature is None:
        return not settings.missing_temperature_is_zero
    return isinstance(temperature, int | float) and temperature > 0


def decide(
    body: Mapping[str, Any],
    controls: CacheControls,
    tenant: str,
    settings: CachePolicySettings,
    *,
    deterministic: bool = False,
) -> CacheDecision:
    """What the cache tiers may do for this request. ``deterministic``: its answer does
    not depend on sampling (embeddings), so no temperature makes it uncacheable."""
    namespace = resolve_namespace(tenant, controls.namespace, settings)
    ttl = min(controls.ttl_s or settings.default_ttl_s, settings.max_ttl_s)
    reason = ""
    if not settings.enabled:
        reason = "cache disabled"
    elif (
        not deterministic
        and _sampled(body, settings)
        and not (settings.cache_sampled or controls.opted_in)
    ):
        reason = "temperature > 0 without opt-in"
    lookup = not reason and not controls.no_cache and controls.max_age_s != 0
    store = not reason and not controls.no_store and controls.ttl_s != 0
    if not reason:
        reason = ", ".join(
            name for name, off in (("no-cache", not lookup), ("no-store", not store)) if off
        )
    return CacheDecision(lookup, store, ttl, controls.max_age_s or None, namespace, reason)


def cache_headers(
    status: CacheStatus,
    digest: str | None = None,
    *,
    age_s: int | None = None,
    similarity: float | None = None,
) -> dict[str, str]:
    """``x-cache``, ``x-cache-key``, ``age`` (hits) and ``x-cache-similarity`` (semantic)."""
    headers = {"x-cache": status.value}
    if digest is not None:
        headers["x-cache-key"] = digest
    if age_s is not None and status in (CacheStatus.HIT, CacheStatus.SEMANTIC_HIT):
        headers["age"] = str(max(0, age_s))
    if similarity is not None and status is CacheStatus.SEMANTIC_HIT:
        headers["x-cache-similarity"] = f"{similarity:.4f}"
    return headers
