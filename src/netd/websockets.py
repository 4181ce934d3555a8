"""
WebSocket (RFC 6455) server ends for the kinds, framed by wsproto (the sans-IO
library Twisted's own C{websocket} extra brings).

    - L{Frames}: the frames of one open WebSocket over any byte pipe: messages
      in (assembled, bounded in size), messages and Close out, Pings answered.
    - L{LinesOverWebSocket}: a line protocol served on a listener of its own:
      the HTTP/1.1 upgrade handshake (bounded in size and time, a subprotocol
      chosen), then each message is one line for the wrapped protocol and each
      line it writes is one message (IRC over WebSocket, U{the IRCv3 spec
      <https://ircv3.net/specs/extensions/websocket>}).

Kinds whose HTTP server reads the handshake itself (http) use L{accept},
L{handshake_problem} and L{offered_subprotocols} and put L{Frames} behind it.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IProtocol,
    IPushProducer,
    ITransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Ping,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError
from zope.interface import implementer

from netd.records import Record

__all__ = [
    "Frames",
    "LineSocketOptions",
    "LinesOverWebSocket",
    "accept",
    "handshake_problem",
    "offered_subprotocols",
    "refusal_status",
]

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# RFC 6455 7.4.1: the peer sent data of a kind or size this endpoint refuses.
POLICY_VIOLATION = 1008
MESSAGE_TOO_BIG = 1009


def accept(key: bytes) -> bytes:
    """The Sec-WebSocket-Accept for a client's Sec-WebSocket-Key (RFC 6455 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.strip() + _GUID).digest())


# RFC 6455 4.2.2: a version not spoken is refused with the one that is.
_WRONG_VERSION = "Sec-WebSocket-Version: 13 only"


def refusal_status(problem: str) -> int:
    """
    The status a handshake refused for C{problem} gets: 426 for a version not
    spoken, sent with C{Sec-WebSocket-Version: 13} (RFC 6455 4.2.2), else 400.
    """
    return 426 if problem == _WRONG_VERSION else 400


def handshake_problem(header: Callable[[bytes], bytes | None]) -> str | None:
    """What is wrong with a WebSocket handshake (RFC 6455 4.2.1), or None; C{header} reads one."""
    upgrade = (header(b"upgrade") or b"").lower()
    if b"websocket" not in [t.strip() for t in upgrade.split(b",")]:
        return "not a WebSocket handshake (Upgrade: websocket)"
    if header(b"sec-websocket-version") != b"13":
        return _WRONG_VERSION
    key = header(b"sec-websocket-key") or b""
    try:
        if len(base64.b64decode(key.strip(), validate=True)) != 16:
            return "Sec-WebSocket-Key is not 16 bytes in base64"
    except ValueError:
        return "Sec-WebSocket-Key is not base64"
    return None


def offered_subprotocols(header: bytes | None) -> list[str]:
    """The subprotocols a Sec-WebSocket-Protocol header offers, in the client's order."""
    names = (header or b"").decode("latin-1").split(",")
    return [name.strip() for name in names if name.strip()]


class Frames:
    """
    The frames of one open WebSocket, server side.

    C{send} takes the bytes for the peer, C{message} each complete message
    (text as C{str}, binary as C{bytes}), C{ended} is called once when the
    WebSocket is over (closed either way, or broken).  A message longer than
    C{max_message} is refused with a Close 1009, a frame wsproto cannot parse
    with the Close it chose (1002, 1007); messages after our Close are ignored
    while the peer's answer is awaited.
    """

    def __init__(
        self,
        send: Callable[[bytes], None],
        message: Callable[[str | bytes], None],
        ended: Callable[[], None],
        max_message: int,
    ) -> None:
        self._send = send
        self._message = message
        self._ended = ended
        self.max_message = max_message
        self.ws = Connection(ConnectionType.SERVER)
        self.parts: list[str | bytes] = []
        self.size = 0
        self.ended = False

    @property
    def open(self) -> bool:
        return not self.ended and self.ws.state is ConnectionState.OPEN

    def receive(self, data: bytes) -> None:
        if self.ended:
            return
        try:
            self.ws.receive_data(data)
        except LocalProtocolError:
            self.end()
            return
        for event in self.ws.events():
            self._event(event)
            if self.ended:
                return

    def _event(self, event: Event) -> None:
        if isinstance(event, CloseConnection):
            if self.ws.state is ConnectionState.REMOTE_CLOSING:
                self._out(event.response())
            elif self.ws.state is ConnectionState.OPEN:
                self.close(event.code, event.reason or "")  # a frame wsproto could not parse
            self.end()
        elif isinstance(event, Ping):
            self._out(event.response())
        elif isinstance(event, Message) and self.open:
            self.size += len(event.data)
            if self.size > self.max_message:
                self.close(MESSAGE_TOO_BIG, "message too big")
                return
            self.parts.append(event.data)
            if event.message_finished:
                message: str | bytes = (
                    "".join(p for p in self.parts if isinstance(p, str))
                    if isinstance(event, TextMessage)
                    else b"".join(p for p in self.parts if isinstance(p, bytes))
                )
                self.parts, self.size = [], 0
                self._message(message)

    def encode(self, message: str | bytes) -> bytes:
        """The frame of one message, for a caller that batches its writes (b"" once closing)."""
        if not self.open:
            return b""
        event = TextMessage(data=message) if isinstance(message, str) else BytesMessage(message)
        return self.ws.send(event)

    def send(self, message: str | bytes) -> None:
        data = self.encode(message)
        if data:
            self._send(data)

    def close(self, code: int, reason: str) -> None:
        """Send a Close; the peer answers it and the WebSocket ends then (or at L{end})."""
        if self.open:
            self._out(CloseConnection(code=code, reason=reason))

    def _out(self, event: Event) -> None:
        if self.ended:
            return
        try:
            data = self.ws.send(event)
        except LocalProtocolError:
            return
        self._send(data)

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            self._ended()


# -- a line protocol on a WebSocket listener --------------------------------------------


@attrs.frozen(repr=False)
class LineSocketOptions(Record):
    """
    @ivar subprotocols: the subprotocols served, each with whether its
        messages are binary (the first offered by the client is chosen, as
        the IRCv3 spec asks); a client offering none gets text messages.
    @ivar max_line: the longest line the wrapped protocol takes, its line end
        included: a longer message is refused with a Close 1009.
    @ivar max_head: the longest handshake request head.
    @ivar head_timeout: seconds the whole handshake may take.
    """

    subprotocols: Mapping[str, bool]
    max_line: int
    max_head: int = 8192
    head_timeout: float = 10.0


class LinesOverWebSocket(Protocol):
    """
    A line protocol (C{inner}) served over WebSocket, on a listener of its own.

    Until the handshake is done nothing reaches C{inner}; then it is connected
    to a L{_LineTransport}: each message arrives as one CRLF-ended line, and
    each line it writes leaves as one message without its line end.  A message
    holding a line end of its own (two lines in one) is refused with 1008.
    """

    transport: Any

    def __init__(self, inner: IProtocol, clock: Any, options: LineSocketOptions) -> None:
        self.inner = inner
        self.clock = clock
        self.options = options
        self.head = b""
        self.frames: Frames | None = None
        self.binary = False
        self.lines: _LineTransport | None = None
        self.refused = False
        self._deadline: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self._deadline = self.clock.callLater(self.options.head_timeout, self._too_slow)

    def _too_slow(self) -> None:
        self._deadline = None
        self._refuse(408, "the handshake took too long")

    def dataReceived(self, data: bytes) -> None:
        if self.frames is not None:
            self.frames.receive(data)
            return
        if self.refused:
            return
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end < 0 or end > self.options.max_head:
            if len(self.head) > self.options.max_head:
                self._refuse(431, "the request head is too long")
            return
        head, rest = self.head[:end], self.head[end + 4 :]
        self._handshake(head)
        if self.frames is not None and rest:
            self.frames.receive(rest)

    def _handshake(self, head: bytes) -> None:
        request, *lines = head.split(b"\r\n")
        words = request.split(b" ")
        headers: dict[bytes, bytes] = {}
        for line in lines:
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip():
                self._refuse(400, "a header line without a name")
                return
            key = name.lower()
            headers[key] = headers[key] + b", " + value.strip() if key in headers else value.strip()
        if len(words) != 3 or words[0] != b"GET" or words[2] != b"HTTP/1.1":
            self._refuse(400, "a WebSocket handshake is GET ... HTTP/1.1")
            return
        if b"upgrade" not in headers:
            self._refuse(426, "a WebSocket endpoint: connect with ws:// or wss://")
            return
        problem = handshake_problem(headers.get)
        if problem is not None:
            self._refuse(refusal_status(problem), problem)
            return
        served = self.options.subprotocols
        offered = offered_subprotocols(headers.get(b"sec-websocket-protocol"))
        chosen = next((name for name in offered if name in served), None)
        self.binary = served[chosen] if chosen is not None else False
        answer = (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: %s\r\n" % accept(headers.get(b"sec-websocket-key", b""))
        )
        if chosen is not None:
            answer += b"Sec-WebSocket-Protocol: %s\r\n" % chosen.encode("ascii")
        self._stop_deadline()
        self.head = b""
        self.transport.write(answer + b"\r\n")
        # Each message gains a CRLF on its way in: the line limit counts it.
        self.frames = Frames(
            self.transport.write, self._message, self._ended, self.options.max_line - 2
        )
        self.lines = _LineTransport(self)
        self.inner.makeConnection(self.lines)

    def _refuse(self, status: int, reason: str) -> None:
        self._stop_deadline()
        body = reason.encode() + b"\n"
        extra = b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n" if status == 426 else b""
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\n%sConnection: close\r\n\r\n%s"
            % (status, _REASONS[status], len(body), extra, body)
        )
        self.transport.loseConnection()
        self.refused = True
        self.head = b""

    def _stop_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _message(self, message: str | bytes) -> None:
        line = message.encode("utf-8") if isinstance(message, str) else message
        # The spec forbids a line end in a message; one trailing is forgiven.
        line = line.removesuffix(b"\n").removesuffix(b"\r")
        if b"\r" in line or b"\n" in line:
            assert self.frames is not None
            self.frames.close(POLICY_VIOLATION, "one IRC line per message")
            return
        self.inner.dataReceived(line + b"\r\n")

    def _ended(self) -> None:
        self.transport.loseConnection()

    def close_gracefully(self) -> None:
        """Idle timeout, reload, shutdown: the wrapped protocol says goodbye if it can."""
        graceful = getattr(self.inner, "close_gracefully", None)
        if self.lines is not None and graceful is not None:
            graceful()
        elif self.lines is not None:
            self.lines.loseConnection()
        else:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_deadline()
        if self.frames is not None:
            self.frames.ended = True
        if self.lines is not None:
            self.lines = None
            self.inner.connectionLost(reason)


_REASONS = {
    400: b"Bad Request",
    408: b"Request Timeout",
    426: b"Upgrade Required",
    431: b"Request Header Fields Too Large",
}


@implementer(ITransport, IConsumer, IPushProducer)
class _LineTransport:
    """
    What the wrapped line protocol sees as its transport: lines written become
    messages, the rest (producers, addresses, closing) is the connection's.
    """

    def __init__(self, socket: LinesOverWebSocket) -> None:
        self.socket = socket
        self.connection = socket.transport
        self.partial = b""

    @property
    def closed(self) -> bool:
        frames = self.socket.frames
        return frames is None or not frames.open

    def write(self, data: bytes) -> None:
        frames = self.socket.frames
        if frames is None:
            return
        *lines, self.partial = (self.partial + data).split(b"\n")
        binary = self.socket.binary
        # One write for all the lines (the hub flushes a turn's output at once).
        out = b"".join(
            frames.encode(
                line.removesuffix(b"\r")
                if binary
                else line.removesuffix(b"\r").decode("utf-8", "replace")
            )
            for line in lines
        )
        if out:
            self.connection.write(out)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        frames = self.socket.frames
        if frames is not None:
            frames.close(1000, "")
        self.connection.loseConnection()

    def abortConnection(self) -> None:
        self.connection.abortConnection()

    def shape(self, clock: Any, rate: int | None, budget: int | None) -> None:
        # A rule's throttle or byte budget paces the frames on the connection.
        shape = getattr(self.connection, "shape", None)
        if shape is not None:
            shape(clock, rate, budget)

    def getPeer(self) -> Any:
        return self.connection.getPeer()

    def getHost(self) -> Any:
        return self.connection.getHost()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.connection.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.connection.unregisterProducer()

    def pauseProducing(self) -> None:
        self.connection.pauseProducing()

    def resumeProducing(self) -> None:
        self.connection.resumeProducing()

    def stopProducing(self) -> None:
        self.connection.stopProducing()
