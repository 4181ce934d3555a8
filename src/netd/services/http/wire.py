"""
HTTP on the wire: HTTP/1.1 on llhttp (through httptools); HTTP/2 in L{h2}, after ALPN.

twisted.web's request machinery costs more per request than everything netd does
with a request put together, so HTTP/1.1 has its own lean connection: llhttp parses
(strict: it refuses conflicting Content-Length/Transfer-Encoding, duplicate
Content-Length, obsolete line folding and bare CR or LF), this module enforces the
limits and timeouts, and L{App} answers.  A TLS connection that negotiates C{h2}
is handed to twisted.web's L{H2Connection} and its requests reach the same L{App}.
"""

from __future__ import annotations

import re
from collections import deque
from typing import IO, Any

import attrs
import httptools
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IAddress, IProtocolNegotiationFactory, ISSLTransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web import server
from zope.interface import implementer

from netd.compat.web import H2Connection
from netd.kinds import IOwesReplies, RepliesOwed
from netd.records import Record
from netd.sendfile import send_file
from netd.services.http.app import (
    HOP_BY_HOP_FRAMING,
    App,
    BodyStream,
    Exchange,
    Headers,
    peer_host,
    reason,
)
from netd.services.http.h2 import LimitedH2Connection, h2_site

__all__ = ["HTTPConnection", "HTTPFactory", "Limits", "busy_reply", "factory_for"]

_KEEP_ALIVE = b"Connection: keep-alive\r\n\r\n"
_CLOSE = b"Connection: close\r\n\r\n"


@attrs.frozen(repr=False)
class Limits(Record):
    """What one client may send, and how slowly (seconds)."""

    max_request_line: int = 8192
    max_header_bytes: int = 16384
    max_headers: int = 100
    max_body: int = 10 << 20
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keepalive_timeout: float = 15.0
    keepalive_requests: int = 1000


# After a refusal (a 413 while the body still comes, a 400, a 408...), what the
# client still sends is read and dropped, at most this long between two reads and
# this long in all: nginx's lingering close, with its defaults (lingering_timeout
# 5s, lingering_time 30s).  Closing a socket with bytes unread sends a reset, and a
# client still writing its body would take that reset instead of the refusal.
LINGERING_TIMEOUT = 5.0
LINGERING_TIME = 30.0


def busy_reply() -> bytes:
    return (
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 20\r\nConnection: close\r\nRetry-After: 1\r\n\r\n"
        b"503 Service Busy...\n"
    )


# RFC 9112 3.2's invalid Host values, as nginx judges them: a space, a control
# character or a delimiter no authority holds ("a b/c"); an IPv6 zone id or raw UTF-8
# still passes.
_HOST = re.compile(rb"[ \t]*[^\x00-\x20\x7f/\\?#@]*[ \t]*")


class _Reject(Exception):
    """Raised inside parser callbacks: answer C{status} (none if 0) and close."""

    def __init__(self, status: int) -> None:
        self.status = status


class LineExchange(Exchange):
    """An exchange on an HTTP/1.x connection."""

    def __init__(self, connection: HTTPConnection, keep_alive: bool) -> None:
        self.connection = connection
        self.keep_alive = keep_alive
        self.chunked = False
        self.done = False
        self.expect_continue = False
        # RFC 9110 7.8: a GET that asks to switch protocols, and only in HTTP/1.1
        # (a server must ignore Upgrade in an HTTP/1.0 request).
        self.wants_upgrade = False

    def _head(self, status: int, headers: Headers, length: int | None) -> bytes:
        self.status = status
        connection = self.connection
        if not connection.keep_alive_after(self):
            self.keep_alive = False
        lines = [
            b"HTTP/1.1 %d %s\r\nDate: %s\r\nServer: netd\r\n"
            % (status, reason(status), connection.app.dates.http)
        ]
        # A loop, not a generator: a generator's frame a response cost more than its lines.
        for name, value in headers:
            if name.lower() not in HOP_BY_HOP_FRAMING:
                lines.append(b"%s: %s\r\n" % (name, value))
        bodiless = status in (204, 304) or status < 200
        if length is not None:
            if not bodiless:
                lines.append(b"Content-Length: %d\r\n" % length)
        elif not bodiless and self.version == "HTTP/1.1":
            self.chunked = True
            lines.append(b"Transfer-Encoding: chunked\r\n")
        elif not bodiless:
            self.keep_alive = False  # HTTP/1.0: the end of the body is the end of the connection
        lines.append(_KEEP_ALIVE if self.keep_alive else _CLOSE)
        return b"".join(lines)

    def connection_transport(self) -> Any:
        return self.connection.transport

    def upgrade(self) -> _Splice | None:
        if not self.wants_upgrade:
            return None
        return _Splice(self.connection, self)

    def respond(self, status: int, headers: Headers, body: bytes) -> None:
        if self.done:
            return  # answered already, or the client is gone
        length = len(body)
        if self.method == "HEAD":
            for name, value in headers:
                if name.lower() == b"content-length":
                    length = int(value)  # what GET would send (App's own, digits)
        head = self._head(status, headers, length)
        if self.method == "HEAD" or status in (204, 304):
            self.connection.transport.write(head)
        else:
            self.sent = len(body)
            self.connection.transport.write(head + body)
        self.finish()

    def start(self, status: int, headers: Headers, length: int | None) -> None:
        self.connection.transport.write(self._head(status, headers, length))

    def write(self, data: bytes) -> None:
        if not data or self.done or self.method == "HEAD":
            return
        self.sent += len(data)
        if self.chunked:
            self.connection.transport.writeSequence([b"%x\r\n" % len(data), data, b"\r\n"])
        else:
            self.connection.transport.write(data)

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        if self.chunked and self.method != "HEAD":
            self.connection.transport.write(b"0\r\n\r\n")
        self.connection.finished(self)

    def abort(self) -> None:
        self.done = True
        self.connection.transport.abortConnection()

    def register_producer(self, producer: Any, streaming: bool) -> None:
        self.connection.transport.registerProducer(producer, streaming)

    def unregister_producer(self) -> None:
        self.connection.transport.unregisterProducer()

    def send_file(self, file: IO[bytes], offset: int, count: int) -> Deferred[None]:
        if self.chunked or self.method == "HEAD":
            return super().send_file(file, offset, count)
        # Straight to the transport: sendfile(2) can write there, past Python.
        return send_file(self.connection.transport, file, offset, count, self.count_sent)


class _Splice:
    """
    A client connection handed over to the protocol its upstream switched to
    (a proxied WebSocket): from here on, bytes are copied both ways as they
    come, each side paused while the other cannot take more.
    """

    def __init__(self, connection: HTTPConnection, exchange: LineExchange) -> None:
        self.connection = connection
        self.exchange = exchange

    def splice(self, head: bytes, upstream: Any) -> None:
        connection = self.connection
        exchange = self.exchange
        exchange.status = 101
        exchange.keep_alive = False
        exchange.proxy_cancel = None
        if connection.gone:
            upstream.loseConnection()
            return
        connection.deadline = None  # the service's idle_timeout still applies
        connection.transport.write(head)
        connection.spliced = upstream
        held, connection.held = connection.held, None
        if held:
            upstream.write(bytes(held))
        upstream.registerProducer(connection.transport, True)
        connection.transport.registerProducer(upstream, True)
        connection.resume_reading()

    def take_held(self) -> bytes:
        # llhttp hands everything after an upgrade request's head to the new
        # protocol, a body too: it goes to the upstream as it came.
        held = self.connection.held
        if not held:
            return b""
        taken = bytes(held)
        held.clear()
        return taken

    def to_client(self, data: bytes) -> None:
        self.exchange.sent += len(data)
        self.connection.transport.write(data)

    def upstream_lost(self) -> None:
        connection = self.connection
        connection.spliced = None
        if connection.gone:
            connection.app.completed(self.exchange)
            return
        connection.transport.unregisterProducer()
        self.exchange.finish()


@implementer(IOwesReplies)
class HTTPConnection(Protocol):
    """One client connection: HTTP/1.1 requests in order, or HTTP/2 once ALPN says so."""

    transport: Any

    def __init__(self, factory: HTTPFactory) -> None:
        self.factory = factory
        self.app = factory.app
        self.limits = factory.limits
        self.clock = factory.app.clock
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[LineExchange] = deque()
        self.current: LineExchange | None = None
        self.receiving: LineExchange | None = None
        # A request held back, within one read, until its body is in (see on_headers_complete).
        self.early: LineExchange | None = None
        self.served = 0
        # True while finished() dispatches queued requests (see _dispatch_queued).
        self.dispatching = False
        self.in_head = False
        self.head_fed = 0
        self.head_size = 0
        self.since_body = 0
        self.url = b""
        self.fields: Headers = []
        self.closing = False
        # Closing after the last response, once the body still coming with its request is in.
        self.body_then_close = False
        self.paused = False
        self.deadline: float | None = None
        self.timer: Any = None
        self.h2: H2Connection | None = None
        self.first = True
        self.gone = False
        self.client = ""
        self.scheme = factory.scheme
        # What the client sent after an upgrade request; the upstream once both
        # sides switched protocols.
        self.held: bytearray | None = None
        self.spliced: Any = None
        self.owed = RepliesOwed()
        self.last_request = False
        # After a refusal: when reading and dropping what still comes ends (see linger).
        self.lingering_until: float | None = None
        # A later request's refusal, answered once the current request is.
        self.refusal = 0

    # -- the connection ----------------------------------------------------------

    def connectionMade(self) -> None:
        self.client = peer_host(self.transport.getPeer())
        self.arm(self.limits.header_timeout)

    def dataReceived(self, data: bytes) -> None:
        if self.first:
            self.first = False
            if (
                self.factory.h2_site is not None
                and getattr(self.transport, "negotiatedProtocol", None) == b"h2"
            ):
                self.switch_to_h2()
        if self.h2 is not None:
            self.h2.dataReceived(data)
            return
        if self.spliced is not None:
            self.spliced.write(data)
            return
        if self.held is not None:
            self.held += data  # reading is paused: at most what was in flight
            return
        if self.closing and not self.body_then_close:
            if self.lingering_until is not None:
                self.deadline = self.clock.seconds() + LINGERING_TIMEOUT
            return
        receiving = self.receiving
        if self.in_head or receiving is None:
            self.head_fed += len(data)
        elif receiving.body.expected is None:
            # Chunked: what is not body is framing, and after the last chunk
            # trailer fields, which llhttp buffers whole until each one ends.
            self.since_body += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            # What follows the upgrade request is not HTTP/1.1: the new protocol
            # if a proxy route switches, else nothing we read.  Requests before
            # it are still answered; the connection ends after it.
            last = self.queue[-1] if self.queue else self.current
            if last is None:
                self.closing = True
                self.transport.loseConnection()  # answered already
                return
            last.keep_alive = False
            self.held = bytearray(data[e.args[0] :])
            self.deadline = None
            self.pause_reading()
            return
        except httptools.HttpParserError as e:
            # httptools wraps what our callbacks raise.
            cause = e.__context__
            if isinstance(cause, _Reject):
                if cause.status:
                    self.reject(cause.status)
            elif cause is not None:
                # A fault of netd's in a callback, not bad input: said, and a 500.
                self.app.log.failure("reading a request", Failure(cause))
                self.reject(500)
            else:
                self.reject(400)
            return
        limits = self.limits
        if self.in_head and self.head_fed > limits.max_request_line + limits.max_header_bytes:
            # llhttp buffers a header it has not finished; this bounds it.
            self.reject(414 if not self.fields and len(self.url) else 431)
        elif self.receiving is not None and self.since_body > limits.max_header_bytes:
            # That many bytes without a byte of body: an endless chunk extension or
            # trailer field (counted from the read after the last body data, so
            # at most one read more than the limit is ever held).
            self.reject(431)
        early = self.early
        if early is not None:  # its body goes on in a later read: routes wait for it
            self.early = None
            self.dispatch(early)

    def connectionLost(self, why: Failure = connectionDone) -> None:
        if self.h2 is not None:
            self.h2.connectionLost(why)
        if self.spliced is not None:
            self.spliced.loseConnection()
        self.closing = True
        self.gone = True
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        if self.receiving is not None:
            self.receiving.body.cut()  # what came of it is recorded
        exchanges = [self.current, *self.queue]
        # Nobody is left to answer: queued requests are never dispatched, and
        # whatever still answers the current one (the proxy's failure path
        # after the cancel below) must find it done.
        self.queue.clear()
        for exchange in exchanges:
            if exchange is not None:
                exchange.done = True
                if exchange.proxy_cancel is not None:
                    exchange.proxy_cancel()

    def when_replied(self) -> Deferred[None]:
        receiving = self.receiving
        if receiving is not None and receiving in self.queue:
            # Cut short by the client's FIN: never dispatched, never answered.
            self.queue.remove(receiving)
        if (
            self.h2 is not None
            or self.spliced is not None
            or receiving is self.current
            or self.lingering_until is not None
        ):
            # h2 and a tunnel have no requests to finish in order; a request
            # whose body the client stopped sending cannot be answered whole; a
            # refusal was the last answer, and the client's FIN ends its lingering.
            return succeed(None)
        return self.owed.wait(self.current is not None)

    def close_gracefully(self) -> None:
        """Finish the exchange in progress, then close (the daemon is stopping)."""
        if self.lingering_until is not None:
            return  # answered: it ends within its bounds, or the stop's grace cuts it
        if self.spliced is not None:
            # A tunnel has no exchange to finish: both ends close now, in order.
            self.spliced.loseConnection()
            self.transport.loseConnection()
        elif self.current is None and not self.served and self.h2 is None:
            # Accepted just before the stop, its first request maybe on its way:
            # a client retries a request on a reused connection that closes, not
            # its first one.  That request is answered, then the connection closes.
            self.last_request = True
        elif self.h2 is None and self.current is None and self.receiving is not None:
            # Answered before its body was all in: read to its end first, as a
            # response that closes its connection does (see finished).
            self.closing = True
            self.body_then_close = True
            self.resume_reading()
        elif self.h2 is not None or self.current is None:
            self.transport.loseConnection()
        elif self.receiving is self.current:
            # Unanswered while its body still comes (a proxy relays it, a route
            # matches on it): read to its end, then close once it is answered.
            self.current.keep_alive = False
        else:
            self.closing_after_current()

    def closing_after_current(self) -> None:
        self.closing = True
        self.queue.clear()
        if self.current is None:
            self.transport.loseConnection()
        else:
            self.current.keep_alive = False

    def reject(self, status: int) -> None:
        """Bad input: one error response, then close without parsing further (see linger)."""
        self.closing = True
        self.body_then_close = False
        self.early = None  # the error answers it
        receiving = self.receiving
        if receiving is not None and receiving.status and receiving is not self.current:
            # Answered already (before its body came in): one response a request.
            self.queue.clear()
            self.linger()
            return
        current = self.current
        if current is not None and receiving is not current:
            # A later request is at fault (its head, or the body of one queued):
            # RFC 9112 9.3.2, responses go in request order, so the requests
            # before it are answered first, then the error (see finished).
            if receiving is not None and receiving in self.queue:
                self.queue.remove(receiving)
            self.refusal = status
            return
        self.queue.clear()
        if current is not None:
            if current.status:
                # A response is on its way; an error cannot be framed after it.
                self.transport.loseConnection()
                return
            # Its body turned out bad before anyone answered it: the error answers it.
            current.done = True
            self.current = None
            if current.proxy_cancel is not None:
                current.proxy_cancel()
        self.refuse(status)

    def refuse(self, status: int) -> None:
        """Answer C{status}, the connection's last response, then linger."""
        self.app.stats.count("rejected")
        body = b"%d %s\n" % (status, reason(status))
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nDate: %s\r\nServer: netd\r\nContent-Type: text/plain; "
            b"charset=utf-8\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (status, reason(status), self.app.dates.http, len(body), body)
        )
        self.app.emit("http.rejected", status=status, client=self.client)
        self.linger()

    def linger(self) -> None:
        """
        End the connection after its last response, reading and dropping (not
        parsing) what the client still sends, until it closes or a lingering
        bound passes (L{LINGERING_TIMEOUT}, L{LINGERING_TIME}).
        """
        now = self.clock.seconds()
        self.lingering_until = now + LINGERING_TIME
        self.deadline = now + LINGERING_TIMEOUT
        if self.timer is not None:
            self.timer.cancel()  # set for a later deadline maybe (body_timeout's)
        self.timer = self.clock.callLater(LINGERING_TIMEOUT, self.expire)
        self.resume_reading()
        if ISSLTransport.providedBy(self.transport):
            # TLS has no half-close of its own, and the transport's would send a
            # FIN under TLS without close_notify.  TLS's close sends close_notify
            # and reads on (handing here what comes, dropped) until the client's
            # close_notify or FIN: a client still sending is not reset, and the
            # bounds above keep it from holding the connection for ever.
            self.transport.loseConnection()
        else:
            # Our FIN once the response is out: a client that sends nothing more
            # sees the end of the response at once, and its own close ends ours
            # (the core's readConnectionLost, through when_replied).
            self.transport.loseWriteConnection()

    def stop_lingering(self) -> None:
        if ISSLTransport.providedBy(self.transport):
            self.transport.abortConnection()  # its close is waiting for the client's
        else:
            self.transport.loseConnection()

    # -- timeouts: one timer a connection, moved lazily -----------------------------

    def arm(self, seconds: float | None) -> None:
        if seconds is None:
            self.deadline = None
            return
        deadline = self.deadline = self.clock.seconds() + seconds
        if self.timer is None:
            self.timer = self.clock.callLater(seconds, self.expire)
        elif self.timer.getTime() > deadline:
            # Set for an earlier phase's later deadline (the head's, say, for a
            # shorter body_timeout): expire only ever moves it later.
            self.timer.reset(seconds)

    def expire(self) -> None:
        self.timer = None
        deadline = self.deadline
        lingering_until = self.lingering_until
        if deadline is None or (
            self.closing and not self.body_then_close and lingering_until is None
        ):
            return
        if lingering_until is not None:
            deadline = min(deadline, lingering_until)
        left = deadline - self.clock.seconds()
        if left > 0:
            self.timer = self.clock.callLater(left, self.expire)
            return
        if lingering_until is not None:
            self.stop_lingering()
            return
        self.app.stats.count("timeouts")
        if self.in_head or self.receiving is not None:
            self.reject(408)
        elif self.current is None:
            self.transport.loseConnection()

    # -- llhttp callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.closing:
            raise _Reject(0)  # pipelined after the last request we answer: ignored
        self.in_head = True
        self.url = b""
        self.fields = []
        self.head_size = 0
        if self.current is None:
            self.arm(self.limits.header_timeout)

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self.limits.max_request_line:
            raise _Reject(414)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_size += len(name) + len(value) + 4
        self.fields.append((name, value))
        limits = self.limits
        if len(self.fields) > limits.max_headers or self.head_size > limits.max_header_bytes:
            raise _Reject(431)

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.head_fed = 0
        self.since_body = 0
        parser = self.parser
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            # llhttp reads a request line without a version as HTTP/0.9: malformed here.
            raise _Reject(400 if version == "0.9" else 505)
        exchange = LineExchange(self, parser.should_keep_alive() and not self.last_request)
        exchange.method = parser.get_method().decode("ascii")
        exchange.target = self.url.decode("latin-1")
        exchange.version = "HTTP/" + version
        exchange.wants_upgrade = (
            version == "1.1" and exchange.method == "GET" and parser.should_upgrade()
        )
        exchange.headers = self.fields
        exchange.client = self.client
        exchange.scheme = self.scheme
        length: int | None = None
        chunked = False
        hosts = 0
        for name, value in self.fields:
            lower = name.lower()
            if lower == b"host":
                hosts += 1
                if not _HOST.fullmatch(value):
                    raise _Reject(400)  # RFC 9112 3.2: an invalid Host is a 400
            elif lower == b"content-length":
                length = int(value)
            elif lower == b"transfer-encoding":
                if value.strip().lower() != b"chunked":
                    # llhttp lets "gzip, chunked" through; we decode no other coding.
                    raise _Reject(501)
                chunked = True
            elif lower == b"expect":
                if value.strip().lower() != b"100-continue":
                    raise _Reject(417)
                # RFC 9110 10.1.1: ignored from HTTP/1.0, which knows no 1xx (15.2).
                exchange.expect_continue = version == "1.1"
        if hosts > 1 or (hosts == 0 and version == "1.1"):
            raise _Reject(400)
        if chunked and version == "1.0":
            # RFC 9112 6.1: an HTTP/1.0 message with Transfer-Encoding has faulty
            # framing: answered as chunked, then the connection closes.
            exchange.keep_alive = False
            self.last_request = True
        if length is not None and length > self.limits.max_body:
            raise _Reject(413)
        # Unknown length (None) means chunked; no framing at all means no body.
        expected = length if length is not None else (None if chunked else 0)
        exchange.body = BodyStream(expected, self.app.record_body, self.app.reads_bodies)
        exchange.body.pause = self.pause_reading
        exchange.body.resume = self.resume_reading
        # Trailer fields of a chunked body come through on_header too: they are
        # counted against the limits there but must not join the request's headers.
        self.fields = []
        self.receiving = exchange
        if expected != 0:
            # A request without a body ends in this same read (on_message_complete).
            self.arm(self.limits.body_timeout)
        if self.current is None and self.early is None:
            if (
                length
                and self.app.reads_bodies
                and not exchange.expect_continue
                and not parser.should_upgrade()
            ):
                # Some route matches on bodies, and this one, of a known length,
                # most often came in the same read as its head: handled once it
                # is in (or at the end of this read), a route looks at it at
                # once instead of waiting for it and matching again.
                self.early = exchange
            else:
                self.dispatch(exchange)
        else:
            self.queue.append(exchange)
            self.pause_reading()

    def on_body(self, data: bytes) -> None:
        exchange = self.receiving
        assert exchange is not None
        if exchange.body.size + len(data) > self.limits.max_body:
            raise _Reject(413)
        if self.deadline is not None:
            self.deadline = self.clock.seconds() + self.limits.body_timeout
        self.since_body = 0
        exchange.body.feed(data)

    def on_message_complete(self) -> None:
        exchange = self.receiving
        self.receiving = None
        if exchange is not None:
            exchange.body.end()
            if exchange is self.early:
                self.early = None
                self.dispatch(exchange)
        if self.body_then_close:
            self.body_then_close = False
            self.transport.loseConnection()
        elif self.current is None and not self.queue:
            self.arm(self.limits.keepalive_timeout)
        else:
            self.deadline = None

    # -- exchanges, in order ------------------------------------------------------------

    def dispatch(self, exchange: LineExchange) -> None:
        self.current = exchange
        self.served += 1
        if exchange.expect_continue and exchange.body.expected != 0:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.app.handle(exchange)

    def keep_alive_after(self, exchange: LineExchange) -> bool:
        return (
            exchange.keep_alive
            and (not self.closing or self.refusal != 0)
            and self.served < self.limits.keepalive_requests
            and (exchange.body.ended or self.receiving is exchange)
        )

    def finished(self, exchange: LineExchange) -> None:
        self.current = None
        self.app.completed(exchange)
        if self.gone:
            return
        if self.refusal and exchange.keep_alive and not self.queue:
            self.refuse(self.refusal)
            self.owed.settled()  # the refusal was the last reply
            return
        if self.owed.awaited and not self.queue:
            self.owed.settled()
            return
        if not exchange.keep_alive:
            self.closing = True
            self.queue.clear()
            if exchange.body.over:
                self.transport.loseConnection()
            else:
                # Its body still comes: read to its end (the record keeps it, and
                # a client still sending would be reset before reading its answer).
                self.body_then_close = True
                self.resume_reading()
            return
        if self.queue:
            self._dispatch_queued()
        elif self.receiving is None:
            self.arm(self.limits.keepalive_timeout)
        if not self.queue and not self.closing:
            self.resume_reading()

    def _dispatch_queued(self) -> None:
        """
        Dispatch queued requests, one after another, while each is answered at
        once (a small file, a canned route, a file sent in one sendfile call):
        such a request finishes inside its own dispatch, and its finished()
        leaves the next one to this loop, one level up, rather than dispatching
        it from one level deeper each time (a few hundred pipelined requests
        overflowed Python's stack, and the connection stalled unanswered).
        """
        if self.dispatching:
            return
        self.dispatching = True
        try:
            while (
                self.queue
                and self.current is None
                and not self.gone
                and (not self.closing or self.refusal != 0)
            ):
                self.dispatch(self.queue.popleft())
        finally:
            self.dispatching = False

    def pause_reading(self) -> None:
        if not self.paused:
            self.paused = True
            self.transport.pauseProducing()

    def resume_reading(self) -> None:
        # Bytes after an upgrade request wait, unread, until a splice takes them.
        if self.paused and self.held is None:
            self.paused = False
            self.transport.resumeProducing()

    # -- HTTP/2 -------------------------------------------------------------------------

    def switch_to_h2(self) -> None:
        h2: Any = LimitedH2Connection(self.clock)
        h2.app = self.app
        h2.client = self.client
        site = self.factory.h2_site
        h2.site = site
        h2.requestFactory = site.requestFactory
        h2.factory = site
        h2.timeOut = self.limits.keepalive_timeout
        h2.body_timeout = self.limits.body_timeout
        h2.callLater = self.clock.callLater
        self.arm(None)
        self.h2 = h2
        h2.makeConnection(self.transport)
        self.transport.registerProducer(h2, True)


class HTTPFactory(Factory):
    """The factory behind one listener; TLS listeners with HTTP/2 offer C{h2}."""

    noisy = False

    def __init__(self, app: App, limits: Limits, tls: bool, http2: bool) -> None:
        self.app = app
        self.limits = limits
        self.scheme = "https" if tls else "http"
        self.h2_site: server.Site | None = None
        if tls and http2:
            self.h2_site = h2_site(app, self.scheme, limits.max_body)

    def buildProtocol(self, addr: IAddress | None) -> HTTPConnection:
        return HTTPConnection(self)


@implementer(IProtocolNegotiationFactory)
class NegotiatingHTTPFactory(HTTPFactory):
    """
    A TLS listener's factory: offers C{h2} (unless C{http2: false}) and C{http/1.1}.

    Naming http/1.1 even without h2 tells an ALPN client which protocol it got.
    """

    def acceptableProtocols(self) -> list[bytes]:
        return [b"h2", b"http/1.1"] if self.h2_site is not None else [b"http/1.1"]


def factory_for(app: App, limits: Limits, tls: bool, http2: bool) -> HTTPFactory:
    if tls:
        return NegotiatingHTTPFactory(app, limits, tls, http2)
    return HTTPFactory(app, limits, tls, http2)
