"""Where a GPU worker goes: pure logic over hosts, their GPUs' free VRAM and the model's estimated need.

Filter, then score: a GPU (or, when no single GPU is big enough, several GPUs of one host) qualifies
when its free VRAM covers the need; ``binpack`` takes the tightest fit (keeping big GPUs whole for big
models), ``spread`` the roomiest (spreading load). Hosts that already have the model's files come
first; the others only when none of those fits. Used by the hive (which GPU) and the queen (which host).
"""

from __future__ import annotations

from dataclasses import dataclass

from rbee_fleet.contracts.vocabulary import PLACEMENT_POLICIES, PlacementPolicy

CANNOT_PLACE = "cannot place"  # starts a hive's refusal; the queen then tries the next hive


@dataclass(frozen=True)
class Need:
    """VRAM a worker will take: what is split across GPUs (weights, cache) and what each GPU adds."""

    shared_mb: int
    per_gpu_mb: int  # CUDA context and scratch: paid on every GPU the worker uses

    def on(self, gpus: int) -> int:
        return self.shared_mb + self.per_gpu_mb * gpus


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    free_mb: int
    total_mb: int = 0


@dataclass(frozen=True)
class Host:
    name: str
    gpus: tuple[Gpu, ...]
    has_model: bool = True
    note: str = ""  # why a host cannot take workers (unreachable, driver error), shown when nothing fits


@dataclass(frozen=True)
class Placement:
    host: str
    gpus: tuple[int, ...]
    need_mb: int
    free_mb: int  # free VRAM on the chosen GPUs before the worker
    has_model: bool

    @property
    def device(self) -> str:
        return "cuda:" + ",".join(str(i) for i in self.gpus)

    def describe(self) -> str:
        where = f"{self.host} {self.device}"
        return f"{where}: needs {self.need_mb} MB of {self.free_mb} MB free"


class NoFit(Exception):
    """Nothing can take the worker; the message lists every host and GPU with its free VRAM."""


def place(need: Need, hosts: list[Host], policy: PlacementPolicy = "binpack", *, allow_split: bool = True) -> Placement:
    if policy not in PLACEMENT_POLICIES:
        raise ValueError(f"unknown placement policy {policy!r}; use {' or '.join(PLACEMENT_POLICIES)}")
    with_model = [h for h in hosts if h.has_model]
    without = [h for h in hosts if not h.has_model]
    for group in (with_model, without):
        chosen = _best(need, group, policy, allow_split)
        if chosen is not None:
            return chosen
    raise NoFit(_why_not(need, hosts, allow_split))


def _best(need: Need, hosts: list[Host], policy: PlacementPolicy, allow_split: bool) -> Placement | None:
    single = [
        Placement(h.name, (g.index,), need.on(1), g.free_mb, h.has_model)
        for h in hosts for g in h.gpus if g.free_mb >= need.on(1)
    ]
    if single:
        return _pick(single, policy)
    if not allow_split:
        return None
    split = [p for p in (_split_on(need, h) for h in hosts) if p is not None]
    if not split:
        return None
    fewest = min(len(p.gpus) for p in split)  # fewer GPUs: less overhead and less traffic between them
    return _pick([p for p in split if len(p.gpus) == fewest], policy)


def _split_on(need: Need, host: Host) -> Placement | None:
    """The fewest GPUs of ``host`` (roomiest first) whose free VRAM together covers the need."""
    taken: list[Gpu] = []
    for gpu in sorted(host.gpus, key=lambda g: (-g.free_mb, g.index)):
        if gpu.free_mb <= need.per_gpu_mb:
            break  # a GPU that cannot even hold its own overhead adds nothing
        taken.append(gpu)
        if len(taken) > 1 and sum(g.free_mb for g in taken) >= need.on(len(taken)):
            indices = tuple(sorted(g.index for g in taken))
            return Placement(host.name, indices, need.on(len(taken)), sum(g.free_mb for g in taken), host.has_model)
    return None


def _pick(options: list[Placement], policy: PlacementPolicy) -> Placement:
    def key(p: Placement) -> tuple[int, str, tuple[int, ...]]:
        left = p.free_mb - p.need_mb
        return (left if policy == "binpack" else -left, p.host, p.gpus)

    return min(options, key=key)


def _why_not(need: Need, hosts: list[Host], allow_split: bool) -> str:
    head = f"no GPU has room for {need.on(1)} MB"
    if allow_split:
        head += f" (or {need.on(2)} MB across two GPUs of one host)"
    if not hosts:
        return head + ": no host with GPUs is available"
    lines = []
    for h in hosts:
        if h.note:
            lines.append(f"{h.name}: {h.note}")
        elif not h.gpus:
            lines.append(f"{h.name}: no NVIDIA GPU")
        else:
            gpus = ", ".join(f"GPU {g.index} {g.name} {g.free_mb} of {g.total_mb} MB free" for g in h.gpus)
            lines.append(f"{h.name}: {gpus}")
    return head + "; " + "; ".join(lines)
