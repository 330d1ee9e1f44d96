"""Prefix-aware routing on the queen's real registry records: block hashes, longest prefix, load guard, aging."""

from __future__ import annotations

import time

from rbee_fleet.contracts.fleet import WorkerHeartbeat, WorkerState
from rbee_fleet.queen.prefix_routing import (
    LEAST_BUSY,
    LOAD_GUARD,
    PREFIX_HIT,
    PrefixRouter,
    block_hashes,
    render,
)
from rbee_fleet.queen.proxy import usage_from_tail
from rbee_fleet.queen.registry import WorkerRecord

SYSTEM = {"role": "system", "content": "You are a patient tutor who explains bees. " * 10}


def worker(wid: str, slots: int = 4, in_flight: int = 0) -> WorkerRecord:
    hb = WorkerHeartbeat(worker_id=wid, hive_id="h", model="m", backend="llamacpp", device="cpu",
                         url=f"http://127.0.0.1/{wid}", state=WorkerState.READY, slots_total=slots)
    return WorkerRecord(hb=hb, last_seen=time.monotonic(), in_flight=in_flight)


def chat(*turns: str) -> dict:
    messages = [SYSTEM]
    for i, text in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return {"model": "m", "messages": messages}


def test_hashes_are_chained_over_whole_blocks():
    a = block_hashes("x" * 100 + "y" * 100, 64)
    b = block_hashes("x" * 100 + "z" * 100, 64)
    assert len(a) == 3  # 200 chars: 3 whole blocks, the last 8 chars left out
    assert a[0] == b[0] and a[1] != b[1]  # the second block differs, and so does every hash after it
    assert block_hashes("short", 64) == []
    # Same block text at another position is another prefix.
    assert block_hashes("ab" * 64, 64)[1] != block_hashes("ab" * 64, 64)[0]


def test_a_conversations_next_turn_extends_its_rendered_prefix():
    turn1 = render("chat/completions", chat("Why do bees dance?"))
    turn2 = render("chat/completions", chat("Why do bees dance?", "To share where food is.", "And how far?"))
    assert turn2.startswith(turn1)
    assert render("completions", {"prompt": "abc"}) == "abc"
    assert render("embeddings", {"input": "abc"}) == ""


def test_turn_two_goes_where_turn_one_went():
    router = PrefixRouter(block_chars=32)
    decisions: list[str] = []
    router.on_decision = lambda model, reason: decisions.append(reason)
    w1, w2 = worker("w1"), worker("w2")
    first = router.choose("m", [w1, w2], router.hashes("chat/completions", chat("Why do bees dance?")))
    assert decisions == [LEAST_BUSY]
    other = w2 if first is w1 else w1
    turn2 = router.hashes("chat/completions", chat("Why do bees dance?", "To share where food is.", "And how far?"))
    for _ in range(20):  # never by chance: the holder wins every time while it is not much busier
        assert router.choose("m", [w1, w2], turn2) is first
    assert decisions[1:] == [PREFIX_HIT] * 20
    assert router.match(other.id, turn2) == 0


def test_the_load_guard_sends_a_busy_holders_request_to_the_least_busy():
    router = PrefixRouter(block_chars=32, load_guard=0.5)
    hashes = router.hashes("chat/completions", chat("Tell me about hives."))
    holder, idle = worker("holder"), worker("idle")
    router.remember(holder.id, hashes)
    holder.in_flight = 2  # 2 of 4 slots busy: 0.5 more than the idle one, not more than the guard
    assert router.choose("m", [holder, idle], hashes) is holder
    holder.in_flight = 3  # 0.75 more: too busy
    decisions: list[str] = []
    router.on_decision = lambda model, reason: decisions.append(reason)
    assert router.choose("m", [holder, idle], hashes) is idle
    assert decisions == [LOAD_GUARD]


def test_longest_prefix_wins_and_ties_go_to_the_least_busy():
    router = PrefixRouter(block_chars=16, load_guard=0.5)
    long_conv = router.hashes("completions", {"prompt": "a" * 16 + "b" * 16 + "c" * 16})
    a, b, c = worker("a"), worker("b", in_flight=1), worker("c")
    router.remember("a", long_conv[:1])
    router.remember("b", long_conv)
    assert router.choose("m", [a, b, c], long_conv) is b  # 3 blocks beats 1, b being busier within the guard
    strict = PrefixRouter(block_chars=16)  # the default guard, 0: a busier holder never wins
    strict.remember("b", long_conv)
    assert strict.choose("m", [a, b, c], long_conv) in (a, c)
    fresh, idle_b = PrefixRouter(block_chars=16), worker("b")
    fresh.remember("b", long_conv)
    assert fresh.choose("m", [a, idle_b, c], long_conv) is idle_b  # no busier than the rest: the holder wins
    router2 = PrefixRouter(block_chars=16)
    router2.remember("a", long_conv)
    router2.remember("b", long_conv)
    assert router2.choose("m", [a, b], long_conv) is a  # same prefix: the less busy one


def test_memory_is_bounded_and_old_prefixes_age_out():
    router = PrefixRouter(block_chars=16, max_blocks=10, ttl_s=60)
    router.remember("w", list(range(25)))
    assert router.blocks_held() == 10 and router.match("w", [24]) == 1 and router.match("w", [0]) == 0
    now = time.monotonic()
    assert router.match("w", [24], now + 61) == 0  # older than the TTL: forgotten
    router.remember("fresh", [1], now + 61)
    assert "w" not in router._seen  # a worker not sent anything for a whole TTL loses its table


def test_tokens_reused_are_read_from_llama_servers_timings():
    tail = (b'data: {"choices":[{"finish_reason":"stop"}],"timings":{"cache_n":700,"prompt_n":12,"predicted_n":4}}\n\n'
            b'data: {"choices":[],"usage":{"prompt_tokens":712,"completion_tokens":4,"total_tokens":716}}\n\n'
            b"data: [DONE]\n\n")
    usage = usage_from_tail(tail)
    assert usage["completion_tokens"] == 4 and usage["prompt_tokens_details"] == {"cached_tokens": 700}
    plain = usage_from_tail(b'data: {"timings":{"cache_n":9,"prompt_n":1,"predicted_n":2}}\n\ndata: [DONE]\n\n')
    assert plain == {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12,
                     "prompt_tokens_details": {"cached_tokens": 9}}
