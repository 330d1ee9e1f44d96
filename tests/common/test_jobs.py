"""The job pattern over a real aiohttp server: submit, stream events to [DONE], fail clearly, cancel."""

import asyncio

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from rbee_fleet.common.errors import OperationFailed
from rbee_fleet.common.http import new_app
from rbee_fleet.common.jobs import JobClient, JobRegistry, job_routes
from rbee_fleet.contracts.fleet import JobRequest, ModelDownloadOp


class ScriptedHost:
    """A job host whose operations are scripted by the test (the job machinery is what is tested)."""

    def __init__(self) -> None:
        self.jobs = JobRegistry()
        self.release = asyncio.Event()

    def dispatch(self, request: JobRequest):
        op = request.operation

        async def run(emit):
            if op.source == "fail":
                emit.progress("about to fail")
                raise OperationFailed("the source is unreachable: connection refused")
            if op.source == "block":
                emit.progress("waiting")
                await self.release.wait()
            for i in range(3):
                emit.progress("copying", i + 1, 3, "bytes")
            return {"model": op.name or op.source}

        return self.jobs.submit(op, run)


HOST = web.AppKey("host", ScriptedHost)


@pytest.fixture
async def client():
    app = new_app()
    app[HOST] = ScriptedHost()
    app.router.add_routes(job_routes(HOST))
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    async with aiohttp.ClientSession() as session:
        base = str(server.make_url("/"))
        yield JobClient(session, base), app[HOST], session, base
    await server.close()


async def test_job_streams_progress_then_result(client):
    jobs, _, _, _ = client
    events = []
    result = await jobs.run(ModelDownloadOp(source="x", name="y"), on_event=events.append)
    assert result == {"model": "y"}
    assert [e.type for e in events] == ["started", "progress", "progress", "progress", "result"]
    assert [e.seq for e in events] == list(range(5))
    assert events[3].progress.current == 3 and events[3].progress.total == 3


async def test_failed_job_ends_with_error_event(client):
    jobs, _, _, _ = client
    with pytest.raises(OperationFailed, match="connection refused"):
        await jobs.run(ModelDownloadOp(source="fail"))


async def test_late_subscriber_gets_the_whole_history_and_done(client):
    jobs, host, session, base = client
    job_id = await jobs.submit(ModelDownloadOp(source="x"))
    await asyncio.sleep(0.1)
    async with session.get(f"{base}v1/jobs/{job_id}/stream") as resp:
        text = await resp.text()
    assert text.rstrip().endswith("data: [DONE]")
    assert text.count('"type":"progress"') == 3


async def test_cancel_a_running_job(client):
    jobs, host, session, base = client
    job_id = await jobs.submit(ModelDownloadOp(source="block"))
    await asyncio.sleep(0.05)
    await jobs.cancel(job_id)
    events = [e async for e in jobs.events(job_id)]
    assert events[-1].type == "cancelled"
    async with session.get(f"{base}v1/jobs/{job_id}") as resp:
        assert (await resp.json())["state"] == "cancelled"


async def test_bad_job_request_is_400_in_openai_shape(client):
    _, _, session, base = client
    async with session.post(f"{base}v1/jobs", json={"operation": {"kind": "reticulate"}}) as resp:
        body = await resp.json()
    assert resp.status == 400
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["param"].startswith("operation")
    async with session.get(f"{base}v1/jobs/nope/stream") as resp:
        assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"


async def test_the_browser_guard_refuses_foreign_pages_and_rebound_names(client):
    _, _, session, base = client
    async with session.get(f"{base}v1/jobs", headers={"Origin": "https://evil.example"}) as resp:
        assert resp.status == 403 and (await resp.json())["error"]["code"] == "forbidden"
    async with session.get(f"{base}v1/jobs", headers={"Origin": "null"}) as resp:
        assert resp.status == 403
    async with session.get(f"{base}v1/jobs", headers={"Host": "attacker.example:80"}) as resp:
        assert resp.status == 403
    async with session.get(f"{base}v1/jobs", headers={"Origin": "http://127.0.0.1:5173"}) as resp:
        assert resp.status == 200


async def test_stream_position_must_be_a_number_and_never_replays(client):
    jobs, _, session, base = client
    job_id = await jobs.submit(ModelDownloadOp(source="x"))
    await asyncio.sleep(0.1)
    async with session.get(f"{base}v1/jobs/{job_id}/stream", params={"after": "abc"}) as resp:
        assert resp.status == 400 and (await resp.json())["error"]["param"] == "after"
    events = [e async for e in jobs.events(job_id, after=-5)]
    assert [e.seq for e in events] == list(range(len(events)))  # from the start, each once
    assert [e.seq for e in [e async for e in jobs.events(job_id, after=2)]] == list(range(3, len(events)))


async def test_an_operation_joined_while_it_runs_is_one_job():
    registry = JobRegistry()
    release = asyncio.Event()
    runs = 0

    async def run(emit):
        nonlocal runs
        runs += 1
        await release.wait()
        return {"done": True}

    op = ModelDownloadOp(source="block", name="y")
    first = registry.submit(op, run, join=True)
    assert registry.submit(op, run, join=True) is first  # the same operation, still running: that job
    other = registry.submit(ModelDownloadOp(source="block", name="z"), run, join=True)
    assert other is not first  # another operation is another job
    unjoined = registry.submit(op, run)
    assert unjoined is not first  # without join, every submit is a job of its own
    release.set()
    await asyncio.gather(first.task, other.task, unjoined.task)
    assert runs == 3 and first.result == {"done": True}
    assert registry.submit(op, run, join=True) is not first  # a finished job is never joined
    await registry.close()
