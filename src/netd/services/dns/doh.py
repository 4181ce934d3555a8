"""
DNS over HTTPS (RFC 8484) on the dns service's C{doh:} listeners.

    doh: [{endpoint: "ssl:8443", tls: lab}]

C{GET /dns-query?dns=BASE64URL} and C{POST /dns-query} with an
C{application/dns-message} body, over HTTP/1.1 or HTTP/2 (ALPN), answered by
the same L{Server} as UDP and TCP, with the answer's smallest TTL as the
C{Cache-Control} C{max-age} (section 5.1).  A body or message over 65535 bytes
is 413, a bad C{dns} parameter or a message that is no query 400.

A DoH request is one small message each way, so these listeners speak just
enough HTTP for it rather than build a twisted.web request per query (its
headers, arguments, resource lookup and producer machinery cost ten times the
DNS answer): a lean HTTP/1.1 parser, and hyper-h2's state machine driven
directly for HTTP/2, every frame a read makes ready sent in one write.
"""

from __future__ import annotations

import binascii
import struct
from collections import deque
from collections.abc import Callable
from email.utils import formatdate
from typing import Any
from urllib.parse import unquote_to_bytes

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocolNegotiationFactory
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from netd.services.dns.server import Server
from netd.services.dns.wire import OPT, Malformed, skip_name, walk_records

__all__ = ["MAX_MESSAGE", "DoHFactory", "max_age"]

PATH = b"/dns-query"
MESSAGE_TYPE = b"application/dns-message"
# The largest DNS message (its TCP length prefix is two bytes): anything longer is no query.
MAX_MESSAGE = 65535
# A request's line and headers; a DoH client sends a few hundred bytes.
_MAX_HEAD = 16384
# Requests one connection may have waiting on upstreams before netd stops reading it.
_PIPELINE = 100
# max-age by answer (ID aside): answers repeat, their records need not be walked again.
_MAX_AGES = 10_000
_COUNTS = struct.Struct(">HHHH")
_BASE64URL = bytes.maketrans(b"-_", b"+/")
_REASONS = {
    200: b"OK",
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    411: b"Length Required",
    413: b"Content Too Large",
    415: b"Unsupported Media Type",
    431: b"Request Header Fields Too Large",
}
_ALLOW = (b"allow", b"GET, HEAD, POST")
_TEXT = b"text/plain; charset=utf-8"
_UNIX_CLIENT = "unix"


class Reply:
    """One HTTP answer: status, content type, extra headers, body."""

    __slots__ = ("body", "extra", "kind", "status")

    def __init__(
        self, status: int, kind: bytes, body: bytes, extra: tuple[tuple[bytes, bytes], ...] = ()
    ) -> None:
        self.status = status
        self.kind = kind
        self.body = body
        self.extra = extra


@implementer(IProtocolNegotiationFactory)
class DoHFactory(Factory):
    """
    The C{doh:} listeners' protocols: HTTP/2 where TLS negotiates C{h2},
    HTTP/1.1 otherwise, connections idle for C{timeout} seconds closed.
    """

    noisy = False

    def __init__(self, dns_server: Server, timeout: float) -> None:
        self.dns = dns_server
        self.stats = dns_server.stats
        self.clock = dns_server.clock
        self.timeout = timeout
        self.max_ages: dict[bytes, int] = {}
        self._date = (-1, b"")

    def acceptableProtocols(self) -> list[bytes]:
        return [b"h2", b"http/1.1"]

    def buildProtocol(self, addr: Any) -> Protocol:
        return _Connection(self)

    def date(self) -> bytes:
        """The Date header's value (RFC 9110 section 6.6.1), made once a second."""
        now = int(self.clock.seconds())
        if self._date[0] != now:
            self._date = (now, formatdate(now, usegmt=True).encode())
        return self._date[1]

    def answer(
        self,
        method: bytes,
        target: bytes,
        kind: bytes | None,
        body: bytes,
        too_large: bool,
        client: tuple[str, int],
    ) -> Reply | Deferred[Reply]:
        """The reply to one request, now or once an upstream answers."""
        self.stats.count("doh_requests")
        path, _, query = target.partition(b"?")
        if path != PATH:
            return self.refuse(404, "DNS over HTTPS is at /dns-query")
        if too_large:
            return self.refuse(413, f"a DNS message is at most {MAX_MESSAGE} bytes")
        if method == b"GET" or method == b"HEAD":
            encoded = _only_dns_parameter(query)
            if encoded is None:
                return self.refuse(400, "one dns= parameter, the query in base64url")
            try:
                # base64url without padding (section 4.1); padded is read as well.
                data = binascii.a2b_base64(
                    encoded.translate(_BASE64URL) + b"=" * (-len(encoded) % 4), strict_mode=True
                )
            except binascii.Error:
                return self.refuse(400, "dns= is not base64url")
            if len(data) > MAX_MESSAGE:
                return self.refuse(413, f"a DNS message is at most {MAX_MESSAGE} bytes")
        elif method == b"POST":
            if (kind or b"").split(b";")[0].strip().lower() != MESSAGE_TYPE:
                return self.refuse(415, "the body must be application/dns-message")
            data = body
        else:
            return self.refuse(405, "GET or POST", (_ALLOW,))
        answer = self.dns.handle(data, client, False, "https")
        if answer is None:
            return self.refuse(400, "not a DNS query")
        if isinstance(answer, bytes):
            return self._reply(answer)
        return answer.addCallback(self._reply)

    def _reply(self, answer: bytes) -> Reply:
        key = answer[2:]
        age = self.max_ages.get(key)
        if age is None:
            if len(self.max_ages) >= _MAX_AGES:
                self.max_ages.clear()
            age = self.max_ages[key] = max_age(answer)
        return Reply(200, MESSAGE_TYPE, answer, ((b"cache-control", b"max-age=%d" % age),))

    def refuse(self, status: int, why: str, extra: tuple[tuple[bytes, bytes], ...] = ()) -> Reply:
        self.stats.count("doh_rejected")
        return Reply(status, _TEXT, why.encode() + b"\n", extra)


def _only_dns_parameter(query: bytes) -> bytes | None:
    """The value of the one C{dns} parameter of a query string, or None."""
    found = None
    for pair in query.split(b"&"):
        name, equals, value = pair.partition(b"=")
        if b"%" in name or b"+" in name:
            name = unquote_to_bytes(name.replace(b"+", b" "))
        if name != b"dns":
            continue
        if found is not None or not equals:
            return None
        if b"%" in value or b"+" in value:
            value = unquote_to_bytes(value.replace(b"+", b" "))
        found = value
    return found


class _Connection(Protocol, TimeoutMixin):
    """
    One DoH connection: which HTTP it speaks is known at its first bytes,
    once TLS has negotiated (or not) C{h2}.
    """

    transport: Any

    def __init__(self, factory: DoHFactory) -> None:
        self.doh = factory
        self.http: _HTTP1 | _HTTP2 | None = None
        self.closed = False

    def connectionMade(self) -> None:
        self.callLater = self.doh.clock.callLater  # type: ignore[method-assign]
        peer = self.transport.getPeer()
        self.client = (getattr(peer, "host", _UNIX_CLIENT), getattr(peer, "port", 0))
        self.setTimeout(self.doh.timeout)

    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        if self.http is None:
            if getattr(self.transport, "negotiatedProtocol", None) == b"h2":
                self.http = _HTTP2(self)
            else:
                self.http = _HTTP1(self)
        self.http.received(data)

    def timeoutConnection(self) -> None:
        if self.http is not None and self.http.waiting:
            # Answers are still on their way from upstreams: the client is not idle.
            self.setTimeout(self.doh.timeout)
            return
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.closed = True
        self.setTimeout(None)


class _HTTP1:
    """
    HTTP/1.1 for DoH: requests with a Content-Length body (or none),
    pipelined, answered in order; chunked bodies are 411 (DoH clients send
    a length), a head over 16 KiB 431, a malformed one 400, each then closed.
    """

    def __init__(self, connection: _Connection) -> None:
        self.connection = connection
        self.doh = connection.doh
        self.transport = connection.transport
        self.buffer = bytearray()
        # The request being read: its head's fields while its body arrives.
        self.request: tuple[bytes, bytes, bytes | None, bool, int] | None = None
        self.body_left = 0
        self.replies: deque[list[Any]] = deque()
        self.waiting = 0
        self.paused = False
        self.closing = False

    def received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        offset = 0
        while not self.closing:
            if self.request is None:
                end = buffer.find(b"\r\n\r\n", offset)
                if end < 0:
                    if len(buffer) - offset > _MAX_HEAD:
                        self._fail(431, "the request's head is over 16 KiB")
                    break
                if end - offset > _MAX_HEAD:
                    self._fail(431, "the request's head is over 16 KiB")
                    break
                head = bytes(buffer[offset:end])
                offset = end + 4
                if not self._read_head(head):
                    break
            method, target, kind, keep_alive, length = self.request  # type: ignore[misc]
            if length > MAX_MESSAGE:
                # Read and dropped, not kept: then 413, and the connection goes on.
                dropped = min(self.body_left, len(buffer) - offset)
                offset += dropped
                self.body_left -= dropped
                if self.body_left:
                    break
                body = b""
            else:
                if len(buffer) - offset < length:
                    break
                body = bytes(buffer[offset : offset + length])
                offset += length
            self.request = None
            self._answer(method, target, kind, body, length > MAX_MESSAGE, keep_alive)
        del buffer[:offset]

    def _read_head(self, head: bytes) -> bool:
        """Take a request's line and headers; False (and the connection closing) if bad."""
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
            self._fail(400, "not an HTTP/1.1 request line")
            return False
        method, target, version = parts
        keep_alive = version == b"HTTP/1.1"
        kind = None
        length = 0
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon:
                self._fail(400, "a header line without a colon")
                return False
            name = name.lower()
            if name == b"content-length":
                value = value.strip()
                if not value.isdigit() or len(value) > 18:
                    self._fail(400, "a bad Content-Length")
                    return False
                length = int(value)
            elif name == b"content-type":
                kind = value.strip()
            elif name == b"connection":
                tokens = value.lower()
                if b"close" in tokens:
                    keep_alive = False
                elif b"keep-alive" in tokens:
                    keep_alive = True
            elif name == b"transfer-encoding":
                self._fail(411, "a DNS message body needs a Content-Length")
                return False
            elif (
                name == b"expect"
                and value.strip().lower() == b"100-continue"
                # Only when no earlier answer is owed: it must not come before one.
                and not self.replies
            ):
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.request = (method, target, kind, keep_alive, length)
        self.body_left = length
        return True

    def _answer(
        self, method: bytes, target: bytes, kind: bytes | None, body: bytes, big: bool, keep: bool
    ) -> None:
        reply = self.doh.answer(method, target, kind, body, big, self.connection.client)
        head_only = method == b"HEAD"
        if not keep:
            self.closing = True
        if isinstance(reply, Reply) and not self.replies:
            self._send(reply, head_only, keep)
            return
        slot: list[Any] = [reply, head_only, keep]
        self.replies.append(slot)
        if isinstance(reply, Deferred):
            self.waiting += 1
            if self.waiting >= _PIPELINE and not self.paused:
                self.paused = True
                self.transport.pauseProducing()

            def ready(done: Reply) -> None:
                self.waiting -= 1
                slot[0] = done
                self._flush()

            reply.addCallback(ready)

    def _flush(self) -> None:
        replies = self.replies
        while replies and isinstance(replies[0][0], Reply):
            reply, head_only, keep = replies.popleft()
            self._send(reply, head_only, keep)
        if self.paused and self.waiting < _PIPELINE // 2 and not self.connection.closed:
            self.paused = False
            self.transport.resumeProducing()

    def _send(self, reply: Reply, head_only: bool, keep: bool) -> None:
        if self.connection.closed:
            return
        head = [
            b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\ndate: %s\r\n"
            % (reply.status, _REASONS[reply.status], reply.kind, len(reply.body), self.doh.date())
        ]
        for name, value in reply.extra:
            head.append(b"%s: %s\r\n" % (name, value))
        if not keep:
            head.append(b"connection: close\r\n")
        head.append(b"\r\n")
        if not head_only:
            head.append(reply.body)
        self.transport.write(b"".join(head))
        if not keep:
            self.transport.loseConnection()

    def _fail(self, status: int, why: str) -> None:
        """A request netd cannot read on from: its answer, after those before it, then close."""
        self.closing = True
        slot: list[Any] = [self.doh.refuse(status, why), False, False]
        self.replies.append(slot)
        self._flush()


class _HTTP2:
    """
    HTTP/2 for DoH on hyper-h2: each read's events handled, then every frame
    they made ready written at once (one TLS record, one send), and answers
    that come later from upstreams written as they come.  Bodies over the
    largest DNS message are read and dropped (their window given back), then 413.
    """

    def __init__(self, connection: _Connection) -> None:
        from h2.config import H2Configuration
        from h2.connection import H2Connection

        self.connection = connection
        self.doh = connection.doh
        self.transport = connection.transport
        # Answers' headers are netd's own, valid as written: not checked again per frame.
        self.h2 = H2Connection(
            H2Configuration(
                client_side=False,
                header_encoding=None,
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
                validate_inbound_headers=False,
                normalize_inbound_headers=False,
            )
        )
        self.h2.initiate_connection()
        # stream id -> [method, path, content type, body, too large]
        self.streams: dict[int, list[Any]] = {}
        # stream id -> the rest of an answer waiting for flow-control window
        self.unsent: dict[int, memoryview] = {}
        self.waiting = 0
        from h2 import events

        self.handlers: dict[type, Callable[[Any], None]] = {
            events.RequestReceived: self._request,
            events.DataReceived: self._data,
            events.StreamEnded: self._ended,
            events.StreamReset: self._reset,
            events.WindowUpdated: self._window,
            events.RemoteSettingsChanged: self._window,
            events.ConnectionTerminated: self._terminated,
        }

    def received(self, data: bytes) -> None:
        from h2.exceptions import ProtocolError

        try:
            happened = self.h2.receive_data(data)
        except ProtocolError:
            self._write()
            self.transport.loseConnection()
            return
        handlers = self.handlers
        for event in happened:
            handler = handlers.get(type(event))
            if handler is not None:
                handler(event)
        self._write()

    def _write(self) -> None:
        if not self.connection.closed:
            data = self.h2.data_to_send()
            if data:
                self.transport.write(data)

    def _request(self, event: Any) -> None:
        method = target = kind = None
        for name, value in event.headers:
            if name == b":method":
                method = value
            elif name == b":path":
                target = value
            elif name == b"content-type":
                kind = value
        self.streams[event.stream_id] = [method or b"", target or b"", kind, bytearray(), False]

    def _data(self, event: Any) -> None:
        self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        stream = self.streams.get(event.stream_id)
        if stream is None or stream[4]:
            return
        body: bytearray = stream[3]
        if len(body) + len(event.data) > MAX_MESSAGE:
            stream[3] = bytearray()
            stream[4] = True
            return
        body += event.data

    def _ended(self, event: Any) -> None:
        stream_id = event.stream_id
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        method, target, kind, body, too_large = stream
        client = self.connection.client
        reply = self.doh.answer(method, target, kind, bytes(body), too_large, client)
        if isinstance(reply, Reply):
            self._send(stream_id, reply)
            return
        self.waiting += 1

        def ready(done: Reply) -> None:
            self.waiting -= 1
            self._send(stream_id, done)
            self._write()

        reply.addCallback(ready)

    def _send(self, stream_id: int, reply: Reply) -> None:
        from h2.exceptions import StreamClosedError

        stream = self.streams.pop(stream_id, None)
        if stream is None:
            return
        head_only = stream[0] == b"HEAD"
        headers = [
            (b":status", b"%d" % reply.status),
            (b"content-type", reply.kind),
            (b"content-length", b"%d" % len(reply.body)),
            (b"date", self.doh.date()),
            *reply.extra,
        ]
        try:
            self.h2.send_headers(stream_id, headers, end_stream=head_only)
        except StreamClosedError:
            return
        if not head_only:
            self.unsent[stream_id] = memoryview(reply.body)
            self._send_data(stream_id)

    def _send_data(self, stream_id: int) -> None:
        """As much of a stream's answer as its window and the frame size allow."""
        from h2.exceptions import StreamClosedError

        rest = self.unsent[stream_id]
        try:
            while True:
                room = min(
                    self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size
                )
                if room <= 0 and rest:
                    return
                chunk, rest = rest[:room], rest[room:]
                self.unsent[stream_id] = rest
                self.h2.send_data(stream_id, bytes(chunk), end_stream=not rest)
                if not rest:
                    break
        except StreamClosedError:
            pass
        del self.unsent[stream_id]

    def _reset(self, event: Any) -> None:
        self.streams.pop(event.stream_id, None)
        self.unsent.pop(event.stream_id, None)

    def _window(self, event: Any) -> None:
        for stream_id in list(self.unsent):
            self._send_data(stream_id)

    def _terminated(self, event: Any) -> None:
        self._write()
        self.transport.loseConnection()


def max_age(reply: bytes) -> int:
    """
    How long an HTTP cache may keep C{reply}: the smallest TTL of its answer
    and authority records (a negative answer's SOA says how long it holds);
    0 for an answer with neither.
    """
    try:
        qdcount, ancount, nscount, _ = _COUNTS.unpack_from(reply, 4)
        offset = 12
        for _ in range(qdcount):
            offset = skip_name(reply, offset) + 4
        records, _ = walk_records(reply, offset, ancount + nscount)
    except (Malformed, struct.error):
        return 0
    ttls = [
        int.from_bytes(reply[r.ttl_offset : r.ttl_offset + 4], "big")
        for r in records
        if r.type != OPT
    ]
    return min(ttls, default=0)
