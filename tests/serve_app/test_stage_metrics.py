"""What the stages report through the metric sink beyond per-request metrics."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal

import pytest
import redis.asyncio as aioredis

from serve_app.settings import GatewayArgs
from serve_app.stages import Stages
from tests.deployments.test_cost_tracker import ctx
from tests.support import gateway_args

pytestmark = pytest.mark.integration


class RecordingSink:
    def __init__(self) -> None:
        self.counts: dict[str, float] = {}
        self.gauges: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def inc(self, name: str, value: float = 1.0, tags: Mapping[str, str] | None = None) -> None:
        self.counts[name] = self.counts.get(name, 0.0) + value

    def observe(self, name: str, value: float, tags: Mapping[str, str] | None = None) -> None:
        pass

    def set(self, name: str, value: float, tags: Mapping[str, str] | None = None) -> None:
        self.gauges[(name, tuple(sorted((tags or {}).items())))] = value

    def flush(self) -> None:
        pass


@dataclass
class _Store:
    redis: aioredis.Redis


async def test_lost_ledger_records_are_counted(
    redis_client: aioredis.Redis, redis_url: str
) -> None:
    sink = RecordingSink()
    stages = Stages.build(
        gateway_args("http://127.0.0.1:9/v1", redis_url), _Store(redis_client), sink
    )  # type: ignore[arg-type]
    stages.sync_metrics()
    assert sink.counts.get("gateway_ledger_dropped_records_total", 0) == 0
    stages.cost.ledger.dropped = 3
    stages.sync_metrics()
    stages.cost.ledger.dropped = 5
    stages.sync_metrics()
    stages.sync_metrics()
    assert sink.counts["gateway_ledger_dropped_records_total"] == 5


async def test_budgets_in_use_are_reported_with_what_is_left(
    redis_client: aioredis.Redis, redis_url: str
) -> None:
    sink = RecordingSink()
    args = gateway_args(
        "http://127.0.0.1:9/v1", redis_url, budgets={"tenants": {"acme": {"daily_usd": "3"}}}
    )
    stages = Stages.build(args, _Store(redis_client), sink)  # type: ignore[arg-type]
    await stages.export_budgets()
    assert sink.gauges == {}  # no request yet
    held = await stages.cost.admit(ctx("r1"))
    await stages.export_budgets()
    tags = (("period", "daily"), ("scope", "tenant"), ("subject", "acme"), ("tenant", "acme"))
    left = sink.gauges[("gateway_budget_remaining_usd", tags)]
    assert left == float(Decimal(3) - held.amount) < 3  # the hold counts until settled
    stages.cost.release(held)
    await stages.cost.aclose()
    await stages.export_budgets()
    assert sink.gauges[("gateway_budget_remaining_usd", tags)] == 3.0


async def test_balancer_picks_are_exported(redis_client: aioredis.Redis, redis_url: str) -> None:
    sink = RecordingSink()
    config = gateway_args("http://127.0.0.1:9/v1", redis_url).model_dump(mode="json")
    targets = [{"upstream": "mock", "model": "a"}, {"upstream": "mock", "model": "b"}]
    config["resilience"]["balance"] = {"mock-gpt": {"targets": targets}}
    args = GatewayArgs.model_validate(config)
    stages = Stages.build(args, _Store(redis_client), sink)  # type: ignore[arg-type]
    for _ in range(7):
        stages.resilience.chain("mock-gpt")
    stages.sync_metrics()
    stages.sync_metrics()
    assert sink.counts["gateway_balancer_picks_total"] == 7
