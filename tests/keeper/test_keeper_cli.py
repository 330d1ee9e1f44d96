"""rbee-keeper as a user runs it: the installed console scripts, in a shell, with exit codes and --json."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import procs

BIN = Path(sys.executable).parent


def keeper(*args: str, env: dict[str, str], timeout: float = 180, exe: str = "rbee-keeper") -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / exe), *args], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def user(module_tmp):
    """A user's environment: their own RBEE_HOME and an inventory on a free port."""
    port = procs.free_port()
    inv = procs.write_inventory(module_tmp / "fleet.toml", port=port, worker_port_base=procs.free_port_range(10),
                                workers=[{"model": "smollm2", "threads": 2, "ctx_size": 1024}])
    env = {**os.environ, "RBEE_HOME": str(module_tmp / "home"), "RBEE_INVENTORY": str(inv), "COLUMNS": "200"}
    yield env, port
    keeper("down", env=env)


def test_every_command_has_help():
    env = dict(os.environ)
    for args in (["--help"], ["up", "--help"], ["down", "--help"], ["status", "--help"], ["infer", "--help"],
                 ["demo", "--help"], ["worker", "spawn", "--help"], ["worker", "list", "--help"],
                 ["worker", "stop", "--help"], ["model", "list", "--help"], ["model", "download", "--help"],
                 ["model", "delete", "--help"], ["jobs", "list", "--help"]):
        result = keeper(*args, env=env, timeout=30)
        assert result.returncode == 0, (args, result.stderr)
        assert "usage:" in result.stdout
    assert keeper("--help", env=env, exe="rbee").returncode == 0


def test_bad_inventory_exits_2_and_starts_nothing(tmp_path):
    port = procs.free_port()
    bad = tmp_path / "bad.toml"
    bad.write_text(f'[queen]\nport = {port}\n\n[hives.localhost]\nembedded = true\n\n[[hives.localhost.workers]]\nmodle = "smollm2"\n')
    env = {**os.environ, "RBEE_HOME": str(tmp_path / "home")}
    result = keeper("up", "-i", str(bad), env=env)
    assert result.returncode == 2
    assert f"{bad}:8: hives.localhost.workers[0].modle: unknown key (did you mean 'model'?)" in result.stderr
    assert not (tmp_path / "home" / "run" / "queen.pid").exists()
    with socket.socket() as sock:  # nothing listens on the inventory's port
        sock.bind(("127.0.0.1", port))


def test_status_without_a_queen_exits_3(tmp_path):
    port = procs.free_port()
    inv = procs.write_inventory(tmp_path / "inv.toml", port=port, worker_port_base=9300)
    env = {**os.environ, "RBEE_HOME": str(tmp_path / "home")}
    result = keeper("status", "-i", str(inv), env=env)
    assert result.returncode == 3 and "rbee-keeper up" in result.stderr
    result = keeper("status", "--json", "-i", str(inv), env=env)
    assert result.returncode == 3 and json.loads(result.stdout)["ok"] is False


def test_up_status_infer_down(user):
    env, port = user
    result = keeper("up", env=env)
    assert result.returncode == 0, result.stderr
    assert "queen: started" in result.stderr and "localhost-smollm2-0" in result.stdout
    assert "ready" in result.stdout
    # One spawn per declared worker: the queen starts the inventory's workers itself, and `up` follows
    # that job instead of asking the hive a second time.
    assert "already starting" not in result.stderr, result.stderr
    spawns = [j for j in json.loads(keeper("jobs", "list", "--json", env=env).stdout)
              if j["operation"]["kind"] == "worker_spawn"]
    assert [(j["operation"]["worker_id"], j["state"]) for j in spawns] == [("localhost-smollm2-0", "succeeded")], spawns

    again = keeper("up", "--json", env=env)  # idempotent: nothing new started
    assert again.returncode == 0, again.stderr
    body = json.loads(again.stdout)
    assert body["ok"] and body["queen_started"] is False
    assert body["workers"] == [{"worker_id": "localhost-smollm2-0", "changed": False, "error": None}]

    status = json.loads(keeper("status", "--json", env=env).stdout)
    assert status["queen"]["url"] == f"http://127.0.0.1:{port}"
    assert status["models"] == ["smollm2"]
    assert [w["heartbeat"]["state"] for w in status["workers"]] == ["ready"]
    cluster_token = (Path(env["RBEE_HOME"]) / "secrets" / "cluster.token").read_text().strip()
    assert cluster_token not in json.dumps(status)

    answer = keeper("infer", "-m", "smollm2", "--temperature", "0", "--max-tokens", "12",
                    "What is the capital of France? Answer in one word.", env=env)
    assert answer.returncode == 0, answer.stderr
    assert "Paris" in answer.stdout and "tokens" in answer.stderr
    as_json = json.loads(keeper("infer", "-m", "smollm2", "--max-tokens", "3", "--json", "hi", env=env).stdout)
    assert as_json["usage"]["completion_tokens"] == 3
    missing = keeper("infer", "-m", "nope", "hi", env=env)
    assert missing.returncode == 1 and "does not exist in this fleet" in missing.stderr


def test_workers_and_models_from_the_cli(user, tmp_path):
    env, _ = user
    assert keeper("up", env=env).returncode == 0
    spawned = keeper("worker", "spawn", "-m", "smollm2", "--id", "cli-extra", "--threads", "1", "--ctx-size", "512",
                     "--json", env=env)
    assert spawned.returncode == 0, spawned.stderr
    assert json.loads(spawned.stdout)["worker"]["worker_id"] == "cli-extra"
    procs.wait_until(lambda: "cli-extra" in keeper("worker", "list", env=env).stdout, 15, what="the worker in the list")
    listed = json.loads(keeper("worker", "list", "--json", env=env).stdout)
    assert {w["heartbeat"]["worker_id"] for w in listed} == {"localhost-smollm2-0", "cli-extra"}
    stopped = keeper("worker", "stop", "cli-extra", env=env)
    assert stopped.returncode == 0, stopped.stderr

    gguf = tmp_path / "copy-of-smollm2.gguf"
    shutil.copy(procs.model_path(), gguf)
    got = keeper("model", "download", str(gguf), "--name", "smol-copy", "--json", env=env)
    assert got.returncode == 0, got.stderr
    entry = json.loads(got.stdout)["model"]
    assert entry["id"] == "smol-copy" and entry["format"] == "gguf" and entry["size_bytes"] == gguf.stat().st_size
    models = json.loads(keeper("model", "list", "--json", env=env).stdout)
    assert {m["id"] for m in models} == {"smollm2", "smol-copy"}
    states = {m["id"]: (m["state"], m["workers"]) for m in models}  # the fleet's view: state per model
    assert states == {"smollm2": ("loaded", 1), "smol-copy": ("available", 0)}
    hive_catalog = json.loads(keeper("model", "list", "--hive", "localhost", "--json", env=env).stdout)
    assert {m["id"]: m["format"] for m in hive_catalog} == {"smollm2": "gguf", "smol-copy": "gguf"}
    refused = keeper("model", "delete", "smollm2", env=env)
    assert refused.returncode == 1 and "in use" in refused.stderr
    deleted = keeper("model", "delete", "smol-copy", env=env)
    assert deleted.returncode == 0, deleted.stderr
    assert {m["id"] for m in json.loads(keeper("model", "list", "--json", env=env).stdout)} == {"smollm2"}
    bad = keeper("model", "download", "/no/such/file.gguf", env=env)
    assert bad.returncode == 1 and "is not a built-in alias" in bad.stderr

    jobs = json.loads(keeper("jobs", "list", "--json", env=env).stdout)
    kinds = [j["operation"]["kind"] for j in jobs]
    assert "worker_spawn" in kinds and "model_download" in kinds and "model_delete" in kinds

    # Every one of them is in the keeper's audit log, the refused delete as failed, and no secret is.
    audit = keeper("audit", "--json", env=env)
    entries = [json.loads(line) for line in audit.stdout.splitlines()]
    seen = [(e["action"], e["targets"], e["result"]) for e in entries]
    assert seen == [("worker spawn", ["localhost/cli-extra"], "ok"), ("worker stop", ["localhost/cli-extra"], "ok"),
                    ("model download", ["localhost/smol-copy"], "ok"), ("model delete", ["localhost/smollm2"], "failed"),
                    ("model delete", ["localhost/smol-copy"], "ok"),
                    ("model download", ["localhost//no/such/file.gguf"], "failed")], seen
    assert "in use" in entries[3]["reason"]
    token = (Path(env["RBEE_HOME"]) / "secrets" / "cluster.token").read_text().strip()
    assert token not in (Path(env["RBEE_HOME"]) / "audit.jsonl").read_text()


def test_down_stops_queen_and_workers(user):
    env, port = user
    assert keeper("up", env=env).returncode == 0
    status = json.loads(keeper("status", "--json", env=env).stdout)
    pids = [w["heartbeat"]["pid"] for w in status["workers"]]
    # ps shows the queen and its workers by name; down still finds the retitled queen by its pidfile.
    queen_pid = int((Path(env["RBEE_HOME"]) / "run" / "queen.pid").read_text())
    assert Path(f"/proc/{queen_pid}/cmdline").read_text().startswith(f"queen-rbee --home {env['RBEE_HOME']} ")
    assert all(Path(f"/proc/{pid}/cmdline").read_text().startswith("llm-worker-rbee smollm2") for pid in pids)
    result = keeper("down", env=env)
    assert result.returncode == 0 and "queen stopped" in result.stdout
    for pid in pids:
        procs.wait_until(lambda pid=pid: not Path(f"/proc/{pid}").exists(), 10, what=f"worker {pid} to exit")
    assert keeper("status", env=env).returncode == 3
    again = keeper("down", env=env)
    assert again.returncode == 0 and "not running" in again.stdout
