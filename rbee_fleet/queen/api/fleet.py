"""Fleet endpoints of the queen: heartbeats in, status out."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from rbee_fleet import __version__
from rbee_fleet.common.http import read_json
from rbee_fleet.common.validation import validate
from rbee_fleet.contracts.fleet import HeartbeatAck, HiveHeartbeat, PulseAck, WorkerHeartbeat, WorkerPulse
from rbee_fleet.queen.api.keys import QUEEN


async def worker_heartbeat(request: web.Request) -> web.Response:
    queen = request.app[QUEEN]
    queen.registry.worker_heartbeat(validate(WorkerHeartbeat, await read_json(request)))
    ack = HeartbeatAck(heartbeat_interval_s=queen.settings.config.heartbeat_interval_s,
                       pulse_interval_s=queen.settings.config.pulse_interval_s or None)
    return web.json_response(ack.model_dump())


async def worker_pulse(request: web.Request) -> web.Response:
    known = request.app[QUEEN].registry.worker_pulse(validate(WorkerPulse, await read_json(request)))
    return web.json_response(PulseAck(known=known).model_dump())


async def hive_heartbeat(request: web.Request) -> web.Response:
    queen = request.app[QUEEN]
    queen.registry.hive_heartbeat(validate(HiveHeartbeat, await read_json(request)))
    return web.json_response(HeartbeatAck(heartbeat_interval_s=queen.settings.config.heartbeat_interval_s).model_dump())


async def health(request: web.Request) -> web.Response:
    queen = request.app[QUEEN]
    ready = sum(1 for w in queen.registry.worker_views() if w.live and w.heartbeat.state.value == "ready")
    return web.json_response({"status": "ok", "version": __version__, "workers_ready": ready})


async def status(request: web.Request) -> web.Response:
    return web.json_response(request.app[QUEEN].status().model_dump(mode="json"))


async def workers(request: web.Request) -> web.Response:
    views = request.app[QUEEN].registry.worker_views()
    return web.json_response({"workers": [v.model_dump(mode="json") for v in views]})


async def hives(request: web.Request) -> web.Response:
    queen = request.app[QUEEN]
    queen.refresh_embedded()
    return web.json_response({"hives": [h.model_dump(mode="json") for h in queen.registry.hive_views()]})


async def hive_models(request: web.Request) -> web.Response:
    queen = request.app[QUEEN]
    entries = await queen.hive(request.match_info["hive"]).models()
    return web.json_response({"models": [e.model_dump(mode="json") for e in entries]})


async def forget_hive(request: web.Request) -> web.Response:
    """``DELETE /v1/hives/{hive}``: forget an uninstalled hive and its workers (cluster token only)."""
    forgotten = request.app[QUEEN].registry.forget_hive(request.match_info["hive"])
    return web.json_response({"forgotten": forgotten})


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[QUEEN].metrics.prom)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/worker-heartbeat", worker_heartbeat)
    app.router.add_post("/v1/worker-pulse", worker_pulse)
    app.router.add_post("/v1/hive-heartbeat", hive_heartbeat)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/status", status)
    app.router.add_get("/v1/workers", workers)
    app.router.add_get("/v1/hives", hives)
    app.router.add_get("/v1/hives/{hive}/models", hive_models)
    app.router.add_delete("/v1/hives/{hive}", forget_hive)
