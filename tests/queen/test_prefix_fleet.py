"""Prefix-aware routing through a real queen over two real llama-server workers.

Which worker served a request shows in llama-server's own answer: ``timings.cache_n`` counts the prompt
tokens it took from a slot's KV cache, which only the worker that saw the conversation before can have.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from tests.support import procs


@pytest.fixture(scope="module")
def fleet(module_tmp):
    port = procs.free_port()
    inv = procs.write_inventory(module_tmp / "fleet.toml", port=port, worker_port_base=procs.free_port_range(10),
                                queen_extra="prefix_block_chars = 64\nprefix_load_guard = 0.5",
                                workers=[{"model": "smollm2", "count": 2, "threads": 1, "ctx_size": 1024, "slots": 4}])
    queen = procs.start_queen(module_tmp, inv, module_tmp / "home", port)
    procs.wait_workers_ready(queen, 2)
    yield queen
    queen.stop()
    assert queen.popen.returncode == 0, queen.log_text()[-3000:]


def conversation(topic: str, *turns: str) -> list[dict]:
    """A conversation whose every prompt starts with text of its own (a shared start would be in every
    worker's cache and blur which worker served it)."""
    notes = f"{topic.upper()}: " + ", ".join(f"{topic} note {i}" for i in range(30))
    messages = [{"role": "user", "content": f"{notes}. Tell me about {topic}."}]
    for i, text in enumerate(turns):
        messages.append({"role": "assistant" if i % 2 == 0 else "user", "content": text})
    return messages


async def chat(session: aiohttp.ClientSession, queen: procs.Proc, messages: list[dict], max_tokens: int = 8,
               **extra: object) -> dict:
    body = {"model": "smollm2", "messages": messages, "max_tokens": max_tokens, "temperature": 0, **extra}
    async with session.post(f"{queen.url}/v1/chat/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def test_turn_two_of_a_conversation_goes_to_the_worker_that_served_turn_one(fleet):
    hits = procs.metric(fleet, "rbee_routing_decisions_total", reason="prefix_hit")
    reused = procs.metric(fleet, "rbee_prompt_tokens_reused_total")
    async with aiohttp.ClientSession() as session:
        for topic in ("drones", "queens", "wax", "pollen"):  # least-busy alone would land half of these elsewhere
            first = await chat(session, fleet, conversation(topic))
            answer = first["choices"][0]["message"]["content"]
            second = await chat(session, fleet, conversation(topic, answer, "Say more, please."))
            prompt = second["usage"]["prompt_tokens"]
            assert second["timings"]["cache_n"] > prompt // 2, (topic, second["timings"], prompt)
    assert procs.metric(fleet, "rbee_routing_decisions_total", reason="prefix_hit") >= hits + 4
    assert procs.metric(fleet, "rbee_prefix_hits_total") >= hits + 4
    assert procs.metric(fleet, "rbee_prompt_tokens_reused_total") > reused


async def test_the_load_guard_sends_turn_two_elsewhere_when_its_worker_is_busy(fleet):
    guarded = procs.metric(fleet, "rbee_routing_decisions_total", reason="load_guard")
    async with aiohttp.ClientSession() as session:
        first = await chat(session, fleet, conversation("swarms"))
        answer = first["choices"][0]["message"]["content"]
        # Three long answers in the same conversation go to the same worker (3 of its 4 slots busy: the
        # first three stay within the guard of 0.5) ...
        counting = conversation("swarms", answer, "Now count from 1 to 300, separated by commas.")
        long = [asyncio.create_task(chat(session, fleet, counting, max_tokens=150, ignore_eos=True)) for _ in range(3)]

        def three_on_one() -> bool:
            busy = [w["in_flight"] for w in procs.http_json(f"{fleet.url}/v1/workers")[1]["workers"]]
            return sorted(busy) == [0, 3]

        await asyncio.to_thread(procs.wait_until, three_on_one, 30, "three requests on one worker", 0.02)
        # ... so turn two, whose prefix that worker holds, goes to the other, idle one.
        second = await chat(session, fleet, conversation("swarms", answer, "Why do they swarm?"))
        assert second["timings"]["cache_n"] < second["usage"]["prompt_tokens"] // 2, second["timings"]
        await asyncio.gather(*long)
    assert procs.metric(fleet, "rbee_routing_decisions_total", reason="load_guard") == guarded + 1
