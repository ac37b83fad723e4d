"""Redis errors that mean the store is not there (yet): down, restarting, loading its
data, or too slow to answer. The same call may succeed later; an error the store
answers with (out of memory, a script error) will not."""

from __future__ import annotations

from redis.exceptions import BusyLoadingError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

STORE_AWAY = (RedisConnectionError, RedisTimeoutError, BusyLoadingError)
