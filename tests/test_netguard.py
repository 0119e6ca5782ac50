"""The SSRF guard's address rules, without the network (literal addresses resolve locally)."""
import pytest

from shared.netguard import RefusedUrl, is_public, normalise_url, refusal, resolve


@pytest.mark.parametrize("address, public", [
    ("8.8.8.8", True), ("2606:4700:4700::1111", True), ("::ffff:8.8.8.8", True),
    ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
    ("100.64.0.1", False), ("169.254.169.254", False), ("0.0.0.0", False), ("224.0.0.1", False),
    ("255.255.255.255", False), ("::1", False), ("fe80::1", False), ("fc00::1", False), ("ff02::1", False),
    ("::ffff:127.0.0.1", False), ("::ffff:10.0.0.1", False), ("2002:7f00:1::1", False), ("2002:a00:1::1", False),
])
def test_only_global_unicast_addresses_are_public(address, public):
    assert is_public(address) is public


@pytest.mark.parametrize("address, rule", [
    ("64:ff9b::7f00:1", "NAT64 address (64:ff9b::/96)"), ("64:ff9b::808:808", "NAT64 address (64:ff9b::/96)"),
    ("64:ff9b:1::a00:1", "local-use NAT64"), ("::7f00:1", "IPv4-compatible"), ("::808:808", "IPv4-compatible"),
    ("fec0::1", "site-local"), ("100.64.0.1", "carrier-grade NAT"), ("127.0.0.1", "loopback"),
    ("::ffff:10.0.0.1", "carrying 10.0.0.1, a private address"), ("169.254.169.254", "link-local"),
    ("2001:db8::1", "private address"), ("::", "unspecified"),
])
def test_addresses_python_calls_global_but_that_route_inward_are_refused_by_name(address, rule):
    # Python 3.11's ipaddress calls the first six global; each is refused, and the answer names why.
    assert not is_public(address) and rule in refusal(address)
    with pytest.raises(RefusedUrl, match=rule.replace("(", r"\(").replace(")", r"\)")):
        resolve(f"http://[{address}]/hook" if ":" in address else f"http://{address}/hook")


def test_the_checked_address_is_the_one_returned():
    target = resolve("https://8.8.8.8:8443/hook?x=1")
    assert (target.scheme, target.host, target.port, target.path, target.address) == (
        "https", "8.8.8.8", 8443, "/hook?x=1", "8.8.8.8")


@pytest.mark.parametrize("url", ["http://127.1/", "http://017700000001/", "http://[::]/", "javascript:alert(1)",
                                 "http://exa mple.com/", "http://" + "a" * 3000 + ".com/"])
def test_tricky_urls_are_refused(url):
    with pytest.raises(RefusedUrl):
        resolve(url)


def test_development_flag_lets_loopback_through():
    assert resolve("http://localhost:9/x", allow_private=True).address in ("127.0.0.1", "::1")


@pytest.mark.parametrize("url, sent", [
    ("https://example.com/café?q=ü&x=1#frag", "https://example.com/caf%C3%A9?q=%C3%BC&x=1"),
    ("https://bücher.example:8443/x", "https://xn--bcher-kva.example:8443/x"),
    ("https://example.com/a%20b/ok?x=%2F", "https://example.com/a%20b/ok?x=%2F"),  # already encoded: unchanged
    ("http://[2606:4700::1111]/hook", "http://[2606:4700::1111]/hook"),
])
def test_international_urls_are_encoded_the_way_browsers_send_them(url, sent):
    assert normalise_url(url) == sent and sent.isascii()


def test_a_host_that_is_no_domain_name_is_refused():
    with pytest.raises(RefusedUrl, match="international domain name"):
        normalise_url("https://" + "ü" * 70 + ".example/")
