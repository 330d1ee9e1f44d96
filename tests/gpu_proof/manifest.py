"""The kit's manifest: size and sha256 of every file. Standard library only (the proof reads it too)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def file_entries(kit: Path) -> list[dict[str, Any]]:
    """Every file of the kit but the manifest, with its size and sha256, in path order."""
    return [{"path": p.relative_to(kit).as_posix(), "size": p.stat().st_size, "sha256": sha256(p)}
            for p in sorted(kit.rglob("*")) if p.is_file() and p.name != MANIFEST]


def verify(kit: Path) -> list[str]:
    """What is wrong with a kit (missing, changed or unlisted files); empty when it matches its manifest."""
    try:
        manifest = json.loads((kit / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        return [f"{kit / MANIFEST}: {exc}"]
    listed = {f["path"]: f for f in manifest.get("files", [])}
    problems = []
    for entry in file_entries(kit):
        want = listed.pop(entry["path"], None)
        if want is None:
            problems.append(f"{entry['path']}: not in the manifest")
        elif (want["size"], want["sha256"]) != (entry["size"], entry["sha256"]):
            problems.append(f"{entry['path']}: differs from the manifest (size {entry['size']}, sha256 {entry['sha256'][:12]}…)")
    problems += [f"{path}: in the manifest but missing" for path in listed]
    return problems
