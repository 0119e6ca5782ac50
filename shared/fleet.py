"""Read the fleet's live state from Redis: worker heartbeats grouped by Celery node; each queue's depth,
oldest waiting job's age, live consuming workers and backlog per worker.

Both the admin API and the metrics endpoints read it; nothing here talks to a worker directly.
"""
from __future__ import annotations

import base64
import json
import time

import redis

from shared.keys import QUEUED_SHARES_KEY, WEBHOOK_WORKERS_KEY, WORKERS_KEY, drain_key, webhook_worker_key, worker_key
from shared.tasks import FETCH_QUEUE, INFERENCE_QUEUE_PREFIX, PRIORITY_STEPS, WEBHOOK_QUEUE, inference_queue, lane_of, \
    priority_lists

JSON_FIELDS = ("models", "max_batch", "gpu_memory", "latency_ms")
COUNTED = ("jobs_done", "jobs_failed", "jobs_deadline_exceeded", "computations_skipped")  # heartbeat counters
NUMBER_FIELDS = ("pid", "child_index", "threads", "model_loads", "started_at", *COUNTED, "current_batch", "last_seen")


def _decode_child(raw: dict) -> dict:
    """Turn a heartbeat hash into JSON-ready values."""
    child = {k.decode(): v.decode() for k, v in raw.items()}
    for field in JSON_FIELDS:
        if field in child:
            child[field] = json.loads(child[field])
    for field in NUMBER_FIELDS:
        if field in child:
            number = float(child[field])
            child[field] = int(number) if number.is_integer() and field != "last_seen" else number
    return child


def live_children(client: redis.Redis, ttl_s: int, now: float | None = None) -> list[dict]:
    """Return every worker child seen within ``ttl_s``, with its heartbeat fields."""
    now = time.time() if now is None else now
    names = [n.decode() for n in client.zrangebyscore(WORKERS_KEY, now - ttl_s, "+inf")]
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.hgetall(worker_key(name))
    return [{"name": name, **_decode_child(raw)} for name, raw in zip(names, pipe.execute()) if raw]


def nodes(client: redis.Redis, ttl_s: int) -> list[dict]:
    """Group live children by Celery node (one worker process tree): its pool, devices and models."""
    grouped: dict[str, list[dict]] = {}
    for child in live_children(client, ttl_s):
        grouped.setdefault(child.get("node") or child.get("host", "?"), []).append(child)
    names = sorted(grouped)
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.exists(drain_key(name))
    draining = pipe.execute()
    result = []
    for name, drained in zip(names, draining):
        children = sorted(grouped[name], key=lambda c: c.get("child_index", 0))
        models = {m: v for child in children for m, v in child.get("models", {}).items()}
        result.append({
            "name": name, "host": children[0].get("host"), "pool_size": len(children),
            "status": "draining" if drained else "active",
            "devices": sorted({child.get("device", "?") for child in children}), "models": models,
            **{counter: sum(c.get(counter, 0) for c in children) for counter in COUNTED},
            "children": children,
        })
    return result


def webhook_nodes(client: redis.Redis, ttl_s: int) -> list[dict]:
    """Return every webhook worker seen within ``ttl_s``: threads and delivery outcomes so far."""
    names = [n.decode() for n in client.zrangebyscore(WEBHOOK_WORKERS_KEY, time.time() - ttl_s, "+inf")]
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.hgetall(webhook_worker_key(name))
    result = []
    for name, raw in zip(names, pipe.execute()):
        if raw:
            fields = {k.decode(): v.decode() for k, v in raw.items()}
            numbers = {k: float(v) if k == "last_seen" else int(float(v))
                       for k, v in fields.items() if k not in ("node", "host")}
            result.append({"name": name, "host": fields.get("host"), **numbers})
    return sorted(result, key=lambda node: node["name"])


def known_queues(model_names) -> list[str]:
    """Return the queues to watch: one per model, then the webhooks and fetches queues (webhook workers')."""
    return sorted({inference_queue(name) for name in model_names}) + [WEBHOOK_QUEUE, FETCH_QUEUE]


def _enqueued_at(raw: bytes | None) -> float | None:
    """Read ``enqueued_at`` from a Celery message on the Redis transport (base64 JSON body)."""
    if raw is None:
        return None
    try:
        envelope = json.loads(raw)
        body = envelope["body"]
        if envelope.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return float(args[0]["enqueued_at"])
    except (ValueError, KeyError, IndexError, TypeError):
        return None  # a message without our field (e.g. a webhook delivery): age unknown


# One round trip for the whole queue view: the depth and oldest message of each queue's priority lists
# (kombu LPUSHes and consumers pop from the right, so each list's oldest is at index -1), and the live
# children with their node, models and whether the node is draining, from the ``workers`` set and each
# heartbeat. KEYS: the workers set, the webhook workers set, then every queue's priority lists.
# ARGV: the oldest live heartbeat score, the heartbeat key prefix, the drain key prefix.
_SNAPSHOT = """
local children = {}
for _, name in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], '+inf')) do
  local node, models = unpack(redis.call('HMGET', ARGV[2] .. name, 'node', 'models'))
  if models then
    table.insert(children, {node or '', models, node and redis.call('EXISTS', ARGV[3] .. node) or 0})
  end
end
local queues = {}
for i = 3, #KEYS do
  table.insert(queues, {redis.call('LLEN', KEYS[i]), redis.call('LINDEX', KEYS[i], -1) or false})
end
return {children, queues, redis.call('ZCOUNT', KEYS[2], ARGV[1], '+inf')}
"""


def _serving(children: list) -> dict[str, int]:
    """Count, per inference queue, the live children of nodes not draining that consume it."""
    counts: dict[str, int] = {}
    for _node, models, draining in children:
        if not int(draining):
            for model in json.loads(models):
                counts[inference_queue(model)] = counts.get(inference_queue(model), 0) + 1
    return counts


def queues(client: redis.Redis, names: list[str], *, ttl_s: int, now: float | None = None) -> list[dict]:
    """Return each queue's depth, the age of its oldest waiting message (seconds, or None), the live
    workers consuming it and its backlog per worker, in one round trip.

    ``workers`` counts the pool children of nodes not being drained for an inference queue, the live
    webhook worker nodes for the webhooks queue. ``backlog_per_worker`` is depth / workers and, with
    no worker, the whole depth: what the first worker to start will face (the idea behind SageMaker's
    ApproximateBacklogSizePerInstance).
    """
    now = time.time() if now is None else now
    children, replies, webhook_workers = client.register_script(_SNAPSHOT)(
        keys=[WORKERS_KEY, WEBHOOK_WORKERS_KEY, *(lst for name in names for lst in priority_lists(name))],
        args=[now - ttl_s, worker_key(""), drain_key("")])
    serving = _serving(children)
    result, steps = [], len(PRIORITY_STEPS)
    for i, name in enumerate(names):
        lists = replies[i * steps:(i + 1) * steps]
        lanes = {"interactive": 0, "bulk": 0}
        for step, (length, _) in enumerate(lists):
            lanes[lane_of(step)] += int(length)
        depth = sum(lanes.values())
        ages = [t for length, raw in lists if length and (t := _enqueued_at(raw)) is not None]
        age = round(max(0.0, now - min(ages)), 3) if ages else None
        workers = int(webhook_workers) if name in (WEBHOOK_QUEUE, FETCH_QUEUE) else serving.get(name, 0)
        entry = {"name": name, "depth": depth, "oldest_age_s": age, "workers": workers,
                 "backlog_per_worker": round(depth / max(workers, 1), 3)}
        if name.startswith(INFERENCE_QUEUE_PREFIX):
            entry["lanes"] = lanes
        result.append(entry)
    return result


def shares(client: redis.Redis, top: int | None = None) -> list[dict]:
    """Each sender's computations in flight (waiting or running), largest first: ``key:<id>`` for an
    API key, ``addr:<address>`` for an anonymous caller; past ``top`` the rest are summed as ``other``."""
    counts = sorted(((k.decode(), int(v)) for k, v in client.hgetall(QUEUED_SHARES_KEY).items() if int(v) > 0),
                    key=lambda item: (-item[1], item[0]))
    if top is not None and len(counts) > top:
        counts = [*counts[:top], ("other", sum(n for _, n in counts[top:]))]
    return [{"share": share, "in_flight": n} for share, n in counts]


CACHE_SIZE_KEY = "stats:cache_size"  # the last cache measurement, JSON (TTL CACHE_SIZE_TTL_S)
CACHE_SIZE_TTL_S = 30
CACHE_SCAN_LIMIT = 200_000  # keys looked at per measurement; beyond it the count is a lower bound
CACHE_BYTES_SAMPLE = 500  # results whose size (with heatmap) is read to estimate the bytes


def _glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


def cache_size(client: redis.Redis) -> dict:
    """Return how many results are cached and about how many bytes they take (measured every 30 s)."""
    remembered = client.get(CACHE_SIZE_KEY)
    if remembered is not None:
        return json.loads(remembered)
    keys, exact = [], True
    for key in client.scan_iter(match="result:*", count=1000):
        keys.append(key)
        if len(keys) >= CACHE_SCAN_LIMIT:
            exact = False
            break
    sample = keys[:CACHE_BYTES_SAMPLE]
    pipe = client.pipeline(transaction=False)
    for key in sample:
        pipe.strlen(key)
        pipe.strlen(b"overlay:" + key.removeprefix(b"result:"))
        pipe.strlen(b"picture:" + key.removeprefix(b"result:"))
    sizes = pipe.execute()
    average = sum(sizes) / len(sample) if sample else 0
    size = {"entries": len(keys), "bytes": int(average * len(keys)),
            "exact": exact and len(sample) == len(keys),
            "measured_at": time.time()}
    client.set(CACHE_SIZE_KEY, json.dumps(size), ex=CACHE_SIZE_TTL_S)
    return size


def purge_model_version(client: redis.Redis, prefixes: tuple[str, ...], batch: int = 500) -> int:
    """Delete every key under ``prefixes`` (one model version's results, heatmaps, meta); return how many."""
    deleted = 0
    for prefix in prefixes:
        chunk = []
        for key in client.scan_iter(match=_glob_escape(prefix) + "*", count=1000):
            chunk.append(key)
            if len(chunk) >= batch:
                deleted += client.unlink(*chunk)
                chunk = []
        if chunk:
            deleted += client.unlink(*chunk)
    client.delete(CACHE_SIZE_KEY)
    return deleted
