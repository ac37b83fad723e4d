"""Cache controls, namespaces and the temperature policy."""

from __future__ import annotations

from typing import Any

import pytest

from deployments.cache_policy import (
    CachePolicySettings,
    CacheStatus,
    cache_headers,
    decide,
    parse_controls,
    resolve_namespace,
)
from serve_app.errors import InvalidRequestError

DEFAULTS = CachePolicySettings()
ZERO: dict[str, Any] = {"model": "m", "messages": [], "temperature": 0}


def test_body_controls_use_litellm_names() -> None:
    controls = parse_controls({"no-cache": True, "no-store": True, "ttl": 60, "namespace": "docs"})
    assert (controls.no_cache, controls.no_store, controls.ttl_s, controls.namespace) == (
        True,
        True,
        60,
        "docs",
    )


def test_header_controls() -> None:
    controls = parse_controls(None, "No-Cache, max-age=30, no-store")
    assert controls.no_cache and controls.no_store and controls.max_age_s == 30
    assert parse_controls(None, "max-age=abc").max_age_s is None  # malformed: ignored


def test_stricter_max_age_wins() -> None:
    assert parse_controls({"s-maxage": 100}, "max-age=10").max_age_s == 10


@pytest.mark.parametrize(
    "body_cache",
    ["yes", {"no-cache": "true"}, {"ttl": -1}, {"ttl": True}, {"namespace": ""}],
)
def test_malformed_body_controls_are_400(body_cache: Any) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        parse_controls(body_cache)
    assert caught.value.param is not None


def test_temperature_zero_is_cacheable() -> None:
    decision = decide(ZERO, parse_controls(None), "acme", DEFAULTS)
    assert decision.lookup and decision.store and decision.ttl_s == DEFAULTS.default_ttl_s


def test_sampled_and_missing_temperature_bypass_without_opt_in() -> None:
    for body in ({**ZERO, "temperature": 0.7}, {"model": "m", "messages": []}):
        decision = decide(body, parse_controls(None), "acme", DEFAULTS)
        assert not decision.cacheable and "temperature" in decision.reason


def test_missing_temperature_can_count_as_zero() -> None:
    settings = CachePolicySettings(missing_temperature_is_zero=True)
    assert decide({"model": "m"}, parse_controls(None), "acme", settings).cacheable


def test_a_deterministic_request_is_cacheable_with_no_temperature() -> None:
    embeddings = {"model": "e", "input": ["a"]}  # no sampling: the same input, the same vectors
    assert decide(embeddings, parse_controls(None), "acme", DEFAULTS, deterministic=True).cacheable
    assert not decide(embeddings, parse_controls(None), "acme", DEFAULTS).cacheable
    refused = parse_controls({"no-store": True, "no-cache": True})
    assert not decide(embeddings, refused, "acme", DEFAULTS, deterministic=True).cacheable


def test_opt_in_by_ttl_or_max_age() -> None:
    sampled = {**ZERO, "temperature": 0.7}
    assert decide(sampled, parse_controls({"ttl": 60}), "acme", DEFAULTS).store
    assert decide(sampled, parse_controls(None, "max-age=60"), "acme", DEFAULTS).lookup
    settings = CachePolicySettings(cache_sampled=True)
    assert decide(sampled, parse_controls(None), "acme", settings).cacheable


def test_no_cache_still_stores_and_no_store_still_serves() -> None:
    no_cache = decide(ZERO, parse_controls({"no-cache": True}), "acme", DEFAULTS)
    assert (no_cache.lookup, no_cache.store) == (False, True)
    no_store = decide(ZERO, parse_controls(None, "no-store"), "acme", DEFAULTS)
    assert (no_store.lookup, no_store.store) == (True, False)
    assert not decide(ZERO, parse_controls(None, "max-age=0"), "acme", DEFAULTS).lookup


def test_ttl_is_capped() -> None:
    decision = decide(ZERO, parse_controls({"ttl": 10**9}), "acme", DEFAULTS)
    assert decision.ttl_s == DEFAULTS.max_ttl_s


def test_disabled_cache_bypasses() -> None:
    settings = CachePolicySettings(enabled=False)
    assert not decide(ZERO, parse_controls(None), "acme", settings).cacheable


def test_namespaces_are_per_tenant_unless_shared() -> None:
    assert resolve_namespace("acme", None, DEFAULTS) == "t/acme"
    assert resolve_namespace("acme", "docs", DEFAULTS) == "t/acme/docs"
    assert resolve_namespace("globex", "docs", DEFAULTS) != resolve_namespace(
        "acme", "docs", DEFAULTS
    )
    shared = CachePolicySettings(shared_namespaces=("faq",))
    assert resolve_namespace("acme", "faq", shared) == resolve_namespace("globex", "faq", shared)
    global_ = CachePolicySettings(tenant_isolation=False)
    assert resolve_namespace("acme", None, global_) == resolve_namespace("globex", None, global_)


def test_headers() -> None:
    assert cache_headers(CacheStatus.HIT, "abc", age_s=5) == {
        "x-cache": "HIT",
        "x-cache-key": "abc",
        "age": "5",
    }
    assert cache_headers(CacheStatus.MISS, "abc", age_s=5) == {
        "x-cache": "MISS",
        "x-cache-key": "abc",
    }
    semantic = cache_headers(CacheStatus.SEMANTIC_HIT, "k", age_s=1, similarity=0.93456)
    assert semantic["x-cache-similarity"] == "0.9346"
