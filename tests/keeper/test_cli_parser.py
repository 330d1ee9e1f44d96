"""The keeper's command line: every handler it names exists, and a command loads only what it uses.

The start-up cost of a keeper command is the modules it imports; these tests assert which ones (in a
fresh interpreter), not how long they take: ``just bench`` prints the times.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import subprocess
import sys

from rbee_fleet.keeper.cli.parser import build_parser


def _handlers(parser: argparse.ArgumentParser) -> list[str]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                func = sub.get_default("func")
                if func is not None:
                    found.append(func)
                found += _handlers(sub)
    return found


def test_every_command_names_a_handler_that_exists():
    handlers = _handlers(build_parser())
    assert len(handlers) >= 25, handlers
    for name in handlers:
        module, _, function = name.partition(":")
        handler = getattr(importlib.import_module(f"rbee_fleet.keeper.cli.{module}"), function)
        assert inspect.iscoroutinefunction(handler), name
        assert list(inspect.signature(handler).parameters) == ["args", "ctx"], name


# SSH, the TUI, deploys (plans render templates with jinja2), the OpenAI client and request models.
HEAVY = ("asyncssh", "textual", "jinja2", "openai", "rbee_fleet.tui", "rbee_fleet.keeper.hosts.service",
         "rbee_fleet.deploy.plan", "rbee_fleet.deploy.steps", "rbee_fleet.deploy.ssh_transport",
         "rbee_fleet.deploy.wheelhouse", "rbee_fleet.contracts.openai")


def _loaded_after(code: str) -> list[str]:
    probe = (f"import sys\n{code}\nimport json\n"
             f"print(json.dumps(sorted(m for m in sys.modules if m.startswith({HEAVY!r}))))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_parsing_the_command_line_loads_no_command():
    assert _loaded_after("import rbee_fleet.keeper.cli.entry") == []


def test_status_loads_neither_ssh_nor_deploys_nor_the_tui():
    """What ``rbee-keeper status`` imports for a local fleet (an inventory with no installed host)."""
    loaded = _loaded_after("import rbee_fleet.keeper.cli.entry, rbee_fleet.keeper.cli.local_fleet, "
                           "rbee_fleet.keeper.context, rbee_fleet.keeper.queen_client")
    assert loaded == [], loaded
