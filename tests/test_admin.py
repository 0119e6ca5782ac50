"""Two real worker processes on one real Redis, administered through the real admin API and page.

Each worker has one CPU child serving the `slow` test card (tests/slow_model.py): a fixed time per
forward pass, and a long one for bright images, so that a job can be held in flight on purpose.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import redis
import requests
from PIL import Image
from playwright.sync_api import sync_playwright
from prometheus_client.parser import text_string_to_metric_families

from shared.keys import tokenfail_key
from shared.settings import Settings
from tests import images
from tests.conftest import ARTIFACTS, write_card
from tests.slow_model import Slow
from tools.stack import free_port, service_env, spawn, start_redis, start_web, start_worker, stop, wait_for

pytestmark = pytest.mark.integration
TOKEN = "test-admin-token-8c1f-5d0e27a94b3f6c81"  # ADMIN_TOKEN needs 32+ characters
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MODEL, VERSION = "slow", "test-1"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@dataclasses.dataclass
class Fleet:
    url: str
    redis: redis.Redis
    settings: Settings
    metrics_ports: dict[str, int]  # node name -> its WORKER_METRICS_PORT


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """Redis, two workers named a@ and b@ (one child each), and the web app with an admin token."""
    cards = tmp_path_factory.mktemp("slow-cards")
    (cards / "weights").mkdir()
    write_card(cards, Slow(10), name=MODEL, description="test-only: a known time per forward pass",
               architecture="python", variant="tests.slow_model:build", resize=64, input_size=64,
               layer="features")
    redis_proc, url = start_redis(tmp_path_factory.mktemp("fleet-redis"))
    settings = Settings(redis_url=url, model_cards_dir=cards, models=(MODEL,), default_model=MODEL,
                        worker_devices="cpu", worker_concurrency=1, torch_threads=1, max_batch=2,
                        max_wait_ms=50, task_events=True,
                        heartbeat_interval_s=1, worker_ttl_s=4, admin_token=TOKEN)
    ARTIFACTS.mkdir(exist_ok=True)
    ports = {"a": free_port(), "b": free_port()}
    # One after the other, from this thread: PR_SET_PDEATHSIG fires when the spawning *thread* ends.
    workers = [start_worker(settings, ARTIFACTS / f"fleet-worker-{name}.log", name, metrics_port=port,
                            ready_children=count)
               for count, (name, port) in enumerate(ports.items(), start=1)]
    web, base = start_web(settings)
    client = redis.Redis.from_url(url)
    nodes = wait_for(lambda: _nodes(base) if len(_nodes(base)) == 2 else None, 20, "both nodes listed")
    yield Fleet(base, client, settings, {node["name"]: ports[node["name"].split("@")[0]] for node in nodes})
    for proc in [web, *workers, redis_proc]:
        stop(proc)


def _nodes(base: str) -> list[dict]:
    return requests.get(f"{base}/api/v1/admin/workers", headers=AUTH, timeout=10).json()["workers"]


def _node(base: str, name: str) -> dict:
    return next(node for node in _nodes(base) if node["name"] == name)


def submit(base: str, data: bytes) -> requests.Response:
    return requests.post(f"{base}/api/v1/jobs", files={"image": ("x.png", data, "image/png")}, timeout=30)


def wait_settled(base: str, job_ids: list[str], timeout: float = 60) -> list[dict]:
    def settled():
        jobs = [requests.get(f"{base}/api/v1/jobs/{job_id}", timeout=10).json() for job_id in job_ids]
        return jobs if all(job["status"] in ("done", "failed") for job in jobs) else None

    return wait_for(settled, timeout, f"{len(job_ids)} jobs", interval=0.2)


def run_jobs(base: str, seeds) -> list[dict]:
    """Submit one fresh noise image per seed (fast jobs); return them settled."""
    ids = [submit(base, images.noise_png(seed)).json()["id"] for seed in seeds]
    return wait_settled(base, ids)


def bright_png(shade: int) -> bytes:
    """A near-white image: the slow model takes SLOW_S on it."""
    return images.encode(Image.new("RGB", (64, 48), (shade, shade, shade)), "PNG")


def jobs_done_settle(base: str, expected_total: int) -> dict[str, int]:
    """Wait until the heartbeats count ``expected_total`` jobs in all; return jobs done per node."""
    def counted():
        done = {node["name"]: node["jobs_done"] for node in _nodes(base)}
        return done if sum(done.values()) == expected_total else None

    return wait_for(counted, 15, f"heartbeats to count {expected_total} jobs", interval=0.3)


def test_jobs_spread_over_both_workers_which_the_admin_api_lists(fleet):
    jobs = run_jobs(fleet.url, range(70_000, 70_008))
    assert [job["status"] for job in jobs] == ["done"] * 8
    done = jobs_done_settle(fleet.url, 8)
    assert len(done) == 2 and all(count > 0 for count in done.values()), done
    for node in _nodes(fleet.url):
        assert node["status"] == "active" and node["pool_size"] == 1
        assert node["devices"] == ["cpu"] and node["models"] == {MODEL: VERSION}
        child = node["children"][0]
        assert child["node"] == node["name"] and child["device_name"]
        assert child["latency_ms"]["p50"] >= 300 * 0.9  # FAST_S per pass, measured by the child itself
        assert {"host", "pid", "gpu_memory", "current_batch", "jobs_failed", "last_seen"} <= child.keys()


@pytest.mark.parametrize("headers, code", [({}, 401), ({"Authorization": "Bearer wrong"}, 401),
                                           ({"Authorization": TOKEN}, 401)])
def test_the_admin_api_refuses_requests_without_the_token(fleet, headers, code):
    try:
        for method, path in [("GET", "workers"), ("GET", "queues"), ("GET", "stats"),
                             ("POST", "workers/a@x/drain"), ("POST", "cache/purge")]:
            answer = requests.request(method, f"{fleet.url}/api/v1/admin/{path}", headers=headers, timeout=10)
            assert answer.status_code == code
            assert answer.json()["error"]["code"] == "admin_unauthorized"
            assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    finally:  # failed attempts are limited per address (tests/test_admin_security.py): start the others afresh
        fleet.redis.delete(tokenfail_key("127.0.0.1"))


def test_without_an_admin_token_there_is_no_admin(fleet):
    from web import create_app

    client = create_app(dataclasses.replace(fleet.settings, admin_token="")).test_client()
    for path in ("/api/v1/admin/workers", "/admin"):
        answer = client.get(path, headers=AUTH)
        assert answer.status_code == 404 and answer.get_json()["error"]["code"] == "not_found"


def _owner_node(fleet: Fleet, data: bytes) -> str:
    """Return the node whose child is computing ``data`` (from the computation's owner key)."""
    suffix = f"{MODEL}:{VERSION}:{hashlib.sha256(data).hexdigest()}:k5-g1"
    owner = wait_for(lambda: fleet.redis.get(f"owner:{suffix}"), 15, "a worker to claim the job").decode()
    return next(node["name"] for node in _nodes(fleet.url) if owner in {c["name"] for c in node["children"]})


def test_draining_a_worker_sends_new_jobs_to_the_other_and_finishes_its_job(fleet):
    before = jobs_done_settle(fleet.url, 8)
    slow = bright_png(250)
    slow_id = submit(fleet.url, slow).json()["id"]
    drained = _owner_node(fleet, slow)
    other = next(name for name in before if name != drained)
    answer = requests.post(f"{fleet.url}/api/v1/admin/workers/{drained}/drain", headers=AUTH, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json()["worker"]["status"] == "draining" and answer.json()["worker"]["queues"] == []
    assert requests.get(f"{fleet.url}/api/v1/jobs/{slow_id}", timeout=10).json()["status"] == "running"

    jobs = run_jobs(fleet.url, range(70_100, 70_106))
    assert [job["status"] for job in jobs] == ["done"] * 6
    assert wait_settled(fleet.url, [slow_id], timeout=30)[0]["status"] == "done"  # in flight: finished
    after = jobs_done_settle(fleet.url, 8 + 1 + 6)
    assert after[drained] == before[drained] + 1  # only its in-flight job
    assert after[other] == before[other] + 6

    answer = requests.post(f"{fleet.url}/api/v1/admin/workers/{drained}/resume", headers=AUTH, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json()["worker"]["status"] == "active"
    assert answer.json()["worker"]["queues"] == [f"inference.{MODEL}"]
    run_jobs(fleet.url, range(70_200, 70_208))
    resumed = jobs_done_settle(fleet.url, 8 + 1 + 6 + 8)
    assert resumed[drained] > after[drained]  # it takes work again


def test_queues_show_depth_and_oldest_age_while_every_worker_is_drained(fleet):
    names = [node["name"] for node in _nodes(fleet.url)]
    for name in names:
        assert requests.post(f"{fleet.url}/api/v1/admin/workers/{name}/drain", headers=AUTH,
                             timeout=30).status_code == 200
    try:
        waiting = [submit(fleet.url, images.noise_png(seed)).json()["id"] for seed in (70_300, 70_301)]

        def aged():
            queues = requests.get(f"{fleet.url}/api/v1/admin/queues", headers=AUTH, timeout=10).json()["queues"]
            queue = next(q for q in queues if q["name"] == f"inference.{MODEL}")
            return queues if queue["depth"] == 2 and queue["oldest_age_s"] >= 1.0 else None

        queues = wait_for(aged, 10, "two waiting jobs at least a second old", interval=0.2)
        assert [q["name"] for q in queues] == [f"inference.{MODEL}", "webhooks", "fetches"]
    finally:
        for name in names:
            requests.post(f"{fleet.url}/api/v1/admin/workers/{name}/resume", headers=AUTH, timeout=30)
    assert {job["status"] for job in wait_settled(fleet.url, waiting)} == {"done"}


def test_grow_and_shrink_change_the_pool(fleet):
    name = sorted(fleet.metrics_ports)[0]
    url = f"{fleet.url}/api/v1/admin/workers/{name}"
    grown = requests.post(f"{url}/grow", headers=AUTH, json={"n": 1}, timeout=30)
    assert grown.status_code == 200, grown.text
    assert grown.json()["pool"] == {"processes": 1, "target": 2}
    wait_for(lambda: _node(fleet.url, name)["pool_size"] == 2, 60, "the new child to load and beat")
    children = _node(fleet.url, name)["children"]
    assert [c["device"] for c in children] == ["cpu", "cpu"] and len({c["pid"] for c in children}) == 2
    assert requests.post(f"{url}/shrink", headers=AUTH, json={"n": 2}, timeout=30).status_code == 422
    shrunk = requests.post(f"{url}/shrink", headers=AUTH, json={"n": 1}, timeout=30)
    assert shrunk.status_code == 200, shrunk.text
    assert shrunk.json()["pool"] == {"processes": 2, "target": 1}
    wait_for(lambda: _node(fleet.url, name)["pool_size"] == 1, 15, "the removed child to leave")


def test_a_dead_child_drops_out_after_the_ttl_and_is_replaced(fleet):
    name = sorted(fleet.metrics_ports)[0]
    victim = _node(fleet.url, name)["children"][0]["pid"]
    os.kill(victim, signal.SIGKILL)  # no goodbye: only the heartbeat's TTL can tell
    wait_for(lambda: victim not in {c["pid"] for node in _nodes(fleet.url) for c in node["children"]},
             fleet.settings.worker_ttl_s + 3, "the dead child to drop out", interval=0.3)
    # Its only child gone, the node is absent from the list until the replacement beats.
    wait_for(lambda: any(n["name"] == name and n["pool_size"] == 1 for n in _nodes(fleet.url)), 60,
             "Celery to start a new child")


def test_a_drain_the_worker_cannot_answer_is_undone(fleet):
    from shared.keys import drain_key

    name = sorted(fleet.metrics_ports)[1]
    child = _node(fleet.url, name)["children"][0]["pid"]
    status = dict(line.split(":", 1) for line in Path(f"/proc/{child}/status").read_text().splitlines())
    main = int(status["PPid"])
    os.kill(main, signal.SIGSTOP)  # its children still beat, but the node answers no remote control
    try:
        answer = requests.post(f"{fleet.url}/api/v1/admin/workers/{name}/drain", headers=AUTH, timeout=60)
        assert (answer.status_code, answer.json()["error"]["code"]) == (503, "unavailable")
        assert not fleet.redis.exists(drain_key(name))  # not left half-drained (consuming, never batching)
    finally:
        os.kill(main, signal.SIGCONT)
    assert _node(fleet.url, name)["status"] == "active"


@pytest.mark.parametrize("path, body, status", [
    ("workers/nobody@nowhere/grow", {}, 404),
    ("workers/nobody@nowhere/drain", {}, 404),
    ("workers/a%20b/drain", {}, 422),
    ("cache/purge", {"model": MODEL}, 422),
    ("cache/purge", {"model": "x:y", "version": "1"}, 422),
])
def test_bad_admin_actions_get_json_errors(fleet, path, body, status):
    answer = requests.post(f"{fleet.url}/api/v1/admin/{path}", headers=AUTH, json=body, timeout=10)
    assert answer.status_code == status and "code" in answer.json()["error"]


@pytest.mark.parametrize("n", [0, 17, "1", True])
def test_pool_steps_are_checked(fleet, n):
    name = sorted(fleet.metrics_ports)[0]
    answer = requests.post(f"{fleet.url}/api/v1/admin/workers/{name}/grow", headers=AUTH, json={"n": n},
                           timeout=10)
    assert answer.status_code == 422 and answer.json()["error"]["code"] == "invalid_option"


def test_stats_cache_hits_and_purging_one_model_version(fleet):
    cat = images.noise_png(70_400)
    first = submit(fleet.url, cat)
    assert first.status_code == 202
    wait_settled(fleet.url, [first.json()["id"]])
    again = submit(fleet.url, cat)
    assert again.status_code == 200 and again.json()["cached"] is True
    fleet.redis.delete("stats:cache_size")  # measured at most every 30 s; measure now
    body = requests.get(f"{fleet.url}/api/v1/admin/stats", headers=AUTH, timeout=10).json()
    model = body["windows"]["5m"]["models"][MODEL]
    assert model["done"] >= 20 and model["latency_ms"]["p95"] >= model["latency_ms"]["p50"] > 0
    assert body["windows"]["5m"]["cache"]["hits"] >= 1 and 0 < body["windows"]["5m"]["cache"]["hit_rate"] < 1
    assert body["cache_size"]["entries"] >= 20 and body["cache_size"]["bytes"] > 0
    assert len(body["series"]) == 60 and body["series"][-1]["done"] + body["series"][-2]["done"] >= 1

    purged = requests.post(f"{fleet.url}/api/v1/admin/cache/purge", headers=AUTH,
                           json={"model": MODEL, "version": VERSION}, timeout=30)
    assert purged.status_code == 200 and purged.json()["deleted"] >= 3 * 20
    assert not list(fleet.redis.scan_iter(match=f"result:{MODEL}:*"))
    assert submit(fleet.url, cat).status_code == 202  # computed again


def _samples(text: str) -> dict[tuple, float]:
    """Parse a Prometheus exposition; return {(sample name, sorted labels): value}."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_each_worker_serves_its_own_metrics(fleet):
    for name, port in fleet.metrics_ports.items():
        samples = _samples(requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)
        mine = {labels for (sample, labels) in samples if sample == "imgsvc_jobs_completed_total"}
        assert mine and all(dict(labels)["worker"] == name for labels in mine)
        key = ("imgsvc_batch_size_count", (("device", "cpu"), ("model", MODEL), ("worker", name)))
        assert samples[key] >= 1
        assert samples[("imgsvc_worker_children", (("worker", name),))] >= 1


def test_the_admin_page_shows_the_fleet_live(fleet):
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1366, "height": 800})  # a laptop screen
        calls = []
        page.on("request", lambda r: calls.append(r) if "/api/v1/admin/" in r.url else None)
        page.goto(f"{fleet.url}/admin")
        page.fill("#token-input", "wrong")
        page.click("#login button[type=submit]")
        page.wait_for_function("document.querySelector('#login-error').textContent.length > 0", timeout=10_000)
        page.fill("#token-input", TOKEN)
        page.click("#login button[type=submit]")
        page.wait_for_function("document.querySelectorAll('#workers-body tr.worker-row').length == 2",
                               timeout=15_000)
        # Kept for this tab only, sent as a header, never in a URL.
        assert page.evaluate("sessionStorage.getItem('imgsvc-admin-token')") == TOKEN
        assert page.evaluate("localStorage.length") == 0
        assert calls and all("token" not in r.url and r.headers["authorization"].startswith("Bearer ")
                             for r in calls)
        assert page.locator("#queues-body tr[data-queue='inference.slow']").count() == 1
        first = page.locator("#status").text_content()
        page.wait_for_function(f"document.querySelector('#status').textContent != {first!r}", timeout=10_000)
        ids = [submit(fleet.url, images.noise_png(seed)).json()["id"] for seed in range(70_500, 70_504)]
        wait_settled(fleet.url, ids)
        page.wait_for_function("document.querySelectorAll('#chart-throughput polyline').length == 1")
        name = sorted(fleet.metrics_ports)[1]
        page.click(f"tr[data-name='{name}'] button[data-action=drain]")
        page.wait_for_function(
            f"document.querySelector(\"tr[data-name='{name}'] .badge\").textContent == 'draining'",
            timeout=15_000)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "admin-page.png"), full_page=True)
        page.click(f"tr[data-name='{name}'] button[data-action=resume]")
        page.wait_for_function(
            f"document.querySelector(\"tr[data-name='{name}'] .badge\").textContent == 'active'",
            timeout=15_000)
        browser.close()


def test_flower_shows_our_workers_and_tasks(fleet):
    port = free_port()
    env = {**service_env(fleet.settings), "FLOWER_UNAUTHENTICATED_API": "true"}  # its JSON API, for this test
    flower = spawn([sys.executable, "-m", "celery", "-A", "worker.celery_app", "flower", "--address=127.0.0.1",
                    f"--port={port}"], env=env, log=ARTIFACTS / "flower.log")
    api = f"http://127.0.0.1:{port}/api"

    def get(path):
        try:
            return requests.get(f"{api}/{path}", timeout=10).json()
        except (requests.RequestException, ValueError):
            return None

    try:
        workers = wait_for(lambda: (w := get("workers")) and len(w) == 2 and w, 60,
                           "Flower to see both workers")
        assert sorted(workers) == sorted(fleet.metrics_ports)
        run_jobs(fleet.url, range(70_600, 70_603))

        def succeeded():
            tasks = (get("tasks") or {}).values()
            return [t for t in tasks if t.get("name") == "imgsvc.infer" and t.get("state") == "SUCCESS"]

        # A message a child took for its batch (basic_get) shows only its "sent" event, with no
        # worker; the tasks that ran through the consumer name theirs.
        done = wait_for(succeeded, 30, "Flower to show our tasks")
        assert {task["worker"] for task in done} <= set(fleet.metrics_ports)
    finally:
        stop(flower)
