"""llm-worker-rbee: load one model and serve it (usually started by a hive, usable on its own)."""

from __future__ import annotations

import argparse
import socket
import sys

from rbee_fleet import __version__
from rbee_fleet.common.http import EXIT_PORT_IN_USE, run_daemon, serve
from rbee_fleet.common.logs import set_process_title, setup_logging
from rbee_fleet.common.net import port_free, refuse_open_bind
from rbee_fleet.common.options import parse_key_values
from rbee_fleet.common.secrets import read_secret
from rbee_fleet.contracts.vocabulary import BACKEND_NAMES
from rbee_fleet.worker.backends.base import BackendError, WorkerSpec
from rbee_fleet.worker.runtime import WorkerSettings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="llm-worker-rbee", description=__doc__)
    p.add_argument("--model-path", required=True, help="model file (GGUF) or directory (EXL2)")
    p.add_argument("--model-id", required=True, help="the name clients use in 'model'")
    p.add_argument("--backend", choices=BACKEND_NAMES, default="llamacpp")
    p.add_argument("--device", default="cpu",
                   help="cpu, or a GPU: cuda:N[,M], vulkan:N, rocm:N, metal (llamacpp), cuda:N[,M] (exllamav2)")
    p.add_argument("--gpu-layers", type=int, default=None,
                   help="llamacpp on a GPU: layers to offload (default: every layer that fits its free memory)")
    p.add_argument("--ctx-size", type=int, default=2048, help="context length in tokens")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all usable cores)")
    p.add_argument("--max-queue", type=int, default=8, help="requests that may wait for a slot (exllamav2)")
    p.add_argument("--slots", type=int, default=None,
                   help="parallel sequences (llamacpp; default 4, fewer when ctx-size is over 4096)")
    p.add_argument("--embeddings", action="store_true", help="serve /v1/embeddings (llamacpp)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="backend option (JSON value); for llamacpp, a llama-server flag: cache_type_k=q8_0")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=9300)
    p.add_argument("--advertise-url", help="URL the queen uses to reach this worker (default: from host and port)")
    p.add_argument("--queen-url", help="queen to send heartbeats to (none: standalone)")
    p.add_argument("--worker-id", help="default: HOSTNAME-MODEL-PORT")
    p.add_argument("--hive-id", default="standalone")
    p.add_argument("--token-file", help="cluster token (mode 0600): required from callers, sent to the queen")
    p.add_argument("--heartbeat-interval", type=float, default=5.0)
    p.add_argument("--drain-timeout", type=float, default=10.0,
                   help="on SIGTERM, how long answers in flight may run on before the worker exits (seconds)")
    p.add_argument("--exit-with-parent", action="store_true", help="stop when the parent process exits")
    p.add_argument("--log-level", default=None)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p.parse_args(argv)


def _parse_options(pairs: list[str]) -> dict[str, object]:
    try:
        return parse_key_values(pairs)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


def settings_from(args: argparse.Namespace) -> WorkerSettings:
    spec = WorkerSpec(
        model_id=args.model_id,
        model_path=args.model_path,
        backend=args.backend,
        device=args.device,
        ctx_size=args.ctx_size,
        threads=args.threads,
        max_queue=args.max_queue,
        options=_parse_options(args.option),
        slots=args.slots,
        embeddings=args.embeddings,
        gpu_layers=args.gpu_layers,
    )
    host_for_url = socket.gethostname() if args.host in ("0.0.0.0", "::") else args.host
    advertise = args.advertise_url or f"http://{host_for_url}:{args.port}"
    token = read_secret(args.token_file) if args.token_file else None
    return WorkerSettings(
        spec=spec,
        worker_id=args.worker_id or f"{socket.gethostname()}-{args.model_id}-{args.port}",
        hive_id=args.hive_id,
        host=args.host,
        port=args.port,
        advertise_url=advertise,
        queen_url=args.queen_url,
        token=token,
        heartbeat_interval_s=args.heartbeat_interval,
        drain_timeout_s=args.drain_timeout,
        exit_with_parent=args.exit_with_parent,
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging("worker", args.log_level)
    # ps and pkill see "llm-worker-rbee MODEL ..." (the arguments stay: --worker-id names the process).
    set_process_title(" ".join(["llm-worker-rbee", args.model_id, *sys.argv[1:]]))
    try:
        settings = settings_from(args)
    except (OSError, ValueError) as exc:
        sys.exit(f"llm-worker-rbee: {exc}")
    refuse_open_bind("llm-worker-rbee", settings.host, settings.token)
    if settings.spec.backend == "llamacpp":
        sys.exit(_run_engine(settings, args.token_file))
    from rbee_fleet.worker.app import create_app, drain

    app = create_app(settings)
    run_daemon(serve(app, settings.host, settings.port, before_shutdown=drain))


def _run_engine(settings: WorkerSettings, token_file: str | None) -> int:
    """A CPU worker: llama-server on this worker's port, supervised by this process."""
    import asyncio

    from rbee_fleet.common.gguf_fit import default_slots
    from rbee_fleet.worker import engine_worker

    if not port_free(settings.host, settings.port):
        print(f"llm-worker-rbee: port {settings.port} on {settings.host} is in use", file=sys.stderr)
        return EXIT_PORT_IN_USE
    spec = settings.spec
    config = engine_worker.engine_config(settings, spec.slots or default_slots(spec.ctx_size), spec.embeddings,
                                         token_file)
    try:
        return asyncio.run(engine_worker.run(settings, config))
    except BackendError as exc:
        print(f"llm-worker-rbee: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    main()
