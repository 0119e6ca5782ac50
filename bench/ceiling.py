"""The service ceiling: the whole service (HTTP, Redis, Celery, worker) around a model that costs nothing.

``python -m bench.ceiling`` runs it alone; ``make bench`` runs it as part of the full harness.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as skdata

from bench import null_model
from bench.procstat import CpuMeter
from bench.service import Service, distinct_jpegs, submit_all

CEILING_IMAGES = int(os.environ.get("BENCH_CEILING_IMAGES", "300"))
CLIENTS = int(os.environ.get("BENCH_CLIENTS", "8"))


def ceiling(service: Service, images: list[bytes], clients: int = CLIENTS) -> dict:
    """New submits, then the same images again as cache hits; img/s and CPU ms per image by process."""
    meter = CpuMeter(service.pids())
    start = time.perf_counter()
    answers = submit_all(service, images, clients)
    bad = [a for a in answers if a[0] not in (200, 202)]
    if bad:
        raise RuntimeError(f"{len(bad)} submits refused, e.g. {bad[0][:2]}")
    end = service.wait_all([body["id"] for _, body, _ in answers])
    new = {"images": len(images), "seconds": end - start, "images_per_s": len(images) / (end - start),
           "cpu_ms_per_image": meter.per_image_ms(len(images))}
    meter = CpuMeter(service.pids())
    start = time.perf_counter()
    answers = submit_all(service, images, clients)
    seconds = time.perf_counter() - start
    if any(status != 200 for status, _, _ in answers):
        raise RuntimeError("a repeated upload was not answered from the cache")
    latencies = [ms for _, _, ms in answers]
    hits = {"images": len(images), "images_per_s": len(images) / seconds,
            "p50": float(np.percentile(latencies, 50)), "p99": float(np.percentile(latencies, 99)),
            "cpu_ms_per_image": meter.per_image_ms(len(images))}
    return {"new": new, "cache_hit": hits, "clients": clients}


def batches(service: Service, images: list[bytes], per_request: int = 16, clients: int = 2) -> dict:
    """New images sent ``per_request`` at a time with POST /api/v1/batches: what the web tier costs then."""
    import requests

    def post(chunk: list[bytes]) -> list[str]:
        files = [("image", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(chunk)]
        answer = requests.post(f"{service.base}/api/v1/batches", files=files, timeout=60)
        if answer.status_code != 202:
            raise RuntimeError(f"batch refused: {answer.status_code} {answer.text[:200]}")
        return [job["id"] for job in answer.json()["jobs"]]

    chunks = [images[i:i + per_request] for i in range(0, len(images), per_request)]
    meter = CpuMeter(service.pids())
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        ids = [job_id for chunk_ids in pool.map(post, chunks) for job_id in chunk_ids]
    end = service.wait_all(ids)
    return {"images": len(images), "per_request": per_request, "images_per_s": len(images) / (end - start),
            "cpu_ms_per_image": meter.per_image_ms(len(images))}


def run(workdir: Path, clients: int = CLIENTS, **service_options) -> dict:
    cards = workdir / "cards"
    cards.mkdir()
    null_model.write_card(cards)
    # The null model stands in for a model on a GPU: its child, like a GPU child, needs one torch
    # thread (more would only spin OpenMP threads on the cores the service needs).
    service = Service(workdir, cards, models=(null_model.NAME,), torch_threads=1, **service_options)
    try:
        images = distinct_jpegs(Image.fromarray(skdata.chelsea()), CEILING_IMAGES, seed=7)
        result = ceiling(service, images, clients)
        result["batches"] = batches(service, distinct_jpegs(Image.fromarray(skdata.coffee()), CEILING_IMAGES, seed=8))
        result["worker"] = service.worker_info()
        return result
    finally:
        service.close()


def print_ceiling(result: dict) -> None:
    new, hit = result["new"], result["cache_hit"]
    kinds = list(new["cpu_ms_per_image"])
    print(f"service ceiling (null model, GradCAM on): {new['images_per_s']:.1f} img/s, "
          f"{new['images']} distinct 640x480 JPEGs, {result['clients']} clients; worker {result['worker']}")
    print("| CPU ms per image | " + " | ".join(kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    print("| new submit | " + " | ".join(f"{new['cpu_ms_per_image'][k]:.2f}" for k in kinds) + " |")
    print("| cache hit | " + " | ".join(f"{hit['cpu_ms_per_image'][k]:.2f}" for k in kinds) + " |")
    batch = result["batches"]
    print(f"| new, {batch['per_request']} per POST /api/v1/batches ({batch['images_per_s']:.0f} img/s) | "
          + " | ".join(f"{batch['cpu_ms_per_image'][k]:.2f}" for k in kinds) + " |")
    print(f"cache hits under load: {hit['images_per_s']:.0f} img/s, p50 {hit['p50']:.1f} ms, p99 {hit['p99']:.1f} ms")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        outcome = run(Path(tmp), web_server=os.environ.get("BENCH_WEB_SERVER", "gunicorn"))
    print_ceiling(outcome)
    print(json.dumps(outcome))
