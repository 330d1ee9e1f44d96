"""NVIDIA's CUDA toolkit from PyPI, arranged so that CMake can build llama.cpp's CUDA backend with it.

No GPU and no system toolkit are needed to compile: NVIDIA publishes nvcc, its compiler parts, the
runtime and cuBLAS as wheels (the versions ``cuda-toolkit==13.0.2`` pins). They are installed once per
machine into the build cache and laid out the way CMake's ``FindCUDAToolkit`` expects a toolkit root:
``lib64`` beside ``lib``, unversioned library names, and a stub ``libcuda.so`` (the driver's library,
which only an NVIDIA driver provides; the stub only lets the backend link, a host loads its driver's).

Hosts need the runtime and cuBLAS at run time: ``RUNTIME_REQUIREMENTS`` travel with the CUDA backend's
wheel (its ``Requires-Dist``, and the offline wheelhouse), installed under ``WHEEL_LIB_DIR`` of the
venv, where the backend's RPATH finds them. A host needs only a driver new enough for CUDA 13.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

TOOLKIT = "13.0.2"
BUILD_REQUIREMENTS = (
    "nvidia-cuda-nvcc==13.0.88", "nvidia-cuda-crt==13.0.88", "nvidia-nvvm==13.0.88",
    "nvidia-cuda-runtime==13.0.96", "nvidia-cublas==13.1.0.3", "nvidia-cuda-cccl==13.0.85",
)
# cuobjdump lists the GPU architectures a build holds (the oldest on PyPI reads CUDA 13.0's objects).
TOOLS_REQUIREMENTS = ("nvidia-cuda-cuobjdump==13.2.51",)
RUNTIME_REQUIREMENTS = ("nvidia-cuda-runtime==13.0.96", "nvidia-cublas==13.1.0.3")
WHEEL_LIB_DIR = "nvidia/cu13/lib"  # where the runtime wheels put their libraries, under site-packages
INSTALL_TIMEOUT_S = 1800


class ToolkitError(RuntimeError):
    """The toolkit could not be installed or arranged; the message says which step and why."""


def ensure(cache: Path, say: Callable[[str], None]) -> Path:
    """The toolkit root under ``cache`` (the build cache), installed and arranged on first use: about
    530 MB downloaded, 840 MB on disk."""
    base = cache / "cuda-toolkit" / TOOLKIT
    root = base / "nvidia" / "cu13"
    done = base / ".arranged"
    if done.is_file() and (root / "bin" / "nvcc").is_file():
        return root
    base.mkdir(parents=True, exist_ok=True)
    say(f"installing NVIDIA's CUDA {TOOLKIT} compiler and libraries from PyPI into {base} (about 530 MB, once)")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--upgrade", "--target", str(base),
           *BUILD_REQUIREMENTS, *TOOLS_REQUIREMENTS]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ToolkitError(f"pip did not install the CUDA toolkit within {INSTALL_TIMEOUT_S} s") from None
    if out.returncode != 0:
        lines = [line for line in out.stderr.splitlines() if not line.startswith("WARNING")]
        raise ToolkitError("pip could not install the CUDA toolkit: " + " ".join(lines[-5:]))
    _arrange(root)
    done.write_text(" ".join((*BUILD_REQUIREMENTS, *TOOLS_REQUIREMENTS)) + "\n")
    return root


def _arrange(root: Path) -> None:
    """``lib64`` and the unversioned names CMake links with; a stub driver library to link against."""
    lib = root / "lib"
    if not (root / "bin" / "nvcc").is_file() or not lib.is_dir():
        raise ToolkitError(f"the CUDA wheels left no nvcc or lib folder under {root}")
    for versioned in lib.glob("lib*.so.*"):
        plain = lib / (versioned.name.split(".so")[0] + ".so")
        if not plain.exists():
            plain.symlink_to(versioned.name)
    lib64 = root / "lib64"
    if not lib64.exists():
        lib64.symlink_to("lib")
    stubs = lib / "stubs"
    stubs.mkdir(exist_ok=True)
    stub = stubs / "libcuda.so"
    if not stub.exists():
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            raise ToolkitError("a C compiler (cc) is needed to make the stub libcuda.so")
        out = subprocess.run([cc, "-shared", "-Wl,-soname,libcuda.so.1", "-o", str(stub), "-x", "c", os.devnull],
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise ToolkitError(f"making the stub libcuda.so failed: {out.stderr.strip()[-300:]}")


def build_env(root: Path) -> dict[str, str]:
    """What CMake and nvcc need to find this toolkit."""
    return {
        "CUDAToolkit_ROOT": str(root),
        "CUDA_PATH": str(root),
        "CUDACXX": str(root / "bin" / "nvcc"),
        "PATH": f"{root / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        "LIBRARY_PATH": f"{root / 'lib' / 'stubs'}{os.pathsep}{root / 'lib'}",
    }


def architectures(library: Path, root: Path) -> tuple[dict[str, int], dict[str, int]]:
    """The GPU code a CUDA library holds: {sm_XX: kernels} of machine code (SASS) and of PTX."""
    import re

    tool = root / "bin" / "cuobjdump"
    found: list[dict[str, int]] = []
    for flag in ("--list-elf", "--list-ptx"):
        out = subprocess.run([str(tool), flag, str(library)], capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            raise ToolkitError(f"cuobjdump {flag} {library.name} failed: {out.stderr.strip()[-300:]}")
        counts: dict[str, int] = {}
        for arch in re.findall(r"\.(sm_\d+[a-z]?)\.", out.stdout):
            counts[arch] = counts.get(arch, 0) + 1
        found.append(counts)
    return found[0], found[1]
