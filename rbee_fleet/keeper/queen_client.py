"""The keeper's HTTP client for the queen: status, hives, models and the job API."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from rbee_fleet.common.errors import error_from_body
from rbee_fleet.common.jobs import JobClient
from rbee_fleet.contracts.fleet import FleetStatus, JobInfo, ModelEntry


class QueenUnreachable(Exception):
    def __init__(self, url: str, cause: str) -> None:
        super().__init__(f"the queen at {url} is not answering ({cause}); start it with: rbee-keeper up")
        self.url = url
        self.cause = cause


class QueenClient:
    def __init__(self, url: str, api_key: str | None = None, session: aiohttp.ClientSession | None = None) -> None:
        self.url = url.rstrip("/")
        self.headers: dict[str, str] = {}
        self.set_credential(api_key)
        self._own_session = session is None
        self.session = session or aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=5))
        self.jobs = JobClient(self.session, self.url, self.headers)

    def set_credential(self, secret: str | None) -> None:
        """Send ``secret`` as the bearer from now on (the job client shares these headers)."""
        self.headers.pop("Authorization", None)
        if secret:
            self.headers["Authorization"] = f"Bearer {secret}"

    async def close(self) -> None:
        if self._own_session:
            await self.session.close()

    async def __aenter__(self) -> QueenClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def get(self, path: str, timeout: float = 10.0) -> Any:
        try:
            async with self.session.get(f"{self.url}{path}", headers=self.headers,
                                        timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                body = await resp.json(content_type=None)
                if resp.status != 200:
                    raise error_from_body(resp.status, body)
                return body
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
            raise QueenUnreachable(self.url, str(exc) or "timed out") from None

    async def healthy(self) -> bool:
        try:
            await self.get("/health", timeout=2.0)
            return True
        except QueenUnreachable:
            return False

    async def wait_healthy(self, timeout: float, alive: Any = None) -> None:
        """Wait until the queen answers; ``alive()`` returning False (its process died) ends the wait early."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await self.healthy():
                return
            if alive is not None and not alive():
                raise QueenUnreachable(self.url, "its process exited")
            await asyncio.sleep(0.1)
        raise QueenUnreachable(self.url, f"not up after {timeout:.0f} s")

    async def status(self) -> FleetStatus:
        return FleetStatus.model_validate(await self.get("/v1/status"))

    async def models(self, hive: str) -> list[ModelEntry]:
        body = await self.get(f"/v1/hives/{hive}/models", timeout=30.0)
        return [ModelEntry.model_validate(m) for m in body["models"]]

    async def forget_hive(self, hive: str) -> bool:
        """Make the queen forget a hive and its workers (after an uninstall); False if it knew none."""
        try:
            async with self.session.delete(f"{self.url}/v1/hives/{hive}", headers=self.headers,
                                           timeout=aiohttp.ClientTimeout(total=10.0)) as resp:
                body = await resp.json(content_type=None)
                if resp.status != 200:
                    raise error_from_body(resp.status, body)
                return bool(body.get("forgotten"))
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
            raise QueenUnreachable(self.url, str(exc) or "timed out") from None

    async def job_list(self) -> list[JobInfo]:
        body = await self.get("/v1/jobs")
        return [JobInfo.model_validate(j) for j in body["jobs"]]
