"""DURABLE_ACCEPT: answer 202 only for what survives a Redis crash.

With ``appendfsync always`` the main Redis writes every command to its AOF and fsyncs it before it
replies, so a job it acknowledged survives even a SIGKILL. With replicas (Sentinel), a promoted
replica must hold the job too: after each accepted POST the web writes a marker and ``WAIT``s for
one replica to acknowledge it. The replication stream is ordered, so a replica that has the marker
has every write before it, from any connection (the job script and Celery's message included).
Without either, DURABLE_ACCEPT refuses to start rather than promise what the server cannot keep.

The confirmation is one round trip on one connection, so every part of it comes from one server:
that the keys the request wrote are there (a client that follows the master may be talking to a
replica promoted after the job was written, which lacks it), that server's own ``appendfsync``
(not the one read at start-up, from a master that may be gone), the marker and the ``WAIT``. A
server that lacks the job, neither fsyncs every write nor has a replica confirm: 503.
"""
from __future__ import annotations

import logging
import threading
import time

import redis
from flask import Flask, g, has_request_context, request

from shared.errors import Unavailable
from shared.settings import Settings, SettingsError
from web.errors import RETRY_AFTER_S, error_response

log = logging.getLogger(__name__)
MARKER_KEY = "durable:marker"
REPLICAS_CHECK_S = 5.0  # how long a count of connected replicas is trusted
WAIT_MS = 1000  # how long an accepted POST waits for a replica before it is refused (503)


def remember_written(key: str) -> None:
    """Note a key this request wrote (a job, a batch): DURABLE_ACCEPT confirms it where it confirms."""
    if has_request_context():
        g.setdefault("durable_keys", []).append(key)


class Durability:
    def __init__(self, client: redis.Redis):
        self.client = client
        self.fsync_always = _fsync_always(client)  # at start-up: may it start at all
        self._replicas, self._checked, self._lock = 0, 0.0, threading.Lock()

    def replicas(self) -> int:
        with self._lock:
            if time.monotonic() - self._checked > REPLICAS_CHECK_S:
                self._replicas = int(self.client.info("replication").get("connected_slaves", 0))
                self._checked = time.monotonic()
            return self._replicas

    def settle(self, keys: list[str] = ()) -> None:
        """Return once ``keys`` (what this request wrote) would survive a crash of the master, or raise 503.

        One round trip on one connection: the keys, that server's fsync setting, the marker and
        ``WAIT`` all come from the same server, whichever the client follows now.
        """
        expected = 1 if self.replicas() else 0
        keys = list(dict.fromkeys(keys))
        pipe = self.client.pipeline(transaction=False)
        if keys:
            pipe.exists(*keys)
        else:
            pipe.ping()
        pipe.config_get("append*").set(MARKER_KEY, time.time()).wait(expected, WAIT_MS if expected else 0)
        present, config, marked, acked = pipe.execute(raise_on_error=False)
        if (keys and present != len(keys)) or marked is not True:
            raise Unavailable("The job store lost this request's job in a failover before confirming it; retry "
                              "(with the same Idempotency-Key).")
        fsync_always = _always(config)
        if fsync_always or (isinstance(acked, int) and acked >= 1):
            return  # on this server's disk, or on a replica of it too
        if fsync_always is None and self.fsync_always is None and not expected:
            return  # CONFIG refused (managed Redis) now and at start-up, no replica: trusted (a warning said so)
        with self._lock:
            self._checked = 0.0  # the replica may be gone: count again next time
        raise Unavailable("No replica confirmed the job in time and the job store does not fsync every write "
                          "(DURABLE_ACCEPT); retry with the same Idempotency-Key to get the same job.")


def _always(config) -> bool | None:
    """Whether a CONFIG GET append* reply says appendonly with appendfsync always (None: refused)."""
    if not isinstance(config, dict):
        return None
    return config.get("appendonly") == "yes" and config.get("appendfsync") == "always"


def _fsync_always(client: redis.Redis) -> bool | None:
    """The main Redis's appendonly/appendfsync, or None where CONFIG is not allowed (managed Redis)."""
    try:
        return _always(client.config_get("append*"))
    except redis.ResponseError:
        return None


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
                durability.settle(g.get("durable_keys", []))
            except (Unavailable, redis.RedisError) as exc:  # after_request: answer, do not raise
                error = exc if isinstance(exc, Unavailable) else Unavailable("The job store is unavailable; retry shortly.")
                return error_response(error.status, error.code, error.message, {"Retry-After": str(RETRY_AFTER_S)})
        return response
