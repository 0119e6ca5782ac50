"""Lanes and fair share between senders (docs/internals.md, "Lanes and fair share").

Most tests submit to a model no worker consumes (its queue only grows) and take its messages as a
worker child does (worker.broker.BatchReceiver on a real kombu channel), so the order is read, not
timed. The last one runs the issue's scenario on a real stack with the slow test model: one key's
deep bulk backlog, another key's few jobs and an interactive upload; it compares finishing order.
"""
from __future__ import annotations

import dataclasses
import io
import json
import shutil

import pytest
from celery import Celery

from shared.keys import COMPUTATIONS_KEY, TAKES_KEY, Computation
from shared.settings import Settings
from shared.tasks import celery_config, inference_queue, lane_of, priority_lists, step_for
from tests import images
from tests.conftest import ARTIFACTS, submit, write_slow_card
from tools.stack import start_redis, start_worker, stop, wait_for
from worker.broker import BatchReceiver, message_step, restore_taken_by

pytestmark = pytest.mark.integration
MODEL = "fairq"
ADMIN = "test-fairness-admin-token-7c1d0e9a3b"


@pytest.fixture
def fair_app(settings, cards_dir, tmp_path, redis_client):
    """An app with an extra card no worker consumes, so its queue only grows; no depth bounds."""
    yield _app(settings, cards_dir, tmp_path, max_queue_depth=0, max_queue_depth_per_key=0)
    _cleanup(redis_client, settings)


def _app(settings, cards_dir, tmp_path, **changes):
    from web import create_app

    for card in cards_dir.glob("*.toml"):
        shutil.copy(card, tmp_path)
    shutil.copytree(cards_dir / "weights", tmp_path / "weights")
    text = (cards_dir / "tiny-resnet18.toml").read_text().replace('name = "tiny-resnet18"', f'name = "{MODEL}"')
    (tmp_path / f"{MODEL}.toml").write_text(text)
    return create_app(dataclasses.replace(settings, model_cards_dir=tmp_path, admin_token=ADMIN, **changes))


def _cleanup(redis_client, settings) -> None:
    """Settle every computation of the unconsumed model (releasing its counts) and empty its queue."""
    from shared.jobs import JobStore

    store = JobStore.from_settings(redis_client, settings)
    for raw in redis_client.zrange(COMPUTATIONS_KEY, 0, -1):
        comp = Computation.from_suffix(raw.decode())
        if comp.model == MODEL:
            store.fail(comp, {"code": "test_over", "message": "the test ended"})
    redis_client.delete(*priority_lists(inference_queue(MODEL)))


@pytest.fixture
def taker(settings):
    """Takes messages as a worker child does, from a real kombu channel with the service's settings."""
    app = Celery("fairness-test")
    app.conf.update(celery_config(settings))
    connection = app.connection_for_write()
    receivers = []

    def make(bulk_share: int = 0) -> BatchReceiver:
        receiver = BatchReceiver.for_connection(connection, owner="fairness-test", bulk_share=bulk_share)
        receivers.append(receiver)
        return receiver

    yield make
    for receiver in receivers:
        receiver.close()
    connection.release()


def _key(app, name: str) -> tuple[str, dict]:
    key, token = app.extensions["imgsvc"].keys.create(name)
    return key.id, {"Authorization": f"Bearer {token}"}


def _batch(client, headers: dict, seeds, **fields):
    form = {"image": [(io.BytesIO(images.noise_png(seed=s)), f"{s}.png") for s in seeds], "model": MODEL,
            **fields}
    return client.post("/api/v1/batches", data=form, content_type="multipart/form-data", headers=headers)


def _job(client, headers: dict, seed: int, **fields):
    form = {"image": (io.BytesIO(images.noise_png(seed=seed)), f"{seed}.png"), "model": MODEL, **fields}
    return client.post("/api/v1/jobs", data=form, content_type="multipart/form-data", headers=headers)


def _take_all(receiver: BatchReceiver, per_take: int = 1000) -> list:
    """Take every waiting message, in the order a worker would; acknowledge them."""
    taken = []
    for _ in range(100):
        batch = receiver.take(inference_queue(MODEL), per_take)
        if not batch:
            break
        receiver.ack_now(batch)
        taken += batch
    return taken


def _sha_of(seed: int) -> str:
    from shared.keys import image_digest

    return image_digest(images.noise_png(seed=seed))


def test_the_step_grows_with_the_senders_backlog_over_its_weight():
    assert [step_for("interactive", n) for n in (0, 9, 10, 99, 100, 999, 1000, 10**6)] == [0, 0, 1, 1, 2, 2, 3, 4]
    assert [step_for("bulk", n) for n in (0, 9, 10, 10**6)] == [5, 5, 6, 9]
    assert [step_for("bulk", n, weight=10) for n in (0, 99, 100)] == [5, 5, 6]
    assert {lane_of(step_for(lane, n)) for lane in ("interactive", "bulk") for n in (0, 50, 10**9)} == \
        {"interactive", "bulk"}
    assert all(lane_of(step_for(lane, n)) == lane for lane in ("interactive", "bulk") for n in (0, 50, 10**9))


def test_a_key_with_one_job_goes_ahead_of_a_key_with_a_deep_backlog(fair_app, taker):
    client = fair_app.test_client()
    _, a = _key(fair_app, "fair-a")
    _, b = _key(fair_app, "fair-b")
    for start in range(0, 60, 20):  # A: 60 images in batches of 20 (bulk by default)
        assert _batch(client, a, range(81_000 + start, 81_000 + start + 20)).status_code == 202
    assert _job(client, b, 81_100, priority="bulk").status_code == 202  # B: one job, in the same lane
    assert _job(client, {}, 81_101).status_code == 202  # an anonymous upload: interactive by default

    order = [p.comp.sha256 for p in _take_all(taker())]
    assert len(order) == 62
    assert order[0] == _sha_of(81_101)  # the interactive lane first
    # B waits behind at most the ten of A's that came before it in the lane's first step, not 60.
    assert order.index(_sha_of(81_100)) <= 11
    a_order = [order.index(_sha_of(81_000 + i)) for i in range(60)]
    assert sum(1 for position in a_order if position > order.index(_sha_of(81_100))) >= 50


def test_interactive_work_goes_first_but_bulk_keeps_one_take_in_n(fair_app, taker, redis_client):
    client = fair_app.test_client()
    redis_client.hdel(TAKES_KEY, inference_queue(MODEL))  # the queue's takes are counted from here
    _, a = _key(fair_app, "lanes-a")
    assert _batch(client, a, range(82_000, 82_006)).status_code == 202  # bulk
    for seed in range(82_100, 82_106):
        assert _job(client, a, seed).status_code == 202  # interactive (A's backlog puts them at step 0 still)
    receiver = taker(bulk_share=3)
    lanes = []
    for _ in range(6):
        batch = receiver.take(inference_queue(MODEL), 2)
        receiver.ack_now(batch)
        lanes.append({lane_of(message_step(json.loads(p.raw))) for p in batch})
    # The takes count per queue in Redis: every third takes half its batch from the bulk lane first;
    # the others serve interactive work while there is any, then what is left.
    assert lanes == [{"interactive"}, {"interactive"}, {"bulk", "interactive"}, {"bulk", "interactive"},
                     {"bulk"}, {"bulk"}]


def test_the_per_key_bound_refuses_that_keys_new_work_only(settings, cards_dir, tmp_path, redis_client):
    app = _app(settings, cards_dir, tmp_path, max_queue_depth=0, max_queue_depth_per_key=3)
    try:
        client = app.test_client()
        _, a = _key(app, "bound-a")
        _, b = _key(app, "bound-b")
        assert [_job(client, a, 83_000 + i).status_code for i in range(3)] == [202] * 3
        refused = _job(client, a, 83_010)
        assert refused.status_code == 429 and refused.get_json()["error"]["code"] == "share_full"
        assert "MAX_QUEUE_DEPTH_PER_KEY" in refused.get_json()["error"]["message"]
        assert int(refused.headers["Retry-After"]) > 0
        assert _job(client, a, 83_000).status_code == 202  # the same image attaches: no new computation
        assert _job(client, b, 83_020).status_code == 202  # another key still gets in
        before = set(redis_client.scan_iter("batch:*"))
        whole = _batch(client, b, range(83_030, 83_033))  # B has 1; 3 more would pass 3: refused whole
        assert (whole.status_code, whole.get_json()["error"]["code"]) == (429, "share_full")
        assert set(redis_client.scan_iter("batch:*")) == before
    finally:
        _cleanup(redis_client, settings)


def test_a_weight_set_by_the_cli_or_the_admin_api_orders_new_work(fair_app, taker, redis_client):
    client = fair_app.test_client()
    heavy_id, heavy = _key(fair_app, "weight-heavy")
    _, light = _key(fair_app, "weight-light")
    done = fair_app.test_cli_runner().invoke(args=["keys", "weight", heavy_id, "10"])
    assert done.exit_code == 0 and json.loads(done.stdout)["weight"] == 10.0
    assert fair_app.test_cli_runner().invoke(args=["keys", "weight", heavy_id, "0"]).exit_code != 0
    admin = {"Authorization": f"Bearer {ADMIN}"}
    assert client.post(f"/api/v1/admin/keys/{heavy_id}/weight", json={"weight": "x"}, headers=admin).status_code == 422
    assert client.post("/api/v1/admin/keys/nosuchkey/weight", json={"weight": 2}, headers=admin).status_code == 404
    listed = {k["id"]: k for k in client.get("/api/v1/admin/keys", headers=admin).get_json()["keys"]}
    assert listed[heavy_id]["weight"] == 10.0

    # Weight 10: 30 waiting count as 3, so all of them stay in the lane's first step; weight 1: 20 of 30 do not.
    assert _batch(client, heavy, range(84_000, 84_030)).status_code == 202
    assert _batch(client, light, range(84_100, 84_130)).status_code == 202
    listed = {k["id"]: k for k in client.get("/api/v1/admin/keys", headers=admin).get_json()["keys"]}
    assert listed[heavy_id]["in_flight"] == 30
    steps = {p.comp.sha256: message_step(json.loads(p.raw)) for p in _take_all(taker())}
    assert [steps[_sha_of(s)] for s in range(84_000, 84_030)] == [5] * 30
    assert [steps[_sha_of(s)] for s in range(84_100, 84_130)] == [5] * 10 + [6] * 20

    answer = client.post(f"/api/v1/admin/keys/{heavy_id}/weight", json={"weight": 1}, headers=admin)
    assert answer.status_code == 200 and answer.get_json()["weight"] == 1.0


def test_priority_must_name_a_lane(fair_app, taker):
    client = fair_app.test_client()
    refused = _job(client, {}, 85_000, priority="urgent")
    assert refused.status_code == 422 and refused.get_json()["error"]["code"] == "invalid_option"
    assert _job(client, {}, 85_001, priority="bulk").status_code == 202
    assert _batch(client, {}, [85_002], priority="interactive").status_code == 202
    steps = {p.comp.sha256: message_step(json.loads(p.raw)) for p in _take_all(taker())}
    assert lane_of(steps[_sha_of(85_001)]) == "bulk" and lane_of(steps[_sha_of(85_002)]) == "interactive"


def test_taken_messages_go_back_to_their_own_step(fair_app, taker, redis_client):
    client = fair_app.test_client()
    _, a = _key(fair_app, "back-a")
    assert _batch(client, a, range(86_000, 86_012)).status_code == 202  # steps 5 (10) and 6 (2)
    queue = inference_queue(MODEL)
    receiver = taker()
    lengths = [redis_client.llen(name) for name in priority_lists(queue)]
    taken = receiver.take(queue, 12)
    assert len(taken) == 12 and sum(redis_client.llen(name) for name in priority_lists(queue)) == 0
    receiver.requeue(queue, taken[:6])  # a child that could not claim them puts them back
    restored = restore_taken_by(redis_client, {"fairness-test"})  # the sweeper, for the dead child's rest
    assert restored == 6
    assert [redis_client.llen(name) for name in priority_lists(queue)] == lengths
    again = _take_all(receiver)
    assert sorted(p.comp.sha256 for p in again) == sorted(p.comp.sha256 for p in taken)


def test_admin_and_metrics_show_waiting_work_per_lane_and_sender(fair_app):
    client = fair_app.test_client()
    key_id, a = _key(fair_app, "visible-a")
    assert _batch(client, a, range(87_000, 87_004)).status_code == 202
    assert _job(client, {}, 87_010).status_code == 202
    admin = {"Authorization": f"Bearer {ADMIN}"}
    view = client.get("/api/v1/admin/queues", headers=admin).get_json()
    queue = next(q for q in view["queues"] if q["name"] == inference_queue(MODEL))
    assert queue["lanes"] == {"interactive": 1, "bulk": 4} and queue["depth"] == 5
    shares = {s["share"]: s["in_flight"] for s in view["shares"]}
    assert shares[f"key:{key_id}"] == 4
    text = client.get("/metrics", headers=admin).get_data(as_text=True)
    assert f'imgsvc_queue_lane_depth{{lane="bulk",queue="{inference_queue(MODEL)}"}} 4.0' in text
    assert f'imgsvc_share_in_flight{{share="key:{key_id}"}} 4.0' in text


def test_a_small_senders_jobs_finish_long_before_a_deep_backlog_does(tmp_path_factory):
    """The issue's scenario on a real stack: key A's 96 images in batches of 16 (bulk), then key B's
    four jobs in the same lane and one interactive upload. B's and the upload finish while most of
    A's backlog still waits (the order of finishing, not its times)."""
    cards = write_slow_card(tmp_path_factory.mktemp("fair-cards"))
    redis_proc, url = start_redis(tmp_path_factory.mktemp("fair-redis"))
    settings = Settings(redis_url=url, model_cards_dir=cards, models=("slow",), default_model="slow",
                        worker_devices="cpu", worker_concurrency=1, torch_threads=1, max_batch=4,
                        heartbeat_interval_s=1, worker_ttl_s=5, rate_limit="100000/minute")
    ARTIFACTS.mkdir(exist_ok=True)
    worker = start_worker(settings, ARTIFACTS / "fairness-worker.log", "fair")
    try:
        from web import create_app

        app = create_app(settings)
        client = app.test_client()
        _, a = _key(app, "scenario-a")
        _, b = _key(app, "scenario-b")
        a_jobs = []
        for start in range(0, 96, 16):
            form = {"image": [(io.BytesIO(images.noise_png(seed=s)), f"{s}.png")
                              for s in range(88_000 + start, 88_016 + start)]}
            batch = client.post("/api/v1/batches", data=form, content_type="multipart/form-data", headers=a)
            assert batch.status_code == 202
            a_jobs += [job["id"] for job in batch.get_json()["jobs"]]
        b_jobs = [client.post("/api/v1/jobs", data={"image": (io.BytesIO(images.noise_png(seed=s)), "b.png"),
                                                     "priority": "bulk"},
                              content_type="multipart/form-data", headers=b).get_json()["id"]
                  for s in range(88_100, 88_104)]
        upload = submit(client, images.noise_png(seed=88_200)).get_json()["id"]

        def read(ids, headers):
            return [client.get(f"/api/v1/jobs/{i}", headers=headers).get_json() for i in ids]

        def finished(*groups):
            jobs = [job for ids, headers in groups for job in read(ids, headers)]
            return jobs if all(j["status"] in ("done", "failed") for j in jobs) else None

        small = wait_for(lambda: finished((b_jobs, b), ([upload], {})), 120, "B's jobs and the upload", interval=0.2)
        assert all(j["status"] == "done" for j in small)
        a_states = [job["status"] for job in read(a_jobs, a)]
        assert a_states.count("queued") >= len(a_jobs) // 3, a_states  # much of A's backlog still waits
        everything = wait_for(lambda: finished((a_jobs, a)), 300, "A's backlog", interval=0.5)
        last_small = max(j["finished_at"] for j in small)
        assert sum(1 for j in everything if j["finished_at"] > last_small) >= len(a_jobs) // 3
    finally:
        stop(worker)
        stop(redis_proc)
