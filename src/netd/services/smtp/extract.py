"""
What a test of a sign-up or log-in flow wants from a captured message: the
links and the one-time codes in its text and HTML parts (C{GET
.../messages/ID/links} and C{.../codes}), and the text those parts read as,
which C{GET .../messages?text=} searches.

Runs in a thread: a message may be megabytes of HTML.
"""

from __future__ import annotations

import email
import email.policy
import re
from collections.abc import Iterable, Iterator
from email.message import EmailMessage
from html.parser import HTMLParser

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


def _parts(raw: bytes) -> Iterator[tuple[str, str]]:
    """(subtype, decoded text) of each text/plain and text/html part, attachments aside."""
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    for part in message.walk():
        if part.is_multipart() or part.get_content_maintype() != "text":
            continue
        if part.get_content_disposition() == "attachment":
            continue
        subtype = part.get_content_subtype()
        if subtype not in ("plain", "html"):
            continue
        try:
            text = part.get_content()
        except (LookupError, ValueError):  # an unknown charset, a broken encoding
            payload = part.get_payload(decode=True)
            text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""
        yield subtype, text


def _prose_and_links(raw: bytes) -> tuple[list[str], list[str]]:
    prose: list[str] = []
    found: list[str] = []
    for subtype, text in _parts(raw):
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
    return _unique(_prose_and_links(raw)[1])


def text(raw: bytes) -> str:
    """
    What the text and HTML parts read as, transfer encoding and charset
    decoded (HTML: its visible text, as Mailpit searches it), one part a line.
    """
    return "\n".join(_prose_and_links(raw)[0])


def codes(raw: bytes, pattern: str = DEFAULT_CODES) -> list[str]:
    """
    Every match of C{pattern} (its first group, if it has one and it took
    part) in the text outside links, in order of appearance, each once.
    """
    compiled = re.compile(pattern)
    prose, _ = _prose_and_links(raw)
    found = []
    for text in prose:
        for match in compiled.finditer(_URL.sub(" ", text)):
            code = match.group(1) if compiled.groups else match.group(0)
            if code is not None:
                found.append(code)
    return _unique(found)
