"""
What a test of a sign-up or log-in flow wants from a captured message: the
links and the one-time codes in its text and HTML parts (C{GET
.../messages/ID/links} and C{.../codes}), and the text those parts read as,
with the parts' file names, which C{GET .../messages?text=} searches.

Runs in a thread: a message may be megabytes of HTML.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator
from email.errors import HeaderParseError
from email.header import decode_header, make_header
from email.message import Message
from html.parser import HTMLParser

from netd.services.smtp import mime

__all__ = ["DEFAULT_CODES", "SEARCHED", "codes", "links", "text"]

_YEAR = r"(?:19|20)\d\d"
# A month's name as a date writes it: capitalised ("Dec", "December").
_MONTH = (
    r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?"
    r"|Sep(?:t|tember)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)"
)
# Next to a day's number a month's name is one in any case, but for "may", a verb.
_DAY_S_MONTH = rf"(?!may\b)(?i:{_MONTH})"
_DAY = r"\d{1,2}(?:st|nd|rd|th)?"
# What reads as a code but is none, matched first so that its digits are passed
# over: a date's year ("December 5, 2024", "5 dec 2024", "Dec 2024"), a
# copyright's year ("(c) 2024", "© 2024") and a phone number, international
# ("+1 555 123 4567", "+49 30 1234 5678"), with its area code in brackets
# ("(030) 1234 5678") or local ("555 1234"): a lone group of three digits before
# the four would, as a code, be a group of four ("1234 5678 9012" are three).
_NOT_CODES = (
    rf"\b(?:{_DAY}\s+{_DAY_S_MONTH}\b\.?|{_DAY_S_MONTH}\b\.?\s+{_DAY}\b|{_MONTH}\b\.?)"
    rf",?\s+{_YEAR}\b"
    r"|(?i:\(c\)|©|\bcopyright\b)\s*" + _YEAR + r"\b"
    r"|(?:\+\d{1,3}|\(\d{2,5}\))(?:[ -]\d{2,4})+\b"
    r"|(?<![\w.,/-])\d{3} \d{4}\b"
)
# A one-time code (the group): 4 to 8 digits standing alone, not inside a longer
# number or word.
DEFAULT_CODES = rf"{_NOT_CODES}|(?<![\w.,/-])(\d{{4,8}})(?![\w/-]|[.,]\d)"
_URL = re.compile(r"""https?://[^\s<>"'`]+""", re.IGNORECASE)
# How much of a message's source C{text=} decodes: a search parses every message,
# and 10 MB parsed whole took half a second here, its first MiB 40 ms.
SEARCHED = 1024 * 1024
_BARE_LF = re.compile(rb"(?<!\r)\n")
# Closing punctuation after a URL in prose is the sentence's, not the URL's.
_TRAILING = ".,;:!?)]}>'\""


# Elements that end a line of text: their neighbours' words must not run together.
_BLOCKS = frozenset(
    [
        "address",
        "article",
        "br",
        "dd",
        "div",
        "dl",
        "dt",
        "footer",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "header",
        "hr",
        "li",
        "ol",
        "p",
        "pre",
        "section",
        "table",
        "td",
        "th",
        "tr",
        "ul",
    ]
)


class _HTMLText(HTMLParser):
    """An HTML part's visible text and the targets of its links."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.text: list[str] = []
        self.hrefs: list[str] = []
        self._hidden = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _BLOCKS:
            self.text.append("\n")
        if tag in ("script", "style"):
            self._hidden += 1
        if tag in ("a", "area"):
            for name, value in attrs:
                if (
                    name == "href"
                    and value
                    and value.strip().lower().startswith(("http:", "https:"))
                ):
                    self.hrefs.append(value.strip())

    def handle_endtag(self, tag: str) -> None:
        if tag in _BLOCKS:
            self.text.append("\n")
        if tag in ("script", "style") and self._hidden:
            self._hidden -= 1

    def handle_data(self, data: str) -> None:
        if not self._hidden:
            self.text.append(data)


def _read(raw: bytes) -> tuple[list[mime.Entity], bytes]:
    """
    Every entity of the message, in order, as L{mime.read} lists them, and
    the octets they are offsets into: read in time linear in the message's
    size, no deeper than L{mime.MAX_NESTING} nor more than L{mime.MAX_PARTS}
    entities (the email package's parser took 6.5 s on a MiB of multiparts
    nested 20,000 deep, on every search).  L{mime.read} reads lines ended by
    CRLF, as SMTP carries them; a message written with bare LFs reads so too.
    """
    raw = _BARE_LF.sub(b"\r\n", raw)
    entities = []
    unread = [mime.read(raw)]
    while unread:
        entity = unread.pop()
        entities.append(entity)
        unread.extend(reversed(entity.parts))
    return entities, raw


def _parts(entities: Iterable[mime.Entity], raw: bytes) -> Iterator[tuple[str, str]]:
    """(subtype, decoded text) of each text/plain and text/html part, attachments aside."""
    for entity in entities:
        if entity.main != "text" or entity.sub not in ("plain", "html"):
            continue
        if entity.header.get_content_disposition() == "attachment":
            continue
        yield entity.sub, _decoded(entity, raw)


def _decoded(entity: mime.Entity, raw: bytes) -> str:
    """
    A text part's body, transfer encoding and charset decoded.  A part that
    declares no charset, or US-ASCII (RFC 2045's default), reads as UTF-8
    when its octets are UTF-8 (8-bit mail sent without MIME headers, as mail
    clients and Mailpit read it), else as Latin-1, which takes every octet:
    such text is most likely in a Western single-octet charset.
    """
    carrier = Message()  # the email package's lenient transfer decoding
    carrier["Content-Transfer-Encoding"] = str(entity.header.get("Content-Transfer-Encoding", ""))
    carrier.set_payload(raw[entity.body_start : entity.end].decode("ascii", "surrogateescape"))
    octets = carrier.get_payload(decode=True)
    assert isinstance(octets, bytes)
    charset = entity.header.get_content_charset()
    if charset in (None, "us-ascii"):
        try:
            return octets.decode("utf-8")
        except UnicodeDecodeError:
            return octets.decode("latin-1")
    try:
        return octets.decode(mime.mail_charset(charset), "replace")
    except (LookupError, ValueError):  # a codec that is no text codec (base64, say)
        return octets.decode("utf-8", "replace")


def _file_names(entities: Iterable[mime.Entity]) -> Iterator[str]:
    """
    The file name of each part that has one (Content-Disposition's
    C{filename}, else Content-Type's C{name}), RFC 2231 and RFC 2047 decoded:
    Mailpit's search finds attachments by name.
    """
    for entity in entities:
        name = entity.header.get_filename()
        if not name:
            continue
        # 8-bit header octets (RFC 6532) came in as surrogates.
        name = name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        if "=?" in name:  # encoded words in a parameter: not RFC 2047's, but common
            with contextlib.suppress(HeaderParseError, LookupError, ValueError):
                name = str(make_header(decode_header(name)))
        yield name


def _prose_and_links(entities: Iterable[mime.Entity], raw: bytes) -> tuple[list[str], list[str]]:
    prose: list[str] = []
    found: list[str] = []
    for subtype, text in _parts(entities, raw):
        if subtype == "html":
            parser = _HTMLText()
            parser.feed(text)
            parser.close()
            found += parser.hrefs
            text = "".join(parser.text)
        found += (match.rstrip(_TRAILING) for match in _URL.findall(text))
        prose.append(text)
    return prose, found


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def links(raw: bytes) -> list[str]:
    """Every http(s) link, in order of appearance, each once."""
    return _unique(_prose_and_links(*_read(raw))[1])


def text(raw: bytes) -> str:
    """
    What the text and HTML parts read as, transfer encoding and charset
    decoded (HTML: its visible text, as Mailpit searches it), one part a line,
    then the parts' file names, one a line.
    """
    entities, raw = _read(raw)
    return "\n".join([*_prose_and_links(entities, raw)[0], *_file_names(entities)])


def codes(raw: bytes, pattern: str = DEFAULT_CODES) -> list[str]:
    """
    Every match of C{pattern} (its first group, if it has one and it took
    part) in the text outside links, in order of appearance, each once.
    """
    compiled = re.compile(pattern)
    prose, _ = _prose_and_links(*_read(raw))
    found = []
    for text in prose:
        for match in compiled.finditer(_URL.sub(" ", text)):
            code = match.group(1) if compiled.groups else match.group(0)
            if code is not None:
                found.append(code)
    return _unique(found)
