"""What every key does, on every screen."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown

HELP = """\
# rbee-keeper

The whole fleet on one screen. Everything refreshes by itself; press a key to act.

## Anywhere
| key | action |
| --- | --- |
| `F1`…`F4` (or `1`…`4` outside a text box) | Fleet, Jobs and logs, Chat, Inventory |
| `ctrl+p` | command palette: every action, searchable |
| `?` or `F10` | this help |
| `ctrl+r` | reload the inventory file |
| `q` | quit (the fleet keeps running) |

## Fleet
| key | action |
| --- | --- |
| `enter` | open the host |
| `/` | filter hosts (`escape` clears) |
| `o` | sort by the next column (or click a column header) |
| `w` / `m` | spawn a worker / download a model on the selected host |
| `a` | hive actions: install, start, stop, restart, upgrade, uninstall, host key |
| `D` | deploy all hosts (plan first) |
| `x` | ssh into the host (the TUI resumes when the shell exits) |

## Host
| key | action |
| --- | --- |
| `w` / `k` | spawn a worker / stop the selected worker |
| `m` / `delete` | download a model / delete the selected model |
| `a` / `l` | hive actions / follow the host's log |
| `escape` | back to the fleet |

## Jobs and logs
`enter` shows an operation's events (live while it runs), `c` cancels it; the host log tab follows a
host's log as it is written.

## Chat
Pick a model, type, `enter` sends; `escape` stops the answer; `ctrl+l` starts a new conversation.

## Inventory
`a` add a host, `e` edit it, `delete` remove it; `w` add a worker to it, `enter` on a worker edits it;
`ctrl+s` shows the change and saves it; `u` undoes unsaved edits.

Destructive actions ask first. Long operations run in the background; the bottom lines show their
progress and failures pop up with the reason (and stay in the Jobs screen).
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="dialog help"):
            yield Markdown(HELP)
