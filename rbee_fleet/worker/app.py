"""The worker's aiohttp application."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from rbee_fleet.common.http import bearer_auth, new_app
from rbee_fleet.contracts.fleet import WorkerState
from rbee_fleet.worker import openai_api
from rbee_fleet.worker.heartbeat import HeartbeatSender
from rbee_fleet.worker.openai_api import RUNTIME
from rbee_fleet.worker.parent import watch_parent
from rbee_fleet.worker.runtime import Runtime, WorkerSettings

log = logging.getLogger(__name__)

HEARTBEAT = web.AppKey("heartbeat", HeartbeatSender)


async def health(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    body = runtime.heartbeat().model_dump(mode="json")
    body["error"] = runtime.error
    return web.json_response(body)


async def models(request: web.Request) -> web.Response:
    spec = request.app[RUNTIME].spec
    return web.json_response({"object": "list", "data": [{"id": spec.model_id, "object": "model", "created": 0, "owned_by": "rbee-fleet"}]})


def create_app(settings: WorkerSettings) -> web.Application:
    runtime = Runtime(settings)
    token = settings.token
    app = new_app([bearer_auth(lambda _req: (token,) if token else ())], bind_host=settings.host)
    app[RUNTIME] = runtime
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", openai_api.chat_completions)
    app.router.add_post("/v1/completions", openai_api.completions)
    app.cleanup_ctx.append(_lifecycle)
    return app


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    runtime = app[RUNTIME]
    session = aiohttp.ClientSession()
    sender = HeartbeatSender(runtime, session)
    app[HEARTBEAT] = sender
    tasks = [asyncio.create_task(runtime.load(), name="load-model"), asyncio.create_task(sender.run(), name="heartbeat")]
    if runtime.settings.exit_with_parent:
        tasks.append(asyncio.create_task(watch_parent(lambda: os.kill(os.getpid(), signal.SIGTERM)), name="watch-parent"))
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await sender.say_goodbye()
        await session.close()
        if runtime.backend is not None:
            await asyncio.to_thread(runtime.backend.close)


async def drain(app: web.Application) -> None:
    """Stop taking requests, tell the queen, and let running ones finish (bounded)."""
    runtime = app[RUNTIME]
    if runtime.state is WorkerState.READY:
        runtime.set_state(WorkerState.DRAINING)
        await app[HEARTBEAT].send()
        if runtime.admission is not None:
            await runtime.admission.wait_idle(runtime.settings.drain_timeout_s)
