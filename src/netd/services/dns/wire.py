"""
DNS messages at the byte level, for the paths that run once per query.

twisted.names' L{dns.Message} decodes every record into objects and encodes
them back; on the hot path netd only needs the header, the question and the
EDNS0 OPT record of a query, and answers from sections prepared beforehand (or
kept as an upstream sent them).  Names are never followed through compression
pointers here, only skipped, so a pointer loop costs nothing and a question
that uses a pointer at all is malformed.
"""

from __future__ import annotations

import re
import struct
from typing import NamedTuple

import attrs

from netd.records import Record

__all__ = [
    "AA",
    "BADVERS",
    "EDNS_PAYLOAD",
    "FORMERR",
    "NOERROR",
    "NOTIMP",
    "NXDOMAIN",
    "OPT",
    "QR",
    "RA",
    "RD",
    "REFUSED",
    "SERVFAIL",
    "SOA",
    "TC",
    "Malformed",
    "Query",
    "RecordSpan",
    "Sections",
    "encode_reply",
    "is_update",
    "malformed_reply",
    "name_to_text",
    "name_to_wire",
    "opt_record",
    "parent",
    "parse_query",
    "read_name",
    "reply_header",
    "skip_name",
    "udp_limit",
    "unescaped",
    "walk_records",
]

NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
BADVERS = 16
UPDATE = 5

QR, AA, TC, RD, RA = 0x8000, 0x0400, 0x0200, 0x0100, 0x0080
OPT = 41
# In the high byte of an OPT record's flags (RFC 3225).
_DO = 0x80
SOA = 6
# What netd advertises unless told otherwise: the DNS flag day 2020 size, which
# fits an Ethernet MTU (BIND's and Unbound's default too).
EDNS_PAYLOAD = 1232

_HEADER = struct.Struct(">HHHHHH")
_RR_FIXED = struct.Struct(">HHIH")
_QUESTION_TAIL = struct.Struct(">HH")

# RFC 1035 section 2.3.4.
_MAX_NAME = 255


class Malformed(Exception):
    """The bytes are not a message netd answers; C{rcode} is the reply, or None for silence."""

    def __init__(self, rcode: int | None, why: str) -> None:
        super().__init__(why)
        self.rcode = rcode


class Query(NamedTuple):
    """
    What the server needs from a query (a tuple: one is made per query).

    @ivar question: the question exactly as the client wrote it (its case is
        echoed back, RFC 1035 and 0x20 mixed-case clients want that).
    @ivar name: the query name in wire form, lower-cased: the lookup key.
    @ivar payload: the client's EDNS0 UDP payload size, or None without EDNS0.
    """

    id: int
    flags: int
    question: bytes
    name: bytes
    type: int
    cls: int
    payload: int | None = None
    edns_version: int = 0
    # The DO bit of its OPT record, which the answer's OPT copies (RFC 3225 3).
    dnssec_ok: bool = False


def skip_name(data: bytes, offset: int) -> int:
    """The offset just past the name at C{offset}; a pointer ends the name."""
    end = len(data)
    while True:
        if offset >= end:
            raise Malformed(FORMERR, "name runs past the end")
        length = data[offset]
        if length == 0:
            return offset + 1
        if length & 0xC0 == 0xC0:
            if offset + 2 > end:
                raise Malformed(FORMERR, "pointer runs past the end")
            return offset + 2
        if length & 0xC0:
            raise Malformed(FORMERR, "unknown label type")
        offset += 1 + length


def read_name(data: bytes, offset: int) -> int:
    """
    The offset past an uncompressed name at C{offset}; a name with a
    compression pointer, or longer than 255 bytes, is malformed.
    """
    start, end = offset, len(data)
    while True:
        if offset >= end:
            raise Malformed(FORMERR, "name runs past the end")
        length = data[offset]
        if length == 0:
            offset += 1
            break
        if length & 0xC0:
            raise Malformed(FORMERR, "compressed or extended label in a question")
        offset += 1 + length
    if offset - start > _MAX_NAME:
        raise Malformed(FORMERR, "name longer than 255 bytes")
    return offset


class RecordSpan(NamedTuple):
    """Where one resource record sits in a message."""

    start: int
    type: int
    ttl_offset: int
    rdata: int
    end: int


def walk_records(data: bytes, offset: int, count: int) -> tuple[list[RecordSpan], int]:
    """The next C{count} records from C{offset}, and the offset past them."""
    records = []
    for _ in range(count):
        start = offset
        offset = skip_name(data, offset)
        if offset + 10 > len(data):
            raise Malformed(FORMERR, "record runs past the end")
        rtype, _cls, _ttl, length = _RR_FIXED.unpack_from(data, offset)
        rdata = offset + 10
        offset = rdata + length
        if offset > len(data):
            raise Malformed(FORMERR, "record data runs past the end")
        records.append(RecordSpan(start, rtype, rdata - 6, rdata, offset))
    return records, offset


def parse_query(data: bytes) -> Query:
    """Read a query; L{Malformed} says whether to answer FORMERR (or NOTIMP) or stay silent."""
    if len(data) < 12:
        raise Malformed(None, "shorter than a header")
    ident, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(data)
    if flags & QR:
        # Never answer an answer: two servers would bounce it forever.
        raise Malformed(None, "a response, not a query")
    if (flags >> 11) & 0xF:
        raise Malformed(NOTIMP, "only standard queries")
    if qdcount != 1:
        raise Malformed(FORMERR, f"{qdcount} questions")
    end = read_name(data, 12)
    if end + 4 > len(data):
        raise Malformed(FORMERR, "question runs past the end")
    qtype, qclass = _QUESTION_TAIL.unpack_from(data, end)
    question = data[12 : end + 4]
    records, _ = walk_records(data, end + 4, ancount + nscount + arcount)
    payload: int | None = None
    version = 0
    dnssec_ok = False
    for index, record in enumerate(records):
        if record.type != OPT:
            continue
        if payload is not None or index < ancount + nscount or data[record.start] != 0:
            raise Malformed(FORMERR, "misplaced or repeated OPT record")
        # The OPT record's class is the payload size, its TTL the extended flags.
        payload = max(512, int.from_bytes(data[record.ttl_offset - 2 : record.ttl_offset], "big"))
        version = data[record.ttl_offset + 1]
        dnssec_ok = bool(data[record.ttl_offset + 2] & _DO)
    return Query(
        id=ident,
        flags=flags,
        question=question,
        name=data[12:end].lower(),
        type=qtype,
        cls=qclass,
        payload=payload,
        edns_version=version,
        dnssec_ok=dnssec_ok,
    )


TSIG = 250


def is_signed(data: bytes) -> bool:
    """Whether a message's last record is a TSIG record (RFC 8945 4.1: it can only be last)."""
    if len(data) < 12 or data[10:12] == b"\x00\x00":
        return False
    try:
        counts = struct.unpack_from(">HHH", data, 6)
        records, _ = walk_records(data, read_name(data, 12) + 4, sum(counts))
    except Malformed:
        return False
    return bool(records) and records[-1].type == TSIG


def is_update(data: bytes) -> bool:
    """Whether C{data} is an RFC 2136 UPDATE (opcode 5), not a response."""
    return len(data) >= 12 and not data[2] & 0x80 and (data[2] >> 3) & 0xF == UPDATE


def malformed_reply(data: bytes, rcode: int, opt: bytes) -> bytes:
    """
    A header-only answer to a query netd could not read beyond its header,
    with C{opt} (our OPT record) if the query carried one, even one at fault:
    RFC 6891 7, so the client can tell a FORMERR from a server without EDNS.
    Its DO bit is the query's (RFC 3225 3).
    """
    ident, flags = struct.unpack_from(">HH", data)
    dnssec_ok = _dnssec_ok(data)
    if dnssec_ok is None:
        opt = b""
    elif dnssec_ok:
        opt = _with_do(opt)
    return _HEADER.pack(ident, QR | (flags & (0x7800 | RD)) | rcode, 0, 0, 0, 1 if opt else 0) + opt


def _dnssec_ok(data: bytes) -> bool | None:
    """
    The DO bit of a message's first OPT record, or None if it has none or
    its records cannot be read.
    """
    qdcount, *counts = struct.unpack_from(">HHHH", data, 4)
    offset = 12
    try:
        for _ in range(qdcount):
            offset = skip_name(data, offset) + 4
        records, _ = walk_records(data, offset, sum(counts))
    except Malformed:
        return None
    for record in records:
        if record.type == OPT:
            return bool(data[record.ttl_offset + 2] & _DO)
    return None


def _with_do(opt: bytes) -> bytes:
    """Our OPT record with the DO bit set, as the answer to a query with it (RFC 3225 3)."""
    return opt[:7] + bytes([opt[7] | _DO]) + opt[8:]


def reply_header(query: Query, flags: int, an: int, ns: int, ar: int) -> bytes:
    """The header of the answer to C{query}: its ID and RD, our flags and counts."""
    return _HEADER.pack(query.id, QR | (query.flags & RD) | flags, 1, an, ns, ar)


def opt_record(payload: int, extended_rcode: int = 0) -> bytes:
    """An EDNS0 OPT record advertising C{payload} bytes (RFC 6891)."""
    return b"\x00" + _RR_FIXED.pack(OPT, payload, (extended_rcode >> 4) << 24, 0)


_OPT_REPLY = opt_record(EDNS_PAYLOAD)


@attrs.frozen(repr=False)
class Sections(Record):
    """
    The part of an answer after the question, ready to send.

    @ivar flags: AA, RA and the rcode.
    @ivar body: the answer, authority and additional records in wire form;
        compression pointers in it may point into a question of this name.
    """

    flags: int
    an: int
    ns: int
    ar: int
    body: bytes

    @property
    def rcode(self) -> int:
        return self.flags & 0xF


def encode_reply(
    query: Query, sections: Sections, limit: int | None, flags: int = 0, opt: bytes = _OPT_REPLY
) -> bytes:
    """
    The answer to C{query}, with C{flags} added to the sections' own; over
    C{limit} bytes, the question alone with TC set, for the client to ask again
    over TCP.  C{opt} (our OPT record) goes with it when the query had one.
    """
    if query.payload is None:
        opt = b""
    elif query.dnssec_ok and opt:
        opt = _with_do(opt)
    flags |= sections.flags
    header = reply_header(query, flags, sections.an, sections.ns, sections.ar + (1 if opt else 0))
    reply = header + query.question + sections.body + opt
    if limit is not None and len(reply) > limit:
        header = reply_header(query, flags | TC, 0, 0, 1 if opt else 0)
        reply = header + query.question + opt
    return reply


def udp_limit(client: int | None, payload: int = EDNS_PAYLOAD) -> int:
    """
    How big a UDP answer may be to a client offering C{client} bytes of EDNS0
    payload: the smaller of that and ours, C{payload}, but never below RFC
    1035's 512 bytes (RFC 6891 6.2.5), the limit without EDNS0 (C{None}).
    """
    if client is None:
        return 512
    return max(512, min(client, payload))


# Presentation format (RFC 1035 section 5.1): a query name is any bytes, and a
# space, quote or newline in it must not pass for the end of a log field or line.
_PRESENTATION = tuple(
    "\\" + chr(byte)
    if chr(byte) in '."\\'
    else chr(byte)
    if 0x21 <= byte <= 0x7E
    else f"\\{byte:03d}"
    for byte in range(256)
)


def name_to_text(wire: bytes) -> str:
    """A wire-form name (uncompressed) as dotted text, escaped as dig writes it, for logs."""
    labels = []
    offset = 0
    while offset < len(wire) and wire[offset]:
        length = wire[offset]
        label = wire[offset + 1 : offset + 1 + length]
        labels.append("".join([_PRESENTATION[byte] for byte in label]))
        offset += 1 + length
    return ".".join(labels) + "."


def name_to_wire(text: str) -> bytes:
    """
    Dotted text (ASCII, relative or absolute, with RFC 1035 5.1's C{\\.} and
    C{\\DDD} escapes) as a lower-cased wire-form name.
    """
    if "\\" in text:
        labels = _escaped_labels(text)
    else:
        text = text.rstrip(".")
        if not text:
            return b"\x00"
        labels = text.lower().encode("ascii").split(b".")
    if labels == [b""]:
        return b"\x00"
    if any(not label or len(label) > 63 for label in labels):
        raise ValueError(f"not a domain name: {text!r}")
    wire = b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"
    if len(wire) > _MAX_NAME:
        raise ValueError(f"name longer than 255 bytes: {text!r}")
    return wire


_ESCAPE = re.compile(r"\\(?:(\d{3})|(.))", re.DOTALL)


def unescaped(text: str, labels: bool) -> list[bytes]:
    """
    Master-file text as octets (RFC 1035 5.1): C{\\X} is X, C{\\DDD} the octet
    DDD.  C{labels}: a name, cut at its dots that are not escaped, in ASCII;
    else one character-string, other text as UTF-8.  Raises ValueError.
    """
    encoding = "ascii" if labels else "utf-8"
    pieces = [bytearray()]

    def plain(part: str) -> None:
        first, *rest = part.encode(encoding).split(b".") if labels else [part.encode()]
        pieces[-1] += first
        pieces.extend(bytearray(piece) for piece in rest)

    position = 0
    for match in _ESCAPE.finditer(text):
        plain(text[position : match.start()])
        digits, char = match.groups()
        if digits is not None:
            if int(digits) > 255:
                raise ValueError(f"not an octet: \\{digits}")
            pieces[-1].append(int(digits))
        else:
            pieces[-1] += char.encode(encoding)
        position = match.end()
    if position < len(text) and text.endswith("\\"):
        raise ValueError(f"a lone backslash at the end of {text!r}")
    plain(text[position:])
    return [bytes(piece) for piece in pieces]


def _escaped_labels(text: str) -> list[bytes]:
    """The labels of a name with escapes, lower-cased."""
    labels = unescaped(text, labels=True)
    if len(labels) > 1 and not labels[-1]:
        labels.pop()  # the root after a trailing dot
    return [label.lower() for label in labels]


def parent(wire: bytes) -> bytes | None:
    """The name one label up, or None for the root."""
    if wire == b"\x00":
        return None
    return wire[1 + wire[0] :]
