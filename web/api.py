"""The JSON API (v1): submit jobs, read them, fetch heatmaps, list models, health."""
from __future__ import annotations

import json
import logging
import re
import time

from flask import Blueprint, current_app, jsonify, request
from kombu.exceptions import OperationalError

from shared.errors import InvalidOption, MissingImage, NotFound, Overloaded, PayloadTooLarge, Unavailable
from shared.keys import WORKERS_KEY, Computation, OutputOptions, image_digest
from shared.tasks import inference_queue, send_inference
from web.upload import inspect_image

log = logging.getLogger(__name__)
bp = Blueprint("api", __name__)

_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}
MAX_TOP_K = 20
MAX_WAIT_S = 30


def services():
    return current_app.extensions["imgsvc"]


def number_option(values, name: str, default: str, kind: type, low: float, high: float):
    """Read a numeric option and check its range, or raise InvalidOption naming it."""
    raw = values.get(name, default).strip()
    try:
        value = kind(raw)
    except ValueError:
        raise InvalidOption(f"{name} must be a number from {low} to {high}, got {raw!r}.") from None
    if not low <= value <= high:
        raise InvalidOption(f"{name} must be from {low} to {high}, got {raw}.")
    return value


def parse_options(values) -> OutputOptions:
    """Read ``top_k`` and ``gradcam`` from form fields or query arguments."""
    top_k = number_option(values, "top_k", "5", int, 1, MAX_TOP_K)
    raw_cam = values.get("gradcam", "true").strip().lower()
    if raw_cam not in _TRUE | _FALSE:
        raise InvalidOption(f"gradcam must be true or false, got {raw_cam!r}.")
    if values.get("callback_url"):
        raise InvalidOption("callback_url is not supported by this version of the service.")
    return OutputOptions(top_k=top_k, gradcam=raw_cam in _TRUE)


def read_upload() -> tuple[bytes, dict]:
    """Return the image bytes and the option fields, from multipart or a raw image body."""
    if request.mimetype == "multipart/form-data":
        upload = request.files.get("image")
        if upload is None:
            raise MissingImage("Send the image in the multipart field 'image'.")
        try:
            return upload.read(), request.form
        finally:
            upload.close()  # big parts are spooled to a temporary file: release it now
    if request.mimetype.startswith("image/") or request.mimetype == "application/octet-stream":
        return request.get_data(cache=False), request.args
    raise MissingImage("Send the image as multipart field 'image' or as a raw body "
                       "with an image/* Content-Type.")


@bp.post("/api/v1/jobs")
def submit_job():
    """Accept an image; answer from the cache, attach to identical work in flight, or enqueue."""
    svc = services()
    data, fields = read_upload()
    card = svc.catalog.get(fields.get("model") or None)
    options = parse_options(fields)
    if len(data) > svc.settings.max_upload_bytes:
        raise PayloadTooLarge(f"The image is {len(data)} bytes; the limit is "
                              f"{svc.settings.max_upload_bytes} bytes.")
    sha = image_digest(data)
    comp = Computation(card.name, card.version, sha, options)
    model_info = {"name": card.name, "version": card.version}
    submission = svc.store.submit(comp, model_info)  # a cache hit or attach needs no header check
    if submission.outcome == "miss":
        ensure_capacity(svc, card.name)
        info = inspect_image(data, svc.settings.max_image_pixels)
        submission = svc.store.submit(comp, model_info, data, info.to_dict(sha))
    if submission.outcome == "new":
        enqueue_inference(svc, comp)
    response = json_response(submission.json(), 200 if submission.outcome == "cached" else 202)
    response.headers["Location"] = f"/api/v1/jobs/{submission.job_id}"
    return response


def json_response(text: str, status: int = 200):
    return current_app.response_class(text, status=status, mimetype="application/json")


def ensure_capacity(svc, model: str) -> None:
    """Refuse new work (503) while the model's queue is past MAX_QUEUE_DEPTH; hits still pass."""
    limit = svc.settings.max_queue_depth
    if limit and svc.redis.llen(inference_queue(model)) >= limit:
        raise Overloaded(f"The {model} queue holds {limit} or more waiting jobs; retry shortly.")


def enqueue_inference(svc, comp: Computation) -> None:
    """Send the inference task by name to the model's queue; undo the job if that fails."""
    try:
        send_inference(svc.celery, comp)
    except OperationalError as exc:
        log.error("could not enqueue %s: %s", comp.suffix, exc)
        svc.store.fail(comp, Unavailable("The job could not be queued.").to_dict())
        raise Unavailable("The job queue is unavailable; retry shortly.") from exc


def _job_or_404(job_id: str) -> str:
    job = services().store.get_json(job_id) if _JOB_ID.match(job_id) else None
    if job is None:
        raise NotFound(f"No job with id {job_id!r} (it may have expired).")
    return job


def _settled(job_json: str) -> bool:
    return json.loads(job_json)["status"] in ("done", "failed")


@bp.get("/api/v1/jobs/<job_id>")
def get_job(job_id: str):
    """Return the job; with ``?wait=S`` (up to MAX_WAIT_S) block until it settles or S pass."""
    job = _job_or_404(job_id)
    wait_s = number_option(request.args, "wait", "0", float, 0, MAX_WAIT_S)
    if wait_s > 0 and not _settled(job):
        svc = services()
        svc.store.wait(svc.blocking_redis, job_id, wait_s)
        job = _job_or_404(job_id)
    return json_response(job)


@bp.get("/api/v1/jobs/<job_id>/gradcam.png")
def get_gradcam(job_id: str):
    # The heatmap first: only a done job has a result key, so this is the whole hot path.
    png = services().store.overlay_png(job_id) if _JOB_ID.match(job_id) else None
    if png is None:
        job = json.loads(_job_or_404(job_id))
        reason = ("the job asked for no GradCAM" if job["status"] == "done"
                  else f"the job is {job['status']}")
        raise NotFound(f"No heatmap for job {job_id}: {reason}.")
    response = current_app.response_class(png, mimetype="image/png")
    response.headers["Cache-Control"] = "private, max-age=86400, immutable"
    return response


@bp.get("/api/v1/models")
def list_models():
    catalog = services().catalog
    return jsonify({"default": catalog.default, "models": [card.public() for card in catalog]})


@bp.get("/healthz")
def healthz():
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz():
    """Ready when Redis answers and at least one worker child has beaten recently."""
    svc = services()
    alive = svc.redis.zcount(WORKERS_KEY, time.time() - svc.settings.worker_ttl_s, "+inf")
    body = {"redis": True, "workers": alive, "status": "ok" if alive else "no_workers"}
    return jsonify(body), 200 if alive else 503
