"""Where the queen loads a model on demand, on a real queen's registry fed with hive and worker heartbeats.

Several machines cannot run here, so the hives are heartbeats (the queen knows hives only by them); the
real-process tests are in tests/queen/test_on_demand.py.
"""

from __future__ import annotations

import time

import aiohttp
import pytest

from rbee_fleet.common.inventory import ModelPolicy, QueenConfig
from rbee_fleet.common.paths import Layout
from rbee_fleet.contracts.fleet import (
    CpuInfo,
    DeviceInfo,
    GpuInfo,
    HiveHeartbeat,
    ModelEntry,
    WorkerHeartbeat,
    WorkerState,
)
from rbee_fleet.queen.catalog_view import estimated_need_mb
from rbee_fleet.queen.on_demand import NoRoom, Owned
from rbee_fleet.queen.settings import QueenSettings
from rbee_fleet.queen.state import Queen

MB = 2**20


def gguf(name: str, mb: int = 100, source: str = "builtin") -> ModelEntry:
    return ModelEntry(id=name, format="gguf", path=f"/m/{name}.gguf", size_bytes=mb * MB, source=source)


def hive(hive_id: str, models: list[ModelEntry], ram_mb: int = 8000, gpus: tuple[int, ...] = ()) -> HiveHeartbeat:
    devices = DeviceInfo(cpu=CpuInfo(cores=4, threads=8, ram_total_mb=16000, ram_available_mb=ram_mb),
                         gpus=[GpuInfo(index=i, name="RTX", vram_total_mb=24000, vram_free_mb=f) for i, f in enumerate(gpus)])
    return HiveHeartbeat(hive_id=hive_id, url=f"http://10.0.0.{len(hive_id)}:9000", version="t", devices=devices,
                         models=models)


def worker(wid: str, hive_id: str, model: str) -> WorkerHeartbeat:
    return WorkerHeartbeat(worker_id=wid, hive_id=hive_id, model=model, backend="llamacpp", device="cpu",
                           url=f"http://10.0.0.1:{9300 + len(wid)}", state=WorkerState.READY, slots_total=4)


@pytest.fixture
async def queen(tmp_path):
    def make(hive_budgets_mb=None, model_policies=None, **config) -> Queen:
        s = QueenSettings(layout=Layout(tmp_path), config=QueenConfig(host="127.0.0.1", port=1, **config),
                          hive_budgets_mb=hive_budgets_mb or {}, model_policies=model_policies or {})
        return Queen(s, session)

    async with aiohttp.ClientSession() as session:
        yield make


async def test_the_hive_with_the_files_first_then_the_most_free_memory(queen):
    q = queen()
    q.registry.hive_heartbeat(hive("big-without", [gguf("other", source="hf:o/r/x.gguf")], ram_mb=60000))
    q.registry.hive_heartbeat(hive("small", [gguf("smol")], ram_mb=2000))
    q.registry.hive_heartbeat(hive("roomy", [gguf("smol")], ram_mb=6000))
    plan = q.on_demand.plan("smol", gguf("smol"))
    assert plan.room.hive_id == "roomy" and plan.evict == () and plan.need_mb == estimated_need_mb(gguf("smol"))
    # Only a hive without the files has room: it gets it, with a download from the recorded source.
    q2 = queen()
    q2.registry.hive_heartbeat(hive("full", [gguf("smol", source="hf:o/r/smol.gguf")], ram_mb=100))
    q2.registry.hive_heartbeat(hive("empty", [], ram_mb=9000))
    plan = q2.on_demand.plan("smol", gguf("smol"))
    assert plan.room.hive_id == "empty" and not plan.room.has_files and plan.source == "hf:o/r/smol.gguf"


async def test_the_budget_caps_free_memory_and_evicts_the_least_recently_used_idle_worker(queen):
    q = queen(hive_budgets_mb={"box": 1300},
              model_policies={m: ModelPolicy(memory_mb=400) for m in ("a", "b", "c", "pinned")})
    q.registry.hive_heartbeat(hive("box", [gguf(m) for m in ("a", "b", "c", "pinned")]))
    for wid, model in (("pin-0", "pinned"), ("od-a", "a"), ("od-b", "b")):
        q.registry.worker_heartbeat(worker(wid, "box", model))
    now = time.monotonic()
    q.on_demand.owned = {"od-a": Owned("od-a", "box", "a", 400, loaded_at=now - 50),
                         "od-b": Owned("od-b", "box", "b", 400, loaded_at=now - 50)}
    q.registry.workers["od-a"].last_used = now - 5
    q.registry.workers["od-b"].last_used = now - 30  # used longest ago
    plan = q.on_demand.plan("c", gguf("c"))  # 1200 MB used of 1300: room only after unloading one
    assert [o.worker_id for o in plan.evict] == ["od-b"]
    # A busy worker is never evicted, and a pinned one (not started on demand) never is.
    q.registry.workers["od-b"].in_flight = 1
    assert [o.worker_id for o in q.on_demand.plan("c", gguf("c")).evict] == ["od-a"]
    q.registry.workers["od-a"].in_flight = 1
    with pytest.raises(NoRoom) as err:
        q.on_demand.plan("c", gguf("c"))
    assert err.value.status == 503
    assert "needs about 400 MB of RAM" in err.value.message and "largest free memory of any hive is 100 MB" in err.value.message
    assert "budget of 1300 MB" in err.value.message


async def test_a_model_too_big_for_every_hive_names_its_need_and_the_largest_free_memory(queen):
    q = queen()
    q.registry.hive_heartbeat(hive("a", [gguf("huge", mb=30000)], ram_mb=12000))
    q.registry.hive_heartbeat(hive("b", [gguf("huge", mb=30000)], ram_mb=7000))
    with pytest.raises(NoRoom) as err:
        q.on_demand.plan("huge", gguf("huge", mb=30000))
    need = estimated_need_mb(gguf("huge", mb=30000))
    assert f"needs about {need} MB of RAM" in err.value.message
    assert "largest free memory of any hive is 12000 MB (hive a)" in err.value.message


async def test_gpu_models_are_measured_against_vram(queen):
    q = queen()
    exl2 = ModelEntry(id="llama", format="exl2", path="/m/llama", size_bytes=6000 * MB, source="hf:t/llama")
    q.registry.hive_heartbeat(hive("cpu-only", [exl2], ram_mb=64000))
    q.registry.hive_heartbeat(hive("gpu", [exl2], gpus=(3000, 8000)))
    assert q.on_demand.plan("llama", exl2).room.hive_id == "gpu"


async def test_models_list_every_catalog_model_with_its_state(queen):
    q = queen()
    q.registry.hive_heartbeat(hive("a", [gguf("smol"), gguf("other")]))
    q.registry.hive_heartbeat(hive("b", [gguf("smol")]))
    q.registry.worker_heartbeat(worker("w1", "a", "smol"))
    q.registry.worker_heartbeat(worker("w2", "b", "smol"))
    views = {v.id: v for v in q.on_demand.views()}
    assert views["smol"].state == "loaded" and views["smol"].workers == 2 and views["smol"].hives == ["a", "b"]
    assert views["other"].state == "available" and views["other"].workers == 0
    assert "tools" in views["other"].capabilities  # what llama-server will serve for a GGUF model
    q.registry.withhold("w1")  # being unloaded: out of rotation
    assert {v.id: v for v in q.on_demand.views()}["smol"].workers == 1
