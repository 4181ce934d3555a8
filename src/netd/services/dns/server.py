"""
The DNS server: one engine answering queries from local data, the cache or upstreams,
and its UDP and stream (TCP, DNS over TLS) protocols.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections import Counter, deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.names import dns
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from netd.compat import read_with
from netd.kinds import BuildContext, IOwesReplies, RepliesOwed
from netd.schema import in_networks
from netd.services.dns.data import (
    type_name,
)
from netd.services.dns.forward import Cache, Forwarder, Forwarders, Upstream
from netd.services.dns.live import Records, Saver
from netd.services.dns.local import LocalData
from netd.services.dns.options import Options
from netd.services.dns.rules import answer_by_rule, query_event
from netd.services.dns.wire import (
    AA,
    BADVERS,
    EDNS_PAYLOAD,
    NOERROR,
    RA,
    REFUSED,
    SERVFAIL,
    Malformed,
    Query,
    Sections,
    encode_reply,
    is_signed,
    is_update,
    malformed_reply,
    name_to_text,
    opt_record,
    parse_query,
    udp_limit,
)

if TYPE_CHECKING:
    from netd.services.dns.record import Recorder
    from netd.services.dns.update import Updates

__all__ = ["Datagrams", "Server", "Stream", "StreamFactory"]

T = TypeVar("T")
_RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}
# Zone transfers are not served: the data is the service map's.
_TRANSFERS = frozenset({dns.AXFR, dns.IXFR})
_QUERY_LOG_SIZE = 1000
# Whole answers kept by query bytes, for queries of ordinary size and answers
# that fit a UDP datagram (1232 bytes, or a larger udp_payload): a 64 KiB TCP
# query padded with records must not become a 64 KiB key, nor big TCP answers
# fill memory ten thousand at a time.
_PREPARED_REPLIES = 10_000
# How many answers a UDP turn holds before it sends them one after another.  A
# client with queries outstanding that has read every answer so far sleeps, and
# each answer sent to it then wakes it (on this 2-core VM an interrupt to the
# other CPU, a quarter of the server's CPU a query under dnsperf); a burst wakes
# it once.  dnsperf -q 100 (bench/dns_bench.py, 4 rounds against the loop that
# sent each answer at once): 32 answered 1.14x the queries a second (local) and
# 1.13x (cached), 64 1.10x and 1.10x, 16 about 1.04x, 4 0.97x.  A turn that
# finds the socket empty sends what it holds, so a lone query waits for nothing.
_BURST = 32
_PREPARED_QUERY = 512
# Queries one TCP connection may have waiting on upstreams before netd stops reading it.
_TCP_PIPELINE = 100


_RR = struct.Struct(">HHIH")
_REFUSED = Sections(REFUSED, 0, 0, 0, b"")
_SERVFAIL = Sections(RA | SERVFAIL, 0, 0, 0, b"")
_CATCH_ALL_NODATA = Sections(AA | NOERROR, 0, 0, 0, b"")
_NO_RECORDS = Sections(NOERROR, 0, 0, 0, b"")
_POINTER_TO_QUESTION = b"\xc0\x0c"
# A read that finds nothing more (or a signal): udp.Port.doRead's errors to ignore.
_READ_LATER = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR, errno.ECONNREFUSED})
_UNIX_CLIENT = "unix"


class _Prepared:
    """
    A whole answer kept to be sent again: its bytes after the ID, the counters
    it adds, and for a cached answer the cache's key, the sections it was made
    from, where their records sit in C{tail}, and until when the cache keeps
    those sections as they are (no need to ask it before).
    """

    __slots__ = ("body_at", "cache_key", "counters", "sections", "tail", "until")

    def __init__(
        self,
        tail: bytes,
        counters: tuple[str, ...],
        cache_key: bytes | None,
        sections: Sections,
        body_at: int | None,
    ) -> None:
        self.tail = tail
        self.counters = counters
        self.cache_key = cache_key
        self.sections = sections
        self.body_at = body_at
        self.until = 0.0


class _PreparedAnswers:
    """
    The prepared answers, by the query's bytes after the ID, in one table for
    each standing of a query (over UDP or not, from a client that may recurse
    or not): the UDP loop looks a query up in its standing's table with the
    query's bytes alone, not with a key tuple made for each query.
    """

    __slots__ = ("_tables",)

    def __init__(self) -> None:
        self._tables: dict[tuple[bool, bool], dict[bytes, _Prepared]] = {
            (udp, recursion): {} for udp in (True, False) for recursion in (True, False)
        }

    def table(self, udp: bool, recursion: bool) -> dict[bytes, _Prepared]:
        """The table for queries of this standing: the same dict for the server's life."""
        return self._tables[udp, recursion]

    def clear(self) -> None:
        for table in self._tables.values():
            table.clear()

    def __len__(self) -> int:
        return sum(len(table) for table in self._tables.values())


# Where an answer would be prepared: its standing's table and the query's bytes after the ID.
_PreparedAt = tuple[dict[bytes, _Prepared], bytes]


class Server:
    """Turns query bytes into answer bytes, now or later (a L{Deferred})."""

    def __init__(self, options: Options, context: BuildContext) -> None:
        self.options = options
        self.context = context
        self.stats = context.stats
        self.clock = context.reactor
        saver = (
            Saver(options.persist, context.in_thread, context.log)
            if options.persist is not None
            else None
        )
        self.records = Records(
            options.records,
            options.cache.negative_ttl,
            context.carried,
            self._local_changed,
            context.emit,
            saver,
            options.update.allow,
            options.local,
        )
        self.local = self.records.local
        self.updates: Updates | None = None
        if options.update.keys:
            # dnspython, for TSIG, only for a service that takes updates.
            from netd.services.dns.update import Updates

            self.updates = Updates(
                options.update,
                self.records,
                context.reactor,
                context.stats,
                context.log,
                options.udp_payload,
            )
        self.forwarder = _forwarders(options, context)
        self.recorder: Recorder | None = None
        if options.record_to is not None and self.forwarder is not None:
            from netd.services.dns.record import Recorder

            self.recorder = Recorder(
                options.record_to,
                context.in_thread,
                context.log,
                context.name,
                context.carried,
                options.recorded,
                options.cache.negative_ttl,
            )
        self.cache = Cache(
            context.reactor,
            options.cache.size,
            options.cache.max_ttl,
            options.cache.negative_ttl,
        )
        self.catch_all = None
        if options.catch_all is not None:
            rdata = options.catch_all
            body = _POINTER_TO_QUESTION + _RR.pack(dns.A, dns.IN, options.ttl, len(rdata)) + rdata
            self.catch_all = Sections(AA | NOERROR, 1, 0, 0, body)
        self.rules = context.rules
        self.rules.watchers.append(self._rules_changed)
        self._rules_changed()
        self.networks = options.recursion_from
        self.udp_payload = options.udp_payload
        self.opt = opt_record(options.udp_payload)
        self.badvers_opt = opt_record(options.udp_payload, BADVERS)
        self.prepared_size = max(EDNS_PAYLOAD, options.udp_payload)
        self.recursion_ok: dict[str, bool] = {}
        self.log: deque[dict[str, Any]] = deque(maxlen=_QUERY_LOG_SIZE)
        self.prepared = _PreparedAnswers()
        # One tuple object for each set of counters prepared answers add (a
        # handful: the rcode, whether cached, whether truncated), so the UDP
        # loop counts a turn's sends by set, not by answer.
        self._counter_sets: dict[tuple[str, ...], tuple[str, ...]] = {}

    def handle(
        self, data: bytes, client: Any, udp: bool, transport: str | None = None
    ) -> bytes | Deferred[bytes] | None:
        """
        The answer to C{data} from C{client} (an address), or None for silence.

        @param transport: what the query log calls it (C{https}); C{udp} or C{tcp} by default.
        """
        recursion = self.standing(client)
        answer = self.prepared_reply(data, udp, recursion)
        if answer is not None:
            return answer
        return self.answer(data, client, udp, recursion, transport)

    def standing(self, client: Any) -> bool:
        """Whether C{client} (an address) may have names answered from upstreams."""
        if self.forwarder is None:
            return False
        known = self.recursion_ok.get(client[0])
        return self._may_recurse(client[0]) if known is None else known

    def prepared_reply(self, data: bytes, udp: bool, recursion: bool) -> bytes | None:
        """
        The answer prepared for these query bytes (ID aside) from a client of
        this standing, counted as sent, or None: the same query gets the same
        answer from local data or the cache, sent again without parsing it.
        """
        prepared = self.prepared_for(data, udp, recursion)
        if prepared is None:
            return None
        self.count_sent(prepared.counters, 1)
        return data[:2] + prepared.tail

    def prepared_for(self, data: bytes, udp: bool, recursion: bool) -> _Prepared | None:
        """L{prepared_reply}'s answer, not yet counted: its bytes are C{data[:2] + tail}."""
        if not self.send_prepared or len(data) > _PREPARED_QUERY:
            return None
        prepared = self.prepared.table(udp, recursion).get(data[2:])
        if prepared is None or prepared.cache_key is None:
            return prepared
        return self.fresh(prepared, self.clock.seconds())

    def fresh(self, prepared: _Prepared, now: float) -> _Prepared | None:
        """C{prepared} with a cached answer's TTLs as the cache has them at C{now}, or None."""
        # A cached answer's TTLs change once a second: the cache is asked
        # then, not for every query (its LRU order moves as often).
        key = prepared.cache_key
        if key is not None and now >= prepared.until:
            current, prepared.until = self.cache.get_until(key)
            if current is not prepared.sections and not self._splice(prepared, current):
                return None
        return prepared

    def count_sent(self, names: tuple[str, ...], times: int) -> None:
        """Adds C{times} to each of the counters C{names} (a prepared answer's)."""
        counters = self.stats.counters
        for counter in names:
            counters[counter] = counters.get(counter, 0) + times

    def answer(
        self, data: bytes, client: Any, udp: bool, recursion: bool, transport: str | None = None
    ) -> bytes | Deferred[bytes] | None:
        """L{handle} once no prepared answer was sent: parsed, answered, prepared for next time."""
        if self.updates is not None and is_signed(data) and not is_update(data):
            # Answered as the same query unsigned (prepared answers and all), then signed.
            return self.updates.answer_signed(
                data, lambda unsigned: self.handle(unsigned, client, udp, transport), udp
            )
        stats = self.stats
        prepared_at = (
            (self.prepared.table(udp, recursion), data[2:])
            if self.send_prepared and len(data) <= _PREPARED_QUERY
            else None
        )
        stats.count("queries")
        if is_update(data):
            if self.updates is None:
                stats.count("updates")
                stats.count("update_rcode_REFUSED")
                return malformed_reply(data, REFUSED, self.opt)
            return self.updates.handle(data, client)
        try:
            query = parse_query(data)
        except Malformed as e:
            stats.count("malformed")
            if e.rcode is None:
                return None
            stats.count(f"rcode_{_RCODES[e.rcode]}")
            return malformed_reply(data, e.rcode, self.opt)
        started = self.clock.seconds() if self.options.query_log else 0.0
        if query.edns_version:
            stats.count("rcode_BADVERS")
            # Through encode_reply for its OPT to copy the DO bit (RFC 3225 3).
            return encode_reply(query, _NO_RECORDS, None, 0, self.badvers_opt)
        transport = transport or ("udp" if udp else "tcp")
        if self.rules.event_rules:
            namespace = self._namespace(name_to_text(query.name), client)
            fired = self.rules.check(client[0], namespace, **query_event(query, udp))
            if fired is not None:
                limit = udp_limit(query.payload, self.udp_payload) if udp else None
                return answer_by_rule(
                    self,
                    fired,
                    query,
                    lambda sections, flags: self._reply(
                        sections, query, limit, client, transport, "rule", started, flags
                    ),
                    lambda: self._answer(query, client, udp, transport, recursion, started),
                    udp,
                )
        return self._answer(query, client, udp, transport, recursion, started, prepared_at)

    def _splice(self, prepared: _Prepared, current: Sections | None) -> bool:
        """
        Whether a prepared cached answer may be sent again now that the cache
        holds C{current} for it: with the same records (the same length,
        counts and truncation), their new TTLs spliced in.
        """
        was = prepared.sections
        if (
            current is None
            or prepared.body_at is None
            or (current.flags, current.an, current.ns, current.ar, len(current.body))
            != (was.flags, was.an, was.ns, was.ar, len(was.body))
        ):
            return False
        start, end = prepared.body_at, prepared.body_at + len(was.body)
        prepared.tail = prepared.tail[:start] + current.body + prepared.tail[end:]
        prepared.sections = current
        return True

    def _rules_changed(self) -> None:
        # Prepared answers are sent as they were: not while a rule may answer instead.
        self.send_prepared = not self.options.query_log and not self.rules.event_rules

    def _answer(
        self,
        query: Query,
        client: Any,
        udp: bool,
        transport: str,
        recursion: bool,
        started: float,
        prepared_at: _PreparedAt | None = None,
    ) -> bytes | Deferred[bytes] | None:
        """The service's own answer to a parsed query."""
        stats = self.stats
        limit = udp_limit(query.payload, self.udp_payload) if udp else None
        sections, source = self._answer_now(query, recursion, udp)
        if sections is not None:
            # RA says this client may ask for any name, whatever answered this one.
            flags = RA if recursion else 0
            return self._reply(
                sections, query, limit, client, transport, source, started, flags, prepared_at
            )
        assert self.forwarder is not None
        key = query.name + query.question[-4:]
        stats.count("cache_misses")
        waiting = self.forwarder.resolve(key)

        def answered(reply: bytes) -> Sections:
            if self.recorder is not None:
                self.recorder.add(reply)
            return self.cache.put(key, reply)

        def failed(reason: Failure) -> Sections:
            return _SERVFAIL

        return (
            waiting.addCallbacks(answered, failed)
            .addCallback(self._reply, query, limit, client, transport, "upstream", started)
            .addErrback(self._crashed, query, limit)
        )

    def _local_changed(self, local: LocalData) -> None:
        self.local = local
        # Replies prepared from the old records must not be sent again.
        self.prepared.clear()

    def _answer_now(self, query: Query, recursion: bool, udp: bool) -> tuple[Sections | None, str]:
        if query.cls != dns.IN or query.type in _TRANSFERS:
            return _REFUSED, "refused"
        if self._forwarded_zone(query.name):
            local = None
        elif query.type == dns.ALL_RECORDS and udp:
            local = self.local.minimal_any(query.name)
        else:
            local = self.local.answer(query.name, query.type)
        if local is not None:
            return local, "local"
        if self.catch_all is not None and query.type == dns.A:
            return self.catch_all, "catch_all"
        if not recursion:
            if self.catch_all is not None:
                # In lab mode every name exists: other types are NODATA, so a
                # resolver asking A and AAAA together settles on the A answer.
                return _CATCH_ALL_NODATA, "catch_all"
            return _REFUSED, "refused"
        cached = self.cache.get(query.name + query.question[-4:])
        if cached is not None:
            return cached, "cache"
        return None, "upstream"

    def _forwarded_zone(self, name: bytes) -> bool:
        """
        Whether C{name} lies in a C{forward_zones} suffix longer than its local
        zone: the longest suffix wins, as dnsmasq's server=/local= and
        CoreDNS's zones have it, so a lab can hand a subdomain of its own zone
        to another server.
        """
        if self.forwarder is None or not self.forwarder.zones:
            return False
        forwarded = self.forwarder.zone_of(name)
        if forwarded is None:
            return False
        local = self.local.zone_of(name)
        return local is None or len(forwarded) > len(local)

    def _may_recurse(self, host: str) -> bool:
        allowed = self.recursion_ok.get(host)
        if allowed is None:
            allowed = in_networks("127.0.0.1" if host == _UNIX_CLIENT else host, self.networks)
            if len(self.recursion_ok) > 10000:
                self.recursion_ok.clear()
            self.recursion_ok[host] = allowed
        return allowed

    def _reply(
        self,
        sections: Sections,
        query: Query,
        limit: int | None,
        client: Any,
        transport: str,
        source: str,
        started: float,
        flags: int = 0,
        prepared_at: _PreparedAt | None = None,
    ) -> bytes:
        reply = encode_reply(query, sections, limit, flags, self.opt)
        counters = [f"rcode_{_RCODES.get(sections.rcode, str(sections.rcode))}"]
        if source == "cache":
            counters.append("cache_hits")
        if limit is not None and len(reply) < len(query.question) + 12 + len(sections.body):
            counters.append("truncated")
        for counter in counters:
            self.stats.count(counter)
        if self.options.query_log:
            self._record(query, reply, client, transport, source, started)
        if prepared_at is not None and len(reply) <= self.prepared_size:
            table, question = prepared_at
            if len(table) >= _PREPARED_REPLIES:
                # Distinct queries by the thousand (a scan): start again rather than grow.
                table.clear()
            cache_key = query.name + query.question[-4:] if source == "cache" else None
            # Where the sections' records sit in the tail (after the header's
            # last 10 bytes and the question), unless the answer was truncated.
            start = 10 + len(query.question)
            whole = reply[start + 2 : start + 2 + len(sections.body)] == sections.body
            names = ("queries", *counters)
            table[question] = _Prepared(
                reply[2:],
                self._counter_sets.setdefault(names, names),
                cache_key,
                sections,
                start if whole else None,
            )
        return reply

    def _crashed(self, reason: Failure, query: Query, limit: int | None) -> bytes:
        self.context.log.failure("answering a forwarded query", reason)
        self.stats.errors += 1
        return encode_reply(query, _SERVFAIL, limit, 0, self.opt)

    def _record(
        self, query: Query, reply: bytes, client: Any, transport: str, source: str, started: float
    ) -> None:
        message = dns.Message()
        try:
            message.fromStr(reply)
            answer = [_rr_text(rr) for rr in message.answers]
        except Exception:
            answer = []
        entry = {
            "time": started,
            "client": f"[{client[0]}]:{client[1]}"
            if ":" in client[0]
            else f"{client[0]}:{client[1]}",
            "transport": transport,
            "name": name_to_text(query.name),
            "qtype": type_name(query.type),
            "rcode": _RCODES.get(message.rCode, str(message.rCode)),
            "answer": answer,
            "source": source,
            "latency_ms": round((self.clock.seconds() - started) * 1000, 3),
        }
        namespace = self._namespace(entry["name"], client)
        if namespace is not None:
            entry["namespace"] = namespace
        self.log.append(entry)
        self.context.emit("query", **entry)
        # One line a query, as CoreDNS's log and dnsmasq's log-queries write;
        # in JSON logs its fields are the entry's, minus the answer.
        fields = {k: v for k, v in entry.items() if k not in ("time", "answer")}
        self.context.log.info(
            "{query_line}",
            query_line="{client} {transport} {name} {qtype} {rcode} {source} {latency_ms}ms".format(
                **fields
            ),
            **fields,
        )

    def _namespace(self, name: str, client: Any) -> str | None:
        namespaces = self.context.namespaces
        if not namespaces.enabled:
            return None
        return namespaces.derive(name=name, client=client[0])

    def list_queries(self, query: Mapping[str, str]) -> list[dict[str, Any]]:
        return list(self.log)

    def forget_queries(self, namespace: str) -> dict[str, int]:
        """C{DELETE /api/namespaces/NS}: the queries of one namespace go from the log."""
        kept = [entry for entry in self.log if entry.get("namespace") != namespace]
        forgotten = len(self.log) - len(kept)
        self.log = deque(kept, maxlen=self.log.maxlen)
        return {"cleared": forgotten}

    def clear_queries(self) -> dict[str, int]:
        cleared = len(self.log)
        self.log.clear()
        return {"cleared": cleared}


def _forwarders(options: Options, context: BuildContext) -> Forwarders | None:
    """C{forward} and C{forward_zones}' forwarders, or None if netd forwards nothing."""

    def forwarder(upstreams: tuple[Upstream, ...]) -> Forwarder:
        return Forwarder(
            context.reactor,
            upstreams,
            context.stats,
            timeout=options.forward_timeout,
            payload=options.udp_payload,
            attempts=options.forward_attempts,
            strategy=options.forward_strategy,
        )

    if not options.forward and not options.forward_zones:
        return None
    return Forwarders(
        forwarder(options.forward) if options.forward else None,
        {zone: forwarder(upstreams) for zone, upstreams in options.forward_zones},
    )


def _rr_text(rr: dns.RRHeader) -> str:
    """One answer record as a zone file line would have it, near enough for a log."""
    payload: Any = rr.payload
    if rr.type == dns.A:
        data = socket.inet_ntop(socket.AF_INET, payload.address)
    elif rr.type == dns.AAAA:
        data = socket.inet_ntop(socket.AF_INET6, payload.address)
    elif isinstance(payload, dns.UnknownRecord):
        data = repr(payload.data)
    else:
        values = []
        for field in payload.showAttributes:
            attribute = field[0] if isinstance(field, tuple) else field
            if attribute == "ttl":
                continue
            value = getattr(payload, attribute, "")
            if isinstance(value, dns.Name):
                value = value.name.decode("ascii", "backslashreplace") + "."
            elif isinstance(value, list):
                value = " ".join(repr(v.decode("utf-8", "replace")) for v in value)
            values.append(str(value))
        data = " ".join(values)
    return f"{rr.name} {rr.ttl} {type_name(rr.type)} {data}"


class Datagrams(DatagramProtocol):
    """
    DNS over UDP.  It reads its port's socket itself (L{read}): a query with a
    prepared answer is the whole load of a busy server, and Twisted's read loop
    with one call a datagram into L{Server.handle} cost 4-11% more CPU a query
    than this loop (bench/dns_bench.py, against the loop Twisted runs).
    """

    noisy = False
    transport: Any

    def __init__(self, server: Server) -> None:
        self.server = server
        self.stats = server.stats
        self._sendto: Any = None

    def startProtocol(self) -> None:
        # udp.Port.write checks that the address is an IP for every datagram (a
        # tenth of the time under load); ours are the kernel's own source addresses.
        sock = getattr(self.transport, "socket", None)
        self._sendto = sock.sendto if sock is not None else self.transport.write
        if sock is not None:
            read_with(self.transport, self.read)

    def read(self) -> None:
        """
        Answer what waits on the socket, as udp.Port.doRead would (up to its
        C{maxThroughput} bytes a turn, one datagram's failure logged, not the
        port's): prepared answers inline, the rest through L{Server.answer};
        answers leave in bursts of L{_BURST} and when the socket is empty.
        """
        port = self.transport
        server = self.server
        stats = self.stats
        recvfrom = port.socket.recvfrom
        sendto = self._sendto
        # Server.standing and Server.prepared_for, taken apart: a call a query
        # cost about 2% of a local answer's CPU.  Without upstreams no client
        # may recurse; whether prepared answers may be sent is asked once a
        # turn; a client's standing and a cached answer's freshness are asked
        # of the server only when not already known (cached TTLs are checked
        # against the turn's clock).
        recursion_known = server.recursion_ok.get if server.forwarder is not None else None
        may_recurse = server._may_recurse
        sending_prepared = server.send_prepared
        prepared_local = server.prepared.table(True, False).get
        prepared_recursive = server.prepared.table(True, True).get
        fresh = server.fresh
        now = server.clock.seconds()
        limit = port.maxThroughput
        size = port.maxPacketSize
        trim = port.addressFamily == socket.AF_INET6
        received = sent = 0
        # The counters of the prepared answers sent this turn: added once a turn
        # for each set (L{Counter} counts the list in C), not two or three dict
        # updates a query, nor a call for each answer.
        hits: list[tuple[str, ...]] = []
        hit = hits.append
        # Answers and their addresses, sent _BURST at a time and when the turn ends.
        held: list[tuple[bytes, Any]] = []
        hold = held.append
        try:
            while received < limit:
                try:
                    data, addr = recvfrom(size)
                except OSError as e:
                    if e.errno in _READ_LATER:
                        return
                    raise
                received += len(data)
                if trim:
                    addr = addr[:2]  # as Twisted gives it: no flow label, no scope
                try:
                    if recursion_known is None:
                        recursion = False
                    else:
                        known = recursion_known(addr[0])
                        recursion = may_recurse(addr[0]) if known is None else known
                    prepared = None
                    if sending_prepared and len(data) <= _PREPARED_QUERY:
                        question = data[2:]
                        prepared = (
                            prepared_recursive(question) if recursion else prepared_local(question)
                        )
                        if (
                            prepared is not None
                            and prepared.cache_key is not None
                            and now >= prepared.until
                        ):
                            prepared = fresh(prepared, now)
                    if prepared is not None:
                        hit(prepared.counters)
                        answer = data[:2] + prepared.tail
                    else:
                        made = server.answer(data, addr, True, recursion)
                        if made is None:
                            continue
                        if not isinstance(made, bytes):
                            made.addCallback(self.send, addr)
                            continue
                        answer = made
                except Exception:
                    server.context.log.failure("answering a query over UDP")
                    stats.errors += 1
                    continue
                hold((answer, addr))
                if len(held) >= _BURST:
                    sent += self._send_held(held, sendto)
        finally:
            if held:
                sent += self._send_held(held, sendto)
            stats.bytes_in += received
            stats.bytes_out += sent
            if hits:
                for names, times in Counter(hits).items():
                    server.count_sent(names, times)

    def _send_held(self, held: list[tuple[bytes, Any]], sendto: Any) -> int:
        """Sends the held answers, each to its address; how many bytes were sent."""
        sent = 0
        for answer, addr in held:
            try:
                sendto(answer, addr)
            except OSError:
                # A client's address the kernel will not send to: nothing to tell it.
                self.stats.errors += 1
                continue
            sent += len(answer)
        held.clear()
        return sent

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        # Only for a transport that is not a udp.Port (L{read} serves those).
        self.stats.bytes_in += len(data)
        answer = self.server.handle(data, addr, True)
        if isinstance(answer, bytes):
            self.send(answer, addr)
        elif answer is not None:
            answer.addCallback(self.send, addr)

    def send(self, answer: bytes, addr: Any) -> None:
        """Sends one answer made later (an upstream's, through a Deferred)."""
        self.stats.bytes_out += self._send_held([(answer, addr)], self._sendto)


@implementer(IOwesReplies)
class Stream(Protocol, TimeoutMixin):
    """
    DNS over a stream (RFC 7766): two-byte length prefixes, queries answered
    as they complete (pipelined), closed after C{timeout} without a whole message.
    """

    transport: Any

    def __init__(self, server: Server, timeout: float) -> None:
        self.server = server
        self.timeout = timeout
        self.buffer = bytearray()
        self.waiting = 0
        self.paused = False
        self.closed = False
        self.owed = RepliesOwed()

    def connectionMade(self) -> None:
        self.callLater = self.server.clock.callLater  # type: ignore[method-assign]
        peer = self.transport.getPeer()
        # A UNIX-socket client has no address: it is on this host, like loopback.
        self.client = (getattr(peer, "host", _UNIX_CLIENT), getattr(peer, "port", 0))
        self.setTimeout(self.timeout)

    def dataReceived(self, data: bytes) -> None:
        # A bytearray grows in place: a client trickling a 64 KiB message byte
        # by byte must not cost a copy of the whole buffer per byte.
        buffer = self.buffer
        buffer += data
        offset = 0
        while len(buffer) - offset >= 2:
            end = offset + 2 + int.from_bytes(buffer[offset : offset + 2], "big")
            if len(buffer) < end:
                break
            message = bytes(buffer[offset + 2 : end])
            offset = end
            self.resetTimeout()
            answer = self.server.handle(message, self.client, False)
            if answer is None:
                continue
            if isinstance(answer, bytes):
                self.send(answer)
            else:
                self.waiting += 1
                answer.addCallback(self._answered)
                if self.waiting >= _TCP_PIPELINE and not self.paused:
                    self.paused = True
                    self.transport.pauseProducing()
        del buffer[:offset]

    def when_replied(self) -> Deferred[None]:
        return self.owed.wait(self.waiting > 0)

    def _answered(self, answer: bytes) -> None:
        self.waiting -= 1
        self.send(answer)
        if not self.waiting:
            self.owed.settled()
        if self.paused and self.waiting < _TCP_PIPELINE // 2 and not self.closed:
            self.paused = False
            self.transport.resumeProducing()

    def send(self, answer: bytes) -> None:
        if not self.closed:
            self.transport.write(len(answer).to_bytes(2, "big") + answer)

    def timeoutConnection(self) -> None:
        if self.waiting:
            # Answers are still on their way from upstreams: the client is not idle.
            self.setTimeout(self.timeout)
            return
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.closed = True
        self.setTimeout(None)


class StreamFactory(Factory):
    noisy = False

    def __init__(self, server: Server, timeout: float) -> None:
        self.server = server
        self.timeout = timeout

    def buildProtocol(self, addr: Any) -> Stream:
        return Stream(self.server, self.timeout)
