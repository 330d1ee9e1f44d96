"""The proof's report: every check's result, the machine, versions and timings, as JSON and as text.

Standard library only. The report is rewritten after every check, so a run stopped from outside still
leaves what it found.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    seconds: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    started: float = field(default_factory=time.time)
    environment: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    finished: float | None = None

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def add(self, check: Check) -> Check:
        self.checks.append(check)
        return check

    def check(self, name: str) -> Check | None:
        return next((c for c in self.checks if c.name == name), None)

    def passed(self, name: str) -> bool:
        found = self.check(name)
        return found is not None and found.ok

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "started": _iso(self.started),
            "finished": _iso(self.finished) if self.finished else None,
            "seconds": round((self.finished or time.time()) - self.started, 1),
            "environment": self.environment,
            "versions": self.versions,
            "timings": self.timings,
            "checks": [asdict(c) for c in self.checks],
        }

    def to_text(self) -> str:
        passed = sum(c.ok for c in self.checks)
        state = "finished" if self.finished else "still running (or stopped from outside)"
        lines = [
            f"rbee-fleet GPU proof: {'PASS' if self.ok else 'FAIL'} ({passed} of {len(self.checks)} checks passed), "
            f"{state}, {round((self.finished or time.time()) - self.started, 1)} s, started {_iso(self.started)}",
            "",
            "environment:",
            *(f"  {k}: {v}" for k, v in self.environment.items()),
            "versions:",
            *(f"  {k}: {v}" for k, v in self.versions.items()),
            "timings:",
            *(f"  {k}: {v}" for k, v in self.timings.items()),
            "",
            "checks:",
        ]
        for c in self.checks:
            lines.append(f"  [{'pass' if c.ok else 'FAIL'}] {c.name} ({c.seconds:.1f} s): {c.detail}")
        return "\n".join(lines) + "\n"

    def write(self, out: Path) -> None:
        """report.json and report.txt in ``out``, each replaced whole (never half written)."""
        out.mkdir(parents=True, exist_ok=True)
        _write_atomic(out / "report.json", json.dumps(self.to_json(), indent=2, default=str) + "\n")
        _write_atomic(out / "report.txt", self.to_text())


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def tail(path: Path, limit: int) -> str:
    """The last ``limit`` bytes of a log (all of it when shorter), as text."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - limit))
            data = fh.read()
    except OSError as exc:
        return f"({path}: {exc.strerror})"
    prefix = f"(first {size - limit} bytes left out)\n" if size > limit else ""
    return prefix + data.decode("utf-8", errors="replace")
