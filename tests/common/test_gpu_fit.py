"""GPU placement on synthetic fleets: the pure decision, the VRAM estimate, and the hive's spawn path."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest

from rbee_fleet.common.errors import OperationFailed
from rbee_fleet.common.gpu_fit import Gpu, Host, Need, NoFit, place
from rbee_fleet.common.jobs import JobRegistry
from rbee_fleet.common.paths import Layout
from rbee_fleet.common.vram import ExlOptions, ModelShape, estimate
from rbee_fleet.contracts.fleet import CpuInfo, DeviceInfo, GpuInfo, ModelEntry, WorkerSpawnOp
from rbee_fleet.hive import gpu_stack
from rbee_fleet.hive.catalog import META, detect_format
from rbee_fleet.hive.service import HiveService, HiveSettings

GB = 1024


def host(name: str, *free: int, has_model: bool = True, note: str = "") -> Host:
    return Host(name, tuple(Gpu(i, f"GPU{i}", f, 24 * GB) for i, f in enumerate(free)), has_model, note)


# -- the decision --------------------------------------------------------------------------------


def test_binpack_takes_the_tightest_fit_and_spread_the_roomiest():
    fleet = [host("a", 20 * GB, 9 * GB), host("b", 12 * GB, 3 * GB)]
    need = Need(shared_mb=7 * GB, per_gpu_mb=768)
    packed = place(need, fleet, "binpack")
    assert (packed.host, packed.device) == ("a", "cuda:1")  # 9 GB: the least left over
    spread = place(need, fleet, "spread")
    assert (spread.host, spread.device) == ("a", "cuda:0")  # 20 GB: the most left over
    assert packed.need_mb == 7 * GB + 768


def test_hosts_with_the_model_come_first():
    fleet = [host("fresh", 24 * GB, has_model=False), host("has-it", 10 * GB)]
    chosen = place(Need(8 * GB, 768), fleet, "spread")
    assert chosen.host == "has-it" and chosen.has_model  # even though "fresh" has more room
    # When no host with the files can take it, one without them is used.
    chosen = place(Need(12 * GB, 768), fleet, "binpack")
    assert chosen.host == "fresh" and not chosen.has_model


def test_split_over_gpus_of_one_host_only_when_no_single_gpu_fits():
    fleet = [host("duo", 11 * GB, 11 * GB, 2 * GB), host("solo", 16 * GB)]
    need = Need(shared_mb=20 * GB, per_gpu_mb=768)
    chosen = place(need, fleet)
    assert (chosen.host, chosen.gpus) == ("duo", (0, 1))
    assert chosen.need_mb == 20 * GB + 2 * 768  # the overhead is paid on each GPU
    with pytest.raises(NoFit):
        place(need, fleet, allow_split=False)
    # 16 GB + 11 GB on two hosts would fit, but a worker never spans machines.
    with pytest.raises(NoFit):
        place(Need(24 * GB, 768), [host("x", 16 * GB), host("y", 11 * GB)])


def test_split_uses_the_fewest_gpus():
    fleet = [host("quad", 6 * GB, 6 * GB, 6 * GB, 12 * GB)]
    chosen = place(Need(16 * GB, 512), fleet)
    assert chosen.gpus == (0, 3)  # 12 + 6 GB: two GPUs, not three


def test_no_fit_names_every_host_and_gpu():
    fleet = [host("a", 5 * GB, 4 * GB), Host("b", ()), host("c", note="unreachable: connection refused")]
    with pytest.raises(NoFit) as info:
        place(Need(20 * GB, 768), fleet)
    text = str(info.value)
    assert "no GPU has room for 21248 MB" in text
    assert "a: GPU 0 GPU0 5120 of 24576 MB free, GPU 1 GPU1 4096 of 24576 MB free" in text
    assert "b: no NVIDIA GPU" in text and "c: unreachable: connection refused" in text
    with pytest.raises(NoFit, match="no host with GPUs"):
        place(Need(1, 1), [])


def test_ties_are_deterministic():
    fleet = [host("b", 10 * GB), host("a", 10 * GB, 10 * GB)]
    assert [place(Need(GB, 0), fleet).describe() for _ in range(5)] == ["a cuda:0: needs 1024 MB of 10240 MB free"] * 5


def test_unknown_policy():
    with pytest.raises(ValueError, match="binpack or spread"):
        place(Need(1, 1), [host("a", GB)], "random")  # type: ignore[arg-type]


# -- the estimate ----------------------------------------------------------------------------------

LLAMA3_8B = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "num_attention_heads": 32,
             "num_key_value_heads": 8, "num_hidden_layers": 32, "max_position_embeddings": 8192,
             "quantization_config": {"quant_method": "exl2", "bits": 6.0}}


def llama3_exl2(path: Path, weight_bytes: int = 6_400_000_000) -> Path:
    """A Llama-3-8B 6.0bpw EXL2 directory: its real config.json and a sparse weight file of its size."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(LLAMA3_8B))
    with open(path / "output.safetensors", "wb") as fh:
        fh.truncate(weight_bytes)
    return path


def test_estimate_of_llama3_8b(tmp_path):
    model = llama3_exl2(tmp_path / "l3")
    shape = ModelShape.from_dir(model)
    assert shape.cache_bytes_per_token("fp16") == 128 * 1024  # 2 x 32 layers x 8 kv heads x 128 dims x 2 bytes
    need = estimate(model, 8192, ExlOptions(), paged=True)  # 4 sequences of 8192
    assert (need.weights_mb, need.cache_mb, need.cache_tokens) == (6104, 4096, 32768)
    assert estimate(model, 8192, ExlOptions(), paged=False).cache_mb == 1024  # one sequence without flash-attn
    assert estimate(model, 8192, ExlOptions(cache="q4"), paged=True).cache_mb == 1152
    assert estimate(model, 1000, ExlOptions(cache_tokens=5000), paged=True).cache_tokens == 5120


def test_options_are_validated():
    assert ExlOptions.parse({"cache": "Q8", "gpu_split": "20,24", "paged": "false", "max_batch_size": "8"}) == \
        ExlOptions(cache="q8", gpu_split=(20.0, 24.0), paged=False, max_batch_size=8)
    assert ExlOptions.parse({"gpu_split": [12, 12.5]}).gpu_split == (12.0, 12.5)
    for bad, word in [({"cache": "fp8"}, "cache"), ({"gpu_split": [0, 1]}, "positive"),
                      ({"cache_tokens": 1.5}, "whole number"), ({"min_p": "x"}, "min_p"), ({"nope": 1}, "unknown")]:
        with pytest.raises(ValueError, match=word):
            ExlOptions.parse(bad)


# -- the hive's spawn path -----------------------------------------------------------------------


def devices_of(*gpus: tuple[str, int, int], error: str | None = None) -> DeviceInfo:
    """A stand-in for this machine's probe: synthetic GPUs (there are none here)."""
    return DeviceInfo(cpu=CpuInfo(cores=8, threads=16, ram_total_mb=64000, ram_available_mb=60000),
                      gpus=[GpuInfo(index=i, name=n, uuid=f"GPU-{i:08d}-0000-0000-0000-000000000000",
                                    vram_total_mb=t, vram_free_mb=f) for i, (n, t, f) in enumerate(gpus)],
                      gpu_error=error)


class Launched(Exception):
    """Raised by the stand-in supervisor instead of starting an exllamav2 worker (no CUDA here)."""


@pytest.fixture
async def hive(tmp_path, home, monkeypatch):
    async with aiohttp.ClientSession() as session:
        service = HiveService(HiveSettings(hive_id="gpubox", layout=Layout(home), default_ctx_size=8192), session)
        launched: list = []

        async def spawn_standin(spec, emit):
            launched.append(spec)
            held = service.gpus.held()
            raise Launched(held)

        monkeypatch.setattr(service.supervisor, "spawn", spawn_standin)
        # As on an Ampere box with flash-attn >= 2.5.7: paged workers, four sequences each.
        monkeypatch.setattr(gpu_stack, "paged_attention_available", lambda flash_attn=None: True)
        # Put straight into the catalog's layout: copying 6 GB of (sparse) weights would only cost time.
        model = llama3_exl2(service.catalog.root / "llama3")
        entry = ModelEntry(id="llama3", format=detect_format(model), path=str(model), size_bytes=6_400_000_000,
                           source="hf:turboderp/Llama-3-8B-Instruct-exl2@6.0bpw")
        (model / META).write_text(entry.model_dump_json())
        assert service.catalog.get("llama3").format == "exl2"
        yield service, launched
        await service.close()


def use_devices(service: HiveService, info: DeviceInfo) -> None:
    """Make the hive see ``info`` as its GPUs (both the fresh probe placement uses and the cached view)."""

    async def probe() -> DeviceInfo:
        return info

    service.gpus._probe = probe
    service.devices = lambda: info


async def run_spawn(service, op):
    registry = JobRegistry()
    job = registry.submit(op.model_dump(), lambda emit: service.run(op, emit))
    await job.task
    await registry.close()
    return job


async def test_auto_device_goes_to_the_gpu_that_fits_pinned_by_uuid(hive):
    service, launched = hive
    use_devices(service, devices_of(("RTX 3060", 12288, 11000), ("RTX 4090", 24564, 23000), ("RTX 3090", 24576, 16000)))
    op = WorkerSpawnOp(hive="gpubox", model="llama3", device="auto")
    job = await run_spawn(service, op)
    [spec] = launched
    # Needs 6104 + 4096 + 768 = 10968 MB; binpack: the 3060's 11000 MB is the tightest fit.
    assert spec.device == "cuda:0" and spec.backend == "exllamav2"
    env = dict(spec.env)
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-00000000-0000-0000-0000-000000000000"
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert "Launched" in job.error and "10968" in job.error  # the hold was in place while it started
    assert service.gpus.held() == {}  # and is released once the start is over
    assert any("placed gpubox-llama3-0 on cuda:0" in e.message for e in job.events)

    launched.clear()
    await run_spawn(service, op.model_copy(update={"placement": "spread"}))
    assert launched[0].device == "cuda:1"  # the 4090 has the most room


async def test_workers_starting_together_do_not_share_a_gpu(hive):
    service, launched = hive
    use_devices(service, devices_of(("RTX 4090", 24564, 12000), ("RTX 3090", 24576, 12000)))
    entry = service.catalog.get("llama3")

    class Quiet:
        def progress(self, *a, **k): ...
        def log(self, *a, **k): ...

    first = await service.gpus.device_for(WorkerSpawnOp(model="llama3", device="auto"), entry, "w1", Quiet())
    second = await service.gpus.device_for(WorkerSpawnOp(model="llama3", device="auto"), entry, "w2", Quiet())
    assert {first, second} == {"cuda:0", "cuda:1"}  # the first one's hold kept the second off its GPU
    with pytest.raises(OperationFailed, match="cannot place w3"):
        await service.gpus.device_for(WorkerSpawnOp(model="llama3", device="auto"), entry, "w3", Quiet())
    service.gpus.release("w1")
    assert await service.gpus.device_for(WorkerSpawnOp(model="llama3", device="auto"), entry, "w3", Quiet()) == first


async def test_nothing_fits_is_refused_with_the_reason(hive):
    service, launched = hive

    use_devices(service, devices_of(("RTX 3060", 12288, 8000)))
    job = await run_spawn(service, WorkerSpawnOp(hive="gpubox", model="llama3", device="auto"))
    assert launched == []
    assert "cannot place gpubox-llama3-0: llama3 needs 10968 MB" in job.error
    assert "GPU 0 RTX 3060 8000 of 12288 MB free" in job.error
    # A quantized cache and a shorter context make it fit.
    await run_spawn(service, WorkerSpawnOp(hive="gpubox", model="llama3", device="auto", ctx_size=2048,
                                           options={"cache": "q4"}))
    assert launched[0].device == "cuda:0" and ("cache", "q4") in launched[0].options


async def test_without_flash_attn_the_estimate_is_for_one_sequence(hive, monkeypatch):
    service, launched = hive
    monkeypatch.setattr(gpu_stack, "paged_attention_available", lambda flash_attn=None: False)
    use_devices(service, devices_of(("RTX 3060", 12288, 8000)))
    job = await run_spawn(service, WorkerSpawnOp(hive="gpubox", model="llama3", device="auto"))
    assert launched[0].device == "cuda:0" and "7896" in job.error  # 6104 + 1024 + 768


async def test_auto_on_this_cpu_machine_says_there_is_no_gpu(hive):
    service, launched = hive
    job = await run_spawn(service, WorkerSpawnOp(hive="gpubox", model="llama3", device="auto"))
    assert launched == [] and "no NVIDIA GPU" in job.error


async def test_gguf_with_auto_device_runs_on_cpu(hive, model_path):
    service, launched = hive
    await run_spawn(service, WorkerSpawnOp(hive="gpubox", model="smollm2", device="auto"))
    assert launched[0].device == "cpu" and launched[0].backend == "llamacpp"
    assert "CUDA_VISIBLE_DEVICES" not in dict(launched[0].env)


async def test_bad_device_is_refused(hive):
    service, launched = hive
    job = await run_spawn(service, WorkerSpawnOp(hive="gpubox", model="llama3", device="gpu0"))
    assert "device 'gpu0'" in job.error and launched == []


def test_inventory_accepts_auto_device_and_a_policy():
    from rbee_fleet.common.inventory import InventoryError, parse_inventory

    inv = parse_inventory('[hives.gpubox]\naddress = "10.0.0.7"\n[[hives.gpubox.workers]]\nmodel = "llama3"\n'
                          'device = "auto"\nplacement = "spread"\noptions = { cache = "q4" }\n')
    [op] = inv.spawn_ops("gpubox")
    assert (op.device, op.placement, op.options) == ("auto", "spread", {"cache": "q4"})
    with pytest.raises(InventoryError) as info:
        parse_inventory('[hives.gpubox]\n[[hives.gpubox.workers]]\nmodel = "m"\ndevice = "auto"\nplacement = "pack"\n')
    assert info.value.line == 5 and info.value.key == "hives.gpubox.workers[0].placement"
