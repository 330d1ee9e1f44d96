"""What a deploy does to a host's workers, its batches and its rollbacks: computed from the hive's list and
the host's facts, no host needed (the SSH tests run the same on real hosts)."""

from __future__ import annotations

import pytest

from rbee_fleet.contracts.fleet import (
    CpuInfo,
    DeviceInfo,
    FleetStatus,
    GpuInfo,
    HiveView,
    ModelView,
    QueenView,
    SupervisedWorker,
    WorkerHeartbeat,
    WorkerSpawnOp,
    WorkerState,
    WorkerView,
)
from rbee_fleet.deploy.converge import plan_workers
from rbee_fleet.deploy.facts import parse_facts
from rbee_fleet.deploy.plan import marker, marker_json, plan_host
from rbee_fleet.deploy.rollback import previous_version
from rbee_fleet.keeper.hosts.rollout import batch_size
from rbee_fleet.keeper.hosts.worker_converge import no_room_for_second
from tests.deploy.test_facts import FRESH_DEBIAN
from tests.deploy.test_plan import RELEASE, TOKEN, deployed_facts, spec


def op(wid: str = "h2-smollm2-0", **over: object) -> WorkerSpawnOp:
    values: dict[str, object] = {"hive": "h2", "model": "smollm2", "worker_id": wid, "declared_as": wid,
                                 "ctx_size": 512, "threads": 1}
    values.update(over)
    return WorkerSpawnOp(**values)  # type: ignore[arg-type]


def running(o: WorkerSpawnOp, wid: str | None = None, state: str = "running", declared: bool = True) -> SupervisedWorker:
    wid = wid or o.worker_id
    assert wid is not None
    return SupervisedWorker(worker_id=wid, model=o.model, backend="llamacpp", device="cpu", port=9300,
                            url="http://127.0.0.2:9300", pid=42, state=state,
                            declared_as=o.declared_as if declared else None, settings=o.settings())


def test_a_worker_with_its_declared_settings_is_kept() -> None:
    changes = plan_workers([op()], [running(op())])
    assert [(c.action, c.running) for c in changes] == [("ok", "h2-smollm2-0")]
    assert not any(c.changes for c in changes)


def test_a_missing_worker_is_started_under_its_declared_id() -> None:
    (change,) = plan_workers([op()], [running(op(), state="failed")])
    assert change.action == "start" and change.new_id == "h2-smollm2-0"
    assert change.op is not None and change.op.declared_as == "h2-smollm2-0"
    assert change.describe() == "start worker h2-smollm2-0 (smollm2)"


def test_a_changed_setting_replaces_the_worker_under_the_other_id_and_names_the_setting() -> None:
    (change,) = plan_workers([op(ctx_size=1024)], [running(op())])
    assert change.action == "replace" and change.running == "h2-smollm2-0" and change.new_id == "h2-smollm2-0.2"
    assert change.changed == ("ctx_size 512 -> 1024",)
    assert change.describe() == "replace worker h2-smollm2-0 by h2-smollm2-0.2 (ctx_size 512 -> 1024)"
    assert change.op is not None and change.op.worker_id == "h2-smollm2-0.2" and change.op.ctx_size == 1024
    # The replacement is the declared worker: the next change goes back to the plain id.
    new = running(change.op)
    assert plan_workers([op(ctx_size=1024)], [new])[0].action == "ok"
    (back,) = plan_workers([op(ctx_size=2048, slots=2)], [new])
    assert back.new_id == "h2-smollm2-0" and back.changed == ("ctx_size 1024 -> 2048", "slots default -> 2")


def test_workers_the_inventory_dropped_are_stopped_and_others_are_left_alone() -> None:
    gone = running(op("h2-smollm2-1"))
    by_hand = running(op("mine", declared_as=None), declared=False)
    on_demand = running(op("h2-smollm2-auto-0", declared_as=None), declared=False)
    changes = plan_workers([op()], [running(op()), gone, by_hand, on_demand])
    assert [(c.action, c.running) for c in changes] == [("ok", "h2-smollm2-0"), ("stop", "h2-smollm2-1")]
    assert changes[1].describe() == "stop worker h2-smollm2-1 (no longer in the inventory)"


def test_an_interrupted_replacement_leaves_one_worker_and_stops_the_other() -> None:
    old, new = running(op()), running(op(ctx_size=1024), wid="h2-smollm2-0.2")
    changes = plan_workers([op(ctx_size=1024)], [old, new])
    assert [(c.action, c.running) for c in changes] == [("ok", "h2-smollm2-0.2"), ("stop", "h2-smollm2-0")]


def test_a_redeploy_with_no_change_changes_no_worker() -> None:
    ops = [op(), op("h2-smollm2-1", slots=2)]
    assert not any(c.changes for c in plan_workers(ops, [running(o) for o in ops]))


@pytest.mark.parametrize(("text", "hosts", "size"), [(None, 7, 7), ("2", 7, 2), ("25%", 4, 1), ("25%", 7, 2),
                                                     ("100%", 3, 3), ("1%", 3, 1), ("10", 3, 10)])
def test_batches_by_count_or_percentage(text: str | None, hosts: int, size: int) -> None:
    assert batch_size(text, hosts) == size


@pytest.mark.parametrize("text", ["0", "0%", "150%", "x", "-1", "2.5"])
def test_a_bad_batch_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="--batch"):
        batch_size(text, 4)


def test_the_marker_records_the_version_switched_from_and_keeps_it() -> None:
    old = "0.0.9-bbbb"
    facts = parse_facts(deployed_facts(old, extra=f"version_dir={RELEASE}"))
    plan = plan_host(spec(), facts, RELEASE, TOKEN)
    assert plan.has("switch") and plan.previous == old and not plan.prune
    # Nothing switched: the recorded previous version stays, and is not pruned.
    facts = parse_facts(FRESH_DEBIAN)
    mark = marker_json(marker(RELEASE, "0.1.0", plan.config_hash, spec(), facts, old))
    text = "\n".join([FRESH_DEBIAN.rstrip(), f"marker={mark}", f"current=versions/{RELEASE}",
                      f"version_dir={RELEASE}", f"version_dir={old}", "version_dir=0.0.8-cccc",
                      "hive=running 77", "port_listener=127.0.0.2:9000"]) + "\n"
    again = plan_host(spec(), parse_facts(text), RELEASE, TOKEN)
    assert again.previous == old and again.prune == ("0.0.8-cccc",)
    assert [s.action for s in again.steps] == ["wait", "prune", "workers"]


def test_rollback_goes_to_the_recorded_previous_version_or_the_only_other_one() -> None:
    facts = parse_facts(deployed_facts(extra="version_dir=0.0.9-bbbb"))
    assert previous_version(facts) == "0.0.9-bbbb"
    assert previous_version(parse_facts(deployed_facts())) is None  # only the current one is there
    many = parse_facts(deployed_facts(extra="version_dir=0.0.9-bbbb\nversion_dir=0.0.8-cccc"))
    assert previous_version(many) is None  # ambiguous without a record


def test_a_replacement_that_does_not_fit_beside_the_old_worker_waits_for_its_drain() -> None:
    def fleet(ram_free: int, vram_free: int) -> FleetStatus:
        devices = DeviceInfo(cpu=CpuInfo(cores=2, threads=2, ram_total_mb=4096, ram_available_mb=ram_free),
                             gpus=[GpuInfo(index=0, name="g", vram_total_mb=8192, vram_free_mb=vram_free)])
        hive = HiveView(hive_id="h2", url="http://x", version="0", embedded=False, live=True, last_seen_s=0,
                        devices=devices, workers=[])
        queen = QueenView(version="0", url="http://q", started_at=0, uptime_s=1, requests_total=0, in_flight=0)
        return FleetStatus(queen=queen, hives=[hive], workers=[], models=["smollm2"],
                           catalog=[ModelView(id="smollm2", state="loaded", need_mb=400)])

    assert no_room_for_second(fleet(2000, 0), "h2", "smollm2", gpu=False) is None
    why = no_room_for_second(fleet(300, 9000), "h2", "smollm2", gpu=False)
    assert why == "a second smollm2 worker needs about 400 MB and the host has 300 MB of RAM free"
    assert no_room_for_second(fleet(9000, 300), "h2", "smollm2", gpu=True) is not None
    assert no_room_for_second(fleet(300, 300), "other", "smollm2", gpu=False) is None  # the queen cannot tell
    # The host's memory budget less what its live workers take bounds the room too (the devices have plenty).
    status = fleet(9000, 0)
    heartbeat = WorkerHeartbeat(worker_id="h2-smollm2-0", hive_id="h2", model="smollm2", url="http://x:9300",
                                state=WorkerState.READY, backend="llama-cpp", device="cpu")
    status.workers = [WorkerView(heartbeat=heartbeat, in_flight=0, live=True, last_seen_s=0.1)]
    assert no_room_for_second(status, "h2", "smollm2", gpu=False, budget_mb=800) is None  # 800 - 400 = 400 left
    why = no_room_for_second(status, "h2", "smollm2", gpu=False, budget_mb=700)
    assert why == ("a second smollm2 worker needs about 400 MB and the host's memory budget has 300 MB left "
                   "(700 MB, 400 MB taken by its workers)")
    status.workers[0].heartbeat.state = WorkerState.STOPPED  # a stopped worker takes nothing
    assert no_room_for_second(status, "h2", "smollm2", gpu=False, budget_mb=700) is None
