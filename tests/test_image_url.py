"""Images by URL (issue 21, item 4), against the real stack and a real image server on loopback.

The session's settings allow loopback (FETCH_ALLOW_PRIVATE), as the callback tests do for receivers;
the first tests show what happens without that allowance.
"""
import base64
import dataclasses
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests import images
from shared.keys import image_digest
from shared.settings import Settings
from tests.conftest import ARTIFACTS, FETCH_TIMEOUT_S
from tools import stack as services
from tests.test_integrators import MODEL
from webhooks.fetch import FetchError, fetch_image

pytestmark = pytest.mark.integration
GOOD = images.noise_png(seed=21_401)
STREAM_CHUNK = 1024 * 1024


class ImageServer:
    """Serves a good PNG, a 404, a redirect loop, an HTML page, a slow answer and an endless body."""

    def __init__(self):
        self.streamed = 0  # bytes of the endless body written before the client hung up
        self.once_asked = threading.Event()  # /once.png hangs on its first request, then answers
        self.stop = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def do_GET(self):
                route = {"/good.png": self.good, "/again.png": self.good, "/missing.png": self.missing,
                         "/loop": self.loop, "/page.html": self.page, "/slow.png": self.slow,
                         "/endless.png": self.endless, "/declared.png": self.declared,
                         "/moved.png": self.moved, "/once.png": self.once}.get(self.path, self.missing)
                if self.path.startswith("/hop/"):  # /hop/N redirects N times, then answers the image
                    route = self.hop
                try:
                    route()
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def answer(self, status, body=b"", content_type="image/png", **headers):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def good(self):
                self.answer(200, GOOD)

            def missing(self):
                self.answer(404, b"no such image", "text/plain")

            def loop(self):
                self.answer(302, Location="/loop")

            def moved(self):
                self.answer(301, Location="/good.png")

            def page(self):
                self.answer(200, b"<!DOCTYPE html><html><body>not an image</body></html>", "text/html")

            def slow(self):
                server.stop.wait(FETCH_TIMEOUT_S + 5)
                self.answer(200, GOOD)

            def once(self):
                if not server.once_asked.is_set():
                    server.once_asked.set()
                    server.stop.wait(60)
                self.answer(200, GOOD)

            def hop(self):
                left = int(self.path.rsplit("/", 1)[1])
                if left:
                    self.answer(307, Location=f"/hop/{left - 1}")
                else:
                    self.answer(200, GOOD)

            def declared(self):
                self.send_response(200)
                self.send_header("Content-Length", str(1 << 40))
                self.end_headers()
                self.wfile.write(GOOD)

            def endless(self):
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.end_headers()  # no length: the body goes on until one side hangs up
                chunk = GOOD[:8] + bytes(STREAM_CHUNK - 8)
                while not server.stop.is_set() and server.streamed < 1 << 31:
                    self.wfile.write(chunk)
                    server.streamed += len(chunk)

            def log_message(self, *args):
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http.server_address[1]}"

    def close(self):
        self.stop.set()
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture(scope="module")
def server():
    images_server = ImageServer()
    yield images_server
    images_server.close()


@pytest.fixture
def stack(worker, webhook_worker, client):
    return client


def by_url(client, url: str, headers=None, **options):
    return client.post("/api/v1/jobs", json={"image_url": url, "model": MODEL, **options}, headers=headers or {})


def settled(client, job_id: str) -> dict:
    return client.get(f"/api/v1/jobs/{job_id}?wait=25").get_json()


def test_a_loopback_image_url_is_refused_without_the_allowance(settings, server):
    from web import create_app

    strict = create_app(dataclasses.replace(settings, fetch_allow_private=False)).test_client()
    answer = by_url(strict, server.url + "/good.png")
    error = answer.get_json()["error"]
    assert (answer.status_code, error["code"]) == (422, "invalid_image_url")
    assert "loopback" in error["message"] and "image_url" in error["message"]


def test_the_fetch_step_checks_every_address_itself(server):
    """The worker's own check (each hop of a redirect goes through it), not only the web tier's."""
    with ThreadPoolExecutor(1) as lookups, pytest.raises(FetchError, match="refused address.*loopback"):
        fetch_image(server.url + "/moved.png", max_bytes=1 << 20, timeout_s=5, connect_timeout_s=2,
                    allow_private=False, lookups=lookups)


def test_at_most_three_redirects_are_followed(server):
    with ThreadPoolExecutor(1) as lookups:
        fetch = dict(max_bytes=1 << 20, timeout_s=5, connect_timeout_s=2, allow_private=True, lookups=lookups)
        assert fetch_image(server.url + "/hop/3", **fetch) == GOOD
        with pytest.raises(FetchError, match="too many redirects: more than 3"):
            fetch_image(server.url + "/hop/4", **fetch)


def test_a_good_image_by_url_is_computed_and_the_same_image_again_is_a_cache_hit(stack, server):
    answer = by_url(stack, server.url + "/good.png", headers={"Prefer": "wait=25"})
    job = answer.get_json()
    assert (answer.status_code, job["status"]) == (200, "done"), job
    assert job["image"]["sha256"] and job["image"]["format"] == "PNG" and job["result"]["predictions"]
    again = by_url(stack, server.url + "/again.png")  # another URL, the same bytes
    assert again.status_code == 202 and again.get_json()["status"] == "queued"
    hit = settled(stack, again.get_json()["id"])
    assert (hit["status"], hit["cached"]) == ("done", True)
    assert hit["result"]["predictions"] == job["result"]["predictions"]


def test_a_redirect_is_followed(stack, server):
    job = settled(stack, by_url(stack, server.url + "/moved.png", top_k=2).get_json()["id"])
    assert job["status"] == "done" and len(job["result"]["predictions"]) == 2


@pytest.mark.parametrize("path, why", [
    ("/missing.png", "HTTP 404"),
    ("/loop", "too many redirects"),
    ("/page.html", "an HTML page"),
    ("/declared.png", "too large"),
])
def test_a_failed_fetch_fails_the_job_saying_why(stack, server, path, why):
    job = settled(stack, by_url(stack, server.url + path).get_json()["id"])
    assert (job["status"], job["error"]["code"]) == ("failed", "fetch_failed"), job
    assert why in job["error"]["message"]


def test_a_slow_server_fails_the_job_after_fetch_timeout_and_the_job_is_queued_meanwhile(stack, server):
    started = time.monotonic()
    answer = by_url(stack, server.url + "/slow.png")
    assert answer.status_code == 202 and time.monotonic() - started < 2  # the web tier does not fetch
    assert stack.get(f"/api/v1/jobs/{answer.get_json()['id']}").get_json()["status"] == "queued"
    job = settled(stack, answer.get_json()["id"])
    assert (job["status"], job["error"]["code"]) == ("failed", "fetch_failed")
    assert "timed out" in job["error"]["message"]
    assert FETCH_TIMEOUT_S <= time.monotonic() - started < FETCH_TIMEOUT_S + 5


def test_a_body_over_max_upload_mb_is_abandoned_while_streaming(stack, server, settings):
    job = settled(stack, by_url(stack, server.url + "/endless.png").get_json()["id"])
    assert (job["status"], job["error"]["code"]) == ("failed", "fetch_failed")
    assert "too large" in job["error"]["message"]
    time.sleep(0.5)
    # what was read past the limit is a chunk or so, plus what the sockets buffer: never the whole body
    assert server.streamed < settings.max_upload_bytes + 16 * STREAM_CHUNK, server.streamed


def test_a_data_url_is_decoded_without_a_fetch(stack):
    data_url = "data:image/png;base64," + base64.b64encode(images.noise_png(seed=21_402)).decode()
    answer = by_url(stack, data_url, headers={"Prefer": "wait=25"})
    assert (answer.status_code, answer.get_json()["status"]) == (200, "done")


def test_an_image_url_form_field_works_like_the_json_body(stack, server):
    answer = stack.post("/api/v1/jobs", data={"image_url": server.url + "/good.png", "model": MODEL})
    assert answer.status_code == 202
    assert settled(stack, answer.get_json()["id"])["status"] == "done"


@pytest.mark.parametrize("url, status, code", [
    ("ftp://example.com/cat.png", 422, "invalid_image_url"),
    ("data:image/png;base64,@@@", 422, "invalid_image_url"),
    ("data:image/png;base64," + "A" * (2 * 1024 * 1024), 413, "payload_too_large"),
    ("data:text/plain,hello", 415, "unsupported_image"),
])
def test_an_unusable_image_url_is_refused_at_submit(stack, url, status, code):
    answer = by_url(stack, url)
    assert (answer.status_code, answer.get_json()["error"]["code"]) == (status, code)


def test_a_download_cut_short_by_a_webhook_worker_crash_is_made_again(tmp_path, cards_dir, server):
    """At least once: the download message is acknowledged late, so the one a killed webhook worker
    held comes back (after the visibility timeout) to the next, and the job gets its image."""
    from web import create_app

    redis_proc, url = services.start_redis(tmp_path)
    own = Settings(redis_url=url, model_cards_dir=cards_dir, fetch_allow_private=True, fetch_timeout_s=40,
                   visibility_timeout_s=12, job_soft_time_limit_s=5, job_time_limit_s=10, heartbeat_interval_s=1,
                   worker_ttl_s=5, rate_limit="100000/minute")
    procs = [redis_proc]
    try:
        app = create_app(own)
        client, celery = app.test_client(), app.extensions["imgsvc"].celery
        job_id = by_url(client, server.url + "/once.png").get_json()["id"]
        first = services.start_webhook_worker(own, ARTIFACTS / "fetch-crash-1.log", name="fetch-crash-1")
        procs.append(first)
        assert server.once_asked.wait(20), "the first webhook worker never began the download"
        os.killpg(first.pid, signal.SIGKILL)  # mid-download: nothing acknowledged, nothing written
        first.wait(10)
        assert client.get(f"/api/v1/jobs/{job_id}").get_json()["status"] == "queued"
        procs.append(services.start_webhook_worker(own, ARTIFACTS / "fetch-crash-2.log", name="fetch-crash-2"))
        time.sleep(own.visibility_timeout_s + 1)
        with celery.connection_for_read() as connection:  # what consumers sweep periodically (kombu)
            connection.default_channel.qos.restore_visible(num=100)

        def joined():
            job = client.get(f"/api/v1/jobs/{job_id}").get_json()
            return job if job["image"] else None

        job = services.wait_for(joined, 60, "the download to be made again")
        assert job["image"]["sha256"] == image_digest(GOOD) and job["status"] == "queued"  # no inference worker here
    finally:
        for proc in reversed(procs):
            services.stop(proc)


def test_delivery_messages_are_not_copied_to_the_fetches_queue(webhook_worker, redis_client):
    """Each of the webhook worker's queues has its own exchange binding: a queue bound with the
    defaults would share the webhooks exchange and key, and get a copy of every delivery message."""
    bound = [entry.split(b"\x06\x16")[-1] for entry in redis_client.smembers("_kombu.binding.webhooks")]
    assert bound == [b"webhooks"]
    assert [entry.split(b"\x06\x16")[-1] for entry in redis_client.smembers("_kombu.binding.fetches")] == [b"fetches"]


def test_a_failed_fetch_calls_back_job_failed_signed(stack, server):
    from standardwebhooks import Webhook

    from tests.conftest import WEBHOOK_SECRET
    from tests.receiver import Receiver

    with Receiver() as receiver:
        job = by_url(stack, server.url + "/missing.png", callback_url=receiver.url + "/failed",
                     webhook_events="started,completed").get_json()
        [call] = receiver.wait("/failed", 1)
        payload = Webhook(WEBHOOK_SECRET).verify(call.body, call.headers)
        assert (payload["type"], payload["data"]["id"]) == ("job.failed", job["id"])
        assert payload["data"]["error"]["code"] == "fetch_failed"
        time.sleep(1)
        assert len(receiver.received) == 1  # no worker claimed it: no job.started
