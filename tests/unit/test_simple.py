"""Tests for the inetd simple services over fake stream and datagram transports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IPullProducer
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.testing import (
    FakeDatagramTransport,
    MemoryReactorClock,
    StringTransportWithDisconnection,
)
from twisted.logger import Logger

from netd.config import ListenerConfig, ServiceConfig
from netd.connections import ConnectionSet, TrackedConnection, TrackingFactory
from netd.events import Journal, ServiceStats
from netd.kinds import BuildContext, Handlers
from netd.schema import Position
from netd.services import load_kind
from netd.services.simple import QuoteOptions

NOW = 1_700_000_000  # Tuesday, November 14, 2023 22:13:20 UTC
PEER = IPv4Address("TCP", "192.0.2.7", 40000)
LOOP_PORTS = (0, 7, 9, 13, 17, 19, 37)

# RFC 864: 95 printable characters, 72 to a line, each line starting one later.
PRINTABLE = bytes(range(32, 127))
CHARGEN_LINES = [
    bytes(PRINTABLE[(start + i) % 95] for i in range(72)) + b"\r\n" for start in range(95)
]


@attrs.define
class Served:
    """One simple service built against fakes, and what it reports to."""

    handlers: Handlers
    clock: MemoryReactorClock
    stats: ServiceStats
    journal: Journal
    connections: ConnectionSet
    factory: TrackingFactory

    def connect(self) -> tuple[TrackedConnection, StringTransportWithDisconnection]:
        protocol = self.factory.buildProtocol(PEER)
        assert isinstance(protocol, TrackedConnection)
        transport = StringTransportWithDisconnection(peerAddress=PEER)
        transport.protocol = protocol
        protocol.makeConnection(transport)
        return protocol, transport

    def datagrams(self) -> tuple[DatagramProtocol, FakeDatagramTransport]:
        assert self.handlers.datagram is not None
        protocol = self.handlers.datagram(LISTENER)
        transport = FakeDatagramTransport()
        protocol.makeConnection(transport)
        return protocol, transport


LISTENER = ListenerConfig("tcp:0", Position("netd.yaml", 1, 1), "services.x.listen[0]")


def serve(kind: str, tmp_path: Path, options: object = None) -> Served:
    clock = MemoryReactorClock()
    clock.advance(NOW)
    stats = ServiceStats()
    journal = Journal(clock)
    config = ServiceConfig(
        name=kind,
        type=kind,
        position=Position("netd.yaml", 1, 1),
        listen=(LISTENER,),
        options=options,
    )
    context = BuildContext(
        reactor=clock,
        name=kind,
        state_dir=tmp_path,
        journal=journal,
        stats=stats,
        log=Logger(),
        tls={},
    )
    handlers = load_kind(kind).build(config, context)
    connections = ConnectionSet(clock, kind, stats, journal, 10, 300, handlers.busy_reply)
    assert handlers.stream is not None
    factory = TrackingFactory(handlers.stream(LISTENER), connections)
    return Served(handlers, clock, stats, journal, connections, factory)


# --- streams -----------------------------------------------------------------------


def test_echo_writes_back_and_counts(tmp_path: Path) -> None:
    served = serve("echo", tmp_path)
    connection, transport = served.connect()
    connection.dataReceived(b"hello\r\n")
    connection.dataReceived(b"\x00\xffbinary")
    assert transport.value() == b"hello\r\n\x00\xffbinary"
    assert (connection.bytes_in, connection.bytes_out) == (15, 15)
    assert not transport.disconnecting
    transport.loseConnection()
    assert (served.stats.bytes_in, served.stats.bytes_out) == (15, 15)


def test_echo_stops_reading_while_its_writes_back_up(tmp_path: Path) -> None:
    served = serve("echo", tmp_path)
    connection, transport = served.connect()
    # The transport itself is the streaming producer: when its write buffer fills,
    # pausing the producer pauses reading from the client.
    assert transport.producer is connection
    assert transport.streaming is True
    transport.producer.pauseProducing()
    assert transport.producerState == "paused"
    transport.producer.resumeProducing()
    assert transport.producerState == "producing"


def test_discard_answers_nothing(tmp_path: Path) -> None:
    served = serve("discard", tmp_path)
    connection, transport = served.connect()
    connection.dataReceived(b"x" * 1000)
    assert transport.value() == b""
    assert (connection.bytes_in, connection.bytes_out) == (1000, 0)
    assert not transport.disconnecting


def test_chargen_is_a_pull_producer_writing_the_cycle(tmp_path: Path) -> None:
    served = serve("chargen", tmp_path)
    connection, transport = served.connect()
    producer = transport.producer
    assert transport.streaming is False
    assert IPullProducer.providedBy(producer)
    assert transport.value() == b""  # nothing until the transport asks
    producer.resumeProducing()
    cycle = transport.value()
    assert cycle.split(b"\r\n")[:-1] == [line[:-2] for line in CHARGEN_LINES]
    assert cycle == b"".join(CHARGEN_LINES)
    assert len(cycle) == 95 * 74
    assert cycle.startswith(b' !"#$%&')
    # The next write continues the pattern: line 96 is line 1 again.
    producer.resumeProducing()
    assert transport.value() == cycle * 2
    assert connection.bytes_out == 2 * 95 * 74
    # Input is ignored.
    connection.dataReceived(b"stop please")
    assert transport.value() == cycle * 2


def test_daytime_writes_once_and_closes(tmp_path: Path) -> None:
    served = serve("daytime", tmp_path)
    _, transport = served.connect()
    assert transport.value() == b"Tuesday, November 14, 2023 22:13:20-UTC\r\n"
    assert not transport.connected
    assert len(served.connections) == 0
    assert served.stats.bytes_out == 41
    served.clock.advance(3600)
    _, transport = served.connect()
    assert transport.value() == b"Tuesday, November 14, 2023 23:13:20-UTC\r\n"


def test_qotd_writes_one_quote_and_closes_rotating(tmp_path: Path) -> None:
    served = serve("qotd", tmp_path, QuoteOptions(("one", "two\n", "three\r\n")))
    answers = []
    for _ in range(4):
        _, transport = served.connect()
        assert not transport.connected
        answers.append(transport.value())
    assert answers == [b"one\r\n", b"two\r\n", b"three\r\n", b"one\r\n"]
    assert served.stats.connections_total == 4
    assert served.stats.connections_active == 0


def test_qotd_streams_and_datagrams_share_the_rotation(tmp_path: Path) -> None:
    served = serve("qotd", tmp_path, QuoteOptions(("one", "two")))
    _, transport = served.connect()
    protocol, udp = served.datagrams()
    protocol.datagramReceived(b"", ("192.0.2.7", 40000))
    assert (transport.value(), udp.written[0][0]) == (b"one\r\n", b"two\r\n")


# --- datagrams ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "sent", "answer"),
    [
        ("echo", b"ping", b"ping"),
        ("chargen", b"", b"".join(CHARGEN_LINES)[:512]),
        ("daytime", b"what time", b"Tuesday, November 14, 2023 22:13:20-UTC\r\n"),
        ("qotd", b"", b"only\r\n"),
    ],
)
def test_datagram_answers(tmp_path: Path, kind: str, sent: bytes, answer: bytes) -> None:
    served = serve(kind, tmp_path, QuoteOptions(("only",)))
    protocol, transport = served.datagrams()
    client = ("192.0.2.7", 40000)
    protocol.datagramReceived(sent, client)
    protocol.datagramReceived(sent, client)
    assert transport.written == [(answer, client), (answer, client)]
    assert served.stats.bytes_in == 2 * len(sent)
    assert served.stats.bytes_out == 2 * len(answer)
    assert served.stats.counters == {"datagrams_in": 2}


def test_discard_datagrams(tmp_path: Path) -> None:
    served = serve("discard", tmp_path)
    protocol, transport = served.datagrams()
    protocol.datagramReceived(b"gone", ("192.0.2.7", 40000))
    assert transport.written == []
    assert (served.stats.bytes_in, served.stats.bytes_out) == (4, 0)
    assert served.stats.counters == {"datagrams_in": 1}


@pytest.mark.parametrize("kind", ["echo", "chargen", "daytime", "qotd"])
def test_no_answer_to_another_simple_service(tmp_path: Path, kind: str) -> None:
    """CVE-1999-0103: answering echo or chargen from these ports loops forever."""
    served = serve(kind, tmp_path, QuoteOptions(("only",)))
    protocol, transport = served.datagrams()
    for port in LOOP_PORTS:
        protocol.datagramReceived(b"loop", ("192.0.2.7", port))
    assert transport.written == []
    assert served.stats.counters == {"datagrams_in": len(LOOP_PORTS)}
    assert served.stats.bytes_in == 4 * len(LOOP_PORTS)
    assert served.stats.bytes_out == 0
    # Neighbouring ports are ordinary clients.
    for port in (1, 8, 18, 38, 1024):
        protocol.datagramReceived(b"ok", ("192.0.2.7", port))
    assert [addr for _, addr in transport.written] == [
        ("192.0.2.7", port) for port in (1, 8, 18, 38, 1024)
    ]


def test_datagrams_from_ipv6_clients(tmp_path: Path) -> None:
    served = serve("echo", tmp_path)
    protocol, transport = served.datagrams()
    client: Any = ("::1", 50000, 0, 0)  # what an IPv6 UDP port passes
    loop: Any = ("::1", 7, 0, 0)
    protocol.datagramReceived(b"v6", client)
    protocol.datagramReceived(b"v6", loop)
    assert transport.written == [(b"v6", client)]
