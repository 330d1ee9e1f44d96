"""The TOML inventory: the queen, the hives and the workers each should run.

Errors name the file, the line and the key, and nothing is started on a bad inventory.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rbee_fleet.common.net import is_loopback
from rbee_fleet.common.ssh_config import is_config_alias
from rbee_fleet.contracts.fleet import WorkerSpawnOp
from rbee_fleet.contracts.vocabulary import (
    DEVICE_HELP,
    DEVICE_PATTERN,
    BackendChoice,
    GpuBackendName,
    PlacementPolicy,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ALIAS_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"


class InventoryError(Exception):
    def __init__(self, path: str, line: int | None, key: str | None, message: str) -> None:
        self.path, self.line, self.key, self.message = path, line, key, message
        where = f"{path}:{line}" if line else path
        super().__init__(f"{where}: {key}: {message}" if key else f"{where}: {message}")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class QueenConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8500, ge=1, le=65535)
    advertise_url: str | None = None
    api_keys: list[str] = []
    api_keys_env: str | None = "RBEE_API_KEYS"
    allowed_origins: list[str] = []  # web pages whose browsers may call the queen (localhost pages always may)
    heartbeat_interval_s: float = Field(default=5.0, gt=0)
    heartbeat_timeout_s: float = Field(default=15.0, gt=0)
    # Pulses: a worker's cheap proof of life between heartbeats; silent past pulse_timeout_s it is out
    # (README: "A frozen host"). 0 turns pulses off (then heartbeat_timeout_s alone applies).
    pulse_interval_s: float = Field(default=1.0, ge=0)
    pulse_timeout_s: float = Field(default=4.0, gt=0)
    admission_timeout_s: float = Field(default=30.0, ge=0)
    max_waiting: int = Field(default=64, ge=0)
    drain_timeout_s: float = Field(default=60.0, ge=0)  # on shutdown, how long answers in flight may run on
    header_timeout_s: float = Field(default=10.0, gt=0)  # a client's request headers must arrive within this
    body_timeout_s: float = Field(default=30.0, gt=0)  # and its request body within this after them
    max_connections_per_client: int = Field(default=256, ge=1)  # open connections from one address
    # Models on demand (README: "Models on demand")
    on_demand: bool = True  # load a model of a hive's catalog when a request asks for it
    load_timeout_s: float = Field(default=120.0, gt=0)  # how long a request waits for such a load
    idle_ttl_s: float = Field(default=300.0, ge=0)  # unload an idle on-demand worker after this; 0 keeps it
    load_retry_after_s: float = Field(default=30.0, ge=0)  # a failed load is not tried again for this long
    load_keepalive_s: float = Field(default=2.0, gt=0)  # SSE comment interval for a streamed request that waits
    # Prefix-aware routing (README: "Routing that reuses the KV cache")
    prefix_routing: bool = True
    prefix_load_guard: float = Field(default=0.0, ge=0)  # how much busier (in slots) the holder may be
    prefix_block_chars: int = Field(default=128, ge=16, le=65536)

    @model_validator(mode="after")
    def _timeout_after_interval(self) -> QueenConfig:
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise ValueError("heartbeat_timeout_s must be longer than heartbeat_interval_s")
        if self.pulse_interval_s and self.pulse_timeout_s <= 2 * self.pulse_interval_s:
            raise ValueError("pulse_timeout_s must be more than twice pulse_interval_s (one late pulse is not death)")
        return self

    @property
    def is_loopback(self) -> bool:
        return is_loopback(self.host)

    def url(self) -> str:
        """The URL hives and workers use to reach the queen."""
        if self.advertise_url:
            return self.advertise_url.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{_url_host(host)}:{self.port}"

    def client_url(self) -> str:
        """The URL the operator's tools on this machine use."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else ("::1" if self.host == "::" else self.host)
        return f"http://{_url_host(host)}:{self.port}"

    def effective_api_keys(self) -> list[str]:
        keys = list(self.api_keys)
        if self.api_keys_env:
            keys += [k.strip() for k in os.environ.get(self.api_keys_env, "").split(",") if k.strip()]
        return keys


class WorkerDecl(_Section):
    model: str = Field(min_length=1)
    backend: BackendChoice = "auto"
    device: str = "cpu"
    placement: PlacementPolicy = "binpack"
    count: int = Field(default=1, ge=1, le=64)
    name: str | None = Field(default=None, pattern=ALIAS_RE)
    ctx_size: int | None = Field(default=None, ge=128)
    threads: int | None = Field(default=None, ge=1)
    max_queue: int | None = Field(default=None, ge=0)
    slots: int | None = Field(default=None, ge=1, le=256)
    embeddings: bool = False
    options: dict[str, Any] = {}
    gpu_layers: int | None = Field(default=None, ge=0)  # llamacpp on a GPU; default: every layer that fits
    devices: list[str] | None = None  # several GPUs of one backend: ["cuda:0", "cuda:1"] is device "cuda:0,1"

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.match(DEVICE_PATTERN, value):
            raise ValueError(f"device must be {DEVICE_HELP}")
        return value

    @model_validator(mode="after")
    def _devices(self) -> WorkerDecl:
        if self.devices is None:
            return self
        if self.device != "cpu" and "device" in self.model_fields_set:
            raise ValueError("set device or devices, not both")
        bad = [d for d in self.devices if not re.match(r"^(cuda|vulkan|rocm):\d+$|^metal$", d)]
        if bad or not self.devices:
            raise ValueError(f"devices: {bad or 'empty'}: each must be a GPU like 'cuda:0' or 'vulkan:1'")
        backends = {d.split(":")[0] for d in self.devices}
        if len(backends) > 1:
            raise ValueError(f"devices must be GPUs of one backend, not {' and '.join(sorted(backends))}")
        backend = backends.pop()
        self.device = backend if backend == "metal" else f"{backend}:" + ",".join(d.split(":")[1] for d in self.devices)
        return self


class HiveDecl(_Section):
    embedded: bool = False
    address: str = "127.0.0.1"
    port: int | None = Field(default=None, ge=1, le=65535)
    workers: list[WorkerDecl] = []
    # Installed hives: reached over SSH (the default), or on the operator's own machine without SSH.
    transport: Literal["ssh", "local"] | None = None
    # Hives reached over SSH add their own keys; see the README's inventory reference.
    ssh_host: str | None = None
    ssh_user: str | None = None
    ssh_port: int | None = Field(default=None, ge=1, le=65535)
    identity_file: str | None = None
    proxy_jump: str | None = None
    install_dir: str | None = None
    install_source: Literal["online", "offline"] | None = None
    python: str | None = None
    bind_host: str | None = None  # what the remote hive binds (default: its address)
    # llama-server GPU backends the host gets (default: what its workers' devices need, plus those built on
    # the operator machine that its hardware can use; see the README's GPU section).
    gpu_backends: list[GpuBackendName] | None = None
    memory_budget_mb: int | None = Field(default=None, ge=1)  # memory the queen may give this hive's workers


class ModelPolicy(_Section):
    """``[models.NAME]``: how the queen loads and keeps a model on demand."""

    on_demand: bool = True
    idle_ttl_s: float | None = Field(default=None, ge=0)  # default: [queen].idle_ttl_s
    memory_mb: int | None = Field(default=None, ge=1)  # the need of one worker (default: estimated)
    ctx_size: int | None = Field(default=None, ge=128)
    slots: int | None = Field(default=None, ge=1, le=256)
    threads: int | None = Field(default=None, ge=1)


class Defaults(_Section):
    hive_port: int = Field(default=9000, ge=1, le=65535)
    worker_port_base: int = Field(default=9300, ge=1, le=65535)
    ssh_user: str | None = None
    ssh_port: int = Field(default=22, ge=1, le=65535)
    identity_file: str | None = None
    install_dir: str = "~/.local/share/rbee-fleet"
    install_source: Literal["online", "offline"] = "offline"
    python: str = "python3"
    connect_timeout_s: float = Field(default=10.0, gt=0)
    command_timeout_s: float = Field(default=600.0, gt=0)


class Inventory(_Section):
    queen: QueenConfig = QueenConfig()
    defaults: Defaults = Defaults()
    hives: dict[str, HiveDecl] = {}
    models: dict[str, ModelPolicy] = {}

    @field_validator("hives")
    @classmethod
    def _aliases(cls, hives: dict[str, HiveDecl]) -> dict[str, HiveDecl]:
        for alias in hives:
            if not re.match(ALIAS_RE, alias):
                raise ValueError(f"hive alias {alias!r} must be letters, digits, '.', '_' or '-'")
        embedded = [a for a, h in hives.items() if h.embedded]
        if len(embedded) > 1:
            raise ValueError(f"only one hive can be embedded in the queen, not {', '.join(embedded)}")
        return hives

    def embedded_hive(self) -> tuple[str, HiveDecl] | None:
        for alias, hive in self.hives.items():
            if hive.embedded:
                return alias, hive
        return None

    def spawn_ops(self, alias: str) -> list[WorkerSpawnOp]:
        """The worker_spawn operations that bring ``alias`` to what the inventory declares."""
        return [
            WorkerSpawnOp(
                hive=alias, model=d.model, backend=d.backend, device=d.device, placement=d.placement, worker_id=wid,
                ctx_size=d.ctx_size, threads=d.threads, max_queue=d.max_queue, options=d.options,
                slots=d.slots, embeddings=d.embeddings, declared_as=wid, gpu_layers=d.gpu_layers,
            )
            for wid, d in self.worker_plan(alias)
        ]

    def worker_plan(self, alias: str) -> list[tuple[str, WorkerDecl]]:
        """(worker id, declaration) for each worker the hive should run; ids are stable across runs."""
        plan = []
        seen: dict[str, int] = {}
        for decl in self.hives[alias].workers:
            for i in range(decl.count):
                if decl.name:
                    wid = decl.name if decl.count == 1 else f"{decl.name}-{i}"
                else:
                    n = seen.get(decl.model, 0)
                    seen[decl.model] = n + 1
                    wid = f"{alias}-{decl.model}-{n}"
                plan.append((wid, decl))
        return plan



def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def default_inventory() -> Inventory:
    """What ``inventory/localhost.toml`` says: the queen here, an embedded hive, one CPU smollm2 worker."""
    return Inventory(hives={"localhost": HiveDecl(embedded=True, workers=[WorkerDecl(model="smollm2", device="cpu", ctx_size=2048)])})


def load_inventory(path: str | os.PathLike[str]) -> Inventory:
    path = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise InventoryError(path, None, None, f"cannot read: {exc.strerror or exc}") from None
    return parse_inventory(text, path)


def parse_inventory(text: str, path: str = "<inventory>") -> Inventory:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"\(at line (\d+), column \d+\)", str(exc))
        line = int(match.group(1)) if match else None
        message = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc))
        raise InventoryError(path, line, None, f"invalid TOML: {message}") from None
    try:
        inv = Inventory.model_validate(data)
    except ValidationError as exc:
        raise _first_error(exc, text, path) from None
    _cross_check(inv, text, path)
    return inv


def _cross_check(inv: Inventory, text: str, path: str) -> None:
    """Mistakes that span several tables: a jump host nobody declared, two hives on one address and port."""
    lines = KeyLines(text)
    seen: dict[tuple[str, int], str] = {}
    for alias, hive in inv.hives.items():
        jump = hive.proxy_jump
        if jump and jump not in inv.hives and not re.search(r"[@:.]", jump) and not is_config_alias(jump):
            key = ("hives", alias, "proxy_jump")
            known = ", ".join(a for a in inv.hives if a != alias) or "none"
            raise InventoryError(path, lines.find(key), _dotted(key),
                                 f"{jump!r} is neither a hive alias (hives: {known}) nor a Host in "
                                 f"~/.ssh/config; or give user@host[:port]")
        if jump == alias:
            key = ("hives", alias, "proxy_jump")
            raise InventoryError(path, lines.find(key), _dotted(key), "a hive cannot jump through itself")
        _check_transport(alias, hive, lines, path)
        if hive.embedded:
            continue
        where = (hive.address, hive.port or inv.defaults.hive_port)
        if where in seen:
            key = ("hives", alias, "port" if hive.port else "address")
            raise InventoryError(path, lines.find(key), _dotted(key),
                                 f"hive {seen[where]!r} already uses {where[0]}:{where[1]}")
        seen[where] = alias


SSH_KEYS = ("ssh_host", "ssh_user", "ssh_port", "identity_file", "proxy_jump")


def _check_transport(alias: str, hive: HiveDecl, lines: KeyLines, path: str) -> None:
    """``transport`` is for installed hives, and a local one has no SSH settings."""
    if hive.transport is not None and hive.embedded:
        key = ("hives", alias, "transport")
        raise InventoryError(path, lines.find(key), _dotted(key),
                             "the embedded hive runs inside the queen and is not installed: transport does not apply")
    if hive.transport == "local":
        for name in SSH_KEYS:
            if name in hive.model_fields_set:
                key = ("hives", alias, name)
                raise InventoryError(path, lines.find(key), _dotted(key),
                                     f'{name} does not apply to a hive with transport = "local" (it is not reached over SSH)')


def _first_error(exc: ValidationError, text: str, path: str) -> InventoryError:
    # An unknown key explains more than the "missing" error its typo also causes.
    err = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")[0]
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p in ("function-after", "function-before")))
    key = _dotted(loc)
    lines = KeyLines(text)
    line = lines.find(loc)
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        known = _known_keys(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        message = f"unknown key{f' (did you mean {close[0]!r}?)' if close else ''}"
    elif err["type"] == "missing":
        message = "required key is missing"
    return InventoryError(path, line, key or None, message)


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _known_keys(parent: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = Inventory
    names = [p for p in parent if not isinstance(p, int)]
    i = 0
    while i < len(names):
        name = names[i]
        if model is Inventory and name in ("hives", "models"):
            model = HiveDecl if name == "hives" else ModelPolicy
            i += 2  # skip the alias
            continue
        field = model.model_fields.get(name)
        if field is None:
            return []
        ann = field.annotation
        inner = getattr(ann, "__args__", (ann,))[0] if getattr(ann, "__origin__", None) is list else ann
        if not (isinstance(inner, type) and issubclass(inner, BaseModel)):
            return []
        model = inner
        i += 1
    return list(model.model_fields)


class KeyLines:
    """Line numbers of the keys and tables of a TOML text (what tomllib does not keep)."""

    _ARRAY = re.compile(r"^\s*\[\[\s*([^\]]+?)\s*\]\]")
    _TABLE = re.compile(r"^\s*\[\s*([^\]]+?)\s*\]")
    _KEY = re.compile(r"^\s*([A-Za-z0-9_\-\"'. ]+?)\s*=")

    def __init__(self, text: str) -> None:
        self.lines: dict[tuple[Any, ...], int] = {}
        counts: dict[tuple[Any, ...], int] = {}
        current: tuple[Any, ...] = ()
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if m := self._ARRAY.match(line):
                keys = _split_key(m.group(1))
                path = (*self._resolve(keys[:-1], counts), keys[-1])
                idx = counts.get(path, 0)
                counts[path] = idx + 1
                current = (*path, idx)
                self.lines.setdefault(current, number)
            elif m := self._TABLE.match(line):
                current = self._resolve(_split_key(m.group(1)), counts)
                self.lines.setdefault(current, number)
            elif m := self._KEY.match(line):
                self.lines.setdefault((*current, *_split_key(m.group(1))), number)

    @staticmethod
    def _resolve(path: tuple[str, ...], counts: dict[tuple[Any, ...], int]) -> tuple[Any, ...]:
        # A table under an array of tables belongs to that array's latest element.
        out: tuple[Any, ...] = ()
        for part in path:
            out = (*out, part)
            if out in counts:
                out = (*out, counts[out] - 1)
        return out

    def find(self, loc: tuple[Any, ...]) -> int | None:
        for end in range(len(loc), 0, -1):
            if loc[:end] in self.lines:
                return self.lines[loc[:end]]
        return None


def _split_key(key: str) -> tuple[str, ...]:
    parts = re.findall(r'"([^"]*)"|\'([^\']*)\'|([^.\s]+)', key)
    return tuple(a or b or c for a, b, c in parts)
