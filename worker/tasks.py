"""Celery tasks: thin wrappers that hand a message to the child's resident runtime."""
from __future__ import annotations

from shared.keys import Computation
from shared.tasks import INFER_TASK
from worker import celery_app


@celery_app.app.task(name=INFER_TASK)
def infer(message: dict) -> str:
    """Compute one image's predictions (and GradCAM) and settle every job attached to it."""
    if celery_app.runtime is None:
        raise RuntimeError("worker child has no runtime; worker_process_init did not run")
    return celery_app.runtime.process(Computation.from_message(message), float(message["enqueued_at"]))
