"""``GET /metrics``: the fleet's Prometheus series (accepted jobs are counted in web/intake.py).

Counts live in Redis (shared/stats.py), so every gunicorn process and every web replica answers the
same fleet-wide numbers: scrape one web address for the fleet, or each worker's port for its own share.
"""
from __future__ import annotations

from flask import Blueprint, Response, current_app
from prometheus_client import CONTENT_TYPE_LATEST

from shared.metrics import exposition, registry_for

bp = Blueprint("metrics", __name__)


def _registry():
    """Return this app's registry, made on first use."""
    extensions = current_app.extensions
    if "imgsvc-metrics" not in extensions:
        svc = extensions["imgsvc"]
        extensions["imgsvc-metrics"] = registry_for(svc.redis, ttl_s=svc.settings.worker_ttl_s,
                                                    models=[card.name for card in svc.catalog])
    return extensions["imgsvc-metrics"]


@bp.get("/metrics")
def metrics():
    """Answer in the Prometheus text exposition format."""
    return Response(exposition(_registry()), mimetype=CONTENT_TYPE_LATEST)

