"""HTTP plumbing shared by the three daemons: error envelope, bearer auth, JSON bodies, serving."""

from __future__ import annotations

import asyncio
import errno
import hmac
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from aiohttp import web

from rbee_fleet.common import body_limits
from rbee_fleet.common.client_limits import ClientLimits, body_deadline_middleware, busy_middleware, guard
from rbee_fleet.common.errors import ApiError, BadRequest, Forbidden, PayloadTooLarge, Unauthorized
from rbee_fleet.common.net import is_loopback
from rbee_fleet.contracts.errors import error_body

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 * 1024 * 1024
EXIT_PORT_IN_USE = 98  # a daemon that cannot bind its port exits with this, so a supervisor can pick another

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(exc: ApiError) -> web.Response:
    return web.json_response(exc.body(), status=exc.status, headers=exc.headers())


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render every failure in OpenAI's error shape; one bad request never takes the server down."""
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 413:
            return error_response(PayloadTooLarge(f"request body is larger than {MAX_BODY_BYTES} bytes"))
        message = {
            404: f"no route for {request.method} {request.path}",
            405: f"method {request.method} is not allowed on {request.path}",
        }.get(exc.status, exc.reason)
        body = error_body(message, type="invalid_request_error", code=_HTTP_CODES.get(exc.status))
        headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        return web.json_response(body, status=exc.status, headers=headers)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:  # noqa: BLE001
        log.exception("unhandled error on %s %s", request.method, request.path)
        body = error_body("internal server error", type="server_error", code="internal_error")
        return web.json_response(body, status=500)


def presented_secret(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    key = request.headers.get("x-api-key")
    return key.strip() if key else None


def secret_matches(presented: str | None, accepted: Collection[str]) -> bool:
    if presented is None:
        return False
    # Compare against every accepted secret so the time taken does not tell which one nearly matched.
    matched = False
    for secret in accepted:
        matched |= hmac.compare_digest(presented.encode(), secret.encode())
    return matched


def bearer_auth(accepted_for: Callable[[web.Request], Collection[str]]) -> Any:
    """Require ``Authorization: Bearer`` (or ``x-api-key``) where ``accepted_for`` names secrets."""

    @web.middleware
    async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        accepted = accepted_for(request)
        if accepted and not secret_matches(presented_secret(request), accepted):
            if presented_secret(request) is None:
                raise Unauthorized("missing credentials: send 'Authorization: Bearer <key>'")
            raise Unauthorized("the key sent is not valid here")
        return await handler(request)

    return auth_middleware


def _host_of(value: str) -> str:
    """The host part of a Host header or an Origin URL, lower-cased, without port or scheme."""
    value = value.split("://", 1)[-1].split("/", 1)[0].lower()
    if value.startswith("["):
        return value[: value.find("]") + 1]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def browser_guard(bind_host: str, allowed_origins: Collection[str] = ()) -> Any:
    """Refuse what a web page could make a browser send to a server on this machine.

    A page on another site can POST to loopback ports (no preflight for ``text/plain``) and, through DNS
    rebinding, even read the answers. Browsers always send ``Origin`` on such requests and the page's
    own name in ``Host``; OpenAI clients, curl and the fleet's components send no ``Origin``.
    """
    allowed = {_host_of(o) for o in allowed_origins}
    loopback_only = is_loopback(bind_host)

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin and origin != "null":
            host = _host_of(origin)
            if not (is_loopback(host) or host in allowed):
                raise Forbidden(f"requests from web pages at {origin} are not allowed (allowed_origins)")
        elif origin == "null":
            raise Forbidden("requests from sandboxed or file:// web pages are not allowed")
        if loopback_only and not is_loopback(_host_of(request.headers.get("Host", "localhost"))):
            raise Forbidden("this server answers only to localhost names (Host header)")
        return await handler(request)

    return guard


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 that says what is wrong with it."""
    return parse_json(await request.read())


def parse_json(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise BadRequest("the request body is empty; a JSON object was expected")
    body = body_limits.loads(raw)
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def new_app(middlewares: list[Any] | None = None, *, bind_host: str = "127.0.0.1",
            allowed_origins: Collection[str] = ()) -> web.Application:
    return web.Application(
        client_max_size=MAX_BODY_BYTES,
        middlewares=[busy_middleware, error_middleware, browser_guard(bind_host, allowed_origins),
                     *(middlewares or []), body_deadline_middleware],
    )


def run_daemon(main: Awaitable[None]) -> None:
    """Run a daemon's main coroutine, on uvloop where it is installed (less time per network hop)."""
    if os.environ.get("RBEE_NO_UVLOOP") != "1":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            uvloop.run(main)
            return
    asyncio.run(main)


async def serve(
    app: web.Application,
    host: str,
    port: int,
    *,
    on_ready: Callable[[], None] | None = None,
    before_shutdown: Callable[[web.Application], Awaitable[None]] | None = None,
    limits: ClientLimits | None = None,
) -> None:
    """Run ``app`` until SIGINT or SIGTERM, then shut down cleanly (cleanup contexts included).

    ``before_shutdown`` runs while the server still accepts connections (a drain answers them).
    """
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    assert runner.server is not None
    guard(runner.server, limits or ClientLimits())
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        print(f"cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        raise SystemExit(EXIT_PORT_IN_USE if exc.errno == errno.EADDRINUSE else 1) from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if on_ready is not None:
        on_ready()
    try:
        await stop.wait()
        if before_shutdown is not None:
            await before_shutdown(app)
    finally:
        await runner.cleanup()
