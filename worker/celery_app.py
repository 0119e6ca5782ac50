"""The worker's Celery app: ``celery -A worker.celery_app worker``.

The parent process only imports; each pool child loads the models in ``worker_process_init``
(never CUDA in the parent: children pick their device there).
"""
from __future__ import annotations

import logging
import os

from billiard.process import current_process
from celery import Celery
from celery.signals import (celeryd_init, worker_process_init, worker_process_shutdown, worker_ready,
                            worker_shutdown, worker_shutting_down)
from kombu import Queue

from shared import consumer_qos
from shared.cards import ModelCatalog
from shared.keys import drain_key
from shared import tracing
from shared.settings import Settings
from shared.tasks import celery_config, inference_queue
from worker import openmp
from worker.device_plan import DevicePlanError, device_for_child, plan_host

settings = Settings.from_env()
logging.basicConfig(level=settings.log_level,
                    format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s")
catalog = ModelCatalog.load(settings.model_cards_dir, settings.models, settings.default_model)

tracing.configure(settings, "imgsvc-worker")  # off unless OTEL_* ask for traces

consumer_qos.install()  # a full Redis must not kill the consumer (shared/consumer_qos.py)
app = Celery("imgsvc")
app.conf.update(celery_config(settings))
app.conf.task_queues = [Queue(inference_queue(card.name)) for card in catalog]
app.conf.task_default_queue = inference_queue(catalog.default)
# One child per planned device, counted without touching CUDA (the parent must never initialise it);
# a driver too old for torch's CUDA, or GPUs named that the host lacks, stop the worker here, once.
try:
    device_plan = plan_host(settings.worker_devices, settings.worker_concurrency,
                            os.environ.get("CUDA_VISIBLE_DEVICES"))
except DevicePlanError as exc:
    logging.getLogger(__name__).critical("cannot start the worker: %s", exc)
    raise SystemExit(f"cannot start the worker: {exc}") from None
app.conf.worker_concurrency = len(device_plan)
app.conf.include = ["worker.tasks"]

runtime = None  # set in each pool child by init_child
sweeper = None  # runs in the main process, started once the worker is ready
metrics_server = None  # the main process's /metrics (WORKER_METRICS_PORT)
node_name = ""  # this worker's Celery node name (e.g. worker1@host), set before the pool forks


@celeryd_init.connect
def remember_node_name(sender=None, **_):
    """Keep the node name so children name it in their heartbeats (admin actions address nodes)."""
    global node_name
    node_name = str(sender or "")


@worker_process_init.connect
def init_child(**_):
    """Load every served model once in this child, on its own device."""
    openmp.limit_spinning(gpu=device_for_child(device_plan, getattr(current_process(), "index", 0)) != "cpu")
    from worker.runtime import Runtime

    global runtime
    index = getattr(current_process(), "index", 0)
    planned = device_for_child(device_plan, index)
    runtime = Runtime.start(settings, catalog, index, broker_connection=app.connection_for_read(),
                            planned_device=planned, node=node_name, pool_size=len(device_plan), sender=app)


@worker_process_shutdown.connect
def close_child(**_):
    if runtime is not None:
        runtime.close()


_main_store = None


def main_store():
    """The main process's own JobStore (children have theirs in the runtime), made on first use."""
    from shared import redisconn
    from shared.webhooks import announcing_store

    global _main_store
    if _main_store is None:
        client = redisconn.client(settings, socket_timeout=10, socket_connect_timeout=5)
        _main_store = announcing_store(client, settings, app)
    return _main_store


@worker_ready.connect
def start_sweeper(sender=None, **_):
    """Reconcile stuck computations from the main process (no torch there, no extra service)."""
    from worker.sweeper import Sweeper

    global sweeper
    sweeper = Sweeper(settings, main_store().redis, app, name=getattr(sender, "hostname", "worker"),
                      queues=tuple(inference_queue(card.name) for card in catalog))
    sweeper.start()


@worker_ready.connect
def start_node_services(sender=None, **_):
    """Clear a drain left from this node's last life, and serve this node's /metrics."""
    from worker.metrics import serve_metrics

    global metrics_server
    main_store().redis.delete(drain_key(node_name))
    metrics_server = serve_metrics(settings, [card.name for card in catalog], node_name)


@worker_shutting_down.connect
def stop_taking_batches(**_):
    """On warm shutdown, children stop taking further batches and finish the ones in hand: the rest
    of the queue stays for other workers (or this one's next life, which clears the drain)."""
    try:
        main_store().redis.set(drain_key(node_name), "shutdown", ex=max(60, settings.job_time_limit_s))
    except Exception:  # Redis down: children then finish their loop budget before the pool stops
        logging.getLogger(__name__).warning("could not mark %s as draining for shutdown", node_name,
                                            exc_info=True)


@worker_shutdown.connect
def stop_sweeper(**_):
    from worker.metrics import stop_metrics

    if sweeper is not None:
        sweeper.stop()
    stop_metrics(metrics_server)
