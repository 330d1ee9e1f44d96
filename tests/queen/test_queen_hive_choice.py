"""The queen choosing a hive (``hive = "auto"``) on synthetic fleets, and the path through a real queen."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from rbee_fleet.common.errors import OperationFailed
from rbee_fleet.common.jobs import JobClient
from rbee_fleet.contracts.fleet import (
    CpuInfo,
    DeviceInfo,
    GpuInfo,
    ModelDownloadOp,
    ModelEntry,
    WorkerSpawnOp,
)
from rbee_fleet.queen.hive_choice import spawn_anywhere
from tests.support import procs

GB = 2**30


class HiveStandIn:
    """Stand-in for a remote hive (no other machines here): a catalog, and a record of the operations it got."""

    def __init__(self, hive_id: str, models: list[ModelEntry], *, refuse: bool = False, down: bool = False) -> None:
        self.hive_id = hive_id
        self.catalog = list(models)
        self.refuse = refuse
        self.down = down
        self.ops: list[Any] = []

    async def models(self) -> list[ModelEntry]:
        if self.down:
            raise OperationFailed(f"hive {self.hive_id} at http://10.0.0.9:9000 is unreachable: connection refused")
        return self.catalog

    async def run(self, op: Any, emit: Any) -> dict[str, Any]:
        self.ops.append(op)
        if isinstance(op, ModelDownloadOp):
            self.catalog.append(ModelEntry(id=op.name, format="exl2", path=f"/models/{op.name}", size_bytes=6 * GB,
                                           source=op.source))
            return {"changed": True}
        if self.refuse:
            raise OperationFailed(f"cannot place {op.model}-0: {op.model} needs 11000 MB; no GPU has room")
        return {"worker": {"worker_id": f"{self.hive_id}-{op.model}-0", "device": "cuda:0"}, "changed": True}


class Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def progress(self, message: str, *a: Any, **k: Any) -> None:
        self.lines.append(message)

    def log(self, message: str, *a: Any, **k: Any) -> None:
        self.lines.append(message)


def exl2(source: str = "hf:turboderp/Llama-3-8B-Instruct-exl2@6.0bpw") -> ModelEntry:
    return ModelEntry(id="llama3", format="exl2", path="/models/llama3", size_bytes=6 * GB, source=source)


def gguf() -> ModelEntry:
    return ModelEntry(id="smol", format="gguf", path="/models/smol.gguf", size_bytes=GB // 10, source="hf:x/y/smol.gguf")


def box(*free_mb: int, ram_mb: int = 32000, error: str | None = None) -> DeviceInfo:
    return DeviceInfo(cpu=CpuInfo(cores=8, threads=16, ram_total_mb=64000, ram_available_mb=ram_mb),
                      gpus=[GpuInfo(index=i, name="RTX 3090", vram_total_mb=24576, vram_free_mb=f)
                            for i, f in enumerate(free_mb)], gpu_error=error)


async def test_binpack_and_spread_pick_among_hives_with_the_model():
    hives = {"a": HiveStandIn("a", [exl2()]), "b": HiveStandIn("b", [exl2()]), "c": HiveStandIn("c", [])}
    devices = {"a": box(8000), "b": box(20000), "c": box(24000)}
    result = await spawn_anywhere(WorkerSpawnOp(hive="auto", model="llama3", device="auto"), hives, devices, Log())
    assert result["hive"] == "a"  # binpack: the tightest fit among the hives that have the files
    op = hives["a"].ops[-1]
    assert op.hive == "a" and op.device == "auto"  # the hive itself picks the GPU
    result = await spawn_anywhere(WorkerSpawnOp(hive="auto", model="llama3", device="auto", placement="spread"),
                                  hives, devices, Log())
    assert result["hive"] == "b" and hives["c"].ops == []  # c has more room but not the files


async def test_a_hive_that_cannot_place_it_hands_over_to_the_next():
    hives = {"a": HiveStandIn("a", [exl2()], refuse=True), "b": HiveStandIn("b", [exl2()])}
    log = Log()
    result = await spawn_anywhere(WorkerSpawnOp(hive="auto", model="llama3", device="auto"), hives,
                                  {"a": box(8000), "b": box(20000)}, log)
    assert result["hive"] == "b" and len(hives["a"].ops) == 1
    assert any("a cannot take it" in line for line in log.lines)


async def test_a_hive_without_the_files_gets_them_from_the_recorded_source():
    hives = {"a": HiveStandIn("a", [exl2()]), "c": HiveStandIn("c", [])}
    result = await spawn_anywhere(WorkerSpawnOp(hive="auto", model="llama3", device="auto"), hives,
                                  {"a": box(3000), "c": box(24000)}, Log())
    assert result["hive"] == "c"
    download, spawn = hives["c"].ops
    assert isinstance(download, ModelDownloadOp) and download.source == "hf:turboderp/Llama-3-8B-Instruct-exl2@6.0bpw"
    assert download.name == "llama3" and isinstance(spawn, WorkerSpawnOp)


async def test_a_local_path_cannot_be_fetched_by_another_hive():
    hives = {"a": HiveStandIn("a", [exl2(source="/home/me/models/llama3")]), "c": HiveStandIn("c", [])}
    with pytest.raises(OperationFailed, match="no hive has GPU room for llama3") as info:
        await spawn_anywhere(WorkerSpawnOp(hive="auto", model="llama3", device="auto"), hives,
                             {"a": box(3000), "c": box(24000)}, Log())
    assert "a: GPU 0 RTX 3090 3000 of 24576 MB free" in str(info.value) and hives["c"].ops == []


async def test_unknown_model_and_unreachable_hives():
    hives = {"a": HiveStandIn("a", []), "down": HiveStandIn("down", [exl2()], down=True)}
    log = Log()
    with pytest.raises(OperationFailed, match="no hive has the model 'llama3'; download it first"):
        await spawn_anywhere(WorkerSpawnOp(hive="auto", model="llama3", device="auto"), hives,
                             {"a": box(24000), "down": box(24000)}, log)
    assert any("skipping hive down" in line and "connection refused" in line for line in log.lines)


async def test_gguf_goes_to_a_hive_with_the_file_and_the_most_memory():
    hives = {"small": HiveStandIn("small", [gguf()]), "big": HiveStandIn("big", [gguf()]), "none": HiveStandIn("none", [])}
    devices = {"small": box(ram_mb=4000), "big": box(ram_mb=60000), "none": box(ram_mb=120000)}
    result = await spawn_anywhere(WorkerSpawnOp(hive="auto", model="smol"), hives, devices, Log())
    assert result["hive"] == "big" and hives["big"].ops[-1].device == "cpu"


async def test_hive_auto_through_a_real_queen(module_tmp, model_path):
    """On this machine's queen: its embedded hive is the only one, and smollm2 (GGUF) runs there on the CPU."""
    port = procs.free_port()
    inventory = procs.write_inventory(module_tmp / "inv.toml", port=port, worker_port_base=procs.free_port_range(4),
                                      workers=[])
    queen = procs.start_queen(module_tmp, inventory, module_tmp / "home", port)
    try:
        async with aiohttp.ClientSession() as session:
            jobs = JobClient(session, queen.url, procs.admin_headers(queen.extra["home"]))
            result = await jobs.run(WorkerSpawnOp(hive="auto", model="smollm2", device="auto", ctx_size=512, threads=2))
            assert result["hive"] == "localhost" and result["worker"]["device"] == "cpu"
            with pytest.raises(OperationFailed, match="no hive has the model 'nope'"):
                await jobs.run(WorkerSpawnOp(hive="auto", model="nope"))
    finally:
        queen.stop()
