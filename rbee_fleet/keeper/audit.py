"""The audit log: one JSON line per operation that changed (or tried to change) the fleet.

``$RBEE_HOME/audit.jsonl`` (mode 0600) is only ever appended to, one ``write`` per entry on a file opened
with ``O_APPEND`` under an ``flock``, so entries of concurrent keepers never interleave. An entry says
when (UTC), who (local user@host), what, on which targets, and the result (ok / failed / cancelled, an
exit code where there is one, a one-line reason). Secrets never get in: every text is scrubbed of the
cluster token and the API keys the keeper knows, and no prompt or token is ever passed to it.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from rbee_fleet.keeper.deploy_lock import utc_now, who

AUDIT_FILE = "audit.jsonl"
REASON_CHARS = 300
RESULTS = ("ok", "failed", "cancelled")


@dataclass(frozen=True)
class AuditEntry:
    ts: str  # UTC, ISO 8601 ("2026-11-30T23:50:01Z")
    who: str  # user@host
    action: str  # deploy, hive upgrade, worker spawn, host-key accept, …
    targets: tuple[str, ...]  # hosts, workers, models
    result: str  # ok | failed | cancelled
    reason: str = ""
    exit_code: int | None = None
    inventory: str | None = None
    details: dict[str, str] = field(default_factory=dict)  # per host: "changed", "failed: why", …

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"ts": self.ts, "who": self.who, "action": self.action, "targets": list(self.targets),
                                "result": self.result, "reason": self.reason}
        if self.exit_code is not None:
            data["exit_code"] = self.exit_code
        if self.inventory:
            data["inventory"] = self.inventory
        if self.details:
            data["details"] = self.details
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AuditEntry:
        return cls(ts=str(data["ts"]), who=str(data.get("who", "")), action=str(data.get("action", "")),
                   targets=tuple(str(t) for t in data.get("targets", [])), result=str(data.get("result", "")),
                   reason=str(data.get("reason", "")), exit_code=data.get("exit_code"),
                   inventory=data.get("inventory"), details={str(k): str(v) for k, v in (data.get("details") or {}).items()})

    @property
    def when(self) -> datetime:
        return parse_time(self.ts)


def parse_time(text: str) -> datetime:
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``--since``: a duration back from now (``90s``, ``15m``, ``2h``, ``1d``, ``1h30m``) or a time
    (``2026-11-30``, ``2026-11-30T22:00``, with or without ``Z``; UTC unless it says otherwise)."""
    now = now or datetime.now(timezone.utc)
    text = text.strip()
    parts = _DURATION.findall(text)
    if parts and "".join(n + u for n, u in parts) == text.replace(" ", ""):
        return now - timedelta(seconds=sum(float(n) * _UNITS[u] for n, u in parts))
    try:
        return parse_time(text)
    except ValueError:
        raise ValueError(f"--since {text!r}: give a duration (30m, 2h, 1d) or a time (2026-11-30T22:00Z)") from None


def safe_source(source: str) -> str:
    """A download source as the audit log keeps it: a URL without credentials or query string."""
    parts = urlsplit(source)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return source
    host = parts.hostname or ""
    return urlunsplit((parts.scheme, host + (f":{parts.port}" if parts.port else ""), parts.path, "", ""))


class AuditLog:
    """The keeper's audit log at ``path``; ``secrets`` are scrubbed from every text written."""

    def __init__(self, path: Path, secrets: Iterable[str | None] = (), inventory: str | None = None) -> None:
        self.path = path
        self.inventory = inventory
        self._secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def record(self, action: str, targets: Iterable[str], result: str, reason: str = "", *,
               exit_code: int | None = None, details: dict[str, str] | None = None) -> AuditEntry:
        """Append one entry; never raises for a full disk or a read-only home (the operation is done)."""
        if result not in RESULTS:
            raise ValueError(f"audit result must be one of {RESULTS}, not {result!r}")
        first_line = self.scrub(reason).strip().splitlines()[0] if reason.strip() else ""
        entry = AuditEntry(
            ts=utc_now(), who=who(), action=action, targets=tuple(self.scrub(t) for t in targets), result=result,
            reason=first_line[:REASON_CHARS], exit_code=exit_code, inventory=self.inventory,
            details={k: self.scrub(v)[:REASON_CHARS] for k, v in (details or {}).items()},
        )
        line = (json.dumps(entry.to_json(), ensure_ascii=False) + "\n").encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                os.write(fd, line)
            finally:
                os.close(fd)
        except OSError:
            pass
        return entry

    def read(self, since: datetime | None = None, limit: int | None = None) -> list[AuditEntry]:
        """Entries, oldest first (only those at or after ``since``; the last ``limit``); bad lines are skipped."""
        try:
            lines = self.path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []
        entries = []
        for line in lines:
            try:
                entry = AuditEntry.from_json(json.loads(line))
                if since is None or entry.when >= since:
                    entries.append(entry)
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
        return entries[-limit:] if limit else entries
