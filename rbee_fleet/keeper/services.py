"""What the keeper does, for the CLI and the TUI alike: bring the local fleet up and down, run jobs."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rbee_fleet.common.errors import OperationFailed, Unauthorized
from rbee_fleet.common.inventory import Inventory, default_inventory, load_inventory
from rbee_fleet.common.paths import Layout
from rbee_fleet.common.secrets import read_secret
from rbee_fleet.contracts.fleet import JobEvent, WorkerSpawnOp
from rbee_fleet.keeper.local_queen import QueenDaemon
from rbee_fleet.keeper.queen_client import QueenClient

DEFAULT_INVENTORY = Path("inventory") / "localhost.toml"


@dataclass(frozen=True)
class KeeperContext:
    inventory: Inventory
    inventory_path: str | None  # None: the built-in localhost fleet
    layout: Layout

    @classmethod
    def load(cls, inventory_path: str | None = None) -> KeeperContext:
        """Inventory from ``-i``, else ``$RBEE_INVENTORY``, else ``./inventory/localhost.toml``, else built in."""
        path = cls.resolve_inventory_path(inventory_path)
        inv = load_inventory(path) if path else default_inventory()
        return cls(inventory=inv, inventory_path=path, layout=Layout.default())

    @staticmethod
    def resolve_inventory_path(inventory_path: str | None = None) -> str | None:
        """The inventory file ``load`` reads (None: the built-in localhost fleet)."""
        path = inventory_path or os.environ.get("RBEE_INVENTORY")
        if path is None and DEFAULT_INVENTORY.is_file():
            path = str(DEFAULT_INVENTORY)
        return path

    @property
    def queen_url(self) -> str:
        return self.inventory.queen.client_url()

    @property
    def api_key(self) -> str | None:
        """What the keeper shows the queen: the cluster token when it has one (operations need it),
        else an API key from the environment or the inventory."""
        token = self.cluster_token()
        if token:
            return token
        keys = self.inventory.queen.effective_api_keys()
        return os.environ.get("RBEE_API_KEY") or (keys[0] if keys else None)

    def cluster_token(self) -> str | None:
        try:
            return read_secret(self.layout.secrets / "cluster.token")
        except (OSError, ValueError):
            return None

    def client(self) -> QueenClient:
        return QueenClient(self.queen_url, self.api_key)

    def daemon(self) -> QueenDaemon:
        return QueenDaemon(self.layout, self.inventory_path)

    def local_hive(self) -> str:
        found = self.inventory.embedded_hive()
        return found[0] if found else "localhost"


EventSink = Callable[[str, JobEvent], None]  # (label, event)


async def run_job(client: QueenClient, operation: Any, label: str, sink: EventSink | None) -> dict[str, Any]:
    try:
        return await client.jobs.run(operation, on_event=(lambda ev: sink(label, ev)) if sink else None)
    except Unauthorized as exc:
        raise OperationFailed(
            f"{exc.message}. Operations need the fleet's cluster token, which the keeper reads from "
            f"{Layout.default().secrets / 'cluster.token'}: run it with the RBEE_HOME of the queen's machine"
        ) from None


async def ensure_workers(ctx: KeeperContext, client: QueenClient, sink: EventSink | None) -> list[tuple[str, dict[str, Any] | None, str | None]]:
    """Spawn the inventory's local workers (idempotent); return (worker id, result, error) for each."""
    found = ctx.inventory.embedded_hive()
    if found is None:
        return []
    ops = ctx.inventory.spawn_ops(found[0])

    async def one(op: WorkerSpawnOp) -> tuple[str, dict[str, Any] | None, str | None]:
        assert op.worker_id is not None
        try:
            return op.worker_id, await run_job(client, op, op.worker_id, sink), None
        except OperationFailed as exc:
            return op.worker_id, None, str(exc)

    return list(await asyncio.gather(*(one(op) for op in ops)))
