"""Connection logic and the host-key policy, against asyncssh's in-process SSH server.

(End-to-end deploys use real OpenSSH in containers: tests/ssh.)
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import asyncssh
import pytest

from rbee_fleet.deploy.errors import (
    AuthFailed,
    ConnectRefused,
    ConnectTimeout,
    HostKeyChanged,
    HostKeyUnknown,
)
from rbee_fleet.deploy.transport import HostKeyStore, SSHTarget, connect, fingerprint


class _Server(asyncssh.SSHServer):
    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> bool:
        return True  # lets a test use this server as a jump host


def _answer(process: asyncssh.SSHServerProcess) -> None:
    process.stdout.write(f"ran: {process.command}\n")
    process.exit(0)


async def _serve(host_key: asyncssh.SSHKey, client_key: asyncssh.SSHKey) -> tuple[asyncssh.SSHAcceptor, int]:
    server = await asyncssh.create_server(
        _Server, "127.0.0.1", 0, server_host_keys=[host_key],
        authorized_client_keys=asyncssh.import_authorized_keys(client_key.export_public_key().decode()),
        process_factory=_answer,
    )
    return server, server.sockets[0].getsockname()[1]


@pytest.fixture
def client_key(tmp_path: Path) -> Path:
    key = asyncssh.generate_private_key("ssh-ed25519")
    path = tmp_path / "id_test"
    key.write_private_key(str(path))
    return path


@pytest.fixture
async def server(client_key: Path) -> AsyncIterator[tuple[asyncssh.SSHKey, int]]:
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    srv, port = await _serve(host_key, asyncssh.read_private_key(str(client_key)))
    yield host_key, port
    srv.close()
    await srv.wait_closed()


def _target(port: int, key: Path, **kw: object) -> SSHTarget:
    return SSHTarget("box", "127.0.0.1", port=port, user="rbee", identity_file=str(key), connect_timeout_s=3, **kw)  # type: ignore[arg-type]


def _store(tmp_path: Path, user_text: str = "") -> HostKeyStore:
    user = tmp_path / "user_known_hosts"
    user.write_text(user_text)
    return HostKeyStore(tmp_path / "rbee" / "known_hosts", user_files=(user,))


async def test_unknown_key_is_refused_with_its_fingerprint(server, client_key: Path, tmp_path: Path) -> None:
    host_key, port = server
    with pytest.raises(HostKeyUnknown) as info:
        await connect(_target(port, client_key), _store(tmp_path))
    assert fingerprint(host_key) in info.value.reason and "--accept-new-host-keys" in info.value.reason
    assert not (tmp_path / "rbee" / "known_hosts").exists()


async def test_accept_new_records_the_key_and_later_runs_need_no_flag(server, client_key: Path, tmp_path: Path) -> None:
    _, port = server
    store = _store(tmp_path)
    t = await connect(_target(port, client_key), store, accept_new=True)
    assert (await t.run("echo hi")).stdout == "ran: echo hi\n"
    await t.close()
    recorded = (tmp_path / "rbee" / "known_hosts").read_text()
    assert recorded.startswith(f"[127.0.0.1]:{port} ssh-ed25519 ")
    t = await connect(_target(port, client_key), store)
    await t.close()
    assert (tmp_path / "rbee" / "known_hosts").read_text() == recorded  # recorded once


async def test_the_users_known_hosts_is_trusted(server, client_key: Path, tmp_path: Path) -> None:
    host_key, port = server
    line = f"[127.0.0.1]:{port} {host_key.export_public_key().decode()}"
    t = await connect(_target(port, client_key), _store(tmp_path, line))
    await t.close()


async def test_a_changed_key_is_refused_with_both_fingerprints_even_with_accept_new(server, client_key: Path, tmp_path: Path) -> None:
    host_key, port = server
    old = asyncssh.generate_private_key("ssh-ed25519")
    store = _store(tmp_path)
    store.record("127.0.0.1", port, old)
    with pytest.raises(HostKeyChanged) as info:
        await connect(_target(port, client_key), store, accept_new=True)
    assert fingerprint(old) in info.value.reason and fingerprint(host_key) in info.value.reason
    assert info.value.host == "box (127.0.0.1)"


async def test_wrong_key_fails_authentication(server, tmp_path: Path) -> None:
    _, port = server
    wrong = tmp_path / "id_wrong"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(wrong))
    with pytest.raises(AuthFailed) as info:
        await connect(_target(port, wrong), _store(tmp_path), accept_new=True)
    assert "authentication failed for rbee with" in info.value.reason


async def test_closed_port_is_refused(client_key: Path, tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ConnectRefused) as info:
        await connect(_target(port, client_key), _store(tmp_path))
    assert "connection refused" in info.value.reason


async def test_a_silent_server_times_out(client_key: Path, tmp_path: Path) -> None:
    silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    target = SSHTarget("box", "127.0.0.1", port=port, user="rbee", identity_file=str(client_key), connect_timeout_s=0.5)
    try:
        with pytest.raises(ConnectTimeout) as info:
            await connect(target, _store(tmp_path))
        assert "no answer within 0.5 s" in info.value.reason
    finally:
        silent.close()


async def test_jump_host_tunnels_the_connection_and_both_keys_are_checked(server, client_key: Path, tmp_path: Path) -> None:
    _, port = server
    jump_key = asyncssh.generate_private_key("ssh-ed25519")
    jump_srv, jump_port = await _serve(jump_key, asyncssh.read_private_key(str(client_key)))
    try:
        store = _store(tmp_path)
        target = _target(port, client_key, jump=_target(jump_port, client_key))
        with pytest.raises(HostKeyUnknown):  # the jump host's key is checked first
            await connect(target, store)
        t = await connect(target, store, accept_new=True)
        assert (await t.run("hostname")).ok
        await t.close()
        recorded = (tmp_path / "rbee" / "known_hosts").read_text()
        assert f"[127.0.0.1]:{jump_port} " in recorded and f"[127.0.0.1]:{port} " in recorded
    finally:
        jump_srv.close()
        await jump_srv.wait_closed()
