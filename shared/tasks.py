"""Celery task and queue names, and the Celery settings both tiers must agree on."""
from __future__ import annotations

import base64
import dataclasses
import json
import time
import uuid

from celery.utils.nodenames import anon_nodename
from celery.utils.saferepr import saferepr

from shared import sentinel
from shared.keys import Computation
from shared.settings import Settings

INFER_TASK = "imgsvc.infer"
INFERENCE_QUEUE_PREFIX = "inference."
WEBHOOK_TASK = "imgsvc.deliver_webhook"
WEBHOOK_QUEUE = "webhooks"  # consumed by the webhook worker (webhooks.celery_app), never by inference
FETCH_TASK = "imgsvc.fetch_image"
FETCH_QUEUE = "fetches"  # image_url downloads; the webhook worker consumes it too (outbound HTTP, SSRF-guarded)


# kombu's Redis transport keeps one list per priority step: the queue's name for step 0, the name,
# PRIORITY_SEP and the step for the others; consumers serve the lowest step first (BRPOP lists them in
# that order, and so does worker.broker's batch take). Two lanes of five steps each: inside a lane the
# step grows with the sender's backlog (docs/internals.md, "Lanes and fair share").
PRIORITY_SEP = "\x06\x16"  # kombu.transport.redis.Channel.sep
PRIORITY_STEPS = tuple(range(10))
LANES = {"interactive": 0, "bulk": 5}  # each lane's first step
LANE_STEPS = 5


def inference_queue(model_name: str) -> str:
    """Return the queue that carries inference tasks for one model."""
    return f"{INFERENCE_QUEUE_PREFIX}{model_name}"


def priority_lists(queue: str) -> list[str]:
    """The Redis lists that hold ``queue``'s waiting messages, the first served first."""
    return [queue if step == 0 else f"{queue}{PRIORITY_SEP}{step}" for step in PRIORITY_STEPS]


def lane_of(step: int) -> str:
    """The lane a priority step belongs to."""
    return "bulk" if step >= LANES["bulk"] else "interactive"


def step_for(lane: str, in_flight: int, weight: float = 1.0) -> int:
    """The priority step of a new computation in ``lane`` whose sender already has ``in_flight``
    computations waiting or running: the lane's first step below 10 per unit of weight, one step
    later per factor of ten (10-99 the second, 100-999 the third, ...), the lane's last at most."""
    share, level = in_flight / max(weight, 1e-9), 0
    while share >= 10 and level < LANE_STEPS - 1:
        share, level = share / 10, level + 1
    return LANES[lane] + level


def inference_args(comp: Computation, traceparent: str = "") -> list:
    """The inference task's arguments: the computation, when it was sent and the trace it belongs to."""
    message = {**comp.to_message(), "enqueued_at": time.time()}
    if traceparent:
        message["traceparent"] = traceparent
    return [message]


def from_light_sender(step: int) -> bool:
    """Whether a message at ``step`` came from a light sender: one with fewer than 10 computations
    waiting or running per unit of weight (its lane's first step, ``step_for``), to whom fair share
    promises about one batch of wait."""
    return step - LANES[lane_of(step)] == 0


def send_inference(celery, comp: Computation, traceparent: str = "", priority: int = 0) -> None:
    """Send the inference task for ``comp`` by name to its model's queue through Celery (the sweeper,
    the ``image_url`` fetcher, and the web tier with TASK_EVENTS on; otherwise the web's submit script
    pushes ``inference_message`` itself); ``traceparent``: the trace of the job that started it
    (shared.tracing), for the worker's spans; ``priority``: its step (``step_for``; 0, the first
    served, for work sent again by the sweeper)."""
    celery.send_task(INFER_TASK, args=inference_args(comp, traceparent), queue=inference_queue(comp.model),
                     priority=priority)


@dataclasses.dataclass(frozen=True)
class StepMessage:
    """A task message whose priority step is chosen where it is pushed (the submit script, from the
    sender's computations in flight, as ``step_for``): its text before and after the step's digits,
    the lane's first step and the sender's weight."""

    head: str
    tail: str
    lane_step: int
    weight: float = 1.0

    def text(self, step: int) -> str:
        return f"{self.head}{step}{self.tail}"


def inference_message(celery, comp: Computation, traceparent: str, lane: str, weight: float = 1.0) -> StepMessage:
    """The inference message for ``comp`` in ``lane``, for the submit script to push at its step."""
    head, tail = task_message_parts(celery, INFER_TASK, inference_args(comp, traceparent), inference_queue(comp.model))
    return StepMessage(head, tail, LANES[lane], weight)


_NO_WORKFLOW = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def task_message(celery, task: str, args: list, queue: str, priority: int = 0) -> str:
    """The message kombu's Redis transport stores for ``celery.send_task(task, args=args, queue=queue,
    priority=priority)``: Celery's task message (protocol 2: headers, properties, the JSON body
    ``[args, kwargs, embed]``) as kombu serialises it (the body in base64, a delivery tag, the
    anonymous exchange routed by the queue's name). ``args`` must be JSON-safe; tests/test_broker.py
    checks this against what Celery itself pushes."""
    head, tail = task_message_parts(celery, task, args, queue)
    return f"{head}{priority}{tail}"


def task_message_parts(celery, task: str, args: list, queue: str) -> tuple[str, str]:
    """``task_message``'s text before and after its priority step's digits (the last property but two)."""
    task_id = str(uuid.uuid4())
    argsrepr = repr(args)
    if len(argsrepr) > celery.amqp.argsrepr_maxsize:  # Celery shortens long ones
        argsrepr = saferepr(args, celery.amqp.argsrepr_maxsize, maxlevels=celery.conf.task_repr_maxlevels)
    body = base64.b64encode(json.dumps([args, {}, _NO_WORKFLOW]).encode()).decode()
    # json.dumps of Celery's headers and properties dicts, written out (a third of the time): the fields,
    # their order and their values as kombu stores them; properties is the message's last field, and
    # priority follows delivery_info in it
    head = (f'{{"body": "{body}", "content-encoding": "utf-8", "content-type": "application/json", '
            f'"headers": {{"lang": "py", "task": {json.dumps(task)}, "id": "{task_id}", "shadow": null, "eta": null, '
            f'"expires": null, "group": null, "group_index": null, "retries": 0, "timelimit": [null, null], '
            f'"root_id": "{task_id}", "parent_id": null, "argsrepr": {json.dumps(argsrepr)}, "kwargsrepr": "{{}}", '
            f'"origin": {json.dumps(anon_nodename())}, "ignore_result": null, "replaced_task_nesting": 0, '
            f'"stamped_headers": null, "stamps": {{}}}}, "properties": {{"correlation_id": "{task_id}", '
            f'"reply_to": {json.dumps(celery.thread_oid)}, "delivery_mode": 2, '
            f'"delivery_info": {{"exchange": "", "routing_key": {json.dumps(queue)}}}, "priority": ')
    tail = f', "body_encoding": "base64", "delivery_tag": "{uuid.uuid4()}"}}}}'
    return head, tail


def send_webhook(celery, event_id: str) -> None:
    """Send one delivery attempt of a webhook event to the webhooks queue."""
    message = {"event_id": event_id, "enqueued_at": time.time()}  # the admin queue view reads enqueued_at
    celery.send_task(WEBHOOK_TASK, args=[message], queue=WEBHOOK_QUEUE)


def send_fetch(celery, job_id: str) -> None:
    """Send the download of a job's ``image_url`` to the fetches queue."""
    celery.send_task(FETCH_TASK, args=[{"job_id": job_id, "enqueued_at": time.time()}], queue=FETCH_QUEUE)


def celery_config(settings: Settings) -> dict:
    """Return the Celery configuration shared by the sender (web) and the consumer (worker)."""
    broker_url, sentinel_options = sentinel.broker(settings)  # REDIS_URL, or kombu's sentinel:// transport
    # Every step its own list, served lowest first (kombu's default has four steps: 0, 3, 6, 9).
    transport = {"visibility_timeout": settings.visibility_timeout_s, "priority_steps": list(PRIORITY_STEPS),
                 **sentinel_options}
    return {
        "broker_url": broker_url,
        "broker_transport_options": transport,
        # Celery reads the visibility timeout in three places (celery/celery#7651); set all of them.
        "result_backend_transport_options": transport,
        "visibility_timeout": settings.visibility_timeout_s,
        "broker_connection_retry_on_startup": True,
        "task_ignore_result": True,  # results live under our own cache keys
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_serializer": "json",
        "accept_content": ["json"],
        "worker_proc_alive_timeout": settings.worker_proc_alive_timeout_s,
        "task_soft_time_limit": settings.job_soft_time_limit_s,
        "task_time_limit": max(settings.job_time_limit_s, settings.job_soft_time_limit_s + 1),
        "worker_hijack_root_logger": False,
        # Task events for Flower (TASK_EVENTS): off by default, as in Celery, for they cost a Redis
        # PUBLISH per task (0.19 of 0.50 CPU ms of a send). Flower switches workers' events on itself;
        # "sent" events come only from senders that have them on.
        "worker_send_task_events": settings.task_events,
        "task_send_sent_event": settings.task_events,
    }
