"""llama.cpp's ``llama-server`` as installed on this machine: where it is, which backends it has, and the
devices it can use, in its own words (``llama-server --list-devices``).

Shared by the hive (which reports and places on these devices) and the worker (which starts the
server on them). ggml loads its backends at start from the binary's folder: a backend is installed
when its module (``libggml-vulkan.so``, ``libggml-cuda.so`` …) lies there, and usable when it loads and
finds a device. Device ids are the fleet's (``cuda:0``, ``vulkan:1``, ``rocm:0``, ``metal``); llama-server
names the same devices ``CUDA0``, ``Vulkan1``, ``ROCm0``, ``MTL0``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from rbee_fleet.contracts.fleet import EngineDevice
from rbee_fleet.contracts.vocabulary import ENGINE_DEVICE_PREFIXES, GPU_BACKEND_NAMES

LIST_TIMEOUT_S = 60.0  # a first Vulkan start compiles shaders; CUDA's first start loads its libraries
_LINE = re.compile(r"^\s*(?P<name>[A-Za-z]+)(?P<index>\d+): (?P<desc>.*) \((?P<total>\d+) MiB, (?P<free>\d+) MiB free\)\s*$")
# What a missing library of a backend means, for the operator.
_LIBRARY_HINTS = {
    "libcuda.so": "no NVIDIA driver on this machine (libcuda.so.1 not found)",
    "libcudart.so": "the CUDA runtime libraries are missing (the nvidia-cuda-runtime wheel)",
    "libcublas": "cuBLAS is missing (the nvidia-cublas wheel)",
    "libvulkan.so": "no Vulkan loader on this machine (libvulkan1 not installed)",
    "libamdhip64": "no ROCm runtime on this machine",
}


class LlamaServerMissing(RuntimeError):
    """No llama-server binary here; the message says how to get one."""


def find_binary() -> Path:
    """``$RBEE_LLAMA_SERVER``, else the build installed with rbee-fleet, else ``llama-server`` on PATH."""
    env = os.environ.get("RBEE_LLAMA_SERVER")
    if env:
        path = Path(env).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise LlamaServerMissing(f"RBEE_LLAMA_SERVER={env} is not an executable file")
        return path
    try:
        import rbee_llama_server  # type: ignore[import-not-found]

        server = Path(rbee_llama_server.SERVER)
        if server.is_file():
            return server
    except ImportError:
        pass
    found = shutil.which("llama-server")
    if found:
        return Path(found)
    raise LlamaServerMissing(
        "llama-server is not installed: run 'just setup' (or 'python -m rbee_fleet.deploy.llama_build --install'), "
        "or point RBEE_LLAMA_SERVER at a llama-server binary"
    )


def engine_env(binary: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment llama-server runs in: its libraries beside it, and CUDA's devices numbered in PCI
    order, as NVML numbers them (so ``cuda:N`` is the same GPU to both)."""
    env = dict(os.environ if base is None else base)
    lib_dir = str(binary.parent)
    env["LD_LIBRARY_PATH"] = lib_dir + (os.pathsep + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
    env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    return env


def installed_backends(binary: Path) -> list[str]:
    """The GPU backends whose modules lie beside ``binary`` (whether or not they can load here)."""
    return [b for b in GPU_BACKEND_NAMES if _module(binary, b) is not None]


def cpu_variants(binary: Path) -> list[str]:
    return sorted(p.name[len("libggml-cpu-"):].split(".so")[0] for p in binary.parent.glob("libggml-cpu-*.so*"))


def _module(binary: Path, backend: str) -> Path | None:
    lib = "hip" if backend == "rocm" else backend
    found = sorted(binary.parent.glob(f"libggml-{lib}.so*"))
    return found[0] if found else None


def parse_devices(text: str) -> list[EngineDevice]:
    """``llama-server --list-devices``'s lines as devices (RPC and unknown kinds kept under their own names)."""
    devices = []
    for line in text.splitlines():
        match = _LINE.match(line)
        if not match:
            continue
        name = f"{match['name']}{match['index']}"
        prefix = ENGINE_DEVICE_PREFIXES.get(match["name"], match["name"].lower())
        device_id = "metal" if prefix == "metal" and match["index"] == "0" else f"{prefix}:{match['index']}"
        devices.append(EngineDevice(
            id=device_id, name=name, description=match["desc"].strip(),
            memory_total_mb=int(match["total"]), memory_free_mb=int(match["free"]), unified=prefix == "metal",
        ))
    return devices


def list_devices(binary: Path, env: dict[str, str] | None = None, timeout: float = LIST_TIMEOUT_S) -> list[EngineDevice]:
    """The devices llama-server sees now, with their total and free memory; raises ``OSError`` (with
    what llama-server said) when it cannot tell."""
    try:
        out = subprocess.run([str(binary), "--list-devices"], capture_output=True, text=True, timeout=timeout,
                             env=engine_env(binary, env), stdin=subprocess.DEVNULL, errors="replace")
    except subprocess.TimeoutExpired:
        raise OSError(f"llama-server --list-devices did not answer within {timeout:.0f} s (a hung driver?)") from None
    if out.returncode != 0 or "Available devices" not in out.stdout:
        said = " ".join((out.stderr or out.stdout).split())[-300:]
        raise OSError(f"llama-server --list-devices failed (exit {out.returncode}): {said or 'no output'}")
    return parse_devices(out.stdout)


def backend_status(binary: Path, devices: list[EngineDevice]) -> dict[str, str]:
    """For each GPU backend: ``ok``, or why it serves nothing here (not installed, cannot load, no device)."""
    status: dict[str, str] = {}
    have = {d.id.split(":")[0] for d in devices}
    for backend in GPU_BACKEND_NAMES:
        module = _module(binary, backend)
        if backend in have:
            status[backend] = "ok"
        elif module is None:
            status[backend] = "not installed"
        else:
            status[backend] = (load_problem(module) or driver_problem(backend)
                               or "installed, but the driver reports no device")
    return status


def load_problem(module: Path) -> str | None:
    """Why a backend module cannot be loaded here (its missing library, in the operator's words), or None.

    Tried in a child process: a module that loads stays loaded, and this process has no use for it."""
    probe = "import ctypes, sys\ntry:\n    ctypes.CDLL(sys.argv[1])\nexcept OSError as e:\n    print(e)\n"
    try:
        out = subprocess.run([sys.executable, "-I", "-c", probe, str(module)], capture_output=True, text=True,
                             timeout=30, env=engine_env(module))
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot try loading {module.name}: {exc}"
    text = out.stdout.strip()
    if not text:
        return None
    hint = next((h for library, h in _LIBRARY_HINTS.items() if library in text), None)
    return f"{hint} ({text})" if hint else f"cannot load {module.name}: {text}"


_DRIVER_LIBRARIES = {"cuda": "libcuda.so.1", "vulkan": "libvulkan.so.1", "rocm": "libamdhip64.so"}


def driver_problem(backend: str) -> str | None:
    """Why the driver library a GPU backend needs does not load on this machine, or None when it does."""
    library = _DRIVER_LIBRARIES.get(backend)
    if library is None:
        return None
    probe = "import ctypes, sys\ntry:\n    ctypes.CDLL(sys.argv[1])\nexcept OSError as e:\n    print(e)\n"
    try:
        out = subprocess.run([sys.executable, "-I", "-c", probe, library], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot try loading {library}: {exc}"
    text = out.stdout.strip()
    if not text:
        return None
    hint = next((h for lib, h in _LIBRARY_HINTS.items() if lib in text), None)
    return f"{hint} ({text})" if hint else text


def engine_name(device_id: str) -> str:
    """``vulkan:1`` -> ``Vulkan1`` (llama-server's ``--device`` names); ``metal`` -> ``MTL0``."""
    if device_id == "metal":
        return "MTL0"
    prefix, _, index = device_id.partition(":")
    names = {ours: theirs for theirs, ours in ENGINE_DEVICE_PREFIXES.items()}
    return f"{names.get(prefix, prefix.upper())}{index}"
