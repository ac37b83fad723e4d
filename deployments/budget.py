"""Spend budgets per API key, user and tenant, daily and monthly, that do not overshoot.

Before the call the request's worst-case cost is reserved against every budget
that applies to it, all or none, in one Lua round trip; after the call the
reservation is settled to the actual cost (or released at zero when the call
failed). A request is admitted only if spent + held + its reservation fits,
so concurrent requests cannot jointly exceed a budget; only a request whose
actual cost beats its reservation (an under-estimated prompt, no max_tokens)
can overshoot, by that one request's excess.

Holds expire (``hold_ttl_s``) so a crashed replica's reservations come back.
Amounts are integer picodollars; the server's clock picks the day and month.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from importlib.resources import files
from typing import Literal

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import RedisError

from deployments.cost import format_usd, from_pico, to_pico
from deployments.script_batch import ScriptBatch
from deployments.store_errors import STORE_AWAY, backoff_s
from serve_app.errors import InsufficientQuotaError, StoreUnavailableError

log = logging.getLogger(__name__)

Scope = Literal["key", "user", "tenant"]
Period = Literal["daily", "monthly"]
_PERIOD_TTL_MS = {"daily": 2 * 86_400_000, "monthly": 63 * 86_400_000}


# Far above any real budget, and within what a budget is counted in: picodollars, as
# Decimals of 28 digits (1e17 USD was 29, and every request it applied to a 500).
MAX_BUDGET_USD = Decimal(10**9)


class BudgetLimit(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    daily_usd: Decimal | None = Field(default=None, ge=0, le=MAX_BUDGET_USD)
    monthly_usd: Decimal | None = Field(default=None, ge=0, le=MAX_BUDGET_USD)


class BudgetSettings(BaseModel):
    """``args.budgets`` in config.yaml. A subject without an entry gets its scope's default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    keys: dict[str, BudgetLimit] = Field(default_factory=dict)  # by key id
    users: dict[str, BudgetLimit] = Field(default_factory=dict)  # by user, within a tenant
    tenants: dict[str, BudgetLimit] = Field(default_factory=dict)
    default_key: BudgetLimit | None = None
    default_user: BudgetLimit | None = None
    default_tenant: BudgetLimit | None = None
    soft_thresholds: tuple[float, ...] = (0.8,)  # fractions of a budget that raise an event once
    status_code: Literal[429, 402] = 429
    hold_ttl_s: float = Field(default=900.0, gt=0)  # longer than the longest request
    fail_open: bool = False  # admit (unbudgeted) when Redis is down, instead of a 503
    key_prefix: str = "budget"

    @property
    def budgets_anything(self) -> bool:
        """Some budget may apply to some request."""
        defaults = (self.default_key, self.default_user, self.default_tenant)
        return bool(self.keys or self.users or self.tenants) or any(defaults)


@dataclass(frozen=True, slots=True)
class BudgetRef:
    scope: Scope
    subject: str
    period: Period
    limit_pico: int
    hash_key: str
    zset_key: str
    tenant: str = ""  # the hash tag of its keys; a user's budget is per tenant


@dataclass(slots=True)
class Reservation:
    request_id: str
    amount_pico: int
    budgets: tuple[BudgetRef, ...]
    settled: bool = False

    @property
    def amount(self) -> Decimal:
        return from_pico(self.amount_pico)


@dataclass(frozen=True, slots=True)
class BudgetEvent:
    """A soft threshold crossed for the first time in a period (once across replicas)."""

    scope: Scope
    subject: str
    period: Period
    threshold: float
    spent: Decimal
    limit: Decimal


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    scope: Scope
    subject: str
    period: Period
    limit: Decimal
    spent: Decimal
    held: Decimal
    tenant: str = ""

    @property
    def remaining(self) -> Decimal:
        return max(Decimal(0), self.limit - self.spent - self.held)


# Whose budgets: tenant, key id, end user, and the key's own budget (None: the configured).
Subject = tuple[str, str, str | None, BudgetLimit | None]


def period_ids(now_s: float) -> tuple[str, str]:
    moment = datetime.fromtimestamp(now_s, UTC)
    return moment.strftime("d%Y%m%d"), moment.strftime("m%Y%m")


def _script(name: str) -> str:
    return files("deployments").joinpath(name).read_text()


@dataclass
class BudgetGuard:
    """Reserve / settle / release against the budgets that apply to a request."""

    redis: aioredis.Redis
    settings: BudgetSettings = field(default_factory=BudgetSettings)
    clock: Callable[[], float] = time.time
    on_threshold: Callable[[BudgetEvent], None] | None = None

    def __post_init__(self) -> None:
        # Concurrent requests' calls share one round trip (next loop turn, no timer).
        self._reserve = ScriptBatch(self.redis, _script("budget_reserve.lua"), window_s=0)
        self._settle = ScriptBatch(self.redis, _script("budget_settle.lua"), window_s=0)
        self._periods = period_ids(self.clock())
        self.closing = False  # set at shutdown: settles stop waiting for the store

    def applicable(
        self,
        tenant: str,
        key_id: str,
        user: str | None,
        periods: tuple[str, str] | None = None,
        key_budget: BudgetLimit | None = None,
    ) -> tuple[BudgetRef, ...]:
        """``key_budget``: the key's own (made with it at run time), instead of the
        configured one."""
        day, month = periods or period_ids(self.clock())
        s = self.settings
        subjects: list[tuple[Scope, str, BudgetLimit | None]] = [
            ("key", key_id, key_budget or s.keys.get(key_id, s.default_key)),
            ("tenant", tenant, s.tenants.get(tenant, s.default_tenant)),
        ]
        if user:
            subjects.insert(1, ("user", user, s.users.get(user, s.default_user)))
        refs = []
        for scope, subject, limit in subjects:
            if limit is None:
                continue
            for period, usd, pid in (
                ("daily", limit.daily_usd, day),
                ("monthly", limit.monthly_usd, month),
            ):
                if usd is None:
                    continue
                base = f"{s.key_prefix}:{{{tenant}}}:{scope}:{subject}:{pid}"
                refs.append(
                    BudgetRef(  # type: ignore[arg-type]
                        scope, subject, period, to_pico(usd), base, base + ":inflight", tenant
                    )
                )
        return tuple(refs)

    async def reserve(
        self,
        request_id: str,
        *,
        tenant: str,
        key_id: str,
        user: str | None,
        amount: Decimal,
        key_budget: BudgetLimit | None = None,
    ) -> Reservation:
        """Hold ``amount`` on every applicable budget, or raise ``InsufficientQuotaError``."""
        amount_pico = to_pico(amount)
        periods = self._periods
        for _ in range(2):  # a second try only if the server's day differs from ours
            refs = self.applicable(tenant, key_id, user, periods, key_budget)
            if not refs:
                return Reservation(request_id, amount_pico, ())
            reply = await self._run_reserve(request_id, amount_pico, refs, periods)
            if reply is None:
                return Reservation(request_id, amount_pico, ())
            if int(reply[0]) == 1:
                self._periods = periods
                return Reservation(request_id, amount_pico, refs)
            if int(reply[0]) == 0:
                raise self._exhausted(refs[int(reply[1]) - 1], reply[2], reply[3], amount_pico)
            periods = (_text(reply[1]), _text(reply[2]))
        raise StoreUnavailableError("budget periods disagree with the store's clock")

    async def _run_reserve(
        self,
        request_id: str,
        amount_pico: int,
        refs: tuple[BudgetRef, ...],
        periods: tuple[str, str],
    ) -> list[object] | None:
        keys = [k for ref in refs for k in (ref.hash_key, ref.zset_key)]
        args: list[str | int] = [
            request_id,
            amount_pico,
            int(self.settings.hold_ttl_s * 1000),
            *periods,
        ]
        for ref in refs:
            args += [ref.limit_pico, ref.period[0], _PERIOD_TTL_MS[ref.period]]
        try:
            return await self._reserve(keys=keys, args=args)
        except RedisError as exc:
            if self.settings.fail_open:
                log.warning("budget store unavailable, admitting unbudgeted: %s", exc)
                return None
            raise StoreUnavailableError(f"budget store unavailable: {exc}") from exc

    def _exhausted(
        self, ref: BudgetRef, spent: object, held: object, amount_pico: int
    ) -> InsufficientQuotaError:
        spent_usd = from_pico(int(_text(spent)))
        held_usd = from_pico(int(_text(held)))
        message = (
            f"{ref.period.capitalize()} budget of {ref.scope} {ref.subject!r} exhausted: "
            f"limit ${format_usd(from_pico(ref.limit_pico))}, spent ${format_usd(spent_usd)}, "
            f"in flight ${format_usd(held_usd)}, this request may cost up to "
            f"${format_usd(from_pico(amount_pico))}."
        )
        return InsufficientQuotaError(
            message, status_code=self.settings.status_code, headers={"x-should-retry": "false"}
        )

    async def renew(self, reservation: Reservation) -> None:
        """Its holds last ``hold_ttl_s`` again from now (a stream still running); a hold
        settled or swept stays so. The replica's clock, not the store's: they differ by
        far less than a hold lasts."""
        if reservation.settled or not reservation.budgets:
            return
        expires = int((time.time() + self.settings.hold_ttl_s) * 1000)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for ref in reservation.budgets:
                    pipe.zadd(ref.zset_key, {reservation.request_id: expires}, xx=True)
                await pipe.execute()
        except RedisError:  # the next renewal tries again
            log.warning("budget hold of %s not renewed", reservation.request_id)

    async def settle(self, reservation: Reservation, actual: Decimal) -> list[BudgetEvent]:
        """Charge ``actual`` and free the hold. Only the first settle of a reservation counts."""
        if reservation.settled or not reservation.budgets:
            reservation.settled = True
            return []
        reservation.settled = True
        refs = reservation.budgets
        permille = [round(t * 1000) for t in self.settings.soft_thresholds]
        keys = [k for ref in refs for k in (ref.hash_key, ref.zset_key)]
        args = [reservation.request_id, to_pico(actual), "0", len(permille), *permille]
        args += [ref.limit_pico for ref in refs]
        reply = await self._settle_retrying(keys, args)
        events = [
            BudgetEvent(
                scope=refs[int(reply[i]) - 1].scope,
                subject=refs[int(reply[i]) - 1].subject,
                period=refs[int(reply[i]) - 1].period,
                threshold=int(reply[i + 1]) / 1000,
                spent=from_pico(int(_text(reply[i + 2]))),
                limit=from_pico(refs[int(reply[i]) - 1].limit_pico),
            )
            for i in range(0, len(reply), 3)
        ]
        if self.on_threshold is not None:
            for event in events:
                self.on_threshold(event)
        return events

    async def _settle_retrying(self, keys: list[str], args: list[str | int]) -> list[object]:
        """While the store is unreachable, a settle is tried again until its hold would have
        expired: dropped, the request's spend would be missing from its budgets for good.
        A retry (ARGV[3] = '1') charges only budgets still holding the request: the lost
        attempt may have run."""
        give_up_at = time.monotonic() + self.settings.hold_ttl_s
        attempt = 0
        while True:
            try:
                return list(await self._settle(keys=keys, args=args))
            except STORE_AWAY as exc:
                if self.closing or time.monotonic() + backoff_s(attempt) > give_up_at:
                    raise StoreUnavailableError(f"budget store unavailable: {exc}") from exc
            except RedisError as exc:
                raise StoreUnavailableError(f"budget store unavailable: {exc}") from exc
            args[2] = "1"
            await asyncio.sleep(backoff_s(attempt))
            attempt += 1

    async def release(self, reservation: Reservation) -> None:
        """The call failed before costing anything: give the hold back."""
        await self.settle(reservation, Decimal(0))

    async def status(
        self,
        tenant: str,
        key_id: str,
        user: str | None = None,
        key_budget: BudgetLimit | None = None,
    ) -> list[BudgetStatus]:
        """Spent, held and remaining for each budget that applies (metrics, burn-rate rule)."""
        refs = self.applicable(tenant, key_id, user, self._periods, key_budget)
        return await self._read(refs)

    async def statuses(self, subjects: Iterable[Subject]) -> list[BudgetStatus]:
        """Each budget that applies to any of ``subjects`` (tenant, key id, user, the key's
        own budget), once, in the periods of this replica's clock (so a new day shows up
        without a request)."""
        periods = period_ids(self.clock())
        refs = {
            ref.hash_key: ref
            for tenant, key_id, user, key_budget in subjects
            for ref in self.applicable(tenant, key_id, user, periods, key_budget)
        }
        return await self._read(tuple(refs.values()))

    async def _read(self, refs: tuple[BudgetRef, ...]) -> list[BudgetStatus]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for ref in refs:
                pipe.hmget(ref.hash_key, "spent", "held")
            replies = await pipe.execute()
        return [
            BudgetStatus(
                scope=ref.scope,
                subject=ref.subject,
                period=ref.period,
                limit=from_pico(ref.limit_pico),
                spent=from_pico(int(_text(spent or b"0"))),
                held=from_pico(int(_text(held or b"0"))),
                tenant=ref.tenant,
            )
            for ref, (spent, held) in zip(refs, replies, strict=True)
        ]


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
