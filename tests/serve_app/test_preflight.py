"""`make run` checks its config before starting Ray."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from serve_app.preflight import main, problems

ROOT = Path(__file__).resolve().parents[2]
CONFIG: dict[str, Any] = yaml.safe_load((ROOT / "config.yaml").read_text())


def gateway_app(config: dict[str, Any]) -> dict[str, Any]:
    return next(a for a in config["applications"] if a["import_path"].endswith(":build_app"))


def test_the_shipped_config_passes() -> None:
    assert problems(CONFIG) == []


def test_a_disabled_semantic_tier_with_its_deployment_settings_left_is_named() -> None:
    config = copy.deepcopy(CONFIG)
    gateway_app(config)["args"]["semantic_cache"]["enabled"] = False
    [problem] = problems(config)
    assert "'SemanticCacheDeployment'" in problem and "delete its entry" in problem
    app = gateway_app(config)
    app["deployments"] = [d for d in app["deployments"] if d["name"] != "SemanticCacheDeployment"]
    assert problems(config) == []


def test_args_that_do_not_validate_are_named_before_ray_starts(tmp_path: Path) -> None:
    config = copy.deepcopy(CONFIG)
    gateway_app(config)["args"]["limits"]["per_key"]["default"][0]["window"] = "soon"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main([str(path)]) == 1
    assert "do not validate" in problems(config)[0] and "soon" in problems(config)[0]


def test_applications_built_elsewhere_are_left_alone() -> None:
    config = {
        "applications": [{"name": "x", "import_path": "other:app", "deployments": [{"name": "Y"}]}]
    }
    assert problems(config) == []
