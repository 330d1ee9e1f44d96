"""Bounds on what one HTTP client can hold: header and body deadlines, connections per address.

aiohttp waits for a request's headers and body as long as the client likes, so a client that opens a
connection and stalls holds a descriptor (and, mid-body, a handler) forever. Here each connection gets
a deadline for its headers (from its first byte, or from the connection's start), each request a
deadline for its body, and each client address a cap on open connections. A client that misses a
deadline gets a 408 in OpenAI's error shape and its connection ends; one over the cap gets a 429.
aiohttp's own parser errors (a bad request line, invalid headers, broken chunked encoding, a lying
Content-Length) are answered in the same shape, without echoing the request.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from rbee_fleet.common.errors import error_body

log = logging.getLogger(__name__)

LINGER_S = 2.0  # after refusing a connection, read and drop what the client still sends, then close


@dataclass(frozen=True)
class ClientLimits:
    header_timeout_s: float = 10.0  # from a connection's first byte (or its opening) to complete headers
    body_timeout_s: float = 30.0  # from complete headers to the whole body
    max_connections_per_client: int = 256  # open connections from one address


def _raw_response(status: int, reason: str, body: dict[str, Any], extra: str = "") -> bytes:
    payload = json.dumps(body).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n{extra}\r\n")
    return head.encode() + payload


def timeout_body(what: str, seconds: float) -> dict[str, Any]:
    return error_body(f"the request's {what} did not arrive within {seconds:g} s; the connection is closed",
                      type="invalid_request_error", code="request_timeout")


class GuardedRequestHandler(RequestHandler):
    """aiohttp's connection protocol, with a header deadline, a per-address cap and JSON parse errors."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        server: GuardedServer = self._manager  # type: ignore[assignment]
        self._limits = server.limits
        self._counts = server.per_client
        self._timer: asyncio.TimerHandle | None = None
        self._busy = False
        self._refused = False
        peer = transport.get_extra_info("peername")
        self._client = peer[0] if isinstance(peer, tuple) else str(peer)
        self._counts[self._client] += 1
        super().connection_made(transport)
        if self._counts[self._client] > self._limits.max_connections_per_client:
            self._refuse(429, "Too Many Requests", error_body(
                f"too many open connections from {self._client} (at most {self._limits.max_connections_per_client})",
                type="rate_limit_error", code="too_many_connections"), "Retry-After: 1\r\n")
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # read and dropped, so that closing later sends no reset
        if not self._busy and self._timer is None:
            self._arm()
        super().data_received(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        self._counts[self._client] -= 1
        if self._counts[self._client] <= 0:
            del self._counts[self._client]
        super().connection_lost(exc)

    # -- called by the middleware around each request ---------------------------------------------

    def request_started(self) -> None:
        self._busy = True
        self._disarm()

    def request_finished(self) -> None:
        self._busy = False

    # -- deadlines ----------------------------------------------------------------------------------

    def _arm(self) -> None:
        self._timer = self._loop.call_later(self._limits.header_timeout_s, self._headers_late)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _headers_late(self) -> None:
        self._timer = None
        if self._busy or self.transport is None:
            return
        log.info("client %s sent no complete headers within %g s; closing", self._client, self._limits.header_timeout_s)
        self._refuse(408, "Request Timeout", timeout_body("headers", self._limits.header_timeout_s))

    def _refuse(self, status: int, reason: str, body: dict[str, Any], extra: str = "") -> None:
        """Answer on the raw connection, half-close it, drop what still comes, close after a short linger."""
        transport = self.transport
        self._refused = True
        if transport is None:
            return
        transport.write(_raw_response(status, reason, body, extra))
        if transport.can_write_eof():
            transport.write_eof()
        self._loop.call_later(LINGER_S, self.force_close)

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """aiohttp's error page, in OpenAI's shape, never echoing what the client sent."""
        if status >= 500:
            log.error("error handling a request from %s", self._client, exc_info=exc)
            body = error_body("internal server error", type="server_error", code="internal_error")
        else:
            why = type(exc).__name__ if exc is not None else "malformed request"
            body = error_body(f"the HTTP request is malformed ({why})", type="invalid_request_error",
                              code="malformed_http")
        resp = web.json_response(body, status=status)
        resp.force_close()
        return resp


class GuardedServer(web.Server):
    limits: ClientLimits
    per_client: Counter[str]

    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(self, loop=self._loop, **self._kwargs)


def guard(server: web.Server, limits: ClientLimits) -> None:
    """Make ``server`` (an app runner's) build guarded connections; aiohttp has no hook for the protocol class."""
    server.__class__ = GuardedServer
    assert isinstance(server, GuardedServer)
    server.limits = limits
    server.per_client = Counter()


@web.middleware
async def busy_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Outermost: the connection has a request in hand, so its header deadline no longer applies."""
    proto = request.protocol
    if not isinstance(proto, GuardedRequestHandler):
        return await handler(request)
    proto.request_started()
    try:
        return await handler(request)
    finally:
        proto.request_finished()


@web.middleware
async def body_deadline_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Innermost (after authentication): read the body within its deadline, or answer 408."""
    proto = request.protocol
    if request.body_exists and isinstance(proto, GuardedRequestHandler):
        limit = proto._limits.body_timeout_s
        try:
            await asyncio.wait_for(request.read(), limit)  # kept by aiohttp: the handler's read() gets it
        except asyncio.TimeoutError:
            return await _timed_out(request, limit)
    return await handler(request)


async def _timed_out(request: web.Request, limit: float) -> web.StreamResponse:
    log.info("client %s sent no complete body within %g s; closing", request.remote, limit)
    resp = web.json_response(timeout_body("body", limit), status=408)
    resp.force_close()
    await resp.prepare(request)
    await resp.write_eof()
    transport = request.transport
    if transport is not None and transport.can_write_eof():
        transport.write_eof()  # the client sees the end at once; aiohttp drops the rest of the body
    return resp
