"""The GPU stack check: each rule on synthetic facts, and ``rbee-hive --check`` on this (GPU-less) machine."""

from __future__ import annotations

import json
import subprocess
import sys

from rbee_fleet.contracts.fleet import EngineDevice, GpuInfo
from rbee_fleet.hive import gpu_stack
from rbee_fleet.hive.gpu_stack import StackFacts, evaluate

RTX_4090 = GpuInfo(index=0, name="NVIDIA GeForce RTX 4090", vram_total_mb=24564, vram_free_mb=23000,
                   compute_capability="8.9", driver="550.54.15")
GTX_1080 = GpuInfo(index=0, name="NVIDIA GeForce GTX 1080 Ti", vram_total_mb=11264, vram_free_mb=11000,
                   compute_capability="6.1", driver="535.183.01")
GOOD = StackFacts(gpus=(RTX_4090,), cuda_driver="12.4", torch="2.6.0+cu124", torch_cuda="12.4",
                  torch_cuda_available=True, exllamav2="0.3.2", exllamav2_ext_prebuilt=True, flash_attn="2.7.4")


def finding(facts: StackFacts, item: str) -> gpu_stack.Finding:
    return next(f for f in evaluate(facts).findings if f.item == item)


def with_(**changes) -> StackFacts:
    return StackFacts(**{**GOOD.__dict__, **changes})


def test_a_complete_stack_passes_with_paged_attention():
    report = evaluate(GOOD)
    assert report.ok and report.paged_attention
    assert [f.status for f in report.findings][:4] == ["ok"] * 4


def test_no_gpu_fails_and_says_cpu_workers_only():
    f = finding(with_(gpus=()), "nvidia-driver")
    assert f.status == "fail" and "CPU workers" in f.fix


def test_broken_driver_fails_with_its_message():
    f = finding(with_(gpus=(), gpu_error="NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver"),
                "nvidia-driver")
    assert f.status == "fail" and "couldn't communicate" in f.detail and "nvidia-smi" in f.fix


def test_cpu_only_torch_is_fixed_with_the_cuda_build_the_driver_supports():
    f = finding(with_(torch="2.6.0+cpu", torch_cuda=None), "torch")
    assert f.status == "fail" and "CPU-only" in f.detail
    assert f.fix == "pip install --force-reinstall 'torch>=2.2' --index-url https://download.pytorch.org/whl/cu124"
    assert "cu121" in finding(with_(torch_cuda=None, cuda_driver="12.2"), "torch").fix
    assert "cu118" in finding(with_(torch_cuda=None, cuda_driver="11.8"), "torch").fix


def test_torch_built_for_a_newer_cuda_than_the_driver():
    f = finding(with_(torch="2.7.0+cu128", torch_cuda="12.8", cuda_driver="12.2"), "torch")
    assert f.status == "fail" and "newer than the driver supports (12.2)" in f.detail
    assert "upgrade the NVIDIA driver" in f.fix and "cu121" in f.fix


def test_old_or_missing_torch():
    assert finding(with_(torch="2.1.2+cu121"), "torch").status == "fail"
    f = finding(with_(torch=None, torch_cuda=None), "torch")
    assert f.status == "fail" and "not installed" in f.detail


def test_torch_that_cannot_see_the_gpus():
    f = finding(with_(torch_cuda_available=False), "torch")
    assert f.status == "fail" and "cannot use the GPUs" in f.detail


def test_exllamav2_missing_or_needing_a_compiler():
    assert finding(with_(exllamav2=None), "exllamav2").fix == "pip install 'rbee-fleet[gpu]'"
    f = finding(with_(exllamav2_ext_prebuilt=False, nvcc=None), "exllamav2")
    assert f.status == "fail" and "nvcc" in f.detail and "cuda-toolkit-12-4" in f.fix
    f = finding(with_(exllamav2_ext_prebuilt=False, nvcc="11.8"), "exllamav2")
    assert f.status == "fail" and "major version" in f.detail
    f = finding(with_(exllamav2_ext_prebuilt=False, nvcc="12.4"), "exllamav2")
    assert f.status == "warn" and "compile" in f.detail
    assert evaluate(with_(exllamav2_ext_prebuilt=False, nvcc="12.4")).ok  # a warning does not fail the check


def test_flash_attn_decides_batching():
    f = finding(with_(flash_attn="2.5.6"), "flash-attn")
    assert f.status == "warn" and "batch 1" in f.detail and "flash-attn>=2.5.7" in f.fix
    assert not evaluate(with_(flash_attn="2.5.6")).paged_attention
    assert finding(with_(flash_attn=None), "flash-attn").status == "warn"
    assert finding(with_(gpus=(GTX_1080,), flash_attn=None), "flash-attn").status == "skip"  # Pascal: no flash-attn
    assert gpu_stack.paged_attention_available("2.5.7") and not gpu_stack.paged_attention_available("2.4.2")


def test_rbee_hive_check_prints_json_and_fails_here():
    """This machine has no NVIDIA GPU and a CPU torch: the check must say so, with fixes, and exit 1."""
    out = subprocess.run([sys.executable, "-m", "rbee_fleet.hive", "--check"], capture_output=True, text=True,
                         timeout=120)
    report = json.loads(out.stdout)
    assert out.returncode == 1 and report["ok"] is False
    by_item = {f["item"]: f for f in report["findings"]}
    assert set(by_item) == {"nvidia-driver", "torch", "exllamav2", "flash-attn", "llama-server", "llamacpp-cuda",
                            "llamacpp-vulkan", "llamacpp-rocm", "llamacpp-metal"}
    # No NVIDIA driver here: why CUDA is unavailable is said whether or not the CUDA backend is installed.
    cuda = by_item["llamacpp-cuda"]
    assert cuda["status"] in ("skip", "fail") and "no NVIDIA driver on this machine (libcuda.so.1" in cuda["detail"], cuda
    assert by_item["llama-server"]["status"] == "ok"
    assert by_item["nvidia-driver"]["status"] == "fail"
    assert by_item["torch"]["status"] == "fail" and "download.pytorch.org" in by_item["torch"]["fix"]
    assert report["facts"]["exllamav2"] == "0.3.2"  # installed for the tests, looked at but not imported


LAVAPIPE = EngineDevice(id="vulkan:0", name="Vulkan0", description="llvmpipe", memory_total_mb=2048, memory_free_mb=2048)
NO_EXL = StackFacts(llama_server="/x/llama-server")


def test_a_llama_server_gpu_backend_alone_makes_the_host_gpu_capable():
    report = evaluate(StackFacts(**{**NO_EXL.__dict__, "engine_backends": (("vulkan", "ok"),),
                                    "engine_devices": (LAVAPIPE,)}))
    by_item = {f.item: f for f in report.findings}
    assert report.ok and by_item["llamacpp-vulkan"].status == "ok" and "vulkan:0" in by_item["llamacpp-vulkan"].detail
    assert "vulkan:0 llvmpipe (2048 of 2048 MiB free)" in by_item["llama-server"].detail
    assert by_item["llamacpp-rocm"].status == "skip" and "--backend rocm" in by_item["llamacpp-rocm"].fix


def test_an_installed_backend_that_cannot_load_fails_with_the_reason():
    said = "no NVIDIA driver on this machine (libcuda.so.1 not found) (libcuda.so.1: cannot open shared object file)"
    report = evaluate(StackFacts(**{**NO_EXL.__dict__, "engine_backends": (("cuda", said),)}))
    cuda = next(f for f in report.findings if f.item == "llamacpp-cuda")
    assert not report.ok and cuda.status == "fail" and said in cuda.detail and "driver" in cuda.fix


def test_no_llama_server_is_a_failure_with_the_build_command():
    report = evaluate(StackFacts(engine_error="llama-server is not installed"))
    head = next(f for f in report.findings if f.item == "llama-server")
    assert head.status == "fail" and "llama_build --install" in head.fix
