"""Reaching hosts over SSH: the ``Transport`` on asyncssh, and host-key checks.

This is the only module that imports asyncssh; ``connect.open_transport`` loads it when a host is
first reached over SSH, so keeper commands that never do start without it. One connection per host is
opened and reused for a whole run. Host keys are always checked, against the user's ``~/.ssh/known_hosts`` plus the keeper's
own ``$RBEE_HOME/known_hosts``; an unknown key is trusted only when the caller asks for
trust-on-first-use (it is then recorded in the keeper's file) or when the operator accepts the key
``scan_host_key`` showed (``trust``), and a changed key is always refused, with both
fingerprints in the message.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import asyncssh

from rbee_fleet.deploy.errors import (
    AuthFailed,
    CommandTimeout,
    ConnectFailed,
    ConnectRefused,
    ConnectTimeout,
    DeployError,
    HostKeyChanged,
    HostKeyUnknown,
)
from rbee_fleet.deploy.host_keys import HostKey, HostKeyStore
from rbee_fleet.deploy.targets import SSHTarget
from rbee_fleet.deploy.transport import ProgressFn, RunResult, short_command

# The key recorded on first use: the strongest kind the host offers.
PREFERRED_HOST_KEY_ALGS = ["ssh-ed25519", "ecdsa-sha2-nistp256", "rsa-sha2-512", "rsa-sha2-256"]


# -- host keys ---------------------------------------------------------------------------------------


def fingerprint(key: Any) -> str:
    return str(key.get_fingerprint("sha256"))


def _host_key(alias: str, host: str, port: int | None, key: Any, state: Literal["known", "unknown", "changed"],
              expected: tuple[str, ...] = ()) -> HostKey:
    return HostKey(alias, host, port, key.get_algorithm(), fingerprint(key), state, expected,
                   key.export_public_key("openssh").decode().strip())


def known_hosts(keys: HostKeyStore) -> Any:
    """The store's keys, parsed for matching."""
    return asyncssh.import_known_hosts(keys.text())


def trust(keys: HostKeyStore, key: HostKey) -> bool:
    """Record a key the operator accepted after seeing its fingerprint; False if it was known already.

    A key that would replace a recorded one is refused (``HostKeyChanged``, both fingerprints), whatever
    the caller says: the operator removes the old entry by hand when a host was reinstalled.
    """
    presented = asyncssh.import_public_key(key.public_key)
    if fingerprint(presented) != key.fingerprint:
        raise ValueError("the public key does not match the fingerprint shown")
    recorded = list(known_hosts(keys).match(key.host, key.host, key.port)[0])
    if presented in recorded:
        return False
    if recorded:
        expected = ", ".join(sorted({fingerprint(k) for k in recorded}))
        raise HostKeyChanged(key.alias, f"host key changed: expected {expected}, got {key.fingerprint}; refused: "
                                        + keys.changed_key_advice(key.alias, key.host, key.port))
    keys.record(key.host, key.port, key.public_key)
    return True


class _KeyCheck:
    """The known_hosts callable given to asyncssh; remembers what it matched, to explain a refusal.

    ``client()`` makes the connection's client object, which keeps the key the host presented: the
    untrusted one when it is refused, the verified one once authentication begins.
    """

    def __init__(self, known: Any) -> None:
        self.known = known
        self.host = ""
        self.port: int | None = None
        self.expected: list[Any] = []
        self.presented: Any = None
        self.verified: Any = None

    def __call__(self, host: str, addr: str, port: int | None) -> Any:
        self.host, self.port = host, port
        result = self.known.match(host, addr, port)
        self.expected = list(result[0])
        return result

    def client(self) -> asyncssh.SSHClient:
        check = self

        class _Client(asyncssh.SSHClient):
            def connection_made(self, conn: Any) -> None:
                self._conn = conn

            def validate_host_public_key(self, host: str, addr: str, port: int, key: Any) -> bool:
                check.presented = key
                return False

            def begin_auth(self, username: str) -> None:
                check.verified = self._conn.get_server_host_key()

        return _Client()


# -- the SSH transport -------------------------------------------------------------------------------


class SSHTransport:
    def __init__(self, alias: str, conn: Any, jump: SSHTransport | None = None) -> None:
        self.host = alias
        self._conn = conn
        self._jump = jump
        self._sftp: Any = None
        self.host_key: HostKey | None = None  # the verified key of this host

    async def run(self, command: str, *, timeout: float | None = None, input: str | None = None) -> RunResult:
        try:
            result = await asyncio.wait_for(self._conn.run(command, input=input, check=False), timeout)
        except asyncio.TimeoutError:
            raise CommandTimeout(self.host, f"no answer within {timeout:.0f} s to: {short_command(command)}") from None
        except (asyncssh.Error, OSError) as exc:
            raise ConnectFailed(self.host, f"connection lost: {_describe(exc)}") from None
        status = result.exit_status if result.exit_status is not None else 255
        return RunResult(status, _text(result.stdout), _text(result.stderr))

    async def stream(self, command: str, on_line: Callable[[str], None], *, timeout: float | None = None) -> int:
        """Run ``command``, handing each line of its output (stdout and stderr) to ``on_line``."""

        async def pump() -> int:
            async with self._conn.create_process(command, stderr=asyncssh.STDOUT) as proc:
                async for line in proc.stdout:
                    on_line(line.rstrip("\n"))
                await proc.wait(check=False)
                return proc.exit_status if proc.exit_status is not None else 255

        try:
            return await asyncio.wait_for(pump(), timeout)
        except asyncio.TimeoutError:
            raise CommandTimeout(self.host, f"no end within {timeout:.0f} s to: {short_command(command)}") from None
        except (asyncssh.Error, OSError) as exc:
            raise ConnectFailed(self.host, f"connection lost: {_describe(exc)}") from None

    async def put(self, local: Path, remote: str, progress: ProgressFn | None = None) -> None:
        handler = (lambda _src, _dst, sent, total: progress(sent, total)) if progress else None
        try:
            if self._sftp is None:
                self._sftp = await self._conn.start_sftp_client()
            await self._sftp.put(str(local), remote, progress_handler=handler)
        except (asyncssh.Error, OSError) as exc:
            raise ConnectFailed(self.host, f"upload of {local.name} failed: {_describe(exc)}") from None

    async def close(self) -> None:
        if self._sftp is not None:
            self._sftp.exit()
        self._conn.close()
        with contextlib.suppress(Exception):
            await self._conn.wait_closed()
        if self._jump is not None:
            await self._jump.close()


async def connect(target: SSHTarget, keys: HostKeyStore, *, accept_new: bool = False) -> SSHTransport:
    """Open the connection to ``target`` (through its jump host, if any), checking the host key."""
    jump = await connect(target.jump, keys, accept_new=accept_new) if target.jump else None
    try:
        conn, key = await _open(target, keys, accept_new, jump)
    except BaseException:
        if jump is not None:
            await jump.close()
        raise
    t = SSHTransport(target.alias, conn, jump)
    t.host_key = key
    return t


async def scan_host_key(target: SSHTarget, keys: HostKeyStore) -> HostKey:
    """The key ``target`` presents and whether it is trusted; records nothing.

    The connection goes as far as logging in. Through a jump host whose own key is not trusted yet, the
    answer is the jump host's key, since it has to be trusted first.
    """
    try:
        t = await connect(target, keys)
    except (HostKeyUnknown, HostKeyChanged, AuthFailed) as exc:
        key = exc.host_key
        if key is None or (key.state == "known" and key.alias != target.alias):
            raise
        return key
    try:
        assert t.host_key is not None
        return t.host_key
    finally:
        await t.close()


async def _open(target: SSHTarget, keys: HostKeyStore, accept_new: bool,
                jump: SSHTransport | None) -> tuple[Any, HostKey | None]:
    tunnel = jump._conn if jump is not None else ()
    options: dict[str, Any] = {
        "connect_timeout": target.connect_timeout_s,
        "keepalive_interval": target.keepalive_interval_s,
        "keepalive_count_max": 3,
        "ignore_encrypted": True,
    }
    if target.port is not None:
        options["port"] = target.port
    if target.user is not None:
        options["username"] = target.user
    if target.identity_file is not None:
        options["client_keys"] = [os.path.expanduser(target.identity_file)]
    who = target.alias if target.alias == target.host else f"{target.alias} ({target.host})"
    for attempt in (1, 2):
        check = _KeyCheck(known_hosts(keys))
        try:
            conn = await asyncssh.connect(target.host, tunnel=tunnel, known_hosts=check,
                                          client_factory=check.client, **options)
            return conn, _verified(target, check, conn.get_server_host_key())
        except asyncssh.HostKeyNotVerifiable:
            refusal = await _refusal(who, target, tunnel, options, check, keys)
            key = refusal.host_key
            if not accept_new or not isinstance(refusal, HostKeyUnknown) or key is None or attempt == 2:
                raise refusal from None
            keys.record(key.host, key.port, key.public_key)
        except asyncssh.PermissionDenied as exc:
            user = target.user or "the default user"
            with_key = f" with {target.identity_file}" if target.identity_file else ""
            raise AuthFailed(who, f"authentication failed for {user}{with_key}: {exc.reason}",
                             host_key=_verified(target, check, check.verified)) from None
        except (asyncio.TimeoutError, TimeoutError):
            raise ConnectTimeout(who, f"no answer within {target.connect_timeout_s:g} s "
                                      f"connecting to {target.describe()}") from None
        except ConnectionRefusedError:
            raise ConnectRefused(who, f"connection refused by {target.describe()}") from None
        except socket.gaierror as exc:
            raise ConnectFailed(who, f"cannot resolve {target.host}: {exc.strerror}") from None
        except (asyncssh.Error, OSError) as exc:
            raise ConnectFailed(who, f"cannot connect to {target.describe()}: {_describe(exc)}") from None
    raise DeployError(who, "could not connect")  # not reached


def _verified(target: SSHTarget, check: _KeyCheck, key: Any) -> HostKey | None:
    """The key that passed the check, as the operator sees it (None if the check did not get that far)."""
    if key is None:
        return None
    return _host_key(target.alias, check.host or target.host, check.port, key, "known")


async def _refusal(who: str, target: SSHTarget, tunnel: Any, options: dict[str, Any], check: _KeyCheck,
                   keys: HostKeyStore) -> DeployError:
    """Why the host's key was refused: changed (both fingerprints) or unknown (its fingerprint)."""
    host, port = check.host or target.host, check.port
    if check.expected:
        # The host offered a key of a recorded kind, but not the recorded key.
        presented = check.presented or await _presented_key(target, tunnel, options)
        got = fingerprint(presented) if presented is not None else "unknown"
        expected = tuple(sorted({fingerprint(k) for k in check.expected}))
        key = _host_key(target.alias, host, port, presented, "changed", expected) if presented is not None else None
        return HostKeyChanged(who, f"host key changed: expected {', '.join(expected)}, got {got}; "
                                   + keys.changed_key_advice(target.alias, host, port), host_key=key)
    # The strongest kind of key the host offers is the one shown and recorded.
    presented = await _presented_key(target, tunnel, options) or check.presented
    got = fingerprint(presented) if presented is not None else "unknown"
    key = _host_key(target.alias, host, port, presented, "unknown") if presented is not None else None
    return HostKeyUnknown(who, f"unknown host key {got}; check it, then trust it (--accept-new-host-keys, "
                               "or the TUI's host menu)", host_key=key)


async def _presented_key(target: SSHTarget, tunnel: Any, options: dict[str, Any]) -> Any:
    try:
        return await asyncio.wait_for(
            asyncssh.get_server_host_key(target.host, options.get("port", ()), tunnel=tunnel,
                                         server_host_key_algs=PREFERRED_HOST_KEY_ALGS),
            target.connect_timeout_s,
        )
    except (asyncssh.Error, OSError, asyncio.TimeoutError):
        return None


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _describe(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
    return str(reason) or type(exc).__name__
