"""The hive's supervisor with real worker processes: ports, grace then SIGKILL, restarts with backoff."""

from __future__ import annotations

import asyncio
import os
import signal

import aiohttp
import pytest

from rbee_fleet.common.errors import OperationFailed
from rbee_fleet.common.jobs import Emitter, Job
from rbee_fleet.hive.supervisor import LaunchSpec, Supervisor, SupervisorSettings
from tests.support import procs


def spec(worker_id: str, model_path: str, **kw) -> LaunchSpec:
    return LaunchSpec(worker_id=worker_id, model_id="smollm2", model_path=model_path, backend="llamacpp",
                      device="cpu", ctx_size=512, threads=1, max_queue=2, **kw)


@pytest.fixture
async def supervisor(tmp_path):
    settings = SupervisorSettings(hive_id="t", logs_dir=tmp_path / "logs", port_base=procs.free_port_range(20),
                                  stop_grace_s=1.0, restart_backoff_s=(0.2, 0.4), ready_timeout_s=60)
    async with aiohttp.ClientSession() as session:
        sup = Supervisor(settings, session)
        yield sup
        await sup.close()


def emitter() -> Emitter:
    return Emitter(Job("test", {}))


async def test_two_workers_get_distinct_free_ports(supervisor, model_path):
    a, changed_a = await supervisor.spawn(spec("a", model_path), emitter())
    b, changed_b = await supervisor.spawn(spec("b", model_path), emitter())
    assert changed_a and changed_b and a.port != b.port and a.state == b.state == "running"
    same, changed = await supervisor.spawn(spec("a", model_path), emitter())
    assert not changed and same.port == a.port
    with pytest.raises(OperationFailed, match="other settings"):
        await supervisor.spawn(spec("a", model_path, options=(("top_k", "1"),)), emitter())


async def test_stop_kills_a_worker_that_ignores_sigterm(supervisor, model_path):
    view, _ = await supervisor.spawn(spec("stuck", model_path), emitter())
    os.kill(view.pid, signal.SIGSTOP)  # a stopped process cannot act on SIGTERM; SIGKILL still works
    stopped = await supervisor.stop("stuck")
    assert stopped.state == "stopped"
    assert not os.path.exists(f"/proc/{view.pid}") or open(f"/proc/{view.pid}/stat").read().split()[2] == "Z"
    assert supervisor.get("stuck") is None


async def test_crashed_worker_is_restarted_with_backoff(supervisor, model_path):
    view, _ = await supervisor.spawn(spec("crashy", model_path), emitter())
    for n in (1, 2):
        pid = supervisor.get("crashy").process.pid
        os.kill(pid, signal.SIGKILL)
        await _until(lambda n=n: supervisor.get("crashy").restarts == n and supervisor.get("crashy").state == "running")
        again = supervisor.view(supervisor.get("crashy"))
        assert again.pid != pid and again.last_exit == "killed by SIGKILL"


async def test_a_model_that_fails_to_load_fails_the_spawn_with_the_reason(supervisor, tmp_path):
    bogus = tmp_path / "not-a-model.gguf"
    bogus.write_bytes(b"this is not a GGUF file")
    with pytest.raises(OperationFailed) as info:
        await supervisor.spawn(spec("bad", str(bogus)), emitter())
    assert "failed to load" in str(info.value)
    assert supervisor.get("bad").state == "failed"


async def _until(predicate, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.1)


def _processes_of(worker_id: str) -> list[int]:
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or []).split()  # a worker's title is its whole command line
        if "llm-worker-rbee" in cmd and worker_id in cmd:
            found.append(proc.info["pid"])
    return found


async def test_concurrent_spawns_of_one_id_start_one_process(supervisor, model_path):
    a, b = await asyncio.gather(supervisor.spawn(spec("twin", model_path), emitter()),
                                supervisor.spawn(spec("twin", model_path), emitter()))
    assert a[0].pid == b[0].pid and sorted([a[1], b[1]]) == [False, True]
    assert _processes_of("twin") == [a[0].pid]


@pytest.fixture
async def supervisor_with(tmp_path):
    """Supervisors with a chosen restart back-off, all closed at the end."""
    made = []
    async with aiohttp.ClientSession() as session:
        def make(backoff: tuple[float, ...]) -> Supervisor:
            settings = SupervisorSettings(hive_id="t", logs_dir=tmp_path / "logs", port_base=procs.free_port_range(20),
                                          stop_grace_s=1.0, restart_backoff_s=backoff, ready_timeout_s=60)
            made.append(Supervisor(settings, session))
            return made[-1]

        yield make
        for sup in made:
            await sup.close()


async def test_stop_during_a_restart_back_off_ends_it_and_leaves_no_process(supervisor_with, model_path):
    slow_restarts = supervisor_with((30.0,))
    await slow_restarts.spawn(spec("flappy", model_path), emitter())
    os.kill(slow_restarts.get("flappy").process.pid, signal.SIGKILL)
    await _until(lambda: slow_restarts.get("flappy").state == "restarting")
    await asyncio.wait_for(slow_restarts.stop("flappy"), 15)  # not held up by the back-off
    assert slow_restarts.get("flappy") is None and _processes_of("flappy") == []


async def test_a_restart_that_fails_to_load_is_retried_until_it_loads(supervisor_with, model_path, tmp_path):
    slow_restarts = supervisor_with((0.2, 0.4, 0.8, 1.6))
    model = tmp_path / "model.gguf"
    model.write_bytes(open(model_path, "rb").read())
    await slow_restarts.spawn(spec("phoenix", str(model)), emitter())
    good = model.read_bytes()
    model.write_bytes(b"not a model any more")
    os.kill(slow_restarts.get("phoenix").process.pid, signal.SIGKILL)
    # The reloads fail (bad file) and are retried with growing delays; supervision goes on.
    await _until(lambda: slow_restarts.get("phoenix").restarts >= 3)
    assert slow_restarts.get("phoenix").state == "restarting"
    model.write_bytes(good)
    await _until(lambda: slow_restarts.get("phoenix").state == "running", timeout=60)
    assert slow_restarts.view(slow_restarts.get("phoenix")).pid in _processes_of("phoenix")
