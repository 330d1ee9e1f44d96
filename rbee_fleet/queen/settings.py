"""The queen's settings: from the inventory, then the environment, then the command line."""

from __future__ import annotations

from dataclasses import dataclass, field

from rbee_fleet.common.client_limits import ClientLimits
from rbee_fleet.common.inventory import Inventory, ModelPolicy, QueenConfig
from rbee_fleet.common.net import is_loopback
from rbee_fleet.common.paths import Layout
from rbee_fleet.common.secrets import load_or_create
from rbee_fleet.contracts.fleet import WorkerSpawnOp
from rbee_fleet.hive.service import HiveSettings


class InsecureBind(Exception):
    pass


@dataclass(frozen=True)
class QueenSettings:
    """The queen's configuration (``config``: the inventory's ``[queen]`` section, command-line overrides
    applied) and what is derived from the rest of the inventory and the machine."""

    layout: Layout
    config: QueenConfig = field(default_factory=QueenConfig)
    api_keys: tuple[str, ...] = ()  # [queen].api_keys and those in the environment variable it names
    cluster_token: str | None = None
    cluster_token_file: str | None = None
    read_timeout_s: float = 300.0
    embedded_hive: HiveSettings | None = None
    remote_hives: dict[str, str] = field(default_factory=dict)  # alias -> URL, from the inventory
    declared_workers: tuple[WorkerSpawnOp, ...] = ()
    model_policies: dict[str, ModelPolicy] = field(default_factory=dict)  # [models.NAME]
    hive_budgets_mb: dict[str, int] = field(default_factory=dict)  # [hives.ALIAS].memory_budget_mb

    @property
    def url(self) -> str:
        """What hives and workers use to reach the queen."""
        return self.config.url()

    @property
    def client_limits(self) -> ClientLimits:
        c = self.config
        return ClientLimits(header_timeout_s=c.header_timeout_s, body_timeout_s=c.body_timeout_s,
                            max_connections_per_client=c.max_connections_per_client)

    def policy(self, model: str) -> ModelPolicy:
        return self.model_policies.get(model) or ModelPolicy()

    def idle_ttl(self, model: str) -> float:
        ttl = self.policy(model).idle_ttl_s
        return self.config.idle_ttl_s if ttl is None else ttl

    def check_security(self) -> None:
        host = self.config.host
        if not is_loopback(host) and not self.api_keys:
            raise InsecureBind(
                f"the queen would listen on {host}, beyond this machine, with no API key: "
                "set [queen].api_keys in the inventory or RBEE_API_KEYS in the environment"
            )


def settings_from_inventory(
    inv: Inventory,
    layout: Layout,
    *,
    host: str | None = None,
    port: int | None = None,
    drain_timeout_s: float | None = None,
) -> QueenSettings:
    q = inv.queen
    overrides = (("host", host), ("port", port), ("drain_timeout_s", drain_timeout_s))
    if any(v is not None for _, v in overrides):
        q = q.model_copy(update={k: v for k, v in overrides if v is not None})
    layout.ensure()
    token_file = layout.cluster_token
    token = load_or_create(token_file)
    embedded = None
    declared: list[WorkerSpawnOp] = []
    found = inv.embedded_hive()
    if found is not None:
        alias, hive = found
        worker_host = "127.0.0.1" if is_loopback(q.host) else hive.address
        embedded = HiveSettings(
            hive_id=alias,
            layout=layout,
            # Only the queen calls these workers: on a loopback queen they live on loopback too, whatever
            # address the hive has for others; otherwise they listen where they are advertised.
            bind_host=worker_host,
            advertise_host=worker_host,
            port=q.port,  # the embedded hive answers through the queen
            queen_url=q.url(),
            token=token,
            token_file=str(token_file),
            embedded=True,
            heartbeat_interval_s=q.heartbeat_interval_s,
            worker_port_base=inv.defaults.worker_port_base,
        )
        declared = inv.spawn_ops(alias)
    remote = {
        alias: f"http://{h.address}:{h.port or inv.defaults.hive_port}"
        for alias, h in inv.hives.items()
        if not h.embedded
    }
    return QueenSettings(
        layout=layout,
        config=q,
        api_keys=tuple(q.effective_api_keys()),
        cluster_token=token,
        cluster_token_file=str(token_file),
        embedded_hive=embedded,
        remote_hives=remote,
        declared_workers=tuple(declared),
        model_policies=dict(inv.models),
        hive_budgets_mb={a: h.memory_budget_mb for a, h in inv.hives.items() if h.memory_budget_mb},
    )
