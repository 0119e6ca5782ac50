"""What OpenTelemetry tracing costs: the service ceiling (null model) with traces off, on at sampling 1.0,
and on at 0.01, each exporting over OTLP/HTTP to a sink in its own process (not counted).

``python -m bench.tracing_cost`` runs it alone; ``make bench`` runs it as part of the harness.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

from bench import ceiling
from tools.stack import free_port

MODES = {"off": {}, "on, sampling 1.0": {"OTEL_TRACES_SAMPLER": "always_on"},
         "on, sampling 0.01": {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"}}
KINDS = ("web", "worker", "redis-server", "webhook worker")  # the service's own processes


class _Sink(BaseHTTPRequestHandler):
    """An OTLP/HTTP receiver that accepts and drops every export (a collector stands in here)."""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _sink():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.tracing_cost", "--sink", str(port)])
    time.sleep(0.5)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


# Each mode runs twice, in mirrored order (off, 1.0, 0.01, 0.01, 1.0, off), and its two runs are
# averaged: one pass in one order read the first mode lowest by up to 0.8 ms whichever it was (the
# machine drifts over minutes), more than tracing itself costs.
ORDER = (*MODES, *reversed(MODES))


def run(workdir: Path) -> dict:
    """CPU ms per new image (the service's processes) in each mode, and what tracing adds."""
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    with _sink() as endpoint:
        for turn, mode in enumerate(ORDER):
            (workdir / str(turn)).mkdir()
            extra = MODES[mode]
            env = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, **extra} if extra else {}
            with _environment(env):
                runs[mode].append(ceiling.run(workdir / str(turn))["new"])
    table = {}
    for mode, results in runs.items():
        cpu = {k: sum(r["cpu_ms_per_image"][k] for r in results) / len(results) for k in KINDS}
        table[mode] = {"images_per_s": sum(r["images_per_s"] for r in results) / len(results),
                       "cpu_ms_per_image": cpu, "service_ms": sum(cpu.values()),
                       "runs_service_ms": [sum(r["cpu_ms_per_image"][k] for k in KINDS) for r in results]}
    for mode in MODES:
        table[mode]["added_ms"] = table[mode]["service_ms"] - table["off"]["service_ms"]
    return table


def print_cost(table: dict) -> None:
    print("| tracing (two runs each, mirrored order) | img/s | " + " | ".join(KINDS)
          + " | service CPU ms/img (the two runs) | added |")
    print("|---|---|" + "---|" * len(KINDS) + "---|---|")
    for mode, row in table.items():
        each = " / ".join(f"{ms:.2f}" for ms in row["runs_service_ms"])
        print(f"| {mode} | {row['images_per_s']:.0f} | " + " | ".join(f"{row['cpu_ms_per_image'][k]:.2f}" for k in KINDS)
              + f" | {row['service_ms']:.2f} ({each}) | {row['added_ms']:+.2f} |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--sink"]:
        HTTPServer(("127.0.0.1", int(sys.argv[2])), _Sink).serve_forever()
    with tempfile.TemporaryDirectory() as tmp:
        outcome = run(Path(tmp))
    print_cost(outcome)
    print(json.dumps(outcome))
