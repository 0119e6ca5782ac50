"""Redis per image, by role, and what DURABLE_ACCEPT costs: the figures behind docs/scaling.md's
capacity plan. The null model stands in for the GPU, so Redis and the web tier are what is measured.

``python -m bench.roles`` runs it alone; ``make bench`` runs it as part of the full harness.
"""
from __future__ import annotations

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

IMAGES = int(os.environ.get("BENCH_ROLES_IMAGES", "200"))
SETTLED_IMAGES = int(os.environ.get("BENCH_SETTLED_IMAGES", "2000"))
SETTLED_AFTER_S = 60  # what a settled job costs each server this long after it settled
CLIENTS = int(os.environ.get("BENCH_CLIENTS", "8"))


def _net(client) -> int:
    stats = client.info("stats")
    return int(stats["total_net_input_bytes"]) + int(stats["total_net_output_bytes"])


def _used(client) -> int:
    return int(client.info("memory")["used_memory"])


def measure(service: Service, images: list[bytes]) -> dict:
    """New submits then cache hits of the same images: Redis CPU, bytes moved and memory per image."""
    out = {}
    for phase in ("new", "cache_hit"):
        servers = {"main": service.redis, **({"cache": service.cache} if service.cache is not service.redis else {})}
        net = {role: _net(c) for role, c in servers.items()}
        used = {role: _used(c) for role, c in servers.items()}
        meter = CpuMeter(service.pids())
        start = time.perf_counter()
        answers = submit_all(service, images, CLIENTS)
        if any(status not in (200, 202) for status, _, _ in answers):
            raise RuntimeError(f"refused: {[a[:2] for a in answers if a[0] not in (200, 202)][:2]}")
        end = service.wait_all([body["id"] for _, body, _ in answers]) if phase == "new" else time.perf_counter()
        cpu = meter.per_image_ms(len(images))
        latencies = [ms for _, _, ms in answers]
        out[phase] = {
            "images_per_s": len(images) / (end - start),
            "submit_p50_ms": float(np.percentile(latencies, 50)), "submit_p99_ms": float(np.percentile(latencies, 99)),
            "cpu_ms_per_image": cpu,
            "redis_kib_moved_per_image": {r: (_net(c) - net[r]) / len(images) / 1024 for r, c in servers.items()},
            "redis_kib_stored_per_image": {r: (_used(c) - used[r]) / len(images) / 1024 for r, c in servers.items()},
        }
    return out


def _footprint(service: Service) -> dict[str, tuple[int, int]]:
    servers = {"main": service.redis, **({"cache": service.cache} if service.cache is not service.redis else {})}
    return {role: (_used(c), c.dbsize()) for role, c in servers.items()}


def settled_footprint(service: Service, images: list[bytes]) -> dict:
    """Bytes and keys each settled job leaves on each server SETTLED_AFTER_S after it settled."""
    warm_up = [body["id"] for _, body, _ in submit_all(service, images[:20], CLIENTS)]
    service.wait_all(warm_up)
    time.sleep(SETTLED_AFTER_S)  # the warm-up's own short tails have gone
    before, count, job_ids = _footprint(service), len(images) - 20, []
    for start in range(20, len(images), 500):  # in rounds, below MAX_QUEUE_DEPTH on a slow machine
        answers = submit_all(service, images[start:start + 500], CLIENTS)
        if any(status not in (200, 202) for status, _, _ in answers):
            raise RuntimeError(f"refused: {[a[:2] for a in answers if a[0] not in (200, 202)][:2]}")
        job_ids += [body["id"] for _, body, _ in answers]
        service.wait_all(job_ids[-len(answers):])
    time.sleep(SETTLED_AFTER_S)
    after = _footprint(service)
    sizes = [service.cache.memory_usage(f"job:{job_id}", samples=0) for job_id in job_ids[::40]]
    return {"jobs": count, "after_s": SETTLED_AFTER_S, "job_record_bytes": sum(s or 0 for s in sizes) / len(sizes),
            "bytes_per_job": {role: (after[role][0] - before[role][0]) / count for role in after},
            "keys_per_job": {role: (after[role][1] - before[role][1]) / count for role in after}}


def run_settled(workdir: Path, cards: Path) -> dict:
    """``settled_footprint`` with one Redis and with a main + cache pair."""
    results = {}
    for name, split in (("one redis", False), ("main + cache redis", True)):
        home = workdir / ("settled-" + name.replace(" ", "_").replace("+", ""))
        home.mkdir()
        service = Service(home, cards, models=(null_model.NAME,), torch_threads=1, fsync="everysec",
                          split_cache=split)
        try:
            photo = Image.fromarray(skdata.chelsea())
            results[name] = settled_footprint(service, distinct_jpegs(photo, SETTLED_IMAGES, (160, 120), seed=7))
        finally:
            service.close()
    return results


def print_settled(results: dict) -> None:
    print(f"| setup | jobs | main bytes/job {SETTLED_AFTER_S} s after settling | cache bytes/job | keys/job (main, cache) "
          "| a settled job's record (cache) |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        size, keys = r["bytes_per_job"], r["keys_per_job"]
        print(f"| {name} | {r['jobs']} | {size['main']:.0f} | {size.get('cache', size['main']):.0f}"
              f"{' (the same server)' if 'cache' not in size else ''} | "
              f"{', '.join(f'{v:.2f}' for v in keys.values())} | {r['job_record_bytes']:.0f} |")


def run(workdir: Path) -> dict:
    cards = workdir / "cards"
    cards.mkdir()
    null_model.write_card(cards)
    results = {}
    for name, options in (("one redis, everysec", {"fsync": "everysec"}),
                          ("one redis, DURABLE_ACCEPT (always)", {"fsync": "always"}),
                          ("main + cache redis", {"fsync": "everysec", "split_cache": True})):
        home = workdir / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
        home.mkdir()
        service = Service(home, cards, models=(null_model.NAME,), torch_threads=1, **options)
        try:
            seed = 100 + len(results)
            results[name] = measure(service, distinct_jpegs(Image.fromarray(skdata.chelsea()), IMAGES, seed=seed))
        finally:
            service.close()
    results["settled"] = run_settled(workdir, cards)
    return results


def print_roles(results: dict) -> None:
    print("| setup | new img/s | submit p50 / p99 ms | redis CPU ms/img (main, cache) | KiB moved/img "
          "(main, cache) | KiB stored/img (main, cache) | cache-hit redis CPU ms/img |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        if name == "settled":
            continue
        new, hit = r["new"], r["cache_hit"]
        pair = lambda d: ", ".join(f"{v:.2f}" if isinstance(v, float) and v < 10 else f"{v:.1f}" for v in d)  # noqa: E731
        cpu = [new["cpu_ms_per_image"]["redis-server"]] + ([new["cpu_ms_per_image"]["redis cache"]]
                                                          if "redis cache" in new["cpu_ms_per_image"] else [])
        hit_cpu = hit["cpu_ms_per_image"]["redis-server"] + hit["cpu_ms_per_image"].get("redis cache", 0.0)
        print(f"| {name} | {new['images_per_s']:.0f} | {new['submit_p50_ms']:.1f} / {new['submit_p99_ms']:.1f} | "
              f"{pair(cpu)} | {pair(new['redis_kib_moved_per_image'].values())} | "
              f"{pair(new['redis_kib_stored_per_image'].values())} | {hit_cpu:.2f} |")
    if "settled" in results:
        print()
        print_settled(results["settled"])


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        if os.environ.get("BENCH_SETTLED_ONLY"):
            (Path(tmp) / "cards").mkdir()
            null_model.write_card(Path(tmp) / "cards")
            outcome = {"settled": run_settled(Path(tmp), Path(tmp) / "cards")}
        else:
            outcome = run(Path(tmp))
    print_roles(outcome)
    print(json.dumps(outcome))
