"""Spawning a worker on whichever hive suits it (``hive = "auto"``).

The queen ranks the live hives by what it knows from their heartbeats (free VRAM per GPU, whether the
model's files are already there) against a lower bound of the model's need (its weights), then asks
the best one to place the worker itself (``device = "auto"``: the hive knows the exact need and its
GPUs' state right now). A hive that turns out to be too full is skipped for the next. A hive without
the model's files is used only when none with them can take it; the model is first downloaded there
from the source another hive recorded for it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from rbee_fleet.common.errors import ApiError, OperationFailed
from rbee_fleet.common.gpu_fit import CANNOT_PLACE, Gpu, Host, Need, NoFit, place
from rbee_fleet.common.jobs import Emitter
from rbee_fleet.common.vram import DEFAULT_OVERHEAD_MB
from rbee_fleet.contracts.fleet import DeviceInfo, ModelDownloadOp, ModelEntry, WorkerSpawnOp
from rbee_fleet.queen.hives import HiveHandle

log = logging.getLogger(__name__)

AUTO = "auto"  # the hive name that asks the queen to choose
DOWNLOADABLE = ("hf:", "http://", "https://")


async def spawn_anywhere(
    op: WorkerSpawnOp, hives: Mapping[str, HiveHandle], devices: Mapping[str, DeviceInfo], emit: Emitter
) -> dict[str, Any]:
    """Choose a hive for ``op`` (its ``hive`` is "auto") and spawn there; the result names the hive."""
    catalogs = await _catalogs(hives, emit)
    entries = [m for ms in catalogs.values() for m in ms if m.id == op.model]
    if not entries:
        raise OperationFailed(
            f"no hive has the model {op.model!r}; download it first: rbee-keeper model download SOURCE "
            f"--name {op.model} --hive HIVE"
        )
    entry = entries[0]
    source = next((e.source for e in entries if e.source.startswith(DOWNLOADABLE)), None)
    has = {h for h, ms in catalogs.items() if any(m.id == op.model for m in ms)}
    candidates = [h for h in catalogs if h in has or source is not None]
    if entry.format == "gguf" or op.backend == "llamacpp" or op.device == "cpu":
        order = _cpu_order(candidates, has, devices)
    else:
        order = _gpu_order(entry, candidates, has, devices, op)
    tried: list[str] = []
    for hive_id in order:
        if hive_id not in has:
            assert source is not None
            emit.progress(f"{hive_id} has no copy of {op.model}: downloading it there from {source}")
            await hives[hive_id].run(ModelDownloadOp(hive=hive_id, source=source, name=op.model), emit)
        emit.progress(f"trying hive {hive_id}")
        try:
            result = await hives[hive_id].run(op.model_copy(update={"hive": hive_id}), emit)
        except (OperationFailed, ApiError) as exc:
            if CANNOT_PLACE not in str(exc):
                raise
            tried.append(f"{hive_id}: {exc}")
            emit.log(f"{hive_id} cannot take it: {exc}")
            continue
        return {**result, "hive": hive_id}
    why = "; ".join(tried) or "no live hive can run it"
    raise OperationFailed(f"no hive can take a worker of {op.model}: {why}")


async def _catalogs(hives: Mapping[str, HiveHandle], emit: Emitter) -> dict[str, list[ModelEntry]]:
    found: dict[str, list[ModelEntry]] = {}
    for hive_id, handle in hives.items():
        try:
            found[hive_id] = await handle.models()
        except (OperationFailed, ApiError, OSError) as exc:  # one unreachable hive never blocks the rest
            emit.log(f"skipping hive {hive_id}: {exc}")
    return found


def _cpu_order(candidates: list[str], has: set[str], devices: Mapping[str, DeviceInfo]) -> list[str]:
    """For llama-server workers: hives with the model first, then the one whose roomiest GPU (any vendor)
    has the most free memory, then the most free RAM; each hive then places the worker on its devices."""
    def gpu(h: str) -> int:
        info = devices.get(h)
        return max((d.memory_free_mb for d in info.engine_devices), default=0) if info else 0

    def ram(h: str) -> int:
        info = devices.get(h)
        return info.cpu.ram_available_mb if info else 0

    return sorted(candidates, key=lambda h: (h not in has, -gpu(h), -ram(h), h))


def _gpu_order(entry: ModelEntry, candidates: list[str], has: set[str], devices: Mapping[str, DeviceInfo],
               op: WorkerSpawnOp) -> list[str]:
    """Hives in the order to ask: placement's own choice first, then the next best without it, and so on."""
    need = Need(shared_mb=math.ceil(entry.size_bytes / 2**20), per_gpu_mb=DEFAULT_OVERHEAD_MB)
    hosts = []
    for h in candidates:
        info = devices.get(h)
        gpus = tuple(Gpu(g.index, g.name, g.vram_free_mb, g.vram_total_mb) for g in info.gpus) if info else ()
        hosts.append(Host(h, gpus, has_model=h in has, note=(info.gpu_error or "") if info else "not reporting"))
    order: list[str] = []
    while hosts:
        try:
            chosen = place(need, hosts, op.placement)
        except NoFit as exc:
            if not order:
                raise OperationFailed(f"no hive has GPU room for {op.model} (at least {need.on(1)} MB): {exc}") from None
            break
        order.append(chosen.host)
        hosts = [h for h in hosts if h.name != chosen.host]
    return order
