"""Fair share under a deep backlog (issue 22): one key's 2,000 images against a small key and a person.

Key A posts its images in batches of 100 (the bulk lane). Once A's backlog is deep, key B posts one
image every 2 s in the same lane (``priority=bulk``: the hard case, fair share between keys and not the
lane doing the work) and a browser-like client posts single uploads (the interactive lane, by default).
Reported: B's and the interactive client's queue wait (enqueue to staged, ``timings_ms.queue``) p50/p99
next to a compute batch's duration (the forward pass and GradCAM of the batches B's and the person's
jobs rode in, median; and A's solo run time over its batches, the loop's cycle), and A's throughput against
A alone (measured before and after the mixed run, on a machine that may be shared).
``python -m bench.fairness [null|real]`` runs it alone; ``make bench`` runs both models.
``BENCH_FAIR_IMAGES`` sets A's images for the real model (default 2,000; fewer on a slow machine),
``BENCH_FAIR_NULL_IMAGES`` for the null model (default 6,000: it drains 2,000 in about 8 s on a
2-core box, too short for more than four of B's images at one every 2 s). ``BENCH_FAIR_MAX_BATCH``
pins the batch size (MAX_BATCH: the sizer then tries no other size). The result's ``worst`` lists the
three longest waits of each client with the batch each rode in.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests
from PIL import Image
from skimage import data as skdata

from bench import null_model
from bench.procstat import CpuMeter
from bench.service import Service, distinct_jpegs, percentiles
from shared.apikeys import KeyStore
from shared.settings import REPO_ROOT
from shared.tasks import inference_queue, priority_lists

PINNED_BATCH = int(os.environ.get("BENCH_FAIR_MAX_BATCH", "0"))
IMAGES = {"real": int(os.environ.get("BENCH_FAIR_IMAGES", "2000")),
          "null": int(os.environ.get("BENCH_FAIR_NULL_IMAGES", "6000"))}
PER_REQUEST = 100
A_CLIENTS = 2
B_EVERY_S = 2.0
INTERACTIVE_EVERY_S = 3.0
DEEP_FRACTION = 0.25  # B and the interactive client start once A has this share of its images waiting


def _headers(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def post_batches(service: Service, token: str, images: list[bytes]) -> list[str]:
    """A's client: its images, PER_REQUEST per POST /api/v1/batches, from A_CLIENTS threads."""
    def post(chunk: list[bytes]) -> list[str]:
        files = [("image", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(chunk)]
        answer = requests.post(f"{service.base}/api/v1/batches", files=files, headers=_headers(token), timeout=120)
        if answer.status_code != 202:
            raise RuntimeError(f"batch refused: {answer.status_code} {answer.text[:200]}")
        return [job["id"] for job in answer.json()["jobs"]]

    chunks = [images[i:i + PER_REQUEST] for i in range(0, len(images), PER_REQUEST)]
    with concurrent.futures.ThreadPoolExecutor(A_CLIENTS) as pool:
        return [job_id for ids in pool.map(post, chunks) for job_id in ids]


def depth(service: Service, model: str) -> int:
    pipe = service.redis.pipeline(transaction=False)
    for name in priority_lists(inference_queue(model)):
        pipe.llen(name)
    return sum(pipe.execute())


class Trickle(threading.Thread):
    """One client posting one image every ``every_s`` until told to stop; keeps the job ids."""

    def __init__(self, service: Service, images: list[bytes], every_s: float, headers: dict, fields: dict):
        super().__init__(daemon=True)
        self.service, self.images, self.every_s = service, images, every_s
        self.headers, self.fields, self.ids, self.errors = headers, fields, [], []
        self.stop = threading.Event()

    def run(self) -> None:
        with requests.Session() as session:
            for data in self.images:
                try:
                    answer = session.post(f"{self.service.base}/api/v1/jobs", files={"image": ("x.jpg", data)},
                                          data=self.fields, headers=self.headers, timeout=60)
                    if answer.status_code in (200, 202):
                        self.ids.append(answer.json()["id"])
                    else:
                        self.errors.append(f"{answer.status_code} {answer.text[:200]}")
                except requests.RequestException as exc:  # counted and reported, as a browser would retry
                    self.errors.append(repr(exc))
                if self.stop.wait(self.every_s):
                    return


def results_of(service: Service, ids: list[str], headers: dict) -> list[dict]:
    return [requests.get(f"{service.base}/api/v1/jobs/{i}", headers=headers, timeout=10).json()["result"]
            for i in ids]


def compute_ms(result: dict) -> float:
    """The forward pass and GradCAM of the batch a job rode in (timings are the batch's own)."""
    return result["timings_ms"]["inference"] + result["timings_ms"]["gradcam"]


def solo(service: Service, token: str, images: list[bytes], model: str) -> dict:
    meter = CpuMeter(service.pids())
    start = time.perf_counter()
    ids = post_batches(service, token, images)
    end = service.wait_all(ids, timeout=3600)
    sizes = [service_result(service, token, i)["batch_size"] for i in ids[:: max(1, len(ids) // 50)]]
    seconds = end - start
    batches = len(images) / float(np.mean(sizes))
    return {"images": len(images), "seconds": seconds, "images_per_s": len(images) / seconds,
            "mean_batch_size_sampled": float(np.mean(sizes)), "batch_ms": seconds / batches * 1000,
            "cpu_ms_per_image": meter.per_image_ms(len(images))}


def service_result(service: Service, token: str, job_id: str) -> dict:
    return requests.get(f"{service.base}/api/v1/jobs/{job_id}", headers=_headers(token), timeout=10).json()["result"]


def mixed(service: Service, tokens: dict, images: list[bytes], singles: list[bytes], model: str) -> dict:
    meter = CpuMeter(service.pids())
    start = time.perf_counter()
    a_ids: list[str] = []
    poster = threading.Thread(target=lambda: a_ids.extend(post_batches(service, tokens["A"], images)), daemon=True)
    poster.start()
    deadline = time.monotonic() + 600
    while depth(service, model) < DEEP_FRACTION * len(images) and poster.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    deep_at = depth(service, model)
    half = len(singles) // 2
    b = Trickle(service, singles[:half], B_EVERY_S, _headers(tokens["B"]), {"priority": "bulk"})
    person = Trickle(service, singles[half:], INTERACTIVE_EVERY_S, {}, {})
    b.start()
    person.start()
    poster.join()
    a_end = service.wait_all(a_ids, timeout=3600)
    b.stop.set()
    person.stop.set()
    b.join()
    person.join()
    service.wait_all([*b.ids, *person.ids], timeout=600)
    b_results, person_results = results_of(service, b.ids, _headers(tokens["B"])), results_of(service, person.ids, {})
    a_rate = len(images) / (a_end - start)
    return {"a_images": len(images), "a_images_per_s": a_rate, "backlog_when_b_started": deep_at,
            # what B's image would have waited in one FIFO queue: the backlog ahead of it, at A's pace
            "fifo_wait_ms_estimate": deep_at / a_rate * 1000, "errors": {"B": b.errors, "interactive": person.errors},
            "b_queue_wait_ms": percentiles([r["timings_ms"]["queue"] for r in b_results]),
            "interactive_queue_wait_ms": percentiles([r["timings_ms"]["queue"] for r in person_results]),
            # the longest waits, each with its batch (what the p99 is made of)
            "worst": {name: sorted(({"queue_ms": r["timings_ms"]["queue"], "batch_size": r["batch_size"],
                                     "compute_ms": round(compute_ms(r), 1), "timings_ms": r["timings_ms"]}
                                    for r in results), key=lambda w: -w["queue_ms"])[:3]
                      for name, results in (("B", b_results), ("interactive", person_results))},
            # the batches of this run (the sizer may have grown them since the solo run)
            "batch_compute_ms_median": float(np.median([compute_ms(r) for r in [*b_results, *person_results]])),
            "batch_size_median": float(np.median([r["batch_size"] for r in [*b_results, *person_results]])),
            "cpu_ms_per_image": meter.per_image_ms(len(images) + len(b.ids) + len(person.ids))}


def run(workdir: Path, model: str = "null") -> dict:
    if model == "null":
        cards = workdir / "cards"
        cards.mkdir()
        null_model.write_card(cards)
        name, options = null_model.NAME, {"torch_threads": 1}
    else:
        cards, name, options = REPO_ROOT / "models", "efficientnet-lite0", {}
    if PINNED_BATCH:  # a fixed MAX_BATCH: no sizer trials (see BENCHMARKS.md, fair share)
        options["max_batch"] = PINNED_BATCH
    # A's whole backlog may wait: the depth bounds are lifted (they would refuse A, not reorder it);
    # a batch request may hold PER_REQUEST images (MAX_BATCH_IMAGES).
    service = Service(workdir, cards, models=(name,), max_queue_depth=0, max_queue_depth_per_key=0,
                      max_batch_images=PER_REQUEST, **options)
    try:
        keys = KeyStore(service.redis)
        tokens = {who: keys.create(f"bench-{who}")[1] for who in ("A", "B")}
        count, photo = IMAGES[model], Image.fromarray(skdata.chelsea())
        alone = solo(service, tokens["A"], distinct_jpegs(photo, count, seed=21), name)
        singles = distinct_jpegs(Image.fromarray(skdata.coffee()), 400, seed=23)
        shared = mixed(service, tokens, distinct_jpegs(photo, count, seed=22), singles, name)
        after = solo(service, tokens["A"], distinct_jpegs(photo, count, seed=24), name)
        shared["a_throughput_vs_solo"] = shared["a_images_per_s"] / np.mean([alone["images_per_s"],
                                                                             after["images_per_s"]])
        return {"model": name, "solo": alone, "mixed": shared, "solo_after": after, "worker": service.worker_info()}
    finally:
        service.close()


def print_fairness(result: dict) -> None:
    alone, shared = result["solo"], result["mixed"]
    batch = shared["batch_compute_ms_median"]
    b, person = shared["b_queue_wait_ms"], shared["interactive_queue_wait_ms"]
    print(f"fair share ({result['model']}): A {alone['images']} images in batches of {PER_REQUEST}; "
          f"a compute batch {batch:.0f} ms in the mixed run (median of B's and the person's batches, "
          f"{shared['batch_size_median']:.0f} images; A's solo cycle {alone['batch_ms']:.0f} ms); "
          f"backlog when B started {shared['backlog_when_b_started']} (in one FIFO queue about "
          f"{shared['fifo_wait_ms_estimate'] / 1000:.1f} s of waiting)")
    print("| client | queue wait p50 ms | p99 ms | p99 in batches | target |")
    print("|---|---|---|---|---|")
    print(f"| B (1 image / {B_EVERY_S:g} s, bulk lane, n={b['n']}) | {b['p50']:.0f} | {b['p99']:.0f} | "
          f"{b['p99'] / batch:.1f} | <= 3 |")
    print(f"| interactive (1 upload / {INTERACTIVE_EVERY_S:g} s, n={person['n']}) | {person['p50']:.0f} | "
          f"{person['p99']:.0f} | {person['p99'] / batch:.1f} | <= 2 |")
    print(f"A: {alone['images_per_s']:.1f} then {result['solo_after']['images_per_s']:.1f} img/s alone, "
          f"{shared['a_images_per_s']:.1f} img/s beside B and the interactive client "
          f"({shared['a_throughput_vs_solo']:.2f} of solo; target >= 0.90)")
    print("CPU ms per image, solo / mixed: " + ", ".join(
        f"{k} {alone['cpu_ms_per_image'][k]:.2f} / {shared['cpu_ms_per_image'][k]:.2f}" for k in alone["cpu_ms_per_image"]))


if __name__ == "__main__":
    chosen = sys.argv[1:] or ["null"]
    outcomes = []
    for which in chosen:
        with tempfile.TemporaryDirectory() as tmp:
            outcomes.append(run(Path(tmp), which))
        print_fairness(outcomes[-1])
    print(json.dumps(outcomes))
