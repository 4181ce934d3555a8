"""Tests for netd.connections: limits, idle sweeps, draining and counters, on a Clock."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import attrs
import pytest
from twisted.internet.abstract import FileDescriptor
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IAddress,
    IHalfCloseableProtocol,
    IProtocol,
    IProtocolNegotiationFactory,
    IPullProducer,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.tcp import Connection
from twisted.internet.testing import MemoryReactor, StringTransportWithDisconnection
from twisted.python.failure import Failure
from zope.interface import implementer

from netd.connections import (
    ConnectionSet,
    SendsNow,
    SendsNowFactory,
    TrackedConnection,
    TrackingFactory,
    client_key,
    describe_address,
    unsent_bytes,
)
from netd.events import Journal, ServiceStats
from netd.kinds import IOwesReplies
from netd.sendfile import plain_socket

IDLE = 100.0  # seconds; the sweep runs every quarter of it
CONNECTION_DONE = Failure(ConnectionDone())


class Transport(StringTransportWithDisconnection):
    """Closes like a real transport: abort at once, a graceful close when told to."""

    def __init__(self, peer: IAddress, close_at_once: bool = True) -> None:
        super().__init__(peerAddress=peer)
        self.close_at_once = close_at_once
        self.close_requested = False
        self.aborted = False

    def loseConnection(self) -> None:
        self.close_requested = True
        self.disconnecting = True
        if self.close_at_once:
            super().loseConnection()

    def abortConnection(self) -> None:
        self.aborted = True
        super().loseConnection()


class Recorder(Protocol):
    """Echoes, and remembers what happened to it."""

    transport: Any

    def __init__(self) -> None:
        self.lost: list[Failure] = []

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def connectionLost(self, reason: Failure = CONNECTION_DONE) -> None:
        self.lost.append(reason)


class Exchanging(Recorder):
    """A protocol in the middle of an exchange: asked to finish, it takes its time."""

    def __init__(self) -> None:
        super().__init__()
        self.asked_to_finish = 0

    def close_gracefully(self) -> None:
        self.asked_to_finish += 1


class TellsIdleFromStop(Exchanging):
    """A protocol whose goodbye differs for the idle sweep (an FTP 421's text, say)."""

    asked_as_idle = 0

    def close_idle(self) -> None:
        self.asked_as_idle += 1


class CountingFactory(Factory):
    def __init__(self, protocol: type[Recorder] = Recorder) -> None:
        self.protocol = protocol
        self.built = 0

    def buildProtocol(self, addr: IAddress | None) -> IProtocol | None:  # type: ignore[override]
        self.built += 1
        return super().buildProtocol(addr)


@attrs.define
class Harness:
    clock: Clock
    stats: ServiceStats
    journal: Journal
    connections: ConnectionSet
    wrapped: CountingFactory
    factory: TrackingFactory
    ports: int = 40000

    def connect(self, close_at_once: bool = True, host: str = "192.0.2.7") -> tuple[Any, Transport]:
        """Accept a connection; the protocol is a TrackedConnection unless refused."""
        self.ports += 1
        peer = (IPv6Address if ":" in host else IPv4Address)("TCP", host, self.ports)
        return self.accept(peer, close_at_once)

    def accept(self, peer: IAddress, close_at_once: bool = True) -> tuple[Any, Transport]:
        protocol = self.factory.buildProtocol(peer)
        assert protocol is not None
        transport = Transport(peer, close_at_once)
        transport.protocol = protocol
        protocol.makeConnection(transport)
        return protocol, transport

    def elapse(self, seconds: float, step: float = 5.0) -> None:
        """Let time pass in small steps, as a reactor would (one advance runs one sweep)."""
        while seconds > 1e-9:
            self.clock.advance(min(step, seconds))
            seconds -= step

    def events(self, type: str) -> list[dict[str, Any]]:
        return [dict(e.fields) for e in self.journal.select(types=[type])]


def harness(
    max_connections: int = 10,
    busy_reply: bytes = b"",
    protocol: type[Recorder] = Recorder,
    max_per_client: int = 0,
    per_client_reply: bytes | None = None,
    evict_silent: bool = False,
    batch_writes: bool = False,
) -> Harness:
    clock = Clock()
    stats = ServiceStats()
    journal = Journal(clock)
    connections = ConnectionSet(
        clock,
        "svc",
        stats,
        journal,
        max_connections,
        IDLE,
        busy_reply=busy_reply,
        max_per_client=max_per_client,
        per_client_reply=per_client_reply,
        evict_silent=evict_silent,
        batch_writes=batch_writes,
    )
    wrapped = CountingFactory(protocol)
    return Harness(
        clock, stats, journal, connections, wrapped, TrackingFactory(wrapped, connections)
    )


# --- limits ------------------------------------------------------------------------


def test_connections_beyond_the_limit_are_refused_politely() -> None:
    h = harness(max_connections=2, busy_reply=b"421 busy\r\n")
    first, _ = h.connect()
    h.connect()
    refused, transport = h.connect()
    assert not isinstance(refused, TrackedConnection)
    assert transport.value() == b"421 busy\r\n"
    assert transport.close_requested and not transport.connected
    assert h.wrapped.built == 2  # the service's own protocol never saw it
    assert len(h.connections) == 2
    assert (h.stats.connections_total, h.stats.connections_active) == (2, 2)
    assert h.stats.connections_refused == 1
    assert h.events("connection.refused") == [
        {"client": "192.0.2.7:40003", "reason": "max_connections"}
    ]
    # Once one leaves, the next is let in.
    first.transport.loseConnection()
    accepted, _ = h.connect()
    assert isinstance(accepted, TrackedConnection)
    assert (h.stats.connections_total, h.stats.connections_refused) == (3, 1)


def test_refusal_without_a_reply_just_closes() -> None:
    h = harness(max_connections=1)
    h.connect()
    _, transport = h.connect()
    assert transport.value() == b""
    assert not transport.connected
    assert h.stats.connections_refused == 1


def test_at_the_limit_a_new_connection_takes_the_place_of_the_oldest_silent_one() -> None:
    # The admin API's choice: idle connections must not lock everyone else out.
    h = harness(max_connections=3, busy_reply=b"busy", evict_silent=True)
    talking, _ = h.connect()
    talking.dataReceived(b"GET / HTTP/1.1\r\n")
    oldest_silent, oldest_transport = h.connect()
    _, newer_transport = h.connect()
    newcomer, _ = h.connect()
    assert isinstance(newcomer, TrackedConnection)
    assert oldest_transport.aborted and not newer_transport.aborted
    assert len(h.connections) == 3 and oldest_silent not in list(h.connections)
    assert h.stats.counters["silent_evicted"] == 1 and h.stats.connections_refused == 0
    assert h.events("connection.evicted") == [
        {"client": oldest_silent.client, "connection": oldest_silent.connection_id}
    ]
    # Once every connection has spoken, the next is refused as without the option.
    for connection in h.connections:
        connection.dataReceived(b"x")
    refused, transport = h.connect()
    assert not isinstance(refused, TrackedConnection) and transport.value() == b"busy"
    assert h.stats.connections_refused == 1


# --- per client ----------------------------------------------------------------------

PER_CLIENT = b"421 too many from your address\r\n"


def test_connections_per_client_are_limited() -> None:
    h = harness(
        max_connections=5, busy_reply=b"421 busy\r\n", max_per_client=2, per_client_reply=PER_CLIENT
    )
    first, _ = h.connect()
    h.connect()
    refused, transport = h.connect()
    assert not isinstance(refused, TrackedConnection)
    assert transport.value() == PER_CLIENT and not transport.connected
    assert h.wrapped.built == 2
    assert h.stats.counters == {"per_client_refused": 1}
    assert h.stats.connections_refused == 0  # that one counts max_connections alone
    assert h.events("connection.refused") == [
        {"client": "192.0.2.7:40003", "reason": "max_connections_per_client"}
    ]
    # Another client is not affected.
    other, _ = h.connect(host="192.0.2.8")
    assert isinstance(other, TrackedConnection)
    # The refused one took no slot: one close lets exactly one more in.
    first.transport.loseConnection()
    again, _ = h.connect()
    assert isinstance(again, TrackedConnection)
    _, transport = h.connect()
    assert transport.value() == PER_CLIENT
    assert h.stats.counters == {"per_client_refused": 2}


def test_the_service_limit_is_checked_first() -> None:
    h = harness(
        max_connections=2, busy_reply=b"421 busy\r\n", max_per_client=2, per_client_reply=PER_CLIENT
    )
    h.connect()
    h.connect(host="192.0.2.8")
    _, transport = h.connect()
    assert transport.value() == b"421 busy\r\n"
    assert h.events("connection.refused")[0]["reason"] == "max_connections"
    assert (h.stats.connections_refused, h.stats.counters) == (1, {})


def test_per_client_refusal_says_the_busy_reply_unless_told_otherwise() -> None:
    h = harness(busy_reply=b"503 busy\r\n", max_per_client=1)
    h.connect()
    _, transport = h.connect()
    assert transport.value() == b"503 busy\r\n"


def test_an_ipv6_client_is_counted_per_64() -> None:
    h = harness(max_per_client=2, per_client_reply=PER_CLIENT)
    h.connect(host="2001:db8:1:2::1")
    h.connect(host="2001:db8:1:2:ffff:ffff:ffff:fffe")  # same /64, another host part
    _, same_64 = h.connect(host="2001:db8:1:2::99")
    assert same_64.value() == PER_CLIENT
    neighbour, _ = h.connect(host="2001:db8:1:3::1")  # the next /64 is another client
    assert isinstance(neighbour, TrackedConnection)
    assert h.events("connection.refused") == [
        {"client": "[2001:db8:1:2::99]:40003", "reason": "max_connections_per_client"}
    ]


def test_an_ipv4_client_of_a_dual_stack_listener_counts_as_ipv4() -> None:
    h = harness(max_per_client=2, per_client_reply=PER_CLIENT)
    h.connect(host="192.0.2.7")
    h.connect(host="::ffff:192.0.2.7")
    _, transport = h.connect(host="192.0.2.7")
    assert transport.value() == PER_CLIENT
    _, transport = h.connect(host="::ffff:192.0.2.7")
    assert transport.value() == PER_CLIENT
    # Not lumped with the other IPv4 addresses of ::ffff:0:0/96 either.
    other, _ = h.connect(host="::ffff:192.0.2.8")
    assert isinstance(other, TrackedConnection)


def test_unix_socket_clients_are_not_limited_per_client() -> None:
    h = harness(max_per_client=1)
    accepted = [h.accept(UNIXAddress(b"/run/netd/svc.sock"))[0] for _ in range(4)]
    accepted.append(h.accept(UNIXAddress(None))[0])
    assert all(isinstance(c, TrackedConnection) for c in accepted)
    assert h.stats.counters == {}


def test_no_per_client_limit_by_default() -> None:
    h = harness(max_connections=20)
    accepted = [h.connect()[0] for _ in range(20)]
    assert all(isinstance(c, TrackedConnection) for c in accepted)
    assert all(c.client_key is None for c in accepted)  # nothing counted either


def test_per_client_slots_are_freed_whichever_way_a_connection_ends() -> None:
    h = harness(max_per_client=1, per_client_reply=PER_CLIENT)
    _, transport = h.connect(close_at_once=False)
    h.elapse(IDLE * 5 / 4)  # closed, then cut, by the idle sweep
    assert transport.aborted
    drained, _ = h.connect()
    assert isinstance(drained, TrackedConnection)
    h.connections.drain(1)
    assert isinstance(h.connect()[0], TrackedConnection)


@pytest.mark.parametrize(
    ("address", "key"),
    [
        (IPv4Address("TCP", "192.0.2.7", 1), ipaddress.IPv4Address("192.0.2.7")),
        (IPv6Address("TCP", "::ffff:192.0.2.7", 1), ipaddress.IPv4Address("192.0.2.7")),
        (IPv6Address("TCP", "2001:db8::1:2:3:4", 1), ipaddress.IPv6Network("2001:db8::/64")),
        (IPv6Address("TCP", "fe80::1%eth0", 1), ipaddress.IPv6Network("fe80::/64")),
        (IPv6Address("TCP", "::1", 1), ipaddress.IPv6Network("::/64")),
        (UNIXAddress(b"/run/netd/svc.sock"), None),
        (None, None),
    ],
)
def test_client_key(address: IAddress | None, key: object) -> None:
    assert client_key(address) == key


# --- the idle sweep ----------------------------------------------------------------


def test_silent_connection_closes_after_idle_timeout_then_is_aborted() -> None:
    h = harness()
    connection, transport = h.connect(close_at_once=False)
    h.elapse(IDLE * 3 / 4)
    assert not transport.close_requested
    h.elapse(IDLE / 4)
    assert transport.close_requested
    assert not transport.aborted
    assert h.events("connection.idle") == [{"connection": connection.connection_id}]
    # Its peer does not read what is pending: cut one sweep later.
    h.elapse(IDLE / 4)
    assert transport.aborted
    assert len(h.connections) == 0
    assert h.clock.getDelayedCalls() == []  # no sweeping without connections


def test_traffic_keeps_a_connection_open() -> None:
    h = harness()
    connection, transport = h.connect()
    for _ in range(20):  # 400 seconds, a byte every 20
        h.elapse(20)
        connection.dataReceived(b".")
    assert not transport.close_requested
    # The last byte came at t=400, just after that sweep: the one at 425 still sees it
    # move, 450..500 count it quiet, 525 closes it (idle_timeout to 1.25 times that).
    h.elapse(100)
    assert not transport.close_requested
    h.elapse(25)
    assert transport.close_requested
    assert not transport.connected


def test_output_alone_counts_as_traffic() -> None:
    h = harness()
    connection, transport = h.connect()
    for _ in range(10):
        h.elapse(IDLE / 4)
        connection.write(b"tick\r\n")
    assert not transport.close_requested
    assert connection.bytes_out == 60


def test_idle_close_asks_the_protocol_to_finish_first() -> None:
    h = harness(protocol=Exchanging)
    connection, transport = h.connect(close_at_once=False)
    h.elapse(IDLE)
    assert connection.wrappedProtocol.asked_to_finish == 1
    assert not transport.close_requested  # the protocol decides how to end
    h.elapse(IDLE / 4)
    assert transport.aborted


def test_the_idle_sweep_and_a_drain_ask_a_protocol_that_tells_them_apart_each_its_way() -> None:
    h = harness(protocol=TellsIdleFromStop)
    idle, _ = h.connect(close_at_once=False)
    h.elapse(IDLE)
    assert (idle.wrappedProtocol.asked_as_idle, idle.wrappedProtocol.asked_to_finish) == (1, 0)
    stopped, _ = h.connect(close_at_once=False)
    h.connections.drain(5)
    assert (stopped.wrappedProtocol.asked_as_idle, stopped.wrappedProtocol.asked_to_finish) == (
        0,
        1,
    )


def test_each_connection_has_its_own_idle_time() -> None:
    h = harness()
    _, early_transport = h.connect()
    h.elapse(IDLE / 2)
    _, late_transport = h.connect()
    h.elapse(IDLE / 2)
    assert early_transport.close_requested
    assert not late_transport.close_requested
    h.elapse(IDLE / 2)
    assert late_transport.close_requested


def test_stop_cancels_the_sweep() -> None:
    h = harness()
    _, transport = h.connect()
    h.connections.stop()
    assert h.clock.getDelayedCalls() == []
    h.elapse(IDLE * 2)
    assert not transport.close_requested


# --- draining ----------------------------------------------------------------------


def test_drain_without_connections_is_immediate() -> None:
    h = harness()
    drained = h.connections.drain(10)
    assert drained.called


def test_drain_closes_gracefully_then_cuts_after_grace() -> None:
    h = harness()
    plain, plain_transport = h.connect(close_at_once=False)
    h.wrapped.protocol = Exchanging
    busy, busy_transport = h.connect()
    drained = h.connections.drain(5)
    assert plain_transport.close_requested  # no exchange to finish: closed gracefully
    assert busy.wrappedProtocol.asked_to_finish == 1
    assert not busy_transport.close_requested
    assert not drained.called
    # The plain one finishes on its own.
    plain.connectionLost(Failure(Exception("done")))
    h.elapse(4.9)
    assert not drained.called
    assert not busy_transport.aborted
    h.elapse(0.1)
    assert busy_transport.aborted
    assert not plain_transport.aborted
    assert drained.called
    assert len(h.connections) == 0


def test_drain_that_finishes_in_time_cancels_the_cut() -> None:
    h = harness()
    _, first = h.connect()
    _, second = h.connect()
    h.connections.stop()  # leave only the drain's own timer on the clock
    drained = h.connections.drain(5)
    assert drained.called
    assert not first.connected and not second.connected
    assert not first.aborted and not second.aborted
    assert h.clock.getDelayedCalls() == []


def test_when_closed_fires_for_every_waiter() -> None:
    h = harness()
    connection, transport = h.connect()
    waiters: list[Deferred[None]] = [connection.when_closed(), connection.when_closed()]
    assert not any(w.called for w in waiters)
    transport.loseConnection()
    assert all(w.called for w in waiters)


# --- counters and events -----------------------------------------------------------


def test_bytes_and_journal_events() -> None:
    h = harness()
    first, first_transport = h.connect()
    second, second_transport = h.connect()
    assert first.connection_id != second.connection_id
    first.dataReceived(b"hello")
    first.writeSequence([b"ab", b"cd"])
    second.dataReceived(b"xy")
    assert h.connections.bytes_in_flight() == (7, 11)
    assert (h.stats.bytes_in, h.stats.bytes_out) == (0, 0)  # added as connections close
    assert (h.stats.connections_total, h.stats.connections_active) == (2, 2)

    service_protocol = first.wrappedProtocol
    first_transport.loseConnection()
    assert service_protocol.lost  # the service's protocol heard of it too
    assert (h.stats.bytes_in, h.stats.bytes_out) == (5, 9)
    assert h.connections.bytes_in_flight() == (2, 2)
    assert h.stats.connections_active == 1
    second_transport.loseConnection()
    assert (h.stats.bytes_in, h.stats.bytes_out) == (7, 11)
    assert (h.stats.connections_total, h.stats.connections_active) == (2, 0)

    assert [(e.type, e.service) for e in h.journal.select()] == [
        ("connection.opened", "svc"),
        ("connection.opened", "svc"),
        ("connection.closed", "svc"),
        ("connection.closed", "svc"),
    ]
    assert h.events("connection.opened") == [
        {"client": "192.0.2.7:40001", "connection": first.connection_id},
        {"client": "192.0.2.7:40002", "connection": second.connection_id},
    ]
    assert h.events("connection.closed") == [
        {
            "client": "192.0.2.7:40001",
            "connection": first.connection_id,
            "bytes_in": 5,
            "bytes_out": 9,
        },
        {
            "client": "192.0.2.7:40002",
            "connection": second.connection_id,
            "bytes_in": 2,
            "bytes_out": 2,
        },
    ]


def test_a_connection_is_forgotten_once() -> None:
    h = harness()
    connection, transport = h.connect()
    connection.dataReceived(b"abc")
    transport.loseConnection()
    h.connections.forget(connection)
    assert h.stats.bytes_in == 3
    assert len(h.events("connection.closed")) == 1


@pytest.mark.parametrize(
    ("address", "text"),
    [
        (IPv4Address("TCP", "127.0.0.1", 7), "127.0.0.1:7"),
        (IPv6Address("TCP", "::1", 7), "[::1]:7"),
        (UNIXAddress(b"/run/netd/echo.sock"), "unix:/run/netd/echo.sock"),
        (UNIXAddress(None), "unix:"),
        (None, "unix:"),
    ],
)
def test_describe_address(address: IAddress | None, text: str) -> None:
    assert describe_address(address) == text


# --- ALPN --------------------------------------------------------------------------


@implementer(IProtocolNegotiationFactory)
class NegotiatingFactory(Factory):
    protocol = Protocol

    def acceptableProtocols(self) -> list[bytes]:
        return [b"h2", b"http/1.1"]


def test_alpn_offered_only_when_the_wrapped_factory_offers_it() -> None:
    h = harness()
    negotiating = TrackingFactory(NegotiatingFactory(), h.connections)
    assert IProtocolNegotiationFactory.providedBy(negotiating)
    assert negotiating.acceptableProtocols() == [b"h2", b"http/1.1"]
    assert not IProtocolNegotiationFactory.providedBy(h.factory)


def test_unsent_bytes_looks_through_wrapper_and_tls_without_counting_twice() -> None:
    from netd.connections import unsent_bytes

    class Socket:
        dataBuffer = b"x" * 100
        offset = 40
        _tempDataLen = 7

    class TLS:
        def __init__(self) -> None:
            self.transport = Socket()
            self._appSendBuffer = [b"abc"]

    class Wrapper:
        # As ProtocolWrapper: unknown names are the transport's.
        def __init__(self) -> None:
            self.transport = TLS()

        def __getattr__(self, name: str) -> object:
            return getattr(self.transport, name)

    assert unsent_bytes(Wrapper()) == 60 + 7 + 3
    assert unsent_bytes(None) == 0


# --- half-close ----------------------------------------------------------------------


@implementer(IOwesReplies)
class Owing(Recorder):
    """Answers later: the client's FIN must wait for it."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: Deferred[None] = Deferred()

    def when_replied(self) -> Deferred[None]:
        return self.pending


@implementer(IHalfCloseableProtocol)
class HalfCloseable(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.read_closed = 0

    def readConnectionLost(self) -> None:
        self.read_closed += 1

    def writeConnectionLost(self) -> None:
        pass


def test_half_close_closes_after_the_replies_already_written() -> None:
    h = harness()
    connection, transport = h.connect(close_at_once=False)
    connection.dataReceived(b"ping")
    IHalfCloseableProtocol(connection).readConnectionLost()
    assert transport.value() == b"ping"
    assert transport.close_requested  # a graceful close: buffered output still goes


def test_half_close_waits_for_replies_still_owed() -> None:
    h = harness(protocol=Owing)
    connection, transport = h.connect(close_at_once=False)
    IHalfCloseableProtocol(connection).readConnectionLost()
    assert not transport.close_requested
    connection.wrappedProtocol.pending.callback(None)
    assert transport.close_requested


def test_half_close_is_left_to_a_protocol_that_handles_it() -> None:
    h = harness(protocol=HalfCloseable)
    connection, transport = h.connect(close_at_once=False)
    IHalfCloseableProtocol(connection).readConnectionLost()
    assert connection.wrappedProtocol.read_closed == 1
    assert not transport.close_requested


def test_half_close_ends_reading_back_pressure() -> None:
    h = harness()
    connection, transport = h.connect(close_at_once=False)
    transport.registerProducer(connection, True)
    IHalfCloseableProtocol(connection).readConnectionLost()
    assert transport.producer is None
    assert transport.close_requested


# --- writing straight to the socket ----------------------------------------------------


class Socket(Connection):
    """A connected TCP socket whose kernel takes C{room} more bytes, then no more."""

    protocol: Any

    def __init__(self, room: int) -> None:
        FileDescriptor.__init__(self, MemoryReactor())  # no real socket
        self.connected = 1
        self.room = room
        self.lost = False
        self.sent: list[bytes] = []

    def writeSomeData(self, data: bytes) -> int | BaseException:
        if self.lost:
            return ConnectionLost()
        taken = bytes(data[: self.room])
        self.room -= len(taken)
        if taken:
            self.sent.append(taken)
        return len(taken)

    def getPeer(self) -> IPv4Address:
        return IPv4Address("TCP", "192.0.2.7", 40001)

    def getHandle(self) -> None:
        return None  # no socket for its options

    def queued(self) -> bytes:
        return self.dataBuffer[self.offset :] + b"".join(self._tempDataBuffer)


def on_socket(room: int, h: Harness | None = None) -> tuple[TrackedConnection, Socket]:
    h = harness() if h is None else h
    connection = h.factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 40001))
    assert isinstance(connection, TrackedConnection)
    socket = Socket(room)
    socket.protocol = connection
    connection.makeConnection(socket)
    return connection, socket


def test_a_write_to_an_idle_socket_is_sent_at_once() -> None:
    connection, socket = on_socket(room=100)
    connection.dataReceived(b"ping")
    connection.writeSequence([b"a", b"b"])
    assert socket.sent == [b"ping", b"ab"]
    assert socket.queued() == b""
    assert socket not in socket.reactor.getWriters()
    assert (connection.bytes_in, connection.bytes_out) == (4, 6)


def test_what_the_socket_does_not_take_is_buffered_and_later_writes_queue_behind_it() -> None:
    connection, socket = on_socket(room=3)
    connection.write(b"hello")
    connection.write(b"!")
    assert socket.sent == [b"hel"]
    assert socket.queued() == b"lo!"
    assert socket in socket.reactor.getWriters()
    socket.room = 100
    socket.doWrite()
    assert socket.sent == [b"hel", b"lo!"]
    assert connection.bytes_out == 6


def test_a_pull_producer_keeps_twisted_buffering() -> None:
    # Twisted asks a pull producer for more only from doWrite: a write must go there.
    @implementer(IPullProducer)
    class Pull:
        def resumeProducing(self) -> None:
            pass

        def stopProducing(self) -> None:
            pass

    connection, socket = on_socket(room=100)
    socket.registerProducer(Pull(), False)
    connection.write(b"data")
    assert socket.sent == []
    assert socket.queued() == b"data"


def test_after_starttls_writes_go_through_tls() -> None:
    class TLS:
        def __init__(self) -> None:
            self.encrypted: list[bytes] = []

        def write(self, data: bytes) -> None:
            self.encrypted.append(data)

    connection, socket = on_socket(room=100)
    # As startTLS leaves it: the socket's write hands the bytes to TLS.
    socket.protocol = tls = TLS()
    socket.TLS = True
    connection.write(b"secret")
    assert socket.sent == []
    assert tls.encrypted == [b"secret"]


def test_no_direct_write_once_closing_or_lost() -> None:
    connection, socket = on_socket(room=100)
    socket.lost = True
    connection.write(b"late")
    assert socket.queued() == b"late"
    assert isinstance(socket.doWrite(), ConnectionLost)
    closing, closing_socket = on_socket(room=100)
    closing_socket.loseConnection()
    closing.write(b"bye")
    assert closing_socket.sent == []


def test_no_direct_write_once_aborted() -> None:
    # abortConnection stops Twisted's writes but leaves the socket "connected"
    # until connectionLost, a turn later: nothing may reach the peer meanwhile.
    connection, socket = on_socket(room=100)
    socket._aborting = True
    connection.write(b"after the abort")
    assert socket.sent == []


# --- writes held to the end of the turn (a kind's batch_writes) -------------------------


def test_a_batching_kinds_writes_leave_together_at_the_end_of_the_turn() -> None:
    h = harness(batch_writes=True)
    first, first_socket = on_socket(100, h)
    second, second_socket = on_socket(100, h)
    first.write(b"HTTP/1.1 200 OK\r\n\r\n")
    second.write(b"one ")
    first.write(b"body")
    second.writeSequence([b"two ", b"three"])
    assert first_socket.sent == second_socket.sent == []  # nothing before the turn ends
    assert (first.bytes_out, second.bytes_out) == (23, 13)  # counted as written
    h.clock.advance(0)
    assert first_socket.sent == [b"HTTP/1.1 200 OK\r\n\r\nbody"]  # one send each
    assert second_socket.sent == [b"one two three"]
    second.write(b"next turn")
    h.clock.advance(0)
    assert second_socket.sent[-1] == b"next turn"


def test_held_writes_leave_before_the_socket_is_used_another_way() -> None:
    h = harness(batch_writes=True)
    # sendfile(2) writes to the socket past Python: the head written before goes first.
    connection, socket = on_socket(100, h)
    connection.write(b"head")
    assert plain_socket(connection) is socket and socket.sent == [b"head"]
    # STARTTLS: the last plaintext reply leaves before the handshake.
    connection, socket = on_socket(100, h)
    before_tls: list[list[bytes]] = []
    socket.startTLS = lambda *args, **kwargs: before_tls.append(list(socket.sent))  # type: ignore[method-assign]
    connection.write(b"220 Ready to start TLS\r\n")
    connection.startTLS(object())
    assert before_tls == [[b"220 Ready to start TLS\r\n"]]
    # A producer, a half-close, a close.
    for end in ("registerProducer", "loseWriteConnection", "loseConnection"):
        connection, socket = on_socket(100, h)
        socket.loseWriteConnection = lambda: None  # type: ignore[method-assign]
        connection.write(end.encode())
        if end == "registerProducer":
            connection.registerProducer(socket, True)
        else:
            getattr(connection, end)()
        assert socket.sent == [end.encode()], end


def test_an_abort_drops_the_held_writes() -> None:
    h = harness(batch_writes=True)
    connection, socket = on_socket(100, h)
    socket.abortConnection = lambda: None  # type: ignore[method-assign]
    connection.write(b"never")
    assert unsent_bytes(connection) == 5  # held counts as unsent, for cut_if_unread
    connection.abortConnection()
    h.clock.advance(0)
    assert socket.sent == [] and unsent_bytes(connection) == 0


@pytest.mark.parametrize(("rate", "budget"), [(1000, None), (None, 30)])
def test_a_rules_close_sends_the_held_writes_first(rate: int | None, budget: int | None) -> None:
    """
    A throttled reply closed when sent, or a reply cut after N bytes: a socket
    with nothing buffered closes within the turn, before the held writes leave.
    """
    h = harness(batch_writes=True)
    connection, socket = on_socket(100, h)
    out_at_close: list[bytes] = []
    close = socket.loseConnection

    def closing() -> None:
        out_at_close.append(b"".join(socket.sent) + socket.queued())
        close()

    socket.loseConnection = closing  # type: ignore[method-assign]
    connection.shape(h.clock, rate, budget)
    connection.write(b"x" * 40)
    connection.loseConnection()  # the budget's close came first: then this one is a repeat
    h.elapse(1, step=0.01)
    assert out_at_close[0] == b"x" * (budget or 40)


def test_a_kind_that_does_not_batch_sends_at_once() -> None:
    connection, socket = on_socket(100, harness(batch_writes=False))
    connection.write(b"now")
    assert socket.sent == [b"now"]


def test_what_tls_writes_is_sent_at_once_unless_bytes_wait_ahead() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        theirs.setblocking(False)
        reactor = MemoryReactor()
        sender = SendsNowFactory(Factory.forProtocol(Protocol)).buildProtocol(None)
        assert isinstance(sender, SendsNow)
        transport = Connection(ours, sender, reactor)
        transport.connected = True
        sender.makeConnection(transport)
        sender.write(b"hello")
        # On the socket already: no writable event waited for.
        assert theirs.recv(100) == b"hello" and reactor.getWriters() == []
        transport.write(b"queued ")  # Twisted's buffer: the next write goes behind it
        sender.writeSequence([b"after", b" it"])
        with pytest.raises(BlockingIOError):
            theirs.recv(100)
        transport.doWrite()
        assert theirs.recv(100) == b"queued after it"
    other = StringTransportWithDisconnection()
    sender.makeConnection(other)  # not a socket: its own write
    sender.write(b"plain")
    assert other.value() == b"plain"


def test_a_tls_listeners_tcp_connection_turns_nagle_off() -> None:
    listening = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listening.getsockname())
    accepted, _ = listening.accept()
    with listening, client, accepted:
        assert not accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        sender = SendsNowFactory(Factory.forProtocol(Protocol)).buildProtocol(None)
        assert sender is not None
        sender.makeConnection(Connection(accepted, sender, MemoryReactor()))
        # Under TLS, netd's own wrapper sees TLS's handle, not this socket.
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
