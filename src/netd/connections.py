"""
Connection accounting shared by every stream listener of a service.

Each accepted connection is wrapped once, at the plaintext level (inside TLS), to
count bytes, enforce C{max_connections} and C{max_connections_per_client} and
close idle connections.  The idle check costs nothing per byte: a sweep every
quarter of C{idle_timeout} closes connections whose byte counters did not move
since the sweep before.  Writes to an idle socket leave at once rather than on the
reactor's next turn (L{TrackedConnection.write}).

Rules that act on connections (L{netd.rules}: no match, or only C{client}) are
applied here as each connection opens: a reset, a stall, a delayed greeting, a
throttle or a cut after N bytes (L{netd.acts}).  A service without such rules
pays one empty-tuple test per connection.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import socket
from collections.abc import Iterable, Iterator
from ipaddress import IPv4Address, IPv6Network
from typing import TYPE_CHECKING, Any, ClassVar

import attrs
from twisted.internet import main, tcp
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    IProtocol,
    IProtocolFactory,
    IProtocolNegotiationFactory,
)
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from netd.compat import buffered_bytes, may_send_now, own_attribute
from netd.events import Journal, ServiceStats
from netd.kinds import IOwesReplies
from netd.records import Record
from netd.rules import Fired, RuleSet
from netd.schema import client_address

if TYPE_CHECKING:
    from netd.acts import Shaper

__all__ = [
    "UNREAD_LIMIT",
    "ConnectionSet",
    "TrackedConnection",
    "TrackingFactory",
    "client_key",
    "cut_if_unread",
    "describe_address",
    "unsent_bytes",
]

_ids = itertools.count(1)
_provides_by_transport: dict[type, Any] = {}
_log = Logger()
# A site gets at least a /64 and each of its hosts picks addresses in it at will
# (privacy addresses change daily): one client, one /64.
_IPV6_CLIENT_PREFIX = 64


def describe_address(address: IAddress | None) -> str:
    host = getattr(address, "host", None)
    if host is not None:
        port = getattr(address, "port", None)
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    name = getattr(address, "name", None)
    return f"unix:{name.decode() if isinstance(name, bytes) else name or ''}"


def client_key(address: IAddress | None) -> IPv4Address | IPv6Network | None:
    """
    What a connection counts against for C{max_connections_per_client}: its
    IPv4 address (also when a dual-stack listener sees it as C{::ffff:a.b.c.d}),
    or the /64 of its IPv6 address; L{None} for a UNIX socket, which is not limited.
    """
    ip = client_address(address)
    if ip is None or isinstance(ip, IPv4Address):
        return ip
    return IPv6Network((ip, _IPV6_CLIENT_PREFIX), strict=False)


# Replies a client may leave unread before a request/reply protocol (ftp, smtp, DoH,
# the admin API) cuts it: one that keeps answering a client that keeps sending and
# never reads would otherwise buffer without bound.
UNREAD_LIMIT = 1 << 20


def cut_if_unread(transport: Any) -> bool:
    """
    Abort C{transport} if more than L{UNREAD_LIMIT} bytes written to it wait
    unsent; returns whether it did.  A protocol whose answers are small asks
    after a read's requests were answered (a client that sent its last ones
    and reads nothing sends no next read to ask at); one that may write a
    large answer at once asks before reading more requests.
    """
    if unsent_bytes(transport) > UNREAD_LIMIT:
        transport.abortConnection()
        return True
    return False


def unsent_bytes(transport: Any) -> int:
    """
    Bytes written to a connection that the kernel has not taken yet: replies a
    client is not reading.  A command protocol that keeps answering a client
    that keeps sending and never reads would otherwise buffer without bound.

    Looks down through netd's wrapper and TLS to Twisted's FileDescriptor
    buffers (and TLS's own, before its handshake), reading each layer's own
    attributes only: a ProtocolWrapper answers any other name for its transport.
    """
    total = 0
    for _ in range(4):  # wrapper, TLS, what TLS sends through, socket: never deeper
        if transport is None:
            break
        total += buffered_bytes(transport)
        held = own_attribute(transport, "held", None)
        if held:
            total += sum(map(len, held))
        transport = own_attribute(transport, "transport", None)
    return total


_TRY_AGAIN = (errno.EAGAIN, errno.EWOULDBLOCK)


def read_into(connection: tcp.Connection, buffer: memoryview) -> int | BaseException | None:
    """
    One read of C{connection}'s socket into C{buffer}, for a kind that takes
    over Twisted's C{doRead} to pass bytes on without making a bytes object for
    each read (Twisted's reads allocate 64 KiB each): how many bytes came, or
    what C{doRead} returns when none did (None: nothing yet; C{CONNECTION_DONE}
    at the end; C{CONNECTION_LOST} on an error).
    """
    try:
        size = connection.socket.recv_into(buffer)
    except OSError as e:
        return None if e.errno in _TRY_AGAIN else main.CONNECTION_LOST
    return size if size else main.CONNECTION_DONE


def socket_under(transport: Any) -> tcp.Connection | None:
    """
    The TCP (or UNIX) socket right under C{transport}, for a kind that reads or
    writes it past Python's copies (sendfile, a relay, echo), or None under TLS
    or anything but netd's wrapper.  The wrapper's writes held for the end of
    the turn (L{ConnectionSet.hold}) are sent first: nothing may overtake them.
    """
    if isinstance(transport, TrackedConnection):
        transport.send_held()
        transport = own_attribute(transport, "transport", None)
    if isinstance(transport, tcp.Connection) and not transport.TLS:
        return transport
    return None


def plain_socket(consumer: Any) -> tcp.Connection | None:
    """
    The socket transport under C{consumer}, if C{sendfile} (or echo's
    direct path) can write to it.

    The core's byte-counting wrapper is looked through (L{socket_under});
    nothing else is, since a TLS wrapper hands out the socket under it as its
    C{transport} too.
    """
    if isinstance(consumer, TrackedConnection) and consumer.shaper is not None:
        return None  # a rule paces or cuts its writes: they must pass through it
    return socket_under(consumer)


def send_now(connection: tcp.Connection, data: bytes | memoryview) -> None:
    """
    Send C{data} on C{connection}'s socket at once when nothing is queued ahead
    (L{may_send_now}); what the socket does not take, or all of it otherwise,
    goes to Twisted's buffer, copied out of a shared read buffer.
    """
    sent = 0
    if may_send_now(connection):
        # A lost connection sends nothing here: the buffered write lets doWrite see it.
        with contextlib.suppress(OSError):
            sent = connection.socket.send(data)
    if sent < len(data):
        connection.write(bytes(data[sent:]))


class SendsNow(ProtocolWrapper):
    """
    Under TLS, over a TCP connection: what TLS writes is sent at once when
    nothing is queued ahead (L{send_now}), not on the reactor's next turn.
    Twisted's FileDescriptor.write only buffers, and each of TLS's flushes (one
    a turn) then cost two epoll_ctl calls and a writable event more, as a
    plain write did before L{TrackedConnection.write} sent at once.  It also
    turns Nagle's algorithm off (L{_no_delay}): the wrapper above TLS finds
    TLS, not the socket.
    """

    def makeConnection(self, transport: Any) -> None:
        _no_delay(transport)
        super().makeConnection(transport)

    def write(self, data: bytes) -> None:
        connection: Any = self.transport
        if isinstance(connection, tcp.Connection):
            send_now(connection, data)
        else:
            connection.write(data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))


class SendsNowFactory(WrappingFactory):
    """The factory under a TLS listener's: its connections are L{SendsNow}."""

    protocol = SendsNow
    noisy = False


def _no_delay(transport: Any) -> None:
    """
    Turn Nagle's algorithm off on an accepted TCP connection (under TLS too),
    as asyncio does on every TCP transport: L{TrackedConnection.write} sends
    at once, so a reply written in two pieces (an HTTP head and its body, a
    message and the line that ends it) would otherwise keep the second until
    the client's delayed ACK, 40 ms later.
    """
    get_handle = getattr(transport, "getHandle", None)
    handle = get_handle() if get_handle is not None else None
    if isinstance(handle, socket.socket) and handle.family in (socket.AF_INET, socket.AF_INET6):
        # A connection the client already reset may refuse it: nothing then to hurry.
        with contextlib.suppress(OSError):
            handle.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@implementer(IHalfCloseableProtocol)
class TrackedConnection(ProtocolWrapper):
    """
    One accepted connection, as every kind's protocol sees its transport.

    It also makes every kind half-close aware: Twisted closes a connection whose
    protocol is not L{IHalfCloseableProtocol} the moment the client's FIN
    arrives, dropping the replies still buffered or still to come.  Here the
    client's FIN means "that was all": what it sent is answered (L{IOwesReplies}
    says when), written out, and then the connection closes.
    """

    factory: TrackingFactory
    transport: Any
    # Twisted asks the protocol for interfaces at close; without these the
    # question falls through __getattr__ to the transport and costs an exception.
    __conform__ = None
    # Class-level defaults, set on a connection only when a rule changes them
    # (nothing per connection without rules).  The shaper: while a rule
    # throttles this connection or cuts it after N bytes.  Started: whether the
    # kind's protocol has been given the connection (a rule may delay that, or
    # keep it from ever happening: stall, reset).
    shaper: Shaper | None = None
    started = True
    closed = False
    # This turn's writes, waiting to leave together at its end (see write);
    # None when none wait.
    held: list[bytes] | None = None
    # The producer registered on the transport through this wrapper, and
    # whether it streams: a shaper takes it over, and hands it back when it goes.
    _registered: tuple[Any, bool] | None = None

    def __init__(self, factory: TrackingFactory, wrapped: IProtocol) -> None:
        super().__init__(factory, wrapped)  # type: ignore[arg-type]
        self.connection_id = next(_ids)
        self.bytes_in = 0
        self.bytes_out = 0
        self.quiet_sweeps = 0
        self.client = ""
        # Set by the factory when the service limits connections per client.
        self.client_key: IPv4Address | IPv6Network | None = None
        self._seen_at_sweep = 0
        self._waiting_for_close: list[Deferred[None]] = []
        # The socket itself when this connection's transport is one (TCP, UNIX;
        # not a TLS listener's): see L{write}.
        self._socket: tcp.Connection | None = None

    def makeConnection(self, transport: Any) -> None:
        # ProtocolWrapper re-declares the transport's interfaces on every
        # wrapper (directlyProvides); the declaration per transport class is cached.
        key = type(transport)
        provides = _provides_by_transport.get(key)
        if provides is None:
            directlyProvides(self, providedBy(transport))
            _provides_by_transport[key] = self.__dict__["__provides__"]
        else:
            self.__dict__["__provides__"] = provides
        self.client = describe_address(transport.getPeer())
        if isinstance(transport, tcp.Connection):  # UNIX's Server is one too
            self._socket = transport
        _no_delay(transport)
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        rules = self.factory.connections.rules
        if rules is not None and rules.connect_rules:
            fired = rules.at_connect(transport.getPeer())
            if fired is not None:
                self._act_at_connect(fired, rules.clock)
                return
        self.wrappedProtocol.makeConnection(self)  # type: ignore[arg-type]

    def _act_at_connect(self, fired: Fired, clock: Any) -> None:
        """A connection rule fired: the kind's protocol starts late, or never."""
        acts = fired.acts
        self.started = False
        if acts.get("stall") or acts.get("close") is True:
            # Never answered: what the client sends is read and dropped, and
            # moves no byte counter, so the idle timeout still ends it.
            self.dataReceived = self._discard  # type: ignore[method-assign]
        elif acts.get("delay"):
            self.transport.pauseProducing()
        fired.act(self, self._start)

    def _discard(self, data: bytes) -> None:
        """Input of a connection whose protocol never starts."""

    def _start(self) -> None:
        self.started = True
        if self.transport is not None and not self.closed:
            self.transport.resumeProducing()
            self.wrappedProtocol.makeConnection(self)  # type: ignore[arg-type]

    def shape(self, clock: Any, rate: int | None, budget: int | None) -> None:
        """
        Pace this connection's writes at C{rate} bytes/s, or close it (FIN)
        after C{budget} more bytes, or both (L{netd.acts}).
        """
        shaper = self.shaper
        if shaper is None:
            # Imported by the first rule that shapes: a map without rules never needs it.
            from netd.acts import Shaper

            # A producer registered before the rule fired moves to the shaper,
            # which paces it, and where the kind's unregistering then finds it.
            registered = self._registered
            if registered is not None:
                self.unregisterProducer()
            shaper = self.shaper = Shaper(
                clock,
                self.transport,
                send=lambda data: TrackedConnection.write(self, data),
                # The close sends the writes held for the turn's end first: the
                # socket, closed before that end, would drop the reply's last bytes.
                lose=lambda: TrackedConnection.loseConnection(self),
                pause=self.transport.pauseProducing,
                resume=self.transport.resumeProducing,
                done=self._unshape,
            )
            # Instance attributes, so an unshaped connection's writes pay nothing.
            self.write = shaper.write  # type: ignore[method-assign]
            self.writeSequence = shaper.write_sequence  # type: ignore[method-assign]
            self.loseConnection = shaper.lose_connection  # type: ignore[method-assign]
            self.registerProducer = shaper.register_producer  # type: ignore[method-assign]
            self.unregisterProducer = shaper.unregister_producer  # type: ignore[method-assign]
            if registered is not None:
                shaper.adopt_producer(*registered)
        shaper.set(rate, budget)

    def _unshape(self) -> None:
        shaper = self.shaper
        for name in (
            "write",
            "writeSequence",
            "loseConnection",
            "registerProducer",
            "unregisterProducer",
        ):
            self.__dict__.pop(name, None)
        self.shaper = None
        if shaper is not None and shaper.producer is not None:
            self.registerProducer(shaper.producer, shaper.streaming)

    def logPrefix(self) -> str:
        return self.factory.connections.service

    def dataReceived(self, data: bytes) -> None:
        self.bytes_in += len(data)
        self.wrappedProtocol.dataReceived(data)

    def write(self, data: bytes) -> None:
        self.bytes_out += len(data)
        # Twisted's FileDescriptor.write only buffers: the bytes leave on the
        # reactor's next turn, after two epoll_ctl calls and a writable event.
        # When nothing is queued ahead (netd.compat.may_send_now says when), send
        # now, as asyncio does, or, for a kind that batches its writes, at the
        # end of this turn (ConnectionSet.hold); the rest of a partial send, and
        # every other case, takes Twisted's own path.  This is most of what a
        # small echo, an HTTP response or one chat delivery costs.
        held = self.held
        if held is not None:
            held.append(data)
            return
        socket = self._socket
        if socket is not None and data and may_send_now(socket):
            if self.factory.connections.batch_writes:
                self.held = [data]
                self.factory.connections.hold(self)
                return
            self._send(socket, data)
            return
        self.transport.write(data)

    def _send(self, socket: tcp.Connection, data: bytes) -> None:
        sent = socket.writeSomeData(data)
        if isinstance(sent, int):
            if sent == len(data):
                return
            data = data[sent:]
        # else the connection is lost: the buffered write lets doWrite see it
        self.transport.write(data)

    def send_held(self) -> None:
        """
        Send the writes this turn held, now: at the turn's end, and before
        anything else reaches the socket (a file sent from the kernel, TLS
        started, a producer, the close), which would otherwise overtake them.
        """
        held = self.held
        if held is None:
            return
        self.held = None
        data = held[0] if len(held) == 1 else b"".join(held)
        socket = self._socket
        if socket is not None and may_send_now(socket):
            self._send(socket, data)
        else:
            self.transport.write(data)

    def loseConnection(self) -> None:
        self.send_held()
        super().loseConnection()

    def loseWriteConnection(self) -> None:
        self.send_held()
        self.transport.loseWriteConnection()

    def abortConnection(self) -> None:
        self.held = None  # an abort drops what is unsent
        self.transport.abortConnection()

    def startTLS(self, contextFactory: Any, *args: Any, **kwargs: Any) -> None:
        if self.shaper is not None:
            self.shaper.flush()
        self.send_held()  # the last plaintext reply before the handshake
        self.transport.startTLS(contextFactory, *args, **kwargs)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.send_held()
        super().registerProducer(producer, streaming)
        self._registered = (producer, streaming)

    def unregisterProducer(self) -> None:
        self.send_held()
        super().unregisterProducer()
        self._registered = None

    def writeSequence(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def readConnectionLost(self) -> None:
        if not self.started:
            self.loseConnection()
            return
        wrapped = self.wrappedProtocol
        half_closeable = IHalfCloseableProtocol(wrapped, None)
        if half_closeable is not None:
            half_closeable.readConnectionLost()
            return
        if getattr(self.transport, "producer", None) is self:
            # The protocol throttled its reading by its writing (echo's
            # back-pressure): with nothing more to read, nothing is left to pause,
            # and a registered producer would hold the close below forever.
            self.unregisterProducer()
        owes = IOwesReplies(wrapped, None)
        replied = owes.when_replied() if owes is not None else succeed(None)
        replied.addCallback(lambda _: self.loseConnection())

    def writeConnectionLost(self) -> None:
        if not self.started:
            return
        half_closeable = IHalfCloseableProtocol(self.wrappedProtocol, None)
        if half_closeable is not None:
            half_closeable.writeConnectionLost()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.closed = True
        self.held = None
        self.factory.connections.forget(self)
        if self.shaper is not None:
            self.shaper.lost()
        if self.started:
            super().connectionLost(reason)
        else:
            self.factory.unregisterProtocol(self)
        waiting, self._waiting_for_close = self._waiting_for_close, []
        for closed in waiting:
            closed.callback(None)

    def when_closed(self) -> Deferred[None]:
        closed: Deferred[None] = Deferred()
        self._waiting_for_close.append(closed)
        return closed

    def was_quiet(self) -> bool:
        """Called by the idle sweep: whether nothing moved since the last sweep."""
        moved = self.bytes_in + self.bytes_out
        if moved != self._seen_at_sweep:
            self._seen_at_sweep = moved
            self.quiet_sweeps = 0
            return False
        self.quiet_sweeps += 1
        return True

    def close_gracefully(self) -> None:
        """Ask the protocol to finish its exchange, or close once pending output is sent."""
        graceful = getattr(self.wrappedProtocol, "close_gracefully", None)
        if graceful is not None and self.started:
            graceful()
        else:
            self.loseConnection()

    def close_idle(self) -> None:
        """
        Called by the idle sweep: the protocol's C{close_idle} if it has one, so
        its goodbye can name the timeout rather than a stop; else as a stop.
        """
        idle = getattr(self.wrappedProtocol, "close_idle", None)
        if idle is not None and self.started:
            idle()
        else:
            self.close_gracefully()


class _Refusal(Protocol):
    transport: Any

    def __init__(self, reply: bytes) -> None:
        self.reply = reply

    def connectionMade(self) -> None:
        if self.reply:
            self.transport.write(self.reply)
        self.transport.loseConnection()


@attrs.define(eq=False, repr=False)
class ConnectionSet(Record):
    """
    The live connections of one service, across all its stream listeners.

    @ivar max_per_client: connections one client may hold at once; 0, no limit.
    @ivar per_client_reply: what refuses a client over it; the busy reply if None.
    @ivar evict_silent: at C{max_connections}, a new connection takes the place
        of the oldest one that has sent nothing yet (cut), rather than being
        refused while such a one waits for its deadline: for a listener whose
        clients always speak first and come back often (the admin API), where
        a few dozen idle connections would otherwise lock out everyone else
        for their whole header deadline.
    @ivar batch_writes: a connection's writes on a plain socket wait for the
        end of the reactor turn and leave with the other connections' (L{hold});
        for a kind that never writes to the socket itself (echo's and the
        proxy's straight paths do).
    """

    _sweeps_per_timeout: ClassVar[int] = 4

    clock: Any
    service: str
    stats: ServiceStats
    journal: Journal
    max_connections: int
    idle_timeout: float
    busy_reply: bytes = b""
    max_per_client: int = 0
    per_client_reply: bytes | None = None
    rules: RuleSet | None = None
    evict_silent: bool = False
    batch_writes: bool = False
    _live: dict[TrackedConnection, None] = attrs.field(init=False, factory=dict)
    _holding: list[TrackedConnection] = attrs.field(init=False, factory=list)
    _per_client: dict[IPv4Address | IPv6Network, int] = attrs.field(init=False, factory=dict)
    _sweep: IDelayedCall | None = attrs.field(init=False, default=None)

    def __iter__(self) -> Iterator[TrackedConnection]:
        return iter(list(self._live))

    def __len__(self) -> int:
        return len(self._live)

    def counted_as(self, addr: IAddress | None) -> IPv4Address | IPv6Network | None:
        """The client a new connection counts against, or L{None} if it is not limited."""
        return client_key(addr) if self.max_per_client else None

    def refusal(
        self, addr: IAddress | None, client: IPv4Address | IPv6Network | None
    ) -> bytes | None:
        """
        The reply that refuses a new connection from C{addr} (counted as
        C{client}), journaled and counted; L{None} if it may come in.
        """
        if len(self._live) >= self.max_connections and not self._evicted_silent():
            self.stats.connections_refused += 1
            reason, reply = "max_connections", self.busy_reply
        elif client is not None and self._per_client.get(client, 0) >= self.max_per_client:
            self.stats.count("per_client_refused")
            reason = "max_connections_per_client"
            reply = self.busy_reply if self.per_client_reply is None else self.per_client_reply
        else:
            return None
        self.journal.emit(
            self.service, "connection.refused", client=describe_address(addr), reason=reason
        )
        return reply

    def _evicted_silent(self) -> bool:
        """Whether the oldest connection that has sent nothing was cut to make room."""
        if not self.evict_silent:
            return False
        # Oldest first: the live connections are kept in the order they came.
        silent = next((c for c in self._live if c.bytes_in == 0), None)
        if silent is None:
            return False
        self.stats.count("silent_evicted")
        self.journal.emit(
            self.service,
            "connection.evicted",
            client=silent.client,
            connection=silent.connection_id,
        )
        # Out of the count now: its close comes in a later turn of the reactor.
        self.forget(silent)
        silent.transport.abortConnection()
        return True

    def hold(self, connection: TrackedConnection) -> None:
        """
        C{connection} holds writes until the end of this reactor turn: the
        responses of every connection the turn served then leave one after the
        other.  A client's process asleep on its socket is woken by the kernel
        at each send (on a VM, an interrupt to another virtual CPU: a fifth of
        an HTTP server's CPU at 13,000 small responses a second); sent
        together, the later ones find it awake.
        """
        if not self._holding:
            self.clock.callLater(0, self._send_held)
        self._holding.append(connection)

    def _send_held(self) -> None:
        holding, self._holding = self._holding, []
        for connection in holding:
            connection.send_held()

    def add(self, connection: TrackedConnection) -> None:
        self._live[connection] = None
        if connection.client_key is not None:
            key = connection.client_key
            self._per_client[key] = self._per_client.get(key, 0) + 1
        self.stats.connections_total += 1
        self.stats.connections_active = len(self._live)
        if self.journal.active:
            self.journal.emit(
                self.service,
                "connection.opened",
                client=connection.client,
                connection=connection.connection_id,
            )
        if self._sweep is None:
            self._schedule_sweep()

    def forget(self, connection: TrackedConnection) -> None:
        if connection not in self._live:
            return
        del self._live[connection]
        if connection.client_key is not None:
            key = connection.client_key
            left = self._per_client[key] - 1
            if left:
                self._per_client[key] = left
            else:
                del self._per_client[key]
        self.stats.connections_active = len(self._live)
        self.stats.bytes_in += connection.bytes_in
        self.stats.bytes_out += connection.bytes_out
        if self.journal.active:
            self.journal.emit(
                self.service,
                "connection.closed",
                client=connection.client,
                connection=connection.connection_id,
                bytes_in=connection.bytes_in,
                bytes_out=connection.bytes_out,
            )

    def bytes_in_flight(self) -> tuple[int, int]:
        """Bytes moved by connections still open, to add to the closed ones' totals."""
        return (
            sum(c.bytes_in for c in self._live),
            sum(c.bytes_out for c in self._live),
        )

    def _schedule_sweep(self) -> None:
        interval = self.idle_timeout / self._sweeps_per_timeout
        self._sweep = self.clock.callLater(interval, self._sweep_idle)

    def _sweep_idle(self) -> None:
        self._sweep = None
        for connection in list(self._live):
            if not connection.was_quiet():
                continue
            if connection.quiet_sweeps == self._sweeps_per_timeout:
                self.journal.emit(
                    self.service, "connection.idle", connection=connection.connection_id
                )
                connection.close_idle()
            elif connection.quiet_sweeps > self._sweeps_per_timeout:
                # Still here a sweep later: its peer is not reading what is pending.
                connection.transport.abortConnection()
        if self._live:
            self._schedule_sweep()

    def stop(self) -> None:
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = None

    def drain(self, grace: float) -> Deferred[None]:
        """Let open exchanges finish for up to C{grace} seconds, then cut what remains."""
        live = list(self._live)
        if not live:
            return succeed(None)
        closed = DeferredList([c.when_closed() for c in live])
        for connection in live:
            connection.close_gracefully()

        def cut() -> None:
            for connection in list(self._live):
                connection.transport.abortConnection()

        timer = self.clock.callLater(grace, cut)

        def done(_: object) -> None:
            if timer.active():
                timer.cancel()

        closed.addCallback(done)
        return closed  # type: ignore[return-value]


class TrackingFactory(WrappingFactory):
    """Wraps one listener's factory; all listeners of a service share one L{ConnectionSet}."""

    protocol = TrackedConnection
    noisy = False

    def __init__(self, wrapped: IProtocolFactory, connections: ConnectionSet) -> None:
        super().__init__(wrapped)
        self.connections = connections
        if IProtocolNegotiationFactory.providedBy(wrapped):
            # TLS offers ALPN (h2, http/1.1) only if the factory it wraps says so.
            directlyProvides(self, IProtocolNegotiationFactory)

    def acceptableProtocols(self) -> list[bytes]:
        protocols: list[bytes] = self.wrappedFactory.acceptableProtocols()
        return protocols

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:  # type: ignore[override]
        client = self.connections.counted_as(addr)
        refusal = self.connections.refusal(addr, client)
        if refusal is not None:
            return _Refusal(refusal)
        protocol = self.wrappedFactory.buildProtocol(addr)
        if protocol is None:
            return None
        connection = TrackedConnection(self, protocol)
        connection.client_key = client
        return connection

    def registerProtocol(self, p: TrackedConnection) -> None:
        self.connections.add(p)

    def unregisterProtocol(self, p: TrackedConnection) -> None:
        """Bookkeeping happens in L{ConnectionSet.forget}."""
