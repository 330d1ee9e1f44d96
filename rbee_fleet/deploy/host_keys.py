"""Host keys as the operator sees them, and where the trusted ones are kept.

Keys are checked against the user's ``~/.ssh/known_hosts`` plus the keeper's own ``$RBEE_HOME/known_hosts``
(the only file the keeper writes). Parsing and matching keys is the transport's job (asyncssh); this module
only names keys and reads and appends the files.
"""

from __future__ import annotations

import contextlib
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
        with open(self.keeper_file, "a", encoding="utf-8") as fh:
            fh.write(f"{known_hosts_pattern(host, port)} {public_key.strip()}\n")
