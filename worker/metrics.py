"""The worker's /metrics endpoint, served by the main process (no torch there) on WORKER_METRICS_PORT.

It has no token, so it listens on WORKER_METRICS_BIND: 127.0.0.1 unless told otherwise (a container
sets 0.0.0.0 for Prometheus on its private network).

It shows this Celery node's series (labelled ``worker=<node>``) from the fleet statistics in Redis,
which every pool child writes after each batch: one port per worker, whatever its pool size.
"""
from __future__ import annotations

import logging
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_http_server

from shared import redisconn
from shared.metrics import registry_for
from shared.settings import Settings

log = logging.getLogger(__name__)


def serve_metrics(settings: Settings, models, node: str) -> WSGIServer | None:
    """Serve this node's metrics in a thread; return the server, or None when off or the port is taken."""
    if not settings.worker_metrics_port:
        return None
    client = redisconn.client(settings, socket_timeout=5, socket_connect_timeout=2)
    registry = registry_for(client, ttl_s=settings.worker_ttl_s, models=models, worker=node)
    try:
        server, _ = start_http_server(settings.worker_metrics_port, addr=settings.worker_metrics_bind,
                                      registry=registry)
    except OSError as exc:  # another worker on this host holds the port: run on, without metrics
        log.warning("worker metrics not served: port %d: %s (set WORKER_METRICS_PORT per worker)",
                    settings.worker_metrics_port, exc)
        return None
    log.info("worker metrics on http://%s:%d/metrics", settings.worker_metrics_bind, settings.worker_metrics_port)
    return server


def stop_metrics(server: WSGIServer | None) -> None:
    """Stop serving metrics (in a thread: shutdown() waits for the serving loop)."""
    if server is not None:
        threading.Thread(target=server.shutdown, daemon=True).start()
        server.server_close()
