"""`make bench`: measure the hardware limit and the service against it in one run; write results.json."""
from __future__ import annotations

import gc
import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data as skdata

from bench import ceiling, device_decode, fairness, micro, roles, submit_wait, tracing_cost
from bench.gpu import GpuBusy
from bench.service import Service, distinct_jpegs
from shared.cards import load_card
from shared.settings import REPO_ROOT
from worker.models import load_model

RESULTS = REPO_ROOT / "bench" / "results.json"
E2E_IMAGES = int(os.environ.get("BENCH_IMAGES", "200"))
IDLE_JOBS = int(os.environ.get("BENCH_IDLE_JOBS", "40"))
# A GPU host's card needs many web processes and clients to be kept busy; a small CPU box, one.
WEB_PROCESSES = int(os.environ.get("BENCH_WEB_PROCESSES", max(1, (os.cpu_count() or 2) // 2)
                                   if torch.cuda.is_available() else 1))
CLIENTS = int(os.environ.get("BENCH_CLIENTS", "32" if torch.cuda.is_available() else "8"))


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "cuda": torch.cuda.is_available(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def one_mb_jpeg() -> bytes:
    rng = np.random.default_rng(3)
    photo = np.asarray(Image.fromarray(skdata.astronaut()).resize((900, 900)), dtype=np.int16)
    noisy = np.clip(photo + rng.integers(-20, 20, photo.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(noisy).save(out, "JPEG", quality=95)
    return out.getvalue()


def main() -> None:
    started = time.time()
    card = load_card(REPO_ROOT / "models" / "efficientnet-lite0.toml")
    torch.set_num_threads(os.cpu_count() or 1)
    model = load_model(card, torch.device("cpu"))
    photo = Image.fromarray(skdata.chelsea())
    results = {"machine": machine(), "model": f"{card.name} {card.version}"}
    print("measuring the model limit ...", flush=True)
    results["limit"] = micro.model_limit(model)
    results["gradcam"] = micro.gradcam_cost(model)
    results["decode_12mp"] = micro.decode_cost(model, photo)
    del model
    gc.collect()
    if torch.cuda.is_available():
        print("measuring fp32 vs AMP on the GPU ...", flush=True)
        results["gpu"] = micro.gpu_precision(load_model(card, torch.device("cuda", 0)))
        results["gpu"]["device_decode_ms_per_image"] = {
            f"b{batch}": {"nvjpeg": ours, "pillow": pillow}
            for batch, ours, pillow in device_decode.bench(torch.device("cuda", 0), batches=(1, 32, 128))}
        torch.cuda.empty_cache()

    with tempfile.TemporaryDirectory() as tmp:
        print("starting redis, worker and web ...", flush=True)
        service = Service(Path(tmp), REPO_ROOT / "models", web_processes=WEB_PROCESSES)
        try:
            results["startup"] = {"worker_ready_s": service.worker_ready_s,
                                  "web_first_200_s": service.web_first_200_s,
                                  "web_rss_mb": service.web_rss_mb, "worker_rss_mb": service.worker_rss_mb}
            print(f"end to end with {E2E_IMAGES} images ...", flush=True)
            with GpuBusy() as busy:
                results["e2e"] = service.throughput(distinct_jpegs(photo, E2E_IMAGES), clients=CLIENTS)
            results["e2e"]["gpu"] = busy.summary()
            print("idle latency ...", flush=True)
            results["idle"] = service.idle_latency(distinct_jpegs(Image.fromarray(skdata.coffee()), IDLE_JOBS))
            print("cache hits ...", flush=True)
            results["cache_hit"] = service.cache_hits(one_mb_jpeg())
            print("webhook callbacks ...", flush=True)
            results["callback"] = service.callbacks(one_mb_jpeg())
        finally:
            service.close()
        print(f"service ceiling with the null model ({ceiling.CEILING_IMAGES} images) ...", flush=True)
        (Path(tmp) / "ceiling").mkdir()
        with GpuBusy() as busy:
            results["ceiling"] = ceiling.run(Path(tmp) / "ceiling", web_processes=WEB_PROCESSES)
        results["ceiling"]["gpu"] = busy.summary()
        print(f"submit-and-wait clients, with and without Prefer: wait ({submit_wait.IMAGES} images each) ...",
              flush=True)
        (Path(tmp) / "submit_wait").mkdir()
        results["submit_wait"] = submit_wait.run(Path(tmp) / "submit_wait")
        print(f"redis per image by role, and DURABLE_ACCEPT ({roles.IMAGES} images each) ...", flush=True)
        (Path(tmp) / "roles").mkdir()
        results["roles"] = roles.run(Path(tmp) / "roles")
        print("what tracing costs: the ceiling with traces off, at sampling 1.0 and 0.01 ...", flush=True)
        (Path(tmp) / "tracing").mkdir()
        results["tracing"] = tracing_cost.run(Path(tmp) / "tracing")
        results["fairness"] = []
        for model in ("null", "real"):
            print(f"fair share under a deep backlog, {model} model ({fairness.IMAGES[model]} images of key A) ...",
                  flush=True)
            (Path(tmp) / f"fairness-{model}").mkdir()
            results["fairness"].append(fairness.run(Path(tmp) / f"fairness-{model}", model))
    limit = results["limit"]["limit_images_per_s"]
    results["e2e"]["ratio_to_limit"] = results["e2e"]["images_per_s"] / limit
    results["idle"]["overhead_ms_p50"] = results["idle"]["p50"] - results["gradcam"]["single_image_ms"]
    results["seconds"] = time.time() - started
    RESULTS.write_text(json.dumps(results, indent=2))
    print_table(results)


def _row(name: str, value: str, target: str, ok: bool | None) -> str:
    verdict = "" if ok is None else ("met" if ok else "MISSED")
    return f"| {name} | {value} | {target} | {verdict} |"


def print_table(r: dict) -> None:
    limit, e2e, idle, hit = r["limit"], r["e2e"], r["idle"], r["cache_hit"]
    cam, dec, start = r["gradcam"], r["decode_12mp"], r["startup"]
    rows = [
        "| measure | value | target | |", "|---|---|---|---|",
        _row("model limit (plain torch loop, best)", f"{limit['limit_images_per_s']:.1f} img/s ({limit['best']})", "", None),
        _row("end to end throughput", f"{e2e['images_per_s']:.1f} img/s ({e2e['images']} images, "
             f"mean batch {e2e['mean_batch_size_sampled']:.1f})", "", None),
        _row("end to end / limit", f"{e2e['ratio_to_limit']:.2f}", ">= 0.85", e2e["ratio_to_limit"] >= 0.85),
        _row("idle latency submit->done", f"p50 {idle['p50']:.1f} ms, p99 {idle['p99']:.1f} ms", "", None),
        _row("idle overhead over raw inference+GradCAM", f"{idle['overhead_ms_p50']:.1f} ms (p50)", "<= 15 ms",
             idle["overhead_ms_p50"] <= 15),
        _row(f"cache hit ({hit['image_bytes'] / 1e6:.1f} MB image)", f"p50 {hit['p50']:.2f} ms, p99 {hit['p99']:.2f} ms",
             "p50 <= 4, p99 <= 15", hit["p50"] <= 4 and hit["p99"] <= 15),
        _row("cache hit with callback_url: submit -> signed webhook received",
             f"p50 {r['callback']['p50']:.1f} ms, p99 {r['callback']['p99']:.1f} ms", "", None),
        _row("GradCAM / forward (ours)", f"{cam['ours_ratio']:.2f}x", "<= 1.2x", cam["ours_ratio"] <= 1.2),
        _row("GradCAM / forward (pytorch-grad-cam)", f"{cam['pytorch_grad_cam_ratio']:.2f}x", "", None),
        _row("12 MP JPEG decode+preprocess (ours)", f"{dec['ours_ms']:.1f} ms (plain: {dec['plain_ms']:.1f} ms, "
             f"{dec['speedup']:.1f}x)", "<= 25 ms", dec["ours_ms"] <= 25),
        _row("web cold start to first 200", f"{start['web_first_200_s'] * 1000:.0f} ms, RSS {start['web_rss_mb']:.0f} MiB",
             "< 1 s, no torch", start["web_first_200_s"] < 1),
        _row("worker start to ready", f"{start['worker_ready_s']:.1f} s, RSS {start['worker_rss_mb']:.0f} MiB", "", None),
    ]
    rows += ceiling_rows(r["ceiling"])
    waited = r["submit_wait"]
    rows.append(_row("web CPU per image saved by Prefer: wait (8 submit-and-wait clients, null model)",
                     f"{waited['web_cpu_saved']:.0%} ({waited['submit_then_long_poll']['cpu_ms_per_image']['web']:.2f}"
                     f" -> {waited['prefer_wait']['cpu_ms_per_image']['web']:.2f} ms)", ">= 30%",
                     waited["web_cpu_saved"] >= 0.3))
    if "gpu" in r:
        rows += [_row(f"GPU {r['gpu']['device']} {name}", f"{rate:.0f} img/s", "", None)
                 for name, rate in r["gpu"]["images_per_s"].items()]
        rows += [_row(f"GPU decode + preprocess, batch {b[1:]}", f"nvJPEG {ms['nvjpeg']:.2f} ms/img, "
                      f"Pillow {ms['pillow']:.2f} ms/img", "", None)
                 for b, ms in r["gpu"]["device_decode_ms_per_image"].items()]
        fp16 = max(v for k, v in r["gpu"]["images_per_s"].items() if k.startswith("float16"))
        rows.append(_row("GPU end to end / raw fp16 limit", f"{e2e['images_per_s'] / fp16:.2f}", ">= 0.5",
                         e2e["images_per_s"] / fp16 >= 0.5))
        for name in ("e2e", "ceiling"):
            busy = (r[name] if name == "e2e" else r["ceiling"]).get("gpu")
            if busy:
                rows.append(_row(f"GPU busy during {name}", f"{busy['busy_mean_percent']:.0f}% mean, "
                                 f"{busy['memory_peak_mib']:.0f} MiB peak", "", None))
    print()
    print("\n".join(rows))
    print()
    ceiling.print_ceiling(r["ceiling"])
    print()
    submit_wait.print_submit_wait(r["submit_wait"])
    print()
    roles.print_roles(r["roles"])
    print()
    tracing_cost.print_cost(r["tracing"])
    for outcome in r["fairness"]:
        print()
        fairness.print_fairness(outcome)
    print(f"\nidle stages (median ms): {json.dumps({k: round(v, 1) for k, v in idle['stages_ms_median'].items()})}")
    print(f"machine: {r['machine']}; total {r['seconds']:.0f} s; written to {RESULTS.relative_to(REPO_ROOT)}")


def ceiling_rows(c: dict) -> list[str]:
    """The service-ceiling targets: the service's own CPU cost per image, by process kind."""
    new, hit = c["new"]["cpu_ms_per_image"], c["cache_hit"]["cpu_ms_per_image"]
    return [
        _row("service ceiling (null model, GradCAM on)", f"{c['new']['images_per_s']:.0f} img/s", ">= 200",
             c["new"]["images_per_s"] >= 200),
        _row("CPU ms per image, every process", f"{new['total']:.2f}", "<= 10", new["total"] <= 10),
        _row("CPU ms per new submit, web", f"{new['web']:.2f}", "<= 2.5", new["web"] <= 2.5),
        _row("CPU ms per cache hit, web", f"{hit['web']:.2f}", "<= 1.5", hit["web"] <= 1.5),
        _row("CPU ms per image, worker (with the null model's forward)", f"{new['worker']:.2f}", "<= 4",
             new["worker"] <= 4),
        _row("CPU ms per image, redis-server", f"{new['redis-server']:.2f}", "<= 1.5", new["redis-server"] <= 1.5),
    ]


if __name__ == "__main__":
    main()
