"""Chat through the queen: pick a served model, type, watch the answer stream with TTFT and tokens/s."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, cast

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Input, Select, Static

from rbee_fleet.common.errors import OperationFailed
from rbee_fleet.keeper.queen_client import QueenUnreachable
from rbee_fleet.tui.snapshot import FleetSnapshot

if TYPE_CHECKING:
    from rbee_fleet.tui.app import KeeperApp

MAX_TOKENS = 256
STATS_EVERY_S = 0.1  # how often the running tokens/s is redrawn while an answer streams


class ChatScreen(Screen[None]):
    AUTO_FOCUS = "#prompt"
    BINDINGS = [
        Binding("escape", "stop", "Stop answer"),
        Binding("ctrl+l", "clear", "New chat"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[dict[str, str]] = []
        self._models: list[str] = []

    @property
    def keeper(self) -> KeeperApp:
        return cast("KeeperApp", self.app)

    def compose(self) -> ComposeResult:
        with Horizontal(id="chat-top"):
            yield Select[str]([], prompt="model", id="chat-model")
            yield Static("", id="chat-stats")
        with VerticalScroll(id="transcript"):
            yield Static("Answers stream here through the queen; time to first token and tokens/s show above. "
                         "escape stops an answer, ctrl+l starts over.", id="chat-hint", classes="dim")
        yield Input(placeholder="type a message, enter sends", id="prompt")
        yield Footer()

    def on_mount(self) -> None:
        self.watch(self.keeper, "snapshot", self._models_changed, init=True)


    def _models_changed(self, snap: FleetSnapshot) -> None:
        models = snap.models
        if models == self._models:
            return
        self._models = models
        select = self.query_one("#chat-model", Select)
        current = select.value
        select.set_options([(m, m) for m in models])
        if current in models:
            select.value = current
        elif models:
            select.value = models[0]

    def _say(self, who: str, text: str, style: str = "") -> Static:
        for hint in self.query("#chat-hint"):
            hint.remove()
        bubble = Static(Text.assemble((f"{who}: ", "bold"), (text, style)), classes=f"msg msg-{who}")
        transcript = self.query_one("#transcript", VerticalScroll)
        transcript.mount(bubble)
        transcript.scroll_end(animate=False)
        return bubble

    @on(Input.Submitted, "#prompt")
    def _send(self, event: Input.Submitted) -> None:
        prompt = event.value.strip()
        if not prompt:
            return
        model = self.query_one("#chat-model", Select).value
        if model is Select.NULL:
            self.notify("no model is being served: spawn a worker first (Fleet: w)", severity="error")
            return
        event.input.value = ""
        self._say("you", prompt)
        self.messages.append({"role": "user", "content": prompt})
        self.answer(str(model))

    @work(exclusive=True, group="chat")
    async def answer(self, model: str) -> None:
        fleet = self.keeper.fleet
        stats = self.query_one("#chat-stats", Static)
        if fleet is None:
            self._say("error", "no inventory loaded", "red")
            return
        bubble = self._say(model, "…")
        stats.update(Text("waiting for the first token…", style="dim"))
        stream = fleet.chat(model, list(self.messages), max_tokens=MAX_TOKENS)
        transcript = self.query_one("#transcript", VerticalScroll)
        shown_at = 0.0
        try:
            async for _ in stream:
                bubble.update(Text.assemble((f"{model}: ", "bold"), stream.text))
                transcript.scroll_end(animate=False)
                # The first token's time as it arrives, then a running rate a few times a second.
                now = time.monotonic()
                if not shown_at or now - shown_at >= STATS_EVERY_S:
                    shown_at = now
                    stats.update(Text(stream.running(), style="cyan"))
        except (QueenUnreachable, OperationFailed) as exc:
            bubble.update(Text.assemble((f"{model}: ", "bold"), (f"failed: {exc}", "red")))
            stats.update(Text("failed", style="red"))
            self.notify(f"chat failed: {exc}", severity="error")
            self.messages.pop()
            return
        except asyncio.CancelledError:
            # Stopped by the operator: keep what came, so the conversation still alternates.
            if stream.text:
                self.messages.append({"role": "assistant", "content": stream.text})
            else:
                self.messages.pop()
            stats.update(Text("stopped", style="yellow"))
            raise
        self.messages.append({"role": "assistant", "content": stream.text})
        if stream.stats is not None:
            stats.update(Text(stream.stats.summary(), style="green"))

    def action_stop(self) -> None:
        self.workers.cancel_group(self, "chat")

    def action_clear(self) -> None:
        self.action_stop()
        self.messages.clear()
        self.query_one("#transcript", VerticalScroll).remove_children()
        self.query_one("#chat-stats", Static).update("")
