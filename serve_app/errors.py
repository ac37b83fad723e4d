"""The gateway's exceptions and the OpenAI error envelope.

Every error a client can see is a ``GatewayError``; one handler in the ingress
renders it as ``{"error": {"message", "type", "param", "code"}}``::

    GatewayError (500 api_error)
    ├── InvalidRequestError (400 invalid_request_error)
    │   └── PayloadTooLargeError (413)
    ├── AuthenticationError (401)
    ├── PermissionDeniedError (403)
    ├── NotFoundError (404)
    │   └── ModelNotFoundError (404 model_not_found)
    ├── RateLimitError (429 rate_limit_exceeded)
    ├── InsufficientQuotaError (429 insufficient_quota, never worth retrying)
    ├── ServiceUnavailableError (503)
    │   ├── StoreUnavailableError (503 store_unavailable)
    │   └── CircuitOpenError (503 circuit_open)
    └── UpstreamError (an upstream's own status and body, passed on)
        ├── UpstreamUnreachableError (502)
        └── UpstreamTimeoutError (504)

Exceptions cross Ray process boundaries, so each one must survive pickling:
every attribute is a constructor argument (see ``__reduce__``).
"""

from __future__ import annotations

from typing import Any

import orjson


class GatewayError(Exception):
    status_code: int = 500
    type: str = "api_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status_code: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status_code is not None:
            self.status_code = status_code
        self.headers: dict[str, str] = dict(headers or {})

    def __reduce__(self) -> tuple[Any, ...]:
        kwargs = {
            "param": self.param,
            "code": self.code,
            "status_code": self.status_code,
            "headers": self.headers,
        }
        return (_rebuild, (type(self), self.message, kwargs))

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def body(self) -> bytes:
        return orjson.dumps(self.to_dict())


def _rebuild(cls: type[GatewayError], message: str, kwargs: dict[str, Any]) -> GatewayError:
    return cls(message, **kwargs)


class InvalidRequestError(GatewayError):
    status_code = 400
    type = "invalid_request_error"


class PayloadTooLargeError(InvalidRequestError):
    status_code = 413
    code = "payload_too_large"


class AuthenticationError(GatewayError):
    status_code = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDeniedError(GatewayError):
    status_code = 403
    type = "permission_error"
    code = "permission_denied"


class NotFoundError(GatewayError):
    status_code = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFoundError(NotFoundError):
    code = "model_not_found"


class RateLimitError(GatewayError):
    status_code = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class InsufficientQuotaError(GatewayError):
    status_code = 429
    type = "insufficient_quota"
    code = "insufficient_quota"


class ServiceUnavailableError(GatewayError):
    status_code = 503
    type = "service_unavailable"
    code = "service_unavailable"


class StoreUnavailableError(ServiceUnavailableError):
    code = "store_unavailable"


class CircuitOpenError(ServiceUnavailableError):
    code = "circuit_open"


class UpstreamError(GatewayError):
    """An upstream answered with an error; its status (and body) are passed on."""

    status_code = 502
    type = "upstream_error"
    code = "upstream_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status_code: int | None = None,
        headers: dict[str, str] | None = None,
        upstream_body: bytes | None = None,
    ) -> None:
        super().__init__(message, param=param, code=code, status_code=status_code, headers=headers)
        self.upstream_body = upstream_body

    def __reduce__(self) -> tuple[Any, ...]:
        cls, (kind, message, kwargs) = super().__reduce__()[:2]
        kwargs["upstream_body"] = self.upstream_body
        return (cls, (kind, message, kwargs))

    def body(self) -> bytes:
        """The upstream's own body when it is already an OpenAI envelope."""
        if self.upstream_body:
            try:
                parsed = orjson.loads(self.upstream_body)
            except orjson.JSONDecodeError:
                parsed = None
            if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
                return self.upstream_body
        return super().body()


class UpstreamUnreachableError(UpstreamError):
    status_code = 502
    code = "upstream_unreachable"


class UpstreamTimeoutError(UpstreamError):
    status_code = 504
    code = "upstream_timeout"
