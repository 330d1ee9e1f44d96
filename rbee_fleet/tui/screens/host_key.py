"""Show a host's SSH key fingerprint and ask whether to trust it (trust on first use, never silently).

A key that differs from the recorded one is shown with both fingerprints and cannot be trusted from here.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label

from rbee_fleet.deploy.host_keys import HostKey


class HostKeyScreen(ModalScreen[bool]):
    """Dismisses with True when the operator trusts the key."""

    BINDINGS = [
        Binding("escape,n", "dismiss(False)", "Reject"),
    ]
    AUTO_FOCUS = "#reject"  # the safe answer is the default (Textual focuses this when the screen shows)

    def __init__(self, key: HostKey, asked_for: str | None = None) -> None:
        super().__init__()
        self.key = key
        self.asked_for = asked_for or key.alias

    def compose(self) -> ComposeResult:
        k = self.key
        with Vertical(classes="dialog"):
            yield Label(f"Host key of {k.alias} ({k.where})", classes="dialog-title")
            if k.alias != self.asked_for:
                yield Label(f"{k.alias} is the jump host on the way to {self.asked_for}: its key comes first.",
                            classes="dialog-detail")
            yield Label(f"{k.key_type}  {k.fingerprint}", id="fingerprint")
            if k.state == "known":
                yield Label("This key is already trusted.", id="key-state", classes="dialog-detail")
            elif k.state == "changed":
                yield Label(f"CHANGED: the recorded key is {', '.join(k.expected)}. The keeper refuses this host "
                            "(someone may be in the middle). If the host was reinstalled, forget the old key with "
                            f"`rbee-keeper hive forget-key {k.alias}` (the keeper's own known_hosts), then check again.", id="key-state", classes="dialog-detail")
            else:
                yield Label("This key is not known yet. Compare the fingerprint with the one the host shows "
                            "(ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub) before you trust it.",
                            id="key-state", classes="dialog-detail")
            with Horizontal(classes="dialog-buttons"):
                if k.state == "unknown":
                    yield Button("Trust this key", variant="warning", id="accept")
                yield Button("Reject (n)" if k.state == "unknown" else "Close (n)", id="reject")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "accept")
