"""In-process inference backends, imported only when used (a CPU host never touches CUDA).

CPU workers (``llamacpp``) run llama.cpp's own server as a separate process instead: see
``rbee_fleet.worker.engine_worker``.
"""

from __future__ import annotations

import importlib
import importlib.util

from rbee_fleet.worker.backends.base import Backend, BackendError, WorkerSpec

# name -> (module, class, the distribution that provides the library)
_BACKENDS: dict[str, tuple[str, str, str]] = {
    "exllamav2": ("rbee_fleet.worker.backends.exllamav2", "ExLlamaV2Backend", "exllamav2"),
}


def available_backends() -> list[str]:
    """In-process backends whose library is installed here (found without importing it)."""
    return [name for name, (_, _, lib) in _BACKENDS.items() if importlib.util.find_spec(lib) is not None]


def load_backend(spec: WorkerSpec) -> Backend:
    """Import the backend and load the model (blocking; run it off the event loop)."""
    try:
        module_name, class_name, _ = _BACKENDS[spec.backend]
    except KeyError:
        raise BackendError(f"unknown backend {spec.backend!r}; known: {', '.join(_BACKENDS)}") from None
    module = importlib.import_module(module_name)
    cls: type[Backend] = getattr(module, class_name)
    return cls(spec)


__all__ = ["Backend", "BackendError", "WorkerSpec", "available_backends", "load_backend"]
