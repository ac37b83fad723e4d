from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from deployments.limiter_settings import LimiterSettings, format_window, parse_duration


def rejected(config: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as caught:
        LimiterSettings.model_validate(config)
    return str(caught.value)


def one_quota(**quota: Any) -> dict[str, Any]:
    return {"per_key": {"default": [quota]}}


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("1m", 60), ("1h30m", 5400), ("500ms", 0.5), ("1d", 86400), ("2w", 1209600)],
)
def test_durations_read_as_seconds(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds
    assert parse_duration(format_window(seconds)) == seconds


def test_a_number_is_seconds() -> None:
    assert parse_duration(90) == 90.0


def test_the_full_config_shape_validates() -> None:
    settings = LimiterSettings.model_validate(
        {
            "failure_mode": "closed",
            "per_key": {
                "default": [{"window": "1m", "requests": 60, "tokens": 90000}],
                "overrides": {"batch": [{"window": "1h", "tokens": 10, "shadow": True}]},
            },
            "per_model": {"default": [{"window": 86400, "tokens": 5_000_000}]},
        }
    )
    assert settings.per_key.for_name("batch")[0].shadow
    assert settings.per_key.for_name("other")[0].requests == 60
    assert settings.per_user.for_name("anyone") == ()


def test_negative_limits_are_rejected() -> None:
    message = rejected(one_quota(window="1m", requests=-1))
    assert "per_key.default.0.requests" in message
    assert "greater than or equal to 0" in message


def test_unknown_window_units_are_rejected() -> None:
    assert "unknown window unit 'y' in '5y': use one of ms, s, m, h, d, w" in rejected(
        one_quota(window="5y", requests=1)
    )


@pytest.mark.parametrize(
    ("window", "says"),
    [
        ("fast", "cannot read window 'fast'"),
        ("1m 30s", "cannot read window"),
        ("", "must not be empty"),
        ("0s", "at least 1ms"),
        (-5, "at least 1ms"),
        ("400d", "at most 366d"),
        (True, "must be a duration"),
    ],
)
def test_unreadable_windows_are_rejected(window: Any, says: str) -> None:
    assert says in rejected(one_quota(window=window, requests=1))


def test_a_quota_must_limit_something() -> None:
    assert "quota over 1m sets neither requests nor tokens" in rejected(one_quota(window="60s"))


def test_a_window_may_appear_once_per_list() -> None:
    twice = [{"window": "1m", "requests": 1}, {"window": "60s", "tokens": 5}]
    assert "more than one quota over window 1m" in rejected({"per_user": {"default": twice}})
    message = rejected({"per_user": {"overrides": {"alice": twice}}})
    assert "override 'alice': more than one quota over window 1m" in message
    # An enforced and a shadow quota over the same window are two quotas.
    pair = [{"window": "1m", "requests": 1}, {"window": "1m", "requests": 2, "shadow": True}]
    LimiterSettings.model_validate({"per_user": {"default": pair}})


@pytest.mark.parametrize(
    "config",
    [
        one_quota(window="1m", request=5),  # a typo
        {"failure_mode": "maybe"},
        {"precision": 0},
        {"store_timeout_s": 0},
        {"key_prefix": "rl"},  # no {hash tag}
        {"per_team": {}},
    ],
)
def test_other_mistakes_are_rejected(config: dict[str, Any]) -> None:
    rejected(config)
