"""What a failing store raises. ``STORE_ERRORS``: anything a lost or hung Redis
raises, which a stage handles by degrading, never by failing the request.
``STORE_AWAY``: those that mean the store is not there (yet): down, restarting,
loading its data, or too slow to answer. The same call may succeed later; an error
the store answers with (out of memory, a script error) will not. Background writers
that wait for the store (the ledger, budget settles) wait ``backoff_s`` between tries."""

from __future__ import annotations

from redis.exceptions import BusyLoadingError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

STORE_ERRORS = (RedisError, OSError, TimeoutError)
STORE_AWAY = (RedisConnectionError, RedisTimeoutError, BusyLoadingError)


def backoff_s(attempt: int) -> float:
    """The wait before try ``attempt + 1``: 50 ms, doubling, at most 2 s."""
    return min(2.0, 0.05 * 2 ** min(attempt, 6))
