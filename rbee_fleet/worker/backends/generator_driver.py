"""One dedicated thread that owns an exllamav2 dynamic generator.

The generator is not thread-safe and ``iterate()`` blocks for a whole forward pass, so every call into
it (enqueue, cancel, iterate) happens on this thread, never on the event loop. Requests talk to the
thread through an inbox; results go back to each request through its own sink.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger(__name__)

Sink = Callable[[dict[str, Any] | BaseException], None]


class DynamicGenerator(Protocol):
    """The part of ``ExLlamaV2DynamicGenerator`` the driver uses."""

    page_size: int
    max_pages: int
    unreferenced_pages: dict[Any, Any]

    def enqueue(self, job: Any) -> Any: ...
    def cancel(self, job: Any) -> None: ...
    def iterate(self) -> list[dict[str, Any]]: ...
    def num_remaining_jobs(self) -> int: ...


@dataclass(frozen=True)
class CacheSnapshot:
    """The cache as the generator thread last saw it (read from other threads without locking)."""

    free_pages: int
    running: int
    waiting: int


class GeneratorDriver:
    def __init__(self, generator: DynamicGenerator, *, on_tokens: Callable[[int], None] | None = None) -> None:
        self._gen = generator
        self._inbox: queue.SimpleQueue[tuple[str, Any, Sink | None]] = queue.SimpleQueue()
        self._sinks: dict[int, tuple[Any, Sink]] = {}  # identifier -> (job, sink)
        self._on_tokens = on_tokens or (lambda n: None)
        self.snapshot = CacheSnapshot(len(generator.unreferenced_pages), 0, 0)
        self._thread = threading.Thread(target=self._run, name="exllamav2-generator", daemon=True)
        self._thread.start()

    def submit(self, identifier: int, job: Any, sink: Sink) -> None:
        """Queue ``job``; every result for it (or the exception that ended it) goes to ``sink``."""
        self._inbox.put(("enqueue", (identifier, job), sink))

    def cancel(self, identifier: int) -> None:
        """Stop the job at its next step and free its cache pages (the sink hears nothing more)."""
        self._inbox.put(("cancel", identifier, None))

    def close(self, timeout: float = 30.0) -> None:
        self._inbox.put(("stop", None, None))
        self._thread.join(timeout)

    # -- the generator thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            idle = self._gen.num_remaining_jobs() == 0
            try:
                # Sleep while there is nothing to generate; otherwise only look at what has arrived.
                command = self._inbox.get(block=idle)
            except queue.Empty:
                command = None
            while command is not None:
                if not self._handle(*command):
                    self._fail_all(RuntimeError("the worker is stopping"))
                    return
                try:
                    command = self._inbox.get_nowait()
                except queue.Empty:
                    command = None
            if self._gen.num_remaining_jobs():
                self._step()
            self._snap()

    def _handle(self, kind: str, payload: Any, sink: Sink | None) -> bool:
        if kind == "stop":
            return False
        if kind == "enqueue":
            identifier, job = payload
            assert sink is not None
            try:
                self._gen.enqueue(job)
            except Exception as exc:  # noqa: BLE001 - e.g. "Job requires N pages": the request hears it
                sink(exc)
                return True
            self._sinks[identifier] = (job, sink)
        elif kind == "cancel":
            entry = self._sinks.pop(payload, None)
            if entry is not None:
                self._gen.cancel(entry[0])
        return True

    def _step(self) -> None:
        try:
            results = self._gen.iterate()
        except Exception as exc:  # noqa: BLE001 - a failed forward pass ends every job, never the thread
            log.exception("exllamav2 generator failed; ending %d job(s)", len(self._sinks))
            self._fail_all(exc)
            return
        for result in results:
            entry = self._sinks.get(result.get("identifier"))  # type: ignore[arg-type]
            if entry is None:
                continue  # cancelled while this step ran
            ids = result.get("token_ids")
            if ids is not None:
                self._on_tokens(int(ids.shape[-1]))
            if result.get("eos"):
                del self._sinks[result["identifier"]]
            entry[1](result)

    def _fail_all(self, exc: BaseException) -> None:
        for job, sink in list(self._sinks.values()):
            try:
                self._gen.cancel(job)
            except Exception:  # noqa: BLE001 - the generator is already broken; the jobs end anyway
                pass
            sink(exc)
        self._sinks.clear()

    def _snap(self) -> None:
        running = len(getattr(self._gen, "active_jobs", ()))
        waiting = len(getattr(self._gen, "pending_jobs", ()))
        self.snapshot = CacheSnapshot(len(self._gen.unreferenced_pages), running, waiting)
