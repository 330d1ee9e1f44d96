"""asyncssh's in-process SSH server, for connection and host-key logic: a real SSH handshake, host key and
login on loopback, but no shell (every command gets one line back). End-to-end tests use real OpenSSH
hosts instead (tests/ssh)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import asyncssh


def write_client_key(path: Path) -> Path:
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(path))
    return path


def _answer(process: asyncssh.SSHServerProcess) -> None:
    process.stdout.write("not a shell\n")
    process.exit(0)


@contextlib.asynccontextmanager
async def in_process_sshd(client_key: Path) -> AsyncIterator[tuple[asyncssh.SSHKey, int]]:
    """A server on 127.0.0.1 that lets ``client_key`` in; yields (its host key, its port)."""
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    server = await asyncssh.create_server(
        asyncssh.SSHServer, "127.0.0.1", 0, server_host_keys=[host_key], process_factory=_answer,
        authorized_client_keys=asyncssh.import_authorized_keys(
            asyncssh.read_private_key(str(client_key)).export_public_key().decode()))
    try:
        yield host_key, server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()
