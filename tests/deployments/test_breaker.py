"""What the breaker records for each kind of result, and how it refuses."""

from __future__ import annotations

import asyncio
import pickle

import pytest
from pydantic import ValidationError

from deployments.breaker import (
    BreakerSettings,
    BreakerState,
    Decision,
    Outcome,
    classify,
    effective_minimum,
    open_error,
    open_wait_ms,
)
from serve_app.errors import (
    CircuitOpenError,
    UpstreamError,
    UpstreamTimeoutError,
    UpstreamUnreachableError,
)

CFG = BreakerSettings(slow_call_duration_s=5)


def upstream(status: int) -> UpstreamError:
    return UpstreamError("x", status_code=status)


@pytest.mark.parametrize(
    ("exc", "duration", "expected"),
    [
        (None, 1, Outcome.SUCCESS),
        (None, 6, Outcome.SLOW_SUCCESS),
        (upstream(500), 1, Outcome.FAILURE),
        (upstream(503), 6, Outcome.SLOW_FAILURE),
        (upstream(429), 1, Outcome.FAILURE),
        (upstream(408), 1, Outcome.FAILURE),
        (upstream(400), 1, Outcome.SUCCESS),  # the client's mistake; the upstream answered
        (upstream(404), 6, Outcome.SLOW_SUCCESS),
        (UpstreamUnreachableError("refused"), 0, Outcome.FAILURE),
        (UpstreamTimeoutError("slow"), 6, Outcome.SLOW_FAILURE),
        (TimeoutError(), 1, Outcome.FAILURE),
        (ConnectionResetError(), 1, Outcome.FAILURE),
        (asyncio.CancelledError(), 1, Outcome.IGNORED),
        (KeyError("a gateway bug"), 1, Outcome.IGNORED),
    ],
)
def test_classify(exc: BaseException | None, duration: float, expected: Outcome) -> None:
    assert classify(exc, duration, CFG) == expected


def test_slow_means_strictly_above_the_threshold() -> None:
    assert classify(None, 5.0, CFG) == Outcome.SUCCESS


def test_open_error_rounds_retry_after_up_and_survives_pickling() -> None:
    decision = Decision(False, BreakerState.OPEN, 3, retry_after_ms=1_001)
    error = open_error("up/model", decision)
    assert error.headers == {"retry-after": "2", "retry-after-ms": "1001"}
    copy = pickle.loads(pickle.dumps(error))
    assert isinstance(copy, CircuitOpenError) and copy.headers == error.headers
    assert copy.to_dict()["error"]["code"] == "circuit_open"


def test_retry_after_is_at_least_one_second() -> None:
    error = open_error("x", Decision(False, BreakerState.OPEN, 1, retry_after_ms=0))
    assert error.headers["retry-after"] == "1"


def test_wait_in_open_grows_and_is_capped() -> None:
    cfg = BreakerSettings(wait_in_open_s=2, wait_multiplier=3, max_wait_in_open_s=30)
    assert [open_wait_ms(cfg, n) for n in (1, 2, 3, 4)] == [2_000, 6_000, 18_000, 30_000]
    fixed = BreakerSettings(wait_in_open_s=2)
    assert [open_wait_ms(fixed, n) for n in (1, 5)] == [2_000, 2_000]


def test_a_count_window_caps_the_minimum_calls() -> None:
    assert effective_minimum(BreakerSettings(window_size=5, minimum_calls=100)) == 5
    timed = BreakerSettings(window_type="TIME_BASED", window_size=5, minimum_calls=100)
    assert effective_minimum(timed) == 100


def test_settings_reject_nonsense() -> None:
    with pytest.raises(ValidationError):
        BreakerSettings(failure_rate_threshold=0)
    with pytest.raises(ValidationError):
        BreakerSettings(window_type="SLIDING")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        BreakerSettings.model_validate({"failure_rate": 50})  # a typo is not ignored
