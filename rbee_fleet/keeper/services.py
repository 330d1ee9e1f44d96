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
from rbee_fleet.keeper.daemon import QueenDaemon
from rbee_fleet.keeper.queen_client import QueenClient, QueenUnreachable

DEFAULT_INVENTORY = Path("inventory") / "localhost.toml"
QUEEN_START_TIMEOUT_S = 60.0


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


async def start_queen(ctx: KeeperContext, client: QueenClient, *, foreground: bool = False) -> tuple[bool, Any]:
    """Start the local queen unless one answers already; return (started, process or None)."""
    if await client.healthy():
        return False, None
    daemon = ctx.daemon()
    proc = daemon.start_foreground() if foreground else daemon.start_detached()
    try:
        await client.wait_healthy(QUEEN_START_TIMEOUT_S, alive=lambda: proc.poll() is None)
    except QueenUnreachable as exc:
        if proc.poll() is None:
            proc.terminate()
        tail = daemon.log_tail() if not foreground else ""
        raise OperationFailed(f"{exc}\n{tail}".rstrip()) from None
    client.set_credential(ctx.api_key)  # a first start creates the cluster token
    return True, proc


STOP_MARGIN_S = 30.0  # beyond the queen's drain timeout: its workers' own shutdown


async def requests_in_flight(client: QueenClient) -> int | None:
    """How many requests the local queen is answering now (None when it does not answer)."""
    try:
        return (await client.status()).queen.in_flight
    except Exception:  # noqa: BLE001 - a queen that is down or half up has nothing to wait for
        return None


async def stop_queen(ctx: KeeperContext, client: QueenClient) -> bool:
    """Stop the local queen this keeper started (it stops its workers); False if none was running.

    A queen that answers but was started elsewhere is left alone: ``OperationFailed`` says so.
    """
    daemon = ctx.daemon()
    # The queen lets answers in flight finish for up to its drain timeout, then its hive stops the workers.
    patience = ctx.inventory.queen.drain_timeout_s + STOP_MARGIN_S
    stopped = await asyncio.to_thread(daemon.stop, patience)
    if not stopped and await client.healthy():
        raise OperationFailed(f"a queen answers at {ctx.queen_url} but was not started by this keeper "
                              f"(no pidfile in {daemon.pidfile.parent}); stop it where it runs")
    return stopped


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
