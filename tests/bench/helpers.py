"""Synthetic request records for the bench tests."""

from __future__ import annotations

from bench.records import RequestRecord


def rec(t: float, latency: float, ok: bool = True, **kw: object) -> RequestRecord:
    base: dict[str, object] = {
        "t": t,
        "latency_ms": latency,
        "status": 200 if ok else 503,
        "ok": ok,
        "stream": False,
        "kind": "unique",
        "tenant": "key-0",
        "model": "mock-gpt",
    }
    base.update(kw)
    return RequestRecord(**base)  # type: ignore[arg-type]
