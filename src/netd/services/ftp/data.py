"""
Data connections of the ftp kind: passive ports of netd's own, channels that
accept only the control connection's client (and connect back only to it), TLS
on them (PROT P, which Twisted lacks).  Files are sent on them by
L{netd.sendfile}.
"""

from __future__ import annotations

import fcntl
import math
import secrets
import socket
import struct
import termios
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from typing import Protocol as TypingProtocol

from OpenSSL import SSL
from twisted.internet import error as net_error
from twisted.internet import tcp
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import (
    IHalfCloseableDescriptor,
    IHalfCloseableProtocol,
    IHandshakeListener,
    IOpenSSLServerConnectionCreator,
    IReadDescriptor,
)
from twisted.internet.protocol import (
    ClientFactory,
    Factory,
    Protocol,
    ServerFactory,
    connectionDone,
)
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import alsoProvides, implementer

from netd.acts import Shaper
from netd.compat import buffered_bytes, read_with
from netd.connections import read_into
from netd.schema import client_address
from netd.services.ftp.files import Upload

if TYPE_CHECKING:
    from netd.services.ftp.session import Session

__all__ = [
    "READ_CHUNK",
    "DataChannel",
    "DataConnection",
    "KernelPorts",
    "LineEnds",
    "ListenPassive",
    "NoPassivePort",
    "PassivePort",
    "ReadInto",
    "plain_host",
]

# Socket reads of an upload: fewer, larger ones, each a trip through the reactor.
READ_CHUNK = 256 << 10
# A throttled upload reads about this many seconds' worth of bytes at a time.
_PACED_READ = 0.05


class NoPassivePort(Exception):
    """Every port of C{passive_ports} is taken."""


def plain_host(host: str) -> str:
    """C{host} with an IPv4-mapped IPv6 address written as IPv4, for comparisons."""
    address = client_address(host)
    return host if address is None else str(address)


ListenPassive = Callable[[int, "_DataFactory", str], Any]


class KernelPorts:
    """
    Ports for passive listeners when the map names none: picked at random from
    the range the kernel picks its own from (C{ip_local_port_range}), less the
    ports kept for services (C{ip_local_reserved_ports}), and bound by number.

    Binding port 0 has the kernel find a port with no socket on it at all, and
    the server's side of every data connection it closes first (each listing,
    each download) stays in TIME_WAIT for a minute on its port: at a thousand
    sessions a second every port of the range holds one, and each PASV scanned
    the whole range (three quarters of the daemon's CPU, then 425 once the scan
    finds nothing).  A port named with C{SO_REUSEADDR} is taken over a
    TIME_WAIT; one with a live socket refuses, and the next is tried.
    """

    tries = 8

    def __init__(self, low: int, high: int, reserved: frozenset[int] = frozenset()) -> None:
        self.low, self.high, self.reserved = low, high, reserved

    @classmethod
    def of_this_system(cls, proc: Path = Path("/proc/sys/net/ipv4")) -> KernelPorts:
        try:
            low, high = map(int, (proc / "ip_local_port_range").read_text().split())
            kept = (proc / "ip_local_reserved_ports").read_text().strip()
        except (OSError, ValueError):
            return cls(32768, 60999)  # Linux's defaults
        reserved: set[int] = set()
        for part in filter(None, kept.split(",")):
            first, _, last = part.partition("-")
            reserved.update(range(int(first), int(last or first) + 1))
        return cls(low, high, frozenset(reserved))

    def candidates(self) -> Iterator[int]:
        """A few random ports of the range, then 0 (the kernel's choice)."""
        span = self.high - self.low + 1
        for _ in range(self.tries):
            port = self.low + secrets.randbelow(span)
            if port not in self.reserved:
                yield port
        yield 0


@implementer(IReadDescriptor)
class PassivePort:
    """
    The listening socket of one passive data connection, our own rather than
    Twisted's C{listenTCP}, which logs two lines for every transfer.  A port
    named (from C{passive_ports}, or one of L{KernelPorts}) is bound with
    C{SO_REUSEADDR}, so one that earlier data connections left in TIME_WAIT
    is taken again; port 0, the kernel's choice, without it (with it Linux looks
    for a port nothing has ever used).  Accepted connections are handed to the
    reactor as they are.
    """

    def __init__(self, reactor: Any, port: int, factory: Any, interface: str) -> None:
        self.reactor = reactor
        self.factory = factory
        self.family = socket.AF_INET6 if ":" in interface else socket.AF_INET
        listening = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            if port:
                listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listening.bind((interface, port))
            listening.listen(1)
            listening.setblocking(False)
        except OSError as e:
            listening.close()
            raise net_error.CannotListenError(interface, port, e) from None
        self.socket: socket.socket | None = listening
        host, number = listening.getsockname()[:2]
        kind = IPv6Address if self.family == socket.AF_INET6 else IPv4Address
        self.host = kind("TCP", host, number)
        reactor.addReader(self)

    def getHost(self) -> IPv4Address | IPv6Address:
        return self.host

    def fileno(self) -> int:
        return self.socket.fileno() if self.socket is not None else -1

    def logPrefix(self) -> str:
        return "ftp-passive"

    def doRead(self) -> None:
        assert self.socket is not None
        try:
            connection, _ = self.socket.accept()
        except BlockingIOError:
            return
        except OSError:
            # Out of descriptors, say: the client gets 425 rather than a busy loop.
            self.stopListening()
            return
        with connection:
            connection.setblocking(False)
            self.reactor.adoptStreamConnection(connection.fileno(), self.family, self.factory)

    def doWrite(self) -> None:
        """
        Nothing to write: a stale event.  A connection registered for writing
        that closed earlier in the same turn of the reactor frees its
        descriptor; a PASV answered in that turn may take the number, and the
        write event already polled for it then reaches this port (the fuzz of
        `make stress` hit it: the port was dropped, its client got 425).
        """

    def connectionLost(self, reason: Failure) -> None:
        self.stopListening()

    def stopListening(self) -> None:
        if self.socket is not None:
            self.reactor.removeReader(self)
            self.socket.close()
            self.socket = None


@implementer(IHandshakeListener)
class DataConnection(Protocol):
    """One data connection: what it receives goes to a sink once a command takes it."""

    transport: Any

    def __init__(self, channel: DataChannel) -> None:
        self.channel = channel
        self.sink: Callable[[bytes], None] | None = None
        self._early: list[bytes] = []
        self.closed: Deferred[bool] = Deferred()
        self._shaped: _Shaped | None = None
        self._meter: _ReadMeter | None = None
        # Why reading is paused: the upload's writer, a throttle, early bytes.
        self._holds: set[str] = set()
        self._cut = False
        # A clean end waiting for the upload's bytes to be due at its rate.
        self._finishing: Any = None

    def shape(self, clock: Any, rate: int | None, budget: int | None) -> None:
        """
        A rule's throttle (C{rate} bytes/s) or byte budget, or both: on a
        download's connection they pace what it sends and close it (FIN) after
        C{budget} bytes; on an upload's they pace what it reads and cut it
        after C{budget} bytes received.
        """
        if not self.channel.upload_expected:
            self.transport = self._shaped = _Shaped(self.transport, clock, rate, budget)
            return
        meter = self._meter = _ReadMeter(self, clock, rate, budget)
        if budget == 0:
            self.cut()
            return
        socket = _socket_of(self.transport)
        if socket is not None:
            # A step at the rate, under TLS too (a read of Twisted's size: 64 KiB at once).
            socket.bufferSize = meter.read_size(READ_CHUNK)
        # What the client sent before its command is the upload's first bytes.
        early, self._early = self._early, []
        for data in early:
            self.dataReceived(data)

    def hold(self, why: str, held: bool) -> None:
        """Pause reading while any reason C{why} holds it; resume once none does."""
        if held:
            if not self._holds:
                self.transport.pauseProducing()
            self._holds.add(why)
        elif why in self._holds:
            self._holds.discard(why)
            if not self._holds:
                self.transport.resumeProducing()

    def paced_for(self) -> float:
        """
        How long a rule's throttle still holds this connection's bytes back
        (reading or sending them at its rate); less than 0: it let them go
        that long ago.
        """
        if self._meter is not None:
            return self._meter.ahead()
        if self._shaped is not None:
            return self._shaped.paced_for()
        return -math.inf

    def sent_not_taken(self) -> int | None:
        """
        Bytes in the kernel's send queue of this connection's socket that the
        client has not taken yet; None where it cannot be asked.  A download
        to a client that reads slowly hands netd's bytes to the kernel in
        bursts far apart (a loopback send buffer holds megabytes): the queue
        going down between them is the client's progress.
        """
        return _not_taken(_socket_of(self.transport))

    def cut(self) -> None:
        """End the connection now, and the transfer on it as not complete."""
        self._cut = True
        self.transport.abortConnection()
        if self._finishing is not None and self._finishing.active():
            self._finishing.cancel()
            self.closed.callback(False)

    def finish(self) -> Deferred[bool]:
        """
        All of a download or a listing is written: end the connection; whether
        it ended cleanly (L{closed}).  A plain TCP one is half-closed (netd's
        FIN after the last byte) and closed once that is in the kernel, as it
        always was; but when its session is closing then (a stop), it is left
        open for the client to close: L{closed} fires at the FIN (the 226, as
        ever), and the client's close, which every client makes once it has
        read to the end, tells the session its 421 can no longer cut a file
        still in the socket buffers.  TLS has its own: netd's close_notify,
        then the client's close is L{closed} (see L{_DataTLS}).
        """
        if not _can_half_close(self._unshaped()):
            self.transport.loseConnection()
            return self.closed
        # Only from now on: a client's FIN before the end still ends a transfer at once.
        alsoProvides(self, IHalfCloseableProtocol)
        self.transport.loseWriteConnection()
        return self.closed

    def writeConnectionLost(self) -> None:
        # The last byte and netd's FIN are in the kernel.
        if self.channel.session.closing:
            self.closed.callback(True)
        else:
            self._unshaped().loseConnection()

    def readConnectionLost(self) -> None:
        # The client's FIN: after netd's, it has read it all.
        self._unshaped().loseConnection()

    def _unshaped(self) -> Any:
        """
        The transport under a rule's shaping: TLS's own (whose records the
        shaping must not take for cleartext), or a socket's close that need
        not wait for the shaping's queue.
        """
        return self._shaped.transport if self._shaped is not None else self.transport

    def connectionMade(self) -> None:
        self.channel.connected(self)

    def handshakeCompleted(self) -> None:
        """
        TLS is up.  The TLS 1.3 session tickets OpenSSL writes now are held
        back until netd next writes (a download's first bytes, an upload's
        close_notify): a client that only sends (lftp) reads one record and
        closes with the rest unread, and its kernel's reset then throws away
        the file's end, still in its send buffer (ProFTPD #959; pyOpenSSL has
        no SSL_CTX_set_num_tickets to send none).  On every data connection,
        since a client may finish the handshake before its STOR reaches netd.
        """
        _hold_pending_records(self._unshaped())

    def dataReceived(self, data: bytes) -> None:
        meter = self._meter
        if meter is not None:
            data = meter.kept(data)
            if not data:
                return
        if self.sink is not None:
            self.sink(data)
        else:
            # An upload may start before STOR is through; keep a little, then wait.
            self._early.append(data)
            if sum(map(len, self._early)) > Upload.high_water:
                self.hold("early", True)
        if meter is not None:
            meter.count(len(data))

    def take(self, sink: Callable[[bytes], None], into: ReadInto | None = None) -> None:
        """
        What was received and what comes goes to C{sink}; or, given C{into} and
        a plain TCP transport, what comes is read from the socket straight
        into the buffer C{into} offers (see L{ReadInto}).
        """
        self.sink = sink
        early, self._early = self._early, []
        for data in early:
            sink(data)
        # A connection that has ended already (a short upload read whole before
        # the command got here) has no socket left to read.
        transport = self.transport
        meter = self._meter
        if meter is None and isinstance(transport, tcp.Connection):
            # Fewer, larger reads: each one is a trip through the reactor.
            transport.bufferSize = READ_CHUNK
        if into is not None and isinstance(transport, tcp.Connection) and transport.connected:
            if meter is not None:
                into = _MeteredInto(into, meter)
            read_with(transport, _reader(transport, into))
        self.hold("early", False)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._shaped is not None:
            self._shaped.lost()
        if self._meter is not None:
            self._meter.stop()
        self.channel.lost(self)
        if self.closed.called:
            return  # half-closed at a stop, and answered at netd's FIN
        # Whether the connection ended cleanly: a FIN, not a reset or an abort;
        # on TLS the peer's close_notify (all was sent), whatever TCP did after,
        # or the peer's FIN once netd's own close_notify had left (see _DataTLS);
        # never one netd cut (the close_notify may have been read past the cut).
        tls = self._unshaped()
        clean = not self._cut and (
            reason.check(net_error.ConnectionDone) is not None
            or _tls_closed(tls)
            or (
                isinstance(tls, _DataTLS)
                and tls.delivered
                and reason.check(net_error.ConnectionLost) is not None
            )
        )
        meter = self._meter
        if clean and meter is not None and meter.ahead() > 0:
            # The last read brought more than the rate allows yet (a TLS record,
            # what came before the command): the upload ends when it is due.
            self._finishing = meter.clock.callLater(meter.ahead(), self.closed.callback, True)
        else:
            self.closed.callback(clean)


def _can_half_close(transport: Any) -> bool:
    """
    Whether C{transport} is a TCP connection netd can half-close.  Not TLS,
    which has no half-close of Twisted's: it passes attribute lookups on to
    the socket below, its C{loseWriteConnection} (which would end the stream
    without a close_notify) and the socket's interfaces too.
    """
    return not isinstance(transport, TLSMemoryBIOProtocol) and bool(
        IHalfCloseableDescriptor.providedBy(transport)
    )


def _socket_of(transport: Any) -> tcp.Connection | None:
    """The TCP connection under a data connection's C{transport}, TLS or not."""
    if isinstance(transport, TLSMemoryBIOProtocol):
        transport = transport.transport
        if isinstance(transport, _AfterHeld):
            transport = transport.under
    return transport if isinstance(transport, tcp.Connection) else None


@implementer(IHalfCloseableProtocol)
class _DataTLS(TLSMemoryBIOProtocol):
    """
    TLS on a data connection, noting whether its TCP connection ended with the
    client's FIN after the client had taken all netd sent, its close_notify
    included: the end of a download or a listing, as a FIN after netd's own
    close is on a plain connection.  A client need not answer a close_notify
    before it closes (RFC 8446 6.1), and wget never does: Twisted reports that
    FIN as a lost connection, and every download and listing wget made over
    PROT P was answered 426.  Only netd's own close sends a close_notify, so an
    upload's end still needs the client's.
    """

    delivered = False

    def readConnectionLost(self) -> None:
        # The client's FIN, read while the socket is still open to ask what its
        # kernel queue holds: Twisted's buffer may be empty with the file's end
        # and the close_notify still there, unread by a client that gave up.
        handle = self.getHandle()
        under: Any = (
            self.transport.under if isinstance(self.transport, _AfterHeld) else self.transport
        )
        self.delivered = (
            isinstance(handle, SSL.Connection)
            and bool(handle.get_shutdown() & SSL.SENT_SHUTDOWN)
            and buffered_bytes(under) == 0
            and _not_taken(_socket_of(self)) in (0, None)
        )
        # What Twisted does with the FIN for a protocol without a half-close.
        under.connectionLost(connectionDone)

    def writeConnectionLost(self) -> None:
        """Not called: netd never half-closes a TLS socket (see L{_can_half_close})."""


def _not_taken(connection: tcp.Connection | None) -> int | None:
    """
    Bytes in the kernel's send queue of C{connection} that its peer has not
    acknowledged yet (Linux's SIOCOUTQ); None where it cannot be asked.
    """
    if connection is None:
        return None
    try:
        answer = fcntl.ioctl(connection.fileno(), termios.TIOCOUTQ, b"\0" * 4)
    except (OSError, ValueError):
        return None
    queued: int = struct.unpack("i", answer)[0]
    return queued


def _tls_closed(transport: Any) -> bool:
    """Whether C{transport} is TLS and its peer ended it with a close_notify alert."""
    if not isinstance(transport, TLSMemoryBIOProtocol):
        return False  # (a TCP transport's handle is gone once it is lost)
    handle = transport.getHandle()
    return isinstance(handle, SSL.Connection) and bool(
        handle.get_shutdown() & SSL.RECEIVED_SHUTDOWN
    )


def _hold_pending_records(tls: Any) -> None:
    """
    Take the records C{tls} (a TLSMemoryBIOProtocol) has made but not sent, and
    send them just before the next bytes it writes, so the peer reads them in
    order (each record's sequence number is in its encryption).
    """
    handle = tls.getHandle()
    held = bytearray()
    while True:
        try:
            held += handle.bio_read(65536)
        except SSL.WantReadError:
            break
    if held:
        tls.transport = _AfterHeld(tls.transport, bytes(held))


class _AfterHeld:
    """A transport that writes C{held} before the first bytes written to it."""

    def __init__(self, transport: Any, held: bytes) -> None:
        self.under = transport
        self._held: bytes | None = held

    def write(self, data: bytes) -> None:
        held, self._held = self._held, None
        self.under.write(data if held is None else held + data)

    def writeSequence(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.under, name)


class _Shaped:
    """
    A data connection's transport as a rule's throttle or byte budget leaves
    it: what is sent passes through a L{Shaper}, the rest is the transport's.
    """

    def __init__(self, transport: Any, clock: Any, rate: int | None, budget: int | None) -> None:
        self.transport = transport
        self._half_close = False
        self.shaper = shaper = Shaper(
            clock,
            transport,
            send=transport.write,
            lose=self._let_go,
            # A download's reading goes on whatever the throttle holds: TLS's
            # handshake comes on it, and a full queue drains only after that.
            pause=lambda: None,
            resume=lambda: None,
            done=lambda: None,  # shaped until the transfer ends
        )
        self.write = shaper.write
        self.writeSequence = shaper.write_sequence
        self.loseConnection = shaper.lose_connection
        self.registerProducer = shaper.register_producer
        self.unregisterProducer = shaper.unregister_producer
        shaper.set(rate, budget)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)

    def loseWriteConnection(self) -> None:
        """Half-close once what the throttle holds is sent."""
        self._half_close = True
        self.shaper.lose_connection()

    def _let_go(self) -> None:
        if self._half_close:
            self.transport.loseWriteConnection()
        else:
            self.transport.loseConnection()

    def paced_for(self) -> float:
        """
        How long what the throttle holds takes to be sent at its rate.  With
        nothing held there is no pause to allow for: the throttle asks the
        producer for more at once, whatever the client does; nor while the
        client is not reading what was sent (the transport paused the
        throttle): the wait is the client's since then.
        """
        shaper = self.shaper
        if shaper.blocked_since is not None:
            now: float = shaper.clock.seconds()
            return shaper.blocked_since - now
        if shaper.rate is None or not shaper.queue:
            return -math.inf
        return len(shaper.queue) / shaper.rate

    def lost(self) -> None:
        """The connection is gone (its budget spent, say): what still sends stops."""
        producer = self.shaper.producer
        self.shaper.stop()
        if producer is not None:
            producer.stopProducing()


class _ReadMeter:
    """
    An upload's reading as a rule's throttle or byte budget leaves it (as
    Toxiproxy's bandwidth and limit_data upstream): reading pauses while what
    was read is ahead of C{rate} bytes/s, so the client's TCP window closes
    (back-pressure: nothing waits in netd), and the connection is cut once
    C{budget} bytes came.
    """

    def __init__(
        self, connection: DataConnection, clock: Any, rate: int | None, budget: int | None
    ) -> None:
        self.connection = connection
        self.clock = clock
        self.rate = rate
        self.budget = budget
        # When the bytes read so far are due at the rate; no credit for idle time.
        self._due = 0.0
        self._timer: Any = None

    def read_size(self, room: int) -> int:
        """How much of C{room} the next socket read may fill: a step at the rate, the budget."""
        if self.rate is not None:
            room = min(room, max(1, int(self.rate * _PACED_READ)))
        return room if self.budget is None else min(room, self.budget)

    def kept(self, data: bytes) -> bytes:
        """What of C{data}, read already, is the upload's: nothing past the budget."""
        return data if self.budget is None else data[: self.budget]

    def count(self, size: int) -> None:
        """C{size} bytes were read: wait while ahead of the rate; cut once the budget is spent."""
        if self.budget is not None:
            self.budget -= size
            if self.budget <= 0:
                self.connection.cut()
                return
        if self.rate is not None:
            now = self.clock.seconds()
            self._due = max(self._due, now) + size / self.rate
            if self._timer is None:
                self.connection.hold("rate", True)
                self._timer = self.clock.callLater(self._due - now, self._go_on)

    def ahead(self) -> float:
        """How long until the bytes read so far are due at the rate (0 or less: they are)."""
        return float(self._due - self.clock.seconds())

    def _go_on(self) -> None:
        self._timer = None
        ahead = self._due - self.clock.seconds()
        if ahead > 0:
            # Read while paused: the rest of a TLS read already taken from the socket.
            self._timer = self.clock.callLater(ahead, self._go_on)
        else:
            self.connection.hold("rate", False)

    def stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


class _MeteredInto:
    """An upload's L{ReadInto} with each read sized and counted by a L{_ReadMeter}."""

    def __init__(self, into: ReadInto, meter: _ReadMeter) -> None:
        self._into = into
        self._meter = meter

    def space(self) -> memoryview:
        space = self._into.space()
        return space[: self._meter.read_size(len(space))]

    def filled(self, count: int) -> None:
        self._into.filled(count)
        self._meter.count(count)


class ReadInto(TypingProtocol):
    """Where an upload takes its bytes when the socket is read into its buffer."""

    def space(self) -> memoryview:
        """Where the next bytes go (never empty)."""

    def filled(self, count: int) -> None:
        """C{count} bytes were put at the start of the last L{space}."""


def _reader(connection: tcp.Connection, into: ReadInto) -> Callable[[], object]:
    """
    The data connection's C{doRead}: Twisted's, reading into C{into}'s buffer
    rather than a new bytes object for the protocol.
    """

    def read() -> object:
        size = read_into(connection, into.space())
        if not isinstance(size, int):
            return size
        into.filled(size)
        return None

    return read


class _DataFactory(ClientFactory, ServerFactory):
    noisy = False

    def __init__(self, channel: DataChannel) -> None:
        self.channel = channel

    def buildProtocol(self, addr: Any) -> Protocol | None:
        return self.channel.accept(addr)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.channel.failed(reason)


class _Prebuilt(Factory):
    """Hands a protocol already built (and checked) to the TLS wrapper."""

    def __init__(self, protocol: Protocol) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        return self.protocol_instance


class DataChannel:
    """
    The one data connection a session may have at a time: passive (we listen)
    or active (we connect back to the client).  Transfer commands wait on
    L{ready} for at most C{data_timeout}.
    """

    def __init__(
        self,
        session: Session,
        client_host: str,
        tls: IOpenSSLServerConnectionCreator | None,
    ) -> None:
        self.session = session
        self.client_host = plain_host(client_host)
        self.tls = tls
        self.connection: DataConnection | None = None
        self.port: Any = None
        self.passive = False
        self.connector: Any = None
        self._waiting: list[Deferred[DataConnection]] = []
        self._failure: Failure | None = None
        self._accepted = False
        self._closed = False
        # The command waiting for this channel is an upload: a rule's throttle
        # or byte budget shapes what it reads, not what it sends.
        self.upload_expected = False
        server = session.server
        self.timer = server.reactor.callLater(server.limits.data_timeout, self._timed_out)

    def listen(self, interface: str) -> int:
        server = self.session.server
        factory = _DataFactory(self)
        self.passive = True
        for port in server.passive_candidates():
            try:
                self.port = server.listen_passive(port, factory, interface)
            except net_error.CannotListenError:
                continue
            return int(self.port.getHost().port)
        raise NoPassivePort()

    def connect(self, host: str, port: int) -> None:
        self.connector = self.session.server.reactor.connectTCP(
            host, port, _DataFactory(self), timeout=self.session.server.limits.data_timeout
        )

    def accept(self, addr: Any) -> Protocol | None:
        if self._accepted or self._closed:
            return None
        if self.passive and plain_host(addr.host) != self.client_host:
            # Someone else raced the client to its passive port (data theft).
            self.session.server.stats.count("data_refused")
            self.session.server.emit(
                "ftp.data_refused", client=self.session.client, source=addr.host
            )
            return None
        self._accepted = True
        connection = DataConnection(self)
        self._stop_listening()
        if self.tls is None:
            return connection
        # RFC 4217: the server is the TLS server on every data connection.
        tls = TLSMemoryBIOFactory(self.tls, False, _Prebuilt(connection))
        tls.protocol = _DataTLS
        wrapped: Protocol = tls.buildProtocol(addr)
        return wrapped

    def _stop_listening(self) -> None:
        # Once: a second stopListening would close the port (and log it) twice.
        port, self.port = self.port, None
        if port is not None:
            port.stopListening()

    def connected(self, connection: DataConnection) -> None:
        if self.timer.active():
            self.timer.cancel()
        self.connection = connection
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            waiter.callback(connection)

    def failed(self, reason: Failure) -> None:
        self._fail(reason)

    def lost(self, connection: DataConnection) -> None:
        if self.connection is connection:
            self.session.data_closed(self)

    def _timed_out(self) -> None:
        self._fail(Failure(net_error.TimeoutError("no data connection")))

    def _fail(self, reason: Failure) -> None:
        if self._failure is not None or self.connection is not None:
            return
        self._failure = reason
        self._stop_listening()
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            waiter.errback(reason)

    def ready(self) -> Deferred[DataConnection]:
        if self.connection is not None:
            return succeed(self.connection)
        if self._failure is not None:
            return fail(self._failure)
        waiter: Deferred[DataConnection] = Deferred()
        self._waiting.append(waiter)
        return waiter

    def close(self) -> None:
        self._closed = True
        if self.timer.active():
            self.timer.cancel()
        self._stop_listening()
        if self.connection is not None and self.connection.transport is not None:
            self.connection.transport.abortConnection()
        elif self.connector is not None:
            self.connector.disconnect()
        self._fail(Failure(net_error.ConnectionDone("data channel closed")))


class LineEnds:
    """TYPE A uploads: CRLF to LF, with a CR that ends one read kept for the next."""

    def __init__(self) -> None:
        self._carry = b""

    def to_local(self, data: bytes) -> bytes:
        data, self._carry = self._carry + data, b""
        if data.endswith(b"\r"):
            data, self._carry = data[:-1], b"\r"
        return data.replace(b"\r\n", b"\n")

    def rest(self) -> bytes:
        rest, self._carry = self._carry, b""
        return rest
