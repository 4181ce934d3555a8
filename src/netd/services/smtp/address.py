"""
Reverse and forward paths of the smtp kind, read strictly.

L{twisted.mail.smtp.Address} strips source routes and keeps C{%} and C{!} in
local parts, which is how a relay that checks only the last domain ends up
relaying for C{@ours:victim@elsewhere} or C{victim%elsewhere@ours}.  Forward
paths here refuse every such routing trick outright: a null client has no
business forwarding along a route the sender chose.
"""

from __future__ import annotations

import functools
import re

import attrs

from netd.records import Record

__all__ = ["Mailbox", "PathRefused", "parse_path"]

_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*\Z")
# RFC 6531 3.3: atext gains every non-ASCII character (UTF8-non-ascii).  Said
# as what it is not (ASCII's controls, space and specials), since a class that
# lists U+0080-U+10FFFF costs 3.5 ms to compile at every start.
_UTF8_ATEXT = r'[^\x00-\x20"(),.:;<>@\[\\\]\x7f]'
_UTF8_DOT_ATOM = re.compile(rf"{_UTF8_ATEXT}+(\.{_UTF8_ATEXT}+)*\Z")
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"({_LABEL}\.)*{_LABEL}\Z")
_ADDRESS_LITERAL = re.compile(r"\[[^\[\]\\]+\]\Z")
_CONTROL_OR_BRACKET = re.compile(r"[\x00-\x1f\x7f-\x9f<>\u2028\u2029]")
# RFC 5321 4.5.3.1: local part 64 octets, domain 255, path 256 with the brackets
# (octets: a UTF-8 local part counts its encoded length).
_MAX_LOCAL = 64
_MAX_DOMAIN = 255
_MAX_PATH = 256


class PathRefused(Exception):
    """A path netd does not take; carries the SMTP reply."""

    def __init__(self, code: int, status: str, text: str) -> None:
        super().__init__(f"{code} {status} {text}")
        self.code = code
        self.status = status
        self.text = text

    @property
    def reply(self) -> bytes:
        return f"{self.status} {self.text}".encode()


def _syntax(text: str) -> PathRefused:
    return PathRefused(501, "5.1.3", text)


def _trick(text: str) -> PathRefused:
    return PathRefused(550, "5.7.1", f"{text}: routing through this server is not allowed")


@attrs.frozen(repr=False)
class Mailbox(Record):
    """C{local@domain}; C{domain} is lower-case (an internationalised one in U-labels)."""

    local: str
    domain: str

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"

    @property
    def international(self) -> bool:
        """Whether only SMTPUTF8 can carry this address (RFC 6531)."""
        return not (self.local.isascii() and self.domain.isascii())


def _split_quoted(text: str) -> tuple[str, str]:
    """A quoted local part and what follows its closing quote."""
    index = 1
    while index < len(text):
        char = text[index]
        if char == "\\":
            index += 2
            continue
        if char == '"':
            return text[: index + 1], text[index + 1 :]
        index += 1
    raise _syntax("unbalanced quotes in the address")


def _domain_name(domain: str) -> str | None:
    """
    A domain in lower case, U-labels kept as such once they have a valid
    A-label form (IDNA 2003, Python's own codec); None if it is not a domain.
    """
    if domain.isascii():
        ascii_form = domain
    else:
        try:
            ascii_form = domain.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    if len(ascii_form) > _MAX_DOMAIN or not _DOMAIN.match(ascii_form):
        return None
    return domain.lower()


# Test suites send from and to the same few addresses again and again; a
# Mailbox is immutable, so the reading of each is kept (a refusal is not).
@functools.lru_cache(maxsize=4096)
def parse_path(
    raw: bytes, recipient: bool, default_domain: str, utf8: bool = False
) -> Mailbox | None:
    """
    Read the argument of C{MAIL FROM:} or C{RCPT TO:} (the path, angle brackets
    optional); L{None} is the null reverse path C{<>}.

    @param recipient: forward paths refuse routing tricks (source routes, C{%},
        C{!}, a quoted C{@}, two C{@}, address literals).
    @param default_domain: the domain of a bare C{postmaster} recipient.
    @param utf8: the transaction said C{SMTPUTF8}: UTF-8 addresses are read.
    @raise PathRefused: with the reply to send.
    """
    try:
        text = raw.decode("utf-8" if utf8 else "ascii")
    except UnicodeDecodeError:
        if utf8:
            raise _syntax("the address is not valid UTF-8") from None
        raise PathRefused(553, "5.6.7", "non-ASCII addresses need MAIL FROM's SMTPUTF8") from None
    if text.startswith("<") != text.endswith(">") or (text.startswith("<") and len(text) < 2):
        raise _syntax("unbalanced angle brackets")
    if text.startswith("<"):
        text = text[1:-1]
    if len(text.encode()) + 2 > _MAX_PATH:
        raise _syntax("the address is longer than 256 characters")
    if _CONTROL_OR_BRACKET.search(text):
        raise _syntax("controls and brackets cannot appear in an address")
    if not text:
        if recipient:
            raise _syntax("a recipient cannot be empty")
        return None
    if text.startswith("@"):
        if recipient:
            raise _trick("a source route")
        # RFC 5321 C: a reverse path's source route is to be ignored.
        text = text.partition(":")[2]
    if text.startswith('"'):
        local, rest = _split_quoted(text)
        if not rest.startswith("@"):
            raise _syntax("a quoted local part needs a domain")
        domain = rest[1:]
        if recipient and any(c in local for c in "@%!"):
            raise _trick("a quoted route in the local part")
    elif recipient and text.lower() == "postmaster":
        return Mailbox("postmaster", default_domain.lower())
    else:
        local, at, domain = text.rpartition("@")
        if not at:
            raise _syntax("the address needs a domain")
        if recipient and "@" in local:
            raise _trick("more than one @")
        if recipient and ("%" in local or "!" in local):
            raise _trick("a % or ! route in the local part")
        if not (_UTF8_DOT_ATOM if utf8 else _DOT_ATOM).match(local):  # no spaces outside quotes
            raise _syntax("not a valid local part")
    if len(local.encode()) > _MAX_LOCAL:
        raise _syntax("the local part is longer than 64 characters")
    if _ADDRESS_LITERAL.match(domain):
        if recipient:
            raise _trick("an address literal")
        return Mailbox(local, domain)
    name = _domain_name(domain)
    if name is None:
        raise _syntax("not a valid domain")
    return Mailbox(local, name)
