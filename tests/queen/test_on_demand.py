"""Models on demand with a real queen, its embedded hive and real llama-server workers.

A request for a model that no worker runs loads it (once, however many ask at once); idle on-demand
workers unload after their TTL; inventory workers are pinned; a small memory budget forces LRU eviction;
a model that cannot fit gets a 503 with the figures; a model that fails to load is not retried in a loop.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import openai
import pytest

from rbee_fleet.common.jobs import JobClient
from rbee_fleet.contracts.fleet import ModelDownloadOp
from tests.support import procs

QUESTION = [{"role": "user", "content": "Name a colour."}]
# Small, one-thread workers: two of them share this machine's two cores.
SMALL = {"threads": 1, "ctx_size": 512, "slots": 2}


def tables(models: dict[str, dict]) -> str:
    out = []
    for name, opts in models.items():
        out.append(f"[models.{name}]")
        out += [f"{k} = {json.dumps(v)}" for k, v in opts.items()]
        out.append("")
    return "\n".join(out)


@pytest.fixture
def start_fleet(tmp_path: Path):
    started: list[procs.Proc] = []

    def start(*, workers: list[dict] | None = None, queen_extra: str = "", hive_extra: str = "",
              models: dict[str, dict] | None = None) -> procs.Proc:
        where = tmp_path / f"fleet{len(started)}"
        where.mkdir()
        port = procs.free_port()
        inv = procs.write_inventory(where / "inv.toml", port=port, worker_port_base=procs.free_port_range(10),
                                    workers=workers or [], queen_extra=queen_extra, hive_extra=hive_extra,
                                    tail=tables(models or {}))
        queen = procs.start_queen(where, inv, where / "home", port)
        started.append(queen)
        return queen

    yield start
    for queen in started:
        queen.stop()
        assert queen.popen.returncode == 0, queen.log_text()[-3000:]


def client(queen: procs.Proc) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{queen.url}/v1", api_key="unused-on-loopback", max_retries=0, timeout=120)


def workers(queen: procs.Proc) -> dict[str, dict]:
    return {w["heartbeat"]["worker_id"]: w for w in procs.http_json(f"{queen.url}/v1/workers")[1]["workers"]}


def models(queen: procs.Proc) -> dict[str, dict]:
    return {m["id"]: m for m in procs.http_json(f"{queen.url}/v1/models")[1]["data"]}


def jobs(queen: procs.Proc, kind: str) -> list[dict]:
    return [j for j in procs.http_json(f"{queen.url}/v1/jobs")[1]["jobs"] if j["operation"]["kind"] == kind]


def job_log(queen: procs.Proc, job_id: str) -> str:
    return procs.http_text(f"{queen.url}/v1/jobs/{job_id}/stream")


async def copy_model(queen: procs.Proc, name: str) -> None:
    """Put a second model in the embedded hive's catalog: the same weights under another name."""
    async with aiohttp.ClientSession() as session:
        jc = JobClient(session, queen.url, procs.admin_headers(queen.extra["home"]))
        await jc.run(ModelDownloadOp(hive="localhost", source=procs.model_path(), name=name))


async def ask(queen: procs.Proc, model: str) -> str:
    chat = await client(queen).chat.completions.create(model=model, messages=QUESTION, max_tokens=4, temperature=0)
    return chat.choices[0].message.content


async def test_a_request_for_an_unloaded_model_loads_it_once_for_two_callers(start_fleet):
    queen = start_fleet(queen_extra="load_keepalive_s = 0.2", models={"smollm2": SMALL})
    listed = models(queen)
    assert listed["smollm2"]["state"] == "available" and listed["smollm2"]["workers"] == 0
    assert "tools" in listed["smollm2"]["capabilities"] and listed["smollm2"]["hives"] == ["localhost"]
    assert workers(queen) == {}

    async def streamed() -> tuple[list[str], str]:
        """Raw SSE: comment lines while the model loads, then the worker's own events."""
        comments, text = [], []
        body = {"model": "smollm2", "messages": QUESTION, "max_tokens": 4, "temperature": 0, "stream": True}
        async with aiohttp.ClientSession() as session, session.post(f"{queen.url}/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
            async for raw in resp.content:
                line = raw.decode().strip()
                if line.startswith(":"):
                    comments.append(line)
                elif line.startswith("data: {"):
                    data = json.loads(line[6:])
                    assert "error" not in data, data
                    text += [c["delta"].get("content") or "" for c in data["choices"]]
        return comments, "".join(text)

    (comments, text), plain = await asyncio.gather(streamed(), ask(queen, "smollm2"))
    assert comments and all(c.startswith(": rbee: loading smollm2") for c in comments), comments
    assert text and text == plain  # greedy: the same answer both ways
    spawns = jobs(queen, "worker_spawn")
    assert len(spawns) == 1 and spawns[0]["state"] == "succeeded", spawns
    assert "on-demand load of smollm2" in job_log(queen, spawns[0]["job_id"])
    assert len(workers(queen)) == 1
    assert models(queen)["smollm2"]["state"] == "loaded" and models(queen)["smollm2"]["workers"] == 1
    assert procs.metric(queen, "rbee_model_loads_total", model="smollm2", result="loaded") == 1


async def test_an_idle_worker_unloads_after_its_ttl_and_a_pinned_one_never(start_fleet):
    # Every model's TTL is 1 s, so the inventory's own worker would go too if it were not pinned.
    queen = start_fleet(workers=[{"model": "smollm2", "name": "pinned", **SMALL}], queen_extra="idle_ttl_s = 1",
                        models={"smolb": SMALL})
    procs.wait_workers_ready(queen, 1)
    await copy_model(queen, "smolb")
    assert await ask(queen, "smolb")
    loaded = [wid for wid in workers(queen) if wid != "pinned"]
    assert len(loaded) == 1
    procs.wait_until(lambda: loaded[0] not in workers(queen), 20, what="the idle on-demand worker to unload")
    stops = jobs(queen, "worker_stop")
    assert len(stops) == 1 and stops[0]["operation"]["worker_id"] == loaded[0]
    assert "idle for" in job_log(queen, stops[0]["job_id"])
    assert models(queen)["smolb"]["state"] == "available"
    await asyncio.sleep(2)
    assert "pinned" in workers(queen) and await ask(queen, "smollm2")
    # The next request loads it again.
    assert await ask(queen, "smolb")
    assert [j["operation"]["model"] for j in jobs(queen, "worker_spawn")].count("smolb") == 2
    assert "pinned" in workers(queen)
    assert procs.metric(queen, "rbee_model_unloads_total", model="smolb", reason="idle") >= 1


async def test_lru_eviction_when_a_second_model_does_not_fit_the_hive_budget(start_fleet):
    # Each model is said to need 400 MB; the hive may give its workers 600: one at a time.
    queen = start_fleet(hive_extra="memory_budget_mb = 600",
                        models={"smollm2": {**SMALL, "memory_mb": 400}, "smolb": {**SMALL, "memory_mb": 400}})
    await copy_model(queen, "smolb")
    assert await ask(queen, "smollm2")
    (first,) = workers(queen)
    assert await ask(queen, "smolb")
    now = workers(queen)
    assert first not in now and [w["heartbeat"]["model"] for w in now.values()] == ["smolb"]
    (stop,) = jobs(queen, "worker_stop")
    assert stop["operation"]["worker_id"] == first and "evicted" in job_log(queen, stop["job_id"])
    spawn_log = job_log(queen, jobs(queen, "worker_spawn")[-1]["job_id"])
    assert "least recently used" in spawn_log
    assert models(queen)["smollm2"]["state"] == "available" and models(queen)["smolb"]["state"] == "loaded"


async def test_a_model_that_cannot_fit_gets_a_503_with_the_figures(start_fleet):
    queen = start_fleet(hive_extra="memory_budget_mb = 100", models={"smollm2": SMALL})
    for stream in (False, True):
        status, body, headers = procs.http_json(f"{queen.url}/v1/chat/completions", method="POST", body={
            "model": "smollm2", "messages": QUESTION, "max_tokens": 4, "stream": stream})
        assert status == 503, body
        message = body["error"]["message"]
        assert body["error"]["code"] == "insufficient_memory" and "Retry-After" in headers
        assert "smollm2" in message and "needs about" in message and "MB of RAM" in message
        assert "largest free memory of any hive is 100 MB (hive localhost within its memory budget of 100 MB)" in message
    assert workers(queen) == {} and jobs(queen, "worker_spawn") == []


async def test_a_model_that_fails_to_load_is_not_retried_in_a_loop(start_fleet):
    queen = start_fleet(models={"smollm2": SMALL}, queen_extra="load_retry_after_s = 60")
    status, body, _ = procs.http_json(f"{queen.url}/v1/chat/completions", method="POST",
                                      body={"model": "broken", "messages": QUESTION})
    assert status == 404 and body["error"]["code"] == "model_not_found"  # in no catalog: nothing to load
    # A model whose file is not a model: its worker fails while loading.
    await copy_model(queen, "broken")
    (weights,) = (Path(queen.extra["home"]) / "models" / "broken").glob("*.gguf")
    weights.write_bytes(b"GGUF, but not really")
    for _ in range(2):
        status, body, _ = await asyncio.to_thread(procs.http_json, f"{queen.url}/v1/chat/completions", method="POST",
                                                  body={"model": "broken", "messages": QUESTION}, timeout=60)
        assert status == 503 and body["error"]["code"] == "model_load_failed", body
    spawns = jobs(queen, "worker_spawn")
    assert len(spawns) == 1 and spawns[0]["state"] == "failed"  # the second request got the same error, no new load
    assert spawns[0]["job_id"] in body["error"]["message"]
