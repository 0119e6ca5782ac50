"""Decide whether a callback URL may be called: the SSRF guard both the web tier and the webhook
worker apply.

A URL passes when its scheme is http or https and every address its host resolves to is global
(no loopback, private, link-local, CGNAT, multicast, reserved, NAT64, IPv4-compatible or site-local
IPv6, or a non-public IPv4 hidden inside IPv6); a refusal names the rule the address broke. The
caller then connects to one of the addresses that were checked, never to the name again, so a DNS
answer that changes after the check cannot redirect the request.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import socket
from concurrent.futures import Executor
from urllib.parse import quote, urlsplit, urlunsplit

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


def about(exc: RefusedUrl, field: str) -> str:
    """The refusal's message, naming ``field`` (e.g. image_url) where it names callback_url."""
    return str(exc).replace("callback_url", field).replace("callbacks may", f"{field} may")


def normalise_url(url: str) -> str:
    """Return ``url`` as a browser sends it: IDNA host, non-ASCII path and query percent-encoded
    (UTF-8), the fragment dropped; or raise RefusedUrl. ``https://bücher.example/café`` becomes
    ``https://xn--bcher-kva.example/caf%C3%A9``; an ASCII URL comes back unchanged."""
    check_syntax(url)
    parts = urlsplit(url)
    host = parts.hostname
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise RefusedUrl(f"callback_url host {parts.hostname!r} is not a valid international domain name.") from None
    if ":" in host:
        host = f"[{host}]"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    path = quote(parts.path, safe="/%:@!$&'()*+,;=-._~")
    query = quote(parts.query, safe="/?%:@!$&'()*+,;=-._~")
    return urlunsplit((parts.scheme, netloc, path, query, ""))


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


# IPv6 ranges that Python's ipaddress calls global but that lead inward: each refused by name.
_INWARD_IPV6 = (
    (ipaddress.ip_network("64:ff9b::/96"), "a NAT64 address (64:ff9b::/96): a gateway turns it into the "
                                          "IPv4 address inside it, private ones included"),
    (ipaddress.ip_network("64:ff9b:1::/48"), "a local-use NAT64 address (64:ff9b:1::/48)"),
    (ipaddress.ip_network("::/96"), "an IPv4-compatible IPv6 address (::/96, deprecated; it can reach the "
                                   "IPv4 address inside it)"),
    (ipaddress.ip_network("fec0::/10"), "a site-local IPv6 address (fec0::/10, deprecated, routed inside sites)"),
)
_SHARED_IPV4 = ipaddress.ip_network("100.64.0.0/10")


def refusal(address: str) -> str | None:
    """Return which rule keeps ``address`` from being called back (e.g. "a loopback address"), or None
    when it is a global unicast address. IPv4 carried inside IPv6 is judged as the IPv4 it carries."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    for test, what in ((ip.is_loopback, "a loopback address"), (ip.is_unspecified, "the unspecified address"),
                       (ip.is_multicast, "a multicast address"), (ip.is_link_local, "a link-local address")):
        if test:
            return what
    if isinstance(ip, ipaddress.IPv6Address):
        for network, what in _INWARD_IPV6:
            if ip in network:
                return what
        if ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d is that IPv4 address, and is judged as one
            inner = refusal(str(ip.ipv4_mapped))
            return f"an IPv6 address carrying {ip.ipv4_mapped}, {inner}" if inner else None
        embedded = ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None and (inner := refusal(str(embedded))):
            return f"an IPv6 address carrying {embedded}, {inner}"
    elif ip in _SHARED_IPV4:
        return "a shared (carrier-grade NAT) address (100.64.0.0/10)"
    if ip.is_private:
        return "a private address"
    if ip.is_reserved or not ip.is_global:
        return "a reserved address, not globally routable"
    return None


def is_public(address: str) -> bool:
    """Return True when ``address`` is a global unicast address a callback may reach."""
    return refusal(address) is None


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
        for address in addresses:
            if reason := refusal(address):
                raise RefusedUrl(f"callback_url host {host!r} resolves to a non-public address ({address}): "
                                 f"{reason}; callbacks may only reach the public internet.")
    return Target(url, scheme, host, port, path, addresses[0])


def resolve_within(lookups: Executor, url: str, timeout_s: float, allow_private: bool = False) -> Target:
    """``resolve`` on a thread of ``lookups``, or RefusedUrl naming the host when it takes longer than
    ``timeout_s``. getaddrinfo cannot be interrupted: a lookup still running finishes there, unused."""
    lookup = lookups.submit(resolve, url, allow_private)
    try:
        return lookup.result(timeout=timeout_s)
    except TimeoutError:
        lookup.cancel()  # one still queued behind slow lookups never runs
        raise RefusedUrl(f"callback_url host {check_syntax(url)[1]!r} did not resolve within {timeout_s:g} s; "
                         "check the name, or retry if your DNS is slow right now.") from None
