"""
The names netd serves itself, answered authoritatively from wire-form sections
prepared once per (name, type) and then reused.

Zones: a name with an SOA record is a zone apex; every other configured name
that has no apex (and no configured name) above it is one too, with an SOA
made up for it.  Under an apex, names nobody configured are NXDOMAIN, and
types a name lacks are NODATA, both with the zone's SOA (RFC 2308).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

from twisted.names import dns

from netd.services.dns.wire import AA, NOERROR, NXDOMAIN, Sections, parent

__all__ = ["LocalData", "made_up_soa"]

_RR = struct.Struct(">HHIH")
_WILDCARD = b"\x01*"
# A name at the question's offset: owners equal to the query name cost two bytes.
_QUESTION_POINTER = b"\xc0\x0c"
# Chains longer than this are loops or abuse; what was found so far is answered.
_MAX_CHAIN = 8
_PREPARED_LIMIT = 50_000
# Where the target name starts in the data of the types with additional section processing.
_TARGET_OFFSET = {dns.MX: 2, dns.NS: 0, dns.SRV: 6}
_ADDITIONAL_LIMIT = 512
# RFC 8482 section 4.2: ANY over UDP answered by one synthesised HINFO, its
# TTL CoreDNS's `any` plugin's (a long one, so resolvers keep asking less).
_HINFO = 13
_RFC8482_DATA = b"\x07RFC8482\x00"
_MINIMAL_ANY = Sections(
    AA | NOERROR,
    1,
    0,
    0,
    _QUESTION_POINTER + _RR.pack(_HINFO, dns.IN, 8482, len(_RFC8482_DATA)) + _RFC8482_DATA,
)


def made_up_soa(apex: bytes, negative_ttl: int) -> bytes:
    """The SOA data of a zone nobody wrote one for."""
    return (
        b"\x02ns"
        + apex
        + b"\nhostmaster"
        + apex
        + struct.pack(">IIIII", 1, 3600, 600, 86400, negative_ttl)
    )


class LocalData:
    """
    Authoritative answers for configured records.

    @param records: (owner, type, ttl, rdata) in wire form; several of one
        owner and type form one set, with the smallest TTL.
    @param negative_ttl: SOA minimum (and TTL) of the zones made up here.
    """

    def __init__(self, records: Iterable[tuple[bytes, int, int, bytes]], negative_ttl: int) -> None:
        self.records = records
        self.negative_ttl = negative_ttl
        self.sets: dict[bytes, dict[int, tuple[int, list[bytes]]]] = {}
        for owner, rtype, ttl, rdata in records:
            node = self.sets.setdefault(owner, {})
            old_ttl, rdatas = node.get(rtype, (ttl, []))
            if rdata not in rdatas:
                rdatas.append(rdata)
            node[rtype] = (min(old_ttl, ttl), rdatas)
        self.zones: set[bytes] = {o for o, node in self.sets.items() if dns.SOA in node}
        for owner in sorted(self.sets, key=len):
            base = owner[2:] if owner.startswith(_WILDCARD) else owner
            if self.zone_of(base) is None:
                self.zones.add(base)
                self.sets.setdefault(base, {})[dns.SOA] = (
                    negative_ttl,
                    [made_up_soa(base, negative_ttl)],
                )
        # Every name between an owner and its apex exists (empty non-terminals).
        self.names: set[bytes] = set()
        for owner in self.sets:
            name: bytes | None = owner
            while name is not None and name not in self.names:
                self.names.add(name)
                if name in self.zones:
                    break
                name = parent(name)
        self._prepared: dict[tuple[bytes, int], Sections | None] = {}

    def __reduce__(self) -> tuple[type[LocalData], tuple[Any, int]]:
        # Sent to each worker process as what it was built from, rebuilt there:
        # half the bytes, and half the time the main process spends pickling.
        return LocalData, (self.records, self.negative_ttl)

    def zone_of(self, name: bytes) -> bytes | None:
        candidate: bytes | None = name
        while candidate is not None:
            if candidate in self.zones:
                return candidate
            candidate = parent(candidate)
        return None

    def is_local(self, name: bytes) -> bool:
        return self.zone_of(name) is not None

    def answer(self, name: bytes, qtype: int) -> Sections | None:
        """The sections answering C{name}/C{qtype}, or None for a name that is not ours."""
        key = (name, qtype)
        try:
            return self._prepared[key]
        except KeyError:
            pass
        sections = self._build(name, qtype)
        if len(self._prepared) >= _PREPARED_LIMIT:
            # Random names (a scan, a cache-busting attack) must not grow memory.
            self._prepared.clear()
        self._prepared[key] = sections
        return sections

    def minimal_any(self, name: bytes) -> Sections | None:
        """
        The answer to ANY for C{name} over UDP (RFC 8482): one HINFO
        C{"RFC8482" ""} if the name has records, so a small query cannot fetch
        every set of a name; a name without any answers as for any type.
        """
        sections = self.answer(name, dns.ALL_RECORDS)
        if sections is None or sections.rcode != NOERROR or not sections.an:
            return sections
        return _MINIMAL_ANY

    def _node(self, name: bytes) -> dict[int, tuple[int, list[bytes]]] | None:
        node = self.sets.get(name)
        if node is not None or name in self.names:
            return node or {}
        # RFC 4592: the wildcard at the closest encloser, if that has one; the
        # zone's apex exists, so the search ends there at the latest.
        encloser = parent(name)
        while encloser is not None and encloser not in self.names:
            encloser = parent(encloser)
        if encloser is None:
            return None
        return self.sets.get(_WILDCARD + encloser)

    def _build(self, qname: bytes, qtype: int) -> Sections | None:
        zone = self.zone_of(qname)
        if zone is None:
            return None
        answers: list[bytes] = []
        name = qname
        seen = set()
        for _ in range(_MAX_CHAIN):
            if name in seen:
                break  # a loop: what the chain has so far is the answer
            seen.add(name)
            cut = self._cut(name, zone)
            if cut is not None:
                if answers:
                    break  # a chain into a delegated name: the client follows it there
                return self._referral(cut)
            owner = _QUESTION_POINTER if name == qname else name
            node = self._node(name)
            if node is None:
                return self._negative(NXDOMAIN, zone, answers)
            if qtype in node or (qtype == dns.ALL_RECORDS and node):
                types = [qtype] if qtype in node else sorted(node)
                for rtype in types:
                    answers.extend(_records(owner, rtype, *node[rtype]))
                additional = self._additional(qname, qtype, node, answers)
                body = b"".join(answers + additional)
                return Sections(AA | NOERROR, len(answers), 0, len(additional), body)
            cname = node.get(dns.CNAME)
            if cname is None or qtype == dns.CNAME:
                return self._negative(NOERROR, zone, answers)
            answers.extend(_records(owner, dns.CNAME, *cname))
            target = cname[1][0]
            target_zone = self.zone_of(target)
            if target_zone is None:
                # The rest of the chain is someone else's: the client asks for it.
                break
            name, zone = target, target_zone
        return Sections(AA | NOERROR, len(answers), 0, 0, b"".join(answers))

    def _additional(
        self,
        qname: bytes,
        qtype: int,
        node: dict[int, tuple[int, list[bytes]]],
        answers: list[bytes],
    ) -> list[bytes]:
        """
        The addresses of the MX, NS and SRV targets netd holds itself (RFC 1035
        section 3.3, RFC 2782), saving the client a query each; left out when
        they would take the answer past 512 bytes, so they never cause a TC.
        """
        skip = _TARGET_OFFSET.get(qtype)
        if skip is None:
            return []
        found: list[bytes] = []
        # Each target once, however many records name it (RFC 2181 5: no set twice).
        for name in dict.fromkeys(rdata[skip:] for rdata in node[qtype][1]):
            target = self.sets.get(name)
            for rtype in (dns.A, dns.AAAA):
                if target is not None and rtype in target:
                    found.extend(_records(name, rtype, *target[rtype]))
        # Header, question (the name and type and class), answers, additional, an OPT record.
        size = 12 + len(qname) + 4 + sum(map(len, answers)) + sum(map(len, found)) + 11
        return found if size <= _ADDITIONAL_LIMIT else []

    def _cut(self, name: bytes, zone: bytes) -> bytes | None:
        """
        The delegation C{name} lies at or under in C{zone}: the highest name
        below the apex with NS records (RFC 1034 4.2.1: what lies under a cut
        is the child zone's, glue aside), or None.
        """
        found = None
        candidate: bytes | None = name
        while candidate is not None and candidate != zone:
            node = self.sets.get(candidate)
            if node is not None and dns.NS in node:
                found = candidate
            candidate = parent(candidate)
        return found

    def _referral(self, cut: bytes) -> Sections:
        """
        RFC 1034 4.3.2 step 3b: no answer, not authoritative, the cut's NS
        records in the authority section and the addresses held for their
        targets (glue) in the additional section.
        """
        ns_ttl, targets = self.sets[cut][dns.NS]
        authority = _records(cut, dns.NS, ns_ttl, targets)
        glue = []
        for target in targets:
            node = self.sets.get(target, {})
            for rtype in (dns.A, dns.AAAA):
                if rtype in node:
                    glue.extend(_records(target, rtype, *node[rtype]))
        body = b"".join(authority + glue)
        return Sections(NOERROR, 0, len(authority), len(glue), body)

    def _negative(self, rcode: int, zone: bytes, answers: list[bytes]) -> Sections:
        ttl, soas = self.sets[zone][dns.SOA]
        soa = soas[0]
        # RFC 2308 section 3: the SOA's TTL in a negative answer is its minimum.
        ttl = min(ttl, int.from_bytes(soa[-4:], "big"))
        authority = zone + _RR.pack(dns.SOA, dns.IN, ttl, len(soa)) + soa
        return Sections(AA | rcode, len(answers), 1, 0, b"".join(answers) + authority)


def _records(owner: bytes, rtype: int, ttl: int, rdatas: list[bytes]) -> list[bytes]:
    return [owner + _RR.pack(rtype, dns.IN, ttl, len(rdata)) + rdata for rdata in rdatas]
