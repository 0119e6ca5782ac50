"""Redis failing under the service. A restart in the middle of a stream of uploads: the web answers
503 (never 500, never a long hang) while Redis is away, and every upload that got a 202 still ends
done. Result writes refused between a batch's claim and its write: nothing unwritten is
acknowledged, and every job still ends done, once."""
import dataclasses
import io
import time

import pytest
import redis
from PIL import Image
from werkzeug.datastructures import FileStorage, MultiDict
from werkzeug.test import encode_multipart

from shared.settings import Settings
from shared.tasks import inference_queue, priority_lists
from tests import images
from tests.conftest import ARTIFACTS, submit
from tools import stack

pytestmark = pytest.mark.integration
STREAM_S = 8
OUTAGE_AT_S, OUTAGE_S = 2.0, 2.5


@pytest.fixture(scope="module")
def outage_stack(tmp_path_factory, settings):
    workdir = tmp_path_factory.mktemp("outage-redis")
    port = stack.free_port()
    redis_proc, url = stack.start_redis(workdir, port=port, aof=True)
    own = dataclasses.replace(settings, redis_url=url, stuck_after_s=5, sweep_interval_s=1)
    worker = stack.start_worker(own, ARTIFACTS / "outage-worker.log", name="outage")
    from web import create_app

    holder = {"redis": redis_proc}
    yield own, create_app(own), holder, workdir, port
    stack.stop(worker)
    stack.stop(holder["redis"])


def test_redis_restart_loses_no_accepted_job(outage_stack):
    settings, app, holder, workdir, port = outage_stack
    client = app.test_client()
    accepted, statuses, slowest = [], [], 0.0
    start, seed, restarted = time.monotonic(), 30_000, False
    while time.monotonic() - start < STREAM_S:  # bounded in time and (by the sleep) in count
        elapsed = time.monotonic() - start
        if holder["redis"].poll() is None and OUTAGE_AT_S <= elapsed < OUTAGE_AT_S + OUTAGE_S:
            stack.stop(holder["redis"])  # SIGTERM: Redis flushes its AOF and exits
        if holder["redis"].poll() is not None and elapsed >= OUTAGE_AT_S + OUTAGE_S and not restarted:
            holder["redis"], _ = stack.start_redis(workdir, port=port, aof=True)
            restarted = True
        sent = time.monotonic()
        answer = submit(client, images.noise_png(seed=seed, size=(48, 32)))
        slowest = max(slowest, time.monotonic() - sent)
        seed += 1
        statuses.append(answer.status_code)
        if answer.status_code == 202:
            accepted.append(answer.get_json()["id"])
        else:
            assert answer.status_code == 503 and answer.get_json()["error"]["code"] in ("unavailable", "overloaded")
            assert "Retry-After" in answer.headers
        time.sleep(0.05)
    assert restarted and 503 in statuses and statuses.count(202) > 10
    assert slowest < 5, f"a request took {slowest:.1f} s while Redis was away"

    store = app.extensions["imgsvc"].store
    pending, give_up = set(accepted), time.monotonic() + 120
    while pending and time.monotonic() < give_up:
        for job_id in list(pending):
            job = store.get(job_id)
            assert job is not None, f"accepted job {job_id} vanished"
            if job["status"] == "done":
                pending.discard(job_id)
        time.sleep(0.5)
    assert not pending, f"{len(pending)} of {len(accepted)} accepted jobs never finished"


SLOW = "slow"


@pytest.fixture
def slow_stack(tmp_path):
    """Redis and a worker with one child serving the slow test card (a batch of bright images
    computes for SLOW_S), in batches of up to four; the sweeper's deadline is far away."""
    from tests.conftest import write_card
    from tests.slow_model import Slow

    cards = tmp_path / "cards"
    (cards / "weights").mkdir(parents=True)
    write_card(cards, Slow(10), name=SLOW, description="test-only: a known time per forward pass",
               architecture="python", variant="tests.slow_model:build", resize=64, input_size=64, layer="features")
    redis_proc, url = stack.start_redis(tmp_path)
    own = Settings(redis_url=url, model_cards_dir=cards, models=(SLOW,), default_model=SLOW, worker_devices="cpu",
                   worker_concurrency=1, torch_threads=1, max_batch=4, max_wait_ms=1000, heartbeat_interval_s=1,
                   worker_ttl_s=5, rate_limit="100000/minute")
    worker = None
    try:
        ARTIFACTS.mkdir(exist_ok=True)
        worker = stack.start_worker(own, ARTIFACTS / "unwritten-worker.log", name="unwritten")
        yield own, redis.Redis.from_url(url), ARTIFACTS / "unwritten-worker.log"
    finally:
        if worker is not None:
            stack.stop(worker)
        stack.stop(redis_proc)


def test_results_refused_after_the_claim_leave_their_messages_unacknowledged(slow_stack):
    """Redis refuses the result writes of a claimed batch (an ACL that denies the result keys,
    set while the batch computes): no message is acknowledged without its result; each comes
    back, and once Redis takes writes again every job ends done with one computation each."""
    from web import create_app

    settings, admin, log = slow_stack
    client = create_app(settings).test_client()
    uploads = [images.encode(Image.new("RGB", (64, 48), (shade,) * 3), "PNG") for shade in (250, 251, 252, 253)]
    boundary, body = encode_multipart(MultiDict([("image", FileStorage(io.BytesIO(d), f"{i}.png"))
                                                 for i, d in enumerate(uploads)]))
    answer = client.post("/api/v1/batches", data=body, content_type=f"multipart/form-data; boundary={boundary}")
    assert answer.status_code == 202, answer.get_json()
    job_ids = [job["id"] for job in answer.get_json()["jobs"]]
    store = create_app(settings).extensions["imgsvc"].store

    def statuses() -> list[str]:
        return [store.get(job_id)["status"] for job_id in job_ids]

    stack.wait_for(lambda: statuses() == ["running"] * 4, 20, "the batch to be claimed", interval=0.02)
    admin.execute_command("ACL", "SETUSER", "default", "resetkeys", "~[^r]*")  # result:* refused
    try:
        stack.wait_for(lambda: "could not write the results" in log.read_text(), 30, "the refused write")
        queue = inference_queue(SLOW)

        def held() -> int:  # the batch's messages not acknowledged: in kombu's unacked set or queued
            return admin.hlen("unacked") + sum(admin.llen(name) for name in priority_lists(queue))

        stack.wait_for(lambda: held() >= 4, 10, "every unwritten message to be held, not acknowledged")  # 1 before
    finally:
        admin.execute_command("ACL", "SETUSER", "default", "allkeys")
    jobs = stack.wait_for(lambda: statuses() == ["done"] * 4 and [store.get(j) for j in job_ids], 60,
                          "every job to be done")
    assert all(job["result"]["predictions"] for job in jobs)
    counted = store.computations()
    assert counted.get(f"done:{SLOW}") == 4 and f"failed:{SLOW}" not in counted  # one answer each
    assert int(counted.get(f"redelivered:{SLOW}", 0)) >= 4  # all four came back and were computed again


def test_a_batch_whose_claim_is_refused_goes_back_to_its_queue(slow_stack):
    """Redis refuses a batch's claim (the ACL again, set while a slow job holds the only child and
    four more wait): the messages the child took for that batch go back on the queue at once,
    rather than waiting out the visibility timeout (600 s here), and every job ends done."""
    from web import create_app

    settings, admin, log = slow_stack
    app = create_app(settings)
    client, store = app.test_client(), app.extensions["imgsvc"].store
    blocker = submit(client, images.encode(Image.new("RGB", (64, 48), (254,) * 3), "PNG")).get_json()["id"]
    stack.wait_for(lambda: store.get(blocker)["status"] == "running", 20, "the slow job to start", interval=0.02)
    waiting = [submit(client, images.noise_png(seed=31_000 + i)).get_json()["id"] for i in range(4)]
    admin.execute_command("ACL", "SETUSER", "default", "resetkeys", "~[^r]*")  # claims read result:*
    try:
        stack.wait_for(lambda: "Redis failed while computing" in log.read_text(), 30, "a refused claim")
    finally:
        admin.execute_command("ACL", "SETUSER", "default", "allkeys")
    job_ids = [blocker, *waiting]
    stack.wait_for(lambda: all(store.get(j)["status"] == "done" for j in job_ids), 60, "every job to be done")
    assert store.computations().get(f"done:{SLOW}") == len(job_ids)
