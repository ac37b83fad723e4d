"""Golden costs from the pinned genai-prices table, overrides, estimates, streams."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from deployments.cost import (
    CostMeter,
    CostSettings,
    TokenUsage,
    chunk_usage,
    format_usd,
    from_pico,
    request_stream_usage,
    to_pico,
)
from deployments.pricing import (
    MEMO_ENTRIES,
    TABLE_SOURCE,
    PriceBook,
    PriceOverride,
    PricingSettings,
    UnknownModelPriceError,
)

AT = datetime(2026, 11, 1, tzinfo=UTC)


def usage(prompt: int, completion: int, cached: int = 0, reasoning: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    }


def meter(**overrides: PriceOverride) -> CostMeter:
    return CostMeter(CostSettings(pricing=PricingSettings(overrides=overrides)))


@pytest.mark.parametrize(
    ("model", "tokens", "expected"),
    [
        # gpt-4o $2.5 in / $1.25 cached / $10 out: 600*2.5 + 400*1.25 + 500*10 per 1e6
        ("gpt-4o", usage(1000, 500, cached=400), Decimal("0.007")),
        # gpt-4o-mini $0.15 / $0.6: 1234*0.15 + 567*0.6 per 1e6
        ("gpt-4o-mini", usage(1234, 567), Decimal("0.0005253")),
        # o1 $15 / $60, reasoning at the output rate: 1000*15 + (500 + 2500)*60 per 1e6
        ("o1", usage(1000, 3000, reasoning=2500), Decimal("0.195")),
        # o3-mini $1.1 / $0.55 cached / $4.4: 200*1.1 + 800*0.55 + 1500*4.4 per 1e6
        ("o3-mini", usage(1000, 1500, cached=800, reasoning=1200), Decimal("0.00726")),
        # claude sonnet 4 $3 / $0.3 cache read / $15: 500*3 + 1500*0.3 + 100*15 per 1e6
        ("claude-sonnet-4-20250514", usage(2000, 100, cached=1500), Decimal("0.00345")),
        # gemini 2.5 pro above 200k prompt tokens: every token at $2.5 / $15
        ("gemini-2.5-pro", usage(300_000, 10), Decimal("0.75015")),
        ("gemini-2.5-pro", usage(1000, 10), Decimal("0.00135")),
    ],
)
def test_golden_costs_from_the_table(model: str, tokens: dict[str, Any], expected: Decimal) -> None:
    charge = meter().charge(model, tokens, at=AT)
    assert charge.cost == expected
    assert charge.price.source == TABLE_SOURCE
    assert not charge.estimated
    assert charge.cost_pico == to_pico(expected)


def test_negotiated_override_beats_the_table() -> None:
    negotiated = PriceOverride(
        input_per_mtok=Decimal(2), output_per_mtok=Decimal(8), cached_input_per_mtok=Decimal("0.5")
    )
    charge = meter(**{"gpt-4o": negotiated}).charge("gpt-4o", usage(1000, 500, cached=400), at=AT)
    # 600*2 + 400*0.5 + 500*8 per 1e6
    assert charge.cost == Decimal("0.0054")
    assert charge.price.label == "config@config:gpt-4o"


def test_reasoning_rate_override_and_self_hosted_zero() -> None:
    m = meter(
        thinker=PriceOverride(
            input_per_mtok=Decimal(1), output_per_mtok=Decimal(2), reasoning_per_mtok=Decimal(5)
        ),
        llama=PriceOverride(input_per_mtok=Decimal(0), output_per_mtok=Decimal(0)),
    )
    # 100*1 + 300*2 + 700*5 per 1e6
    assert m.charge("thinker", usage(100, 1000, reasoning=700)).cost == Decimal("0.0042")
    free = m.charge("llama", usage(5000, 5000))
    assert free.cost == 0
    assert free.price.source == "config"


def test_mock_model_priced_as_a_table_model() -> None:
    m = meter(**{"mock-gpt": PriceOverride(price_as="gpt-4o-mini", provider="openai")})
    charge = m.charge("mock-gpt", usage(1234, 567), at=AT)
    assert charge.cost == Decimal("0.0005253")
    assert charge.price.label.startswith(f"{TABLE_SOURCE}@") and "gpt-4o-mini" in charge.price.label


def test_unknown_model_is_zero_or_refused() -> None:
    charge = meter().charge("no-such-model-xyz", usage(10, 10))
    assert charge.cost == 0 and charge.price.source == "unpriced"
    strict = PriceBook(PricingSettings(on_unknown_model="error"))
    with pytest.raises(UnknownModelPriceError):
        strict.lookup("no-such-model-xyz")


def test_missing_usage_is_estimated() -> None:
    charge = meter().charge(
        "gpt-4o-mini", None, prompt_tokens_estimate=100, completion_text="x" * 400, at=AT
    )
    assert charge.estimated
    assert (charge.usage.prompt_tokens, charge.usage.completion_tokens) == (100, 100)
    assert charge.cost == Decimal("0.000075")  # 100*0.15 + 100*0.6 per 1e6


def test_cache_hit_costs_nothing_and_records_the_saving() -> None:
    charge = meter().charge("gpt-4o", usage(1000, 500, cached=400), served_by="cache", at=AT)
    assert charge.cost == 0
    assert charge.savings == Decimal("0.007")
    assert charge.header_value() == "0"


def test_stream_costs_the_same_as_the_unstreamed_answer() -> None:
    final = usage(812, 321, cached=256, reasoning=64)
    body = {"id": "c1", "object": "chat.completion", "choices": [], "usage": final}
    chunks: list[dict[str, Any]] = [
        {"id": "c1", "choices": [{"index": 0, "delta": {"content": "Hel"}}], "usage": None},
        {"id": "c1", "choices": [{"index": 0, "delta": {"content": "lo"}}], "usage": None},
        {"id": "c1", "choices": [], "usage": final},
    ]
    streamed_usage = None
    for chunk in chunks:
        streamed_usage = chunk_usage(chunk) or streamed_usage
    m = meter()
    plain = m.charge("o3", body["usage"], at=AT)
    streamed = m.charge("o3", streamed_usage, at=AT)
    assert streamed.cost == plain.cost > 0
    assert streamed.usage_fields() == plain.usage_fields()


def test_request_stream_usage_reports_whether_the_client_asked() -> None:
    body: dict[str, Any] = {"stream": True}
    assert request_stream_usage(body) is False
    assert body["stream_options"] == {"include_usage": True}
    assert request_stream_usage(body) is True


def test_reservation_is_the_worst_case() -> None:
    # o1: 100 prompt tokens at $15 + 1000 output tokens at $60, per 1e6
    assert meter().reservation("o1", 100, 1000) == Decimal("0.0615")
    default = CostMeter(CostSettings(default_max_tokens=10)).reservation("o1", 0, None)
    assert default == Decimal("0.0006")
    # n=3 (or 3 prompts, or best_of=3): three answers of up to 1000 tokens each
    assert meter().reservation("o1", 100, 1000, choices=3) == Decimal("0.1815")
    several = CostMeter(CostSettings(default_max_tokens=10)).reservation("o1", 0, None, choices=2)
    assert several == Decimal("0.0012")


def test_the_model_that_answered_is_billed_at_its_own_price() -> None:
    """A fallback from gpt-4o to gpt-4o-mini costs what the provider bills: mini's price."""
    m = meter()
    fell_back = m.charge("gpt-4o", usage(1234, 567), served_model="gpt-4o-mini", at=AT)
    assert fell_back.cost == Decimal("0.0005253") and "gpt-4o-mini" in fell_back.price.label
    primary = m.charge("gpt-4o", usage(1234, 567), served_model="gpt-4o", at=AT)
    assert primary.cost == m.charge("gpt-4o", usage(1234, 567), at=AT).cost


def test_an_answering_model_with_no_price_of_its_own_is_billed_as_the_public_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An Azure deployment name, or a self-hosted model priced under its public name."""
    m = meter(llama=PriceOverride(input_per_mtok=Decimal(1), output_per_mtok=Decimal(2)))
    charge = m.charge("llama", usage(1_000_000, 1_000_000), served_model="my-llama-deploy")
    assert charge.cost == Decimal(3) and charge.price.source == "config"
    assert "my-llama-deploy" not in caplog.text  # no "billing it at zero" warning
    assert m.book.find("my-llama-deploy") is None  # remembered as unpriced: asked once
    assert m.book.find("llama") is not None
    m.charge("no-such-public-xyz", usage(1, 1), served_model="my-llama-deploy")
    assert "no-such-public-xyz" in caplog.text  # the warning is captured when it is due


def test_a_reservation_holds_the_priciest_model_that_may_answer() -> None:
    m = meter()
    alone = m.reservation("gpt-4o-mini", 100, 1000)
    chain = m.reservation("gpt-4o-mini", 100, 1000, served_models=("gpt-4o-mini", "o1", "nope"))
    assert alone == Decimal("0.000615") and chain == m.reservation("o1", 100, 1000)
    assert m.reservation("o1", 100, 1000, served_models=("gpt-4o-mini",)) == chain


def test_a_hold_for_an_unpriced_public_name_is_priced_by_the_model_it_calls(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A wildcard's match ("openai/o1") or an alias has no price of its own: the hold is the
    upstream model's, with no "billing it at zero" warning, and "error" does not refuse it."""
    m = meter()
    held = m.reservation("openai/o1", 100, 1000, served_models=("o1",))
    assert held == m.reservation("o1", 100, 1000) and "openai/o1" not in caplog.text
    strict = CostMeter(CostSettings(pricing=PricingSettings(on_unknown_model="error")))
    assert strict.reservation("openai/o1", 100, 1000, served_models=("o1",)) == held
    with pytest.raises(UnknownModelPriceError):
        strict.reservation("openai/nothing", 100, 1000, served_models=("nothing",))


def test_the_price_book_remembers_a_bounded_number_of_names() -> None:
    m = meter()
    for i in range(MEMO_ENTRIES + 10):
        assert m.book.find(f"made-up-{i}") is None
    assert len(m.book._unpriced) + len(m.book._cache) <= MEMO_ENTRIES
    assert m.book.find("o1") is not None


def test_money_formats_and_picodollars() -> None:
    assert format_usd(Decimal("1E-7")) == "0.0000001"
    assert format_usd(Decimal("0.0070")) == "0.007"
    assert format_usd(Decimal("12.50")) == "12.5"
    assert format_usd(Decimal("1E+2")) == "100"
    assert to_pico(Decimal("0.0005253")) == 525_300_000
    assert from_pico(525_300_000) == Decimal("0.0005253")


def test_responses_usage_names_the_same_counts_input_and_output() -> None:
    usage = {
        "input_tokens": 120,
        "input_tokens_details": {"cached_tokens": 100},
        "output_tokens": 30,
        "output_tokens_details": {"reasoning_tokens": 10},
        "total_tokens": 150,
    }
    assert TokenUsage.from_openai(usage) == TokenUsage(120, 30, 100, 10)
    assert TokenUsage.from_openai({"output_tokens": 3}) is None
    assert TokenUsage.from_openai({"total_tokens": 56}) == TokenUsage(56, 0)  # a rerank's
    assert TokenUsage.from_openai({"completion_tokens": 10, "total_tokens": 30}) == TokenUsage(
        20, 10
    )


def test_a_rate_or_budget_past_what_picodollars_hold_is_refused() -> None:
    from pydantic import ValidationError

    from deployments.budget import BudgetLimit

    for bad in ({"input_per_mtok": "1e20"}, {"output_per_mtok": "Infinity"}):
        with pytest.raises(ValidationError):
            PriceOverride.model_validate(bad)
    for bad in ({"daily_usd": "1e17"}, {"monthly_usd": "1e400"}, {"daily_usd": "NaN"}):
        with pytest.raises(ValidationError):
            BudgetLimit.model_validate(bad)
    assert BudgetLimit.model_validate({"monthly_usd": "1000000000"}).monthly_usd == 10**9
