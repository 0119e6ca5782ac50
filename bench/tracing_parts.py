"""What tracing costs, part by part, in one process: CPU time of all its threads (the exporter's
included) at sampling 1.0 and at 0.01, exporting over OTLP/HTTP to a sink in its own process
(not counted).

The service-level figure (``bench.tracing_cost``) adds the noise of five processes on a machine
that may be busy. Here each part runs alone, in a process of its own per sampling, in blocks that
alternate between tracing on and tracing off (the same process, heap and moment): what tracing
adds is the on blocks' CPU less the off blocks', the collector's time left out of both, plus the
collector's time beyond what the same work takes in a process where tracing was never on. Each
on block ends with a flush, so its spans' encoding and export count in it. The parts:

- web: the submit path (``POST /api/v1/jobs`` through Flask's test client on a real Redis, each
  upload new), per request: the request span, the cache lookup span, the traceparent for the job;
- worker: the spans of a batch (``shared.tracing.batch_started`` and the batch's stage spans, as
  ``worker.runtime`` makes them), per image, at the null-model ceiling's pace, with the worker's
  modules (torch) loaded: a full collection scans them all, and span objects that live until their
  export bring the next one nearer;
- web-spans: the web tier's spans alone, on a route that does nothing else (per request);
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

PAIRS = 4  # on and off blocks per process
BATCH = 5  # images per batch: what the null-model ceiling's worker takes on average
BATCHES_PER_S = 40  # the null-model ceiling's pace (200 images/s)
KEPT = ("OTEL_BSP_", "OTEL_EXPORTER_OTLP_COMPRESSION")  # settings under test, passed on to each process

_COLLECTING = {"ms": 0.0, "started": 0.0}  # CPU ms the garbage collector took, all generations


def _timed_collections(phase: str, _info) -> None:
    if phase == "start":
        _COLLECTING["started"] = time.process_time()
    else:
        _COLLECTING["ms"] += (time.process_time() - _COLLECTING["started"]) * 1000


class Blocks:
    """Alternate blocks of work with tracing on and off in this process; sum each kind's CPU."""

    def __init__(self):
        from shared import tracing

        self.tracing, self.tracer = tracing, tracing._tracer  # None: tracing is off in this process
        self.cpu = {True: 0.0, False: 0.0}  # CPU ms, the collector's time left out
        self.collected, self.units = 0.0, 0

    def run(self, blocks: list, work) -> None:
        """``work(block)`` for each block, on and off in turns (the first pair is a warm-up)."""
        for index, block in enumerate(blocks):
            on = index % 2 == 0
            self.tracing._tracer = self.tracer if on else None
            start, collected = time.process_time(), _COLLECTING["ms"]
            work(block)
            if on and self.tracer is not None:
                self.tracer_provider_flush()
            spent, collected = (time.process_time() - start) * 1000, _COLLECTING["ms"] - collected
            if index >= 2:
                self.cpu[on] += spent - collected
                self.collected += collected
                self.units += len(block) if on else 0
        self.tracing._tracer = self.tracer

    @staticmethod
    def tracer_provider_flush() -> None:
        from opentelemetry import trace

        trace.get_tracer_provider().force_flush()

    def result(self) -> dict:
        return {"on_ms": self.cpu[True] / self.units, "off_ms": self.cpu[False] / self.units,
                "gc_ms": self.collected / self.units}


def _traceparent() -> str:
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def _paced(items: list, per_s: float, fn) -> None:
    """Call ``fn`` on each item, no faster than ``per_s`` a second (sleeping costs no CPU)."""
    start = time.monotonic()
    for index, item in enumerate(items):
        fn(*item)
        if (ahead := start + (index + 1) / per_s - time.monotonic()) > 0:
            time.sleep(ahead)


def web_part(workdir: Path) -> dict:
    """CPU ms per new submit through the Flask test client (one app with the request hooks, one without)."""
    import io

    from PIL import Image
    from skimage import data as skdata

    from bench import null_model
    from bench.service import distinct_jpegs
    from shared import tracing
    from shared.settings import Settings
    from tools import stack
    from web import create_app

    per_block = 250  # 500 spans: the exporter's default batch
    cards = workdir / "cards"
    cards.mkdir()
    null_model.write_card(cards)
    redis_proc, url = stack.start_redis(workdir)
    try:
        settings = Settings(redis_url=url, model_cards_dir=cards, models=(null_model.NAME,),
                            rate_limit="1000000/minute", max_queue_depth=0,
                            max_queue_depth_per_key=0)
        tracer, tracing._tracer = tracing._tracer, None
        untraced = create_app(settings).test_client()  # no request hooks
        tracing._tracer = tracer
        traced = create_app(settings).test_client()
        images = distinct_jpegs(Image.fromarray(skdata.chelsea()), per_block * 2 * (PAIRS + 1), size=(160, 120),
                                seed=11)
        blocks = [images[i:i + per_block] for i in range(0, len(images), per_block)]

        def submit_all(block: list[bytes]) -> None:
            client = traced if tracing._tracer is not None else untraced
            for data in block:
                answer = client.post("/api/v1/jobs", data={"image": (io.BytesIO(data), "x.jpg")})
                if answer.status_code != 202:
                    raise RuntimeError(f"submit refused: {answer.status_code} {answer.get_data()[:200]}")

        measured = Blocks()
        measured.run(blocks, submit_all)
        return measured.result()
    finally:
        stack.stop(redis_proc)


def web_spans_part(_workdir: Path) -> dict:
    """CPU ms per request for the web tier's spans alone: the submit's (the request span through the
    hooks, the job's traceparent, the cache lookup span) on a route that does nothing else, paced,
    without the submit's own 2-3 ms whose spread hides them in ``web``."""
    from flask import Flask

    from shared import tracing

    def app(traced: bool):
        made = Flask(__name__)

        @made.post("/api/v1/jobs")
        def submit():
            traceparent = tracing.current_traceparent()
            with tracing.span("cache lookup") as lookup:
                if lookup is not None:
                    lookup.set_attribute("imgsvc.outcome", "new")
            return {"traceparent": traceparent}, 202

        if traced:
            tracing.instrument_flask(made)
        return made.test_client()

    tracer, tracing._tracer = tracing._tracer, None
    untraced = app(False)
    tracing._tracer = tracer
    traced = app(True)

    def submit(_number: int) -> None:
        (traced if tracing._tracer is not None else untraced).post("/api/v1/jobs")

    per_block = 250
    requests = [(n,) for n in range(per_block * 2 * (PAIRS + 1))]
    measured = Blocks()
    measured.run([requests[i:i + per_block] for i in range(0, len(requests), per_block)],
                 lambda block: _paced(block, 200, submit))
    return measured.result()


def worker_part(_workdir: Path) -> dict:
    """CPU ms per image for the spans of batches of BATCH jobs (the work itself left out)."""
    importlib.import_module("worker.runtime")  # the worker's heap
    from shared import tracing

    def one_batch(parents: list[str], enqueued: list[float]) -> None:
        span = tracing.batch_started(parents, enqueued, time.time(), requested=BATCH)
        for name, attributes in (("decode and preprocess", {"images": BATCH}),
                                 ("forward and gradcam", {"images": BATCH}), ("write results", None)):
            tracing.finish(tracing.child(span, name, attributes=attributes))
        tracing.finish(span)

    per_block = 60  # batches: 300 images
    batches = [([_traceparent() for _ in range(BATCH)], [time.time() - 0.01] * BATCH)
               for _ in range(per_block * 2 * (PAIRS + 1))]
    measured = Blocks()
    measured.run([batches[i:i + per_block] for i in range(0, len(batches), per_block)],
                 lambda block: _paced(block, BATCHES_PER_S, one_batch))
    result = measured.result()
    return {key: value / BATCH for key, value in result.items()}


def webhook_part(_workdir: Path) -> dict:
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

    per_block = 250
    attempts = [(_traceparent(), 1) for _ in range(per_block * 2 * (PAIRS + 1))]
    measured = Blocks()
    measured.run([attempts[i:i + per_block] for i in range(0, len(attempts), per_block)],
                 lambda block: _paced(block, 400, attempt))
    return measured.result()


PARTS = {"web": web_part, "web-spans": web_spans_part, "worker": worker_part, "webhooks": webhook_part}


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
    """Per part and sampling, over ``turns`` turns of fresh processes (medians): CPU ms per unit
    with tracing off and what it adds, split into the collector's time and the rest."""
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
    table = {}
    for part, modes in samples.items():
        untraced_gc = statistics.median(s["gc_ms"] for s in modes["off"])
        table[part] = {"off_ms": statistics.median(s["off_ms"] for s in modes["off"]),
                       "noise_ms": statistics.median(s["on_ms"] - s["off_ms"] for s in modes["off"])}
        for mode in list(MODES)[1:]:
            spans = statistics.median(s["on_ms"] - s["off_ms"] for s in modes[mode])
            collector = statistics.median(s["gc_ms"] for s in modes[mode]) - untraced_gc
            table[part][mode] = {"spans_ms": spans, "gc_ms": collector, "added_ms": spans + collector}
    return {"table": table, "samples": samples}


def print_parts(outcome: dict) -> None:
    modes = list(MODES)[1:]
    print("CPU ms per unit added by tracing (the collector's part in brackets); off: the unit's CPU untraced")
    print("| part | off | " + " | ".join(f"added, {mode}" for mode in modes) + " | off blocks vs off blocks |")
    print("|---|---|" + "---|" * len(modes) + "---|")
    for part, row in outcome["table"].items():
        print(f"| {part} | {row['off_ms']:.3f} | "
              + " | ".join(f"{row[m]['added_ms']:+.3f} ({row[m]['gc_ms']:+.3f})" for m in modes)
              + f" | {row['noise_ms']:+.3f} |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        _one(sys.argv[2])
        sys.exit(0)
    result = run(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
    print_parts(result)
    print(json.dumps(result))
