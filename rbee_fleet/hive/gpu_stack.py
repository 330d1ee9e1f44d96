"""Can this machine run GPU workers? ``rbee-hive --check`` prints the answer, backend by backend.

Facts are gathered first (driver, torch, exllamav2, flash-attn, nvcc; llama-server's GPU backends and
the devices it sees), then judged by pure rules, so every rule is tested on synthetic facts. Each
finding says what is wrong and the command that fixes it. Nothing here compiles or loads CUDA code:
exllamav2 is looked at, never imported; llama-server's backends are tried in child processes.
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from rbee_fleet.common import llama_engine
from rbee_fleet.contracts.fleet import EngineDevice, GpuInfo
from rbee_fleet.contracts.vocabulary import GPU_BACKEND_NAMES
from rbee_fleet.hive import devices

PAGED_FLASH_ATTN = (2, 5, 7)  # exllamav2's paged attention (continuous batching) needs at least this
MIN_TORCH = (2, 2)
TORCH_INDEX = "https://download.pytorch.org/whl/{tag}"

Status = Literal["ok", "warn", "fail", "skip"]


@dataclass(frozen=True)
class StackFacts:
    gpus: tuple[GpuInfo, ...] = ()
    gpu_error: str | None = None
    cuda_driver: str | None = None  # newest CUDA the driver supports, e.g. "12.4"
    torch: str | None = None
    torch_cuda: str | None = None  # CUDA version torch was built for; None for a CPU build
    torch_cuda_available: bool | None = None
    torch_error: str | None = None
    exllamav2: str | None = None
    exllamav2_ext_prebuilt: bool = False  # a prebuilt wheel's extension, or one torch already compiled and cached
    nvcc: str | None = None  # CUDA toolkit version, needed when exllamav2 compiles its extension
    flash_attn: str | None = None
    # llama-server (GGUF workers on every GPU vendor)
    llama_server: str | None = None  # its path; None when not installed
    engine_error: str | None = None
    engine_backends: tuple[tuple[str, str], ...] = ()  # (backend, "ok" or why not)
    engine_devices: tuple[EngineDevice, ...] = ()
    cuda_driver_problem: str | None = None  # why libcuda.so.1 (the NVIDIA driver's library) does not load


@dataclass(frozen=True)
class Finding:
    item: str
    status: Status
    detail: str
    fix: str = ""


@dataclass(frozen=True)
class StackReport:
    ok: bool
    paged_attention: bool
    findings: list[Finding]
    facts: StackFacts = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        facts = asdict(self.facts)
        facts["gpus"] = [g.model_dump() for g in self.facts.gpus]
        facts["engine_devices"] = [d.model_dump() for d in self.facts.engine_devices]
        facts["engine_backends"] = dict(self.facts.engine_backends)
        return {"ok": self.ok, "paged_attention": self.paged_attention,
                "findings": [asdict(f) for f in self.findings], "facts": facts}


def version_tuple(text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    return tuple(int(n) for n in re.findall(r"\d+", text.split("+")[0])[:3])


def paged_attention_available(flash_attn: str | None = None) -> bool:
    """flash-attn >= 2.5.7 installed (read from its metadata, not imported)."""
    version = flash_attn if flash_attn is not None else _dist_version("flash-attn") or _dist_version("flash_attn")
    return version_tuple(version) >= PAGED_FLASH_ATTN


# -- the rules -------------------------------------------------------------------------------------


def evaluate(f: StackFacts) -> StackReport:
    """``ok``: some GPU worker can run here (the exllamav2 stack is whole, or a llama-server GPU backend
    has a device)."""
    out: list[Finding] = []
    out.append(_driver(f))
    out.append(_torch(f))
    out.append(_exllamav2(f))
    out.append(_flash_attn(f))
    exl_ok = not any(x.status == "fail" for x in out)
    engine = _engine(f)
    ok = exl_ok or any(x.status == "ok" for x in engine[1:])
    return StackReport(ok=ok, paged_attention=paged_attention_available(f.flash_attn or ""), findings=out + engine,
                       facts=f)


BUILD_HINT = "python -m rbee_fleet.deploy.llama_build --install --backend {b}"
BACKEND_HINTS = {
    "cuda": "on the operator machine: " + BUILD_HINT.format(b="cuda") + " (deploys ship it to hosts with an "
            "NVIDIA driver)",
    "vulkan": "apt-get install glslc libvulkan-dev spirv-headers, then " + BUILD_HINT.format(b="vulkan"),
    "rocm": "on this host, with AMD's ROCm installed: " + BUILD_HINT.format(b="rocm"),
    "metal": "on the Mac itself, with Xcode's command line tools: " + BUILD_HINT.format(b="metal"),
}


def _engine(f: StackFacts) -> list[Finding]:
    if f.llama_server is None:
        return [Finding("llama-server", "fail", f.engine_error or "llama-server is not installed",
                        "python -m rbee_fleet.deploy.llama_build --install")]
    head = Finding("llama-server", "ok" if not f.engine_error else "fail",
                   f.engine_error or f"{f.llama_server}; devices: "
                   + (", ".join(f"{d.id} {d.description} ({d.memory_free_mb} of {d.memory_total_mb} MiB free)"
                                for d in f.engine_devices) or "none besides the CPU"))
    out = [head]
    status = dict(f.engine_backends)
    for backend in GPU_BACKEND_NAMES:
        said = status.get(backend, "not installed")
        item = f"llamacpp-{backend}"
        if said == "ok":
            ids = ", ".join(d.id for d in f.engine_devices if d.id.split(":")[0] == backend)
            out.append(Finding(item, "ok", f"GGUF workers can run on {ids}"))
        elif said == "not installed":
            why = "the backend is not installed here"
            if backend == "cuda" and f.cuda_driver_problem:
                why += f", and CUDA is unavailable on this machine: {f.cuda_driver_problem}"
            out.append(Finding(item, "skip", why, BACKEND_HINTS[backend]))
        else:
            out.append(Finding(item, "fail", f"the backend is installed but unusable: {said}",
                               "install or fix the GPU driver" if "driver" in said else BACKEND_HINTS[backend]))
    return out


def _driver(f: StackFacts) -> Finding:
    if f.gpus:
        names = ", ".join(f"{g.index}: {g.name} ({g.vram_total_mb} MB, sm {g.compute_capability or '?'})" for g in f.gpus)
        cuda = f", CUDA {f.cuda_driver}" if f.cuda_driver else ""
        return Finding("nvidia-driver", "ok", f"driver {f.gpus[0].driver}{cuda}; GPUs {names}")
    if f.gpu_error:
        return Finding("nvidia-driver", "fail", f"the NVIDIA driver does not answer: {f.gpu_error}",
                       "install or reload the NVIDIA driver (e.g. `sudo apt install nvidia-driver-550`, then reboot); "
                       "`nvidia-smi` must list the GPUs")
    return Finding("nvidia-driver", "fail", "no NVIDIA GPU or driver found",
                   "this host can run CPU workers (llama.cpp) only; exllamav2 needs an NVIDIA GPU and its driver")


def _torch_fix(f: StackFacts) -> str:
    tag = _cuda_tag(f.cuda_driver)
    index = TORCH_INDEX.format(tag=tag) if tag else TORCH_INDEX.format(tag="cu124")
    return f"pip install --force-reinstall 'torch>=2.2' --index-url {index}"


def _torch(f: StackFacts) -> Finding:
    if f.torch is None:
        return Finding("torch", "fail", "torch is not installed" + (f" ({f.torch_error})" if f.torch_error else ""),
                       _torch_fix(f))
    if version_tuple(f.torch) < MIN_TORCH:
        return Finding("torch", "fail", f"torch {f.torch} is older than exllamav2 supports (2.2)", _torch_fix(f))
    if not f.torch_cuda:
        return Finding("torch", "fail", f"torch {f.torch} is a CPU-only build", _torch_fix(f))
    if f.cuda_driver and version_tuple(f.torch_cuda)[:2] > version_tuple(f.cuda_driver)[:2]:
        return Finding("torch", "fail",
                       f"torch {f.torch} is built for CUDA {f.torch_cuda}, newer than the driver supports ({f.cuda_driver})",
                       f"upgrade the NVIDIA driver to one supporting CUDA {f.torch_cuda}, or: {_torch_fix(f)}")
    if f.gpus and f.torch_cuda_available is False:
        return Finding("torch", "fail", f"torch {f.torch} (CUDA {f.torch_cuda}) cannot use the GPUs"
                       + (f": {f.torch_error}" if f.torch_error else ""),
                       "check that the driver matches (`nvidia-smi`) and CUDA_VISIBLE_DEVICES is not empty")
    return Finding("torch", "ok", f"torch {f.torch}, CUDA {f.torch_cuda}")


def _exllamav2(f: StackFacts) -> Finding:
    if f.exllamav2 is None:
        return Finding("exllamav2", "fail", "exllamav2 is not installed", "pip install 'rbee-fleet[gpu]'")
    if f.exllamav2_ext_prebuilt:
        return Finding("exllamav2", "ok", f"exllamav2 {f.exllamav2} with a prebuilt extension")
    if not f.torch_cuda:
        return Finding("exllamav2", "skip", f"exllamav2 {f.exllamav2} is installed; it needs a CUDA build of torch "
                       "before it can build or load its extension (see torch)")
    if f.nvcc is None:
        return Finding(
            "exllamav2", "fail",
            f"exllamav2 {f.exllamav2} has no prebuilt extension and would compile it on first load, but the CUDA "
            "toolkit (nvcc) is missing",
            f"install the CUDA toolkit {f.torch_cuda or ''} matching torch (e.g. `sudo apt install cuda-toolkit-"
            f"{(f.torch_cuda or '12-4').replace('.', '-')}`) and set CUDA_HOME, or install an exllamav2 wheel "
            "built for this torch from github.com/turboderp-org/exllamav2/releases")
    if f.torch_cuda and version_tuple(f.nvcc)[:1] != version_tuple(f.torch_cuda)[:1]:
        return Finding("exllamav2", "fail",
                       f"nvcc {f.nvcc} and torch's CUDA {f.torch_cuda} differ in major version; the extension will not build",
                       f"install CUDA toolkit {f.torch_cuda} (or a torch built for CUDA {f.nvcc})")
    return Finding("exllamav2", "warn",
                   f"exllamav2 {f.exllamav2} will compile its extension with nvcc {f.nvcc} on the first load "
                   "(several minutes, once)", "")


def _flash_attn(f: StackFacts) -> Finding:
    ampere = [g for g in f.gpus if version_tuple(g.compute_capability)[:1] >= (8,)]
    if paged_attention_available(f.flash_attn or ""):
        return Finding("flash-attn", "ok", f"flash-attn {f.flash_attn}: paged attention, continuous batching")
    if f.gpus and not ampere:
        return Finding("flash-attn", "skip", "no Ampere or newer GPU: workers run one request at a time (batch 1)")
    have = f"flash-attn {f.flash_attn} is older than 2.5.7" if f.flash_attn else "flash-attn is not installed"
    return Finding("flash-attn", "warn", f"{have}: workers run one request at a time (batch 1)",
                   "pip install 'flash-attn>=2.5.7' --no-build-isolation")


def _cuda_tag(version: str | None) -> str | None:
    v = version_tuple(version)
    if len(v) < 2:
        return None
    # The CUDA builds torch publishes, newest first; a driver runs any build up to its own version.
    for build in ((12, 8), (12, 6), (12, 4), (12, 1), (11, 8)):
        if v[:2] >= build:
            return f"cu{build[0]}{build[1]}"
    return None


# -- gathering the facts ---------------------------------------------------------------------------


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cuda_driver_version() -> str | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            v = int(pynvml.nvmlSystemGetCudaDriverVersion())
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        return None
    return f"{v // 1000}.{(v % 1000) // 10}"


def _nvcc_version() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    exe = os.path.join(home, "bin", "nvcc") if home else shutil.which("nvcc")
    if not exe or not os.path.exists(exe):
        return None
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def _ext_cached() -> bool:
    """Whether torch's JIT cache already holds a compiled exllamav2 extension."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions")
    return any(glob.glob(os.path.join(root, "*", "exllamav2_ext", "exllamav2_ext*.so")))


def _torch_facts() -> dict[str, Any]:
    if importlib.util.find_spec("torch") is None:
        return {}
    try:
        import torch

        available = bool(torch.cuda.is_available())
        return {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "torch_cuda_available": available}
    except Exception as exc:  # noqa: BLE001 - a broken torch install is a finding, not a crash
        return {"torch": _dist_version("torch"), "torch_error": f"{type(exc).__name__}: {exc}"}


def _engine_facts() -> dict[str, Any]:
    view = devices.probe_engine()
    try:
        server = str(llama_engine.find_binary())
    except llama_engine.LlamaServerMissing:
        server = None
    return {"llama_server": server, "engine_error": view.error, "engine_backends": view.backends,
            "engine_devices": view.devices, "cuda_driver_problem": llama_engine.driver_problem("cuda")}


def gather() -> StackFacts:
    gpus, error = devices.detect_gpus()
    return StackFacts(
        **_engine_facts(),
        gpus=tuple(gpus),
        gpu_error=error,
        cuda_driver=_cuda_driver_version() if gpus else None,
        exllamav2=_dist_version("exllamav2"),
        exllamav2_ext_prebuilt=importlib.util.find_spec("exllamav2_ext") is not None or _ext_cached(),
        nvcc=_nvcc_version(),
        flash_attn=_dist_version("flash-attn") or _dist_version("flash_attn"),
        **_torch_facts(),
    )


def check() -> StackReport:
    return evaluate(gather())
