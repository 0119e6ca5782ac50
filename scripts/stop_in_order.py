"""Run one Procfile process so that Ctrl-C on `make run` stops it in order:
``python scripts/stop_in_order.py [--last PORT] COMMAND...``.

honcho stops `make run` by sending SIGTERM to the process group of every process at once. That
group holds a Celery worker's pool children too: they die at once, and the task they were running
ends in a WorkerLostError traceback instead of the warm shutdown the main process starts. And Redis
would be gone within milliseconds, while the workers and the web still say goodbye (Celery cancels
its consumers, a worker withdraws its heartbeat, the webhook worker its entry), each write failing
with a traceback.

So COMMAND runs in a process group of its own, which honcho's signal does not reach, and on SIGTERM
or SIGINT this wrapper passes SIGTERM to COMMAND's main process alone. With ``--last PORT`` (a
redis-server on that port) it first waits until the server's other clients have disconnected, at most
GRACE_S (honcho kills whatever is left 5 s after the first process stops). If this wrapper dies any
other way, COMMAND gets SIGTERM all the same (PR_SET_PDEATHSIG).
"""
from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
import time

import redis

GRACE_S = 4.0
POLL_S = 0.05


class Stop(Exception):
    """SIGTERM or SIGINT reached this wrapper."""


def _stop(signum, frame):
    raise Stop


def _die_with_parent() -> None:
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def wait_for_clients_to_leave(port: int) -> None:
    """Return once no client but this one is connected to the Redis on ``port``, or after GRACE_S."""
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1, socket_connect_timeout=1)
    deadline = time.monotonic() + GRACE_S
    try:
        while int(client.info("clients")["connected_clients"]) > 1 and time.monotonic() < deadline:
            time.sleep(POLL_S)
    except redis.RedisError:
        pass  # the server is gone already: nothing to wait for
    finally:
        client.close()


def run(command: list[str], last_on_port: int | None = None) -> int:
    """Run ``command`` until it exits; on a stop signal, stop it (after its clients, with a port)."""
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    process = subprocess.Popen(command, start_new_session=True, preexec_fn=_die_with_parent)
    try:
        code = process.wait()
    except Stop:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if last_on_port is not None:
            wait_for_clients_to_leave(last_on_port)
        process.terminate()
        code = process.wait()
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    args = sys.argv[1:]
    port = int(args[1]) if args[:1] == ["--last"] else None
    sys.exit(run(args[2:] if port is not None else args, port))
