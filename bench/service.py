"""Measurements through the running service: HTTP -> Celery -> Redis -> result."""
from __future__ import annotations

import concurrent.futures
import http.client
import io
import json
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import redis
import requests
from PIL import Image

from bench.procstat import CpuMeter
from shared.keys import WORKERS_KEY
from shared.settings import Settings
from shared.signing import new_secret
from tests.receiver import Receiver
from tools import stack

WAIT_WINDOW = 64  # wait_all polls this many of the oldest pending jobs at a time


def distinct_jpegs(photo: Image.Image, count: int, size=(640, 480), seed: int = 1) -> list[bytes]:
    """``count`` different JPEGs cut from one photo (a fresh cache key each)."""
    rng = np.random.default_rng(seed)
    base = photo.resize((size[0] * 2, size[1] * 2))
    out = []
    for i in range(count):
        x, y = rng.integers(0, size[0]), rng.integers(0, size[1])
        buf = io.BytesIO()
        base.crop((x, y, x + size[0], y + size[1])).save(buf, "JPEG", quality=85 + i % 10)
        out.append(buf.getvalue())
    return out


class Poster:
    """Keep-alive HTTP clients, one per thread: the cheapest load generator the standard library has."""

    def __init__(self, base: str):
        self.address = urlsplit(base)
        self.local = threading.local()

    def post(self, data: bytes, path: str = "/api/v1/jobs") -> tuple[int, dict, float]:
        connection = getattr(self.local, "connection", None)
        if connection is None:
            connection = self.local.connection = http.client.HTTPConnection(
                self.address.hostname, self.address.port, timeout=60)
        start = time.perf_counter()
        connection.request("POST", path, body=data, headers={"Content-Type": "image/jpeg"})
        response = connection.getresponse()
        body = response.read()
        return response.status, json.loads(body), (time.perf_counter() - start) * 1000


def submit_all(service: Service, images: list[bytes], clients: int) -> list[tuple[int, dict, float]]:
    poster = Poster(service.base)
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        return list(pool.map(poster.post, images))


def _post(base: str, data: bytes, session: requests.Session | None = None) -> requests.Response:
    http = session or requests
    return http.post(f"{base}/api/v1/jobs", data=data, headers={"Content-Type": "image/jpeg"}, timeout=60)


def percentiles(samples_ms: list[float]) -> dict:
    return {"p50": float(np.percentile(samples_ms, 50)), "p99": float(np.percentile(samples_ms, 99)),
            "n": len(samples_ms)}


class Service:
    """redis-server, one worker and gunicorn, started and timed."""

    def __init__(self, workdir: Path, cards_dir: Path, models: tuple[str, ...] = ("efficientnet-lite0",),
                 web_processes: int = 1, web_threads: int = 8, torch_threads: int = 0,
                 web_server: str = "gunicorn", fsync: str | None = None, split_cache: bool = False,
                 max_waiters: int = Settings.max_waiters, **settings):
        """``fsync``: run the main Redis with AOF and this appendfsync (``always`` also turns
        DURABLE_ACCEPT on); ``split_cache``: a second, evicting Redis for the cache role; ``settings``:
        any other Settings field."""
        self.workdir = workdir
        self.redis_proc, url = stack.start_redis(workdir, aof=fsync is not None,
                                                 extra=("--appendfsync", fsync) if fsync else ())
        self.cache_proc, cache_url = None, ""
        if split_cache:
            (workdir / "cache").mkdir(exist_ok=True)
            self.cache_proc, cache_url = stack.start_redis(workdir / "cache", extra=(
                "--maxmemory", "1gb", "--maxmemory-policy", "allkeys-lru"))
        # One client address sends everything: lift the per-address limit (its check still runs).
        # Callbacks go to a receiver on loopback, so the address check is off for the benchmark.
        self.settings = Settings(redis_url=url, model_cards_dir=cards_dir, models=models,
                                 heartbeat_interval_s=1, rate_limit="1000000/minute", torch_threads=torch_threads,
                                 webhook_secret=new_secret(), webhook_allow_private=True,
                                 cache_url=cache_url, durable_accept=fsync == "always", max_waiters=max_waiters,
                                 **settings)
        self.redis = redis.Redis.from_url(url)
        self.cache = redis.Redis.from_url(cache_url) if cache_url else self.redis
        start = time.perf_counter()
        self.worker = stack.start_worker(self.settings, workdir / "worker.log", name="bench")
        self.worker_ready_s = time.perf_counter() - start
        start = time.perf_counter()
        self.web_server = web_server
        self.web, self.base = stack.start_web(self.settings, threads=web_threads, processes=web_processes,
                                              server=web_server)
        self.web_first_200_s = time.perf_counter() - start
        self.webhooks = stack.start_webhook_worker(self.settings, workdir / "webhooks.log", name="bench-webhooks")
        self.web_rss_mb = stack.rss_mb(self.web.pid)
        self.worker_rss_mb = stack.rss_mb(self.worker.pid)

    def wait_all(self, job_ids: list[str], timeout: float = 600) -> float:
        """Wait until every job is done; return the time. Polls Redis for the oldest WAIT_WINDOW jobs
        still pending only: polling thousands every 20 ms would itself take a good share of a small
        box's CPU (the poller's and Redis's) from the worker being measured."""
        pending = list(dict.fromkeys(job_ids))
        deadline = time.monotonic() + timeout
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(pending)} jobs not done")
            window = pending[:WAIT_WINDOW]
            pipe = self.redis.pipeline(transaction=False)
            for job_id in window:
                pipe.hget(f"job:{job_id}", "status")
            statuses = dict(zip(window, pipe.execute()))
            failed = [job_id for job_id, status in statuses.items() if status == b"failed"]
            if failed:
                raise RuntimeError(f"job {failed[0]} failed")
            pending = [job_id for job_id in pending if statuses.get(job_id) != b"done"]
            if pending and pending[0] in statuses:  # the oldest is not done yet: wait a moment
                time.sleep(0.02)
        return time.perf_counter()

    def throughput(self, images: list[bytes], clients: int = 8) -> dict:
        """Submit distinct images from several clients at once; images/s from first submit to last done."""
        meter = CpuMeter(self.pids())
        start = time.perf_counter()
        ids = [body["id"] for _, body, _ in submit_all(self, images, clients)]
        end = self.wait_all(ids)
        cpu = meter.per_image_ms(len(images))
        sizes = [self.result_of(job_id)["batch_size"] for job_id in ids[:: max(1, len(ids) // 50)]]
        return {"images": len(images), "seconds": end - start, "images_per_s": len(images) / (end - start),
                "mean_batch_size_sampled": float(np.mean(sizes)), "cpu_ms_per_image": cpu}

    def result_of(self, job_id: str) -> dict:
        return requests.get(f"{self.base}/api/v1/jobs/{job_id}", timeout=10).json()["result"]

    def idle_latency(self, images: list[bytes]) -> dict:
        """One job at a time, submit to done as a client sees it (a long-poll ``?wait=`` read)."""
        samples, stages = [], []
        with requests.Session() as session:
            for data in images:
                start = time.perf_counter()
                job_url = self.base + _post(self.base, data, session).headers["Location"] + "?wait=10"
                while (job := session.get(job_url, timeout=30).json())["status"] not in ("done", "failed"):
                    pass
                samples.append((time.perf_counter() - start) * 1000)
                stages.append(job["result"]["timings_ms"])
        summary = percentiles(samples)
        summary["stages_ms_median"] = {k: float(np.median([s[k] for s in stages])) for k in stages[0]}
        return summary

    def cache_hits(self, data: bytes, count: int = 200) -> dict:
        """Latency of repeated uploads of one image already in the cache."""
        with requests.Session() as session:
            first = _post(self.base, data, session).json()
            self.wait_all([first["id"]])
            samples = []
            for _ in range(count):
                start = time.perf_counter()
                answer = _post(self.base, data, session)
                samples.append((time.perf_counter() - start) * 1000)
                assert answer.status_code == 200
        return {**percentiles(samples), "image_bytes": len(data)}

    def callbacks(self, data: bytes, count: int = 50) -> dict:
        """Cache hits with a callback_url: how long until the signed webhook reaches a local receiver."""
        with Receiver() as receiver, requests.Session() as session:
            samples = []
            for i in range(count):
                start = time.time()  # the receiver stamps arrivals with time.time() too
                answer = session.post(f"{self.base}/api/v1/jobs", files={"image": ("b.jpg", data)},
                                      data={"callback_url": f"{receiver.url}/{i}"}, timeout=30)
                assert answer.status_code == 200, answer.text
                [arrival] = receiver.wait(f"/{i}", 1, timeout=30)
                samples.append((arrival.at - start) * 1000)
        return percentiles(samples)

    def pids(self) -> dict[str, int]:
        """The root process of each kind, for CPU accounting (each counts its whole process tree)."""
        pids = {"web": self.web.pid, "worker": self.worker.pid, "redis-server": self.redis_proc.pid,
                "webhook worker": self.webhooks.pid}
        if self.cache_proc is not None:
            pids["redis cache"] = self.cache_proc.pid
        return pids

    def worker_info(self) -> dict:
        """What the worker children report in their heartbeats: device, threads, batch sizes."""
        infos = [self.redis.hgetall(key) for key in self.redis.scan_iter("worker:*")]
        return {"children": len(infos), "max_batch": [json.loads(i[b"max_batch"]) for i in infos],
                "threads": [int(i[b"threads"]) for i in infos]}

    def workers_alive(self) -> int:
        return self.redis.zcard(WORKERS_KEY)

    def close(self) -> None:
        for proc in (self.web, self.webhooks, self.worker, self.redis_proc, self.cache_proc):
            if proc is not None:
                stack.stop(proc)
