"""Which GPU of this hive a worker gets, and the memory held for it while it loads.

GGUF workers (llama-server) go to the devices llama-server itself sees, of any vendor: a named device
is checked to exist first; ``auto`` takes the GPU with the most free memory that holds the whole model
(weights and KV cache at the worker's context, from the GGUF's metadata: ``common.gguf_fit``), else
the same GPU with part of the layers (llama.cpp fits the count), else the CPU, and the job's log says
which and why. exllamav2 workers go to NVIDIA GPUs by ``common.gpu_fit``'s pure logic. Either way the
free memory is probed at that moment, minus what workers still loading will take (a driver shows
their memory only once they have allocated it, so without a hold two workers spawned together would
both pick the same GPU).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from rbee_fleet.common.errors import OperationFailed
from rbee_fleet.common.gguf_fit import GgufShape, default_slots, read_shape
from rbee_fleet.common.gpu_fit import CANNOT_PLACE, Gpu, Host, NoFit, Placement, place
from rbee_fleet.common.jobs import Emitter
from rbee_fleet.common.vram import ExlOptions, VramNeed, estimate
from rbee_fleet.contracts.fleet import DeviceInfo, EngineDevice, ModelEntry, WorkerSpawnOp
from rbee_fleet.contracts.vocabulary import device_ids, gpu_backend_of
from rbee_fleet.hive import gpu_stack

# llama.cpp's --fit leaves this much of each device free (its default --fit-target): placement does too.
FIT_MARGIN_MB = 1024


def vram_need(entry: ModelEntry, options: dict[str, Any], ctx_size: int) -> VramNeed:
    """What an exllamav2 worker of ``entry`` with these options will take, or why it cannot be said."""
    try:
        opts = ExlOptions.parse(options)
        paged = gpu_stack.paged_attention_available() if opts.paged is None else opts.paged
        return estimate(entry.path, ctx_size, opts, paged=paged)
    except ValueError as exc:
        raise OperationFailed(f"cannot size {entry.id} for a GPU: {exc}") from None


def describe(devices: list[EngineDevice] | tuple[EngineDevice, ...]) -> str:
    return ", ".join(f"{d.id} ({d.description}, {d.memory_free_mb} of {d.memory_total_mb} MiB free)"
                     for d in devices) or "no GPU"


class GpuPlacer:
    def __init__(self, hive_id: str, supervisor: Any, probe: Callable[..., Awaitable[DeviceInfo]],
                 default_ctx_size: int = 2048) -> None:
        self.hive_id = hive_id
        self._supervisor = supervisor
        self._probe = probe  # probe(engine=True): devices now, llama-server's view included
        self._default_ctx = default_ctx_size
        self._held: dict[str, dict[int, int]] = {}  # worker id -> {GPU index: MB}
        self._held_engine: dict[str, dict[str, int]] = {}  # worker id -> {engine device id: MiB}
        self._lock = asyncio.Lock()

    def _placed(self, worker_id: str) -> str | None:
        existing = self._supervisor.get(worker_id)
        if existing is not None and not existing.state.gone:
            return str(existing.spec.device)  # already placed: asking again changes nothing
        return None

    # -- GGUF workers: llama-server's devices ------------------------------------------------------

    async def engine_device_for(self, op: WorkerSpawnOp, entry: ModelEntry, worker_id: str, emit: Emitter) -> str:
        """The device of a llama-server worker: ``op.device`` checked, or chosen for ``auto``."""
        placed = self._placed(worker_id)
        if placed is not None:
            return placed
        if op.device == "cpu":
            return "cpu"
        ctx = op.ctx_size or self._default_ctx
        tokens = ctx * (op.slots or default_slots(ctx))
        shape = await asyncio.to_thread(read_shape, entry.path)
        async with self._lock:
            info = await self._probe(engine=True)
            free = self._engine_free(info)
            if op.device != "auto":
                return self._check_named(op, entry, worker_id, info, free, shape, tokens, emit)
            return self._choose(op, entry, worker_id, info, free, shape, tokens, emit)

    def _engine_free(self, info: DeviceInfo) -> dict[str, tuple[EngineDevice, int]]:
        held: dict[str, int] = {}
        for per_device in self._held_engine.values():
            for device, mb in per_device.items():
                held[device] = held.get(device, 0) + mb
        return {d.id: (d, max(0, d.memory_free_mb - held.get(d.id, 0))) for d in info.engine_devices}

    def _check_named(self, op: WorkerSpawnOp, entry: ModelEntry, worker_id: str, info: DeviceInfo,
                     free: dict[str, tuple[EngineDevice, int]], shape: GgufShape | None, tokens: int,
                     emit: Emitter) -> str:
        backend = gpu_backend_of(op.device) or ""
        status = info.engine_backends.get(backend, "not installed")
        missing = [d for d in device_ids(op.device) if d not in free]
        if missing:
            why = (f"the {backend} backend of llama-server is {status} on this hive" if status != "ok"
                   else "no such device")
            raise OperationFailed(f"{CANNOT_PLACE} {worker_id}: device {', '.join(missing)} does not exist on hive "
                                  f"{self.hive_id} ({why}); it has {describe(info.engine_devices)}")
        room = sum(f for _, f in (free[d] for d in device_ids(op.device)))
        if shape is not None:
            layers = shape.layers if op.gpu_layers is None else min(op.gpu_layers, shape.layers)
            need = shape.need_mb(tokens) * layers // max(1, shape.layers)
            if op.gpu_layers is not None and need > room:
                raise OperationFailed(f"{CANNOT_PLACE} {worker_id}: insufficient memory on {op.device}: {layers} layers "
                                      f"of {entry.id} need about {need} MiB, {room} MiB are free")
            if op.gpu_layers is None and shape.need_mb(tokens) > room - FIT_MARGIN_MB:
                emit.log(f"{entry.id} needs about {shape.need_mb(tokens)} MiB and {op.device} has {room} MiB free: "
                         f"llama.cpp offloads the layers that fit (about {shape.layers_fitting(tokens, room - FIT_MARGIN_MB)}"
                         f" of {shape.layers}) and runs the rest on the CPU")
            self._hold_engine(worker_id, op.device, min(need, room), free)
        emit.progress(f"{worker_id} on {op.device} as asked: {describe([free[d][0] for d in device_ids(op.device)])}")
        return op.device

    def _choose(self, op: WorkerSpawnOp, entry: ModelEntry, worker_id: str, info: DeviceInfo,
                free: dict[str, tuple[EngineDevice, int]], shape: GgufShape | None, tokens: int, emit: Emitter) -> str:
        if not free:
            backends = ", ".join(f"{b}: {s}" for b, s in sorted(info.engine_backends.items())) or "none"
            emit.log(f"{worker_id} runs on the CPU: llama-server sees no GPU on hive {self.hive_id} "
                     f"(its GPU backends: {backends})")
            return "cpu"
        if shape is None:
            emit.log(f"{worker_id} runs on the CPU: the size of {entry.id} cannot be read from its file")
            return "cpu"
        need = shape.need_mb(tokens)
        device, room = max(((d, f) for d, f in free.values()), key=lambda pair: (pair[1], pair[0].id))
        usable = room - FIT_MARGIN_MB
        if usable >= need:
            self._hold_engine(worker_id, device.id, need, free)
            emit.progress(f"placed {worker_id} on {device.id} ({device.description}): {entry.id} needs about {need} MiB "
                          f"(weights {shape.weights_mb:.0f}, KV cache of {tokens} tokens {shape.kv_mb(tokens):.0f}), "
                          f"{room} MiB free there")
            return device.id
        layers = shape.layers_fitting(tokens, usable)
        if layers >= 1:
            self._hold_engine(worker_id, device.id, max(0, usable), free)
            emit.progress(f"placed {worker_id} on {device.id} ({device.description}) in part: {entry.id} needs about "
                          f"{need} MiB, {room} MiB are free, so about {layers} of its {shape.layers} layers go to the GPU "
                          "and the rest run on the CPU")
            return device.id
        emit.log(f"{worker_id} runs on the CPU: {entry.id} needs about {need} MiB and no GPU has room for one of its "
                 f"layers ({describe([d for d, _ in free.values()])})")
        return "cpu"

    def _hold_engine(self, worker_id: str, device: str, mb: int, free: dict[str, tuple[EngineDevice, int]]) -> None:
        ids = device_ids(device)
        total = sum(free[d][1] for d in ids) or 1
        self._held_engine[worker_id] = {d: mb * free[d][1] // total for d in ids}

    # -- exllamav2 workers: NVIDIA GPUs ------------------------------------------------------------

    def check_cuda(self, op: WorkerSpawnOp, info: DeviceInfo, worker_id: str) -> None:
        """A named ``cuda:N`` for exllamav2 must be one of this hive's NVIDIA GPUs."""
        have = {g.index for g in info.gpus}
        missing = [d for d in device_ids(op.device) if not d.startswith("cuda:") or int(d.split(":")[1]) not in have]
        if missing:
            gpus = ", ".join(f"cuda:{g.index} ({g.name}, {g.vram_free_mb} MB free)" for g in info.gpus) or "no NVIDIA GPU"
            raise OperationFailed(f"{CANNOT_PLACE} {worker_id}: device {', '.join(missing)} does not exist on hive "
                                  f"{self.hive_id} for exllamav2; it has {gpus}"
                                  + (f" ({info.gpu_error})" if info.gpu_error else ""))

    async def device_for(self, op: WorkerSpawnOp, entry: ModelEntry, worker_id: str, emit: Emitter) -> str:
        placed = self._placed(worker_id)
        if placed is not None:
            return placed
        need = vram_need(entry, op.options, op.ctx_size or self._default_ctx)
        async with self._lock:
            host = self.host_state(await self._probe())
            try:
                chosen = place(need.as_need(), [host], op.placement)
            except NoFit as exc:
                raise OperationFailed(f"{CANNOT_PLACE} {worker_id}: {entry.id} needs {need.describe()}; {exc}") from None
            self._hold(worker_id, chosen, host)
        emit.progress(f"placed {worker_id} on {chosen.device} ({op.placement}): {need.describe()}, "
                      f"{chosen.free_mb} MB free there")
        return chosen.device

    def host_state(self, info: DeviceInfo) -> Host:
        held: dict[int, int] = {}
        for per_gpu in self._held.values():
            for index, mb in per_gpu.items():
                held[index] = held.get(index, 0) + mb
        gpus = tuple(Gpu(g.index, g.name, max(0, g.vram_free_mb - held.get(g.index, 0)), g.vram_total_mb)
                     for g in info.gpus)
        return Host(self.hive_id, gpus, note=info.gpu_error or "")

    def _hold(self, worker_id: str, chosen: Placement, host: Host) -> None:
        free = {g.index: g.free_mb for g in host.gpus if g.index in chosen.gpus}
        total = sum(free.values()) or 1
        # exllamav2's autosplit fills GPUs in turn; holding in proportion to free room is close enough.
        self._held[worker_id] = {i: chosen.need_mb * f // total for i, f in free.items()}

    def held(self) -> dict[str, dict[int, int]]:
        return {k: dict(v) for k, v in self._held.items()}

    def release(self, worker_id: str) -> None:
        self._held.pop(worker_id, None)
        self._held_engine.pop(worker_id, None)
