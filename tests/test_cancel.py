"""Cancel and deadlines (issue 21, items 1 and 2) on a real stack: Redis, a Celery worker whose model
counts the images it computes (tests/counting_model.py), the webhook worker and a real receiver."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

import pytest
from standardwebhooks import Webhook

from prometheus_client.parser import text_string_to_metric_families

from shared import fleet
from shared.keys import Computation, OutputOptions
from shared.metrics import exposition, registry_for
from shared.settings import Settings
from tests import images
from tests.conftest import ARTIFACTS, WEBHOOK_SECRET, write_card
from tests.counting_model import Counting, computed
from tests.receiver import Receiver
from tools import stack

pytestmark = pytest.mark.integration
MODEL = "counting"
SETTLED = ("done", "failed", "canceled")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Redis, the app (in this process), the webhook worker and a receiver; inference workers are
    started by each test, after it has queued (and canceled) its jobs."""
    tmp = tmp_path_factory.mktemp("cancel")
    cards = tmp / "cards"
    (cards / "weights").mkdir(parents=True)
    write_card(cards, Counting(10), name=MODEL, description="test-only: counts the images it computes",
               architecture="python", variant="tests.counting_model:build", resize=64, input_size=64,
               layer="features")
    redis_proc, url = stack.start_redis(tmp)
    settings = Settings(redis_url=url, model_cards_dir=cards, models=(MODEL,), default_model=MODEL,
                        worker_devices="cpu", worker_concurrency=1, torch_threads=1, max_batch=4, max_wait_ms=50,
                        heartbeat_interval_s=1, worker_ttl_s=5, rate_limit="100000/minute",
                        webhook_secret=WEBHOOK_SECRET, webhook_allow_private=True, webhook_retry_schedule=(1, 1, 1),
                        webhook_timeout_s=3, secret_key="test-secret-key")
    ARTIFACTS.mkdir(exist_ok=True)
    log_path = tmp / "computed.log"
    saved = os.environ.get("COUNTING_MODEL_LOG")
    os.environ["COUNTING_MODEL_LOG"] = str(log_path)  # the workers started from here inherit it
    hooks = stack.start_webhook_worker(settings, ARTIFACTS / "cancel-webhooks.log", name="cancel-webhooks")
    from web import create_app

    app = create_app(settings)
    try:
        with Receiver() as receiver:
            yield app, app.test_client(), receiver, settings, log_path
    finally:
        stack.stop(hooks)
        stack.stop(redis_proc)
        if saved is None:
            os.environ.pop("COUNTING_MODEL_LOG", None)
        else:
            os.environ["COUNTING_MODEL_LOG"] = saved


@pytest.fixture(scope="module")
def web_url(env):
    """The app under gunicorn, for the ``imgsvc`` command line."""
    proc, url = stack.start_web(env[3], threads=2)
    yield url
    stack.stop(proc)


def run_imgsvc(url: str, *args: str):
    return subprocess.run([sys.executable, "-m", "client.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "IMGSVC_URL": url})


@pytest.fixture
def workers(env):
    """Start the inference worker when the test calls it; stop it at the end of the test."""
    started = []

    def start():
        started.append(stack.start_worker(env[3], ARTIFACTS / "cancel-worker.log", name="cancel"))

    yield start
    for proc in started:
        stack.stop(proc)


def post_job(client, image: bytes, headers=None, **fields):
    form = {"image": (io.BytesIO(image), "upload.png"), **{k: str(v) for k, v in fields.items()}}
    return client.post("/api/v1/jobs", data=form, content_type="multipart/form-data", headers=headers or {})


def settle(client, job_id: str, timeout: float = 60, headers=None) -> dict:
    def settled():
        job = client.get(f"/api/v1/jobs/{job_id}", headers=headers or {}).get_json()
        return job if job["status"] in SETTLED else None

    return stack.wait_for(settled, timeout, f"job {job_id} to settle", interval=0.05)


def queue_drained(app) -> bool:
    """Every message of the model's queue taken and acknowledged (nothing waits, nothing unacked)."""
    redis_client = app.extensions["imgsvc"].redis
    return redis_client.llen(f"inference.{MODEL}") == 0 and redis_client.hlen("unacked") == 0


def comp_of(job: dict) -> Computation:
    return Computation(MODEL, job["model"]["version"], job["image"]["sha256"], OutputOptions(**job["options"]))


def unstarted(app) -> tuple[float, float]:
    """/metrics' count of jobs failed past their deadline at claim, and of computations skipped at claim."""
    svc = app.extensions["imgsvc"]
    text = exposition(registry_for(svc.redis, ttl_s=60, models=[MODEL])).decode()
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("model") == MODEL:
                found[sample.name] = found.get(sample.name, 0.0) + sample.value
    return found.get("imgsvc_jobs_deadline_exceeded_total", 0.0), found.get("imgsvc_computations_skipped_total", 0.0)


def heartbeat_counts(app) -> tuple[int, int]:
    """The same two counts, summed over the live workers' heartbeats (the admin API's nodes)."""
    nodes = fleet.nodes(app.extensions["imgsvc"].redis, ttl_s=60)
    return (sum(n["jobs_deadline_exceeded"] for n in nodes), sum(n["computations_skipped"] for n in nodes))


def test_a_canceled_queued_job_is_never_computed_and_calls_back(env, workers):
    app, client, receiver, _, log_path = env
    job = post_job(client, images.noise_png(seed=91_001), callback_url=receiver.url + "/canceled").get_json()
    control = post_job(client, images.noise_png(seed=91_002)).get_json()
    assert job["status"] == "queued"
    answer = client.post(f"/api/v1/jobs/{job['id']}/cancel")
    assert answer.status_code == 200 and answer.get_json()["status"] == "canceled"
    assert answer.get_json()["finished_at"] is not None
    before, counted = computed(log_path), unstarted(app)
    workers()
    assert settle(client, control["id"])["status"] == "done"
    stack.wait_for(lambda: queue_drained(app), 30, "the queue to be drained")
    assert computed(log_path) == before + 1  # the control image only
    assert unstarted(app) == (counted[0], counted[1] + 1)  # one computation skipped, no job past a deadline
    stack.wait_for(lambda: heartbeat_counts(app) == (0, 1), 10, "the worker's heartbeat to count the skip")
    assert client.get(f"/api/v1/jobs/{job['id']}").get_json()["status"] == "canceled"
    # the skipped computation's bookkeeping is released, as a finished one's is
    store = app.extensions["imgsvc"].store
    assert not store.redis.exists(comp_of(job).inflight_key, comp_of(job).image_key)
    [call] = receiver.wait("/canceled", 1)
    payload = Webhook(WEBHOOK_SECRET).verify(call.body, call.headers)
    assert payload["type"] == "job.canceled"
    assert payload["data"]["id"] == job["id"] and payload["data"]["status"] == "canceled"


def test_cancelling_one_of_three_identical_jobs_leaves_the_others_their_result(env, workers):
    app, client, _, _, log_path = env
    image = images.noise_png(seed=91_010)
    first, second, third = (post_job(client, image).get_json() for _ in range(3))
    assert client.post(f"/api/v1/jobs/{second['id']}/cancel").status_code == 200
    before = computed(log_path)
    workers()
    settled = [settle(client, job["id"]) for job in (first, second, third)]
    assert [job["status"] for job in settled] == ["done", "canceled", "done"]
    assert settled[0]["result"]["predictions"] == settled[2]["result"]["predictions"]
    assert settled[1]["result"] is None
    stack.wait_for(lambda: queue_drained(app), 30, "the queue to be drained")
    assert computed(log_path) == before + 1  # one computation for the two that still waited


def test_cancelling_a_batch_mid_way_cancels_the_rest_and_its_event_counts_them(env, workers):
    app, client, receiver, _, log_path = env
    form = {"image": [(io.BytesIO(images.noise_png(seed=92_000 + i, size=(32, 32))), f"{i}.png") for i in range(50)],
            "callback_url": receiver.url + "/batch"}
    batch = client.post("/api/v1/batches", data=form, content_type="multipart/form-data").get_json()
    before = computed(log_path)
    workers()

    def some_done():
        counts = client.get(f"/api/v1/batches/{batch['id']}").get_json()["counts"]
        return counts["done"] >= 4

    stack.wait_for(some_done, 60, "the first jobs of the batch to be done", interval=0.05)
    answer = client.post(f"/api/v1/batches/{batch['id']}/cancel")
    assert answer.status_code == 200
    counts = answer.get_json()["counts"]
    assert counts["canceled"] > 0 and counts["queued"] == counts["running"] == 0
    assert counts["done"] + counts["canceled"] == 50
    [call] = receiver.wait("/batch", 1)
    payload = Webhook(WEBHOOK_SECRET).verify(call.body, call.headers)
    assert payload["type"] == "batch.completed" and payload["data"]["counts"] == counts
    assert {job["status"] for job in payload["data"]["jobs"]} <= {"done", "canceled"}
    stack.wait_for(lambda: queue_drained(app), 60, "the queue to be drained")
    assert computed(log_path) - before < 50  # the canceled jobs still queued were skipped
    again = client.post(f"/api/v1/batches/{batch['id']}/cancel")  # idempotent
    assert again.status_code == 200 and again.get_json()["counts"] == counts


def test_a_job_not_started_by_its_deadline_fails_without_a_forward_pass(env, workers, web_url, tmp_path):
    app, client, _, _, log_path = env
    accepted = time.time()
    late = post_job(client, images.noise_png(seed=91_020), deadline_s=1).get_json()
    header = post_job(client, images.noise_png(seed=91_021), headers={"Cancel-After": "1s"}).get_json()
    (tmp_path / "late.png").write_bytes(images.noise_png(seed=91_023))
    waited = run_imgsvc(web_url, "submit", str(tmp_path / "late.png"), "--deadline", "1", "--timeout", "1", "-q")
    assert waited.returncode == 1  # still queued when its --timeout passed: no worker runs yet
    by_cli = json.loads(waited.stdout)["job"]
    control = post_job(client, images.noise_png(seed=91_022), deadline_s=600).get_json()
    time.sleep(max(0.0, accepted + 1.5 - time.time()))  # the workers start after the deadlines passed
    before, counted = computed(log_path), unstarted(app)
    workers()
    assert settle(client, control["id"])["status"] == "done"
    for job in (late, header, by_cli):
        failed = settle(client, job["id"])
        assert (failed["status"], failed["error"]["code"]) == ("failed", "deadline_exceeded")
    stack.wait_for(lambda: queue_drained(app), 30, "the queue to be drained")
    assert computed(log_path) == before + 1
    # each late job failed at its computation's claim, which then had no job left: skipped
    assert unstarted(app) == (counted[0] + 3, counted[1] + 3)
    stack.wait_for(lambda: heartbeat_counts(app) == (3, 3), 10, "the worker's heartbeat to count them")


@pytest.mark.parametrize("value", ["-1", "abc", "nan", str(8 * 24 * 3600)])
def test_a_bad_deadline_is_refused(env, value):
    answer = post_job(env[1], images.noise_png(seed=91_030), deadline_s=value)
    assert answer.status_code == 422 and answer.get_json()["error"]["code"] == "invalid_option"
    assert "deadline_s" in answer.get_json()["error"]["message"]


@pytest.mark.parametrize("value", ["soon", "-5s", "5d", "9999999h"])
def test_a_bad_cancel_after_header_is_refused(env, value):
    answer = post_job(env[1], images.noise_png(seed=91_031), headers={"Cancel-After": value})
    assert answer.status_code == 422 and "Cancel-After" in answer.get_json()["error"]["message"]


def test_cancel_is_for_the_owner_idempotent_and_refused_once_settled(env, workers, web_url):
    app, client, _, _, _ = env
    keys = [json.loads(app.test_cli_runner().invoke(args=["keys", "create", name]).stdout) for name in ("al", "bo")]
    alice, bob = ({"Authorization": f"Bearer {key['api_key']}"} for key in keys)
    job = post_job(client, images.noise_png(seed=91_040), alice).get_json()
    assert client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=bob).status_code == 404
    assert client.post(f"/api/v1/jobs/{job['id']}/cancel").status_code == 404  # anonymous is another owner
    first = client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=alice)
    second = client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=alice)
    assert (first.status_code, second.status_code) == (200, 200)
    assert first.get_json() == second.get_json()
    by_cli = run_imgsvc(web_url, "cancel", job["id"], "--api-key", keys[0]["api_key"])
    assert by_cli.returncode == 0 and json.loads(by_cli.stdout) == first.get_json()
    done = post_job(client, images.noise_png(seed=91_041), alice).get_json()
    workers()
    assert settle(client, done["id"], headers=alice)["status"] == "done"
    refused = client.post(f"/api/v1/jobs/{done['id']}/cancel", headers=alice)
    assert refused.status_code == 409 and refused.get_json()["error"]["code"] == "already_settled"
    by_cli = run_imgsvc(web_url, "cancel", done["id"], "--api-key", keys[0]["api_key"])
    assert by_cli.returncode == 1 and "already_settled" in by_cli.stderr
    assert client.get(f"/api/v1/jobs/{done['id']}", headers=alice).get_json()["status"] == "done"
    assert client.post("/api/v1/jobs/" + "0" * 32 + "/cancel", headers=alice).status_code == 404


def test_the_upload_page_cancels_a_queued_job(env, web_url, tmp_path):
    from playwright.sync_api import sync_playwright

    from tests.test_page import CHROMIUM, CHROMIUM_ARGS

    image = tmp_path / "wait-for-me.png"
    image.write_bytes(images.noise_png(seed=91_050))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            tab = browser.new_context().new_page()
            tab.goto(web_url + "/")
            tab.set_input_files("#file-input", [str(image)])  # no worker runs: it stays queued
            card = tab.locator(".job").first
            button = card.get_by_role("button", name="Cancel the job of wait-for-me.png")
            button.wait_for(state="visible", timeout=30_000)
            assert card.get_attribute("data-status") == "queued"
            button.click()
            tab.wait_for_function("document.querySelector('.job').dataset.status === 'canceled'", timeout=30_000)
            assert card.locator(".badge.status").text_content() == "canceled"
            assert button.is_hidden()
            job_id = card.get_attribute("data-job-id")
        finally:
            browser.close()
    assert env[1].get(f"/api/v1/jobs/{job_id}").get_json()["status"] == "canceled"
