"""What deploy steps need from a host, whatever reaches it: commands, streamed output, file uploads.

``Transport`` is the interface ``steps`` is written against; ``ssh_transport`` implements it over
asyncssh, ``local_transport`` with local processes. ``open_transport`` picks one for a target; the SSH one
(and asyncssh with it) is loaded only when a host is reached over SSH.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from rbee_fleet.deploy.host_keys import HostKeyStore
from rbee_fleet.deploy.targets import LocalTarget, Target

ProgressFn = Callable[[int, int], None]  # (bytes sent, total)


@dataclass(frozen=True)
class RunResult:
    exit_status: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_status == 0

    def tail(self, lines: int = 12) -> str:
        text = (self.stderr.strip() or self.stdout.strip()).splitlines()
        return "\n".join(text[-lines:])


def short_command(command: str) -> str:
    """A command's first line, cut to fit a one-line message."""
    first = command.strip().splitlines()[0] if command.strip() else command
    return first[:80] + ("…" if len(first) > 80 or "\n" in command.strip() else "")


class Transport(Protocol):
    """What deploy steps need from a host: commands, streamed output, file uploads."""

    host: str  # the inventory alias, for messages

    async def run(self, command: str, *, timeout: float | None = None, input: str | None = None) -> RunResult: ...

    async def stream(self, command: str, on_line: Callable[[str], None], *, timeout: float | None = None) -> int: ...

    async def put(self, local: Path, remote: str, progress: ProgressFn | None = None) -> None: ...

    async def close(self) -> None: ...


async def open_transport(target: Target, keys: HostKeyStore, *, accept_new: bool = False) -> Transport:
    """A transport to ``target``: local processes for this machine, else an SSH connection (host key checked)."""
    if isinstance(target, LocalTarget):
        from rbee_fleet.deploy.local_transport import LocalTransport

        return LocalTransport(target.alias)
    from rbee_fleet.deploy.ssh_transport import connect

    return await connect(target, keys, accept_new=accept_new)
