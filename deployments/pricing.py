"""Per-token prices: the versioned table shipped in ``genai-prices`` plus overrides from config.

The table is the package's bundled snapshot (pinned by version in pyproject), so
prices are looked up offline: the package's auto-updater, which would fetch a
newer table over the network, is never started. Config overrides come first:
negotiated prices, self-hosted models (per token or free), and the mock models,
which either get rates of their own or borrow a table model's (``price_as``).

Every ``Price`` carries its source and version so a ledger record can say which
price it was billed at. Rates are USD per million tokens, as Decimals.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from importlib.metadata import version as package_version
from typing import Literal

from genai_prices import data_snapshot
from genai_prices.types import ModelPrice, TieredPrices
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

TABLE_SOURCE = "genai-prices"
UNPRICED = "unpriced"
TABLE_VERSION = package_version("genai-prices")
_RATE_KEYS = ("input_mtok", "output_mtok", "cache_read_mtok", "output_reasoning_mtok")
MEMO_ENTRIES = 4096  # prices remembered per (model, provider, day)


@dataclass(frozen=True, slots=True)
class Rates:
    """USD per million tokens. ``None`` cached/reasoning rates bill at the input/output rate."""

    input: Decimal
    output: Decimal
    cached_input: Decimal | None = None
    reasoning: Decimal | None = None

    @property
    def cached_or_input(self) -> Decimal:
        return self.input if self.cached_input is None else self.cached_input

    @property
    def reasoning_or_output(self) -> Decimal:
        return self.output if self.reasoning is None else self.reasoning


@dataclass(frozen=True, slots=True)
class Tier:
    """Rates for every token of a request whose prompt exceeds ``above_prompt_tokens``
    (the providers' "cliff" tiers, e.g. long-context prices)."""

    above_prompt_tokens: int
    rates: Rates


@dataclass(frozen=True, slots=True)
class Price:
    model: str  # the name the price was found under (table id or config name)
    rates: Rates
    source: str  # "genai-prices" | "config" | "unpriced"
    version: str  # the table's package version, or "config"
    tiers: tuple[Tier, ...] = ()  # ascending by threshold

    def rates_for(self, prompt_tokens: int) -> Rates:
        chosen = self.rates
        for tier in self.tiers:
            if prompt_tokens > tier.above_prompt_tokens:
                chosen = tier.rates
        return chosen

    @property
    def label(self) -> str:
        return f"{self.source}@{self.version}:{self.model}"


MAX_RATE = Decimal(10**6)


class PriceOverride(BaseModel):
    """One model's price in config: own rates, or those of a table model (``price_as``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # At most a million USD per million tokens (the priciest models ask hundreds): a
    # rate whose charges a picodollar Decimal cannot hold would fail every call of it.
    input_per_mtok: Decimal | None = Field(default=None, ge=0, le=MAX_RATE)
    output_per_mtok: Decimal | None = Field(default=None, ge=0, le=MAX_RATE)
    cached_input_per_mtok: Decimal | None = Field(default=None, ge=0, le=MAX_RATE)
    reasoning_per_mtok: Decimal | None = Field(default=None, ge=0, le=MAX_RATE)
    price_as: str | None = None  # a model name to look up in the table instead
    provider: str | None = None  # the table provider for price_as, e.g. "openai"

    def rates(self) -> Rates | None:
        if self.input_per_mtok is None and self.output_per_mtok is None:
            return None
        return Rates(
            input=self.input_per_mtok or Decimal(0),
            output=self.output_per_mtok or Decimal(0),
            cached_input=self.cached_input_per_mtok,
            reasoning=self.reasoning_per_mtok,
        )


class PricingSettings(BaseModel):
    """``args.cost.pricing`` in config.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    overrides: dict[str, PriceOverride] = Field(default_factory=dict)
    # Model name -> table provider id, for names the table matches under several providers.
    providers: dict[str, str] = Field(default_factory=dict)
    use_table: bool = True
    # A model found nowhere is billed at zero ("zero", marked source "unpriced") or refused.
    on_unknown_model: Literal["zero", "error"] = "zero"


class UnknownModelPriceError(LookupError):
    pass


class PriceBook:
    """Looks up a model's price: config overrides first, then the table."""

    def __init__(self, settings: PricingSettings | None = None) -> None:
        self.settings = settings or PricingSettings()
        self._cache: dict[tuple[str, str | None, str], Price] = {}  # priced models only
        self._unpriced: set[tuple[str, str | None, str]] = set()  # found to have no price
        self._zeros: dict[str, Price] = {}  # what an unpriced model is billed at (warned once)
        self._today = ("", 0.0)  # (UTC day, epoch second it ends): formatted once a day

    def _day(self, at: datetime | None) -> str:
        if at is not None:
            return at.strftime("%Y-%m-%d")
        now = time.time()
        day, ends = self._today
        if now >= ends:
            day = time.strftime("%Y-%m-%d", time.gmtime(now))
            self._today = (day, now - now % 86_400 + 86_400)
        return day

    def lookup(
        self, model: str, *, provider: str | None = None, at: datetime | None = None
    ) -> Price:
        """The price of ``model`` (public or upstream name) at time ``at`` (default now)."""
        price = self.find(model, provider=provider, at=at)
        return price if price is not None else self._unpriced_price(model)

    def find(
        self, model: str, *, provider: str | None = None, at: datetime | None = None
    ) -> Price | None:
        """Like ``lookup``, but None for a model with no price (no warning, no error)."""
        cache_key = (model, provider, self._day(at))
        if len(self._cache) + len(self._unpriced) >= MEMO_ENTRIES:
            # Wildcard models let clients choose names: what is remembered stays bounded.
            self._cache.clear()
            self._unpriced.clear()
            self._zeros.clear()
        price = self._cache.get(cache_key)
        if price is None and cache_key not in self._unpriced:
            price = self._known(model, provider, at)
            if price is None:
                self._unpriced.add(cache_key)
            else:
                self._cache[cache_key] = price
        return price

    def _known(self, model: str, provider: str | None, at: datetime | None) -> Price | None:
        override = self.settings.overrides.get(model)
        if override is not None:
            rates = override.rates()
            if rates is not None:
                return Price(model=model, rates=rates, source="config", version="config")
            if override.price_as:
                found = self._from_table(override.price_as, override.provider or provider, at)
                if found is not None:
                    return found
        if self.settings.use_table:
            return self._from_table(model, provider or self.settings.providers.get(model), at)
        return None

    def _unpriced_price(self, model: str) -> Price:
        """A model found nowhere: refused, or billed at zero with one warning."""
        if self.settings.on_unknown_model == "error":
            raise UnknownModelPriceError(f"no price for model {model!r}")
        zero = self._zeros.get(model)
        if zero is None:
            log.warning("no price for model %r: billing it at zero", model)
            rates = Rates(Decimal(0), Decimal(0))
            zero = self._zeros[model] = Price(model=model, rates=rates, source=UNPRICED, version="")
        return zero

    def _from_table(self, model: str, provider: str | None, at: datetime | None) -> Price | None:
        snapshot = data_snapshot.get_snapshot()
        try:
            found_provider, info = snapshot.find_provider_model(model, None, provider, None)
        except LookupError:
            return None
        table_price = info.get_prices(at or datetime.now(UTC))
        rates, tiers = _convert(table_price)
        if rates is None:
            return None
        return Price(
            model=f"{found_provider.id}/{info.id}",
            rates=rates,
            source=TABLE_SOURCE,
            version=TABLE_VERSION,
            tiers=tiers,
        )


def _rate_at(value: Decimal | TieredPrices | None, prompt_tokens: int | None) -> Decimal | None:
    if not isinstance(value, TieredPrices):
        return value
    chosen = value.base
    for tier in value.tiers:
        if prompt_tokens is not None and prompt_tokens > tier.start:
            chosen = tier.price
    return chosen


def _rates_at(price: ModelPrice, prompt_tokens: int | None) -> Rates | None:
    values = [_rate_at(getattr(price, key), prompt_tokens) for key in _RATE_KEYS]
    if values[0] is None or values[1] is None:
        return None  # not priced per token (images, audio seconds, ...)
    return Rates(input=values[0], output=values[1], cached_input=values[2], reasoning=values[3])


def _convert(price: ModelPrice) -> tuple[Rates | None, tuple[Tier, ...]]:
    """The table's per-key tiers merged into whole-request tiers at every threshold."""
    starts = sorted(
        {
            tier.start
            for key in _RATE_KEYS
            if isinstance(value := getattr(price, key), TieredPrices)
            for tier in value.tiers
        }
    )
    base = _rates_at(price, None)
    tiers = []
    for start in starts:
        rates = _rates_at(price, start + 1)
        if rates is not None:
            tiers.append(Tier(above_prompt_tokens=start, rates=rates))
    return base, tuple(tiers)
