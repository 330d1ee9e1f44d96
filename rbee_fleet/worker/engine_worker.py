"""A CPU worker: one supervised ``llama-server`` process, its heartbeats, its drain.

The worker holds no HTTP server of its own: ``llama-server`` listens on the worker's port (so the hive's
readiness check and the queen's requests reach it directly, with no Python hop per token) and the worker
reports its state to the queen from ``llama-server``'s own ``/slots`` and ``/metrics``. When
``llama-server`` exits, so does the worker, with its exit code: restarting is the hive's job.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp

from rbee_fleet.common.llama_engine import LlamaServerMissing, find_binary
from rbee_fleet.common.net import connect_host
from rbee_fleet.contracts.fleet import WorkerHeartbeat, WorkerState
from rbee_fleet.worker.backends.base import BackendError
from rbee_fleet.worker.heartbeat import HeartbeatSender
from rbee_fleet.worker.llama_server import (
    EngineConfig,
    EngineStats,
    ModelFacts,
    Offload,
    model_facts,
    parse_metrics,
    spawn,
    tool_template,
)
from rbee_fleet.worker.parent import watch_parent
from rbee_fleet.worker.runtime import WorkerSettings

log = logging.getLogger(__name__)

POLL_TIMEOUT = aiohttp.ClientTimeout(total=5)
READY_POLL_S = 0.1
STOP_GRACE_S = 10.0


class EngineRuntime:
    """The worker's state, as the heartbeat sender reads it."""

    def __init__(self, settings: WorkerSettings, config: EngineConfig) -> None:
        self.settings = settings
        self.spec = settings.spec
        self.config = config
        self.state = WorkerState.LOADING
        self.error: str | None = None
        self.changed = asyncio.Event()
        self.started_at = time.time()
        self.stats: EngineStats | None = None
        self.capabilities = config.capabilities
        self.offload = Offload()
        self._rate = 0.0
        self._last: tuple[float, int] | None = None
        self._session: aiohttp.ClientSession | None = None
        base = f"http://{connect_host(config.host)}:{config.port}"
        self._slots_url = f"{base}/slots"
        self._props_url = f"{base}/props"
        self._metrics_url = f"{base}/metrics"
        self.health_url = f"{base}/health"
        self._headers = {"Authorization": f"Bearer {settings.token}"} if settings.token else {}

    def set_state(self, state: WorkerState, error: str | None = None) -> None:
        self.state = state
        self.error = error
        self.changed.set()
        log.info("worker %s is %s%s", self.settings.worker_id, state.value, f": {error}" if error else "")

    def bind(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    async def refresh(self) -> None:
        """Read llama-server's slots and metrics (before each heartbeat; two local requests)."""
        if self._session is None or self.state is WorkerState.LOADING:
            return
        try:
            async with self._session.get(self._slots_url, headers=self._headers, timeout=POLL_TIMEOUT) as resp:
                slots = await resp.json() if resp.status == 200 else []
            async with self._session.get(self._metrics_url, headers=self._headers, timeout=POLL_TIMEOUT) as resp:
                metrics = parse_metrics(await resp.text()) if resp.status == 200 else {}
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            log.debug("could not read llama-server's state: %s", exc)
            return
        stats = EngineStats.read(slots if isinstance(slots, list) else [], metrics)
        now = time.monotonic()
        if self._last is not None and now > self._last[0]:
            self._rate = max(0.0, (stats.tokens_predicted_total - self._last[1]) / (now - self._last[0]))
        self._last = (now, stats.tokens_predicted_total)
        self.stats = stats

    async def read_capabilities(self) -> None:
        """Offer tools only where llama-server says the chat template can call them (it would drop them)."""
        assert self._session is not None
        try:
            async with self._session.get(self._props_url, headers=self._headers, timeout=POLL_TIMEOUT) as resp:
                props = await resp.json() if resp.status == 200 else {}
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            props = {}
        caps = props.get("chat_template_caps") or {}
        if not caps.get("supports_tool_calls"):
            self.capabilities = [c for c in self.capabilities if c != "tools"]
            if "chat" in self.capabilities:
                log.info("the chat template of %s cannot call tools: requests with tools are refused",
                         self.spec.model_id)

    def idle(self) -> bool:
        return self.stats is None or self.stats.slots_busy == 0

    def heartbeat(self) -> WorkerHeartbeat:
        s = self.stats
        slots = s.slots_total if s else self.config.slots
        ctx = s.context_per_slot if s and s.context_per_slot else self.config.ctx_size
        cache_total = ctx * slots
        return self.settings.heartbeat(
            self.state, self.started_at,
            slots_busy=s.slots_busy if s else 0,
            slots_total=slots,
            queue_depth=s.queue_depth if s else 0,
            queue_capacity=0,
            tokens_per_second=round(self._rate, 2),
            tokens_generated_total=s.tokens_predicted_total if s else 0,
            tokens_decoded_total=s.tokens_predicted_total if s else 0,
            requests_total=s.requests_total if s else 0,
            context_length=ctx,
            capabilities=self.capabilities,
            fim_tokens=list(self.config.fim_tokens or ()),
            # llama-server reports its KV cache use only in some versions: both or neither.
            cache_tokens_total=cache_total if s and s.cache_tokens_used is not None else None,
            cache_tokens_free=max(0, cache_total - s.cache_tokens_used) if s and s.cache_tokens_used is not None else None,
            vram_used_mb=self.offload.gpu_memory_mb,
            gpu_layers=self.offload.layers[0] if self.offload.layers else None,
            model_layers=self.offload.layers[1] if self.offload.layers else None,
        )


def engine_config(settings: WorkerSettings, slots: int, embeddings: bool, token_file: str | None) -> EngineConfig:
    spec = settings.spec
    return EngineConfig(
        model_path=spec.model_path,
        model_id=spec.model_id,
        host=settings.host,
        port=settings.port,
        ctx_size=spec.ctx_size,
        slots=slots,
        threads=spec.threads,
        embeddings=embeddings,
        api_key_file=token_file if settings.token else None,
        options=tuple(sorted(spec.options.items())),
        device=spec.device,
        gpu_layers=spec.gpu_layers,
    )


async def run(settings: WorkerSettings, config: EngineConfig) -> int:
    """Serve until SIGTERM (drain, then stop llama-server: exit 0) or until llama-server exits (its code)."""
    facts = ModelFacts() if config.embeddings else model_facts(config.model_path)
    config = dataclasses.replace(config, fim_tokens=facts.fim_tokens)
    template_file = _tool_template_file(config, settings.worker_id, facts.chat_template)
    if template_file is not None:
        config = dataclasses.replace(config, chat_template_file=str(template_file))
    runtime = EngineRuntime(settings, config)
    try:
        binary = find_binary()
    except LlamaServerMissing as exc:
        raise BackendError(str(exc)) from None
    proc = spawn(config, binary)
    assert proc.stdout is not None
    runtime.offload.relay(proc.stdout)
    log.info("llama-server (pid %d) starting on %s:%d: %s, %d slots of %d tokens", proc.pid, config.host,
             config.port, settings.spec.model_id, config.slots, config.ctx_size)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    exited = asyncio.ensure_future(asyncio.to_thread(proc.wait))
    async with aiohttp.ClientSession() as session:
        runtime.bind(session)
        sender = HeartbeatSender(runtime, session)
        tasks = [asyncio.create_task(sender.run(), name="heartbeat")]
        if settings.exit_with_parent:
            tasks.append(asyncio.create_task(watch_parent(stop.set), name="watch-parent"))
        try:
            await _wait_ready(runtime, session, exited, stop)
            await asyncio.wait([exited, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
            if stop.is_set() and not exited.done():
                await _drain(runtime, sender, settings.drain_timeout_s)
                await _terminate(proc, exited)
            code = await exited
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if proc.poll() is None:
                await _terminate(proc, exited)
            with contextlib.suppress(Exception):
                await sender.say_goodbye()
            if template_file is not None:
                template_file.unlink(missing_ok=True)
    if stop.is_set():
        return 0
    why = f"llama-server exited with code {code}" if code >= 0 else f"llama-server was killed by signal {-code}"
    log.error("%s", why)
    return code if code > 0 else 1


async def _wait_ready(runtime: EngineRuntime, session: aiohttp.ClientSession, exited: asyncio.Future[int],
                      stop: asyncio.Event) -> None:
    """Poll llama-server's /health until it has loaded the model (it answers 503 while loading)."""
    while not exited.done() and not stop.is_set():
        try:
            async with session.get(runtime.health_url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                if resp.status == 200:
                    await runtime.read_capabilities()
                    runtime.set_state(WorkerState.READY)
                    await runtime.refresh()
                    return
        except (aiohttp.ClientError, asyncio.TimeoutError):
            pass
        await asyncio.sleep(READY_POLL_S)


def _tool_template_file(config: EngineConfig, worker_id: str, own: str | None) -> Path | None:
    """A chat template with function calling for this model, written for llama-server, when it needs one."""
    if config.embeddings or config.chat_template_file:
        return None
    template = tool_template(own)
    if template is None:
        return None
    with tempfile.NamedTemporaryFile("w", prefix=f"rbee-{worker_id}-", suffix=".jinja", delete=False) as fh:
        fh.write(template)
    return Path(fh.name)


async def _drain(runtime: EngineRuntime, sender: HeartbeatSender, timeout_s: float) -> None:
    """Leave rotation, then let the requests llama-server is running finish (bounded)."""
    runtime.set_state(WorkerState.DRAINING)
    await sender.send()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        await runtime.refresh()
        if runtime.idle():
            return
        await asyncio.sleep(0.2)
    log.warning("requests still running after %.0f s of draining; stopping anyway", timeout_s)


async def _terminate(proc: subprocess.Popen[bytes], exited: asyncio.Future[int]) -> None:
    """SIGTERM, then SIGKILL after the grace period."""
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        await asyncio.wait_for(asyncio.shield(exited), STOP_GRACE_S)
    except asyncio.TimeoutError:
        log.warning("llama-server ignored SIGTERM for %.0f s; killing it", STOP_GRACE_S)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await exited
