"""Checks the manifest tests share: Serve config keys, CRD schemas, KEDA's admission rules."""

from __future__ import annotations

import copy
import functools
import types
import typing
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from pydantic import BaseModel, ValidationError
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import ServeDeploySchema

from serve_app.autoscaling_policy import MultiSignalPolicy
from serve_app.settings import GatewayArgs


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _is_list(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_is_list(a) for a in typing.get_args(annotation))
    return False


def unknown_keys(data: Any, model: type[BaseModel], path: str = "") -> list[str]:
    """Keys the model does not declare (Ray's schemas accept typos such as num_replica)."""
    if not isinstance(data, dict):
        return []
    found = []
    fields = model.model_fields
    aliases = {f.alias: name for name, f in fields.items() if f.alias}
    for key, value in data.items():
        name = aliases.get(key, key)
        if name not in fields:
            found.append(f"{path}{key}")
            continue
        annotation = fields[name].annotation
        models = _models_in(annotation)
        if not models:
            continue
        items = value if isinstance(value, list) and _is_list(annotation) else [value]
        for i, item in enumerate(items):
            where = f"{path}{key}[{i}]." if item is not value else f"{path}{key}."
            found += unknown_keys(item, models[0], where)
    return found


def serve_config_errors(config: dict[str, Any]) -> list[str]:
    """Everything wrong with a Serve config file: schema, unknown keys, dict-typed sub-blocks."""
    errors = [f"unknown key {k}" for k in unknown_keys(config, ServeDeploySchema)]
    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as exc:
        errors.append(f"ServeDeploySchema: {exc}")
    for app in config.get("applications", []):
        if app.get("import_path") == "serve_app.app:build_app":
            try:
                GatewayArgs.model_validate(app.get("args", {}))
            except ValidationError as exc:
                errors.append(f"args: {exc}")
        for deployment in app.get("deployments", []):
            errors += _autoscaling_errors(deployment.get("autoscaling_config"))
    return errors


def _autoscaling_errors(block: dict[str, Any] | None) -> list[str]:
    # DeploymentSchema types autoscaling_config as Union[Dict, AutoscalingConfig]: a dict
    # passes unvalidated, so validate it here, and the policy's kwargs against the policy.
    if not block:
        return []
    errors = []
    try:
        AutoscalingConfig.model_validate(block)
    except ValidationError as exc:
        errors.append(f"autoscaling_config: {exc}")
    policy = block.get("policy") or {}
    if policy.get("policy_function", "").startswith("serve_app.autoscaling_policy:"):
        try:
            MultiSignalPolicy(**policy.get("policy_kwargs", {}))
        except (TypeError, ValidationError) as exc:
            errors.append(f"policy_kwargs: {exc}")
    return errors


@functools.cache
def crd_schema(path: Path, version: str) -> dict[str, Any]:
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (spec,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return spec["schema"]["openAPIV3Schema"]


@functools.cache
def strict_validator(path: Path, version: str, subpath: tuple[str, ...] = ()) -> Any:
    """A cached validator of the CRD's (sub)schema with unknown fields rejected."""
    schema = crd_schema(path, version)
    for part in subpath:
        schema = schema["properties"][part]
    return jsonschema.Draft7Validator(strict(schema))


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with unknown fields rejected, as the API server's strict field validation
    does, except where the CRD preserves unknown fields."""
    schema = copy.deepcopy(schema)
    _close(schema)
    return schema


def _close(node: Any) -> None:
    if isinstance(node, list):
        for item in node:
            _close(item)
        return
    if not isinstance(node, dict):
        return
    if (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        node["additionalProperties"] = False
    for value in node.values():
        _close(value)


def keda_admission_errors(scaled_object: dict[str, Any]) -> list[str]:
    """KEDA 2.20's webhook rules the CRD schema cannot express (CheckFallbackValid and bounds)."""
    spec = scaled_object["spec"]
    errors = []
    external = [t for t in spec["triggers"] if t["type"] not in {"cpu", "memory"}]
    modifiers = spec.get("advanced", {}).get("scalingModifiers")
    if spec.get("fallback") and not external and not modifiers:
        errors.append("fallback needs at least one trigger that is not cpu or memory")
    if spec.get("minReplicaCount", 0) > spec.get("maxReplicaCount", 100):
        errors.append("minReplicaCount > maxReplicaCount")
    for trigger in spec["triggers"]:
        if trigger["type"] in {"cpu", "memory"} and trigger.get("metricType") != "Utilization":
            errors.append(f"{trigger['type']} trigger: set metricType Utilization")
    return errors
