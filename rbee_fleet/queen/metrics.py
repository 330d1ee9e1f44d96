"""The queen's Prometheus metrics, in a registry of its own (one per app, so tests can run several)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from rbee_fleet.queen.registry import Registry

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


# The *_created series double every counter's output for nothing a dashboard uses.
disable_created_metrics()


class QueenMetrics:
    def __init__(self, registry: Registry) -> None:
        self.prom = CollectorRegistry()
        r = self.prom
        self.requests = Counter("rbee_requests", "OpenAI requests answered, by model, endpoint and status",
                                ["model", "endpoint", "status"], registry=r)
        self.errors = Counter("rbee_request_errors", "Requests that failed, by reason", ["model", "reason"], registry=r)
        self.in_flight = Gauge("rbee_requests_in_flight", "Requests being answered now", ["model"], registry=r)
        self.waiting = Gauge("rbee_requests_waiting", "Requests waiting for a free worker slot", registry=r)
        self.ttft = Histogram("rbee_time_to_first_token_seconds", "From request to first streamed token",
                              ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.duration = Histogram("rbee_request_duration_seconds", "From request to last byte",
                                  ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("rbee_tokens", "Tokens processed, by kind (prompt or completion)",
                              ["model", "kind"], registry=r)
        self.retries = Counter("rbee_worker_retries", "Requests moved to another worker before their first byte",
                               ["model"], registry=r)
        self.routing = Counter("rbee_routing_decisions", "How requests were placed: prefix_hit (the worker holding "
                               "their prompt's longest prefix), load_guard (that worker was too busy), least_busy",
                               ["model", "reason"], registry=r)
        self.prefix_hits = Counter("rbee_prefix_hits", "Requests sent to a worker holding a prefix of their prompt",
                                   ["model"], registry=r)
        self.tokens_reused = Counter("rbee_prompt_tokens_reused", "Prompt tokens workers took from their KV cache",
                                     ["model"], registry=r)
        self.model_loads = Counter("rbee_model_loads", "On-demand loads, by result (loaded, failed)",
                                   ["model", "result"], registry=r)
        self.model_unloads = Counter("rbee_model_unloads", "On-demand workers unloaded, by reason (idle, evicted)",
                                     ["model", "reason"], registry=r)
        r.register(_WorkerCollector(registry))

    def count_usage(self, model: str, usage: dict[str, Any] | None) -> None:
        if not usage:
            return
        self.tokens.labels(model, "prompt").inc(usage.get("prompt_tokens", 0))
        self.tokens.labels(model, "completion").inc(usage.get("completion_tokens", 0))
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        if isinstance(cached, int) and cached > 0:
            self.tokens_reused.labels(model).inc(cached)

    def count_decision(self, model: str, reason: str) -> None:
        self.routing.labels(model, reason).inc()
        if reason == "prefix_hit":
            self.prefix_hits.labels(model).inc()


class _WorkerCollector(Collector):
    """Worker figures read from the registry at scrape time."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[GaugeMetricFamily]:
        states = GaugeMetricFamily("rbee_workers", "Workers known to the queen, by model and state", labels=["model", "state"])
        tps = GaugeMetricFamily("rbee_worker_tokens_per_second", "Recent tokens/s reported by each worker", labels=["worker", "model"])
        counts: dict[tuple[str, str], int] = {}
        for view in self._registry.worker_views():
            hb = view.heartbeat
            state = hb.state.value if view.live else "lost"
            counts[(hb.model, state)] = counts.get((hb.model, state), 0) + 1
            tps.add_metric([hb.worker_id, hb.model], hb.tokens_per_second)
        for (model, state), n in sorted(counts.items()):
            states.add_metric([model, state], n)
        yield states
        yield tps
