"""What is shipped to hosts: built on the operator machine, cached, sent as one tarball.

rbee-fleet itself is always built from the operator's checkout, so every hive runs the keeper's code.

Both sources ship the portable ``llama-server`` build of this machine (``llama_build``: compiled once,
cached, every CPU variant, ggml picking the host's best at start) and the GPU backends the host gets
(Vulkan, CUDA with NVIDIA's runtime wheels), so every host runs the same engine without compiling
anything. ROCm and Metal backends are compiled on the host itself (``steps``: online installs only).

``offline``: a wheelhouse of every dependency for the host's Python and CPU architecture is
unpacked here, once, into a tree laid out like a venv (with ``installer``, which only unpacks wheels
and so can target another Python). The host makes an empty venv and untars into it, so it needs neither
pip nor ensurepip. The tree travels as two tarballs: the code gzipped, and the model weights plain (a
quantized GGUF does not compress, and inflating it cost each host more CPU than the rest of the venv).
Where this machine's Python is the host's, the bytecode of what the hive and its workers import at start
is compiled here once, instead of on every host.

``online``: only rbee-fleet's wheel, llama-server's and model packages travel; the host's pip fetches
the rest.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rbee_fleet import __version__
from rbee_fleet.common.paths import rbee_home
from rbee_fleet.deploy import llama_build
from rbee_fleet.deploy.errors import WheelhouseError

# Wheels for hosts with glibc 2.17 or newer (every current Linux distribution).
PLATFORMS = ("manylinux_2_28_{arch}", "manylinux_2_17_{arch}", "manylinux2014_{arch}", "linux_{arch}")
BUILD_TIMEOUT_S = 1800
KEEP_WHEELHOUSES = 6
# Files that travel uncompressed (model weights: quantized, they do not compress).
WEIGHT_SUFFIXES = (".gguf", ".safetensors")
# What the hive and its workers import at start: compiled to bytecode before shipping.
STARTUP_IMPORTS = "rbee_fleet.hive.main, rbee_fleet.worker.main, rbee_fleet.worker.engine_worker"
PRECOMPILE_TIMEOUT_S = 120


def cache_dir() -> Path:
    """Where built wheels and wheelhouses are kept: ``$RBEE_CACHE_DIR``, else ``$RBEE_HOME/cache``."""
    env = os.environ.get("RBEE_CACHE_DIR")
    return Path(env).expanduser() if env else rbee_home() / "cache"


def default_source_dir() -> Path:
    """The checkout the keeper runs from (rbee-fleet is shipped from source, never from an index)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file():
        raise WheelhouseError(f"rbee-fleet at {root} is not a source checkout (no pyproject.toml); "
                              "install the keeper from a checkout or pass --source DIR")
    return root


def _read_version(source: Path) -> str:
    ns: dict[str, str] = {}
    try:
        exec((source / "rbee_fleet" / "_version.py").read_text(), ns)  # noqa: S102 - our own one-line file
    except OSError as exc:
        raise WheelhouseError(f"{source}: not an rbee-fleet checkout ({exc.strerror})") from None
    except Exception as exc:  # noqa: BLE001 - a broken _version.py is the checkout's fault, not a crash of ours
        raise WheelhouseError(f"{source}: rbee_fleet/_version.py cannot be read: {type(exc).__name__}: {exc}") from None
    return ns.get("__version__", __version__)


def source_hash(source: Path) -> str:
    """A digest of everything that goes into the rbee-fleet wheel."""
    digest = hashlib.sha256()
    files = [source / "pyproject.toml", *sorted((source / "rbee_fleet").rglob("*"))]
    for path in files:
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            digest.update(str(path.relative_to(source)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


@dataclass(frozen=True)
class Release:
    """The rbee-fleet build hosts should run: version plus a digest of its source."""

    source: Path
    version: str
    digest: str

    @classmethod
    def from_source(cls, source: Path | None = None) -> Release:
        """The release built from ``source`` (default: the keeper's own checkout); ``WheelhouseError`` for a
        directory that is not an rbee-fleet checkout."""
        src = (source.expanduser() if source else default_source_dir()).resolve()
        if not src.is_dir():
            raise WheelhouseError(f"--source {source}: no such directory")
        missing = [name for name in ("pyproject.toml", "rbee_fleet/_version.py") if not (src / name).is_file()]
        if missing:
            raise WheelhouseError(f"--source {src}: not an rbee-fleet checkout (no {' and no '.join(missing)})")
        try:
            return cls(src, _read_version(src), source_hash(src))
        except OSError as exc:
            raise WheelhouseError(f"--source {src}: cannot read {exc.filename}: {exc.strerror}") from None

    @property
    def id(self) -> str:
        """The host's version directory name: ``<version>-<digest>``."""
        return f"{self.version}-{self.digest[:10]}"


@dataclass(frozen=True)
class WheelhouseSpec:
    install_source: str  # "offline" | "online"
    python_tag: str  # "3.11"
    arch: str  # "x86_64"
    extras: tuple[str, ...] = ("cpu",)
    packages: tuple[str, ...] = ()  # extra pinned packages, installed without dependencies (model packages)
    llama_backends: tuple[str, ...] = ()  # llama-server GPU backends built here and shipped (vulkan, cuda)
    cpu_variants: tuple[str, ...] = ()  # llama-server CPU variants the host gets; () for every one (portable)


@dataclass(frozen=True)
class Payload:
    """What a host receives: tarballs unpacked in this order (``.tgz`` gzipped, ``.tar`` plain)."""

    files: tuple[Path, ...]

    @property
    def size(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def _run(cmd: list[str], what: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env={**os.environ, **(env or {})},
                              timeout=BUILD_TIMEOUT_S, cwd=cwd)
    except subprocess.TimeoutExpired:
        raise WheelhouseError(f"{what}: no result after {BUILD_TIMEOUT_S} s") from None
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr or proc.stdout).splitlines() if not line.startswith("WARNING: Location")]
        raise WheelhouseError(f"{what} failed:\n" + "\n".join(lines[-15:]))


class WheelhouseBuilder:
    """Builds and caches wheelhouse tarballs; one build per spec even when many hosts ask at once."""

    def __init__(self, release: Release, cache: Path | None = None, python: str = sys.executable,
                 progress: Callable[[str], None] | None = None) -> None:
        self.release = release
        self.progress = progress  # where the first build of llama-server reports (stderr when None)
        self.cache = cache or cache_dir()
        self.python = python
        self._tasks: dict[WheelhouseSpec, asyncio.Task[Payload]] = {}

    async def payload(self, spec: WheelhouseSpec) -> Payload:
        task = self._tasks.get(spec)
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            # First ask, or the last build failed: a builder kept for long (the TUI's) tries again.
            task = asyncio.ensure_future(asyncio.to_thread(self.build, spec))
            self._tasks[spec] = task
        return await asyncio.shield(task)

    def key(self, spec: WheelhouseSpec) -> str:
        parts = [self.release.digest, spec.install_source, spec.python_tag, spec.arch, *spec.extras, "|", *spec.packages]
        if "cpu" in spec.extras:
            parts.append(llama_build.build_id(spec.arch, self.llama_parts(spec)))
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]

    def build(self, spec: WheelhouseSpec) -> Payload:
        """The payload for ``spec``: a venv tree (offline: code ``.venv.tgz`` and ``.weights.tar``) or a
        directory of wheels (online, ``.wheels.tar``)."""
        base = f"rbee-fleet-{self.release.id}-{spec.install_source}-py{spec.python_tag}-{spec.arch}-{self.key(spec)}"
        suffixes = ("venv.tgz", "weights.tar") if spec.install_source == "offline" else ("wheels.tar",)
        directory = self.cache / "wheelhouses"
        payload = Payload(tuple(directory / f"{base}.{suffix}" for suffix in suffixes))
        if all(f.is_file() for f in payload.files):
            return payload
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="wheelhouse-", dir=directory) as tmp:
            wheels = Path(tmp) / "wheels"
            wheels.mkdir()
            rbee = self.rbee_wheel()
            shutil.copy2(rbee, wheels)
            if "cpu" in spec.extras:
                for wheel in self.llama_wheels(spec):
                    shutil.copy2(wheel, wheels)
            if spec.install_source == "offline":
                self._dependencies(rbee, spec, wheels)
                self._backend_runtimes(spec, wheels)
            if spec.packages:
                _run([self.python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                      "--dest", str(wheels), *spec.packages], f"downloading {', '.join(spec.packages)}")
            if spec.install_source == "offline":
                root = Path(tmp) / "venv"
                install_tree(sorted(wheels.glob("*.whl")), root, spec.python_tag)
                site = root / "lib" / f"python{spec.python_tag}" / "site-packages"
                self._precompile(site, spec.python_tag)
                code, weights = payload.files
                _write_tar(code, root, lambda p: p.suffix not in WEIGHT_SUFFIXES, gzip=True)
                _write_tar(weights, root, lambda p: p.suffix in WEIGHT_SUFFIXES, gzip=False)
            else:
                _write_tar(payload.files[0], wheels, lambda p: True, gzip=False)
        self._prune(directory)
        return payload

    def _precompile(self, site: Path, python_tag: str) -> None:
        """Compile the bytecode of what the hive and its workers import at start into ``site``, when this
        machine runs the host's Python version; otherwise each host compiles it on its first start (about
        0.8 CPU-seconds on a small host). Best effort: a failure here only leaves that work to the host."""
        code = (f"import sys\nif '%d.%d' % sys.version_info[:2] == {python_tag!r}:\n"
                f"    sys.path.insert(0, {str(site)!r})\n    import {STARTUP_IMPORTS}\n")
        try:
            # -I: no user site and no PYTHON* variables (PYTHONDONTWRITEBYTECODE among them).
            subprocess.run([self.python, "-I", "-c", code], check=False, capture_output=True,
                           timeout=PRECOMPILE_TIMEOUT_S, cwd=site)
        except (OSError, subprocess.TimeoutExpired):
            pass

    @staticmethod
    def _prune(directory: Path) -> None:
        """Keep the newest ``KEEP_WHEELHOUSES`` payloads (all their files): every source change makes a new one."""
        groups: dict[str, list[Path]] = {}
        for path in directory.iterdir():
            if path.is_file() and path.name.endswith((".tgz", ".tar")):
                groups.setdefault(path.name.rsplit(".", 2)[0], []).append(path)
        newest = sorted(groups.values(), key=lambda files: max(f.stat().st_mtime for f in files), reverse=True)
        for files in newest[KEEP_WHEELHOUSES:]:
            for old in files:
                old.unlink(missing_ok=True)

    def rbee_wheel(self) -> Path:
        """rbee-fleet's own wheel, built from the source checkout (cached by source digest)."""
        target = self.cache / "rbee-fleet" / self.release.id
        found = sorted(target.glob("rbee_fleet-*.whl"))
        if found:
            return found[0]
        with tempfile.TemporaryDirectory(prefix="rbee-src-") as tmp:
            # Build from a copy so the checkout gets no build/ or egg-info droppings.
            src = Path(tmp) / "src"
            shutil.copytree(self.release.source, src, ignore=shutil.ignore_patterns(
                ".git", ".venv", ".cache", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "tests"))
            _run([self.python, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(Path(tmp) / "out"), str(src)],
                 f"building the rbee-fleet {self.release.version} wheel from {self.release.source}")
            built = sorted((Path(tmp) / "out").glob("rbee_fleet-*.whl"))
            if not built:
                raise WheelhouseError("building the rbee-fleet wheel produced no wheel")
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(built[0], target / (built[0].name + ".partial"))
            os.replace(target / (built[0].name + ".partial"), target / built[0].name)
        return target / built[0].name

    # -- llama-server, built once here, portable --------------------------------------------------

    @staticmethod
    def llama_parts(spec: WheelhouseSpec) -> list[llama_build.Part]:
        cpu = ([llama_build.Part("server"), *(llama_build.Part(f"cpu:{v}") for v in spec.cpu_variants)]
               if spec.cpu_variants else llama_build.portable_parts(spec.arch))
        return [*cpu, *(llama_build.Part(b) for b in spec.llama_backends)]

    def llama_wheels(self, spec: WheelhouseSpec) -> list[Path]:
        """The llama-server build every host runs, and the GPU backends this one gets (built on this machine
        the first time: minutes for the CPU variants and Vulkan, hours for CUDA's default architectures)."""
        if spec.arch != llama_build.machine_arch():
            raise WheelhouseError(f"llama-server is built on this machine for {llama_build.machine_arch()}; a host "
                                  f"of architecture {spec.arch} needs an operator machine of that architecture")
        try:
            return llama_build.ensure_wheels(self.llama_parts(spec), self.progress)
        except llama_build.BuildError as exc:
            raise WheelhouseError(str(exc)) from None

    def _backend_runtimes(self, spec: WheelhouseSpec, dest: Path) -> None:
        """The runtime libraries a GPU backend needs (CUDA's and cuBLAS's wheels), for an offline host."""
        requires = [r for b in spec.llama_backends for r in llama_build.gpu_backend(b).requires]
        if not requires:
            return
        platforms = [p.format(arch=spec.arch) for p in PLATFORMS]
        _run([self.python, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--dest", str(dest),
              *[arg for p in platforms for arg in ("--platform", p)], *requires],
             f"downloading {', '.join(requires)} for the {', '.join(spec.llama_backends)} backend")

    def _dependencies(self, rbee: Path, spec: WheelhouseSpec, dest: Path) -> None:
        major, minor = spec.python_tag.split(".")
        platforms = [p.format(arch=spec.arch) for p in PLATFORMS]
        extras = f"[{','.join(spec.extras)}]" if spec.extras else ""
        cmd = [self.python, "-m", "pip", "download", "-q", "--dest", str(dest), "--only-binary=:all:",
               "--python-version", f"{major}.{minor}", "--implementation", "cp",
               "--abi", f"cp{major}{minor}", "--abi", "abi3", "--abi", "none",
               *[arg for p in platforms for arg in ("--platform", p)]]
        _run(cmd + [f"{rbee}{extras}"], f"downloading dependencies for Python {spec.python_tag} on {spec.arch}")


def _write_tar(out: Path, root: Path, keep: Callable[[Path], bool], *, gzip: bool) -> None:
    """Tar the files of ``root`` that ``keep`` accepts (with every directory), written atomically."""
    partial = out.with_name(out.name + ".partial")

    def only(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        return info if info.isdir() or keep(Path(info.name)) else None

    with tarfile.open(partial, "w:gz", compresslevel=1) if gzip else tarfile.open(partial, "w") as tar:
        for entry in sorted(root.iterdir()):
            tar.add(entry, arcname=entry.name, filter=only)
    os.replace(partial, out)


def install_tree(wheels: list[Path], root: Path, python_tag: str) -> None:
    """Unpack ``wheels`` into ``root`` laid out as a venv for Python ``python_tag`` (no scripts, no bytecode).

    Console scripts are left out: their first line would name this machine's interpreter, and the
    hive and its workers are started as ``python -m``.
    """
    from installer import install
    from installer.destinations import SchemeDictionaryDestination
    from installer.sources import WheelFile

    site = root / "lib" / f"python{python_tag}" / "site-packages"
    scripts = root.parent / "scripts-left-out"
    scheme = {"purelib": str(site), "platlib": str(site), "scripts": str(scripts), "data": str(root),
              "headers": str(root / "include" / "site" / f"python{python_tag}")}
    for wheel in wheels:
        with WheelFile.open(wheel) as source:
            destination = SchemeDictionaryDestination(
                scheme_dict={**scheme, "headers": f"{scheme['headers']}/{source.distribution}"},
                interpreter="/usr/bin/python3", script_kind="posix", bytecode_optimization_levels=[],
            )
            install(source, destination, {"INSTALLER": b"rbee-keeper\n"})
