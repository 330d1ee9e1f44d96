"""Where rbee-fleet keeps its files on a machine: one home, overridable with RBEE_HOME."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# The cluster token's file name, under ``secrets/`` of a home (the keeper's and the queen's) and of every
# installed hive's install directory.
CLUSTER_TOKEN = "cluster.token"


def rbee_home() -> Path:
    env = os.environ.get("RBEE_HOME")
    if env:
        return Path(env).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(data) / "rbee-fleet"


@dataclass(frozen=True)
class Layout:
    home: Path

    @classmethod
    def default(cls) -> Layout:
        return cls(rbee_home())

    @property
    def models(self) -> Path:
        return self.home / "models"

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    @property
    def run(self) -> Path:
        return self.home / "run"

    @property
    def secrets(self) -> Path:
        return self.home / "secrets"

    @property
    def cluster_token(self) -> Path:
        """The fleet's cluster token (0600): the queen's, the keeper's and every installed hive's."""
        return self.secrets / CLUSTER_TOKEN

    def ensure(self) -> Layout:
        for path in (self.home, self.models, self.logs, self.run):
            path.mkdir(parents=True, exist_ok=True)
        self.secrets.mkdir(mode=0o700, parents=True, exist_ok=True)
        return self
