"""Download a job's ``image_url``: public addresses only, checked again on every redirect, a time and
a size bound, the body streamed and abandoned as soon as it passes the size bound.

Every failure raises FetchError with a message naming why (status code, too large, refused address,
timed out, too many redirects), which the job keeps as its ``fetch_failed`` error.
"""
from __future__ import annotations

import http.client
import time
from concurrent.futures import Executor
from urllib.parse import urljoin

from shared.netguard import RefusedUrl, Target, about, normalise_url, resolve
from webhooks.http import _connect, _left, _Watchdog  # the same bounded connection webhook attempts use

MAX_REDIRECTS = 3
CHUNK = 64 * 1024
REDIRECTS = (301, 302, 303, 307, 308)
USER_AGENT = "imgsvc-fetch/1"


class FetchError(Exception):
    """The image could not be downloaded; the message says why, in an integrator's words."""


def fetch_image(url: str, *, max_bytes: int, timeout_s: float, connect_timeout_s: float, allow_private: bool,
                lookups: Executor) -> bytes:
    """Return the body ``url`` answers 200 with, following at most MAX_REDIRECTS redirects, all within
    ``timeout_s`` (name lookups included), or raise FetchError."""
    started = time.monotonic()
    deadline = started + timeout_s
    for _ in range(MAX_REDIRECTS + 1):
        target = _resolve(url, allow_private, deadline, timeout_s, lookups)
        status, location, body = _get(target, max_bytes, min(connect_timeout_s, timeout_s), deadline, timeout_s)
        if status not in REDIRECTS:
            if status != 200:
                raise FetchError(f"the server answered HTTP {status} {http.client.responses.get(status, '')}".rstrip()
                                 + f" for {url}")
            return body
        if not location:
            raise FetchError(f"the server answered HTTP {status} without a Location for {url}")
        try:
            url = normalise_url(urljoin(url, location))
        except RefusedUrl as exc:
            raise FetchError(f"refused redirect: {about(exc, 'image_url')}") from None
    raise FetchError(f"too many redirects: more than {MAX_REDIRECTS}")


def _resolve(url: str, allow_private: bool, deadline: float, timeout_s: float, lookups: Executor) -> Target:
    """Check and resolve ``url`` by the deadline on a thread of ``lookups`` (getaddrinfo cannot be cut short)."""
    lookup = lookups.submit(resolve, url, allow_private)
    try:
        return lookup.result(timeout=max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        lookup.cancel()
        raise FetchError(f"timed out: the host name of {url} did not resolve within {timeout_s:g} s") from None
    except RefusedUrl as exc:
        raise FetchError(f"refused address: {about(exc, 'image_url')}") from None


def _get(target: Target, max_bytes: int, connect_timeout_s: float, deadline: float,
         timeout_s: float) -> tuple[int, str | None, bytes]:
    """GET the checked address; return the status, a redirect's Location and (for 200) the body."""
    watchdog = _Watchdog(deadline)
    cls = http.client.HTTPSConnection if target.scheme == "https" else http.client.HTTPConnection
    conn = cls(target.host, target.port, timeout=connect_timeout_s)
    try:
        conn.sock = _connect(target, connect_timeout_s, deadline, watchdog)  # never resolves the name again
        conn.sock.settimeout(_left(deadline))
        conn.request("GET", target.path, headers={"User-Agent": USER_AGENT, "Accept": "image/*"})
        response = conn.getresponse()
        if response.status != 200:
            return response.status, response.getheader("Location"), b""
        return 200, None, _read_bounded(response, max_bytes, deadline)
    except (OSError, http.client.HTTPException) as exc:
        if time.monotonic() >= deadline - 0.01:
            raise FetchError(f"timed out: no complete answer from {target.url} within {timeout_s:g} s") from None
        raise FetchError(f"could not download {target.url}: {type(exc).__name__}: {exc}"[:300]) from None
    finally:
        watchdog.stop()
        conn.close()


def _read_bounded(response: http.client.HTTPResponse, max_bytes: int, deadline: float) -> bytes:
    """Read the body in chunks; stop, and fail, as soon as it passes ``max_bytes``."""
    declared = response.getheader("Content-Length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise FetchError(f"too large: the image is {declared} bytes; the limit is {max_bytes} bytes (MAX_UPLOAD_MB)")
    chunks, size = [], 0
    while chunk := response.read1(CHUNK):
        size += len(chunk)
        if size > max_bytes:
            raise FetchError(f"too large: the image is over {max_bytes} bytes (MAX_UPLOAD_MB)")
        chunks.append(chunk)
        if time.monotonic() >= deadline:
            raise OSError("deadline passed")
    return b"".join(chunks)
