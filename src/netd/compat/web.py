"""
Private twisted.web names (HTTP/1.1 client, HTTP/2) netd uses; see netd.compat.

Imported only by the http kind: it loads twisted.web and h2.
"""

from __future__ import annotations

from typing import Any

import priority  # type: ignore[import-untyped]
from twisted.internet.defer import Deferred
from twisted.web._http2 import _END_STREAM_SENTINEL, H2Connection, H2Stream
from twisted.web._newclient import HTTP11ClientProtocol
from twisted.web.client import HTTPConnectionPool
from twisted.web.client import _HTTP11ClientFactory as HTTP11ClientFactory
from twisted.web.http import HTTPChannel, HTTPFactory, Request, _GenericHTTPChannelProtocol

__all__ = [
    "BatchingH2Connection",
    "H2Connection",
    "HTTP11ClientFactory",
    "HTTP11ClientProtocol",
    "h2_producer_paused",
    "h2_stream_request",
    "set_pool_protocol_factory",
    "site_channel_with_batching_h2",
]

# Re-exported as they are:
# - H2Connection: twisted.web serves HTTP/2 with it but exports no class to
#   subclass for flow-control and body-size limits.
# - HTTP11ClientProtocol: twisted.web.client uses it but does not export it
#   (_newclient documents it as public).
# - HTTP11ClientFactory: the factory HTTPConnectionPool builds connections with;
#   a pool that should use another protocol has to subclass it.


def set_pool_protocol_factory(pool: HTTPConnectionPool, factory: type[HTTP11ClientFactory]) -> None:
    """
    Make C{pool} connect with C{factory}: the pool's private C{_factory} is the
    only way to choose the protocol its connections speak.
    """
    pool._factory = factory


def h2_stream_request(stream: H2Stream) -> Request:
    """The request an HTTP/2 stream feeds; H2Stream keeps it privately."""
    request: Request = stream._request
    return request


def h2_producer_paused(stream: H2Stream) -> bool:
    """
    Whether C{stream} has a producer and holds it paused.  H2Stream resumes it
    only on a WINDOW_UPDATE and keeps whether it paused it privately.
    """
    return stream.producer is not None and not stream._producerProducing


# Frames one pass of BatchingH2Connection's sending loop may queue before it
# writes them and lets the reactor run (other connections, reads).
_FRAMES_PER_PASS = 256


class BatchingH2Connection(H2Connection):
    """
    twisted.web's HTTP/2 connection, sending every frame that is ready in one
    pass and one transport write.  Twisted's loop sends one DATA frame or one
    end of stream per reactor turn, each in its own write (a TLS record and a
    send): with N streams answering at once the last waits 2N turns, so the
    more streams in flight the slower each answer.  The loop below is
    Twisted's (priority order, flow-control windows, frame size, waiting
    behind a paused transport) without the turn and the write per frame.
    """

    def _sendPrioritisedData(self, *args: Any) -> None:
        if not self._stillProducing:
            return
        for _ in range(_FRAMES_PER_PASS):
            try:
                stream = next(self.priority)
            except priority.DeadlockError:
                # Nothing to send: wait for a stream to have data.
                self._flush_frames()
                assert self._sendingDeferred is None
                self._sendingDeferred = Deferred()
                self._sendingDeferred.addCallback(self._sendPrioritisedData)
                return
            if self._consumerBlocked is not None:
                self._flush_frames()
                self._consumerBlocked.addCallback(self._sendPrioritisedData)
                return
            self._send_frame(stream)
        self._flush_frames()
        self._reactor.callLater(0, self._sendPrioritisedData)

    def _send_frame(self, stream: int) -> None:
        self.resetTimeout()
        queue = self._outboundStreamQueues[stream]
        frame = queue.popleft()
        if frame is _END_STREAM_SENTINEL:
            self.conn.end_stream(stream)
            self._requestDone(stream)
            return
        room = min(self.conn.max_outbound_frame_size, self.conn.local_flow_control_window(stream))
        if len(frame) > room:
            queue.appendleft(frame[room:])
            frame = frame[:room]
        if frame:
            self.conn.send_data(stream, frame)
        if not queue:
            self.priority.block(stream)
        if self.remainingOutboundWindow(stream) <= 0:
            self.streams[stream].flowControlBlocked()

    def _flush_frames(self) -> None:
        data = self.conn.data_to_send()
        transport: Any = self.transport
        if data:
            transport.write(data)


class _BatchingH2Channel(_GenericHTTPChannelProtocol):
    """Twisted's HTTP/1.1-or-HTTP/2 channel, with L{BatchingH2Connection} for h2."""

    def dataReceived(self, data: bytes) -> None:
        if self._negotiatedProtocol is None:
            old: Any = self._channel
            transport = old.transport
            if getattr(transport, "negotiatedProtocol", None) == b"h2":
                # As twisted.web.http._GenericHTTPChannelProtocol switches, with our class.
                network = old._networkProducer
                network.unregisterProducer()
                old.setTimeout(None)
                channel: Any = BatchingH2Connection()
                channel.requestFactory = self._requestFactory
                channel.site = self._site
                channel.factory = self._factory
                channel.timeOut = self._timeOut
                channel.callLater = self._callLater
                self._channel = channel
                channel.makeConnection(transport)
                network.registerProducer(channel, True)
                self._negotiatedProtocol = b"h2"  # type: ignore[assignment]
        self._channel.dataReceived(data)


def site_channel_with_batching_h2(site: HTTPFactory) -> _GenericHTTPChannelProtocol:
    """
    A site's C{protocol}: twisted.web picks the HTTP/2 class inside its private
    channel wrapper, with no hook to give it another.
    """
    return _BatchingH2Channel(HTTPChannel())
