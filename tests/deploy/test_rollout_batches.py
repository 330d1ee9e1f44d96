"""The rollout's order of work: batches, the health gate, ``--max-fail``; hosts are jobs here (the SSH tests
run the same rollout on real hosts)."""

from __future__ import annotations

import asyncio

from rbee_fleet.deploy.runner import CHANGED, FAILED, OK, SKIPPED, HostResult, RunContext
from rbee_fleet.keeper.hosts.health_gate import GateFailed
from rbee_fleet.keeper.hosts.rollout import RolloutPolicy, rollout
from tests.deploy.test_plan import spec

ALIASES = ["h0", "h1", "h2", "h3", "h4"]


def _run() -> RunContext:
    # Only check, update and ensure_workers matter to the rollout; nothing here builds or connects.
    return RunContext(release=None, builder=None, keys=None, token="t")  # type: ignore[arg-type]


def _go(policy: RolloutPolicy, fail: set[str], gate_fails: set[str] = frozenset(), unchanged: set[str] = frozenset()):
    running: list[str] = []
    gated: list[str] = []

    async def job(s, result: HostResult) -> None:
        running.append(s.alias)
        await asyncio.sleep(0.01)
        result.status = FAILED if s.alias in fail else (OK if s.alias in unchanged else CHANGED)
        result.reason = "boom" if s.alias in fail else "done"

    async def gate(s) -> None:
        gated.append(s.alias)
        if s.alias in gate_fails:
            raise GateFailed("completion", "HTTP 503: no worker")

    specs = [spec(alias=a) for a in ALIASES]
    results = asyncio.run(rollout(specs, job, _run(), parallel=8, policy=policy, gate=gate))
    return {r.alias: r for r in results}, running, gated


def test_without_a_batch_every_host_runs_and_failures_never_stop_the_others() -> None:
    results, running, gated = _go(RolloutPolicy(), fail={"h1", "h3"})
    assert sorted(running) == ALIASES
    assert [results[a].status for a in ALIASES] == [CHANGED, FAILED, CHANGED, FAILED, CHANGED]
    assert sorted(gated) == ["h0", "h2", "h4"]  # only hosts that changed are gated


def test_max_fail_stops_after_the_batch_and_skips_the_rest() -> None:
    results, running, _ = _go(RolloutPolicy(batch="2", max_fail=1), fail={"h1"})
    assert running == ["h0", "h1"]
    assert [results[a].status for a in ALIASES] == [CHANGED, FAILED, SKIPPED, SKIPPED, SKIPPED]
    assert results["h2"].reason == "not started: the rollout stopped after 1 failed host(s) (--max-fail 1)"


def test_a_failed_gate_fails_the_host_with_the_checks_output_and_counts_for_max_fail() -> None:
    results, running, gated = _go(RolloutPolicy(batch="40%", max_fail=1), fail=set(), gate_fails={"h2"},
                                  unchanged={"h0"})
    assert running == ["h0", "h1", "h2", "h3"]  # batches of 2: h2 failed in the second
    assert sorted(gated) == ["h1", "h2", "h3"]  # h0 changed nothing: not gated
    h2 = results["h2"]
    assert h2.status == FAILED and h2.error_kind == "health-gate" and h2.gate == "HTTP 503: no worker"
    assert h2.reason == "health gate: completion failed: HTTP 503: no worker"
    assert results["h4"].status == SKIPPED and results["h1"].gate == "passed"
