"""The JSON API (v1): submit jobs, read them, fetch heatmaps, list models, health."""
from __future__ import annotations

import json
import re
import time
from typing import Callable

import redis
from flask import Blueprint, current_app, jsonify, request

from shared.errors import AlreadySettled, BadRequest, Expired, NotFound
from shared.keys import WORKERS_KEY, image_digest
from shared.retention import issued_at
from web import auth, byurl, heatmaps
from web.idempotency import Created
from web.intake import accept, check_size, idempotent, number_option, parse_order, read_images, services

bp = Blueprint("api", __name__)

JOB_ID_LENGTH = 32
MAX_WAIT_S = 30
# RFC 7240: ``Prefer: wait=N`` (seconds); other preferences in the header are ignored, as the RFC allows.
_PREFER_WAIT = re.compile(r'(?:^|[,;])\s*wait\s*=\s*"?(\d{1,6}(?:\.\d{1,3})?)"?\s*(?=$|[,;])', re.IGNORECASE)
PUBLIC_ENDPOINTS = {"api.list_models", "api.healthz", "api.readyz"}


@bp.before_request
def check_caller():
    if request.endpoint not in PUBLIC_ENDPOINTS:
        auth.require_caller()


def json_response(text: str, status: int = 200, location: str | None = None, replayed: bool = False):
    response = current_app.response_class(text, status=status, mimetype="application/json")
    if location:
        response.headers["Location"] = location
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


@bp.post("/api/v1/jobs")
def submit_job():
    """Accept an image (or its URL); answer from the cache, attach to identical work in flight, or enqueue."""
    by_url = byurl.read_image_url()
    if by_url is not None and not byurl.is_data_url(by_url[0]):
        return submit_by_url(*by_url)
    images, fields = ([byurl.decode_data_url(by_url[0])], by_url[1]) if by_url else read_images()
    if len(images) != 1:
        raise BadRequest("Send one image per job; POST /api/v1/batches takes several.")
    order = parse_order(fields)
    check_size(images[0])
    sha = image_digest(images[0])
    answered = {}

    def create() -> Created:
        submission = accept(images[0], order, order.context(auth.owner()), sha=sha)
        answered["json"] = submission.json  # made only if answered: a held answer is read when it settles
        return Created("job", submission.job_id, 200 if submission.outcome == "cached" else 202)

    created, replayed = idempotent("job", order.fingerprint(sha), create)
    return submitted(created, answered.get("json"), replayed)


def submit_by_url(url: str, fields):
    """Accept an http(s) image_url: the job is queued at once, its image fetched by the webhook worker."""
    order = parse_order(fields)
    url = byurl.check_image_url(url)
    answered = {}

    def create() -> Created:
        created, answered["json"] = byurl.accept_url(url, order)
        return created

    created, replayed = idempotent("job", order.fingerprint("url:" + url), create)
    return submitted(created, answered.get("json"), replayed)


def submitted(created: Created, answer: str | Callable[[], str] | None, replayed: bool):
    """Answer a submit: the job as accepted (``answer``: its JSON text, or what makes it; None: read it
    back) or, with ``Prefer: wait=N``, once it settles or N seconds pass."""
    made: list[str] = []

    def accepted() -> str:
        if not made:
            made.append((answer() if callable(answer) else answer) or job_or_404(created.id))
        return made[0]

    location = f"/api/v1/jobs/{created.id}"
    wait_s = preferred_wait()
    if wait_s is None:
        return json_response(accepted(), created.status, location, replayed)
    # a job accepted just now as new work is queued: no need to read that back (a replay may be settled)
    settled = not (created.status == 202 and not replayed) and _settled(text := accepted())
    if not settled:
        held = hold(created.id, wait_s)
        if held is None:
            response = json_response(accepted(), created.status, location, replayed)
            response.headers.update({"Wait-Skipped": "too-many-waiters", "Retry-After": "1"})
            return response
        text, settled = held
    response = json_response(text, 200 if settled else 202, location, replayed)
    response.headers["Preference-Applied"] = f"wait={wait_s:g}"
    return response


def preferred_wait() -> float | None:
    """Return the seconds a ``Prefer: wait=N`` header asks for, held to MAX_WAIT_S; None without one
    (or with N = 0, which asks for nothing). Repeated Prefer headers reach us joined by commas."""
    match = _PREFER_WAIT.search(request.headers.get("Prefer", ""))
    if match is None or float(match.group(1)) <= 0:
        return None
    return min(float(match.group(1)), MAX_WAIT_S)


def hold(job_id: str, wait_s: float) -> tuple[str, bool] | None:
    """Block until the job settles or ``wait_s`` pass, then return it as JSON text and whether it is
    settled; None (at once) when MAX_WAITERS requests of this process already wait."""
    svc = services()
    if svc.waiters is None or not svc.waiters.acquire(blocking=False):
        return None
    try:
        job = svc.store.wait_json(svc.blocking_redis, job_id, wait_s, owner=auth.owner())
    finally:
        svc.waiters.release()
    if job is None:
        raise NotFound(f"No job with id {job_id!r} (it may have expired).")
    text, status = job
    return text, status in SETTLED


def valid_id(job_id: str) -> bool:
    return len(job_id) == JOB_ID_LENGTH and all(c in "0123456789abcdef" for c in job_id)


def job_or_404(job_id: str) -> str:
    """Return the caller's job as JSON text, or raise NotFound (also for someone else's job)."""
    job = services().store.get_json(job_id, owner=auth.owner()) if valid_id(job_id) else None
    gone = job is None and valid_id(job_id) and issued_at(job_id) is not None
    if gone and services().store.get_json(job_id) is None:  # another key's job is not_found, not expired
        hours = services().settings.job_result_ttl_s / 3600
        raise Expired(f"Job {job_id!r} is no longer kept: settled jobs are answered for {hours:g} hours "
                      "(JOB_RESULT_TTL_S), or less if the result store had to evict it. A job submitted with a "
                      "callback_url had its result delivered in its webhook.")
    if job is None:
        raise NotFound(f"No job with id {job_id!r}.")
    return job


SETTLED = ("done", "failed", "canceled")


def _settled(job_json: str) -> bool:
    return json.loads(job_json)["status"] in SETTLED


@bp.post("/api/v1/jobs/<job_id>/cancel")
def cancel_job(job_id: str):
    """End a queued or running job ``canceled`` (its webhook says ``job.canceled``); a second cancel
    answers the same; a job already done or failed is 409 ``already_settled`` and stays as it is."""
    job_or_404(job_id)
    services().store.cancel([job_id])
    job = job_or_404(job_id)
    status = json.loads(job)["status"]
    if status != "canceled":
        raise AlreadySettled(f"Job {job_id} is already {status}; only a queued or running job can be canceled.")
    return json_response(job)


@bp.get("/api/v1/jobs/<job_id>")
def get_job(job_id: str):
    """Return the job; with ``?wait=S`` (up to MAX_WAIT_S) block until it settles or S pass.

    At most MAX_WAITERS requests of this process wait at once; beyond them the job is answered at
    once, marked ``Wait-Skipped: too-many-waiters`` with ``Retry-After: 1``.
    """
    job = job_or_404(job_id)
    wait_s = number_option(request.args, "wait", "0", float, 0, MAX_WAIT_S)
    if wait_s > 0 and not _settled(job):
        held = hold(job_id, wait_s)
        if held is None:
            response = json_response(job)
            response.headers.update({"Wait-Skipped": "too-many-waiters", "Retry-After": "1"})
            return response
        job = held[0]
    return json_response(job)


def render_heatmap(model: str, result_json: bytes, picture: bytes) -> bytes | None:
    """Draw a result's GradCAM map over the picture the worker kept (first request only; then cached)."""
    svc = services()
    card = svc.catalog.cards.get(model)
    return heatmaps.render_on_picture(card.resize if card else None, json.loads(result_json), picture,
                                      svc.settings.max_image_pixels)


@bp.get("/api/v1/jobs/<job_id>/gradcam.png")
def get_gradcam(job_id: str):
    # The heatmap first: only a done job has a result key, so this is the whole hot path.
    png = services().store.overlay_png(job_id, owner=auth.owner(), render=render_heatmap) if valid_id(job_id) else None
    if png is not None:
        return png_response(png, "private, max-age=86400, immutable")
    job = json.loads(job_or_404(job_id))
    png = heatmaps.draw_without_picture(job)  # its picture has left the cache (CACHE_URL may evict)
    if png is None:
        reason = f"the job is {job['status']}" if job["status"] != "done" else "the job asked for no GradCAM"
        raise NotFound(f"No heatmap for job {job_id}: {reason}.")
    response = png_response(png, "private, no-cache")  # an upload of the image may bring its picture back
    response.headers["X-Heatmap-Base"] = "none"
    return response


def png_response(png: bytes, cache_control: str):
    response = current_app.response_class(png, mimetype="image/png")
    response.headers["Cache-Control"] = cache_control
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
    if svc.store.split:  # a cache server that is down costs recomputation, not readiness
        try:
            body["cache"] = bool(svc.store.cache.ping())
        except redis.RedisError:
            body["cache"] = False
    return jsonify(body), 200 if alive else 503
