"""The keeper's status tables: GPU figures appear only when some worker reports them."""

import time

from rich.console import Console

from rbee_fleet.contracts.fleet import (
    FleetStatus,
    QueenView,
    WorkerHeartbeat,
    WorkerState,
    WorkerView,
)
from rbee_fleet.keeper.cli.tables import status_tables


def status(**gpu_fields) -> FleetStatus:
    hb = WorkerHeartbeat(worker_id="w[0]", hive_id="h", model="m", backend="exllamav2", device="cuda:0",
                         url="http://10.0.0.2:9300", state=WorkerState.READY, slots_total=4, **gpu_fields)
    return FleetStatus(queen=QueenView(version="0", url="http://q", started_at=time.time(), uptime_s=1,
                                       requests_total=0, in_flight=0),
                       hives=[], workers=[WorkerView(heartbeat=hb, in_flight=1, live=True, last_seen_s=0.1)],
                       models=["m"])


def render(st: FleetStatus) -> str:
    console = Console(width=200, record=True)
    for table in status_tables(st):
        console.print(table)
    return console.export_text()


def test_gpu_columns_show_cache_and_vram():
    text = render(status(cache_tokens_total=8192, cache_tokens_free=6144, vram_used_mb=5120))
    assert "6144/8192 tok" in text and "5.0 GiB" in text and "1/4" in text
    assert "w[0]" in text  # fleet text is escaped, not read as markup


def test_cpu_only_fleet_has_no_gpu_columns():
    assert "VRAM" not in render(status())
