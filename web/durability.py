"""DURABLE_ACCEPT: answer 202 only for what survives a Redis crash.

With ``appendfsync always`` the main Redis writes every command to its AOF and fsyncs it before it
replies, so a job it acknowledged survives even a SIGKILL. With replicas (Sentinel), a promoted
replica must hold the job too: after each accepted POST the web writes a marker and ``WAIT``s for
one replica to acknowledge it. The replication stream is ordered, so a replica that has the marker
has every write before it, from any connection (the job script and Celery's message included).
Without either, DURABLE_ACCEPT refuses to start rather than promise what the server cannot keep.
"""
from __future__ import annotations

import logging
import threading
import time

import redis
from flask import Flask, request

from shared.errors import Unavailable
from shared.settings import Settings, SettingsError
from web.errors import RETRY_AFTER_S, error_response

log = logging.getLogger(__name__)
MARKER_KEY = "durable:marker"
REPLICAS_CHECK_S = 5.0  # how long a count of connected replicas is trusted
WAIT_MS = 1000  # how long an accepted POST waits for a replica before it is refused (503)


class Durability:
    def __init__(self, client: redis.Redis):
        self.client = client
        self.fsync_always = _fsync_always(client)
        self._replicas, self._checked, self._lock = 0, 0.0, threading.Lock()

    def replicas(self) -> int:
        with self._lock:
            if time.monotonic() - self._checked > REPLICAS_CHECK_S:
                self._replicas = int(self.client.info("replication").get("connected_slaves", 0))
                self._checked = time.monotonic()
            return self._replicas

    def settle(self) -> None:
        """Return once what this request wrote would survive a crash of the master, or raise 503."""
        if not self.replicas():
            if self.fsync_always is False:  # the replica it started with is gone, and no fsync
                raise Unavailable("No replica is connected to confirm the job and the job store does not "
                                  "fsync every write (DURABLE_ACCEPT); retry with the same Idempotency-Key.")
            return  # fsync always (checked at start-up): the writes are on disk already
        acked = self.client.pipeline(transaction=False).set(MARKER_KEY, time.time()).wait(1, WAIT_MS).execute()[1]
        if acked >= 1:
            return
        with self._lock:
            self._checked = 0.0  # the replica may be gone: count again next time
        if self.fsync_always:
            log.warning("no replica acknowledged within %d ms; the job is on the master's disk", WAIT_MS)
            return
        raise Unavailable("The job was written but no replica confirmed it in time; retry with the same "
                          "Idempotency-Key to get the same job.")


def _fsync_always(client: redis.Redis) -> bool | None:
    """The main Redis's appendonly/appendfsync, or None where CONFIG is not allowed (managed Redis)."""
    try:
        config = client.config_get("append*")
    except redis.ResponseError:
        return None
    return config.get("appendonly") == "yes" and config.get("appendfsync") == "always"


def install(app: Flask, settings: Settings, client: redis.Redis) -> None:
    if not settings.durable_accept:
        return
    durability = Durability(client)
    if durability.fsync_always is False and not durability.replicas():
        raise SettingsError("DURABLE_ACCEPT=true needs the main Redis to run with appendonly yes and "
                            "appendfsync always (make run and docker-compose.yml do so when DURABLE_ACCEPT "
                            "/ REDIS_APPENDFSYNC say so), or a replica to WAIT for")
    if durability.fsync_always is None:
        log.warning("DURABLE_ACCEPT: cannot read the Redis config; make sure it runs appendfsync always")

    @app.after_request
    def settle(response):
        if request.method == "POST" and response.status_code in (200, 201, 202):
            try:
                durability.settle()
            except (Unavailable, redis.RedisError) as exc:  # after_request: answer, do not raise
                error = exc if isinstance(exc, Unavailable) else Unavailable("The job store is unavailable; retry shortly.")
                return error_response(error.status, error.code, error.message, {"Retry-After": str(RETRY_AFTER_S)})
        return response
