"""
A message's MIME entities read from its octets, as offsets into them: what
IMAP's BODY and BODYSTRUCTURE describe (L{netd.services.smtp.mailbox}) and
what a release rewrites for a next hop that takes no binary (L{seven_bit}).

The reading costs time linear in the message's size, however deep its
multiparts nest: every line that starts with C{--} is found in one scan and
filed by what follows, so each multipart looks its delimiters up rather than
scanning its body again (a scan per level cost 100 scans of the whole
message for one nested 100 deep).  Reading copies no octet but headers.
"""

from __future__ import annotations

import base64
import codecs
import email.parser
import email.policy
import re
from bisect import bisect_left
from email.message import Message as EmailMessage

import attrs

from netd.records import Record

__all__ = [
    "MAX_NESTING",
    "MAX_PARTS",
    "Entity",
    "NotConvertible",
    "mail_charset",
    "read",
    "seven_bit",
]

# Past these, a part's parts are not listed (Dovecot's own limits): a message
# nested thousands deep or wide costs no more than these to describe.
MAX_NESTING = 100
MAX_PARTS = 10_000

_POLICY = email.policy.compat32.clone(linesep="\r\n")
# A line that may be a multipart delimiter, and what follows its "--".
_DASH_LINE = re.compile(rb"^--([^\n]*)", re.MULTILINE)


# Python text codecs that are no mail charset: punycode and idna decode in time
# quadratic in their input (a MiB part, or a subject of many encoded words that
# the email package joins: minutes on every search), the escapes are Python's.
_NOT_MAIL_CHARSETS = frozenset({"punycode", "idna", "unicode-escape", "raw-unicode-escape"})


def mail_charset(charset: str) -> str:
    """
    C{charset}, or C{utf-8} for a Python codec that is no mail charset; an
    unknown one is left to its reader (its decode raises LookupError).
    """
    try:
        name = codecs.lookup(charset).name
    except LookupError:
        return charset
    return "utf-8" if name in _NOT_MAIL_CHARSETS else charset


@attrs.frozen(repr=False)
class Entity(Record):
    """
    One MIME entity: its header, parsed, and its octets C{raw[start:end]}:
    the header to C{head_end} (with its last CRLF), the body from
    C{body_start}.

    @ivar main: its type as read: a multipart without parts to list reads as
        text/plain (RFC 2046 5.1.3), a message/rfc822 past the limits as
        application/octet-stream.
    @ivar lines: the LFs in its body (Dovecot's line count).
    @ivar parts: a multipart's parts, or a message/rfc822's message; () for
        any other.
    """

    header: EmailMessage
    main: str
    sub: str
    start: int
    head_end: int
    body_start: int
    end: int
    lines: int
    parts: tuple[Entity, ...] = ()


def read(raw: bytes) -> Entity:
    """
    The entity tree of a message, as Dovecot reads it: a part may have no
    header, the CRLF before a delimiter belongs to the delimiter, the preamble
    and epilogue are no part, a multipart without its close delimiter ends at
    its end, RFC 2045's default types.
    """
    return _Reader(raw).entity(0, len(raw), "text/plain", 0)


class _Reader:
    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.parts_left = MAX_PARTS
        self._delimiters: dict[bytes, list[int]] | None = None

    def entity(self, start: int, end: int, default_type: str, depth: int) -> Entity:
        """The entity C{raw[start:end]}, C{depth} entities deep."""
        self.parts_left -= 1
        raw = self.raw
        if raw.startswith(b"\r\n", start, end):  # no header
            head_end, body_start = start, start + 2
        else:
            blank = raw.find(b"\r\n\r\n", start, end)
            head_end, body_start = (end, end) if blank < 0 else (blank + 2, blank + 4)
        header = email.parser.BytesHeaderParser(policy=_POLICY).parsebytes(raw[start:head_end])
        header.set_default_type(default_type)
        main, sub = header.get_content_maintype(), header.get_content_subtype()
        nested = depth < MAX_NESTING and self.parts_left > 0
        if main == "multipart":
            boundary = header.get_boundary() if nested else None
            spans = (
                self._spans(body_start, end, boundary.encode("ascii", "surrogateescape"))
                if boundary
                else []
            )
            if spans:
                return self._multipart(
                    header, sub, (start, head_end, body_start, end), spans, depth
                )
            main, sub = "text", "plain"
        if (main, sub) == ("message", "rfc822"):
            if nested:
                inner = self.entity(body_start, end, "text/plain", depth + 1)
                lines = raw.count(b"\n", body_start, inner.body_start) + inner.lines
                return Entity(header, main, sub, start, head_end, body_start, end, lines, (inner,))
            main, sub = "application", "octet-stream"
        lines = raw.count(b"\n", body_start, end)
        return Entity(header, main, sub, start, head_end, body_start, end, lines)

    def _multipart(
        self,
        header: EmailMessage,
        sub: str,
        offsets: tuple[int, int, int, int],
        spans: list[tuple[int, int]],
        depth: int,
    ) -> Entity:
        start, head_end, body_start, end = offsets
        inner = "message/rfc822" if sub == "digest" else "text/plain"
        parts = []
        # The body's LFs: each part's own, and those between them counted once here.
        lines = 0
        counted = body_start
        for part_start, part_end in spans:
            part = self.entity(part_start, part_end, inner, depth + 1)
            parts.append(part)
            lines += self.raw.count(b"\n", counted, part.body_start) + part.lines
            counted = part_end
            if self.parts_left <= 0:
                break
        lines += self.raw.count(b"\n", counted, end)
        return Entity(
            header, "multipart", sub, start, head_end, body_start, end, lines, tuple(parts)
        )

    def _delimiter_lines(self) -> dict[bytes, list[int]]:
        """
        Where each line that starts with C{--} starts, by the rest of the line
        (its trailing white space cut), read at the first multipart.
        """
        if self._delimiters is None:
            found: dict[bytes, list[int]] = {}
            for line in _DASH_LINE.finditer(self.raw):
                found.setdefault(line.group(1).rstrip(b" \t\r"), []).append(line.start())
            self._delimiters = found
        return self._delimiters

    def _spans(self, body_start: int, end: int, boundary: bytes) -> list[tuple[int, int]]:
        """
        The parts of the multipart body C{raw[body_start:end]} (RFC 2046
        5.1.1).  An enclosing multipart's delimiters ended this body before
        it, so each delimiter line is taken by the outermost boundary it
        closes or separates.
        """
        raw = self.raw
        lines = self._delimiter_lines()
        closes = lines.get(boundary + b"--", [])
        first_close = bisect_left(closes, body_start)
        closed = first_close < len(closes) and closes[first_close] < end
        last = closes[first_close] if closed else end
        delimiters = lines.get(boundary, [])
        spans: list[tuple[int, int]] = []
        part_start: int | None = None
        for index in range(bisect_left(delimiters, body_start), len(delimiters)):
            found = delimiters[index]
            if found >= last:
                break
            if part_start is not None:
                spans.append((part_start, self._before(part_start, found)))
                if len(spans) >= self.parts_left:
                    return spans  # no more are read
            line_end = raw.find(b"\n", found, end)
            part_start = end if line_end < 0 else line_end + 1
        if part_start is not None:
            spans.append((part_start, self._before(part_start, last) if closed else end))
        return spans

    def _before(self, part_start: int, delimiter: int) -> int:
        """Where a part ends: before the CRLF (or LF) of the delimiter line after it."""
        part_end = delimiter - 1
        if part_end > part_start and self.raw[part_end - 1] == 0x0D:
            part_end -= 1
        return max(part_start, part_end)


# Seven bit, for DATA -----------------------------------------------------------


class NotConvertible(Exception):
    """A message L{seven_bit} cannot make fit for DATA; its text says why."""


# The longest line DATA carries, its CRLF aside (RFC 5321 4.5.3.1.6).
_MAX_LINE = 998
_CTE_FIELD = re.compile(
    rb"^content-transfer-encoding[ \t]*:[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*",
    re.IGNORECASE | re.MULTILINE,
)
_UNENCODED = frozenset({"7bit", "8bit", "binary"})


def seven_bit(raw: bytes) -> bytes:
    """
    A message that came with BODY=BINARYMIME made fit for a next hop reached
    by DATA (RFC 3030 3): each part whose body is not 7-bit lines in base64
    (its Content-Transfer-Encoding says so), a multipart or message/rfc822
    said to be C{binary} or C{8bit} said to be C{7bit}, and every other octet
    as it came: headers (UTF-8 ones too, for SMTPUTF8), preambles, delimiters,
    the parts that were lines already.  L{NotConvertible} if some octets
    would still not be lines: in a part past the reading's limits, in a
    multipart without delimiters, in a quoted-printable part.
    """
    top = read(raw)
    edits: list[tuple[int, int, bytes]] = []
    encoded = _seven_bit(raw, top, edits)
    if encoded and top.header.get("mime-version") is None:
        edits.append((top.head_end, top.head_end, b"MIME-Version: 1.0\r\n"))
    pieces = []
    copied = 0
    for start, end, text in sorted(edits, key=lambda edit: edit[:2]):
        pieces += [raw[copied:start], text]
        copied = end
    pieces.append(raw[copied:])
    converted = b"".join(pieces)
    if not _are_lines(converted, seven_bit=False):
        raise NotConvertible(
            f"some octets are no lines of text even so (past {MAX_NESTING} levels or"
            f" {MAX_PARTS:,} parts, outside any part, or in a header)"
        )
    return converted


def _are_lines(text: bytes, seven_bit: bool) -> bool:
    """
    Whether DATA carries C{text} as it is: no NUL, every CR and LF in a
    CRLF, no line over 998 octets, and (C{seven_bit}) no 8-bit octet.  All
    C searches: a regular expression took a second for 3 MB.
    """
    if (seven_bit and not text.isascii()) or b"\x00" in text:
        return False
    if not text.count(b"\r") == text.count(b"\n") == text.count(b"\r\n"):
        return False
    # Window by window: the last CRLF within a line's reach starts the next.
    start = 0
    while len(text) - start > _MAX_LINE:
        crlf = text.rfind(b"\r\n", start, start + _MAX_LINE + 2)
        if crlf < 0:
            return False
        start = crlf + 2
    return True


def _seven_bit(raw: bytes, entity: Entity, edits: list[tuple[int, int, bytes]]) -> bool:
    """Add the edits that make C{entity} 7-bit to C{edits}; whether a part went in base64."""
    encoding = str(entity.header.get("content-transfer-encoding", "7bit")).strip().lower()
    if entity.parts:
        inside = [_seven_bit(raw, part, edits) for part in entity.parts]
        if encoding in ("8bit", "binary"):
            _say_encoding(raw, entity, b"7bit", edits)
        return any(inside)
    if entity.body_start == entity.end:
        return False
    body = raw[entity.body_start : entity.end]
    if _are_lines(body, seven_bit=True):
        if encoding in ("8bit", "binary"):
            _say_encoding(raw, entity, b"7bit", edits)
        return False
    declared = entity.header.get_content_type()
    if declared.startswith("multipart/") or declared in ("message/rfc822", "message/partial"):
        # Its parts were not read (past the limits, or no delimiters): base64 is no encoding for it.
        raise NotConvertible(
            f"the {declared} at octet {entity.start} holds octets that are no lines"
        )
    if encoding == "base64":
        body = base64.b64decode(body)  # lines too long, or bare line ends: wrapped anew
    elif encoding not in _UNENCODED:
        raise NotConvertible(f"the {encoding} part at octet {entity.start} is no lines of text")
    encoded = base64.encodebytes(body).replace(b"\n", b"\r\n")
    if entity.end < len(raw):
        encoded = encoded[:-2]  # the CRLF before the next delimiter is the delimiter's
    edits.append((entity.body_start, entity.end, encoded))
    _say_encoding(raw, entity, b"base64", edits)
    return True


def _say_encoding(
    raw: bytes, entity: Entity, encoding: bytes, edits: list[tuple[int, int, bytes]]
) -> None:
    """An entity's Content-Transfer-Encoding fields replaced by one saying C{encoding}."""
    head = raw[entity.start : entity.head_end]
    for field in _CTE_FIELD.finditer(head):
        edits.append((entity.start + field.start(), entity.start + field.end(), b""))
    field_text = b"Content-Transfer-Encoding: " + encoding + b"\r\n"
    edits.append((entity.head_end, entity.head_end, field_text))
