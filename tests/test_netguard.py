"""The SSRF guard's address rules, without the network (literal addresses resolve locally)."""
import pytest

from shared.netguard import RefusedUrl, is_public, resolve


@pytest.mark.parametrize("address, public", [
    ("8.8.8.8", True), ("2606:4700:4700::1111", True), ("::ffff:8.8.8.8", True),
    ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
    ("100.64.0.1", False), ("169.254.169.254", False), ("0.0.0.0", False), ("224.0.0.1", False),
    ("255.255.255.255", False), ("::1", False), ("fe80::1", False), ("fc00::1", False), ("ff02::1", False),
    ("::ffff:127.0.0.1", False), ("::ffff:10.0.0.1", False), ("2002:7f00:1::1", False), ("2002:a00:1::1", False),
])
def test_only_global_unicast_addresses_are_public(address, public):
    assert is_public(address) is public


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
