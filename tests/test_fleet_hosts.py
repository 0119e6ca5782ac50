"""A fleet across hosts: Redis, the web tier and two worker hosts, each in its own network namespace.

tools/netns.py makes the hosts: a hub namespace where Redis listens on 10.231.0.1, and one namespace
per host (web, a, b) with its own veth pair to the hub, so each worker reaches Redis only over its
own link. The test drives everything from a thread on the web host, as a client there would. With
the recovery settings a few seconds long, 200 jobs run on the real model; host A's cable is pulled
mid-stream and host B must finish A's work; A's cable goes back in and A rejoins and takes work
again; then A is drained through the admin API while jobs flow, and stopped. Every job must end
done with the answer an undisturbed computation gives, and no job's result may change once done.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
import requests

from shared.jobs import JobStore
from shared.keys import TAKEN_BY_KEY
from shared.settings import REPO_ROOT, Settings
from tests import images
from tests.conftest import ARTIFACTS
from tools import netns, stack

pytestmark = pytest.mark.integration
TOKEN = "fleet-hosts-test-admin-token-4b1d9e07c2a8f6"  # 40+ characters
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JOBS, CUT_AFTER, TOP_K = 200, 60, 3


@dataclasses.dataclass
class Fleet:
    network: netns.Network
    settings: Settings
    url: str  # the web tier, on the web host's loopback
    store: JobStore  # read over the web host's link
    procs: dict[str, subprocess.Popen]
    nodes: dict[str, str]  # host -> Celery node name
    web_host: ThreadPoolExecutor  # a thread on the web host: the test's clients run there
    uploads: dict[str, bytes] = dataclasses.field(default_factory=dict)  # job id -> image
    # one fresh image per job: no cache hits, no computations shared
    seeds: Iterator[int] = dataclasses.field(default_factory=lambda: iter(range(31_000, 32_000)))

    def workers(self) -> dict[str, dict]:
        """The live worker nodes by host, as the admin API lists them."""
        answer = requests.get(f"{self.url}/api/v1/admin/workers", headers=AUTH, timeout=10)
        assert answer.status_code == 200, answer.text
        by_node = {node["name"]: node for node in answer.json()["workers"]}
        return {host: by_node[name] for host, name in self.nodes.items() if name in by_node}

    def submit(self, count: int) -> list[str]:
        """Post ``count`` fresh images; return their job ids."""
        ids = []
        for _ in range(count):
            data = images.noise_png(seed=next(self.seeds), size=(96, 64))
            answer = requests.post(f"{self.url}/api/v1/jobs", files={"image": ("x.png", data, "image/png")},
                                   data={"top_k": TOP_K}, timeout=30)
            assert answer.status_code == 202, answer.text
            ids.append(answer.json()["id"])
            self.uploads[ids[-1]] = data
        return ids

    def jobs(self, ids: list[str]) -> dict[str, dict]:
        return {job_id: json.loads(text) for job_id, text in zip(ids, self.store.get_many_json(ids))}


def _start(network: netns.Network, procs: dict, workdir) -> tuple[Settings, str]:
    """Start Redis on the hub, the web tier on its host and a worker on each of a and b (in this thread,
    which is on the web host: every readiness check crosses a link)."""
    procs["redis"], url = stack.start_redis(workdir, host=netns.HUB_ADDRESS, prefix=network.prefix("hub"))
    settings = Settings(redis_url=url, worker_devices="cpu", worker_concurrency=1, torch_threads=1,
                        max_batch=4, max_wait_ms=20, job_soft_time_limit_s=20, job_time_limit_s=40,
                        visibility_timeout_s=45, stuck_after_s=4, sweep_interval_s=1, worker_ttl_s=4,
                        heartbeat_interval_s=1, admin_token=TOKEN, rate_limit="100000/minute")
    ARTIFACTS.mkdir(exist_ok=True)
    for ready, host in enumerate(("a", "b"), start=1):
        procs[host] = stack.start_worker(settings, ARTIFACTS / f"fleet-hosts-{host}.log",
                                         f"host-{host}-{network.run_id}", ready_children=ready,
                                         prefix=network.prefix(host))
    procs["web"], base = stack.start_web(settings, prefix=network.prefix("web"))
    return settings, base


def _stop(network: netns.Network, procs: dict) -> None:
    for host in network.hosts:
        network.restore(host)  # a worker cut off (a failed test) shuts down warm, not at its grace's end
    for proc in reversed(list(procs.values())):
        stack.stop(proc, grace=15)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    try:
        network = netns.Network.create(("web", "a", "b"))
    except netns.NamespaceUnavailable as exc:
        pytest.skip(f"network namespaces cannot be made here: {exc}")
    web_host = network.executor("web")  # every process is started from, and dies with, this thread
    procs: dict[str, subprocess.Popen] = {}
    try:
        settings, url = web_host.submit(_start, network, procs, tmp_path_factory.mktemp("hosts-redis")).result()
        store = JobStore.from_settings(redis.Redis.from_url(settings.redis_url, socket_timeout=10), settings)
        nodes = {host: f"host-{host}-{network.run_id}@" for host in ("a", "b")}
        fleet = Fleet(network, settings, url, store, procs, nodes, web_host)
        named = web_host.submit(stack.wait_for, lambda: _full_names(fleet), 20, "both hosts in the admin API")
        fleet.nodes = named.result()
        yield fleet
    finally:
        try:
            web_host.submit(_stop, network, procs).result(timeout=120)
        finally:
            web_host.shutdown()
            left = network.remove()
            assert not left, f"network namespaces left behind: {left}"


def _full_names(fleet: Fleet) -> dict[str, str] | None:
    """The node names (``host-a-<run>@<hostname>``) once both hosts list themselves."""
    answer = requests.get(f"{fleet.url}/api/v1/admin/workers", headers=AUTH, timeout=10).json()
    found = {host: node["name"] for host, prefix in fleet.nodes.items()
             for node in answer["workers"] if node["name"].startswith(prefix)}
    return found if len(found) == 2 else None


def _wait_settled(fleet: Fleet, ids: list[str], seen: dict[str, dict], timeout: float, at_least: int | None = None):
    """Poll until ``at_least`` (default: all) of ``ids`` are settled, noting each result when first seen."""
    want = len(ids) if at_least is None else at_least

    def settled():
        for job_id, job in fleet.jobs([i for i in ids if i not in seen]).items():
            if job["status"] in ("done", "failed"):
                seen[job_id] = job
        return sum(1 for i in ids if i in seen) >= want

    stack.wait_for(settled, timeout, f"{want} of {len(ids)} jobs to settle", interval=0.1)


def _held_by(fleet: Fleet, host: str) -> int:
    """How many computations and taken messages name one of ``host``'s children as their owner."""
    children = {child["name"] for child in fleet.workers()[host]["children"]}
    client = fleet.store.redis
    owners = [client.get(key) for key in client.scan_iter("owner:*", count=1000)]
    taken = client.hvals(TAKEN_BY_KEY)
    return sum(1 for owner in owners + taken if owner and owner.decode() in children)


def _differences(before: dict, after: dict) -> dict:
    return {key: (before.get(key), after.get(key)) for key in sorted(set(before) | set(after))
            if before.get(key) != after.get(key) and key != "gradcam"}


def _idle(fleet: Fleet, host: str, since: float) -> dict | None:
    """Host's node once every child's heartbeat from after ``since`` (unix time) shows it idle: its
    batch loop, and the writes behind it, over."""
    node = fleet.workers().get(host)
    return node if node and all(child["current_batch"] == 0 and child["last_seen"] > since
                                for child in node["children"]) else None


def _cut_a_mid_stream(fleet: Fleet, seen: dict[str, dict]) -> tuple[list[str], dict]:
    ids = fleet.submit(JOBS)
    _wait_settled(fleet, ids, seen, timeout=120, at_least=CUT_AFTER)
    held = _held_by(fleet, "a")
    fleet.network.cut("a")
    done_at_cut = sum(1 for i in ids if i in seen)
    cut_at = time.monotonic()
    assert held > 0, "host A held no work when its cable was pulled: the test proved nothing"
    _wait_settled(fleet, ids, seen, timeout=90)
    recovery = {"held_by_a": held, "done_at_cut": done_at_cut, "cut_to_all_done_s": round(time.monotonic() - cut_at, 1)}
    assert [seen[i]["status"] for i in ids] == ["done"] * JOBS, [seen[i]["error"] for i in ids if seen[i]["error"]]
    assert "a" not in fleet.workers(), "host A still listed while cut off"
    return ids, recovery


def _a_rejoins_and_takes_work(fleet: Fleet, seen: dict[str, dict], first: list[str], recovery: dict) -> list[str]:
    fleet.network.restore("a")
    restored_at = time.time()
    baseline = stack.wait_for(lambda: _idle(fleet, "a", restored_at), 60, "host A back, idle")["jobs_done"]
    recovery["a_back_after_s"] = round(time.time() - restored_at, 1)
    # Whatever A was computing when it was cut is written by now: no job's answer may have changed.
    now = fleet.jobs(first)
    changed = [i for i in first if now[i]["result"] != seen[i]["result"]]
    assert not changed, (f"{len(changed)} done jobs got a second, different result after host A came back; "
                         f"the first differs in {_differences(seen[changed[0]]['result'], now[changed[0]]['result'])}")
    ids: list[str] = []
    for _ in range(8):  # bounded: eight rounds of eight jobs at most
        ids += fleet.submit(8)
        _wait_settled(fleet, ids, seen, timeout=60)
        settled_at = time.time()
        if stack.wait_for(lambda: _idle(fleet, "a", settled_at), 10, "host A idle")["jobs_done"] > baseline:
            break
    assert fleet.workers()["a"]["jobs_done"] > baseline, "host A never took work again after it rejoined"
    return ids


def _drain_a_while_jobs_flow(fleet: Fleet, seen: dict[str, dict]) -> list[str]:
    ids = fleet.submit(40)
    _wait_settled(fleet, ids, seen, timeout=60, at_least=5)
    answer = requests.post(f"{fleet.url}/api/v1/admin/workers/{fleet.nodes['a']}/drain", headers=AUTH, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json()["worker"]["status"] == "draining" and answer.json()["worker"]["queues"] == []
    ids += fleet.submit(20)
    _wait_settled(fleet, ids, seen, timeout=60)
    settled_at = time.time()
    stack.wait_for(lambda: _idle(fleet, "a", settled_at), 20, "drained host A idle")
    stack.stop(fleet.procs.pop("a"))
    assert "a" not in fleet.workers(), "host A still listed after it stopped"
    ids += fleet.submit(10)  # the fleet without A
    _wait_settled(fleet, ids, seen, timeout=60)
    return ids


def _scenario(fleet: Fleet) -> tuple[list[str], dict]:
    seen: dict[str, dict] = {}
    clock = time.monotonic()
    first, recovery = _cut_a_mid_stream(fleet, seen)
    recovery["cut_phase_s"] = round(time.monotonic() - clock, 1)
    rejoined = _a_rejoins_and_takes_work(fleet, seen, first, recovery)
    recovery["rejoin_phase_s"] = round(time.monotonic() - clock - recovery["cut_phase_s"], 1)
    drained = _drain_a_while_jobs_flow(fleet, seen)
    recovery["drain_phase_s"] = round(time.monotonic() - clock - sum(recovery[k] for k in ("cut_phase_s",
                                                                                          "rejoin_phase_s")), 1)
    ids = first + rejoined + drained
    final = fleet.jobs(ids)
    assert [final[i]["status"] for i in ids] == ["done"] * len(ids)
    assert [final[i]["result"] for i in ids] == [seen[i]["result"] for i in ids], "a done job's result changed"
    recovery["jobs"] = len(ids)
    return ids, recovery


def _reference_predictions(uploads: list[bytes]) -> list[list[dict]]:
    """Each image's predictions from one undisturbed in-process computation."""
    import torch

    from shared.cards import load_card
    from shared.keys import OutputOptions
    from worker.models import load_model
    from worker.pipeline import run_batch

    model = load_model(load_card(REPO_ROOT / "models" / "efficientnet-lite0.toml"), torch.device("cpu"))
    options = OutputOptions(top_k=TOP_K, gradcam=False)  # GradCAM does not change the predictions
    found = []
    for start in range(0, len(uploads), 4):
        batch = [(data, options) for data in uploads[start:start + 4]]
        found += [out.result["predictions"] for out in run_batch(model, batch, max_pixels=10**8, amp_dtype="float16")]
    return found


def test_a_host_cut_off_mid_stream_loses_nothing_then_rejoins_and_drains(fleet):
    started = time.monotonic()
    ids, recovery = fleet.web_host.submit(_scenario, fleet).result(timeout=400)
    reference = _reference_predictions([fleet.uploads[i] for i in ids])
    final = fleet.web_host.submit(fleet.jobs, ids).result(timeout=30)
    for job_id, expected in zip(ids, reference):
        got = final[job_id]["result"]["predictions"]
        assert [p["index"] for p in got] == [p["index"] for p in expected], job_id
        assert [p["score"] for p in got] == pytest.approx([p["score"] for p in expected], abs=1e-3), job_id
    print(f"\nfleet across hosts: {recovery}; scenario {time.monotonic() - started:.0f} s")
