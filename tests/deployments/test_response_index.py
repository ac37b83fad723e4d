"""The stored-response index against a real store: who made a response, where it
is held, for how long, and what an unreachable store means."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from deployments.response_index import PREFIX, ResponseIndex, ResponseOwner
from serve_app.embedded_store import free_port
from serve_app.errors import StoreUnavailableError

pytestmark = pytest.mark.integration
OWNER = ResponseOwner(
    tenant="acme", upstream="openai", model="gpt-4o", key_id="ci", context_tokens=1234
)


async def test_a_response_is_found_until_forgotten_and_kept_for_the_retention(
    redis_client: aioredis.Redis,
) -> None:
    index = ResponseIndex(redis_client, retention_s=3600)
    assert await index.find("resp_abc") is None
    await index.remember("resp_abc", OWNER)
    assert await index.find("resp_abc") == OWNER
    assert 3590 <= await redis_client.ttl(PREFIX + "resp_abc") <= 3600
    await index.forget("resp_abc")
    assert await index.find("resp_abc") is None


async def test_an_entry_recorded_before_its_size_was_kept_reads_as_sizeless(
    redis_client: aioredis.Redis,
) -> None:
    index = ResponseIndex(redis_client, retention_s=60)
    await redis_client.set(PREFIX + "resp_old", b'["acme","openai","gpt-4o","ci"]')
    owner = await index.find("resp_old")
    assert owner == ResponseOwner("acme", "openai", "gpt-4o", "ci", context_tokens=0)


@pytest.mark.parametrize("bad", ["", "resp_*", "a/b", "x" * 129, "resp abc"])
async def test_an_id_that_is_not_plain_is_never_looked_up(
    redis_client: aioredis.Redis, bad: str
) -> None:
    index = ResponseIndex(redis_client, retention_s=60)
    await redis_client.set(PREFIX + bad, b'["acme","openai","gpt-4o","ci"]')
    assert await index.find(bad) is None


async def test_an_unreachable_store_raises_rather_than_guessing_the_owner() -> None:
    client = aioredis.from_url(f"redis://127.0.0.1:{free_port()}", socket_connect_timeout=0.5)
    index = ResponseIndex(client, retention_s=60)
    try:
        for call in (index.find("resp_a"), index.remember("resp_a", OWNER), index.forget("resp_a")):
            with pytest.raises(StoreUnavailableError):
                await call
    finally:
        await client.aclose()
