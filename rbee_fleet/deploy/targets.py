"""How to reach a host: over SSH (address, credentials, jump host) or directly, on this machine.

No connection is made here; ``connect.open_transport`` turns a target into a ``Transport``.
"""

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


@dataclass(frozen=True)
class LocalTarget:
    """A hive installed on the operator's own machine (``transport = "local"``): its commands run here, as
    the keeper's user, with no SSH in between."""

    alias: str
    connect_timeout_s: float = 10.0  # bounds a probe the same way as an SSH connect

    def describe(self) -> str:
        return "this machine (local transport)"


Target = SSHTarget | LocalTarget
