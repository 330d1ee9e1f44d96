"""llama.cpp's own server, built once per machine from pinned sources and kept as a wheel.

CPU workers run ``llama-server`` (continuous batching and the whole OpenAI surface, in C++). It is
built here from the llama.cpp sources that a pinned ``llama-cpp-python`` sdist vendors (fetched by pip,
checked against its sha256), portable: no ``-march=native``; ggml loads at start the CPU backend
variant that the machine's CPU supports best (``GGML_BACKEND_DL``), and uses its own thread pool rather
than OpenMP, so a minimal host needs no libgomp. Only the targets ``llama-server`` needs are built.

The build is packed as a wheel (``rbee-llama-server``: the binary and its shared libraries under
``rbee_llama_server/bin``) and cached by source and flags, so one build serves this machine's venv and
every host the keeper deploys to (the wheel travels in their wheelhouse). ``python -m
rbee_fleet.deploy.llama_build --install`` builds it when missing and installs it into the running venv.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

# The pinned sources: llama.cpp as vendored by this llama-cpp-python release.
SOURCE_PACKAGE = "llama-cpp-python"
SOURCE_VERSION = "0.3.36"
SOURCE_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
DIST_NAME = "rbee_llama_server"
# CPU variants built for x86-64 (ggml picks the best one the CPU supports at start). The baseline runs
# anywhere; the others cover AVX, AVX2 (most CPUs since 2013), AVX-512 and AVX-VNNI machines.
X86_VARIANTS = ("x64", "sandybridge", "haswell", "skylakex", "icelake", "alderlake")
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DGGML_NATIVE=OFF",
    "-DGGML_BACKEND_DL=ON",
    "-DGGML_CPU_ALL_VARIANTS=ON",
    "-DGGML_OPENMP=OFF",
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
BUILD_TIMEOUT_S = 3600
BUILD_REVISION = 3  # bump when what is built or packed changes in a way the flags above do not show
# Changes made to the pinned sources before building: (file, text, replacement, count). Each must apply.
# tool_choice "required" lets the model write free text before its tool call in this llama.cpp, so a model
# that never starts a call answers in prose: OpenAI's "required" means the answer is tool calls, and the
# grammar is made to say so (no text before the first call).
SOURCE_PATCHES = (
    ("common/chat-auto-parser-generator.cpp",
     "return ctx.reasoning_parser + p.optional(p.content(content_before_tools)) + tool_calls + p.end();",
     "return ctx.reasoning_parser + (REQUIRED_FLAG ? p.eps() : p.optional(p.content(content_before_tools)))"
     " + tool_calls + p.end();",
     ("require_calls", "require_tools")),
    ("common/chat-auto-parser-generator.cpp",
     "return ctx.reasoning_parser + p.optional(p.content(p.until(tool_start))) + tools_parser + p.end();",
     "return ctx.reasoning_parser + (REQUIRED_FLAG ? p.eps() : p.optional(p.content(p.until(tool_start))))"
     " + tools_parser + p.end();",
     ("inputs.tool_choice == COMMON_CHAT_TOOL_CHOICE_REQUIRED",)),
)
VARIANT_CALL = "ggml_add_cpu_backend_variant("

Progress = Callable[[str], None]


class BuildError(RuntimeError):
    """llama-server could not be fetched or built; the message says which step and why."""


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
    return platform.machine().lower() or "unknown"


def build_id(arch: str | None = None) -> str:
    """What the build depends on: sources, flags, variants, this builder."""
    arch = arch or machine_arch()
    digest = hashlib.sha256()
    for part in (SOURCE_SHA256, arch, *CMAKE_FLAGS, *X86_VARIANTS, str(BUILD_REVISION)):
        digest.update(part.encode() + b"\0")
    return f"{SOURCE_VERSION}-{arch}-{digest.hexdigest()[:10]}"


def wheel_name(arch: str | None = None) -> str:
    arch = arch or machine_arch()
    return f"{DIST_NAME}-{SOURCE_VERSION}-py3-none-linux_{arch}.whl"


def cached_wheel(arch: str | None = None) -> Path | None:
    """The built wheel for ``arch`` if this machine has built it, else None."""
    path = cache_root() / "llama-server" / build_id(arch) / wheel_name(arch)
    return path if path.is_file() else None


def ensure_wheel(progress: Progress | None = None) -> Path:
    """The wheel for this machine's architecture, built first when missing (minutes, once)."""
    say = progress or _stderr
    target = cache_root() / "llama-server" / build_id()
    wheel = target / wheel_name()
    if wheel.is_file():
        return wheel
    target.mkdir(parents=True, exist_ok=True)
    with _locked(target / ".lock"):
        if wheel.is_file():  # another process built it while we waited
            return wheel
        started = time.monotonic()
        # The build tree is kept per sources and flags: a new patch or packing recompiles what changed only.
        tree = cache_root() / "llama-server" / f"tree-{_tree_id()}"
        tree.mkdir(parents=True, exist_ok=True)
        with _locked(tree / ".lock"), tempfile.TemporaryDirectory(prefix="llama-build-", dir=target) as tmp:
            work = Path(tmp)
            source = tree / "src"
            _sync(_fetch_sources(work, say), source)
            build = tree / "build"
            if not (build / "build.ninja").is_file():
                _configure(source, build, say)
            _compile(build, say)
            staged = _stage(build, work / "stage")
            _write_wheel(staged, work / wheel.name)
            os.replace(work / wheel.name, wheel)
        say(f"llama-server built in {time.monotonic() - started:.0f} s: {wheel}")
    return wheel


def _tree_id() -> str:
    digest = hashlib.sha256()
    for part in (SOURCE_SHA256, machine_arch(), *CMAKE_FLAGS, *X86_VARIANTS):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:10]


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
    _patch(source)
    return source


def _patch(source: Path) -> None:
    """Apply ``SOURCE_PATCHES``: each occurrence gets its own flag name, in order; a miss fails the build."""
    for rel, old, new, flags in SOURCE_PATCHES:
        path = source / rel
        text = path.read_text()
        if text.count(old) != len(flags):
            raise BuildError(f"patching {rel}: expected {len(flags)} occurrences of the patched line, "
                             f"found {text.count(old)} (the pinned sources changed?)")
        for flag in flags:
            text = text.replace(old, new.replace("REQUIRED_FLAG", flag), 1)
        path.write_text(text)


def _limit_cpu_variants(source: Path) -> None:
    """Keep only the x86 CPU variants we ship: all sixteen would triple the build time."""
    cmake = source / "ggml" / "src" / "CMakeLists.txt"
    kept = []
    for line in cmake.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith(VARIANT_CALL):
            name = stripped[len(VARIANT_CALL):].split()[0].rstrip(")")
            if _is_x86_variant(name) and name not in X86_VARIANTS:
                continue
        kept.append(line)
    cmake.write_text("\n".join(kept) + "\n")


def _is_x86_variant(name: str) -> bool:
    return name in {"x64", "sse42", "sandybridge", "ivybridge", "piledriver", "haswell", "skylakex",
                    "cannonlake", "cascadelake", "icelake", "cooperlake", "zen4", "alderlake", "sapphirerapids"}


def _tool(name: str) -> str:
    """cmake or ninja: from this venv (pip packages) first, then PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise BuildError(f"{name} is needed to build llama-server: pip install cmake ninja")
    return found


def _configure(source: Path, build: Path, say: Progress) -> None:
    say("configuring llama.cpp (portable, runtime CPU dispatch)")
    _run([_tool("cmake"), "-S", str(source), "-B", str(build), "-G", "Ninja",
          f"-DCMAKE_MAKE_PROGRAM={_tool('ninja')}", *CMAKE_FLAGS], "configuring llama.cpp", say, quiet=True)


def _compile(build: Path, say: Progress) -> None:
    jobs = str(os.cpu_count() or 2)
    say(f"compiling llama-server with {jobs} jobs (about 15 minutes on 2 cores, once)")
    env = {**os.environ, "NINJA_STATUS": "[%f/%t %es] "}
    _run([_tool("cmake"), "--build", str(build), "--target", "llama-server", "-j", jobs],
         "compiling llama-server", say, env=env, every=25)


def _stage(build: Path, stage: Path) -> Path:
    """The binary and the shared libraries it loads (backend variants included), symlinks resolved."""
    bin_dir = build / "bin"
    out = stage / DIST_NAME / "bin"
    out.mkdir(parents=True)
    server = bin_dir / "llama-server"
    if not server.is_file():
        raise BuildError(f"the build produced no {server}")
    shutil.copy2(server, out / "llama-server")
    for lib in sorted(bin_dir.glob("*.so*")):
        if lib.is_symlink():
            continue
        # Under the name the loader asks for (its SONAME), once: wheels hold no symlinks. Backend modules
        # (libggml-cpu-*.so, found by name at start) have no SONAME and keep theirs.
        shutil.copy2(lib, out / (_soname(lib) or lib.name))
    _run(["strip", "--strip-unneeded", *map(str, out.iterdir())], "stripping", lambda _m: None, quiet=True, check=False)
    (stage / DIST_NAME / "__init__.py").write_text(
        f'"""llama.cpp\'s llama-server, built by rbee-fleet from {SOURCE_PACKAGE} {SOURCE_VERSION}\'s sources."""\n\n'
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


def _write_wheel(stage: Path, wheel: Path) -> None:
    dist_info = f"{DIST_NAME}-{SOURCE_VERSION}.dist-info"
    arch = machine_arch()
    meta = {
        f"{dist_info}/METADATA": (
            "Metadata-Version: 2.1\n"
            f"Name: {DIST_NAME.replace('_', '-')}\n"
            f"Version: {SOURCE_VERSION}\n"
            f"Summary: llama.cpp's llama-server ({SOURCE_PACKAGE} {SOURCE_VERSION} sources), built by rbee-fleet\n"
            "License: MIT\n"
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


def _marker() -> Path:
    return Path(sys.prefix) / "rbee-llama-server.build"


def install(wheel: Path) -> None:
    """Install (or replace) the wheel in this Python's environment, and note which build it is."""
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(wheel)],
         "installing llama-server", _stderr, quiet=True)
    _marker().write_text(build_id() + "\n")


def installed_build() -> str | None:
    """The build id of the llama-server installed in this environment, if any."""
    try:
        import rbee_llama_server  # type: ignore[import-not-found]  # noqa: F401
        return _marker().read_text().strip()
    except (ImportError, OSError):
        return None


def _stderr(message: str) -> None:
    print(f"llama-server: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rbee_fleet.deploy.llama_build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--install", action="store_true", help="install the build into this Python's environment")
    args = parser.parse_args(argv)
    try:
        if args.install and installed_build() == build_id():
            _stderr(f"build {build_id()} is installed already")
            return 0
        wheel = ensure_wheel()
        if args.install:
            install(wheel)
            _stderr(f"installed {wheel.name} ({build_id()})")
        else:
            print(wheel)
    except BuildError as exc:
        print(f"llama-server: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
