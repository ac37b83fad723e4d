"""Rate limits end to end (issue 3): real HTTP into two gateway replicas on a
real local Ray Serve, the mock provider upstream, one real Redis.

Each quota under test is a per-user override, so every test counts against
users of its own and the counts do not leak between tests.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from deployments.tokens import estimate_prompt_tokens
from serve_app.admin import LIMITS_KEY_PREFIX
from serve_app.embedded_store import EmbeddedStore
from serve_app.mock_provider import Faults, MockBehaviour
from serve_app.settings import hash_key
from tests.serve_app.e2e_calls import CHAT, burst, envelope, flush_store, sse_chunks
from tests.support import (
    LOCAL_KEY,
    OTHER_KEY,
    MockServer,
    auth,
    chat_body,
    client,
    deploy_gateway,
    gateway_args,
    wait_until,
)

pytestmark = [pytest.mark.ray, pytest.mark.integration]

APP, PREFIX = "limits-e2e", "/limits-e2e"
ATOMIC_KEY = "sk-limits-atomic"
WIDE = 10_000_000  # a token limit that never binds: only there so every header is sent
TOKEN_LIMIT = 100_000
HEADERS = [
    f"x-ratelimit-{p}-{d}" for p in ("limit", "remaining", "reset") for d in ("requests", "tokens")
]
RESET = re.compile(r"^(\d+ms|(\d+h)?(\d+m)?\d+(\.\d+)?s)$")


def _quota(window: str, requests: int | None = None, tokens: int = WIDE) -> dict[str, Any]:
    return {"window": window, "requests": requests, "tokens": tokens}


USER_QUOTAS: dict[str, list[dict[str, Any]]] = {
    "k7": [_quota("1m", 7)],
    "k25": [_quota("1m", 25), _quota("1h", 40)],
    "k12-hour": [_quota("1m", 100), _quota("1h", 12)],
    "k3-90s": [_quota("90s", 3)],
    "atomic-day": [_quota("1d", 3)],
    "tokens": [_quota("1m", 1000, TOKEN_LIMIT)],
    "fail-open": [_quota("1m", 1000)],
    "leased": [_quota("1m", 1_000_000)],
}
LIMITS: dict[str, Any] = {
    "key_prefix": "{rl-e2e}",
    "per_key": {"overrides": {"atomic": [_quota("1m", 50)]}},
    "per_user": {"overrides": USER_QUOTAS},
}


def _api_keys(**extra: Any) -> list[dict[str, Any]]:
    keys = [
        {"name": "local", "key_sha256": hash_key(LOCAL_KEY), "tenant": "local", "admin": True},
        {"name": "other", "key_sha256": hash_key(OTHER_KEY), "tenant": "other"},
    ]
    return keys + [{"name": n, "key_sha256": hash_key(k), "tenant": n} for n, k in extra.items()]


@pytest.fixture(scope="module")
def base_url(serve_port: int, mock_server: MockServer, redis_url: str) -> Iterator[str]:
    from ray import serve

    flush_store(redis_url)
    args = gateway_args(
        mock_server.base_url, redis_url, api_keys=_api_keys(atomic=ATOMIC_KEY), limits=LIMITS
    )
    deploy_gateway(args, APP, PREFIX)
    yield f"http://127.0.0.1:{serve_port}{PREFIX}"
    serve.delete(APP)
    with redis.Redis.from_url(redis_url) as store:
        _forget_overrides(store)


def _forget_overrides(store: redis.Redis) -> None:
    for key in store.scan_iter(match=LIMITS_KEY_PREFIX + "*"):
        store.delete(key)


@pytest.fixture
def http(base_url: str) -> Iterator[httpx.Client]:
    with client(base_url) as c:
        yield c


def _bodies(user: str, count: int, **extra: Any) -> list[dict[str, Any]]:
    return [chat_body(f"{user} request {i}", user=user, **extra) for i in range(count)]


def _assert_rate_headers(response: httpx.Response) -> None:
    missing = [h for h in HEADERS if h not in response.headers]
    assert not missing, (response.status_code, missing)
    for dimension in ("requests", "tokens"):
        assert RESET.match(response.headers[f"x-ratelimit-reset-{dimension}"])
        assert int(response.headers[f"x-ratelimit-remaining-{dimension}"]) >= 0


def _assert_rejection(response: httpx.Response, limit: int, names: str) -> None:
    error = envelope(response, 429, "rate_limit_exceeded")
    assert error["type"] == "rate_limit_error"
    assert names in error["message"] and f"limit {limit}" in error["message"]
    wait_ms = int(response.headers["retry-after-ms"])
    assert 0 < wait_ms
    assert int(response.headers["retry-after"]) == math.ceil(wait_ms / 1000)
    assert response.headers["x-ratelimit-remaining-requests"] == "0"


@pytest.mark.parametrize(
    ("user", "limit", "names", "window_s"),
    [
        ("k7", 7, "requests per minute for user 'k7'", 60),
        ("k25", 25, "requests per minute for user 'k25'", 60),
        ("k12-hour", 12, "requests per hour for user 'k12-hour'", 3600),
        ("k3-90s", 3, "requests per 1m30s for user 'k3-90s'", 90),
    ],
)
def test_concurrent_requests_admit_exactly_the_limit(
    base_url: str,
    mock_behaviour: MockBehaviour,
    user: str,
    limit: int,
    names: str,
    window_s: int,
) -> None:
    responses = burst(base_url, _bodies(user, 200))
    admitted = [r for r in responses if r.status_code == 200]
    rejected = [r for r in responses if r.status_code != 200]
    assert len(admitted) == limit
    assert mock_behaviour.stats.calls == limit
    for response in responses:
        _assert_rate_headers(response)
        assert response.headers["x-ratelimit-limit-requests"] == str(limit)
    # Each admission saw its own count: across both replicas, one per slot.
    remaining = sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in admitted)
    assert remaining == list(range(limit))
    for response in rejected:
        _assert_rejection(response, limit, names)
        assert int(response.headers["retry-after-ms"]) <= window_s * 1000


def test_a_day_window_rejection_consumes_nothing_from_the_minute_window(
    base_url: str, http: httpx.Client, mock_behaviour: MockBehaviour
) -> None:
    # Key "atomic": 50 a minute. User "atomic-day": 3 a day.
    for body in _bodies("atomic-day", 3):
        assert http.post(CHAT, json=body, headers=auth(ATOMIC_KEY)).status_code == 200
    refused = burst(base_url, _bodies("atomic-day", 20), key=ATOMIC_KEY)
    for response in refused:
        _assert_rejection(response, 3, "requests per day for user 'atomic-day'")
    # The key's minute window holds the 3 admitted requests and this one only.
    free = http.post(CHAT, json=chat_body("no user"), headers=auth(ATOMIC_KEY))
    assert free.status_code == 200
    assert free.headers["x-ratelimit-limit-requests"] == "50"
    assert free.headers["x-ratelimit-remaining-requests"] == str(50 - 4)
    assert mock_behaviour.stats.calls == 4


def test_a_busy_user_far_from_its_limit_is_counted_exactly_through_leases(
    http: httpx.Client, redis_url: str
) -> None:
    # Steady traffic on both replicas, far from the limit: decided from leases
    # (deployments/limiter_lease.py), which the store counts in full while they
    # last. Once they end, it holds exactly what was admitted and used.
    used = 0
    for body in _bodies("leased", 300):
        response = http.post(CHAT, json=body, headers=auth())
        assert response.status_code == 200
        _assert_rate_headers(response)
        used += response.json()["usage"]["total_tokens"]
    costs = "{rl-e2e}:user:local%2Fleased:60000000:cost"
    with redis.Redis.from_url(redis_url) as store:
        wait_until(
            lambda: [int(v or 0) for v in store.hmget(costs, "R", "T")] == [300, used],
            timeout_s=5,
        )


def _tokens_left(http: httpx.Client) -> int:
    """Remaining tokens of user "tokens", read without using any: a request that
    can never fit is rejected, and a rejection records nothing."""
    probe = chat_body("probe", user="tokens", max_tokens=TOKEN_LIMIT + 1)
    response = http.post(CHAT, json=probe, headers=auth())
    envelope(response, 429, "rate_limit_exceeded")
    assert response.headers["x-should-retry"] == "false"
    return int(response.headers["x-ratelimit-remaining-tokens"])


def _settles_to(http: httpx.Client, expected: int) -> None:
    wait_until(lambda: _tokens_left(http) == expected, timeout_s=5)


def test_tokens_are_reserved_then_settled_to_reported_usage(
    http: httpx.Client, mock_behaviour: MockBehaviour
) -> None:
    before = _tokens_left(http)
    body = chat_body("token reservation, non-streamed", user="tokens", max_tokens=50)
    reserved = estimate_prompt_tokens(body["messages"]) + 50
    response = http.post(CHAT, json=body, headers=auth())
    assert response.status_code == 200
    assert int(response.headers["x-ratelimit-remaining-tokens"]) == before - reserved
    used = response.json()["usage"]["total_tokens"]
    assert used < reserved  # the mock answers with at most 16 tokens
    _settles_to(http, before - used)


def test_a_stream_settles_from_its_usage_chunk(
    http: httpx.Client, mock_behaviour: MockBehaviour
) -> None:
    before = _tokens_left(http)
    body = chat_body("token reservation, streamed", user="tokens", max_tokens=40, stream=True)
    prompt = estimate_prompt_tokens(body["messages"])
    response = http.post(CHAT, json=body, headers=auth())
    assert response.status_code == 200
    assert int(response.headers["x-ratelimit-remaining-tokens"]) == before - prompt - 40
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in sse_chunks(response.text))
    completion = len(text.split())  # the mock's usage: one token per word
    assert 0 < completion < 40
    _settles_to(http, before - prompt - completion)


def test_an_upstream_error_refunds_the_reservation(
    http: httpx.Client, mock_behaviour: MockBehaviour
) -> None:
    before = _tokens_left(http)
    mock_behaviour.config.faults["*"] = Faults(error_rate=1.0, error_status=500)
    body = chat_body("token reservation, failing", user="tokens", max_tokens=30)
    response = http.post(CHAT, json=body, headers=auth())
    assert response.status_code == 500
    reserved = estimate_prompt_tokens(body["messages"]) + 30
    assert int(response.headers["x-ratelimit-remaining-tokens"]) == before - reserved
    mock_behaviour.config.faults.clear()
    _settles_to(http, before)


def _limits_seen(base_url: str, user: str) -> set[str | None]:
    """The request limits the replicas apply to ``user``, using nothing (None: no
    quota). Probes go out at once: one after another, Serve may keep sending
    them to the same replica."""
    probes = [chat_body(f"probe {i}", user=user, max_tokens=WIDE + 1) for i in range(16)]
    return {r.headers.get("x-ratelimit-limit-requests") for r in burst(base_url, probes)}


def _on_every_replica(base_url: str, user: str, limit: str | None) -> None:
    """One burst may land on one replica only: ask until three in a row agree."""
    agreed = [0]

    def settled() -> bool:
        agreed[0] = agreed[0] + 1 if _limits_seen(base_url, user) == {limit} else 0
        return agreed[0] >= 3

    wait_until(settled, timeout_s=8)


def test_limits_change_at_run_time_on_every_replica(
    base_url: str, http: httpx.Client, mock_behaviour: MockBehaviour, redis_url: str
) -> None:
    for method in ("GET", "PUT"):
        denied = http.request(method, "/admin/limits", json={}, headers=auth(OTHER_KEY))
        envelope(denied, 403, "permission_denied")
    original = http.get("/admin/limits", headers=auth()).json()
    assert _limits_seen(base_url, "runtime") == {None}

    def put(requests: int | None) -> None:
        settings = {**original, "per_user": {**original["per_user"]}}
        overrides = dict(settings["per_user"]["overrides"])
        if requests is not None:
            overrides["runtime"] = [_quota("1m", requests)]
        settings["per_user"]["overrides"] = overrides
        response = http.put("/admin/limits", json=settings, headers=auth())
        assert response.status_code == 200, response.text

    try:
        put(4)
        _on_every_replica(base_url, "runtime", "4")
        assert sum(r.status_code == 200 for r in burst(base_url, _bodies("runtime", 20))) == 4
        put(6)  # raised: the usage recorded so far stays
        _on_every_replica(base_url, "runtime", "6")
        assert sum(r.status_code == 200 for r in burst(base_url, _bodies("runtime", 20))) == 2
    finally:
        put(None)
        _on_every_replica(base_url, "runtime", None)
        with redis.Redis.from_url(redis_url) as store:
            _forget_overrides(store)
    bad = {**original, "per_user": {"default": [{"window": "1 fortnight", "requests": 1}]}}
    error = envelope(http.put("/admin/limits", json=bad, headers=auth()), 400, None)
    assert "window" in error["message"]


@pytest.fixture
def closed_url(serve_port: int, mock_server: MockServer, redis_url: str) -> Iterator[str]:
    """A second app that fails closed (deployed after the run-time test removed its limits)."""
    from ray import serve

    limits = {
        "failure_mode": "closed",
        "key_prefix": "{rl-e2e-closed}",
        "per_key": {"default": [_quota("1m", 1000)]},
    }
    args = gateway_args(mock_server.base_url, redis_url, limits=limits)
    deploy_gateway(args, APP + "-closed", PREFIX + "-closed", replicas=1)
    yield f"http://127.0.0.1:{serve_port}{PREFIX}-closed"
    serve.delete(APP + "-closed")


def test_store_outage_fails_open_or_closed_without_hanging(
    base_url: str,
    closed_url: str,
    embedded_store: EmbeddedStore | None,
    mock_behaviour: MockBehaviour,
) -> None:
    if embedded_store is None:
        pytest.skip("REDIS_URL points at an external Redis this test must not kill")
    body = chat_body("outage", user="fail-open")
    with (
        httpx.Client(base_url=base_url, timeout=10) as open_,
        httpx.Client(base_url=closed_url, timeout=10) as closed,
    ):
        assert open_.post(CHAT, json=body, headers=auth()).status_code == 200
        assert closed.post(CHAT, json=body, headers=auth()).status_code == 200
        embedded_store.kill()
        try:
            for _ in range(5):
                started = time.monotonic()
                assert open_.post(CHAT, json=body, headers=auth()).status_code == 200
                assert time.monotonic() - started < 3
            started = time.monotonic()
            refused = closed.post(CHAT, json=body, headers=auth())
            envelope(refused, 503, "store_unavailable")
            assert time.monotonic() - started < 3
            envelope(open_.get("/readyz"), 503, "store_unavailable")
        finally:
            embedded_store.start()
        for c in (open_, closed):
            wait_until(lambda c=c: c.get("/readyz").status_code == 200, timeout_s=15)
        wait_until(
            lambda: closed.post(CHAT, json=body, headers=auth()).status_code == 200, timeout_s=10
        )
