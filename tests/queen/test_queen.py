"""A real queen with its embedded hive running two real workers, used through the official openai client."""

from __future__ import annotations

import asyncio
import os
import signal

import aiohttp
import openai
import pytest

from tests.support import procs

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module")
def fleet(module_tmp):
    port = procs.free_port()
    inv = procs.write_inventory(module_tmp / "fleet.toml", port=port, worker_port_base=procs.free_port_range(10),
                                workers=[{"model": "smollm2", "count": 2, "threads": 1, "ctx_size": 1024}])
    queen = procs.start_queen(module_tmp, inv, module_tmp / "home", port)
    procs.wait_workers_ready(queen, 2)
    yield queen
    queen.stop()
    assert queen.popen.returncode == 0, queen.log_text()[-3000:]


@pytest.fixture
def client(fleet):
    return openai.AsyncOpenAI(base_url=f"{fleet.url}/v1", api_key="unused-on-loopback", max_retries=0)


def workers(queen) -> dict[str, dict]:
    return {w["heartbeat"]["worker_id"]: w for w in procs.http_json(f"{queen.url}/v1/workers")[1]["workers"]}


async def test_models_lists_what_the_workers_serve(client):
    models = await client.models.list()
    assert [m.id for m in models.data] == ["smollm2"]


async def test_chat_and_completions_stream_and_not(client):
    chat = await client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=20)
    assert "Paris" in chat.choices[0].message.content and chat.usage.completion_tokens > 0

    text, usage = [], None
    stream = await client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=20,
                                                  stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        usage = chunk.usage or usage
        text += [c.delta.content or "" for c in chunk.choices]
    assert "".join(text) == chat.choices[0].message.content
    assert usage.completion_tokens == chat.usage.completion_tokens

    comp = await client.completions.create(model="smollm2", prompt="The sky is", max_tokens=5, temperature=0)
    assert comp.choices[0].finish_reason == "length" and comp.usage.completion_tokens == 5
    pieces = []
    stream = await client.completions.create(model="smollm2", prompt="The sky is", max_tokens=5, temperature=0, stream=True)
    async for chunk in stream:
        pieces.append(chunk.choices[0].text)
    assert "".join(pieces) == comp.choices[0].text


async def test_concurrent_requests_spread_over_both_workers(client, fleet):
    await asyncio.sleep(1.2)  # a fresh heartbeat, so the counters below start from the truth
    before = {wid: w["heartbeat"]["tokens_generated_total"] for wid, w in workers(fleet).items()}
    seen_busy: set[str] = set()

    async def one() -> None:
        await client.completions.create(model="smollm2", **procs.LONG, max_tokens=24)

    tasks = [asyncio.create_task(one()) for _ in range(4)]
    for _ in range(50):
        await asyncio.sleep(0.05)
        seen_busy |= {wid for wid, w in workers(fleet).items() if w["in_flight"] > 0}
        if all(t.done() for t in tasks):
            break
    await asyncio.gather(*tasks)
    assert len(seen_busy) == 2, "both workers should have had requests in flight at once"
    await asyncio.sleep(1.2)  # let a heartbeat carry the workers' counters
    after = {wid: w["heartbeat"]["tokens_generated_total"] for wid, w in workers(fleet).items()}
    served = {wid: after[wid] - before.get(wid, 0) for wid in after}  # llama-server's own token counts
    assert sum(served.values()) == 4 * 24 and all(n >= 24 for n in served.values()), served
    assert all(w["in_flight"] == 0 for w in workers(fleet).values())


BAD = [
    ("malformed JSON", "/v1/chat/completions", b'{"model": ', 400, None),
    ("missing messages", "/v1/chat/completions", b'{"model": "smollm2"}', 400, "messages"),
    ("missing prompt", "/v1/completions", b'{"model": "smollm2"}', 400, "prompt"),
    ("wrong type", "/v1/chat/completions", b'{"model": "smollm2", "messages": [], "stream": "yes"}', 400, None),
    ("negative max_tokens", "/v1/completions", b'{"model": "smollm2", "prompt": "x", "max_tokens": -3}', 400, "max_tokens"),
    ("huge max_tokens", "/v1/completions", b'{"model": "smollm2", "prompt": "x", "max_tokens": 5000}', 400, "max_tokens"),
    ("unknown model", "/v1/chat/completions", b'{"model": "nope", "messages": [{"role": "user", "content": "x"}]}', 404, "model"),
]


@pytest.mark.parametrize("label, path, data, status, param", BAD, ids=[b[0] for b in BAD])
def test_bad_input_through_the_queen(fleet, label, path, data, status, param):
    got, body, _ = procs.http_json(fleet.url + path, method="POST", body=data)
    assert got == status, body
    assert set(body["error"]) == {"message", "type", "param", "code"}
    if param:
        assert body["error"]["param"] == param
    if status == 404:
        assert body["error"]["code"] == "model_not_found"


def test_prompt_over_context_and_http_errors_through_the_queen(fleet):
    got, body, _ = procs.http_json(fleet.url + "/v1/completions", method="POST",
                                   body={"model": "smollm2", "prompt": "bee " * 1500, "stream": True})
    assert got == 400 and body["error"]["code"] == "context_length_exceeded"
    got, body, headers = procs.http_json(fleet.url + "/v1/completions", method="GET")
    assert got == 405 and body["error"]["code"] == "method_not_allowed"
    got, body, _ = procs.http_json(fleet.url + "/v2/anything")
    assert got == 404 and body["error"]["code"] == "not_found"
    got, body, _ = procs.http_json(fleet.url + "/v1/completions", method="POST", body=b"{" + b" " * (5 * 2**20) + b"}")
    assert got == 413
    got, body, _ = procs.http_json(fleet.url + "/v1/completions", method="POST",
                                   body={"model": "smollm2", "prompt": "ok", "max_tokens": 2})
    assert got == 200 and body["usage"]["completion_tokens"] == 2


def test_heartbeats_need_the_cluster_token(fleet):
    beat = {"worker_id": "intruder", "hive_id": "x", "model": "evil", "backend": "llamacpp", "device": "cpu",
            "url": "http://127.0.0.1:1", "state": "ready"}
    got, body, _ = procs.http_json(fleet.url + "/v1/worker-heartbeat", method="POST", body=beat)
    assert got == 401 and body["error"]["type"] == "authentication_error"
    assert "intruder" not in workers(fleet)


def test_an_uninstalled_hive_is_forgotten_with_the_cluster_token_only(fleet):
    token = procs.admin_headers(fleet.extra["home"])
    beat = {"hive_id": "gone-box", "url": "http://127.0.0.9:9000", "version": "0.1.0",
            "devices": {"cpu": {"cores": 1, "threads": 1, "ram_total_mb": 1024, "ram_available_mb": 512}}}
    assert procs.http_json(fleet.url + "/v1/hive-heartbeat", method="POST", body=beat, headers=token)[0] == 200

    def hives() -> set[str]:
        return {h["hive_id"] for h in procs.http_json(fleet.url + "/v1/hives")[1]["hives"]}

    assert "gone-box" in hives()
    got, body, _ = procs.http_json(fleet.url + "/v1/hives/gone-box", method="DELETE")
    assert got == 401 and body["error"]["type"] == "authentication_error" and "gone-box" in hives()
    assert procs.http_json(fleet.url + "/v1/hives/gone-box", method="DELETE", headers=token)[1] == {"forgotten": True}
    assert "gone-box" not in hives()
    assert procs.http_json(fleet.url + "/v1/hives/gone-box", method="DELETE", headers=token)[1] == {"forgotten": False}
    # The embedded hive is the queen's own: never forgotten.
    assert procs.http_json(fleet.url + "/v1/hives/localhost", method="DELETE", headers=token)[1] == {"forgotten": False}
    assert "localhost" in hives()


def metric_samples(queen) -> dict[str, float]:
    samples = {}
    for line in procs.http_text(f"{queen.url}/metrics").splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


async def test_metrics_count_requests_tokens_and_first_tokens(client, fleet):
    stream = await client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=8, stream=True)
    assert [c async for c in stream]
    samples = metric_samples(fleet)
    ok = [v for k, v in samples.items() if k.startswith("rbee_requests_total{") and 'status="200"' in k]
    assert sum(ok) >= 1
    assert samples['rbee_time_to_first_token_seconds_count{model="smollm2"}'] >= 1
    assert samples['rbee_tokens_total{kind="completion",model="smollm2"}'] > 0
    assert samples['rbee_workers{model="smollm2",state="ready"}'] == 2
    assert 'rbee_requests_in_flight{model="smollm2"}' in samples


async def test_a_client_that_hangs_up_is_counted_as_such_not_as_a_dead_worker(fleet):
    died = 'rbee_request_errors_total{model="smollm2",reason="worker_died_mid_stream"}'
    before = metric_samples(fleet).get(died, 0.0)
    body = {"model": "smollm2", **procs.LONG, "max_tokens": 400, "stream": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{fleet.url}/v1/completions", json=body) as resp:
            assert resp.status == 200
            await resp.content.readany()
        # leaving the block closes the connection mid-answer

    def hung_up() -> bool:
        return any(k.startswith("rbee_requests_total{") and 'status="499"' in k for k in metric_samples(fleet))

    procs.wait_until(hung_up, 15, what="the queen to record the request as closed by the client (499)")
    procs.wait_until(lambda: metric_samples(fleet)['rbee_requests_in_flight{model="smollm2"}'] == 0, 15,
                     what="the hung-up request to leave the in-flight gauge")
    assert metric_samples(fleet).get(died, 0.0) == before
    procs.wait_workers_ready(fleet, 2)


async def test_worker_killed_mid_stream_ends_the_stream_with_an_error_and_is_restarted(client, fleet):
    stream = await client.completions.create(model="smollm2", **procs.LONG, max_tokens=400, stream=True)
    got = 0
    with pytest.raises(openai.APIError) as info:
        async for _chunk in stream:
            got += 1
            if got == 3:
                busy = [w for w in workers(fleet).values() if w["in_flight"] > 0]
                assert len(busy) == 1
                victim = busy[0]["heartbeat"]
                os.kill(victim["pid"], signal.SIGKILL)
    assert "stopped in the middle of the answer" in str(info.value.message)

    def restarted() -> bool:
        hive = procs.http_json(f"{fleet.url}/v1/hives")[1]["hives"][0]
        w = {x["worker_id"]: x for x in hive["workers"]}[victim["worker_id"]]
        return w["restarts"] >= 1 and w["state"] == "running" and "SIGKILL" in (w["last_exit"] or "")

    procs.wait_until(restarted, 30, what="the hive to restart the killed worker")
    procs.wait_workers_ready(fleet, 2)
    assert workers(fleet)[victim["worker_id"]]["heartbeat"]["pid"] != victim["pid"]
    after = await client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=8)
    assert after.choices[0].message.content


async def test_worker_dead_before_its_first_byte_is_retried_on_the_other(client, fleet):
    procs.wait_workers_ready(fleet, 2)
    ws = workers(fleet)
    victim = sorted(ws)[0]
    os.kill(ws[victim]["heartbeat"]["pid"], signal.SIGKILL)
    # Its last heartbeat still counts for up to 2 s: requests placed on it now fail to connect.
    results = await asyncio.gather(*(client.completions.create(model="smollm2", prompt="Hi", max_tokens=2)
                                     for _ in range(4)))
    assert all(r.usage.completion_tokens == 2 for r in results)
    metrics = procs.http_text(f"{fleet.url}/metrics")
    retries = [line for line in metrics.splitlines() if line.startswith('rbee_worker_retries_total{model="smollm2"}')]
    assert retries and float(retries[0].split()[-1]) >= 1
    procs.wait_workers_ready(fleet, 2)


async def test_job_api_spawns_and_stops_a_worker_on_the_embedded_hive(fleet):
    async with aiohttp.ClientSession() as session:
        from rbee_fleet.common.jobs import JobClient
        from rbee_fleet.contracts.fleet import WorkerSpawnOp, WorkerStopOp

        jobs = JobClient(session, fleet.url, procs.admin_headers(fleet.extra["home"]))
        events = []
        result = await jobs.run(WorkerSpawnOp(model="smollm2", worker_id="extra", threads=1, ctx_size=512),
                                on_event=events.append)
        assert result["worker"]["worker_id"] == "extra" and result["changed"] is True
        # The hive records what the worker was asked to run with: what a deploy compares with the inventory.
        assert result["worker"]["settings"]["ctx_size"] == 512 and result["worker"]["settings"]["threads"] == 1
        assert any("ready" in e.message for e in events)
        again = await jobs.run(WorkerSpawnOp(model="smollm2", worker_id="extra", threads=1, ctx_size=512))
        assert again["changed"] is False
        procs.wait_until(lambda: "extra" in workers(fleet), 10, what="the new worker's heartbeat")
        await jobs.run(WorkerStopOp(worker_id="extra"))
        procs.wait_until(lambda: "extra" not in workers(fleet), 10, what="the stopped worker to leave")
        with pytest.raises(Exception, match="no model 'no-such-model' in this hive's catalog"):
            await jobs.run(WorkerSpawnOp(model="no-such-model"))


def test_operators_may_pin_a_request_to_one_hive(fleet):
    """A deploy's health gate tests one host: ``X-Rbee-Hive`` (cluster token only) keeps the request there."""
    body = {"model": "smollm2", "messages": QUESTION, "max_tokens": 2, "temperature": 0}
    admin = procs.admin_headers(fleet.extra["home"])
    status, answer, _ = procs.http_json(f"{fleet.url}/v1/chat/completions", method="POST", body=body,
                                        headers={**admin, "X-Rbee-Hive": "localhost"})
    assert status == 200 and answer["choices"], answer
    status, answer, _ = procs.http_json(f"{fleet.url}/v1/chat/completions", method="POST", body=body,
                                        headers={**admin, "X-Rbee-Hive": "elsewhere"})
    assert status == 503 and "no worker of 'smollm2' on hive 'elsewhere'" in answer["error"]["message"], answer
    status, answer, _ = procs.http_json(f"{fleet.url}/v1/chat/completions", method="POST", body=body, headers={"X-Rbee-Hive": "localhost"})
    assert status == 403 and answer["error"]["type"] == "permission_error", answer
