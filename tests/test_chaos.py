"""Chaos: 200 jobs while worker children and the worker's main process are SIGKILLed.

Own Redis and worker (so the session worker does not share the queues), with a sweeper that looks
every second and treats a computation as stuck after 4 s without a live owner. Every accepted job
must end done, with the same answer an undisturbed in-process run gives.
"""
import dataclasses
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from shared.cards import load_card
from shared.keys import OutputOptions
from shared.settings import REPO_ROOT
from tests import images
from tests.conftest import ARTIFACTS, submit
from tools import stack
from worker.models import load_model
from worker.pipeline import run_batch

pytestmark = pytest.mark.integration
JOBS = 200


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and f"PPid:\t{pid}\n" in (entry / "status").read_text():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.fixture(scope="module")
def chaos_stack(tmp_path_factory, settings):
    redis_proc, url = stack.start_redis(tmp_path_factory.mktemp("chaos-redis"))
    chaos = dataclasses.replace(settings, redis_url=url, stuck_after_s=4, sweep_interval_s=1, max_wait_ms=20)
    holder = {"worker": stack.start_worker(chaos, ARTIFACTS / "chaos-worker-1.log", name="chaos")}
    from web import create_app

    yield chaos, create_app(chaos), holder
    stack.stop(holder["worker"])
    stack.stop(redis_proc)


def test_every_job_survives_killed_workers(chaos_stack):
    settings, app, holder = chaos_stack
    client = app.test_client()
    uploads = [images.noise_png(seed=20_000 + i, size=(96, 64)) for i in range(JOBS)]
    ids = []
    for data in uploads:
        answer = submit(client, data, top_k=3)
        assert answer.status_code == 202
        ids.append(answer.get_json()["id"])

    kills, deadline = 0, time.monotonic() + 30
    while kills < 3 and time.monotonic() < deadline:  # bounded: three child kills at most
        time.sleep(1.5)
        children = _children(holder["worker"].pid)
        if children:
            os.kill(children[0], signal.SIGKILL)
            kills += 1
    time.sleep(1.0)
    os.kill(holder["worker"].pid, signal.SIGKILL)  # the main process too; its children follow it
    holder["worker"].wait(10)
    holder["worker"] = stack.start_worker(settings, ARTIFACTS / "chaos-worker-2.log", name="chaos")

    store = app.extensions["imgsvc"].store
    pending, give_up = set(ids), time.monotonic() + 240
    jobs = {}
    while pending and time.monotonic() < give_up:
        for job_id in list(pending):
            job = store.get(job_id)
            if job["status"] in ("done", "failed"):
                jobs[job_id] = job
                pending.discard(job_id)
        time.sleep(0.5)
    assert not pending, f"{len(pending)} jobs never finished"
    assert all(job["status"] == "done" for job in jobs.values())

    card = load_card(REPO_ROOT / "models" / "efficientnet-lite0.toml")
    model = load_model(card, torch.device("cpu"))
    options = OutputOptions(top_k=3, gradcam=True)
    for data, job_id in zip(uploads, ids):
        alone = run_batch(model, [(data, options)], max_pixels=10**8, amp_dtype="float16")[0].result
        assert [p["index"] for p in jobs[job_id]["result"]["predictions"]] == [p["index"] for p in alone["predictions"]]
    stats = store.computations()
    print(f"\nchaos: {kills} child kills + 1 main kill; computations started again: "
          f"{stats.get('redelivered:efficientnet-lite0', 0)}; finished: {stats.get('done:efficientnet-lite0', 0)}")
