"""Each rule fires on a synthetic ledger built to trigger it, and stays quiet otherwise."""

from __future__ import annotations

import csv
import io
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from deployments.budget import BudgetStatus
from deployments.cost import CostMeter, to_pico
from deployments.ledger import SummaryRow
from deployments.ledger_record import LedgerRecord
from deployments.pricing import PriceBook
from deployments.recommendations import (
    RecommendationSettings,
    budget_runway,
    cache_opportunity,
    cheaper_model,
    recommendations,
    retry_cost,
    summary_csv,
    summary_json,
)

NOW = datetime(2026, 11, 10, 12, 0, tzinfo=UTC)
NOW_MS = int(NOW.timestamp() * 1000)
METER = CostMeter()


def paid(
    i: int, model: str = "gpt-4o", prompt: int = 100, completion: int = 50, **changes: object
) -> LedgerRecord:
    charge = METER.charge(model, {"prompt_tokens": prompt, "completion_tokens": completion}, at=NOW)
    rec = LedgerRecord(
        request_id=f"r{i}",
        ts_ms=NOW_MS - 1000 * (100 - i),
        tenant="acme",
        key_id="k1",
        user="ann",
        model=model,
        upstream="openai",
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_tokens=0,
        reasoning_tokens=0,
        cost_pico=charge.cost_pico,
        savings_pico=0,
        price=charge.price.label,
        estimated=False,
        prompt_fingerprint=f"fp{i}",
    )
    return replace(rec, **changes)  # type: ignore[arg-type]


def healthy_ledger() -> list[LedgerRecord]:
    """Long prompts on the dear model, distinct prompts, no failures."""
    return [paid(i, prompt=3000, completion=800) for i in range(40)]


def test_healthy_ledger_has_no_recommendations() -> None:
    budgets = [BudgetStatus("key", "k1", "monthly", Decimal(100), Decimal(5), Decimal(0))]
    assert recommendations(healthy_ledger(), budgets, PriceBook(), NOW) == []


def test_cheaper_model_for_short_simple_prompts() -> None:
    records = [paid(i) for i in range(30)] + [paid(100 + i, prompt=3000) for i in range(5)]
    [rec] = cheaper_model(records, PriceBook(), RecommendationSettings())
    # gpt-4o: 100*2.5 + 50*10 = 750 per 1e6; gpt-4o-mini: 100*0.15 + 50*0.6 = 45 per 1e6
    assert rec.subject == "gpt-4o"
    assert rec.figures["alternative_model"] == "gpt-4o-mini"
    assert rec.figures["simple_requests"] == "30"
    assert rec.figures["current_cost_usd"] == "0.0225"
    assert rec.figures["saving_usd"] == "0.02115"


@pytest.mark.parametrize(
    "records",
    [
        [paid(i, prompt=3000) for i in range(30)],  # not simple
        [paid(i) for i in range(10)],  # too few to say
        [paid(i, model="gpt-4o-mini") for i in range(30)],  # already the cheap one
        [paid(i) for i in range(25)]
        + [paid(100 + i, prompt=3000) for i in range(30)],  # a minority
    ],
)
def test_no_cheaper_model_suggestion(records: list[LedgerRecord]) -> None:
    assert cheaper_model(records, PriceBook(), RecommendationSettings()) == []


def test_low_cache_hit_rate_with_many_near_duplicates() -> None:
    records = [paid(i, prompt_fingerprint=f"fp{i % 20}") for i in range(40)]
    [rec] = cache_opportunity(records, RecommendationSettings())
    repeats = sum((r.cost for r in records[20:]), Decimal(0))
    assert rec.figures["near_duplicates"] == "20"
    assert rec.figures["cache_hits"] == "0"
    assert Decimal(rec.figures["avoidable_cost_usd"]) == repeats


def test_no_cache_suggestion_when_the_cache_already_serves_the_repeats() -> None:
    records = [paid(i, prompt_fingerprint=f"fp{i % 20}") for i in range(40)]
    served = records[:20] + [replace(r, cache="hit", cost_pico=0) for r in records[20:]]
    assert cache_opportunity(served, RecommendationSettings()) == []
    assert cache_opportunity(healthy_ledger(), RecommendationSettings()) == []


def test_retry_cost() -> None:
    records = [paid(i) for i in range(20)]
    records += [paid(50 + i, status="error") for i in range(2)]
    records += [paid(60, attempts=3)]
    [rec] = retry_cost(records, PriceBook(), RecommendationSettings())
    one = to_pico(Decimal("0.00075"))  # one gpt-4o request of 100 + 50 tokens
    assert Decimal(rec.figures["failed_cost_usd"]) == Decimal(2 * one).scaleb(-12)
    assert rec.figures["resent_prompt_cost_usd"] == "0.0005"  # 2 extra attempts * 100 * 2.5e-6
    assert rec.figures["failed_requests"] == "2" and rec.figures["retried_requests"] == "1"
    assert retry_cost([paid(i) for i in range(20)], PriceBook(), RecommendationSettings()) == []


def test_budget_runway_names_the_day_it_runs_out() -> None:
    # 9.5 days into November, $57 of $100 spent: $6/day, $43 left lasts ~7.17 days.
    burning = BudgetStatus("tenant", "acme", "monthly", Decimal(100), Decimal(57), Decimal(0))
    [rec] = budget_runway([burning], NOW)
    assert rec.subject == "tenant:acme:monthly"
    assert rec.figures["burn_usd_per_day"] == "6"
    assert rec.figures["runs_out_at"].startswith("2026-11-17")
    calm = BudgetStatus("tenant", "acme", "monthly", Decimal(100), Decimal(19), Decimal(0))
    assert budget_runway([calm], NOW) == []


def test_daily_budget_runway() -> None:
    # Half the day gone and 60 % spent: it runs out before midnight.
    daily = BudgetStatus("key", "k1", "daily", Decimal(10), Decimal(6), Decimal(0))
    [rec] = budget_runway([daily], NOW)
    assert rec.figures["runs_out_at"] == "2026-11-10T20:00+00:00"


def test_summary_renders_as_json_and_csv() -> None:
    row = SummaryRow("k1", 3, 300, 150, 10, 5, Decimal("0.0123"), Decimal("0.001"), 1, 0, 0, 0, 30)
    [item] = summary_json([row])
    assert item["cost"] == "0.0123" and item["avg_latency_ms"] == 10.0
    [parsed] = list(csv.DictReader(io.StringIO(summary_csv([row]))))
    assert parsed["group"] == "k1" and parsed["cost"] == "0.0123" and parsed["requests"] == "3"
