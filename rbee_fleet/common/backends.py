"""Which backend runs which model where: shared by the hive (choosing) and the worker (loading)."""

from __future__ import annotations

from rbee_fleet.contracts.vocabulary import BACKEND_NAMES

# model format -> backends that can load it
FORMATS: dict[str, tuple[str, ...]] = {
    "gguf": ("llamacpp",),
    "exl2": ("exllamav2",),
    "safetensors": ("exllamav2",),
}


class BackendChoiceError(ValueError):
    pass


def choose_backend(requested: str, device: str, model_format: str) -> str:
    """Resolve ``auto`` from the model's format, and refuse combinations that cannot run."""
    able = FORMATS.get(model_format, ())
    if requested == "auto":
        if not able:
            raise BackendChoiceError(f"no backend loads {model_format} models")
        backend = able[0]
    elif requested not in BACKEND_NAMES:
        raise BackendChoiceError(f"unknown backend {requested!r}; known: {', '.join(BACKEND_NAMES)}")
    elif requested not in able:
        raise BackendChoiceError(f"the {requested} backend cannot load {model_format} models")
    else:
        backend = requested
    if backend == "exllamav2" and not device.startswith("cuda"):
        raise BackendChoiceError(f"exllamav2 needs an NVIDIA GPU (device cuda:N), not {device}")
    return backend
