"""A host counts as deployed only when it serves: the health gate a rolling deploy and a rollback apply.

Three checks, in order, each with its own bound: the hive answers at its inventory address as itself (the
embedded hive: the queen running it answers);
every declared worker runs with its declared settings and the queen has its heartbeat saying ready; a
short completion through the queen, pinned to this host's workers (``X-Rbee-Hive``, which needs the
cluster token), succeeds for each model the host serves. The first failing check fails the gate with its
output.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import aiohttp

from rbee_fleet.contracts.vocabulary import PIN_HEADER
from rbee_fleet.deploy.converge import plan_workers
from rbee_fleet.deploy.plan import HostSpec
from rbee_fleet.deploy.steps import hive_answers
from rbee_fleet.keeper.hosts.worker_converge import WorkerConverger
from rbee_fleet.keeper.queen_client import QueenClient, QueenUnreachable

HIVE_TIMEOUT_S = 15.0
WORKERS_TIMEOUT_S = 60.0
COMPLETION_TIMEOUT_S = 60.0


class GateFailed(Exception):
    """One check of the gate failed; ``output`` is what it saw."""

    def __init__(self, check: str, output: str) -> None:
        super().__init__(f"health gate: {check} failed: {output}")
        self.check = check
        self.output = output


async def health_gate(spec: HostSpec, client: QueenClient, converger: WorkerConverger, *,
                      hive_check: Callable[[], Awaitable[None]]) -> None:
    """Raise ``GateFailed`` unless the host's hive answers (``hive_check``: each kind of host knows how), its
    declared workers are ready and a test completion through the queen to each of its models succeeds."""
    await hive_check()
    await _workers_ready(spec, client, converger)
    models = sorted({op.model for op in spec.workers if not op.embeddings})
    for model in models:
        await _completion(spec, client, converger.token, model)


async def queen_answers(spec: HostSpec, client: QueenClient) -> None:
    """The embedded hive's check: the queen that runs it answers."""
    if not await client.healthy():
        raise GateFailed("hive", f"the queen that runs {spec.alias}'s hive does not answer at {client.url}")


async def hive_answers_at_its_address(spec: HostSpec, token: str) -> None:
    """An installed hive's check: it answers at its advertised URL, as this very hive."""
    deadline = time.monotonic() + HIVE_TIMEOUT_S
    last = "no answer"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as session:
        while time.monotonic() < deadline:
            seen = await hive_answers(session, spec, token)
            if seen is None:
                return
            last = seen
            await asyncio.sleep(0.3)
    raise GateFailed("hive", f"no answer from {spec.url} as {spec.alias} within {HIVE_TIMEOUT_S:.0f} s ({last})")


async def _workers_ready(spec: HostSpec, client: QueenClient, converger: WorkerConverger) -> list[str]:
    """The running ids of the declared workers, once every one is ready in the queen."""
    deadline = time.monotonic() + WORKERS_TIMEOUT_S
    while True:
        plan = plan_workers(list(spec.workers), await converger.running(spec))
        pending = [c.describe() for c in plan if c.action in ("start", "replace")]
        ids = [c.running for c in plan if c.action == "ok" and c.running]
        try:
            status = await client.status()
        except QueenUnreachable as exc:
            raise GateFailed("workers", str(exc)) from None
        not_ready = [wid for wid in ids if not status.worker_ready(wid)]
        if not pending and not not_ready:
            return ids
        if time.monotonic() > deadline:
            what = "; ".join(pending + [f"worker {wid} is not ready in the queen" for wid in not_ready])
            raise GateFailed("workers", f"{what} (after {WORKERS_TIMEOUT_S:.0f} s)")
        await asyncio.sleep(0.3)


async def _completion(spec: HostSpec, client: QueenClient, token: str, model: str) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "Say OK."}], "max_tokens": 2, "temperature": 0}
    headers = {"Authorization": f"Bearer {token}", PIN_HEADER: spec.alias}
    try:
        async with client.session.post(f"{client.url}/v1/chat/completions", json=body, headers=headers,
                                       timeout=aiohttp.ClientTimeout(total=COMPLETION_TIMEOUT_S)) as resp:
            text = await resp.text()
            if resp.status == 200 and '"choices"' in text:
                return
            raise GateFailed("completion", f"{model} on {spec.alias} through the queen: HTTP {resp.status}: {text[:300]}")
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise GateFailed("completion", f"{model} on {spec.alias} through the queen: {exc or type(exc).__name__}") from None
