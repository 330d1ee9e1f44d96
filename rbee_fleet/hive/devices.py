"""What this machine can run models on: CPU cores and RAM always, GPUs of every vendor when present.

Two views of the GPUs. llama-server's own (``--list-devices``, through ``common.llama_engine``): every
device its installed backends can use (CUDA, Vulkan, ROCm, Metal), with total and free memory; what
GGUF workers run on. NVML (``nvidia-ml-py``, with ``nvidia-smi`` as the fallback): NVIDIA GPUs for the
exllamav2 backend, and fresher free-memory figures for CUDA devices between engine probes. A machine
without a driver simply has no GPUs; one that is installed but broken is reported (``gpu_error``, the
backend's status). Probing never raises: one bad GPU or driver must not stop the hive.
"""

from __future__ import annotations

import csv
import importlib
import io
import logging
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import psutil

from rbee_fleet.common import llama_engine
from rbee_fleet.contracts.fleet import CpuInfo, DeviceInfo, EngineDevice, GpuInfo

log = logging.getLogger(__name__)

NVIDIA_SMI_FIELDS = ("index", "name", "uuid", "memory.total", "memory.free", "compute_cap", "driver_version")
MISSING = {"", "N/A", "[N/A]", "[Not Supported]", "[Unknown Error]", "[Insufficient Permissions]"}
# NVML return codes meaning "no NVIDIA driver on this machine" rather than "a broken one".
NVML_NO_DRIVER = {12}  # NVML_ERROR_LIBRARY_NOT_FOUND


class GpuProbeError(Exception):
    """The NVIDIA driver is there but did not answer properly; the message says what it said."""


class NoNvidiaDriver(Exception):
    """Nothing NVIDIA on this machine (no NVML library, no nvidia-smi)."""


def cpu_info() -> CpuInfo:
    vm = psutil.virtual_memory()
    return CpuInfo(
        model=_cpu_model(),
        cores=psutil.cpu_count(logical=False) or psutil.cpu_count() or 1,
        threads=psutil.cpu_count() or 1,
        ram_total_mb=vm.total // 2**20,
        ram_available_mb=vm.available // 2**20,
    )


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


# -- nvidia-smi ------------------------------------------------------------------------------------


def parse_nvidia_smi_csv(text: str, fields: tuple[str, ...] = NVIDIA_SMI_FIELDS) -> list[GpuInfo]:
    """Parse ``nvidia-smi --query-gpu=FIELDS --format=csv,noheader,nounits``."""
    gpus = []
    for row in csv.reader(io.StringIO(text), skipinitialspace=True):
        if not row or not row[0].strip():
            continue
        if len(row) != len(fields):
            raise GpuProbeError(f"unexpected nvidia-smi line (want {len(fields)} fields): {','.join(row)!r}")
        cell = {f: (v.strip() if v.strip() not in MISSING else "") for f, v in zip(fields, row)}
        try:
            index = int(cell["index"])
        except ValueError:
            raise GpuProbeError(f"unexpected nvidia-smi line (bad index): {','.join(row)!r}") from None
        gpus.append(GpuInfo(
            index=index,
            name=cell["name"],
            uuid=cell.get("uuid", ""),
            vram_total_mb=_mb(cell.get("memory.total", "")),
            vram_free_mb=_mb(cell.get("memory.free", "")),
            compute_capability=cell.get("compute_cap", ""),
            driver=cell.get("driver_version", ""),
        ))
    return gpus


def _mb(cell: str) -> int:
    try:
        return int(float(cell))
    except ValueError:
        return 0  # unknown: treated as nothing free, so placement never counts on it


def gpus_from_nvidia_smi(exe: str | None = None, timeout: float = 10.0) -> list[GpuInfo]:
    exe = exe or shutil.which("nvidia-smi")
    if exe is None:
        raise NoNvidiaDriver("nvidia-smi is not on PATH")
    fields = NVIDIA_SMI_FIELDS
    for _ in range(2):
        try:
            out = subprocess.run(
                [exe, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            raise GpuProbeError(f"nvidia-smi did not answer within {timeout:.0f} s (a hung driver?)") from None
        except OSError as exc:
            raise GpuProbeError(f"cannot run {exe}: {exc}") from None
        said = " ".join((out.stdout + " " + out.stderr).split())
        if out.returncode == 0:
            return parse_nvidia_smi_csv(out.stdout, fields)
        if "compute_cap" in said and "not a valid field" in said and "compute_cap" in fields:
            fields = tuple(f for f in fields if f != "compute_cap")  # drivers before 510 lack this field
            continue
        if "No devices were found" in said:
            return []
        raise GpuProbeError(f"nvidia-smi failed (exit {out.returncode}): {said or 'no output'}")
    raise GpuProbeError("nvidia-smi refused the query")


# -- NVML --------------------------------------------------------------------------------------------


def gpus_from_nvml(nvml: ModuleType | None = None) -> list[GpuInfo]:
    """GPUs through NVML; ``nvml`` is the ``pynvml`` module (imported here so CPU hosts never need it)."""
    if nvml is None:
        try:
            nvml = importlib.import_module("pynvml")
        except ImportError:
            raise NoNvidiaDriver("nvidia-ml-py is not installed") from None
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        if getattr(exc, "value", None) in NVML_NO_DRIVER:
            raise NoNvidiaDriver(f"NVML: {exc}") from None
        raise GpuProbeError(f"NVML could not start: {exc}") from None
    try:
        driver = _text(nvml.nvmlSystemGetDriverVersion())
        gpus, broken = [], []
        for i in range(nvml.nvmlDeviceGetCount()):
            try:
                gpus.append(_nvml_gpu(nvml, i, driver))
            except nvml.NVMLError as exc:  # e.g. "GPU is lost": report it, keep the others
                broken.append(f"GPU {i}: {exc}")
        if broken and not gpus:
            raise GpuProbeError("; ".join(broken))
        for line in broken:
            log.warning("NVML: %s", line)
        return gpus
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError:
            pass


def _nvml_gpu(nvml: Any, i: int, driver: str) -> GpuInfo:
    handle = nvml.nvmlDeviceGetHandleByIndex(i)
    mem = nvml.nvmlDeviceGetMemoryInfo(handle)
    try:
        major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
        capability = f"{major}.{minor}"
    except nvml.NVMLError:
        capability = ""
    return GpuInfo(
        index=i,
        name=_text(nvml.nvmlDeviceGetName(handle)),
        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
        vram_total_mb=int(mem.total) // 2**20,
        vram_free_mb=int(mem.free) // 2**20,
        compute_capability=capability,
        driver=driver,
    )


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


# -- both --------------------------------------------------------------------------------------------


Probe = Callable[[], list[GpuInfo]]


def detect_gpus(probes: tuple[Probe, ...] = (gpus_from_nvml, gpus_from_nvidia_smi)) -> tuple[list[GpuInfo], str | None]:
    """GPUs from the first probe that finds some, and why none were found when a driver is half there."""
    errors = []
    for probe in probes:
        try:
            gpus = probe()
        except NoNvidiaDriver:
            continue
        except GpuProbeError as exc:
            errors.append(str(exc))
            continue
        except Exception as exc:  # noqa: BLE001 - whatever a broken driver does, the hive carries on
            errors.append(f"{getattr(probe, '__name__', 'probe')}: {type(exc).__name__}: {exc}")
            continue
        if gpus:
            return gpus, None
    return [], "; ".join(errors) or None


@dataclass(frozen=True)
class EngineView:
    """llama-server's view of this machine's devices, as last probed."""

    devices: tuple[EngineDevice, ...] = ()
    backends: tuple[tuple[str, str], ...] = ()  # (backend, "ok" or why not)
    cpu_variant: str = ""
    error: str | None = None  # llama-server could not be asked (not installed, failed)


def probe_engine(env: dict[str, str] | None = None) -> EngineView:
    """Ask llama-server which devices it can use here (a second or two; run it off the event loop)."""
    try:
        binary = llama_engine.find_binary()
    except llama_engine.LlamaServerMissing as exc:
        return EngineView(error=str(exc))
    variants = ",".join(llama_engine.cpu_variants(binary))
    try:
        found = llama_engine.list_devices(binary, env)
    except OSError as exc:
        return EngineView(cpu_variant=variants, error=str(exc),
                          backends=tuple((b, f"cannot tell: {exc}") for b in llama_engine.installed_backends(binary)))
    status = llama_engine.backend_status(binary, found)
    return EngineView(tuple(found), tuple(sorted(status.items())), variants)


def detect(engine: EngineView | None = None) -> DeviceInfo:
    """Devices of this machine, with llama-server's view ``engine`` (probed separately: it is slower).
    GPU problems are reported, never raised."""
    gpus, error = detect_gpus()
    view = engine or EngineView()
    return DeviceInfo(cpu=cpu_info(), gpus=gpus, gpu_error=error, engine_devices=_fresher(view.devices, gpus),
                      engine_backends=dict(view.backends), cpu_variant=view.cpu_variant)


def _fresher(devices: tuple[EngineDevice, ...], gpus: list[GpuInfo]) -> list[EngineDevice]:
    """CUDA devices with NVML's newer free-memory figure (llama-server numbers them in PCI order, as NVML)."""
    by_index = {g.index: g for g in gpus}
    out = []
    for d in devices:
        gpu = by_index.get(int(d.id.split(":")[1])) if d.id.startswith("cuda:") else None
        if gpu is not None and gpu.vram_total_mb and abs(gpu.vram_total_mb - d.memory_total_mb) <= 0.05 * gpu.vram_total_mb:
            d = d.model_copy(update={"memory_free_mb": gpu.vram_free_mb})
        out.append(d)
    return out


def visible_devices(device: str, gpus: list[GpuInfo]) -> str:
    """``CUDA_VISIBLE_DEVICES`` for ``cuda:N[,M]``: GPU UUIDs when known, since CUDA's own numbering
    may differ from nvidia-smi's; the indices otherwise."""
    indices = [int(i) for i in device.split(":", 1)[1].split(",")]
    by_index = {g.index: g.uuid for g in gpus}
    if all(by_index.get(i) for i in indices):
        return ",".join(by_index[i] for i in indices)
    return ",".join(str(i) for i in indices)
