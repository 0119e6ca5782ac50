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


class _PinnedHTTP(http.client.HTTPConnection):
    """Connects to the address that passed the guard; the Host header still names the host."""

    def __init__(self, target: Target, connect_timeout: float):
        super().__init__(target.host, target.port, timeout=connect_timeout)
        self.address = target.address

    def connect(self):
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """TLS to the checked address, with the certificate verified against the host name (SNI)."""

    def __init__(self, target: Target, connect_timeout: float):
        super().__init__(target.host, target.port, timeout=connect_timeout,
                         context=ssl.create_default_context())
        self.address = target.address

    def connect(self):
        raw = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(raw, server_hostname=self.host)


def retry_after(value: str | None) -> float | None:
    """Parse a Retry-After header given in seconds (HTTP dates are ignored: rare for webhooks)."""
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def post(target: Target, body: bytes, headers: dict[str, str], *, connect_timeout: float,
         total_timeout: float) -> Answer:
    """POST ``body`` to ``target``; never raise for network trouble, report it in the Answer."""
    started = time.monotonic()
    cls = _PinnedHTTPS if target.scheme == "https" else _PinnedHTTP
    conn = cls(target, min(connect_timeout, total_timeout))
    watchdog = None
    try:
        conn.connect()
        left = max(0.01, total_timeout - (time.monotonic() - started))
        conn.sock.settimeout(left)
        # A receiver that trickles bytes never trips a per-read timeout: cut it off at the total.
        watchdog = threading.Timer(left, _hang_up, args=(conn.sock,))
        watchdog.daemon = True
        watchdog.start()
        conn.request("POST", target.path, body=body, headers=headers)
        response = conn.getresponse()
        _drain(response, started + total_timeout)
        return Answer(response.status, _ms(started), None if 200 <= response.status < 300
                      else f"HTTP {response.status}", retry_after(response.getheader("Retry-After")))
    except (OSError, http.client.HTTPException, TimeoutError) as exc:
        if time.monotonic() - started >= total_timeout:
            return Answer(None, _ms(started), f"timed out: no complete answer within {total_timeout:g} s")
        return Answer(None, _ms(started), f"{type(exc).__name__}: {exc}"[:300])
    finally:
        if watchdog is not None:
            watchdog.cancel()
        conn.close()


def _hang_up(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed: the attempt ended on its own


def _drain(response: http.client.HTTPResponse, deadline: float) -> None:
    """Read at most MAX_RESPONSE_BYTES of the answer, within the deadline."""
    remaining = MAX_RESPONSE_BYTES
    while remaining > 0 and time.monotonic() < deadline:
        chunk = response.read1(min(remaining, 16384))
        if not chunk:
            return
        remaining -= len(chunk)


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 2)
