"""The ledger: idempotent batched writes, exact aggregates, flush on close, restarts."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import replace
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis

from deployments.cost import CostMeter, from_pico
from deployments.ledger import Ledger, LedgerSettings
from deployments.ledger_record import FIELDS, LedgerRecord, prompt_fingerprint, record_for
from serve_app.context import Principal, RequestContext
from serve_app.embedded_store import EmbeddedStore
from tests.support import OwnStore

pytestmark = pytest.mark.integration

NOW_MS = int(time.time() * 1000)
DAY_MS = 86_400_000


def record(i: int, **changes: object) -> LedgerRecord:
    base = LedgerRecord(
        request_id=f"req-{i}",
        ts_ms=NOW_MS - (i % 3) * DAY_MS,
        tenant=("acme", "globex")[i % 2],
        key_id=f"key-{i % 4}",
        user=None if i % 5 == 0 else f"user-{i % 3}",
        model=("gpt-4o", "gpt-4o-mini", "o3")[i % 3],
        upstream="openai",
        prompt_tokens=100 + i,
        completion_tokens=50 + i,
        cached_tokens=i % 7,
        reasoning_tokens=i % 2,
        cost_pico=1_234_567 * (i + 1),
        savings_pico=0,
        price="genai-prices@0.2.3:openai/gpt-4o",
        estimated=i % 11 == 0,
        cache="hit" if i % 9 == 0 else "miss",
        latency_ms=10 + i,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def day_of(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d")


async def test_every_grouping_adds_up_to_its_records(redis_client: aioredis.Redis) -> None:
    ledger = Ledger(redis_client)
    records = [record(i) for i in range(60)]
    assert await ledger.write(records[:25]) == 25
    assert await ledger.write(records[25:]) == 35
    since = datetime.fromtimestamp((NOW_MS - 3 * DAY_MS) / 1000, UTC).date()
    until = datetime.now(UTC).date()
    group_of = {
        "key": lambda r: r.key_id,
        "user": lambda r: r.user or "-",
        "tenant": lambda r: r.tenant,
        "model": lambda r: r.model,
        "day": lambda r: r.day,
    }
    for group_by, key in group_of.items():
        expected: dict[str, list[LedgerRecord]] = defaultdict(list)
        for r in records:
            expected[key(r)].append(r)
        rows = await ledger.summary(group_by, since, until)  # type: ignore[arg-type]
        assert {row.group for row in rows} == set(expected), group_by
        for row in rows:
            mine = expected[row.group]
            assert row.requests == len(mine)
            assert row.cost == sum((r.cost for r in mine), Decimal(0))
            assert row.prompt_tokens == sum(r.prompt_tokens for r in mine)
            assert row.cache_hits == sum(r.cache == "hit" for r in mine)
            assert row.estimated == sum(r.estimated for r in mine)
            if group_by != "day":  # one group's own row, read without listing the others
                only = await ledger.summary(group_by, since, until, only=row.group)  # type: ignore[arg-type]
                assert only == [row], group_by
    assert await ledger.summary("key", since, until, only="no-such-key") == []


async def test_spend_adds_up_under_each_tag_a_request_carries(
    redis_client: aioredis.Redis,
) -> None:
    ledger = Ledger(redis_client)
    tag_sets = [("search",), ("search", "env=prod"), (), ("env=prod",), ("search",)]
    records = [record(i, ts_ms=NOW_MS, tags=tags) for i, tags in enumerate(tag_sets)]
    assert await ledger.write(records) == 5
    today = datetime.fromtimestamp(NOW_MS / 1000, UTC).date()
    rows = {row.group: row for row in await ledger.summary("tag", today, today)}
    assert set(rows) == {"search", "env=prod"}  # the untagged request is under no tag
    for tag, row in rows.items():
        mine = [r for r in records if tag in r.tags]
        assert row.requests == len(mine) and row.cost == sum((r.cost for r in mine), Decimal(0))
    assert (await ledger.get("req-1")).tags == ("search", "env=prod")  # type: ignore[union-attr]
    [day] = await ledger.summary("day", today, today)
    assert day.requests == 5  # a request with two tags is still one request


async def test_a_replayed_record_is_not_counted_twice(redis_client: aioredis.Redis) -> None:
    ledger = Ledger(redis_client)
    first = record(1)
    assert await ledger.write([first]) == 1
    assert await ledger.write([first, record(2), replace(first, cost_pico=999)]) == 1
    today = datetime.fromtimestamp(first.ts_ms / 1000, UTC).date()
    [row] = await ledger.summary("day", today, today)
    assert row.requests == 1 and row.cost == first.cost
    assert await ledger.get("req-1") == first


async def test_the_writer_batches_and_close_flushes(redis_client: aioredis.Redis) -> None:
    settings = LedgerSettings(flush_interval_ms=5, batch_size=7)
    ledger = Ledger(redis_client, settings)
    ledger.start()
    for i in range(20):
        ledger.submit(record(i, ts_ms=NOW_MS))
    await ledger.flush()
    assert len(await ledger.records(NOW_MS - 1, NOW_MS + 1)) == 20
    for i in range(20, 45):
        ledger.submit(record(i, ts_ms=NOW_MS))
    await ledger.aclose()  # no flush first: closing must write what is queued
    assert len(await ledger.records(NOW_MS - 1, NOW_MS + 1)) == 45
    assert ledger.dropped == 0


class GatedLedger(Ledger):
    """Holds every write until released, counting how many are in flight at once."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.in_flight = self.most = 0
        self.release = asyncio.Event()

    async def write(self, records: Iterable[LedgerRecord]) -> int:
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            await self.release.wait()
            return await super().write(records)
        finally:
            self.in_flight -= 1


async def test_a_backlog_is_written_by_several_batches_at_once(
    redis_client: aioredis.Redis,
) -> None:
    """One batch at a time, a writer whose round trips stretch falls behind and drops."""
    settings = LedgerSettings(flush_interval_ms=1, batch_size=5, writers=3)
    ledger = GatedLedger(redis_client, settings)
    ledger.start()
    for i in range(40):
        ledger.submit(record(i, ts_ms=NOW_MS))
    for _ in range(200):
        if ledger.most == 3:
            break
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.02)
    assert ledger.most == 3  # as many as allowed, and no more
    ledger.release.set()
    await ledger.aclose()
    assert len(await ledger.records(NOW_MS - 1, NOW_MS + 1)) == 40
    assert ledger.dropped == 0


async def test_a_full_queue_drops_instead_of_blocking(redis_client: aioredis.Redis) -> None:
    ledger = Ledger(redis_client, LedgerSettings(queue_size=3))
    for i in range(5):
        ledger.submit(record(i))
    assert ledger.dropped == 2


async def test_records_survive_a_new_ledger_instance(redis_client: aioredis.Redis) -> None:
    writer = Ledger(redis_client)
    writer.start()
    writer.submit(record(7, ts_ms=NOW_MS))
    await writer.aclose()
    reader = Ledger(redis_client)
    assert await reader.get("req-7") == record(7, ts_ms=NOW_MS)


async def test_records_survive_a_store_crash(tmp_path: Path) -> None:
    store = EmbeddedStore(data_dir=tmp_path / "valkey")
    url = await asyncio.to_thread(store.start)
    try:
        client = aioredis.from_url(url)
        await Ledger(client).write([record(i, ts_ms=NOW_MS) for i in range(5)])
        await client.aclose()
        await asyncio.to_thread(store.kill)  # SIGKILL: no shutdown save, only the append-only file
        await asyncio.to_thread(store.start)
        client = aioredis.from_url(url)
        ledger = Ledger(client)
        assert len(await ledger.records(NOW_MS - 1, NOW_MS + 1)) == 5
        today = datetime.now(UTC).date()
        [row] = await ledger.summary("day", today, today)
        assert row.cost == sum((record(i).cost for i in range(5)), Decimal(0))
        await client.aclose()
    finally:
        await asyncio.to_thread(store.stop)


async def test_records_submitted_while_the_store_is_down_are_written_when_it_is_back(
    own_store: OwnStore,
) -> None:
    """An outage longer than the writer's retries (~1.5 s with write_retries 5) used to
    drop every batch that was being written; they must wait in the queue instead."""
    settings = LedgerSettings(flush_interval_ms=5, batch_size=4, writers=2)
    ledger = Ledger(own_store.client, settings)
    ledger.start()
    try:
        await own_store.kill()
        for i in range(20):
            ledger.submit(record(i, ts_ms=NOW_MS))
            await asyncio.sleep(0.1)  # submitted over 2 s of outage
        await asyncio.sleep(1.5)
        await own_store.start()
        await asyncio.wait_for(ledger.flush(), timeout=15)
        assert ledger.dropped == 0
        assert len(await ledger.records(NOW_MS - 1, NOW_MS + 1)) == 20
    finally:
        await ledger.aclose()


async def test_closing_gives_up_on_a_store_that_stays_down(own_store: OwnStore) -> None:
    ledger = Ledger(own_store.client, LedgerSettings(flush_interval_ms=5, write_retries=2))
    ledger.start()
    await own_store.kill()
    ledger.submit(record(1, ts_ms=NOW_MS))
    await asyncio.sleep(1.0)  # the batch is past its retries, held for the store
    await asyncio.wait_for(ledger.aclose(), timeout=10)  # and closing ends it
    assert ledger.dropped == 1


async def test_record_for_a_finished_request(redis_client: aioredis.Redis) -> None:
    ctx = RequestContext(
        request_id="abc",
        principal=Principal(key_id="k1", tenant="acme"),
        route="chat",
        model="gpt-4o-mini",
        body={"messages": [{"role": "user", "content": "Hello, World!"}]},
        stream=True,
        end_user="ann",
    )
    charge = CostMeter().charge("gpt-4o-mini", {"prompt_tokens": 10, "completion_tokens": 5})
    rec = record_for(ctx, charge, ts_ms=NOW_MS, upstream="openai", latency_ms=12)
    assert (rec.user, rec.tenant, rec.stream, rec.cost_pico) == (
        "ann",
        "acme",
        True,
        charge.cost_pico,
    )
    assert rec.prompt_fingerprint == prompt_fingerprint([{"content": "hello world"}])
    assert await Ledger(redis_client).write([rec]) == 1


def utc_date(ms: int) -> date:
    return datetime.fromtimestamp(ms / 1000, UTC).date()


def same_members(i: int, **changes: object) -> LedgerRecord:
    """The usual batch: one key, user, tenant, model and day; amounts vary."""
    shared = {"ts_ms": NOW_MS, "tenant": "acme", "key_id": "key-1", "user": "ann", "model": "o3"}
    return record(i, **{**shared, **changes})


async def stored_aggregates(redis: aioredis.Redis, prefix: str) -> dict[bytes, dict]:
    """Every aggregate hash and index set under a key prefix, as stored."""
    out: dict[bytes, dict] = {}
    async for key in redis.scan_iter(match=f"{prefix}:agg:*"):
        out[key.removeprefix(prefix.encode())] = await redis.hgetall(key)
    async for key in redis.scan_iter(match=f"{prefix}:idx:*"):
        out[key.removeprefix(prefix.encode())] = {m: b"" for m in await redis.smembers(key)}
    return out


def expected_totals(records: list[LedgerRecord]) -> dict[str, int]:
    return {
        field: sum(value for r in records for name, value in r.increments() if name == field)
        for field in FIELDS
    }


async def test_a_batch_sharing_groups_stores_what_one_by_one_writes_store(
    redis_client: aioredis.Redis,
) -> None:
    # Mostly one group, as under load, plus stragglers sharing only some members, a user
    # None and a user "-" (the same member), and a record from yesterday.
    records = [same_members(i) for i in range(40)]
    records += [same_members(40, user=None), same_members(41, user="-"), same_members(42)]
    records += [same_members(43, model="gpt-4o"), same_members(44, ts_ms=NOW_MS - DAY_MS)]
    records += [record(i) for i in range(45, 60)]
    batched = Ledger(redis_client, LedgerSettings(key_prefix="ledger:{batched}"))
    single = Ledger(redis_client, LedgerSettings(key_prefix="ledger:{single}"))
    assert await batched.write(records) == len(records)
    for r in records:
        assert await single.write([r]) == 1
    assert await stored_aggregates(redis_client, "ledger:{batched}") == await stored_aggregates(
        redis_client, "ledger:{single}"
    )
    [ann] = [
        row
        for row in await batched.summary("user", utc_date(NOW_MS - DAY_MS), utc_date(NOW_MS))
        if row.group == "ann"
    ]
    mine = [r for r in records if r.user == "ann"]
    assert ann.requests == len(mine) and ann.cost == sum((r.cost for r in mine), Decimal(0))


async def test_replayed_and_overlapping_batches_never_count_twice(
    redis_client: aioredis.Redis,
) -> None:
    ledger = Ledger(redis_client)
    first = [same_members(i) for i in range(75)]
    assert await ledger.write(first) == 75
    before = await stored_aggregates(redis_client, "ledger:{ledger}")
    assert await ledger.write(first) == 0  # a retried batch that had in fact been written
    assert await stored_aggregates(redis_client, "ledger:{ledger}") == before
    overlap = first[50:] + [same_members(i, cost_pico=7 * i) for i in range(75, 120)]
    changed = [replace(r, cost_pico=1) for r in first[:10]]  # known ids, other amounts
    assert await ledger.write(changed + overlap + overlap[-5:]) == 45
    kept = first + overlap[25:]
    today = datetime.now(UTC).date()
    [row] = await ledger.summary("key", today, today)
    totals = expected_totals(kept)
    assert row.requests == totals["requests"] == 120
    assert row.cost == from_pico(totals["cost_pico"])
    assert row.latency_ms_total == totals["latency_ms"]
    assert await ledger.get("req-3") == first[3]
    assert len(await ledger.records(NOW_MS - 1, NOW_MS + 1)) == 120


async def test_concurrent_overlapping_batches_count_each_record_once(
    redis_client: aioredis.Redis,
) -> None:
    records = [same_members(i) for i in range(300)]
    writers = [Ledger(redis_client) for _ in range(3)]
    slices = (records[:200], records[100:], records[::2])
    written = await asyncio.gather(*(w.write(s) for w, s in zip(writers, slices, strict=True)))
    assert sum(written) == 300
    today = datetime.now(UTC).date()
    [row] = await writers[0].summary("day", today, today)
    assert (row.requests, row.cost) == (300, sum((r.cost for r in records), Decimal(0)))


async def test_large_batches_and_large_sums_stay_exact(redis_client: aioredis.Redis) -> None:
    # Past the script's chunk of records and past 2**53, where a Lua double would round.
    big = 3 * 10**15 + 1
    records = [same_members(i, cost_pico=big + i, savings_pico=big) for i in range(1_200)]
    ledger = Ledger(redis_client, LedgerSettings(key_prefix="ledger:{big}"))
    assert await ledger.write(records[:700:2]) == 350
    assert await ledger.write(records) == 850
    totals = expected_totals(records)
    assert totals["cost_pico"] > 2**63 // 4000  # far beyond a double's exact integers
    stored = await redis_client.hgetall(f"ledger:{{big}}:agg:{day_of(NOW_MS)}:all:*")
    assert {k.decode(): int(v) for k, v in stored.items()} == totals


def test_days_are_utc_calendar_days() -> None:
    midnight = 1_700_006_400_000  # 2023-11-15T00:00:00Z
    for ts_ms in (midnight - 1, midnight, midnight + DAY_MS - 1, -1, 0):
        assert record(0, ts_ms=ts_ms).day == day_of(ts_ms)


def reference_words(text: str) -> list[str]:
    """The fingerprint's definition, one character at a time."""
    return "".join(ch.lower() if ch.isalnum() else " " for ch in text).split()


def test_the_fingerprint_keeps_its_definition_for_every_character() -> None:
    every = "".join(map(chr, range(0x110000)))
    tricky = ["ΟΔΟΣ ΣΑΣ", "İstanbul", "Straße ǅ ﬁ Ⅻ ²", "a_b\x1fc\u00a0d", "x\u0307Σ.", "", " "]
    for text in [every, *tricky]:
        expected = " ".join(reference_words(text))
        digest = hashlib.blake2b(expected.encode(), digest_size=8).hexdigest()
        assert prompt_fingerprint([{"content": text}]) == (digest if expected else ""), text
    two = [{"content": "Hello,"}, {"role": "user"}, {"content": "ΟΔΟΣ!"}, "not a message"]
    assert prompt_fingerprint(two) == prompt_fingerprint([{"content": "hello οδοσ"}])


def test_a_record_from_a_later_release_reads_without_the_fields_it_added() -> None:
    """Records outlive a rollback, and two releases share the ledger while one rolls out."""
    written = orjson.loads(record(3, tags=("a",)).to_json())
    read = LedgerRecord.from_json(orjson.dumps({**written, "added_later": 1}))
    assert read == record(3, tags=("a",))
