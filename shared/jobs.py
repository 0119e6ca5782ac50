"""Job records and the single-flight bookkeeping, as atomic Redis scripts both tiers call.

A job is a hash ``job:<id>``. Identical uploads share one computation: the first creates
``inflight:<suffix>`` and every job lands on the list ``attached:<suffix>``. The worker finishes a
computation in one script that writes the result and settles every attached job, so a job either
attaches before completion (and is settled by it) or sees the cached result after it. The scripts
themselves live in shared/jobscripts.py.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import time

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from shared import redisconn, stats
from shared.errors import DeadlineExceeded, Unavailable
from shared.jobscripts import CANCEL, CLAIM, DROP_UNWAITED, FINISH, SUBMIT
from shared.jobjson import job_json
from shared.jobtypes import Claim, JobContext, KeyRecord
from shared.retention import MAIN_TAIL_S, copy_settled, from_flat, new_job_id
from shared.tasks import StepMessage
from shared.keys import (ANNOUNCE_KEY, COMPUTATIONS_KEY, QUEUED_BYTES_KEY, QUEUED_KEYS_KEY, QUEUED_SHARES_KEY,
                         QUEUED_SIZES_KEY, STARTED_KEY, STATS_KEY, Computation, OutputOptions, job_key, notify_key,
                         overlay_key_for_result, picture_key_for_result)

log = logging.getLogger(__name__)

# With a separate cache server (CACHE_URL), a finished result (and each settled job: see
# shared/retention.py) also stays this long on the main server, where the single-flight bookkeeping
# is: an upload that missed the cache a moment before the worker copied the result there still
# finds it, rather than computing it again.
MAIN_COPY_TTL_S = MAIN_TAIL_S

CACHE_BACKOFF_S = 5.0  # a cache server that failed is left alone this long (misses, no waiting)

_DEADLINE_EXCEEDED = json.dumps(DeadlineExceeded(
    "The job was not started by its deadline (deadline_s); it was not computed.").to_dict())

KEEP_UPLOAD = "keep-upload"  # a finished computation keeps its upload as the overlay's picture
Picture = bytes | str | None  # a thumbnail's bytes, KEEP_UPLOAD, or None (no overlay)


def _attached_key(fields: dict[str, str]) -> str:
    """The attached list of the computation a job hash belongs to; '-' while it has no image yet."""
    image = json.loads(fields.get("image") or "null")
    if not image or "model" not in fields:
        return "-"
    model = json.loads(fields["model"])
    comp = Computation(model["name"], model["version"], image["sha256"],
                       OutputOptions(**json.loads(fields["options"])))
    return comp.attached_key


def utc_now(timestamp: float | None = None) -> str:
    """Return now (or ``timestamp``, unix seconds) as the contract's ISO-8601 UTC string."""
    moment = dt.datetime.now(dt.timezone.utc) if timestamp is None else dt.datetime.fromtimestamp(
        timestamp, dt.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclasses.dataclass(frozen=True)
class Submission:
    """What ``JobStore.submit`` decided: ``cached``, ``attached`` or ``new``."""

    outcome: str
    job_id: str
    fields: dict[str, str]  # the job hash as written
    cached_result: bytes | None = None
    in_flight: int = 0  # ``new``: the sender's (``share``'s) computations in flight before this one
    step: int | None = None  # ``new``: the priority step its task message was pushed at; None: not pushed

    def json(self) -> str:
        """Return the job JSON without another Redis round trip."""
        return job_json(self.fields, self.cached_result)


class JobStore:
    """Reads and writes job records, results and the single-flight bookkeeping in Redis."""

    def __init__(self, client: redis.Redis, *, job_ttl_s: int, result_ttl_s: int,
                 inflight_ttl_s: int, image_ttl_s: int, stuck_after_s: int = 900,
                 cache: redis.Redis | None = None, job_result_ttl_s: int = 24 * 3600):
        self.redis = client
        # Results, heatmaps, their pictures and header facts live on ``cache`` (CACHE_URL). When it
        # is another server it may evict them (allkeys-lru): each job then keeps its own answer,
        # and a result the cache lost is computed again, never an error.
        self.cache = client if cache is None else cache
        self.split = cache is not None and cache is not client
        self._cache_down_until = 0.0
        # Called with the ids of settled jobs that have a webhook endpoint or a batch; the owner of
        # this store installs it (shared.webhooks.Announcer) where it can send Celery tasks. The
        # scripts also list those jobs in ANNOUNCE_KEY, in the same step that settles them, so the
        # webhook worker catches up on any whose process died before announcing them.
        self.on_settled = None
        self.on_started = None  # the same for claimed jobs that asked for a job.started event (STARTED_KEY)
        self.stuck_after_s = stuck_after_s
        self.job_ttl_s = job_ttl_s  # a job in flight (and one whose events are not made yet)
        self.job_result_ttl_s = job_result_ttl_s  # a settled job, on the cache role
        # how long a settled job stays on the main server: a short tail, or (one server) all its retention
        self.settled_ttl_s = MAIN_TAIL_S if self.split else job_result_ttl_s
        self.result_ttl_s = result_ttl_s
        self.inflight_ttl_s = inflight_ttl_s
        self.image_ttl_s = image_ttl_s
        self._submit = client.register_script(SUBMIT)
        self._claim = client.register_script(CLAIM)
        self._finish = client.register_script(FINISH)
        self._cancel = client.register_script(CANCEL)
        self._drop_unwaited = client.register_script(DROP_UNWAITED)

    @classmethod
    def from_settings(cls, client: redis.Redis, settings) -> "JobStore":
        cache = None
        if redisconn.split(settings):  # fail fast: a cache that is away costs recomputation, not latency
            cache = redisconn.client(settings, "cache", socket_timeout=2, socket_connect_timeout=1,
                                     retry=Retry(NoBackoff(), 1), health_check_interval=30)
        return cls(client, job_ttl_s=settings.job_ttl_s, result_ttl_s=settings.result_ttl_s,
                   inflight_ttl_s=settings.inflight_ttl_s, image_ttl_s=settings.image_ttl_s,
                   stuck_after_s=settings.stuck_after_s, cache=cache, job_result_ttl_s=settings.job_result_ttl_s)

    def submit(self, comp: Computation, model_info: dict, image_bytes: bytes = b"",
               image_info: dict | None = None, context: JobContext = JobContext(),
               job_id: str | None = None, *, queue: str = "", max_queue_depth: int = 0,
               max_queued_bytes: int = 0, count: stats.SubmissionCount | None = None,
               key: KeyRecord | None = None, share: str = "", max_share_depth: int = 0,
               message: StepMessage | None = None) -> Submission:
        """Answer a job from the cache, attach it to a running computation, or start one.

        Without ``image_bytes`` this is a lookup: a cache hit or an attach needs neither the bytes
        nor their header check, and anything else answers ``miss`` without writing. With them, a
        miss starts the computation, unless ``queue`` already holds ``max_queue_depth`` tasks
        (then ``overloaded``, nothing written) or the uploads waiting for workers would pass
        ``max_queued_bytes`` (``overloaded_bytes``), or ``share`` (the sender: ``key:<id>`` or
        ``addr:<address>``) already has ``max_share_depth`` computations in flight
        (``overloaded_share``); a new computation counts against its ``share``. A job it writes is
        counted with ``count``, and its Idempotency-Key's answer (``key``) is stored in the same step; ``key_lost`` (nothing
        written) when that key no longer holds this request's claim. A new computation's task
        ``message`` (when given) is pushed on ``queue`` in the same step too, at the step its sender's
        backlog gives it (``Submission.step``). One round trip either way; the returned fields are
        what the script wrote, so the caller answers without reading the job back.
        """
        job_id, now = job_id or new_job_id(), utc_now()
        fields = {"id": job_id, "created_at": now, "model": json.dumps(model_info),
                  "options": json.dumps(comp.options.to_dict()), **context.fields()}
        extra = [item for pair in context.fields().items() for item in pair]
        count_keys, count_args = count.script_parts() if count else (["-", "-"], [0, "", "", "", "", ""])
        given, image_json = b"", json.dumps(image_info) if image_info else ""
        if self.split:
            given, meta = self._from_cache(comp)
            if given and not image_json:
                image_json = meta or ""
            if not image_json:
                given = b""  # a lookup without the header facts: let the script find them, or miss
        outcome, image_json, *rest = self._submit(
            keys=[comp.result_key, comp.inflight_key, comp.attached_key, job_key(job_id),
                  comp.image_key, comp.meta_key, COMPUTATIONS_KEY, ANNOUNCE_KEY, queue or "-", *count_keys,
                  QUEUED_BYTES_KEY, QUEUED_SIZES_KEY, key.name if key else "-", QUEUED_KEYS_KEY, QUEUED_SHARES_KEY],
            args=[job_id, self.job_ttl_s, self.inflight_ttl_s, self.image_ttl_s, now, fields["model"],
                  fields["options"], image_json, image_bytes,
                  time.time() + self.stuck_after_s, comp.suffix, max_queue_depth if queue else 0,
                  *count_args, given, "1" if self.split else "0", max_queued_bytes,
                  *((key.claim, key.cached, key.queued, key.ttl_s) if key else ("", "", "", 0)),
                  self.settled_ttl_s, share, max_share_depth if queue else 0,
                  *((message.head, message.tail, message.lane_step, message.weight) if message and queue
                    else ("", "", 0, 1)), *extra],
        )
        outcome = outcome.decode()
        if outcome in ("overloaded", "overloaded_bytes", "overloaded_share", "key_lost", "canceled"):
            return Submission(outcome, job_id, fields)
        fields["image"] = image_json.decode()
        if outcome == "cached":
            fields.update(status="done", cached="1", finished_at=now, result_key=comp.result_key,
                          result=rest[0].decode())
            if self.split:
                copy_settled(self.cache, [fields], self.job_result_ttl_s)
            if fields.get("announce"):
                self._announce([job_id])
            return Submission(outcome, job_id, fields, rest[0])
        fields.update(status="queued", cached="0")
        if outcome != "new":
            return Submission(outcome, job_id, fields)
        in_flight, step = int(rest[0]), int(rest[1])
        return Submission(outcome, job_id, fields, in_flight=in_flight, step=step if step >= 0 else None)

    def _from_cache(self, comp: Computation) -> tuple[bytes, str | None]:
        """The cached result and header facts of ``comp`` on the cache server; a cache that is
        down or has evicted them is a miss, never an error."""
        if time.monotonic() < self._cache_down_until:
            return b"", None
        try:
            result, meta = self.cache.pipeline(transaction=False).get(comp.result_key).get(comp.meta_key).execute()
        except redis.RedisError as exc:
            self._cache_down_until = time.monotonic() + CACHE_BACKOFF_S
            log.warning("cache server unreachable, answering from the main server for %.0f s: %s",
                        CACHE_BACKOFF_S, exc)
            return b"", None
        return result or b"", meta.decode() if meta else None

    def claim(self, comps: list[Computation], owner: str = "") -> list[Claim]:
        """Mark each computation's jobs running, count the attempt and record ``owner``; report
        each one's state and bytes. One pipelined round trip for the whole batch.
        """
        return self.claim_batch(comps, owner)[0]

    def claim_batch(self, comps: list[Computation], owner: str = "",
                    drain_key: str | None = None) -> tuple[list[Claim], bool]:
        """``claim``, and in the same round trip whether ``drain_key`` is set (the node is draining).

        Copies of one computation's message in one batch (a message restored late beside its
        second sending) are one delivery: it is claimed, and counts an attempt, once; the copies
        after the first are reported already done, so that only the first is computed.
        """
        pipe = self.redis.pipeline(transaction=False)
        if drain_key is not None:
            pipe.exists(drain_key)
        now, deadline = utc_now(), time.time() + self.stuck_after_s
        distinct = list(dict.fromkeys(comps))
        for comp in distinct:
            self._claim(keys=self._claim_keys(comp), args=[comp.suffix, deadline, owner, self.stuck_after_s,
                                                           *self._expiry_args(now)], client=pipe)
        replies = pipe.execute()
        draining = bool(replies.pop(0)) if drain_key is not None else False
        claims = {comp: Claim(bool(done), image, int(attempt), bool(skipped), len(records))
                  for comp, (done, image, attempt, _, skipped, _, records) in zip(distinct, replies)}
        # jobs past their deadline, failed by the claim: to the cache role, and their events
        self._settled_here([from_flat(r) for *_, records in replies for r in records],
                           [i.decode() for *_, announce, _ in replies for i in announce])
        started = [i.decode() for _, _, _, ids, *_ in replies for i in ids]
        if started and self.on_started is not None:
            self.on_started(started)
        answers, seen = [], set()
        for comp in comps:
            answers.append(Claim(True, None, claims[comp].attempt) if comp in seen else claims[comp])
            seen.add(comp)
        return answers, draining

    def _claim_keys(self, comp: Computation) -> list[str]:
        """The keys of CLAIM and DROP_UNWAITED."""
        return [COMPUTATIONS_KEY, comp.owner_key, comp.attached_key, comp.result_key, comp.image_key,
                comp.attempts_key, STARTED_KEY, comp.inflight_key, QUEUED_BYTES_KEY, QUEUED_SIZES_KEY,
                ANNOUNCE_KEY, comp.meta_key, QUEUED_KEYS_KEY, QUEUED_SHARES_KEY]

    def _expiry_args(self, now: str) -> list:
        """ARGV[5..12] of CLAIM and DROP_UNWAITED: the job key prefix, now, the attempts counter's TTL,
        then what failing a job past its deadline needs."""
        return [job_key(""), now, self.inflight_ttl_s, time.time(), _DEADLINE_EXCEEDED, notify_key(""),
                self.settled_ttl_s, self.job_ttl_s]

    def drop_unwaited(self, comp: Computation) -> bool:
        """Before the sweeper sends ``comp`` again: fail its queued jobs past their deadline and, when
        no job waits for it any more, release it (as CLAIM's skip does); return whether it did."""
        released, announce, records = self._drop_unwaited(
            keys=self._claim_keys(comp), args=[comp.suffix, 0, "", 0, *self._expiry_args(utc_now())])
        self._settled_here([from_flat(r) for r in records], [i.decode() for i in announce])
        return bool(released)

    def cancel(self, job_ids: list[str]) -> list[str]:
        """End each queued or running job ``canceled`` (one atomic step each, one round trip for all);
        return per job ``canceled``, ``already`` (canceled before), ``settled`` (done or failed:
        unchanged) or ``missing`` (not on the main server: settled a while ago, or gone).

        The job leaves its computation's attached list: the computation goes on for the jobs still
        attached, and a worker skips one that nobody waits for any more (CLAIM).
        """
        pipe = self.redis.pipeline(transaction=False)
        for job_id, fields in zip(job_ids, self._read_hashes(self.redis, job_ids)):
            self._cancel(keys=[job_key(job_id), _attached_key(fields or {}), ANNOUNCE_KEY, notify_key(job_id)],
                         args=[job_id, utc_now(), self.settled_ttl_s, self.job_ttl_s], client=pipe)
        replies = pipe.execute()
        records = [from_flat(reply[1]) for reply in replies if reply[0] == b"canceled"]
        self._settled_here(records, [r[b"id"].decode() for r in records if r.get(b"announce") == b"1"])
        return [reply[0].decode() for reply in replies]

    def _settled_here(self, records: list[dict], announce: list[str]) -> None:
        """Jobs a script settled outside FINISH (canceled, past their deadline): copy them to the cache
        role (shared/retention.py) and make their events."""
        if self.split:
            copy_settled(self.cache, records, self.job_result_ttl_s)
        self._announce(announce)

    def finish(self, comp: Computation, result: dict, picture: Picture = None) -> list[str]:
        """Store the result (and the overlay's picture) and mark every attached job done; return their ids."""
        return self.finish_many([(comp, result, picture)])[0]

    def finish_many(self, done: list[tuple[Computation, dict, Picture]], also=None) -> list[list[str]]:
        """``finish`` for a whole batch in one pipelined round trip; job ids per computation.

        ``also(pipe)`` may queue more commands behind the results in the same round trip (the
        worker acknowledges the batch's broker messages and records its statistics there), so
        they run only once every result before them is written.
        """
        pipe = self.redis.pipeline(transaction=False)
        for comp, result, picture in done:
            self._settle(comp, "done", json.dumps(result, separators=(",", ":")), pipe, picture)
        if also is not None:
            also(pipe)
        replies = pipe.execute()[:len(done)]
        if self.split:
            self._fill_cache(done, [copy for _, _, copy, _ in replies])
            copy_settled(self.cache, [from_flat(r) for *_, records in replies for r in records], self.job_result_ttl_s)
        self._announce([i.decode() for _, announce, _, _ in replies for i in announce])
        return [[i.decode() for i in ids] for ids, *_ in replies]

    def _fill_cache(self, done: list[tuple[Computation, dict, Picture]], copies: list) -> None:
        """Copy finished results, their pictures and header facts to the cache server. The jobs
        already hold their answers, so a cache that is down costs only later recomputation."""
        pipe = self.cache.pipeline(transaction=False)
        for (comp, result, picture), copy in zip(done, copies):
            if not copy:
                continue  # already answered before: nothing was settled
            meta, upload = copy
            pipe.set(comp.result_key, json.dumps(result, separators=(",", ":")), ex=self.result_ttl_s)
            if meta:
                pipe.set(comp.meta_key, meta, ex=self.result_ttl_s)
            picture_bytes = upload if picture is KEEP_UPLOAD else picture
            if picture_bytes:
                pipe.set(comp.picture_key, picture_bytes, ex=self.result_ttl_s)
        try:
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("could not copy %d results to the cache server: %s", len(done), exc)

    def fail(self, comp: Computation, error: dict) -> list[str]:
        """Mark every attached job failed with ``error``; cache nothing; return their ids."""
        ids, announce, _, records = self._settle(comp, "failed", json.dumps(error))
        if self.split:
            copy_settled(self.cache, [from_flat(r) for r in records], self.job_result_ttl_s)
        self._announce([i.decode() for i in announce])
        return [i.decode() for i in ids]

    def _announce(self, job_ids: list[str]) -> None:
        if job_ids and self.on_settled is not None:
            self.on_settled(job_ids)

    def _settle(self, comp: Computation, status: str, payload: str, client=None, picture: Picture = None):
        mode = "none" if picture is None else "original" if picture is KEEP_UPLOAD else "thumbnail"
        return self._finish(
            keys=[comp.inflight_key, comp.attached_key, comp.image_key, comp.result_key,
                  comp.picture_key, STATS_KEY, comp.meta_key, comp.attempts_key, COMPUTATIONS_KEY,
                  comp.owner_key, ANNOUNCE_KEY, QUEUED_BYTES_KEY, QUEUED_SIZES_KEY, QUEUED_KEYS_KEY,
                  QUEUED_SHARES_KEY],
            args=[job_key(""), utc_now(), status, MAIN_COPY_TTL_S if self.split else self.result_ttl_s,
                  payload, picture if mode == "thumbnail" and not self.split else b"", comp.model,
                  notify_key(""), comp.suffix, mode, "1" if self.split else "0", self.settled_ttl_s,
                  self.job_ttl_s],
            client=client,
        )

    def count_redeliveries(self, models: list[str]) -> None:
        """Count computations started again after an earlier delivery did not finish."""
        pipe = self.redis.pipeline(transaction=False)
        for model in models:
            pipe.hincrby(STATS_KEY, f"redelivered:{model}", 1)
        pipe.execute()

    def queued_bytes(self) -> int:
        """Bytes of uploads waiting for a worker (what MAX_QUEUED_MB bounds)."""
        return int(self.redis.get(QUEUED_BYTES_KEY) or 0)

    def computations(self) -> dict[str, int]:
        """Return how many computations ended, by ``<status>:<model>`` (cache hits not counted)."""
        return {k.decode(): int(v) for k, v in self.redis.hgetall(STATS_KEY).items()}

    def wait(self, blocking: redis.Redis, job_id: str, timeout_s: float) -> None:
        """Block until the job is settled or ``timeout_s`` passes (``blocking`` has no short socket timeout).

        The settle pushes one token on the job's notify list (kept 60 s). Moving it from the list's
        tail to its head leaves it there, so every waiter wakes, not only the first (BLPOP's would
        take it); the list is never emptied, so it keeps its expiry.
        """
        key = notify_key(job_id)
        blocking.blmove(key, key, timeout_s, "RIGHT", "LEFT")

    def wait_json(self, blocking: redis.Redis, job_id: str, timeout_s: float,
                  owner: str | None = None) -> tuple[str, str] | None:
        """``wait``, then ``get_json``, in one round trip: Redis answers the read the moment the wait
        ends. Return the job's JSON text and its stored status (the caller need not parse the text)."""
        key = notify_key(job_id)
        pipe = blocking.pipeline(transaction=False)
        pipe.blmove(key, key, timeout_s, "RIGHT", "LEFT")
        pipe.hgetall(job_key(job_id))
        fields = {k.decode(): v.decode() for k, v in pipe.execute()[1].items()}
        if not fields or (owner is not None and fields.get("owner", "") != owner):
            return None
        if "result_key" in fields and "result" not in fields:  # settled by an older version: read its result
            text = self.get_json(job_id, owner)
            return None if text is None else (text, fields["status"])
        return job_json(fields, fields.get("result")), fields["status"]

    def get_json(self, job_id: str, owner: str | None = None) -> str | None:
        """Return the job as the contract's JSON text, or None when unknown, expired or (when
        ``owner`` is given) submitted by someone else."""
        return self.get_many_json([job_id], owner)[0]

    def get_many_json(self, job_ids: list[str], owner: str | None = None) -> list[str | None]:
        """``get_json`` for many jobs in two pipelined round trips."""
        return [None if read is None else read[1] for read in self.read_many(job_ids, owner)]

    def read_many(self, job_ids: list[str], owner: str | None = None) -> list[tuple[dict, str] | None]:
        """Return each job's hash and its JSON text (None when unknown or not ``owner``'s)."""
        jobs = [f if f and (owner is None or f.get("owner", "") == owner) else None for f in self._hashes(job_ids)]
        pipe = self.redis.pipeline(transaction=False)
        stored = [f for f in jobs if f and "result_key" in f and "result" not in f]
        for fields in stored:  # a job settled by an older version; every job now holds its own answer
            pipe.get(fields["result_key"])
        results = dict(zip(map(id, stored), pipe.execute()))
        return [None if f is None else (f, job_json(f, f["result"] if "result" in f else results.get(id(f))))
                for f in jobs]

    def _hashes(self, job_ids: list[str]) -> list[dict | None]:
        """Each job's hash: from the main server while in flight or in its tail, else from the cache role."""
        found = self._read_hashes(self.redis, job_ids)
        missing = [i for i, f in enumerate(found) if f is None]
        if self.split and missing:
            try:
                for i, fields in zip(missing, self._read_hashes(self.cache, [job_ids[i] for i in missing])):
                    found[i] = fields
            except redis.RedisError as exc:
                log.warning("cache server unreachable, settled jobs unreadable: %s", exc)
                raise Unavailable("Settled jobs are kept on the cache server, which does not answer; "
                                  "retry shortly.", retry_after_s=5) from exc
        return found

    @staticmethod
    def _read_hashes(client: redis.Redis, job_ids: list[str]) -> list[dict | None]:
        pipe = client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(job_key(job_id))
        return [{k.decode(): v.decode() for k, v in f.items()} or None for f in pipe.execute()]

    def get(self, job_id: str) -> dict | None:
        """Return the job as a dict, or None when unknown or expired."""
        text = self.get_json(job_id)
        return None if text is None else json.loads(text)

    def overlay_png(self, job_id: str, owner: str | None = None, render=None) -> bytes | None:
        """Return the heatmap PNG of a finished job (of ``owner``, when given), or None.

        The first request renders it with ``render(model, result_json, picture)`` and caches it
        for as long as the result lives; later ones read the cached PNG.
        """
        fields = self._hashes([job_id])[0] or {}
        result_key, job_owner, inline = (fields.get(name) for name in ("result_key", "owner", "result"))
        if result_key is None or (owner is not None and (job_owner or "") != owner):
            return None
        overlay_key, picture_key = overlay_key_for_result(result_key), picture_key_for_result(result_key)
        try:
            png = self.cache.get(overlay_key)
            if png is not None or render is None:
                return png
            pipe = self.cache.pipeline(transaction=False)
            pipe.get(result_key).get(picture_key).pttl(picture_key)
            result, picture, ttl_ms = pipe.execute()
        except redis.RedisError as exc:
            if not self.split:
                raise
            log.warning("cache server unreachable, no heatmap: %s", exc)
            return None
        result = inline if inline is not None else result
        if result is None or picture is None or ttl_ms <= 0:
            return None
        png = render(Computation.from_suffix(result_key.removeprefix("result:")).model, result, picture)
        if png is not None:
            try:
                self.cache.set(overlay_key, png, px=ttl_ms, nx=True)
            except redis.RedisError:
                if not self.split:
                    raise
        return png
