"""The ``Transport`` of a hive on the operator's own machine: the deploy steps' commands as local processes.

A hive declared with ``transport = "local"`` is installed, started, upgraded, rolled back and removed by
the very steps a remote host gets, only without SSH. Each command runs under ``/bin/sh -c`` in its own
session (a timeout kills the whole group, never the hive the command started with ``setsid``), from the
user's home, with the environment an SSH login would give rather than the keeper's own: no virtualenv,
``PYTHON*`` or ``RBEE_*`` variable of the operator's shell leaks into the hive.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable
from pathlib import Path

from rbee_fleet.deploy.errors import CommandTimeout, ConnectFailed
from rbee_fleet.deploy.transport import ProgressFn, RunResult, short_command

SHELL = "/bin/sh"
CHUNK = 8 * 2**20  # bytes copied per step of an upload (progress is reported between steps)
# What a login session would carry over; everything else of the keeper's environment stays behind.
KEPT = ("HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TMPDIR", "XDG_RUNTIME_DIR",
        "DBUS_SESSION_BUS_ADDRESS")
LOGIN_PATH = "/usr/local/bin:/usr/bin:/bin"


def login_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """The keeper's environment reduced to what a login on this machine would have.

    ``PATH`` keeps the keeper's entries except its virtualenv's (so ``python3`` is the system's, as over
    SSH); the locale's ``LC_*`` variables stay.
    """
    env = dict(os.environ if env is None else env)
    kept = {k: v for k, v in env.items() if k in KEPT or k.startswith("LC_")}
    venv = env.get("VIRTUAL_ENV")
    path = [p for p in env.get("PATH", LOGIN_PATH).split(os.pathsep)
            if p and not (venv and Path(p) == Path(venv) / "bin")]
    kept["PATH"] = os.pathsep.join(path) or LOGIN_PATH
    kept.setdefault("HOME", str(Path.home()))
    return kept


class LocalTransport:
    """Runs the deploy steps' commands on this machine (see the module's docstring)."""

    def __init__(self, alias: str, env: dict[str, str] | None = None) -> None:
        self.host = alias
        self._env = login_environment(env)

    async def _spawn(self, command: str, *, stdin: int, merge: bool) -> asyncio.subprocess.Process:
        try:
            return await asyncio.create_subprocess_exec(
                SHELL, "-c", command, stdin=stdin, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT if merge else asyncio.subprocess.PIPE,
                env=self._env, cwd=self._env["HOME"], start_new_session=True)
        except OSError as exc:
            raise ConnectFailed(self.host, f"cannot run {SHELL}: {exc.strerror or exc}") from None

    async def run(self, command: str, *, timeout: float | None = None, input: str | None = None) -> RunResult:
        proc = await self._spawn(command, stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
                                 merge=False)
        try:
            out, err = await asyncio.wait_for(proc.communicate(input.encode() if input is not None else None), timeout)
        except asyncio.TimeoutError:
            await _kill(proc)
            raise CommandTimeout(self.host, f"no answer within {timeout:.0f} s to: {short_command(command)}") from None
        except BaseException:
            await _kill(proc)
            raise
        return RunResult(_status(proc.returncode), out.decode(errors="replace"), err.decode(errors="replace"))

    async def stream(self, command: str, on_line: Callable[[str], None], *, timeout: float | None = None) -> int:
        """Run ``command``, handing each line of its output (stdout and stderr) to ``on_line``."""
        proc = await self._spawn(command, stdin=asyncio.subprocess.DEVNULL, merge=True)

        async def pump() -> int:
            assert proc.stdout is not None
            async for line in proc.stdout:
                on_line(line.decode(errors="replace").rstrip("\n"))
            return _status(await proc.wait())

        try:
            return await asyncio.wait_for(pump(), timeout)
        except asyncio.TimeoutError:
            await _kill(proc)
            raise CommandTimeout(self.host, f"no end within {timeout:.0f} s to: {short_command(command)}") from None
        except BaseException:
            await _kill(proc)
            raise

    async def put(self, local: Path, remote: str, progress: ProgressFn | None = None) -> None:
        """Copy ``local`` to ``remote`` (an absolute path here), ``progress`` told between chunks."""
        total = local.stat().st_size
        sent = 0
        try:
            with local.open("rb") as src, open(remote, "wb") as dst:
                while chunk := await asyncio.to_thread(src.read, CHUNK):
                    await asyncio.to_thread(dst.write, chunk)
                    sent += len(chunk)
                    if progress is not None:
                        progress(sent, total)
        except OSError as exc:
            raise ConnectFailed(self.host, f"copying {local.name} to {remote} failed: {exc.strerror or exc}") from None

    async def close(self) -> None:
        """Nothing is held open between commands."""


async def _kill(proc: asyncio.subprocess.Process) -> None:
    """Kill the command's whole session (what it started in the background with it), then reap it."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        await asyncio.shield(proc.wait())


def _status(code: int | None) -> int:
    """The exit status as SSH reports it: a command killed by a signal is 128 + the signal."""
    if code is None:
        return 255
    return 128 - code if code < 0 else code
