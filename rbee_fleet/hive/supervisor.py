"""Worker processes: spawn on a free port, wait until ready, stop gracefully, restart on crash."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from rbee_fleet.common.errors import OperationFailed
from rbee_fleet.common.http import EXIT_PORT_IN_USE
from rbee_fleet.common.jobs import Emitter
from rbee_fleet.common.logs import rotate_if_large
from rbee_fleet.common.net import connect_host, port_free
from rbee_fleet.contracts.fleet import ProcessState, SupervisedWorker

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class LaunchSpec:
    """Everything needed to (re)start one worker process."""

    worker_id: str
    model_id: str
    model_path: str
    backend: str
    device: str
    ctx_size: int
    threads: int | None
    max_queue: int
    options: tuple[tuple[str, str], ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    slots: int | None = None
    embeddings: bool = False
    declared_as: str | None = None  # the inventory worker this one serves (see ``SupervisedWorker``)
    requested: str = "{}"  # the spawn operation's settings, as JSON (what a deploy compares)
    gpu_layers: int | None = None


@dataclass(frozen=True)
class SupervisorSettings:
    hive_id: str
    logs_dir: Path
    bind_host: str = "127.0.0.1"
    advertise_host: str = "127.0.0.1"
    queen_url: str | None = None
    token_file: str | None = None
    token: str | None = None
    port_base: int = 9300
    heartbeat_interval_s: float = 5.0
    ready_timeout_s: float = 600.0
    stop_grace_s: float = 25.0  # beyond a worker's drain (10 s) and its server's shutdown (5 s)
    restart_backoff_s: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
    stable_after_s: float = 60.0  # a worker up this long has its backoff reset


@dataclass
class Managed:
    spec: LaunchSpec
    port: int
    log_path: Path
    state: ProcessState = ProcessState.STARTING
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    last_exit: str | None = None
    started_at: float = 0.0
    stopping: bool = False
    monitor: asyncio.Task[None] | None = None
    watcher: asyncio.Task[None] | None = None  # waits for a restarted process to be ready
    stop_requested: asyncio.Event = field(default_factory=asyncio.Event)  # ends a restart's back-off early
    ready: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Supervisor:
    def __init__(self, settings: SupervisorSettings, session: aiohttp.ClientSession) -> None:
        self.settings = settings
        self._session = session
        self._workers: dict[str, Managed] = {}
        self._port_lock = asyncio.Lock()

    # -- queries ---------------------------------------------------------------------------------

    def get(self, worker_id: str) -> Managed | None:
        return self._workers.get(worker_id)

    def list(self) -> list[SupervisedWorker]:
        return [self.view(m) for m in self._workers.values()]

    def view(self, m: Managed) -> SupervisedWorker:
        return SupervisedWorker(
            worker_id=m.spec.worker_id,
            model=m.spec.model_id,
            backend=m.spec.backend,
            device=m.spec.device,
            port=m.port,
            url=self._url(m.port),
            pid=m.process.pid if m.process and m.process.returncode is None else None,
            state=m.state,
            restarts=m.restarts,
            last_exit=m.last_exit,
            log_path=str(m.log_path),
            declared_as=m.spec.declared_as,
            settings=json.loads(m.spec.requested),
        )

    def models_in_use(self) -> dict[str, list[str]]:
        used: dict[str, list[str]] = {}
        for m in self._workers.values():
            if not m.state.gone:
                used.setdefault(m.spec.model_id, []).append(m.spec.worker_id)
        return used

    def _url(self, port: int) -> str:
        return f"http://{self.settings.advertise_host}:{port}"

    # -- spawning --------------------------------------------------------------------------------

    async def spawn(self, spec: LaunchSpec, emit: Emitter) -> tuple[SupervisedWorker, bool]:
        """Start ``spec`` and wait until it is ready; idempotent by worker id, even for concurrent calls."""
        async with self._port_lock:  # decide and register in one step: two spawns of one id start one process
            existing = self._workers.get(spec.worker_id)
            active = existing is not None and not existing.state.gone
            if active:
                assert existing is not None
                if existing.spec != spec:
                    raise OperationFailed(
                        f"worker {spec.worker_id} already runs {existing.spec.model_id} with other settings; stop it first"
                    )
                m = existing
            else:
                port = self._free_port(existing.port if existing else None)
                m = Managed(spec=spec, port=port, log_path=self.settings.logs_dir / f"worker-{spec.worker_id}.log")
                self._workers[spec.worker_id] = m
                await self._start(m)
                m.monitor = asyncio.create_task(self._monitor(m), name=f"monitor-{spec.worker_id}")
        if active:
            emit.log(f"worker {spec.worker_id} is already {m.state} on port {m.port}")
        else:
            emit.progress(f"worker {spec.worker_id}: process {m.process.pid if m.process else '?'} on port {m.port}, "
                          f"loading {spec.model_id}")
        await self._await_ready(m, emit)
        return self.view(m), not active

    def _free_port(self, preferred: int | None) -> int:
        taken = {m.port for m in self._workers.values() if not m.state.gone}
        candidates = ([preferred] if preferred else []) + list(range(self.settings.port_base, self.settings.port_base + 1000))
        for port in candidates:
            if port not in taken and port_free(self.settings.bind_host, port):
                return port
        raise OperationFailed(f"no free port from {self.settings.port_base} on {self.settings.bind_host}")

    def _command(self, m: Managed) -> list[str]:
        s, spec = self.settings, m.spec
        cmd = [
            sys.executable, "-m", "rbee_fleet.worker",
            "--model-path", spec.model_path, "--model-id", spec.model_id,
            "--backend", spec.backend, "--device", spec.device,
            "--ctx-size", str(spec.ctx_size), "--max-queue", str(spec.max_queue),
            "--host", s.bind_host, "--port", str(m.port), "--advertise-url", self._url(m.port),
            "--worker-id", spec.worker_id, "--hive-id", s.hive_id,
            "--heartbeat-interval", str(s.heartbeat_interval_s), "--exit-with-parent",
        ]
        if spec.threads:
            cmd += ["--threads", str(spec.threads)]
        if spec.slots:
            cmd += ["--slots", str(spec.slots)]
        if spec.embeddings:
            cmd.append("--embeddings")
        if spec.gpu_layers is not None:
            cmd += ["--gpu-layers", str(spec.gpu_layers)]
        if s.queen_url:
            cmd += ["--queen-url", s.queen_url]
        if s.token_file:
            cmd += ["--token-file", s.token_file]
        for key, value in spec.options:
            cmd += ["--option", f"{key}={value}"]
        return cmd

    async def _start(self, m: Managed) -> None:
        m.log_path.parent.mkdir(parents=True, exist_ok=True)
        rotate_if_large(m.log_path)
        env = {**os.environ, **dict(m.spec.env)}
        with open(m.log_path, "ab") as logfile:
            logfile.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting on port {m.port}\n".encode())
            logfile.flush()
            m.process = await asyncio.create_subprocess_exec(
                *self._command(m),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=logfile,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                start_new_session=True,  # terminal signals go to the hive, which stops workers itself
            )
        m.started_at = time.monotonic()
        m.state = ProcessState.STARTING if m.restarts == 0 else ProcessState.RESTARTING
        if m.ready.done():
            m.ready = asyncio.get_running_loop().create_future()
        log.info("worker %s started (pid %d, port %d)", m.spec.worker_id, m.process.pid, m.port)

    async def _await_ready(self, m: Managed, emit: Emitter | None) -> None:
        """Poll the worker's health until it is ready, failed, or gone."""
        deadline = time.monotonic() + self.settings.ready_timeout_s
        headers = {"Authorization": f"Bearer {self.settings.token}"} if self.settings.token else {}
        url = f"http://{connect_host(self.settings.bind_host)}:{m.port}/health"
        last_note = time.monotonic()
        while True:
            if m.ready.done():
                return m.ready.result()
            if m.process is None or m.process.returncode is not None:
                await asyncio.sleep(0.05)
                if m.ready.done():
                    return m.ready.result()
                if m.stopping:
                    raise OperationFailed(f"worker {m.spec.worker_id} was stopped while starting")
                continue
            try:
                async with self._session.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    body = await resp.json() if resp.status == 200 else {}
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                body = {}
            # Workers with their own server say {"state": ...}; llama-server says {"status": "ok"} once loaded.
            state = body.get("state") or ("ready" if body.get("status") == "ok" else None)
            if state == "ready":
                m.state = ProcessState.RUNNING
                if not m.ready.done():
                    m.ready.set_result(None)
                return None
            now = time.monotonic()
            problem = (f"the model failed to load: {body.get('error') or 'unknown error'}" if state == "failed"
                       else f"not ready after {self.settings.ready_timeout_s:.0f} s" if now > deadline else None)
            if problem is not None:
                if m.restarts == 0:
                    await self._give_up(m, problem)
                    return m.ready.result()
                # A restart that does not load: end this process; the monitor retries after its back-off.
                log.warning("worker %s: %s; will retry", m.spec.worker_id, problem)
                await self._terminate(m)
                deadline = time.monotonic() + self.settings.ready_timeout_s
                continue
            if emit is not None and now - last_note >= 2.0:
                emit.progress(f"worker {m.spec.worker_id}: {state or 'starting'} ({now - m.started_at:.0f} s)")
                last_note = now
            await asyncio.sleep(0.1)

    async def _give_up(self, m: Managed, reason: str) -> None:
        m.stopping = True
        await self._terminate(m)
        m.state = ProcessState.FAILED
        message = f"worker {m.spec.worker_id}: {reason}{_log_tail(m.log_path)}"
        if not m.ready.done():
            m.ready.set_exception(OperationFailed(message))
            m.ready.exception()  # retrieved here; callers get it from result()

    async def _monitor(self, m: Managed) -> None:
        """Restart the worker whenever it exits without being asked to, with growing delays.

        Only the first load failing ends supervision (the spawn reports why); a restart that fails to
        load is one more failure, retried after the next, longer delay.
        """
        failures = 0
        while True:
            assert m.process is not None
            code = await m.process.wait()
            m.last_exit = _describe_exit(code)
            if m.stopping:
                m.state = ProcessState.STOPPED if m.state is not ProcessState.FAILED else ProcessState.FAILED
                return
            if code == EXIT_PORT_IN_USE and not m.ready.done():
                async with self._port_lock:
                    m.port = self._free_port(None)
                    await self._start(m)
                continue
            if m.restarts == 0 and not m.ready.done():
                m.state = ProcessState.FAILED
                m.ready.set_exception(OperationFailed(
                    f"worker {m.spec.worker_id} exited while loading ({m.last_exit}){_log_tail(m.log_path)}"
                ))
                m.ready.exception()
                return
            stable = m.ready.done() and time.monotonic() - m.started_at >= self.settings.stable_after_s
            failures = 0 if stable else failures + 1
            delay = self.settings.restart_backoff_s[min(failures, len(self.settings.restart_backoff_s) - 1)]
            m.state = ProcessState.RESTARTING
            m.restarts += 1
            log.warning("worker %s %s; restarting in %.0f s", m.spec.worker_id, m.last_exit, delay)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(m.stop_requested.wait(), delay)
            if m.stopping:
                m.state = ProcessState.STOPPED
                return
            async with self._port_lock:
                if not port_free(self.settings.bind_host, m.port):
                    m.port = self._free_port(None)
                await self._start(m)
            if m.stopping:  # stop() came while the new process was starting, and could not see it
                await self._terminate(m)
                m.state = ProcessState.STOPPED
                return
            if m.watcher is None or m.watcher.done():
                m.watcher = asyncio.create_task(self._watch_restart(m), name=f"ready-{m.spec.worker_id}")

    async def _watch_restart(self, m: Managed) -> None:
        with contextlib.suppress(Exception):
            await self._await_ready(m, None)

    # -- stopping --------------------------------------------------------------------------------

    async def stop(self, worker_id: str, emit: Emitter | None = None) -> SupervisedWorker:
        m = self._workers.get(worker_id)
        if m is None:
            raise OperationFailed(f"no worker {worker_id!r} on hive {self.settings.hive_id}")
        if m.state.gone and (m.process is None or m.process.returncode is not None):
            del self._workers[worker_id]
            return self.view(m)
        m.stopping = True
        m.stop_requested.set()
        m.state = ProcessState.STOPPING
        if emit is not None:
            emit.progress(f"stopping worker {worker_id} (pid {m.process.pid if m.process else '?'})")
        await self._terminate(m)
        if m.monitor is not None:
            await asyncio.gather(m.monitor, return_exceptions=True)
        if m.watcher is not None:
            m.watcher.cancel()
            await asyncio.gather(m.watcher, return_exceptions=True)
        m.state = ProcessState.STOPPED
        del self._workers[worker_id]
        return self.view(m)

    async def fail(self, worker_id: str, reason: str) -> None:
        """Stop a worker that cannot run on (its device is gone): no restart; it stays listed as failed."""
        m = self._workers.get(worker_id)
        if m is None:
            return
        m.stopping = True
        m.stop_requested.set()
        await self._terminate(m)
        if m.monitor is not None:
            await asyncio.gather(m.monitor, return_exceptions=True)
        m.state = ProcessState.FAILED
        m.last_exit = reason
        if not m.ready.done():
            m.ready.set_exception(OperationFailed(f"worker {worker_id}: {reason}"))
            m.ready.exception()

    async def _terminate(self, m: Managed) -> None:
        """SIGTERM, then SIGKILL after the grace period."""
        proc = m.process
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self.settings.stop_grace_s)
        except asyncio.TimeoutError:
            log.warning("worker %s ignored SIGTERM for %.0f s; killing it", m.spec.worker_id, self.settings.stop_grace_s)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def close(self) -> None:
        await asyncio.gather(*(self.stop(wid) for wid in list(self._workers)), return_exceptions=True)


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _log_tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return ""
    return ("\n  log " + str(path) + ":\n    " + "\n    ".join(text)) if text else ""
