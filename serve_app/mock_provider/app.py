"""The mock provider as a Starlette app: how it runs inside the Serve app of
``config.yaml`` (under ``/mock``). Standalone it runs on ``server.py``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from serve_app.mock_provider.answers import MockAnswer, MockProvider, error
from serve_app.mock_provider.behaviour import MockBehaviour
from serve_app.mock_provider.responses import PREFIX as RESPONSE_PREFIX


def _response(answer: MockAnswer) -> Response:
    headers = dict(answer.headers)
    if answer.stream is not None:
        return StreamingResponse(answer.stream, answer.status, headers, answer.content_type)
    return Response(answer.body, answer.status, headers, answer.content_type)


def _endpoint(provider: MockProvider, path: str) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        return _response(await provider.answer(request.method, path, await request.body()))

    return endpoint


def _by_path(provider: MockProvider) -> Callable[[Request], Awaitable[Response]]:
    """A route with its own part in the path (``/v1/responses/{id}``)."""

    async def endpoint(request: Request) -> Response:
        path = RESPONSE_PREFIX + request.path_params["rest"]
        return _response(await provider.answer(request.method, path, await request.body()))

    return endpoint


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 and 405 in the OpenAI envelope, as the lean server sends them."""
    assert isinstance(exc, HTTPException)
    answer = error(exc.status_code, f"mock: {exc.detail}")
    return _response(replace(answer, headers=tuple((exc.headers or {}).items())))


def create_app(behaviour: MockBehaviour | None = None) -> Starlette:
    provider = MockProvider(behaviour)
    routes = [
        Route(path, _endpoint(provider, path), methods=[method])
        for path, (method, _) in provider.routes.items()
    ]
    routes.append(
        Route(RESPONSE_PREFIX + "{rest:path}", _by_path(provider), methods=["GET", "DELETE"])
    )
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error})
