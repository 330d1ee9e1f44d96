"""The fleet lock: one operation that changes the fleet of an inventory at a time, on the queen's machine.

The lock is a JSON file under ``$RBEE_HOME/locks/`` (one per inventory, mode 0600) naming its holder:
local user and host, pid, since when, which operation, which inventory. It is created atomically (written
to a temporary file, then linked into place, which fails when a holder exists); the check and the takeover
of a stale lock run under an ``flock`` of a guard file, so two keepers never both take it. A holder whose
pid is gone from this machine is stale and is taken over with a warning; one on another host is never
judged stale (its pid means nothing here): ``rbee-keeper lock release --force`` removes it.

Within one keeper process (the TUI runs several host operations at once) the lock is shared: the first
operation takes it, the last one to end releases it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import getpass
import hashlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from rbee_fleet.common.errors import OperationFailed

POLL_S = 0.5  # how often a waiting keeper looks at the lock again


def who() -> str:
    """The local user and host: ``alice@box``."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class LockHolder:
    """Who holds the fleet lock, and for what."""

    who: str  # user@host
    host: str  # the host part of ``who``: a pid is judged only on this machine
    pid: int
    since: str  # UTC, ISO 8601
    operation: str  # "deploy h1,h2", "hive stop h2", …
    inventory: str

    def describe(self) -> str:
        return f"{self.who} (pid {self.pid}) since {self.since}: {self.operation}"

    def alive(self) -> bool | None:
        """Whether the holder's process still runs; None when it runs on another host (unknowable here)."""
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # someone else's live process
        return True


class FleetLocked(OperationFailed):
    """Another operation holds the fleet lock."""

    def __init__(self, holder: LockHolder, inventory: str, waited_s: float = 0.0) -> None:
        waited = f" (waited {waited_s:.0f} s)" if waited_s else ""
        super().__init__(
            f"the fleet of {inventory} is locked by {holder.describe()}{waited}; wait for it to end, pass "
            "--wait-lock SECONDS, or run `rbee-keeper lock release --force` if that operation is gone")
        self.holder = holder


def lock_key(inventory: str) -> str:
    """The lock file's name for an inventory (its absolute path, or the built-in one)."""
    return "fleet-" + hashlib.sha256(inventory.encode()).hexdigest()[:16] + ".lock"


def inventory_name(path: str | None) -> str:
    return os.path.abspath(path) if path else "<built-in inventory>"


class FleetLock:
    """The fleet lock of one inventory in one keeper ``home``."""

    # Per process: lock file -> how many operations of this process hold it.
    _held: dict[Path, int] = {}  # noqa: RUF012 - deliberately shared by every instance of this process

    def __init__(self, home: Path, inventory_path: str | None, warn: Callable[[str], None] | None = None) -> None:
        self.inventory = inventory_name(inventory_path)
        self.directory = home / "locks"
        self.path = self.directory / lock_key(self.inventory)
        self.warn = warn or (lambda message: None)

    # -- reading -----------------------------------------------------------------------------------

    def holder(self) -> LockHolder | None:
        """Who holds the lock now (None: nobody; a file that cannot be read counts as nobody)."""
        try:
            data = json.loads(self.path.read_text())
            return LockHolder(**{k: data[k] for k in LockHolder.__dataclass_fields__})
        except (OSError, ValueError, KeyError, TypeError):
            return None

    # -- taking and giving back ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.directory / ".guard", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def try_acquire(self, operation: str) -> LockHolder | None:
        """Take the lock for ``operation``; return the live holder instead when someone else has it."""
        with self._guard():
            if self._held.get(self.path):
                self._held[self.path] += 1
                return None
            current = self.holder()
            if current is not None:
                if current.pid == os.getpid() and current.host == socket.gethostname():
                    pass  # our own, left by an operation of this process that did not release it: take it again
                elif current.alive() is False:
                    self.warn(f"taking over a stale fleet lock: {current.describe()} (that process is gone)")
                else:
                    return current
            elif self.path.exists():
                self.warn(f"replacing an unreadable fleet lock file {self.path}")
            self._write(operation)
            self._held[self.path] = 1
            return None

    def _write(self, operation: str) -> None:
        mine = LockHolder(who=who(), host=socket.gethostname(), pid=os.getpid(), since=utc_now(),
                          operation=operation, inventory=self.inventory)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        try:
            os.write(fd, (json.dumps(asdict(mine)) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)  # under the guard: nobody else reads or writes it meanwhile

    async def acquire(self, operation: str, wait_s: float = 0.0) -> None:
        """Take the lock, waiting up to ``wait_s`` for a live holder to finish; ``FleetLocked`` otherwise."""
        started = time.monotonic()
        while True:
            holder = self.try_acquire(operation)
            if holder is None:
                return
            waited = time.monotonic() - started
            if waited >= wait_s:
                raise FleetLocked(holder, self.inventory, waited if wait_s > 0 else 0.0)
            await asyncio.sleep(min(POLL_S, wait_s - waited))

    def release(self) -> None:
        """Give back one hold of this process; the file goes when the last one ends."""
        with self._guard():
            count = self._held.get(self.path, 0) - 1
            if count > 0:
                self._held[self.path] = count
                return
            self._held.pop(self.path, None)
            current = self.holder()
            if current is not None and current.pid == os.getpid() and current.host == socket.gethostname():
                self.path.unlink(missing_ok=True)

    def force_release(self, force: bool = False) -> LockHolder | None:
        """``lock release``: remove the lock file; a live holder (or one on another host) only with ``force``.
        Returns the holder removed (None: there was none)."""
        with self._guard():
            current = self.holder()
            if current is None:
                existed = self.path.exists()
                self.path.unlink(missing_ok=True)
                if existed:
                    self.warn(f"removed an unreadable lock file {self.path}")
                return None
            if current.alive() is not False and not force:
                where = "runs" if current.alive() else "may run (on another host)"
                raise OperationFailed(f"the fleet lock is held by {current.describe()}, which {where}; "
                                      "pass --force to remove it anyway")
            self.path.unlink(missing_ok=True)
            self._held.pop(self.path, None)
            return current
