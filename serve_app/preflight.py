"""Checks a Serve config file before ``make run`` starts Ray.

Two mistakes otherwise surface only in the Serve controller's log, while the
gateway never answers: arguments that do not validate, and settings under
``deployments:`` for a deployment the application does not build (Serve refuses
the whole application; ``semantic_cache.enabled: false`` leaves no
``SemanticCacheDeployment``). Applications this package does not build are not
checked.

    python -m serve_app.preflight config.yaml    # exit 1 with the problems on stderr
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from serve_app.app import GatewayIngress, MockProviderIngress, SemanticCacheDeployment
from serve_app.mock_provider import MockConfig
from serve_app.settings import GatewayArgs


def _gateway(args: dict[str, Any]) -> set[str]:
    parsed = GatewayArgs.model_validate(args)
    names = {GatewayIngress.name}
    if parsed.semantic_cache.enabled:
        names.add(SemanticCacheDeployment.name)
    return names


def _mock(args: dict[str, Any]) -> set[str]:
    MockConfig.model_validate(args)
    return {MockProviderIngress.name}


_BUILDERS: dict[str, Callable[[dict[str, Any]], set[str]]] = {
    "serve_app.app:build_app": _gateway,
    "serve_app.app:build_mock": _mock,
}


def problems(config: dict[str, Any]) -> list[str]:
    found: list[str] = []
    for app in config.get("applications") or []:
        name = app.get("name", "?")
        builder = _BUILDERS.get(app.get("import_path", ""))
        if builder is None:
            continue
        try:
            deployments = builder(app.get("args") or {})
        except ValidationError as exc:
            found.append(f"application '{name}': its args do not validate:\n{exc}")
            continue
        for entry in app.get("deployments") or []:
            if entry.get("name") not in deployments:
                found.append(
                    f"application '{name}' has no deployment '{entry.get('name')}' (it has "
                    f"{', '.join(sorted(deployments))}): delete its entry under `deployments:`"
                    " (Serve would refuse the whole application)"
                )
    return found


def main(argv: list[str]) -> int:
    path = Path(argv[0] if argv else "config.yaml")
    found = problems(yaml.safe_load(path.read_text()))
    for problem in found:
        print(f"{path}: {problem}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
