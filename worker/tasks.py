"""Celery tasks: thin wrappers that hand a message to the child's resident runtime."""
from __future__ import annotations

from shared.keys import Computation
from shared.tasks import INFER_TASK
from worker import celery_app
from worker.batching import Pending


@celery_app.app.task(name=INFER_TASK)
def infer(message: dict) -> list[str]:
    """Compute one image's predictions (and GradCAM), batched with any that wait behind it."""
    if celery_app.runtime is None:
        raise RuntimeError("worker child has no runtime; worker_process_init did not run")
    first = Pending(Computation.from_message(message), float(message["enqueued_at"]))
    return celery_app.runtime.handle(first)
