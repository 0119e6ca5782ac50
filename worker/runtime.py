"""What one pool child holds for its whole life: device, resident models, Redis, heartbeat."""
from __future__ import annotations

import logging
import os
import socket
import time

import redis
import torch
from celery.exceptions import SoftTimeLimitExceeded

from shared import stats
from shared.cards import ModelCatalog
from shared.errors import (ImageExpired, InferenceFailed, JobTimeout, ModelVersionUnavailable, ServiceError,
                           WorkerCrashed)
from shared.jobs import Claim, JobStore
from shared.keys import drain_key
from shared.settings import Settings
from shared.tasks import inference_queue
from shared.webhooks import announcing_store
from worker import devices
from worker.batching import Pending, QueueDrainer, best_batch_size
from worker.heartbeat import Heartbeat
from worker.inference import predict
from worker.models import LoadedModel, load_count, load_model
from worker.pipeline import run_batch

log = logging.getLogger(__name__)
CPU_BATCHES = (1, 2, 4, 8)
CUDA_BATCHES = (1, 2, 4, 8, 16, 32, 64)


class Runtime:
    """A pool child's resident state; ``handle`` runs a message (and any batched with it)."""

    def __init__(self, settings: Settings, models: dict[str, LoadedModel], batch_sizes: dict[str, int],
                 store: JobStore, heartbeat: Heartbeat, drainer: QueueDrainer | None, labels: dict):
        self.settings, self.models, self.batch_sizes = settings, models, batch_sizes
        self.store, self.heartbeat, self.drainer = store, heartbeat, drainer
        self.labels = labels  # device and worker (Celery node) labels of this child's statistics

    @classmethod
    def start(cls, settings: Settings, catalog: ModelCatalog, child_index: int,
              broker_connection=None, *, planned_device: str = "cpu", node: str = "",
              pool_size: int = 1, sender=None) -> "Runtime":
        """Pick the device, load and warm every served model, size batches, start the heartbeat."""
        device = devices.choose_device(planned_device)
        threads = settings.torch_threads or max(1, (os.cpu_count() or 1) // pool_size)
        devices.configure(device, threads)
        models = {card.name: load_model(card, device) for card in catalog}
        for model in models.values():
            warm_up(model, settings.amp_dtype)
        candidates = CUDA_BATCHES if device.type == "cuda" else CPU_BATCHES
        batch_sizes = {name: settings.max_batch or best_batch_size(model, settings.amp_dtype, candidates)
                       for name, model in models.items()}
        client = redis.Redis.from_url(settings.redis_url, socket_timeout=30, socket_connect_timeout=5,
                                      health_check_interval=30)
        name = f"{socket.gethostname()}:{os.getpid()}"
        info = {"node": node, "host": socket.gethostname(), "pid": os.getpid(), "child_index": child_index,
                "device": str(device), "device_name": devices.device_name(device), "threads": threads,
                "models": {m.card.name: m.card.version for m in models.values()},
                "max_batch": batch_sizes, "model_loads": load_count(), "started_at": time.time()}
        heartbeat = Heartbeat(client, name, info, interval_s=settings.heartbeat_interval_s,
                              ttl_s=settings.worker_ttl_s,
                              probe=lambda: {"gpu_memory": devices.gpu_memory(device)},
                              queues=tuple(inference_queue(card.name) for card in catalog))
        heartbeat.start()
        drainer = QueueDrainer(broker_connection) if broker_connection is not None else None
        log.info("child %s ready on %s with %s", name, info["device"], batch_sizes)
        store = announcing_store(client, settings, sender) if sender is not None else JobStore.from_settings(
            client, settings)  # the sender (the worker's Celery app) carries webhook events
        return cls(settings, models, batch_sizes, store, heartbeat,
                   drainer, {"device": str(device), "worker": node})

    def handle(self, first: Pending) -> list[str]:
        """Run ``first`` together with whatever else waits in its queue; return each outcome."""
        batch = [first]
        limit = self.batch_sizes.get(first.comp.model, 1) - 1
        # A drained node takes no extra messages; a retried computation runs alone.
        if self.drainer is not None and limit > 0 and not self.store.redis.exists(
                first.comp.attempts_key, drain_key(self.labels["worker"])):
            batch += self.drainer.take(inference_queue(first.comp.model), limit,
                                       self.settings.max_wait_ms / 1000)
        self.heartbeat.batch_started(len(batch))
        try:
            return self.process(batch)
        finally:
            self.heartbeat.batch_started(0)
            for pending in batch:
                if pending.message is not None:
                    pending.message.ack()  # only now: its result (or failure) is written

    def process(self, batch: list[Pending]) -> list[str]:
        """Compute every pending computation and settle every job attached to each."""
        started = time.time()
        outcomes: dict[int, str] = {}
        runnable: list[tuple[int, Pending, bytes]] = []
        claims = self.store.claim([pending.comp for pending in batch], owner=self.heartbeat.name)
        retried = [p.comp.model for p, c in zip(batch, claims) if c.attempt > 1]
        if retried:
            self.store.count_redeliveries(retried)
        for index, (pending, claim) in enumerate(zip(batch, claims)):
            if claim.already_done:
                outcomes[index] = "already_done"  # a redelivered message whose result was written
                continue
            try:
                runnable.append((index, pending, self._check(pending, claim)))
            except ServiceError as exc:
                outcomes[index] = self._fail(pending, exc)
        for group in self._groups(runnable, claims):
            outcomes.update(self._run_group(self.models[group[0][1].comp.model], group, started))
        return [outcomes[i] for i in range(len(batch))]

    @staticmethod
    def _groups(runnable, claims) -> list[list]:
        """One group per model; a computation retried after a crash runs alone, so it cannot take
        innocent neighbours down with it again."""
        groups: dict[str, list] = {}
        alone = []
        for entry in runnable:
            if claims[entry[0]].attempt > 1:
                alone.append([entry])
            else:
                groups.setdefault(entry[1].comp.model, []).append(entry)
        return list(groups.values()) + alone

    def _check(self, pending: Pending, claim: Claim) -> bytes:
        comp = pending.comp
        if claim.attempt > self.settings.max_attempts:
            raise WorkerCrashed(f"The job crashed its worker {claim.attempt - 1} times; it will not be retried.")
        model = self.models.get(comp.model)
        if model is None or model.card.version != comp.version:
            raise ModelVersionUnavailable(f"This worker does not serve {comp.model} version {comp.version}.")
        if claim.image is None:
            raise ImageExpired("The uploaded image expired before a worker could read it.")
        return claim.image

    def _run_group(self, model: LoadedModel, group, started: float) -> dict[int, str]:
        try:
            outputs = run_batch(model, [(data, pending.comp.options) for _, pending, data in group],
                                max_pixels=self.settings.max_image_pixels, amp_dtype=self.settings.amp_dtype)
        except SoftTimeLimitExceeded:
            log.error("batch of %d on %s passed the soft time limit", len(group), model.card.name)
            error = JobTimeout(f"The computation took longer than {self.settings.job_soft_time_limit_s} s.")
            return {index: self._fail(pending, error) for index, pending, _ in group}
        except Exception as exc:  # a bug or a device error must fail the jobs, not the worker
            log.exception("batch of %d on %s crashed", len(group), model.card.name)
            error = InferenceFailed(f"Inference failed: {type(exc).__name__}: {exc}")
            return {index: self._fail(pending, error) for index, pending, _ in group}
        outcomes, done, samples = {}, [], []
        for (index, pending, _), output in zip(group, outputs):
            if isinstance(output, ServiceError):
                outcomes[index] = self._fail(pending, output)
                continue
            output.result["timings_ms"]["queue"] = round(max(0.0, started - pending.enqueued_at) * 1000, 2)
            done.append((pending.comp, output.result, output.overlay_png))
            timings = output.result["timings_ms"]
            samples.append((pending.enqueued_at, (timings["inference"] + timings["gradcam"]) / 1000))
            outcomes[index] = "done"
        self.store.finish_many(done)  # one round trip for the whole batch
        self.heartbeat.count("jobs_done", len(done))
        self._record(model.card.name, len(group), samples)
        return outcomes

    def _record(self, model: str, batch_size: int, samples: list[tuple[float, float]]) -> None:
        """Add a finished batch to the fleet statistics (enqueue time, inference s per computation)."""
        now = time.time()
        latencies = [(max(0.0, now - enqueued_at), inference) for enqueued_at, inference in samples]
        self.heartbeat.observe([inference for _, inference in latencies])
        try:
            stats.record_batch(self.store.redis, {**self.labels, "model": model}, latencies, batch_size, now)
        except redis.RedisError:
            log.warning("could not record statistics of a batch on %s", model, exc_info=True)

    def _fail(self, pending: Pending, error: ServiceError) -> str:
        log.warning("computation %s failed: %s", pending.comp.suffix, error.message)
        self.store.fail(pending.comp, error.to_dict())
        self.heartbeat.count("jobs_failed")
        try:
            stats.record_failures(self.store.redis, {**self.labels, "model": pending.comp.model})
        except redis.RedisError:
            log.warning("could not count a failure of %s", pending.comp.model, exc_info=True)
        return "failed"

    def close(self) -> None:
        self.heartbeat.stop()
        if self.drainer is not None:
            self.drainer.close()


def warm_up(model: LoadedModel, amp_dtype: str) -> None:
    """Run one dummy batch so the first real job does not pay for lazy initialisation."""
    size = model.card.input_size
    predict(model, [torch.zeros(3, size, size)], gradcam=True, amp_dtype=amp_dtype)
