"""The webhook delivery log of a job, and redelivery on request."""
from __future__ import annotations

import json

from flask import Blueprint, jsonify

from shared.errors import NoCallback, NotSettled
from shared.keys import webhook_gone_key
from shared.tasks import send_webhook
from web import auth
from web.api import job_or_404
from web.intake import services

bp = Blueprint("deliveries", __name__)
bp.before_request(auth.require_caller)


@bp.get("/api/v1/jobs/<job_id>/deliveries")
def list_deliveries(job_id: str):
    """Every event about the job and every attempt to deliver it: time, status, duration, error."""
    job_or_404(job_id)
    events = services().events
    subject = f"job:{job_id}"
    return jsonify({"job_id": job_id, "events": [e.public() for e in events.for_subject(subject)],
                    "attempts": events.attempts(subject)})


@bp.post("/api/v1/jobs/<job_id>/deliveries/redeliver")
def redeliver(job_id: str):
    """Send the job's event again now (same webhook-id and body), whatever became of it before."""
    job = json.loads(job_or_404(job_id))
    if job["status"] not in ("done", "failed", "canceled"):
        raise NotSettled(f"Job {job_id} is {job['status']}; its event is sent when it finishes.")
    svc = services()
    events = svc.events.for_subject(f"job:{job_id}")
    if not events:
        if not job["callback_url"]:
            raise NoCallback(f"Job {job_id} has no callback_url, so there is nothing to deliver.")
        svc.announcer.jobs_settled([job_id])  # settled before its event could be made: make it now
        events = svc.events.for_subject(f"job:{job_id}")
        if not events:
            raise NoCallback(f"Job {job_id}'s event could not be created; see the server log.")
    else:
        svc.events.reopen(events[-1])
        svc.redis.delete(webhook_gone_key(events[-1].url))  # asked for by hand: lifts a 410 stop
        send_webhook(svc.celery, events[-1].id)
    return jsonify({"event": svc.events.get(events[-1].id).public()}), 202

