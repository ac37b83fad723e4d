"""What a request cost, from the usage the provider reported.

OpenAI's ``usage`` counts cached tokens inside ``prompt_tokens`` and reasoning
tokens inside ``completion_tokens``, so each is billed once: the uncached rest
of the prompt at the input rate, cached tokens at the cached rate, the visible
completion at the output rate, reasoning tokens at the reasoning rate. A
streamed answer is billed from its final usage chunk, so it costs exactly what
the same answer unstreamed costs. Without usage the tokens are estimated and the
charge is marked ``estimated``.

Money is exact: Decimals in USD, and integer picodollars (1e-12 USD) where
Redis adds it up, so the ledger's sums equal the sum of its records.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from deployments.pricing import Price, PriceBook, PricingSettings
from deployments.tokens import estimate_text_tokens, reported_counts, reported_detail

PICO = Decimal("1e-12")
MILLION = Decimal(1_000_000)
COST_HEADER = "x-request-cost"

ServedBy = Literal["upstream", "cache", "semantic_cache", "coalesced"]


def to_pico(usd: Decimal) -> int:
    return int(usd.quantize(PICO, rounding=ROUND_HALF_EVEN).scaleb(12))


def from_pico(pico: int) -> Decimal:
    return Decimal(pico).scaleb(-12)


def format_usd(usd: Decimal) -> str:
    """A plain decimal string (no exponent, no trailing zeros): the header's format."""
    text = f"{usd.normalize():f}"
    return "0" if text in ("-0", "0") else text


@dataclass(frozen=True, slots=True)
class TokenUsage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # part of prompt_tokens
    reasoning_tokens: int = 0  # part of completion_tokens

    @classmethod
    def from_openai(cls, usage: Mapping[str, Any] | None) -> TokenUsage | None:
        """Chat's and text completions' ``usage``, or the Responses API's, which names
        the same counts ``input_tokens`` and ``output_tokens``, or a rerank's (vLLM's,
        Jina's), which has only ``total_tokens``. None: it reports no count."""
        counts = reported_counts(usage)
        if counts is None or usage is None:
            return None
        prompt_tokens, completion_tokens, names = counts
        completion = "completion" if names == "prompt" else "output"
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cached_tokens=reported_detail(usage, f"{names}_tokens", "cached_tokens"),
            reasoning_tokens=reported_detail(usage, f"{completion}_tokens", "reasoning_tokens"),
        )


@dataclass(frozen=True, slots=True)
class CostBreakdown:
    input: Decimal
    cached_input: Decimal
    output: Decimal
    reasoning: Decimal

    @property
    def total(self) -> Decimal:
        return self.input + self.cached_input + self.output + self.reasoning


def cost_of(usage: TokenUsage, price: Price) -> CostBreakdown:
    rates = price.rates_for(usage.prompt_tokens)
    cached = min(usage.cached_tokens, usage.prompt_tokens)
    reasoning = min(usage.reasoning_tokens, usage.completion_tokens)
    return CostBreakdown(
        input=(usage.prompt_tokens - cached) * rates.input / MILLION,
        cached_input=cached * rates.cached_or_input / MILLION,
        output=(usage.completion_tokens - reasoning) * rates.output / MILLION,
        reasoning=reasoning * rates.reasoning_or_output / MILLION,
    )


def worst_case_cost(price: Price, prompt_tokens: int, max_tokens: int) -> Decimal:
    """The most a call can cost: the whole prompt uncached, every output token at the
    dearer of the output and reasoning rates."""
    rates = price.rates_for(prompt_tokens)
    output_rate = max(rates.output, rates.reasoning_or_output)
    return (prompt_tokens * rates.input + max_tokens * output_rate) / MILLION


@dataclass(slots=True, unsafe_hash=True)  # not frozen for a cheaper init; never mutated
class Charge:
    """One request's bill. ``cost`` is what was paid upstream (zero when the answer came
    from the cache or a coalesced leader); ``savings`` what such an answer would have cost."""

    usage: TokenUsage
    breakdown: CostBreakdown
    cost: Decimal
    savings: Decimal
    price: Price
    estimated: bool
    served_by: ServedBy

    @property
    def cost_pico(self) -> int:
        return to_pico(self.cost)

    @property
    def savings_pico(self) -> int:
        return to_pico(self.savings)

    def header_value(self) -> str:
        return format_usd(self.cost)

    def usage_fields(self) -> dict[str, Any]:
        """Extra ``usage`` fields: the final stream chunk's (and the body's) cost."""
        return {
            "cost": format_usd(self.cost),
            "cost_details": {
                "input": format_usd(self.breakdown.input),
                "cached_input": format_usd(self.breakdown.cached_input),
                "output": format_usd(self.breakdown.output),
                "reasoning": format_usd(self.breakdown.reasoning),
                "savings": format_usd(self.savings),
                "estimated": self.estimated,
                "price": self.price.label,
            },
        }


class CostSettings(BaseModel):
    """``args.cost`` in config.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pricing: PricingSettings = Field(default_factory=PricingSettings)
    # Output tokens assumed by a reservation when the request sets no max_tokens.
    default_max_tokens: int = Field(default=4096, ge=1)
    header: str = COST_HEADER


class CostMeter:
    """Turns usage into a ``Charge`` and prices reservations."""

    def __init__(self, settings: CostSettings | None = None, book: PriceBook | None = None) -> None:
        self.settings = settings or CostSettings()
        self.book = book or PriceBook(self.settings.pricing)

    def reservation(
        self,
        model: str,
        prompt_tokens_estimate: int,
        max_tokens: int | None,
        *,
        choices: int = 1,
        provider: str | None = None,
        served_models: Sequence[str] = (),
    ) -> Decimal:
        """The most the call may cost, whichever of ``served_models`` answers it (each is
        billed at its own price when it has one, see ``charge``): ``choices``
        completions of up to ``max_tokens`` each."""
        prices = [
            price
            for name in dict.fromkeys((model, *served_models))
            if (price := self.book.find(name, provider=provider)) is not None
        ]
        if not prices:  # priced nowhere: billed at zero with a warning, or refused
            prices = [self.book.lookup(model, provider=provider)]
        output = max_tokens if max_tokens is not None else self.settings.default_max_tokens
        output *= max(1, choices)
        return max(worst_case_cost(p, prompt_tokens_estimate, output) for p in prices)

    def charge(
        self,
        model: str,
        usage: Mapping[str, Any] | None,
        *,
        prompt_tokens_estimate: int = 0,
        completion_text: str = "",
        served_by: ServedBy = "upstream",
        provider: str | None = None,
        at: datetime | None = None,
        served_model: str | None = None,
    ) -> Charge:
        """``served_model``: the upstream's name of the model that answered (a fallback's
        or a balanced target's), priced when it has a price of its own: a fallback to a
        cheaper model costs what the provider bills. Else ``model``'s price applies (an
        alias such as an Azure deployment name has none of its own)."""
        tokens = TokenUsage.from_openai(usage)
        estimated = tokens is None
        if tokens is None:
            tokens = TokenUsage(
                prompt_tokens=prompt_tokens_estimate,
                completion_tokens=estimate_text_tokens(completion_text),
            )
        price = None
        if served_model and served_model != model:
            price = self.book.find(served_model, provider=provider, at=at)
        if price is None:
            price = self.book.lookup(model, provider=provider, at=at)
        breakdown = cost_of(tokens, price)
        paid = served_by == "upstream"
        return Charge(
            usage=tokens,
            breakdown=breakdown,
            cost=breakdown.total if paid else Decimal(0),
            savings=Decimal(0) if paid else breakdown.total,
            price=price,
            estimated=estimated,
            served_by=served_by,
        )


def request_stream_usage(body: dict[str, Any]) -> bool:
    """Ask the upstream for the final usage chunk of a stream (the bill comes from it).

    Returns whether the client had asked for it itself: if not, the ingress drops the
    usage-only chunk (empty ``choices``) instead of forwarding it.
    """
    options = dict(body.get("stream_options") or {})
    asked = bool(options.get("include_usage"))
    options["include_usage"] = True
    body["stream_options"] = options
    return asked


def chunk_usage(chunk: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The usage a stream chunk carries (only the final one has any)."""
    usage = chunk.get("usage")
    return usage if isinstance(usage, Mapping) else None
