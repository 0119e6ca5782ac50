"""What one pool child holds for its whole life: device, resident models, Redis, heartbeat."""
from __future__ import annotations

import logging
import os
import socket
import time

import redis
import torch

from shared.cards import ModelCatalog
from shared.errors import InferenceFailed, JobFailed, ServiceError
from shared.jobs import JobStore
from shared.keys import Computation
from shared.settings import Settings
from worker import devices
from worker.heartbeat import Heartbeat
from worker.models import LoadedModel, load_count, load_model
from worker.pipeline import run_pipeline

log = logging.getLogger(__name__)


class ModelVersionUnavailable(JobFailed):
    code = "model_version_unavailable"


class ImageExpired(JobFailed):
    code = "image_expired"


class Runtime:
    """A pool child's resident state; ``process`` runs one computation end to end."""

    def __init__(self, settings: Settings, models: dict[str, LoadedModel], store: JobStore,
                 heartbeat: Heartbeat):
        self.settings, self.models, self.store, self.heartbeat = settings, models, store, heartbeat

    @classmethod
    def start(cls, settings: Settings, catalog: ModelCatalog, child_index: int) -> "Runtime":
        """Pick the device, load and warm every served model, and start the heartbeat."""
        device = devices.choose_device(settings.worker_device, child_index)
        threads = settings.torch_threads or max(1, (os.cpu_count() or 1) // settings.worker_concurrency)
        devices.configure(device, threads)
        models = {card.name: load_model(card, device) for card in catalog}
        for model in models.values():
            warm_up(model, settings.amp_dtype)
        client = redis.Redis.from_url(settings.redis_url, socket_timeout=30, socket_connect_timeout=5,
                                      health_check_interval=30)
        name = f"{socket.gethostname()}:{os.getpid()}"
        info = {"host": socket.gethostname(), "pid": os.getpid(), "child_index": child_index,
                "device": devices.describe(device), "threads": threads,
                "models": {m.card.name: m.card.version for m in models.values()},
                "model_loads": load_count(), "started_at": time.time()}
        heartbeat = Heartbeat(client, name, info, interval_s=settings.heartbeat_interval_s,
                              ttl_s=settings.worker_ttl_s)
        heartbeat.start()
        log.info("child %s ready on %s with %s", name, info["device"], ", ".join(models))
        return cls(settings, models, JobStore.from_settings(client, settings), heartbeat)

    def process(self, comp: Computation, enqueued_at: float) -> str:
        """Compute ``comp`` and settle every job attached to it; return the outcome."""
        started = time.time()
        self.store.start(comp)
        if self.store.redis.exists(comp.result_key):
            return "already_done"  # a redelivered message whose result was already written
        try:
            model = self.models.get(comp.model)
            if model is None or model.card.version != comp.version:
                raise ModelVersionUnavailable(
                    f"This worker does not serve {comp.model} version {comp.version}.")
            data = self.store.image_bytes(comp)
            if data is None:
                raise ImageExpired("The uploaded image expired before a worker could read it.")
            output = run_pipeline(model, data, comp.options, max_pixels=self.settings.max_image_pixels,
                                  amp_dtype=self.settings.amp_dtype)
        except ServiceError as exc:
            log.warning("computation %s failed: %s", comp.suffix, exc.message)
            return self._fail(comp, exc)
        except Exception as exc:  # a bug or a device error must fail the job, not the worker
            log.exception("computation %s crashed", comp.suffix)
            return self._fail(comp, InferenceFailed(f"Inference failed: {type(exc).__name__}: {exc}"))
        output.result["timings_ms"]["queue"] = round(max(0.0, started - enqueued_at) * 1000, 2)
        self.store.finish(comp, output.result, output.overlay_png)
        self.heartbeat.count("jobs_done")
        return "done"

    def _fail(self, comp: Computation, error: ServiceError) -> str:
        self.store.fail(comp, error.to_dict())
        self.heartbeat.count("jobs_failed")
        return "failed"

    def close(self) -> None:
        self.heartbeat.stop()


def warm_up(model: LoadedModel, amp_dtype: str) -> None:
    """Run one dummy batch so the first real job does not pay for lazy initialisation."""
    from worker.inference import predict

    size = model.card.input_size
    predict(model, [torch.zeros(3, size, size)], gradcam=True, amp_dtype=amp_dtype)
