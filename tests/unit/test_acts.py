"""netd.acts: the generic acts on a connection, through the core's connection wrapper."""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection

from netd.acts import perform
from netd.connections import ConnectionSet, TrackingFactory
from netd.events import Journal, ServiceStats
from netd.rules import RuleSet, parse_api_rule


class Greeter(Protocol):
    """Greets, then answers each read with 10 KiB."""

    transport: Any
    made = False
    lost = False

    def connectionMade(self) -> None:
        self.made = True
        self.transport.write(b"hello\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"x" * 10240)

    def connectionLost(self, reason: object) -> None:
        self.lost = True


def connect(*rules: dict[str, Any]) -> tuple[Clock, Any, StringTransportWithDisconnection]:
    clock = Clock()
    journal = Journal(clock)
    ruleset = RuleSet("svc", clock=clock, journal=journal)
    ruleset.replace_map([parse_api_rule(body, ruleset.vocabulary) for body in rules])
    connections = ConnectionSet(clock, "svc", ServiceStats(), journal, 10, 60.0, rules=ruleset)
    factory = TrackingFactory(Factory.forProtocol(Greeter), connections)
    connection = factory.buildProtocol(None)
    transport = StringTransportWithDisconnection()
    transport.protocol = connection
    connection.makeConnection(transport)
    return clock, connection, transport


def test_no_rule_leaves_the_connection_alone() -> None:
    _, connection, transport = connect()
    assert transport.value() == b"hello\r\n"
    assert connection.shaper is None
    assert "write" not in connection.__dict__


def test_reset_aborts_before_the_protocol_starts() -> None:
    _, connection, transport = connect({"reset": True})
    assert transport.value() == b""
    assert not connection.wrappedProtocol.made
    assert not transport.connected


def test_stall_never_starts_the_protocol_and_drops_input() -> None:
    clock, connection, transport = connect({"stall": True})
    connection.dataReceived(b"anyone?")
    clock.advance(100)
    assert transport.value() == b""
    assert connection.bytes_in == 0
    assert transport.connected


def test_close_true_at_connect_is_a_fin_without_a_greeting() -> None:
    _, connection, transport = connect({"close": True})
    assert transport.value() == b""
    assert not transport.connected
    assert not connection.wrappedProtocol.made


def test_delay_holds_the_greeting_and_reading() -> None:
    clock, _, transport = connect({"delay": 2})
    assert transport.value() == b""
    assert transport.producerState == "paused"
    clock.advance(1.9)
    assert transport.value() == b""
    clock.advance(0.2)
    assert transport.value() == b"hello\r\n"
    assert transport.producerState == "producing"


def test_close_after_n_bytes_is_a_partial_answer() -> None:
    _, _, transport = connect({"close": 3})
    assert transport.value() == b"hel"
    assert not transport.connected


class Chunks:
    """A pull producer (as a file sent by send_file): 1000 bytes each time it is asked."""

    def __init__(self, consumer: Any) -> None:
        self.consumer = consumer
        self.asked = 0

    def resumeProducing(self) -> None:
        self.asked += 1
        self.consumer.write(b"y" * 1000)

    def stopProducing(self) -> None:
        """Nothing to stop."""


def test_close_after_n_bytes_keeps_asking_a_pull_producer_for_them() -> None:
    clock, connection, transport = connect({"close": 5007})
    connection.registerProducer(Chunks(connection), False)
    for _ in range(10):
        clock.advance(0)
    assert transport.value() == b"hello\r\n" + b"y" * 5000
    assert not transport.connected


def test_throttle_paces_writes_then_closes_when_sent() -> None:
    clock, connection, transport = connect({"throttle": 1000})
    connection.dataReceived(b"go")
    connection.loseConnection()
    sent = []
    for _ in range(120):
        clock.advance(0.1)
        sent.append(len(transport.value()))
    total = 7 + 10240
    assert sent[-1] == total
    seconds = next(i for i, n in enumerate(sent) if n == total) / 10
    assert 9.5 <= seconds <= 10.8
    assert not transport.connected


def test_throttle_stops_reading_past_the_high_water_mark() -> None:
    _, connection, transport = connect({"throttle": 100})
    for _ in range(8):
        connection.dataReceived(b"more")
    assert transport.producerState == "paused"


class Source:
    """A streaming producer (a relay's other side, a proxied body): its consumer pauses it."""

    paused = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        """Nothing to stop."""


def test_throttle_sends_nothing_while_the_client_reads_nothing() -> None:
    clock, connection, transport = connect({"throttle": 10000})
    source = Source()
    connection.registerProducer(source, True)
    clock.advance(1)
    assert transport.value() == b"hello\r\n"
    transport.producer.pauseProducing()  # the client's socket buffer is full
    for _ in range(7):  # 70 KiB for the throttle, past its high water
        connection.dataReceived(b"more")
    clock.advance(10)
    assert transport.value() == b"hello\r\n"
    assert source.paused
    assert transport.producerState == "paused"
    transport.producer.resumeProducing()
    clock.advance(1)
    assert 9000 <= len(transport.value()) - 7 <= 11000  # the rate, with no burst
    clock.advance(10)
    assert len(transport.value()) == 7 + 7 * 10240
    assert not source.paused


def test_throttle_closes_when_its_held_bytes_are_sent() -> None:
    clock, connection, transport = connect({"throttle": 10000})
    transport.producer.pauseProducing()
    connection.dataReceived(b"more")
    connection.loseConnection()
    clock.advance(5)
    assert transport.connected
    transport.producer.resumeProducing()
    clock.advance(5)
    assert len(transport.value()) == 7 + 10240
    assert transport.producer is None
    assert not transport.connected


def test_a_removed_rule_no_longer_acts() -> None:
    clock = Clock()
    ruleset = RuleSet("svc", clock=clock)
    ruleset.post({"reset": True})
    connections = ConnectionSet(
        clock, "svc", ServiceStats(), Journal(clock), 10, 60.0, rules=ruleset
    )
    factory = TrackingFactory(Factory.forProtocol(Greeter), connections)
    ruleset.remove("r1")
    connection = factory.buildProtocol(None)
    transport = StringTransportWithDisconnection()
    transport.protocol = connection
    connection.makeConnection(transport)
    assert transport.value() == b"hello\r\n"


def test_a_throttled_reply_before_tls_starts_leaves_in_plaintext_first() -> None:
    """STARTTLS's 220 waiting for the rate would follow the handshake, encrypted."""
    _, connection, transport = connect({"throttle": 100})
    connection.dataReceived(b"go")  # 10 KiB queued behind the rate
    before_tls: list[int] = []
    transport.startTLS = lambda *args, **kwargs: before_tls.append(len(transport.value()))  # type: ignore[attr-defined]
    connection.write(b"220 Ready to start TLS\r\n")
    connection.startTLS(object())
    assert before_tls == [7 + 10240 + 24]
    assert transport.value().endswith(b"220 Ready to start TLS\r\n")


def test_a_producer_registered_before_a_throttle_fired_is_unregistered_where_it_is() -> None:
    """Unregistered from the throttle, it stayed the transport's: the next one raised."""
    clock, connection, transport = connect()
    connection.registerProducer(Source(), True)
    perform({"throttle": 1000}, clock, connection, lambda: None)  # a rule fired mid-connection
    connection.unregisterProducer()
    connection.shaper.release()  # the end of the throttled reply
    assert connection.shaper is None
    source = Source()
    connection.registerProducer(source, True)
    assert transport.producer is source


def test_a_throttle_fired_mid_connection_paces_the_producer_registered_before() -> None:
    clock, connection, transport = connect()
    source = Source()
    connection.registerProducer(source, True)
    source.paused = True  # by the transport, whose buffer was full when the rule fired
    perform({"throttle": 1000}, clock, connection, lambda: None)
    clock.advance(0)
    assert not source.paused  # the throttle holds it now, and it holds nothing back yet
    connection.write(b"x" * 70000)  # past the throttle's high water
    assert source.paused
    clock.advance(100)
    assert not source.paused
    connection.shaper.release()
    assert connection.shaper is None
    assert transport.producer is source  # the transport's again, unthrottled


def test_close_after_n_bytes_pauses_a_streaming_producer_while_the_client_reads_nothing() -> None:
    """Its writes pass straight to the transport: they must stop when it is full, not at N."""
    _, connection, transport = connect({"close": 1 << 30})
    source = Source()
    connection.registerProducer(source, True)
    transport.producer.pauseProducing()  # the client's socket buffer is full
    assert source.paused
    transport.producer.resumeProducing()
    assert not source.paused


class Stoppable(Source):
    stopped = False

    def stopProducing(self) -> None:
        self.stopped = True


def test_a_producer_the_throttle_took_over_is_stopped_when_the_connection_is_lost() -> None:
    """As the transport would have stopped it, had it kept it."""
    clock, connection, transport = connect()
    source = Stoppable()
    connection.registerProducer(source, True)
    perform({"throttle": 1000}, clock, connection, lambda: None)
    transport.loseConnection()
    assert source.stopped


class LastReply:
    """
    A file sent under a rule, then the reply after it (HTTP/1.1 pipelining):
    asked again, the file ends, its reply is over, and the next request's
    rule fires, all inside that ask.
    """

    def __init__(self, connection: Any, clock: Clock) -> None:
        self.connection = connection
        self.clock = clock
        self.asked = 0

    def resumeProducing(self) -> None:
        self.asked += 1
        if self.asked == 1:
            self.connection.write(b"y" * 1000)
            return
        self.connection.unregisterProducer()
        self.connection.shaper.release()
        perform({"throttle": 1000}, self.clock, self.connection, lambda: None)

    def stopProducing(self) -> None:
        """Nothing to stop."""


def test_a_throttle_fired_as_the_shaped_reply_before_it_ends_stays() -> None:
    clock, connection, transport = connect()
    perform({"close": 1 << 30}, clock, connection, lambda: None)
    connection.registerProducer(LastReply(connection, clock), False)
    clock.advance(0)  # the file's end, asked for by the first shaper
    shaper = connection.shaper
    assert shaper is not None and shaper.rate == 1000
    sent = len(transport.value())
    connection.write(b"z" * 10000)
    assert len(transport.value()) - sent < 1000  # paced, not sent at once


def test_a_producer_taken_over_paused_goes_back_running_when_the_rule_ends_at_once() -> None:
    clock, connection, transport = connect()
    source = Source()
    connection.registerProducer(source, True)
    source.paused = True  # by the transport, whose buffer was full when the rule fired
    perform({"close": 1 << 30}, clock, connection, lambda: None)
    connection.shaper.release()  # a reply over in the same turn
    clock.advance(0)
    assert connection.shaper is None
    assert transport.producer is source
    assert not source.paused


def test_the_reply_after_a_released_throttle_follows_it_unpaced() -> None:
    """HTTP/1.1 pipelining: the next reply, no rule's, waited behind at the rate."""
    clock, connection, transport = connect()
    perform({"throttle": 1000}, clock, connection, lambda: None)
    connection.write(b"t" * 2000)
    connection.shaper.release(written=True)  # the end of the throttled reply
    connection.write(b"n" * 10000)  # the next one's, written at once
    clock.advance(1)
    assert transport.value() == b"hello\r\n" + b"t" * (1000 + 50)  # paced, and nothing overtakes
    clock.advance(1.1)
    assert transport.value() == b"hello\r\n" + b"t" * 2000 + b"n" * 10000
    assert connection.shaper is None
