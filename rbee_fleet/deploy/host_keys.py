"""Host keys as the operator sees them, and where the trusted ones are kept.

Keys are checked against the user's ``~/.ssh/known_hosts`` plus the keeper's own ``$RBEE_HOME/known_hosts``
(the only file the keeper writes). Parsing and matching keys is the transport's job (asyncssh); this module
only names keys and reads and appends the files.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal


def known_hosts_pattern(host: str, port: int | None) -> str:
    """How known_hosts names ``host``: the bare name on port 22, else ``[host]:port``."""
    return host if port in (None, 22) else f"[{host}]:{port}"


@dataclass(frozen=True)
class HostKey:
    """The key a host presents, and whether the keeper trusts it (what the operator is shown)."""

    alias: str  # the inventory alias (or jump host) that presented it
    host: str  # the name known_hosts entries are matched on
    port: int | None  # None: 22
    key_type: str  # ssh-ed25519, …
    fingerprint: str  # SHA256:…
    state: Literal["known", "unknown", "changed"]
    expected: tuple[str, ...] = ()  # the recorded fingerprints, when the key changed
    public_key: str = field(default="", repr=False)  # the OpenSSH public key line, recorded when trusted

    @property
    def where(self) -> str:
        return known_hosts_pattern(self.host, self.port) if self.port not in (None, 22) else self.host


@dataclass
class HostKeyStore:
    """Known host keys: the user's files (read only) plus the keeper-owned file (appended to)."""

    keeper_file: Path
    user_files: tuple[Path, ...] = field(default_factory=lambda: (Path("~/.ssh/known_hosts").expanduser(),))
    on_record: Callable[[str, int | None, str], None] | None = None  # told of every key recorded (the audit log)

    def text(self) -> str:
        """Every known_hosts line of every file, the keeper's last (missing files are skipped)."""
        texts = []
        for path in (*self.user_files, self.keeper_file):
            with contextlib.suppress(OSError):
                texts.append(path.read_text(errors="replace"))
        return "\n".join(texts)

    def record(self, host: str, port: int | None, public_key: str) -> None:
        """Append ``public_key`` (an OpenSSH public key line) for ``host``; no check: see ``transport.trust``."""
        self.keeper_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.keeper_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with open(fd, "a", encoding="utf-8") as fh:
            fh.write(f"{known_hosts_pattern(host, port)} {public_key.strip()}\n")
        if self.on_record is not None:
            self.on_record(host, port, public_key)

    def names(self, host: str, port: int | None) -> bool:
        """Whether the keeper's own file has an entry for ``host`` (the keeper writes plain names, never hashed)."""
        pattern = known_hosts_pattern(host, port)
        with contextlib.suppress(OSError):
            for line in self.keeper_file.read_text(errors="replace").splitlines():
                fields = line.split()
                if fields and not line.lstrip().startswith("#") and pattern in fields[0].split(","):
                    return True
        return False

    def forget(self, host: str, port: int | None) -> int:
        """Remove every entry for ``host`` from the keeper's own file (rewritten atomically, mode 0600);
        how many lines went. The user's files are never touched."""
        pattern = known_hosts_pattern(host, port)
        try:
            lines = self.keeper_file.read_text(errors="replace").splitlines(keepends=True)
        except FileNotFoundError:
            return 0
        kept = [line for line in lines
                if not (line.split() and not line.lstrip().startswith("#") and pattern in line.split()[0].split(","))]
        removed = len(lines) - len(kept)
        if removed:
            tmp = self.keeper_file.with_name(f".{self.keeper_file.name}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with open(fd, "w", encoding="utf-8") as fh:
                fh.writelines(kept)
            os.replace(tmp, self.keeper_file)
        return removed

    def changed_key_advice(self, alias: str, host: str, port: int | None) -> str:
        """What to do about a changed key: where the old one is recorded and the command that forgets it."""
        if self.names(host, port):
            return (f"if the host was reinstalled, forget the old key with `rbee-keeper hive forget-key {alias}` "
                    f"(it is recorded in the keeper's own {self.keeper_file}), then trust the new one")
        user = ", ".join(str(p) for p in self.user_files)
        return (f"the old key is recorded in {user}, not in the keeper's own {self.keeper_file}: if the host was "
                f"reinstalled, remove it with `ssh-keygen -R {known_hosts_pattern(host, port)}`")
