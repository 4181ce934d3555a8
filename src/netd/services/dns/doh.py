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
DNS answer), nor run hyper-h2's general state machine per stream: a lean
HTTP/1.1 reader, and HTTP/2 framing here with hpack decoding the requests'
headers, every frame a read makes ready sent in one write.
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

from netd.connections import cut_if_unread
from netd.services.dns.server import Server
from netd.services.dns.wire import OPT, SOA, Malformed, skip_name, walk_records

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
# Answer bytes written between two looks at what a client has left unread
# (netd.connections.cut_if_unread, a PING flood say): not a look per read.
_UNREAD_LOOK_EVERY = 64 * 1024

# HTTP/2 (RFC 9113): frame types, flags, error codes, settings.
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_FRAME = struct.Struct(">HBBBI")
_SETTING = struct.Struct(">HI")
_DATA, _HEADERS, _PRIORITY_FRAME, _RST_STREAM, _SETTINGS = 0, 1, 2, 3, 4
_PUSH_PROMISE, _PING, _GOAWAY, _WINDOW_UPDATE, _CONTINUATION = 5, 6, 7, 8, 9
_STREAM_FRAMES = frozenset({_DATA, _HEADERS, _PRIORITY_FRAME, _RST_STREAM, _CONTINUATION})
_CONNECTION_FRAMES = frozenset({_SETTINGS, _PING, _GOAWAY})
_END_STREAM = _ACK = 0x1
_END_HEADERS, _PADDED, _PRIORITY = 0x4, 0x8, 0x20
_NO_ERROR = (0).to_bytes(4, "big")
_PROTOCOL_ERROR = (1).to_bytes(4, "big")
_FLOW_CONTROL_ERROR = (3).to_bytes(4, "big")
_STREAM_CLOSED = (5).to_bytes(4, "big")
_FRAME_SIZE_ERROR = (6).to_bytes(4, "big")
_REFUSED_STREAM = (7).to_bytes(4, "big")
_COMPRESSION_ERROR = (9).to_bytes(4, "big")
_ENHANCE_YOUR_CALM = (11).to_bytes(4, "big")
_ENABLE_PUSH, _MAX_CONCURRENT_STREAMS, _INITIAL_WINDOW_SIZE = 2, 3, 4
_MAX_FRAME_SIZE, _MAX_HEADER_LIST_SIZE = 5, 6
# The protocol's defaults, which netd keeps for its own side.
_H2_WINDOW = 65535
_H2_FRAME = 16384
_MAX_WINDOW = 2**31 - 1
_H2_STREAMS = 100
# A header block is at most this long over its CONTINUATION frames: four times
# the header list netd takes, for Huffman codes of up to 30 bits a character.
_MAX_HEADER_BLOCK = 4 * _MAX_HEAD
# HPACK's static table (RFC 7541 appendix A): ":status: 200", and names answers use.
_STATUS_200 = b"\x88"
_STATUS, _CONTENT_TYPE, _CONTENT_LENGTH, _DATE = 8, 31, 28, 33
_STATIC_NAMES = {b"cache-control": 24, b"allow": 22}
# The HPACK table netd advertises (the default), and Huffman strings kept decoded.
_HPACK_TABLE = 4096
_HUFFMAN_KEPT = 10_000


class _Reply:
    """One HTTP answer: status, content type, extra headers, body."""

    __slots__ = ("body", "extra", "h2_fields", "kind", "status")

    def __init__(
        self, status: int, kind: bytes, body: bytes, extra: tuple[tuple[bytes, bytes], ...] = ()
    ) -> None:
        self.status = status
        self.kind = kind
        self.body = body
        self.extra = extra
        # Its HTTP/2 header fields but the date, HPACK-encoded when first sent:
        # a reply is kept (DoHFactory.replies) and sent again for the same answer.
        self.h2_fields: bytes | None = None


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
        # GET queries carry ID 0 (RFC 8484 section 4.1), so a name asked again
        # has the same answer, byte for byte: its reply is made once.
        self.replies: dict[bytes, _Reply] = {}
        self._date = (-1, b"", b"")

    def acceptableProtocols(self) -> list[bytes]:
        return [b"h2", b"http/1.1"]

    def buildProtocol(self, addr: Any) -> Protocol:
        return _Connection(self)

    def date(self) -> bytes:
        """The Date header's value (RFC 9110 section 6.6.1), made once a second."""
        return self._now()[1]

    def date_field(self) -> bytes:
        """The Date header as an HPACK field, made once a second."""
        return self._now()[2]

    def _now(self) -> tuple[int, bytes, bytes]:
        now = int(self.clock.seconds())
        if self._date[0] != now:
            date = formatdate(now, usegmt=True).encode()
            self._date = (now, date, _literal(_DATE, date))
        return self._date

    def answer(
        self,
        method: bytes,
        target: bytes,
        kind: bytes | None,
        body: bytes,
        too_large: bool,
        client: tuple[str, int],
    ) -> _Reply | Deferred[_Reply]:
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

    def _reply(self, answer: bytes) -> _Reply:
        reply = self.replies.get(answer)
        if reply is not None:
            return reply
        key = answer[2:]
        age = self.max_ages.get(key)
        if age is None:
            if len(self.max_ages) >= _MAX_AGES:
                self.max_ages.clear()
            age = self.max_ages[key] = max_age(answer)
        reply = _Reply(200, MESSAGE_TYPE, answer, ((b"cache-control", b"max-age=%d" % age),))
        if len(self.replies) >= _MAX_AGES:
            self.replies.clear()
        self.replies[answer] = reply
        return reply

    def refuse(self, status: int, why: str, extra: tuple[tuple[bytes, bytes], ...] = ()) -> _Reply:
        self.stats.count("doh_rejected")
        return _Reply(status, _TEXT, why.encode() + b"\n", extra)


# Looked for as byte values: "in" with an int is a tenth of the time of "in" with
# a one-byte bytes object, which CPython (bytes_methods.c, _Py_bytes_contains)
# first tries as an int, raising and clearing a TypeError, before searching.
_AMPERSAND, _PERCENT, _PLUS = b"&%+"


def _only_dns_parameter(query: bytes) -> bytes | None:
    """The value of the one C{dns} parameter of a query string, or None."""
    if (
        query.startswith(b"dns=")
        and _AMPERSAND not in query
        and _PERCENT not in query
        and _PLUS not in query
    ):
        return query[4:]  # the usual query string, alone and unquoted
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
        # Bytes written since the last look at how many the client has not taken.
        self.written = 0

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
        if self.written > _UNREAD_LOOK_EVERY and not self.closed:
            # Requests keep coming, answers are not read: cut it, not our memory.
            self.written = 0
            cut_if_unread(self.transport)

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
        if self.closing:
            # The last request is read: what follows it is not kept.
            return
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
        if isinstance(reply, _Reply) and not self.replies:
            self._send(reply, head_only, keep)
            return
        slot: list[Any] = [reply, head_only, keep]
        self.replies.append(slot)
        if isinstance(reply, Deferred):
            self.waiting += 1
            if self.waiting >= _PIPELINE and not self.paused:
                self.paused = True
                self.transport.pauseProducing()

            def ready(done: _Reply) -> None:
                self.waiting -= 1
                slot[0] = done
                self._flush()

            reply.addCallback(ready)

    def _flush(self) -> None:
        replies = self.replies
        while replies and isinstance(replies[0][0], _Reply):
            reply, head_only, keep = replies.popleft()
            self._send(reply, head_only, keep)
        if self.paused and self.waiting < _PIPELINE // 2 and not self.connection.closed:
            self.paused = False
            self.transport.resumeProducing()

    def _send(self, reply: _Reply, head_only: bool, keep: bool) -> None:
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
        data = b"".join(head)
        self.connection.written += len(data)
        self.transport.write(data)
        if not keep:
            self.transport.loseConnection()

    def _fail(self, status: int, why: str) -> None:
        """A request netd cannot read on from: its answer, after those before it, then close."""
        self.closing = True
        slot: list[Any] = [self.doh.refuse(status, why), False, False]
        self.replies.append(slot)
        self._flush()


class _Stream:
    """One HTTP/2 request: what its headers said, its body, the answer's unsent rest."""

    __slots__ = ("body", "ended", "kind", "method", "target", "too_large", "unsent", "window")

    def __init__(self, method: bytes, target: bytes, kind: bytes | None, window: int) -> None:
        self.method = method
        self.target = target
        self.kind = kind
        self.body = bytearray()
        self.too_large = False
        self.ended = False
        self.window = window
        self.unsent: memoryview | None = None


class _HTTP2:
    """
    HTTP/2 (RFC 9113) for DoH: each read's frames handled, then every frame
    they made ready written at once (one TLS record, one send); answers that
    come later from upstreams written as they come.  Request headers are
    decoded with hpack; answers' headers are written as literals from HPACK's
    static table, so the encoder keeps no state.  Bodies over the largest DNS
    message are read and dropped (their window given back), then 413; a
    header list over 16 KiB is 431.  Bad framing ends the connection with a
    GOAWAY, a bad frame on one stream that stream with a RST_STREAM (RFC 9113
    section 5.4).  A client's GOAWAY closes the connection once the answers
    it waits for are written.
    """

    def __init__(self, connection: _Connection) -> None:
        self.connection = connection
        self.doh = connection.doh
        self.transport = connection.transport
        self.decoder = _HeaderDecoder()
        self.buffer = bytearray()
        self.preface_seen = False
        self.streams: dict[int, _Stream] = {}
        self.last_stream = 0
        # A header block still waiting for its CONTINUATION frames: stream, flags, bytes.
        self.continued: tuple[int, int, bytearray] | None = None
        self.window = _H2_WINDOW
        self.stream_window = _H2_WINDOW
        self.frame_size = _H2_FRAME
        self.out: list[bytes] = [_SERVER_SETTINGS]
        # DATA bytes read since netd last wrote the WINDOW_UPDATEs giving them
        # back: the most a client may send on the windows it was given.
        self.unacknowledged = 0
        self.settings_seen = False
        self.waiting = 0
        # The client said GOAWAY: close once nothing is owed.
        self.closing = False
        self.gone = False

    def received(self, data: bytes) -> None:
        if self.gone:
            return
        buffer = self.buffer
        buffer += data
        offset = 0
        if not self.preface_seen:
            if len(buffer) < len(_PREFACE):
                return
            if buffer[: len(_PREFACE)] != _PREFACE:
                self._go_away(_PROTOCOL_ERROR)
                return
            self.preface_seen = True
            offset = len(_PREFACE)
        end = len(buffer)
        try:
            while end - offset >= 9:
                high, low, kind, flags, stream_id = _FRAME.unpack_from(buffer, offset)
                length = (high << 8) | low
                stream_id &= 0x7FFFFFFF
                if length > _H2_FRAME:
                    raise _H2Error(_FRAME_SIZE_ERROR)
                if end - offset - 9 < length:
                    break
                payload = bytes(buffer[offset + 9 : offset + 9 + length])
                offset += 9 + length
                if not self.settings_seen:
                    # The client's preface ends with its SETTINGS (RFC 9113 section 3.4).
                    if kind != _SETTINGS or flags & _ACK:
                        raise _H2Error(_PROTOCOL_ERROR)
                    self.settings_seen = True
                self._frame(kind, flags, stream_id, payload)
                if self.gone:
                    return
        except _H2Error as e:
            self._go_away(e.code)
            return
        del buffer[:offset]
        self._write()

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self.continued is not None and kind != _CONTINUATION:
            raise _H2Error(_PROTOCOL_ERROR)
        if (kind in _STREAM_FRAMES and not stream_id) or (kind in _CONNECTION_FRAMES and stream_id):
            raise _H2Error(_PROTOCOL_ERROR)
        if kind == _HEADERS:
            self._headers(flags, stream_id, payload)
        elif kind == _CONTINUATION:
            if self.continued is None or self.continued[0] != stream_id:
                raise _H2Error(_PROTOCOL_ERROR)
            self.continued[2].extend(payload)
            if len(self.continued[2]) > _MAX_HEADER_BLOCK:
                # CONTINUATION frames without end would hold memory without end.
                raise _H2Error(_ENHANCE_YOUR_CALM)
            if flags & _END_HEADERS:
                continued, self.continued = self.continued, None
                self._header_block(stream_id, continued[1], bytes(continued[2]))
        elif kind == _DATA:
            self._data(flags, stream_id, payload)
        elif kind == _SETTINGS:
            if not flags & _ACK:
                self._settings(payload)
            elif payload:
                raise _H2Error(_FRAME_SIZE_ERROR)
        elif kind == _WINDOW_UPDATE:
            self._window_update(stream_id, payload)
        elif kind == _PING:
            if len(payload) != 8:
                raise _H2Error(_FRAME_SIZE_ERROR)
            if not flags & _ACK:
                self.out.append(_frame(_PING, _ACK, 0, payload))
        elif kind == _RST_STREAM:
            if len(payload) != 4:
                raise _H2Error(_FRAME_SIZE_ERROR)
            self.streams.pop(stream_id, None)
        elif kind == _GOAWAY:
            if len(payload) < 8:
                raise _H2Error(_FRAME_SIZE_ERROR)
            self.closing = True
        elif kind == _PRIORITY_FRAME:
            # Read and ignored (RFC 9113 section 5.3.2), but it has a size.
            if len(payload) != 5:
                self._reset(stream_id, _FRAME_SIZE_ERROR)
        elif kind == _PUSH_PROMISE:
            raise _H2Error(_PROTOCOL_ERROR)
        # Unknown frame types are ignored (RFC 9113 section 5.5).

    def _window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise _H2Error(_FRAME_SIZE_ERROR)
        increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
        if stream_id == 0:
            if not increment:
                raise _H2Error(_PROTOCOL_ERROR)
            self.window += increment
            if self.window > _MAX_WINDOW:
                raise _H2Error(_FLOW_CONTROL_ERROR)
            for sid in [s for s, stream in self.streams.items() if stream.unsent]:
                self._send_data(sid)
            return
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        stream.window += increment
        if not increment:
            self._reset(stream_id, _PROTOCOL_ERROR)
        elif stream.window > _MAX_WINDOW:
            self._reset(stream_id, _FLOW_CONTROL_ERROR)
        else:
            self._send_data(stream_id)

    def _reset(self, stream_id: int, code: bytes) -> None:
        """A stream error (RFC 9113 section 5.4.2): RST_STREAM, and the stream forgotten."""
        self.streams.pop(stream_id, None)
        self.out.append(_frame(_RST_STREAM, 0, stream_id, code))

    def _headers(self, flags: int, stream_id: int, payload: bytes) -> None:
        start, end = 0, len(payload)
        if flags & _PADDED:
            if not payload:
                raise _H2Error(_PROTOCOL_ERROR)
            start, end = 1, end - payload[0]
        if flags & _PRIORITY:
            start += 5
        if start > end:
            raise _H2Error(_PROTOCOL_ERROR)
        block = payload[start:end]
        if flags & _END_HEADERS:
            self._header_block(stream_id, flags, block)
        else:
            self.continued = (stream_id, flags, bytearray(block))

    def _header_block(self, stream_id: int, flags: int, block: bytes) -> None:
        # Decoded even for a stream refused below: the decoder's table must follow.
        headers, too_long = self.decoder.decode(block)
        stream = self.streams.get(stream_id)
        if stream is not None:
            if stream.ended:
                # Its request is complete (half-closed, RFC 9113 section 5.1): a
                # second one on it would be answered twice.
                self._reset(stream_id, _STREAM_CLOSED)
            elif flags & _END_STREAM:
                # Trailers: nothing in them matters to DoH.
                self._ended(stream_id, stream)
            return
        if stream_id % 2 == 0 or stream_id <= self.last_stream:
            raise _H2Error(_PROTOCOL_ERROR)
        self.last_stream = stream_id
        # Streams reset while their answers are on the way still count: else
        # opening and resetting streams would queue upstream queries without end.
        if len(self.streams) >= _H2_STREAMS or self.waiting >= _H2_STREAMS:
            self.out.append(_frame(_RST_STREAM, 0, stream_id, _REFUSED_STREAM))
            return
        if too_long:
            stream = self.streams[stream_id] = _Stream(b"", b"", None, self.stream_window)
            stream.ended = True
            refusal = self.doh.refuse(431, "the request's header list is over 16 KiB")
            self._send(stream_id, stream, refusal)
            return
        method = target = b""
        kind = None
        for name, value in headers:
            if name == b":method":
                method = value
            elif name == b":path":
                target = value
            elif name == b"content-type":
                kind = value
        stream = self.streams[stream_id] = _Stream(method, target, kind, self.stream_window)
        if flags & _END_STREAM:
            self._ended(stream_id, stream)

    def _data(self, flags: int, stream_id: int, payload: bytes) -> None:
        if payload:
            # Flow control counts the whole frame, padding too; given back at once.
            self.unacknowledged += len(payload)
            if self.unacknowledged > _H2_WINDOW:
                raise _H2Error(_FLOW_CONTROL_ERROR)
            self.out.append(_frame(_WINDOW_UPDATE, 0, 0, len(payload).to_bytes(4, "big")))
        stream = self.streams.get(stream_id)
        if stream is None or stream.ended:
            return
        if flags & _PADDED:
            if not payload or payload[0] >= len(payload):
                raise _H2Error(_PROTOCOL_ERROR)
            payload = payload[1 : len(payload) - payload[0]]
        if flags & _END_STREAM:
            self._add_body(stream, payload)
            self._ended(stream_id, stream)
            return
        if payload:
            self.out.append(_frame(_WINDOW_UPDATE, 0, stream_id, len(payload).to_bytes(4, "big")))
        self._add_body(stream, payload)

    def _add_body(self, stream: _Stream, data: bytes) -> None:
        if stream.too_large:
            return
        if len(stream.body) + len(data) > MAX_MESSAGE:
            stream.body = bytearray()
            stream.too_large = True
            return
        stream.body += data

    def _settings(self, payload: bytes) -> None:
        if len(payload) % 6:
            raise _H2Error(_FRAME_SIZE_ERROR)
        for offset in range(0, len(payload), 6):
            setting, value = _SETTING.unpack_from(payload, offset)
            if setting == _INITIAL_WINDOW_SIZE:
                if value > _MAX_WINDOW:
                    raise _H2Error(_FLOW_CONTROL_ERROR)
                for stream in self.streams.values():
                    stream.window += value - self.stream_window
                    if stream.window > _MAX_WINDOW:
                        raise _H2Error(_FLOW_CONTROL_ERROR)
                self.stream_window = value
            elif setting == _ENABLE_PUSH:
                if value > 1:
                    raise _H2Error(_PROTOCOL_ERROR)
            elif setting == _MAX_FRAME_SIZE:
                if not _H2_FRAME <= value <= 0xFFFFFF:
                    raise _H2Error(_PROTOCOL_ERROR)
                self.frame_size = value
        self.out.append(_SETTINGS_ACK)
        for sid in [s for s, stream in self.streams.items() if stream.unsent]:
            self._send_data(sid)

    def _ended(self, stream_id: int, stream: _Stream) -> None:
        stream.ended = True
        reply = self.doh.answer(
            stream.method,
            stream.target,
            stream.kind,
            bytes(stream.body),
            stream.too_large,
            self.connection.client,
        )
        stream.body = bytearray()
        if isinstance(reply, _Reply):
            self._send(stream_id, stream, reply)
            return
        self.waiting += 1

        def ready(done: _Reply) -> None:
            self.waiting -= 1
            if self.streams.get(stream_id) is stream:
                self._send(stream_id, stream, done)
                self._write()

        reply.addCallback(ready)

    def _send(self, stream_id: int, stream: _Stream, reply: _Reply) -> None:
        head_only = stream.method == b"HEAD"
        fields = reply.h2_fields
        if fields is None:
            fields = reply.h2_fields = b"".join(
                [
                    _STATUS_200 if reply.status == 200 else _literal(_STATUS, b"%d" % reply.status),
                    _literal(_CONTENT_TYPE, reply.kind),
                    _literal(_CONTENT_LENGTH, b"%d" % len(reply.body)),
                    *(_literal(_STATIC_NAMES[name], value) for name, value in reply.extra),
                ]
            )
        flags = _END_HEADERS | (_END_STREAM if head_only else 0)
        self.out.append(_frame(_HEADERS, flags, stream_id, fields + self.doh.date_field()))
        if head_only:
            del self.streams[stream_id]
            return
        body = reply.body
        size = len(body)
        if 0 < size <= self.window and size <= stream.window and size <= self.frame_size:
            # A DNS answer nearly always goes in one DATA frame.
            self.window -= size
            del self.streams[stream_id]
            self.out.append(_frame(_DATA, _END_STREAM, stream_id, body))
            return
        stream.unsent = memoryview(body)
        self._send_data(stream_id)

    def _send_data(self, stream_id: int) -> None:
        """As much of a stream's answer as the windows and the frame size allow."""
        stream = self.streams[stream_id]
        rest = stream.unsent
        if rest is None:
            return
        while True:
            room = min(self.window, stream.window, self.frame_size)
            if room <= 0 and rest:
                stream.unsent = rest
                return
            chunk, rest = rest[:room], rest[room:]
            self.window -= len(chunk)
            stream.window -= len(chunk)
            self.out.append(_frame(_DATA, 0 if rest else _END_STREAM, stream_id, bytes(chunk)))
            if not rest:
                del self.streams[stream_id]
                return

    def _write(self) -> None:
        if self.out and not self.connection.closed and not self.gone:
            data = b"".join(self.out)
            self.connection.written += len(data)
            self.transport.write(data)
        self.out = []
        self.unacknowledged = 0
        if self.closing and not self.streams and not self.waiting and not self.gone:
            self.gone = True
            self.transport.loseConnection()

    def _go_away(self, code: bytes) -> None:
        self.out.append(_frame(_GOAWAY, 0, 0, self.last_stream.to_bytes(4, "big") + code))
        self._write()
        self.gone = True
        self.transport.loseConnection()


class _HeaderDecoder:
    """
    HPACK (RFC 7541) decoding of request headers: the static table, a
    dynamic table of netd's advertised 4096 bytes, and Huffman strings
    decoded by hpack's table, kept by their coded bytes (a DoH client asks
    the same GET paths again, as a resolver asks the same names).
    Anything malformed is a COMPRESSION_ERROR.
    """

    def __init__(self) -> None:
        from hpack.huffman_table import decode_huffman
        from hpack.table import HeaderTable

        self.static: tuple[tuple[bytes, bytes], ...] = HeaderTable.STATIC_TABLE
        self.huffman: Callable[[bytes], bytes] = decode_huffman
        self.dynamic: deque[tuple[bytes, bytes]] = deque()
        self.size = 0
        self.limit = _HPACK_TABLE
        self.decoded: dict[bytes, bytes] = {}

    def decode(self, block: bytes) -> tuple[list[tuple[bytes, bytes]], bool]:
        """
        The header list of C{block}, and whether it is over 16 KiB (then read to
        its end all the same, for the table, and what is past the limit dropped).
        """
        headers = []
        listed = 0
        offset, end = 0, len(block)
        static = self.static
        statics = len(static)
        while offset < end:
            first = block[offset]
            if first & 0x80:
                # An indexed field, most of a request's: its one-byte index and a
                # static entry taken here, not by two calls a field.
                index = first & 0x7F
                if index < 0x7F:
                    offset += 1
                else:
                    index, offset = _integer(block, offset, 7)
                header = static[index - 1] if 0 < index <= statics else self._entry(index)
            elif first & 0xE0 == 0x20:
                # A dynamic table size update: at most what netd advertised, and
                # only before the block's first field (RFC 7541 section 4.2).
                self.limit, offset = _integer(block, offset, 5)
                if self.limit > _HPACK_TABLE or listed:
                    raise _H2Error(_COMPRESSION_ERROR)
                self._evict()
                continue
            else:
                indexing = bool(first & 0x40)
                index, offset = _integer(block, offset, 6 if indexing else 4)
                if index:
                    name = self._entry(index)[0]
                else:
                    name, offset = self._string(block, offset)
                value, offset = self._string(block, offset)
                header = (name, value)
                if indexing:
                    self.dynamic.appendleft(header)
                    self.size += len(name) + len(value) + 32
                    self._evict()
            listed += len(header[0]) + len(header[1]) + 32
            if listed <= _MAX_HEAD:
                headers.append(header)
        return headers, listed > _MAX_HEAD

    def _entry(self, index: int) -> tuple[bytes, bytes]:
        if 0 < index <= len(self.static):
            return self.static[index - 1]
        index -= len(self.static) + 1
        if 0 <= index < len(self.dynamic):
            return self.dynamic[index]
        raise _H2Error(_COMPRESSION_ERROR)

    def _evict(self) -> None:
        while self.size > self.limit:
            name, value = self.dynamic.pop()
            self.size -= len(name) + len(value) + 32

    def _string(self, block: bytes, offset: int) -> tuple[bytes, int]:
        if offset >= len(block):
            raise _H2Error(_COMPRESSION_ERROR)
        huffman = block[offset] & 0x80
        length = block[offset] & 0x7F
        if length < 0x7F:
            offset += 1
        else:
            length, offset = _integer(block, offset, 7)
        end = offset + length
        if end > len(block):
            raise _H2Error(_COMPRESSION_ERROR)
        data = block[offset:end]
        if not huffman:
            return data, end
        decoded = self.decoded.get(data)
        if decoded is None:
            from hpack import HPACKDecodingError

            try:
                decoded = self.huffman(data)
            except HPACKDecodingError:
                raise _H2Error(_COMPRESSION_ERROR) from None
            if len(self.decoded) >= _HUFFMAN_KEPT:
                self.decoded.clear()
            self.decoded[data] = decoded
        return decoded, end


def _integer(block: bytes, offset: int, bits: int) -> tuple[int, int]:
    """An HPACK integer with a C{bits}-bit prefix at C{offset}, and the offset past it."""
    mask = (1 << bits) - 1
    value = block[offset] & mask
    offset += 1
    if value < mask:
        return value, offset
    shift = 0
    while True:
        if offset >= len(block) or shift > 28:
            raise _H2Error(_COMPRESSION_ERROR)
        byte = block[offset]
        offset += 1
        value += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, offset


class _H2Error(Exception):
    """A connection error (RFC 9113 section 5.4.1): GOAWAY with C{code}, then close."""

    def __init__(self, code: bytes) -> None:
        super().__init__(code)
        self.code = code


def _frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    size = len(payload)
    return _FRAME.pack(size >> 8, size & 0xFF, kind, flags, stream_id) + payload


def _literal(index: int, value: bytes) -> bytes:
    """A header as an HPACK literal, not indexed, named from the static table (RFC 7541 6.2.2)."""
    name = bytes([index]) if index < 15 else bytes([15, index - 15])
    size = len(value)
    if size < 127:
        return name + bytes([size]) + value
    prefix = bytearray([127])
    size -= 127
    while size >= 128:
        prefix.append((size & 0x7F) | 0x80)
        size >>= 7
    prefix.append(size)
    return name + bytes(prefix) + value


_SERVER_SETTINGS = _frame(
    _SETTINGS,
    0,
    0,
    _SETTING.pack(_MAX_CONCURRENT_STREAMS, _H2_STREAMS)
    + _SETTING.pack(_MAX_HEADER_LIST_SIZE, _MAX_HEAD),
)
_SETTINGS_ACK = _frame(_SETTINGS, _ACK, 0, b"")


def max_age(reply: bytes) -> int:
    """
    How long an HTTP cache may keep C{reply}: the smallest TTL of its answer
    and authority records, an authority SOA's (a negative answer's) at most
    its MINIMUM (RFC 8484 5.1, RFC 2308 5); 0 for an answer with neither.
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
    ttls += [
        int.from_bytes(reply[r.end - 4 : r.end], "big")
        for r in records[ancount:]
        if r.type == SOA and r.end - r.rdata >= 20
    ]
    return min(ttls, default=0)
