"""Take and acknowledge inference messages a batch at a time, in kombu's own Redis layout.

kombu's ``basic_get`` costs two round trips per message (RPOP, then ZADD + HSET into the unacked
set), and each ack one more. A batch here costs one round trip to take (a script that pops up to
``limit`` messages and records each in ``unacked`` / ``unacked_index`` exactly as kombu does, in
one atomic step, so a crash cannot lose a popped message) and its acks ride in the pipeline that
writes the batch's results. Messages stay kombu's: a child that dies leaves them in the unacked
set, and kombu's own visibility-timeout restore puts them back on the queue.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import logging
import threading
import time

import redis

from shared.keys import TAKEN_BY_KEY, TAKES_KEY, Computation
from shared.tasks import INFER_TASK, LANE_STEPS, PRIORITY_SEP, PRIORITY_STEPS, priority_lists

log = logging.getLogger(__name__)

# KEYS: unacked hash, unacked index, taken-by hash, the takes counter hash, then the queue's lists in
# kombu's priority order (the interactive lane's ARGV[6] lists, then the bulk lane's). ARGV: how many
# to take, now, the taking child, the queue's name, BULK_SHARE, the interactive lane's list count.
# Lists are emptied lowest step first, except on every BULK_SHARE-th take of the queue, which first
# takes up to half the batch from the bulk lane, then interactive work, then bulk again to fill it:
# bulk work keeps that share however much interactive work waits, and an interactive job waiting is
# still in the very next batch (unless interactive work alone fills the other half).
# Each message is kept verbatim: the unacked entry is the JSON array [message, exchange, routing key].
# The taken-by entry names the child that took it, so that the sweeper puts it back at once if that
# child dies (kombu's own restore would wait for the visibility timeout).
_TAKE = """
local taken, limit, now, owner = {}, tonumber(ARGV[1]), ARGV[2], ARGV[3]
local share, split = tonumber(ARGV[5]), 4 + tonumber(ARGV[6])
local function drain(first, last, cap)
  for i = first, last do
    while #taken < cap do
      local raw = redis.call('RPOP', KEYS[i])
      if not raw then break end
      local ok, message = pcall(cjson.decode, raw)
      local properties = ok and type(message) == 'table' and message['properties']
      local info = type(properties) == 'table' and properties['delivery_info']
      if type(info) == 'table' and type(properties['delivery_tag']) == 'string' then
        local tag = properties['delivery_tag']
        redis.call('ZADD', KEYS[2], now, tag)
        redis.call('HSET', KEYS[1], tag, '[' .. raw .. ',' .. cjson.encode(info['exchange']) .. ','
                   .. cjson.encode(info['routing_key']) .. ']')
        redis.call('HSET', KEYS[3], tag, owner)
      end  -- else unreadable: returned, never recorded, so the caller drops it for good
      table.insert(taken, raw)
    end
  end
end
if share > 0 and redis.call('HINCRBY', KEYS[4], ARGV[4], 1) % share == 0 then
  drain(split + 1, #KEYS, math.ceil(limit / 2))
end
drain(5, #KEYS, limit)
return taken
"""

# Put messages back at the head of their priority list (the next to be taken, in their order:
# consumers take from the right, so the first goes in last) and forget them as unacked.
# KEYS: unacked hash, unacked index, taken-by hash, the queue's lists by step. ARGV: (tag, message,
# step) triples.
_REQUEUE = """
for i = #ARGV - 2, 1, -3 do
  redis.call('RPUSH', KEYS[4 + tonumber(ARGV[i + 2])], ARGV[i + 1])
  redis.call('HDEL', KEYS[1], ARGV[i])
  redis.call('ZREM', KEYS[2], ARGV[i])
  redis.call('HDEL', KEYS[3], ARGV[i])
end
return #ARGV / 3
"""


def message_step(message: dict) -> int:
    """The priority step a kombu message was sent with (kombu's own reading: 0 to 9, else 0)."""
    try:
        return max(PRIORITY_STEPS[0], min(int(message["properties"]["priority"]), PRIORITY_STEPS[-1]))
    except (KeyError, TypeError, ValueError):
        return 0


@dataclasses.dataclass
class Pending:
    """One computation to run, with its broker delivery tag when this child took it itself."""

    comp: Computation
    enqueued_at: float
    tag: str | None = None  # acknowledged by this child; None: Celery delivered it and acks it
    raw: bytes | None = None  # the message as taken, to put back if it is never computed
    traceparent: str = ""  # the trace of the job that sent it (shared.tracing), if any
    step: int | None = None  # its priority step when this child took it itself (None: unknown)

    @classmethod
    def from_message(cls, payload: dict, tag: str | None = None, raw: bytes | None = None,
                     step: int | None = None) -> "Pending":
        """The computation an inference message names, as a Celery task's argument or taken raw."""
        return cls(Computation.from_message(payload), float(payload["enqueued_at"]), tag, raw,
                   payload.get("traceparent", ""), step)


class BatchReceiver:
    """Takes up to N inference messages of a queue in one round trip; acknowledges them in a pipeline."""

    def __init__(self, channel, owner: str = "", bulk_share: int = 0):
        self.bulk_share = bulk_share  # every bulk_share-th take starts with the bulk lane; 0: never
        self.client = channel._create_client()  # kombu's own connection pool: same server, same options
        self.owner = owner  # this child's heartbeat name, recorded against every message it takes
        self.unacked, self.index = channel.unacked_key, channel.unacked_index_key
        self.queues = {}
        self._take = self.client.register_script(_TAKE)
        self._requeue = self.client.register_script(_REQUEUE)

    @classmethod
    def for_connection(cls, connection, owner: str = "", bulk_share: int = 0) -> "BatchReceiver | None":
        """A receiver on the broker connection, or None where its transport is not kombu's Redis."""
        channel = connection.default_channel
        if not hasattr(channel, "unacked_index_key") or getattr(channel, "global_keyprefix", ""):
            log.warning("broker transport %s is not plain Redis: batching takes no extra messages",
                        type(channel).__name__)
            return None
        if getattr(channel, "sep", None) != PRIORITY_SEP:
            log.warning("broker transport %s names priority lists otherwise: batching takes no extra messages",
                        type(channel).__name__)
            return None
        return cls(channel, owner, bulk_share)

    def _lists(self, queue: str) -> list[str]:
        """The queue's lists in the service's layout (shared.tasks: every step, whatever steps this
        channel was configured with), the first served first."""
        if queue not in self.queues:
            self.queues[queue] = priority_lists(queue)
        return self.queues[queue]

    def take(self, queue: str, limit: int) -> list[Pending]:
        """Take up to ``limit`` waiting inference messages of ``queue`` (none if it is empty)."""
        if limit <= 0:
            return []
        raws = self._take(keys=[self.unacked, self.index, TAKEN_BY_KEY, TAKES_KEY, *self._lists(queue)],
                          args=[limit, time.time(), self.owner, queue, self.bulk_share, LANE_STEPS])
        taken, strays = [], []
        for raw in raws:
            pending = self._parse(raw)
            if isinstance(pending, Pending):
                taken.append(pending)
            elif pending is not None:
                strays.append(pending)
        if strays:
            self.requeue(queue, strays)
        return taken

    def _parse(self, raw: bytes) -> "Pending | tuple[str, bytes] | None":
        """Return the message's computation; (tag, raw) for another task's message; None if malformed."""
        try:
            message = json.loads(raw)
            tag = message["properties"]["delivery_tag"]
        except (ValueError, KeyError, TypeError):
            log.error("dropping an unreadable message from an inference queue: %.200r", raw)
            return None
        if message.get("headers", {}).get("task") != INFER_TASK:
            log.warning("requeueing unexpected task %s from an inference queue", message.get("headers", {}).get("task"))
            return tag, raw
        try:
            body = base64.b64decode(message["body"]) if message["properties"].get("body_encoding") == "base64" \
                else message["body"]
            payload = json.loads(body)[0][0]
            return Pending.from_message(payload, tag, raw, message_step(message))
        except (KeyError, IndexError, TypeError, ValueError):
            log.exception("dropping a malformed inference message %s", tag)
            self.client.pipeline(transaction=False).zrem(self.index, tag).hdel(self.unacked, tag).hdel(
                TAKEN_BY_KEY, tag).execute()
            return None

    def ack(self, pipe, pendings: list[Pending]) -> None:
        """Queue the acknowledgement of ``pendings`` on ``pipe`` (two commands for the whole batch)."""
        tags = [p.tag for p in pendings if p.tag is not None]
        if tags:
            pipe.zrem(self.index, *tags)
            pipe.hdel(self.unacked, *tags)
            pipe.hdel(TAKEN_BY_KEY, *tags)

    def ack_now(self, pendings: list[Pending]) -> None:
        pipe = self.client.pipeline(transaction=False)
        self.ack(pipe, pendings)
        if pipe:
            pipe.execute()

    def requeue(self, queue: str, messages: list[tuple[str, bytes]] | list[Pending]) -> None:
        """Put taken messages back at the head of their priority lists of ``queue``, for any consumer to take again."""
        pairs = [(m.tag, m.raw) if isinstance(m, Pending) else m for m in messages]
        triples = [(tag, raw, message_step(json.loads(raw))) for tag, raw in pairs if tag is not None]
        if triples:
            self._requeue(keys=[self.unacked, self.index, TAKEN_BY_KEY, *self._lists(queue)],
                          args=[part for triple in triples for part in triple])

    def close(self) -> None:
        self.client.close()


def restore_taken_by(client, dead: set[str]) -> int:
    """Put the messages that now-dead children took back on their queues; return how many.

    As kombu's own restore does (under WATCH, so a concurrent ack or restore wins), minus the
    visibility timeout: the sweeper knows the taker is dead from its stopped heartbeat.
    """
    restored = 0
    for tag, owner in client.hgetall(TAKEN_BY_KEY).items():
        if owner.decode() not in dead:
            continue

        def restore(pipe, tag=tag):
            nonlocal restored
            entry = pipe.hget("unacked", tag)
            pipe.multi()
            pipe.hdel(TAKEN_BY_KEY, tag)
            if entry:
                message, _exchange, routing_key = json.loads(entry)
                message.get("headers", {})["redelivered"] = True
                # the head of its own priority list: taken next of its step
                pipe.rpush(priority_lists(routing_key)[message_step(message)], json.dumps(message))
                pipe.hdel("unacked", tag)
                pipe.zrem("unacked_index", tag)
                restored += 1

        client.transaction(restore, "unacked")
    return restored


REQUEUE_RETRY_S = 1.0


def requeue_later(receiver: BatchReceiver, queue: str, pendings: list, give_up_s: float) -> threading.Thread:
    """Put taken messages back once Redis takes writes again (it refused: a full Redis), trying every
    REQUEUE_RETRY_S for ``give_up_s``; after that they wait for kombu's visibility-timeout restore."""
    def run() -> None:
        deadline = time.monotonic() + give_up_s
        while time.monotonic() < deadline:
            time.sleep(REQUEUE_RETRY_S)
            try:
                receiver.requeue(queue, pendings)
            except redis.RedisError:
                continue
            log.warning("put %d taken messages back on %s once Redis took writes again", len(pendings), queue)
            return
        log.error("could not put %d taken messages back on %s; the visibility timeout will", len(pendings), queue)

    thread = threading.Thread(target=run, name="requeue-later", daemon=True)
    thread.start()
    return thread
