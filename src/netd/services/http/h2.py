"""
HTTP/2 through twisted.web's H2Connection, with netd's limits, answering from the same L{App}.

A TLS connection of an http service that negotiates C{h2} is handed over here by
L{netd.services.http.wire.HTTPConnection}.
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Any

import h2.errors
import h2.exceptions
from h2.settings import SettingCodes
from twisted.internet.error import ConnectionLost
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource

from netd.compat.web import GracefulH2, H2Connection, h2_producer_paused, h2_stream_request
from netd.services.http.app import (
    HOP_BY_HOP_FRAMING,
    App,
    BodyStream,
    Exchange,
    Headers,
    WebSocketStream,
    peer_host,
    reason,
)

__all__ = ["LimitedH2Connection", "h2_site"]

# Response bytes an HTTP/2 connection may queue before its streams' producers are
# paused: shared by its open streams, with a floor for each.
_H2_CONNECTION_BUFFER = 1 << 20
_H2_STREAM_BUFFER_MIN = 64 * 1024


class LimitedH2Connection(H2Connection):
    """
    twisted.web's HTTP/2 connection with two limits of its own.

    Back-pressure: twisted pauses a stream's producer only when the client's
    flow-control window is used up, counting what is queued for the stream.  A
    client may grant a window of 2**31-1 and then read nothing: TCP backs up,
    this connection stops sending (the transport pauses it), and the producer,
    never paused, queues the whole file here.  So the window a stream may fill
    is capped at its share of L{_H2_CONNECTION_BUFFER}, and since no
    WINDOW_UPDATE comes to wake a stream paused by that cap, the sending loop
    wakes it once its queue has drained below it.  (A producer's write lands
    whole: a stream may hold one write, 256 KiB for files, beyond its share.)

    Bodies over C{max_body}: answered 413 as soon as the limit is crossed (or a
    declared Content-Length exceeds it), and the stream is reset with NO_ERROR
    (RFC 9113 8.1), instead of reading the whole body first.

    Bodies streamed: twisted.web hands a request to its resource only once the
    client ended the stream, its body stored whole meanwhile.  Here a request
    is handed over as soon as its headers are in, and its body goes on to the
    exchange's L{BodyStream} as it arrives, as over HTTP/1.1: a proxied upload
    reaches the upstream while the client still sends it.  The stream's window
    is opened only as the body is taken, so a slow upstream pauses the client
    (the stream stops producing and its DATA waits in the client's window).

    A client's GOAWAY without error: its open streams are still answered (RFC
    9113 6.8), then the connection closes; twisted.web dropped them at once.
    """

    app: App
    client: str
    conn: GracefulH2
    # The TLS transport, whose producer this connection is.
    transport: Any
    # Seconds a stream answered before its body was all in waits for each byte of the rest.
    body_timeout: float
    lost = False
    # The client went away (a GOAWAY without error) and its streams are answered.
    closing = False

    def __init__(self, reactor: Any = None) -> None:
        super().__init__(reactor)
        self.conn = GracefulH2(self.conn.config)

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        self._close_once_answered()

    def _close_once_answered(self) -> None:
        # The client's GOAWAY kept its streams: once the last is done the
        # connection closes, with a GOAWAY of netd's (RFC 9113 6.8).
        if not self.conn.peer_went_away or self.streams or self.lost or self.closing:
            return
        self.closing = True
        self.conn.close_connection()
        self._tryToWriteControlData()
        # TLS sends its close_notify only once no producer is registered.
        self.transport.unregisterProducer()
        self.transport.loseConnection()
        # A client that reads nothing more is cut, as after a timeout.
        self.setTimeout(self.abortTimeout)

    def remainingOutboundWindow(self, streamID: int) -> int:
        share = max(_H2_CONNECTION_BUFFER // (len(self.streams) or 1), _H2_STREAM_BUFFER_MIN)
        window = min(self.conn.local_flow_control_window(streamID), share)
        queue = self._outboundStreamQueues[streamID]
        # The queue also holds twisted's end-of-stream marker (not bytes).
        return window - sum(len(chunk) for chunk in queue if isinstance(chunk, bytes))

    def _sendPrioritisedData(self, *args: Any) -> None:
        super()._sendPrioritisedData(*args)
        # The queues shrink only here: wake the streams the cap paused.
        # windowUpdated resumes a producer only if its stream has room again.
        for stream in list(self.streams.values()):
            if h2_producer_paused(stream):
                stream.windowUpdated()

    def connectionMade(self) -> None:
        super().connectionMade()
        if self.app.proxy is None:
            # RFC 8441: WebSocket stub routes take an extended CONNECT.  Not
            # with proxy routes: a proxied WebSocket goes upstream as an
            # HTTP/1.1 upgrade, so a browser must open it on HTTP/1.1.
            self.conn.update_settings({SettingCodes.ENABLE_CONNECT_PROTOCOL: 1})
            self._tryToWriteControlData()

    def _requestReceived(self, event: Any) -> None:
        super()._requestReceived(event)
        stream = self.streams.get(event.stream_id)
        request = h2_stream_request(stream) if stream is not None else None
        if not isinstance(request, _H2Request):
            return
        # What a rule's generic acts (a throttle, a reset) act on.
        request.connection_transport = self.transport
        # twisted.web drops pseudo-header fields it does not know.
        request.connect_protocol = dict(event.headers).get(b":protocol")
        if event.stream_ended is not None and request.body.expected is None:
            request.body.expected = 0  # END_STREAM on the headers: no body at all
        self._refuse_if_too_large(event.stream_id)
        if event.stream_id in self.streams and not request.too_large:
            # Answered from its headers; the end of the stream ends its body.
            assert stream is not None
            request.requestReceived(stream.command, stream.path, b"HTTP/2")

    def _requestDataReceived(self, event: Any) -> None:
        if event.stream_id not in self.streams:
            # Refused earlier in this batch of events.  h2 counted these bytes
            # against the connection's window: give them back, or it shrinks.
            self.openStreamWindow(event.stream_id, event.flow_controlled_length)
            return
        super()._requestDataReceived(event)
        self._refuse_if_too_large(event.stream_id)

    def _requestEnded(self, event: Any) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None:  # refused earlier in this batch
            return
        super()._requestEnded(event)
        request = h2_stream_request(stream)
        if isinstance(request, _H2Request) and request.draining:
            self._requestDone(event.stream_id)  # its body is in: nothing more to wait for

    def _requestAborted(self, event: Any) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None:
            return
        request = h2_stream_request(stream)
        if isinstance(request, _H2Request):
            request.discarding = True  # reset by the client: no more of its body comes
        super()._requestAborted(event)

    def timeoutConnection(self) -> None:
        if self.closing:
            self.forceAbortClient()
            return
        # keepalive_timeout is for a connection that waits on its client, as
        # over HTTP/1.1, where it runs only between requests: a stream whose
        # request is all in and whose answer netd still owes (a slow upstream,
        # a route's delay) keeps the connection, and its answer comes.
        for stream in self.streams.values():
            request = h2_stream_request(stream)
            if (
                isinstance(request, _H2Request)
                and request.dispatched
                and not request.finished
                and request.body.over
            ):
                # TimeoutMixin forgot its timer before calling here, so
                # resetTimeout would do nothing: a new one is armed.
                self.setTimeout(self.timeOut)
                return
        super().timeoutConnection()
        # Its loseConnection leaves TLS waiting for this connection, still its
        # producer, so no close_notify went and the client was cut only at
        # abortTimeout (15 s on): unregistered, TLS closes now.
        self.transport.unregisterProducer()
        # Twisted tells the streams only once the transport is gone: over TLS
        # to a client that reads nothing, up to abortTimeout later.  Its GOAWAY
        # closed h2's state machine already, so an answer written meanwhile (a
        # proxy's, its 502, a route's delayed one) or a frame still queued would
        # raise there.  The streams are lost now, as when a client's GOAWAY
        # with an error comes; the timers stay, so a client that never reads
        # is still aborted.
        self.connectionLost(Failure(ConnectionLost("timed out")), _cancelTimeouts=False)

    def connectionLost(self, reason: Failure = connectionDone, *args: Any, **kwargs: Any) -> None:
        # Its streams are done with it: nothing is reset or given back then.
        self.lost = True
        super().connectionLost(reason, *args, **kwargs)

    def _requestDone(self, streamID: int) -> None:
        stream = self.streams[streamID]
        request = h2_stream_request(stream)
        if not isinstance(request, _H2Request):
            super()._requestDone(streamID)
            return
        if request.drain_timer is not None and request.drain_timer.active():
            request.drain_timer.cancel()
        body = request.body
        if not body.ended:
            if request.finished and not (
                body.over or body.taken or request.discarding or self.lost
            ):
                self._drain(streamID, request)
                return
            if not self.lost:
                # Gone, or its body stopped coming: RFC 9113 8.1, the client may
                # stop sending (NO_ERROR).  What the stream held back while
                # paused is dropped and given back to the connection's window,
                # or every such stream would shrink it for good.
                request.discarding = True
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    self.conn.reset_stream(streamID)
                if not stream.producing:
                    stream.resumeProducing()
            body.cut()  # what came of it is recorded
        super()._requestDone(streamID)
        self._close_once_answered()

    def _drain(self, streamID: int, request: _H2Request, size: int = -1) -> None:
        """
        Answered before its body was all in: the stream stays open for the
        rest, which the record keeps, as HTTP/1.1 reads it on, until the client
        ends or resets it, or a L{body_timeout} brings none of it (looked at
        once a L{body_timeout}: cut between one and two after its last byte).
        """
        if not request.draining:
            request.draining = True
            self.priority.block(streamID)  # its response is all sent
        elif request.body.size == size:
            request.discarding = True
            self._requestDone(streamID)
            self._tryToWriteControlData()
            return
        request.drain_timer = self.callLater(
            self.body_timeout, partial(self._drain, streamID, request, request.body.size)
        )

    def _refuse_if_too_large(self, streamID: int) -> None:
        stream = self.streams.get(streamID)
        if stream is None:
            return
        request = h2_stream_request(stream)
        if not isinstance(request, _H2Request) or not request.too_large or request.discarding:
            return
        request.discarding = True
        status = 413
        if request.startedWriting:
            # Answered before the body was all in: a 413 cannot follow.  RFC
            # 9113 8.1: after a whole response the client is asked to stop
            # sending without error (it keeps the response); during one, the
            # response is cut.
            code = (
                h2.errors.ErrorCodes.NO_ERROR if request.finished else h2.errors.ErrorCodes.CANCEL
            )
            with contextlib.suppress(h2.exceptions.StreamClosedError):
                self.conn.reset_stream(streamID, code)
        else:
            self._send_refusal(streamID, status)
        self.app.stats.count("rejected")
        self.app.emit("http.rejected", status=status, client=self.client)
        if self._tryToWriteControlData():
            stream.connectionLost(Failure(ConnectionLost("request body too large")))
            self._requestDone(streamID)

    def _send_refusal(self, streamID: int, status: int) -> None:
        body = b"%d %s\n" % (status, reason(status))
        headers = [(b":status", b"%d" % status), (b"server", b"netd")]
        if self.conn.local_flow_control_window(streamID) >= len(body):
            headers += [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", b"%d" % len(body)),
            ]
            self.conn.send_headers(streamID, headers)
            self.conn.send_data(streamID, body, end_stream=True)
        else:
            self.conn.send_headers(streamID, headers, end_stream=True)
        # NO_ERROR: stop sending, nothing went wrong; unless the client has
        # sent it all already (END_STREAM in the same read), and the stream is closed.
        with contextlib.suppress(h2.exceptions.StreamClosedError):
            self.conn.reset_stream(streamID)


class _H2Request(server.Request):
    """
    A request handed over from its headers, its body streamed to L{body}
    (never stored in C{content}) up to the service's limit.
    """

    app: App
    max_body = 0
    too_large = False
    received = 0
    # Answered or refused before its body was all in: the rest is dropped.
    discarding = False
    # Answered before its body was all in, the stream kept open for the rest (for the record).
    draining = False
    drain_timer: Any = None
    dispatched = False
    connection_transport: Any = None
    # An extended CONNECT's :protocol (RFC 8441): b"websocket".
    connect_protocol: bytes | None = None
    body: BodyStream

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.max_body:
            self.too_large = True  # refused as soon as its headers are in
        self.body = BodyStream(length, self.app.record_body, self.app.reads_bodies)
        # The stream stops producing (and opening its window) while the
        # body's taker cannot keep up.
        self.body.pause = self.channel.pauseProducing
        self.body.resume = self.channel.resumeProducing
        super().gotLength(0)  # content stays an empty buffer, never a temporary file

    def handleContentChunk(self, data: bytes) -> None:
        if self.discarding:
            return
        self.received += len(data)
        # A WebSocket's frames are bounded by message, not as one body.
        if self.received > self.max_body and self.connect_protocol is None:
            self.too_large = True
            return
        self.body.feed(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self.dispatched:
            # Called again by the stream at its end: the body is all in.
            if not self.discarding:
                self.body.end()
            return
        self.dispatched = True
        super().requestReceived(command, path, version)


class H2Exchange(Exchange):
    """An exchange on one HTTP/2 stream, through twisted.web's L{server.Request}."""

    written_when_complete = False  # the stream's frames leave on later turns

    def __init__(self, app: App, request: _H2Request, scheme: str) -> None:
        self.app = app
        self.request = request
        self.method = request.method.decode("ascii", "replace")
        self.target = request.uri.decode("latin-1")
        self.version = "HTTP/2"
        self.headers = [
            (name, value)
            for name, values in request.requestHeaders.getAllRawHeaders()
            for value in values
        ]
        self.client = peer_host(request.getClientAddress())
        self.scheme = scheme
        self.body = request.body
        self.done = False
        # The stream, kept: twisted.web forgets it (request.channel) when it is lost.
        self.stream: Any = request.channel
        self.producer: Any = None
        request.notifyFinish().addErrback(self._gone)

    def _gone(self, reason: Failure) -> None:
        """The stream was reset or the connection lost: stop whatever still works for it."""
        self.done = True
        if self.proxy_cancel is not None:
            self.proxy_cancel()
        producer, self.producer = self.producer, None
        if producer is not None:
            # H2Stream neither stops nor unregisters a producer when it is reset:
            # a file would be read to its end and an upstream relayed in full.
            self.stream.unregisterProducer()
            producer.stopProducing()

    def start(self, status: int, headers: Headers, length: int | None) -> None:
        self.status = status
        request = self.request
        request.setResponseCode(status)
        request.setHeader(b"server", b"netd")
        for name, value in headers:
            if name.lower() not in HOP_BY_HOP_FRAMING:
                request.responseHeaders.addRawHeader(name, value)
        if length is not None and status not in (204, 304):
            # A 304 carries no length but the 200's (RFC 9110 8.6), a 204 none (8.6).
            request.setHeader(b"content-length", b"%d" % length)

    def respond(self, status: int, headers: Headers, body: bytes) -> None:
        length = len(body)
        for name, value in headers:
            if name.lower() == b"content-length" and self.method == "HEAD":
                length = int(value)  # what GET would send (App's own, digits)
        self.start(status, headers, length)
        if self.method != "HEAD" and status not in (204, 304):
            self.write(body)
        self.finish()

    def write(self, data: bytes) -> None:
        if not self.done and data:
            self.sent += len(data)
            self.request.write(data)

    def finish(self) -> None:
        if not self.done:
            self.done = True
            self.request.finish()
            self.app.completed(self)

    def connection_transport(self) -> Any:
        return getattr(self.request, "connection_transport", None)

    def websocket_stream(self) -> WebSocketStream | None:
        if self.method != "CONNECT" or self.request.connect_protocol != b"websocket":
            return None
        return _WebSocketStream(self)

    def abort(self) -> None:
        if self.done:
            return  # finished, or the stream is gone (request.channel with it)
        self.done = True
        self.request.loseConnection()

    def register_producer(self, producer: Any, streaming: bool) -> None:
        if self.done:
            producer.stopProducing()
            return
        self.producer = producer
        self.request.registerProducer(producer, streaming)

    def unregister_producer(self) -> None:
        if self.producer is not None:
            self.producer = None
            self.request.unregisterProducer()


class _WebSocketStream:
    """An RFC 8441 WebSocket: the stream's body in, DATA out, END_STREAM when over."""

    def __init__(self, exchange: H2Exchange) -> None:
        self.exchange = exchange

    def accept(self, headers: Headers, peer: Any) -> None:
        exchange = self.exchange
        exchange.start(200, headers, None)
        exchange.request.write(b"")  # the headers now: the client waits for them
        # Reset or lost: the script stops.
        exchange.proxy_cancel = peer.loseConnection
        exchange.body.take(peer.write, peer.loseConnection)

    def to_client(self, data: bytes) -> None:
        self.exchange.write(data)

    def upstream_lost(self) -> None:
        self.exchange.finish()


class _H2Resource(Resource):
    isLeaf = True

    def __init__(self, app: App, scheme: str) -> None:
        super().__init__()
        self.app = app
        self.scheme = scheme

    def render(self, request: server.Request) -> Any:
        assert isinstance(request, _H2Request)  # h2_site's requestFactory
        self.app.handle(H2Exchange(self.app, request, self.scheme))
        return server.NOT_DONE_YET


class _H2Site(server.Site):
    def log(self, request: Any) -> None:
        """L{App.completed} writes the access log for every protocol."""


def h2_site(app: App, scheme: str, max_body: int) -> server.Site:
    """The twisted.web site whose requests an HTTP/2 connection's streams become."""

    class Request(_H2Request):
        pass

    Request.max_body = max_body
    Request.app = app
    site = _H2Site(_H2Resource(app, scheme), reactor=app.clock)
    site.requestFactory = Request
    return site
