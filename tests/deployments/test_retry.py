"""Which failures are retried, after how long, and which move to the next target."""

from __future__ import annotations

import random

import pytest

from deployments.retry import (
    RetryPolicy,
    RetrySettings,
    context_overflow,
    retry_after_s,
    should_fall_back,
)
from serve_app.errors import (
    CircuitOpenError,
    InvalidRequestError,
    UpstreamError,
    UpstreamTimeoutError,
    UpstreamUnreachableError,
)


def upstream(status: int, **headers: str) -> UpstreamError:
    return UpstreamError(f"status {status}", status_code=status, headers=headers)


NO_JITTER = RetrySettings(jitter="none", max_attempts=6)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (UpstreamUnreachableError("refused"), True),
        (ConnectionResetError(), True),
        (upstream(500), True),
        (upstream(502), True),
        (upstream(503), True),
        (upstream(429), True),
        (upstream(400), False),
        (upstream(401), False),
        (upstream(404), False),
        (UpstreamTimeoutError("slow"), False),  # may have run upstream: not by default
        (TimeoutError(), False),
        (upstream(500, **{"x-should-retry": "false"}), False),
        (upstream(409, **{"x-should-retry": "true"}), True),
        (ValueError("a bug"), False),
    ],
)
def test_retryable(error: BaseException, expected: bool) -> None:
    assert RetryPolicy(RetrySettings()).retryable(error) is expected


def test_timeouts_are_retried_when_configured() -> None:
    policy = RetryPolicy(RetrySettings(retry_on_timeout=True))
    assert policy.retryable(UpstreamTimeoutError("slow"))


def test_backoff_grows_exponentially_up_to_the_cap() -> None:
    policy = RetryPolicy(NO_JITTER)
    assert [policy.backoff_s(n) for n in range(1, 6)] == pytest.approx([0.2, 0.4, 0.8, 1.6, 2.0])


def test_full_jitter_spreads_within_the_ceiling() -> None:
    policy = RetryPolicy(RetrySettings(), random.Random(7))
    delays = [policy.backoff_s(3) for _ in range(200)]
    assert all(0 <= d <= 0.8 for d in delays)
    assert max(delays) - min(delays) > 0.5  # spread, so replicas do not retry in step


def test_equal_jitter_keeps_half_the_backoff() -> None:
    policy = RetryPolicy(RetrySettings(jitter="equal"), random.Random(7))
    assert all(0.4 <= policy.backoff_s(3) <= 0.8 for _ in range(200))


def test_delay_stops_after_max_attempts() -> None:
    policy = RetryPolicy(RetrySettings(max_attempts=2, jitter="none"))
    assert policy.delay_s(1, upstream(500), 30) == pytest.approx(0.2)
    assert policy.delay_s(2, upstream(500), 30) is None


def test_delay_honours_a_short_retry_after_and_gives_up_on_a_long_one() -> None:
    policy = RetryPolicy(NO_JITTER)
    assert policy.delay_s(1, upstream(429, **{"retry-after": "1.5"}), 30) == 1.5
    assert policy.delay_s(1, upstream(429, **{"retry-after": "10"}), 30) is None


def test_no_retry_that_cannot_finish_before_the_deadline() -> None:
    policy = RetryPolicy(NO_JITTER)
    assert policy.delay_s(1, upstream(500), 0.2) is None
    assert policy.delay_s(1, upstream(500), 0.21) == pytest.approx(0.2)


def test_a_client_error_is_not_retried() -> None:
    assert RetryPolicy(NO_JITTER).delay_s(1, upstream(400), 30) is None


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "2"}, 2.0),
        ({"Retry-After": "0.5"}, 0.5),
        ({"retry-after-ms": "1500", "retry-after": "9"}, 1.5),
        ({"retry-after": "Wed, 21 Oct 2015 07:28:05 GMT"}, 5.0),
        ({"retry-after": "soon"}, None),
        ({}, None),
    ],
)
def test_retry_after_parsing(headers: dict[str, str], expected: float | None) -> None:
    now = 1445412480.0  # 2015-10-21 07:28:00 UTC
    assert retry_after_s(headers, now=now) == expected


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (upstream(500), True),
        (upstream(429), True),
        (upstream(404), True),  # that upstream lacks the model: another may have it
        (upstream(401), True),  # the gateway's key for that upstream
        (upstream(400), False),  # the client's request: every target would refuse it
        (upstream(422), False),
        (CircuitOpenError("open"), True),
        (UpstreamTimeoutError("slow"), True),
        (TimeoutError(), True),
        (InvalidRequestError("bad"), False),
        (ValueError("a bug"), False),
    ],
)
def test_should_fall_back(error: BaseException, expected: bool) -> None:
    assert should_fall_back(error) is expected


def refusal(status: int, body: bytes) -> UpstreamError:
    return UpstreamError("refused", status_code=status, headers={}, upstream_body=body)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        # OpenAI and Azure
        (
            refusal(
                400,
                b'{"error": {"message": "This model\'s maximum context length is 128000 tokens.",'
                b' "type": "invalid_request_error", "param": "messages",'
                b' "code": "context_length_exceeded"}}',
            ),
            True,
        ),
        # vLLM (its older bare envelope)
        (
            refusal(
                400,
                b'{"object": "error", "message": "This model\'s maximum context length is 4096'
                b' tokens. However, you requested 5000 tokens", "type": "BadRequestError",'
                b' "code": 400}',
            ),
            True,
        ),
        (refusal(400, b'{"error": {"message": "prompt is too long: 210000 tokens"}}'), True),
        (refusal(413, b"Request exceeds the context window"), True),
        (UpstreamError("Too many tokens in the prompt", status_code=400, headers={}), True),
        # Not about the window: the client's other mistakes, or the upstream's failure
        (refusal(400, b'{"error": {"message": "temperature must be <= 2"}}'), False),
        (refusal(500, b'{"error": {"message": "maximum context length reached"}}'), False),
        (refusal(429, b'{"error": {"code": "context_length_exceeded"}}'), False),
        (InvalidRequestError("maximum context length"), False),  # the gateway's own 400
    ],
)
def test_context_overflow_is_recognised_in_upstreams_words(
    error: BaseException, expected: bool
) -> None:
    assert context_overflow(error) is expected
