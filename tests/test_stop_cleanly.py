"""Ctrl-C on `make run`: honcho runs the Procfile (the embedded main Redis and cache, the worker, the
webhook worker, the web) and, on SIGINT, sends SIGTERM to every process at once. Each must say goodbye
by itself: no traceback (nothing writes to a Redis that has already gone), no process that honcho has
to SIGKILL, none left behind."""
from __future__ import annotations

import os
import re
import signal
import socket
import sys
from pathlib import Path

import pytest
import requests

from tests import images
from tools.stack import free_port, spawn, wait_for

PROCESSES = ("redis", "cache", "worker", "webhooks", "web")


@pytest.fixture
def make_run(tmp_path):
    """The Procfile under honcho, as `make run` starts it (embedded Redis), on free ports; its log."""
    ports = {name: free_port() for name in ("REDIS_PORT", "CACHE_PORT", "WEB_PORT")}
    env = {**os.environ, **{name: str(port) for name, port in ports.items()},
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "REDIS_URL": f"redis://127.0.0.1:{ports['REDIS_PORT']}/0",
           "CACHE_URL": f"redis://127.0.0.1:{ports['CACHE_PORT']}/0", "REDIS_DIR": str(tmp_path / "redis"),
           "MODELS": "efficientnet-lite0", "WORKER_DEVICES": "cpu", "WORKER_CONCURRENCY": "1", "TORCH_THREADS": "1",
           "MAX_BATCH": "4", "WORKER_METRICS_PORT": "0", "WEB_PROCESSES": "1", "WEB_THREADS": "2",
           "SECRET_KEY": "stop-cleanly-test-secret-key", "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "make-run.log"
    honcho = spawn([sys.executable, "-m", "honcho", "start"], env=env, log=log)
    yield honcho, log, ports
    for pid in [honcho.pid, *_started(log).values()]:  # whatever is left if the test failed
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    honcho.wait(10)


def _started(log: Path) -> dict[str, int]:
    """Each Procfile process's pid (the leader of its own process group), as honcho announced it."""
    return {name: int(pid) for name, pid in re.findall(r"\| (\w+)\.1 started \(pid=(\d+)\)", log.read_text())}


def _ready(honcho, log: Path, ports: dict) -> bool:
    if honcho.poll() is not None:
        raise RuntimeError(f"honcho exited with {honcho.returncode}: {log.read_text()[-3000:]}")
    text = log.read_text(errors="replace")
    if "child " not in text or not re.search(r"webhooks@\S+ ready\.", text):
        return False
    try:
        return requests.get(f"http://127.0.0.1:{ports['WEB_PORT']}/readyz", timeout=5).ok
    except requests.RequestException:
        return False


def _parents() -> dict[int, tuple[int, str]]:
    """Every process's parent pid and state (Linux /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text() if entry.name.isdigit() else ""
        except OSError:
            continue
        if stat:
            state, parent = stat.rsplit(")", 1)[1].split()[:2]
            found[int(entry.name)] = (int(parent), state)
    return found


def _descendants(root: int) -> set[int]:
    parents, found, frontier = _parents(), set(), {root}
    while frontier:
        frontier = {pid for pid, (parent, _) in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pids: set[int]) -> set[int]:
    """Those of ``pids`` still running (an exited process waiting to be reaped does not count)."""
    return {pid for pid, (_, state) in _parents().items() if pid in pids and state != "Z"}


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_ctrl_c_stops_every_process_cleanly(make_run):
    honcho, log, ports = make_run
    wait_for(lambda: _ready(honcho, log, ports), 180, "make run's processes", interval=0.5)
    web = f"http://127.0.0.1:{ports['WEB_PORT']}"
    job = requests.post(f"{web}/api/v1/jobs", files={"image": ("cat.jpg", images.chelsea_jpeg(), "image/jpeg")},
                        timeout=30).json()
    assert requests.get(f"{web}/api/v1/jobs/{job['id']}?wait=30", timeout=60).json()["status"] == "done"

    processes = _descendants(honcho.pid)  # the Procfile's processes and everything they started
    assert len(processes) >= 2 * len(PROCESSES)
    os.killpg(honcho.pid, signal.SIGINT)  # what Ctrl-C sends to the terminal's foreground group
    honcho.wait(60)
    output = log.read_text(errors="replace")
    assert "Traceback" not in output, output[output.index("Traceback") - 2000:][:6000]
    assert "SIGKILL" not in output  # honcho did not have to kill anyone that outstayed its 5 s
    for name in _started(log):
        assert re.search(rf"\| {name}\.1 stopped \(rc=", output), name
    assert not _alive(processes), f"left running: {_alive(processes)}"
    assert set(_started(log)) == set(PROCESSES)
    assert not any(_listening(port) for port in ports.values())
