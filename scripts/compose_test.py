"""Prove docker-compose.yml on a real engine: build, start, classify a photo, get a signed callback,
hold 200 slow clients at the nginx front door while an upload is answered, leave jobs queued with no
worker for a minute and scale back to one (they finish), scale to two workers, tear down. Run by
`make compose-test` (slow; not part of `make test`).

Needs a running Docker engine and Compose (v2 plugin or Debian's docker-compose 1.29). Registry
images are used when they can be pulled; otherwise the Python base and the Redis image are built
here with mmdebstrap (Debian bookworm, the host's CA bundle inside so pip reaches the same index).
Everything it starts is removed at the end, also on failure; images are kept as the build cache.
"""
from __future__ import annotations

import argparse
import http.server
import io
import json
import os
import secrets
import selectors
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import requests
import yaml
from PIL import Image
from skimage import data
from standardwebhooks import Webhook

REPO_ROOT = Path(__file__).resolve().parent.parent
WORK_DIR = REPO_ROOT / "var" / "compose-test"
PROJECT = "imgsvc-compose-test"
IMAGE = "imgsvc:compose-test"
PYTHON_BASE, LOCAL_PYTHON_BASE = "python:3.11-slim", "imgsvc-local/python:3.11-bookworm"
REDIS_IMAGE, LOCAL_REDIS_IMAGE = "redis:7-alpine", "imgsvc-local/redis:7-bookworm"
DEBIAN_BASE, LOCAL_DEBIAN_BASE = "debian:bookworm-slim", "imgsvc-local/debian:bookworm"
PROXY_IMAGE = "imgsvc-proxy:compose-test"
SLOW_CLIENTS, SLOW_LINE_EVERY_S, SLOW_FOR_S = 200, 3.0, 24.0
# The same at gunicorn itself (2 processes x 8 threads), for contrast: opened 20 ms apart, so that both
# processes accept some (a burst can land on one process, leaving the other free).
DIRECT_SLOW_CLIENTS, DIRECT_FOR_S = 48, 12.0
PROMPT_S = 5.0  # an upload or /healthz past the slow clients must be answered within this
NO_WORKER_S, QUEUED_JOBS = 60, 5
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
HOST_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
CAT_LABELS = {"Egyptian cat", "tabby", "tiger cat", "lynx", "Persian cat", "Siamese cat"}


class Failed(Exception):
    """A step of the proof did not hold; the message says which and what was seen."""


def log(message: str) -> None:
    print(f"[compose-test {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(args: list[str], timeout: float, check: bool = True, **kwargs) -> str:
    """Run a command with a time limit; return its stdout; raise Failed on a non-zero exit."""
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired:
        raise Failed(f"{' '.join(args[:4])} ... ran past {timeout:.0f} s") from None
    if check and done.returncode != 0:
        raise Failed(f"{' '.join(args)} exited {done.returncode}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return done.stdout


def run_streamed(args: list[str], timeout: float) -> None:
    """Run a long command (a build) with its output shown as it goes."""
    proc = subprocess.Popen(args)
    try:
        if proc.wait(timeout=timeout) != 0:
            raise Failed(f"{' '.join(args[:3])} ... exited {proc.returncode}")
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise Failed(f"{' '.join(args[:3])} ... ran past {timeout:.0f} s") from None


def compose_command() -> list[str]:
    """Docker's Compose v2 plugin when present, else the standalone docker-compose (v1)."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise Failed("No Compose: install Docker's compose plugin or Debian's docker-compose")


def image_exists(tag: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", tag], capture_output=True, timeout=30).returncode == 0


def pulled(tag: str) -> bool:
    log(f"pulling {tag}")
    try:
        return subprocess.run(["docker", "pull", tag], capture_output=True, timeout=300).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def debian_image(tag: str, packages: str, changes: list[str], with_host_ca: bool) -> None:
    """Build ``tag`` from Debian bookworm with mmdebstrap and import it (about 20 s each)."""
    if image_exists(tag):
        log(f"reusing {tag}")
        return
    if not shutil.which("mmdebstrap"):
        raise Failed("Cannot pull registry images and mmdebstrap is missing: apt-get install mmdebstrap")
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    tar = WORK_DIR / (tag.replace("/", "_").replace(":", "_") + ".tar")
    hooks = [f"--customize-hook=copy-in {HOST_CA_BUNDLE} /etc/ssl/certs"] if with_host_ca else []
    log(f"building {tag} with mmdebstrap ({packages})")
    run(["mmdebstrap", "--quiet", "--variant=minbase", f"--include={packages}", *hooks, "bookworm", str(tar)],
        timeout=600)
    run(["docker", "import", *[a for c in changes for a in ("--change", c)], str(tar), tag], timeout=300)
    tar.unlink()


def base_images() -> tuple[str, str, str]:
    """Return the Python base, the Redis image and the proxy's Debian base: the registry's, or local
    Debian stand-ins."""
    python_base = PYTHON_BASE if pulled(PYTHON_BASE) else LOCAL_PYTHON_BASE
    if python_base == LOCAL_PYTHON_BASE:
        # The host's CA bundle: the package index is reached through this host's TLS-inspecting proxy.
        debian_image(LOCAL_PYTHON_BASE, "python3,python3-venv,python3-pip,ca-certificates",
                     [f"ENV PIP_CERT={HOST_CA_BUNDLE}", 'CMD ["python3"]'], with_host_ca=True)
    redis_image = REDIS_IMAGE if pulled(REDIS_IMAGE) else LOCAL_REDIS_IMAGE
    if redis_image == LOCAL_REDIS_IMAGE:
        # Like the official image's entry point: no config file, so leave protected mode off.
        entrypoint = ('ENTRYPOINT ["sh", "-c", "if [ \\"$1\\" = redis-server ]; then shift; '
                      'exec redis-server \\"$@\\" --protected-mode no; fi; exec \\"$@\\"", "redis-entrypoint"]')
        debian_image(LOCAL_REDIS_IMAGE, "redis-server",
                     ["WORKDIR /data", "EXPOSE 6379", entrypoint, 'CMD ["redis-server"]'], with_host_ca=False)
    debian_base = DEBIAN_BASE if pulled(DEBIAN_BASE) else LOCAL_DEBIAN_BASE
    if debian_base == LOCAL_DEBIAN_BASE:  # the proxy's Dockerfile installs Debian's nginx into it
        debian_image(LOCAL_DEBIAN_BASE, "ca-certificates", ['CMD ["bash"]'], with_host_ca=False)
    return python_base, redis_image, debian_base


def torch_index() -> str:
    """PyTorch's CPU wheel index when it answers; empty (PyPI's CUDA wheels, which also run on a CPU) if not."""
    try:
        urllib.request.urlopen(f"{CPU_TORCH_INDEX}/torch/", timeout=15).close()
        return CPU_TORCH_INDEX
    except OSError as exc:
        log(f"{CPU_TORCH_INDEX} unreachable ({exc}): torch comes from PyPI (CUDA build, runs on the CPU)")
        return ""


def build_image(python_base: str, index: str) -> None:
    log(f"building {IMAGE} from {python_base} (torch index: {index or 'PyPI'})")
    run_streamed(["docker", "build", "--network", "host", "--build-arg", f"BASE_IMAGE={python_base}",
                  "--build-arg", f"TORCH_INDEX_URL={index}", "-t", IMAGE, str(REPO_ROOT)], timeout=3600)


def build_proxy_image(debian_base: str) -> None:
    log(f"building {PROXY_IMAGE} (Debian's nginx) from {debian_base}")
    run_streamed(["docker", "build", "--network", "host", "--build-arg", f"BASE_IMAGE={debian_base}",
                  "-t", PROXY_IMAGE, str(REPO_ROOT / "deploy" / "nginx")], timeout=900)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render_stack(compose: list[str], env: dict[str, str], ports: dict[str, int]) -> Path:
    """Merge docker-compose.yml with the CPU override and make it runnable here: no GPU reservation
    (an override cannot delete it), loopback ports nobody else holds, callbacks to this host allowed."""
    merged = yaml.safe_load(run([*compose, "-f", str(REPO_ROOT / "docker-compose.yml"),
                                 "-f", str(REPO_ROOT / "docker-compose.cpu.yml"), "config"],
                                timeout=60, env=env, cwd=REPO_ROOT))
    services = merged["services"]
    reservations = services["worker"]["deploy"]["resources"]["reservations"]
    if not reservations.pop("devices", None):
        raise Failed("docker-compose.yml lost the worker's GPU reservation")
    if services["web"].get("ports"):
        raise Failed("docker-compose.yml publishes gunicorn directly; only the proxy may face clients")
    for name, port in ports.items():
        target = {"proxy": 8080, "flower": 5555, "web": 8000}[name]  # web: the contrast, for this test only
        services[name]["ports"] = [f"127.0.0.1:{port}:{target}"]
    for name in ("web", "webhooks"):
        services[name]["environment"]["WEBHOOK_ALLOW_PRIVATE"] = "true"  # the receiver is on this host
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    path = WORK_DIR / "stack.yml"
    path.write_text(yaml.safe_dump(merged, sort_keys=False))
    return path


class Receiver:
    """A webhook receiver on the stack network's gateway address: reachable from the containers only."""

    def __init__(self, address: str):
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.arrived = threading.Event()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                receiver.arrived.set()
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer((address, 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def wait_for(what: str, check, timeout: float, interval: float = 2.0):
    """Call ``check`` until it returns something truthy; raise Failed after ``timeout`` seconds."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except (requests.RequestException, ValueError, KeyError) as exc:
            last = exc
        time.sleep(interval)
    raise Failed(f"{what}: not within {timeout:.0f} s (last error: {last})")


def cat_photo() -> bytes:
    out = io.BytesIO()
    Image.fromarray(data.chelsea()).save(out, format="JPEG", quality=92)
    return out.getvalue()


class Stack:
    """The running compose project: its commands, its web address, its secrets."""

    def __init__(self, compose: list[str], file: Path, env: dict[str, str], web_port: int):
        # web_port: the proxy's published port, the stack's only way in
        self.base = [*compose, "-p", PROJECT, "-f", str(file)]
        self.env, self.web = env, f"http://127.0.0.1:{web_port}"

    def compose(self, *args: str, timeout: float = 300) -> str:
        return run([*self.base, *args], timeout=timeout, env=self.env, cwd=WORK_DIR)

    def gateway(self) -> str:
        return run(["docker", "network", "inspect", f"{PROJECT}_default", "-f",
                    "{{(index .IPAM.Config 0).Gateway}}"], timeout=30).strip()

    def containers(self) -> list[dict]:
        ids = run(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={PROJECT}"],
                  timeout=30).split()
        return json.loads(run(["docker", "inspect", *ids], timeout=30)) if ids else []

    def admin(self, path: str) -> dict:
        answer = requests.get(f"{self.web}/api/v1/admin/{path}", timeout=10,
                              headers={"Authorization": f"Bearer {self.env['ADMIN_TOKEN']}"})
        answer.raise_for_status()
        return answer.json()

    def down(self) -> None:
        try:
            run([*self.base, "down", "-v", "--remove-orphans", "--timeout", "20"], timeout=180,
                env=self.env, cwd=WORK_DIR)
        except Failed as exc:
            log(f"teardown: {exc}")


def create_api_key(stack: Stack) -> tuple[str, str]:
    out = stack.compose("exec", "-T", "web", "flask", "--app", "web.wsgi", "keys", "create", "compose-test",
                        timeout=120)
    key = json.loads(out[out.index("{"):])
    return key["api_key"], key["webhook_secret"]


def classify_cat(stack: Stack, api_key: str, callback_url: str) -> dict:
    photo = cat_photo()
    answer = requests.post(f"{stack.web}/api/v1/jobs", timeout=30, headers={"Authorization": f"Bearer {api_key}"},
                           files={"image": ("chelsea.jpg", photo, "image/jpeg")},
                           data={"callback_url": callback_url})
    if answer.status_code != 202:
        raise Failed(f"POST /api/v1/jobs answered {answer.status_code}: {answer.text[:500]}")
    location = stack.web + answer.headers["Location"]

    def finished():
        job = requests.get(location, timeout=10, headers={"Authorization": f"Bearer {api_key}"}).json()
        if job["status"] == "failed":
            raise Failed(f"the job failed: {job['error']}")
        return job if job["status"] == "done" else None

    job = wait_for("the cat job to finish", finished, timeout=300)
    top = job["result"]["predictions"][0]
    if top["label"] not in CAT_LABELS:
        raise Failed(f"chelsea was labelled {top}, not a cat")
    log(f"job {job['id']}: {top['label']} ({top['score']:.2f}) on {job['result']['device']}")
    png = requests.get(stack.web + job["result"]["gradcam"]["url"], timeout=60,
                       headers={"Authorization": f"Bearer {api_key}"})
    heatmap = Image.open(io.BytesIO(png.content))
    width, height = heatmap.size  # drawn on the small picture the worker kept: the photo's aspect, not its size
    if png.status_code != 200 or heatmap.format != "PNG" or abs(width / height - 451 / 300) > 0.02:
        raise Failed(f"gradcam.png: HTTP {png.status_code}, {heatmap.format} {heatmap.size}, wanted a PNG of "
                     "chelsea's 451:300 aspect")
    log(f"heatmap: PNG {heatmap.size[0]}x{heatmap.size[1]}, {len(png.content)} bytes")
    cached = stack.compose("exec", "-T", "redis-cache", "redis-cli", "--scan", "--pattern", "result:*").split()
    policy = stack.compose("exec", "-T", "redis-cache", "redis-cli", "config", "get", "maxmemory-policy").split()
    if not cached or policy[-1:] != ["allkeys-lru"]:
        raise Failed(f"the cache role's server holds {len(cached)} results, policy {policy[-1:]}")
    log(f"cache server (allkeys-lru) holds {len(cached)} result(s)")
    return job


def check_callback(receiver: Receiver, secret: str, job: dict) -> None:
    if not receiver.arrived.wait(timeout=120):
        raise Failed("no callback reached the receiver within 120 s")
    headers, body = receiver.received[0]
    payload = Webhook(secret).verify(body, headers)  # raises on a bad signature
    if job["id"] not in json.dumps(payload):
        raise Failed(f"the callback does not name job {job['id']}: {body[:300]!r}")
    log(f"callback: signature verified (webhook-id {headers.get('webhook-id')})")


def check_two_workers(stack: Stack) -> None:
    stack.compose("up", "-d", "--no-build", "--no-recreate", "--scale", "worker=2", timeout=300)

    def two_nodes():
        nodes = stack.admin("workers")["workers"]
        return nodes if len(nodes) >= 2 else None

    nodes = wait_for("two worker nodes in the admin API", two_nodes, timeout=300, interval=3)
    ready = requests.get(f"{stack.web}/readyz", timeout=10).json()
    log(f"scaled: admin API lists {[n['name'] for n in nodes]}; /readyz counts {ready['workers']} children")


def check_metrics(stack: Stack) -> None:
    """The web's /metrics answers the METRICS_TOKEN only."""
    url = f"{stack.web}/metrics"
    if requests.get(url, timeout=10).status_code != 401:
        raise Failed("/metrics answered without a token")
    answer = requests.get(url, timeout=10, headers={"Authorization": f"Bearer {stack.env['METRICS_TOKEN']}"})
    if answer.status_code != 200 or "imgsvc_jobs_submitted_total" not in answer.text:
        raise Failed(f"/metrics with METRICS_TOKEN: {answer.status_code} {answer.text[:200]}")
    log("/metrics: 401 without a token, the series with METRICS_TOKEN")


def noise_jpeg(seed: int) -> bytes:
    """A photo nobody uploaded before (so a computation, not a cache hit)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


def submit(stack: Stack, api_key: str, photo: bytes) -> requests.Response:
    return requests.post(f"{stack.web}/api/v1/jobs", timeout=30, headers={"Authorization": f"Bearer {api_key}"},
                         files={"image": ("photo.jpg", photo, "image/jpeg")})


def hold_slow_clients(port: int, opened: threading.Event, cut: dict[int, float], count: int = SLOW_CLIENTS,
                      for_s: float = SLOW_FOR_S, apart_s: float = 0.0) -> None:
    """Open ``count`` connections (``apart_s`` apart) that each send one more header line every
    SLOW_LINE_EVERY_S and never finish their request, for at most ``for_s``; note when the server cut
    each one."""
    clients = []
    for _ in range(count):
        time.sleep(apart_s)
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(b"POST /api/v1/jobs HTTP/1.1\r\nHost: slow\r\nContent-Type: image/jpeg\r\n")
        sock.setblocking(False)
        clients.append(sock)
    selector = selectors.DefaultSelector()
    for index, sock in enumerate(clients):
        selector.register(sock, selectors.EVENT_READ, index)
    start = time.monotonic()
    opened.set()
    next_line = start + SLOW_LINE_EVERY_S
    try:
        while time.monotonic() - start < for_s and len(cut) < len(clients):
            for key, _ in selector.select(timeout=0.2):  # readable: a 408 or the end of the stream
                cut[key.data] = time.monotonic() - start
                selector.unregister(key.fileobj)
            if time.monotonic() >= next_line:
                next_line += SLOW_LINE_EVERY_S
                for index, sock in enumerate(clients):
                    if index not in cut:
                        try:
                            sock.send(b"X-Slow: 1\r\n")
                        except OSError:
                            cut[index] = time.monotonic() - start
    finally:
        selector.close()
        for sock in clients:
            sock.close()


def show_gunicorn_alone_jams(web_port: int) -> None:
    """For contrast (logged, not required): DIRECT_SLOW_CLIENTS slow clients at gunicorn's own port (which
    docker-compose.yml does not publish; this test's rendering does) hold its threads, and its /healthz
    waits."""
    opened, cut = threading.Event(), {}
    holder = threading.Thread(target=hold_slow_clients, args=(web_port, opened, cut, DIRECT_SLOW_CLIENTS,
                                                              DIRECT_FOR_S, 0.02), daemon=True)
    holder.start()
    opened.wait(timeout=30)
    time.sleep(1.0)
    started = time.monotonic()
    try:
        direct = f"answered {requests.get(f'http://127.0.0.1:{web_port}/healthz', timeout=PROMPT_S).status_code}"
    except requests.RequestException:
        direct = "not answered"
    log(f"contrast: with {DIRECT_SLOW_CLIENTS} slow clients at gunicorn's own port for {DIRECT_FOR_S:g} s, its "
        f"/healthz was {direct} after {time.monotonic() - started:.1f} s (limit {PROMPT_S:g} s)")
    holder.join(timeout=DIRECT_FOR_S + 10)
    wait_for("gunicorn to answer again once the slow clients left",
             lambda: requests.get(f"http://127.0.0.1:{web_port}/healthz", timeout=5).ok, timeout=60)


def check_slow_clients(stack: Stack, api_key: str) -> None:
    """With SLOW_CLIENTS connections dribbling header lines at the front door, /healthz and a new
    upload are answered within PROMPT_S; nginx cuts the slow ones at its header timeout."""
    opened, cut = threading.Event(), {}
    port = int(stack.web.rsplit(":", 1)[1])
    holder = threading.Thread(target=hold_slow_clients, args=(port, opened, cut), daemon=True)
    holder.start()
    if not opened.wait(timeout=60):
        raise Failed(f"could not open {SLOW_CLIENTS} connections to the proxy")
    opened_at, timings, ids = time.monotonic(), [], []
    for seed in (1, 2, 3):  # all three while every slow client is still open (nginx cuts them at 10 s)
        time.sleep(1.0)
        started = time.monotonic()
        health = requests.get(f"{stack.web}/healthz", timeout=PROMPT_S)
        upload = submit(stack, api_key, noise_jpeg(seed))
        timings.append(round(time.monotonic() - started, 3))
        if health.status_code != 200 or upload.status_code != 202:
            raise Failed(f"with slow clients: /healthz {health.status_code}, upload {upload.status_code} "
                         f"{upload.text[:200]}")
        ids.append(upload.json()["id"])
    measured_for = time.monotonic() - opened_at
    holder.join(timeout=SLOW_FOR_S + 10)
    open_when_measured = SLOW_CLIENTS - sum(1 for at in cut.values() if at <= measured_for)
    if max(timings) > PROMPT_S or len(cut) < SLOW_CLIENTS:
        raise Failed(f"/healthz + upload took {timings} s with {SLOW_CLIENTS} slow clients; the proxy cut "
                     f"{len(cut)} of them")
    log(f"{SLOW_CLIENTS} slow clients (a header line every {SLOW_LINE_EVERY_S:g} s): /healthz + a new upload "
        f"answered in {timings} s with {open_when_measured} of them open; nginx cut all {len(cut)} after "
        f"{min(cut.values()):.1f}-{max(cut.values()):.1f} s")
    wait_for("the uploads made past the slow clients to finish",
             lambda: all(job_status(stack, api_key, job_id) == "done" for job_id in ids), timeout=120)


def inference_queue_view(stack: Stack) -> dict:
    return next(q for q in stack.admin("queues")["queues"] if q["name"].startswith("inference."))


def check_scale_to_zero(stack: Stack, api_key: str) -> None:
    """No worker for NO_WORKER_S: jobs stay queued and the backlog shows them; one worker takes them all."""
    stack.compose("up", "-d", "--no-build", "--no-recreate", "--scale", "worker=0", timeout=300)
    wait_for("no live worker in the admin API", lambda: inference_queue_view(stack)["workers"] == 0,
             timeout=120, interval=2)
    ids = []
    for seed in range(100, 100 + QUEUED_JOBS):
        answer = submit(stack, api_key, noise_jpeg(seed))
        if answer.status_code != 202:
            raise Failed(f"an upload with no worker running answered {answer.status_code}: {answer.text[:200]}")
        ids.append(answer.json()["id"])
    log(f"no worker: {QUEUED_JOBS} jobs accepted; waiting {NO_WORKER_S} s")
    time.sleep(NO_WORKER_S)
    queue = inference_queue_view(stack)
    statuses = {job_status(stack, api_key, job_id) for job_id in ids}
    if (queue["depth"], queue["workers"], statuses) != (QUEUED_JOBS, 0, {"queued"}) \
            or queue["backlog_per_worker"] != QUEUED_JOBS or queue["oldest_age_s"] < NO_WORKER_S:
        raise Failed(f"after {NO_WORKER_S} s without a worker: queue {queue}, job statuses {statuses}")
    metrics = requests.get(f"{stack.web}/metrics", timeout=10,
                           headers={"Authorization": f"Bearer {stack.env['METRICS_TOKEN']}"}).text
    backlog = [line for line in metrics.splitlines()
               if line.startswith(f'imgsvc_queue_backlog_per_worker{{queue="{queue["name"]}"}}')]
    log(f"after {NO_WORKER_S} s: {queue}; /metrics: {backlog}")
    started = time.monotonic()
    stack.compose("up", "-d", "--no-build", "--no-recreate", "--scale", "worker=1", timeout=300)

    def all_done():
        statuses = [job_status(stack, api_key, job_id) for job_id in ids]
        if "failed" in statuses:
            raise Failed(f"a queued job failed once a worker came: {statuses}")
        return statuses if set(statuses) == {"done"} else None

    wait_for(f"the {QUEUED_JOBS} queued jobs to finish on a new worker", all_done, timeout=300, interval=2)
    log(f"--scale worker=1: all {QUEUED_JOBS} queued jobs done {time.monotonic() - started:.0f} s later "
        f"(model load included); queue now {inference_queue_view(stack)}")


def job_status(stack: Stack, api_key: str, job_id: str) -> str:
    return requests.get(f"{stack.web}/api/v1/jobs/{job_id}", timeout=10,
                        headers={"Authorization": f"Bearer {api_key}"}).json()["status"]


def check_nothing_restarted(stack: Stack) -> None:
    for container in stack.containers():
        state, name = container["State"], container["Name"].lstrip("/")
        if not state["Running"] or container["RestartCount"]:
            raise Failed(f"{name}: running={state['Running']}, restarts={container['RestartCount']}")
    log("every service container is running and none restarted")


def prove(compose: list[str], redis_image: str) -> None:
    ports = {"proxy": free_port(), "flower": free_port(), "web": free_port()}
    env = {**os.environ, "SECRET_KEY": secrets.token_urlsafe(32), "ADMIN_TOKEN": secrets.token_urlsafe(32),
           "METRICS_TOKEN": secrets.token_urlsafe(32), "WEBHOOK_SECRET": "", "IMGSVC_IMAGE": IMAGE,
           "REDIS_IMAGE": redis_image, "PROXY_IMAGE": PROXY_IMAGE}
    stack = Stack(compose, render_stack(compose, env, ports), env, ports["proxy"])
    receiver = None
    try:
        stack.compose("up", "-d", "--no-build", timeout=300)
        wait_for("/readyz with a worker", lambda: requests.get(f"{stack.web}/readyz", timeout=5).ok,
                         timeout=300, interval=3)
        log("stack up; /readyz counts a worker")
        api_key, secret = create_api_key(stack)
        receiver = Receiver(stack.gateway())
        job = classify_cat(stack, api_key, receiver.url)
        check_callback(receiver, secret, job)
        check_metrics(stack)
        show_gunicorn_alone_jams(ports["web"])
        check_slow_clients(stack, api_key)
        check_scale_to_zero(stack, api_key)
        check_two_workers(stack)
        requests.get(f"http://127.0.0.1:{ports['flower']}/", timeout=10).raise_for_status()
        check_nothing_restarted(stack)
    except BaseException:
        try:
            print(stack.compose("logs", "--no-color", "--tail", "60", timeout=60)[-20000:], file=sys.stderr)
        except Failed as exc:
            log(f"no logs: {exc}")
        raise
    finally:
        if receiver:
            receiver.close()
        log("tearing down")
        stack.down()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    started = time.monotonic()
    try:
        if subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode != 0:
            raise Failed("No Docker engine answers. As root: dockerd --storage-driver overlay2 "
                         "> /var/log/dockerd.log 2>&1 &   (see the deployment docs)")
        compose = compose_command()
        python_base, redis_image, debian_base = base_images()
        build_image(python_base, torch_index())
        build_proxy_image(debian_base)
        log(f"images ready after {time.monotonic() - started:.0f} s")
        prove(compose, redis_image)
    except Failed as exc:
        log(f"FAILED after {time.monotonic() - started:.0f} s: {exc}")
        return 1
    log(f"passed in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
