"""The standalone hive's HTTP app: the job API over its operations, status, and heartbeats to the queen."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from rbee_fleet.common.errors import Unavailable
from rbee_fleet.common.http import Handler, bearer_auth, new_app
from rbee_fleet.common.jobs import Job, JobRegistry, job_routes
from rbee_fleet.contracts.fleet import JobRequest
from rbee_fleet.hive.service import HiveService, HiveSettings

log = logging.getLogger(__name__)


class HiveJobs:
    """Runs each job request as a hive operation."""

    def __init__(self, service: HiveService) -> None:
        self.service = service
        self.jobs = JobRegistry()
        self.draining = False

    def dispatch(self, request: JobRequest) -> Job:
        op = request.operation
        return self.jobs.submit(op, lambda emit: self.service.run(op, emit))


SETTINGS = web.AppKey("settings", HiveSettings)
JOBS = web.AppKey("jobs", HiveJobs)


def _service(request: web.Request) -> HiveService:
    return request.app[JOBS].service


async def health(request: web.Request) -> web.Response:
    return web.json_response(_service(request).status().model_dump(mode="json"))


async def workers(request: web.Request) -> web.Response:
    return web.json_response({"workers": [w.model_dump(mode="json") for w in _service(request).supervisor.list()]})


async def models(request: web.Request) -> web.Response:
    return web.json_response({"models": [m.model_dump(mode="json") for m in _service(request).models()]})


async def devices(request: web.Request) -> web.Response:
    return web.json_response(_service(request).devices().model_dump(mode="json"))


@web.middleware
async def _refuse_jobs_when_draining(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.method == "POST" and request.path.startswith("/v1/jobs") and request.app[JOBS].draining:
        raise Unavailable("the hive is shutting down and takes no new operations; retry later",
                          code="shutting_down", retry_after=5)
    return await handler(request)


async def drain(app: web.Application) -> None:
    """On SIGTERM: refuse new operations, then stop the workers, each finishing its answers in flight.

    The hive keeps answering status requests meanwhile; a worker drains for its own drain timeout and is
    killed only after the supervisor's stop grace.
    """
    jobs = app[JOBS]
    jobs.draining = True
    log.info("hive shutting down: stopping %d worker(s), each after its answers in flight",
             len(jobs.service.supervisor.list()))
    await jobs.service.supervisor.close()


def create_app(settings: HiveSettings) -> web.Application:
    token = settings.token
    app = new_app([bearer_auth(lambda _req: (token,) if token else ()), _refuse_jobs_when_draining],
                  bind_host=settings.bind_host)
    app[SETTINGS] = settings
    app.router.add_get("/health", health)
    app.router.add_get("/v1/workers", workers)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/devices", devices)
    app.router.add_routes(job_routes(JOBS))
    app.cleanup_ctx.append(_lifecycle)
    return app


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    session = aiohttp.ClientSession()
    service = HiveService(settings, session)
    await service.start()
    app[JOBS] = HiveJobs(service)
    beat = asyncio.create_task(_heartbeats(service, session), name="hive-heartbeat")
    try:
        yield
    finally:
        beat.cancel()
        await asyncio.gather(beat, return_exceptions=True)
        await app[JOBS].jobs.close()
        await service.close()
        await session.close()


async def _heartbeats(service: HiveService, session: aiohttp.ClientSession) -> None:
    settings = service.settings
    if not settings.queen_url:
        return
    url = f"{settings.queen_url.rstrip('/')}/v1/hive-heartbeat"
    headers = {"Authorization": f"Bearer {settings.token}"} if settings.token else {}
    failing = False
    while True:
        try:
            payload = service.status().model_dump(mode="json")
            async with session.post(url, json=payload, headers=headers, timeout=aiohttp.ClientTimeout(total=5)) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}")
            if failing:
                log.info("hive heartbeats reach the queen again")
            failing = False
        except Exception as exc:  # noqa: BLE001 - keep trying while the queen is away
            if not failing:
                log.warning("hive heartbeat to %s failed: %s (will keep trying)", url, exc)
            failing = True
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.sleep(settings.heartbeat_interval_s)
