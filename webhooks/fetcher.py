"""The fetch step of an ``image_url`` job: download, check as an upload, then join the normal path.

It runs in the webhook worker (its own ``fetches`` queue, threads pool): the one process that already
makes outbound HTTP under the SSRF guard, holds no model and no device, and is sized for waiting on
slow servers. Late acknowledgement (shared.tasks.celery_config) makes the step at-least-once: a
worker that dies mid-download leaves its message to be delivered again, and the job's ``fetch`` mark
makes a second delivery of a finished step do nothing.
"""
from __future__ import annotations

import json
import logging
import time

import redis
from concurrent.futures import ThreadPoolExecutor

from shared import stats, tracing
from shared.errors import FetchFailed, Overloaded, ServiceError, Unavailable
from shared.fetches import FetchStore
from shared.jobs import JobStore
from shared.jobtypes import JobContext
from shared.keys import Computation, OutputOptions, image_digest
from shared.settings import Settings
from shared.tasks import inference_queue, send_inference, step_for
from web.upload import inspect_image
from webhooks.fetch import FetchError, fetch_image

log = logging.getLogger(__name__)


class ImageFetcher:
    """Downloads the images of jobs submitted by URL and submits them under their job's id."""

    def __init__(self, settings: Settings, store: JobStore, celery):
        self.settings, self.store, self.celery = settings, store, celery
        self.fetches = FetchStore(store)
        self._lookups = ThreadPoolExecutor(settings.webhook_concurrency, thread_name_prefix="fetch-lookup")

    def run(self, job_id: str) -> str:
        """Fetch the job's image and submit it; return what became of the job."""
        fields = self.fetches.pending(job_id)
        if fields is None:
            return "not_waiting"  # a redelivered message whose step already ended, or an expired job
        try:
            with tracing.span("fetch image_url", parent=fields.get("traceparent") or None,
                              attributes={"job.id": job_id}):
                data = self.download(fields["image_url"])
            info = inspect_image(data, self.settings.max_image_pixels)
        except FetchError as exc:
            return self._fail(job_id, str(exc))
        except ServiceError as exc:  # the same checks as an upload: not an image, too many pixels, truncated
            return self._fail(job_id, f"not an image we accept ({exc.code}): {exc.message}")
        except redis.RedisError:
            raise  # the task tries the step again
        except Exception as exc:  # a bug of ours must end the job, not leave it queued for ever
            log.exception("job %s: fetching %s raised", job_id, fields["image_url"])
            return self._fail(job_id, f"an error in the service ({type(exc).__name__})")
        return self.join(job_id, fields, data, info)

    def download(self, url: str) -> bytes:
        s = self.settings
        return fetch_image(url, max_bytes=s.max_upload_bytes, timeout_s=s.fetch_timeout_s,
                           connect_timeout_s=s.webhook_connect_timeout_s, allow_private=s.fetch_allow_private,
                           lookups=self._lookups)

    def join(self, job_id: str, fields: dict, data: bytes, info) -> str:
        """Submit the image as the job ``job_id``: a cache hit, an attach to identical work, or new work."""
        model = json.loads(fields["model"])
        sha = image_digest(data)
        comp = Computation(model["name"], model["version"], sha, OutputOptions(**json.loads(fields["options"])))
        events = tuple(fields.get("webhook_events", "completed").split(","))
        traceparent = fields.get("traceparent", "")  # the submit's trace: the worker's spans join it
        context = JobContext(fields.get("owner", ""), fields.get("callback_url"), webhook_events=events,
                             traceparent=traceparent, deadline_at=float(fields.get("deadline") or 0))
        submission = self.store.submit(comp, model, data, info.to_dict(sha), context=context, job_id=job_id,
                                       queue=inference_queue(comp.model),
                                       count=stats.SubmissionCount(comp.model, time.time()),
                                       share=url_share(fields.get("owner", "")))
        if submission.outcome == "canceled":  # canceled while its image was fetched: it stays so
            return "canceled"
        if submission.outcome not in ("cached", "attached", "new"):  # no bound is passed: cannot happen
            raise Overloaded(f"the image of job {job_id} was not accepted: {submission.outcome}")
        self.fetches.joined(job_id, fields["created_at"], done=submission.outcome == "cached")
        if submission.outcome == "new":
            try:
                send_inference(self.celery, comp, traceparent, step_for("interactive", submission.in_flight))
            except Exception:  # the job must not wait for a message that was never sent
                log.exception("could not enqueue %s for job %s", comp.suffix, job_id)
                self.store.fail(comp, Unavailable("The job could not be queued.").to_dict())
                return "failed"
        return submission.outcome

    def _fail(self, job_id: str, why: str) -> str:
        log.info("job %s: fetching its image_url failed: %s", job_id, why)
        error = FetchFailed(f"Fetching the image_url failed: {why}.").to_dict()
        if self.fetches.fail(job_id, error) and self.store.on_settled is not None:
            self.store.on_settled([job_id])
        return "fetch_failed"


def url_share(owner: str) -> str:
    """The sender an image_url job counts against: its API key, or one share for every anonymous
    image_url job (the address that sent it is not kept). Its lane is interactive, its weight 1."""
    return f"key:{owner}" if owner else "addr:image_url"
