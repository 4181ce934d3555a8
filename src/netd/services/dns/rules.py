"""
The dns kind's rules (L{netd.rules}): what a query may be matched on, and the
answers a rule gives instead of the service's own.

    rules:
      - {match: {name: api.test, qtype: A}, answers: ["10.0.0.1"], times: 1}
      - {match: {name: "*.down.test"}, rcode: SERVFAIL}
      - {match: {name: big.test, transport: udp}, truncate: true}
      - {match: {name: lost.test}, drop: true}
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.defer import Deferred
from twisted.names import dns

from netd.records import Record
from netd.rules import Fired, Vocabulary, exact, glob
from netd.schema import Value
from netd.services.dns.data import TYPES, DataError, parse_rdata
from netd.services.dns.wire import AA, TC, Query, Sections, name_to_text

if TYPE_CHECKING:
    from netd.services.dns.server import Server

__all__ = ["RULES", "answer_by_rule", "query_event"]

_RCODES = {"NOERROR": 0, "FORMERR": 1, "SERVFAIL": 2, "NXDOMAIN": 3, "NOTIMP": 4, "REFUSED": 5}
_RR = struct.Struct(">HHIH")
_POINTER_TO_QUESTION = b"\xc0\x0c"
_OWN_ACTS = ("rcode", "answers", "ttl", "truncate")

Answer = bytes | Deferred[bytes] | None


@attrs.frozen(repr=False)
class _Record(Record):
    type: int
    rdata: bytes


def _answers(value: Value) -> tuple[_Record, ...]:
    """Each an address (A or AAAA), or C{TYPE data} as the map's records write it."""
    found = []
    for element in value.elements(single=True):
        text = element.as_str()
        if not element.is_scalar:
            continue
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            kind, _, data = text.partition(" ")
            rtype = TYPES.get(kind.upper())
            if rtype is None or not data.strip():
                element.error(f"not an address or 'TYPE data' (as in 'MX 10 mx.test'): {text!r}")
                continue
            try:
                found.append(_Record(rtype, parse_rdata(rtype, data.strip(), None)))
            except (DataError, ValueError) as e:
                element.error(f"not a {kind.upper()} record: {e}")
            continue
        rtype = dns.A if address.version == 4 else dns.AAAA
        found.append(_Record(rtype, address.packed))
    return tuple(found)


def _rcode(value: Value) -> int:
    return _RCODES[value.as_choice(tuple(_RCODES), "NOERROR").upper()]


def _truncate(value: Value) -> bool:
    return value.as_bool()


RULES = Vocabulary(
    match={
        "name": glob(),
        "qtype": exact(*sorted({t.lower() for t in (*dns.QUERY_TYPES.values(), *TYPES)})),
        "transport": exact("udp", "tcp"),
    },
    acts={
        "rcode": _rcode,
        "answers": _answers,
        "ttl": lambda value: value.as_int(60, minimum=0, maximum=2**31 - 1),
        "truncate": _truncate,
    },
    generic=("delay", "drop"),
)


def query_event(query: Query, udp: bool) -> dict[str, str]:
    """What a query's rules match on: its name (no final dot), type and transport."""
    qtype = dns.QUERY_TYPES.get(query.type) or f"TYPE{query.type}"
    return {
        "name": name_to_text(query.name).rstrip("."),
        "qtype": "CAA" if query.type == 257 else qtype,
        "transport": "udp" if udp else "tcp",
    }


def _sections(acts: Any, query: Query, default_ttl: int, truncate: bool) -> tuple[Sections, int]:
    """The rule's answer to C{query}, and the flags it adds (TC)."""
    if truncate:
        return Sections(AA, 0, 0, 0, b""), TC
    ttl = acts.get("ttl", default_ttl)
    records = [
        _POINTER_TO_QUESTION + _RR.pack(r.type, dns.IN, ttl, len(r.rdata)) + r.rdata
        for r in acts.get("answers", ())
        if r.type == query.type or r.type == dns.CNAME
    ]
    return Sections(AA | acts.get("rcode", 0), len(records), 0, 0, b"".join(records)), 0


def answer_by_rule(
    server: Server,
    fired: Fired,
    query: Query,
    reply: Callable[[Sections, int], bytes],
    usual: Callable[[], Answer],
    udp: bool,
) -> Answer:
    """
    The answer a fired rule gives: none (C{drop}), its own (C{reply} encodes
    it), or the service's usual one (C{usual}); after C{delay} seconds.
    C{truncate} is for UDP only: over TCP the rule's other answer, or the
    usual one, is what the client's retry gets (RFC 7766: a TCP answer is
    never truncated).
    """
    acts = fired.acts
    if acts.get("drop"):
        return None
    truncate = udp and bool(acts.get("truncate"))
    if truncate or any(name in acts for name in _OWN_ACTS if name != "truncate"):
        sections, flags = _sections(acts, query, server.options.ttl, truncate)

        def give() -> Answer:
            return reply(sections, flags)

    else:
        give = usual
    delay = acts.get("delay")
    if not delay:
        return give()
    later: Deferred[bytes] = Deferred()

    def answer_now() -> None:
        answer = give()
        if isinstance(answer, Deferred):
            answer.chainDeferred(later)
        elif answer is not None:
            later.callback(answer)

    server.clock.callLater(delay, answer_now)
    return later
