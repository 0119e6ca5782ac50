"""One HTTP POST to a checked address, with hard time and size bounds and no redirects."""
from __future__ import annotations

import dataclasses
import http.client
import socket
import ssl
import threading
import time

from shared.netguard import Target

MAX_RESPONSE_BYTES = 64 * 1024  # we read this much of a receiver's answer at most, then hang up


@dataclasses.dataclass(frozen=True)
class Answer:
    """What one attempt got: a status (None when no HTTP answer came) or an error in words."""

    status: int | None
    duration_ms: float
    error: str | None = None
    retry_after_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def _connect(target: Target, connect_timeout: float, deadline: float, watchdog: "_Watchdog") -> socket.socket:
    """Open a connection to the checked address (TLS verified against the host name, SNI), the
    handshake included in the deadline: the watchdog hangs up on a server that trickles it."""
    sock = socket.create_connection((target.address, target.port), min(connect_timeout, _left(deadline)))
    try:
        watchdog.guard(sock)
        if target.scheme == "https":
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=target.host,
                                                            do_handshake_on_connect=False)
            sock.settimeout(_left(deadline))
            sock.do_handshake()
        return sock
    except BaseException:
        sock.close()
        raise


class _Watchdog:
    """Hangs up the connection at the deadline: a receiver that trickles bytes never trips a
    per-read timeout. It holds its own handle on the socket, so it works through TLS too."""

    def __init__(self, deadline: float):
        self.deadline, self.handle, self.timer = deadline, None, None
        self.lock = threading.Lock()  # a handle closed by stop() is never shut down: its number may be reused

    def guard(self, sock: socket.socket) -> None:
        self.handle = sock.dup()
        self.timer = threading.Timer(max(0.0, self.deadline - time.monotonic()), self._hang_up)
        self.timer.daemon = True
        self.timer.start()

    def _hang_up(self) -> None:
        with self.lock:
            if self.handle is None:
                return
            try:
                self.handle.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # the receiver hung up first

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        with self.lock:
            if self.handle is not None:
                self.handle.close()
                self.handle = None


def retry_after(value: str | None) -> float | None:
    """Parse a Retry-After header given in seconds (HTTP dates are ignored: rare for webhooks)."""
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def post(target: Target, body: bytes, headers: dict[str, str], *, connect_timeout: float, started: float,
         deadline: float) -> Answer:
    """POST ``body`` to ``target``, done by ``deadline`` (``time.monotonic``; the attempt began at
    ``started``); never raise for network trouble, report it in the Answer."""
    watchdog = _Watchdog(deadline)
    cls = http.client.HTTPSConnection if target.scheme == "https" else http.client.HTTPConnection
    conn = cls(target.host, target.port, timeout=connect_timeout)
    try:
        # Connected to the checked address here: http.client must not resolve the name again.
        conn.sock = _connect(target, connect_timeout, deadline, watchdog)
        conn.sock.settimeout(_left(deadline))
        conn.request("POST", target.path, body=body, headers=headers)
        response = conn.getresponse()
        _drain(response, deadline)
        return Answer(response.status, ms_since(started), None if 200 <= response.status < 300
                      else f"HTTP {response.status}", retry_after(response.getheader("Retry-After")))
    except (OSError, http.client.HTTPException, TimeoutError) as exc:
        if time.monotonic() >= deadline:
            return Answer(None, ms_since(started),
                          f"timed out: no complete answer within {deadline - started:g} s")
        return Answer(None, ms_since(started), f"{type(exc).__name__}: {exc}"[:300])
    finally:
        watchdog.stop()
        conn.close()


def _left(deadline: float) -> float:
    return max(0.01, deadline - time.monotonic())


def _drain(response: http.client.HTTPResponse, deadline: float) -> None:
    """Read at most MAX_RESPONSE_BYTES of the answer, within the deadline."""
    remaining = MAX_RESPONSE_BYTES
    while remaining > 0 and time.monotonic() < deadline:
        chunk = response.read1(min(remaining, 16384))
        if not chunk:
            return
        remaining -= len(chunk)


def ms_since(started: float) -> float:
    """Milliseconds since ``started`` (``time.monotonic``), as the attempt log shows them."""
    return round((time.monotonic() - started) * 1000, 2)
