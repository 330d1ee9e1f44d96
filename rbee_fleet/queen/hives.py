"""How the queen reaches hives: the embedded one by direct calls, the others over HTTP."""

from __future__ import annotations

from typing import Any, Protocol

import aiohttp

from rbee_fleet.common.errors import OperationFailed, error_from_body
from rbee_fleet.common.jobs import Emitter, JobClient
from rbee_fleet.contracts.fleet import HiveHeartbeat, ModelEntry
from rbee_fleet.hive.service import HiveService


class HiveHandle(Protocol):
    hive_id: str

    async def run(self, operation: Any, emit: Emitter) -> dict[str, Any]: ...

    async def models(self) -> list[ModelEntry]: ...


class EmbeddedHive:
    """The hive living inside the queen's process: no extra process, no HTTP hop."""

    def __init__(self, service: HiveService) -> None:
        self.service = service
        self.hive_id = service.settings.hive_id

    async def run(self, operation: Any, emit: Emitter) -> dict[str, Any]:
        return await self.service.run(operation, emit)

    async def models(self) -> list[ModelEntry]:
        return self.service.models()

    def status(self) -> HiveHeartbeat:
        return self.service.status()


class RemoteHive:
    """A hive on another machine, reached through its job API."""

    def __init__(self, hive_id: str, url: str, session: aiohttp.ClientSession, token: str | None) -> None:
        self.hive_id = hive_id
        self.url = url.rstrip("/")
        self._session = session
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._jobs = JobClient(session, self.url, self._headers)

    async def run(self, operation: Any, emit: Emitter) -> dict[str, Any]:
        try:
            return await self._jobs.run(operation, on_event=emit.relay)
        except aiohttp.ClientError as exc:
            raise OperationFailed(f"hive {self.hive_id} at {self.url} is unreachable: {exc}") from None

    async def models(self) -> list[ModelEntry]:
        try:
            async with self._session.get(f"{self.url}/v1/models", headers=self._headers,
                                         timeout=aiohttp.ClientTimeout(total=10)) as resp:
                body = await resp.json(content_type=None)
                if resp.status != 200:
                    raise error_from_body(resp.status, body)
        except aiohttp.ClientError as exc:
            raise OperationFailed(f"hive {self.hive_id} at {self.url} is unreachable: {exc}") from None
        return [ModelEntry.model_validate(m) for m in body.get("models", [])]
