"""`make gpu-check`: on a CUDA GPU, every ``cuda`` test, then the GPU benchmark; all in one file.

One command for the few minutes a GPU is lent (about 8 on an H100): the ``cuda``-marked tests (the
decode/compute race of pytorch/vision#9606 included), the raw model limit in fp32, fp16 and bf16 by
batch size 1-256, device decode against Pillow (baseline and progressive JPEGs), the real model end
to end with enough web processes and load-generator processes to load the card (single jobs and
``/api/v1/batches``), idle latency, the null-model service ceiling, the GPU's busy share, and CPU
milliseconds per image by process. Everything goes to ``$OUT/gpu-check.json`` (or ``gpu-check/``),
with the table printed at the end.

Where torch sees no GPU it prints one line and exits 0. ``--dry-run`` runs every step on the CPU at
a tiny scale instead, so the script itself is proven before a GPU's minutes are spent on it.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from skimage import data as skdata

from bench import ceiling, micro
from bench.gpu import GpuBusy
from bench.service import Poster, Service, distinct_jpegs
from shared.cards import load_card
from shared.settings import REPO_ROOT
from worker.models import load_model

CARD = REPO_ROOT / "models" / "efficientnet-lite0.toml"
RAW_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Scale:
    """How much of everything: a GPU's full run, or the CPU dry run's token amounts."""

    def __init__(self, dry_run: bool):
        cores = os.cpu_count() or 2
        self.dry_run = dry_run
        self.device = torch.device("cpu" if dry_run else "cuda", 0)
        self.raw_batches = (1, 2) if dry_run else RAW_BATCHES
        self.images = 16 if dry_run else int(os.environ.get("GPU_CHECK_IMAGES", "3000"))
        self.idle_jobs = 4 if dry_run else 40
        self.web_processes = 1 if dry_run else int(os.environ.get("GPU_CHECK_WEB", max(2, cores // 2)))
        self.load_processes = 1 if dry_run else int(os.environ.get("GPU_CHECK_LOADERS", max(2, cores // 4)))
        self.clients = 4 if dry_run else 16  # threads per load-generator process
        self.ceiling_images = 24 if dry_run else 2000


def run_cuda_tests(out: Path, dry_run: bool) -> dict:
    """Every ``cuda``-marked test, with its outcome (only collected in a dry run)."""
    report = out / "cuda-tests.xml"
    args = [sys.executable, "-m", "pytest", "-m", "cuda", "-p", "no:cacheprovider", "-q", f"--junitxml={report}"]
    if dry_run:
        args.append("--collect-only")
    started = time.perf_counter()
    done = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return {"exit_code": done.returncode, "summary": lines[-1] if lines else "", "seconds": time.perf_counter() - started,
            "failures": [line for line in lines if line.startswith(("FAILED", "ERROR"))]}


def decode_rates(device: torch.device, dry_run: bool) -> dict:
    """Milliseconds per image: device decode against Pillow, baseline and progressive 640x480 JPEGs."""
    from bench.device_decode import _ms_per_image
    from worker import imaging
    from worker.device_decode import decode_batch

    card = load_card(CARD)
    photo = Image.fromarray(skdata.chelsea())
    table = {}
    for kind in ("baseline", "progressive"):
        datas = distinct_jpegs(photo, 8 if dry_run else 128, seed=5)
        if kind == "progressive":
            datas = [_progressive(data) for data in datas]

        def device_path(batch):
            return decode_batch(batch, card, device, max_pixels=50_000_000).tensor

        def pillow_path(batch):
            return [imaging.preprocess(imaging.decode(d, min_short_side=card.resize, max_pixels=50_000_000).image,
                                       card) for d in batch]

        table[kind] = {"device_decode_ms": _ms_per_image(device_path, datas, device, 3),
                       "pillow_ms": _ms_per_image(pillow_path, datas, device, 3)}
    return table


def _progressive(data: bytes) -> bytes:
    import io

    out = io.BytesIO()
    Image.open(io.BytesIO(data)).save(out, "JPEG", quality=90, progressive=True)
    return out.getvalue()


def _post_share(base: str, images: list[bytes], clients: int) -> list[str]:
    poster = Poster(base)
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(poster.post, images))
    return [body["id"] for status, body, _ in answers if status in (200, 202)]


def loaded_throughput(service: Service, images: list[bytes], scale: Scale) -> dict:
    """Distinct images from several load-generator processes at once; img/s and CPU ms per image."""
    from bench.procstat import CpuMeter

    meter, before = CpuMeter(service.pids()), os.times()
    shares = [images[i::scale.load_processes] for i in range(scale.load_processes)]
    start = time.perf_counter()
    with GpuBusy() as busy, concurrent.futures.ProcessPoolExecutor(scale.load_processes) as pool:
        ids = [i for share in pool.map(_post_share, [service.base] * len(shares), shares,
                                       [scale.clients] * len(shares)) for i in share]
        end = service.wait_all(ids)
    after = os.times()
    cpu = meter.per_image_ms(len(images))
    loaders = (after.children_user + after.children_system - before.children_user - before.children_system)
    cpu["load generator"] += loaders * 1000 / len(images)
    cpu["total"] += loaders * 1000 / len(images)
    return {"images": len(images), "accepted": len(ids), "images_per_s": len(ids) / (end - start),
            "cpu_ms_per_image": cpu, "gpu": busy.summary(), "worker": service.worker_info()}


def end_to_end(workdir: Path, scale: Scale) -> dict:
    """The real model behind the whole service: loaded (jobs, then batches) and idle."""
    service = Service(workdir, REPO_ROOT / "models", web_processes=scale.web_processes, web_threads=16)
    try:
        photo = Image.fromarray(skdata.chelsea())
        result = {"worker_ready_s": service.worker_ready_s,
                  "jobs": loaded_throughput(service, distinct_jpegs(photo, scale.images, seed=11), scale)}
        with GpuBusy() as busy:
            result["batches"] = ceiling.batches(service, distinct_jpegs(photo, scale.images // 2, seed=12),
                                                clients=scale.load_processes * 2)
        result["batches"]["gpu"] = busy.summary()
        idle = service.idle_latency(distinct_jpegs(Image.fromarray(skdata.coffee()), scale.idle_jobs, seed=13))
        result["idle"] = {k: v for k, v in idle.items() if k in ("p50", "p99", "stages_ms_median")}
        return result
    finally:
        service.close()


def machine(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cores": os.cpu_count()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True)
        info["driver_and_memory"] = smi.stdout.strip()
    return info


def main() -> int:
    dry_run = "--dry-run" in sys.argv
    if not dry_run and not torch.cuda.is_available():
        print("gpu-check: skipped, torch sees no CUDA GPU here (run with --dry-run to rehearse it on the CPU)")
        return 0
    scale = Scale(dry_run)
    out = Path(os.environ.get("OUT") or REPO_ROOT / "gpu-check")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report = {"dry_run": dry_run, "machine": machine(scale.device)}

    def step(name, fn):
        print(f"gpu-check: {name} ...", flush=True)
        began = time.perf_counter()
        try:
            report[name] = fn()
        except Exception as exc:  # one broken step must not cost the others' figures
            report[name] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"gpu-check: {name} took {time.perf_counter() - began:.0f} s", flush=True)
        (out / "gpu-check.json").write_text(json.dumps(report, indent=2, default=str))

    step("cuda_tests", lambda: run_cuda_tests(out, dry_run))
    step("raw_limit", lambda: _raw(scale))
    step("decode", lambda: decode_rates(scale.device, dry_run))
    if not dry_run:
        torch.cuda.empty_cache()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "e2e").mkdir()
        (Path(tmp) / "ceiling").mkdir()
        step("end_to_end", lambda: end_to_end(Path(tmp) / "e2e", scale))
        step("ceiling", lambda: _ceiling(Path(tmp) / "ceiling", scale))
    report["seconds"] = time.perf_counter() - started
    (out / "gpu-check.json").write_text(json.dumps(report, indent=2, default=str))
    print_summary(report)
    print(f"gpu-check: {report['seconds']:.0f} s; written to {out / 'gpu-check.json'}")
    return 0 if report["cuda_tests"].get("exit_code") == 0 else 1


def _raw(scale: Scale) -> dict:
    model = load_model(load_card(CARD), scale.device)
    if scale.dry_run:
        return micro.model_limit(model, batches=scale.raw_batches)
    return micro.gpu_precision(model, batches=scale.raw_batches)


def _ceiling(workdir: Path, scale: Scale) -> dict:
    ceiling.CEILING_IMAGES = scale.ceiling_images
    with GpuBusy() as busy:
        result = ceiling.run(workdir, clients=scale.clients * scale.load_processes, web_processes=scale.web_processes)
    result["gpu"] = busy.summary()
    return result


def print_summary(report: dict) -> None:
    """The figures BENCHMARKS.md records, one line each."""
    tests = report["cuda_tests"]
    print(f"cuda tests: {tests.get('summary') or tests}")
    raw = report.get("raw_limit", {}).get("images_per_s", report.get("raw_limit"))
    print(f"raw limit (img/s): {json.dumps(raw)}")
    print(f"decode (ms/img): {json.dumps(report.get('decode'))}")
    e2e = report.get("end_to_end", {})
    for kind in ("jobs", "batches"):
        part = e2e.get(kind, {})
        if "images_per_s" in part:
            print(f"end to end, {kind}: {part['images_per_s']:.0f} img/s, GPU {part.get('gpu')}, "
                  f"CPU ms/img {json.dumps({k: round(v, 2) for k, v in part['cpu_ms_per_image'].items()})}")
        else:
            print(f"end to end, {kind}: {part}")
    if isinstance(raw, dict) and "jobs" in e2e and "images_per_s" in e2e["jobs"]:
        fp16 = max((v for k, v in raw.items() if k.startswith("float16")), default=None)
        if fp16:
            print(f"end to end / raw fp16 limit: {e2e['jobs']['images_per_s'] / fp16:.2f} (target >= 0.5)")
    print(f"idle: {json.dumps(e2e.get('idle'))}")
    ceil = report.get("ceiling", {})
    if "new" in ceil:
        print(f"null-model ceiling: {ceil['new']['images_per_s']:.0f} img/s, CPU ms/img "
              f"{json.dumps({k: round(v, 2) for k, v in ceil['new']['cpu_ms_per_image'].items()})}")
    else:
        print(f"null-model ceiling: {ceil}")


if __name__ == "__main__":
    sys.exit(main())
