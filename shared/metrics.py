"""Prometheus exposition of the fleet's Redis-held series (see shared/stats.py) for web and workers.

A collector reads Redis at scrape time, so every gunicorn process and every worker host answers
from the same numbers; ``worker`` narrows the view to one Celery node's series.
"""
from __future__ import annotations

import logging

import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from shared import fleet, stats

log = logging.getLogger(__name__)

WEB_COUNTERS = {
    "imgsvc_jobs_submitted": "Jobs accepted by the web tier (cache hits included).",
    "imgsvc_cache_hits": "Jobs answered from the result cache.",
    "imgsvc_cache_misses": "Jobs that needed a computation (new or attached to one in flight).",
}
WORKER_COUNTERS = {
    "imgsvc_jobs_completed": "Computations finished by workers (one per image, model and options).",
    "imgsvc_jobs_failed": "Computations that ended failed.",
    "imgsvc_jobs_deadline_exceeded": "Jobs failed deadline_exceeded when a worker claimed their computation "
                                     "(not started by their deadline_s; never computed).",
    "imgsvc_computations_skipped": "Computations a worker skipped at claim, no job waiting for them any more "
                                   "(all canceled or past their deadline): no forward pass.",
}
HISTOGRAM_HELP = {
    "imgsvc_inference_seconds": "Forward pass (and GradCAM) time per image.",
    "imgsvc_end_to_end_seconds": "Enqueue to result written, per computation.",
    "imgsvc_batch_size": "Images per forward pass.",
}
WORKER_LABELS = ("model", "device", "worker")
TOP_SHARES = 10  # senders exported by name; the rest are summed as share="other" (bounded cardinality)


class FleetCollector:
    """Yield the fleet's counters, histograms and live gauges from Redis on each scrape."""

    def __init__(self, client: redis.Redis, *, ttl_s: int, models, worker: str | None = None):
        self.client, self.ttl_s, self.models, self.worker = client, ttl_s, list(models), worker

    def _mine(self, labels: dict) -> bool:
        return self.worker is None or labels.get("worker") == self.worker

    def collect(self):
        yield from self._counters()
        yield from self._histograms()
        children = [c for c in fleet.live_children(self.client, self.ttl_s)
                    if self.worker is None or c.get("node") == self.worker]
        yield from self._children(children)
        if self.worker is None:
            yield from self._queues(children)

    def _counters(self):
        helps = dict(WORKER_COUNTERS) if self.worker else {**WEB_COUNTERS, **WORKER_COUNTERS}
        names = {name: list(WORKER_LABELS) if name in WORKER_COUNTERS else ["model"] for name in helps}
        families = {name: CounterMetricFamily(name, text, labels=names[name]) for name, text in helps.items()}
        for name, labels, value in stats.read_counters(self.client):
            if name in families and self._mine(labels):
                families[name].add_metric([str(labels.get(key, "")) for key in names[name]], value)
        return list(families.values())

    def _histograms(self):
        families = {name: HistogramMetricFamily(name, text, labels=list(WORKER_LABELS))
                    for name, text in HISTOGRAM_HELP.items()}
        for (name, _), series in sorted(stats.read_histograms(self.client).items()):
            labels = series["labels"]
            if not self._mine(labels):
                continue
            bounds = [str(b) for b in stats.HISTOGRAMS[name]] + ["+Inf"]
            cumulative, running = [], 0
            for bound, count in zip(bounds, series["buckets"]):
                running += count
                cumulative.append((bound, running))
            families[name].add_metric([str(labels.get(k, "")) for k in WORKER_LABELS], cumulative,
                                      series["sum"])
        return list(families.values())

    def _children(self, children: list[dict]):
        pools = GaugeMetricFamily("imgsvc_worker_children", "Live pool children per Celery node.",
                                  labels=["worker"])
        used = GaugeMetricFamily("imgsvc_gpu_memory_used_bytes", "GPU memory in use on a child's device.",
                                 labels=["worker", "device", "pid"])
        total = GaugeMetricFamily("imgsvc_gpu_memory_total_bytes", "GPU memory of a child's device.",
                                  labels=["worker", "device", "pid"])
        per_node: dict[str, int] = {}
        for child in children:
            node = child.get("node", "?")
            per_node[node] = per_node.get(node, 0) + 1
            memory = child.get("gpu_memory") or {}
            if memory:
                labels = [node, child.get("device", "?"), str(child.get("pid", ""))]
                used.add_metric(labels, memory["used"])
                total.add_metric(labels, memory["total"])
        for node, count in sorted(per_node.items()):
            pools.add_metric([node], count)
        return [pools, used, total]

    def _queues(self, children: list[dict]):
        names = fleet.known_queues(set(self.models) | {m for c in children for m in c.get("models", {})})
        depth = GaugeMetricFamily("imgsvc_queue_depth", "Messages waiting in a queue.", labels=["queue"])
        age = GaugeMetricFamily("imgsvc_queue_oldest_age_seconds",
                                "Age of the oldest waiting message (0 when empty or unknown).",
                                labels=["queue"])
        workers = GaugeMetricFamily("imgsvc_queue_workers",
                                    "Live workers consuming a queue (pool children of nodes not draining; "
                                    "webhook worker nodes for the webhooks queue).", labels=["queue"])
        backlog = GaugeMetricFamily("imgsvc_queue_backlog_per_worker",
                                    "Waiting messages per live worker consuming the queue (the whole depth "
                                    "when none does): the signal to scale on.", labels=["queue"])
        lanes = GaugeMetricFamily("imgsvc_queue_lane_depth", "Messages waiting in an inference queue, by lane "
                                  "(interactive, bulk).", labels=["queue", "lane"])
        for queue in fleet.queues(self.client, names, ttl_s=self.ttl_s):
            depth.add_metric([queue["name"]], queue["depth"])
            age.add_metric([queue["name"]], queue["oldest_age_s"] or 0.0)
            workers.add_metric([queue["name"]], queue["workers"])
            backlog.add_metric([queue["name"]], queue["backlog_per_worker"])
            for lane, waiting in queue.get("lanes", {}).items():
                lanes.add_metric([queue["name"], lane], waiting)
        shares = GaugeMetricFamily("imgsvc_share_in_flight", f"Computations in flight (waiting or running) per "
                                   f"sender: the {TOP_SHARES} largest by API key (key:<id>) or anonymous address "
                                   "(addr:<address>), the rest summed as other.", labels=["share"])
        for entry in fleet.shares(self.client, top=TOP_SHARES):
            shares.add_metric([entry["share"]], entry["in_flight"])
        return [depth, age, workers, backlog, lanes, shares]


def registry_for(client: redis.Redis, *, ttl_s: int, models, worker: str | None = None) -> CollectorRegistry:
    """Return a registry holding only the fleet collector (no per-process defaults)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(client, ttl_s=ttl_s, models=models, worker=worker))
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """Render the registry in the Prometheus text format."""
    return generate_latest(registry)
