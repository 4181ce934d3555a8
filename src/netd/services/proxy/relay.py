"""
Relaying one stream connection to the upstream, through the proxy's toxics.

Each accepted connection is a L{Relay}: the client's side (L{ClientSide}, behind
the core's connection wrapper), the upstream's side (L{UpstreamSide}) and one
L{Direction} each way.  A direction passes bytes straight through while no toxic
acts and the far side keeps up; otherwise it queues them with the time each may
leave (latency, bandwidth, slicer) or what ends the connection (limit_data,
timeout, reset_peer, slow_close), and one timer sends the head of the queue.

Between two plain sockets (no TLS on either side) a direction also reads for
itself (L{Direction.read_through}): into one buffer the proxy reuses, and sent
from there, so a relayed chunk makes no bytes object on the way.

Back-pressure: a direction is the streaming producer of the transport it writes
to.  When that transport's buffer fills (its reader is slow) it pauses the
direction, which pauses reading from the other side; the same happens when the
queue holds more than L{HIGH_WATER} bytes.  netd never holds more than about
that much per direction, whatever the two peers do.
"""

from __future__ import annotations

import socket
import struct
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from netd.compat import own_attribute, read_with
from netd.connections import TrackedConnection, read_into, send_now, socket_under
from netd.services.proxy.toxics import Toxic, ToxicState

if TYPE_CHECKING:
    from netd.services.proxy.state import Proxy

__all__ = ["HIGH_WATER", "LOW_WATER", "ClientSide", "Direction", "Relay", "UpstreamSide"]

# Bytes a direction queues before it stops reading, and resumes under.
HIGH_WATER = 1 << 20
LOW_WATER = HIGH_WATER // 4
# What ends a direction's queue instead of bytes.
_FIN, _CLOSE, _RESET = "fin", "close", "reset"
# Bandwidth sends a tenth of a second's worth at a time, as Toxiproxy does.
_BANDWIDTH_SLICES_PER_SECOND = 10
# Bytes read from a socket at once (Twisted's default is 64 KiB): fewer, larger
# system calls are most of what a bulk relay saves.  Kept under glibc's 128 KiB
# mmap threshold: Python allocates the whole size for every recv, and a larger
# buffer is mapped and unmapped again for each small read (+15 µs each).
READ_SIZE = (1 << 17) - 4096
# Bytes a direction between two plain sockets reads at once, into the proxy's
# one buffer (L{Direction.read_through}): no allocation, so no such limit.
RELAY_READ_SIZE = 1 << 18


def socket_of(transport: Any) -> tcp.Connection | None:
    """The TCP (or UNIX) socket under netd's wrapper and TLS, if there is one."""
    layer = transport
    for _ in range(4):  # netd's wrapper, TLS, the socket: never deeper
        if isinstance(layer, tcp.Connection):
            return layer
        layer = own_attribute(layer, "transport", None)
    return None


def tune(transport: Any) -> None:
    """
    Ready one side's socket for relaying: larger reads, and no
    Nagle delay (a relayed small message must not wait for the ack of the last).
    """
    connection = socket_of(transport)
    if connection is None:
        return
    connection.bufferSize = READ_SIZE
    if connection.socket.family != socket.AF_UNIX:
        connection.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def bare_socket(transport: Any) -> tcp.Connection | None:
    """C{transport} itself when it is a plain TCP (or UNIX) socket: the upstream's, without TLS."""
    if isinstance(transport, tcp.Connection) and not transport.TLS:
        return transport
    return None


def reset(transport: Any) -> None:
    """Close with a TCP RST (SO_LINGER 0): the peer reads ECONNRESET."""
    connection = socket_of(transport)
    if connection is not None:
        connection.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abortConnection()


def can_half_close(transport: Any) -> bool:
    """
    Whether C{transport} is a TCP or UNIX socket under netd's wrapper alone:
    TLS has no half-close, and its wrapper would pass C{loseWriteConnection}
    on to the socket below, ending the TLS stream without its close_notify.
    """
    layer = transport
    for _ in range(3):
        if isinstance(layer, tcp.Connection):
            return True
        if not isinstance(layer, TrackedConnection):
            return False
        layer = own_attribute(layer, "transport", None)
    return False


def _slices(data: bytes, average: int, variation: int, chance: Any) -> list[bytes]:
    """Toxiproxy's slicer: halve until a piece is within C{variation} of C{average}."""
    if len(data) - average <= variation:
        return [data]
    middle = len(data) // 2
    if variation > 0:
        middle += chance.randrange(-variation, variation)
    middle = min(max(middle, 1), len(data) - 1)
    return _slices(data[:middle], average, variation, chance) + _slices(
        data[middle:], average, variation, chance
    )


@implementer(IPushProducer)
class Direction:
    """
    Bytes one way: from C{source} (read) to C{sink} (written), through the
    toxics of its C{stream} (C{upstream}: client to upstream).
    """

    def __init__(self, relay: Relay, stream: str) -> None:
        self.relay = relay
        self.stream = stream
        self.clock = relay.proxy.clock
        self.source: Any = None
        self.sink: Any = None
        # The sink when it is a bare socket, written with L{send_now}.
        self.bare: tcp.Connection | None = None
        # Both sides as plain sockets, when they are (L{read_through}).
        self._reading: Any = None
        self._writing: Any = None
        self.queue: deque[tuple[float, bytes | str]] = deque()
        self.queued = 0
        self.last_due = 0.0
        self.sink_paused = False
        self.source_paused = False
        # No more input: the source ended, or a toxic closed this direction.
        self.ended = False
        self.finished = False  # its FIN (or the close) went out
        self._timer: IDelayedCall | None = None
        self._bandwidth_free: dict[ToxicState, float] = {}
        self._passed: dict[ToxicState, int] = {}
        self._timeouts: dict[ToxicState, IDelayedCall] = {}

    # The sink's producer: it pauses us when its buffer is full.

    def pauseProducing(self) -> None:
        self.sink_paused = True
        self._hold_source()

    def resumeProducing(self) -> None:
        self.sink_paused = False
        self.pump()

    def stopProducing(self) -> None:
        """The sink is gone: L{Relay} hears of it through the sink's connectionLost."""

    def attach(self, source: Any, sink: Any) -> None:
        self.source, self.sink = source, sink
        self.bare = bare_socket(sink)
        sink.registerProducer(self, True)
        reading, writing = socket_under(source), socket_under(sink)
        if reading is not None and writing is not None:
            self._reading, self._writing = reading, writing
            read_with(reading, self.read_through)
        self.pump()  # anything that came before the far side was there

    def read_through(self) -> Any:
        """
        The source socket is readable (both sides plain sockets): read into
        the proxy's buffer and send from it, with no bytes object made in
        between, while no toxic acts and the sink keeps up; otherwise hand a
        copy to the source's protocol, as Twisted's C{doRead} does.  Returns
        what C{doRead} returns.
        """
        reading, writing = self._reading, self._writing
        view = self.relay.proxy.read_buffer
        size = read_into(reading, view)
        if not isinstance(size, int):
            return size
        chunk = view[:size]
        if (
            self.ended
            or self.queue
            or self.sink_paused
            or self.sink is None
            or self.relay.acting(self.stream)
            or "write" in self.sink.__dict__  # a connection rule shapes the sink's writes
        ):
            reading.protocol.dataReceived(bytes(chunk))
            return None
        if self.source is not reading:
            self.source.bytes_in += size
        if self.sink is not writing:
            self.sink.bytes_out += size
        send_now(writing, chunk)
        return None

    def feed(self, data: bytes) -> None:
        if self.ended:
            return
        toxics = self.relay.acting(self.stream)
        if not toxics and not self.queue and not self.sink_paused and self.sink is not None:
            self.send(data)
            return
        now = self.clock.seconds()
        pieces, tail = self._through(toxics, data, now)
        for due, piece in pieces:
            self._enqueue(due, piece)
        if tail is not None:
            self._enqueue(*tail)
        self.pump()

    def end(self) -> None:
        """The source sent its FIN: pass it on once the queue is out (after slow_close)."""
        if self.ended:
            return
        self.ended = True
        due = self.clock.seconds()
        for state in self.relay.acting(self.stream):
            if state.toxic.type == "slow_close":
                due += state.toxic["delay"] / 1000
        self._enqueue(due, _FIN)
        self.pump()

    def close_after_queue(self) -> None:
        """The source is gone: send what is queued (its FIN too), then close the connection."""
        self.ended = True
        self._enqueue(self.clock.seconds(), _CLOSE)
        self.pump()

    def _through(
        self, toxics: list[ToxicState], data: bytes, now: float
    ) -> tuple[list[tuple[float, bytes]], tuple[float, str] | None]:
        """C{data} as pieces with their times to leave, and what ends the direction."""
        pieces = [(now, data)]
        tail: tuple[float, str] | None = None
        chance = self.relay.proxy.chance
        for state in toxics:
            toxic = state.toxic
            kind = toxic.type
            if kind == "latency":
                jitter = toxic["jitter"]
                delay = toxic["latency"] + (chance.uniform(-jitter, jitter) if jitter else 0)
                pieces = [(due + max(delay, 0) / 1000, piece) for due, piece in pieces]
            elif kind == "bandwidth" and toxic["rate"] > 0:
                rate = toxic["rate"] * 1000
                step = max(int(rate / _BANDWIDTH_SLICES_PER_SECOND), 1)
                free = self._bandwidth_free.get(state, 0.0)
                paced = []
                for due, piece in pieces:
                    for start in range(0, len(piece), step):
                        part = piece[start : start + step]
                        free = max(due, free) + len(part) / rate
                        paced.append((free, part))
                self._bandwidth_free[state] = free
                pieces = paced
            elif kind == "slicer" and toxic["average_size"] >= 1:
                average, variation = int(toxic["average_size"]), int(toxic["size_variation"])
                gap = toxic["delay"] / 1_000_000
                sliced = []
                for due, piece in pieces:
                    for index, part in enumerate(_slices(piece, average, variation, chance)):
                        sliced.append((due + index * gap, part))
                pieces = sliced
            elif kind == "limit_data":
                left = int(toxic["bytes"]) - self._passed.get(state, 0)
                kept = []
                for due, piece in pieces:
                    if left <= 0:
                        break
                    kept.append((due, piece[:left]))
                    left -= len(piece[:left])
                self._passed[state] = int(toxic["bytes"]) - left
                pieces = kept
                if left <= 0:
                    self.ended = True
                    tail = (pieces[-1][0] if pieces else now, _CLOSE)
            elif kind == "timeout":
                pieces = []
                self._start_timeout(state)
            elif kind == "reset_peer":
                pieces = []
                self.ended = True
                tail = (now + toxic["timeout"] / 1000, _RESET)
        return pieces, tail

    def start_toxic(self, state: ToxicState) -> None:
        """A toxic began to act on this direction, or was updated (timeout's clock starts then)."""
        if state.toxic.type == "timeout":
            self._start_timeout(state)

    def stop_toxic(self, state: ToxicState) -> None:
        """A toxic was removed: its timer goes with it."""
        timer = self._timeouts.pop(state, None)
        if timer is not None and timer.active():
            timer.cancel()

    def _start_timeout(self, state: ToxicState) -> None:
        # Toxiproxy's timeout restarts with every chunk it swallows; 0 never closes.
        self.stop_toxic(state)
        delay = state.toxic["timeout"] / 1000
        if delay > 0:
            self._timeouts[state] = self.clock.callLater(delay, self.relay.close)

    def _enqueue(self, due: float, item: bytes | str) -> None:
        # Nothing overtakes what is queued ahead of it.
        due = max(due, self.last_due)
        self.last_due = due
        self.queue.append((due, item))
        if isinstance(item, bytes):
            self.queued += len(item)
        if self.queued > HIGH_WATER:
            self._hold_source()

    def pump(self) -> None:
        """Send every queued item whose time has come, while the sink takes it."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        now = self.clock.seconds()
        # Until the far side is connected (or once it is gone) nothing leaves.
        while self.queue and not self.sink_paused and self.sink is not None:
            due, item = self.queue[0]
            if due > now:
                self._timer = self.clock.callLater(due - now, self.pump)
                break
            self.queue.popleft()
            if isinstance(item, bytes):
                self.queued -= len(item)
                self.send(item)
            else:
                self._finish(item)
                if item != _FIN:
                    return
        if self.source_paused and not self.sink_paused and self.queued <= LOW_WATER:
            self.source_paused = False
            if self.source is not None:
                self.source.resumeProducing()

    def _hold_source(self) -> None:
        if not self.source_paused:
            self.source_paused = True
            if self.source is not None:
                self.source.pauseProducing()

    def _finish(self, item: str) -> None:
        self.finished = True
        if item == _FIN:
            self.relay.fin_sent(self)
        elif item == _RESET:
            self.relay.reset()
        else:
            self.relay.close()

    def send(self, data: bytes) -> None:
        if self.bare is not None:
            send_now(self.bare, data)
        else:
            self.sink.write(data)

    def discard(self) -> None:
        """The sink is gone: nothing queued can be sent."""
        self.sink = None
        self.bare = None
        self.ended = True
        self.queue.clear()
        self.queued = 0
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        for state in list(self._timeouts):
            self.stop_toxic(state)


class Relay:
    """One client connection and its upstream connection."""

    def __init__(self, proxy: Proxy, client: ClientSide) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: UpstreamSide | None = None
        self.up = Direction(self, "upstream")
        self.down = Direction(self, "downstream")
        self.connecting: Deferred[Any] | None = None
        self.closed = False
        self.client_gone = False
        self._decisions: dict[ToxicState, bool] = {}
        # The configuration each acting toxic started with here: an update restarts it.
        self._started: dict[ToxicState, Toxic] = {}
        self._acting: dict[str, list[ToxicState]] = {}
        self._version = -1
        transport = client.transport
        self.connection_id = getattr(transport, "connection_id", 0)
        self.client_name = getattr(transport, "client", "")
        self.peer = transport.getPeer()
        # Decided now, in connection order: what a toxic's nth counts.
        self.acting("upstream")

    def acting(self, stream: str) -> list[ToxicState]:
        """The toxics acting on this connection's C{stream}, each decided once."""
        if self.proxy.toxics.version != self._version:
            self.follow_toxics()
        return self._acting[stream]

    def follow_toxics(self) -> None:
        """
        Take the proxy's toxics as they are now, as Toxiproxy's link does when
        one is added, updated or removed: a new one is decided (and a timeout's
        clock starts), an updated one starts over, a removed one stops.
        """
        toxics = self.proxy.toxics
        self._version = toxics.version
        present = set()
        acting: dict[str, list[ToxicState]] = {"upstream": [], "downstream": []}
        for state in toxics:
            if state.toxic.datagram:
                continue
            present.add(state)
            decided = self._decisions.get(state)
            if decided is None:
                decided = self._decisions[state] = state.decide(self.peer, self.proxy.scenarios)
                if decided:
                    self.proxy.fired(
                        state, self.peer, connection=self.connection_id, peer=self.client_name
                    )
            if decided:
                acting[state.toxic.stream].append(state)
                if self._started.get(state) is not state.toxic:
                    self._started[state] = state.toxic
                    self._direction(state.toxic.stream).start_toxic(state)
        for state in [s for s in self._decisions if s not in present]:
            del self._decisions[state]
            self._started.pop(state, None)
            self.up.stop_toxic(state)
            self.down.stop_toxic(state)
        self._acting = acting

    def _direction(self, stream: str) -> Direction:
        return self.up if stream == "upstream" else self.down

    def connected(self, upstream: UpstreamSide) -> None:
        self.connecting = None
        if self.client_gone:
            upstream.transport.loseConnection()
            return
        self.upstream = upstream
        tune(self.client.transport)
        tune(upstream.transport)
        self.up.attach(self.client.transport, upstream.transport)
        self.down.attach(upstream.transport, self.client.transport)
        self.client.transport.resumeProducing()

    def connect_failed(self, failure: Failure) -> None:
        self.connecting = None
        if self.closed or self.client_gone:
            return
        self.proxy.upstream_failed(self, failure)
        self.close()

    def fin_sent(self, direction: Direction) -> None:
        other = self.down if direction is self.up else self.up
        if other.finished or direction.sink is None:
            self.close()
        elif can_half_close(direction.sink):
            direction.sink.loseWriteConnection()
        # else TLS, which has no half-close: the FIN waits for the other way's end.

    def reset(self) -> None:
        """reset_peer: an RST to both sides, as Toxiproxy's SO_LINGER 0 on both."""
        if self.closed:
            return
        self.closed = True
        for side in self._transports():
            reset(side)

    def _transports(self) -> list[Any]:
        sides = [self.client.transport]
        if self.upstream is not None and self.upstream.transport is not None:
            sides.append(self.upstream.transport)
        return sides

    def close(self) -> None:
        """Close both sides once what was written to them is sent."""
        if self.closed:
            return
        self.closed = True
        if self.connecting is not None:
            self.connecting.cancel()
        self._unregister()
        for side in self._transports():
            side.loseConnection()

    def _unregister(self) -> None:
        # TLS holds its close_notify (so the close) while a producer is registered.
        for direction in (self.up, self.down):
            if direction.sink is not None:
                direction.sink.unregisterProducer()

    def cut(self) -> None:
        """Close both sides now, sent or not (a disabled proxy)."""
        self.closed = True
        if self.connecting is not None:
            self.connecting.cancel()
        for side in self._transports():
            side.abortConnection()

    def client_lost(self) -> None:
        self.client_gone = True
        if self.connecting is not None:
            self.connecting.cancel()
        self.down.discard()
        self.up.close_after_queue()
        self.proxy.forget(self)

    def upstream_lost(self, reason: Failure) -> None:
        if not self.closed and reason.check(ConnectionDone) is None:
            # Reset, or TLS refused (a certificate that does not name server_name).
            self.proxy.upstream_failed(self, reason)
        self.up.discard()
        self.down.close_after_queue()


@implementer(IHalfCloseableProtocol)
class ClientSide(Protocol):
    """The client's connection: everything it sends goes upstream."""

    transport: Any
    relay: Relay | None = None

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    def connectionMade(self) -> None:
        if not self.proxy.enabled:
            # Down, as Toxiproxy's disabled proxy: no connection gets through.
            self.transport.abortConnection()
            return
        # Nothing is read until the upstream can take it.
        self.transport.pauseProducing()
        self.relay = self.proxy.relay(self)

    def dataReceived(self, data: bytes) -> None:
        if self.relay is not None:
            self.relay.up.feed(data)

    def readConnectionLost(self) -> None:
        if self.relay is not None:
            self.relay.up.end()

    def writeConnectionLost(self) -> None:
        """The client will read no more: the upstream's bytes are dropped as they come."""

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.relay is not None:
            self.relay.client_lost()

    def close_gracefully(self) -> None:
        # Shutdown, reload or idle: a proxy has no exchange of its own to finish.
        if self.relay is not None:
            self.relay.close()
        else:
            self.transport.loseConnection()


@implementer(IHalfCloseableProtocol)
class UpstreamSide(Protocol):
    """The connection to the upstream: everything it sends goes to the client."""

    transport: Any

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    def connectionMade(self) -> None:
        self.relay.connected(self)

    def dataReceived(self, data: bytes) -> None:
        self.relay.down.feed(data)

    def readConnectionLost(self) -> None:
        self.relay.down.end()

    def writeConnectionLost(self) -> None:
        """The upstream reads no more: what the client sends is dropped as it comes."""

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.relay.upstream_lost(reason)


def connecting(relay: Relay, connect: Callable[[UpstreamSide], Deferred[Any]]) -> None:
    """Start C{relay}'s upstream connection with C{connect}."""
    attempt = connect(UpstreamSide(relay))
    relay.connecting = attempt
    attempt.addErrback(relay.connect_failed)
