"""The wheels a GPU machine without network needs: what rbee-fleet and exllamav2 require that it lacks.

Requirements are read from the wheels' own metadata and followed to the end, for CPython 3.12 on
x86-64 Linux (the GPU machine's Python, not this one). A requirement is skipped when the GPU machine's
image already has the package (``GPU_MACHINE_HAS``, as ``/work/.library/device/KINDS.md`` lists it) or
when nothing the worker runs imports it (``NOT_NEEDED``, with the reason). Downloads are cached: a wheel
already in the cache that satisfies a requirement is used without asking the index again.
"""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

PYTHON_VERSION = "3.12"
# Tried in this order by pip; glibc 2.17 wheels run on every current distribution.
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
MAX_GLIBC_MINOR = 28
MARKER_ENV = {
    "python_version": PYTHON_VERSION, "python_full_version": f"{PYTHON_VERSION}.3", "os_name": "posix",
    "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
    "platform_python_implementation": "CPython", "implementation_name": "cpython", "extra": "",
}
EXLLAMAV2 = "exllamav2==0.3.2"

# The GPU machine's image (KINDS.md, "Python packages already there", read 2026-11-17).
GPU_MACHINE_HAS = frozenset(canonicalize_name(n) for n in """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec
patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools
shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server
tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq
torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions
typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())

# Shipped although the image has them: their version there may be older than what is required.
ALWAYS_SHIP = frozenset({"typing-extensions"})  # pydantic 2.12+ needs a recent one

# Required by a shipped wheel's metadata, never imported by the queen, hive or worker.
NOT_NEEDED = {
    "fastparquet": "imported only by exllamav2's model converter (exllamav2/conversion)",
    "websockets": "imported only by exllamav2's websocket server (exllamav2/server)",
}


class KitError(RuntimeError):
    """The kit cannot be built; the message says why."""


@dataclass(frozen=True)
class Wheel:
    path: Path
    name: str  # canonical
    version: Version

    @classmethod
    def of(cls, path: Path) -> Wheel:
        name, version, _, _ = parse_wheel_filename(path.name)
        return cls(path, canonicalize_name(name), version)

    def requires(self) -> list[Requirement]:
        """The wheel's Requires-Dist that apply on the GPU machine (no extras)."""
        with zipfile.ZipFile(self.path) as zf:
            meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
            headers = Parser().parsestr(zf.read(meta).decode("utf-8"), headersonly=True)
        reqs = [Requirement(r) for r in headers.get_all("Requires-Dist") or []]
        return [r for r in reqs if r.marker is None or r.marker.evaluate(MARKER_ENV)]


@dataclass
class Resolution:
    wheels: dict[str, Wheel] = field(default_factory=dict)  # name -> chosen wheel
    why: dict[str, list[str]] = field(default_factory=dict)  # name -> "parent requires spec"
    skipped: dict[str, str] = field(default_factory=dict)  # name -> reason


def compatible(path: Path) -> bool:
    """Whether a wheel file installs on CPython 3.12, x86-64 Linux (glibc 2.17+)."""
    _, _, _, tags = parse_wheel_filename(path.name)
    for tag in tags:
        py_ok = tag.interpreter in ("py3", "cp312") or (tag.interpreter.startswith("cp3") and tag.abi == "abi3")
        plat_ok = tag.platform in ("any", "manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64")
        glibc = re.fullmatch(r"manylinux_2_(\d+)_x86_64", tag.platform)
        plat_ok = plat_ok or (glibc is not None and int(glibc.group(1)) <= MAX_GLIBC_MINOR)
        if py_ok and plat_ok and tag.abi in ("none", "abi3", "cp312"):
            return True
    return False


class WheelFetcher:
    """Cached ``pip download`` of single wheels for the GPU machine's Python."""

    def __init__(self, cache: Path, python: str = sys.executable, log=print) -> None:
        self.cache = cache
        self.python = python
        self.log = log
        cache.mkdir(parents=True, exist_ok=True)

    def cached(self, name: str, spec: SpecifierSet) -> Wheel | None:
        found = [w for w in map(Wheel.of, self.cache.glob("*.whl"))
                 if w.name == name and spec.contains(w.version, prereleases=False) and compatible(w.path)]
        return max(found, key=lambda w: w.version) if found else None

    def get(self, name: str, spec: SpecifierSet) -> Wheel:
        hit = self.cached(name, spec)
        if hit is not None:
            return hit
        requirement = f"{name}{spec}"
        self.log(f"    downloading {requirement}")
        cmd = [self.python, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
               "--only-binary=:all:", "--python-version", PYTHON_VERSION, "--implementation", "cp",
               *[arg for p in PLATFORMS for arg in ("--platform", p)], "-d", str(self.cache), requirement]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        hit = self.cached(name, spec)
        if out.returncode != 0 or hit is None:
            raise KitError(f"pip could not download a CPython {PYTHON_VERSION} x86-64 wheel of {requirement}: "
                           f"{(out.stderr or out.stdout).strip()[-1500:]}")
        return hit


def resolve(roots: list[Wheel], fetcher: WheelFetcher) -> Resolution:
    """Every wheel the roots need on the GPU machine, skipping what it has; one version per package."""
    res = Resolution()
    specs: dict[str, SpecifierSet] = {}
    todo = list(roots)
    for root in roots:
        res.wheels[root.name] = root
        res.why.setdefault(root.name, []).append("shipped by name")
    while todo:
        parent = todo.pop(0)
        for req in parent.requires():
            name = canonicalize_name(req.name)
            if name in NOT_NEEDED:
                res.skipped[name] = NOT_NEEDED[name]
                continue
            if name in GPU_MACHINE_HAS and name not in ALWAYS_SHIP:
                res.skipped[name] = "already on the GPU machine"
                continue
            res.why.setdefault(name, []).append(f"{parent.name} {parent.version} requires {req}")
            specs[name] = specs.get(name, SpecifierSet()) & req.specifier
            current = res.wheels.get(name)
            if current is not None and specs[name].contains(current.version, prereleases=True):
                continue
            if current is not None and current in roots:
                raise KitError(f"{parent.name} requires {req}, but the kit ships {name} {current.version}")
            res.wheels[name] = fetcher.get(name, specs[name])
            todo.append(res.wheels[name])
    return res
