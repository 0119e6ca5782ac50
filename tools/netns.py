"""Hosts for tests across machines: Linux network namespaces on one switch, made and removed here.

The hub namespace holds a bridge with ``HUB_ADDRESS`` (Redis listens there); every host is a
namespace of its own with one veth pair to that bridge and one address on 10.231.0.0/24. The
addresses exist only inside these namespaces. Cutting a host's link sets both ends of its pair
down: its processes live on and their packets go nowhere, as when a cable is pulled; restoring
it sets them up again, and open TCP connections carry on.

Processes go into a namespace through ``prefix(host)`` (``ip netns exec <ns> ...``); the test's
own clients reach the hosts from a thread that joined one of them (``executor(host)``), since a
network namespace belongs to a thread, not to the whole process. Needs root and iproute2.
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
import secrets
import subprocess
from concurrent.futures import ThreadPoolExecutor

HUB_ADDRESS = "10.231.0.1"
_HOST_BASE = 10  # hosts get 10.231.0.10, .11, ...
_CLONE_NEWNET = 0x40000000
_COMMAND_TIMEOUT_S = 10


class NamespaceUnavailable(RuntimeError):
    """A command that makes the network failed: not root, no iproute2, or namespaces forbidden."""


@dataclasses.dataclass(frozen=True)
class Host:
    namespace: str
    address: str
    inner: str  # its end of the veth pair, in its namespace
    outer: str  # the other end, on the hub's bridge


def ip(*args: str) -> str:
    """Run one ``ip`` command; return its output or raise NamespaceUnavailable naming it and its stderr."""
    command = ["ip", *args]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NamespaceUnavailable(f"`{' '.join(command)}` could not run: {exc}") from None
    if done.returncode != 0:
        raise NamespaceUnavailable(f"`{' '.join(command)}` failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


class Network:
    """A hub namespace with a bridge, and one namespace per host linked to it; ``remove`` undoes it all."""

    def __init__(self, hosts: tuple[str, ...], run_id: str | None = None):
        self.run_id = run_id or secrets.token_hex(3)  # names unique per run; interface names stay <= 15
        self.hub = f"imgsvc-{self.run_id}-hub"
        self.bridge = f"br{self.run_id}"
        self.hosts = {name: Host(f"imgsvc-{self.run_id}-{name}", f"10.231.0.{_HOST_BASE + i}",
                                 f"v{self.run_id}{i}", f"h{self.run_id}{i}")
                      for i, name in enumerate(hosts)}
        self.made: list[str] = []  # namespaces to delete, in the order they were made

    @classmethod
    def create(cls, hosts: tuple[str, ...]) -> "Network":
        """Make the hub and the hosts; on any failure remove what was made and raise NamespaceUnavailable."""
        network = cls(hosts)
        try:
            network._make()
        except BaseException:
            network.remove()
            raise
        return network

    def _make(self) -> None:
        self._namespace(self.hub)
        ip("-n", self.hub, "link", "add", self.bridge, "type", "bridge")
        ip("-n", self.hub, "addr", "add", f"{HUB_ADDRESS}/24", "dev", self.bridge)
        ip("-n", self.hub, "link", "set", self.bridge, "up")
        for name, host in self.hosts.items():
            self._namespace(host.namespace)
            ip("link", "add", host.inner, "netns", host.namespace, "type", "veth",
               "peer", "name", host.outer, "netns", self.hub)
            ip("-n", self.hub, "link", "set", host.outer, "master", self.bridge)
            ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", host.inner)
            self.restore(name)

    def _namespace(self, name: str) -> None:
        ip("netns", "add", name)
        self.made.append(name)
        ip("-n", name, "link", "set", "lo", "up")

    def prefix(self, host: str) -> list[str]:
        """The command prefix that runs a process on ``host`` (``"hub"`` for the hub)."""
        return ["ip", "netns", "exec", self._namespace_of(host)]

    def _namespace_of(self, host: str) -> str:
        return self.hub if host == "hub" else self.hosts[host].namespace

    def cut(self, host: str) -> None:
        """Pull ``host``'s cable: both ends of its veth pair down."""
        link = self.hosts[host]
        ip("-n", link.namespace, "link", "set", link.inner, "down")
        ip("-n", self.hub, "link", "set", link.outer, "down")

    def restore(self, host: str) -> None:
        """Plug ``host``'s cable back in."""
        link = self.hosts[host]
        ip("-n", self.hub, "link", "set", link.outer, "up")
        ip("-n", link.namespace, "link", "set", link.inner, "up")

    def executor(self, host: str) -> ThreadPoolExecutor:
        """One thread that joined ``host``'s namespace: what runs there reaches what that host reaches.

        Processes started from that thread die with it (PR_SET_PDEATHSIG is per thread): keep it for
        as long as they should live.
        """
        path = f"/run/netns/{self._namespace_of(host)}"
        return ThreadPoolExecutor(1, thread_name_prefix=f"netns-{host}", initializer=_join, initargs=(path,))

    def remove(self) -> list[str]:
        """Delete every namespace made (their veth pairs and the bridge go with them); return those
        still listed afterwards."""
        for name in reversed(self.made):
            try:
                ip("netns", "del", name)
            except NamespaceUnavailable:
                pass  # reported below, from the list the kernel still has
        try:
            listed = ip("netns", "list")
        except NamespaceUnavailable:
            return list(self.made)
        left = [name for name in self.made if any(line.split()[:1] == [name] for line in listed.splitlines())]
        self.made = left
        return left


def _join(path: str) -> None:
    """Move the calling thread into the network namespace at ``path``."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns({path}): {os.strerror(errno)}")
    finally:
        os.close(fd)
