"""Converge on the queen's own machine: the TUI's deploy of the embedded hive replaces a worker whose
settings changed beside the old one, through a real queen and real workers (no SSH; tests/ssh/test_rollout.py
does the same on remote hosts while a client streams)."""

from __future__ import annotations

from pathlib import Path

from rbee_fleet.common.inventory import load_inventory
from rbee_fleet.common.paths import Layout
from rbee_fleet.keeper.context import KeeperContext
from rbee_fleet.keeper.hosts.service import HostService
from rbee_fleet.keeper.queen_service import QueenService
from tests.support import procs


def _service(inventory: Path) -> HostService:
    ctx = KeeperContext(inventory=load_inventory(inventory), inventory_path=str(inventory), layout=Layout.default())
    return HostService(QueenService(ctx))


def _workers(queen: procs.Proc) -> dict[str, dict]:
    return {w["heartbeat"]["worker_id"]: w for w in procs.http_json(f"{queen.url}/v1/workers")[1]["workers"]}


async def test_the_embedded_hive_converges_to_changed_settings(tmp_path: Path, home: Path) -> None:
    port, base = procs.free_port(), procs.free_port_range(10)
    inventory = procs.write_inventory(tmp_path / "fleet.toml", port=port, worker_port_base=base,
                                      workers=[{"model": "smollm2", "threads": 1, "ctx_size": 512}])
    queen = procs.start_queen(tmp_path, inventory, home, port)
    try:
        procs.wait_workers_ready(queen, 1)
        assert _workers(queen)["localhost-smollm2-0"]["heartbeat"]["context_length"] == 512
        procs.write_inventory(inventory, port=port, worker_port_base=base,
                              workers=[{"model": "smollm2", "threads": 1, "ctx_size": 1024}])
        hosts = _service(inventory)
        try:
            plan = await hosts.plan(["localhost"])
            assert [(s.what, s.status, s.detail) for s in plan][1:] == [
                ("localhost-smollm2-0", "change",
                 "replace worker localhost-smollm2-0 by localhost-smollm2-0.2 (ctx_size 512 -> 1024)")]
            (result,) = await hosts.deploy(["localhost"])
            assert result.status == "changed", result.reason
            assert result.reason == "replaced worker localhost-smollm2-0 by localhost-smollm2-0.2 (ctx_size 512 -> 1024)"
            procs.wait_until(lambda: set(_workers(queen)) == {"localhost-smollm2-0.2"}, 30, what="the old worker gone")
            assert _workers(queen)["localhost-smollm2-0.2"]["heartbeat"]["context_length"] == 1024
            (again,) = await hosts.deploy(["localhost"])
            assert again.status == "ok" and again.reason == "nothing to change", again.reason
        finally:
            await hosts.queen.close()
    finally:
        queen.stop()


async def test_a_replacement_over_the_hosts_memory_budget_drains_the_old_worker_first(tmp_path: Path, home: Path) -> None:
    """With a budget that holds one SmolLM2 worker but not two, the changed worker is stopped (drained) before
    its replacement starts, so the host never runs both; the progress says why."""
    port, base = procs.free_port(), procs.free_port_range(10)
    budget = 'memory_budget_mb = 500'  # the queen's estimate for one SmolLM2 worker is about 370 MB
    inventory = procs.write_inventory(tmp_path / "fleet.toml", port=port, worker_port_base=base, hive_extra=budget,
                                      workers=[{"model": "smollm2", "threads": 1, "ctx_size": 512}])
    queen = procs.start_queen(tmp_path, inventory, home, port)
    try:
        procs.wait_workers_ready(queen, 1)
        procs.write_inventory(inventory, port=port, worker_port_base=base, hive_extra=budget,
                              workers=[{"model": "smollm2", "threads": 1, "ctx_size": 1024}])
        hosts = _service(inventory)
        said: list[str] = []
        try:
            (result,) = await hosts.deploy(["localhost"], lambda _label, event: said.append(event.message or ""))
            assert result.status == "changed" and result.gate == "passed", result.reason
            assert result.reason == "replaced worker localhost-smollm2-0 by localhost-smollm2-0.2 (ctx_size 512 -> 1024)"
        finally:
            await hosts.queen.close()
        first = next(m for m in said if m.startswith("replacing worker localhost-smollm2-0:"))
        assert "the host's memory budget has" in first and "(500 MB, " in first and first.endswith("stopping it first (it drains its requests)")
        stop = said.index("stopping worker localhost-smollm2-0 (it drains its requests first)")
        start = said.index("starting worker localhost-smollm2-0.2 (smollm2)")
        assert stop < start, said
        assert set(_workers(queen)) == {"localhost-smollm2-0.2"}
        assert _workers(queen)["localhost-smollm2-0.2"]["heartbeat"]["context_length"] == 1024
    finally:
        queen.stop()
