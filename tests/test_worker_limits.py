"""A batch of pixel bombs (each under MAX_IMAGE_PIXELS, together gigabytes when decoded) keeps a
worker child's decode memory within what docs/operations.md promises for MAX_BATCH_PIXELS, on
both decode paths (Pillow's, and the device path that DEVICE_DECODE=on runs here on the CPU)."""
import contextlib
import dataclasses
import io
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image
from werkzeug.datastructures import FileStorage, MultiDict
from werkzeug.test import encode_multipart

from tests.conftest import ARTIFACTS
from tools import stack

pytestmark = pytest.mark.integration
SIZE = (8000, 6000)  # 48 MP: under the default MAX_IMAGE_PIXELS (50 MP); ~0.2 MB each as a solid PNG
BOMBS = 8
MAX_BATCH_PIXELS = 50_000_000  # one bomb at a time
# docs/operations.md: a child's decode memory stays under 4 bytes per MAX_BATCH_PIXELS pixel, plus
# ~100 MB for the bands being reduced and the batch's crops.
BUDGET_MB = MAX_BATCH_PIXELS * 4 / 2**20 + 100


def solid_pngs(count: int) -> list[bytes]:
    """``count`` different solid 48 MP PNGs (RGBA and palette), made from two encodes."""
    encoded = []
    for mode, colour in (("RGBA", (200, 120, 40, 128)), ("P", 7)):
        out = io.BytesIO()
        Image.new(mode, SIZE, colour).save(out, "PNG")
        encoded.append(out.getvalue())
    return [_with_text(encoded[i % 2], f"bomb {i}") for i in range(count)]


def _with_text(png: bytes, text: str) -> bytes:
    """The same PNG with a tEXt chunk after IHDR: other bytes (another job), the same pixels."""
    body = b"Comment\x00" + text.encode()
    chunk = struct.pack(">I", len(body)) + b"tEXt" + body + struct.pack(">I", zlib.crc32(b"tEXt" + body))
    return png[:33] + chunk + png[33:]


def memory_of(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of one process, in MiB."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    return {name: int(fields[name].split()[0]) // 1024 for name in ("VmRSS", "VmHWM")}


def children_of(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@contextlib.contextmanager
def bomb_worker(tmp_path, settings, name: str, **overrides):
    """Redis, a worker with one child serving Lite0 in batches of BOMBS, and the web app's test client."""
    from web import create_app

    own = dataclasses.replace(settings, worker_concurrency=1, max_batch=BOMBS, max_batch_pixels=MAX_BATCH_PIXELS,
                              models=("efficientnet-lite0",), default_model="efficientnet-lite0", **overrides)
    redis_proc, url = stack.start_redis(tmp_path)
    own = dataclasses.replace(own, redis_url=url)
    worker = None
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        worker = stack.start_worker(own, ARTIFACTS / f"{name}-worker.log", name=name)
        yield worker, create_app(own).test_client()
    finally:
        if worker is not None:
            stack.stop(worker)
        stack.stop(redis_proc)


def post_bombs(client, bombs: list[bytes]) -> str:
    """Send the bombs as one batch; return its id."""
    # Encoded here, in memory: the test client would spool a body this size to a temporary file.
    boundary, body = encode_multipart(MultiDict(
        [("image", FileStorage(io.BytesIO(data), f"bomb{i}.png")) for i, data in enumerate(bombs)]))
    answer = client.post("/api/v1/batches", data=body, content_type=f"multipart/form-data; boundary={boundary}")
    assert answer.status_code == 202, answer.get_json()
    return answer.get_json()["id"]


def wait_settled(client, batch_id: str, timeout: float) -> dict:
    def settled():
        batch = client.get(f"/api/v1/batches/{batch_id}").get_json()
        return batch if batch["counts"]["done"] + batch["counts"]["failed"] == batch["counts"]["total"] else None

    return stack.wait_for(settled, timeout, "the bombs to be answered", interval=0.5)


@pytest.mark.parametrize("device_decode", ["off", "on"])
def test_a_batch_of_pixel_bombs_stays_within_the_decode_budget(tmp_path, settings, device_decode):
    bombs = solid_pngs(BOMBS)
    with bomb_worker(tmp_path, settings, f"limits-{device_decode}", device_decode=device_decode,
                     job_soft_time_limit_s=120, job_time_limit_s=180) as (worker, client):
        [child] = children_of(worker.pid)
        Path(f"/proc/{child}/clear_refs").write_text("5")  # VmHWM from now on
        idle = memory_of(child)["VmRSS"]
        batch = wait_settled(client, post_bombs(client, bombs), 240)
        rise = memory_of(child)["VmHWM"] - idle
        assert children_of(worker.pid) == [child]  # nothing was killed and replaced on the way
        assert batch["counts"]["done"] == BOMBS, batch["jobs"]
        print(f"decode_device={device_decode}: peak rise {rise} MiB over an idle {idle} MiB")
        assert rise < BUDGET_MB, f"decoding {BOMBS} bombs took the child {rise} MiB above idle"


def test_a_soft_time_limit_while_the_first_batch_decodes_strands_no_job(tmp_path, settings):
    """The soft limit passes while a loop's first batch is still being decoded: its first job fails
    with ``timeout`` (Celery acknowledges its message next) and the rest go back on the queue, where
    they are computed; before, the first was acknowledged with its job left running, and the rest
    waited out the visibility timeout."""
    with bomb_worker(tmp_path, settings, "limits-soft", job_soft_time_limit_s=2, job_time_limit_s=60) as (_, client):
        batch = wait_settled(client, post_bombs(client, solid_pngs(BOMBS)), 90)
    failed = [job for job in batch["jobs"] if job["status"] == "failed"]
    assert failed and all(job["error"]["code"] == "timeout" for job in failed)  # the limit did pass


def test_threads_decoding_for_one_child_hold_no_more_pixels_than_its_budget():
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from shared.cards import load_card
    from shared.keys import OutputOptions
    from shared.settings import REPO_ROOT
    from tests import images
    from worker.models import load_model
    from worker.pipeline import PixelBudget, stage_all

    model = load_model(load_card(REPO_ROOT / "models" / "efficientnet-lite0.toml"), torch.device("cpu"))
    small = [images.encode(Image.new("RGB", (2000, 1500), (i * 20, 90, 160)), "PNG") for i in range(8)]
    big = images.encode(Image.new("RGB", (4000, 3000), (9, 9, 9)), "PNG")  # more than the whole budget
    for uploads in (small, [*small[:3], big, *small[3:]]):
        budget = PixelBudget(7_000_000)  # two small ones at once
        with ThreadPoolExecutor(4) as pool:
            staged, failures = stage_all([(data, OutputOptions()) for data in uploads], model, 50_000_000,
                                         pool, budget)
        assert failures == {} and sorted(s.index for s in staged) == list(range(len(uploads)))
        assert budget.held == 0
        if big not in uploads:
            assert 3_000_000 <= budget.peak <= 7_000_000
    assert budget.peak == 12_000_000  # the big one went through, alone
