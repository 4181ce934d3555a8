"""
The forwarder's C{strategy} (in_order, fastest, random) driven with a fake
clock and fake sockets, and the options of DNS over HTTPS upstreams.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web.client import Agent
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from netd.events import ServiceStats
from netd.services.dns.forward import Forwarder, Upstream
from netd.services.dns.https import HTTPSClient
from netd.tls import ensure_self_signed
from tests.unit.test_dns import _FakeReactor, answer_to, errors, key, options

THREE = (Upstream("127.0.0.1", 5300), Upstream("127.0.0.2", 5300), Upstream("127.0.0.3", 5300))


def fastest(reactor: _FakeReactor) -> tuple[Forwarder, ServiceStats]:
    stats = ServiceStats()
    fwd = Forwarder(
        reactor, THREE, stats, socket_factory=reactor.socket, strategy="fastest", timeout=1.0
    )
    return fwd, stats


def answer_last(reactor: _FakeReactor, after: float = 0.0) -> str:
    """Answer the latest upstream socket after C{after} seconds; the upstream's host."""
    reactor.advance(after)
    index = len(reactor.sockets) - 1
    sock = reactor.sockets[index]
    reactor.deliver(index, answer_to(sock.sent[0]), sock.peer)
    host: str = sock.peer[0]
    return host


def first_asked(reactor: _FakeReactor) -> str:
    host: str = reactor.sockets[-1].peer[0]
    return host


def test_fastest_measures_each_then_prefers_the_quickest() -> None:
    reactor = _FakeReactor()
    fwd, _ = fastest(reactor)
    # Unmeasured upstreams go first, so each is timed once early.
    for name, delay in (("a", 0.3), ("b", 0.05), ("c", 0.2)):
        fwd.resolve(key(f"{name}.example"))
        answer_last(reactor, delay)
    for i in range(5):
        fwd.resolve(key(f"n{i}.example"))
        assert first_asked(reactor) == "127.0.0.2"
        answer_last(reactor, 0.05)


def test_fastest_demotes_a_failed_upstream_and_probes_it_again_later() -> None:
    reactor = _FakeReactor()
    fwd, stats = fastest(reactor)
    for name, delay in (("a", 0.01), ("b", 0.05), ("c", 0.1)):
        fwd.resolve(key(f"{name}.example"))
        answer_last(reactor, delay)
    # The fastest goes silent: the question moves on, and it is demoted.
    result = fwd.resolve(key("d.example"))
    assert first_asked(reactor) == "127.0.0.1"
    reactor.advance(1.0)
    assert first_asked(reactor) == "127.0.0.2"
    answer_last(reactor, 0.05)
    assert result.called and stats.counters["upstream_failures"] == 1
    fwd.resolve(key("e.example"))
    assert first_asked(reactor) == "127.0.0.2"
    answer_last(reactor, 0.05)
    # Every twenty seconds real traffic tries the upstream unused the longest first.
    reactor.advance(20)
    fwd.resolve(key("f.example"))
    assert first_asked(reactor) == "127.0.0.3" and stats.counters["upstream_probes"] == 1
    answer_last(reactor, 0.1)
    fwd.resolve(key("f2.example"))
    assert first_asked(reactor) == "127.0.0.2"
    answer_last(reactor, 0.05)
    reactor.advance(20)
    fwd.resolve(key("f3.example"))
    assert first_asked(reactor) == "127.0.0.1" and stats.counters["upstream_probes"] == 2
    answer_last(reactor, 0.01)  # it has recovered: the fastest again at once
    fwd.resolve(key("g.example"))
    assert first_asked(reactor) == "127.0.0.1"


def test_fastest_probes_every_fifty_queries_too() -> None:
    reactor = _FakeReactor()
    fwd, stats = fastest(reactor)
    for name, delay in (("a", 0.01), ("b", 0.05), ("c", 0.1)):
        fwd.resolve(key(f"{name}.example"))
        answer_last(reactor, delay)
    firsts = []
    for i in range(47 + 50):
        fwd.resolve(key(f"n{i}.example"))
        firsts.append(first_asked(reactor))
        answer_last(reactor, 0.01 if firsts[-1] == "127.0.0.1" else 0.5)
    assert stats.counters["upstream_probes"] == 2
    assert firsts.count("127.0.0.1") == len(firsts) - 2
    assert set(firsts) == {"127.0.0.1", "127.0.0.2", "127.0.0.3"}


def test_random_shuffles_each_question() -> None:
    reactor = _FakeReactor()
    fwd = Forwarder(
        reactor,
        THREE,
        ServiceStats(),
        socket_factory=reactor.socket,
        strategy="random",
        shuffler=random.Random(7),
    )
    firsts = set()
    for i in range(30):
        fwd.resolve(key(f"n{i}.example"))
        firsts.add(first_asked(reactor))
        answer_last(reactor)
    assert firsts == {"127.0.0.1", "127.0.0.2", "127.0.0.3"}


def test_in_order_stays_with_the_first_that_answers() -> None:
    reactor = _FakeReactor()
    fwd = Forwarder(reactor, THREE, ServiceStats(), socket_factory=reactor.socket)
    for i in range(5):
        fwd.resolve(key(f"n{i}.example"))
        assert first_asked(reactor) == "127.0.0.1"
        answer_last(reactor, 0.5)


def test_https_upstreams_and_strategy_in_the_map(tmp_path: Path) -> None:
    _, ca = ensure_self_signed(tmp_path / "tls", "doh", ["doh.test"])
    parsed = options(
        tmp_path,
        "    forward:\n"
        "      strategy: fastest\n"
        "      upstreams:\n"
        "        - https://9.9.9.9/dns-query\n"
        "        - https://dns.example:8443/q\n"
        f"        - {{address: 'https://[::1]/dns-query', server_name: doh.test, ca: {ca}}}\n",
    )
    assert parsed.forward_strategy == "fastest"
    assert [str(u) for u in parsed.forward] == [
        "https://9.9.9.9:443/dns-query",
        "https://dns.example:8443/q",
        "https://[::1]:443/dns-query",
    ]
    assert parsed.forward[2].server_name == "doh.test" and parsed.forward[2].ca
    assert all(u.https and not u.tls for u in parsed.forward)


def test_bad_https_upstreams_and_strategy_are_errors_in_place(tmp_path: Path) -> None:
    found = errors(
        tmp_path,
        "    forward:\n"
        "      strategy: quickest\n"
        "      upstreams: ['https://9.9.9.9', 'https://9.9.9.9/a?b', 'https://:1/x']\n",
    )
    assert len(found) == 4
    assert "strategy" in found[0] and "in_order" in found[0]
    assert all("upstreams" in e for e in found[1:])
    assert "not https://HOST[:PORT]/PATH: 'https://9.9.9.9'" in found[1]


@implementer(IAgentEndpointFactory)
class _Plain:
    """Every request on a plain connection, so the test reads its head as sent."""

    def __init__(self, reactor: MemoryReactorClock) -> None:
        self.reactor = reactor

    def endpointForURI(self, uri: Any) -> TCP4ClientEndpoint:
        return TCP4ClientEndpoint(self.reactor, "127.0.0.1", 8443)


@pytest.mark.parametrize(
    ("server_name", "port", "host"),
    [
        (None, 8443, b"127.0.0.1:8443"),
        ("up.review.test", 8443, b"up.review.test:8443"),
        ("up.review.test", 443, b"up.review.test"),
        ("::1", 8443, b"[::1]:8443"),
    ],
)
def test_a_doh_upstreams_host_header_is_its_server_name(
    server_name: str | None, port: int, host: bytes
) -> None:
    # The name the certificate is checked for is the virtual host asked for.
    reactor = MemoryReactorClock()
    upstream = Upstream("127.0.0.1", port, server_name=server_name, path="/dns-query")
    client = HTTPSClient(reactor, upstream, 2.0)
    client.agent = Agent.usingEndpointFactory(reactor, _Plain(reactor), client.pool)
    client.ask(b"query")
    protocol = reactor.tcpClients[0][2].buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    head = transport.value().split(b"\r\n\r\n")[0].lower().split(b"\r\n")
    assert [line for line in head if line.startswith(b"host:")] == [b"host: " + host]
