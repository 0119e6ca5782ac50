"""``GET /metrics``: the fleet's Prometheus series, and the web tier's own counts of accepted jobs.

Counts live in Redis (shared/stats.py), so every gunicorn process and every web replica answers the
same fleet-wide numbers: scrape one web address for the fleet, or each worker's port for its own share.
"""
from __future__ import annotations

import logging

import redis
from flask import Blueprint, Response, current_app, request
from prometheus_client import CONTENT_TYPE_LATEST

from shared import stats
from shared.metrics import exposition, registry_for

log = logging.getLogger(__name__)
bp = Blueprint("metrics", __name__)
SUBMIT_PATH = "/api/v1/jobs"


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


@bp.after_app_request
def count_submission(response):
    """Count each accepted job: 200 with ``cached: true`` is a cache hit, 202 a miss (new or attached)."""
    if request.method != "POST" or request.path != SUBMIT_PATH or response.status_code not in (200, 202):
        return response
    job = response.get_json(silent=True) or {}
    model = (job.get("model") or {}).get("name") or "unknown"
    try:
        stats.record_submission(current_app.extensions["imgsvc"].redis, model, bool(job.get("cached")))
    except redis.RedisError:
        log.warning("could not count a submission for %s", model, exc_info=True)
    return response
