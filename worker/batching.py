"""Dynamic micro-batching: take waiting inference messages straight from the broker queue.

Celery hands a child one message (prefetch 1). Before computing it, the child takes up to
``max_batch - 1`` more messages of the same queue with ``basic_get`` on its own broker channel, so
they sit in the transport's unacked set (redelivered after the visibility timeout if the child
dies) and are acknowledged one by one only after their own result is written. A lone job never
waits: the child waits up to ``max_wait_ms`` for more only when the queue already had more.
"""
from __future__ import annotations

import dataclasses
import logging
import time

import torch

from shared.keys import Computation
from shared.tasks import INFER_TASK
from worker.inference import predict
from worker.models import LoadedModel

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Pending:
    """One computation to run, with its broker message when this child took it itself."""

    comp: Computation
    enqueued_at: float
    message: object | None = None  # kombu Message to ack after the result is written


class QueueDrainer:
    """Takes further inference messages from a queue on the child's own broker connection."""

    def __init__(self, connection):
        self.connection = connection
        self._channel = None

    @property
    def channel(self):
        if self._channel is None:
            self._channel = self.connection.default_channel
        return self._channel

    def take(self, queue: str, limit: int, max_wait_s: float) -> list[Pending]:
        """Return up to ``limit`` waiting computations; wait up to ``max_wait_s`` only when busy."""
        taken: list[Pending] = []
        deadline = time.monotonic() + max_wait_s
        while len(taken) < limit:
            try:
                message = self.channel.basic_get(queue, no_ack=False)
            except Exception:  # broker gone (kombu wraps redis errors in several types): run what we have
                log.warning("could not take more messages from %s; running a batch of %d", queue,
                            len(taken) + 1, exc_info=True)
                self._reset()
                break
            if message is None:
                if not taken or time.monotonic() >= deadline:
                    break  # idle queue: run what we have now
                time.sleep(0.001)
                continue
            pending = self._parse(message)
            if pending is not None:
                taken.append(pending)
        return taken

    @staticmethod
    def _parse(message) -> Pending | None:
        if message.headers.get("task") != INFER_TASK:
            log.warning("requeueing unexpected task %s from an inference queue", message.headers.get("task"))
            message.reject(requeue=True)
            return None
        try:
            args = message.decode()[0]
            payload = args[0]
            return Pending(Computation.from_message(payload), float(payload["enqueued_at"]), message)
        except (KeyError, IndexError, TypeError, ValueError):
            log.exception("dropping a malformed inference message")
            message.ack()
            return None

    def _reset(self) -> None:
        """Drop the channel so the next take reconnects."""
        self._channel = None
        try:
            self.connection.close()
        except Exception:  # closing a dead connection may fail too; a fresh one is made next time
            log.debug("closing the broker connection failed", exc_info=True)

    def close(self) -> None:
        self.connection.release()


def best_batch_size(model: LoadedModel, amp_dtype: str, candidates: tuple[int, ...],
                    seconds_each: float = 0.3) -> int:
    """Measure throughput (forward + GradCAM) per batch size; return the smallest within 5% of the best."""
    size = model.card.input_size
    rates = {}
    for batch in candidates:
        tensors = [torch.zeros(3, size, size)] * batch
        predict(model, tensors, gradcam=True, amp_dtype=amp_dtype)  # shapes warm up (cudnn autotune)
        runs, start = 0, time.perf_counter()
        while runs < 2 or time.perf_counter() - start < seconds_each:
            predict(model, tensors, gradcam=True, amp_dtype=amp_dtype)
            runs += 1
        rates[batch] = batch * runs / (time.perf_counter() - start)
    best = max(rates.values())
    chosen = min(b for b, rate in rates.items() if rate >= 0.95 * best)
    log.info("%s on %s: images/s by batch size %s -> max_batch %d", model.card.name, model.device,
             {b: round(r, 1) for b, r in rates.items()}, chosen)
    return chosen
