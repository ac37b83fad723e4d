"""A no-op Ray Serve app: the ingress baseline every gateway figure is compared to."""

from __future__ import annotations

from typing import Any

import orjson
from ray import serve
from ray.serve import Application
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

_ANSWER = orjson.dumps(
    {
        "id": "chatcmpl-noop",
        "object": "chat.completion",
        "created": 0,
        "model": "noop",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
)


async def _answer(request: Request) -> Response:
    await request.body()
    return Response(_ANSWER, media_type="application/json")


@serve.deployment(
    name="NoOp", max_ongoing_requests=256, logging_config={"enable_access_log": False}
)
@serve.ingress()
class NoOpIngress:
    def __serve_build_asgi_app__(self) -> Starlette:
        return Starlette(routes=[Route("/{path:path}", _answer, methods=["GET", "POST"])])


def build_noop(args: dict[str, Any] | None = None) -> Application:
    return NoOpIngress.bind()  # type: ignore[attr-defined]
