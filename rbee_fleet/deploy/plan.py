"""What a host should look like, and the ordered steps that get it there: computed from facts, no I/O.

``HostSpec`` is the inventory's wish for one host; ``render_files`` turns it into the files the host
gets (from ``templates/``); ``plan_host`` compares the host's facts with the wish and lists the steps.
The same plan is shown by ``deploy --check`` and carried out by ``steps``, so a host that already
matches gets a plan with nothing that changes it.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import jinja2

from rbee_fleet.common.paths import CLUSTER_TOKEN
from rbee_fleet.contracts.fleet import WorkerSpawnOp
from rbee_fleet.contracts.vocabulary import BUILTIN_MODELS, StepAction
from rbee_fleet.deploy.facts import HostFacts, preflight_problems
from rbee_fleet.deploy.targets import Target

UNIT_NAME = "rbee-hive.service"
KEEP_VERSIONS = 2  # the current version and the one before it, for a one-switch rollback
MARKER_SCHEMA = 1


@dataclass(frozen=True)
class HostSpec:
    """One hive the keeper installs (over SSH, or locally with ``transport = "local"``) as the inventory declares it."""

    alias: str
    address: str  # what the queen uses to reach the hive and its workers
    port: int
    target: Target  # how the keeper reaches the host
    install_dir: str
    install_source: str  # offline | online
    python: str
    queen_url: str
    worker_port_base: int
    heartbeat_interval_s: float
    command_timeout_s: float = 600.0
    bind_host: str | None = None  # default: the address
    packages: tuple[str, ...] = ()  # model packages the declared workers need (built-in models)
    workers: tuple[WorkerSpawnOp, ...] = ()
    memory_budget_mb: int | None = None  # what the host's workers may take in all (the inventory's budget)
    gpu_backends: tuple[str, ...] | None = None  # llama-server GPU backends to ship; None: from the host (steps)

    @property
    def bind(self) -> str:
        return self.bind_host or self.address

    @property
    def needs_gpu(self) -> bool:
        """Whether a declared worker runs on exllamav2 (then the host gets the ``gpu`` extra, torch and a stack
        check). A GGUF worker on ``cuda:N`` runs on llama-server's CUDA backend and needs neither; a worker
        with ``backend = "auto"`` on CUDA counts, since its model's format is known only on the host."""
        return any(op.backend == "exllamav2" or (op.backend == "auto" and op.device.startswith("cuda")
                                                 and op.model not in BUILTIN_MODELS) for op in self.workers)

    @property
    def needs_nvidia(self) -> bool:
        """Whether a declared worker is placed on an NVIDIA GPU by name."""
        return any(op.device.startswith("cuda") for op in self.workers)

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}"


def supervision_mode(facts: HostFacts) -> str:
    """systemd when the host runs it (a system unit as root, else a user unit), else a pidfile."""
    if not facts.systemd:
        return "pidfile"
    return "systemd-system" if facts.is_root else "systemd-user"


def unit_path(facts: HostFacts) -> str | None:
    mode = supervision_mode(facts)
    if mode == "systemd-system":
        return f"/etc/systemd/system/{UNIT_NAME}"
    if mode == "systemd-user":
        return f"{facts.home}/.config/systemd/user/{UNIT_NAME}"
    return None


@dataclass(frozen=True)
class RemoteFile:
    path: str
    content: str
    mode: int

    def digest(self) -> str:
        return hashlib.sha256(f"{self.path}\0{self.mode:o}\0{self.content}".encode()).hexdigest()


_ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False,
                          trim_blocks=True, lstrip_blocks=True)
_ENV.filters["q"] = lambda value: shlex.quote(str(value))


def template(name: str) -> jinja2.Template:
    text = resources.files("rbee_fleet.deploy").joinpath("templates").joinpath(name).read_text(encoding="utf-8")
    return _ENV.from_string(text)


def render_files(spec: HostSpec, facts: HostFacts, token: str) -> list[RemoteFile]:
    """Every file the keeper writes on the host, with its mode (the token file is 0600)."""
    inst = facts.install_dir
    mode = supervision_mode(facts)
    values: dict[str, Any] = {
        "alias": spec.alias, "install_dir": inst, "bind_host": spec.bind, "port": spec.port,
        "address": spec.address, "queen_url": spec.queen_url, "worker_port_base": spec.worker_port_base,
        "heartbeat_interval_s": spec.heartbeat_interval_s, "mode": mode, "unit_name": UNIT_NAME,
    }
    files = [
        RemoteFile(f"{inst}/bin/rbee-hive-run", template("rbee-hive-run.sh").render(values), 0o755),
        RemoteFile(f"{inst}/bin/rbee-hive-ctl", template("rbee-hive-ctl.sh").render(values), 0o755),
        RemoteFile(f"{inst}/secrets/{CLUSTER_TOKEN}", token + "\n", 0o600),
    ]
    unit = unit_path(facts)
    if unit is not None:
        files.append(RemoteFile(unit, template("rbee-hive.service").render(values), 0o644))
    return files


def config_hash(files: list[RemoteFile]) -> str:
    digest = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.path):
        digest.update(f.digest().encode())
    return digest.hexdigest()[:16]


def marker(release_id: str, version: str, cfg_hash: str, spec: HostSpec, facts: HostFacts,
           previous: str | None = None) -> dict[str, Any]:
    """What ``INSTALL/marker.json`` records; ``previous`` is the version a rollback switches back to."""
    return {"schema": MARKER_SCHEMA, "release": release_id, "version": version, "config_hash": cfg_hash,
            "install_source": spec.install_source, "python": facts.python_tag, "mode": supervision_mode(facts),
            "previous": previous}


@dataclass(frozen=True)
class Step:
    action: StepAction
    detail: str
    changes: bool = True


@dataclass(frozen=True)
class HostPlan:
    alias: str
    steps: tuple[Step, ...] = ()
    problems: tuple[str, ...] = ()
    files: tuple[RemoteFile, ...] = field(default=(), repr=False)
    config_hash: str = ""
    release_id: str = ""
    prune: tuple[str, ...] = ()
    previous: str | None = None  # recorded in the marker: the version before this one, kept for a rollback

    @property
    def changes(self) -> bool:
        return any(s.changes for s in self.steps)

    def has(self, action: StepAction) -> bool:
        return any(s.action == action for s in self.steps)

    def describe(self) -> str:
        if self.problems:
            return "; ".join(self.problems)
        changing = [s.detail for s in self.steps if s.changes]
        return "; ".join(changing) if changing else "nothing to change"


def plan_host(spec: HostSpec, facts: HostFacts, release_id: str, token: str) -> HostPlan:
    """The steps that bring the host from ``facts`` to ``spec`` running ``release_id``."""
    installed = release_id in facts.versions
    problems = preflight_problems(facts, spec.python, spec.port, spec.bind, need_install=not installed,
                                  need_pip=spec.install_source == "online")
    if spec.needs_nvidia and not facts.gpus:
        problems.append("the inventory gives this host GPU workers, but it has no NVIDIA GPU (nvidia-smi lists none)")
    host_built = [b for b in (spec.gpu_backends or ()) if b in ("rocm", "metal")]
    if host_built and spec.install_source != "online":
        problems.append(f"the {' and '.join(host_built)} backend of llama-server is compiled on the host itself, "
                        'which needs install_source = "online" (the host fetches cmake and its toolkit is used)')
    if problems:
        return HostPlan(spec.alias, problems=tuple(problems), release_id=release_id)
    files = render_files(spec, facts, token)
    cfg = config_hash(files)
    mark = facts.marker or {}
    steps: list[Step] = []
    if not installed:
        steps.append(Step(StepAction.INSTALL, f"install rbee-fleet {release_id} ({spec.install_source}, Python {facts.python_tag})"))
    if spec.needs_gpu and mark.get("release") != release_id:
        # Before anything the running hive uses changes: a failing check leaves the host as it was. The
        # marker is written only at the end of a deploy, so a check that failed runs again next time.
        steps.append(Step(StepAction.GPU_CHECK, "check the NVIDIA driver, CUDA torch and exllamav2 (rbee-hive --check)",
                          changes=False))
    config_changed = mark.get("config_hash") != cfg
    if config_changed:
        steps.append(Step(StepAction.CONFIG, "write the hive's configuration" if mark else "write the hive's configuration (first time)"))
    switched = facts.current != release_id
    if switched:
        was = f" (was {facts.current})" if facts.current else ""
        steps.append(Step(StepAction.SWITCH, f"switch current to {release_id}{was}"))
    if not facts.hive_running:
        steps.append(Step(StepAction.START, f"start the hive ({supervision_mode(facts)})"))
    elif switched or config_changed:
        steps.append(Step(StepAction.RESTART, "restart the hive on the new " + ("version" if switched else "configuration")))
    steps.append(Step(StepAction.WAIT, f"hive answers at {spec.url}", changes=False))
    previous = facts.current if switched else mark.get("previous")
    if previous == release_id:
        previous = None
    new_marker = marker(release_id, release_id.split("-", 1)[0], cfg, spec, facts, previous)
    if {k: mark.get(k) for k in new_marker} != new_marker:
        steps.append(Step(StepAction.MARKER, "record the installed version and configuration"))
    keep = {release_id, *(v for v in (facts.current, previous) if v in facts.versions)}
    old = tuple(v for v in facts.versions if v not in keep)
    extra = len(keep) + len(old) - KEEP_VERSIONS
    prune = old[:max(0, extra)]
    if prune:
        steps.append(Step(StepAction.PRUNE, f"remove old version{'s' if len(prune) > 1 else ''} {', '.join(prune)}"))
    steps.append(Step(StepAction.WORKERS, f"{len(spec.workers)} declared worker(s) through the queen", changes=False))
    return HostPlan(spec.alias, steps=tuple(steps), files=tuple(files), config_hash=cfg, release_id=release_id, prune=prune,
                    previous=previous)


def marker_json(value: dict[str, Any]) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))
