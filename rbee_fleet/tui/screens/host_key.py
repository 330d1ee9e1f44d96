"""Show a host's SSH key fingerprint and ask whether to trust it (trust on first use, never silently)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label

from rbee_fleet.keeper.host_actions import HostKey


class HostKeyScreen(ModalScreen[bool]):
    BINDINGS = [
        Binding("escape,n", "dismiss(False)", "Reject"),
    ]

    def __init__(self, key: HostKey) -> None:
        super().__init__()
        self.key = key

    def compose(self) -> ComposeResult:
        k = self.key
        with Vertical(classes="dialog"):
            yield Label(f"Host key of {k.alias} ({k.host}:{k.port})", classes="dialog-title")
            yield Label(f"{k.key_type}  {k.fingerprint}", id="fingerprint")
            if k.known:
                yield Label("This key is already trusted.", classes="dialog-detail")
            else:
                yield Label("This key is not known yet. Compare the fingerprint with the one the host shows "
                            "(ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub) before you trust it.",
                            classes="dialog-detail")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Trust this key", variant="warning", id="accept", disabled=k.known)
                yield Button("Reject (n)", id="reject")

    def on_mount(self) -> None:
        self.query_one("#reject", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "accept")
