"""
Records in text, as the service map, RFC 1035 master files and hosts files
write them, turned into wire-form record sets.

twisted.names' record classes do the encoding; CAA, which Twisted does not
know, is encoded here.  Twisted's own master-file reader (BindAuthority) loses
blank owners and quoted strings with spaces, so the file syntax is read here.
"""

from __future__ import annotations

import io
import ipaddress
import re
from collections.abc import Callable, Iterator

import attrs
from twisted.names import dns

from netd.services.dns.wire import name_to_wire

__all__ = [
    "TYPES",
    "DataError",
    "RecordSet",
    "parse_hosts",
    "parse_master_file",
    "parse_rdata",
    "type_name",
]

CAA = 257
TYPES: dict[str, int] = {
    "A": dns.A,
    "AAAA": dns.AAAA,
    "CNAME": dns.CNAME,
    "NS": dns.NS,
    "PTR": dns.PTR,
    "MX": dns.MX,
    "TXT": dns.TXT,
    "SRV": dns.SRV,
    "CAA": CAA,
    "SOA": dns.SOA,
}
_NAMES = {number: name for name, number in TYPES.items()}


def type_name(number: int) -> str:
    return _NAMES.get(number) or dns.QUERY_TYPES.get(number) or f"TYPE{number}"


class DataError(ValueError):
    """A record that cannot be read; C{line} is set for master and hosts files."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line


@attrs.frozen
class RecordSet:
    """Records of one name and type; owner and names inside are lower-case wire form."""

    owner: bytes
    type: int
    ttl: int
    rdata: tuple[bytes, ...]


_TOKEN = re.compile(r'"((?:[^"\\]|\\.)*)"|([^\s"]+)')


def tokens(text: str) -> list[tuple[str, bool]]:
    """Words and quoted strings (with C{\\"} escapes), each with whether it was quoted."""
    found = []
    position = 0
    for match in _TOKEN.finditer(text):
        if text[position : match.start()].strip():
            raise DataError(f"cannot read {text!r}")
        position = match.end()
        if match.group(1) is not None:
            found.append((re.sub(r"\\(.)", r"\1", match.group(1)), True))
        else:
            found.append((match.group(2), False))
    if text[position:].strip():
        raise DataError(f"unterminated quote in {text!r}")
    return found


def _name(text: str, origin: bytes | None) -> bytes:
    """A name in rdata or an owner: relative names hang under C{origin} when there is one."""
    if text == "@" and origin is not None:
        return origin
    try:
        wire = name_to_wire(text)
    except (ValueError, UnicodeEncodeError):
        raise DataError(f"not a domain name: {text!r}") from None
    if origin is not None and not text.endswith(".") and wire != b"\x00":
        wire = wire[:-1] + origin
        if len(wire) > 255:
            raise DataError(f"name longer than 255 bytes: {text!r}")
    return wire


def _integer(text: str, bits: int) -> int:
    if not text.isdigit() or int(text) >= 1 << bits:
        raise DataError(f"not a {bits}-bit number: {text!r}")
    return int(text)


def _encode(record: dns.IEncodable) -> bytes:
    buffer = io.BytesIO()
    record.encode(buffer)
    return buffer.getvalue()


def _expect(words: list[tuple[str, bool]], count: int, what: str) -> list[str]:
    if len(words) != count:
        raise DataError(f"expected {what}")
    return [word for word, _ in words]


def _address(version: int) -> Callable[[list[tuple[str, bool]], bytes | None], bytes]:
    def read(words: list[tuple[str, bool]], origin: bytes | None) -> bytes:
        (text,) = _expect(words, 1, f"one IPv{version} address")
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            address = None
        if address is None or address.version != version:
            raise DataError(f"not an IPv{version} address: {text!r}")
        return address.packed

    return read


def _target(words: list[tuple[str, bool]], origin: bytes | None) -> bytes:
    (text,) = _expect(words, 1, "one domain name")
    return _name(text, origin)


def _mx(words: list[tuple[str, bool]], origin: bytes | None) -> bytes:
    preference, exchange = _expect(words, 2, "PREFERENCE EXCHANGE, as in '10 mx.example.'")
    return _integer(preference, 16).to_bytes(2, "big") + _name(exchange, origin)


def _txt(words: list[tuple[str, bool]], origin: bytes | None) -> bytes:
    if not words:
        raise DataError("expected at least one string")
    strings = [word.encode() for word, _ in words]
    if any(len(s) > 255 for s in strings):
        # One configured string longer than a character-string goes out in pieces.
        strings = [s[i : i + 255] for s in strings for i in range(0, max(len(s), 1), 255)]
    return _encode(dns.Record_TXT(*strings))


def _srv(words: list[tuple[str, bool]], origin: bytes | None) -> bytes:
    priority, weight, port, target = _expect(words, 4, "PRIORITY WEIGHT PORT TARGET")
    return (
        _integer(priority, 16).to_bytes(2, "big")
        + _integer(weight, 16).to_bytes(2, "big")
        + _integer(port, 16).to_bytes(2, "big")
        + _name(target, origin)
    )


def _caa(words: list[tuple[str, bool]], origin: bytes | None) -> bytes:
    flags, tag, value = _expect(words, 3, "FLAGS TAG VALUE, as in '0 issue \"ca.example\"'")
    if not re.fullmatch(r"[A-Za-z0-9]{1,15}", tag):
        raise DataError(f"not a CAA tag: {tag!r}")
    tag_bytes = tag.encode()
    return bytes([_integer(flags, 8), len(tag_bytes)]) + tag_bytes + value.encode()


def _soa(words: list[tuple[str, bool]], origin: bytes | None) -> bytes:
    mname, rname, *numbers = _expect(words, 7, "MNAME RNAME SERIAL REFRESH RETRY EXPIRE MINIMUM")
    return (
        _name(mname, origin)
        + _name(rname, origin)
        + b"".join(_integer(str(_time(n)), 32).to_bytes(4, "big") for n in numbers)
    )


_READERS: dict[int, Callable[[list[tuple[str, bool]], bytes | None], bytes]] = {
    dns.A: _address(4),
    dns.AAAA: _address(6),
    dns.CNAME: _target,
    dns.NS: _target,
    dns.PTR: _target,
    dns.MX: _mx,
    dns.TXT: _txt,
    dns.SRV: _srv,
    CAA: _caa,
    dns.SOA: _soa,
}


def parse_rdata(rtype: int, text: str | list[tuple[str, bool]], origin: bytes | None) -> bytes:
    """
    The wire form of one record's data written as in a master file.

    @param origin: what relative names hang under; None reads every name as absolute
        (the service map's names have no trailing dot).
    """
    words = tokens(text) if isinstance(text, str) else text
    if rtype == dns.TXT and isinstance(text, str) and not any(quoted for _, quoted in words):
        # In the service map an unquoted TXT value is one string, spaces and all.
        words = [(text, True)]
    return _READERS[rtype](words, origin)


def _time(text: str) -> int:
    """A TTL: seconds, or with units as BIND writes them (1h30m, 2d)."""
    if text.isdigit():
        return int(text)
    match = re.fullmatch(r"(?:\d+[smhdwSMHDW])+", text)
    if not match:
        raise DataError(f"not a time: {text!r}")
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    return sum(int(n) * units[u.lower()] for n, u in re.findall(r"(\d+)([a-zA-Z])", text))


def _entries(text: str) -> Iterator[tuple[int, bool, list[tuple[str, bool]]]]:
    """Master-file entries: first line number, whether the owner is blank, the words."""
    depth = 0
    words: list[tuple[str, bool]] = []
    first = 0
    blank_owner = False
    for number, raw in enumerate(text.splitlines(), 1):
        line = _strip_comment(raw)
        if depth == 0:
            if not line.strip():
                continue
            first, blank_owner, words = number, line[:1].isspace(), []
        for word, quoted in tokens(line.replace("(", " ( ").replace(")", " ) ")):
            if not quoted and word in "()":
                depth += 1 if word == "(" else -1
                if depth < 0:
                    raise DataError("')' without '('", number)
                continue
            words.append((word, quoted))
        if depth == 0 and words:
            yield first, blank_owner, words
    if depth:
        raise DataError("'(' without ')'", first)


def _strip_comment(line: str) -> str:
    quoted = False
    for index, char in enumerate(line):
        if char == '"' and (index == 0 or line[index - 1] != "\\"):
            quoted = not quoted
        elif char == ";" and not quoted:
            return line[:index]
    return line


_CLASSES = {"IN"}


def parse_master_file(
    text: str, origin: bytes, default_ttl: int
) -> tuple[list[tuple[bytes, int, int, bytes]], bytes]:
    """
    The records of an RFC 1035 master file as (owner, type, ttl, rdata), and
    its zone's apex: the origin its first record was read under.  C{$INCLUDE}
    and C{$GENERATE} are refused.
    """
    records: list[tuple[bytes, int, int, bytes]] = []
    apex = origin
    ttl = default_ttl
    owner: bytes | None = None
    for line, blank_owner, words in _entries(text):
        try:
            first = words[0][0]
            if first.upper() == "$ORIGIN":
                origin = _name(_expect(words[1:], 1, "$ORIGIN NAME")[0], None)
                continue
            if first.upper() == "$TTL":
                ttl = _time(_expect(words[1:], 1, "$TTL SECONDS")[0])
                continue
            if first.startswith("$"):
                raise DataError(f"{first} is not supported")
            if not blank_owner:
                owner = _name(first, origin)
                words = words[1:]
            if owner is None:
                raise DataError("the first record needs an owner name")
            record_ttl = ttl
            while words and not words[0][1]:
                word = words[0][0]
                if word.upper() in _CLASSES:
                    words = words[1:]
                elif word[0].isdigit():
                    record_ttl = _time(word)
                    words = words[1:]
                else:
                    break
            if not words:
                raise DataError("a record needs a type")
            type_text = words[0][0].upper()
            if type_text not in TYPES:
                raise DataError(
                    f"unsupported record type {words[0][0]!r} (one of {', '.join(TYPES)})"
                )
            rtype = TYPES[type_text]
            if not records:
                apex = origin
            records.append((owner, rtype, record_ttl, parse_rdata(rtype, words[1:], origin)))
        except DataError as e:
            raise DataError(str(e), line) from None
    return records, apex


def parse_hosts(text: str) -> list[tuple[bytes, int, bytes]]:
    """The (name, A or AAAA, address) entries of a hosts file; unreadable lines are errors."""
    entries = []
    for number, raw in enumerate(text.splitlines(), 1):
        fields = raw.split("#", 1)[0].split()
        if not fields:
            continue
        address_text = fields[0].split("%", 1)[0]  # fe80::1%lo: the zone index is local
        try:
            address = ipaddress.ip_address(address_text)
        except ValueError:
            raise DataError(f"not an IP address: {fields[0]!r}", number) from None
        if len(fields) < 2:
            raise DataError("an address with no names", number)
        for name in fields[1:]:
            try:
                wire = name_to_wire(name)
            except (ValueError, UnicodeEncodeError):
                raise DataError(f"not a host name: {name!r}", number) from None
            entries.append((wire, dns.A if address.version == 4 else dns.AAAA, address.packed))
    return entries


def reverse_name(packed: bytes) -> bytes:
    """The in-addr.arpa or ip6.arpa name of an address."""
    return name_to_wire(ipaddress.ip_address(packed).reverse_pointer)
