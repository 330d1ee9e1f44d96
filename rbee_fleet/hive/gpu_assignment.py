"""Which GPUs of this hive a ``device = "auto"`` worker gets, and the VRAM held for it while it loads.

The decision itself is ``common.gpu_fit``'s pure logic; this module feeds it this machine's GPUs,
probed at that moment, minus what workers still loading will take (NVML shows their memory only once
they have allocated it, so without a hold two workers spawned together would both pick the same GPU).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from rbee_fleet.common.errors import OperationFailed
from rbee_fleet.common.gpu_fit import CANNOT_PLACE, Gpu, Host, NoFit, Placement, place
from rbee_fleet.common.jobs import Emitter
from rbee_fleet.common.vram import ExlOptions, VramNeed, estimate
from rbee_fleet.contracts.fleet import DeviceInfo, ModelEntry, WorkerSpawnOp
from rbee_fleet.hive import gpu_stack


def vram_need(entry: ModelEntry, options: dict[str, Any], ctx_size: int) -> VramNeed:
    """What an exllamav2 worker of ``entry`` with these options will take, or why it cannot be said."""
    try:
        opts = ExlOptions.parse(options)
        paged = gpu_stack.paged_attention_available() if opts.paged is None else opts.paged
        return estimate(entry.path, ctx_size, opts, paged=paged)
    except ValueError as exc:
        raise OperationFailed(f"cannot size {entry.id} for a GPU: {exc}") from None


class GpuPlacer:
    def __init__(self, hive_id: str, supervisor: Any, probe: Callable[[], Awaitable[DeviceInfo]],
                 default_ctx_size: int = 2048) -> None:
        self.hive_id = hive_id
        self._supervisor = supervisor
        self._probe = probe
        self._default_ctx = default_ctx_size
        self._held: dict[str, dict[int, int]] = {}  # worker id -> {GPU index: MB}
        self._lock = asyncio.Lock()

    async def device_for(self, op: WorkerSpawnOp, entry: ModelEntry, worker_id: str, emit: Emitter) -> str:
        existing = self._supervisor.get(worker_id)
        if existing is not None and existing.state not in ("stopped", "failed"):
            return str(existing.spec.device)  # already placed: asking again changes nothing
        if op.backend == "llamacpp" or entry.format == "gguf":
            emit.log(f"{entry.id} is a {entry.format} model: llama.cpp runs it on the CPU")
            return "cpu"
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
