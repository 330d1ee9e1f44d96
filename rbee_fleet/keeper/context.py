"""The keeper's context: the inventory it reads, where its files live, how it reaches its queen."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from rbee_fleet.common.inventory import Inventory, default_inventory, load_inventory
from rbee_fleet.common.paths import Layout
from rbee_fleet.common.secrets import read_secret
from rbee_fleet.deploy.host_keys import HostKeyStore
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
            return read_secret(self.layout.cluster_token)
        except (OSError, ValueError):
            return None

    def client(self) -> QueenClient:
        return QueenClient(self.queen_url, self.api_key)

    def host_keys(self) -> HostKeyStore:
        """The user's known hosts plus the keeper-owned ``$RBEE_HOME/known_hosts``."""
        return HostKeyStore(self.layout.home / "known_hosts")

    def local_hive(self) -> str:
        found = self.inventory.embedded_hive()
        return found[0] if found else "localhost"
