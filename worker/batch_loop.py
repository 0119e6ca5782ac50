"""One Celery task's run of batches, pipelined three stages deep (see worker.runtime).

The task thread computes batch k while the stage thread claims and decodes batch k+1 and the
writer thread writes batch k-1. Whatever the loop has taken and not finished goes back to its
queue at once when Redis refuses a step (not after kombu's visibility timeout): a failed take of
the next batch ends the loop after the batch in hand; a failed claim of the next batch puts it
back. A computation retried after a crash runs last and alone, once everything else is written.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING

import redis

from shared import tracing
from shared.errors import JobTimeout
from shared.keys import drain_key
from shared.tasks import from_light_sender, inference_queue, priority_lists
from worker.broker import Pending
from worker.models import LoadedModel
from worker.pipeline import Staged
from worker.streams import DeviceInput

if TYPE_CHECKING:
    from worker.runtime import Runtime

log = logging.getLogger(__name__)


@dataclasses.dataclass
class StagedBatch:
    """A batch taken and claimed, its images decoded: ready for the device."""

    pendings: list[Pending]
    requested: int  # the batch size asked for (fewer taken: the queue ran dry)
    # One forward pass each: the model, its staged images (Staged.index is the batch index) and their
    # input batch when it was made on the device.
    groups: list[tuple[LoadedModel, list[Staged], DeviceInput | None]]
    outcomes: dict[int, str]  # by batch index: settled before computing (already done, failed), or after
    draining: bool = False
    staged_at: float = 0.0
    span: object = None  # its trace span (shared.tracing), None when tracing is off
    clean: bool = True  # every group computed at its size (no error, no split): the sizer may learn from it

    def retried_groups(self) -> list[int]:
        """Positions in ``groups`` of computations retried after a crash (each is a group alone)."""
        return [g for g, (_, staged, _) in enumerate(self.groups) if staged and staged[0].retried]


class BatchLoop:
    """One Celery task's run of batches: each computed in this thread while the next is staged and
    the last is written (see the module docstring)."""

    def __init__(self, runtime: "Runtime", first: Pending):
        self.runtime, self.first = runtime, first
        self.queue = inference_queue(first.comp.model)
        self.sizer = runtime.sizers.get(first.comp.model)
        # A retried computation runs alone (it may be what crashed a child), and so does a drained node.
        self.alone = runtime.receiver is None or self.sizer is None or runtime.store.redis.exists(
            first.comp.attempts_key, drain_key(runtime.labels["worker"]))
        started = time.monotonic()
        self.deadline = started + runtime.loop_budget_s  # the next look at other models' queues
        self.limit = started + runtime.loop_limit_s
        self.writes: collections.deque[tuple[Future, StagedBatch]] = collections.deque()
        self.current: StagedBatch | None = None
        self.following: Future | None = None
        self.next_taken: list[Pending] = []  # the messages of ``following``, until it is staged
        self.outcomes: list[str] = []

    def run(self) -> None:
        try:
            self._run()
        except redis.RedisError:
            # Claiming the first batch failed: what this child took but never claimed goes back on
            # the queue (Celery rejects the first message itself).
            self.runtime._put_back(self.queue, self.next_taken)
            raise

    def _run(self) -> None:
        requested = 1 if self.alone else self.sizer.size
        batch = [self.first] if self.alone else [self.first, *self._take_first(requested - 1)]
        self._note_light_senders(batch)
        self.next_taken = batch[1:]  # Celery puts the first back itself if the claim fails
        self.current = self.runtime._stage(batch, requested)
        self.next_taken = []
        cycle_start = time.perf_counter()
        while self.current is not None:
            self.following = self._stage_next()
            self._compute_and_write(self.current)
            now = time.perf_counter()
            if self.sizer is not None and self.current.clean:  # a batch that failed fast says nothing
                self.sizer.record(self.current.requested, len(self.current.pendings), now - cycle_start)
            cycle_start = now
            self.outcomes += self.runtime._collect(self.writes, block=False)
            self.current = self._staged_following()
            self.next_taken = []

    def _stage_next(self) -> Future | None:
        """Take the next batch and stage it in the stage thread, unless the loop should end here
        (or the current batch holds a computation retried after a crash: nothing else is taken
        while it may kill this child)."""
        if self.alone or self.current.draining or self.current.retried_groups() or self._budget_spent():
            return None
        requested = self.sizer.size
        try:
            taken = self.next_taken = self.runtime.receiver.take(self.queue, requested)
        except redis.RedisError as exc:  # the batch in hand is still computed and written
            log.warning("could not take the next batch of %s; finishing the one in hand: %s", self.queue, exc)
            return None
        self._note_light_senders(taken)
        return self.runtime.stager.submit(self.runtime._stage, taken, requested) if taken else None

    def _note_light_senders(self, taken: list[Pending]) -> None:
        """Tell the sizer when a batch holds a light sender's job: it tries no other size while they
        are about (worker.batching)."""
        if self.sizer is not None and any(p.step is not None and from_light_sender(p.step) for p in taken):
            self.sizer.saw_light_job()

    def _budget_spent(self) -> bool:
        """Whether the loop should end here: its time limit passed, or at a look (every
        LOOP_BUDGET_S) another model this child serves has work waiting."""
        now = time.monotonic()
        if now < self.deadline:
            return False
        if now >= self.limit or self._others_waiting():
            return True
        self.deadline = now + self.runtime.loop_budget_s
        return False

    def _others_waiting(self) -> bool:
        """Whether another model this child serves has messages waiting (one round trip; none when the
        child serves one model). A Redis error counts as yes: the loop ends and Celery takes over."""
        lists = [name for model in self.runtime.models if inference_queue(model) != self.queue
                 for name in priority_lists(inference_queue(model))]
        if not lists:
            return False
        try:
            pipe = self.runtime.receiver.client.pipeline(transaction=False)
            for name in lists:
                pipe.llen(name)
            return any(pipe.execute())
        except redis.RedisError:
            return True

    def _take_first(self, limit: int) -> list[Pending]:
        """Fill the first batch: wait up to MAX_WAIT_MS for more only when the queue already had some."""
        taken = self.runtime.receiver.take(self.queue, limit)
        deadline = time.monotonic() + self.runtime.settings.max_wait_ms / 1000
        while taken and len(taken) < limit and time.monotonic() < deadline:
            time.sleep(0.001)
            try:
                taken += self.runtime.receiver.take(self.queue, limit - len(taken))
            except redis.RedisError as exc:  # what was taken already goes into this batch
                log.warning("could not take more for a batch of %s; going on with %d: %s", self.queue, len(taken), exc)
                break
        return taken

    def _staged_following(self) -> StagedBatch | None:
        """The next batch, staged; None when there is none or staging it failed (its messages go
        back on the queue now, not after the visibility timeout)."""
        if self.following is None:
            return None
        try:
            return self.following.result()
        except redis.RedisError as exc:
            log.warning("could not claim the next batch of %s; putting it back: %s", self.queue, exc)
            self.runtime._put_back(self.queue, self.next_taken)
            return None

    def _compute_and_write(self, batch: StagedBatch) -> None:
        """Compute and write a batch. Computations retried after a crash come last, each alone, and
        only once everything else this child holds is written: if one kills the child again, it
        takes nothing else down with it."""
        self.runtime.heartbeat.batch_started(len(batch.pendings))
        try:
            self._compute_in_turn(batch)
        finally:
            tracing.finish(batch.span)  # its write spans may end later, in the writer thread

    def _compute_in_turn(self, batch: StagedBatch) -> None:
        retried = batch.retried_groups()
        if not retried:
            outputs = self.runtime._compute(batch)
            self.writes.append((self.runtime.writer.submit(self.runtime._write, batch, outputs), batch))
            return
        held = {item.index for g in retried for item in batch.groups[g][1]}
        fresh = [g for g in range(len(batch.groups)) if g not in retried]
        self._write_now(batch, self.runtime._compute(batch, fresh), set(range(len(batch.pendings))) - held)
        for g in retried:
            self._write_now(batch, self.runtime._compute(batch, [g]), {item.index for item in batch.groups[g][1]})

    def _write_now(self, batch: StagedBatch, outputs, only: set[int]) -> None:
        """Write (part of) a batch and wait until it and every write before it are done."""
        self.writes.append((self.runtime.writer.submit(self.runtime._write, batch, outputs, only), batch))
        self.outcomes += self.runtime._collect(self.writes, block=True)

    def stop_timed_out(self) -> None:
        """After the soft time limit: put the staged batch back, fail the one being computed (or, when
        the limit passed while the first batch was still being staged, its first message, which Celery
        acknowledges next, and put back what was taken with it)."""
        self._give_back()
        limit = self.runtime.settings.job_soft_time_limit_s
        error = JobTimeout(f"The computation took longer than {limit} s.")
        if self.current is None:
            self.runtime._fail(self.first, error)
            self.runtime._put_back(self.queue, self.next_taken)
        elif not any(self.current is staged for _, staged in self.writes):
            self.runtime._fail_all(self.current, error)

    def _give_back(self) -> None:
        """Put a staged but never computed batch back on its queue."""
        if self.following is None:
            return
        try:
            staged = self.following.result(timeout=30)
            self.runtime.receiver.requeue(self.queue, [p for p in staged.pendings if p.tag is not None])
        except Exception:  # the messages stay unacked: the visibility timeout brings them back
            log.exception("could not put a staged batch back on %s", self.queue)

    def finish(self) -> None:
        self.outcomes += self.runtime._collect(self.writes, block=True)
        self.runtime.heartbeat.batch_started(0)
