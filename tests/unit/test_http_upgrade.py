"""The upstream side of a proxied upgrade (_UpgradingUpstream), with fakes."""

from __future__ import annotations

from typing import Any

from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from netd.services.http.proxy import _UpgradingUpstream
from tests.fakes.exchanges import FakeExchange


class FakeUpgrade:
    def __init__(self) -> None:
        self.head: bytes | None = None
        self.to_client_data = b""

    def splice(self, head: bytes, upstream: Any) -> None:
        self.head = head

    def take_held(self) -> bytes:
        return b""

    def to_client(self, data: bytes) -> None:
        self.to_client_data += data

    def upstream_lost(self) -> None:
        pass


def make() -> tuple[_UpgradingUpstream, FakeExchange, FakeUpgrade, list[Failure]]:
    exchange, upgrade = FakeExchange("GET", "/ws/"), FakeUpgrade()
    upstream = _UpgradingUpstream(exchange, upgrade, b"GET / HTTP/1.1\r\n\r\n")  # type: ignore[arg-type]
    failures: list[Failure] = []
    upstream.failed = failures.append
    upstream.makeConnection(StringTransport())
    return upstream, exchange, upgrade, failures


HEAD = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"


def test_a_small_head_followed_by_a_burst_of_frames_is_spliced() -> None:
    """The 64 KiB head bound does not count the new protocol's bytes that come with it."""
    upstream, _, upgrade, failures = make()
    upstream.dataReceived(HEAD[:20])
    upstream.dataReceived(HEAD[20:] + b"\x82\x00" * 40000)
    assert not failures, failures
    assert upgrade.head == HEAD


def test_early_hints_before_the_switch() -> None:
    """A 1xx before the 101 is passed over; the client gets the 101's head alone."""
    upstream, exchange, upgrade, failures = make()
    upstream.dataReceived(
        b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n" + HEAD + b"\x81\x00"
    )
    assert not exchange.finished, "the 103 ended the exchange: the client connection is closed"
    assert upgrade.head == HEAD, (exchange.status, upgrade.head, failures)
