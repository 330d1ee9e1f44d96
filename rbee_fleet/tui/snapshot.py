"""What the screens draw: one immutable snapshot of the fleet per poll, plus short histories."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from rbee_fleet.common.inventory import Inventory
from rbee_fleet.contracts.fleet import FleetStatus
from rbee_fleet.keeper.hosts.probe import HostProbe
from rbee_fleet.tui.host_rows import HostRow, RateMeter, host_rows

HISTORY = 60  # samples of tokens/s kept per worker


@dataclass(frozen=True)
class FleetSnapshot:
    status: FleetStatus | None
    error: str | None  # why ``status`` is missing (the queen is down, …)
    rows: tuple[HostRow, ...]
    request_rate: float | None = None
    inventory_error: str | None = None
    polled: bool = False  # False until the first poll has answered or failed

    def row(self, alias: str) -> HostRow | None:
        return next((r for r in self.rows if r.alias == alias), None)

    @property
    def models(self) -> list[str]:
        return self.status.models if self.status else []


@dataclass
class Sampler:
    """Turns successive polls into snapshots, keeping the request rate and each worker's tokens/s history."""

    rate: RateMeter = field(default_factory=RateMeter)
    tps: dict[str, deque[float]] = field(default_factory=dict)

    def build(self, inventory: Inventory | None, status: FleetStatus | None, error: str | None,
              at: float, busy: Mapping[str, str] | None = None, inventory_error: str | None = None,
              probes: Mapping[str, HostProbe] | None = None) -> FleetSnapshot:
        rate = None
        if status is not None:
            rate = self.rate.add(at, status.queen.requests_total)
            seen = set()
            for w in status.workers:
                wid = w.heartbeat.worker_id
                seen.add(wid)
                self.tps.setdefault(wid, deque(maxlen=HISTORY)).append(w.heartbeat.tokens_per_second if w.live else 0.0)
            for gone in set(self.tps) - seen:
                del self.tps[gone]
        rows = tuple(host_rows(inventory, status, busy, probes)) if inventory is not None else ()
        return FleetSnapshot(status=status, error=error, rows=rows, request_rate=rate,
                             inventory_error=inventory_error, polled=True)
