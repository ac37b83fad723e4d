"""Render a kustomization in Python: the subset this tree uses, for machines without kubectl.

Supported: ``resources`` (files and directories with a kustomization), ``namespace``, and
``configMapGenerator`` with ``files`` and ``disableNameSuffixHash: true``. Anything else is
refused rather than silently ignored. The tests check it against ``kubectl kustomize``.

    python kuberay/render.py kuberay/base
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION = "kustomization.yaml"
SUPPORTED = {"apiVersion", "kind", "namespace", "resources", "configMapGenerator"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}


class UnsupportedKustomization(ValueError):
    pass


def _generated_configmap(base: Path, spec: dict[str, Any]) -> dict[str, Any]:
    options = spec.get("options", {})
    if not options.get("disableNameSuffixHash"):
        raise UnsupportedKustomization("configMapGenerator needs disableNameSuffixHash: true")
    data: dict[str, str] = {}
    for entry in spec.get("files", []):
        key, _, path = entry.partition("=") if "=" in entry else (Path(entry).name, "", entry)
        data[key] = (base / path).read_text()
    metadata: dict[str, Any] = {"name": spec["name"]}
    if options.get("labels"):
        metadata["labels"] = dict(options["labels"])
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data}


def render(directory: Path) -> list[dict[str, Any]]:
    """The documents ``kubectl kustomize directory`` would print (order aside)."""
    spec = yaml.safe_load((directory / KUSTOMIZATION).read_text())
    unknown = set(spec) - SUPPORTED
    if unknown:
        raise UnsupportedKustomization(f"{directory}: unsupported fields {sorted(unknown)}")
    docs: list[dict[str, Any]] = []
    for entry in spec.get("resources", []):
        path = directory / entry
        if path.is_dir():
            docs.extend(render(path))
        else:
            docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    docs.extend(_generated_configmap(directory, g) for g in spec.get("configMapGenerator", []))
    namespace = spec.get("namespace")
    if namespace:
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED:
                doc.setdefault("metadata", {})["namespace"] = namespace
    return docs


def main(argv: list[str]) -> int:
    docs = render(Path(argv[0]))
    sys.stdout.write(yaml.safe_dump_all(docs, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
