"""The webhook worker's Celery app: ``celery -A webhooks.celery_app worker --pool=threads``.

It consumes only the ``webhooks`` queue, so inference workers never wait on a slow receiver, and
runs the poller that sends each due retry back to that queue.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time

import redis
from celery import Celery
from celery.signals import worker_ready, worker_shutdown
from kombu import Exchange, Queue

from shared import consumer_qos, redisconn
from shared.jobs import JobStore
from shared.keys import WEBHOOK_WORKERS_KEY, webhook_worker_key
from shared import tracing
from shared.settings import Settings
from shared.tasks import FETCH_QUEUE, WEBHOOK_QUEUE, celery_config, send_webhook
from shared.webhooks import Announcer, EventStore

settings = Settings.from_env()
logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s")
log = logging.getLogger(__name__)

tracing.configure(settings, "imgsvc-webhooks")  # off unless OTEL_* ask for traces

consumer_qos.install()  # a full Redis must not kill the consumer (shared/consumer_qos.py)
app = Celery("imgsvc-webhooks")
app.conf.update(celery_config(settings))
app.conf.update(
    # the fetches queue too (image_url downloads): outbound HTTP under the same SSRF guard; a worker of
    # its own for them is this one started with ``-Q fetches``
    # (each queue with its own exchange and key: a second queue left to the defaults would be bound to the
    # webhooks exchange and key too, and receive a copy of every delivery message)
    task_queues=[Queue(WEBHOOK_QUEUE), Queue(FETCH_QUEUE, Exchange(FETCH_QUEUE), routing_key=FETCH_QUEUE)],
    task_default_queue=WEBHOOK_QUEUE, worker_pool="threads",
    worker_concurrency=settings.webhook_concurrency, include=["webhooks.tasks"],
    # Each attempt bounds itself (connect and total timeouts); thread pools have no time limits.
    task_soft_time_limit=None, task_time_limit=None,
)
client = redisconn.client(settings, socket_timeout=10, socket_connect_timeout=5, health_check_interval=30)
POLL_INTERVAL_S = 1.0


class Poller(threading.Thread):
    """Once a second: send events whose next attempt is due to the webhooks queue, and announce
    settled jobs whose own process died before it could."""

    def __init__(self):
        super().__init__(name="webhook-poller", daemon=True)
        self.events = EventStore(client, settings.job_ttl_s)
        self.announcer = Announcer(JobStore.from_settings(client, settings), app, settings)
        self.stopped = threading.Event()
        self.node, self.deliverer, self.last_beat = "", None, 0.0

    def run(self) -> None:
        while not self.stopped.wait(POLL_INTERVAL_S):
            try:
                self.beat()
                self.announcer.catch_up()
                for event_id in self.events.claim_due():
                    send_webhook(app, event_id)
            except Exception:  # Redis or the broker away: try again next tick
                log.warning("webhook poller tick failed", exc_info=True)


    def beat(self) -> None:
        """Tell the admin API this webhook worker lives, with its delivery outcomes so far."""
        now = time.time()
        if now - self.last_beat < settings.heartbeat_interval_s:
            return
        fields = {"node": self.node, "host": socket.gethostname(), "pid": os.getpid(),
                  "concurrency": settings.webhook_concurrency, "last_seen": now,
                  **(self.deliverer.outcome_counts() if self.deliverer else {})}
        pipe = client.pipeline()
        pipe.hset(webhook_worker_key(self.node), mapping=fields)
        pipe.expire(webhook_worker_key(self.node), settings.worker_ttl_s)
        pipe.zadd(WEBHOOK_WORKERS_KEY, {self.node: now})
        pipe.zremrangebyscore(WEBHOOK_WORKERS_KEY, 0, now - settings.worker_ttl_s)
        pipe.execute()
        self.last_beat = now


poller = Poller()


@worker_ready.connect
def start_poller(sender=None, **_):
    from webhooks.tasks import deliverer

    poller.node = getattr(sender, "hostname", None) or f"webhooks@{socket.gethostname()}"
    poller.deliverer = deliverer
    poller.start()


@worker_shutdown.connect
def stop_poller(**_):
    poller.stopped.set()
    try:
        client.zrem(WEBHOOK_WORKERS_KEY, poller.node)
        client.delete(webhook_worker_key(poller.node))
    except redis.RedisError as exc:  # one line: its entry expires by itself after WORKER_TTL_S
        log.warning("could not withdraw webhook worker %s (Redis: %s); its entry expires within %d s",
                    poller.node, exc, settings.worker_ttl_s)
