"""llama.cpp's own server, built per machine from pinned sources and kept as wheels, one per part.

Workers run ``llama-server`` (continuous batching and the whole OpenAI surface, in C++), built here
from the llama.cpp sources that a pinned ``llama-cpp-python`` sdist vendors (fetched by pip, checked
against its sha256). ggml is built with runtime-loaded backends (``GGML_BACKEND_DL``): the server and
its core libraries are one part, and every backend is a module of its own that ggml finds beside the
binary at start and loads when the machine can run it. So the build is split into parts, each packed
as a wheel that installs into the same ``rbee_llama_server/bin`` folder:

- ``server``: ``llama-server`` and the core libraries (``rbee-llama-server``);
- ``cpu:VARIANT``: one CPU backend per x86-64 level (``rbee-llama-cpu-haswell`` …); ggml picks the best
  one the CPU supports. This machine's own variant is built first (what ``just setup`` needs to
  answer); the portable set when a deploy ships to other hosts;
- ``vulkan`` (AMD, Intel, NVIDIA: any Vulkan 1.2 driver), ``cuda`` (NVIDIA; the CUDA toolkit comes from
  PyPI, see ``cuda_toolkit``), and ``rocm`` (AMD, ggml's HIP backend) / ``metal`` (Apple), built only on
  a machine that has their toolkit.

Every part is cached by what it is built from (``~/.cache/rbee-fleet/llama-server``), so one build
serves this machine's venv and every host the keeper deploys to (the wheels travel in the wheelhouse).
``python -m rbee_fleet.deploy.llama_build --install [--backend vulkan]`` builds what is missing and
installs it into the running venv.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from rbee_fleet.contracts.vocabulary import GPU_BACKEND_NAMES

# The pinned sources: llama.cpp as vendored by this llama-cpp-python release.
SOURCE_PACKAGE = "llama-cpp-python"
SOURCE_VERSION = "0.3.36"
SOURCE_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
PACKAGE = "rbee_llama_server"  # the import package every part installs into
# CPU variants built for x86-64 (ggml picks the best one the CPU supports at start). The baseline runs
# anywhere; the others cover AVX, AVX2 (most CPUs since 2013), AVX-512 and AVX-VNNI machines.
X86_VARIANTS = ("x64", "sandybridge", "haswell", "skylakex", "icelake", "alderlake")
BASE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DGGML_NATIVE=OFF",
    "-DGGML_BACKEND_DL=ON",
    "-DGGML_CPU_ALL_VARIANTS=ON",
    "-DGGML_OPENMP=OFF",
    "-DGGML_RPC=ON",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON",
    "-DCMAKE_INSTALL_RPATH=$ORIGIN",
)
# CUDA compute capabilities built by default: machine code for Turing (RTX 20, T4), Ampere (A100; RTX 30),
# Ada (RTX 40, L4) and Hopper (H100, H200), and Hopper's PTX, which newer GPUs (Blackwell) compile at their
# first load (CMake's "90" is both; "-real" machine code only). Each architecture costs about 35 minutes of compiling on 2 cores: pass fewer
# with ``--cuda-archs`` or ``$RBEE_CUDA_ARCHS`` (e.g. ``86`` for one RTX 3090 box; deploys use the same
# variable to find the build).
DEFAULT_CUDA_ARCHS = os.environ.get("RBEE_CUDA_ARCHS") or "75-real;80-real;86-real;89-real;90"
BUILD_TIMEOUT_S = 4 * 3600
BUILD_REVISION = 4  # bump when what is built or packed changes in a way the flags and patches do not show


@dataclass(frozen=True)
class Patch:
    """A change to the pinned sources: each occurrence of ``old`` in ``file`` gets the next of ``new``."""

    file: str
    old: str
    new: tuple[str, ...]
    why: str


SOURCE_PATCHES = (
    # tool_choice "required" lets the model write free text before its tool call in this llama.cpp, so a
    # model that never starts a call answers in prose: OpenAI's "required" means the answer is tool calls,
    # and the grammar is made to say so (no text before the first call).
    Patch("common/chat-auto-parser-generator.cpp",
          "return ctx.reasoning_parser + p.optional(p.content(content_before_tools)) + tool_calls + p.end();",
          tuple(f"return ctx.reasoning_parser + ({flag} ? p.eps() : p.optional(p.content(content_before_tools)))"
                " + tool_calls + p.end();" for flag in ("require_calls", "require_tools")),
          "tool_choice required: no text before the first call"),
    Patch("common/chat-auto-parser-generator.cpp",
          "return ctx.reasoning_parser + p.optional(p.content(p.until(tool_start))) + tools_parser + p.end();",
          ("return ctx.reasoning_parser + (inputs.tool_choice == COMMON_CHAT_TOOL_CHOICE_REQUIRED ? p.eps() : "
           "p.optional(p.content(p.until(tool_start)))) + tools_parser + p.end();",),
          "tool_choice required: no text before the first call"),
    # parallel_tool_calls false must mean at most one call (OpenAI's meaning; agent frameworks run tools one
    # at a time on it): this grammar allowed any number for formats that mark each call on its own.
    Patch("common/chat-auto-parser-generator.cpp",
          'tools_parser = p.trigger_rule("tool-calls", p.one_or_more(single_tool_parser + p.space()));',
          ('tools_parser = p.trigger_rule("tool-calls", inputs.parallel_tool_calls ? '
           'p.one_or_more(single_tool_parser + p.space()) : single_tool_parser + p.space());',),
          "parallel_tool_calls false: one call"),
    # A backend module is built when it is asked for, not whenever llama-server is: the CPU variants and
    # GPU backends are parts of their own.
    Patch("ggml/src/CMakeLists.txt", "        add_dependencies(ggml ${backend})\n", ("",),
          "backends are separate targets"),
    # VK_EXT_layer_settings (used only to turn on the validation layer's best-practice checks) is missing
    # from older Vulkan headers (Debian 12 has 1.3.239): create the instance without it there.
    Patch("ggml/src/ggml-vulkan/ggml-vulkan.cpp",
          "    VkBool32 enable_best_practice = layer_settings;\n",
          ("#if defined(VK_EXT_layer_settings)\n    VkBool32 enable_best_practice = layer_settings;\n",),
          "older Vulkan headers"),
    Patch("ggml/src/ggml-vulkan/ggml-vulkan.cpp",
          "    vk::InstanceCreateInfo instance_create_info(vk::InstanceCreateFlags{}, &app_info, layers, extensions, "
          "&layer_setting_info);\n",
          ("    vk::InstanceCreateInfo instance_create_info(vk::InstanceCreateFlags{}, &app_info, layers, extensions, "
           "&layer_setting_info);\n#else\n    vk::InstanceCreateInfo instance_create_info(vk::InstanceCreateFlags{}, "
           "&app_info, layers, extensions);\n#endif\n",),
          "older Vulkan headers"),
)
VARIANT_CALL = "ggml_add_cpu_backend_variant("
# ggml's CPU feature names (in its CMake variant list) as /proc/cpuinfo spells them.
CPU_FLAGS = {
    "SSE42": ("sse4_2",), "AVX": ("avx",), "F16C": ("f16c",), "FMA": ("fma",), "AVX2": ("avx2",),
    "BMI2": ("bmi2",), "AVX512": ("avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"),
    "AVX512_VBMI": ("avx512vbmi",), "AVX512_VNNI": ("avx512_vnni",), "AVX512_BF16": ("avx512_bf16",),
    "AVX_VNNI": ("avx_vnni",), "AMX_TILE": ("amx_tile",), "AMX_INT8": ("amx_int8",),
    "DOTPROD": ("asimddp",), "FP16_VECTOR_ARITHMETIC": ("asimdhp",), "SVE": ("sve",), "MATMUL_INT8": ("i8mm",),
    "SVE2": ("sve2",), "SME": ("sme",),
}

Progress = Callable[[str], None]


class BuildError(RuntimeError):
    """llama-server could not be fetched or built; the message says which step and why."""


# -- the parts ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    """A GPU backend: the build folder configured with ``flags``, the module ``target`` built there."""

    name: str
    flags: tuple[str, ...]
    target: str
    vendor: str
    requires: tuple[str, ...] = ()  # wheels the backend's libraries need at run time (CUDA's runtime)


def gpu_backend(name: str, cuda_archs: str = DEFAULT_CUDA_ARCHS) -> Backend:
    if name == "vulkan":
        return Backend("vulkan", ("-DGGML_VULKAN=ON",), "ggml-vulkan", "AMD, Intel and NVIDIA GPUs (any Vulkan 1.2 driver)")
    if name == "cuda":
        from rbee_fleet.deploy import cuda_toolkit

        return Backend("cuda", (
            "-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={cuda_archs}", "-DGGML_CUDA_NCCL=OFF",
            # The driver's library (its VMM calls) must stay a dependency: linked against a stub that defines
            # nothing, --as-needed (the default of Debian's and Ubuntu's toolchains) would drop it, and a host
            # with a driver could not load the backend ("undefined symbol: cuMemCreate").
            # (A backend is a MODULE library: CMake links it with the module flags.)
            "-DCMAKE_MODULE_LINKER_FLAGS=-Wl,--no-as-needed", "-DCMAKE_SHARED_LINKER_FLAGS=-Wl,--no-as-needed",
            # The CUDA runtime libraries come from NVIDIA's wheels beside this one in site-packages.
            f"-DCMAKE_INSTALL_RPATH=$ORIGIN;$ORIGIN/../../{cuda_toolkit.WHEEL_LIB_DIR}",
        ), "ggml-cuda", "NVIDIA GPUs", cuda_toolkit.RUNTIME_REQUIREMENTS)
    if name == "rocm":
        return Backend("rocm", ("-DGGML_HIP=ON",), "ggml-hip", "AMD GPUs (ROCm/HIP)")
    if name == "metal":
        return Backend("metal", ("-DGGML_METAL=ON", "-DGGML_METAL_EMBED_LIBRARY=ON"), "ggml-metal", "Apple GPUs")
    raise BuildError(f"unknown llama.cpp backend {name!r} (known: {', '.join(GPU_BACKENDS)})")


GPU_BACKENDS = GPU_BACKEND_NAMES


@dataclass(frozen=True)
class Part:
    """One wheel of the build: ``server``, ``cpu:VARIANT`` or a GPU backend's name."""

    name: str

    @property
    def dist(self) -> str:
        if self.name == "server":
            return PACKAGE
        return "rbee_llama_" + re.sub(r"[^a-z0-9]", "_", self.name)

    @property
    def tree(self) -> str:
        """The build folder it is compiled in: ``cpu`` (server and CPU variants) or the backend's name."""
        return "cpu" if self.name == "server" or self.name.startswith("cpu:") else self.name

    @property
    def targets(self) -> tuple[str, ...]:
        if self.name == "server":
            return ("llama-server",)
        if self.name.startswith("cpu:"):
            return (f"ggml-cpu-{self.name[4:]}",)
        return (gpu_backend(self.name).target,)

    def files(self, bin_dir: Path) -> list[Path]:
        """The files of this part in a build's ``bin`` folder (symlinks left out)."""
        if self.name == "server":
            libs = [p for p in sorted(bin_dir.glob("*.so*")) if not p.is_symlink() and not _is_backend_module(p)]
            return [bin_dir / "llama-server", *libs]
        lib = f"lib{self.targets[0]}.so"
        return [p for p in sorted(bin_dir.glob(lib + "*")) if not p.is_symlink()]

    def wheel_name(self, arch: str | None = None) -> str:
        return f"{self.dist}-{SOURCE_VERSION}-py3-none-linux_{arch or machine_arch()}.whl"


def _is_backend_module(lib: Path) -> bool:
    name = lib.name.split(".so")[0]
    return name.startswith("libggml-") and name not in ("libggml-base",)


def cpu_variants(source_cmake: str) -> dict[str, tuple[str, ...]]:
    """The CPU variants the pinned ggml declares for this architecture, with their features, in order."""
    arch = machine_arch()
    x86 = arch in ("x86_64", "amd64", "i686")
    variants: dict[str, tuple[str, ...]] = {}
    for line in source_cmake.splitlines():
        stripped = line.strip()
        if not stripped.startswith(VARIANT_CALL):
            continue
        words = stripped[len(VARIANT_CALL):].rstrip(")").split()
        name, features = words[0], tuple(words[1:])
        is_x86 = name in _X86_NAMES
        if x86 and is_x86 and name in X86_VARIANTS:
            variants[name] = features
        elif not x86 and not is_x86 and name.startswith(("armv", "power", "s390", "riscv")):
            variants[name] = features
    return variants


_X86_NAMES = {"x64", "sse42", "sandybridge", "ivybridge", "piledriver", "haswell", "skylakex", "cannonlake",
              "cascadelake", "icelake", "cooperlake", "zen4", "alderlake", "sapphirerapids"}
# What the pinned sources declare, for when the sources are not at hand (the cache key does not need them).
KNOWN_X86_FEATURES = {
    "x64": (), "sandybridge": ("SSE42", "AVX"), "haswell": ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2"),
    "skylakex": ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX512"),
    "icelake": ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX512", "AVX512_VBMI", "AVX512_VNNI"),
    "alderlake": ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX_VNNI"),
}


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def best_variant(variants: dict[str, tuple[str, ...]], flags: set[str]) -> str | None:
    """The variant with the most features that this CPU has all of (what ggml will load), or None."""
    fitting = [(len(feats), name) for name, feats in variants.items()
               if all(all(f in flags for f in CPU_FLAGS.get(feat, (feat.lower(),))) for feat in feats)]
    return max(fitting)[1] if fitting else None


KNOWN_ARM_FEATURES = {
    "armv8.0_1": (), "armv8.2_1": ("DOTPROD",), "armv8.2_2": ("DOTPROD", "FP16_VECTOR_ARITHMETIC"),
    "armv8.2_3": ("DOTPROD", "FP16_VECTOR_ARITHMETIC", "SVE"),
    "armv8.6_1": ("DOTPROD", "FP16_VECTOR_ARITHMETIC", "SVE", "MATMUL_INT8"),
    "armv8.6_2": ("DOTPROD", "FP16_VECTOR_ARITHMETIC", "SVE", "MATMUL_INT8", "SVE2"),
    "armv9.2_1": ("DOTPROD", "FP16_VECTOR_ARITHMETIC", "SVE", "MATMUL_INT8", "SME"),
    "armv9.2_2": ("DOTPROD", "FP16_VECTOR_ARITHMETIC", "SVE", "MATMUL_INT8", "SVE2", "SME"),
}


def known_variants(arch: str | None = None) -> dict[str, tuple[str, ...]]:
    arch = arch or machine_arch()
    return KNOWN_X86_FEATURES if arch == "x86_64" else KNOWN_ARM_FEATURES if arch == "aarch64" else {}


def native_parts() -> list[Part]:
    """What this machine needs to serve on its CPU: the server and its own CPU variant (every variant
    where this machine's CPU cannot be read)."""
    best = best_variant(known_variants(), cpu_flags())
    return [Part("server"), Part(f"cpu:{best}")] if best else portable_parts()


def host_variants(arch: str, flags: Iterable[str]) -> tuple[str, ...]:
    """The CPU variants a host with these /proc/cpuinfo flags gets: its best and the baseline (so that a
    misread flag still leaves one ggml can load); () when its CPU is unknown (then every variant ships)."""
    variants = known_variants(arch)
    best = best_variant(variants, set(flags)) if variants and flags else None
    if best is None:
        return ()
    baseline = next(iter(variants))
    return (best,) if best == baseline else (best, baseline)


def portable_parts(arch: str | None = None) -> list[Part]:
    """What a host of ``arch`` gets: the server and every CPU variant (ggml picks the host's best)."""
    variants = known_variants(arch)
    if not variants:
        raise BuildError(f"llama-server's CPU variants for {arch or machine_arch()} are not known to rbee-fleet")
    return [Part("server"), *(Part(f"cpu:{v}") for v in variants)]


# -- where builds live -------------------------------------------------------------------------------


def cache_root() -> Path:
    """``$RBEE_LLAMA_BUILD_CACHE``, else ``$XDG_CACHE_HOME/rbee-fleet`` (``~/.cache/rbee-fleet``).

    One place per machine, whatever ``RBEE_HOME`` says: every checkout, venv, test and deploy on this
    machine reuses the same build.
    """
    env = os.environ.get("RBEE_LLAMA_BUILD_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "rbee-fleet"


def machine_arch() -> str:
    arch = platform.machine().lower() or "unknown"
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(arch, arch)


def _digest(*parts: str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:10]


def _patches_id() -> str:
    return _digest(*(f"{p.file}\0{p.old}\0{chr(1).join(p.new)}" for p in SOURCE_PATCHES))


def tree_flags(tree: str, cuda_archs: str = DEFAULT_CUDA_ARCHS) -> tuple[str, ...]:
    return BASE_FLAGS if tree == "cpu" else (*BASE_FLAGS, *gpu_backend(tree, cuda_archs).flags)


def part_id(part: Part, arch: str | None = None, cuda_archs: str = DEFAULT_CUDA_ARCHS) -> str:
    """What a part depends on: sources, patches, its build folder's flags, this builder."""
    arch = arch or machine_arch()
    key = _digest(SOURCE_SHA256, arch, _patches_id(), *tree_flags(part.tree, cuda_archs), part.name,
                  str(BUILD_REVISION))
    return f"{SOURCE_VERSION}-{arch}-{part.name.replace(':', '-')}-{key}"


def build_id(arch: str | None = None, parts: Iterable[Part] | None = None) -> str:
    """One id for a set of parts (by default what a host of ``arch`` gets): a wheelhouse's cache key."""
    chosen = list(parts) if parts is not None else portable_parts(arch)
    return _digest(*(part_id(p, arch) for p in chosen))


def _part_dir(part: Part, cuda_archs: str) -> Path:
    return cache_root() / "llama-server" / part_id(part, cuda_archs=cuda_archs)


def cached(part: Part, cuda_archs: str = DEFAULT_CUDA_ARCHS) -> Path | None:
    path = _part_dir(part, cuda_archs) / part.wheel_name()
    return path if path.is_file() else None


def ensure_wheels(parts: Iterable[Part], progress: Progress | None = None,
                  cuda_archs: str = DEFAULT_CUDA_ARCHS) -> list[Path]:
    """The wheels of ``parts`` for this machine's architecture, building the missing ones (minutes, once).

    Each build folder has its own lock: a long CUDA build never holds up the CPU variants a deploy needs,
    and two processes asking for the same part build it once."""
    say = progress or _stderr
    wanted = list(dict.fromkeys(parts))
    missing = [p for p in wanted if cached(p, cuda_archs) is None]
    if missing:
        started = time.monotonic()
        source = _sources(say)
        by_tree: dict[str, list[Part]] = {}
        for part in missing:
            by_tree.setdefault(part.tree, []).append(part)
        for name, tree_parts in by_tree.items():
            build = source.parent / (f"build-{name}" if name != "cuda" else f"build-cuda-{_digest(cuda_archs)}")
            build.mkdir(parents=True, exist_ok=True)
            with _locked(build.parent / f".{build.name}.lock"):
                todo = [p for p in tree_parts if cached(p, cuda_archs) is None]  # another process built some
                if todo:
                    _build_tree(source, build, name, todo, say, cuda_archs)
        say(f"llama-server parts {', '.join(p.name for p in missing)} ready in {time.monotonic() - started:.0f} s")
    return [cached(p, cuda_archs) for p in wanted]  # type: ignore[misc]


def _sources(say: Progress) -> Path:
    """The pinned, patched sources, kept per sources and architecture: a changed patch is synced file by
    file, so the build folders recompile only what it changes."""
    tree = cache_root() / "llama-server" / f"tree-{_digest(SOURCE_SHA256, machine_arch())}"
    tree.mkdir(parents=True, exist_ok=True)
    source = tree / "src"
    synced = tree / ".synced"
    with _locked(tree / ".sources.lock"):
        if not (source / "CMakeLists.txt").is_file() or not synced.is_file() or synced.read_text() != _patches_id():
            with tempfile.TemporaryDirectory(prefix="llama-src-", dir=tree) as tmp:
                _sync(_fetch_sources(Path(tmp), say), source)
            synced.write_text(_patches_id())
    return source


def _build_tree(source: Path, build: Path, name: str, parts: list[Part], say: Progress, cuda_archs: str) -> None:
    env = dict(os.environ)
    if name != "cpu":
        env.update(_toolkit_env(name, say))
    flags = tree_flags(name, cuda_archs)
    configured = build / ".rbee-flags"
    if not (build / "build.ninja").is_file() or not configured.is_file() or configured.read_text() != "\n".join(flags):
        # A changed flag is configured into the kept folder: ninja then redoes only what it changes.
        _configure(source, build, flags, name, say, env)
        configured.write_text("\n".join(flags))
    _compile(build, [t for p in parts for t in p.targets], name, say, env)
    if name == "cuda":
        _check_cuda(build / "bin" / "libggml-cuda.so", cuda_archs, say)
    with tempfile.TemporaryDirectory(prefix="llama-pack-", dir=build.parent) as tmp:
        for part in parts:
            staged = _stage(part, build / "bin", Path(tmp) / "stage" / part.name)
            dest = _part_dir(part, cuda_archs)
            dest.mkdir(parents=True, exist_ok=True)
            wheel = Path(tmp) / part.wheel_name()
            requires = gpu_backend(part.name, cuda_archs).requires if part.tree != "cpu" else ()
            _write_wheel(part, staged, wheel, requires)
            os.replace(wheel, dest / wheel.name)
            say(f"packed {part.dist} ({(dest / wheel.name).stat().st_size / 2**20:.1f} MiB)")


def _check_cuda(library: Path, cuda_archs: str, say: Progress) -> None:
    """The CUDA backend holds code for every architecture asked for (cuobjdump), or the build fails."""
    from rbee_fleet.deploy import cuda_toolkit

    try:
        sass, ptx = cuda_toolkit.architectures(library, cuda_toolkit.ensure(cache_root(), say))
    except (cuda_toolkit.ToolkitError, OSError, subprocess.TimeoutExpired) as exc:
        raise BuildError(f"cannot list the GPU code in {library.name}: {exc}") from None
    missing = []
    for arch in cuda_archs.split(";"):
        number, _, kind = arch.partition("-")
        if kind in ("", "real") and f"sm_{number}" not in sass:
            missing.append(f"sm_{number} machine code")
        if kind in ("", "virtual") and f"sm_{number}" not in ptx:
            missing.append(f"sm_{number} PTX")
    if missing:
        raise BuildError(f"{library.name} lacks {', '.join(missing)} (asked for {cuda_archs})")
    say(f"{library.name}: machine code for {', '.join(f'{a} ({n} kernels)' for a, n in sorted(sass.items()))}; "
        f"PTX for {', '.join(sorted(ptx)) or 'none'}")


def _toolkit_env(backend: str, say: Progress) -> dict[str, str]:
    """What a GPU backend's configure step needs, or a BuildError saying what is missing."""
    if backend == "vulkan":
        missing = [what for what, ok in (
            ("glslc (apt-get install glslc)", shutil.which("glslc")),
            ("the Vulkan headers (apt-get install libvulkan-dev)", Path("/usr/include/vulkan/vulkan.hpp").is_file()
             or os.environ.get("VULKAN_SDK")),
            ("the SPIR-V headers (apt-get install spirv-headers)", Path("/usr/include/spirv").is_dir()
             or os.environ.get("VULKAN_SDK")),
        ) if not ok]
        if missing:
            raise BuildError("the Vulkan backend cannot be built here: missing " + ", ".join(missing))
        return {}
    if backend == "cuda":
        from rbee_fleet.deploy import cuda_toolkit

        try:
            root = cuda_toolkit.ensure(cache_root(), say)
        except cuda_toolkit.ToolkitError as exc:
            raise BuildError(f"the CUDA backend cannot be built here: {exc}") from None
        return cuda_toolkit.build_env(root)
    if backend == "rocm":
        if not (shutil.which("hipconfig") or Path("/opt/rocm/bin/hipconfig").is_file()):
            raise BuildError("the ROCm/HIP backend is built on the AMD host itself and needs AMD's ROCm toolkit "
                             "(hipconfig not found; see https://rocm.docs.amd.com for the install)")
        hip = shutil.which("hipconfig") or "/opt/rocm/bin/hipconfig"
        out = subprocess.run([hip, "-l"], capture_output=True, text=True, check=False).stdout.strip()
        return {"HIPCXX": f"{out}/clang", "HIP_PATH": subprocess.run(
            [hip, "-R"], capture_output=True, text=True, check=False).stdout.strip()}
    if backend == "metal":
        if sys.platform != "darwin":
            raise BuildError("the Metal backend exists only on macOS (Apple Silicon): build it on the Mac itself")
        if subprocess.run(["xcrun", "-sdk", "macosx", "metal", "-v"], capture_output=True, check=False).returncode:
            raise BuildError("the Metal backend needs Xcode's command line tools: xcode-select --install")
        return {}
    raise BuildError(f"unknown llama.cpp backend {backend!r}")


def _sync(fresh: Path, kept: Path) -> None:
    """Make ``kept`` hold ``fresh``'s files, touching only those that differ (so ninja rebuilds only them)."""
    for path in fresh.rglob("*"):
        if not path.is_file():
            continue
        dest = kept / path.relative_to(fresh)
        if dest.is_file() and dest.stat().st_size == path.stat().st_size and dest.read_bytes() == path.read_bytes():
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest)
        os.utime(dest)  # newer than the objects built from the old file


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _fetch_sources(work: Path, say: Progress) -> Path:
    """The pinned sdist through pip (which honours the user's index settings), checked by hash."""
    say(f"fetching llama.cpp sources ({SOURCE_PACKAGE}=={SOURCE_VERSION} sdist, 77 MB)")
    req = work / "requirements.txt"
    req.write_text(f"{SOURCE_PACKAGE}=={SOURCE_VERSION} --hash=sha256:{SOURCE_SHA256}\n")
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--require-hashes",
          "-q", "-r", str(req), "-d", str(work)], "downloading the llama.cpp sources", say)
    sdists = list(work.glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        raise BuildError(f"pip downloaded no {SOURCE_PACKAGE} sdist into {work}")
    say("unpacking the sources")
    prefix = f"llama_cpp_python-{SOURCE_VERSION}/vendor/llama.cpp/"
    with tarfile.open(sdists[0]) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        tar.extractall(work / "src", members=members, filter="data")
    source = work / "src" / prefix
    _limit_cpu_variants(source)
    patch(source)
    return source


def patch(source: Path) -> None:
    """Apply ``SOURCE_PATCHES``; a patch that does not find what it changes fails the build."""
    for p in SOURCE_PATCHES:
        path = source / p.file
        text = path.read_text()
        if text.count(p.old) != len(p.new):
            raise BuildError(f"patching {p.file} ({p.why}): expected {len(p.new)} occurrences of the patched text, "
                             f"found {text.count(p.old)} (the pinned sources changed?)")
        for new in p.new:
            text = text.replace(p.old, new, 1)
        path.write_text(text)


def _limit_cpu_variants(source: Path) -> None:
    """Declare only the x86 CPU variants we ship: all sixteen would triple the portable build's time."""
    cmake = source / "ggml" / "src" / "CMakeLists.txt"
    kept = []
    for line in cmake.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith(VARIANT_CALL):
            name = stripped[len(VARIANT_CALL):].split()[0].rstrip(")")
            if name in _X86_NAMES and name not in X86_VARIANTS:
                continue
        kept.append(line)
    cmake.write_text("\n".join(kept) + "\n")


def _tool(name: str) -> str:
    """cmake or ninja: from this venv (pip packages) first, then PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise BuildError(f"{name} is needed to build llama-server: pip install cmake ninja")
    return found


def _configure(source: Path, build: Path, flags: tuple[str, ...], tree: str, say: Progress,
               env: dict[str, str]) -> None:
    say(f"configuring llama.cpp ({'portable, runtime CPU dispatch' if tree == 'cpu' else tree + ' backend'})")
    _run([_tool("cmake"), "-S", str(source), "-B", str(build), "-G", "Ninja",
          f"-DCMAKE_MAKE_PROGRAM={_tool('ninja')}", *flags], f"configuring llama.cpp for {tree}", say,
         quiet=True, env=env)


def _compile(build: Path, targets: list[str], tree: str, say: Progress, env: dict[str, str]) -> None:
    jobs = str(os.cpu_count() or 2)
    say(f"compiling {', '.join(targets)} with {jobs} jobs (once; then cached)")
    env = {**env, "NINJA_STATUS": "[%f/%t %es] "}
    _run([_tool("cmake"), "--build", str(build), "--target", *targets, "-j", jobs],
         f"compiling {', '.join(targets)}", say, env=env, every=25)


def _stage(part: Part, bin_dir: Path, stage: Path) -> Path:
    """The part's files, symlinks resolved, under ``rbee_llama_server/bin``."""
    out = stage / PACKAGE / "bin"
    out.mkdir(parents=True)
    files = part.files(bin_dir)
    if not files or not all(f.is_file() for f in files):
        raise BuildError(f"the build produced no {part.targets[0]} in {bin_dir}")
    for lib in files:
        # Under the name the loader asks for (its SONAME), once: wheels hold no symlinks. Backend modules
        # (libggml-cpu-*.so, found by name at start) keep the name ggml looks for.
        name = lib.name if lib.name == "llama-server" or _is_backend_module(lib) else (_soname(lib) or lib.name)
        if _is_backend_module(lib):
            name = lib.name.split(".so")[0] + ".so"
        shutil.copy2(lib, out / name)
    _run(["strip", "--strip-unneeded", *map(str, out.iterdir())], "stripping", lambda _m: None, quiet=True, check=False)
    if part.name == "server":
        (stage / PACKAGE / "__init__.py").write_text(
            f'"""llama.cpp\'s llama-server, built by rbee-fleet from {SOURCE_PACKAGE} {SOURCE_VERSION}\'s sources.\n\n'
            'Backend modules (CPU variants, GPU backends) are installed beside it by wheels of their own."""\n\n'
            "from pathlib import Path\n\n"
            "BIN_DIR = Path(__file__).parent / 'bin'\n"
            "SERVER = BIN_DIR / 'llama-server'\n"
            f"SOURCE = {f'{SOURCE_PACKAGE}=={SOURCE_VERSION}'!r}\n"
        )
    return stage


def _soname(lib: Path) -> str | None:
    try:
        out = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True, check=False).stdout
    except OSError:
        return None
    for line in out.splitlines():
        if "(SONAME)" in line and "[" in line:
            return line.split("[", 1)[1].rstrip("]").strip()
    return None


def _write_wheel(part: Part, stage: Path, wheel: Path, requires: tuple[str, ...] = ()) -> None:
    dist_info = f"{part.dist}-{SOURCE_VERSION}.dist-info"
    arch = machine_arch()
    what = "llama-server" if part.name == "server" else f"the {part.name} backend of llama-server"
    meta = {
        f"{dist_info}/METADATA": (
            "Metadata-Version: 2.1\n"
            f"Name: {part.dist.replace('_', '-')}\n"
            f"Version: {SOURCE_VERSION}\n"
            f"Summary: llama.cpp's {what} ({SOURCE_PACKAGE} {SOURCE_VERSION} sources), built by rbee-fleet\n"
            "License: MIT\n"
            + "".join(f"Requires-Dist: {r}\n" for r in requires)
        ),
        f"{dist_info}/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: rbee-fleet\nRoot-Is-Purelib: false\n"
            f"Tag: py3-none-linux_{arch}\n"
        ),
    }
    records = []
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(stage.rglob("*")):
            if not path.is_file():
                continue
            name = path.relative_to(stage).as_posix()
            data = path.read_bytes()
            info = zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            # A regular file's full mode: pip and installer keep the executable bit only with the file type.
            info.external_attr = (stat.S_IFREG | (0o755 if os.access(path, os.X_OK) else 0o644)) << 16
            zf.writestr(info, data)
            records.append(f"{name},{_record_hash(data)},{len(data)}")
        for name, text in meta.items():
            data = text.encode()
            zf.writestr(name, data)
            records.append(f"{name},{_record_hash(data)},{len(data)}")
        records.append(f"{dist_info}/RECORD,,")
        zf.writestr(f"{dist_info}/RECORD", "\n".join(records) + "\n")


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _run(cmd: list[str], what: str, say: Progress, *, env: dict[str, str] | None = None, quiet: bool = False,
         every: int = 0, check: bool = True) -> None:
    """Run a build step, passing a share of its lines to ``say``; on failure, raise with its last lines."""
    tail: list[str] = []
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                errors="replace")
    except OSError as exc:
        raise BuildError(f"{what}: cannot run {cmd[0]}: {exc.strerror}") from None
    assert proc.stdout is not None
    count = 0
    deadline = time.monotonic() + BUILD_TIMEOUT_S
    for line in proc.stdout:
        line = line.rstrip()
        if line.startswith("WARNING: Location"):  # pip's noise about unreachable find-links folders
            continue
        tail = (tail + [line])[-30:]
        count += 1
        if not quiet and (every == 0 or count % every == 0 or line.startswith("FAILED")):
            say(line[:200])
        if time.monotonic() > deadline:
            proc.kill()
            raise BuildError(f"{what}: still running after {BUILD_TIMEOUT_S} s")
    code = proc.wait()
    if code != 0 and check:
        raise BuildError(f"{what} failed (exit code {code}):\n  " + "\n  ".join(tail))


# -- installing into this environment ---------------------------------------------------------------


def _marker() -> Path:
    return Path(sys.prefix) / "rbee-llama-server.build"


def install(wheels: list[Path], parts: list[Part], cuda_archs: str = DEFAULT_CUDA_ARCHS) -> None:
    """Install (or replace) the wheels in this Python's environment, and note which builds they are."""
    _run([sys.executable, "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps", *map(str, wheels)],
         "installing llama-server", _stderr, quiet=True)
    requires = [r for p in parts if p.tree != "cpu" for r in gpu_backend(p.name, cuda_archs).requires]
    if requires:
        _run([sys.executable, "-m", "pip", "install", "-q", *requires], "installing the backends' runtime libraries",
             _stderr, quiet=True)
    installed = installed_parts()
    installed.update({p.name: part_id(p, cuda_archs=cuda_archs) for p in parts})
    _marker().write_text(json.dumps(installed, indent=1, sort_keys=True) + "\n")


def installed_parts() -> dict[str, str]:
    """The parts of llama-server installed in this environment, with their build ids."""
    try:
        import rbee_llama_server  # type: ignore[import-not-found]  # noqa: F401

        data = json.loads(_marker().read_text())
    except (ImportError, OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _stderr(message: str) -> None:
    print(f"llama-server: {message}", file=sys.stderr, flush=True)


_ARCHS = re.compile(r"^[0-9]{2,3}[a-z]?(-real|-virtual)?(;[0-9]{2,3}[a-z]?(-real|-virtual)?)*$")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rbee_fleet.deploy.llama_build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--install", action="store_true", help="install the build into this Python's environment")
    parser.add_argument("--portable", action="store_true",
                        help="every CPU variant (what deploys ship), not only this machine's own")
    parser.add_argument("--backend", action="append", default=[], choices=GPU_BACKENDS,
                        help="a GPU backend too (repeatable): vulkan, cuda (toolkit from PyPI), rocm or metal "
                             "(their toolkits must be installed)")
    parser.add_argument("--backend-only", action="store_true",
                        help="only the named backends (a host building its own ROCm or Metal backend beside the "
                             "llama-server it was shipped)")
    parser.add_argument("--cuda-archs", default=DEFAULT_CUDA_ARCHS,
                        help=f"CUDA compute capabilities, ';'-separated (default {DEFAULT_CUDA_ARCHS})")
    args = parser.parse_args(argv)
    if not _ARCHS.match(args.cuda_archs):
        parser.error(f"--cuda-archs {args.cuda_archs!r}: want numbers like 86 or 89;90-virtual")
    if args.backend_only and not args.backend:
        parser.error("--backend-only needs at least one --backend")
    base = [] if args.backend_only else portable_parts() if args.portable else native_parts()
    parts = base + [Part(b) for b in args.backend]
    try:
        if args.install:
            have = installed_parts()
            if all(have.get(p.name) == part_id(p, cuda_archs=args.cuda_archs) for p in parts):
                _stderr(f"{', '.join(p.name for p in parts)}: installed already")
                return 0
        wheels = ensure_wheels(parts, cuda_archs=args.cuda_archs)
        if args.install:
            install(wheels, parts, args.cuda_archs)
            _stderr(f"installed {', '.join(w.name for w in wheels)}")
        else:
            print("\n".join(map(str, wheels)))
    except BuildError as exc:
        print(f"llama-server: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
