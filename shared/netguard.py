"""Decide whether a callback URL may be called: the SSRF guard both the web tier and the webhook
worker apply.

A URL passes when its scheme is http or https and every address its host resolves to is global
(no loopback, private, link-local, CGNAT, multicast, reserved, or IPv4 hidden inside IPv6). The
caller then connects to one of the addresses that were checked, never to the name again, so a DNS
answer that changes after the check cannot redirect the request.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import socket
from urllib.parse import urlsplit

MAX_URL_LENGTH = 2048


class RefusedUrl(ValueError):
    """A callback URL we will not call; the message says why, in words an integrator understands."""


@dataclasses.dataclass(frozen=True)
class Target:
    """A checked callback: where to connect (``address``) and what to ask for."""

    url: str
    scheme: str
    host: str
    port: int
    path: str  # path and query, as sent on the request line
    address: str


def check_syntax(url: str) -> tuple[str, str, int, str]:
    """Return scheme, host, port and request path of ``url``, or raise RefusedUrl."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL_LENGTH:
        raise RefusedUrl(f"callback_url must be an http(s) URL of at most {MAX_URL_LENGTH} characters.")
    if any(ch.isspace() or ord(ch) < 32 for ch in url):
        raise RefusedUrl("callback_url must not contain spaces or control characters.")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise RefusedUrl(f"callback_url is not a valid URL: {exc}.") from None
    if parts.scheme not in ("http", "https"):
        raise RefusedUrl("callback_url must use http or https.")
    if not parts.hostname:
        raise RefusedUrl("callback_url has no host.")
    if parts.username or parts.password:
        raise RefusedUrl("callback_url must not carry credentials; sign-in data belongs in your receiver.")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80), path


def is_public(address: str) -> bool:
    """Return True when ``address`` is a global unicast address (IPv4-mapped IPv6 judged as IPv4)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None and not is_public(str(embedded)):
            return False
    return ip.is_global and not ip.is_multicast


def resolve(url: str, allow_private: bool = False) -> Target:
    """Check ``url`` and resolve its host; return the first acceptable address or raise RefusedUrl.

    With ``allow_private`` (development only) any address is accepted.
    """
    scheme, host, port, path = check_syntax(url)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise RefusedUrl(f"callback_url host {host!r} does not resolve: {exc}.") from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not allow_private:
        refused = [a for a in addresses if not is_public(a)]
        if refused:
            raise RefusedUrl(f"callback_url host {host!r} resolves to a non-public address ({refused[0]}); "
                             "callbacks may only reach the public internet.")
    return Target(url, scheme, host, port, path, addresses[0])
