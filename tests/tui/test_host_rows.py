"""A host's state on the fleet screen, from the inventory, what the queen reports and what SSH found."""

from __future__ import annotations

from rbee_fleet.common.inventory import parse_inventory
from rbee_fleet.contracts.fleet import (
    CpuInfo,
    DeviceInfo,
    FleetStatus,
    GpuInfo,
    HiveView,
    QueenView,
    SupervisedWorker,
    WorkerHeartbeat,
    WorkerState,
    WorkerView,
)
from rbee_fleet.keeper.hosts.probe import HostProbe
from rbee_fleet.tui.format import spark
from rbee_fleet.tui.host_rows import (
    HostState,
    RateMeter,
    devices_short,
    format_duration,
    host_rows,
    needs_probe,
)

INV = parse_inventory("""
[hives.local]
embedded = true
[[hives.local.workers]]
model = "m"
[hives.far]
address = "10.0.0.2"
ssh_host = "far.lan"
[[hives.far.workers]]
model = "m"
name = "big"
[hives.new]
address = "10.0.0.3"
""")

CPU = DeviceInfo(cpu=CpuInfo(cores=4, threads=8, ram_total_mb=16384, ram_available_mb=8192))


def hive(hive_id: str, live: bool = True, workers: list[SupervisedWorker] | None = None) -> HiveView:
    return HiveView(hive_id=hive_id, url="http://x", version="9.9", embedded=hive_id == "local", live=live,
                    last_seen_s=0.5 if live else 42.0, devices=CPU, workers=workers or [])


def view(worker_id: str, hive_id: str, state: WorkerState = WorkerState.READY, live: bool = True,
         tps: float = 10.0, in_flight: int = 1) -> WorkerView:
    hb = WorkerHeartbeat(worker_id=worker_id, hive_id=hive_id, model="m", backend="llamacpp", device="cpu",
                         url="http://x:1", state=state, tokens_per_second=tps)
    return WorkerView(heartbeat=hb, in_flight=in_flight, live=live, last_seen_s=0.1)


def status(hives: list[HiveView], workers: list[WorkerView]) -> FleetStatus:
    queen = QueenView(version="9.9", url="http://q", started_at=0, uptime_s=1, requests_total=0, in_flight=0)
    return FleetStatus(queen=queen, hives=hives, workers=workers, models=["m"])


def states(st: FleetStatus | None, busy: dict[str, str] | None = None) -> dict[str, HostState]:
    return {r.alias: r.state for r in host_rows(INV, st, busy)}


def test_every_inventory_host_gets_a_row_in_inventory_order():
    rows = host_rows(INV, None)
    assert [r.alias for r in rows] == ["local", "far", "new"]
    assert [r.address for r in rows] == ["127.0.0.1", "far.lan", "10.0.0.3"]


def test_queen_down_the_embedded_host_is_stopped_the_others_unknown():
    assert states(None) == {"local": HostState.STOPPED, "far": HostState.UNKNOWN, "new": HostState.UNKNOWN}


def test_up_degraded_unreachable_and_never_seen():
    st = status([hive("local"), hive("far", live=False)],
                [view("local-m-0", "local", tps=12.5), view("big", "far", live=False)])
    rows = {r.alias: r for r in host_rows(INV, st)}
    assert rows["local"].state is HostState.UP and rows["local"].tokens_per_s == 12.5 and rows["local"].in_flight == 1
    assert rows["far"].state is HostState.UNREACHABLE and "42" in rows["far"].reason
    assert rows["far"].in_flight == 0 and rows["far"].tokens_per_s == 0  # a silent worker counts for nothing
    assert rows["new"].state is HostState.UNKNOWN and "no heartbeat" in rows["new"].reason


def test_a_missing_or_failed_declared_worker_degrades_the_host():
    assert states(status([hive("local")], []))["local"] is HostState.DEGRADED
    failed = SupervisedWorker(worker_id="local-m-0", model="m", backend="llamacpp", device="cpu", port=1,
                              url="http://x:1", pid=None, state="failed")
    rows = host_rows(INV, status([hive("local", workers=[failed])], []))
    assert rows[0].state is HostState.DEGRADED and "local-m-0" in rows[0].reason


def test_loading_workers_mean_starting_and_extra_workers_are_listed():
    st = status([hive("local")], [view("local-m-0", "local", WorkerState.LOADING), view("extra", "local")])
    row = host_rows(INV, st)[0]
    assert row.state is HostState.STARTING
    assert [(w.worker_id, w.declared) for w in row.workers] == [("local-m-0", True), ("extra", False)]
    assert (row.running, row.declared) == (1, 1)


def test_a_deploys_replacement_of_a_declared_worker_takes_its_row():
    new = SupervisedWorker(worker_id="big.2", model="m", backend="llamacpp", device="cpu", port=1, url="http://x:1",
                           pid=7, state="running", declared_as="big")
    row = host_rows(INV, status([hive("far", workers=[new])], [view("big.2", "far")]))[1]
    assert [(w.worker_id, w.declared) for w in row.workers] == [("big.2", True)]
    assert row.state is HostState.UP and (row.running, row.declared) == (1, 1)


def test_a_running_host_action_shows_as_its_state():
    st = status([hive("local")], [view("local-m-0", "local")])
    assert states(st, {"far": "install", "local": "restart"}) == {
        "local": HostState.STARTING, "far": HostState.INSTALLING, "new": HostState.UNKNOWN}


def test_cells_and_meters():
    gpu = DeviceInfo(cpu=CPU.cpu, gpus=[GpuInfo(index=0, name="RTX 3090", vram_total_mb=24576, vram_free_mb=6144)])
    assert devices_short(gpu) == "RTX 3090 18.0G/24.0G"
    assert devices_short(CPU) == "CPU 8t 8.0G/16.0G"
    assert devices_short(None) == "-"
    assert [format_duration(s) for s in (5, 75, 7530, 200000)] == ["5s", "1m15s", "2h05m", "2d07h"]
    meter = RateMeter(window_s=10)
    assert meter.add(0.0, 100) is None
    assert meter.add(2.0, 110) == 5.0
    assert meter.add(3.0, 0) is None  # the queen restarted: start over
    assert spark([0, 5, 10]) == "▁▅█" and spark([]) == "" and spark([0, 0]) == "▁▁"


def probe(alias: str, state: str, reason: str = "why") -> HostProbe:
    return HostProbe(alias, state, reason, at=0.0)  # type: ignore[arg-type]


def test_what_ssh_found_fills_in_where_the_queen_knows_nothing():
    rows = {r.alias: r for r in host_rows(INV, status([hive("local")], []), probes={
        "far": probe("far", "stopped", "0.1.0-aaaa is installed; the hive is not running"),
        "new": probe("new", "not installed", "no rbee-fleet under /home/rbee/.local/share/rbee-fleet"),
    })}
    assert rows["far"].state is HostState.STOPPED and "the hive is not running" in rows["far"].reason
    assert rows["new"].state is HostState.NOT_INSTALLED and rows["new"].reason.startswith("no rbee-fleet under")
    unreachable = host_rows(INV, status([hive("local")], []),
                            probes={"new": probe("new", "unreachable", "connection refused by 10.0.0.3")})
    assert (unreachable[2].state, unreachable[2].reason) == (HostState.UNREACHABLE, "ssh: connection refused by 10.0.0.3")
    key = host_rows(INV, None, probes={"new": probe("new", "unknown", "unknown host key SHA256:abc")})
    assert (key[2].state, key[2].reason) == (HostState.UNKNOWN, "ssh: unknown host key SHA256:abc")


def test_a_silent_hive_is_explained_by_its_probe_and_a_live_one_ignores_it():
    st = status([hive("local"), hive("far", live=False)], [])
    row = host_rows(INV, st, probes={"far": probe("far", "unreachable", "no answer within 3 s")})[1]
    assert row.state is HostState.UNREACHABLE and row.reason == "no heartbeat for 42 s; ssh: no answer within 3 s"
    row = host_rows(INV, st, probes={"far": probe("far", "running", "the hive runs (pid 7, 0.1.0-a)")})[1]
    assert row.state is HostState.DEGRADED and "the queen gets no heartbeat from it" in row.reason
    live = status([hive("local"), hive("far")], [view("big", "far")])
    row = host_rows(INV, live, probes={"far": probe("far", "not installed")})[1]
    assert row.state is HostState.UP  # a stale probe never overrides a live hive
    # A host action under way wins over both.
    row = host_rows(INV, st, busy={"far": "install"}, probes={"far": probe("far", "not installed")})[1]
    assert row.state is HostState.INSTALLING


def test_an_uninstalled_host_shows_as_not_installed_without_the_queens_stale_version_and_workers():
    st = status([hive("local"), hive("far", live=False)], [])
    remembered = host_rows(INV, st)[1]
    assert remembered.version and remembered.state is HostState.UNREACHABLE  # what the queen alone says
    row = host_rows(INV, st, probes={"far": probe("far", "not installed", "no rbee-fleet under /srv/rbee")})[1]
    assert (row.state, row.reason, row.version) == (HostState.NOT_INSTALLED, "no rbee-fleet under /srv/rbee", "")
    assert row.devices is None and row.running == 0 and all(w.supervised is None for w in row.workers)


def test_only_remote_hosts_without_a_live_hive_need_a_probe():
    assert not needs_probe(INV.hives["local"], None)
    assert needs_probe(INV.hives["new"], None)
    assert needs_probe(INV.hives["far"], hive("far", live=False))
    assert not needs_probe(INV.hives["far"], hive("far"))
