"""What one pool child holds for its whole life, and the pipelined loop that keeps its device busy.

Celery hands the child one message. While more wait in the model's queue, the child keeps going
in a loop of batches, three stages deep. Every ``LOOP_BUDGET_S`` the loop looks whether another model
this child serves has work waiting; it ends for it then, and in any case at a quarter of the soft time
limit (one Celery task's time limit covers the whole loop). A drain ends it after the batch in hand.
Under a steady backlog the loop so restarts rarely: each restart stages its first batch without
overlap, which is a batch of extra wait for whatever arrived just before it.

    task thread:    take batch k+1 ─┐            compute batch k (device) ─┐
    stage threads:                  └ claim + decode + preprocess k+1      │
    writer thread:                                  write results + acks + statistics of k-1

so the device never waits for decoding, and nothing waits for Redis writes. Per-message costs
are paid per batch: one round trip takes the batch (worker.broker), one claims it, one writes
its results, acknowledges its messages and records its statistics (acks only behind the results).
The loop itself is worker.batch_loop; what the device's part does when the device fails (out of
memory, a broken CUDA context) is worker.forward.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import redis
import torch
from celery.exceptions import SoftTimeLimitExceeded

from shared import redisconn, stats, tracing
from shared.cards import ModelCatalog
from shared.errors import (ImageExpired, InferenceFailed, ModelVersionUnavailable, ServiceError,
                           WorkerCrashed)
from shared.jobs import Claim, JobStore
from shared.keys import TAKEN_BY_KEY, drain_key
from shared.settings import Settings
from shared.tasks import inference_queue
from shared.webhooks import announcing_store
from worker import devices, openmp
from worker.batch_loop import BatchLoop, StagedBatch
from worker.batching import BatchSizer
from worker.broker import BatchReceiver, Pending, requeue_later
from worker.forward import exit_if_fatal, forward, make_sizer, warm_up
from worker.heartbeat import Heartbeat, child_name
from worker.models import LoadedModel, load_count, load_model
from worker.pipeline import PipelineOutput, PixelBudget, Staged, stage_all, stage_on_device
from worker.streams import DeviceInput, new_stream

log = logging.getLogger(__name__)
LOOP_BUDGET_S = 10.0

# KEYS: kombu's unacked hash and index, the taken-by hash, then one result key per tag in ARGV.
# Acknowledges (as kombu does) only the messages whose result exists.
_ACK_IF_WRITTEN = """
for i = 1, #ARGV do
  if redis.call('EXISTS', KEYS[3 + i]) == 1 then
    redis.call('ZREM', KEYS[2], ARGV[i])
    redis.call('HDEL', KEYS[1], ARGV[i])
    redis.call('HDEL', KEYS[3], ARGV[i])
  end
end
"""


class Runtime:
    """A pool child's resident state; ``handle`` runs a message and whatever queues behind it."""

    def __init__(self, settings: Settings, models: dict[str, LoadedModel], sizers: dict[str, BatchSizer],
                 store: JobStore, heartbeat: Heartbeat, receiver: BatchReceiver | None, labels: dict,
                 decode_threads: int = 0, stage_stream=None):
        self.settings, self.models, self.sizers = settings, models, sizers
        self.stage_stream = stage_stream  # the stage thread's own CUDA stream (None on the CPU)
        self.store, self.heartbeat, self.receiver = store, heartbeat, receiver
        self.labels = labels  # device and worker (Celery node) labels of this child's statistics
        self.stager = ThreadPoolExecutor(1, thread_name_prefix="stage")  # claims and decodes the next batch
        # Extra threads decode one batch's images in parallel (Pillow releases the GIL); none: the
        # stage thread decodes them in turn.
        self.decoders = ThreadPoolExecutor(decode_threads, thread_name_prefix="decode") if decode_threads else None
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="write")
        # Every decode of this child (stage thread, decoders, thumbnails) holds its picture's pixels
        # here until only its crop is left, whatever the batch size (MAX_BATCH_PIXELS).
        self.pixels = PixelBudget(settings.max_batch_pixels)
        self._ack_if_written = store.redis.register_script(_ACK_IF_WRITTEN)
        self.loop_limit_s = settings.job_soft_time_limit_s / 4  # one loop's longest run (one Celery task)
        self.loop_budget_s = min(LOOP_BUDGET_S, self.loop_limit_s)  # how often it looks at other models' queues

    @classmethod
    def start(cls, settings: Settings, catalog: ModelCatalog, child_index: int,
              broker_connection=None, *, planned_device: str = "cpu", node: str = "",
              pool_size: int = 1, sender=None) -> "Runtime":
        """Pick the device, load and warm every served model, size batches and threads, start the heartbeat."""
        device = devices.choose_device(planned_device)
        cores = max(1, (os.cpu_count() or 1) // pool_size)
        # A CPU child's model needs its share of the cores; a GPU child's torch has little CPU work.
        threads = settings.torch_threads or (1 if device.type == "cuda" else cores)
        devices.configure(device, threads)
        models = {card.name: load_model(card, device) for card in catalog}
        for model in models.values():
            warm_up(model, settings.amp_dtype)
        sizers = {name: make_sizer(settings, model) for name, model in models.items()}
        client = redisconn.client(settings, socket_timeout=30, socket_connect_timeout=5,
                                  health_check_interval=30)
        name = child_name()
        info = {"node": node, "host": socket.gethostname(), "pid": os.getpid(), "child_index": child_index,
                "device": str(device), "device_name": devices.device_name(device), "threads": threads,
                "openmp_wait": openmp.waits(),
                "models": {m.card.name: m.card.version for m in models.values()},
                "max_batch": {n: s.size for n, s in sizers.items()}, "model_loads": load_count(),
                "started_at": time.time()}
        heartbeat = Heartbeat(client, name, info, interval_s=settings.heartbeat_interval_s,
                              ttl_s=settings.worker_ttl_s,
                              probe=lambda: _probe(device, sizers),
                              queues=tuple(inference_queue(card.name) for card in catalog))
        heartbeat.start()
        receiver = None if broker_connection is None else BatchReceiver.for_connection(
            broker_connection, owner=name, bulk_share=settings.bulk_share)
        log.info("child %s ready on %s with batch sizes %s", name, info["device"], info["max_batch"])
        store = announcing_store(client, settings, sender) if sender is not None else JobStore.from_settings(
            client, settings)  # the sender (the worker's Celery app) carries webhook events
        # A GPU child decodes on the CPU while the device computes: give it the child's cores. A CPU
        # child's cores run the model: the one stage thread overlaps decoding without crowding it out.
        decode_threads = min(4, cores) if device.type == "cuda" and cores > 1 else 0
        runtime = cls(settings, models, sizers, store, heartbeat, receiver,
                      {"device": str(device), "worker": node}, decode_threads, new_stream(device))
        runtime.warm_device_decoder()
        return runtime

    def warm_device_decoder(self) -> None:
        """Decode a small JPEG on the device the way batches will, so the first batch does not pay
        for nvJPEG's start-up (its handles and buffers)."""
        from worker.device_decode import warm

        for model in self.models.values():
            if self._decodes_on_device(model):
                warm(model.card, model.device, self.stage_stream)

    # -- the loop ---------------------------------------------------------------------------------

    def handle(self, first: Pending) -> list[str]:
        """Run ``first`` and, while the budget lasts, every batch that waits behind it in its queue."""
        loop = BatchLoop(self, first)
        try:
            loop.run()
        except SoftTimeLimitExceeded:
            # Raised wherever the task thread was; only a hung computation gets here in practice.
            log.error("a batch of %s passed the soft time limit", first.comp.model)
            loop.stop_timed_out()
        finally:
            loop.finish()
        return loop.outcomes

    def _put_back(self, queue: str, pendings: list[Pending]) -> None:
        """Put messages this child took but will not compute back on their queue; if Redis refuses
        (full, or away), a thread tries again until a minute before the visibility timeout would."""
        taken = [p for p in pendings if p.tag is not None]
        if not taken or self.receiver is None:
            return
        try:
            self.receiver.requeue(queue, taken)
        except redis.RedisError as exc:
            log.warning("could not put %d taken messages back on %s; trying again: %s", len(taken), queue, exc)
            requeue_later(self.receiver, queue, taken, max(1, self.settings.visibility_timeout_s - 60))

    # -- the stages -------------------------------------------------------------------------------

    def _stage(self, batch: list[Pending], requested: int) -> StagedBatch:
        """Claim a batch (one round trip), then decode and preprocess its images."""
        taken_at = time.time()
        span = tracing.batch_started([p.traceparent for p in batch], [p.enqueued_at for p in batch], taken_at,
                                     requested=requested)  # and each job's wait, linked to it
        claims, draining = self.store.claim_batch([p.comp for p in batch], owner=self.heartbeat.name,
                                                  drain_key=drain_key(self.labels["worker"]))
        retried = [p.comp.model for p, c in zip(batch, claims) if c.attempt > 1]
        if retried:
            self.store.count_redeliveries(retried)
        self._count_unstarted(batch, claims)
        outcomes: dict[int, str] = {}
        runnable: list[tuple[int, Pending, bytes, int]] = []
        for index, (pending, claim) in enumerate(zip(batch, claims)):
            if claim.skipped:  # its jobs were canceled or passed their deadline: no forward pass
                outcomes[index] = "skipped"  # acknowledged with the rest of its batch
                continue
            if claim.already_done:
                outcomes[index] = "already_done"  # a redelivered message whose result was written
                continue
            try:
                runnable.append((index, pending, self._check(pending, claim), claim.attempt))
            except ServiceError as exc:
                outcomes[index] = self._fail(pending, exc)
        groups = []
        for group in _groups(runnable):
            model = self.models[group[0][1].comp.model]
            items = [(data, pending.comp.options) for _, pending, data, _ in group]
            decoding = tracing.child(span, "decode and preprocess", attributes={"images": len(items)})
            staged, failures, inputs = self._stage_group(model, items)
            tracing.finish(decoding)
            for position, error in failures.items():
                outcomes[group[position][0]] = self._fail(group[position][1], error)
            for item in staged:
                item.retried = group[item.index][3] > 1
                item.index = group[item.index][0]  # from its place in the group to its place in the batch
            groups.append((model, staged, inputs))
        return StagedBatch(batch, requested, groups, outcomes, draining, time.time(), span=span)

    def _stage_group(self, model: LoadedModel, items: list) -> tuple[list[Staged], dict, DeviceInput | None]:
        """Decode and preprocess one model's images: on its device where configured, else on the CPU."""
        max_pixels = self.settings.max_image_pixels
        if self._decodes_on_device(model):
            try:
                return stage_on_device(items, model, max_pixels, self.decoders, self.pixels, self.stage_stream)
            except Exception as exc:  # a device decoder that breaks must cost speed, not answers
                exit_if_fatal(exc, self.exit_cleanup)  # unless it broke the device itself
                log.exception("decoding a batch of %d on %s failed; decoding it on the CPU", len(items), model.device)
        staged, failures = stage_all(items, model, max_pixels, self.decoders if len(items) > 1 else None,
                                     self.pixels)
        return staged, failures, None

    def _decodes_on_device(self, model: LoadedModel) -> bool:
        """DEVICE_DECODE: auto decodes on the device where it is a GPU; on forces it (tests, on the CPU)."""
        mode = self.settings.device_decode
        return mode == "on" or (mode == "auto" and model.device.type == "cuda")

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

    def _compute(self, batch: StagedBatch, groups: list[int] | None = None,
                 ) -> list[tuple[LoadedModel, list[Staged], list[PipelineOutput]]]:
        """Run the batch's groups (those at ``groups``, or all) through their models, in this thread."""
        done = []
        for model, staged, inputs in (batch.groups if groups is None else [batch.groups[g] for g in groups]):
            if not staged:
                continue
            computing = tracing.child(batch.span, "forward and gradcam", attributes={"images": len(staged)})
            try:
                parts = forward(model, staged, inputs, self.settings.amp_dtype, self.sizers.get(model.card.name))
                done += [(model, part, outputs) for part, outputs in parts]
                batch.clean = batch.clean and len(parts) == 1
            except SoftTimeLimitExceeded:
                raise
            except Exception as exc:  # a bug or a device error must fail the jobs, not the worker
                exit_if_fatal(exc, self.exit_cleanup)  # ... unless the device is gone for this process
                log.exception("batch of %d on %s crashed", len(staged), model.card.name)
                batch.clean = False
                error = InferenceFailed(f"Inference failed: {type(exc).__name__}: {exc}")
                for item in staged:
                    batch.outcomes[item.index] = self._fail(batch.pendings[item.index], error)
            finally:
                tracing.finish(computing)
        return done

    def exit_cleanup(self) -> None:
        """Before a child with a broken device exits: let the writes in progress finish (they need
        Redis, not the device), and leave the live set so the sweeper acts at its next round."""
        self.writer.shutdown(wait=True)
        self.heartbeat.stop()

    def _write(self, batch: StagedBatch, computed, only: set[int] | None = None) -> list[str]:
        """Write a computed batch's results, acknowledge its messages and record its statistics:
        one round trip, in that order. A message computed here is acknowledged only where its
        result is in Redis, checked in the same round trip: a pipeline runs every command even
        when one before it fails (a refused write: OOM, ACL, a failover's read-only replica).
        ``only``: the batch's messages (by index) this write settles; the rest are left as they are."""
        only = set(range(len(batch.pendings))) if only is None else only
        now = time.time()
        writing = tracing.child(batch.span, "write results")
        done, by_model, written = [], {}, []
        for model, staged, outputs in computed:
            for item, output in zip(staged, outputs):
                pending = batch.pendings[item.index]
                written.append(pending)
                output.result["timings_ms"]["queue"] = round(max(0.0, batch.staged_at - pending.enqueued_at) * 1000, 2)
                done.append((pending.comp, output.result, output.picture))
                timings = output.result["timings_ms"]
                by_model.setdefault(model.card.name, []).append(
                    (max(0.0, now - pending.enqueued_at), (timings["inference"] + timings["gradcam"]) / 1000))
                batch.outcomes[item.index] = "done"

        def acks_and_statistics(pipe) -> None:
            if self.receiver is not None:
                # Settled before this round trip (failed, or already done): acknowledged as they are.
                self.receiver.ack(pipe, [p for i, p in enumerate(batch.pendings)
                                         if i in only and not any(p is w for w in written)])
                self._ack_written(pipe, written)
            for name, samples in by_model.items():
                stats.record_batch(self.store.redis, {**self.labels, "model": name}, samples,
                                   len(batch.pendings), now, pipe=pipe)

        try:
            self.store.finish_many(done, also=acks_and_statistics)
        except redis.RedisError:
            # What was not written is not acknowledged: it goes back on the queue now (or, with Redis
            # away, after the visibility timeout) and is computed again; a result that did get
            # written makes that a no-op.
            log.exception("could not write the results of a batch of %d", len(batch.pendings))
            self._return_unwritten(written)
            return ["unwritten"] * len(only)
        finally:
            tracing.finish(writing)
        self.heartbeat.count("jobs_done", len(done))
        self.heartbeat.observe([inference for samples in by_model.values() for _, inference in samples])
        return [batch.outcomes.get(i, "failed") for i in sorted(only)]

    def _ack_written(self, pipe, pendings: list[Pending]) -> None:
        """Queue on ``pipe`` the acknowledgement of each message whose result exists by then."""
        pairs = [(p.tag, p.comp.result_key) for p in pendings if p.tag is not None]
        if pairs:
            self._ack_if_written(keys=[self.receiver.unacked, self.receiver.index, TAKEN_BY_KEY,
                                       *(key for _, key in pairs)],
                                 args=[tag for tag, _ in pairs], client=pipe)

    def _return_unwritten(self, pendings: list[Pending]) -> None:
        """After a failed write: put the messages computed here back on their queue, at once.

        Any whose result did get written (and so was acknowledged) comes back as a no-op: its
        claim finds the result. Reading which ones first could fail as the write did.
        """
        if pendings:
            self._put_back(inference_queue(pendings[0].comp.model), pendings)

    def _collect(self, writes, block: bool) -> list[str]:
        """Return the outcomes of finished writes (all of them when ``block``)."""
        outcomes = []
        while writes and (block or writes[0][0].done()):
            future, batch = writes.popleft()
            try:
                outcomes += future.result()
            except Exception:
                log.exception("writing a batch of %d failed", len(batch.pendings))
        return outcomes

    def _fail_all(self, batch: StagedBatch, error: ServiceError) -> None:
        for _, staged, _ in batch.groups:
            for item in staged:
                batch.outcomes[item.index] = self._fail(batch.pendings[item.index], error)
        if self.receiver is not None:
            self.receiver.ack_now(batch.pendings)

    def _count_unstarted(self, batch: list[Pending], claims: list) -> None:
        """Count the jobs the claim failed past their deadline and the computations it skipped (rare: no
        round trip otherwise), per model, as the heartbeat and /metrics show them."""
        per_model: dict[str, list[int]] = {}
        for pending, claim in zip(batch, claims):
            if claim.expired or claim.skipped:
                counts = per_model.setdefault(pending.comp.model, [0, 0])
                counts[0] += claim.expired
                counts[1] += int(claim.skipped)
        for model, (expired, skipped) in per_model.items():
            self.heartbeat.count("jobs_deadline_exceeded", expired)
            self.heartbeat.count("computations_skipped", skipped)
            try:
                stats.record_claim_outcomes(self.store.redis, {**self.labels, "model": model}, expired, skipped)
            except redis.RedisError:
                log.warning("could not count the unstarted work of %s", model, exc_info=True)

    def _fail(self, pending: Pending, error: ServiceError) -> str:
        """Fail a computation's jobs now (its message is acknowledged with the rest of its batch)."""
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
        self.stager.shutdown(wait=False, cancel_futures=True)
        if self.decoders is not None:
            self.decoders.shutdown(wait=False, cancel_futures=True)
        self.writer.shutdown(wait=True)
        if self.receiver is not None:
            self.receiver.close()


def _groups(runnable) -> list[list]:
    """One group per model; a computation retried after a crash runs alone, so it cannot take
    innocent neighbours down with it again."""
    groups: dict[str, list] = {}
    alone = []
    for entry in runnable:
        if entry[3] > 1:
            alone.append([entry])
        else:
            groups.setdefault(entry[1].comp.model, []).append(entry)
    return list(groups.values()) + alone


def _probe(device: torch.device, sizers: dict[str, BatchSizer]) -> dict:
    """The heartbeat's live fields. A device that broke since the last batch ends the child here."""
    try:
        return {"gpu_memory": devices.gpu_memory(device), "max_batch": {n: s.size for n, s in sizers.items()}}
    except Exception as exc:
        exit_if_fatal(exc)
        raise
