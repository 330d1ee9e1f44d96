"""How to reach a host over SSH: its address, credentials and jump host (no connection is made here)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SSHTarget:
    """How to reach one host: its alias, SSH address and credentials, and an optional jump host."""

    alias: str
    host: str  # an address, a DNS name or a ~/.ssh/config alias
    port: int | None = None  # None: from ~/.ssh/config, else 22
    user: str | None = None  # None: from ~/.ssh/config, else the local user
    identity_file: str | None = None
    jump: SSHTarget | None = None
    connect_timeout_s: float = 10.0
    keepalive_interval_s: float = 15.0

    def describe(self) -> str:
        who = f"{self.user}@" if self.user else ""
        where = f"{who}{self.host}{f':{self.port}' if self.port else ''}"
        return f"{where} via {self.jump.describe()}" if self.jump else where
