"""The queen's aiohttp application."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Collection

import aiohttp
from aiohttp import web

from rbee_fleet.common.http import bearer_auth, new_app
from rbee_fleet.common.jobs import job_routes
from rbee_fleet.queen.api import fleet, openai
from rbee_fleet.queen.api.keys import QUEEN, SETTINGS
from rbee_fleet.queen.drain import DRAIN, Drain
from rbee_fleet.queen.settings import QueenSettings
from rbee_fleet.queen.state import Queen

UPSTREAM_KEEPALIVE_S = 3.0
COMPONENT_PATHS = frozenset({"/v1/worker-heartbeat", "/v1/worker-pulse", "/v1/hive-heartbeat"})
PUBLIC_PATHS = frozenset({"/health"})


def _auth_rules(settings: QueenSettings):
    """Who may call what.

    Heartbeats and operations (starting or stopping jobs: spawning workers, downloading and deleting
    models) need the cluster token, which only the fleet's own components and the keeper hold; an API
    key for the OpenAI endpoints does not make its holder an operator. Everything else needs an API key
    (or the token) once keys are configured.
    """
    token = (settings.cluster_token,) if settings.cluster_token else ()
    keys = (*settings.api_keys, *token) if settings.api_keys else ()

    def accepted(request: web.Request) -> Collection[str]:
        if request.path in PUBLIC_PATHS:
            return ()
        if request.path in COMPONENT_PATHS:
            return token
        if request.path.startswith("/v1/jobs") and request.method in ("POST", "DELETE"):
            return token
        if request.path.startswith("/v1/hives/") and request.method == "DELETE":
            return token
        return keys

    return accepted


def create_app(settings: QueenSettings, *, reconcile: bool = True) -> web.Application:
    settings.check_security()
    drain = Drain()
    app = new_app([bearer_auth(_auth_rules(settings)), drain.middleware], bind_host=settings.config.host,
                  allowed_origins=settings.config.allowed_origins)
    app[SETTINGS] = settings
    app[DRAIN] = drain
    openai.add_routes(app)
    fleet.add_routes(app)
    app.router.add_routes(job_routes(QUEEN))
    app.cleanup_ctx.append(_lifecycle(reconcile))
    return app


def _lifecycle(reconcile: bool):
    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        # Idle connections are dropped before llama-server's own 5 s keep-alive ends, so a reused one is
        # rarely one it is closing (the proxy retries that case on a new connection anyway).
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=UPSTREAM_KEEPALIVE_S)
        session = aiohttp.ClientSession(connector=connector)
        queen = Queen(app[SETTINGS], session)
        app[QUEEN] = queen
        await queen.start()
        sweeper = asyncio.create_task(queen.sweep_forever(), name="registry-sweep")
        if reconcile:
            queen.ensure_declared_workers()
        try:
            yield
        finally:
            sweeper.cancel()
            await asyncio.gather(sweeper, return_exceptions=True)
            await queen.close()
            await session.close()

    return lifecycle
