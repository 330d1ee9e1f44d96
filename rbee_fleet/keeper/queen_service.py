"""What the keeper asks of the queen: read the fleet's state, run operations on it as jobs, chat through it.

The CLI commands and the TUI both call ``QueenService``, so an operation means the same thing in both.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from rbee_fleet.common.errors import ApiError, OperationFailed, Unauthorized
from rbee_fleet.common.paths import Layout
from rbee_fleet.contracts.fleet import (
    FleetStatus,
    JobEvent,
    JobInfo,
    ModelDeleteOp,
    ModelDownloadOp,
    ModelEntry,
    WorkerSpawnOp,
    WorkerStopOp,
)
from rbee_fleet.keeper.audit import safe_source
from rbee_fleet.keeper.chat import ChatStream, openai_client
from rbee_fleet.keeper.context import KeeperContext
from rbee_fleet.keeper.fleet_change import FleetChanges
from rbee_fleet.keeper.queen_client import QueenClient, QueenUnreachable

EventSink = Callable[[str, JobEvent], None]  # (label, event)


async def run_job(client: QueenClient, operation: Any, label: str, sink: EventSink | None) -> dict[str, Any]:
    try:
        return await client.jobs.run(operation, on_event=(lambda ev: sink(label, ev)) if sink else None)
    except Unauthorized as exc:
        raise OperationFailed(
            f"{exc.message}. Operations need the fleet's cluster token, which the keeper reads from "
            f"{Layout.default().cluster_token}: run it with the RBEE_HOME of the queen's machine"
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


class QueenService:
    """One keeper context and one queen client (one HTTP session) for the life of a front end."""

    def __init__(self, ctx: KeeperContext, client: QueenClient | None = None) -> None:
        self.ctx = ctx
        self.client = client or ctx.client()
        self._oai: Any = None
        self._changes: FleetChanges | None = None

    @property
    def changes(self) -> FleetChanges:
        """The audit log (worker and model operations are audited here, on the keeper's side; not locked)."""
        if self._changes is None:
            self._changes = FleetChanges(self.ctx)
        return self._changes

    @property
    def queen_url(self) -> str:
        return self.ctx.queen_url

    async def close(self) -> None:
        if self._oai is not None:
            await self._oai.close()
        await self.client.close()

    def now(self) -> float:
        """Wall-clock time for ages shown on screen (one seam, so snapshots can fix it)."""
        return time.time()

    # -- reading ---------------------------------------------------------------------------------

    async def status(self) -> FleetStatus:
        return await self.client.status()

    async def models(self, hive: str) -> list[ModelEntry]:
        return await self.client.models(hive)

    async def jobs(self) -> list[JobInfo]:
        return await self.client.job_list()

    def job_events(self, job_id: str, after: int = -1) -> AsyncIterator[JobEvent]:
        return self.client.jobs.events(job_id, after)

    async def cancel_job(self, job_id: str) -> None:
        await self.client.jobs.cancel(job_id)

    async def worker_hive(self, worker_id: str) -> str:
        """The hive a worker runs on, as the queen knows it (the local hive when nobody knows it)."""
        st = await self.client.status()
        owners = [w.heartbeat.hive_id for w in st.workers if w.heartbeat.worker_id == worker_id]
        owners += [h.hive_id for h in st.hives for w in h.workers if w.worker_id == worker_id]
        return owners[0] if owners else self.ctx.local_hive()

    # -- operations (jobs on the queen) -------------------------------------------------------------

    async def run(self, op: Any, label: str, sink: EventSink | None = None) -> dict[str, Any]:
        """Run one operation as a job on the queen, following its events; raise ``OperationFailed``."""
        return await run_job(self.client, op, label, sink)

    async def _audited(self, action: str, targets: list[str], op: Any, label: str,
                       sink: EventSink | None) -> dict[str, Any]:
        async with self.changes.change(action, targets, lock=False) as change:
            result = await self.run(op, label, sink)
            change.reason = str(result.get("message") or ("changed" if result.get("changed") else "nothing to change"))
            return result

    async def spawn_worker(self, op: WorkerSpawnOp, sink: EventSink | None = None) -> dict[str, Any]:
        target = f"{op.hive}/{op.worker_id or op.model}"
        return await self._audited("worker spawn", [target], op, op.worker_id or f"spawn {op.model}", sink)

    async def stop_worker(self, worker_id: str, hive: str | None = None, sink: EventSink | None = None) -> dict[str, Any]:
        hive = hive or await self.worker_hive(worker_id)
        return await self._audited("worker stop", [f"{hive}/{worker_id}"], WorkerStopOp(hive=hive, worker_id=worker_id),
                                   worker_id, sink)

    async def download_model(self, source: str, hive: str | None = None, name: str | None = None,
                             sink: EventSink | None = None) -> dict[str, Any]:
        op = ModelDownloadOp(hive=hive or self.ctx.local_hive(), source=source, name=name)
        target = f"{op.hive}/{name or safe_source(source)}"
        return await self._audited("model download", [target], op, name or source, sink)

    async def delete_model(self, model: str, hive: str | None = None, sink: EventSink | None = None) -> dict[str, Any]:
        op = ModelDeleteOp(hive=hive or self.ctx.local_hive(), model=model)
        return await self._audited("model delete", [f"{op.hive}/{model}"], op, model, sink)

    async def forget_hive(self, hive: str) -> bool:
        """After an uninstall: the queen forgets the hive and its workers (False if it knew none, or is down)."""
        try:
            return await self.client.forget_hive(hive)
        except (QueenUnreachable, ApiError):
            return False

    # -- chat ------------------------------------------------------------------------------------

    def chat(self, model: str, messages: list[dict[str, str]], *, max_tokens: int = 256,
             temperature: float = 0.7, seed: int | None = None) -> ChatStream:
        if self._oai is None:
            self._oai = openai_client(self.queen_url, self.ctx.api_key)
        return ChatStream(self._oai, self.queen_url, model, messages, max_tokens=max_tokens,
                          temperature=temperature, seed=seed)
