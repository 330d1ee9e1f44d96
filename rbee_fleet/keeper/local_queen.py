"""The local queen: a daemon started detached with a pidfile and stopped by signal, and the keeper's
``start_queen`` / ``stop_queen`` that bring it up (unless one answers already) and down.

The pidfile alone is never trusted: a pid is ours only if that process's command line is a queen of this
``RBEE_HOME``: ``python -m rbee_fleet.queen --home HOME`` as started, or ``queen-rbee --home HOME`` once the
queen has set its process title (which rewrites what ``/proc/PID/cmdline`` shows).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from rbee_fleet.common.errors import OperationFailed
from rbee_fleet.common.logs import rotate_if_large
from rbee_fleet.common.paths import Layout
from rbee_fleet.keeper.context import KeeperContext
from rbee_fleet.keeper.queen_client import QueenClient, QueenUnreachable

QUEEN_MODULE = "rbee_fleet.queen"
QUEEN_TITLE = "queen-rbee"


def is_queen_cmdline(cmdline: list[str], home: Path) -> bool:
    """Whether a process's command line (``psutil``'s list, before or after retitling) is a queen of ``home``."""
    words = " ".join(cmdline).split()  # a retitled process shows one string with spaces
    if not words:
        return False
    started = any(words[i:i + 2] == ["-m", QUEEN_MODULE] for i in range(len(words)))
    if not (started or words[0] == QUEEN_TITLE):
        return False
    return any(words[i:i + 2] == ["--home", str(home)] for i in range(len(words)))
QUEEN_START_TIMEOUT_S = 60.0


class QueenDaemon:
    def __init__(self, layout: Layout, inventory_path: str | None) -> None:
        self.layout = layout
        self.inventory_path = os.path.abspath(inventory_path) if inventory_path else None
        self.pidfile = layout.run / "queen.pid"
        self.logfile = layout.logs / "queen.log"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", QUEEN_MODULE, "--home", str(self.layout.home)]
        if self.inventory_path:
            cmd += ["--inventory", self.inventory_path]
        return cmd

    def running_pid(self) -> int | None:
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            cmdline = psutil.Process(pid).cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return None
        return pid if is_queen_cmdline(cmdline, self.layout.home) else None

    def start_detached(self) -> subprocess.Popen[bytes]:
        """Start the queen in its own session, detached from this terminal, logging to a file."""
        self.layout.ensure()
        rotate_if_large(self.logfile)
        with open(self.logfile, "ab") as log:
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting queen\n".encode())
            log.flush()
            proc = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, close_fds=True,
            )
        self.pidfile.write_text(f"{proc.pid}\n")
        return proc

    def start_foreground(self) -> subprocess.Popen[bytes]:
        """Start the queen attached to this terminal (its log on our stderr)."""
        self.layout.ensure()
        proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL)
        self.pidfile.write_text(f"{proc.pid}\n")
        return proc

    def stop(self, timeout: float = 30.0) -> bool:
        """SIGTERM the queen (it stops its workers), SIGKILL after ``timeout``; False if none ran."""
        pid = self.running_pid()
        if pid is None:
            self.pidfile.unlink(missing_ok=True)
            return False
        proc = psutil.Process(pid)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except psutil.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        self.pidfile.unlink(missing_ok=True)
        return True

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(Path(self.logfile).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def local_queen(ctx: KeeperContext) -> QueenDaemon:
    """The queen this keeper starts on this machine, for ``ctx``'s inventory and ``$RBEE_HOME``."""
    return QueenDaemon(ctx.layout, ctx.inventory_path)


async def start_queen(ctx: KeeperContext, client: QueenClient, *, foreground: bool = False) -> tuple[bool, Any]:
    """Start the local queen unless one answers already; return (started, process or None)."""
    if await client.healthy():
        return False, None
    daemon = local_queen(ctx)
    proc = daemon.start_foreground() if foreground else daemon.start_detached()
    try:
        await client.wait_healthy(QUEEN_START_TIMEOUT_S, alive=lambda: proc.poll() is None)
    except QueenUnreachable as exc:
        if proc.poll() is None:
            proc.terminate()
        tail = daemon.log_tail() if not foreground else ""
        raise OperationFailed(f"{exc}\n{tail}".rstrip()) from None
    client.set_credential(ctx.api_key)  # a first start creates the cluster token
    return True, proc


STOP_MARGIN_S = 30.0  # beyond the queen's drain timeout: its workers' own shutdown


async def requests_in_flight(client: QueenClient) -> int | None:
    """How many requests the local queen is answering now (None when it does not answer)."""
    try:
        return (await client.status()).queen.in_flight
    except Exception:  # noqa: BLE001 - a queen that is down or half up has nothing to wait for
        return None


async def stop_queen(ctx: KeeperContext, client: QueenClient) -> bool:
    """Stop the local queen this keeper started (it stops its workers); False if none was running.

    A queen that answers but was started elsewhere is left alone: ``OperationFailed`` says so.
    """
    daemon = local_queen(ctx)
    # The queen lets answers in flight finish for up to its drain timeout, then its hive stops the workers.
    patience = ctx.inventory.queen.drain_timeout_s + STOP_MARGIN_S
    stopped = await asyncio.to_thread(daemon.stop, patience)
    if not stopped and await client.healthy():
        raise OperationFailed(f"a queen answers at {ctx.queen_url} but was not started by this keeper "
                              f"(no pidfile in {daemon.pidfile.parent}); stop it where it runs")
    return stopped
