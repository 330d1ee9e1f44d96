"""A stand-in for the ``pynvml`` module (nvidia-ml-py) answering like NVML does on given cards.

No NVIDIA driver exists where these tests run, so NVML's answers are scripted here from the figures of
real cards. Only the functions the hive calls exist; their names and parameters are checked against
the real nvidia-ml-py in the tests.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field

NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_GPU_IS_LOST = 15

_MESSAGES = {
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_GPU_IS_LOST: "GPU is lost",
}


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return _MESSAGES.get(self.value, f"Unknown Error ({self.value})")


@dataclass
class Card:
    name: str
    uuid: str
    total_mib: int
    free_mib: int
    capability: tuple[int, int]
    lost: bool = False  # "fell off the bus": every call on it fails with GPU_IS_LOST


@dataclass
class Memory:
    total: int
    free: int
    used: int


@dataclass
class NvmlStandIn:
    cards: list[Card]
    driver: str | bytes = "550.54.15"
    init_error: int | None = None
    calls: list[str] = field(default_factory=list)
    open: bool = False

    def module(self) -> types.ModuleType:
        """The stand-in as a module object, shaped like ``import pynvml``."""
        mod = types.ModuleType("pynvml_standin")
        mod.NVMLError = NVMLError  # type: ignore[attr-defined]
        for name in ("nvmlInit", "nvmlShutdown", "nvmlSystemGetDriverVersion", "nvmlDeviceGetCount",
                     "nvmlDeviceGetHandleByIndex", "nvmlDeviceGetMemoryInfo", "nvmlDeviceGetName",
                     "nvmlDeviceGetUUID", "nvmlDeviceGetCudaComputeCapability"):
            setattr(mod, name, getattr(self, name))
        return mod

    def nvmlInit(self) -> None:
        self.calls.append("init")
        if self.init_error is not None:
            raise NVMLError(self.init_error)
        self.open = True

    def nvmlShutdown(self) -> None:
        self.calls.append("shutdown")
        self.open = False

    def nvmlSystemGetDriverVersion(self) -> str | bytes:
        return self.driver

    def nvmlDeviceGetCount(self) -> int:
        return len(self.cards)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Card:
        card = self.cards[index]
        if card.lost:
            raise NVMLError(NVML_ERROR_GPU_IS_LOST)
        return card

    def nvmlDeviceGetMemoryInfo(self, handle: Card, version: int | None = None) -> Memory:
        mib = 2**20
        return Memory(total=handle.total_mib * mib, free=handle.free_mib * mib,
                      used=(handle.total_mib - handle.free_mib) * mib)

    def nvmlDeviceGetName(self, handle: Card) -> str:
        return handle.name

    def nvmlDeviceGetUUID(self, handle: Card) -> str:
        return handle.uuid

    def nvmlDeviceGetCudaComputeCapability(self, handle: Card) -> tuple[int, int]:
        return handle.capability


RTX_3090 = Card("NVIDIA GeForce RTX 3090", "GPU-6f1e0c2a-9b47-3d58-a1c4-7e02b9d4f311", 24576, 24237, (8, 6))
RTX_4090 = Card("NVIDIA GeForce RTX 4090", "GPU-b83d51f0-2c6e-4a97-8d1b-0f5e7a3c9246", 24564, 23011, (8, 9))
A100_80GB = Card("NVIDIA A100-SXM4-80GB", "GPU-2e9a7b14-c5d3-e08f-61a2-94bd3f07c85e", 81920, 81050, (8, 0))
