"""Batched take and ack of inference messages, in kombu's own Redis layout (a real redis-server)."""
import base64
import json
import time

import pytest
import redis
from celery import Celery

from shared.keys import Computation, OutputOptions
from shared.settings import Settings
from shared.tasks import (INFER_TASK, celery_config, inference_args, inference_queue, priority_lists, send_inference,
                          task_message)
from tools.stack import start_redis, stop
from worker.broker import BatchReceiver, restore_taken_by

QUEUE = inference_queue("broker-test")


@pytest.fixture
def broker(tmp_path):
    proc, url = start_redis(tmp_path)
    app = Celery("broker-test", set_as_current=False)
    app.conf.update(celery_config(Settings(redis_url=url, visibility_timeout_s=1)))
    connection = app.connection_for_read()
    receiver = BatchReceiver.for_connection(connection)
    yield app, receiver, redis.Redis.from_url(url)
    receiver.close()
    connection.release()
    stop(proc)


def _comp(i: int) -> Computation:
    return Computation("broker-test", "1", f"{i:064x}", OutputOptions(top_k=1 + i % 5))


def _send(app, count: int, broker=None) -> list[Computation]:
    """Send through Celery, or (``broker``: a client of its server) push the message the submit script
    pushes, ``task_message``'s text, straight onto the list."""
    comps = [_comp(i) for i in range(count)]
    for comp in comps:
        if broker is None:
            send_inference(app, comp)
        else:
            broker.lpush(QUEUE, task_message(app, INFER_TASK, inference_args(comp), QUEUE))
    return comps


def _comparable(raw: bytes) -> dict:
    """A stored message with its random ids blanked and its body decoded."""
    message = json.loads(raw)
    for name in ("id", "root_id"):
        message["headers"][name] = "-"
    message["properties"]["correlation_id"] = message["properties"]["delivery_tag"] = "-"
    message["body"] = json.loads(base64.b64decode(message["body"]))
    return message


@pytest.mark.parametrize("priority, extra", [(0, {}), (7, {"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"}),
                                             (3, {"note": "x" * 2000})])  # a long one: argsrepr shortened
def test_a_message_pushed_directly_is_the_one_celery_pushes(broker, priority, extra):
    """The message the submit script pushes stores what Celery's send_task stores, in the same list."""
    app, _receiver, client = broker
    args = [{**_comp(1).to_message(), "enqueued_at": time.time(), **extra}]
    app.send_task(INFER_TASK, args=args, queue=QUEUE, priority=priority)
    target = priority_lists(QUEUE)[priority]
    [by_celery] = client.lrange(target, 0, -1)
    client.lpush(target, task_message(app, INFER_TASK, args, QUEUE, priority))
    direct, _ = client.lrange(target, 0, -1)
    assert _comparable(direct) == _comparable(by_celery)
    for part in (lambda m: m, lambda m: m["headers"], lambda m: m["properties"]):  # the same fields, in order
        assert list(part(json.loads(direct))) == list(part(json.loads(by_celery)))
    for raw in (direct, by_celery):  # both written as json.dumps writes them: byte for byte alike but the ids
        assert json.dumps(json.loads(raw)) == raw.decode()
    assert json.loads(direct)["properties"]["delivery_tag"] != json.loads(by_celery)["properties"]["delivery_tag"]


def test_messages_pushed_directly_are_taken_acknowledged_and_restored_as_celerys(broker):
    app, receiver, client = broker
    comps = _send(app, 3, broker=client)
    assert client.llen(QUEUE) == 3
    taken = receiver.take(QUEUE, 2)
    assert [p.comp for p in taken] == comps[:2]
    pipe = client.pipeline(transaction=False)
    receiver.ack(pipe, taken[:1])
    pipe.execute()
    time.sleep(1.2)  # the other one was never acknowledged: kombu restores it after the visibility timeout
    with app.connection_for_read() as connection:
        connection.default_channel.qos.restore_visible(num=100)
    assert sorted(p.comp.sha256 for p in receiver.take(QUEUE, 5)) == sorted(c.sha256 for c in comps[1:])


def test_a_batch_is_taken_in_order_and_acknowledged_in_one_pipeline(broker):
    app, receiver, client = broker
    comps = _send(app, 5)
    taken = receiver.take(QUEUE, 3)
    assert [p.comp for p in taken] == comps[:3]  # first sent, first taken
    assert client.llen(QUEUE) == 2 and client.hlen("unacked") == 3 and client.zcard("unacked_index") == 3
    pipe = client.pipeline(transaction=False)
    receiver.ack(pipe, taken)
    pipe.execute()
    assert client.hlen("unacked") == 0 and client.zcard("unacked_index") == 0
    assert [p.comp for p in receiver.take(QUEUE, 10)] == comps[3:]
    assert receiver.take(QUEUE, 10) == []


def test_each_taken_message_knows_its_priority_step(broker):
    """The step says whether a message came from a light sender (the batch sizer asks)."""
    app, receiver, client = broker
    for i, step in enumerate((0, 5, 7)):
        app.send_task(INFER_TASK, args=inference_args(_comp(i)), queue=QUEUE, priority=step)
    assert [p.step for p in receiver.take(QUEUE, 3)] == [0, 5, 7]


def test_requeued_messages_are_the_next_taken(broker):
    app, receiver, client = broker
    comps = _send(app, 4)
    first = receiver.take(QUEUE, 2)
    receiver.requeue(QUEUE, first)
    assert client.hlen("unacked") == 0
    assert [p.comp for p in receiver.take(QUEUE, 4)] == comps[:2] + comps[2:]


def test_other_tasks_go_back_and_malformed_messages_are_dropped(broker):
    app, receiver, client = broker
    app.send_task("someone.else", args=[1], queue=QUEUE)
    client.lpush(QUEUE, b"not json at all")
    comps = _send(app, 1)
    taken = receiver.take(QUEUE, 5)
    assert [p.comp for p in taken] == comps
    assert client.llen(QUEUE) == 1 and b"someone.else" in client.lindex(QUEUE, 0)  # put back, untouched
    assert client.hlen("unacked") == 1  # only the one taken; the stray is not left unacked


def test_kombu_restores_what_a_dead_child_took_after_the_visibility_timeout(broker):
    app, receiver, client = broker
    comps = _send(app, 3)
    assert len(receiver.take(QUEUE, 3)) == 3  # taken, never acknowledged: the child "died"
    time.sleep(1.2)  # past the 1 s visibility timeout of this broker
    with app.connection_for_read() as connection:
        connection.default_channel.qos.restore_visible(num=100)  # what every consumer runs periodically
    again = receiver.take(QUEUE, 3)
    assert sorted(p.comp.sha256 for p in again) == sorted(c.sha256 for c in comps)


def test_what_a_dead_child_took_goes_back_at_once_and_a_live_childs_stays(broker):
    app, receiver, client = broker
    comps = _send(app, 4)
    with app.connection_for_read() as connection:
        live = BatchReceiver.for_connection(connection, owner="live-host:1")
        dead = BatchReceiver.for_connection(connection, owner="dead-host:2")
        kept = live.take(QUEUE, 2)
        lost = dead.take(QUEUE, 2)
        assert client.hgetall("taken_by") == {p.tag.encode(): b"live-host:1" for p in kept} | {
            p.tag.encode(): b"dead-host:2" for p in lost}
        assert restore_taken_by(client, {"dead-host:2"}) == 2  # the sweeper saw its heartbeat stop
        again = receiver.take(QUEUE, 4)
        assert len(again) == 2 and {p.comp for p in again} == set(comps[2:])  # back, and taken next
        assert set(client.hgetall("taken_by").values()) == {b"live-host:1", b""}
        pipe = client.pipeline(transaction=False)
        live.ack(pipe, kept)
        pipe.execute()
        assert b"live-host:1" not in client.hgetall("taken_by").values()
        live.close()
        dead.close()
