"""The ``imgsvc`` command line as a subprocess against the live stack; its retries against a tiny fake."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from client.http import ApiClient, ApiError
from tests import images

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def imgsvc_command() -> list[str]:
    """The installed console script (``make venv`` installs it), else the module it runs."""
    script = Path(sys.executable).parent / "imgsvc"
    return [str(script)] if script.exists() else [sys.executable, "-m", "client.cli"]


def run_imgsvc(base_url: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "IMGSVC_URL": base_url}
    return subprocess.run([*imgsvc_command(), *args], capture_output=True, text=True, timeout=240, env=env)


def lines_by_file(text: str) -> dict[str, dict]:
    return {Path(line["file"]).name: line for line in map(json.loads, text.splitlines())}


@pytest.fixture
def photos(tmp_path) -> Path:
    """A folder of two real photos (one with an upper-case suffix, one in a subfolder) and a text file."""
    folder = tmp_path / "photos"
    (folder / "more").mkdir(parents=True)
    (folder / "cat.JPG").write_bytes(images.chelsea_jpeg())
    (folder / "more" / "coffee.png").write_bytes(images.encode(images.coffee(), "PNG"))
    (folder / "notes.txt").write_text("not an image, and not picked up from a folder")
    return folder


@pytest.mark.integration
def test_submit_labels_the_cat_and_fails_for_a_broken_file(base_url, photos, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"this is not a JPEG at all\n")
    result = run_imgsvc(base_url, "submit", str(photos), str(broken), "--top-k", "3", "--quiet")
    assert result.returncode == 1, result.stderr
    lines = lines_by_file(result.stdout)
    assert set(lines) == {"cat.JPG", "coffee.png", "broken.jpg"}
    cat = lines["cat.JPG"]["job"]
    assert cat["status"] == "done" and len(cat["result"]["predictions"]) == 3
    assert cat["result"]["predictions"][0]["index"] in IMAGENET_CATS, cat["result"]["predictions"]
    assert lines["coffee.png"]["job"]["status"] == "done"
    assert lines["broken.jpg"]["status"] == 415
    assert lines["broken.jpg"]["error"]["code"] == "unsupported_image"
    assert "job" not in lines["broken.jpg"]


@pytest.mark.integration
def test_folder_of_good_images_exits_0_with_heatmaps_and_get_reads_a_job(base_url, photos, tmp_path):
    output, heatmaps = tmp_path / "results.jsonl", tmp_path / "heatmaps"
    result = run_imgsvc(base_url, "submit", str(photos), "--output", str(output), "--heatmaps", str(heatmaps),
                        "--concurrency", "2", "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    lines = lines_by_file(output.read_text())
    assert set(lines) == {"cat.JPG", "coffee.png"}
    for line in lines.values():
        assert line["job"]["status"] == "done"
        assert Path(line["heatmap"]).parent == heatmaps
        assert Path(line["heatmap"]).read_bytes().startswith(PNG_MAGIC)
    assert sorted(p.name for p in heatmaps.iterdir()) == ["cat.png", "coffee.png"]

    job_id = lines["cat.JPG"]["job"]["id"]
    shown = run_imgsvc(base_url, "get", job_id)
    assert shown.returncode == 0 and json.loads(shown.stdout)["id"] == job_id
    assert run_imgsvc(base_url, "get", "0" * 32).returncode == 1


@pytest.mark.integration
def test_batch_sends_the_folder_in_batches_and_keeps_each_file_with_its_job(base_url, photos):
    result = run_imgsvc(base_url, "batch", str(photos), "--batch-size", "1", "--no-gradcam", "--quiet")
    assert result.returncode == 0, result.stderr
    lines = lines_by_file(result.stdout)
    assert {name: line["job"]["status"] for name, line in lines.items()} == {"cat.JPG": "done",
                                                                              "coffee.png": "done"}
    assert lines["cat.JPG"]["job"]["result"]["predictions"][0]["index"] in IMAGENET_CATS
    assert lines["cat.JPG"]["job"]["batch_id"] != lines["coffee.png"]["job"]["batch_id"]


@pytest.mark.parametrize("args", [["submit", "/no/such/folder"], ["submit", ".", "--top-k", "0"],
                                  ["submit"], ["frobnicate"]])
def test_usage_errors_exit_2(args, tmp_path):
    result = run_imgsvc("http://127.0.0.1:9", *args)
    assert result.returncode == 2
    assert "usage:" in result.stderr


class Flaky(BaseHTTPRequestHandler):
    """Answers submits with the statuses in ``answers`` (Retry-After: 0); records their Idempotency-Keys."""

    answers: list[int] = []
    keys: list[str] = []
    prefers: list[str | None] = []
    skips, reads = 0, []

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        Flaky.keys.append(self.headers["Idempotency-Key"])
        Flaky.prefers.append(self.headers["Prefer"])
        status = Flaky.answers.pop(0)
        code = {409: "idempotency_in_progress", 422: "idempotency_key_reused"}.get(status, "overloaded")
        body = {"error": {"code": code, "message": "busy"}} if status >= 400 else {
            "id": "a" * 32, "status": "done" if status == 200 else "queued"}
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Retry-After", "0")
        self.end_headers()
        self.wfile.write(json.dumps(body).encode())

    def do_GET(self):
        """Answer job reads queued with ``Wait-Skipped`` while ``skips`` lasts, then done; record when."""
        Flaky.reads.append(time.monotonic())
        skipped = Flaky.skips > 0
        Flaky.skips -= 1
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        if skipped:
            self.send_header("Wait-Skipped", "too-many-waiters")
            self.send_header("Retry-After", "1")
        self.end_headers()
        self.wfile.write(json.dumps({"id": "a" * 32, "status": "queued" if skipped else "done"}).encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def flaky_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_retries_429_and_503_with_the_same_idempotency_key(flaky_server):
    Flaky.answers, Flaky.keys = [503, 429, 202], []
    job = ApiClient(flaky_server, max_retries=2).submit(b"bytes", "x.jpg", {"top_k": 3})
    assert job["status"] == "queued"
    assert len(Flaky.keys) == 3 and len(set(Flaky.keys)) == 1


def test_gives_up_after_the_retry_budget(flaky_server):
    Flaky.answers, Flaky.keys = [503, 503, 503], []
    with pytest.raises(ApiError) as refused:
        ApiClient(flaky_server, max_retries=1).submit(b"bytes", "x.jpg", {})
    assert (refused.value.status, refused.value.code) == (503, "overloaded")
    assert len(Flaky.keys) == 2


def test_a_retry_that_finds_its_first_try_still_being_accepted_waits_and_tries_again(flaky_server):
    Flaky.answers, Flaky.keys = [409, 202], []
    job = ApiClient(flaky_server, max_retries=2).submit(b"bytes", "x.jpg", {})
    assert job["status"] == "queued" and len(Flaky.keys) == 2 and len(set(Flaky.keys)) == 1


def test_other_conflicts_are_not_retried(flaky_server):
    Flaky.answers, Flaky.keys = [422, 202], []
    with pytest.raises(ApiError) as refused:
        ApiClient(flaky_server, max_retries=2).submit(b"bytes", "x.jpg", {})
    assert refused.value.code == "idempotency_key_reused" and len(Flaky.keys) == 1


def test_a_skipped_long_poll_is_retried_after_retry_after_not_at_once(flaky_server):
    Flaky.skips, Flaky.reads = 2, []
    job = ApiClient(flaky_server).wait_job({"id": "a" * 32, "status": "queued"}, timeout_s=10)
    assert job["status"] == "done" and len(Flaky.reads) == 3
    assert all(later - earlier >= 0.95 for earlier, later in zip(Flaky.reads, Flaky.reads[1:]))


def test_imgsvc_submit_asks_the_server_to_hold_the_answer_and_needs_no_poll_then(flaky_server, tmp_path):
    Flaky.answers, Flaky.keys, Flaky.prefers, Flaky.reads = [200], [], [], []
    (tmp_path / "one.png").write_bytes(images.noise_png(seed=21_601))
    from shared.settings import REPO_ROOT

    # this checkout's client (an installed script may be another checkout's)
    result = subprocess.run([sys.executable, "-m", "client.cli", "submit", str(tmp_path / "one.png"), "--quiet",
                             "--timeout", "60", "--url", flaky_server], capture_output=True, text=True, timeout=60,
                            cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    assert Flaky.prefers == ["wait=20"] and Flaky.reads == []  # one request: no long-poll after it
