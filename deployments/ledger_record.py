"""What one finished request leaves in the cost ledger: its record, built from the
request and its charge, and the aggregate increments it stands for."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from datetime import UTC, datetime
from decimal import Decimal
from functools import lru_cache
from typing import Any

import orjson

from deployments.cost import Charge, from_pico
from serve_app.context import RequestContext

# The aggregates' hash fields, in ``LedgerRecord.values`` order.
FIELDS: tuple[str, ...] = tuple(
    "requests cost_pico savings_pico prompt_tokens completion_tokens cached_tokens"
    " reasoning_tokens cache_hits coalesced estimated errors latency_ms".split()
)
DAY_MS = 86_400_000


# Not frozen: a frozen init sets each of the 22 fields through object.__setattr__,
# 3 us a request more; unsafe_hash keeps it hashable like a frozen one. Never mutate it.
@dataclass(slots=True, unsafe_hash=True)
class LedgerRecord:
    request_id: str
    ts_ms: int  # when the request arrived (epoch ms, UTC)
    tenant: str
    key_id: str
    user: str | None
    model: str  # the public model name asked for
    upstream: str  # which upstream served it ("" when cache/coalesced)
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    cost_pico: int  # paid upstream, picodollars
    savings_pico: int  # avoided by a cache hit or coalescing, picodollars
    price: str  # source@version:model of the price used
    estimated: bool  # tokens estimated: the provider reported no usage
    cache: str = "miss"  # miss | hit | semantic_hit | bypass
    coalesced: bool = False  # answered by another request's upstream call
    latency_ms: int = 0
    status: str = "ok"  # ok | error
    attempts: int = 1  # upstream attempts (retries + 1)
    stream: bool = False
    prompt_fingerprint: str = ""  # normalised-prompt hash: near-duplicate detection
    tags: tuple[str, ...] = ()  # the request's x-gateway-tags (spend by application, feature)
    call_id: str = ""  # RequestContext.call_id, what the record is stored under ("": request_id)

    @property
    def record_id(self) -> str:
        """The record's own id in the ledger, unique where request ids need not be."""
        return self.call_id or self.request_id

    @property
    def cost(self) -> Decimal:
        return from_pico(self.cost_pico)

    @property
    def savings(self) -> Decimal:
        return from_pico(self.savings_pico)

    @property
    def day(self) -> str:
        return _day_name(self.ts_ms // DAY_MS)  # UTC days are whole multiples of DAY_MS

    def to_json(self) -> bytes:
        return orjson.dumps(self)  # orjson reads dataclasses natively (asdict deep-copies)

    @classmethod
    def from_json(cls, raw: bytes | str) -> LedgerRecord:
        # A field a later release added is left out: records outlive a rollback, and
        # replicas of two releases share one ledger during a rolling update.
        fields = {k: v for k, v in orjson.loads(raw).items() if k in RECORD_FIELDS}
        fields["tags"] = tuple(fields.get("tags", ()))  # JSON has lists; the record hashes
        return cls(**fields)

    def increments(self) -> list[tuple[str, int]]:
        """What one record adds to each of its aggregates."""
        return list(zip(FIELDS, self.values(), strict=True))

    def values(self) -> tuple[int, ...]:
        """The increments' values, in ``FIELDS`` order."""
        return (
            1,
            self.cost_pico,
            self.savings_pico,
            self.prompt_tokens,
            self.completion_tokens,
            self.cached_tokens,
            self.reasoning_tokens,
            int(self.cache in ("hit", "semantic_hit")),
            int(self.coalesced),
            int(self.estimated),
            int(self.status != "ok"),
            self.latency_ms,
        )

    def members(self) -> tuple[str, ...]:
        return (self.key_id, self.user or "-", self.tenant, self.model, "*")


@lru_cache(maxsize=64)
def _day_name(day_number: int) -> str:
    return datetime.fromtimestamp(day_number * 86_400, UTC).strftime("%Y-%m-%d")


# A prompt's words: its characters lower-cased where ``str.isalnum``, the rest spacing.
# ASCII text (the usual prompt) maps bytewise; ``\W`` is "not isalnum" except for "_".
_ASCII_WORDS = bytes(
    ord(chr(b).lower()) if chr(b).isalnum() else ord(" ") for b in range(128)
) + bytes(128)
_NOT_ALNUM = re.compile(r"[\W_]+")


def _words(text: str) -> list[bytes]:
    if text.isascii():
        return text.encode().translate(_ASCII_WORDS).split()
    # Lower-case the spaced text at once: the same as character by character, but for the
    # capital sigma, which a whole-string lower() turns into a final sigma at a word's end.
    return _NOT_ALNUM.sub(" ", text).replace("\u03a3", "\u03c3").lower().encode().split()


def prompt_fingerprint(messages: Iterable[Any]) -> str:
    """A hash of the prompt's words, lower-cased, punctuation and spacing dropped: prompts
    that differ only in those count as near-duplicates."""
    words: list[bytes] = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            words += _words(content)
    return hashlib.blake2b(b" ".join(words), digest_size=8).hexdigest() if words else ""


def record_for(
    ctx: RequestContext,
    charge: Charge,
    *,
    ts_ms: int,
    upstream: str = "",
    cache: str = "miss",
    latency_ms: int = 0,
    status: str = "ok",
    attempts: int = 1,
) -> LedgerRecord:
    """The ledger record of a finished request."""
    usage = charge.usage
    return LedgerRecord(
        request_id=ctx.request_id,
        call_id=ctx.call_id,
        ts_ms=ts_ms,
        tenant=ctx.principal.tenant,
        key_id=ctx.principal.key_id,
        user=ctx.user,
        model=ctx.model,
        upstream=upstream,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cached_tokens=usage.cached_tokens,
        reasoning_tokens=usage.reasoning_tokens,
        cost_pico=charge.cost_pico,
        savings_pico=charge.savings_pico,
        price=charge.price.label,
        estimated=charge.estimated,
        cache=cache,
        coalesced=charge.served_by == "coalesced",
        latency_ms=latency_ms,
        status=status,
        attempts=attempts,
        stream=ctx.stream,
        prompt_fingerprint=prompt_fingerprint(ctx.body.get("messages") or ()),
        tags=ctx.tags,
    )


RECORD_FIELDS = frozenset(f.name for f in dataclass_fields(LedgerRecord))
