"""Questions the proof asks in a child process, each answered as one JSON object on the last stdout line.

    python3 probe.py env        the GPU as torch sees it, and the versions of what is installed
    python3 probe.py imports    what the kit installed imports, from where, and unmet requirements
    python3 probe.py build      import exllamav2, which compiles its CUDA extension on first use

Run as a file (never ``-m`` from the checkout), with the kit's private directory on PYTHONPATH, so that
``rbee_fleet`` is the installed wheel and not the checkout's sources.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import json
import sys
import time
from pathlib import Path
from typing import Any

# Required by a shipped wheel, never imported by the queen, hive or worker (see wheels.NOT_NEEDED).
NOT_NEEDED = {"fastparquet", "websockets"}


def version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def env() -> dict[str, Any]:
    out: dict[str, Any] = {"python": sys.version.split()[0], "executable": sys.executable}
    for dist in ("torch", "transformers", "flash-attn", "exllamav2", "rbee-fleet", "pydantic", "aiohttp",
                 "ninja", "nvidia-ml-py", "safetensors", "tokenizers"):
        out[f"version {dist}"] = version(dist)
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        out["torch_error"] = f"{type(exc).__name__}: {exc}"
        return out
    out["torch_cuda"] = torch.version.cuda
    out["cuda_available"] = torch.cuda.is_available()
    if out["cuda_available"]:
        out["device_count"] = torch.cuda.device_count()
        out["device_name"] = torch.cuda.get_device_name(0)
        out["capability"] = "{}.{}".format(*torch.cuda.get_device_capability(0))
        out["memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    out["cuda_include_dirs"] = nvidia_include_dirs()
    try:
        from torch.utils import cpp_extension

        out["torch_cuda_home_guess"] = cpp_extension.CUDA_HOME  # the proof sets CUDA_HOME itself
    except Exception as exc:  # noqa: BLE001
        out["torch_cuda_home_guess"] = f"{type(exc).__name__}: {exc}"
    return out


def nvidia_include_dirs() -> list[str]:
    """Header folders of NVIDIA's pip packages (nvidia/cu13/include, nvidia/cublas/include, ...)."""
    try:
        import nvidia
    except ImportError:
        return []
    found: set[str] = set()
    for root in map(Path, getattr(nvidia, "__path__", [])):
        for include in [*root.glob("*/include"), *root.glob("*/*/include")]:
            if any(include.glob("*.h")):
                found.add(str(include))
    return sorted(found)


def imports() -> dict[str, Any]:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    out: dict[str, Any] = {"modules": {}, "unmet": [], "versions": {}}
    for dist in ("rbee-fleet", "pydantic", "pydantic-core", "exllamav2", "typing-extensions"):
        out["versions"][dist] = version(dist)
    for name in ("rbee_fleet", "pydantic", "pydantic_core", "typing_extensions", "annotated_types", "aiohttp",
                 "rbee_fleet.queen.app", "rbee_fleet.hive.app", "rbee_fleet.worker.app",
                 "rbee_fleet.worker.backends.exllamav2"):
        try:
            module = importlib.import_module(name)
            out["modules"][name] = getattr(module, "__file__", "?")
        except Exception as exc:  # noqa: BLE001 - every failure is the answer
            out["modules"][name] = f"FAILED {type(exc).__name__}: {exc}"
    env = {"extra": ""}
    for dist in ("rbee-fleet", "pydantic", "pydantic-core", "exllamav2", "typing-inspection"):
        try:
            reqs = md.requires(dist) or []
        except md.PackageNotFoundError:
            out["unmet"].append(f"{dist} is not installed")
            continue
        for line in reqs:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            if canonicalize_name(req.name) in NOT_NEEDED:
                continue
            have = version(req.name)
            if have == "not installed" or not req.specifier.contains(have, prereleases=True):
                out["unmet"].append(f"{dist} requires {req}, found {have}")
    return out


def build() -> dict[str, Any]:
    started = time.monotonic()
    import exllamav2  # compiles exllamav2_ext (torch.utils.cpp_extension) unless already built
    from exllamav2 import attn, ext

    seconds = time.monotonic() - started
    return {
        "seconds": round(seconds, 1),
        "exllamav2": getattr(exllamav2, "__version__", version("exllamav2")),
        "extension": getattr(ext.exllamav2_ext, "__file__", "?"),
        "jit": bool(getattr(ext, "build_jit", False)),
        "flash_attn": bool(getattr(attn, "has_flash_attn", False)),
        "paged_attention": bool(getattr(attn, "has_flash_attn_with_paged", False)),
    }


def main() -> int:
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    answer = {"env": env, "imports": imports, "build": build}.get(what)
    if answer is None:
        print(f"usage: probe.py env|imports|build (not {what!r})", file=sys.stderr)
        return 2
    print(json.dumps(answer()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
