from __future__ import annotations

import pickle

import pytest

from deployments.limiter_decision import (
    NEVER,
    LimitDecision,
    LimitHit,
    WindowState,
    format_reset,
    rate_limit_headers,
)
from serve_app.errors import RateLimitError


@pytest.mark.parametrize(
    ("us", "text"),
    [
        (0, "0s"),
        (1, "1ms"),  # rounded up: a client waiting that long is never early
        (12_000, "12ms"),
        (999_001, "1s"),
        (1_000_000, "1s"),
        (1_500_000, "1.5s"),
        (360_000_000, "6m0s"),
        (3_723_000_000, "1h2m3s"),
    ],
)
def test_resets_are_spelled_like_openai(us: int, text: str) -> None:
    assert format_reset(us) == text


def state(
    window_s: int,
    requests: int | None = None,
    used: int = 0,
    reset_us: int = 0,
    shadow: bool = False,
    wait_us: int = 0,
) -> WindowState:
    return WindowState(
        scope="key",
        name="k1",
        window_us=window_s * 1_000_000,
        shadow=shadow,
        requests_limit=requests,
        tokens_limit=None,
        requests_used=used,
        tokens_used=0,
        recorded=wait_us == 0,
        reset_us=reset_us,
        requests_wait_us=wait_us,
        tokens_wait_us=0,
        log_key="l",
        costs_key="c",
        slice_us=0,
        resolution_us=1,
    )


def test_headers_show_the_tightest_enforced_window() -> None:
    decision = LimitDecision(
        True,
        "allowed",
        0,
        windows=(
            state(60, requests=10, used=4, reset_us=5_000_000),
            state(3600, requests=100, used=94, reset_us=600_000_000),  # also 6 left
            state(86400, requests=1, used=1, shadow=True),  # shadow: never shown
        ),
    )
    assert rate_limit_headers(decision) == {
        "x-ratelimit-limit-requests": "100",
        "x-ratelimit-remaining-requests": "6",
        "x-ratelimit-reset-requests": "10m0s",  # on a tie, the later reset
    }


def rejection(wait_us: int) -> LimitDecision:
    hit = LimitHit("tenant", "acme", "requests", 3600.0, 5, 5, False)
    windows = (state(3600, requests=5, used=5, reset_us=wait_us, wait_us=wait_us),)
    return LimitDecision(False, "rejected", 0, windows=windows, hit=hit, retry_after_us=wait_us)


def test_a_rejection_says_which_limit_and_when_to_retry() -> None:
    error = rejection(1_234_567).error()
    assert error.status_code == 429 and error.code == "rate_limit_exceeded"
    assert "requests per hour for tenant 'acme' (limit 5, used 5)" in error.message
    assert error.headers["retry-after"] == "2"
    assert error.headers["retry-after-ms"] == "1235"
    assert error.headers["x-ratelimit-remaining-requests"] == "0"
    restored = pickle.loads(pickle.dumps(error))
    assert isinstance(restored, RateLimitError) and restored.headers == error.headers


def test_a_request_that_never_fits_is_not_worth_retrying() -> None:
    error = rejection(NEVER).error()
    assert error.headers["x-should-retry"] == "false"
    assert "retry-after" not in error.headers


def test_an_admitted_decision_has_no_error() -> None:
    with pytest.raises(ValueError):
        LimitDecision(True, "allowed", 0).error()


def test_labels_stay_low_cardinality() -> None:
    hit = LimitHit("user", "alice@example.com", "tokens", 90.0, 10, 10, False)
    assert hit.label == "user:tokens:1m30s"
    assert hit.describe() == "tokens per 1m30s for user 'alice@example.com'"
