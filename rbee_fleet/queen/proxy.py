"""The hot path: place a request on a worker and pass the worker's bytes through untouched.

A worker that fails before its first byte is replaced by another; one that dies mid-stream ends the
client's stream with an error event. Headers go to the client only once the first byte is in hand.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from rbee_fleet.common import sse
from rbee_fleet.common.errors import ApiError, Unavailable, UpstreamFailed, error_body, error_from_body
from rbee_fleet.contracts.stream import ERROR_EVENT_MARK, error_event, usage_in
from rbee_fleet.queen.metrics import QueenMetrics
from rbee_fleet.queen.registry import Registry, WorkerRecord
from rbee_fleet.queen.scheduler import Lease, NoOtherWorker, Route, Scheduler

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
STALE_RETRIES = 2  # a reused keep-alive connection the worker had closed: the same worker, a new connection
TAIL = 4096  # bytes of the stream kept to read its closing usage and end marker
# What a complete stream ends with, per endpoint.
END_MARKS = {
    "chat/completions": b"data: [DONE]",
    "completions": b"data: [DONE]",
    "responses": b"response.completed",
    "messages": b"message_stop",
}


WATCH_INTERVAL_S = 0.5


@dataclass(frozen=True)
class Dispatch:
    """What serving decided for one request, for the proxy to carry out."""

    endpoint: str  # the route under /v1/
    model: str
    stream: bool
    body: bytes  # what the worker gets (rewritten by serving where needed)
    needs: dict[str, str] = field(default_factory=dict)  # capability -> the request field needing it
    hive: str | None = None  # only this hive's workers (X-Rbee-Hive)
    route: Route | None = None  # the prefix router's chooser among the workers; None: least busy
    started: web.StreamResponse | None = None  # an SSE response already begun (a wait for an on-demand load)


class _Watchdog:
    """Ends an attempt whose worker falls silent, so a paused or vanished host never hangs a client.

    Silence is judged by the registry: a worker that pulses is out after the pulse timeout (4 s by
    default), so a frozen host is noticed within seconds, while a live worker busy with a long prompt
    keeps pulsing and is never cut.

    Before the worker's headers arrive it cancels the attempt (which becomes a retry elsewhere); after,
    it closes the upstream connection (which ends the client's stream with an error event).
    """

    def __init__(self, registry: Registry, record: WorkerRecord) -> None:
        self.lost: str | None = None
        self.shutdown = False  # cut by the queen's drain, not by the worker
        self.upstream: aiohttp.ClientResponse | None = None
        self._registry = registry
        self._record = record
        self._task = asyncio.current_task()
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_later(WATCH_INTERVAL_S, self._check)

    def _check(self) -> None:
        if self._registry.is_live(self._record):
            self._handle = self._loop.call_later(WATCH_INTERVAL_S, self._check)
            return
        self.cut(f"no heartbeat or pulse for {time.monotonic() - self._record.last_seen:.1f} s")

    def cut(self, why: str) -> None:
        """End the attempt: a retry before the worker's headers, an error event after."""
        self.lost = why
        if self.upstream is not None:
            self.upstream.close()
        elif self._task is not None:
            self._task.cancel()

    def stop(self) -> None:
        self._handle.cancel()


class _Retry(Exception):
    def __init__(self, error: ApiError) -> None:
        self.error = error


class WorkerProxy:
    def __init__(
        self,
        scheduler: Scheduler,
        session: aiohttp.ClientSession,
        metrics: QueenMetrics,
        token: str | None,
        read_timeout_s: float,
    ) -> None:
        self.scheduler = scheduler
        self.session = session
        self.metrics = metrics
        self._headers = {"Content-Type": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=read_timeout_s)
        self._attempts: set[_Watchdog] = set()

    def cut_all(self, why: str) -> None:
        """End every attempt in flight (the queen's drain timeout has passed); streams get an error event."""
        for dog in list(self._attempts):
            dog.shutdown = True
            dog.cut(why)

    async def forward(self, request: web.Request, d: Dispatch) -> web.StreamResponse:
        """Relay the request's body to a worker of its model, and the worker's answer back."""
        model = d.model
        m = self.metrics
        started = time.monotonic()
        # Metrics are labelled by model; names no worker serves share one label, whatever clients send.
        label = model if self.scheduler.registry.knows(model) else "(unknown)"
        gauge = m.in_flight.labels(label)
        gauge.inc()
        status = 500
        try:
            self.scheduler.registry.refuse_unable(model, d.needs)
            response = await self._place(request, d, started)
            status = response.status
            return response
        except ApiError as exc:
            status = exc.status
            m.errors.labels(label, exc.code or exc.type).inc()
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            status = 499  # the client closed the connection (nginx's name for it)
            raise
        finally:
            gauge.dec()
            m.requests.labels(label, d.endpoint, str(status)).inc()
            m.duration.labels(label).observe(time.monotonic() - started)

    async def _place(self, request: web.Request, d: Dispatch, started: float) -> web.StreamResponse:
        model = d.model
        tried: set[object] = set()  # worker instances: a restarted worker is a new one, usable at once
        last_error: ApiError | None = None
        if d.hive is not None:
            last_error = Unavailable(f"no worker of {model!r} on hive {d.hive!r} is ready", retry_after=5)
        for _ in range(MAX_ATTEMPTS):
            try:
                lease = await self.scheduler.acquire(model, tried, frozenset(d.needs), d.route, d.hive)
            except NoOtherWorker:
                assert last_error is not None
                raise last_error from None
            try:
                return await self._attempt(request, lease, d, started)
            except _Retry as retry:
                tried.add(lease.record.instance)
                last_error = retry.error
                self.metrics.retries.labels(model).inc()
                log.warning("worker %s failed before answering (%s); trying another", lease.record.id, retry.error.message)
            finally:
                lease.release()
        assert last_error is not None
        raise last_error

    async def _attempt(self, request: web.Request, lease: Lease, d: Dispatch, started: float) -> web.StreamResponse:
        rec = lease.record
        dog = _Watchdog(self.scheduler.registry, rec)
        self._attempts.add(dog)
        try:
            return await self._exchange(request, rec, dog, d, started)
        finally:
            self._attempts.discard(dog)
            dog.stop()

    async def _exchange(
        self, request: web.Request, rec: WorkerRecord, dog: _Watchdog, d: Dispatch, started: float,
    ) -> web.StreamResponse:
        url = f"{rec.hb.url}/v1/{d.endpoint}"
        model, body = d.model, d.body
        stale = 0
        while True:
            try:
                upstream = await self.session.post(url, data=body, headers=self._headers, timeout=self._timeout)
                break
            except asyncio.CancelledError:
                if dog.lost is None:
                    raise  # the client went away
                _uncancel()
                raise _Retry(UpstreamFailed(f"worker {rec.id} stopped answering ({dog.lost})")) from None
            except aiohttp.ServerDisconnectedError:
                # The worker closed a pooled keep-alive connection as we reused it (llama-server does this
                # now and then): nothing was processed, so the same worker gets it again on a new connection.
                stale += 1
                if stale > STALE_RETRIES:
                    raise _Retry(UpstreamFailed(f"worker {rec.id} at {rec.hb.url} closed the connection "
                                                "before answering")) from None
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                raise _Retry(UpstreamFailed(f"worker {rec.id} at {rec.hb.url} could not be reached: {_why(exc)}")) from None
        dog.upstream = upstream
        finished = False
        try:
            if upstream.status != 200:
                payload = await _read_or_retry(upstream, rec.id, dog)
                if upstream.status in (429, 503) or (upstream.status >= 500 and upstream.status != 501):
                    raise _Retry(error_from_body(upstream.status, _json(payload), upstream.headers.get("Retry-After")))
                finished = True
                status, payload = openai_error(upstream.status, payload)
                return web.Response(body=payload, status=status, content_type="application/json")
            if not d.stream:
                payload = await _read_or_retry(upstream, rec.id, dog)
                finished = True
                self.metrics.count_usage(model, usage_of(_json(payload)))
                return web.Response(body=payload, content_type="application/json")
            response = await self._relay(request, upstream, rec.id, dog, d, started)
            finished = True
            return response
        finally:
            # A stream cut short (client gone, worker failing) closes the connection, which is
            # what tells the worker to stop generating.
            if finished and upstream.content.at_eof():
                upstream.release()
            else:
                upstream.close()

    async def _relay(
        self, request: web.Request, upstream: aiohttp.ClientResponse, worker_id: str, dog: _Watchdog, d: Dispatch,
        started: float,
    ) -> web.StreamResponse:
        model, end_mark = d.model, END_MARKS[d.endpoint]
        try:
            first = await upstream.content.readany()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            why = dog.lost or _why(exc)
            raise _Retry(UpstreamFailed(f"worker {worker_id} failed before its first byte: {why}")) from None
        if not first:
            raise _Retry(UpstreamFailed(f"worker {worker_id} closed the stream before its first byte"))
        self.metrics.ttft.labels(model).observe(time.monotonic() - started)
        out = d.started or web.StreamResponse(headers=sse.SSE_HEADERS)
        if not out.prepared:
            await out.prepare(request)
        await out.write(first)
        tail = first[-TAIL:]
        failure = None
        read = upstream.content.readany
        while True:
            try:
                chunk = await read()
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                failure = dog.lost or _why(exc)
                break
            if not chunk:
                break
            await out.write(chunk)  # a client that went away raises here: not the worker's doing
            tail = (tail + chunk)[-TAIL:]
        if end_mark in tail and failure is None:
            self.metrics.count_usage(model, usage_in(tail) or usage_from_tail(tail))
        elif ERROR_EVENT_MARK in tail and failure is None:
            # The worker ended its own stream with an error event: the client has it already.
            self.metrics.errors.labels(model, "worker_error_mid_stream").inc()
        elif dog.shutdown:
            self.metrics.errors.labels(model, "shutting_down").inc()
            gap = b"" if tail.endswith(b"\n\n") else b"\n\n"
            await out.write(gap + error_event(f"the answer was cut short: {dog.lost}", code="shutting_down"))
        else:
            reason = failure or "the connection closed"
            log.warning("worker %s stopped mid-stream: %s", worker_id, reason)
            self.metrics.errors.labels(model, "worker_died_mid_stream").inc()
            gap = b"" if tail.endswith(b"\n\n") else b"\n\n"
            await out.write(gap + error_event(
                f"worker {worker_id} stopped in the middle of the answer ({reason})", code="worker_failed"
            ))
        await out.write_eof()
        return out


async def _read_or_retry(upstream: aiohttp.ClientResponse, worker_id: str, dog: _Watchdog) -> bytes:
    try:
        return await upstream.read()
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        why = dog.lost or _why(exc)
        raise _Retry(UpstreamFailed(f"worker {worker_id} failed while answering: {why}")) from None


def _uncancel() -> None:
    """Forget a cancellation the watchdog made (Python 3.11+ counts them)."""
    task = asyncio.current_task()
    uncancel = getattr(task, "uncancel", None)
    if uncancel is not None:
        uncancel()


def usage_from_tail(tail: bytes) -> dict[str, int] | None:
    """Token counts from the last events of a stream: an OpenAI ``usage`` object, or llama-server's
    ``timings`` (on every final chunk, whether or not the client asked for usage)."""
    found: dict | None = None
    for event in reversed(tail.split(b"\n\n")):
        for line in event.split(b"\n"):
            if not line.startswith(b"data: {"):
                continue
            try:
                data = json.loads(line[6:])
            except ValueError:
                continue
            if not isinstance(data, dict):
                continue
            if found is None and (isinstance(data.get("usage"), dict) or "timings" in data):
                found = data
            elif found is not None and isinstance(data.get("timings"), dict) and "timings" not in found:
                # The usage event may come after the event with llama-server's timings.
                found = {**found, "timings": data["timings"]}
            if found is not None and "timings" in found and isinstance(found.get("usage"), dict):
                return usage_of(found)
    return usage_of(found)


def usage_of(data: dict | None) -> dict | None:
    """The token counts of an answer (or a stream event): its ``usage``, else llama-server's ``timings``,
    with the prompt tokens taken from the worker's KV cache as OpenAI's ``prompt_tokens_details``."""
    if data is None:
        return None
    timings = data.get("timings") if isinstance(data.get("timings"), dict) else {}
    usage = data.get("usage")
    if isinstance(usage, dict) and "completion_tokens" in usage:
        if "cache_n" in timings and not isinstance(usage.get("prompt_tokens_details"), dict):
            usage = {**usage, "prompt_tokens_details": {"cached_tokens": int(timings["cache_n"])}}
        return usage
    if "predicted_n" in timings:
        prompt = int(timings.get("prompt_n", 0)) + int(timings.get("cache_n", 0))
        return {"prompt_tokens": prompt, "completion_tokens": int(timings["predicted_n"]),
                "total_tokens": prompt + int(timings["predicted_n"]),
                "prompt_tokens_details": {"cached_tokens": int(timings.get("cache_n", 0))}}
    return None


def openai_error(status: int, payload: bytes) -> tuple[int, bytes]:
    """A worker's error response in OpenAI's shape (llama-server's has a numeric code and its own types)."""
    body = _json(payload)
    detail = body.get("error") if body else None
    if isinstance(detail, dict) and (detail.get("code") is None or isinstance(detail.get("code"), str)) \
            and "param" in detail:
        return status, payload  # already OpenAI's shape (rbee-fleet's own workers)
    message = str(detail.get("message") if isinstance(detail, dict) else (detail or payload[:300].decode(errors="replace")))
    kind = str(detail.get("type", "")) if isinstance(detail, dict) else ""
    if status == 501:  # llama-server: a feature this engine or model lacks: the request, not the server
        status, code = 400, "unsupported_parameter"
    elif kind == "exceed_context_size_error" or "context" in message.lower() and status == 400:
        code = "context_length_exceeded"
    else:
        code = {400: "invalid_request", 401: "invalid_api_key", 404: "not_found"}.get(status, kind or None)
    error_type = "invalid_request_error" if 400 <= status < 500 else "server_error"
    if status == 401:
        error_type = "authentication_error"
    return status, json.dumps(error_body(message, type=error_type, code=code)).encode()


def _json(payload: bytes) -> dict | None:
    try:
        value = json.loads(payload)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _why(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__
