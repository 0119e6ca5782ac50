"""The upload page."""
from __future__ import annotations

from flask import Blueprint, current_app, render_template

bp = Blueprint("site", __name__)


@bp.get("/")
def index():
    svc = current_app.extensions["imgsvc"]
    return render_template("index.html", models=[card.public() for card in svc.catalog],
                           default_model=svc.catalog.default,
                           max_upload_mb=svc.settings.max_upload_bytes // (1024 * 1024))
