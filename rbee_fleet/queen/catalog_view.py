"""The fleet's models as the queen sees them: every hive's catalog joined with the workers serving now.

Also the memory arithmetic of on-demand loading: what one worker of a model is estimated to take, and
what each hive has free for it (its devices' free memory, capped by its ``memory_budget_mb`` less what
its workers are estimated to take).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from rbee_fleet.common.vram import DEFAULT_OVERHEAD_MB
from rbee_fleet.contracts.capabilities import BY_FORMAT
from rbee_fleet.contracts.fleet import HiveView, ModelEntry, ModelView, WorkerState
from rbee_fleet.queen.registry import Registry

# A CPU worker (llama-server) maps the weights and adds its KV cache and compute buffers: without
# reading the model's shape, weights x 1.2 + 256 MB covers small and mid-sized models at the default
# context. A GPU worker takes the weights plus exllamav2's overhead (the hive refines that placement).
CPU_WEIGHTS_FACTOR = 1.2
CPU_OVERHEAD_MB = 256


def is_cpu(entry: ModelEntry) -> bool:
    return entry.format == "gguf"


def estimated_need_mb(entry: ModelEntry, override_mb: int | None = None) -> int:
    """Memory one worker of ``entry`` takes: RAM for GGUF models, VRAM for the GPU formats."""
    if override_mb:
        return override_mb
    weights = entry.size_bytes / 2**20
    if is_cpu(entry):
        return math.ceil(weights * CPU_WEIGHTS_FACTOR) + CPU_OVERHEAD_MB
    return math.ceil(weights) + DEFAULT_OVERHEAD_MB


@dataclass(frozen=True)
class HiveRoom:
    hive_id: str
    free_mb: int  # what a new worker of the model may take here now
    device_free_mb: int  # the devices' own figure (RAM available, or VRAM free summed over GPUs)
    budget_mb: int | None
    has_files: bool
    used_mb: int = 0  # what its workers (and loads under way) are estimated to take


def catalogs(hives: Iterable[HiveView]) -> dict[str, list[ModelEntry]]:
    return {h.hive_id: h.models for h in hives if h.live}


def find_entry(model: str, hives: Iterable[HiveView]) -> ModelEntry | None:
    for h in hives:
        if h.live:
            for entry in h.models:
                if entry.id == model:
                    return entry
    return None


def worker_needs(registry: Registry, hive_id: str, entries: Mapping[str, ModelEntry],
                 overrides: Mapping[str, int | None], exclude: Iterable[str] = ()) -> dict[str, int]:
    """Estimated memory of each live worker of ``hive_id`` (by worker id), leaving out ``exclude``."""
    skip = set(exclude)
    now = time.monotonic()
    needs: dict[str, int] = {}
    for rec in registry.workers.values():
        if rec.hb.hive_id != hive_id or rec.id in skip or not registry.is_live(rec, now):
            continue
        if rec.hb.state in (WorkerState.STOPPED, WorkerState.FAILED):
            continue
        entry = entries.get(rec.hb.model)
        needs[rec.id] = estimated_need_mb(entry, overrides.get(rec.hb.model)) if entry else 0
    return needs


def room(hive: HiveView, entry: ModelEntry, used_mb: int, budget_mb: int | None) -> HiveRoom:
    """What ``hive`` has free for a worker of ``entry``, given its workers' estimated ``used_mb``."""
    if is_cpu(entry):
        # A GGUF worker runs on the GPU with the most free memory when it fits there (the hive places it),
        # else in RAM (with what fits offloaded).
        gpu_free = max((d.memory_free_mb for d in hive.devices.engine_devices), default=0)
        device_free = max(hive.devices.cpu.ram_available_mb, gpu_free)
    else:
        device_free = sum(g.vram_free_mb for g in hive.devices.gpus)
    free = device_free if budget_mb is None else min(device_free, max(0, budget_mb - used_mb))
    return HiveRoom(hive.hive_id, free, device_free, budget_mb, any(m.id == entry.id for m in hive.models), used_mb)


def model_views(registry: Registry, hives: list[HiveView], loading: Iterable[str],
                overrides: Mapping[str, int | None]) -> list[ModelView]:
    """Every model in a live hive's catalog or served by a live worker, with its state now."""
    now = time.monotonic()
    loading = set(loading)
    entries: dict[str, ModelEntry] = {}
    holders: dict[str, list[str]] = {}
    for h in hives:
        if not h.live:
            continue
        for entry in h.models:
            entries.setdefault(entry.id, entry)
            holders.setdefault(entry.id, []).append(h.hive_id)
    ready: dict[str, int] = {}
    starting: set[str] = set()
    devices: dict[str, set[str]] = {}
    for rec in registry.workers.values():
        if not registry.is_live(rec, now):
            continue
        if registry.in_rotation(rec, now):
            ready[rec.hb.model] = ready.get(rec.hb.model, 0) + 1
            devices.setdefault(rec.hb.model, set()).add(f"{rec.hb.hive_id}/{rec.hb.device}")
        elif rec.hb.state is WorkerState.LOADING:
            starting.add(rec.hb.model)
    views = []
    for model in sorted({*entries, *ready, *starting, *loading}):
        entry = entries.get(model)
        if ready.get(model):
            state = "loaded"
            caps = registry.capabilities_of(model)
        else:
            state = "loading" if model in starting or model in loading else "available"
            caps = registry.capabilities_of(model) or (BY_FORMAT.get(entry.format, frozenset()) if entry else frozenset())
        views.append(ModelView(
            id=model, state=state, workers=ready.get(model, 0), hives=sorted(holders.get(model, [])),
            format=entry.format if entry else "", size_bytes=entry.size_bytes if entry else 0,
            need_mb=estimated_need_mb(entry, overrides.get(model)) if entry else 0, capabilities=sorted(caps),
            devices=sorted(devices.get(model, ())),
        ))
    return views
