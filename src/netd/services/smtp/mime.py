"""
A message's MIME entities read from its octets, as offsets into them: what
IMAP's BODY and BODYSTRUCTURE describe (L{netd.services.smtp.mailbox}) and
what a release rewrites for a next hop that takes no binary (L{seven_bit}).

The reading costs time linear in the message's size, however deep its
multiparts nest: every line that starts with C{--} is found in one scan and
filed by what follows, so each multipart looks its delimiters up rather than
scanning its body again (a scan per level cost 100 scans of the whole
message for one nested 100 deep).  No octet is copied but a header.
"""

from __future__ import annotations

import email.parser
import email.policy
import re
from bisect import bisect_left
from collections.abc import Iterator
from email.message import Message as EmailMessage

import attrs

__all__ = ["MAX_NESTING", "MAX_PARTS", "POLICY", "Entity", "read"]

# Past these, a part's parts are not listed (Dovecot's own limits): a message
# nested thousands deep or wide costs no more than these to describe.
MAX_NESTING = 100
MAX_PARTS = 10_000

POLICY = email.policy.compat32.clone(linesep="\r\n")
# A line that may be a multipart delimiter, and what follows its "--".
_DASH_LINE = re.compile(rb"^--([^\n]*)", re.MULTILINE)


@attrs.frozen
class Entity:
    """
    One MIME entity: its header, parsed, and its octets C{raw[start:end]},
    the body from C{body_start}.

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
    body_start: int
    end: int
    lines: int
    parts: tuple[Entity, ...] = ()

    def leaves(self) -> Iterator[Entity]:
        """The entities below it (or it) that hold no others, in order."""
        if not self.parts:
            yield self
        for part in self.parts:
            yield from part.leaves()


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
        header = email.parser.BytesHeaderParser(policy=POLICY).parsebytes(raw[start:head_end])
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
                return self._multipart(header, sub, start, body_start, end, spans, depth)
            main, sub = "text", "plain"
        if (main, sub) == ("message", "rfc822"):
            if nested:
                inner = self.entity(body_start, end, "text/plain", depth + 1)
                lines = raw.count(b"\n", body_start, inner.body_start) + inner.lines
                return Entity(header, main, sub, start, body_start, end, lines, (inner,))
            main, sub = "application", "octet-stream"
        lines = raw.count(b"\n", body_start, end)
        return Entity(header, main, sub, start, body_start, end, lines)

    def _multipart(
        self,
        header: EmailMessage,
        sub: str,
        start: int,
        body_start: int,
        end: int,
        spans: list[tuple[int, int]],
        depth: int,
    ) -> Entity:
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
        return Entity(header, "multipart", sub, start, body_start, end, lines, tuple(parts))

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
