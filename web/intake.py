"""Accepting work: read uploads and options, check callbacks, and submit a job (jobs and batches alike)."""
from __future__ import annotations

import dataclasses
import logging
import re
import time

import redis
from flask import current_app, g, request
from kombu.exceptions import OperationalError
from werkzeug.datastructures import MultiDict

from shared import stats, tracing
from shared.cards import ModelCard
from shared.errors import (IdempotencyInProgress, InvalidCallbackUrl, InvalidOption, MissingImage, Overloaded,
                           PayloadTooLarge, ShareFull, Unavailable)
from shared.jobs import JobContext, Submission, new_job_id
from shared.jobscripts import WAITING_COMPUTATION_BYTES, WAITING_JOB_BYTES
from shared.jobtypes import WEBHOOK_EVENTS
from shared.keys import QUEUED_BYTES_KEY, QUEUED_SHARES_KEY, Computation, OutputOptions, batch_key, image_digest, job_key
from shared.netguard import RefusedUrl, normalise_url, resolve_within
from shared.tasks import (LANES, StepMessage, inference_message, inference_queue, priority_lists, send_inference,
                          step_for)
from web import auth
from web.durability import remember_written
from web.idempotency import Created, Lease, check_key, fingerprint
from web.upload import ImageInfo, inspect_image

log = logging.getLogger(__name__)
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}
MAX_TOP_K = 20
# An upload up to this size is header-checked and submitted with its bytes in one round trip, hit
# or not; a bigger one is looked up first without them (a hit then costs neither the bytes' trip to
# Redis nor their header check, and a miss a second round trip).
LOOKUP_FIRST_BYTES = 256 * 1024
MAX_DEADLINE_S = 7 * 24 * 3600  # as long as a job in flight is kept (JOB_TTL_S's default)
# Replicate's Cancel-After: a duration such as 30s, 5m, 1h30m (or plain seconds)
_DURATION = re.compile(r"(?:(\d{1,6})h)?(?:(\d{1,6})m)?(?:(\d{1,9}(?:\.\d{1,3})?)s)?")


def services():
    return current_app.extensions["imgsvc"]


@dataclasses.dataclass
class KeyInUse:
    """A job request's Idempotency-Key claim while the job is accepted (kept in ``flask.g``), and
    whether the job's answer has been stored over it, in the step that wrote the job."""

    lease: Lease
    fingerprint: str
    stored: bool = False


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


@dataclasses.dataclass(frozen=True)
class Order:
    """What a request asks for, checked: the model, the output options and whom to call back."""

    card: ModelCard
    options: OutputOptions
    callback_url: str | None
    webhook_events: tuple[str, ...] = ("completed",)
    deadline_s: float = 0.0  # seconds from acceptance to start it by; 0: none
    priority: str | None = None  # the lane asked for; None: interactive for a job, bulk for a batch's

    def lane(self, context: JobContext) -> str:
        """The lane of a job: the one asked for, else bulk for a batch's jobs and interactive for others."""
        return self.priority or ("bulk" if context.batch_id else "interactive")

    def fingerprint(self, *image_digests: str, default_lane: str = "interactive") -> str:
        """What a replay under the same Idempotency-Key must repeat; ``default_lane``: the endpoint's
        lane when none is asked for (asking for it is the same request)."""
        events = () if self.webhook_events == ("completed",) else self.webhook_events  # as before the option
        deadline = (f"deadline={self.deadline_s:g}",) if self.deadline_s else ()  # as before the option
        lane = (f"priority={self.priority}",) if self.priority not in (None, default_lane) else ()  # likewise
        return fingerprint(self.card.name, self.card.version, self.options.to_dict(), self.callback_url,
                           image_digests, *events, *deadline, *lane)

    def deadline_at(self) -> float:
        """When a job accepted now must have started (unix seconds); 0: no deadline."""
        return time.time() + self.deadline_s if self.deadline_s else 0.0

    def context(self, owner: str) -> JobContext:
        """Who submits the job, whom it calls back for which events, and by when it must start."""
        return JobContext(owner, self.callback_url, webhook_events=self.webhook_events,
                          deadline_at=self.deadline_at())


def parse_order(values) -> Order:
    """Read ``model``, ``top_k``, ``gradcam`` and ``callback_url`` from form fields or query arguments."""
    svc = services()
    card = svc.catalog.get(values.get("model") or None)
    top_k = number_option(values, "top_k", "5", int, 1, MAX_TOP_K)
    raw_cam = values.get("gradcam", "true").strip().lower()
    if raw_cam not in _TRUE | _FALSE:
        raise InvalidOption(f"gradcam must be true or false, got {raw_cam!r}.")
    key = auth.current_key()
    callback_url = values.get("callback_url", "").strip() or (key.webhook_url if key else None)
    if callback_url:
        callback_url = check_callback(callback_url)
    events = parse_webhook_events(values.get("webhook_events", ""), callback_url)
    priority = values.get("priority", "").strip().lower() or None
    if priority is not None and priority not in LANES:
        raise InvalidOption(f"priority must be {' or '.join(LANES)}, got {priority!r}.")
    return Order(card, OutputOptions(top_k=top_k, gradcam=raw_cam in _TRUE), callback_url, events,
                 parse_deadline(values), priority)

def parse_deadline(values) -> float:
    """Read ``deadline_s`` (seconds), else a ``Cancel-After`` header (Replicate's: ``30s``, ``5m``,
    ``1h30m``), else JOB_DEADLINE_S; 0 asks for none."""
    raw = values.get("deadline_s", "").strip()
    if raw:
        return number_option(values, "deadline_s", "0", float, 0, MAX_DEADLINE_S)
    header = request.headers.get("Cancel-After", "").strip().lower()
    if not header:
        return float(services().settings.job_deadline_s)
    match = _DURATION.fullmatch(header)
    if re.fullmatch(r"\d{1,9}(?:\.\d{1,3})?", header):
        seconds = float(header)
    elif match and any(match.groups()):
        hours, minutes, secs = (float(part or 0) for part in match.groups())
        seconds = hours * 3600 + minutes * 60 + secs
    else:
        raise InvalidOption(f"Cancel-After must be a duration such as 30s, 5m or 1h30m, got {header!r}.")
    if seconds > MAX_DEADLINE_S:
        raise InvalidOption(f"Cancel-After may be at most {MAX_DEADLINE_S} s, got {header!r}.")
    return seconds


def parse_webhook_events(raw: str, callback_url: str | None) -> tuple[str, ...]:
    """Read ``webhook_events`` (comma-separated ``started``, ``completed``; default ``completed``)."""
    names = {part.strip().lower() for part in raw.split(",") if part.strip()}
    if not names:
        return ("completed",)
    unknown = names - set(WEBHOOK_EVENTS)
    if unknown:
        raise InvalidOption(f"webhook_events may name {', '.join(WEBHOOK_EVENTS)}; got {', '.join(sorted(unknown))}.")
    if not callback_url:
        raise InvalidOption("webhook_events needs a callback_url (or an API key with a webhook URL) to call.")
    return tuple(name for name in WEBHOOK_EVENTS if name in names)


def check_callback(url: str) -> str:
    """Refuse (422) a callback we could not or would not call, now rather than at delivery; return it
    as it will be called (international hosts and characters encoded the way browsers do). The name
    lookup may take CALLBACK_RESOLVE_TIMEOUT_S, no longer: a slow DNS must not hold a request thread."""
    svc = services()
    settings = svc.settings
    try:
        url = normalise_url(url)
        resolve_within(svc.lookups, url, settings.callback_resolve_timeout_s, settings.webhook_allow_private)
    except RefusedUrl as exc:
        raise InvalidCallbackUrl(str(exc)) from None
    signer = settings.secret_key if auth.current_key() else settings.webhook_secret
    if not signer:
        need = "SECRET_KEY" if auth.current_key() else "WEBHOOK_SECRET (or submit with an API key)"
        raise InvalidCallbackUrl(f"This server cannot sign webhooks yet: it needs {need}.")
    return url


def read_images() -> tuple[list[bytes], MultiDict]:
    """Return every uploaded image and the option fields, from multipart or a raw image body."""
    if request.mimetype == "multipart/form-data":
        uploads = request.files.getlist("image")
        if not uploads:
            raise MissingImage("Send the image in the multipart field 'image'.")
        try:
            return [upload.read() for upload in uploads], request.form
        finally:
            for upload in uploads:
                upload.close()  # big parts are spooled to a temporary file: release them now
    if request.mimetype.startswith("image/") or request.mimetype == "application/octet-stream":
        return [request.get_data(cache=False)], request.args
    raise MissingImage("Send the image as multipart field 'image' or as a raw body "
                       "with an image/* Content-Type.")


def check_size(data: bytes, label: str = "The image") -> None:
    limit = services().settings.max_upload_bytes
    if len(data) > limit:
        raise PayloadTooLarge(f"{label} is {len(data)} bytes; the limit is {limit} bytes.")


def accept(data: bytes, order: Order, context: JobContext, *, sha: str | None = None,
           info: ImageInfo | None = None, job_id: str | None = None, check_capacity: bool = True) -> Submission:
    """Answer from the cache, attach to identical work in flight, or store the image and enqueue it.

    A batch checks capacity once for all its images (``check_capacity=False`` here), so that it is
    refused whole rather than half-created.
    """
    svc = services()
    sha = sha or image_digest(data)
    comp = Computation(order.card.name, order.card.version, sha, order.options)
    count = stats.SubmissionCount(order.card.name, time.time())  # the script counts the job it writes
    in_use: KeyInUse | None = g.get("idempotent_request")  # POST /jobs with an Idempotency-Key (idempotent())
    in_use = in_use if context.batch_id is None else None  # a batch's key answers with the batch
    job_id = job_id or (new_job_id() if in_use else None)
    key = svc.idempotency.record_for(in_use.lease, in_use.fingerprint, job_id) if in_use else None
    traceparent = tracing.current_traceparent()  # the request's span: the job's trace from here on
    if traceparent:
        context = dataclasses.replace(context, traceparent=traceparent)
    key_record = auth.current_key()
    # the submit script pushes a new computation's message itself (Celery sends it when it must send a
    # task event too: TASK_EVENTS)
    message = None if svc.celery.conf.task_send_sent_event else inference_message(
        svc.celery, comp, traceparent, order.lane(context), key_record.weight if key_record else 1.0)
    with tracing.span("cache lookup") as lookup:
        submission = _submit(data, order, comp, context, job_id=job_id, count=count, key=key, info=info,
                             check_capacity=check_capacity, message=message)
        if lookup is not None:
            lookup.set_attribute("imgsvc.outcome", submission.outcome)
    if submission.outcome == "key_lost":
        raise IdempotencyInProgress("Another request holds this Idempotency-Key (this one's claim ran out, "
                                    "IDEMPOTENCY_LEASE_S); retry shortly.", retry_after_s=1)
    remember_written(job_key(submission.job_id))
    if in_use:
        in_use.stored = True
    if submission.outcome == "new" and submission.step is None:
        step = step_for(order.lane(context), submission.in_flight, key_record.weight if key_record else 1.0)
        enqueue_inference(comp, in_use, traceparent, step)
    return submission


def _submit(data: bytes, order: Order, comp: Computation, context: JobContext, *, job_id, count, key, info,
            check_capacity: bool, message: StepMessage | None) -> Submission:
    """One submit that answers a hit, attaches, or stores the bytes and starts the computation, after
    the header check. An upload over LOOKUP_FIRST_BYTES is looked up first without its bytes (a hit or
    an attach needs neither them nor their header check), then, on a miss, submitted with them."""
    svc = services()
    model_info = {"name": order.card.name, "version": order.card.version}
    max_bytes = svc.max_queued_bytes if check_capacity else 0
    if len(data) > LOOKUP_FIRST_BYTES:
        submission = svc.store.submit(comp, model_info, context=context, job_id=job_id, count=count, key=key,
                                      max_queued_bytes=max_bytes)  # one more job waiting counts too
        if submission.outcome != "miss":
            return _answered(submission, data, order, comp)
    info = info or inspect_image(data, svc.settings.max_image_pixels)
    submission = svc.store.submit(comp, model_info, data, info.to_dict(comp.sha256), context=context, job_id=job_id,
                                  count=count, queue=inference_queue(order.card.name),
                                  max_queue_depth=svc.settings.max_queue_depth if check_capacity else 0,
                                  max_queued_bytes=max_bytes, key=key, share=auth.share(),
                                  max_share_depth=svc.settings.max_queue_depth_per_key if check_capacity else 0,
                                  message=message)
    if submission.outcome == "overloaded":
        raise _overloaded(order.card.name)
    if submission.outcome == "overloaded_share":
        raise _share_full()
    return _answered(submission, data, order, comp)


def _answered(submission: Submission, data: bytes, order: Order, comp: Computation) -> Submission:
    """Refuse a submission past MAX_QUEUED_MB (503); a hit's bytes are kept as its heatmap's picture."""
    if submission.outcome == "overloaded_bytes":
        raise _too_many_bytes()
    if submission.outcome == "cached":  # these bytes are its heatmap's picture, should the cache have lost it
        services().pictures.keep(comp, data, order.card.resize)
    return submission


def ensure_capacity(model: str, incoming_bytes: int = 0, incoming_jobs: int = 1) -> None:
    """Refuse new work (503) while the model's queue is past MAX_QUEUE_DEPTH, or while the work
    waiting for workers and ``incoming_jobs`` more (``incoming_bytes`` of uploads) would pass
    MAX_QUEUED_MB; and (429) when the caller's computations in flight and ``incoming_jobs`` would pass
    MAX_QUEUE_DEPTH_PER_KEY. Hits still pass."""
    svc = services()
    limit, per_key = svc.settings.max_queue_depth, svc.settings.max_queue_depth_per_key
    pipe = svc.redis.pipeline(transaction=False)
    for name in priority_lists(inference_queue(model)) if limit else ():
        pipe.llen(name)
    pipe.hget(QUEUED_SHARES_KEY, auth.share())
    pipe.get(QUEUED_BYTES_KEY)  # the three bounds in one round trip
    *lengths, in_flight, queued_bytes = pipe.execute()
    if limit and sum(lengths) >= limit:
        raise _overloaded(model)
    if per_key and int(in_flight or 0) + incoming_jobs > per_key:
        raise _share_full()
    incoming = incoming_bytes + incoming_jobs * (WAITING_JOB_BYTES + WAITING_COMPUTATION_BYTES)
    if svc.max_queued_bytes and int(queued_bytes or 0) + incoming > svc.max_queued_bytes:
        raise _too_many_bytes()


def _share_full() -> ShareFull:
    limit = services().settings.max_queue_depth_per_key
    return ShareFull(f"This caller's share of the queue is full: it has {limit} images waiting or being "
                     "computed (MAX_QUEUE_DEPTH_PER_KEY); other callers are still served. Retry once some "
                     "finish.", retry_after_s=5)


def _too_many_bytes() -> Overloaded:
    limit_mb = services().max_queued_bytes / (1024 * 1024)
    return Overloaded(f"The work waiting for workers (uploads, job records, messages) takes {limit_mb:.0f} MiB, "
                      "the most this service holds (MAX_QUEUED_MB); retry shortly.")


def _overloaded(model: str) -> Overloaded:
    limit = services().settings.max_queue_depth
    return Overloaded(f"The {model} queue holds {limit} or more waiting jobs; retry shortly.")


def enqueue_inference(comp: Computation, in_use: KeyInUse | None = None, traceparent: str = "",
                      priority: int = 0) -> None:
    """Send the inference task through Celery (TASK_EVENTS on: Celery sends the event with it) to the
    model's queue at its priority step; undo the job (and the answer stored for its Idempotency-Key,
    so that a retry makes it again) if that fails."""
    svc = services()
    try:
        send_inference(svc.celery, comp, traceparent, priority)
    except (OperationalError, AttributeError) as exc:  # AttributeError: kombu's channel, closed by another
        # thread's publish that Redis refused (a full Redis), has no connection left
        log.error("could not enqueue %s: %s", comp.suffix, exc)
        svc.store.fail(comp, Unavailable("The job could not be queued.").to_dict())
        if in_use:
            svc.idempotency.forget(in_use.lease)
        raise Unavailable("The job queue is unavailable; retry shortly.") from exc


def idempotent(kind: str, request_print: str, create) -> tuple[Created, bool]:
    """Run ``create`` (returning a Created of ``kind``) once per Idempotency-Key; return it and whether
    it is a replay. The key belongs to one endpoint: the same key on the other is refused (422)."""
    raw_key = request.headers.get("Idempotency-Key")
    if raw_key is None:
        return _made(create()), False
    key, store = check_key(raw_key), services().idempotency
    lease = store.begin(auth.owner(), key, request_print, kind)
    if isinstance(lease, Created):
        return lease, True
    in_use = g.idempotent_request = KeyInUse(lease, request_print)
    try:
        created = create()
    except BaseException:
        try:
            store.release(lease)
        except redis.RedisError as exc:  # Redis failed the request too: the claim lapses with its lease
            log.warning("could not release an Idempotency-Key claim; it lapses in %d s: %s", store.lease_s, exc)
        raise
    finally:
        g.pop("idempotent_request", None)
    if not in_use.stored:  # a job that joined a batch's key: nothing; the step that made it stored the answer
        store.complete(lease, request_print, created)
    return _made(created), False


def _made(created: Created) -> Created:
    if created.kind == "batch":  # its jobs are noted as accept() writes them
        remember_written(batch_key(created.id))
    return created
