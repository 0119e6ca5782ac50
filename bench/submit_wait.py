"""Clients that want each answer now (issue 21, item 5): web CPU per image when each one submits and
then long-polls (``GET ?wait=``), against one submit that holds the answer (``Prefer: wait``).

Eight clients, the null model (the service's own cost only), distinct images (no cache hits), one web
process with a waiter for every client. ``python -m bench.submit_wait`` runs it alone; ``make bench``
runs it as part of the full harness.
"""
from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from PIL import Image
from skimage import data as skdata

from bench import null_model
from bench.procstat import CpuMeter
from bench.service import Service, distinct_jpegs

IMAGES = int(os.environ.get("BENCH_WAIT_IMAGES", "300"))
CLIENTS = 8
WAIT_S = 30
SETTLED = ("done", "failed")


class WaitingClient:
    """Keep-alive connections, one per thread: submit an image and come back with its settled job."""

    def __init__(self, base: str, prefer: bool):
        self.address, self.prefer = urlsplit(base), prefer
        self.local = threading.local()
        self.requests = 0
        self.lock = threading.Lock()

    def classify(self, data: bytes) -> str:
        headers = {"Content-Type": "image/jpeg"}
        if self.prefer:
            headers["Prefer"] = f"wait={WAIT_S}"
        answer, job = self._send("POST", "/api/v1/jobs", data, headers)
        while job["status"] not in SETTLED:
            answer, job = self._send("GET", f"/api/v1/jobs/{job['id']}?wait={WAIT_S}")
            if answer.getheader("Wait-Skipped"):
                time.sleep(float(answer.getheader("Retry-After", "1")))
        return job["status"]

    def _send(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        connection = getattr(self.local, "connection", None)
        if connection is None:
            connection = self.local.connection = http.client.HTTPConnection(
                self.address.hostname, self.address.port, timeout=WAIT_S + 30)
        connection.request(method, path, body=body, headers=headers or {})
        answer = connection.getresponse()
        job = json.loads(answer.read())
        with self.lock:
            self.requests += 1
        if answer.status not in (200, 202):
            raise RuntimeError(f"{method} {path}: {answer.status} {job}")
        return answer, job


def measure(service: Service, images: list[bytes], prefer: bool, clients: int = CLIENTS) -> dict:
    """Every image submitted and waited for by ``clients`` clients; CPU ms per image by process kind."""
    client = WaitingClient(service.base, prefer)
    meter = CpuMeter(service.pids())
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        statuses = list(pool.map(client.classify, images))
    seconds = time.perf_counter() - start
    if any(status != "done" for status in statuses):
        raise RuntimeError(f"{sum(s != 'done' for s in statuses)} jobs did not end done")
    return {"images": len(images), "images_per_s": len(images) / seconds,
            "requests_per_image": client.requests / len(images), "cpu_ms_per_image": meter.per_image_ms(len(images))}


def run(workdir: Path, clients: int = CLIENTS, images: int = IMAGES) -> dict:
    cards = workdir / "cards"
    cards.mkdir()
    null_model.write_card(cards)
    service = Service(workdir, cards, models=(null_model.NAME,), torch_threads=1, web_processes=1,
                      web_threads=clients + 4, max_waiters=clients)
    try:
        photo = Image.fromarray(skdata.chelsea())
        measure(service, distinct_jpegs(photo, 40, seed=20), prefer=False, clients=clients)  # warm up
        result = {"clients": clients}
        # in turns, each on images of its own, so that neither side is favoured by a warmer service
        for turn, seed in enumerate((21, 22, 23, 24)):
            name = "prefer_wait" if turn % 2 else "submit_then_long_poll"
            run_images = distinct_jpegs(photo, images // 2, seed=seed)
            result.setdefault(name, []).append(measure(service, run_images, prefer=turn % 2 == 1, clients=clients))
        for name in ("submit_then_long_poll", "prefer_wait"):
            result[name] = _combined(result[name])
        before, after = result["submit_then_long_poll"], result["prefer_wait"]
        result["web_cpu_saved"] = 1 - after["cpu_ms_per_image"]["web"] / before["cpu_ms_per_image"]["web"]
        return result
    finally:
        service.close()


def _combined(runs: list[dict]) -> dict:
    """Runs of one kind as one: images summed, the rest weighted by images."""
    total = sum(r["images"] for r in runs)

    def mean(get):
        return sum(get(r) * r["images"] for r in runs) / total

    kinds = runs[0]["cpu_ms_per_image"]
    return {"images": total, "images_per_s": mean(lambda r: r["images_per_s"]),
            "requests_per_image": mean(lambda r: r["requests_per_image"]),
            "cpu_ms_per_image": {k: mean(lambda r, k=k: r["cpu_ms_per_image"][k]) for k in kinds}}


def print_submit_wait(result: dict) -> None:
    before, after = result["submit_then_long_poll"], result["prefer_wait"]
    kinds = list(before["cpu_ms_per_image"])
    print(f"submit and wait, {result['clients']} clients, null model, {before['images']} + {after['images']} "
          f"distinct 640x480 JPEGs")
    print("| CPU ms per image | requests per image | img/s | " + " | ".join(kinds) + " |")
    print("|---|---|---|" + "---|" * len(kinds))
    for name, run in (("submit, then GET ?wait=30", before), ("submit with Prefer: wait=30", after)):
        print(f"| {name} | {run['requests_per_image']:.2f} | {run['images_per_s']:.0f} | "
              + " | ".join(f"{run['cpu_ms_per_image'][k]:.2f}" for k in kinds) + " |")
    print(f"web CPU per image saved by Prefer: wait: {result['web_cpu_saved']:.0%} (target >= 30%)")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        outcome = run(Path(tmp))
    print_submit_wait(outcome)
    print(json.dumps(outcome))
