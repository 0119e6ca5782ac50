"""What tracing costs, part by part, in one process: CPU time of all its threads (the exporter's
included, up to a final flush) with traces off, on at sampling 1.0 and on at 0.01, exporting over
OTLP/HTTP to a sink in its own process (not counted).

The service-level figure (``bench.tracing_cost``) adds the noise of five processes on a machine
that may be busy; here each part runs alone, each mode in a fresh process, the modes in turns:

- web: the submit path (``POST /api/v1/jobs`` through Flask's test client on a real Redis, each
  upload new), per request: the request span, the cache lookup span, the traceparent for the job;
- worker: the spans of a batch (``shared.tracing.batch_started`` and the batch's stage spans, as
  ``worker.runtime`` makes them), per image;
- webhooks: one attempt's span and the traceparent it sends, per attempt.

``python -m bench.tracing_parts [turns]``.
"""
from __future__ import annotations

import importlib
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.tracing_cost import MODES, _sink

WEB_REQUESTS = int(os.environ.get("BENCH_TRACING_REQUESTS", "1000"))
WORKER_IMAGES = 3000
BATCH = 5  # images per batch: what the null-model ceiling's worker takes on average
BATCHES_PER_S = 40  # the pace of the null-model ceiling (200 images/s): the exporter keeps up, as there
ATTEMPTS = 2000
ATTEMPTS_PER_S = 400
KEPT = ("OTEL_BSP_", "OTEL_EXPORTER_OTLP_COMPRESSION")  # settings under test, passed on to each mode


_COLLECTING = {"ms": 0.0, "started": 0.0}  # CPU ms the garbage collector took, in all generations


def _timed_collections(phase: str, _info) -> None:
    if phase == "start":
        _COLLECTING["started"] = time.process_time()
    else:
        _COLLECTING["ms"] += (time.process_time() - _COLLECTING["started"]) * 1000


def _flush() -> None:
    from opentelemetry import trace

    provider = trace.get_tracer_provider()
    if hasattr(provider, "force_flush"):
        provider.force_flush()


def _measured(work, units: int) -> tuple[float, float]:
    """CPU ms per unit of ``work()`` until its spans are exported, and the collector's share of it."""
    _flush()
    start, collected = time.process_time(), _COLLECTING["ms"]
    work()
    _flush()
    return (time.process_time() - start) * 1000 / units, (_COLLECTING["ms"] - collected) / units


def _traceparent() -> str:
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def web_part(workdir: Path) -> tuple[float, float]:
    """CPU ms per new submit through the Flask test client."""
    import io

    from PIL import Image
    from skimage import data as skdata

    from bench import null_model
    from bench.service import distinct_jpegs
    from shared.settings import Settings
    from tools import stack
    from web import create_app

    cards = workdir / "cards"
    cards.mkdir()
    null_model.write_card(cards)
    redis_proc, url = stack.start_redis(workdir)
    try:
        settings = Settings(redis_url=url, model_cards_dir=cards, models=(null_model.NAME,),
                            rate_limit="1000000/minute", max_queue_depth=0)
        client = create_app(settings).test_client()
        images = distinct_jpegs(Image.fromarray(skdata.chelsea()), WEB_REQUESTS + 50, size=(160, 120), seed=11)

        def submit(data: bytes) -> None:
            answer = client.post("/api/v1/jobs", data={"image": (io.BytesIO(data), "x.jpg")})
            if answer.status_code != 202:
                raise RuntimeError(f"submit refused: {answer.status_code} {answer.get_data()[:200]}")

        for data in images[:50]:  # warm-up
            submit(data)
        return _measured(lambda: [submit(data) for data in images[50:]], WEB_REQUESTS)
    finally:
        stack.stop(redis_proc)


def _paced(items: list, per_s: float, fn) -> None:
    """Call ``fn`` on each item, no faster than ``per_s`` a second (sleeping costs no CPU)."""
    start = time.monotonic()
    for index, item in enumerate(items):
        fn(*item)
        if (ahead := start + (index + 1) / per_s - time.monotonic()) > 0:
            time.sleep(ahead)


def worker_part(_workdir: Path) -> tuple[float, float]:
    """CPU ms per image for the spans of batches of BATCH jobs (the work itself left out), in a
    process with the worker's modules (torch) loaded: a collection of the oldest generation
    scans them all, and span objects that live until their export count towards its next one."""
    importlib.import_module("worker.runtime")  # the worker's heap
    from shared import tracing

    def one_batch(parents: list[str], enqueued: list[float]) -> None:
        taken_at = time.time()
        span = tracing.batch_started(parents, enqueued, taken_at, requested=BATCH)
        for name, attributes in (("decode and preprocess", {"images": BATCH}),
                                 ("forward and gradcam", {"images": BATCH}), ("write results", None)):
            tracing.finish(tracing.child(span, name, attributes=attributes))
        tracing.finish(span)

    batches = [([_traceparent() for _ in range(BATCH)], [time.time() - 0.01] * BATCH)
               for _ in range(WORKER_IMAGES // BATCH)]
    _paced(batches[:50], BATCHES_PER_S * 4, one_batch)
    return _measured(lambda: _paced(batches, BATCHES_PER_S, one_batch), len(batches) * BATCH)


def webhook_part(_workdir: Path) -> tuple[float, float]:
    """CPU ms per webhook attempt for its span and the traceparent it sends."""
    from shared import tracing

    def attempt(parent: str, number: int) -> None:  # as webhooks.delivery makes one
        with tracing.span("webhook attempt", parent=parent,
                          attributes={"webhook.event_id": "evt", "webhook.attempt": number}) as current:
            headers = {}
            if traceparent := tracing.traceparent_of(current):
                headers["traceparent"] = traceparent
            if current is not None:
                current.set_attribute("http.response.status_code", 200)

    parents = [(_traceparent(), 1) for _ in range(ATTEMPTS)]
    _paced(parents[:50], ATTEMPTS_PER_S * 4, attempt)
    return _measured(lambda: _paced(parents, ATTEMPTS_PER_S, attempt), ATTEMPTS)


PARTS = {"web": web_part, "worker": worker_part, "webhooks": webhook_part}


def _one(part: str) -> None:
    import gc

    from shared import tracing
    from shared.settings import Settings

    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        tracing.configure(Settings(tracing=True), f"bench-{part}")
    gc.callbacks.append(_timed_collections)
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(PARTS[part](Path(tmp))))


def run(turns: int = 3) -> dict:
    """Median CPU ms per unit of each part in each mode, over ``turns`` turns of fresh processes."""
    parts = os.environ.get("BENCH_TRACING_PARTS", ",".join(PARTS)).split(",")
    samples: dict[str, dict[str, list]] = {part: {mode: [] for mode in MODES} for part in parts}
    with _sink() as endpoint:
        for _ in range(turns):
            for part in parts:
                for mode, extra in MODES.items():
                    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_") or k.startswith(KEPT)}
                    if extra:
                        env.update({"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, **extra})
                    out = subprocess.run([sys.executable, "-m", "bench.tracing_parts", "--one", part], env=env,
                                         check=True, capture_output=True, text=True).stdout
                    samples[part][mode].append(json.loads(out.strip().splitlines()[-1]))
    return {part: {mode: {"median": statistics.median(v[0] for v in values),
                          "gc_median": statistics.median(v[1] for v in values), "runs": values}
                   for mode, values in modes.items()}
            for part, modes in samples.items()}


def print_parts(table: dict) -> None:
    modes = list(MODES)
    print("CPU ms per unit (the collector's part in brackets), median of the turns")
    print("| part | " + " | ".join(modes) + " | added at 1.0 | added at 0.01 |")
    print("|---|" + "---|" * (len(modes) + 2))
    for part, row in table.items():
        off = row["off"]["median"]
        print(f"| {part} | " + " | ".join(f"{row[m]['median']:.3f} ({row[m]['gc_median']:.3f})" for m in modes)
              + f" | {row[modes[1]]['median'] - off:+.3f} | {row[modes[2]]['median'] - off:+.3f} |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        _one(sys.argv[2])
        sys.exit(0)
    outcome = run(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
    print_parts(outcome)
    print(json.dumps(outcome))
