"""Who changed what through the admin API, and when: every admin call that changes
something (POST, PUT, PATCH, DELETE) is appended to a Redis stream shared by all
replicas, with the admin key's name, the route, the request id, the status it got
and its body (JSON, cut at 2 kB). ``GET /admin/audit`` reads it back, newest
first. Secrets never enter it: the admin API takes none in a body (a new key's
secret is in the answer, which is not kept), and headers are not kept.

The stream keeps the latest ``max_entries`` (approximately: Redis trims whole
nodes). Writing is best effort: an admin change whose entry could not be written
still stands, with a warning in the log.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis

from deployments.store_errors import STORE_ERRORS

log = logging.getLogger(__name__)

STREAM = "gw:{audit}:admin"
MAX_BODY_BYTES = 2048
CHANGES = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: str  # the stream's entry id (time-ordered)
    at_ms: int
    key: str  # the admin key's name
    method: str
    path: str
    status: int
    request_id: str
    body: Any  # the request's JSON body (or its text, cut), None when it had none


def _body(raw: bytes) -> bytes:
    if len(raw) <= MAX_BODY_BYTES:
        return raw
    return orjson.dumps({"truncated": raw[:MAX_BODY_BYTES].decode(errors="replace")})


def _decoded(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode(errors="replace")


class AuditLog:
    def __init__(self, redis: aioredis.Redis, max_entries: int = 10_000) -> None:
        self._redis = redis
        self._max_entries = max_entries

    async def record(
        self, *, key: str, method: str, path: str, status: int, request_id: str, body: bytes
    ) -> None:
        fields = {
            "at_ms": str(int(time.time() * 1000)),
            "key": key,
            "method": method,
            "path": path,
            "status": str(status),
            "request_id": request_id,
            "body": _body(body),
        }
        try:
            await self._redis.xadd(
                STREAM,
                fields,
                maxlen=self._max_entries,
                approximate=True,  # type: ignore[arg-type]
            )
        except STORE_ERRORS:
            log.warning("audit entry not written: %s %s by %s (%s)", method, path, key, status)

    async def latest(self, count: int) -> list[AuditEntry]:
        entries = await self._redis.xrevrange(STREAM, count=count)
        out = []
        for entry_id, raw in entries:
            fields = {k.decode(): v for k, v in raw.items()}
            out.append(
                AuditEntry(
                    id=entry_id.decode(),
                    at_ms=int(fields["at_ms"]),
                    key=fields["key"].decode(),
                    method=fields["method"].decode(),
                    path=fields["path"].decode(),
                    status=int(fields["status"]),
                    request_id=fields["request_id"].decode(),
                    body=_decoded(fields["body"]),
                )
            )
        return out
