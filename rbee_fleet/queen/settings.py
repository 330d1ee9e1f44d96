"""The queen's settings: from the inventory, then the environment, then the command line."""

from __future__ import annotations

from dataclasses import dataclass, field

from rbee_fleet.common.client_limits import ClientLimits
from rbee_fleet.common.inventory import Inventory, ModelPolicy
from rbee_fleet.common.net import is_loopback
from rbee_fleet.common.paths import Layout
from rbee_fleet.common.secrets import load_or_create
from rbee_fleet.contracts.fleet import WorkerSpawnOp
from rbee_fleet.hive.service import HiveSettings


class InsecureBind(Exception):
    pass


@dataclass(frozen=True)
class QueenSettings:
    host: str
    port: int
    url: str  # what hives and workers use to reach the queen
    layout: Layout
    api_keys: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()  # web pages (besides localhost ones) whose browsers may call the API
    cluster_token: str | None = None
    cluster_token_file: str | None = None
    heartbeat_interval_s: float = 5.0
    heartbeat_timeout_s: float = 15.0
    pulse_interval_s: float = 1.0  # 0: no pulses asked for
    pulse_timeout_s: float = 4.0
    admission_timeout_s: float = 30.0
    max_waiting: int = 64
    read_timeout_s: float = 300.0
    drain_timeout_s: float = 60.0  # on shutdown, how long answers in flight may run on
    client_limits: ClientLimits = ClientLimits()
    embedded_hive: HiveSettings | None = None
    remote_hives: dict[str, str] = field(default_factory=dict)  # alias -> URL, from the inventory
    declared_workers: tuple[WorkerSpawnOp, ...] = ()
    # Models on demand and prefix routing (see the inventory's [queen] and [models.NAME])
    on_demand: bool = True
    load_timeout_s: float = 120.0
    idle_ttl_s: float = 300.0
    load_retry_after_s: float = 30.0
    load_keepalive_s: float = 2.0
    model_policies: dict[str, ModelPolicy] = field(default_factory=dict)
    hive_budgets_mb: dict[str, int] = field(default_factory=dict)
    prefix_routing: bool = True
    prefix_load_guard: float = 0.0
    prefix_block_chars: int = 128

    def policy(self, model: str) -> ModelPolicy:
        return self.model_policies.get(model) or ModelPolicy()

    def idle_ttl(self, model: str) -> float:
        ttl = self.policy(model).idle_ttl_s
        return self.idle_ttl_s if ttl is None else ttl

    def check_security(self) -> None:
        if not is_loopback(self.host) and not self.api_keys:
            raise InsecureBind(
                f"the queen would listen on {self.host}, beyond this machine, with no API key: "
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
    token_file = layout.secrets / "cluster.token"
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
        host=q.host,
        port=q.port,
        url=q.url(),
        layout=layout,
        api_keys=tuple(q.effective_api_keys()),
        allowed_origins=tuple(q.allowed_origins),
        cluster_token=token,
        cluster_token_file=str(token_file),
        heartbeat_interval_s=q.heartbeat_interval_s,
        heartbeat_timeout_s=q.heartbeat_timeout_s,
        pulse_interval_s=q.pulse_interval_s,
        pulse_timeout_s=q.pulse_timeout_s,
        admission_timeout_s=q.admission_timeout_s,
        max_waiting=q.max_waiting,
        drain_timeout_s=q.drain_timeout_s,
        client_limits=ClientLimits(header_timeout_s=q.header_timeout_s, body_timeout_s=q.body_timeout_s,
                                   max_connections_per_client=q.max_connections_per_client),
        embedded_hive=embedded,
        remote_hives=remote,
        declared_workers=tuple(declared),
        on_demand=q.on_demand,
        load_timeout_s=q.load_timeout_s,
        idle_ttl_s=q.idle_ttl_s,
        load_retry_after_s=q.load_retry_after_s,
        load_keepalive_s=q.load_keepalive_s,
        model_policies=dict(inv.models),
        hive_budgets_mb={a: h.memory_budget_mb for a, h in inv.hives.items() if h.memory_budget_mb},
        prefix_routing=q.prefix_routing,
        prefix_load_guard=q.prefix_load_guard,
        prefix_block_chars=q.prefix_block_chars,
    )

