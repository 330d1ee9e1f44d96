"""Connection logic, the host-key policy and looking at a key before trusting it, against real OpenSSH
servers on loopback (tests/support/sshd.py).

(End-to-end deploys use real OpenSSH in containers: tests/ssh.)
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
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
from rbee_fleet.deploy.host_keys import HostKeyStore
from rbee_fleet.deploy.ssh_transport import connect, fingerprint, scan_host_key, trust
from rbee_fleet.deploy.targets import SSHTarget
from tests.support.sshd import USER, openssh_server


def _target(port: int, key: Path, **kw: object) -> SSHTarget:
    return SSHTarget("box", "127.0.0.1", port=port, user=USER, identity_file=str(key), connect_timeout_s=3, **kw)  # type: ignore[arg-type]


def _store(tmp_path: Path, user_text: str = "") -> HostKeyStore:
    user = tmp_path / "user_known_hosts"
    user.write_text(user_text)
    return HostKeyStore(tmp_path / "rbee" / "known_hosts", user_files=(user,))


async def test_unknown_key_is_refused_with_its_fingerprint(sshd, client_key: Path, tmp_path: Path) -> None:
    host_key, port = sshd
    with pytest.raises(HostKeyUnknown) as info:
        await connect(_target(port, client_key), _store(tmp_path))
    assert fingerprint(host_key) in info.value.reason and "--accept-new-host-keys" in info.value.reason
    assert not (tmp_path / "rbee" / "known_hosts").exists()


async def test_accept_new_records_the_key_and_later_runs_need_no_flag(sshd, client_key: Path, tmp_path: Path) -> None:
    _, port = sshd
    store = _store(tmp_path)
    t = await connect(_target(port, client_key), store, accept_new=True)
    assert (await t.run("echo hi")).stdout == "hi\n"
    await t.close()
    recorded = (tmp_path / "rbee" / "known_hosts").read_text()
    assert recorded.startswith(f"[127.0.0.1]:{port} ssh-ed25519 ")
    t = await connect(_target(port, client_key), store)
    await t.close()
    assert (tmp_path / "rbee" / "known_hosts").read_text() == recorded  # recorded once


async def test_the_users_known_hosts_is_trusted(sshd, client_key: Path, tmp_path: Path) -> None:
    host_key, port = sshd
    line = f"[127.0.0.1]:{port} {host_key.export_public_key().decode()}"
    t = await connect(_target(port, client_key), _store(tmp_path, line))
    await t.close()


async def test_a_changed_key_is_refused_with_both_fingerprints_even_with_accept_new(sshd, client_key: Path, tmp_path: Path) -> None:
    host_key, port = sshd
    old = asyncssh.generate_private_key("ssh-ed25519")
    store = _store(tmp_path)
    store.record("127.0.0.1", port, old.export_public_key().decode())
    with pytest.raises(HostKeyChanged) as info:
        await connect(_target(port, client_key), store, accept_new=True)
    assert fingerprint(old) in info.value.reason and fingerprint(host_key) in info.value.reason
    assert info.value.host == "box (127.0.0.1)"


async def test_wrong_key_fails_authentication(sshd, tmp_path: Path) -> None:
    _, port = sshd
    wrong = tmp_path / "id_wrong"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(wrong))
    with pytest.raises(AuthFailed) as info:
        await connect(_target(port, wrong), _store(tmp_path), accept_new=True)
    assert f"authentication failed for {USER} with" in info.value.reason


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
    target = SSHTarget("box", "127.0.0.1", port=port, user=USER, identity_file=str(client_key), connect_timeout_s=0.5)
    try:
        with pytest.raises(ConnectTimeout) as info:
            await connect(target, _store(tmp_path))
        assert "no answer within 0.5 s" in info.value.reason
    finally:
        silent.close()


async def test_jump_host_tunnels_the_connection_and_both_keys_are_checked(sshd, client_key: Path, tmp_path: Path) -> None:
    _, port = sshd
    with openssh_server(client_key, tmp_path / "jump") as (jump_key, jump_port):
        store = _store(tmp_path)
        jump = SSHTarget("bastion", "127.0.0.1", port=jump_port, user=USER, identity_file=str(client_key),
                         connect_timeout_s=3)
        target = _target(port, client_key, jump=jump)
        with pytest.raises(HostKeyUnknown) as info:  # the jump host's key is checked first
            await connect(target, store)
        assert info.value.host.startswith("bastion") and fingerprint(jump_key) in info.value.reason
        t = await connect(target, store, accept_new=True)
        assert (await t.run("echo through the jump")).stdout == "through the jump\n"
        await t.close()
        recorded = (tmp_path / "rbee" / "known_hosts").read_text()
        assert f"[127.0.0.1]:{jump_port} " in recorded and f"[127.0.0.1]:{port} " in recorded


# -- looking at a key before trusting it (the TUI's host-key dialog) ----------------------------------


async def test_scan_shows_an_unknown_key_and_records_nothing(sshd, client_key: Path, tmp_path: Path) -> None:
    host_key, port = sshd
    store = _store(tmp_path)
    key = await scan_host_key(_target(port, client_key), store)
    assert (key.alias, key.host, key.port, key.state) == ("box", "127.0.0.1", port, "unknown")
    assert key.fingerprint == fingerprint(host_key) and key.key_type == "ssh-ed25519"
    assert key.where == f"[127.0.0.1]:{port}"
    assert not store.keeper_file.exists()


async def test_trusting_the_scanned_key_lets_connections_in_and_is_recorded_once(sshd, client_key: Path,
                                                                                 tmp_path: Path) -> None:
    _, port = sshd
    store = _store(tmp_path)
    key = await scan_host_key(_target(port, client_key), store)
    assert trust(store, key) is True
    assert trust(store, key) is False  # known now: nothing more is written
    assert store.keeper_file.read_text().count("\n") == 1
    t = await connect(_target(port, client_key), store)  # no --accept-new-host-keys needed
    assert (await t.run("true")).ok
    await t.close()
    again = await scan_host_key(_target(port, client_key), store)
    assert again.state == "known" and again.fingerprint == key.fingerprint


async def test_a_known_key_is_reported_known_even_when_the_login_fails(sshd, tmp_path: Path) -> None:
    host_key, port = sshd
    wrong = tmp_path / "id_wrong"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(wrong))
    store = _store(tmp_path, f"[127.0.0.1]:{port} {host_key.export_public_key().decode()}")
    key = await scan_host_key(_target(port, wrong), store)
    assert key.state == "known" and key.fingerprint == fingerprint(host_key)


async def test_a_changed_key_is_shown_with_both_fingerprints_and_never_trusted(sshd, client_key: Path,
                                                                                tmp_path: Path) -> None:
    host_key, port = sshd
    old = asyncssh.generate_private_key("ssh-ed25519")
    store = _store(tmp_path)
    store.record("127.0.0.1", port, old.export_public_key().decode())
    key = await scan_host_key(_target(port, client_key), store)
    assert key.state == "changed"
    assert key.fingerprint == fingerprint(host_key) and key.expected == (fingerprint(old),)
    before = store.keeper_file.read_text()
    with pytest.raises(HostKeyChanged) as info:
        trust(store, key)
    assert fingerprint(old) in info.value.reason and fingerprint(host_key) in info.value.reason
    # Even a caller that relabels the key as unknown cannot get it recorded.
    with pytest.raises(HostKeyChanged):
        trust(store, dataclasses.replace(key, state="unknown", expected=()))
    assert store.keeper_file.read_text() == before


async def test_trust_refuses_a_key_that_is_not_the_one_shown(sshd, client_key: Path, tmp_path: Path) -> None:
    _, port = sshd
    store = _store(tmp_path)
    key = await scan_host_key(_target(port, client_key), store)
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    with pytest.raises(ValueError, match="does not match the fingerprint"):
        trust(store, dataclasses.replace(key, public_key=other))
    assert not store.keeper_file.exists()


async def test_behind_an_untrusted_jump_host_the_jump_hosts_key_comes_first(sshd, client_key: Path,
                                                                            tmp_path: Path) -> None:
    host_key, port = sshd
    with openssh_server(client_key, tmp_path / "jump") as (jump_key, jump_port):
        store = _store(tmp_path)
        jump = SSHTarget("bastion", "127.0.0.1", port=jump_port, user=USER, identity_file=str(client_key),
                         connect_timeout_s=3)
        target = _target(port, client_key, jump=jump)
        first = await scan_host_key(target, store)
        assert (first.alias, first.state, first.fingerprint) == ("bastion", "unknown", fingerprint(jump_key))
        trust(store, first)
        second = await scan_host_key(target, store)
        assert (second.alias, second.state, second.fingerprint) == ("box", "unknown", fingerprint(host_key))
