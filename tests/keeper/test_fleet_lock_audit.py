"""The fleet lock and the audit log, through the real rbee-keeper: a second operation refused with the
holder's name, a stale lock taken over, lock status and release, the audit log and ``audit --since``.
Against real SSH container hosts (two deploys at once, the log after a deploy): tests/ssh/test_fleet_ops.py."""

from __future__ import annotations

import getpass
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rbee_fleet.keeper.audit import AuditLog, parse_since
from rbee_fleet.keeper.deploy_lock import FleetLock
from tests.support import procs

BIN = Path(sys.executable).parent
WHO = f"{getpass.getuser()}@{socket.gethostname()}"

INVENTORY = """\
[queen]
port = {queen}
[defaults]
connect_timeout_s = 2
ssh_port = {closed}
[hives.box]
address = "127.0.0.1"
port = {hive}
"""

HOLDER = """
import sys, time
from pathlib import Path
from rbee_fleet.keeper.deploy_lock import FleetLock
assert FleetLock(Path(sys.argv[1]), sys.argv[2]).try_acquire("deploy box") is None
print("held", flush=True)
time.sleep(120)
"""


def keeper(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "rbee-keeper"), *args], capture_output=True, text=True, env=env, timeout=timeout,
                          stdin=subprocess.DEVNULL, check=False)


@pytest.fixture
def fleet(tmp_path: Path, home: Path) -> tuple[dict[str, str], Path]:
    """An inventory whose one remote host refuses SSH connections (an operation on it fails fast)."""
    inv = tmp_path / "fleet.toml"
    inv.write_text(INVENTORY.format(queen=procs.free_port(), closed=procs.free_port(), hive=procs.free_port()))
    env = {**os.environ, "RBEE_HOME": str(home), "RBEE_INVENTORY": str(inv), "COLUMNS": "250"}
    return env, inv


def hold_lock(home: Path, inv: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(home), str(inv)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def audit(env: dict[str, str], *args: str) -> list[dict]:
    result = keeper("audit", "--json", *args, env=env)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_a_second_operation_is_refused_with_the_holders_name_time_and_operation(fleet, home: Path):
    env, inv = fleet
    holder = hold_lock(home, inv)
    try:
        lock_file = FleetLock(home, str(inv)).path
        assert oct(lock_file.stat().st_mode & 0o777) == "0o600"
        refused = keeper("hive", "stop", "box", env=env)
        assert refused.returncode == 4, refused.stderr
        since = json.loads(lock_file.read_text())["since"]
        assert f"locked by {WHO} (pid {holder.pid}) since {since}: deploy box; wait for it" in refused.stderr
        assert "connecting" not in refused.stderr  # refused before touching the host
        started = time.monotonic()
        waited = keeper("deploy", "--wait-lock", "1.5", "--json", env=env)
        assert waited.returncode == 4 and time.monotonic() - started >= 1.5
        assert json.loads(waited.stdout)["ok"] is False and "(waited 2 s)" in waited.stderr
        assert not (home / "run" / "queen.pid").exists()  # a refused deploy started no queen

        status = keeper("lock", "status", "--json", env=env)
        shown = json.loads(status.stdout)
        assert status.returncode == 1 and shown["locked"] and shown["holder"]["pid"] == holder.pid
        assert shown["holder"]["alive"] is True and shown["holder"]["operation"] == "deploy box"
        assert shown["inventory"] == str(inv)
        released = keeper("lock", "release", env=env)
        assert released.returncode == 1 and "pass --force" in released.stderr and lock_file.exists()
        assert audit(env) == []  # refused operations changed nothing
    finally:
        holder.kill()
        holder.wait()

    # The holder is gone: the lock is stale, and the next operation takes it over with a warning.
    assert "process gone" in keeper("lock", "status", env=env).stdout
    taken = keeper("hive", "stop", "box", env=env)
    assert taken.returncode == 1, taken.stderr  # the host refuses SSH: the operation itself fails
    assert f"warning: taking over a stale fleet lock: {WHO} (pid {holder.pid})" in taken.stderr
    assert "connection refused" in taken.stderr
    assert not lock_file.exists()  # given back when the operation ended
    (entry,) = audit(env)
    assert (entry["action"], entry["targets"], entry["result"], entry["who"]) == ("hive stop", ["box"], "failed", WHO)
    assert "connection refused" in entry["reason"] and entry["inventory"] == str(inv)

    # A live holder goes only with --force, and the release is audited.
    holder = hold_lock(home, inv)
    try:
        forced = keeper("lock", "release", "--force", env=env)
        assert forced.returncode == 0 and f"released the fleet lock of {WHO} (pid {holder.pid})" in forced.stdout
        assert keeper("lock", "status", env=env).returncode == 0
        assert audit(env)[-1]["action"] == "lock release"
    finally:
        holder.kill()
        holder.wait()


def test_audit_since_table_and_json(fleet, home: Path):
    env, inv = fleet
    log = home / "audit.jsonl"
    home.mkdir(parents=True, exist_ok=True)
    old = {"ts": "2026-01-02T03:04:05Z", "who": "bob@old", "action": "deploy", "targets": ["box"], "result": "ok",
           "reason": "1 changed"}
    log.write_text(json.dumps(old) + "\nnot json\n")
    AuditLog(log, secrets=["s3cret-token"]).record("hive upgrade", ["box"], "failed",
                                                   "pip said: token s3cret-token refused\nmore lines")
    entries = audit(env)
    assert [e["action"] for e in entries] == ["deploy", "hive upgrade"]  # the bad line is skipped
    assert entries[1]["reason"] == "pip said: token *** refused" and "s3cret-token" not in log.read_text()
    assert [e["action"] for e in audit(env, "--since", "2h")] == ["hive upgrade"]
    assert [e["action"] for e in audit(env, "--since", "2026-01-01")] == ["deploy", "hive upgrade"]
    assert audit(env, "--since", "2099-01-01T00:00Z") == []
    assert [e["action"] for e in audit(env, "-n", "1")] == ["hive upgrade"]
    table = keeper("audit", env=env)
    assert table.returncode == 0 and "bob@old" in table.stdout and "hive upgrade" in table.stdout
    bad = keeper("audit", "--since", "yesterday-ish", env=env)
    assert bad.returncode == 2 and "--since 'yesterday-ish'" in bad.stderr


def test_since_parses_durations_and_times():
    from datetime import datetime, timezone

    now = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)
    assert parse_since("90s", now) == datetime(2026, 11, 30, 11, 58, 30, tzinfo=timezone.utc)
    assert parse_since("1h30m", now) == datetime(2026, 11, 30, 10, 30, tzinfo=timezone.utc)
    assert parse_since("2d", now) == datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)
    assert parse_since("2026-11-30T10:00", now) == datetime(2026, 11, 30, 10, 0, tzinfo=timezone.utc)
    with pytest.raises(ValueError):
        parse_since("soon", now)


def test_the_audit_file_is_created_0600(tmp_path: Path):
    log = AuditLog(tmp_path / "home" / "audit.jsonl")
    log.record("deploy", ["a", "b"], "ok", details={"a": "changed", "b": "ok"})
    assert oct((tmp_path / "home" / "audit.jsonl").stat().st_mode & 0o777) == "0o600"
    (entry,) = log.read()
    assert entry.details == {"a": "changed", "b": "ok"} and entry.who == WHO
