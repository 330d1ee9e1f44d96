"""What this machine can run models on: CPU cores and RAM always, NVIDIA GPUs when present."""

from __future__ import annotations

import csv
import io
import logging
import shutil
import subprocess

import psutil

from rbee_fleet.contracts.fleet import CpuInfo, DeviceInfo, GpuInfo

log = logging.getLogger(__name__)

NVIDIA_SMI_QUERY = "index,name,uuid,memory.total,memory.free,compute_cap,driver_version"


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


def parse_nvidia_smi_csv(text: str) -> list[GpuInfo]:
    """Parse ``nvidia-smi --query-gpu=NVIDIA_SMI_QUERY --format=csv,noheader,nounits``."""
    gpus = []
    for row in csv.reader(io.StringIO(text)):
        if not row or not row[0].strip():
            continue
        cells = [c.strip() for c in row]
        if len(cells) < 7:
            raise ValueError(f"unexpected nvidia-smi line: {','.join(row)!r}")
        gpus.append(
            GpuInfo(
                index=int(cells[0]),
                name=cells[1],
                uuid=cells[2],
                vram_total_mb=_mb(cells[3]),
                vram_free_mb=_mb(cells[4]),
                compute_capability=cells[5] if cells[5] not in ("[N/A]", "N/A") else "",
                driver=cells[6],
            )
        )
    return gpus


def _mb(cell: str) -> int:
    try:
        return int(float(cell))
    except ValueError:
        return 0


def gpus_from_nvml() -> list[GpuInfo]:
    import pynvml  # nvidia-ml-py; imported here so CPU hosts never need it

    pynvml.nvmlInit()
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            gpus.append(
                GpuInfo(
                    index=i,
                    name=_text(pynvml.nvmlDeviceGetName(handle)),
                    uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                    vram_total_mb=mem.total // 2**20,
                    vram_free_mb=mem.free // 2**20,
                    compute_capability=f"{major}.{minor}",
                    driver=_text(driver),
                )
            )
        return gpus
    finally:
        pynvml.nvmlShutdown()


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def gpus_from_nvidia_smi() -> list[GpuInfo]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    out = subprocess.run(
        [exe, f"--query-gpu={NVIDIA_SMI_QUERY}", "--format=csv,noheader,nounits"],
        capture_output=True, text=True, timeout=10, check=True,
    )
    return parse_nvidia_smi_csv(out.stdout)


def detect() -> DeviceInfo:
    """Devices of this machine. GPU problems are reported in ``gpu_error``, never raised."""
    errors = []
    gpus: list[GpuInfo] = []
    for probe in (gpus_from_nvml, gpus_from_nvidia_smi):
        try:
            gpus = probe()
            if gpus:
                break
        except ImportError:
            continue
        except Exception as exc:  # noqa: BLE001 - a broken driver must not stop the hive
            errors.append(f"{probe.__name__}: {exc}")
    return DeviceInfo(cpu=cpu_info(), gpus=gpus, gpu_error="; ".join(errors) if errors and not gpus else None)
