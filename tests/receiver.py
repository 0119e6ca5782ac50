"""A real webhook receiver on loopback for the tests: records every POST, answers as scripted."""
from __future__ import annotations

import dataclasses
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclasses.dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    finished: float | None = None  # when the answer was written (None: still answering, or the sender hung up)

    def json(self) -> dict:
        return json.loads(self.body)


class Receiver:
    """Answers each POST with the next scripted (status, headers[, delay_s]), then with 200 forever."""

    def __init__(self):
        self.received: list[Received] = []
        self.script: list[tuple] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received = Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body, time.time())
                with receiver.lock:
                    receiver.received.append(received)
                    status, headers, *delay = receiver.script.pop(0) if receiver.script else (200, {})
                if delay:
                    time.sleep(delay[0])
                try:
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                    self.wfile.flush()
                    received.finished = time.time()
                except BrokenPipeError:
                    pass  # the sender gave up waiting (the timeout tests want exactly that)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "Receiver":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def answer(self, *responses: tuple) -> None:
        with self.lock:
            self.script.extend(responses)

    def on(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.received if r.path == path]

    def wait(self, path: str, count: int, timeout: float = 60) -> list[Received]:
        """Wait until ``path`` has received ``count`` POSTs; return them."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.on(path)
            if len(got) >= count:
                return got
            time.sleep(0.05)
        raise TimeoutError(f"{path} received {len(self.on(path))} of {count} webhooks in {timeout}s")
