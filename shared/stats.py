"""Fleet statistics in Redis, written by both tiers: per-minute buckets and cumulative Prometheus series.

Per minute, for the admin page's 1/5/60-minute figures and hour-long charts (TTL ``MINUTE_TTL_S``):

    stats:m:<minute>              hash  done:<model>, failed:<model>, hit:<model>, miss:<model>, depth:<queue>
    stats:lat:<minute>:<model>    list  "<end-to-end s> <inference s>" of recent images
                                        (at most SAMPLES_PER_MINUTE)

Cumulative since the Redis data began (no TTL; one field per series, a few hundred at most):

    metrics:counters              hash  JSON [name, labels] -> value
    metrics:histograms            hash  JSON [name, labels, bucket index | "sum" | "count"] -> value

Workers write one pipeline per batch; the web tier one per accepted submission. Redis rather than
per-process registries, because gunicorn and Celery prefork both run many processes per host, and
the admin page needs fleet-wide windows that no single process sees.
"""
from __future__ import annotations

import bisect
import dataclasses
import functools
import json
import math
import time

import redis

MINUTE_TTL_S = 2 * 3600 + 120
SAMPLES_PER_MINUTE = 300
COUNTERS_KEY = "metrics:counters"
HISTOGRAMS_KEY = "metrics:histograms"
INFERENCE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
END_TO_END_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
HISTOGRAMS = {"imgsvc_inference_seconds": INFERENCE_BUCKETS,
              "imgsvc_end_to_end_seconds": END_TO_END_BUCKETS,
              "imgsvc_batch_size": BATCH_BUCKETS}


def minute_of(now: float) -> int:
    return int(now // 60)


def minute_key(minute: int) -> str:
    return f"stats:m:{minute}"


def latency_key(minute: int, model: str) -> str:
    return f"stats:lat:{minute}:{model}"


def series_field(name: str, labels: dict, part: int | str | None = None) -> str:
    """Return the hash field of one series (and one histogram part)."""
    key = [name, dict(sorted(labels.items()))]
    return json.dumps(key if part is None else [*key, part], separators=(",", ":"))


def _observe(pipe, name: str, labels: dict, values: list[float]) -> None:
    """Add observations to a histogram: one increment per bucket hit (cumulated when read), sum and count."""
    if not values:
        return
    buckets: dict[int, int] = {}
    for value in values:
        index = bisect.bisect_left(HISTOGRAMS[name], value)  # len(buckets) is the +Inf bucket
        buckets[index] = buckets.get(index, 0) + 1
    for index, hits in buckets.items():
        pipe.hincrby(HISTOGRAMS_KEY, series_field(name, labels, index), hits)
    pipe.hincrbyfloat(HISTOGRAMS_KEY, series_field(name, labels, "sum"), sum(values))
    pipe.hincrby(HISTOGRAMS_KEY, series_field(name, labels, "count"), len(values))


def record_batch(client: redis.Redis, labels: dict, samples: list[tuple[float, float]],
                 batch_size: int, now: float | None = None, pipe=None) -> None:
    """Count a finished batch: ``samples`` holds (end-to-end s, inference s) per computation done.

    With ``pipe`` the commands join that pipeline (the caller executes it); otherwise they are sent now.
    The cost is per batch, not per image: each histogram gets one increment per bucket hit.
    """
    now = time.time() if now is None else now
    model, minute = labels["model"], minute_of(now)
    own = pipe is None
    pipe = client.pipeline(transaction=False) if own else pipe
    if samples:
        pipe.hincrby(minute_key(minute), f"done:{model}", len(samples))
        pipe.hincrby(COUNTERS_KEY, series_field("imgsvc_jobs_completed", labels), len(samples))
        pipe.lpush(latency_key(minute, model), *(f"{e2e:.6f} {inf:.6f}" for e2e, inf in samples))
        pipe.ltrim(latency_key(minute, model), 0, SAMPLES_PER_MINUTE - 1)
        pipe.expire(latency_key(minute, model), MINUTE_TTL_S)
    _observe(pipe, "imgsvc_inference_seconds", labels, [inference for _, inference in samples])
    _observe(pipe, "imgsvc_end_to_end_seconds", labels, [e2e for e2e, _ in samples])
    _observe(pipe, "imgsvc_batch_size", labels, [batch_size])
    pipe.expire(minute_key(minute), MINUTE_TTL_S)
    if own:
        pipe.execute()


def record_failures(client: redis.Redis, labels: dict, count: int = 1, now: float | None = None) -> None:
    """Count computations that ended failed."""
    now = time.time() if now is None else now
    pipe = client.pipeline(transaction=False)
    pipe.hincrby(minute_key(minute_of(now)), f"failed:{labels['model']}", count)
    pipe.expire(minute_key(minute_of(now)), MINUTE_TTL_S)
    pipe.hincrby(COUNTERS_KEY, series_field("imgsvc_jobs_failed", labels), count)
    pipe.execute()


def record_claim_outcomes(client: redis.Redis, labels: dict, deadline_exceeded: int, skipped: int) -> None:
    """Count what a worker's claim ended without computing: jobs failed ``deadline_exceeded``, and
    computations skipped because no job waited for them any more (canceled, or past their deadline)."""
    pipe = client.pipeline(transaction=False)
    if deadline_exceeded:
        pipe.hincrby(COUNTERS_KEY, series_field("imgsvc_jobs_deadline_exceeded", labels), deadline_exceeded)
    if skipped:
        pipe.hincrby(COUNTERS_KEY, series_field("imgsvc_computations_skipped", labels), skipped)
    pipe.execute()


@dataclasses.dataclass(frozen=True)
class SubmissionCount:
    """How an accepted job is counted (the same series as ``record_submission``), for the submit
    script to count it in the round trip that writes the job."""

    model: str
    now: float

    def script_parts(self) -> tuple[list[str], list]:
        """Keys (minute bucket, counters) and arguments (TTL, then hit/miss fields) for the script."""
        return [minute_key(minute_of(self.now)), COUNTERS_KEY], [MINUTE_TTL_S, *_submission_fields(self.model)]


@functools.lru_cache(maxsize=256)
def _submission_fields(model: str) -> tuple[str, ...]:
    """The per-minute and cumulative fields an accepted job of ``model`` counts in (made once per model)."""
    labels = {"model": model}
    return (f"hit:{model}", f"miss:{model}", series_field("imgsvc_jobs_submitted", labels),
            series_field("imgsvc_cache_hits", labels), series_field("imgsvc_cache_misses", labels))


def record_submission(client: redis.Redis, model: str, cached: bool, now: float | None = None) -> None:
    """Count an accepted job and whether the cache answered it (the series the submit script counts)."""
    (minute, counters), (ttl, hit, miss, submitted, hits, misses) = SubmissionCount(
        model, time.time() if now is None else now).script_parts()
    pipe = client.pipeline(transaction=False)
    pipe.hincrby(minute, hit if cached else miss, 1).expire(minute, ttl)
    pipe.hincrby(counters, submitted, 1).hincrby(counters, hits if cached else misses, 1)
    pipe.execute()


def record_queue_depths(client: redis.Redis, depths: dict[str, int], now: float | None = None) -> None:
    """Remember each queue's depth in this minute's bucket (the last sample of the minute wins)."""
    if not depths:
        return
    key = minute_key(minute_of(time.time() if now is None else now))
    pipe = client.pipeline(transaction=False)
    pipe.hset(key, mapping={f"depth:{queue}": depth for queue, depth in depths.items()})
    pipe.expire(key, MINUTE_TTL_S)
    pipe.execute()


def percentile(values: list[float], q: float) -> float | None:
    """Return the ``q`` quantile (0..1) by nearest rank, or None without values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def read_minutes(client: redis.Redis, minutes: int, models: list[str], now: float | None = None) -> list[dict]:
    """Return the last ``minutes`` buckets, oldest first: counts and latency samples per model."""
    current = minute_of(time.time() if now is None else now)
    span = list(range(current - minutes + 1, current + 1))
    pipe = client.pipeline(transaction=False)
    for minute in span:
        pipe.hgetall(minute_key(minute))
        for model in models:
            pipe.lrange(latency_key(minute, model), 0, -1)
    replies = iter(pipe.execute())
    buckets = []
    for minute in span:
        counts = {k.decode(): float(v) for k, v in next(replies).items()}
        samples = {}
        for model in models:
            pairs = [raw.split() for raw in next(replies)]
            samples[model] = [(float(e2e), float(inf)) for e2e, inf in pairs]
        buckets.append({"minute": minute, "counts": counts, "samples": samples})
    return buckets


def summarise(buckets: list[dict], models: list[str]) -> dict:
    """Return throughput, latency p50/p95 per model and the cache hit rate over ``buckets``."""
    seconds = 60 * len(buckets)
    per_model = {}
    for model in models:
        done = sum(b["counts"].get(f"done:{model}", 0) for b in buckets)
        failed = sum(b["counts"].get(f"failed:{model}", 0) for b in buckets)
        samples = [s for b in buckets for s in b["samples"].get(model, [])]
        e2e, inference = [s[0] for s in samples], [s[1] for s in samples]
        per_model[model] = {
            "done": int(done), "failed": int(failed), "per_second": round(done / seconds, 4),
            "latency_ms": {"p50": _ms(percentile(e2e, 0.5)), "p95": _ms(percentile(e2e, 0.95))},
            "inference_ms": {"p50": _ms(percentile(inference, 0.5)), "p95": _ms(percentile(inference, 0.95))},
        }
    hits = sum(v for b in buckets for k, v in b["counts"].items() if k.startswith("hit:"))
    misses = sum(v for b in buckets for k, v in b["counts"].items() if k.startswith("miss:"))
    rate = round(hits / (hits + misses), 4) if hits + misses else None
    return {"models": per_model, "cache": {"hits": int(hits), "misses": int(misses), "hit_rate": rate}}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def chart_series(buckets: list[dict], models: list[str]) -> list[dict]:
    """Return one point per minute for the charts: jobs done, p95 end-to-end latency, queue depths."""
    points = []
    for bucket in buckets:
        counts = bucket["counts"]
        latencies = [s[0] for model in models for s in bucket["samples"].get(model, [])]
        points.append({
            "t": bucket["minute"] * 60,
            "done": int(sum(v for k, v in counts.items() if k.startswith("done:"))),
            "p95_ms": _ms(percentile(latencies, 0.95)),
            "queue_depth": {k.removeprefix("depth:"): int(v)
                            for k, v in counts.items() if k.startswith("depth:")},
        })
    return points


def read_counters(client: redis.Redis) -> list[tuple[str, dict, float]]:
    """Return every cumulative counter as (name, labels, value)."""
    return [(*json.loads(field), float(value)) for field, value in client.hgetall(COUNTERS_KEY).items()]


def read_histograms(client: redis.Redis) -> dict[tuple[str, str], dict]:
    """Return every histogram series: (name, labels JSON) -> {"labels", "buckets": [...], "sum", "count"}."""
    series: dict[tuple[str, str], dict] = {}
    for field, value in client.hgetall(HISTOGRAMS_KEY).items():
        name, labels, part = json.loads(field)
        if name not in HISTOGRAMS:
            continue
        entry = series.setdefault((name, json.dumps(labels, sort_keys=True)), {
            "labels": labels, "buckets": [0] * (len(HISTOGRAMS[name]) + 1), "sum": 0.0, "count": 0})
        if part == "sum":
            entry["sum"] = float(value)
        elif part == "count":
            entry["count"] = int(value)
        else:
            entry["buckets"][int(part)] += int(value)
    return series
