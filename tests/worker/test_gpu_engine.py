"""llama-server on every GPU vendor, the parts that are decisions: the build's parts and CPU variants, the
devices llama-server lists, the worker's command line and what it reads from llama-server's log, the
GGUF memory estimate, and where the hive places a GGUF worker.

The placement tests feed the hive's placer a device report (``ScriptedDevices``, a test double standing in
for a GPU this machine does not have); the end-to-end run on a real Vulkan device is
``test_vulkan_worker.py``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from rbee_fleet.common.errors import OperationFailed
from rbee_fleet.common.gguf_fit import read_shape
from rbee_fleet.common.inventory import InventoryError, parse_inventory
from rbee_fleet.common.llama_engine import engine_name, parse_devices
from rbee_fleet.contracts.fleet import CpuInfo, DeviceInfo, EngineDevice, ModelEntry, WorkerSpawnOp
from rbee_fleet.contracts.vocabulary import device_ids
from rbee_fleet.deploy import llama_build
from rbee_fleet.hive.gpu_assignment import GpuPlacer
from rbee_fleet.worker.llama_server import EngineConfig, Offload
from tests.support import procs

ICELAKE_FLAGS = set("fpu sse4_2 avx f16c fma avx2 bmi2 avx512f avx512cd avx512bw avx512dq avx512vl avx512vbmi "
                    "avx512_vnni".split())


def test_the_cpu_variant_chosen_is_the_best_one_the_cpu_has():
    variants = llama_build.KNOWN_X86_FEATURES
    assert llama_build.best_variant(variants, ICELAKE_FLAGS) == "icelake"
    assert llama_build.best_variant(variants, ICELAKE_FLAGS - {"avx512vbmi"}) == "skylakex"
    assert llama_build.best_variant(variants, {"sse4_2", "avx", "f16c", "fma", "avx2", "bmi2", "avx_vnni"}) == "alderlake"
    assert llama_build.best_variant(variants, set()) == "x64"  # the baseline runs anywhere
    assert llama_build.host_variants("x86_64", ICELAKE_FLAGS) == ("icelake", "x64")
    assert llama_build.host_variants("x86_64", ()) == ()  # an unknown CPU gets every variant


def test_the_variants_rbee_fleet_knows_are_the_pinned_ggmls():
    """What the build chooses from must be what the pinned sources declare (and may build)."""
    source = llama_build._sources(lambda _m: None)
    declared = llama_build.cpu_variants((source / "ggml" / "src" / "CMakeLists.txt").read_text())
    assert declared == llama_build.KNOWN_X86_FEATURES


def test_every_part_is_a_wheel_of_its_own_installing_beside_the_server():
    parts = [llama_build.Part(n) for n in ("server", "cpu:icelake", "vulkan", "cuda", "rocm")]
    assert [p.dist for p in parts] == ["rbee_llama_server", "rbee_llama_cpu_icelake", "rbee_llama_vulkan",
                                       "rbee_llama_cuda", "rbee_llama_rocm"]
    assert [p.tree for p in parts] == ["cpu", "cpu", "vulkan", "cuda", "rocm"]
    assert [p.targets for p in parts] == [("llama-server",), ("ggml-cpu-icelake",), ("ggml-vulkan",), ("ggml-cuda",),
                                          ("ggml-hip",)]
    # A part's id changes with what it is built from: the CUDA one with its architectures.
    cuda = llama_build.Part("cuda")
    assert llama_build.part_id(cuda, cuda_archs="90") != llama_build.part_id(cuda, cuda_archs="86;90")
    assert llama_build.gpu_backend("cuda").requires == ("nvidia-cuda-runtime==13.0.96", "nvidia-cublas==13.1.0.3")


def test_a_missing_toolkit_is_a_clear_build_error(monkeypatch):
    monkeypatch.setattr(llama_build.shutil, "which", lambda _name: None)
    with pytest.raises(llama_build.BuildError, match="missing glslc"):
        llama_build._toolkit_env("vulkan", lambda _m: None)
    with pytest.raises(llama_build.BuildError, match="ROCm toolkit"):
        llama_build._toolkit_env("rocm", lambda _m: None)
    with pytest.raises(llama_build.BuildError, match="only on macOS"):
        llama_build._toolkit_env("metal", lambda _m: None)


LISTED = """Available devices:
  CUDA0: NVIDIA GeForce RTX 4090 (24080 MiB, 23500 MiB free)
  CUDA1: NVIDIA GeForce RTX 3090 (24576 MiB, 1024 MiB free)
  Vulkan0: AMD Radeon RX 7900 XTX (RADV NAVI31) (24560 MiB, 24000 MiB free)
  MTL0: Apple M2 Max (49152 MiB, 49152 MiB free)
"""


def test_llama_servers_device_list_in_the_fleets_names():
    devices = parse_devices(LISTED)
    assert [(d.id, d.name, d.memory_free_mb) for d in devices] == [
        ("cuda:0", "CUDA0", 23500), ("cuda:1", "CUDA1", 1024), ("vulkan:0", "Vulkan0", 24000), ("metal", "MTL0", 49152)]
    assert devices[2].description == "AMD Radeon RX 7900 XTX (RADV NAVI31)"
    assert devices[3].unified and not devices[0].unified  # Apple's unified memory counts as GPU memory
    assert parse_devices("Available devices:\n  (none)\n") == []
    assert [engine_name(d) for d in ("cuda:1", "vulkan:0", "rocm:2", "metal")] == ["CUDA1", "Vulkan0", "ROCm2", "MTL0"]
    assert device_ids("cuda:0,1") == ["cuda:0", "cuda:1"] and device_ids("metal") == ["metal"]


def _config(**kw) -> list[str]:
    base = {"model_path": "m.gguf", "model_id": "m", "host": "127.0.0.1", "port": 9300, "ctx_size": 512, "slots": 1}
    return EngineConfig(**{**base, **kw}).command(Path("/x/llama-server"))


def test_the_worker_puts_llama_server_on_its_devices_and_nowhere_else():
    cpu = _config()
    assert cpu[cpu.index("--device") + 1] == "none"  # a CPU worker stays on the CPU beside a visible GPU
    assert "--n-gpu-layers" not in cpu
    two = _config(device="vulkan:0,1")
    assert two[two.index("--device") + 1] == "Vulkan0,Vulkan1" and "--n-gpu-layers" not in two  # llama.cpp fits
    assert two[two.index("--log-verbosity") + 1] == "4"  # its load log says where the layers went
    some = _config(device="cuda:0", gpu_layers=12)
    assert some[some.index("--n-gpu-layers") + 1] == "12"
    with pytest.raises(Exception, match="set by the worker itself"):
        _config(options=(("n_gpu_layers", 3),))


def test_the_worker_reads_layers_and_gpu_memory_from_llama_servers_log():
    offload = Offload()
    for line in (b"0.25 I load_tensors: offloaded 31/31 layers to GPU\n",
                 b"0.25 I load_tensors:   CPU_Mapped model buffer size =    28.69 MiB\n",
                 b"0.25 I load_tensors:      Vulkan0 model buffer size =    92.10 MiB\n",
                 b"0.31 I llama_context: Vulkan_Host  output buffer size =     0.19 MiB\n",
                 b"0.31 I llama_kv_cache:    Vulkan0 KV buffer size =    45.00 MiB\n",
                 b"0.36 I sched_reserve:    Vulkan0 compute buffer size =    13.26 MiB\n",
                 b"0.36 I sched_reserve: Vulkan_Host compute buffer size =     4.26 MiB\n"):
        offload.read(line)
    assert offload.layers == (31, 31)
    assert offload.gpu_memory_mb == 150  # the device's buffers only, not the host's
    assert Offload().gpu_memory_mb is None


def test_the_gguf_estimate_of_the_default_model():
    shape = read_shape(procs.model_path())
    assert shape is not None and shape.layers == 30 and 90 < shape.weights_mb < 95  # 92.1 MiB of tensors
    # 30 layers x 3 KV heads x (64 + 64) x 2 bytes: 23,040 bytes a token; 45 MiB for 2048 tokens (llama-server's
    # own KV buffer for that context is 45.00 MiB).
    assert shape.kv_bytes_per_token == 23040 and round(shape.kv_mb(2048)) == 45
    assert shape.layers_fitting(2048, 10_000) == 30 and shape.layers_fitting(2048, 0) == 0
    assert 0 < shape.layers_fitting(2048, int(shape.compute_mb() + 60)) < 30


class ScriptedDevices:
    """Test double: the device report of a hive with GPUs this machine does not have."""

    def __init__(self, devices: list[EngineDevice], backends: dict[str, str]) -> None:
        self.info = DeviceInfo(cpu=CpuInfo(cores=2, threads=2, ram_total_mb=8000, ram_available_mb=6000),
                               engine_devices=devices, engine_backends=backends)

    async def __call__(self, engine: bool = False) -> DeviceInfo:
        return self.info


class NoWorkers:
    def get(self, _worker_id: str) -> None:
        return None


class Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def progress(self, message: str, *_a, **_k) -> None:
        self.lines.append(message)

    log = progress


def _gpu(id_: str, free: int, total: int = 24000) -> EngineDevice:
    return EngineDevice(id=id_, name=engine_name(id_), description=f"GPU {id_}", memory_total_mb=total,
                        memory_free_mb=free)


def _place(devices: list[EngineDevice], backends: dict[str, str], device: str = "auto", **op) -> tuple[str, list[str]]:
    placer = GpuPlacer("box", NoWorkers(), ScriptedDevices(devices, backends))
    entry = ModelEntry(id="smollm2", format="gguf", path=procs.model_path(), size_bytes=98_362_432, source="builtin")
    log = Log()
    chosen = asyncio.run(placer.engine_device_for(WorkerSpawnOp(hive="box", model="smollm2", device=device,
                                                                ctx_size=2048, slots=1, **op), entry, "w", log))
    return chosen, log.lines


def test_auto_takes_the_gpu_with_the_most_free_memory_that_fits():
    chosen, said = _place([_gpu("cuda:0", 3000), _gpu("vulkan:0", 9000)], {"cuda": "ok", "vulkan": "ok"})
    assert chosen == "vulkan:0" and "placed w on vulkan:0" in said[0] and "needs about" in said[0]


def test_auto_offloads_part_of_the_model_where_only_part_fits_then_falls_back_to_the_cpu():
    # SmolLM2 needs about 300 MiB with its compute buffer; llama.cpp keeps 1024 MiB of each GPU free.
    chosen, said = _place([_gpu("cuda:0", 1024 + 250)], {"cuda": "ok"})
    assert chosen == "cuda:0" and "in part" in said[0] and "of its 30 layers go to the GPU" in said[0], said
    chosen, said = _place([_gpu("cuda:0", 1024 + 10)], {"cuda": "ok"})
    assert chosen == "cpu" and "no GPU has room" in said[0], said
    chosen, said = _place([], {"cuda": "no NVIDIA driver on this machine"})
    assert chosen == "cpu" and "cuda: no NVIDIA driver" in said[0], said


def test_a_named_device_is_checked_before_anything_starts():
    assert _place([_gpu("vulkan:0", 9000)], {"vulkan": "ok"}, device="vulkan:0")[0] == "vulkan:0"
    with pytest.raises(OperationFailed, match=r"device vulkan:7 does not exist on hive box \(no such device\); "
                                              r"it has vulkan:0 \(GPU vulkan:0, 9000 of 24000 MiB free\)"):
        _place([_gpu("vulkan:0", 9000)], {"vulkan": "ok"}, device="vulkan:7")
    with pytest.raises(OperationFailed, match="the cuda backend of llama-server is not installed on this hive"):
        _place([_gpu("vulkan:0", 9000)], {"vulkan": "ok", "cuda": "not installed"}, device="cuda:0")
    with pytest.raises(OperationFailed, match="insufficient memory on cuda:0: 30 layers of smollm2 need about"):
        _place([_gpu("cuda:0", 100)], {"cuda": "ok"}, device="cuda:0", gpu_layers=30)


def test_inventory_devices_of_one_backend_make_one_device():
    inv = parse_inventory('[hives.a]\nembedded = true\n\n[[hives.a.workers]]\nmodel = "m"\n'
                          'devices = ["cuda:0", "cuda:1"]\ngpu_layers = 20\n', "fleet.toml")
    [op] = inv.spawn_ops("a")
    assert op.device == "cuda:0,1" and op.gpu_layers == 20
    with pytest.raises(InventoryError) as mixed:
        parse_inventory('[hives.a]\nembedded = true\n\n[[hives.a.workers]]\nmodel = "m"\n'
                        'devices = ["cuda:0", "vulkan:0"]\n', "fleet.toml")
    assert mixed.value.line == 4 and "one backend" in str(mixed.value)
    with pytest.raises(InventoryError) as bad:
        parse_inventory('[hives.a]\nembedded = true\n\n[[hives.a.workers]]\nmodel = "m"\ndevice = "opencl:0"\n',
                        "fleet.toml")
    assert bad.value.line == 6 and "vulkan:N" in str(bad.value)


class RecordingSupervisor:
    """Test double: the hive's supervisor, recording which workers it was told to fail."""

    def __init__(self, workers) -> None:
        self.workers = workers
        self.failed: list[tuple[str, str]] = []

    def list(self):
        return self.workers

    async def fail(self, worker_id: str, reason: str) -> None:
        self.failed.append((worker_id, reason))


def test_a_gpu_that_disappears_takes_its_workers_down():
    from rbee_fleet.contracts.fleet import SupervisedWorker
    from rbee_fleet.hive.devices import EngineView
    from rbee_fleet.hive.service import HiveService

    def worker(wid: str, device: str) -> SupervisedWorker:
        return SupervisedWorker(worker_id=wid, model="m", backend="llamacpp", device=device, port=1, url="u", pid=1,
                                state="running")

    hive = HiveService.__new__(HiveService)  # only the supervisor is used
    hive.supervisor = RecordingSupervisor([worker("on-0", "cuda:0"), worker("on-1", "cuda:1"), worker("cpu", "cpu")])
    both = EngineView(devices=(_gpu("cuda:0", 9000), _gpu("cuda:1", 9000)))
    asyncio.run(hive._devices_lost(both, EngineView(devices=(_gpu("cuda:1", 9000),))))
    assert hive.supervisor.failed == [("on-0", "its device cuda:0 disappeared")]
    # llama-server could not be asked (a hung driver, say): no verdict, nothing is stopped.
    hive.supervisor.failed.clear()
    asyncio.run(hive._devices_lost(both, EngineView(error="llama-server --list-devices did not answer")))
    assert hive.supervisor.failed == []
