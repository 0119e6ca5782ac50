"""Batches: several images in one request, one ``batch.completed`` event when all are finished."""
from __future__ import annotations

import json
import logging

import redis
from flask import Blueprint, g, request

from shared.batches import new_batch_id
from shared.errors import AlreadySettled, BadRequest, NotFound, ServiceError
from shared.jobs import JobContext, new_job_id
from shared.keys import image_digest
from web import auth
from web.api import json_response
from web.idempotency import Created
from web.intake import accept, check_size, ensure_capacity, idempotent, parse_order, read_images, services
from web.upload import inspect_image

bp = Blueprint("batches", __name__)
log = logging.getLogger(__name__)
bp.before_request(auth.require_caller)
BATCH_BODY_IMAGES = 5  # a batch request may carry this many MAX_UPLOAD_MB of images in all


@bp.before_request
def allow_a_bigger_body():
    settings = services().settings
    request.max_content_length = settings.max_upload_bytes * BATCH_BODY_IMAGES + 64 * 1024


@bp.post("/api/v1/batches")
def create_batch():
    """Accept every ``image`` field as one job of a new batch; refuse the batch if any image is bad."""
    svc = services()
    images, fields = read_images()
    if len(images) > svc.settings.max_batch_images:
        raise BadRequest(f"A batch holds at most {svc.settings.max_batch_images} images; got {len(images)}.")
    order = parse_order(fields)
    for number, data in enumerate(images, 1):
        check_size(data, f"Image {number}")
    digests = [image_digest(data) for data in images]

    def create() -> Created:
        infos = [_inspect(number, data) for number, data in enumerate(images, 1)]
        # once for the batch: it is accepted whole or refused whole
        ensure_capacity(order.card.name, sum(len(data) for data in images), len(images))
        batch_id, job_ids = new_batch_id(), [new_job_id() for _ in images]
        svc.batches.create(batch_id, job_ids, auth.owner(), order.callback_url)
        # the batch, not each job, calls back; each job has the batch's deadline
        context = JobContext(auth.owner(), None, batch_id, deadline_at=order.deadline_at())
        try:
            for data, sha, info, job_id in zip(images, digests, infos, job_ids):
                accept(data, order, context, sha=sha, info=info, job_id=job_id, check_capacity=False)
            in_use = g.get("idempotent_request")  # the batch and its key's answer appear in one step
            key = svc.idempotency.record_for_batch(in_use.lease, in_use.fingerprint, batch_id) if in_use else None
            if svc.batches.open(batch_id, job_ids, key):
                svc.announcer.jobs_settled(job_ids[:1])  # every job was a cache hit: the batch is done
            if in_use:
                in_use.stored = True
        except BaseException:
            _discard(batch_id, job_ids)
            raise
        return Created("batch", batch_id, 202)

    created, replayed = idempotent("batch", order.fingerprint(*digests, default_lane="bulk"), create)
    return json_response(batch_or_404(created.id), created.status, f"/api/v1/batches/{created.id}", replayed)


def _discard(batch_id: str, job_ids: list[str]) -> None:
    """Undo a batch that failed half-way; where Redis fails too, it stays invisible and expires."""
    try:
        services().batches.discard(batch_id, job_ids)
    except redis.RedisError as exc:
        log.warning("could not discard the half-made batch %s (it stays invisible): %s", batch_id, exc)


def _inspect(number: int, data: bytes):
    try:
        return inspect_image(data, services().settings.max_image_pixels)
    except ServiceError as exc:  # name the image that spoiled the batch, keep the error's code and status
        exc.message = f"Image {number}: {exc.message}"
        exc.args = (exc.message,)
        raise


def batch_or_404(batch_id: str) -> str:
    batch = services().batches.get_json(batch_id, owner=auth.owner()) if _valid(batch_id) else None
    if batch is None:
        raise NotFound(f"No batch with id {batch_id!r} (it may have expired).")
    return batch


def _valid(batch_id: str) -> bool:
    return len(batch_id) == 31 and batch_id.startswith("b") and all(c in "0123456789abcdef" for c in batch_id[1:])


@bp.post("/api/v1/batches/<batch_id>/cancel")
def cancel_batch(batch_id: str):
    """Cancel every job of the batch still queued or running (one round trip); answer the batch. A
    batch whose jobs had all settled with none canceled is 409 ``already_settled``."""
    svc = services()
    fields = svc.batches.fields(batch_id, owner=auth.owner()) if _valid(batch_id) else None
    if fields is None:
        raise NotFound(f"No batch with id {batch_id!r} (it may have expired).")
    svc.store.cancel(json.loads(fields["job_ids"]))
    batch = batch_or_404(batch_id)
    if json.loads(batch)["counts"]["canceled"] == 0:
        raise AlreadySettled(f"Every job of batch {batch_id} had already settled; none was canceled.")
    return json_response(batch)


@bp.get("/api/v1/batches/<batch_id>")
def get_batch(batch_id: str):
    return json_response(batch_or_404(batch_id))
