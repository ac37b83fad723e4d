"""Keys created at run time: stored as digests, looked up with a short memory,
revoked everywhere by announcement, and usable from memory while the store is down."""

from __future__ import annotations

import asyncio
import contextlib

import orjson
import pytest
import redis.asyncio as aioredis
from pydantic import ValidationError

from serve_app.errors import (
    AuthenticationError,
    InvalidRequestError,
    NotFoundError,
    StoreUnavailableError,
)
from serve_app.runtime_keys import BY_DIGEST, SECRET_PREFIX, KeySpec, RuntimeKeys
from serve_app.settings import hash_key
from tests.support import OwnStore

pytestmark = pytest.mark.integration

MODELS = ("mock-gpt", "mock-embed")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def keys(redis: aioredis.Redis, clock: Clock | None = None, cache_s: float = 5.0) -> RuntimeKeys:
    return RuntimeKeys(
        redis, reserved_names=["local"], models=MODELS, cache_s=cache_s, clock=clock or Clock()
    )


async def remembered(creator: RuntimeKeys, listener: RuntimeKeys) -> str:
    """A key made by ``creator``, once ``listener`` hears announcements and has looked
    the key up (and so remembers it for its cache_s); the key's digest."""
    await asyncio.wait_for(listener.listening.wait(), 10)
    secret, _ = await creator.create(KeySpec(name="team-a"))
    digest = hash_key(secret)
    assert await listener.principal(digest) is not None
    return digest


async def test_a_created_key_is_found_by_its_secret_and_only_its_digest_is_stored(
    redis_client: aioredis.Redis,
) -> None:
    ring = keys(redis_client)
    secret, key = await ring.create(KeySpec(name="team-a", tenant="a", models=["mock-gpt"]))
    assert secret.startswith(SECRET_PREFIX) and len(secret) > 40
    principal = await ring.principal(hash_key(secret))
    assert principal is not None
    assert (principal.key_id, principal.tenant, principal.admin) == ("team-a", "a", False)
    assert principal.models == frozenset({"mock-gpt"})
    assert await ring.principal(hash_key("sk-gw-made-up")) is None
    stored = b"".join(
        [k + v for k, v in (await redis_client.hgetall(BY_DIGEST)).items()]
        + [await redis_client.dump(k) or b"" for k in await redis_client.keys("*")]
    )
    assert secret.encode() not in stored and hash_key(secret).encode() in stored
    assert [k.name for k in await ring.listed()] == ["team-a"] and key.tenant == "a"


async def test_names_are_unique_and_models_must_exist(redis_client: aioredis.Redis) -> None:
    ring = keys(redis_client)
    await ring.create(KeySpec(name="team-a"))
    for spec, code in (
        (KeySpec(name="team-a"), "key_exists"),  # created already
        (KeySpec(name="local"), "key_exists"),  # a configured key's name
        (KeySpec(name="b", models=["nope"]), None),
    ):
        with pytest.raises(InvalidRequestError) as refused:
            await ring.create(spec)
        assert refused.value.code == code
        assert refused.value.status_code == (409 if code else 400)
    with pytest.raises(InvalidRequestError):
        await ring.revoke("local")
    with pytest.raises(NotFoundError):
        await ring.revoke("never-made")
    for tenant in ("acme/ml", "a:b", "{a}", ""):  # what joins a tenant's keys, or nothing
        with pytest.raises(ValidationError):
            KeySpec(name="c", tenant=tenant)


async def test_a_key_stored_with_a_tenant_name_now_refused_is_unknown(
    redis_client: aioredis.Redis,
) -> None:
    """A key made before tenant names were checked ('acme/ml' shares what 'acme' keeps
    under its namespace 'ml') is refused until it is made again."""
    ring = keys(redis_client)
    secret, _ = await ring.create(KeySpec(name="legacy-tenant", tenant="acme"))
    digest = hash_key(secret)
    assert await keys(redis_client).principal(digest) is not None
    record = orjson.loads(await redis_client.hget(BY_DIGEST, digest))
    await redis_client.hset(BY_DIGEST, digest, orjson.dumps({**record, "tenant": "acme/ml"}))
    assert await keys(redis_client).principal(digest) is None


async def test_a_revoked_key_stops_working_on_every_replica_as_it_is_announced(
    redis_client: aioredis.Redis,
) -> None:
    here, there = keys(redis_client, cache_s=60), keys(redis_client, cache_s=60)
    there.start()
    try:
        digest = await remembered(here, there)
        await here.revoke("team-a")
        assert await here.principal(digest) is None

        async def forgotten() -> bool:
            return await there.principal(digest) is None

        for _ in range(100):
            if await forgotten():
                break
            await asyncio.sleep(0.05)
        assert await forgotten()
    finally:
        await there.stop()


async def test_without_the_announcement_a_replica_learns_within_its_memory(
    redis_client: aioredis.Redis,
) -> None:
    clock = Clock()
    here, there = keys(redis_client), keys(redis_client, clock, cache_s=5)  # there: deaf
    secret, _ = await here.create(KeySpec(name="team-a"))
    digest = hash_key(secret)
    assert await there.principal(digest) is not None
    await here.revoke("team-a")
    clock.now += 4.9
    assert await there.principal(digest) is not None  # its memory, not yet stale
    clock.now += 0.2
    assert await there.principal(digest) is None


async def test_a_known_key_keeps_working_while_the_store_is_down(own_store: OwnStore) -> None:
    clock = Clock()
    ring = keys(own_store.client, clock)
    secret, _ = await ring.create(KeySpec(name="team-a"))
    digest = hash_key(secret)
    assert await ring.principal(digest) is not None
    await own_store.kill()
    try:
        clock.now += 60  # its memory is stale: the store is asked, and is down
        found = await ring.principal(digest)
        assert found is not None and found.key_id == "team-a"
        with pytest.raises(StoreUnavailableError):
            await ring.principal(hash_key("sk-gw-never-seen"))
    finally:
        await own_store.start()


async def test_a_replica_back_from_a_store_outage_asks_again_about_every_key(
    own_store: OwnStore,
) -> None:
    ring = keys(own_store.client, cache_s=60)
    ring.start()
    try:
        digest = await remembered(ring, ring)
        await own_store.client.hdel(BY_DIGEST, digest)  # revoked, its announcement unheard
        await asyncio.sleep(1.2)  # the append-only file has it (fsync every second)
        await own_store.kill()
        await asyncio.sleep(0.3)
        await own_store.start()
        for _ in range(100):  # resubscribed: what it remembered may be out of date
            with contextlib.suppress(StoreUnavailableError):  # a pooled connection's first use
                if await ring.principal(digest) is None:
                    break
            await asyncio.sleep(0.1)
        assert await ring.principal(digest) is None  # long before its 60 s
    finally:
        await ring.stop()


async def test_a_lookup_that_crossed_a_revocation_is_not_remembered(
    redis_client: aioredis.Redis,
) -> None:
    ring = keys(redis_client, cache_s=60)
    secret, _ = await ring.create(KeySpec(name="team-a"))
    digest = hash_key(secret)
    read = asyncio.Event()
    real_hget = redis_client.hget

    async def slow_hget(*args: object) -> object:
        value = await real_hget(*args)  # type: ignore[arg-type]
        read.set()
        await asyncio.sleep(0.1)  # the revocation is announced while this read is out
        return value

    redis_client.hget = slow_hget  # type: ignore[method-assign]
    lookup = asyncio.create_task(ring.principal(digest))
    await read.wait()
    redis_client.hget = real_hget  # type: ignore[method-assign]
    await ring.revoke("team-a")
    assert await lookup is not None  # it read the key before the revocation
    assert await ring.principal(digest) is None  # but did not keep it for 60 s


async def test_a_key_made_to_expire_is_refused_from_then_on_until_deleted(
    redis_client: aioredis.Redis,
) -> None:
    wall = Clock()
    wall.now = 1_800_000_000.0
    ring = RuntimeKeys(redis_client, reserved_names=(), models=MODELS, cache_s=60, wall=wall)
    secret, key = await ring.create(KeySpec(name="contractor", expires_in_s=3600))
    assert key.expires_ms == 1_800_000_000_000 + 3_600_000
    digest = hash_key(secret)
    assert await ring.principal(digest) is not None
    wall.now += 3599
    assert await ring.principal(digest) is not None
    wall.now += 1  # remembered for 60 s more, but its expiry is checked on every use
    with pytest.raises(AuthenticationError) as expired:
        await ring.principal(digest)
    assert expired.value.code == "expired_api_key" and expired.value.status_code == 401
    assert [k.expired(wall.now * 1000) for k in await ring.listed()] == [True]
    with pytest.raises(InvalidRequestError):  # its name stays taken until it is deleted
        await ring.create(KeySpec(name="contractor"))
    await ring.revoke("contractor")
    assert (await ring.create(KeySpec(name="contractor")))[1].expires_ms is None


async def test_a_rotated_key_keeps_its_settings_under_a_new_secret(
    redis_client: aioredis.Redis,
) -> None:
    here, there = keys(redis_client, cache_s=60), keys(redis_client, cache_s=60)
    there.start()
    try:
        old = await remembered(here, there)  # "team-a", remembered by `there`
        secret, key = await here.rotate("team-a")
        assert key.name == "team-a" and hash_key(secret) != old
        assert await here.principal(old) is None
        for _ in range(100):  # announced: the other replica drops the old secret too
            if await there.principal(old) is None:
                break
            await asyncio.sleep(0.05)
        assert await there.principal(old) is None
        found = await there.principal(hash_key(secret))
        assert found is not None and found.key_id == "team-a"
        assert [k.name for k in await here.listed()] == ["team-a"]
        with pytest.raises(NotFoundError):
            await here.rotate("never-made")
        with pytest.raises(InvalidRequestError):
            await here.rotate("local")
    finally:
        await there.stop()
