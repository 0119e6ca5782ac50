"""Images by URL: ``image_url`` in a JSON body or a form field, instead of the image itself.

An http(s) URL is checked here (syntax, and the callbacks' SSRF rule on what its host resolves to, in
CALLBACK_RESOLVE_TIMEOUT_S) and never fetched here: the job is written ``queued`` at once and the
webhook worker downloads the image (webhooks/fetcher.py). A ``data:`` URL (up to DATA_URL_MAX_BYTES)
is decoded here and submitted as an upload.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import logging
from urllib.parse import unquote_to_bytes

from flask import request
from werkzeug.datastructures import MultiDict

from shared import tracing
from shared.errors import BadRequest, InvalidImageUrl, MissingImage, PayloadTooLarge, Unavailable
from shared.fetches import FetchStore
from shared.jobs import job_json, new_job_id
from shared.keys import job_key
from shared.netguard import RefusedUrl, about, normalise_url, resolve_within
from shared.tasks import send_fetch
from web import auth
from web.durability import remember_written
from web.idempotency import Created
from web.intake import Order, ensure_capacity, services

log = logging.getLogger(__name__)
DATA_URL_MAX_BYTES = 1024 * 1024
FORMS = ("multipart/form-data", "application/x-www-form-urlencoded")


def read_image_url() -> tuple[str, MultiDict] | None:
    """Return ``image_url`` and the option fields when the request names its image by URL, else None."""
    if request.mimetype == "application/json":
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            raise BadRequest("A JSON body must be an object such as {\"image_url\": \"https://...\"}.")
        url = body.get("image_url")
        if not isinstance(url, str) or not url.strip():
            raise MissingImage("Send the image's address as the string image_url.")
        return url.strip(), MultiDict({k: _text(v) for k, v in body.items() if k != "image_url" and v is not None})
    if request.mimetype in FORMS and request.form.get("image_url", "").strip():
        if request.files.getlist("image"):
            raise BadRequest("Send either the image or its image_url, not both.")
        return request.form["image_url"].strip(), request.form
    return None


def _text(value) -> str:
    """A JSON option as the text a form field would carry (true, 3, started,completed)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(str(item) for item in value)
    return str(value)


def is_data_url(url: str) -> bool:
    return url[:5].lower() == "data:"


def decode_data_url(url: str) -> bytes:
    """Return the bytes of a ``data:`` URL of at most DATA_URL_MAX_BYTES, or raise why not."""
    head, comma, payload = url[5:].partition(",")
    if not comma:
        raise InvalidImageUrl("A data: URL needs a comma before its data (data:image/png;base64,...).")
    if len(payload) > DATA_URL_MAX_BYTES * 4 // 3 + 4:
        raise PayloadTooLarge(f"A data: URL may carry at most {DATA_URL_MAX_BYTES} bytes.")
    try:
        if head.lower().endswith(";base64"):
            data = base64.b64decode(unquote_to_bytes(payload), validate=True)
        else:
            data = unquote_to_bytes(payload)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImageUrl(f"The data: URL's base64 is not valid: {exc}.") from None
    if len(data) > DATA_URL_MAX_BYTES:
        raise PayloadTooLarge(f"The data: URL carries {len(data)} bytes; it may carry at most {DATA_URL_MAX_BYTES}.")
    return data


def check_image_url(url: str) -> str:
    """Refuse (422) an image_url we would not fetch; return it as it will be fetched."""
    svc = services()
    try:
        url = normalise_url(url)
        resolve_within(svc.lookups, url, svc.settings.callback_resolve_timeout_s, svc.settings.fetch_allow_private)
    except RefusedUrl as exc:
        raise InvalidImageUrl(about(exc, "image_url")) from None
    return url


def accept_url(url: str, order: Order) -> tuple[Created, str]:
    """Write the job ``queued`` and send its download to the fetches queue; return it and its JSON."""
    svc = services()
    ensure_capacity(order.card.name)
    job_id = new_job_id()
    fetches = FetchStore(svc.store)
    context = dataclasses.replace(order.context(auth.owner()), traceparent=tracing.current_traceparent() or "")
    fields = fetches.create(job_id, url, {"name": order.card.name, "version": order.card.version},
                            order.options.to_dict(), context)
    remember_written(job_key(job_id))
    try:
        send_fetch(svc.celery, job_id)
    except Exception as exc:  # the broker refused: the job must not wait for a download never sent
        log.error("could not send the download of job %s: %s", job_id, exc)
        fetches.fail(job_id, Unavailable("The job could not be queued.").to_dict())
        raise Unavailable("The job queue is unavailable; retry shortly.") from exc
    return Created("job", job_id, 202), job_json(fields, None)
