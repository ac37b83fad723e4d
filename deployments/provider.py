"""The provider client: one pooled HTTP client per upstream.

Transports, chosen per upstream (``transport:``):
- ``http1`` (default): ``deployments/http1.py``, keep-alive HTTP/1.1 on
  httptools. Per call inside a Serve replica it costs about a third of
  aiohttp's CPU, which costs a quarter of httpx's (README, performance).
- ``aiohttp``: the general-purpose client, should an upstream need what
  ``http1`` leaves out (proxies, redirects).
- ``httpx-http2``: HTTP/2 where the upstream speaks it.
Transport exceptions are translated into ``serve_app.errors`` at this edge:
nothing above this module sees aiohttp or httpx.

Streams are handed up as an async iterator of raw byte chunks as they
arrive; nothing buffers a whole answer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

import aiohttp
import httpx

from deployments.http1 import (
    Http1ConnectError,
    Http1Error,
    Http1Pool,
    Http1Stream,
    Http1TimeoutError,
)
from serve_app.errors import (
    UpstreamError,
    UpstreamTimeoutError,
    UpstreamUnreachableError,
)
from serve_app.settings import UpstreamSettings

_PASSED_ON_HEADERS = ("retry-after", "retry-after-ms", "x-request-id")


@dataclass(frozen=True, slots=True)
class UpstreamResponse:
    status: int
    headers: Mapping[str, str]
    body: bytes


class UpstreamStream(Protocol):
    status: int
    headers: Mapping[str, str]

    def chunks(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


class Transport(Protocol):
    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> UpstreamResponse: ...

    async def stream(self, url: str, body: bytes, headers: Mapping[str, str]) -> UpstreamStream: ...

    async def aclose(self) -> None: ...


def _status_error(status: int, headers: Mapping[str, str], body: bytes) -> UpstreamError:
    passed = {k: headers[k] for k in _PASSED_ON_HEADERS if k in headers}
    message = f"upstream answered {status}"
    return UpstreamError(message, status_code=status, headers=passed, upstream_body=body)


class _AiohttpStream:
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.headers = {k.lower(): v for k, v in response.headers.items()}

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeoutError("upstream stream stalled") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"upstream stream broke: {exc!r}") from exc

    async def aclose(self) -> None:
        self._response.release()
        self._response.close()


class AiohttpTransport:
    def __init__(self, settings: UpstreamSettings) -> None:
        self._settings = settings
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        # Created lazily: a session binds to the running loop, which a Serve
        # replica only has once it serves.
        if self._session is None or self._session.closed:
            s = self._settings
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=s.max_connections, keepalive_timeout=s.keepalive_timeout_s
                ),
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=s.connect_timeout_s, sock_read=s.read_timeout_s
                ),
                auto_decompress=True,
            )
        return self._session

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> UpstreamResponse:
        try:
            async with self._client().post(url, data=body, headers=headers) as response:
                payload = await response.read()
                lowered = {k.lower(): v for k, v in response.headers.items()}
                return UpstreamResponse(response.status, lowered, payload)
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeoutError(f"upstream timed out: {url}") from exc
        except aiohttp.ClientConnectionError as exc:
            raise UpstreamUnreachableError(f"upstream unreachable: {exc}") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"upstream request failed: {exc!r}") from exc

    async def stream(self, url: str, body: bytes, headers: Mapping[str, str]) -> UpstreamStream:
        try:
            response = await self._client().post(url, data=body, headers=headers)
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeoutError(f"upstream timed out: {url}") from exc
        except aiohttp.ClientConnectionError as exc:
            raise UpstreamUnreachableError(f"upstream unreachable: {exc}") from exc
        return _AiohttpStream(response)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


@contextlib.contextmanager
def _http1_errors(url: str) -> Iterator[None]:
    try:
        yield
    except Http1TimeoutError as exc:
        raise UpstreamTimeoutError(f"upstream timed out: {url}") from exc
    except Http1ConnectError as exc:
        raise UpstreamUnreachableError(f"upstream unreachable: {exc}") from exc
    except Http1Error as exc:
        raise UpstreamError(f"upstream request failed: {exc}") from exc


class _Http1Stream:
    def __init__(self, stream: Http1Stream) -> None:
        self._stream = stream
        self.status = stream.status
        self.headers = stream.headers

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._stream.chunks():
                yield chunk
        except Http1TimeoutError as exc:
            raise UpstreamTimeoutError("upstream stream stalled") from exc
        except Http1Error as exc:
            raise UpstreamError(f"upstream stream broke: {exc}") from exc

    async def aclose(self) -> None:
        await self._stream.aclose()


class Http1Transport:
    """One keep-alive pool per origin (an upstream has one; its URLs are cached)."""

    def __init__(self, settings: UpstreamSettings) -> None:
        self._settings = settings
        self._pools: dict[str, Http1Pool] = {}
        self._routes: dict[str, tuple[Http1Pool, str]] = {}

    def _route(self, url: str) -> tuple[Http1Pool, str]:
        route = self._routes.get(url)
        if route is None:
            parts = urlsplit(url)
            origin = f"{parts.scheme}://{parts.netloc}"
            pool = self._pools.get(origin)
            if pool is None:
                s = self._settings
                pool = self._pools[origin] = Http1Pool(
                    origin,
                    max_connections=s.max_connections,
                    connect_timeout_s=s.connect_timeout_s,
                    read_timeout_s=s.read_timeout_s,
                    idle_timeout_s=s.keepalive_timeout_s,
                )
            target = parts.path + (f"?{parts.query}" if parts.query else "")
            route = self._routes[url] = (pool, target or "/")
        return route

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> UpstreamResponse:
        pool, target = self._route(url)
        with _http1_errors(url):
            response = await pool.post(target, body, headers)
        return UpstreamResponse(response.status, response.headers, response.body)

    async def stream(self, url: str, body: bytes, headers: Mapping[str, str]) -> UpstreamStream:
        pool, target = self._route(url)
        with _http1_errors(url):
            return _Http1Stream(await pool.stream(target, body, headers))

    async def aclose(self) -> None:
        await asyncio.gather(*(pool.aclose() for pool in self._pools.values()))


class _HttpxStream:
    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status = response.status_code
        self.headers = {k.lower(): v for k, v in response.headers.items()}

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.aiter_raw():
                yield chunk
        except httpx.TimeoutException as exc:
            raise UpstreamTimeoutError("upstream stream stalled") from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(f"upstream stream broke: {exc!r}") from exc

    async def aclose(self) -> None:
        await self._response.aclose()


class HttpxTransport:
    """HTTP/2 capable (ALPN negotiates h2 where the upstream speaks it)."""

    def __init__(self, settings: UpstreamSettings) -> None:
        self._client = httpx.AsyncClient(
            http2=True,
            limits=httpx.Limits(max_connections=settings.max_connections),
            timeout=httpx.Timeout(
                connect=settings.connect_timeout_s,
                read=settings.read_timeout_s,
                write=settings.read_timeout_s,
                pool=settings.connect_timeout_s,
            ),
        )

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> UpstreamResponse:
        try:
            response = await self._client.post(url, content=body, headers=dict(headers))
        except httpx.TimeoutException as exc:
            raise UpstreamTimeoutError(f"upstream timed out: {url}") from exc
        except httpx.TransportError as exc:
            raise UpstreamUnreachableError(f"upstream unreachable: {exc!r}") from exc
        lowered = {k.lower(): v for k, v in response.headers.items()}
        return UpstreamResponse(response.status_code, lowered, response.content)

    async def stream(self, url: str, body: bytes, headers: Mapping[str, str]) -> UpstreamStream:
        request = self._client.build_request("POST", url, content=body, headers=dict(headers))
        try:
            response = await self._client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            raise UpstreamTimeoutError(f"upstream timed out: {url}") from exc
        except httpx.TransportError as exc:
            raise UpstreamUnreachableError(f"upstream unreachable: {exc!r}") from exc
        return _HttpxStream(response)

    async def aclose(self) -> None:
        await self._client.aclose()


def make_transport(settings: UpstreamSettings) -> Transport:
    if settings.transport == "httpx-http2":
        return HttpxTransport(settings)
    if settings.transport == "aiohttp":
        return AiohttpTransport(settings)
    return Http1Transport(settings)


class ProviderClient:
    """Sends OpenAI-compatible requests to named upstreams."""

    def __init__(
        self,
        upstreams: Mapping[str, UpstreamSettings],
        transports: Mapping[str, Transport] | None = None,
    ) -> None:
        self._upstreams = dict(upstreams)
        self._transports: dict[str, Transport] = dict(transports or {})
        for name, settings in self._upstreams.items():
            self._transports.setdefault(name, make_transport(settings))
        self._base_headers = {name: self._headers(s) for name, s in self._upstreams.items()}

    @staticmethod
    def _headers(settings: UpstreamSettings) -> dict[str, str]:
        headers = {"content-type": "application/json", **settings.headers}
        key = settings.api_key()
        if key:
            headers["authorization"] = f"Bearer {key}"
        return headers

    def _url(self, upstream: str, path: str) -> str:
        return str(self._upstreams[upstream].base_url).rstrip("/") + path

    async def post(
        self, upstream: str, path: str, body: bytes, request_id: str | None = None
    ) -> UpstreamResponse:
        """A whole answer; an upstream error status raises ``UpstreamError``."""
        headers = self._request_headers(upstream, request_id)
        response = await self._transports[upstream].post(self._url(upstream, path), body, headers)
        if response.status >= 400:
            raise _status_error(response.status, response.headers, response.body)
        return response

    async def open_stream(
        self, upstream: str, path: str, body: bytes, request_id: str | None = None
    ) -> UpstreamStream:
        """Returns once the upstream's status line arrived; an error status raises
        before any byte reaches the client, so callers may still retry."""
        headers = self._request_headers(upstream, request_id)
        stream = await self._transports[upstream].stream(self._url(upstream, path), body, headers)
        if stream.status >= 400:
            try:
                payload = b"".join([chunk async for chunk in stream.chunks()])
            except UpstreamError:
                payload = b""
            finally:
                await stream.aclose()
            raise _status_error(stream.status, stream.headers, payload)
        return stream

    async def send(
        self, method: str, upstream: str, path: str, timeout_s: float
    ) -> UpstreamResponse:
        """A call with no body and the upstream's headers (a health check's ``GET
        /models``, a stored response's ``GET`` or ``DELETE``): off the hot path, so a
        client of its own rather than a pooled transport, which speaks POST only. Any
        status is returned; a failure to connect or a timeout raises as ``post`` does."""
        url = self._url(upstream, path)
        try:
            async with httpx.AsyncClient(timeout=timeout_s) as client:
                response = await client.request(method, url, headers=self._base_headers[upstream])
        except httpx.TimeoutException:
            raise UpstreamTimeoutError(f"upstream {upstream} timed out") from None
        except httpx.TransportError as exc:
            raise UpstreamUnreachableError(f"upstream {upstream} unreachable: {exc}") from None
        return UpstreamResponse(response.status_code, dict(response.headers), response.content)

    def _request_headers(self, upstream: str, request_id: str | None) -> dict[str, str]:
        headers = self._base_headers[upstream]
        if request_id is None:
            return headers
        return {**headers, "x-request-id": request_id}

    async def aclose(self) -> None:
        await asyncio.gather(*(t.aclose() for t in self._transports.values()))
