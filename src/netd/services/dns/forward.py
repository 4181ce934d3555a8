"""
Forwarding to upstream resolvers, and netd's own answer cache.

twisted.names' client resolver decodes every answer into objects and its
CacheResolver is unbounded without negative caching; here upstream answers stay
in wire form: the cache keeps the bytes after the question and where each TTL
sits, and counts the TTLs down by patching those four bytes.
"""

from __future__ import annotations

import random
import secrets
import socket
import struct
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, fail
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    connectProtocol,
    wrapClientTLS,
)
from twisted.internet.error import ConnectionRefusedError, TimeoutError
from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from netd.events import ServiceStats
from netd.records import Record
from netd.services.dns.wire import (
    EDNS_PAYLOAD,
    FORMERR,
    NOERROR,
    NOTIMP,
    NXDOMAIN,
    OPT,
    QR,
    RA,
    RD,
    REFUSED,
    SERVFAIL,
    SOA,
    TC,
    Malformed,
    Sections,
    opt_record,
    walk_records,
)

if TYPE_CHECKING:
    from netd.services.dns.https import HTTPSClient

__all__ = [
    "STRATEGIES",
    "Cache",
    "Forwarder",
    "Forwarders",
    "ForwardingService",
    "Upstream",
    "UpstreamFailed",
    "certificates",
]

_HEADER = struct.Struct(">HHHHHH")
_TTL = struct.Struct(">I")
# Questions waiting on upstreams at once; each holds a socket, so a flood of
# distinct names must not run the process out of descriptors.
MAX_IN_FLIGHT = 1000
# An upstream answering these did not answer: the next one may.
_TRY_NEXT = frozenset({SERVFAIL, NOTIMP, REFUSED, FORMERR})
STRATEGIES = ("in_order", "fastest", "random")
# C{fastest}: round-trip times smoothed as TCP's (RFC 6298's 1/8), and a probe
# of the upstream left unused the longest every 50 queries or 20 seconds
# (dnsmasq's numbers for re-testing its servers).
_SMOOTHING = 0.125
_PROBE_QUERIES = 50
_PROBE_SECONDS = 20.0


@attrs.frozen(repr=False)
class Upstream(Record):
    """
    One upstream resolver.

    @ivar tls: DNS over TLS (RFC 7858, C{tls://HOST:853}): every query on a
        TLS connection of its own, the certificate verified for C{server_name}.
    @ivar server_name: the name (or address) the certificate must carry, and
        the SNI sent; the host by default.
    @ivar ca: PEM certificates to trust instead of the system's store.
    @ivar path: for DNS over HTTPS (RFC 8484, C{https://HOST[:PORT]/PATH}),
        the path queries are posted to; None for the other transports.
    """

    host: str
    port: int
    tls: bool = False
    server_name: str | None = None
    ca: bytes | None = attrs.field(default=None, repr=False)
    path: str | None = None

    @property
    def https(self) -> bool:
        return self.path is not None

    def __str__(self) -> str:
        address = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        if self.path is not None:
            return f"https://{address}{self.path}"
        return f"tls://{address}" if self.tls else address


class UpstreamFailed(Exception):
    """No upstream gave an answer."""


def _matches(reply: bytes, ident: int, question: bytes) -> bool:
    """
    Whether C{reply} answers our query: its ID and its question are ours, the
    name in any case (RFC 1035 7.3), the type and class exactly (lowering those
    too made type HTTPS, 0x0041, never match).
    """
    if len(reply) < 12 + len(question):
        return False
    rid, flags, qdcount = struct.unpack_from(">HHH", reply)
    name_end = 12 + len(question) - 4
    return (
        rid == ident
        and bool(flags & QR)
        and qdcount == 1
        and reply[12:name_end].lower() == question[:-4]
        and reply[name_end : name_end + 4] == question[-4:]
    )


class _Exchange:
    """One query to one upstream over one transport; fires with the reply bytes."""

    def __init__(self, clock: Any, timeout: float, ident: int, question: bytes) -> None:
        self.deferred: Deferred[bytes] = Deferred(lambda d: self._stop())
        self.ident = ident
        self.question = question
        self.timer = clock.callLater(timeout, self._expire)
        self.done = False

    def _expire(self) -> None:
        self._finish(Failure(TimeoutError("no answer from the upstream in time")))

    def _stop(self) -> None:
        """Release the socket; subclasses close their transport."""

    def _finish(self, result: bytes | Failure) -> None:
        if self.done or self.deferred.called:
            return
        self.done = True
        if self.timer.active():
            self.timer.cancel()
        self._stop()
        self.deferred.callback(result)


@implementer(IReadDescriptor)
class _UDPExchange(_Exchange):
    """
    One UDP query from a socket of its own, connected to the upstream: the
    kernel picks a random source port and drops datagrams from anyone else.

    Not a udp.Port: that logs two lines for every upstream query, and with
    epoll reports the ICMP port-unreachable of a connected socket as the port
    closing rather than as connectionRefused.
    """

    def __init__(
        self,
        reactor: Any,
        timeout: float,
        ident: int,
        question: bytes,
        upstream: Upstream,
        sock: socket.socket,
    ) -> None:
        _Exchange.__init__(self, reactor, timeout, ident, question)
        self.reactor = reactor
        self.upstream = upstream
        self.socket = sock
        self.mismatched = 0

    def start(self, query: bytes) -> None:
        try:
            self.socket.setblocking(False)
            self.socket.bind(("::" if ":" in self.upstream.host else "0.0.0.0", 0))
            self.socket.connect((self.upstream.host, self.upstream.port))
            self.socket.send(query)
        except OSError as e:
            self._finish(Failure(e))
            return
        self.reactor.addReader(self)

    def fileno(self) -> int:
        return self.socket.fileno()

    def logPrefix(self) -> str:
        return f"dns upstream {self.upstream}"

    def doRead(self) -> None:
        while not self.done:
            try:
                data, addr = self.socket.recvfrom(65535)
            except BlockingIOError:
                return
            except OSError as e:
                self._finish(Failure(e))  # ECONNREFUSED: nothing listens there
                return
            if (addr[0], addr[1]) != (self.upstream.host, self.upstream.port) or not _matches(
                data, self.ident, self.question
            ):
                self.mismatched += 1
                continue
            self._finish(data)

    def connectionLost(self, reason: Failure) -> None:
        # The reactor saw an error on the socket with nothing to read: with a
        # connected UDP socket, the ICMP port-unreachable of a dead upstream.
        self._finish(Failure(ConnectionRefusedError(str(self.upstream))))

    def _stop(self) -> None:
        self.reactor.removeReader(self)
        self.socket.close()


class _TCPExchange(_Exchange, Protocol):
    transport: Any

    def __init__(self, clock: Any, timeout: float, ident: int, question: bytes) -> None:
        _Exchange.__init__(self, clock, timeout, ident, question)
        self.buffer = bytearray()
        self.query = b""
        self.connecting: Deferred[Any] | None = None

    def connectionMade(self) -> None:
        self.connecting = None
        self.transport.write(struct.pack(">H", len(self.query)) + self.query)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) < 2:
            return
        (length,) = struct.unpack_from(">H", self.buffer)
        if len(self.buffer) < 2 + length:
            return
        reply = bytes(self.buffer[2 : 2 + length])
        if _matches(reply, self.ident, self.question):
            self._finish(reply)
        else:
            self._finish(Failure(UpstreamFailed("an answer that does not match the query")))

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._finish(Failure(UpstreamFailed("the upstream closed the connection")))

    def _stop(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()
        elif self.connecting is not None:
            # Still connecting when time ran out: a late connection must not open.
            self.connecting.cancel()


@attrs.define(repr=False)
class _Speed(Record):
    """How one upstream has answered, for the C{fastest} strategy."""

    rtt: float = 0.0  # smoothed seconds; 0 until measured, so each is tried early
    failed: bool = False
    used: float = 0.0


class Forwarder:
    """
    Asks upstreams in turn: UDP from a fresh random port with a random ID, TCP
    when the answer is truncated (DNS over TLS for a C{tls} upstream, a POST
    on a kept HTTPS connection for an C{https} one), the next upstream on
    silence or failure; the whole list C{attempts} times, each try given
    C{timeout} seconds.  Identical questions in flight share one upstream query.

    @param strategy: the order upstreams are tried in: C{in_order} from the one
        that answered last; C{fastest} by smoothed round-trip time, a failed
        one last, the one unused the longest tried first now and then so a
        demoted one can come back; C{random} shuffled for each question.
    """

    def __init__(
        self,
        reactor: Any,
        upstreams: Sequence[Upstream],
        stats: ServiceStats,
        timeout: float = 2.0,
        max_in_flight: int = MAX_IN_FLIGHT,
        socket_factory: Callable[[int, int], socket.socket] = socket.socket,
        payload: int = EDNS_PAYLOAD,
        attempts: int = 1,
        strategy: str = "in_order",
        shuffler: random.Random | None = None,
    ) -> None:
        self.reactor = reactor
        self.attempts = attempts
        self.strategy = strategy
        self.shuffler = shuffler or random.Random()
        self._https_clients: dict[Upstream, HTTPSClient] = {}
        self._tls_options: dict[Upstream, Any] = {}
        # The UDP answer size netd takes from upstreams, as it offers clients.
        self.opt = opt_record(payload)
        self.socket_factory = socket_factory
        self.max_in_flight = max_in_flight
        self.upstreams = tuple(upstreams)
        self.stats = stats
        self.timeout = timeout
        self._pending: dict[bytes, list[Deferred[bytes]]] = {}
        self._preferred = 0
        self.speeds = {upstream: _Speed() for upstream in self.upstreams}
        self._unprobed_queries = 0
        self._probed = reactor.seconds()

    def resolve(self, question: bytes) -> Deferred[bytes]:
        """The upstream's reply to C{question} (lower-case name, type, class)."""
        waiter: Deferred[bytes] = Deferred()
        waiting = self._pending.get(question)
        if waiting is not None:
            waiting.append(waiter)
            return waiter
        if len(self._pending) >= self.max_in_flight:
            self.stats.count("upstream_overload")
            waiter.errback(UpstreamFailed("too many questions waiting on upstreams"))
            return waiter
        self._pending[question] = [waiter]
        Deferred.fromCoroutine(self._resolve(question)).addBoth(self._done, question)
        return waiter

    def _done(self, result: bytes | Failure, question: bytes) -> None:
        for waiter in self._pending.pop(question, []):
            waiter.callback(result)

    def _order(self) -> tuple[Upstream, ...]:
        if self.strategy == "random":
            return tuple(self.shuffler.sample(self.upstreams, len(self.upstreams)))
        if self.strategy == "fastest":
            return self._fastest()
        # Start with the upstream that answered last: a dead first upstream
        # would otherwise cost every question its timeout.
        first = self._preferred
        return self.upstreams[first:] + self.upstreams[:first]

    def _fastest(self) -> tuple[Upstream, ...]:
        speeds = self.speeds
        order = sorted(self.upstreams, key=lambda upstream: speeds[upstream].rtt)
        self._unprobed_queries += 1
        now = self.reactor.seconds()
        due = self._unprobed_queries >= _PROBE_QUERIES or now - self._probed >= _PROBE_SECONDS
        if due and len(order) > 1:
            # Real traffic re-measures the upstream left alone the longest: a
            # demoted one that recovered, or one that has become the fastest.
            # Should it still fail, this question moves on to the others.
            self._unprobed_queries = 0
            self._probed = now
            stale = min(order[1:], key=lambda upstream: speeds[upstream].used)
            order.remove(stale)
            order.insert(0, stale)
            self.stats.count("upstream_probes")
        return tuple(order)

    def _measured(self, upstream: Upstream, rtt: float) -> None:
        speed = self.speeds[upstream]
        if speed.failed or not speed.rtt:
            speed.rtt = rtt
        else:
            speed.rtt += _SMOOTHING * (rtt - speed.rtt)
        speed.failed = False

    def _failed(self, upstream: Upstream) -> None:
        self.stats.count("upstream_failures")
        speed = self.speeds[upstream]
        # Behind every upstream that answers within the timeout.
        speed.rtt = min(max(speed.rtt * 2, self.timeout * 2), self.timeout * 8)
        speed.failed = True

    async def _resolve(self, question: bytes) -> bytes:
        for upstream in self._order() * self.attempts:
            # RFC 8484 section 4.1: DoH queries carry ID 0 (TLS keeps out spoofers).
            ident = 0 if upstream.https else secrets.randbelow(1 << 16)
            query = _HEADER.pack(ident, RD, 1, 0, 0, 1) + question + self.opt
            self.stats.count("upstream_queries")
            started = self.reactor.seconds()
            self.speeds[upstream].used = started
            try:
                if upstream.https:
                    reply = await self._https(upstream, ident, question, query)
                elif upstream.tls:
                    reply = await self._tcp(upstream, ident, question, query)
                else:
                    reply = await self._udp(upstream, ident, question, query)
                if reply[2] & (TC >> 8) and not (upstream.tls or upstream.https):
                    self.stats.count("upstream_tcp_retries")
                    reply = await self._tcp(upstream, ident, question, query)
            except CancelledError:
                raise
            except Exception:
                self._failed(upstream)
                continue
            if reply[3] & 0xF in _TRY_NEXT or not _readable(reply, len(question)):
                self._failed(upstream)
                continue
            self._measured(upstream, self.reactor.seconds() - started)
            self._preferred = self.upstreams.index(upstream)
            return reply
        raise UpstreamFailed("every upstream failed")

    async def _https(self, upstream: Upstream, ident: int, question: bytes, query: bytes) -> bytes:
        client = self._https_clients.get(upstream)
        if client is None:
            # twisted.web's client only for a service that forwards over HTTPS.
            from netd.services.dns.https import HTTPSClient

            client = HTTPSClient(self.reactor, upstream, self.timeout)
            self._https_clients[upstream] = client
        reply = await client.ask(query)
        if not _matches(reply, ident, question):
            raise UpstreamFailed("an answer that does not match the query")
        return reply

    def close(self) -> Deferred[Any]:
        """Drop the connections kept to HTTPS upstreams."""
        return DeferredList([client.close() for client in self._https_clients.values()])

    def _udp(
        self, upstream: Upstream, ident: int, question: bytes, query: bytes
    ) -> Deferred[bytes]:
        family = socket.AF_INET6 if ":" in upstream.host else socket.AF_INET
        try:
            sock = self.socket_factory(family, socket.SOCK_DGRAM)
        except OSError as e:
            return fail(e)
        exchange = _UDPExchange(self.reactor, self.timeout, ident, question, upstream, sock)
        exchange.start(query)

        def count(result: Any) -> Any:
            if exchange.mismatched:
                # Answers with the wrong ID or question: spoofing attempts or late replies.
                self.stats.count("upstream_mismatched", exchange.mismatched)
            return result

        return exchange.deferred.addBoth(count)

    def _tcp(
        self, upstream: Upstream, ident: int, question: bytes, query: bytes
    ) -> Deferred[bytes]:
        exchange = _TCPExchange(self.reactor, self.timeout, ident, question)
        exchange.query = query
        tcp = TCP6ClientEndpoint if ":" in upstream.host else TCP4ClientEndpoint
        endpoint: Any = tcp(self.reactor, upstream.host, upstream.port, timeout=self.timeout)
        if upstream.tls:
            endpoint = wrapClientTLS(self._tls(upstream), endpoint)
        exchange.connecting = connectProtocol(endpoint, exchange)
        exchange.connecting.addErrback(exchange._finish)
        return exchange.deferred

    def _tls(self, upstream: Upstream) -> Any:
        """The client TLS options of C{upstream}: its server name verified against its CAs."""
        options = self._tls_options.get(upstream)
        if options is None:
            # pyOpenSSL only for a service that forwards over TLS.
            from twisted.internet.ssl import (
                optionsForClientTLS,
                platformTrust,
                trustRootFromCertificates,
            )

            trust = platformTrust()
            if upstream.ca is not None:
                trust = trustRootFromCertificates(certificates(upstream.ca))
            name = upstream.server_name or upstream.host
            options = optionsForClientTLS(name, trustRoot=trust)
            self._tls_options[upstream] = options
        return options


def certificates(pem: bytes) -> list[Any]:
    """The L{twisted.internet.ssl.Certificate}s in a PEM bundle; ValueError if none."""
    from twisted.internet.ssl import Certificate

    found = [
        Certificate.loadPEM(b"-----BEGIN CERTIFICATE-----" + block)
        for block in pem.split(b"-----BEGIN CERTIFICATE-----")[1:]
    ]
    if not found:
        raise ValueError("no PEM certificate in it")
    return found


class Forwarders:
    """
    The forwarders by zone: C{forward_zones} suffixes each to its own
    upstreams, the rest to C{forward}'s (split horizon, dnsmasq's server=/x/).
    """

    def __init__(self, default: Forwarder | None, zones: dict[bytes, Forwarder]) -> None:
        self.default = default
        self.zones = zones

    def close(self) -> Deferred[Any]:
        forwarders = [*self.zones.values(), *([self.default] if self.default else [])]
        return DeferredList([forwarder.close() for forwarder in forwarders])

    def zone_of(self, name: bytes) -> bytes | None:
        """The longest C{forward_zones} suffix C{name} (wire form) lies at or under, or None."""
        candidate: bytes | None = name
        while candidate is not None and self.zones:
            if candidate in self.zones:
                return candidate
            candidate = None if candidate == b"\x00" else candidate[1 + candidate[0] :]
        return None

    def resolve(self, question: bytes) -> Deferred[bytes]:
        zone = self.zone_of(question[:-4])
        if zone is not None:
            return self.zones[zone].resolve(question)
        if self.default is None:
            return fail(UpstreamFailed("no upstream for this name"))
        return self.default.resolve(question)


class ForwardingService(Service):
    """Drops the connections kept to HTTPS upstreams when the service stops."""

    def __init__(self, forwarders: Forwarders) -> None:
        self.forwarders = forwarders

    def stopService(self) -> Deferred[Any]:
        Service.stopService(self)
        return self.forwarders.close()


@attrs.define(repr=False)
class _Entry(Record):
    expires: float
    stored: float
    flags: int
    an: int
    ns: int
    ar: int
    body: bytes
    ttls: tuple[tuple[int, int], ...]  # (offset in body, TTL as received, at most max_ttl)
    age: int = 0
    current: Sections | None = None


class Cache:
    """
    Answers from upstreams, by question, at most C{size} of them (least
    recently used out first); negative answers per RFC 2308.  No TTL passed
    on is over C{max_ttl}, fresh from the upstream or counting down here.
    """

    def __init__(self, clock: Any, size: int, max_ttl: int, negative_ttl: int) -> None:
        self.clock = clock
        self.size = size
        self.max_ttl = max_ttl
        self.negative_ttl = negative_ttl
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def get(self, question: bytes) -> Sections | None:
        return self.get_until(question)[0]

    def get_until(self, question: bytes) -> tuple[Sections | None, float]:
        """
        The sections for C{question}, and the time until which they stay the
        same: TTLs count down a second at a time, then the entry expires.
        """
        entry = self._entries.get(question)
        if entry is None:
            return None, 0.0
        now = self.clock.seconds()
        if now >= entry.expires:
            del self._entries[question]
            return None, 0.0
        self._entries.move_to_end(question)
        age = int(now - entry.stored)
        if entry.current is None or age != entry.age:
            body = bytearray(entry.body)
            for offset, ttl in entry.ttls:
                _TTL.pack_into(body, offset, max(ttl - age, 0))
            entry.age = age
            entry.current = Sections(entry.flags, entry.an, entry.ns, entry.ar, bytes(body))
        return entry.current, min(entry.expires, entry.stored + age + 1)

    def put(self, question: bytes, reply: bytes) -> Sections:
        """Keep C{reply} (already matched to C{question}); the sections to answer with."""
        entry, lifetime = _entry(
            reply, len(question), self.clock.seconds(), self.max_ttl, self.negative_ttl
        )
        sections = Sections(entry.flags, entry.an, entry.ns, entry.ar, entry.body)
        if lifetime > 0 and self.size > 0:
            entry.expires = entry.stored + lifetime
            entry.current = sections
            self._entries[question] = entry
            self._entries.move_to_end(question)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return sections


def _readable(reply: bytes, question_length: int) -> bool:
    """Whether every record the reply announces is there, so the cache can walk it."""
    _, _, _, an, ns, ar = _HEADER.unpack_from(reply)
    try:
        walk_records(reply, 12 + question_length, an + ns + ar)
    except Malformed:
        return False
    return True


def _entry(
    reply: bytes, question_length: int, now: float, max_ttl: int, negative_ttl: int
) -> tuple[_Entry, int]:
    """
    The cache entry for C{reply}, its TTLs capped, and how long it may be
    kept: a positive answer its smallest answer TTL; a negative one (NXDOMAIN,
    NODATA) min(SOA TTL, SOA minimum, C{negative_ttl}), which is also the TTL
    its SOA is passed on with, so clients keep it no longer than netd does
    (RFC 2308 5); 0 for other rcodes and for a negative answer without an SOA.
    """
    _, flags, _, an, ns, ar = _HEADER.unpack_from(reply)
    start = 12 + question_length
    records, _ = walk_records(reply, start, an + ns + ar)
    kept = records
    additional = records[an + ns :]
    opts = [r for r in additional if r.type == OPT]
    if opts:
        # Cutting an OPT out of the middle would move what later names point at.
        kept = records[:-1] if opts == additional[-1:] else records[: an + ns]
        ar = len(kept) - an - ns
    end = kept[-1].end if kept else start
    body = reply[start:end]
    ttls = [(r.ttl_offset - start, min(_ttl(reply, r.ttl_offset), max_ttl)) for r in kept]
    rcode = flags & 0xF
    lifetime = 0
    if rcode == NOERROR and an:
        lifetime = min(ttl for _, ttl in ttls[:an])
    elif rcode in (NOERROR, NXDOMAIN):
        for index in range(an, an + ns):
            record = kept[index]
            if record.type == SOA and record.end - record.rdata >= 20:
                offset, ttl = ttls[index]
                lifetime = min(ttl, _ttl(reply, record.end - 4), negative_ttl)
                ttls[index] = (offset, lifetime)
                break
    if any(_ttl(body, offset) != ttl for offset, ttl in ttls):
        capped = bytearray(body)
        for offset, ttl in ttls:
            _TTL.pack_into(capped, offset, ttl)
        body = bytes(capped)
    entry = _Entry(
        expires=0.0,
        stored=now,
        flags=RA | (flags & 0xF),
        an=an,
        ns=ns,
        ar=ar,
        body=body,
        ttls=tuple(ttls),
    )
    return entry, lifetime


def _ttl(data: bytes, offset: int) -> int:
    ttl: int = _TTL.unpack_from(data, offset)[0]
    return ttl
