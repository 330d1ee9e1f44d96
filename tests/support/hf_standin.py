"""A stand-in for the Hugging Face hub's HTTP API, served by aiohttp on loopback (tests only).

``huggingface_hub`` is pointed at it with ``HF_ENDPOINT``. It answers the calls ``snapshot_download``
makes (repository info per revision, the file tree, file downloads with the hub's headers) for
in-memory repositories, where each revision (an EXL2 repository's branch per bits-per-weight) has
its own files, and the hub's "not found" errors for anything else. Every request is recorded.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.support.procs import free_port

LFS_MIN = 1024  # files at least this big are served as LFS objects, as the hub does with weights


@dataclass
class HubStandIn:
    # repo id -> revision (branch) -> path -> content
    repos: dict[str, dict[str, dict[str, bytes]]]
    chunk_delay_s: float = 0.0  # slows downloads so that progress can be watched
    requests: list[str] = field(default_factory=list)
    completed: list[str] = field(default_factory=list)  # files whose download was sent to the end
    declared: dict[str, int] = field(default_factory=dict)  # path -> size the hub claims (a lie), else the real one
    url: str = ""

    def commit(self, repo: str, revision: str) -> str:
        files = self.repos[repo][revision]
        digest = hashlib.sha1(repo.encode() + revision.encode())
        for path in sorted(files):
            digest.update(path.encode() + hashlib.sha1(files[path]).digest())
        return digest.hexdigest()

    def _find(self, repo: str, rev: str) -> tuple[str, dict[str, bytes]] | web.Response:
        if repo not in self.repos:
            return web.json_response({"error": "Repository not found"}, status=404,
                                     headers={"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
        for branch in self.repos[repo]:
            if rev in (branch, self.commit(repo, branch)):
                return self.commit(repo, branch), self.repos[repo][branch]
        return web.json_response({"error": f"Invalid rev id: {rev}"}, status=404,
                                 headers={"X-Error-Code": "RevisionNotFound", "X-Error-Message": f"Invalid rev id: {rev}"})

    # -- routes ------------------------------------------------------------------------------------

    async def _record(self, request: web.Request) -> None:
        self.requests.append(f"{request.method} {request.path_qs}")

    async def repo_info(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        repo = f"{request.match_info['owner']}/{request.match_info['name']}"
        found = self._find(repo, request.match_info.get("rev", "main"))
        if isinstance(found, web.Response):
            return found
        sha, files = found
        return web.json_response({
            "_id": sha[:24], "id": repo, "modelId": repo, "sha": sha, "private": False, "disabled": False,
            "gated": False, "downloads": 0, "likes": 0, "tags": [], "library_name": "exllamav2",
            "lastModified": "2024-05-01T12:00:00.000Z", "createdAt": "2024-04-20T09:00:00.000Z",
            "siblings": [{"rfilename": p} for p in sorted(files)],
        })

    async def tree(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        repo = f"{request.match_info['owner']}/{request.match_info['name']}"
        found = self._find(repo, request.match_info["rev"])
        if isinstance(found, web.Response):
            return found
        _, files = found
        entries: list[dict[str, Any]] = []
        dirs: set[str] = set()
        for path in sorted(files):
            parts = path.split("/")
            for i in range(1, len(parts)):
                dirs.add("/".join(parts[:i]))
            data = files[path]
            size = self.declared.get(path, len(data))
            entry: dict[str, Any] = {"type": "file", "oid": _git_oid(data), "size": size, "path": path}
            if len(data) >= LFS_MIN:
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": size, "pointerSize": 134}
            entries.append(entry)
        entries += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": d} for d in sorted(dirs)]
        return web.json_response(entries)

    async def resolve(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        repo = f"{request.match_info['owner']}/{request.match_info['name']}"
        found = self._find(repo, request.match_info["rev"])
        if isinstance(found, web.Response):
            return found
        sha, files = found
        path = request.match_info["path"]
        if path not in files:
            return web.json_response({"error": "Entry not found"}, status=404,
                                     headers={"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha})
        data = files[path]
        etag = hashlib.sha256(data).hexdigest() if len(data) >= LFS_MIN else _git_oid(data)
        size = self.declared.get(path, len(data))
        headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Content-Length": str(size),
                   "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if len(data) >= LFS_MIN:
            headers |= {"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(size)}
        start = 0
        if request.headers.get("Range", "").startswith("bytes="):
            start = int(request.headers["Range"][6:].split("-")[0] or 0)
        if request.method == "HEAD":
            return web.Response(status=200, headers=headers)
        body = data[start:]
        headers["Content-Length"] = str(len(body))
        response = web.StreamResponse(status=206 if start else 200, headers=headers)
        await response.prepare(request)
        step = max(1, len(body) // 20)
        for i in range(0, len(body), step):
            await response.write(body[i:i + step])
            if self.chunk_delay_s:
                await asyncio.sleep(self.chunk_delay_s)
        await response.write_eof()
        self.completed.append(f"{repo}/{path}")
        return response

    async def other(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        return web.json_response({"error": f"the hub stand-in has no route for {request.path}"}, status=404)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/models/{owner}/{name}", self.repo_info)  # the default branch
        app.router.add_get("/api/models/{owner}/{name}/revision/{rev}", self.repo_info)
        app.router.add_get("/api/models/{owner}/{name}/tree/{rev}", self.tree)
        app.router.add_get("/api/models/{owner}/{name}/tree/{rev}/{path:.*}", self.tree)
        app.router.add_get("/{owner}/{name}/resolve/{rev}/{path:.+}", self.resolve)  # and HEAD
        app.router.add_route("*", "/{tail:.*}", self.other)
        return app


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class ServedHub:
    """Runs a ``HubStandIn`` on a loopback port in its own thread (so blocking test code cannot stall it)."""

    def __init__(self, hub: HubStandIn) -> None:
        self.hub = hub
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._serve, name="hf-standin", daemon=True)

    def __enter__(self) -> HubStandIn:
        port = free_port()
        self.hub.url = f"http://127.0.0.1:{port}"
        self._port = port
        self._thread.start()
        if not self._ready.wait(10) or self._runner is None:
            raise RuntimeError("the hub stand-in did not start")
        return self.hub

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._runner = web.AppRunner(self.hub.app(), access_log=None)
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self._port).start()
            self._ready.set()

        try:
            self._loop.run_until_complete(start())
        finally:
            self._ready.set()  # __enter__ checks that the runner exists
        self._loop.run_forever()

    def __exit__(self, *exc: Any) -> None:
        async def stop() -> None:
            assert self._runner is not None
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
