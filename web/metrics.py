"""``GET /metrics``: the fleet's Prometheus series (accepted jobs are counted in web/intake.py).

Counts live in Redis (shared/stats.py), so every gunicorn process and every web replica answers the
same fleet-wide numbers: scrape one web address for the fleet, or each worker's port for its own share.
It needs ``Authorization: Bearer <METRICS_TOKEN>`` (or the ADMIN_TOKEN), checked as the admin API's
(web/tokens.py); with neither token set it is off (404).
"""
from __future__ import annotations

from flask import Blueprint, Response, current_app
from prometheus_client import CONTENT_TYPE_LATEST

from shared.errors import MetricsUnauthorized, NotFound
from shared.metrics import exposition, registry_for
from web.tokens import refuse_token_in_url, require_bearer

bp = Blueprint("metrics", __name__)


def _registry():
    """Return this app's registry, made on first use."""
    extensions = current_app.extensions
    if "imgsvc-metrics" not in extensions:
        svc = extensions["imgsvc"]
        extensions["imgsvc-metrics"] = registry_for(svc.redis, ttl_s=svc.settings.worker_ttl_s,
                                                    models=[card.name for card in svc.catalog])
    return extensions["imgsvc-metrics"]


@bp.before_request
def require_metrics_token():
    """Hide /metrics without METRICS_TOKEN and ADMIN_TOKEN; otherwise ask for one of them."""
    settings = current_app.extensions["imgsvc"].settings
    tokens = tuple(token for token in (settings.metrics_token, settings.admin_token) if token)
    if not tokens:
        raise NotFound("No such resource.")
    refuse_token_in_url()
    require_bearer(tokens, missing=MetricsUnauthorized("/metrics needs the header 'Authorization: Bearer "
                                                       "<METRICS_TOKEN>' (or the ADMIN_TOKEN)."),
                   wrong=MetricsUnauthorized("The metrics token is not valid."))


@bp.after_request
def ask_for_the_token(response):
    if response.status_code == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="imgsvc-metrics"'
    return response


@bp.get("/metrics")
def metrics():
    """Answer in the Prometheus text exposition format."""
    return Response(exposition(_registry()), mimetype=CONTENT_TYPE_LATEST)

