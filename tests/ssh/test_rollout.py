"""Converging, rolling and rolling back, end to end: two real OpenSSH hosts (containers on 127.0.0.31-32),
a real queen, real workers, the official openai client.

In file order, on one fleet: r1 alone is deployed, its worker's ``ctx_size`` changes (shown by
``--check``, then converged while a client streams through the queen the whole time), r2 joins, a rolling
deploy of a release whose hive cannot start fails its gate on r1, which goes back to its version, and
stops at ``--max-fail`` with r2 untouched; then r2 is upgraded and rolled back.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from openai import OpenAI

from rbee_fleet.contracts.vocabulary import ExitCode
from rbee_fleet.deploy.wheelhouse import Payload
from tests.ssh.conftest import HostPool
from tests.ssh.hosts import TestHost
from tests.ssh.support import Keeper, Keys, bumped_source, write_fleet_inventory
from tests.support import procs
from tests.support.procs import wait_until

pytestmark = [pytest.mark.ssh, pytest.mark.slow, pytest.mark.timeout(1200)]

HOSTS = {"r1": "127.0.0.31", "r2": "127.0.0.32"}
INSTALL = "/home/rbee/.local/share/rbee-fleet"


@dataclass
class Fleet:
    keeper: Keeper
    queen: procs.Proc
    hosts: dict[str, TestHost]
    keys: Keys
    tmp: Path
    port: int
    token: str = ""
    settings: dict[str, dict[str, object]] = field(default_factory=dict)

    def write(self, ctx_size: dict[str, int]) -> None:
        """The inventory with both hosts, each one worker with its ``ctx_size``."""
        path = write_fleet_inventory(self.keeper.inventory, self.port, {a: {"address": HOSTS[a]} for a in HOSTS},
                                     self.keys)
        text = path.read_text()
        for alias, size in ctx_size.items():
            head = f"[[hives.{alias}.workers]]"
            at = text.index(head)
            end = text.index("ctx_size = 512", at)
            text = text[:end] + f"ctx_size = {size}" + text[end + len("ctx_size = 512"):]
        path.write_text(text)

    def workers(self) -> dict[str, dict]:
        return {w["heartbeat"]["worker_id"]: w for w in procs.http_json(f"{self.queen.url}/v1/workers")[1]["workers"]}

    def ready(self, alias: str) -> list[str]:
        return [wid for wid, w in self.workers().items() if w["heartbeat"]["hive_id"] == alias and w["live"]
                and w["heartbeat"]["state"] == "ready"]

    def hive_workers(self, alias: str) -> list[dict]:
        headers = {"Authorization": f"Bearer {self.token}"}
        return procs.http_json(f"http://{HOSTS[alias]}:9000/v1/workers", headers=headers)[1]["workers"]

    def current(self, alias: str) -> str:
        return self.hosts[alias].exec(f"readlink {INSTALL}/current").stdout.strip().rsplit("/", 1)[-1]

    def versions(self, alias: str) -> list[str]:
        return self.hosts[alias].exec(f"ls {INSTALL}/versions").stdout.split()


@pytest.fixture(scope="module")
def fleet(host_pool: HostPool, ssh_keys: Keys, module_tmp: Path, offline_wheelhouse: Payload) -> Iterator[Fleet]:
    for name, address in HOSTS.items():
        host_pool.start(name, address)
    home = module_tmp / "operator-home"
    port = procs.free_port()
    keeper = Keeper(home, module_tmp / "fleet.toml")
    f = Fleet(keeper, None, host_pool.hosts, ssh_keys, module_tmp, port)  # type: ignore[arg-type]
    f.write({})
    f.queen = procs.start_queen(module_tmp, keeper.inventory, home, port)
    f.token = (home / "secrets" / "cluster.token").read_text().strip()
    yield f
    f.queen.stop()


def test_a_changed_worker_setting_is_shown_by_check_per_host(fleet: Fleet) -> None:
    code, results, proc = fleet.keeper.deploy("--accept-new-host-keys", "--limit", "r1")
    assert code == 0 and results["r1"]["status"] == "changed", proc.stderr
    assert results["r1"]["gate"] == "passed"
    assert "started worker r1-smollm2-0 (smollm2)" in results["r1"]["changes"]
    wait_until(lambda: fleet.ready("r1"), 60, "r1's worker ready")
    fleet.write({"r1": 1024})
    proc = fleet.keeper.run("deploy", "--check", "--json", "--limit", "r1")
    assert proc.returncode == 0, proc.stderr
    (host,) = json.loads(proc.stdout)["hosts"]
    assert host["status"] == "changed"
    assert host["reason"] == "would replace worker r1-smollm2-0 by r1-smollm2-0.2 (ctx_size 512 -> 1024)"
    assert host["workers"] == [{"action": "replace", "worker": "r1-smollm2-0", "model": "smollm2",
                                "running": "r1-smollm2-0", "new_id": "r1-smollm2-0.2",
                                "changed": ["ctx_size 512 -> 1024"]}]
    table = fleet.keeper.run("deploy", "--check", "--limit", "r1")
    assert "replace worker r1-smollm2-0 by r1-smollm2-0.2 (ctx_size 512 -> 1024)" in table.stdout
    assert [w["worker_id"] for w in fleet.hive_workers("r1")] == ["r1-smollm2-0"]  # nothing changed


class Streamer:
    """Streams chat answers through the queen, one after another, until told to stop (at most 300)."""

    def __init__(self, url: str) -> None:
        self.client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        self.ok = 0
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        for i in range(300):
            if self.stop.is_set():
                return
            try:
                stream = self.client.chat.completions.create(
                    model="smollm2", messages=[{"role": "user", "content": f"Count from {i} to {i + 20}."}],
                    max_tokens=24, temperature=0, stream=True)
                text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
                if not text:
                    self.failures.append(f"request {i}: an empty answer")
                self.ok += 1
            except Exception as exc:  # noqa: BLE001 - every failure is a finding
                self.failures.append(f"request {i}: {type(exc).__name__}: {exc}")

    def __enter__(self) -> Streamer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(120)


def test_a_config_change_converges_while_a_client_streams_the_whole_time(fleet: Fleet) -> None:
    with Streamer(fleet.queen.url) as streamer:
        wait_until(lambda: streamer.ok >= 2, 60, "the first streamed answers")
        code, results, proc = fleet.keeper.deploy("--limit", "r1")
        after = streamer.ok
        wait_until(lambda: streamer.ok >= after + 2, 60, "answers after the deploy")
    assert code == 0, proc.stderr
    assert streamer.failures == [], streamer.failures
    assert results["r1"]["status"] == "changed" and results["r1"]["gate"] == "passed", results["r1"]
    assert results["r1"]["changes"] == ["replaced worker r1-smollm2-0 by r1-smollm2-0.2 (ctx_size 512 -> 1024)"]
    # The new worker runs with the new setting (llama-server's own context per request), the old one is gone.
    (worker,) = fleet.hive_workers("r1")
    assert worker["worker_id"] == "r1-smollm2-0.2" and worker["settings"]["ctx_size"] == 1024
    assert worker["declared_as"] == "r1-smollm2-0"
    wait_until(lambda: fleet.ready("r1") == ["r1-smollm2-0.2"], 30, "only the new worker in rotation")
    assert fleet.workers()["r1-smollm2-0.2"]["heartbeat"]["context_length"] == 1024
    # Idempotent: nothing changes on a second run.
    code, results, proc = fleet.keeper.deploy("--limit", "r1")
    assert code == 0 and results["r1"]["status"] == "ok" and results["r1"]["reason"] == "nothing to change", results


def _broken_source(tmp: Path) -> Path:
    """A release whose hive exits at start: the kind of bad build a health gate is for."""
    src = bumped_source(tmp, "0.1.9")
    main = src / "rbee_fleet" / "hive" / "main.py"
    text = main.read_text()
    anchor = "        sys.exit(check())\n"
    assert anchor in text
    main.write_text(text.replace(anchor, anchor + '    sys.exit("rbee-hive: this build is broken on purpose (a test release)")\n', 1))
    return src


def test_a_release_failing_its_gate_is_rolled_back_and_the_rollout_stops_at_max_fail(fleet: Fleet) -> None:
    code, results, proc = fleet.keeper.deploy("--limit", "r2", "--accept-new-host-keys")
    assert code == 0 and results["r2"]["gate"] == "passed", proc.stderr
    before = {a: fleet.current(a) for a in HOSTS}
    code, results, proc = fleet.keeper.deploy("--source", str(_broken_source(fleet.tmp)), "--batch", "1",
                                              "--max-fail", "1", timeout=600)
    assert code == ExitCode.HALTED, proc.stderr
    r1, r2 = results["r1"], results["r2"]
    assert r1["status"] == "failed" and r1["version"].startswith("0.1.9-"), r1
    assert "this build is broken on purpose" in r1["reason"], r1  # the failing check's output
    assert r1["rolled_back_to"] == before["r1"] and f"switched back to {before['r1']}" in r1["reason"]
    assert "passes the health gate there" in r1["reason"], r1
    assert r2["status"] == "skipped" and "--max-fail 1" in r2["reason"], r2
    assert fleet.current("r1") == before["r1"] and fleet.current("r2") == before["r2"]
    assert not [v for v in fleet.versions("r1") if v.startswith("0.1.9-")]  # the failed version is gone
    assert not [v for v in fleet.versions("r2") if v.startswith("0.1.9-")]  # r2 was never touched
    wait_until(lambda: fleet.ready("r1"), 60, "r1 serving again")
    # r1 has no other version left to roll back to: said with the host's name.
    proc = fleet.keeper.run("rollback", "--limit", "r1", "--json")
    assert proc.returncode == ExitCode.FAILED
    (host,) = json.loads(proc.stdout)["hosts"]
    assert host["host"] == "r1" and host["status"] == "failed" and "no previous version" in host["reason"], host


def test_rollback_after_an_upgrade_returns_the_previous_version(fleet: Fleet) -> None:
    old = fleet.current("r2")
    proc = fleet.keeper.run("hive", "upgrade", "r2", "--source", str(bumped_source(fleet.tmp, "0.1.1")), "--json")
    assert proc.returncode == 0, proc.stderr
    (host,) = json.loads(proc.stdout)["hosts"]
    assert host["version"].startswith("0.1.1-") and host["gate"] == "passed", host
    new = fleet.current("r2")
    assert new.startswith("0.1.1-")
    started = time.monotonic()
    proc = fleet.keeper.run("rollback", "--limit", "r2", "--json")
    assert proc.returncode == 0, proc.stderr
    (host,) = json.loads(proc.stdout)["hosts"]
    assert host["status"] == "changed" and host["reason"] == f"switched to {old} (was {new})", host
    assert host["gate"] == "passed"
    assert fleet.current("r2") == old and new in fleet.versions("r2")  # no reinstall: both still there
    hives = {h["hive_id"]: h for h in procs.http_json(f"{fleet.queen.url}/v1/hives")[1]["hives"]}
    assert hives["r2"]["version"] == "0.1.0"
    assert fleet.ready("r2"), "r2's worker serves again"
    print(f"rollback of r2 took {time.monotonic() - started:.1f} s (keeper start included)")
