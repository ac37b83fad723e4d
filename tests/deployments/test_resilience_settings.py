"""The config.yaml shape of the resilience settings validates as documented."""

from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError

from deployments.resilience_settings import ResilienceSettings, Target

EXAMPLE = """
default:
  breaker:
    failure_rate_threshold: 50
    slow_call_rate_threshold: 80
    slow_call_duration_s: 30
    window_type: COUNT_BASED
    window_size: 50
    minimum_calls: 10
    permitted_calls_in_half_open: 3
    wait_in_open_s: 30
    wait_multiplier: 2
    max_wait_in_open_s: 300
  bulkhead: {max_concurrent: 64, max_queued: 64, max_queue_wait_s: 5}
  retry: {max_attempts: 2, initial_backoff_s: 0.2, max_backoff_s: 2, jitter: full}
upstreams:
  mock-slow:
    breaker_scope: upstream
    breaker: {window_type: TIME_BASED, window_size: 10, minimum_calls: 5, slow_call_duration_s: 2}
    bulkhead: {max_concurrent: 8, max_queued: 8, max_queue_wait_s: 1}
    retry: {max_attempts: 1}
fallbacks:
  gpt-4o:
    - {upstream: openai, model: gpt-4o}
    - {upstream: azure, model: gpt-4o-eu}
    - {upstream: mock, model: mock-large}
"""


def test_the_documented_example_validates() -> None:
    settings = ResilienceSettings.model_validate(yaml.safe_load(EXAMPLE))
    assert settings.fallbacks["gpt-4o"][1] == Target(upstream="azure", model="gpt-4o-eu")
    slow = settings.policy("mock-slow")
    assert slow.breaker_scope == "upstream" and slow.breaker.window_type == "TIME_BASED"
    assert slow.breaker.failure_rate_threshold == 50  # unset fields keep their defaults
    assert settings.policy("openai") is settings.default


def test_a_typo_is_an_error_not_a_silent_default() -> None:
    with pytest.raises(ValidationError):
        ResilienceSettings.model_validate({"default": {"breaker": {"wait_in_open": 5}}})
