"""The locust side of a run. Only ever loaded by a locust subprocess:

    BENCH_CONFIG=out/run_config.json python -m locust -f bench/locustfile.py --headless --host URL

Locust monkey-patches the interpreter with gevent on import, which breaks asyncio
code (the gateway's clients, the metrics scraper, pytest-asyncio). So the rest of
``bench`` never imports this module or locust: ``bench.runner`` launches it as a
separate process and reads back the JSON lines it writes (see ``bench.records``).
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import deque
from pathlib import Path
from typing import Any

import gevent
from locust import FastHttpUser, LoadTestShape, constant, constant_throughput, events, task

from bench.mix import MixConfig, RequestMix
from bench.records import REQUESTS_FILE, USERS_FILE, RequestRecord
from bench.shapes import from_spec
from bench.sse import SseTimer, StreamRead
from bench.stats import percentile

CONFIG: dict[str, Any] = json.loads(Path(os.environ["BENCH_CONFIG"]).read_text())
OUT = Path(CONFIG["out_dir"])
# The API keys come through the environment so they never land in the run directory.
MIX = MixConfig.model_validate({**CONFIG["mix"], "keys": json.loads(os.environ["BENCH_API_KEYS"])})
SHAPE = from_spec(CONFIG["shape"])
STOP: dict[str, Any] | None = CONFIG.get("stop_on_breach")
PATH = {"chat": "/v1/chat/completions", "responses": "/v1/responses"}[MIX.api]

_records = (OUT / REQUESTS_FILE).open("a")
_users = (OUT / USERS_FILE).open("a")
_recent: deque[tuple[float, float, bool]] = deque()  # (t, latency_ms, ok) for stop-on-breach
_seq = iter(range(1_000_000))


def _record(record: RequestRecord) -> None:
    _records.write(record.to_json() + "\n")
    _recent.append((record.t, record.latency_ms, record.ok))


def _window_breached(now: float) -> bool:
    assert STOP is not None
    while _recent and _recent[0][0] < now - STOP["window_s"]:
        _recent.popleft()
    if len(_recent) < 5:
        return False
    lat = [lat for _, lat, ok in _recent if ok]
    errors = sum(not ok for _, _, ok in _recent) / len(_recent)
    p95 = percentile(lat, 95)
    return (STOP.get("p95_ms") is not None and (p95 is None or p95 > STOP["p95_ms"])) or (
        STOP.get("error_rate") is not None and errors > STOP["error_rate"]
    )


class BenchShape(LoadTestShape):
    _strikes = 0
    _last_check = 0.0

    def tick(self) -> tuple[int, float] | None:
        run_time = self.get_run_time()
        tick = SHAPE.tick(run_time)
        if tick is None:
            return None
        if (
            STOP
            and tick.users >= STOP["after_users"]
            and run_time - self._last_check >= STOP["window_s"]
        ):
            self._last_check = run_time
            self._strikes = self._strikes + 1 if _window_breached(time.time()) else 0
            if self._strikes >= STOP["sustain"]:
                _users.write(
                    json.dumps({"t": time.time(), "users": tick.users, "knee": True}) + "\n"
                )
                return None
        return tick.users, tick.spawn_rate


def _sample_users(environment: Any) -> None:
    while True:
        _users.write(json.dumps({"t": time.time(), "users": environment.runner.user_count}) + "\n")
        _users.flush()
        _records.flush()
        gevent.sleep(1.0)


@events.test_start.add_listener
def _on_start(environment: Any, **_: Any) -> None:
    _users.write(json.dumps({"t": time.time(), "users": 0}) + "\n")
    gevent.spawn(_sample_users, environment)


@events.test_stop.add_listener
def _on_stop(environment: Any, **_: Any) -> None:
    _users.write(json.dumps({"t": time.time(), "users": 0, "stopped": True}) + "\n")
    _users.flush()
    _records.flush()


def _number(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class ChatUser(FastHttpUser):
    network_timeout = float(CONFIG.get("timeout_s", 60))
    connection_timeout = 10.0
    wait_time = constant_throughput(MIX.per_user_rps) if MIX.per_user_rps else constant(0)

    def on_start(self) -> None:
        self.mix = RequestMix(MIX, random.Random(f"{CONFIG.get('seed', 0)}-{next(_seq)}"))
        self.tenants = {key: f"key-{i}" for i, key in enumerate(MIX.keys)}

    @task
    def chat(self) -> None:
        spec = self.mix.next()
        headers = {"Authorization": f"Bearer {spec.key}", "Accept-Encoding": "identity"}
        started, t0 = time.time(), time.perf_counter()
        with self.client.request(
            "POST",
            PATH,
            json=spec.body,
            headers=headers,
            stream=spec.stream,
            catch_response=True,
            name="stream" if spec.stream else "chat",
        ) as resp:
            status = int(resp.status_code or 0)
            stream = (
                _read_sse(resp, t0) if spec.stream and status == 200 else StreamRead(error=None)
            )
            latency = (time.perf_counter() - t0) * 1000
            resp.request_meta["response_time"] = latency
            error = stream.error or (None if 200 <= status < 300 else _error_text(resp, status))
            if error:
                resp.failure(error)
            else:
                resp.success()
        h = {k.lower(): v for k, v in (resp.headers or {}).items()}
        record = RequestRecord(
            t=started,
            latency_ms=latency,
            status=status,
            ok=error is None,
            stream=spec.stream,
            kind=spec.kind,
            tenant=self.tenants[spec.key],
            model=spec.model,
            ttft_ms=stream.ttft_ms,
            itl_ms=stream.itl_ms,
            chunks=stream.chunks,
            cache=h.get("x-cache"),
            dedup=h.get("x-dedup"),
            cost=_number(h.get("x-request-cost")) if stream.cost is None else stream.cost,
            upstream=h.get("x-upstream"),
            error=error,
        )
        _record(record)


def _error_text(resp: Any, status: int) -> str:
    if status == 0:
        err = getattr(resp, "error", None)
        return f"connection: {type(err).__name__}" if err else "connection failed"
    try:
        message = json.loads(resp.text or "{}")["error"]["code"]
    except (ValueError, KeyError, TypeError):
        message = ""
    return f"HTTP {status} {message}".strip()


def _read_sse(resp: Any, t0: float) -> StreamRead:
    """Reads the stream line by line from geventhttpclient's response: its ``read(n)``
    (behind ``iter_content``) blocks until ``n`` bytes arrive, which would hide when
    each chunk really came in."""
    timer = SseTimer(t0)
    raw = resp._response
    try:
        while line := raw.readline(b"\n"):
            timer.feed(line.decode("utf-8", "replace"), time.perf_counter())
    except Exception as exc:  # the stream broke mid-way; the client raises many kinds
        return timer.result(f"stream: {type(exc).__name__}")
    return timer.result()
