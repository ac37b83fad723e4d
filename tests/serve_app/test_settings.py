from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from serve_app.auth import KeyRing
from serve_app.errors import AuthenticationError
from serve_app.mock_provider import MockConfig
from serve_app.settings import GatewayArgs, hash_key

ROOT = Path(__file__).resolve().parents[2]


def _apps() -> dict[str, dict]:
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    return {app["name"]: app for app in config["applications"]}


def test_config_yaml_validates_and_has_the_local_key() -> None:
    args = GatewayArgs.model_validate(_apps()["gateway"]["args"])
    principal = KeyRing(args.api_keys).authenticate("Bearer sk-local")
    assert principal.tenant == "local"
    MockConfig.model_validate(_apps()["mock"]["args"])


def test_the_local_profile_lets_the_breaker_load_test_pass() -> None:
    """`bench run breaker` against `make run`: its hang must be a slow call to the mock's
    breaker (else the breaker waits for errors alone, at a rate on its threshold), and the
    local key's minute limit must not answer the load test before the gateway does."""
    from bench.scenarios import SCENARIOS

    args = GatewayArgs.model_validate(_apps()["gateway"]["args"])
    fault = SCENARIOS["breaker"].fault
    assert fault is not None
    hang_s = fault.payload["faults"]["*"]["hang_s"]
    breaker = args.resilience.policy("mock").breaker
    assert breaker.slow_call_duration_s < hang_s and breaker.slow_call_rate_threshold <= 100
    minute = [q for q in args.limits.per_key.default if q.window == 60]
    assert minute and minute[0].requests >= 60 * 500  # 500 req/s


def test_config_yaml_deployments_fit_two_cores() -> None:
    def most_replicas(deployment: dict) -> int:
        scaling = deployment.get("autoscaling_config")
        return scaling["max_replicas"] if scaling else deployment.get("num_replicas", 1)

    total = sum(
        d["ray_actor_options"]["num_cpus"] * most_replicas(d)
        for app in _apps().values()
        for d in app["deployments"]
    )
    assert total < 2  # even at the most replicas, the app fits a 2-core laptop


def _base() -> dict:
    return {
        "upstreams": {"u": {"base_url": "http://127.0.0.1:1/v1"}},
        "models": [{"name": "m", "upstream": "u"}],
        "api_keys": [{"name": "k", "key_sha256": hash_key("s")}],
    }


@pytest.mark.parametrize(
    ("patch", "needle"),
    [
        ({"models": [{"name": "m", "upstream": "nope"}]}, "upstream 'nope'"),
        ({"models": [{"name": "m", "upstream": "u"}] * 2}, "unique"),
        ({"api_keys": [{"name": "k"}]}, "exactly one of key_env or key_sha256"),
        ({"api_keys": [{"name": "k", "key_sha256": "plaintext"}]}, "key_sha256"),
        (
            {"api_keys": [{"name": "k", "key_sha256": hash_key("s"), "models": ["m", "x"]}]},
            "api key 'k' allows models ['x']",
        ),
        ({"max_body_bytes": 10}, "max_body_bytes"),
        # 'acme/ml' would share what tenant 'acme' keeps under its cache namespace 'ml'
        (
            {"api_keys": [{"name": "k", "key_sha256": hash_key("s"), "tenant": "acme/ml"}]},
            "api_keys.0.tenant",
        ),
        ({"tenants": {"a{b}": {}}}, "tenants.a{b}"),
        (
            {"request_timeout_s": 1000, "budgets": {"hold_ttl_s": 900}},
            "budgets.hold_ttl_s (900) is shorter than request_timeout_s",
        ),
        ({"unknown_section": {}}, "unknown_section"),
        (
            {"resilience": {"fallbacks": {"m": [{"upstream": "gone", "model": "x"}]}}},
            "resilience.fallbacks.m names upstream 'gone'",
        ),
        (
            {"resilience": {"fallbacks": {"typo": [{"upstream": "u", "model": "x"}]}}},
            "resilience.fallbacks.typo: no model 'typo'",
        ),
        (
            {"resilience": {"balance": {"m": {"targets": [{"upstream": "gone", "model": "x"}]}}}},
            "resilience.balance.m names upstream 'gone'",
        ),
        (
            {"resilience": {"balance": {"typo": {"targets": [{"upstream": "u", "model": "x"}]}}}},
            "resilience.balance.typo: no model 'typo'",
        ),
        (
            {"resilience": {"balance": {"m": {"strategy": "fastest", "targets": []}}}},
            "strategy",
        ),
        (
            {"resilience": {"context_fallbacks": {"m": [{"upstream": "gone", "model": "x"}]}}},
            "resilience.context_fallbacks.m names upstream 'gone'",
        ),
    ],
)
def test_bad_config_is_rejected_with_a_clear_message(patch: dict, needle: str) -> None:
    with pytest.raises(ValidationError) as raised:
        GatewayArgs.model_validate({**_base(), **patch})
    assert needle in str(raised.value)


def test_keys_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEAM_KEY", "sk-team")
    args = GatewayArgs.model_validate(
        {**_base(), "api_keys": [{"name": "team", "key_env": "TEAM_KEY", "tenant": "t"}]}
    )
    ring = KeyRing(args.api_keys)
    assert ring.authenticate("Bearer sk-team").tenant == "t"
    with pytest.raises(AuthenticationError):
        ring.authenticate("Bearer sk-local")


def test_served_models_list_every_upstream_model_that_may_answer() -> None:
    args = GatewayArgs.model_validate(
        {
            **_base(),
            "models": [
                {"name": "m", "upstream": "u", "upstream_model": "m-1"},
                {"name": "plain", "upstream": "u"},
            ],
            "resilience": {
                "balance": {"m": {"targets": [{"upstream": "u", "model": "m-2"}]}},
                "fallbacks": {
                    "m": [{"upstream": "u", "model": "m-1"}, {"upstream": "u", "model": "m-3"}]
                },
                "context_fallbacks": {"m": [{"upstream": "u", "model": "m-4"}]},
            },
        }
    )
    assert args.served_models() == {"m": ("m-1", "m-3", "m-4", "m-2"), "plain": ("plain",)}


def test_a_slot_must_outlast_the_request_holding_it() -> None:
    from serve_app.settings import GatewayArgs, hash_key

    config = {
        "upstreams": {"u": {"base_url": "http://u.invalid/v1"}},
        "models": [{"name": "m", "upstream": "u"}],
        "api_keys": [{"name": "k", "key_sha256": hash_key("sk-k")}],
        "request_timeout_s": 900,
    }
    assert GatewayArgs.model_validate(config)  # by default a slot outlasts the deadline
    short = {**config, "limits": {"max_parallel": {"lease_s": 600}}}
    with pytest.raises(ValueError, match="lease_s \\(600\\) is shorter than request_timeout_s"):
        GatewayArgs.model_validate(short)
