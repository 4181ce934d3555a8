"""
DNS over HTTPS (RFC 8484) on the dns service's C{doh:} listeners.

    doh: [{endpoint: "ssl:8443", tls: lab}]

C{GET /dns-query?dns=BASE64URL} and C{POST /dns-query} with an
C{application/dns-message} body, over HTTP/1.1 or HTTP/2 (ALPN), answered by
the same L{Server} as UDP and TCP, with the answer's smallest TTL as the
C{Cache-Control} C{max-age} (section 5.1).  A body or message over 65535 bytes
is 413, a bad C{dns} parameter or a message that is no query 400.
"""

from __future__ import annotations

import base64
import binascii
import struct

from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource

from netd.services.dns.server import Server
from netd.services.dns.wire import OPT, Malformed, skip_name, walk_records
from netd.websites import bounded_site

__all__ = ["MAX_MESSAGE", "doh_site", "max_age"]

PATH = b"/dns-query"
MESSAGE_TYPE = b"application/dns-message"
# The largest DNS message (its TCP length prefix is two bytes): anything longer is no query.
MAX_MESSAGE = 65535
_COUNTS = struct.Struct(">HHHH")


def doh_site(dns_server: Server, timeout: float) -> server.Site:
    return bounded_site(_DoH(dns_server), dns_server.clock, MAX_MESSAGE, timeout)


class _DoH(Resource):
    isLeaf = True

    def __init__(self, dns_server: Server) -> None:
        super().__init__()
        self.dns = dns_server
        self.stats = dns_server.stats

    def render(self, request: server.Request) -> bytes | int:
        self.stats.count("doh_requests")
        if request.path != PATH:
            return self._refuse(request, 404, "DNS over HTTPS is at /dns-query")
        if getattr(request, "too_large", False):
            return self._refuse(request, 413, f"a DNS message is at most {MAX_MESSAGE} bytes")
        method = request.method
        if method in (b"GET", b"HEAD"):
            values = (request.args or {}).get(b"dns", [])
            if len(values) != 1:
                return self._refuse(request, 400, "one dns= parameter, the query in base64url")
            try:
                # base64url without padding (section 4.1); padded is read as well.
                padded = values[0] + b"=" * (-len(values[0]) % 4)
                data = base64.b64decode(padded, altchars=b"-_", validate=True)
            except (binascii.Error, ValueError):
                return self._refuse(request, 400, "dns= is not base64url")
            if len(data) > MAX_MESSAGE:
                return self._refuse(request, 413, f"a DNS message is at most {MAX_MESSAGE} bytes")
        elif method == b"POST":
            kind = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
            if kind != MESSAGE_TYPE:
                return self._refuse(request, 415, "the body must be application/dns-message")
            assert request.content is not None
            data = request.content.read()
        else:
            request.setHeader(b"allow", b"GET, HEAD, POST")
            return self._refuse(request, 405, "GET or POST")
        address = request.getClientAddress()
        client = (getattr(address, "host", "unix"), getattr(address, "port", 0))
        answer = self.dns.handle(data, client, False, "https")
        if answer is None:
            return self._refuse(request, 400, "not a DNS query")
        if isinstance(answer, bytes):
            return self._answer(request, answer)
        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)

        def send(reply: bytes) -> None:
            if not gone:
                request.write(self._answer(request, reply))
                request.finish()

        answer.addCallback(send)
        return server.NOT_DONE_YET

    def _answer(self, request: server.Request, reply: bytes) -> bytes:
        request.setHeader(b"content-type", MESSAGE_TYPE)
        request.setHeader(b"cache-control", b"max-age=%d" % max_age(reply))
        request.setHeader(b"content-length", b"%d" % len(reply))
        return reply

    def _refuse(self, request: server.Request, status: int, why: str) -> bytes:
        self.stats.count("doh_rejected")
        body = why.encode() + b"\n"
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"content-length", b"%d" % len(body))
        return body


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
