"""Tests for the time kind (RFC 868) over fake stream and datagram transports."""

from __future__ import annotations

import calendar
import textwrap
from pathlib import Path

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IProtocol
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import FakeDatagramTransport, StringTransport
from twisted.logger import Logger

from netd.config import ListenerConfig, ServiceConfig, parse_config
from netd.events import Journal, ServiceStats
from netd.kinds import BuildContext, Handlers
from netd.schema import ConfigErrors, Position
from netd.services import load_kind
from netd.services.time import rfc868_time

# 2026-12-03T00:00:00Z: 1,796,256,000 Unix seconds, plus 2,208,988,800 from 1900 to 1970.
DEC_3_2026 = calendar.timegm((2026, 12, 3, 0, 0, 0))
DEC_3_2026_RFC868 = (4_005_244_800).to_bytes(4, "big")
LISTENER = ListenerConfig("tcp:0", Position("netd.yaml", 1, 1), "services.time.listen[0]")
PEER = IPv4Address("TCP", "192.0.2.7", 40000)
CLIENT = ("192.0.2.7", 40000)
LOOP_PORTS = (0, 7, 9, 13, 17, 19, 37)


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(DEC_3_2026)
    return clock


@pytest.fixture
def stats() -> ServiceStats:
    return ServiceStats()


@pytest.fixture
def handlers(clock: Clock, stats: ServiceStats, tmp_path: Path) -> Handlers:
    service = ServiceConfig(
        name="time", type="time", position=Position("netd.yaml", 1, 1), listen=(LISTENER,)
    )
    context = BuildContext(
        reactor=clock,
        name="time",
        state_dir=tmp_path,
        journal=Journal(clock),
        stats=stats,
        log=Logger(),
        tls={},
    )
    return load_kind("time").build(service, context)


def connect(handlers: Handlers) -> tuple[IProtocol, StringTransport]:
    assert handlers.stream is not None
    protocol = handlers.stream(LISTENER).buildProtocol(PEER)
    assert protocol is not None
    transport = StringTransport(peerAddress=PEER)
    protocol.makeConnection(transport)
    return protocol, transport


def datagrams(handlers: Handlers) -> tuple[DatagramProtocol, FakeDatagramTransport]:
    assert handlers.datagram is not None
    protocol = handlers.datagram(LISTENER)
    transport = FakeDatagramTransport()
    protocol.makeConnection(transport)
    return protocol, transport


# --- the count ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("when", "count"),
    [
        ((1970, 1, 1, 0, 0, 0), 2_208_988_800),  # RFC 868's own example
        ((1900, 1, 1, 0, 0, 0), 0),
        ((2026, 12, 3, 0, 0, 0), 4_005_244_800),
        ((2036, 2, 7, 6, 28, 15), 2**32 - 1),  # the last second of the first era
        ((2036, 2, 7, 6, 28, 16), 0),  # wraps, modulo 2**32
        ((2036, 2, 7, 6, 28, 17), 1),
        ((2106, 2, 7, 6, 28, 16), 2_208_988_800),  # one era on from 1970
    ],
)
def test_count_is_seconds_since_1900_modulo_two_to_the_32(
    when: tuple[int, int, int, int, int, int], count: int
) -> None:
    assert rfc868_time(calendar.timegm(when)) == count.to_bytes(4, "big")


def test_fractions_of_a_second_are_dropped() -> None:
    assert rfc868_time(DEC_3_2026 + 0.999) == DEC_3_2026_RFC868


# --- streams -----------------------------------------------------------------------


def test_stream_sends_four_bytes_and_closes(handlers: Handlers) -> None:
    _, transport = connect(handlers)
    assert transport.value() == DEC_3_2026_RFC868 == b"\xee\xbb\x2f\x80"
    assert transport.disconnecting


def test_stream_reads_the_injected_clock_each_time(handlers: Handlers, clock: Clock) -> None:
    clock.advance(86_400 + 1.5)
    _, transport = connect(handlers)
    assert int.from_bytes(transport.value(), "big") == 4_005_244_800 + 86_401


def test_stream_ignores_what_the_client_sends(handlers: Handlers) -> None:
    protocol, transport = connect(handlers)
    protocol.dataReceived(b"\x00\xff garbage\r\n" * 1000)
    assert transport.value() == DEC_3_2026_RFC868


# --- datagrams ---------------------------------------------------------------------


@pytest.mark.parametrize("sent", [b"", b"what time is it?", b"\x00" * 60000])
def test_any_datagram_gets_the_four_bytes(
    handlers: Handlers, stats: ServiceStats, sent: bytes
) -> None:
    protocol, transport = datagrams(handlers)
    protocol.datagramReceived(sent, CLIENT)
    protocol.datagramReceived(sent, CLIENT)
    assert transport.written == [(DEC_3_2026_RFC868, CLIENT)] * 2
    assert (stats.bytes_in, stats.bytes_out) == (2 * len(sent), 8)
    assert stats.counters == {"datagrams_in": 2}


def test_datagrams_read_the_injected_clock(handlers: Handlers, clock: Clock) -> None:
    protocol, transport = datagrams(handlers)
    clock.advance(2**31)  # past the 2036 wrap
    protocol.datagramReceived(b"", ("2001:db8::7", 40000, 0, 0))
    [(answer, address)] = transport.written
    assert int.from_bytes(answer, "big") == (4_005_244_800 + 2**31) % 2**32
    assert address == ("2001:db8::7", 40000, 0, 0)


def test_no_answer_to_a_simple_service(handlers: Handlers, stats: ServiceStats) -> None:
    """CVE-1999-0103: answering echo (or another time server) would ping-pong forever."""
    protocol, transport = datagrams(handlers)
    for port in LOOP_PORTS:
        protocol.datagramReceived(b"loop", ("192.0.2.7", port))
    assert transport.written == []
    assert stats.counters == {"datagrams_in": len(LOOP_PORTS)}
    assert (stats.bytes_in, stats.bytes_out) == (4 * len(LOOP_PORTS), 0)
    for port in (1, 8, 36, 38, 1024):
        protocol.datagramReceived(b"", ("192.0.2.7", port))
    assert [address for _, address in transport.written] == [
        ("192.0.2.7", port) for port in (1, 8, 36, 38, 1024)
    ]


# --- the map -----------------------------------------------------------------------


def test_time_takes_udp_and_stream_listeners_and_no_keys_of_its_own(tmp_path: Path) -> None:
    text = """\
        services:
          clock:
            type: time
            listen: ["tcp:0", "udp:0", "unix:time.sock"]
        """
    config = parse_config(textwrap.dedent(text), tmp_path / "netd.yaml")
    assert [listener.datagram for listener in config.services["clock"].listen] == [
        False,
        True,
        False,
    ]
    with pytest.raises(ConfigErrors) as excinfo:
        parse_config(textwrap.dedent(text) + "    offset: 3600\n", tmp_path / "netd.yaml")
    assert [str(e).split(":", 1)[1] for e in excinfo.value.errors] == [
        "5:5: services.clock.offset: unknown key"
    ]
