"""The worker's Celery app: ``celery -A worker.celery_app worker``.

The parent process only imports; each pool child loads the models in ``worker_process_init``
(never CUDA in the parent: children pick their device there).
"""
from __future__ import annotations

import logging

from billiard.process import current_process
from celery import Celery
from celery.signals import worker_process_init, worker_process_shutdown, worker_ready, worker_shutdown
from kombu import Queue

from shared.cards import ModelCatalog
from shared.settings import Settings
from shared.tasks import celery_config, inference_queue

settings = Settings.from_env()
logging.basicConfig(level=settings.log_level,
                    format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s")
catalog = ModelCatalog.load(settings.model_cards_dir, settings.models, settings.default_model)

app = Celery("imgsvc")
app.conf.update(celery_config(settings))
app.conf.task_queues = [Queue(inference_queue(card.name)) for card in catalog]
app.conf.task_default_queue = inference_queue(catalog.default)
app.conf.worker_concurrency = settings.worker_concurrency
app.conf.include = ["worker.tasks"]

runtime = None  # set in each pool child by init_child
sweeper = None  # runs in the main process, started once the worker is ready


@worker_process_init.connect
def init_child(**_):
    """Load every served model once in this child, on its own device."""
    from worker.runtime import Runtime

    global runtime
    runtime = Runtime.start(settings, catalog, getattr(current_process(), "index", 0),
                            broker_connection=app.connection_for_read())


@worker_process_shutdown.connect
def close_child(**_):
    if runtime is not None:
        runtime.close()


_main_store = None


def main_store():
    """The main process's own JobStore (children have theirs in the runtime), made on first use."""
    import redis

    from shared.jobs import JobStore

    global _main_store
    if _main_store is None:
        client = redis.Redis.from_url(settings.redis_url, socket_timeout=10, socket_connect_timeout=5)
        _main_store = JobStore.from_settings(client, settings)
    return _main_store


@worker_ready.connect
def start_sweeper(sender=None, **_):
    """Reconcile stuck computations from the main process (no torch there, no extra service)."""
    from worker.sweeper import Sweeper

    global sweeper
    sweeper = Sweeper(settings, main_store().redis, app, name=getattr(sender, "hostname", "worker"))
    sweeper.start()


@worker_shutdown.connect
def stop_sweeper(**_):
    if sweeper is not None:
        sweeper.stop()
