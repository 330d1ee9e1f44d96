"""A hive in its own process, reached by the queen over HTTP (as on another machine), with the cluster token."""

from __future__ import annotations

import sys

import openai
import pytest

from rbee_fleet.common.errors import OperationFailed
from tests.support import procs


@pytest.fixture
def queen_and_hive(tmp_path):
    queen_port, hive_port = procs.free_port(), procs.free_port()
    inv = procs.write_inventory(tmp_path / "inv.toml", port=queen_port, worker_port_base=procs.free_port_range(5), workers=[])
    inv.write_text(inv.read_text() + f'\n[hives.box2]\naddress = "127.0.0.1"\nport = {hive_port}\n')
    home = tmp_path / "home"
    queen = procs.start_queen(tmp_path, inv, home, queen_port)
    token_file = home / "secrets" / "cluster.token"
    hive = procs.spawn("hive", [sys.executable, "-m", "rbee_fleet.hive", "--hive-id", "box2", "--port", str(hive_port),
                                "--queen-url", queen.url, "--token-file", str(token_file), "--home", str(tmp_path / "hive-home"),
                                "--worker-port-base", str(procs.free_port_range(5)), "--heartbeat-interval", "0.5"],
                       tmp_path / "hive.log", f"http://127.0.0.1:{hive_port}")
    auth = {"Authorization": f"Bearer {token_file.read_text().strip()}"}
    procs.wait_until(lambda: hive.alive() and _status(hive.url + "/health", auth) == 200, 20, what="the hive")
    yield queen, hive, auth
    hive.stop()
    queen.stop()
    assert hive.popen.returncode == 0, hive.log_text()[-2000:]


def _status(url: str, headers: dict[str, str]) -> int:
    try:
        return procs.http_json(url, headers=headers, timeout=2)[0]
    except OSError:
        return 0


async def test_queen_runs_operations_on_a_remote_hive(queen_and_hive):
    queen, hive, auth = queen_and_hive
    assert _status(hive.url + "/health", {}) == 401  # nothing without the cluster token
    assert _status(hive.url + "/v1/workers", {"Authorization": "Bearer wrong"}) == 401

    import aiohttp

    from rbee_fleet.common.jobs import JobClient
    from rbee_fleet.contracts.fleet import WorkerSpawnOp, WorkerStopOp

    async with aiohttp.ClientSession() as session:
        jobs = JobClient(session, queen.url, procs.admin_headers(queen.extra["home"]))
        events = []
        result = await jobs.run(WorkerSpawnOp(hive="box2", model="smollm2", worker_id="remote-0", threads=2, ctx_size=512),
                                on_event=events.append)
        assert result["worker"]["worker_id"] == "remote-0"
        assert any("ready" in e.message for e in events), [e.message for e in events]
        with pytest.raises(OperationFailed, match="no model 'ghost'"):
            await jobs.run(WorkerSpawnOp(hive="box2", model="ghost"))
        with pytest.raises(Exception, match="no hive 'nowhere'"):
            await jobs.run(WorkerSpawnOp(hive="nowhere", model="smollm2"))

        procs.wait_workers_ready(queen, 1)
        client = openai.AsyncOpenAI(base_url=f"{queen.url}/v1", api_key="x", max_retries=0)
        answer = await client.completions.create(model="smollm2", prompt="Hello", max_tokens=4)
        assert answer.usage.completion_tokens == 4

        models = procs.http_json(f"{queen.url}/v1/hives/box2/models")[1]["models"]
        assert [m["id"] for m in models] == ["smollm2"]
        hives = {h["hive_id"]: h for h in procs.http_json(f"{queen.url}/v1/hives")[1]["hives"]}
        assert hives["box2"]["live"] and [w["worker_id"] for w in hives["box2"]["workers"]] == ["remote-0"]

        await jobs.run(WorkerStopOp(hive="box2", worker_id="remote-0"))
        procs.wait_until(lambda: procs.http_json(f"{queen.url}/v1/workers")[1]["workers"] == [], 10,
                         what="the stopped worker to leave the registry")
