"""
RFC 2136 dynamic updates of local records, authorised by TSIG (RFC 8945).

    update:
      keys: {ci-key: {algorithm: hmac-sha256, secret: "base64..."}}
      allow: [lab.test]          # zones the keys may change

(read by L{netd.services.dns.options}; this module, and dnspython with it,
is loaded only for a service with update keys).

twisted.names reads a TSIG record but neither checks nor makes a MAC, so
dnspython reads UPDATE messages and does TSIG: L{dns.tsig.validate} is called
here with netd's own clock, in the order RFC 8945 section 5.2 checks (key,
MAC, time).  An unsigned UPDATE, or one for a zone not in C{allow}, is
REFUSED; an unknown key or a bad MAC is NOTAUTH with TSIG error BADKEY or
BADSIG (unsigned, as the RFC says); a time outside the fudge is NOTAUTH with
BADTIME, signed, with netd's time.  Prerequisites (RFC 2136 section 3.2) and
updates (3.4) apply to the records as they stand, all or none, through
L{netd.services.dns.live.Records}.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TSIG
import dns.rrset
import dns.tsig
import dns.update
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from netd.events import ServiceStats
from netd.services.dns.data import TYPES
from netd.services.dns.live import Edit, Records, RecordSet
from netd.services.dns.options import UpdateOptions
from netd.services.dns.wire import (
    malformed_reply,
    opt_record,
    read_name,
    udp_limit,
    walk_records,
)

__all__ = ["Updates"]

_SERVED_TYPES = frozenset(TYPES.values())
_TSIG = dns.rdatatype.TSIG
_ANY = dns.rdataclass.ANY
_NONE = dns.rdataclass.NONE


class Refusal(Exception):
    def __init__(self, rcode: int, why: str) -> None:
        super().__init__(why)
        self.rcode = rcode


class Updates:
    """Answers UPDATE messages; every other message goes to the query path."""

    def __init__(
        self,
        options: UpdateOptions,
        records: Records,
        clock: Any,
        stats: ServiceStats,
        log: Logger,
        udp_payload: int,
    ) -> None:
        self.keyring = {
            dns.name.from_text(k.name): dns.tsig.Key(k.name, k.secret, k.algorithm)
            for k in options.keys
        }
        self.allow = frozenset(options.allow)
        self.records = records
        self.clock = clock
        self.stats = stats
        self.log = log
        self.udp_payload = udp_payload
        self.opt = opt_record(udp_payload)

    def handle(self, data: bytes, client: Any) -> bytes | None:
        """The answer to the UPDATE in C{data}, or None if it is not worth one."""
        self.stats.count("updates")
        try:
            # Parsed with every key "known but unchecked": the MAC is checked
            # below, against netd's clock rather than dnspython's time.time().
            message = dns.message.from_wire(data, keyring=_unchecked)
        except dns.exception.DNSException:
            self.stats.count("malformed")
            self.stats.count("update_rcode_FORMERR")
            return malformed_reply(data, dns.rcode.FORMERR, self.opt)
        assert isinstance(message, dns.update.UpdateMessage)
        response = _response(message, self.udp_payload)
        key = None
        try:
            if not message.had_tsig:
                raise Refusal(dns.rcode.REFUSED, "unsigned")
            key = self._verify(data, message, response)
            rcode, why = self._apply(message, key), "applied"
        except Refusal as refusal:
            rcode, why = refusal.rcode, str(refusal)
        except dns.exception.DNSException as e:
            rcode, why = dns.rcode.FORMERR, str(e) or type(e).__name__
        response.set_rcode(dns.rcode.Rcode.make(rcode))
        name = dns.rcode.to_text(dns.rcode.Rcode.make(rcode))
        self.stats.count(f"update_rcode_{name}")
        self.log.info(
            "update from {client} key {key}: {rcode} ({why})",
            client=client[0],
            key=message.keyname.to_text(omit_final_dot=True) if message.keyname else None,
            rcode=name,
            why=why,
        )
        if key is not None and not response.had_tsig:
            return _signed(response, key, _tsig(message))
        wire: bytes = response.to_wire()
        return wire

    def answer_signed(
        self, data: bytes, answer: Callable[[bytes], bytes | Deferred[bytes] | None], udp: bool
    ) -> bytes | Deferred[bytes] | None:
        """
        The answer to a TSIG-signed query, signed with its key (RFC 8945 5.3):
        C{answer} answers the query without its TSIG record, as any other.
        A key, MAC or time that does not check is NOTAUTH with the error, as
        for an UPDATE.  nsupdate signs the SOA query it finds the zone with,
        and gives up on an unsigned answer.
        """
        try:
            message = dns.message.from_wire(data, keyring=_unchecked)
        except dns.exception.DNSException:
            self.stats.count("malformed")
            return malformed_reply(data, dns.rcode.FORMERR, self.opt)
        response = _response(message, self.udp_payload)
        try:
            key = self._verify(data, message, response)
        except Refusal as refusal:
            self.stats.count("tsig_refused")
            self.log.info("signed query refused: {why}", why=str(refusal))
            response.set_rcode(dns.rcode.Rcode.make(refusal.rcode))
            refused: bytes = response.to_wire()
            return refused
        tsig = _tsig(message)
        client = message.payload if message.edns >= 0 else None
        limit = udp_limit(client, self.udp_payload) if udp else None

        def sign(reply: bytes) -> bytes:
            signed = dns.message.from_wire(reply)
            wire = _signed(signed, key, tsig)
            if limit is not None and len(wire) > limit:
                # The answer fitted, its TSIG record does not: RFC 8945 5.3
                # sends the question alone (and the OPT), TC set and NOERROR,
                # still signed, for the client to ask again over TCP.
                signed.answer, signed.authority, signed.additional = [], [], []
                signed.flags |= dns.flags.TC
                signed.set_rcode(dns.rcode.NOERROR)
                wire = _signed(signed, key, tsig)
            return wire

        reply = answer(_without_tsig(data))
        if reply is None:
            return None
        if isinstance(reply, Deferred):
            return reply.addCallback(sign)
        return sign(reply)

    def _verify(
        self, data: bytes, message: dns.message.Message, response: dns.message.Message
    ) -> dns.tsig.Key:
        tsig = _tsig(message)
        keyname = message.keyname
        assert keyname is not None
        key = self.keyring.get(keyname)
        now = int(self.clock.seconds())
        try:
            if key is None:
                raise dns.tsig.BadKey
            dns.tsig.validate(data, key, keyname, tsig, now, b"", _tsig_start(data))
        except (dns.tsig.BadKey, dns.tsig.BadAlgorithm):
            _unsigned_error(response, message, dns.rcode.BADKEY)
            raise Refusal(dns.rcode.NOTAUTH, "BADKEY") from None
        except dns.tsig.BadSignature:
            _unsigned_error(response, message, dns.rcode.BADSIG)
            raise Refusal(dns.rcode.NOTAUTH, "BADSIG") from None
        except dns.tsig.BadTime:
            # Signed, with our time in Other Data, so the client can tell its clock is off.
            response.use_tsig(
                key,
                fudge=tsig.fudge,
                tsig_error=dns.rcode.BADTIME,
                other_data=now.to_bytes(6, "big"),
                algorithm=tsig.algorithm,
            )
            response.request_mac = tsig.mac
            raise Refusal(dns.rcode.NOTAUTH, "BADTIME") from None
        return key

    def _apply(self, message: dns.update.UpdateMessage, key: dns.tsig.Key) -> int:
        (zone_rrset,) = message.zone
        zone_name = zone_rrset.name
        zone = zone_name.canonicalize().to_wire()
        if zone_rrset.rdtype != dns.rdatatype.SOA:
            raise Refusal(dns.rcode.FORMERR, "the zone section's type is not SOA (RFC 2136 3.1.1)")
        if zone_rrset.rdclass != dns.rdataclass.IN:
            raise Refusal(dns.rcode.NOTAUTH, "class is not IN")
        if zone not in self.allow:
            raise Refusal(dns.rcode.REFUSED, "zone not in update.allow")
        if zone not in self.records.local.zones:
            raise Refusal(dns.rcode.NOTAUTH, "not a zone served here")
        state = _Working(self.records)
        _check_prerequisites(message.prerequisite, zone_name, state)
        edits = _updates(message.update, zone_name, zone, state)
        self.records.commit(edits, "update")
        return dns.rcode.NOERROR


def _unchecked(message: dns.message.Message, name: dns.name.Name) -> bool:
    return False


def _tsig(message: dns.message.Message) -> dns.rdtypes.ANY.TSIG.TSIG:
    assert message.tsig is not None
    return cast(dns.rdtypes.ANY.TSIG.TSIG, message.tsig[0])


def _tsig_start(data: bytes) -> int:
    """Where the TSIG record starts: the last record of the message (dnspython checked)."""
    counts = struct.unpack_from(">HHHH", data, 4)
    offset = read_name(data, 12) + 4
    records, _ = walk_records(data, offset, sum(counts[1:]))
    return records[-1].start


def _without_tsig(data: bytes) -> bytes:
    """The query as it was before it was signed: its TSIG record gone, ARCOUNT one less."""
    arcount = struct.unpack_from(">H", data, 10)[0]
    return data[:10] + struct.pack(">H", arcount - 1) + data[12 : _tsig_start(data)]


def _unsigned_error(
    response: dns.message.Message, message: dns.message.Message, error: int
) -> None:
    """RFC 8945 section 5.3.2: the TSIG record with the error, an empty MAC, not signed."""
    tsig = _tsig(message)
    assert message.keyname is not None
    response.tsig = dns.rrset.from_rdata(
        message.keyname,
        0,
        tsig.replace(mac=b"", error=error, other=b""),
    )


def _response(message: dns.message.Message, payload: int) -> dns.message.Message:
    response = dns.message.make_response(message, our_payload=payload)
    if message.ednsflags & dns.flags.DO:
        # RFC 3225 3: the answer copies the DO bit, which dnspython leaves out.
        response.want_dnssec(True)
    return response


def _signed(
    message: dns.message.Message, key: dns.tsig.Key, tsig: dns.rdtypes.ANY.TSIG.TSIG
) -> bytes:
    """C{message} in wire form, signed with C{key} as the answer to the request C{tsig} signed."""
    message.use_tsig(key, fudge=tsig.fudge, algorithm=key.algorithm)
    message.request_mac = tsig.mac
    wire: bytes = message.to_wire()
    return wire


class _Working:
    """The records as an update sees them: the service's, with its own edits so far."""

    def __init__(self, records: Records) -> None:
        self.records = records
        self.edits: dict[tuple[bytes, int], RecordSet | None] = {}

    def get(self, owner: bytes, rtype: int) -> RecordSet | None:
        key = (owner, rtype)
        return self.edits[key] if key in self.edits else self.records.get(owner, rtype)

    def types(self, owner: bytes) -> set[int]:
        found = set(self.records.of_name(owner))
        found.update(t for (o, t) in self.edits if o == owner)
        return {t for t in found if self.get(owner, t) is not None}

    def put(self, owner: bytes, rtype: int, value: RecordSet | None) -> None:
        self.edits[(owner, rtype)] = value


def _owner(rrset: dns.rrset.RRset, zone_name: dns.name.Name) -> bytes:
    if not rrset.name.is_subdomain(zone_name):
        raise Refusal(dns.rcode.NOTZONE, f"{rrset.name} is outside the zone")
    return cast(bytes, rrset.name.canonicalize().to_wire())


def _rdatas(rrset: dns.rrset.RRset) -> tuple[bytes, ...]:
    # The canonical form (RFC 4034 section 6.2): names in it lower-case and
    # uncompressed, as local data keeps them.
    return tuple(cast(bytes, rdata.to_digestable()) for rdata in rrset)


def _check_prerequisites(
    prerequisites: list[dns.rrset.RRset], zone_name: dns.name.Name, state: _Working
) -> None:
    """RFC 2136 section 3.2; a failing one raises L{Refusal} with its rcode."""
    wanted: dict[tuple[bytes, int], set[bytes]] = {}
    for rrset in prerequisites:
        owner = _owner(rrset, zone_name)
        rtype = rrset.rdtype
        if rrset.ttl != 0:
            raise Refusal(dns.rcode.FORMERR, "a prerequisite with a TTL")
        if rrset.deleting == _ANY:
            if rtype == dns.rdatatype.ANY:
                if not state.types(owner):
                    raise Refusal(dns.rcode.NXDOMAIN, f"{rrset.name} is not in use")
            elif state.get(owner, rtype) is None:
                raise Refusal(dns.rcode.NXRRSET, f"{rrset.name} has no {_type(rtype)}")
        elif rrset.deleting == _NONE:
            if rtype == dns.rdatatype.ANY:
                if state.types(owner):
                    raise Refusal(dns.rcode.YXDOMAIN, f"{rrset.name} is in use")
            elif state.get(owner, rtype) is not None:
                raise Refusal(dns.rcode.YXRRSET, f"{rrset.name} has {_type(rtype)}")
        else:
            wanted.setdefault((owner, rtype), set()).update(_rdatas(rrset))
    for (name, set_type), rdatas in wanted.items():
        found = state.get(name, set_type)
        if found is None or set(found[1]) != rdatas:
            raise Refusal(dns.rcode.NXRRSET, f"{_type(set_type)} set differs")


def _type(rtype: int) -> str:
    return dns.rdatatype.to_text(dns.rdatatype.RdataType.make(rtype))


_META = frozenset(
    {
        dns.rdatatype.ANY,
        dns.rdatatype.AXFR,
        dns.rdatatype.IXFR,
        dns.rdatatype.MAILA,
        dns.rdatatype.MAILB,
        dns.rdatatype.OPT,
        dns.rdatatype.TSIG,
        dns.rdatatype.TKEY,
    }
)


def _updates(
    updates: list[dns.rrset.RRset], zone_name: dns.name.Name, zone: bytes, state: _Working
) -> list[Edit]:
    """RFC 2136 section 3.4: the prescan (any error, nothing applied), then each update."""
    for rrset in updates:
        _owner(rrset, zone_name)
        rtype = rrset.rdtype
        if rrset.deleting is None and rtype in _META:
            raise Refusal(dns.rcode.FORMERR, f"cannot add {_type(rtype)}")
        if rrset.deleting is not None and rrset.ttl != 0:
            raise Refusal(dns.rcode.FORMERR, "a delete with a TTL")
        if rrset.deleting == _NONE and rtype == dns.rdatatype.ANY:
            # RFC 2136 3.4.1.3: deleting one RR names a real type.
            raise Refusal(dns.rcode.FORMERR, "a delete of one record of type ANY")
        if rtype not in _SERVED_TYPES and rtype != dns.rdatatype.ANY:
            raise Refusal(dns.rcode.REFUSED, f"type {_type(rtype)} is not served here")
    for rrset in updates:
        owner = _owner(rrset, zone_name)
        rtype = rrset.rdtype
        apex = owner == zone
        if rrset.deleting is None:
            _add(state, owner, rtype, rrset.ttl, _rdatas(rrset), apex)
        elif rrset.deleting == _ANY:
            types: set[int] = state.types(owner) if rtype == dns.rdatatype.ANY else {rtype}
            for each in types:
                if not (apex and each in (dns.rdatatype.SOA, dns.rdatatype.NS)):
                    state.put(owner, each, None)
        else:
            found = state.get(owner, rtype)
            if found is None or (apex and rtype == dns.rdatatype.SOA):
                continue
            left = tuple(r for r in found[1] if r not in _rdatas(rrset))
            if apex and rtype == dns.rdatatype.NS and not left:
                continue  # a zone keeps its last NS (section 3.4.2.4)
            state.put(owner, rtype, (found[0], left) if left else None)
    return list(state.edits.items())


def _add(
    state: _Working, owner: bytes, rtype: int, ttl: int, rdatas: tuple[bytes, ...], apex: bool
) -> None:
    found = state.get(owner, rtype)
    if rtype == dns.rdatatype.SOA:
        if not apex or found is None:
            return
        serial = int.from_bytes(rdatas[0][-20:-16], "big")
        current = int.from_bytes(found[1][0][-20:-16], "big")
        # RFC 1982 serial arithmetic: only a newer serial replaces the SOA.
        if 0 < (serial - current) % 2**32 < 2**31:
            state.put(owner, rtype, (ttl, rdatas[:1]))
        return
    types = state.types(owner)
    if rtype == dns.rdatatype.CNAME:
        if types - {dns.rdatatype.CNAME}:
            return  # a CNAME cannot join other data (section 3.4.2.2)
        state.put(owner, rtype, (ttl, rdatas[:1]))
        return
    if dns.rdatatype.CNAME in types:
        return
    old = found[1] if found is not None else ()
    state.put(owner, rtype, (ttl, old + tuple(r for r in rdatas if r not in old)))
