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
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
from twisted.names import dns

from netd.records import Record
from netd.services.dns.wire import name_to_text, name_to_wire, unescaped

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


@attrs.frozen(repr=False)
class RecordSet(Record):
    """Records of one name and type; owner and names inside are lower-case wire form."""

    owner: bytes
    type: int
    ttl: int
    rdata: tuple[bytes, ...]


_TOKEN = re.compile(r'"((?:[^"\\]|\\.)*)"|([^\s"]+)')


def tokens(text: str) -> list[tuple[str, bool]]:
    """
    Words and quoted strings, each with whether it was quoted; escapes are left
    in (a character-string's are decoded by L{character_string}, a name's by
    L{name_to_wire}).
    """
    if '"' not in text:
        # Most lines of a large zone: no quotes, so words are what split() finds.
        return [(word, False) for word in text.split()]
    found = []
    position = 0
    for match in _TOKEN.finditer(text):
        if text[position : match.start()].strip():
            raise DataError(f"cannot read {text!r}")
        position = match.end()
        if match.group(1) is not None:
            found.append((match.group(1), True))
        else:
            found.append((match.group(2), False))
    if text[position:].strip():
        raise DataError(f"unterminated quote in {text!r}")
    return found


def _absolute(text: str) -> bool:
    """Whether a name ends in a dot of its own, not an escaped one ("a\\." is relative)."""
    body = text[:-1]
    return text.endswith(".") and (len(body) - len(body.rstrip("\\"))) % 2 == 0


def _name(text: str, origin: bytes | None) -> bytes:
    """A name in rdata or an owner: relative names hang under C{origin} when there is one."""
    if text == "@" and origin is not None:
        return origin
    try:
        wire = name_to_wire(text)
    except (ValueError, UnicodeEncodeError):
        raise DataError(f"not a domain name: {text!r}") from None
    if origin is not None and not _absolute(text) and wire != b"\x00":
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
    family = socket.AF_INET if version == 4 else socket.AF_INET6

    def read(words: list[tuple[str, bool]], origin: bytes | None) -> bytes:
        (text,) = _expect(words, 1, f"one IPv{version} address")
        try:
            # inet_pton reads a subset of what ipaddress does, many times faster.
            return socket.inet_pton(family, text)
        except OSError:
            pass
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
    strings = [character_string(word) for word, _ in words]
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
    return bytes([_integer(flags, 8), len(tag_bytes)]) + tag_bytes + character_string(value)


def _soa(words: list[tuple[str, bool]], origin: bytes | None) -> bytes:
    mname, rname, serial, *timers = _expect(
        words, 7, "MNAME RNAME SERIAL REFRESH RETRY EXPIRE MINIMUM"
    )
    # The serial is a plain unsigned 32-bit number (RFC 1035 3.3.13, RFC 1982),
    # not a time: no units, and up to 2^32-1 as BIND takes it.
    return (
        _name(mname, origin)
        + _name(rname, origin)
        + _integer(serial, 32).to_bytes(4, "big")
        + b"".join(_time(n).to_bytes(4, "big") for n in timers)
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
        # In the service map an unquoted TXT value is one string, spaces, and
        # backslashes, and all.
        words = [(text.replace("\\", "\\\\"), True)]
    return _READERS[rtype](words, origin)


# RFC 2181 8: a TTL is 31 bits; a larger one cannot go on the wire.
MAX_TTL = 2**31 - 1


def _time(text: str) -> int:
    """A TTL: seconds, or with units as BIND writes them (1h30m, 2d)."""
    if text.isdigit():
        seconds = int(text)
    else:
        match = re.fullmatch(r"(?:\d+[smhdwSMHDW])+", text)
        if not match:
            raise DataError(f"not a time: {text!r}")
        units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
        found = re.findall(r"(\d+)([a-zA-Z])", text)
        seconds = sum(int(n) * units[u.lower()] for n, u in found)
    if seconds > MAX_TTL:
        raise DataError(f"a time is at most {MAX_TTL} seconds (RFC 2181 8): {text!r}")
    return seconds


def character_string(text: str) -> bytes:
    """
    A character-string as a master file writes it (RFC 1035 5.1): C{\\X} is
    X, C{\\DDD} the octet DDD (how dig and dnspython write what is not
    printable ASCII), other text as UTF-8.
    """
    if "\\" not in text:
        return text.encode()
    try:
        return unescaped(text, labels=False)[0]
    except ValueError as e:
        raise DataError(str(e)) from None


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
        for word, quoted in _grouped(tokens(line)):
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


def _grouped(words: list[tuple[str, bool]]) -> Iterator[tuple[str, bool]]:
    """The words with parentheses outside quotes as words of their own ("(1" is "(" "1")."""
    for word, quoted in words:
        if quoted or ("(" not in word and ")" not in word):
            yield word, quoted
        else:
            yield from ((piece, False) for piece in re.split(r"([()])", word) if piece)


def _strip_comment(line: str) -> str:
    if '"' not in line and "\\" not in line:
        return line.partition(";")[0]
    quoted = escaped = False
    for index, char in enumerate(line):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True  # "\\;" and '\\"' are text, and '\\\\"' a backslash, then a quote
        elif char == '"':
            quoted = not quoted
        elif char == ";" and not quoted:
            return line[:index]
    return line


_CLASSES = {"IN"}


@attrs.define(repr=False)
class _Reading(Record):
    """Where a master file's reading stands: what its directives set so far."""

    origin: bytes
    ttl: int
    folder: Path | None
    # Without $TTL, a record without a TTL has the last one given (RFC 1035 5.1).
    ttl_directive: bool = False
    last_ttl: int | None = None
    owner: bytes | None = None
    apex: bytes | None = None
    records: list[tuple[bytes, int, int, bytes]] = attrs.field(factory=list)


def parse_master_file(
    text: str, origin: bytes, default_ttl: int, path: Path | None = None
) -> tuple[list[tuple[bytes, int, int, bytes]], bytes]:
    """
    The records of an RFC 1035 master file as (owner, type, ttl, rdata), and
    its zone's apex: the origin its first record was read under.

    @param path: the file C{text} was read from; C{$INCLUDE} reads files
        beside it, and only in its folder (and folders under it).
    """
    folder = path.resolve().parent if path is not None else None
    reading = _Reading(origin, default_ttl, folder)
    _read_master(text, reading, path.resolve() if path is not None else None, ())
    types: dict[bytes, set[int]] = {}
    for owner, rtype, _, _ in reading.records:
        types.setdefault(owner, set()).add(rtype)
    for owner, found in types.items():
        if dns.CNAME in found and len(found) > 1:
            # RFC 1034 3.6.2, RFC 2181 10.1; BIND refuses to load such a zone too.
            raise DataError(f"{name_to_text(owner)} has a CNAME and other records")
    return reading.records, reading.apex or origin


def _read_master(
    text: str, reading: _Reading, path: Path | None, including: tuple[Path, ...]
) -> None:
    for line, blank_owner, words in _entries(text):
        try:
            first = words[0][0].upper()
            if first == "$ORIGIN":
                # A relative name hangs under the origin before it (RFC 1035 5.1).
                name = _expect(words[1:], 1, "$ORIGIN NAME")[0]
                reading.origin = _name(name, reading.origin)
            elif first == "$TTL":
                reading.ttl = _time(_expect(words[1:], 1, "$TTL SECONDS")[0])
                reading.ttl_directive = True
            elif first == "$INCLUDE":
                _include(words[1:], reading, path, including)
            elif first == "$GENERATE":
                _generate(words[1:], reading)
            elif first.startswith("$"):
                raise DataError(f"{words[0][0]} is not supported")
            else:
                _record(words, blank_owner, reading)
        except DataError as e:
            raise DataError(str(e), line) from None


def _record(words: list[tuple[str, bool]], blank_owner: bool, reading: _Reading) -> None:
    origin = reading.origin
    if not blank_owner:
        reading.owner = _name(words[0][0], origin)
        words = words[1:]
    owner = reading.owner
    if owner is None:
        raise DataError("the first record needs an owner name")
    record_ttl = reading.ttl
    if not reading.ttl_directive and reading.last_ttl is not None:
        record_ttl = reading.last_ttl
    while words and not words[0][1]:
        word = words[0][0]
        if word.upper() in _CLASSES:
            words = words[1:]
        elif word[0].isdigit():
            record_ttl = reading.last_ttl = _time(word)
            words = words[1:]
        else:
            break
    if not words:
        raise DataError("a record needs a type")
    type_text = words[0][0].upper()
    if type_text not in TYPES:
        raise DataError(f"unsupported record type {words[0][0]!r} (one of {', '.join(TYPES)})")
    rtype = TYPES[type_text]
    if reading.apex is None:
        reading.apex = origin
    reading.records.append((owner, rtype, record_ttl, parse_rdata(rtype, words[1:], origin)))


# Deeper nesting than this is a mistake, not a zone's layout.
MAX_INCLUDE_DEPTH = 8


def _include(
    args: list[tuple[str, bool]], reading: _Reading, path: Path | None, including: tuple[Path, ...]
) -> None:
    """
    C{$INCLUDE FILE [ORIGIN]} (RFC 1035 section 5.1): FILE relative to the file
    naming it; the origin and owner go back to what they were afterwards.
    """
    if not 1 <= len(args) <= 2:
        raise DataError("expected $INCLUDE FILE [ORIGIN]")
    if path is None or reading.folder is None:
        raise DataError("$INCLUDE is for zone files")
    name = args[0][0]
    if len(including) >= MAX_INCLUDE_DEPTH:
        raise DataError(f"$INCLUDE {name}: files included more than {MAX_INCLUDE_DEPTH} deep")
    target = (path.parent / name).resolve()
    # A map that names a zone file trusts that file's folder, nothing else:
    # not ../../etc/shadow, nor a symbolic link leading out of it.
    if not target.is_relative_to(reading.folder):
        raise DataError(f"$INCLUDE {name}: outside the zone file's folder {reading.folder}")
    if target == path or target in including:
        raise DataError(f"$INCLUDE {name}: the file includes itself")
    try:
        text = target.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else str(e)
        raise DataError(f"$INCLUDE {name}: cannot read {target}: {reason}") from None
    saved = reading.origin, reading.owner
    if len(args) == 2:
        reading.origin = _name(args[1][0], reading.origin)
    try:
        _read_master(text, reading, target, (*including, path))
    except DataError as e:
        where = f" line {e.line}" if e.line else ""
        raise DataError(f"{name}{where}: {e}") from None
    reading.origin, reading.owner = saved


MAX_GENERATED = 65536
# BIND formats each substitution into a 128-byte buffer, so a wider field is a mistake.
MAX_GENERATE_WIDTH = 127
_RANGE = re.compile(r"(\d{1,10})-(\d{1,10})(?:/(\d{1,10}))?")
# What follows a $: {offset}, {offset,width} or {offset,width,base}.
_MODIFIER = re.compile(r"\{([+-]?\d{1,10})(?:,(\d{1,10})(?:,([^}]))?)?\}")
_BASES = "doxXnN"


@attrs.frozen(repr=False)
class _Counter(Record):
    """One C{$} of a $GENERATE template: the number shifted by C{offset}, formatted."""

    offset: int
    width: int
    base: str

    def format(self, number: int) -> str:
        value = number + self.offset
        if value < 0 and self.base != "d":
            raise DataError(f"$GENERATE value {value} is negative, and base {self.base!r} is not d")
        if self.base in "nN":
            return _nibbles(value, self.width, self.base == "N")
        return format(value, self.base).zfill(self.width)


def _nibbles(value: int, width: int, upper: bool) -> str:
    """
    BIND's nibble format: hexadecimal digits least significant first, one a
    label, as ip6.arpa names write an address.  C{width} counts the dots too:
    nibbles and dots go on until the value is spent and C{width} characters
    are out, so an even width ends in a dot, as in BIND.
    """
    digits = "0123456789ABCDEF" if upper else "0123456789abcdef"
    text = []
    while True:
        text.append(digits[value & 0xF])
        value >>= 4
        width -= 1
        if width > 0 or value:
            text.append(".")
            width -= 1
        if not value and width <= 0:
            return "".join(text)


def _template(text: str) -> tuple[str | _Counter, ...]:
    """
    A $GENERATE OWNER or DATA word read once: literal text and counters.
    C{$$} and C{\\$} are a dollar sign; any other backslash pair is kept as written.
    """
    parts: list[str | _Counter] = []
    literal: list[str] = []
    index = 0
    while index < len(text):
        char = text[index]
        if char == "\\" and text[index + 1 : index + 2] == "$":
            literal.append("$")
            index += 2
        elif char == "\\":
            literal.append(text[index : index + 2])
            index += 2
        elif char != "$":
            literal.append(char)
            index += 1
        elif text[index + 1 : index + 2] == "$":
            literal.append("$")
            index += 2
        else:
            index += 1
            counter = _Counter(0, 0, "d")
            if text[index : index + 1] == "{":
                match = _MODIFIER.match(text, index)
                if match is None:
                    example = "as in ${-1}, ${0,3} or ${0,4,x}"
                    raise DataError(f"not a $GENERATE modifier in {text!r} ({example})")
                base = match[3] or "d"
                if base not in _BASES:
                    raise DataError(f"$GENERATE base {base!r} is not one of d, o, x, X, n, N")
                width = int(match[2] or 0)
                if width > MAX_GENERATE_WIDTH:
                    raise DataError(f"$GENERATE width {width} is more than {MAX_GENERATE_WIDTH}")
                counter = _Counter(int(match[1]), width, base)
                index = match.end()
            if literal:
                parts.append("".join(literal))
                literal = []
            parts.append(counter)
    if literal:
        parts.append("".join(literal))
    return tuple(parts)


def _fill(template: tuple[str | _Counter, ...], number: int) -> str:
    return "".join(part if isinstance(part, str) else part.format(number) for part in template)


def _generate(args: list[tuple[str, bool]], reading: _Reading) -> None:
    """
    BIND's C{$GENERATE START-STOP[/STEP] OWNER [TTL] [CLASS] TYPE DATA}: one
    record per number, C{$} in OWNER and DATA replaced by it, at most 65,536
    of them a line.  C{${offset,width,base}} shifts, pads and formats it (base
    d, o, x, X, or n and N for ip6.arpa nibbles).  DATA quoted whole, as BIND
    writes C{MX "0 ."}, is read as words once filled in (TXT keeps its strings).
    """
    if len(args) < 3:
        raise DataError("expected $GENERATE START-STOP[/STEP] OWNER [TTL] [CLASS] TYPE DATA")
    match = _RANGE.fullmatch(args[0][0])
    if match is None:
        raise DataError(f"not a $GENERATE range: {args[0][0]!r} (as in 1-100 or 0-254/2)")
    start, stop = int(match[1]), int(match[2])
    step = int(match[3] or 1)
    if max(start, stop, step) >= 1 << 31:
        raise DataError(f"$GENERATE range {args[0][0]!r} goes past 2147483647")
    if stop < start or step < 1:
        raise DataError(f"an empty $GENERATE range: {args[0][0]!r}")
    count = (stop - start) // step + 1
    if count > MAX_GENERATED:
        raise DataError(f"$GENERATE makes {count} records, more than {MAX_GENERATED}")
    words = args[1:]
    # DATA is one quoted word right after TYPE.
    split_data = (
        len(words) >= 3
        and words[-1][1]
        and not words[-2][1]
        and words[-2][0].upper() in TYPES.keys() - {"TXT"}
    )
    templates = [(_template(word), quoted) for word, quoted in words]
    for number in range(start, stop + 1, step):
        filled = [(_fill(template, number), quoted) for template, quoted in templates]
        if split_data:
            filled[-1:] = tokens(filled[-1][0])
        _record(filled, False, reading)


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
