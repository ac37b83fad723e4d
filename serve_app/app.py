"""The app builders ``config.yaml`` points at, and the thin Ray wrappers.

``serve run config.yaml`` imports ``serve_app.app:build_app`` with the
``args:`` block, which Serve validates against ``GatewayArgs``.
"""

from __future__ import annotations

import gc
from typing import Any

from ray import serve
from ray.serve import Application
from starlette.applications import Starlette

from deployments.budget import BudgetSettings
from deployments.limiter_settings import LimiterSettings
from deployments.semantic_cache import SemanticCacheDeployment
from serve_app.ingress import Gateway
from serve_app.metrics import ServeMetrics
from serve_app.mock_provider import MockBehaviour, MockConfig, create_app
from serve_app.settings import GatewayArgs
from serve_app.stages import HandleSemanticClient


# A log line per request halves a replica's throughput (ray-serve.md): no access log.
@serve.deployment(
    name="Gateway", max_ongoing_requests=256, logging_config={"enable_access_log": False}
)
@serve.ingress()
class GatewayIngress:
    async def __init__(self, args: GatewayArgs | dict[str, Any], semantic: Any = None) -> None:
        # Serve hands bound pydantic arguments over as plain dicts.
        self.gateway = Gateway(
            GatewayArgs.model_validate(args),
            stamp_request_id=False,
            metrics=ServeMetrics(),
            semantic=HandleSemanticClient(semantic) if semantic is not None else None,
        )
        await self.gateway.start()
        # Everything alive now (Ray, pydantic, the stages) lives as long as the replica.
        # Frozen, the cyclic GC stops re-scanning it: a full collection in a replica
        # went from ~85 ms to ~5 ms, ~12 % of its CPU under load (bench/passthrough.py).
        gc.freeze()

    def __serve_build_asgi_app__(self) -> Starlette:
        return self.gateway.asgi()

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """``user_config: {limits: {...}, budgets: {...}}`` changes them without a restart."""
        if "limits" in user_config:
            limits = LimiterSettings.model_validate(user_config["limits"])
            self.gateway.stages.limiter.reconfigure(limits)
        if "budgets" in user_config:
            budgets = BudgetSettings.model_validate(user_config["budgets"])
            self.gateway.stages.cost.reconfigure_budgets(budgets)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        # async: Serve runs a sync hook in a worker thread, started anew under load (py-spy)
        return self.gateway.replica_stats.snapshot()

    async def __del__(self) -> None:
        await self.gateway.aclose()


@serve.deployment(
    name="MockProvider", max_ongoing_requests=1024, logging_config={"enable_access_log": False}
)
@serve.ingress()
class MockProviderIngress:
    def __init__(self, config: MockConfig | dict[str, Any]) -> None:
        self.behaviour = MockBehaviour(MockConfig.model_validate(config))

    def __serve_build_asgi_app__(self) -> Starlette:
        return create_app(self.behaviour)


def build_app(args: GatewayArgs | dict[str, Any]) -> Application:
    """The gateway, and the semantic cache deployment when it is enabled (the only
    stage with a deployment of its own: it embeds text and holds a faiss index)."""
    args = GatewayArgs.model_validate(args)  # config.yaml's args: a bad one fails here, clearly
    semantic = None
    if args.semantic_cache.enabled:
        semantic = SemanticCacheDeployment.bind(args.semantic_cache, args.store)  # type: ignore[attr-defined]
    return GatewayIngress.bind(args, semantic)  # type: ignore[attr-defined]


def build_mock(args: MockConfig) -> Application:
    return MockProviderIngress.bind(args)  # type: ignore[attr-defined]
