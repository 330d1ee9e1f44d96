"""A bare aiohttp relay: the floor of any Python HTTP hop, measured beside the queen in the same run.

It forwards one POST to a fixed worker and streams the bytes back, with none of the queen's work
(no validation, scheduling, metrics, auth or failure handling). Run as its own process, on uvloop,
like the queen: `python -m tests.bench.bare_relay PORT WORKER_URL TOKEN`.
"""

from __future__ import annotations

import sys

import aiohttp
import uvloop
from aiohttp import web


def make_app(worker_url: str, token: str) -> web.Application:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    app = web.Application()

    async def start_session(app: web.Application) -> None:
        app["session"] = aiohttp.ClientSession()

    async def close_session(app: web.Application) -> None:
        await app["session"].close()

    async def relay(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        async with app["session"].post(f"{worker_url}{request.path}", data=body, headers=headers) as upstream:
            first = await upstream.content.readany()
            out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await out.prepare(request)
            await out.write(first)
            while chunk := await upstream.content.readany():
                await out.write(chunk)
            await out.write_eof()
            return out

    app.on_startup.append(start_session)
    app.on_cleanup.append(close_session)
    app.router.add_post("/v1/completions", relay)
    return app


def main() -> None:
    port, worker_url, token = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    web.run_app(make_app(worker_url, token), host="127.0.0.1", port=port, print=None, loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main()
