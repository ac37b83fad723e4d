"""Issue 5 end to end: breakers, bulkheads, retries and fallbacks through real
HTTP into a real local Ray Serve app with two gateway replicas.

Several upstreams point at the same mock provider; the mock's faults are per
model, so each test faults its own model (and so its own breaker) while the
others stay healthy. Waits in open are short (1.5 s) to keep the module fast.
"""

from __future__ import annotations

import concurrent.futures
import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import psutil
import pytest
import redis

from serve_app.mock_provider import Faults, MockBehaviour
from tests.support import (
    OTHER_KEY,
    MockServer,
    auth,
    client,
    deploy_gateway,
    gateway_args,
    wait_until,
)

pytestmark = [pytest.mark.ray, pytest.mark.integration]

APP = "resilience-e2e"
CHAT = "/v1/chat/completions"
WAIT_IN_OPEN_S = 1.5
HALF_OPEN_PROBES = 2
MINIMUM_CALLS = 4
HANG_S = 1.5
BULKHEAD = 2  # calls in flight per replica to the "slow" upstream
REFUSAL_CACHE_S = 1.0  # an open breaker's refusal is repeated from memory this long

BREAKER = {
    "window_type": "COUNT_BASED",
    "window_size": 10,
    "minimum_calls": MINIMUM_CALLS,
    "failure_rate_threshold": 50,
    "wait_in_open_s": WAIT_IN_OPEN_S,
    "permitted_calls_in_half_open": HALF_OPEN_PROBES,
    "slow_call_duration_s": 5,
}
NO_RETRY = {"max_attempts": 1}


def resilience_config(mock_url: str) -> dict[str, Any]:
    upstream = {"base_url": mock_url, "read_timeout_s": 5.0}
    flaky_models = ("storm-gpt", "limit-gpt", "admin-gpt", "primary-gpt")
    return {
        "upstreams": {
            name: upstream
            for name in ("healthy", "flaky", "sticky", "retrying", "slow", "east", "west")
        },
        "models": [
            {"name": "mock-gpt", "upstream": "healthy"},
            *({"name": name, "upstream": "flaky"} for name in flaky_models),
            {"name": "shared-gpt", "upstream": "sticky"},
            {"name": "retry-gpt", "upstream": "retrying"},
            {"name": "hang-gpt", "upstream": "slow"},
            {"name": "spread-gpt", "upstream": "east"},
            {"name": "quick-gpt", "upstream": "east"},
            {"name": "short-gpt", "upstream": "healthy"},
        ],
        "resilience": {
            "refusal_cache_s": REFUSAL_CACHE_S,
            # Every call asks Redis: these tests pin cross-replica state changes exactly.
            "permit_cache_s": 0,
            "default": {"breaker": BREAKER, "retry": NO_RETRY},
            "upstreams": {
                # Stays open far longer than its test takes, however slow the machine.
                "sticky": {"breaker": {**BREAKER, "wait_in_open_s": 60}, "retry": NO_RETRY},
                "west": {"breaker": {**BREAKER, "wait_in_open_s": 60}, "retry": NO_RETRY},
                "retrying": {
                    "breaker": {**BREAKER, "minimum_calls": 10},  # retries, not opening
                    "retry": {"max_attempts": 2, "initial_backoff_s": 0.05, "jitter": "none"},
                },
                "slow": {
                    "breaker": {
                        **BREAKER,
                        "minimum_calls": 2,
                        "slow_call_duration_s": HANG_S / 2,
                        "slow_call_rate_threshold": 50,
                    },
                    "bulkhead": {"max_concurrent": BULKHEAD, "max_queued": 0},
                    "retry": NO_RETRY,
                },
            },
            "balance": {
                "spread-gpt": {
                    "targets": [
                        {"upstream": "east", "model": "spread-east"},
                        {"upstream": "west", "model": "spread-west"},
                    ]
                },
                "quick-gpt": {
                    "strategy": "lowest-latency",
                    "targets": [
                        {"upstream": "east", "model": "quick-slow"},
                        {"upstream": "west", "model": "quick-fast"},
                    ],
                },
            },
            "context_fallbacks": {"short-gpt": [{"upstream": "healthy", "model": "long-gpt"}]},
            "fallbacks": {
                "primary-gpt": [
                    {"upstream": "flaky", "model": "primary-gpt"},
                    {"upstream": "healthy", "model": "backup-gpt"},
                ]
            },
        },
    }


@pytest.fixture(scope="module")
def base_url(serve_port: int, mock_server: MockServer, redis_url: str) -> Iterator[str]:
    # Breaker state of an earlier run must not leak into this one.
    store = redis.Redis.from_url(redis_url)
    for key in store.scan_iter("breaker:*"):
        store.delete(key)
    args = gateway_args(mock_server.base_url, redis_url, **resilience_config(mock_server.base_url))
    deploy_gateway(args, APP, f"/{APP}")
    yield f"http://127.0.0.1:{serve_port}/{APP}"
    from ray import serve

    serve.delete(APP)


@pytest.fixture
def http(base_url: str) -> Iterator[httpx.Client]:
    with client(base_url) as c:
        yield c


def ask(model: str, content: str | None = None) -> dict[str, Any]:
    """A request nothing caches or coalesces (no temperature: sampled), so each one
    reaches the resilience stage."""
    text = content or f"question {uuid.uuid4().hex[:8]}"
    return {"model": model, "messages": [{"role": "user", "content": text}]}


def code_of(response: httpx.Response) -> str | None:
    if response.status_code == 200:
        return None
    return response.json()["error"]["code"]


def breaker(http: httpx.Client, name: str) -> dict[str, Any]:
    listed = http.get("/admin/breakers", headers=auth())
    assert listed.status_code == 200, listed.text
    found = [b for b in listed.json() if b["name"] == name]
    assert found, f"{name} not in {[b['name'] for b in listed.json()]}"
    return found[0]


def admin(http: httpx.Client, action: str, name: str) -> dict[str, Any]:
    response = http.post(f"/admin/breakers/{action}", json={"name": name}, headers=auth())
    assert response.status_code == 200, response.text
    return response.json()


def in_parallel(base_url: str, bodies: list[dict[str, Any]]) -> list[tuple[httpx.Response, float]]:
    """Send the bodies at once (a barrier); each response with its latency."""
    barrier = threading.Barrier(len(bodies))

    def one(body: dict[str, Any]) -> tuple[httpx.Response, float]:
        with client(base_url) as c:
            barrier.wait()
            started = time.perf_counter()
            response = c.post(CHAT, json=body, headers=auth())
            return response, time.perf_counter() - started

    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(one, bodies))


def until_open_ends(refusal: httpx.Response) -> None:
    time.sleep(int(refusal.headers["retry-after-ms"]) / 1000 + 0.05)


def replica_pids() -> set[int]:
    """This session's gateway replicas (other sessions may run the same app on the
    machine): Ray titles a replica's process after its deployment, and this
    process started the Ray node, so the replicas are among its descendants."""
    title = f"ray::ServeReplica:{APP}:Gateway"
    found = set()
    for process in psutil.Process().children(recursive=True):
        try:
            cmdline = process.cmdline()
        except psutil.Error:
            continue
        if cmdline and cmdline[0].startswith(title):
            found.add(process.pid)
    return found


def replicas_talking_to(port: int) -> set[int]:
    """Replica processes holding a connection to the mock provider right now."""
    found = set()
    for pid in replica_pids():
        try:
            connections = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.Error:
            continue
        if any(c.raddr and c.raddr.port == port for c in connections):
            found.add(pid)
    return found


def test_error_storm_opens_the_breaker_and_it_recovers_through_half_open(
    base_url: str, http: httpx.Client, mock_behaviour: MockBehaviour
) -> None:
    calls = mock_behaviour.stats.by_model
    mock_behaviour.config.faults["storm-gpt"] = Faults(error_rate=1.0, error_status=500)
    for _ in range(MINIMUM_CALLS):
        failed = http.post(CHAT, json=ask("storm-gpt"), headers=auth())
        assert (failed.status_code, code_of(failed)) == (500, "mock_500")
    assert calls["storm-gpt"] == MINIMUM_CALLS  # it opened within the window

    refused = http.post(CHAT, json=ask("storm-gpt"), headers=auth())
    assert (refused.status_code, code_of(refused)) == (503, "circuit_open")
    assert refused.json()["error"]["type"] == "service_unavailable"
    assert 1 <= int(refused.headers["retry-after"]) <= 2  # the remaining 1.5 s, rounded up
    assert 0 < int(refused.headers["retry-after-ms"]) <= WAIT_IN_OPEN_S * 1000
    assert breaker(http, "flaky/storm-gpt")["state"] == "OPEN"

    # While open, nothing reaches the upstream, and the remaining time shrinks. The
    # open period is measured from when the refusal came back, which is after the
    # gateway computed it; stop asking well before it ends, since one request on a
    # loaded CI machine can take hundreds of milliseconds and would then be a probe.
    open_until = time.monotonic() + int(refused.headers["retry-after-ms"]) / 1000
    last = refused
    while time.monotonic() < open_until - 0.7:
        again = http.post(CHAT, json=ask("storm-gpt"), headers=auth())
        assert code_of(again) == "circuit_open"
        assert int(again.headers["retry-after-ms"]) <= int(last.headers["retry-after-ms"])
        last = again
    assert calls["storm-gpt"] == MINIMUM_CALLS

    # The upstream heals; the first requests after the wait are at most N probes.
    mock_behaviour.config.faults.clear()
    mock_behaviour.config.latency.fixed_ms = 300  # probes stay in flight while others ask
    until_open_ends(last)
    burst = in_parallel(base_url, [ask("storm-gpt") for _ in range(8)])
    probes = calls["storm-gpt"] - MINIMUM_CALLS
    assert 1 <= probes <= HALF_OPEN_PROBES
    answered = [r for r, _ in burst if r.status_code == 200]
    assert len(answered) == probes
    assert {code_of(r) for r, _ in burst if r.status_code != 200} <= {"circuit_open"}

    wait_until(
        lambda: http.post(CHAT, json=ask("storm-gpt"), headers=auth()).status_code == 200,
        timeout_s=5,
    )
    assert breaker(http, "flaky/storm-gpt")["state"] == "CLOSED"


def test_429_with_retry_after_opens_for_that_long(
    http: httpx.Client, mock_behaviour: MockBehaviour
) -> None:
    calls = mock_behaviour.stats.by_model
    mock_behaviour.config.faults["limit-gpt"] = Faults(
        error_rate=1.0, error_status=429, retry_after_s=2
    )
    limited = http.post(CHAT, json=ask("limit-gpt"), headers=auth())
    limited_at = time.monotonic()
    assert limited.status_code == 429
    assert limited.headers["retry-after"] == "2"
    refused = http.post(CHAT, json=ask("limit-gpt"), headers=auth())
    assert code_of(refused) == "circuit_open"
    assert refused.headers["retry-after"] == "2"  # the upstream's, not wait_in_open_s
    assert int(refused.headers["retry-after-ms"]) > WAIT_IN_OPEN_S * 1000
    mock_behaviour.config.faults.clear()

    while (response := http.post(CHAT, json=ask("limit-gpt"), headers=auth())).status_code != 200:
        assert code_of(response) == "circuit_open"
        assert calls["limit-gpt"] == 1
        time.sleep(0.05)
    opened_for = time.monotonic() - limited_at
    assert 1.8 <= opened_for <= 3.0
    assert calls["limit-gpt"] == 2


def test_hanging_upstream_fills_the_bulkhead_and_trips_the_slow_call_rule(
    base_url: str, http: httpx.Client, mock_behaviour: MockBehaviour
) -> None:
    calls = mock_behaviour.stats.by_model

    def healthy_latency() -> float:
        started = time.perf_counter()
        assert http.post(CHAT, json=ask("mock-gpt"), headers=auth()).status_code == 200
        return time.perf_counter() - started

    baseline = statistics.median(healthy_latency() for _ in range(5))
    mock_behaviour.config.faults["hang-gpt"] = Faults(hang_s=HANG_S)
    crowd = 10
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        hanging = pool.submit(in_parallel, base_url, [ask("hang-gpt") for _ in range(crowd)])
        wait_until(lambda: calls["hang-gpt"] >= 1, timeout_s=5)
        during = [healthy_latency() for _ in range(5)]
        results = hanging.result()

    # The other upstream kept its latency while this one hung.
    assert statistics.median(during) < baseline + 0.25
    assert max(during) < HANG_S / 2
    admitted = [(r, t) for r, t in results if r.status_code == 200]
    rejected = [(r, t) for r, t in results if r.status_code != 200]
    assert 1 <= len(admitted) <= 2 * BULKHEAD  # at most BULKHEAD per replica
    assert calls["hang-gpt"] == len(admitted)
    assert all(t >= HANG_S for _, t in admitted)
    assert rejected
    for response, took in rejected:
        assert code_of(response) == "bulkhead_full"
        assert response.headers["retry-after"] == "1"
        assert took < HANG_S / 2  # answered at once, not queued behind the hang

    # Every admitted call was slow: the slow-call rate opened the breaker.
    wait_until(lambda: breaker(http, "slow/hang-gpt")["state"] == "OPEN", timeout_s=5)
    started = time.perf_counter()
    refused = http.post(CHAT, json=ask("hang-gpt"), headers=auth())
    assert code_of(refused) == "circuit_open"
    assert time.perf_counter() - started < HANG_S / 2
    assert calls["hang-gpt"] == len(admitted)
    snapshot = breaker(http, "slow/hang-gpt")
    assert snapshot["slow_calls"] >= 2 and snapshot["failed_calls"] == 0


def test_transient_fault_is_retried(
    http: httpx.Client, mock_behaviour: MockBehaviour, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = mock_behaviour.stats.by_model
    record = mock_behaviour.record

    def heal_after_first_call(path: str, model: str, raw: bytes) -> str:
        digest = record(path, model, raw)
        if model == "retry-gpt" and calls[model] >= 2:
            mock_behaviour.config.faults.pop(model, None)  # before the mock decides
        return digest

    monkeypatch.setattr(mock_behaviour, "record", heal_after_first_call)
    mock_behaviour.config.faults["retry-gpt"] = Faults(error_rate=1.0, error_status=503)
    response = http.post(CHAT, json=ask("retry-gpt"), headers=auth())
    assert response.status_code == 200, response.text
    assert response.headers["x-attempts"] == "2"
    assert response.headers["x-upstream"] == "retrying"
    assert calls["retry-gpt"] == 2

    # A client error is the client's: not retried.
    mock_behaviour.config.faults["retry-gpt"] = Faults(error_rate=1.0, error_status=400)
    monkeypatch.setattr(mock_behaviour, "record", record)
    refused = http.post(CHAT, json=ask("retry-gpt"), headers=auth())
    assert refused.status_code == 400
    assert refused.headers["x-attempts"] == "1"
    assert calls["retry-gpt"] == 3

    # A persistent fault: both attempts are spent, the upstream's error is passed on.
    mock_behaviour.config.faults["retry-gpt"] = Faults(error_rate=1.0, error_status=500)
    failed = http.post(CHAT, json=ask("retry-gpt"), headers=auth())
    assert (failed.status_code, code_of(failed)) == (500, "mock_500")
    assert failed.headers["x-attempts"] == "2"
    assert calls["retry-gpt"] == 5


def test_healthy_calls_are_tried_once(http: httpx.Client, mock_behaviour: MockBehaviour) -> None:
    response = http.post(CHAT, json=ask("retry-gpt"), headers=auth())
    assert response.status_code == 200
    assert (response.headers["x-upstream"], response.headers["x-attempts"]) == ("retrying", "1")


def test_fallback_serves_when_the_primary_fails_or_is_open(
    http: httpx.Client, mock_behaviour: MockBehaviour
) -> None:
    calls = mock_behaviour.stats.by_model
    mock_behaviour.config.faults["primary-gpt"] = Faults(error_rate=1.0, error_status=500)
    response = http.post(CHAT, json=ask("primary-gpt"), headers=auth())
    assert response.status_code == 200, response.text
    assert response.headers["x-upstream"] == "healthy"
    assert response.headers["x-attempts"] == "2"
    assert response.json()["model"] == "backup-gpt"
    assert (calls["primary-gpt"], calls["backup-gpt"]) == (1, 1)

    # An open primary is skipped without a call.
    admin(http, "open", "flaky/primary-gpt")
    try:
        skipped = http.post(CHAT, json=ask("primary-gpt"), headers=auth())
        assert skipped.status_code == 200
        assert (skipped.headers["x-upstream"], skipped.headers["x-attempts"]) == ("healthy", "1")
        assert (calls["primary-gpt"], calls["backup-gpt"]) == (1, 2)
        # Both targets down: the client gets the last upstream error, and both were tried.
        admin(http, "close", "flaky/primary-gpt")
        time.sleep(REFUSAL_CACHE_S + 0.1)  # the replica that refused may repeat it for this long
        mock_behaviour.config.faults["backup-gpt"] = Faults(error_rate=1.0, error_status=502)
        failed = http.post(CHAT, json=ask("primary-gpt"), headers=auth())
        assert (failed.status_code, code_of(failed)) == (502, "mock_502")
        assert (failed.headers["x-upstream"], failed.headers["x-attempts"]) == ("healthy", "2")
        assert (calls["primary-gpt"], calls["backup-gpt"]) == (2, 3)
    finally:
        admin(http, "reset", "flaky/primary-gpt")
        admin(http, "reset", "healthy/backup-gpt")


def test_admin_breakers_list_and_force(http: httpx.Client, mock_behaviour: MockBehaviour) -> None:
    calls = mock_behaviour.stats.by_model
    assert http.post(CHAT, json=ask("admin-gpt"), headers=auth()).status_code == 200
    snapshot = breaker(http, "flaky/admin-gpt")
    assert snapshot["state"] == "CLOSED"
    assert {"failure_rate", "slow_call_rate", "calls", "open_remaining_ms"} <= set(snapshot)

    forced = admin(http, "open", "flaky/admin-gpt")
    assert forced["state"] == "FORCED_OPEN"
    for _ in range(6):
        refused = http.post(CHAT, json=ask("admin-gpt"), headers=auth())
        assert code_of(refused) == "circuit_open"
    assert calls["admin-gpt"] == 1
    time.sleep(WAIT_IN_OPEN_S + 0.1)  # forced open never recovers by itself
    assert code_of(http.post(CHAT, json=ask("admin-gpt"), headers=auth())) == "circuit_open"
    assert breaker(http, "flaky/admin-gpt")["state"] == "FORCED_OPEN"

    assert admin(http, "close", "flaky/admin-gpt")["state"] == "CLOSED"
    wait_until(  # another replica may repeat its refusal from memory for up to a second
        lambda: http.post(CHAT, json=ask("admin-gpt"), headers=auth()).status_code == 200,
        timeout_s=3,
    )
    reset = admin(http, "reset", "flaky/admin-gpt")
    assert (reset["state"], reset["calls"], reset["generation"]) == ("CLOSED", 0, 0)


def test_admin_breaker_routes_refuse_bad_calls(http: httpx.Client) -> None:
    assert http.get("/admin/breakers").status_code == 401
    assert http.get("/admin/breakers", headers=auth(OTHER_KEY)).status_code == 403
    denied = http.post(
        "/admin/breakers/open", json={"name": "flaky/admin-gpt"}, headers=auth(OTHER_KEY)
    )
    assert denied.status_code == 403
    bad_action = http.post("/admin/breakers/explode", json={"name": "x"}, headers=auth())
    assert bad_action.status_code == 400
    no_name = http.post("/admin/breakers/open", json={}, headers=auth())
    assert (no_name.status_code, no_name.json()["error"]["param"]) == (400, "name")
    unknown = http.post("/admin/breakers/open", json={"name": "nowhere/none"}, headers=auth())
    assert unknown.status_code == 404


def test_every_replica_lists_and_controls_every_breaker(
    http: httpx.Client, mock_behaviour: MockBehaviour
) -> None:
    """Serve routes admin calls to any replica: each must know every model's breaker,
    not only those of models it happened to serve."""
    for _ in range(8):
        names = {b["name"] for b in http.get("/admin/breakers", headers=auth()).json()}
        assert {"flaky/storm-gpt", "slow/hang-gpt", "retrying/retry-gpt"} <= names
        assert {"flaky/primary-gpt", "healthy/backup-gpt"} <= names
    for _ in range(8):
        assert admin(http, "reset", "sticky/shared-gpt")["state"] == "CLOSED"


def test_failures_on_one_replica_open_the_breaker_for_both(
    http: httpx.Client, mock_server: MockServer, mock_behaviour: MockBehaviour
) -> None:
    """Opening takes MINIMUM_CALLS failures in all; were breakers per replica, the
    replica that saw fewer of them would keep calling. Serve routes at random, so
    20 requests reach both replicas (all on one: probability 2**-19)."""
    assert len(replica_pids()) == 2
    wait_until(  # both replicas have served (each holds a connection to the mock)
        lambda: (
            http.post(CHAT, json=ask("mock-gpt"), headers=auth()).status_code == 200
            and len(replicas_talking_to(mock_server.port)) == 2
        ),
        timeout_s=10,
    )
    calls = mock_behaviour.stats.by_model
    mock_behaviour.config.faults["shared-gpt"] = Faults(error_rate=1.0, error_status=500)
    for _ in range(MINIMUM_CALLS):
        assert http.post(CHAT, json=ask("shared-gpt"), headers=auth()).status_code == 500
    outcomes = [code_of(http.post(CHAT, json=ask("shared-gpt"), headers=auth())) for _ in range(20)]
    assert outcomes == ["circuit_open"] * 20
    assert calls["shared-gpt"] == MINIMUM_CALLS


def test_refusals_reach_clients_through_the_openai_sdk(
    base_url: str, http: httpx.Client, mock_behaviour: MockBehaviour
) -> None:
    import openai

    sdk = openai.OpenAI(base_url=f"{base_url}/v1", api_key="sk-local", max_retries=0)
    admin(http, "open", "flaky/admin-gpt")
    try:
        with pytest.raises(openai.InternalServerError) as refused:
            sdk.chat.completions.create(
                model="admin-gpt", messages=[{"role": "user", "content": "hi"}]
            )
        assert refused.value.status_code == 503
        assert refused.value.code == "circuit_open"
        assert refused.value.response.headers["retry-after"]
    finally:
        admin(http, "reset", "flaky/admin-gpt")


def test_a_balanced_model_spreads_its_calls_over_its_targets(
    http: httpx.Client, mock_behaviour: MockBehaviour
) -> None:
    calls = mock_behaviour.stats.by_model
    before = (calls["spread-east"], calls["spread-west"])
    served = []
    for _ in range(60):
        response = http.post(CHAT, json=ask("spread-gpt"), headers=auth())
        assert response.status_code == 200, response.text
        assert response.headers["x-attempts"] == "1"
        served.append(response.headers["x-upstream"])
    east, west = served.count("east"), served.count("west")
    assert east + west == 60 and min(east, west) >= 12  # equal weights; P(< 12) ~ 1e-6
    assert (calls["spread-east"] - before[0], calls["spread-west"] - before[1]) == (east, west)
    with http.stream("POST", CHAT, json={**ask("spread-gpt"), "stream": True}, headers=auth()) as s:
        assert s.status_code == 200 and s.headers["x-upstream"] in ("east", "west")
        assert "data: [DONE]" in s.read().decode()


def test_a_failing_target_of_a_balanced_model_costs_its_clients_nothing(
    http: httpx.Client, mock_behaviour: MockBehaviour
) -> None:
    mock_behaviour.config.faults["spread-west"] = Faults(error_rate=1.0, error_status=500)
    try:
        answers = [http.post(CHAT, json=ask("spread-gpt"), headers=auth()) for _ in range(40)]
        assert [a.status_code for a in answers] == [200] * 40  # west's failures fell back to east
        assert {a.headers["x-upstream"] for a in answers} == {"east"}
        # Once west's breaker opened, west is no longer tried first: one call per request.
        assert breaker(http, "west/spread-west")["state"] == "OPEN"
        assert [a.headers["x-attempts"] for a in answers[-10:]] == ["1"] * 10
    finally:
        mock_behaviour.config.faults.pop("spread-west", None)
        admin(http, "reset", "west/spread-west")


def test_lowest_latency_sends_calls_to_the_faster_target(
    http: httpx.Client, mock_behaviour: MockBehaviour
) -> None:
    mock_behaviour.config.faults["quick-slow"] = Faults(hang_s=0.3)
    try:
        served = [
            http.post(CHAT, json=ask("quick-gpt"), headers=auth()).headers["x-upstream"]
            for _ in range(30)
        ]
        # Each of the two replicas may try the slow target once, to measure it; weighted
        # at random, about half the calls would go there.
        assert served.count("east") <= 2
        shown = http.get("/admin/balance", headers=auth())  # one replica's view
        assert shown.status_code == 200
        (quick,) = [g for g in shown.json() if g["model"] == "quick-gpt"]
        fast = {t["model"]: t for t in quick["targets"]}["quick-fast"]
        assert quick["strategy"] == "lowest-latency" and fast["picks"] > 0
        assert fast["latency_s"] is not None and fast["latency_s"] < 0.3
    finally:
        mock_behaviour.config.faults.pop("quick-slow", None)


def test_a_request_too_long_for_the_model_goes_to_its_context_fallback(
    http: httpx.Client, mock_behaviour: MockBehaviour
) -> None:
    mock_behaviour.config.faults["short-gpt"] = Faults(context_tokens=30)
    try:
        short = http.post(CHAT, json=ask("short-gpt", "a short question"), headers=auth())
        assert short.status_code == 200 and short.json()["model"] == "short-gpt"
        long_body = ask("short-gpt", "a long question " * 20)
        long = http.post(CHAT, json=long_body, headers=auth())
        assert long.status_code == 200, long.text
        assert long.json()["model"] == "long-gpt"
        assert long.headers["x-attempts"] == "2"
        streamed = {**long_body, "stream": True}
        with http.stream("POST", CHAT, json=streamed, headers=auth()) as answer:
            assert answer.status_code == 200
            assert '"model":"long-gpt"' in answer.read().decode().replace(" ", "")
        # Other models keep OpenAI's answer: the client's request is too long.
        mock_behaviour.config.faults["retry-gpt"] = Faults(context_tokens=30)
        refused = http.post(CHAT, json=ask("retry-gpt", "a long question " * 20), headers=auth())
        assert (refused.status_code, code_of(refused)) == (400, "context_length_exceeded")
    finally:
        mock_behaviour.config.faults.pop("short-gpt", None)
        mock_behaviour.config.faults.pop("retry-gpt", None)
