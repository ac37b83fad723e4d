"""Cross-replica single-flight: several RedisSingleFlight instances, each with
its own Redis connection, stand in for ingress replicas."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis

from deployments.dedup import Role
from deployments.dedup_redis import DedupSettings, RedisSingleFlight
from deployments.dedup_wire import VALUE, decode_error, encode_error
from serve_app.embedded_store import free_port
from serve_app.errors import RateLimitError, UpstreamError

FAST = DedupSettings(lock_ttl_s=0.3, poll_s=0.05, deadline_s=5.0, stream_block_ms=50)
# For tests of anything but a lock's lapse: FAST's 0.3 s lapses when a busy host starves
# the heartbeat, and with it the count of the flight's followers.
STEADY = FAST.model_copy(update={"lock_ttl_s": 5.0})


async def _until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Wait for another replica's progress: it arrives over the network, so no
    in-process event can signal it; poll the replica's counters instead."""
    async with asyncio.timeout(timeout_s):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


@pytest.fixture
async def make_replica(
    redis_url: str, redis_client: aioredis.Redis
) -> AsyncIterator[Callable[..., RedisSingleFlight]]:
    made: list[tuple[RedisSingleFlight, aioredis.Redis]] = []

    def make(settings: DedupSettings = FAST) -> RedisSingleFlight:
        client = aioredis.from_url(redis_url)
        replica = RedisSingleFlight(client, settings)
        made.append((replica, client))
        return replica

    yield make
    for replica, client in made:
        await replica.close()
        await client.aclose()


def test_error_round_trip_keeps_class_and_fields() -> None:
    original = UpstreamError(
        "bad", status_code=503, headers={"retry-after": "1"}, upstream_body=b"x"
    )
    copy = decode_error(encode_error(original))
    assert type(copy) is UpstreamError
    assert (copy.message, copy.status_code, copy.headers, copy.upstream_body) == (
        "bad",
        503,
        {"retry-after": "1"},
        b"x",
    )
    limited = decode_error(encode_error(RateLimitError("slow down")))
    assert type(limited) is RateLimitError and limited.status_code == 429
    hidden = decode_error(encode_error(KeyError("internal detail")))
    assert type(hidden) is UpstreamError and "internal" not in hidden.message


@pytest.mark.integration
async def test_twenty_requests_on_four_replicas_make_one_call(
    make_replica: Callable[..., RedisSingleFlight],
) -> None:
    replicas = [make_replica() for _ in range(4)]
    for replica in replicas:
        await replica.start()
    release, calls = asyncio.Event(), 0

    async def upstream() -> bytes:
        nonlocal calls
        calls += 1
        await release.wait()
        return b'{"answer": 42}'

    tasks = [asyncio.create_task(replicas[i % 4].flight("k", upstream)) for i in range(20)]
    await _until(lambda: sum(r.stats.coalesced for r in replicas) == 19)
    release.set()
    flights = await asyncio.gather(*tasks)
    assert calls == 1
    assert {f.value for f in flights} == {b'{"answer": 42}'}
    assert [f.role for f in flights].count(Role.LEADER) == 1
    assert sum(r.stats.upstream_calls_saved for r in replicas) == 19


@pytest.mark.integration
async def test_error_is_shared_across_replicas(
    make_replica: Callable[..., RedisSingleFlight],
) -> None:
    a, b = make_replica(STEADY), make_replica(STEADY)
    await b.start()
    release = asyncio.Event()

    async def failing() -> bytes:
        await release.wait()
        raise UpstreamError("overloaded", status_code=503, upstream_body=b'{"error": {}}')

    leader = asyncio.create_task(a.flight("k", failing))
    await _until(lambda: a.stats.flights == 1)
    follower = asyncio.create_task(b.flight("k", failing))
    await _until(lambda: b.stats.coalesced == 1)
    release.set()
    for task in (leader, follower):
        with pytest.raises(UpstreamError) as caught:
            await task
        assert caught.value.status_code == 503
    assert b.stats.upstream_calls_saved == 1


@pytest.mark.integration
async def test_nothing_cached_after_completion(
    make_replica: Callable[..., RedisSingleFlight],
) -> None:
    a, b = make_replica(), make_replica()
    calls = 0

    async def upstream() -> bytes:
        nonlocal calls
        calls += 1
        return str(calls).encode()

    assert (await a.flight("k", upstream)).value == b"1"
    second = await b.flight("k", upstream)
    assert (second.value, second.role) == (b"2", Role.LEADER)


@pytest.mark.integration
async def test_result_published_before_subscribing_is_found(
    make_replica: Callable[..., RedisSingleFlight], redis_client: aioredis.Redis
) -> None:
    replica = make_replica()
    await redis_client.set("gw:dedup:{k}:lock", "leader", px=60_000)
    await redis_client.set("gw:dedup:{k}:res:leader", VALUE + b"early", px=60_000)

    async def never() -> bytes:
        raise AssertionError("must not go upstream")

    flight = await replica.flight("k", never)
    assert (flight.value, flight.role) == (b"early", Role.FOLLOWER)


@pytest.mark.integration
async def test_dead_leader_is_taken_over_within_lock_ttl(
    make_replica: Callable[..., RedisSingleFlight], redis_client: aioredis.Redis
) -> None:
    replica = make_replica()
    await replica.start()
    # A replica that took the lock and died: nobody renews or publishes.
    await redis_client.set("gw:dedup:{k}:lock", "dead", px=int(FAST.lock_ttl_s * 1000))
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def upstream() -> bytes:
        return b"fresh"

    flight = await replica.flight("k", upstream)
    assert (flight.value, flight.role) == (b"fresh", Role.LEADER)
    assert replica.stats.takeovers == 1
    assert loop.time() - started < FAST.lock_ttl_s + FAST.poll_s + 0.2


@pytest.mark.integration
async def test_live_leader_heartbeat_prevents_takeover(
    make_replica: Callable[..., RedisSingleFlight],
) -> None:
    a, b = make_replica(), make_replica()
    await b.start()
    release, calls = asyncio.Event(), 0

    async def slow() -> bytes:
        nonlocal calls
        calls += 1
        await release.wait()
        return b"done"

    leader = asyncio.create_task(a.flight("k", slow))
    await _until(lambda: calls == 1)
    follower = asyncio.create_task(b.flight("k", slow))
    await asyncio.sleep(FAST.lock_ttl_s * 3)  # several lock lifetimes: renewals must hold it
    release.set()
    assert (await follower).role is Role.FOLLOWER
    assert (await leader).value == b"done"
    assert calls == 1


@pytest.mark.integration
async def test_follower_past_deadline_goes_upstream(
    make_replica: Callable[..., RedisSingleFlight], redis_client: aioredis.Redis
) -> None:
    replica = make_replica(FAST.model_copy(update={"deadline_s": 0.2}))
    await redis_client.set("gw:dedup:{k}:lock", "alive", px=60_000)

    async def upstream() -> bytes:
        return b"own"

    flight = await replica.flight("k", upstream)
    assert (flight.value, flight.role, flight.waited_out) == (b"own", Role.LEADER, True)
    assert replica.stats.waited_out == 1


async def test_redis_down_degrades_to_local() -> None:
    client = aioredis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.2)
    replica = RedisSingleFlight(client, FAST)

    async def upstream() -> bytes:
        return b"ok"

    try:
        flight = await replica.flight("k", upstream)
    finally:
        await replica.close()
        await client.aclose()
    assert (flight.value, flight.role) == (b"ok", Role.LEADER)
    assert replica.stats.store_errors >= 1


async def _gated(parts: list[bytes], gate: asyncio.Event, after: int) -> AsyncIterator[bytes]:
    for i, part in enumerate(parts):
        if i == after:
            await gate.wait()
        yield part


@pytest.mark.integration
async def test_stream_late_joiner_on_another_replica_gets_everything(
    make_replica: Callable[..., RedisSingleFlight],
) -> None:
    a, b = make_replica(), make_replica()
    parts = [b"data: 1\n\n", b"data: 2\n\n", b"data: 3\n\n", b"data: [DONE]\n\n"]
    gate, opened = asyncio.Event(), 0

    def upstream() -> AsyncIterator[bytes]:
        nonlocal opened
        opened += 1
        return _gated(parts, gate, after=2)

    leader = await a.stream("k", upstream)
    head = [await anext(leader.chunks), await anext(leader.chunks)]
    late = await b.stream("k", upstream)
    assert late.role is Role.FOLLOWER
    late_head = [await anext(late.chunks), await anext(late.chunks)]
    gate.set()
    assert head + [c async for c in leader.chunks] == parts
    assert late_head + [c async for c in late.chunks] == parts
    assert opened == 1


@pytest.mark.integration
async def test_stream_error_reaches_remote_follower(
    make_replica: Callable[..., RedisSingleFlight],
) -> None:
    a, b = make_replica(), make_replica()
    gate = asyncio.Event()

    async def failing() -> AsyncIterator[bytes]:
        yield b"first"
        await gate.wait()
        raise UpstreamError("cut off", status_code=502)

    leader = await a.stream("k", failing)
    assert await anext(leader.chunks) == b"first"
    follower = await b.stream("k", failing)
    gate.set()
    for flight in (leader, follower):
        got = []
        with pytest.raises(UpstreamError, match="cut off"):
            async for chunk in flight.chunks:
                got.append(chunk)
        assert got in ([], [b"first"])  # the leader's reader already took "first"


@pytest.mark.integration
async def test_stream_dead_leader_is_taken_over(
    make_replica: Callable[..., RedisSingleFlight], redis_client: aioredis.Redis
) -> None:
    replica = make_replica()
    await redis_client.set("gw:dedup:{k}:slock", "dead", px=int(FAST.lock_ttl_s * 1000))

    async def upstream() -> AsyncIterator[bytes]:
        yield b"a"
        yield b"b"

    flight = await replica.stream("k", upstream)
    assert flight.role is Role.FOLLOWER
    assert [c async for c in flight.chunks] == [b"a", b"b"]
    assert replica.stats.takeovers == 1


@pytest.mark.integration
async def test_a_result_is_written_only_for_followers(
    make_replica: Callable[..., RedisSingleFlight], redis_client: aioredis.Redis
) -> None:
    """Most flights have no follower: writing every answer to Redis for nobody to read cost
    each cacheable miss a copy of its body (and a publish). A follower is counted on the lock."""
    a, b = make_replica(), make_replica()
    await b.start()

    async def alone() -> bytes:
        return b"mine"

    assert (await a.flight("k", alone)).role is Role.LEADER
    assert await redis_client.keys("gw:dedup:{k}*") == []  # no result, lock or count left

    started, release = asyncio.Event(), asyncio.Event()

    async def slow() -> bytes:
        started.set()  # the leader holds the lock by now
        await release.wait()
        return b"shared"

    leader = asyncio.create_task(a.flight("k", slow))
    await started.wait()
    follower = asyncio.create_task(b.flight("k", slow))
    await _until(lambda: b.stats.coalesced == 1)
    release.set()
    assert ((await leader).value, (await follower).value) == (b"shared", b"shared")
    assert (await follower).role is Role.FOLLOWER
    keys = {k.decode() for k in await redis_client.keys("gw:dedup:{k}*")}
    assert len(keys) == 1 and keys.pop().startswith("gw:dedup:{k}:res:")  # lock and count gone


@pytest.mark.integration
async def test_an_acquire_sent_again_finds_its_own_lock(redis_client: aioredis.Redis) -> None:
    """The store client sends a script again when its reply was lost: the lock is the
    caller's own, and no follower is counted (the leader would write its answer for nobody)."""
    from deployments.dedup_redis import _script
    from deployments.dedup_wire import followers_key

    acquire = redis_client.register_script(_script("dedup_acquire.lua"))
    keys = ["gw:dedup:{again}:lock", followers_key("gw:dedup:{again}:lock")]
    first = await acquire(keys=keys, args=["t1", 5000])
    again = await acquire(keys=keys, args=["t1", 5000])
    assert (first[0], first[1]) == (1, b"t1")
    assert (again[0], again[1]) == (1, b"t1") and 0 < again[2] <= 5000
    assert await redis_client.exists(keys[1]) == 0
    other = await acquire(keys=keys, args=["t2", 5000])
    assert (other[0], other[1]) == (0, b"t1")
    assert await redis_client.get(keys[1]) == b"1"


@pytest.mark.integration
async def test_a_stream_left_by_its_replica_goes_on_only_for_other_replicas(
    make_replica: Callable[..., RedisSingleFlight], redis_client: aioredis.Redis
) -> None:
    parts = [b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n"]
    for followed in (True, False):
        a, b = make_replica(STEADY), make_replica(STEADY)
        gate, closed = asyncio.Event(), asyncio.Event()

        async def upstream(
            gate: asyncio.Event = gate, closed: asyncio.Event = closed
        ) -> AsyncIterator[bytes]:
            try:
                async for part in _gated(parts, gate, after=1):
                    yield part
            finally:
                closed.set()

        key = f"left-{followed}"
        leader = await a.stream(key, upstream)
        assert await anext(leader.chunks) == parts[0]
        follower = await b.stream(key, upstream) if followed else None
        await leader.chunks.aclose()  # type: ignore[attr-defined]
        if follower is not None:
            gate.set()
            assert [c async for c in follower.chunks] == parts
            assert a.stats.streams_stopped == 0
        else:
            await asyncio.wait_for(closed.wait(), 5)
            assert a.stats.streams_stopped == 1
            async with asyncio.timeout(5):  # the lock went with it: the next caller leads
                while await redis_client.get(f"gw:dedup:{{{key}}}:slock") is not None:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)


@pytest.mark.integration
async def test_a_stream_stops_once_its_followers_on_other_replicas_leave_too(
    make_replica: Callable[..., RedisSingleFlight], redis_client: aioredis.Redis
) -> None:
    a, b = make_replica(STEADY), make_replica(STEADY)
    parts = [b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n"]
    closed = asyncio.Event()

    async def upstream() -> AsyncIterator[bytes]:
        try:
            async for part in _gated(parts, asyncio.Event(), after=1):  # never past the first
                yield part
        finally:
            closed.set()

    leader = await a.stream("both-leave", upstream)
    follower = await b.stream("both-leave", upstream)
    assert await anext(follower.chunks) == parts[0]
    await leader.chunks.aclose()  # type: ignore[attr-defined]
    await asyncio.sleep(3 * STEADY.poll_s)
    assert not closed.is_set() and a.stats.streams_stopped == 0  # b still reads it
    await follower.chunks.aclose()  # type: ignore[attr-defined]
    await asyncio.wait_for(closed.wait(), 5)
    assert a.stats.streams_stopped == 1 and b.stats.streams_stopped == 1
    assert await redis_client.get("gw:dedup:{both-leave}:slock:followers") is None


@pytest.mark.integration
async def test_a_replica_that_took_over_a_stream_keeps_it_going_for_its_followers(
    make_replica: Callable[..., RedisSingleFlight], redis_client: aioredis.Redis
) -> None:
    a, b = make_replica(STEADY), make_replica(STEADY)
    await redis_client.set("gw:dedup:{taken}:slock", "dead", px=300)
    parts = [b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n"]
    gate = asyncio.Event()

    def upstream() -> AsyncIterator[bytes]:
        return _gated(parts, gate, after=1)

    taker = await a.stream("taken", upstream)
    assert taker.role is Role.FOLLOWER  # of a leader that never writes
    assert await anext(taker.chunks) == parts[0]  # its own call, once the lock lapsed
    assert a.stats.takeovers == 1
    follower = await b.stream("taken", upstream)
    assert follower.role is Role.FOLLOWER
    await taker.chunks.aclose()  # type: ignore[attr-defined]
    await asyncio.sleep(3 * STEADY.poll_s)
    gate.set()
    assert [c async for c in follower.chunks] == parts
    assert a.stats.streams_stopped == 0
