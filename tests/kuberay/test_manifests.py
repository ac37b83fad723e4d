"""The kuberay/ tree: rendered, then checked against Ray's Serve schema, the Kubernetes schemas
and the KubeRay/KEDA CRDs; a broken copy of each manifest must fail the same checks.

Rendering: ``kuberay/render.py`` (Python, no kubectl needed); when a kubectl is on PATH, the
tests also require ``kubectl kustomize`` to print exactly the same objects.
CRDs: ``shared/crds/`` beside the repo checkout (``../shared/crds``), skipped when absent.
"""

from __future__ import annotations

import copy
import importlib.util
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from serve_app.metrics import DEFINITIONS
from tests.kuberay.schema_checks import (
    keda_admission_errors,
    serve_config_errors,
    strict_validator,
)

REPO = Path(__file__).resolve().parents[2]
KUBERAY = REPO / "kuberay"
CRDS = REPO.parent / "shared" / "crds"
TREES = [KUBERAY / "base", KUBERAY / "overlays" / "with-redis"]
K8S_VERSION = "1.32.0"
NOT_BUILT_IN = {
    "RayService",
    "ScaledObject",
    "PodMonitor",
    "PrometheusRule",
    "VerticalPodAutoscaler",
}
needs_crds = pytest.mark.skipif(
    not CRDS.is_dir(), reason=f"{CRDS} absent: CI lays shared/ beside the repo checkout"
)


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"kuberay_{name}", KUBERAY / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = load("render")
generate = load("generate")


def key(doc: dict[str, Any]) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


@pytest.fixture(scope="module", params=TREES, ids=lambda p: p.name)
def docs(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return render.render(request.param)


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    return copy.deepcopy(found)


def serve_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])


# --- rendering ---


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl on PATH")
@pytest.mark.parametrize("tree", TREES, ids=lambda p: p.name)
def test_python_render_matches_kubectl_kustomize(tree: Path) -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(tree)], capture_output=True, text=True, check=True
    ).stdout
    expected = sorted((d for d in yaml.safe_load_all(out) if d), key=key)
    assert sorted(render.render(tree), key=key) == expected


def test_renderer_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\npatches: []\n")
    with pytest.raises(render.UnsupportedKustomization):
        render.render(tmp_path)


# --- serveConfigV2 is config.yaml ---


def test_rayservice_is_generated_from_current_config_yaml() -> None:
    assert generate.main(["--check"]) == 0, "run: python kuberay/generate.py"


def test_serve_config_equals_config_yaml(docs: list[dict[str, Any]]) -> None:
    assert serve_config(docs) == yaml.safe_load((REPO / "config.yaml").read_text())


def test_serve_config_passes_ray_schema_and_key_check(docs: list[dict[str, Any]]) -> None:
    assert serve_config_errors(serve_config(docs)) == []


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        (lambda c: c["applications"][0]["deployments"][0].update(num_replica=2), "num_replica"),
        (lambda c: c["applications"][0].update(import_pat="x:y"), "import_pat"),
        (lambda c: c["applications"][0]["deployments"][0].update(max_ongoing_requests=-1), "max"),
        (
            lambda c: c["applications"][0]["deployments"][0].update(
                autoscaling_config={"min_replicas": 1, "max_replica": 4}
            ),
            "max_replica",
        ),
        (
            lambda c: c["applications"][0]["deployments"][0].update(
                autoscaling_config={"min_replicas": 5, "max_replicas": 2}
            ),
            "autoscaling_config",
        ),
        (lambda c: c["applications"][0]["args"].update(upstreamz={}), "args"),
        (
            lambda c: c["applications"][0]["deployments"][0].update(
                autoscaling_config={
                    "max_replicas": 4,
                    "policy": {
                        "policy_function": "serve_app.autoscaling_policy:policy",
                        "policy_kwargs": {"cpu_percnt": 70},
                    },
                }
            ),
            "policy_kwargs",
        ),
    ],
)
def test_broken_serve_config_fails(
    docs: list[dict[str, Any]], breakage: Any, expected: str
) -> None:
    config = serve_config(docs)
    breakage(config)
    errors = serve_config_errors(config)
    assert any(expected in e for e in errors), errors


# --- cluster shape ---


def test_cluster_shape(docs: list[dict[str, Any]]) -> None:
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    pin = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray_pin,) = [d for d in pin if d.startswith("ray[")]
    assert cluster["rayVersion"] == ray_pin.split("==")[1]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for group in cluster["workerGroupSpecs"]:
        assert 1 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        for container in group["template"]["spec"]["containers"]:
            assert {"cpu", "memory"} <= set(container["resources"]["requests"])


def test_no_hpa_and_keda_never_targets_ray(docs: list[dict[str, Any]]) -> None:
    assert not [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    target = one(docs, "ScaledObject")["spec"]["scaleTargetRef"]
    assert target["kind"] == "Deployment"
    assert one(docs, "Deployment", target["name"])  # exists in the tree


def test_selectors_use_project_labels_and_match_pods(docs: list[dict[str, Any]]) -> None:
    pods = [
        d["spec"]["template"]["metadata"]["labels"]
        for d in docs
        if d["kind"] in {"Deployment", "StatefulSet"}
    ]
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    pods.append(cluster["headGroupSpec"]["template"]["metadata"]["labels"])
    pods += [g["template"]["metadata"]["labels"] for g in cluster["workerGroupSpecs"]]
    for doc in docs:
        if doc["kind"] == "PodDisruptionBudget":
            selector = doc["spec"]["selector"]
        elif doc["kind"] == "NetworkPolicy":
            selector = doc["spec"]["podSelector"]
        else:
            continue
        assert "ray.io" not in yaml.safe_dump(selector), doc["metadata"]["name"]
        assert any(_matches(selector, labels) for labels in pods), doc["metadata"]["name"]


def _matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        if expr["operator"] == "In" and labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def test_alert_rules_cover_the_slos_and_name_real_metrics(docs: list[dict[str, Any]]) -> None:
    rules = one(docs, "PrometheusRule")["spec"]["groups"]
    alerts = {r["alert"]: r["expr"] for g in rules for r in g["rules"] if "alert" in r}
    for needed in ("P95Latency", "ErrorRate", "BreakerOpen", "Budget", "ErrorBudgetFastBurn"):
        assert any(needed in name for name in alerts), needed
    exported = set()  # as Ray exports them: prefix ray_, histograms as _bucket series
    for name, (kind, *_) in DEFINITIONS.items():
        exported |= {f"ray_{name}_bucket"} if kind == "histogram" else {f"ray_{name}"}
    text = yaml.safe_dump(rules) + yaml.safe_dump(one(docs, "ScaledObject"))
    text += (KUBERAY / "base" / "dashboards" / "llm-gateway.json").read_text()
    for name in set(re.findall(r"\b(?:ray_gateway_\w+|gateway_\w+)", text)):
        assert name in exported, f"{name}: not an exported gateway metric name"


# --- schemas ---


def test_built_in_kinds_validate_strictly(docs: list[dict[str, Any]]) -> None:
    for doc in docs:
        if doc["kind"] not in NOT_BUILT_IN:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize(
    ("kind", "breakage"),
    [
        ("Deployment", lambda d: d["spec"].update(replicas="two")),
        ("NetworkPolicy", lambda d: d["spec"].update(podSelectr={})),
        ("PodDisruptionBudget", lambda d: d["spec"].update(maxUnavailable=[1])),
        ("Secret", lambda d: d.update(stringData={"url": 6379})),
        ("ConfigMap", lambda d: d.update(data={"x": 1})),
        ("Service", lambda d: d["spec"]["ports"][0].update(port="http")),
    ],
)
def test_broken_built_in_kind_fails(docs: list[dict[str, Any]], kind: str, breakage: Any) -> None:
    doc = copy.deepcopy(next(d for d in docs if d["kind"] == kind))
    breakage(doc)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@needs_crds
def test_custom_resources_match_their_crds(docs: list[dict[str, Any]]) -> None:
    service = one(docs, "RayService")
    strict_validator(CRDS / "ray.io_rayservices.yaml", "v1").validate(service)
    cluster = strict_validator(CRDS / "ray.io_rayclusters.yaml", "v1", ("spec",))
    cluster.validate(service["spec"]["rayClusterConfig"])
    scaled = one(docs, "ScaledObject")
    strict_validator(CRDS / "keda.sh_scaledobjects.yaml", "v1alpha1").validate(scaled)
    assert keda_admission_errors(scaled) == []


@needs_crds
@pytest.mark.parametrize(
    ("kind", "crd", "version", "breakage"),
    [
        ("RayService", "ray.io_rayservices.yaml", "v1", lambda d: _worker(d).pop("minReplicas")),
        ("RayService", "ray.io_rayservices.yaml", "v1", lambda d: _worker(d).update(maxReplica=3)),
        (
            "RayService",
            "ray.io_rayservices.yaml",
            "v1",
            lambda d: d["spec"].pop("rayClusterConfig"),
        ),
        (
            "ScaledObject",
            "keda.sh_scaledobjects.yaml",
            "v1alpha1",
            lambda d: d["spec"].pop("triggers"),
        ),
        (
            "ScaledObject",
            "keda.sh_scaledobjects.yaml",
            "v1alpha1",
            lambda d: d["spec"]["fallback"].update(replica=4),
        ),
    ],
)
def test_broken_custom_resource_fails(
    docs: list[dict[str, Any]], kind: str, crd: str, version: str, breakage: Any
) -> None:
    doc = one(docs, kind)
    breakage(doc)
    with pytest.raises(jsonschema.ValidationError):
        strict_validator(CRDS / crd, version).validate(doc)


def _worker(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]


def test_keda_admission_rules_catch_a_fallback_without_external_triggers(
    docs: list[dict[str, Any]],
) -> None:
    scaled = one(docs, "ScaledObject")
    scaled["spec"]["triggers"] = [
        t for t in scaled["spec"]["triggers"] if t["type"] in {"cpu", "memory"}
    ]
    assert keda_admission_errors(scaled)
