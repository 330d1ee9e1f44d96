"""The hive's operations, callable in-process (embedded in the queen) or through the hive's HTTP app."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from rbee_fleet import __version__
from rbee_fleet.common.backends import BackendChoiceError, choose_backend
from rbee_fleet.common.errors import ApiError, OperationFailed
from rbee_fleet.common.jobs import Emitter
from rbee_fleet.common.paths import Layout
from rbee_fleet.contracts.fleet import (
    DeviceInfo,
    HiveHeartbeat,
    ModelDeleteOp,
    ModelDownloadOp,
    ModelEntry,
    WorkerSpawnOp,
    WorkerStopOp,
)
from rbee_fleet.contracts.vocabulary import DEVICE_HELP, DEVICE_PATTERN, device_ids
from rbee_fleet.hive import devices
from rbee_fleet.hive.catalog import Catalog
from rbee_fleet.hive.gpu_assignment import GpuPlacer
from rbee_fleet.hive.supervisor import LaunchSpec, Supervisor, SupervisorSettings

DEVICE_REFRESH_S = 5.0
ENGINE_REFRESH_S = 60.0  # llama-server's own view of the GPUs (a process start); NVML fills in between

log = logging.getLogger(__name__)
DEVICE_RE = re.compile(DEVICE_PATTERN)


@dataclass(frozen=True)
class HiveSettings:
    hive_id: str
    layout: Layout
    bind_host: str = "127.0.0.1"
    port: int = 9000
    advertise_host: str = "127.0.0.1"
    queen_url: str | None = None
    token: str | None = None
    token_file: str | None = None
    embedded: bool = False
    heartbeat_interval_s: float = 5.0
    worker_port_base: int = 9300
    default_ctx_size: int = 2048
    default_max_queue: int = 8
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{self.advertise_host}:{self.port}"


class HiveService:
    def __init__(self, settings: HiveSettings, session: aiohttp.ClientSession) -> None:
        self.settings = settings
        self.started_at = time.time()
        settings.layout.ensure()
        self.catalog = Catalog(settings.layout.models)
        self.supervisor = Supervisor(
            SupervisorSettings(
                hive_id=settings.hive_id,
                logs_dir=settings.layout.logs,
                bind_host=settings.bind_host,
                advertise_host=settings.advertise_host,
                queen_url=settings.queen_url,
                token=settings.token,
                token_file=settings.token_file,
                port_base=settings.worker_port_base,
                heartbeat_interval_s=settings.heartbeat_interval_s,
            ),
            session,
        )
        self._devices: DeviceInfo | None = None
        self._devices_at = 0.0
        self._engine: devices.EngineView | None = None
        self._engine_at = 0.0
        self._refresher: asyncio.Task[None] | None = None
        self.gpus = GpuPlacer(settings.hive_id, self.supervisor, self.fresh_devices, settings.default_ctx_size)

    # -- queries ---------------------------------------------------------------------------------

    def devices(self) -> DeviceInfo:
        """The devices as last probed: probing (NVML, nvidia-smi) never runs on the event loop here."""
        if self._devices is None:  # only before start()
            self._devices, self._devices_at = devices.detect(), time.monotonic()
        return self._devices

    async def start(self) -> None:
        """Probe the devices once, then keep the answer fresh in the background."""
        await self.fresh_devices()
        self._refresher = asyncio.create_task(self._refresh_devices(), name=f"devices-{self.settings.hive_id}")

    async def _refresh_devices(self) -> None:
        while True:
            await asyncio.sleep(DEVICE_REFRESH_S)
            try:
                await self.fresh_devices()
            except Exception:  # noqa: BLE001 - detect() reports GPU trouble itself; keep the last answer
                log.warning("device probe failed", exc_info=True)

    async def fresh_devices(self, engine: bool = False) -> DeviceInfo:
        """Devices probed now (off the event loop), for decisions that cannot use a 5 s old answer;
        ``engine``: llama-server's view too, not the one of up to a minute ago."""
        now = time.monotonic()
        if engine or self._engine is None or now - self._engine_at > ENGINE_REFRESH_S:
            env = {**os.environ, **self.settings.extra_env}
            before = self._engine
            self._engine = await asyncio.to_thread(devices.probe_engine, env)
            self._engine_at = time.monotonic()
            if before is not None:
                await self._devices_lost(before, self._engine)
        info = await asyncio.to_thread(devices.detect, self._engine)
        self._devices, self._devices_at = info, time.monotonic()
        return info

    async def _devices_lost(self, before: devices.EngineView, now: devices.EngineView) -> None:
        """A GPU that disappeared (a driver reset, a GPU fallen off the bus) takes its workers down: they
        leave the queen's rotation, and the queen places the model again where there is room."""
        if now.error is not None:
            return  # llama-server could not be asked: no verdict on the devices
        gone = {d.id for d in before.devices} - {d.id for d in now.devices}
        if not gone:
            return
        for worker in self.supervisor.list():
            lost = set(device_ids(worker.device)) & gone
            if lost and worker.state.active:
                log.warning("device %s disappeared: stopping worker %s", ", ".join(sorted(lost)), worker.worker_id)
                await self.supervisor.fail(worker.worker_id, f"its device {', '.join(sorted(lost))} disappeared")

    def status(self) -> HiveHeartbeat:
        return HiveHeartbeat(
            hive_id=self.settings.hive_id,
            url=self.settings.url,
            version=__version__,
            embedded=self.settings.embedded,
            devices=self.devices(),
            workers=self.supervisor.list(),
            started_at=self.started_at,
            models=self.models(),
        )

    def models(self) -> list[ModelEntry]:
        return self.catalog.list()

    # -- operations ------------------------------------------------------------------------------

    async def run(self, op: Any, emit: Emitter) -> dict[str, Any]:
        try:
            if isinstance(op, WorkerSpawnOp):
                return await self.spawn_worker(op, emit)
            if isinstance(op, WorkerStopOp):
                worker = await self.supervisor.stop(op.worker_id, emit)
                return {"worker": worker.model_dump(mode="json"), "changed": True}
            if isinstance(op, ModelDownloadOp):
                entry, changed = await self.catalog.download(op.source, op.name, emit)
                return {"model": entry.model_dump(mode="json"), "changed": changed}
            if isinstance(op, ModelDeleteOp):
                return self.delete_model(op.model, emit)
        except ApiError as exc:
            raise OperationFailed(exc.message) from None
        raise OperationFailed(f"the hive cannot run {type(op).__name__}")

    async def spawn_worker(self, op: WorkerSpawnOp, emit: Emitter) -> dict[str, Any]:
        entry = self.catalog.get(op.model)
        if not DEVICE_RE.match(op.device):
            raise OperationFailed(f"device {op.device!r}: use {DEVICE_HELP}")
        worker_id = op.worker_id or self._next_worker_id(op.model)
        engine = op.backend == "llamacpp" or (op.backend == "auto" and entry.format == "gguf")
        if engine:
            device = await self.gpus.engine_device_for(op, entry, worker_id, emit)
        elif op.device == "auto":
            device = await self.gpus.device_for(op, entry, worker_id, emit)
        else:
            device = op.device
            if device.startswith("cuda:"):
                self.gpus.check_cuda(op, await self.fresh_devices(), worker_id)
        try:
            backend = choose_backend(op.backend, device, entry.format)
        except BackendChoiceError as exc:
            self.gpus.release(worker_id)
            raise OperationFailed(str(exc)) from None
        env: dict[str, str] = dict(self.settings.extra_env)
        if device.startswith("cuda:") and backend == "exllamav2":
            # Pinned by UUID where known: CUDA's own device order may differ from nvidia-smi's.
            env["CUDA_VISIBLE_DEVICES"] = devices.visible_devices(device, self.devices().gpus)
            env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        spec = LaunchSpec(
            worker_id=worker_id,
            model_id=entry.id,
            model_path=entry.path,
            backend=backend,
            device=device,
            ctx_size=op.ctx_size or self.settings.default_ctx_size,
            threads=op.threads,
            max_queue=op.max_queue if op.max_queue is not None else self.settings.default_max_queue,
            options=tuple(sorted((k, str(v)) for k, v in op.options.items())),
            env=tuple(sorted(env.items())),
            slots=op.slots,
            embeddings=op.embeddings,
            declared_as=op.declared_as,
            requested=json.dumps(op.settings(), sort_keys=True),
            gpu_layers=op.gpu_layers,
        )
        emit.progress(f"spawning {spec.worker_id}: {entry.id} ({entry.format}) with {backend} on {device}")
        try:
            worker, changed = await self.supervisor.spawn(spec, emit)
        finally:
            self.gpus.release(worker_id)  # loaded (its memory now shows as used) or gone
        emit.progress(f"worker {worker.worker_id} is ready at {worker.url}")
        return {"worker": worker.model_dump(mode="json"), "changed": changed}

    def _next_worker_id(self, model: str) -> str:
        base = f"{self.settings.hive_id}-{model}"
        n = 0
        while self.supervisor.get(f"{base}-{n}") is not None:
            n += 1
        return f"{base}-{n}"

    def delete_model(self, model: str, emit: Emitter) -> dict[str, Any]:
        users = self.supervisor.models_in_use().get(model)
        if users:
            raise OperationFailed(f"{model} is in use by {', '.join(users)}; stop those workers first")
        entry = self.catalog.delete(model)
        emit.log(f"deleted {model} ({entry.size_bytes} bytes)")
        return {"model": entry.model_dump(mode="json"), "changed": True}

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
        await self.supervisor.close()
