"""Kubernetes exec probe: is this pod's worker beating in Redis? Exit 0 yes, 1 no.

    python heartbeat_probe.py worker     an inference worker: at least one pool child of this pod
                                         (heartbeat names ``<host>:<pid>:<boot>``) beat within WORKER_TTL_S
    python heartbeat_probe.py webhooks   a webhook worker: its node ``webhooks@<host>`` beat within it

A child beats only once it has loaded its models, and from its own thread while its loop runs, so
this is what a liveness probe should ask. When Redis itself cannot be reached the probe passes:
restarting workers does not bring Redis back, and would only reload every model once it returns.
Standalone (redis-py only, no imgsvc import) so that it costs a fraction of a second; the key names
are shared/keys.py's WORKERS_KEY and WEBHOOK_WORKERS_KEY (tests/test_kubernetes.py runs it against
a real worker).
"""
import os
import socket
import sys
import time

import redis

WORKERS_KEY = "workers"
WEBHOOK_WORKERS_KEY = "webhook_workers"


def beating(client: redis.Redis, kind: str, host: str, ttl_s: float) -> bool:
    since = time.time() - ttl_s
    if kind == "webhooks":
        seen = client.zscore(WEBHOOK_WORKERS_KEY, f"webhooks@{host}")
        return seen is not None and seen >= since
    return any(name.decode().startswith(f"{host}:") for name in client.zrangebyscore(WORKERS_KEY, since, "+inf"))


def main(argv: list[str]) -> int:
    kind = argv[1] if len(argv) > 1 else "worker"
    if kind not in ("worker", "webhooks"):
        print(f"usage: {argv[0]} worker|webhooks", file=sys.stderr)
        return 2
    host = os.environ.get("HOSTNAME") or socket.gethostname()  # the pod's name, as Celery's %h
    client = redis.Redis.from_url(os.environ["REDIS_URL"], socket_timeout=3, socket_connect_timeout=3)
    try:
        alive = beating(client, kind, host, float(os.environ.get("WORKER_TTL_S", "20")))
    except redis.RedisError as exc:
        print(f"Redis unreachable ({exc}); not a fault of this {kind} pod", file=sys.stderr)
        return 0
    if not alive:
        print(f"no heartbeat from {kind} {host} within WORKER_TTL_S", file=sys.stderr)
    return 0 if alive else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
