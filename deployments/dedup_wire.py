"""How a flight's result crosses replicas: one tag byte, then the value or the
error. Errors travel as their ``GatewayError`` fields (never pickled: the bytes
come from Redis) and are rebuilt as the same class on the waiter's replica."""

from __future__ import annotations

from typing import Any

import orjson

from serve_app import errors
from serve_app.errors import GatewayError, UpstreamError

VALUE, ERROR = b"V", b"E"


def encode_error(exc: BaseException) -> bytes:
    """An error as waiters on other replicas will raise it."""
    if not isinstance(exc, GatewayError):
        # Internal details stay in this replica's logs.
        exc = UpstreamError("the coalesced upstream call failed")
    body = getattr(exc, "upstream_body", None)
    fields = {
        "cls": type(exc).__name__,
        "message": exc.message,
        "param": exc.param,
        "code": exc.code,
        "status_code": exc.status_code,
        "headers": exc.headers,
        "upstream_body": body.decode("utf-8", "replace") if body else None,
    }
    return ERROR + orjson.dumps(fields)


def decode_error(payload: bytes) -> GatewayError:
    fields: dict[str, Any] = orjson.loads(payload[1:])
    cls = getattr(errors, str(fields.pop("cls")), GatewayError)
    if not (isinstance(cls, type) and issubclass(cls, GatewayError)):
        cls = GatewayError
    body = fields.pop("upstream_body")
    if issubclass(cls, UpstreamError):
        return cls(**fields, upstream_body=body.encode() if body else None)
    return cls(**fields)


def decode_result(payload: bytes) -> bytes:
    """The value, or raise the error, a leader published."""
    if payload[:1] == VALUE:
        return payload[1:]
    raise decode_error(payload)


def followers_key(lock: str) -> str:
    """The count of callers that found ``lock`` taken (the lock's hash tag, so one slot)."""
    return f"{lock}:followers"
