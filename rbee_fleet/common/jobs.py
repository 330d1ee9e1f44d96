"""Jobs: every operation runs as a job with an id and an SSE stream of progress events.

The server side (``JobRegistry`` and ``job_routes``) is shared by the queen and the hive; the client
side (``JobClient``) by the queen (to reach remote hives) and the keeper.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import aiohttp
from aiohttp import web
from pydantic import BaseModel

from rbee_fleet.common import sse
from rbee_fleet.common.errors import BadRequest, NotFound, OperationFailed, error_from_body
from rbee_fleet.common.http import read_json
from rbee_fleet.common.validation import validate
from rbee_fleet.contracts.fleet import JobCreated, JobEvent, JobInfo, JobRequest, JobState, Progress

log = logging.getLogger(__name__)

KEEP_FINISHED_JOBS = 500
PING_INTERVAL_S = 15.0


class Emitter:
    """What a running operation uses to report progress on its job."""

    def __init__(self, job: Job) -> None:
        self._job = job

    @property
    def job_id(self) -> str:
        return self._job.id

    def progress(
        self,
        message: str,
        current: float | None = None,
        total: float | None = None,
        unit: str = "",
        data: dict[str, Any] | None = None,
    ) -> None:
        prog = Progress(current=current, total=total, unit=unit) if current is not None else None
        self._job.append("progress", message, progress=prog, data=data)

    def log(self, message: str, data: dict[str, Any] | None = None) -> None:
        self._job.append("log", message, data=data)

    def relay(self, event: JobEvent) -> None:
        """Re-emit an event received from another component's job (not its terminal events)."""
        if event.type in ("progress", "log"):
            self._job.append(event.type, event.message, progress=event.progress, data=event.data)


Runner = Callable[[Emitter], Awaitable[dict[str, Any] | None]]


class Job:
    def __init__(self, job_id: str, operation: dict[str, Any]) -> None:
        self.id = job_id
        self.operation = operation
        self.state = JobState.RUNNING
        self.created_at = time.time()
        self.finished_at: float | None = None
        self.error: str | None = None
        self.result: dict[str, Any] | None = None
        self.events: list[JobEvent] = []
        self.task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    def append(self, type: str, message: str = "", **fields: Any) -> None:
        event = JobEvent(
            job_id=self.id, seq=len(self.events), type=type, message=message, ts=time.time(), **fields
        )
        self.events.append(event)
        self._changed.set()
        self._changed = asyncio.Event()

    @property
    def finished(self) -> bool:
        return self.state is not JobState.RUNNING

    def info(self) -> JobInfo:
        return JobInfo(
            job_id=self.id,
            operation=self.operation,
            state=self.state,
            created_at=self.created_at,
            finished_at=self.finished_at,
            error=self.error,
            result=self.result,
        )

    async def follow(self, after: int = -1, ping_s: float | None = None) -> AsyncIterator[JobEvent | None]:
        """Yield events with ``seq > after`` as they come; ``None`` when ``ping_s`` passes quietly."""
        index = after + 1
        while True:
            while index < len(self.events):
                yield self.events[index]
                index += 1
            if self.finished:
                return
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), ping_s)
            except asyncio.TimeoutError:
                yield None

    async def wait(self) -> None:
        async for _ in self.follow(len(self.events) - 1):
            pass


class JobRegistry:
    """Runs operations as jobs and keeps the recent ones for their streams."""

    def __init__(self, keep: int = KEEP_FINISHED_JOBS) -> None:
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._keep = keep

    def submit(self, operation: BaseModel | dict[str, Any], runner: Runner, *, join: bool = False) -> Job:
        """Run ``operation`` as a new job; with ``join``, the same operation already running is that job
        (an idempotent operation asked for twice is done, and listed, once)."""
        op = operation.model_dump(mode="json") if isinstance(operation, BaseModel) else operation
        if join:
            running = next((j for j in self._jobs.values() if not j.finished and j.operation == op), None)
            if running is not None:
                return running
        job = Job(uuid.uuid4().hex[:16], op)
        self._jobs[job.id] = job
        self._trim()
        job.append("started", f"{op.get('kind', 'operation')} started", data={"operation": op})
        job.task = asyncio.create_task(self._run(job, runner), name=f"job-{job.id}")
        return job

    async def _run(self, job: Job, runner: Runner) -> None:
        try:
            result = await runner(Emitter(job))
        except asyncio.CancelledError:
            job.state = JobState.CANCELLED
            job.error = "cancelled"
            job.finished_at = time.time()
            job.append("cancelled", "cancelled")
            return
        except OperationFailed as exc:
            self._fail(job, str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - a job never takes its server down
            log.exception("job %s failed", job.id)
            self._fail(job, f"{type(exc).__name__}: {exc}")
            return
        if result is not None and not isinstance(result, dict):
            self._fail(job, f"internal error: the operation returned {type(result).__name__}, not a mapping")
            return
        job.result = result or {}
        job.state = JobState.SUCCEEDED
        job.finished_at = time.time()
        job.append("result", "done", data=job.result)

    @staticmethod
    def _fail(job: Job, message: str) -> None:
        log.warning("job %s (%s) failed: %s", job.id, job.operation.get("kind", "operation"), message)
        job.state = JobState.FAILED
        job.error = message
        job.finished_at = time.time()
        job.append("error", message)

    def _trim(self) -> None:
        finished = [j for j in self._jobs.values() if j.finished]
        for job in finished[: max(0, len(finished) - self._keep)]:
            del self._jobs[job.id]

    def get(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job with id {job_id!r}", param="job_id")
        return job

    def list(self) -> list[Job]:
        return list(self._jobs.values())

    async def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job.task is not None and not job.finished:
            job.task.cancel()
            await asyncio.gather(job.task, return_exceptions=True)
        return job

    async def close(self) -> None:
        tasks = [j.task for j in self._jobs.values() if j.task is not None and not j.finished]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class JobHost(Protocol):
    """A server that runs jobs: it owns a registry and turns a job request into a job."""

    jobs: JobRegistry

    def dispatch(self, request: JobRequest) -> Job: ...


def job_routes(host_key: web.AppKey[Any]) -> web.RouteTableDef:
    """The job API (``/v1/jobs``) of the ``JobHost`` stored in the app under ``host_key``."""

    routes = web.RouteTableDef()

    @routes.post("/v1/jobs")
    async def create(request: web.Request) -> web.Response:
        body = await read_json(request)
        job_request = validate(JobRequest, body)
        job = request.app[host_key].dispatch(job_request)
        return web.json_response(JobCreated(job_id=job.id).model_dump(), status=202)

    @routes.get("/v1/jobs")
    async def list_jobs(request: web.Request) -> web.Response:
        jobs = [j.info().model_dump(mode="json") for j in request.app[host_key].jobs.list()]
        return web.json_response({"jobs": jobs})

    @routes.get("/v1/jobs/{job_id}")
    async def get_job(request: web.Request) -> web.Response:
        job = request.app[host_key].jobs.get(request.match_info["job_id"])
        return web.json_response(job.info().model_dump(mode="json"))

    @routes.get("/v1/jobs/{job_id}/stream")
    async def stream(request: web.Request) -> web.StreamResponse:
        job = request.app[host_key].jobs.get(request.match_info["job_id"])
        raw = request.headers.get("Last-Event-ID") or request.query.get("after", "-1")
        try:
            after = max(-1, int(raw))
        except ValueError:
            raise BadRequest(f"'after' (or Last-Event-ID) must be an event number, not {raw!r}", param="after") from None
        response = await sse.start_stream(request)
        async for event in job.follow(after, ping_s=PING_INTERVAL_S):
            if event is None:
                await response.write(sse.PING)
            else:
                await response.write(b"id: %d\n" % event.seq + sse.encode(event.model_dump_json()))
        await response.write(sse.DONE)
        return response

    @routes.delete("/v1/jobs/{job_id}")
    async def cancel(request: web.Request) -> web.Response:
        job = await request.app[host_key].jobs.cancel(request.match_info["job_id"])
        return web.json_response(job.info().model_dump(mode="json"))

    return routes


class JobClient:
    """Submit operations to a queen or hive and follow their event streams."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, headers: dict[str, str] | None = None):
        self._session = session
        self._base = base_url.rstrip("/")
        self._headers = headers if headers is not None else {}  # shared: the caller may update it

    async def submit(self, operation: BaseModel | dict[str, Any]) -> str:
        op = operation.model_dump(mode="json") if isinstance(operation, BaseModel) else operation
        async with self._session.post(
            f"{self._base}/v1/jobs", json={"operation": op}, headers=self._headers
        ) as resp:
            body = await resp.json(content_type=None)
            if resp.status >= 400:
                raise error_from_body(resp.status, body)
            return JobCreated.model_validate(body).job_id

    async def events(self, job_id: str, after: int = -1) -> AsyncIterator[JobEvent]:
        url = f"{self._base}/v1/jobs/{job_id}/stream"
        timeout = aiohttp.ClientTimeout(total=None, sock_read=PING_INTERVAL_S * 3)
        async with self._session.get(
            url, params={"after": str(after)}, headers=self._headers, timeout=timeout
        ) as resp:
            if resp.status >= 400:
                raise error_from_body(resp.status, await resp.json(content_type=None))
            async for data in sse.iter_events(resp.content):
                if data == "[DONE]":
                    return
                yield JobEvent.model_validate_json(data)

    async def cancel(self, job_id: str) -> None:
        async with self._session.delete(f"{self._base}/v1/jobs/{job_id}", headers=self._headers) as resp:
            if resp.status >= 400 and resp.status != 404:
                raise error_from_body(resp.status, await resp.json(content_type=None))

    async def run(
        self, operation: BaseModel | dict[str, Any], on_event: Callable[[JobEvent], None] | None = None
    ) -> dict[str, Any]:
        """Submit, follow to the end, and return the result; raise ``OperationFailed`` on error."""
        job_id = await self.submit(operation)
        try:
            async for event in self.events(job_id):
                if on_event is not None:
                    on_event(event)
                if event.type == "result":
                    return event.data or {}
                if event.type == "error":
                    raise OperationFailed(event.message)
                if event.type == "cancelled":
                    raise OperationFailed("cancelled")
        except asyncio.CancelledError:
            await asyncio.shield(self._cancel_quietly(job_id))
            raise
        raise OperationFailed(f"job {job_id}: stream ended without a result")

    async def _cancel_quietly(self, job_id: str) -> None:
        try:
            await self.cancel(job_id)
        except Exception:  # noqa: BLE001 - best effort on the way out
            log.debug("could not cancel job %s", job_id, exc_info=True)

