"""Celery tasks: thin wrappers that hand a message to the child's resident runtime."""
from __future__ import annotations

import logging

import redis
from billiard.exceptions import TimeLimitExceeded
from celery.exceptions import Reject

from shared.errors import JobTimeout
from shared.keys import Computation
from shared.tasks import INFER_TASK
from worker import celery_app
from worker.broker import Pending

log = logging.getLogger(__name__)


class InferTask(celery_app.app.Task):
    """Fails the computation with code ``timeout`` when Celery kills it at the hard time limit.

    Celery calls ``on_failure`` for a hard time limit in the main process, after the child is gone.
    """

    def on_failure(self, exc, task_id, args, kwargs, einfo):
        if isinstance(exc, TimeLimitExceeded) and args:
            comp = Computation.from_message(args[0])
            error = JobTimeout(f"The computation passed the hard time limit of {exc.args[0]} s; "
                               "its worker process was replaced.")
            log.error("hard time limit for %s", comp.suffix)
            celery_app.main_store().fail(comp, error.to_dict())


def _priority_step(delivery_info: dict | None) -> int | None:
    """The priority step Celery delivered the message at (None when it does not say)."""
    step = (delivery_info or {}).get("priority")
    return step if isinstance(step, int) else None


@celery_app.app.task(name=INFER_TASK, base=InferTask)
def infer(message: dict) -> list[str]:
    """Compute one image's predictions (and GradCAM), batched with any that wait behind it.

    A message whose result could not be written (Redis failed while claiming or writing) is
    rejected back onto its queue rather than acknowledged: it is computed again, not lost.
    """
    if celery_app.runtime is None:
        raise RuntimeError("worker child has no runtime; worker_process_init did not run")
    first = Pending.from_message(message, step=_priority_step(infer.request.delivery_info))
    try:
        outcomes = celery_app.runtime.handle(first)
    except redis.RedisError as exc:
        log.error("Redis failed while computing %s; putting its message back: %s", first.comp.suffix, exc)
        raise Reject(exc, requeue=True) from exc
    if outcomes and outcomes[0] == "unwritten":
        raise Reject(f"the result of {first.comp.suffix} was not written", requeue=True)
    return outcomes
