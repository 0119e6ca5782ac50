"""The webhook worker's tasks: one attempt of one event, by id; the download of one job's image_url."""
from __future__ import annotations

import redis

from shared.tasks import FETCH_TASK, WEBHOOK_TASK
from shared.webhooks import announcing_store
from webhooks.celery_app import app, client, settings
from webhooks.delivery import Deliverer
from webhooks.fetcher import ImageFetcher

deliverer = Deliverer(settings, client)
fetcher = ImageFetcher(settings, announcing_store(client, settings, app), app)


@app.task(name=WEBHOOK_TASK)
def deliver_webhook(message: dict) -> str:
    """Make one attempt of the event; the next one, if any, is scheduled in Redis."""
    return deliverer.attempt(message["event_id"])


# Redis away: the step is tried again (the job waits, queued); the download itself never raises.
@app.task(name=FETCH_TASK, autoretry_for=(redis.RedisError,), retry_backoff=2, retry_backoff_max=60, max_retries=8)
def fetch_image(message: dict) -> str:
    """Download a job's image_url and submit the image under the job's id, or fail the job."""
    return fetcher.run(message["job_id"])
