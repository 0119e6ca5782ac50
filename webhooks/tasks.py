"""The delivery task: one attempt of one event, by id."""
from __future__ import annotations

from shared.tasks import WEBHOOK_TASK
from webhooks.celery_app import app, client, settings
from webhooks.delivery import Deliverer

deliverer = Deliverer(settings, client)


@app.task(name=WEBHOOK_TASK)
def deliver_webhook(message: dict) -> str:
    """Make one attempt of the event; the next one, if any, is scheduled in Redis."""
    return deliverer.attempt(message["event_id"])
