"""Spend summaries (JSON, CSV) and recommendations drawn from the ledger.

Every rule is a pure function over ledger records (or budget status) that
returns the figures it rests on, so each can be checked against a synthetic
ledger. Rules:

- ``cheaper_model``: a dear model mostly serving short, simple prompts; the
  saving is re-priced from the recorded usage at the cheaper model's price.
- ``cache``: many near-duplicate prompts (same words, ignoring case and
  punctuation) but few cache hits; the avoidable cost is what the repeats paid.
- ``retries``: spend on requests that failed, plus prompts re-sent on retries.
- ``budget_runway``: at the current burn rate a budget runs out before its
  period ends; the day it runs out.
"""

from __future__ import annotations

import csv
import io
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from deployments.budget import BudgetStatus
from deployments.cost import TokenUsage, cost_of, format_usd
from deployments.ledger import SummaryRow
from deployments.ledger_record import LedgerRecord
from deployments.pricing import PriceBook


class RecommendationSettings(BaseModel):
    """``args.cost.recommendations`` in config.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # A dear model -> the cheaper one to suggest for simple prompts.
    cheaper_models: dict[str, str] = Field(
        default_factory=lambda: {
            "gpt-4o": "gpt-4o-mini",
            "gpt-4.1": "gpt-4.1-mini",
            "o1": "o3-mini",
            "o3": "o4-mini",
            "claude-opus-4-1": "claude-3-5-haiku-latest",
            "claude-sonnet-4-0": "claude-3-5-haiku-latest",
        }
    )
    simple_prompt_tokens: int = 300
    simple_completion_tokens: int = 300
    min_requests: int = 20  # no rule speaks about fewer requests than this
    min_simple_share: float = 0.5
    min_duplicate_share: float = 0.2
    max_hits_per_duplicate: float = 0.5  # "low hit rate": hits below this share of duplicates
    min_retry_cost_share: float = 0.05


@dataclass(frozen=True, slots=True)
class Recommendation:
    rule: str
    subject: str
    message: str
    figures: dict[str, str]


def cheaper_model(
    records: Sequence[LedgerRecord], book: PriceBook, settings: RecommendationSettings
) -> list[Recommendation]:
    by_model: dict[str, list[LedgerRecord]] = defaultdict(list)
    for rec in records:
        if rec.cost_pico > 0 and rec.status == "ok":
            by_model[rec.model].append(rec)
    out = []
    for model, recs in sorted(by_model.items()):
        alternative = settings.cheaper_models.get(model)
        simple = [
            r
            for r in recs
            if r.prompt_tokens <= settings.simple_prompt_tokens
            and r.completion_tokens <= settings.simple_completion_tokens
        ]
        share = len(simple) / len(recs)
        if (
            alternative is None
            or len(simple) < settings.min_requests
            or share < settings.min_simple_share
        ):
            continue
        price = book.lookup(alternative)
        current = sum((r.cost for r in simple), Decimal(0))
        cheaper = sum((cost_of(_usage(r), price).total for r in simple), Decimal(0))
        if cheaper >= current:
            continue
        out.append(
            Recommendation(
                rule="cheaper_model",
                subject=model,
                message=(
                    f"{len(simple)} of {len(recs)} {model} requests are short and simple; "
                    f"{alternative} would have cost ${format_usd(cheaper)} instead of "
                    f"${format_usd(current)}."
                ),
                figures={
                    "requests": str(len(recs)),
                    "simple_requests": str(len(simple)),
                    "simple_share": f"{share:.3f}",
                    "current_cost_usd": format_usd(current),
                    "alternative_model": alternative,
                    "alternative_cost_usd": format_usd(cheaper),
                    "saving_usd": format_usd(current - cheaper),
                    "alternative_price": price.label,
                },
            )
        )
    return out


def cache_opportunity(
    records: Sequence[LedgerRecord], settings: RecommendationSettings
) -> list[Recommendation]:
    if len(records) < settings.min_requests:
        return []
    seen: Counter[str] = Counter()
    avoidable = Decimal(0)
    duplicates = 0
    for rec in sorted(records, key=lambda r: r.ts_ms):
        if not rec.prompt_fingerprint:
            continue
        if seen[rec.prompt_fingerprint]:
            duplicates += 1
            avoidable += rec.cost
        seen[rec.prompt_fingerprint] += 1
    hits = sum(1 for r in records if r.cache in ("hit", "semantic_hit") or r.coalesced)
    share = duplicates / len(records)
    if share < settings.min_duplicate_share or hits >= duplicates * settings.max_hits_per_duplicate:
        return []
    return [
        Recommendation(
            rule="cache",
            subject="*",
            message=(
                f"{duplicates} of {len(records)} requests repeat an earlier prompt but only {hits} "
                f"were answered without an upstream call; caching them would have saved "
                f"${format_usd(avoidable)}."
            ),
            figures={
                "requests": str(len(records)),
                "near_duplicates": str(duplicates),
                "duplicate_share": f"{share:.3f}",
                "cache_hits": str(hits),
                "cache_hit_rate": f"{hits / len(records):.3f}",
                "avoidable_cost_usd": format_usd(avoidable),
            },
        )
    ]


def retry_cost(
    records: Sequence[LedgerRecord], book: PriceBook, settings: RecommendationSettings
) -> list[Recommendation]:
    total = sum((r.cost for r in records), Decimal(0))
    failed = sum((r.cost for r in records if r.status != "ok"), Decimal(0))
    retried = [r for r in records if r.attempts > 1]
    # A retry re-sends the prompt: price each extra attempt's prompt at the model's input rates.
    resent = sum(
        (
            (r.attempts - 1)
            * cost_of(TokenUsage(r.prompt_tokens, 0, r.cached_tokens), book.lookup(r.model)).total
            for r in retried
        ),
        Decimal(0),
    )
    wasted = failed + resent
    if total <= 0 or wasted / total < Decimal(str(settings.min_retry_cost_share)):
        return []
    failures = sum(1 for r in records if r.status != "ok")
    return [
        Recommendation(
            rule="retries",
            subject="*",
            message=(
                f"${format_usd(wasted)} of ${format_usd(total)} went to failed requests "
                f"({failures}) and re-sent prompts ({len(retried)} retried requests)."
            ),
            figures={
                "total_cost_usd": format_usd(total),
                "failed_requests": str(failures),
                "failed_cost_usd": format_usd(failed),
                "retried_requests": str(len(retried)),
                "resent_prompt_cost_usd": format_usd(resent),
                "share": f"{wasted / total:.3f}",
            },
        )
    ]


def _period_bounds(period: str, now: datetime) -> tuple[datetime, datetime]:
    start = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "daily":
        return start, start + timedelta(days=1)
    start = start.replace(day=1)
    end = (start + timedelta(days=32)).replace(day=1)
    return start, end


def budget_runway(budgets: Iterable[BudgetStatus], now: datetime) -> list[Recommendation]:
    out = []
    for b in budgets:
        start, end = _period_bounds(b.period, now)
        elapsed_days = Decimal(str((now - start).total_seconds() / 86_400))
        if b.spent <= 0 or elapsed_days <= 0 or b.limit <= 0:
            continue
        burn = b.spent / elapsed_days  # USD per day
        runs_out = now + timedelta(days=float(b.remaining / burn))
        per_day = burn.quantize(Decimal("0.000001"))
        if runs_out >= end:
            continue
        out.append(
            Recommendation(
                rule="budget_runway",
                subject=f"{b.scope}:{b.subject}:{b.period}",
                message=(
                    f"The {b.period} budget of {b.scope} {b.subject!r} (${format_usd(b.limit)}) "
                    f"runs out on {runs_out:%Y-%m-%d %H:%M} UTC at ${format_usd(per_day)}/day, "
                    f"before the period ends {end:%Y-%m-%d}."
                ),
                figures={
                    "limit_usd": format_usd(b.limit),
                    "spent_usd": format_usd(b.spent),
                    "remaining_usd": format_usd(b.remaining),
                    "burn_usd_per_day": format_usd(per_day),
                    "runs_out_at": runs_out.astimezone(UTC).isoformat(timespec="minutes"),
                    "period_ends_at": end.isoformat(timespec="minutes"),
                },
            )
        )
    return out


def recommendations(
    records: Sequence[LedgerRecord],
    budgets: Iterable[BudgetStatus],
    book: PriceBook,
    now: datetime,
    settings: RecommendationSettings | None = None,
) -> list[Recommendation]:
    s = settings or RecommendationSettings()
    return [
        *cheaper_model(records, book, s),
        *cache_opportunity(records, s),
        *retry_cost(records, book, s),
        *budget_runway(budgets, now),
    ]


def _usage(rec: LedgerRecord) -> TokenUsage:
    return TokenUsage(
        rec.prompt_tokens, rec.completion_tokens, rec.cached_tokens, rec.reasoning_tokens
    )


# -- summary rendering -----------------------------------------------------------------------


def summary_json(rows: Iterable[SummaryRow]) -> list[dict[str, Any]]:
    """Rows as JSON-ready dicts; money as decimal strings (USD)."""
    out = []
    for row in rows:
        item: dict[str, Any] = {}
        for f in fields(row):
            value = getattr(row, f.name)
            item[f.name] = format_usd(value) if isinstance(value, Decimal) else value
        item["avg_latency_ms"] = round(row.avg_latency_ms, 3)
        out.append(item)
    return out


def summary_csv(rows: Iterable[SummaryRow]) -> str:
    items = summary_json(rows)
    buffer = io.StringIO()
    names = [f.name for f in fields(SummaryRow)] + ["avg_latency_ms"]
    writer = csv.DictWriter(buffer, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    writer.writerows(items)
    return buffer.getvalue()
