"""What deploy steps need from a host, whatever reaches it: commands, streamed output, file uploads.

``Transport`` is the interface ``steps`` is written against; ``ssh_transport`` implements it over
asyncssh, ``local_transport`` with local processes, and ``connect.open_transport`` picks one for a target.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

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
