"""The keeper's TUI: ``rbee-keeper`` with no command (or ``rbee-keeper tui -i INVENTORY``).

The app owns the live state every screen draws (one ``FleetSnapshot`` per poll) and every action, so the
screens, their key bindings and the command palette all start operations the same way: through the
keeper's service layer (``QueenService`` and ``HostService``), in background workers, tracked in the
Jobs screen, failures notified with their reason.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace
from functools import partial
from typing import Any

from textual import work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.reactive import reactive
from textual.screen import Screen
from textual.signal import Signal

from rbee_fleet.common.errors import ApiError, OperationFailed
from rbee_fleet.common.inventory import InventoryError
from rbee_fleet.contracts.fleet import JobState, WorkerSpawnOp
from rbee_fleet.keeper.context import KeeperContext
from rbee_fleet.keeper.hosts.service import HostService
from rbee_fleet.keeper.queen_client import QueenUnreachable
from rbee_fleet.keeper.queen_service import EventSink, QueenService
from rbee_fleet.tui.host_ops import HostOpsMixin, ProbeCache
from rbee_fleet.tui.inventory_document import FieldSpec, FormError, FormValues, coerce_form, form_fields
from rbee_fleet.tui.operations import OperationLog, TrackedOperation
from rbee_fleet.tui.palette import keeper_commands
from rbee_fleet.tui.screens.chat import ChatScreen
from rbee_fleet.tui.screens.confirm import ConfirmScreen
from rbee_fleet.tui.screens.fleet import FleetScreen
from rbee_fleet.tui.screens.form import FormScreen
from rbee_fleet.tui.screens.help import HelpScreen
from rbee_fleet.tui.screens.host import HostScreen
from rbee_fleet.tui.screens.inventory import InventoryScreen
from rbee_fleet.tui.screens.jobs import JobsScreen
from rbee_fleet.tui.snapshot import FleetSnapshot, Sampler

log = logging.getLogger(__name__)

DEFAULT_REFRESH_S = 1.0
CATALOG_TIMEOUT_S = 5.0
SPAWN_FIELDS = form_fields(WorkerSpawnOp, skip=("kind", "hive", "options", "declared_as"))
EMPTY = FleetSnapshot(status=None, error=None, rows=())

ServiceFactory = Callable[[KeeperContext], QueenService]
ActionsFactory = Callable[[QueenService], HostService]


class KeeperApp(HostOpsMixin, App[None]):
    CSS_PATH = "app.tcss"
    TITLE = "rbee-keeper"
    MODES = {"fleet": FleetScreen, "jobs": JobsScreen, "chat": ChatScreen, "inventory": InventoryScreen}
    DEFAULT_MODE = "fleet"
    BINDINGS = [
        # Digits are handy but go into a text box that has focus; the F keys always work.
        Binding("f1,1", "switch_mode('fleet')", "Fleet"),
        Binding("f2,2", "switch_mode('jobs')", "Jobs"),
        Binding("f3,3", "switch_mode('chat')", "Chat"),
        Binding("f4,4", "switch_mode('inventory')", "Inventory"),
        Binding("question_mark,f10", "help", "Help"),
        Binding("ctrl+r", "reload_inventory", "Reload inventory", show=False),
        Binding("q", "quit", "Quit"),
    ]

    snapshot: reactive[FleetSnapshot] = reactive(EMPTY, always_update=True, init=False)

    def __init__(self, inventory_path: str | None = None, *, refresh_s: float = DEFAULT_REFRESH_S,
                 service_factory: ServiceFactory = QueenService,
                 actions_factory: ActionsFactory = HostService) -> None:
        super().__init__()
        self.inventory_path = KeeperContext.resolve_inventory_path(inventory_path)
        self.refresh_s = refresh_s
        self._service_factory = service_factory
        self._actions_factory = actions_factory
        self.fleet: QueenService | None = None
        self.hosts: HostService | None = None
        self._retired: list[QueenService] = []
        self.inventory_error: str | None = None
        self.sampler = Sampler()
        self.operations = OperationLog()
        self.probes = ProbeCache()
        self.operations_changed: Signal[TrackedOperation] = Signal(self, "operations-changed")
        self._polling = False

    # -- life cycle ------------------------------------------------------------------------------

    def on_mount(self) -> None:
        self.reload_inventory()
        self.set_interval(self.refresh_s, self.poll)

    async def on_unmount(self) -> None:
        for fleet in [*self._retired, *([self.fleet] if self.fleet else [])]:
            await fleet.close()

    @property
    def queen_url(self) -> str | None:
        return self.fleet.queen_url if self.fleet else None

    def fleet_now(self) -> float:
        return self.fleet.now() if self.fleet else time.time()

    def reload_inventory(self, path: str | None = None) -> bool:
        """(Re)read the inventory; on an error keep the last good one, show why, and stay up."""
        if path is not None:
            self.inventory_path = path
        try:
            ctx = KeeperContext.load(self.inventory_path)
        except InventoryError as exc:
            self.inventory_error = str(exc)
            self.notify(f"inventory error: {exc}", severity="error", timeout=15)
            self.snapshot = replace(self.snapshot, inventory_error=self.inventory_error)
            return False
        self.inventory_error = None
        if self.fleet is not None and (self.fleet.queen_url, self.fleet.ctx.api_key) == (ctx.queen_url, ctx.api_key):
            self.fleet.ctx = ctx  # same queen: keep the session, running operations keep theirs
        else:
            if self.fleet is not None:
                self._retired.append(self.fleet)  # closed at exit: operations may still use it
            self.fleet = self._service_factory(ctx)
        self.hosts = self._actions_factory(self.fleet)
        self.probes.forget()  # addresses may have changed
        self.poll()
        return True

    def action_reload_inventory(self) -> None:
        if self.reload_inventory():
            self.notify(f"inventory reloaded: {self.inventory_path or 'built-in localhost fleet'}", timeout=3)

    # -- the live state ----------------------------------------------------------------------------

    def poll(self) -> None:
        if not self._polling:
            self._polling = True
            self._poll()

    @work(exclusive=True, group="poll")
    async def _poll(self) -> None:
        try:
            fleet = self.fleet
            status, error = None, None
            if fleet is not None:
                try:
                    status = await fleet.status()
                except QueenUnreachable as exc:
                    error = short_cause(exc.cause)
                except ApiError as exc:
                    error = f"the queen refused: {exc.message}"
                except Exception as exc:  # noqa: BLE001 - a bad answer must not take the TUI down
                    log.debug("status poll failed", exc_info=True)
                    error = f"{type(exc).__name__}: {exc}"
            inventory = fleet.ctx.inventory if fleet else None
            self.snapshot = self.sampler.build(inventory, status, error, time.monotonic(),
                                               self.operations.busy_hosts(), self.inventory_error, self.probes.results)
            self.probe_due_hosts()
        finally:
            self._polling = False

    # -- operations ------------------------------------------------------------------------------

    def start_operation(self, label: str, kind: str, hive: str | None,
                        action: Callable[[EventSink], Awaitable[Any]]) -> TrackedOperation:
        """Run ``action`` in the background as a tracked operation; its failure is notified with the reason."""
        op = self.operations.start(label, kind, hive, self.fleet_now())

        def sink(_label: str, event: Any) -> None:
            op.add(event)
            self.operations_changed.publish(op)

        async def run() -> None:
            try:
                result = await action(sink)
                op.result = result if isinstance(result, dict) else {"result": result}
                op.state = JobState.SUCCEEDED
                self.notify(f"{label}: done", timeout=4)
            except asyncio.CancelledError:
                op.state, op.error = JobState.CANCELLED, "cancelled"
                raise
            except (OperationFailed, QueenUnreachable, ApiError) as exc:
                op.state, op.error = JobState.FAILED, str(exc)
                self.notify(f"{label} failed: {exc}", title="operation failed", severity="error", timeout=12)
            except Exception as exc:  # noqa: BLE001 - one failed action never takes the TUI down
                log.exception("%s failed", label)
                op.state, op.error = JobState.FAILED, f"{type(exc).__name__}: {exc}"
                self.notify(f"{label} failed: {op.error}", title="operation failed", severity="error", timeout=12)
            finally:
                if op.host_action and op.hive:
                    self.probes.forget(op.hive)  # what SSH found there before is stale now
                self.operations_changed.publish(op)
                self.poll()

        op.worker = self.run_worker(run(), group="operations", description=label, exit_on_error=False)
        self.operations_changed.publish(op)
        self.poll()
        return op

    def _require_inventory(self) -> tuple[QueenService, HostService] | None:
        if self.fleet is None or self.hosts is None:
            self.notify(f"no inventory loaded: {self.inventory_error}", severity="error")
            return None
        return self.fleet, self.hosts

    async def _catalog(self, alias: str) -> list[str]:
        if self.fleet is None:
            return []
        try:
            return [m.id for m in await asyncio.wait_for(self.fleet.models(alias), CATALOG_TIMEOUT_S)]
        except (QueenUnreachable, ApiError, OperationFailed, asyncio.TimeoutError):
            return []

    def _host_field(self, fleet: QueenService) -> FieldSpec:
        return FieldSpec("hive", str, tuple(fleet.ctx.inventory.hives), required=True)

    # -- workers and models ------------------------------------------------------------------------

    @work(group="dialogs")
    async def spawn_worker(self, alias: str | None = None) -> None:
        if (found := self._require_inventory()) is None:
            return
        fleet, _ = found
        alias = alias or fleet.ctx.local_hive()

        def submit(values: FormValues) -> WorkerSpawnOp:
            hive = values.pop("hive")
            if not hive:
                raise FormError({"hive": "required"})
            typed = coerce_form(WorkerSpawnOp, SPAWN_FIELDS, values)
            return WorkerSpawnOp(hive=str(hive), **{k: v for k, v in typed.items() if v is not None})

        op = await self.push_screen_wait(FormScreen(
            "Spawn a worker", [self._host_field(fleet), *SPAWN_FIELDS], submit,
            {"hive": alias, "backend": "auto", "device": "cpu"}, suggestions={"model": await self._catalog(alias)},
            placeholders={"model": "a model in the host's catalog (tab completes)", "worker_id": "(default: HOST-MODEL-N)"},
            ok="Spawn"))
        if op is not None:
            self.start_operation(f"spawn {op.model} on {op.hive}", "worker_spawn", op.hive,
                                 partial(fleet.spawn_worker, op))

    @work(group="dialogs")
    async def stop_worker(self, worker_id: str, hive: str | None = None) -> None:
        if (found := self._require_inventory()) is None:
            return
        fleet, _ = found
        if await self.push_screen_wait(ConfirmScreen(f"Stop worker {worker_id}{f' on {hive}' if hive else ''}?",
                                                     yes="Stop", detail="Requests it is answering are cut off.")):
            self.start_operation(f"stop {worker_id}", "worker_stop", hive,
                                 lambda sink: fleet.stop_worker(worker_id, hive, sink))

    @work(group="dialogs")
    async def download_model(self, alias: str | None = None) -> None:
        if (found := self._require_inventory()) is None:
            return
        fleet, _ = found
        fields = [self._host_field(fleet), FieldSpec("source", str, required=True), FieldSpec("name", str)]

        def submit(values: FormValues) -> tuple[str, str, str | None]:
            errors = {k: "required" for k in ("hive", "source") if not (values.get(k) or "")}
            if errors:
                raise FormError(errors)
            return str(values["hive"]), str(values["source"]).strip(), (str(values.get("name") or "").strip() or None)

        got = await self.push_screen_wait(FormScreen(
            "Download a model", fields, submit, {"hive": alias or fleet.ctx.local_hive()},
            placeholders={"source": "smollm2, /path/model.gguf, https://…, hf:OWNER/REPO/FILE",
                          "name": "(default: from the source)"}, ok="Download"))
        if got is not None:
            hive, source, name = got
            self.start_operation(f"download {name or source} to {hive}", "model_download", hive,
                                 lambda sink: fleet.download_model(source, hive, name, sink))

    @work(group="dialogs")
    async def delete_model(self, model: str | None, hive: str) -> None:
        if (found := self._require_inventory()) is None:
            return
        fleet, _ = found
        if model is None:
            def submit(values: FormValues) -> str:
                if not values.get("model"):
                    raise FormError({"model": "required"})
                return str(values["model"])

            model = await self.push_screen_wait(FormScreen(
                f"Delete a model from {hive}", [FieldSpec("model", str, required=True)], submit,
                suggestions={"model": await self._catalog(hive)}, ok="Next"))
            if model is None:
                return
        if await self.push_screen_wait(ConfirmScreen(f"Delete model {model} from {hive}?", yes="Delete",
                                                     detail="Its files are removed from the host's catalog.")):
            self.start_operation(f"delete {model} on {hive}", "model_delete", hive,
                                 lambda sink: fleet.delete_model(model, hive, sink))

    # -- hosts (the rest is in HostOpsMixin) ------------------------------------------------------

    def open_host(self, alias: str) -> None:
        self.push_screen(HostScreen(alias))

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    # -- the command palette -----------------------------------------------------------------------

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield from keeper_commands(self)


def short_cause(cause: str) -> str:
    """aiohttp's connection errors, in the words an operator expects."""
    if "Connect call failed" in cause or "Connection refused" in cause:
        return "connection refused (start it: a on the embedded host, or rbee-keeper up)"
    return cause


def run_tui(inventory_path: str | None = None, refresh_s: float = DEFAULT_REFRESH_S) -> int:
    KeeperApp(inventory_path, refresh_s=refresh_s).run()
    return 0
