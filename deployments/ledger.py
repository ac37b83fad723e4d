"""The cost ledger in Redis: one record per request, and daily aggregates that add up.

Records are written off the answer's path: ``submit`` only puts the record on a
queue, and a background task writes batches (every ``flush_interval_ms`` or
``batch_size`` records) with one Lua call each. The script stores a record only
if its request id is new (no record key yet) and folds it into its aggregates (by key,
user, tenant, model, and the whole day) in the same atomic step, so a replayed
record or a retried batch never counts twice, and each aggregate equals the sum
of its records. ``aclose`` flushes what is queued.

A batch's records mostly share their day and members, so the writer sums their
increments per aggregate in Python (exact integers) and the script applies each
sum once. The sums hold only if every record of the batch is new: the script
checks that first and, when some request ids are already stored (a replay or a
retried batch), writes nothing and returns those ids; the writer drops them and
sends the rest again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from importlib.resources import files
from typing import Any, Literal

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import RedisError

from deployments.cost import from_pico
from deployments.ledger_record import DAY_MS, FIELDS, LedgerRecord
from deployments.store_errors import STORE_AWAY, backoff_s
from deployments.tasks import Background

log = logging.getLogger(__name__)

GroupBy = Literal["key", "user", "tenant", "model", "day", "tag"]
DIMENSIONS: tuple[str, ...] = ("key", "user", "tenant", "model", "all")
_CHUNK = 500  # records per EXISTS or ZADD in the script: its unpack stays under Lua's limit


@dataclass(frozen=True, slots=True)
class SummaryRow:
    group: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    cost: Decimal
    savings: Decimal
    cache_hits: int
    coalesced: int
    estimated: int
    errors: int
    latency_ms_total: int

    @property
    def avg_latency_ms(self) -> float:
        return self.latency_ms_total / self.requests if self.requests else 0.0


class LedgerSettings(BaseModel):
    """``args.cost.ledger`` in config.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key_prefix: str = "ledger:{ledger}"
    flush_interval_ms: int = Field(default=50, ge=1)
    batch_size: int = Field(default=200, ge=1)
    queue_size: int = Field(default=50_000, ge=1)  # beyond this, records are dropped and logged
    record_ttl_days: int = Field(default=90, ge=1)
    aggregate_ttl_days: int = Field(default=400, ge=1)
    write_retries: int = Field(default=5, ge=0)
    writers: int = Field(default=4, ge=1)  # batches written at once


class Ledger:
    """Writes and reads the ledger. ``start()`` the writer; ``aclose()`` flushes it."""

    def __init__(
        self,
        redis: aioredis.Redis,
        settings: LedgerSettings | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.settings = settings or LedgerSettings()
        self.clock = clock
        self.dropped = 0
        self._append = redis.register_script(
            files("deployments").joinpath("ledger_append.lua").read_text()
        )
        self._queue: asyncio.Queue[LedgerRecord | None] = asyncio.Queue(self.settings.queue_size)
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def _key(self, *parts: str) -> str:
        return ":".join((self.settings.key_prefix, *parts))

    # -- writing -------------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="ledger-writer")

    def submit(self, record: LedgerRecord) -> None:
        """Queue a record for the writer; never blocks the answer."""
        try:
            self._queue.put_nowait(record)
        except asyncio.QueueFull:
            self.dropped += 1
            log.error("ledger queue full: dropped record %s", record.record_id)

    async def flush(self) -> None:
        """Wait until everything submitted so far has been written (or given up on)."""
        await self._queue.join()

    async def aclose(self) -> None:
        if self._task is None:
            return
        self._closing = True
        await self._queue.put(None)
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def _run(self) -> None:
        interval = self.settings.flush_interval_ms / 1000
        # Several batches in flight: one at a time, the writer's rate is a batch per round trip,
        # and a round trip stretches with a busy event loop or a distant store (~12 ms per batch
        # of 200 at ~8.5k requests/s in one process: a ceiling only 2x above the load).
        slots = asyncio.Semaphore(self.settings.writers)
        writing = Background(log, "ledger write")
        closing = False
        while not closing:
            await slots.acquire()  # before gathering: a batch that waited for a slot is fuller
            first = await self._queue.get()
            batch = [] if first is None else [first]
            closing = first is None
            if not closing and self._queue.qsize() < self.settings.batch_size - 1:
                await asyncio.sleep(interval)  # the flush timer: let a batch gather
            taken = 1
            while len(batch) < self.settings.batch_size and not self._queue.empty():
                item = self._queue.get_nowait()
                taken += 1
                if item is None:
                    closing = True
                else:
                    batch.append(item)
            writing.spawn(self._write_batch(batch, taken, slots))
        await writing.drain()

    async def _write_batch(
        self, batch: list[LedgerRecord], taken: int, slots: asyncio.Semaphore
    ) -> None:
        try:
            if batch:
                await self._write_retrying(batch)
        finally:
            slots.release()
            for _ in range(taken):
                self._queue.task_done()

    async def _write_retrying(self, batch: list[LedgerRecord]) -> None:
        """Safe to replay: the script skips request ids it already holds. While the store
        is unreachable (down, restarting, loading its data) a batch is kept and tried
        again for as long as the replica runs: the queue behind it is the buffer, and only
        a full queue drops records. An error the store answers with (out of memory, a
        script error) is tried ``write_retries`` times, and so is everything once closing,
        so that neither can hold the writer or a shutdown forever."""
        attempt = 0
        while True:
            try:
                await self.write(batch)
                return
            except RedisError as exc:
                attempt += 1
                away = isinstance(exc, STORE_AWAY)
                if attempt > self.settings.write_retries and (self._closing or not away):
                    self.dropped += len(batch)
                    log.error("ledger write failed, %d records lost: %s", len(batch), exc)
                    return
                if attempt == self.settings.write_retries + 1:
                    log.warning("ledger store unreachable, holding records: %s", exc)
            await asyncio.sleep(backoff_s(attempt))

    async def write(self, records: Iterable[LedgerRecord]) -> int:
        """Write records now, in one Lua call (two or more only when some record ids are
        already stored); returns how many were new. Of records sharing a record id, the
        first one counts."""
        first: dict[str, LedgerRecord] = {}
        for r in records:
            first.setdefault(r.record_id, r)
        batch = list(first.values())
        while batch:
            keys, args = self._append_call(batch)
            result = await self._append(keys=keys, args=args)
            if not isinstance(result, list):
                return int(result)
            # Nothing was written: drop the ids already stored and send the rest again.
            # Each pass drops at least one record, so this ends.
            known = {rid.decode() if isinstance(rid, bytes) else rid for rid in result}
            batch = [r for r in batch if r.record_id not in known]
        return 0

    def _append_call(self, batch: list[LedgerRecord]) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of ledger_append.lua (its header describes them)."""
        aggs = _aggregates(batch)
        days = sorted({day for day, _, _ in aggs})
        rec_prefix = self._key("rec", "")
        keys = [self._key("recs"), self._key("days")]
        keys += [rec_prefix + r.record_id for r in batch]
        keys += [self._key("agg", *group) for group in aggs]
        keys += [self._key("idx", day, dim) for day, dim, _ in aggs]
        args: list[Any] = [
            self.settings.record_ttl_days * DAY_MS,
            self.settings.aggregate_ttl_days * DAY_MS,
            int(self.clock() * 1000) - self.settings.record_ttl_days * DAY_MS,
            len(batch),
            len(aggs),
            len(days),
            len(FIELDS),
            _CHUNK,
            rec_prefix,
            *FIELDS,
        ]
        for day in days:
            args += (day.replace("-", ""), day)
        for r in batch:
            args += (r.to_json(), r.ts_ms)
        for (_, _, member), sums in aggs.items():
            args.append(member)
            args += sums
        return keys, args

    # -- reading -------------------------------------------------------------------------------

    async def get(self, record_id: str) -> LedgerRecord | None:
        """A record by its ``record_id`` (its request's ``call_id``)."""
        raw = await self.redis.get(self._key("rec", record_id))
        return None if raw is None else LedgerRecord.from_json(raw)

    async def records(
        self, since_ms: int, until_ms: int, limit: int = 100_000
    ) -> list[LedgerRecord]:
        ids = await self.redis.zrangebyscore(
            self._key("recs"), since_ms, until_ms, start=0, num=limit
        )
        out: list[LedgerRecord] = []
        for i in range(0, len(ids), 500):
            chunk = [self._key("rec", rid.decode()) for rid in ids[i : i + 500]]
            out += [LedgerRecord.from_json(raw) for raw in await self.redis.mget(chunk) if raw]
        return out

    async def summary(
        self, group_by: GroupBy, since: date, until: date, *, only: str | None = None
    ) -> list[SummaryRow]:
        """Aggregates per group over the days ``since``..``until`` (inclusive), summed;
        ``only``: that one group's (a key's own spend: one read a day, not every key's)."""
        dim = "all" if group_by == "day" else group_by
        lo, hi = int(since.strftime("%Y%m%d")), int(until.strftime("%Y%m%d"))
        days = [d.decode() for d in await self.redis.zrangebyscore(self._key("days"), lo, hi)]
        if only is not None:
            pairs = [(day, only) for day in days]
        else:
            async with self.redis.pipeline(transaction=False) as pipe:
                for day in days:
                    pipe.smembers(self._key("idx", day, dim))
                member_sets = await pipe.execute()
            pairs = [
                (day, m.decode())
                for day, members in zip(days, member_sets, strict=True)
                for m in members
            ]
        async with self.redis.pipeline(transaction=False) as pipe:
            for day, member in pairs:
                pipe.hgetall(self._key("agg", day, dim, member))
            hashes = await pipe.execute()
        totals: dict[str, dict[str, int]] = {}
        for (day, member), fields in zip(pairs, hashes, strict=True):
            if not fields:
                continue  # ``only`` spent nothing that day
            group = day if group_by == "day" else member
            acc = totals.setdefault(group, {})
            for name, value in fields.items():
                acc[name.decode()] = acc.get(name.decode(), 0) + int(value)
        return [_row(group, acc) for group, acc in sorted(totals.items())]


def _row(group: str, acc: dict[str, Any]) -> SummaryRow:
    return SummaryRow(
        group=group,
        requests=acc.get("requests", 0),
        prompt_tokens=acc.get("prompt_tokens", 0),
        completion_tokens=acc.get("completion_tokens", 0),
        cached_tokens=acc.get("cached_tokens", 0),
        reasoning_tokens=acc.get("reasoning_tokens", 0),
        cost=from_pico(acc.get("cost_pico", 0)),
        savings=from_pico(acc.get("savings_pico", 0)),
        cache_hits=acc.get("cache_hits", 0),
        coalesced=acc.get("coalesced", 0),
        estimated=acc.get("estimated", 0),
        errors=acc.get("errors", 0),
        latency_ms_total=acc.get("latency_ms", 0),
    )


def _aggregates(batch: list[LedgerRecord]) -> dict[tuple[str, str, str], list[int]]:
    """The summed increments of a batch per aggregate (day, dimension, member): records
    are grouped by day and members first, so the usual batch (one group) sums cheaply."""
    groups: dict[tuple[Any, ...], list[LedgerRecord]] = {}
    for r in batch:
        key = (r.ts_ms // DAY_MS, r.key_id, r.user, r.tenant, r.model, r.tags)
        groups.setdefault(key, []).append(r)
    aggs: dict[tuple[str, str, str], list[int]] = {}
    for group in groups.values():
        sums = [sum(column) for column in zip(*(r.values() for r in group), strict=True)]
        day, first = group[0].day, group[0]
        members = [*zip(DIMENSIONS, first.members(), strict=True)]
        members += [("tag", tag) for tag in first.tags]  # a request counts under each tag
        for dim, member in members:
            acc = aggs.get((day, dim, member))
            if acc is None:
                aggs[(day, dim, member)] = sums.copy()
            else:
                acc[:] = [a + b for a, b in zip(acc, sums, strict=True)]
    return aggs
