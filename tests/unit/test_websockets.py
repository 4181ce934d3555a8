"""
L{netd.websockets} without sockets: a line protocol behind L{LinesOverWebSocket}
driven through StringTransport and a Clock, frames made and read by a wsproto
client.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection
from twisted.python.failure import Failure
from wsproto.connection import Connection, ConnectionType
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Ping,
    Pong,
    TextMessage,
)

from netd.websockets import LineSocketOptions, LinesOverWebSocket, accept, offered_subprotocols

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
OPTIONS = LineSocketOptions(
    subprotocols={"text.ircv3.net": False, "binary.ircv3.net": True},
    max_line=64,
    max_head=1024,
    head_timeout=5.0,
)


class Lines(Protocol):
    """A line protocol that records what it reads and how it is closed."""

    def __init__(self) -> None:
        self.received = b""
        self.lost: Failure | None = None
        self.graceful = 0

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost = reason

    def close_gracefully(self) -> None:
        self.graceful += 1
        self.transport.write(b"ERROR :bye\r\n")
        self.transport.loseConnection()


class Setup:
    def __init__(self, options: LineSocketOptions = OPTIONS) -> None:
        self.clock = Clock()
        self.inner = Lines()
        self.socket = LinesOverWebSocket(self.inner, self.clock, options)
        self.transport = StringTransportWithDisconnection()
        self.transport.protocol = self.socket
        self.socket.makeConnection(self.transport)
        self.client = Connection(ConnectionType.CLIENT)

    def handshake(self, protocols: bytes | None = b"text.ircv3.net") -> bytes:
        offer = b"Sec-WebSocket-Protocol: %s\r\n" % protocols if protocols is not None else b""
        self.socket.dataReceived(
            b"GET /irc HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + KEY + b"\r\nSec-WebSocket-Version: 13\r\n" + offer + b"\r\n"
        )
        answer = self.transport.value()
        self.transport.clear()
        return answer

    def send(self, event: Event) -> None:
        self.socket.dataReceived(self.client.send(event))

    def events(self) -> list[Event]:
        self.client.receive_data(self.transport.value())
        self.transport.clear()
        return list(self.client.events())


def test_the_handshake_chooses_the_clients_first_served_subprotocol() -> None:
    setup = Setup()
    answer = setup.handshake(b"binary.ircv3.net, text.ircv3.net")
    assert answer.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in answer
    assert b"Sec-WebSocket-Protocol: binary.ircv3.net\r\n" in answer
    setup.inner.transport.write(b":netd 001 a :hi\r\n")
    assert [(type(e), e.data) for e in setup.events() if isinstance(e, Message)] == [
        (BytesMessage, b":netd 001 a :hi")
    ]


def test_a_client_offering_nothing_known_gets_text_and_no_subprotocol() -> None:
    setup = Setup()
    answer = setup.handshake(b"chat, superchat")
    assert answer.startswith(b"HTTP/1.1 101 ") and b"Sec-WebSocket-Protocol" not in answer
    setup.inner.transport.write(b"PING :a\r\nPING :b\r\nPI")
    setup.inner.transport.write(b"NG :c\r\n")
    assert [e.data for e in setup.events() if isinstance(e, TextMessage)] == [
        "PING :a",
        "PING :b",
        "PING :c",
    ]


def test_each_message_is_one_line_for_the_protocol() -> None:
    setup = Setup()
    setup.handshake()
    setup.send(TextMessage(data="NICK a"))
    setup.send(BytesMessage(data=b"USER a 0 * :b"))
    setup.send(TextMessage(data="JOIN #x\r\n"))
    setup.send(Ping(payload=b"p"))
    assert setup.inner.received == b"NICK a\r\nUSER a 0 * :b\r\nJOIN #x\r\n"
    assert [type(e) for e in setup.events()] == [Pong]


@pytest.mark.parametrize(
    ("message", "code"),
    [(TextMessage(data="x" * 63), 1009), (TextMessage(data="PING :a\nPING :b"), 1008)],
)
def test_a_message_too_long_or_of_two_lines_is_closed_with_a_code(
    message: Message, code: int
) -> None:
    setup = Setup()
    setup.handshake()
    setup.send(TextMessage(data="x" * 62))  # the longest: 64 bytes with its CRLF
    setup.send(message)
    setup.send(TextMessage(data="after"))
    assert setup.inner.received == b"x" * 62 + b"\r\n"
    closes = [e for e in setup.events() if isinstance(e, CloseConnection)]
    assert [c.code for c in closes] == [code]
    # The client's answer ends the connection, and the line protocol with it.
    setup.send(closes[0].response())
    assert not setup.transport.connected
    assert setup.inner.lost is not None


def test_the_protocol_closing_sends_a_close_frame() -> None:
    setup = Setup()
    setup.handshake()
    setup.inner.transport.write(b"ERROR :Closing Link\r\n")
    setup.inner.transport.loseConnection()
    events = setup.events()
    assert isinstance(events[0], TextMessage) and events[0].data == "ERROR :Closing Link"
    assert isinstance(events[1], CloseConnection) and events[1].code == 1000
    assert not setup.transport.connected


def test_idle_timeout_asks_the_protocol_to_say_goodbye() -> None:
    setup = Setup()
    setup.handshake()
    setup.socket.close_gracefully()
    assert setup.inner.graceful == 1
    assert [type(e) for e in setup.events()] == [TextMessage, CloseConnection]


def test_back_pressure_reaches_the_connection() -> None:
    setup = Setup()
    setup.handshake()
    producer: Any = Lines()
    setup.inner.transport.registerProducer(producer, True)
    assert setup.transport.producer is producer
    setup.inner.transport.unregisterProducer()
    assert setup.transport.producer is None


def test_a_slow_handshake_is_cut_at_the_deadline() -> None:
    setup = Setup()
    setup.socket.dataReceived(b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n")
    setup.clock.advance(4.9)
    assert setup.transport.connected
    setup.clock.advance(0.2)
    assert setup.transport.value().startswith(b"HTTP/1.1 408 ")
    assert not setup.transport.connected
    assert setup.inner.transport is None


@pytest.mark.parametrize(
    ("request_head", "status"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"426"),
        (b"POST / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nno colon\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 8\r\n\r\n", b"426"),
        (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 300, b"431"),
    ],
)
def test_bad_handshakes_are_answered_and_closed(request_head: bytes, status: bytes) -> None:
    setup = Setup()
    setup.socket.dataReceived(request_head)
    assert setup.transport.value().startswith(b"HTTP/1.1 " + status + b" ")
    assert not setup.transport.connected
    assert setup.inner.transport is None
    setup.transport.clear()
    setup.socket.dataReceived(request_head)
    assert setup.transport.value() == b""
    assert not setup.clock.getDelayedCalls()


def test_helpers() -> None:
    assert accept(KEY) == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert offered_subprotocols(b" a, b ,,c") == ["a", "b", "c"]
    assert offered_subprotocols(None) == []
