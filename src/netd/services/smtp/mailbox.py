"""
The smtp kind's store seen as mailboxes, for its IMAP and POP3 listeners.

A login is a recipient address (it sees the messages sent to it), C{all}
(it sees every message) or, when the service has C{namespace_from}, C{ns/KEY}
(it sees the messages of namespace KEY, L{netd.namespaces}).  Flags and IMAP
UIDs live here, in memory, shared by every session of the service: UIDs are
numbered in arrival order and the UID validity is the time the service was
built, so a restart or a reload tells clients to forget what they cached.
Removing a message (POP3 C{DELE}, IMAP C{EXPUNGE}) removes it from the store,
and a message the store loses (the admin API's C{DELETE}) leaves every open
mailbox.
"""

from __future__ import annotations

import email
import email.headerregistry
import email.parser
import email.policy
import email.utils
import functools
import itertools
import re
import time
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from email.header import Header, decode_header
from email.message import Message as EmailMessage
from io import BytesIO
from pathlib import Path
from typing import Any
from typing import Protocol as TypingProtocol

import attrs
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.mail import pop3
from twisted.mail.imap4 import (
    IAccount,
    ICloseableMailbox,
    IllegalClientResponse,
    IMailbox,
    IMailboxInfo,
    IMessageFile,
    ISearchableMailbox,
    MailboxException,
    MessageSet,
    parseIdList,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from netd.kinds import BuildContext
from netd.namespaces import key as namespace_key
from netd.records import Record
from netd.services.smtp import mime
from netd.services.smtp.spool import HEAD_BYTES, Envelope
from netd.services.smtp.store import MailStore

__all__ = [
    "ALL",
    "EVERY_NAMESPACE",
    "KEPT_STRUCTURE_OCTETS",
    "LOGIN_FAILURES",
    "MAX_WAITING_COMMANDS",
    "NAMESPACE_LOGIN",
    "Access",
    "AnyAddressChecker",
    "Inbox",
    "MailRealm",
    "MailSession",
    "MailboxOptions",
    "Mailboxes",
    "Maildrop",
    "Search",
    "SessionPortal",
    "body_structure",
    "compile_search",
    "imap_list",
    "literal",
    "literal_head",
    "login_namespace",
    "login_password",
    "uid_validity",
]

ALL = "all"
# A namespace's login: C{ns/t42}.  Not C{t42@ns}: logins that are addresses
# have an C{@}; a C{/} is an atom character in IMAP and passes curl's C{-u}.
NAMESPACE_LOGIN = "ns/"
# A password under this login opens every namespace's mailbox.
EVERY_NAMESPACE = NAMESPACE_LOGIN + "*"
INBOX = "INBOX"
_SYSTEM_FLAGS = ("\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft")
_POLICY = email.policy.compat32.clone(linesep="\r\n")


def login_namespace(login: str) -> str | None:
    """The namespace a login C{ns/KEY} reads, or None for any other login."""
    if not login.startswith(NAMESPACE_LOGIN):
        return None
    wanted = login[len(NAMESPACE_LOGIN) :]
    return wanted if namespace_key(wanted) == wanted else None


def login_password(users: Mapping[str, str], login: str) -> str | None:
    """A login's password in C{users}: its own, or for a namespace C{ns/*}'s."""
    found = users.get(login)
    if found is None and login_namespace(login) is not None:
        return users.get(EVERY_NAMESPACE)
    return found


@attrs.frozen(repr=False)
class MailboxOptions(Record):
    """
    Who may read mail over the service's IMAP and POP3 listeners.

    @ivar users: login (an address or C{all}) to password, in clear or hashed.
    @ivar any_password: lab mode: any address (or C{all}) logs in with any password.
    @ivar allow_insecure_auth: log in without TLS on a listener that offers STARTTLS/STLS.
    """

    users: Mapping[str, str] = attrs.field(factory=dict)
    any_password: bool = False
    allow_insecure_auth: bool = False


@attrs.frozen(repr=False)
class Access(Record):
    """What the IMAP and POP3 sessions of one service share."""

    context: BuildContext
    mailboxes: Mailboxes
    portal: Portal
    starttls: IOpenSSLServerConnectionCreator | None
    allow_insecure_auth: bool

    def schedule(self, steps: Iterator[Any]) -> Deferred[None]:
        """
        Run an iterator of writes (a FETCH answer's message), pausing
        on the Deferreds it yields; done in the reactor's next turn, so that a
        long FETCH does not recurse through Twisted's per-message callbacks.
        """
        done: Deferred[None] = Deferred()

        def go(_: object = None) -> None:
            try:
                for step in steps:
                    if isinstance(step, Deferred):
                        step.addCallbacks(go, done.errback)
                        return
            except Exception:
                done.errback(Failure())
                return
            self.context.reactor.callLater(0, done.callback, None)

        go()
        return done

    @property
    def reactor(self) -> Any:
        return self.context.reactor

    def mark_seen(self, id: str) -> bool:
        """Set \\Seen on a message; whether that changed its flags."""
        flags = self.mailboxes.flags.get(id)
        if flags is None or "\\Seen" in flags:
            return False
        flags.add("\\Seen")
        return True


class MailSession(TypingProtocol):
    """What L{SessionPortal} asks of an IMAP or POP3 session."""

    protocol: str
    client: str

    def is_tls(self) -> bool: ...

    def too_many_failures(self) -> None:
        """Say goodbye and close: the session failed L{LOGIN_FAILURES} logins."""


# Commands a client may send ahead while a FETCH or RETR is still being
# written before its session stops reading (until the answer is out).
MAX_WAITING_COMMANDS = 1000

# Failed logins a session may have before it is closed: enough for typos, few
# for a guesser (smtp's AUTH allows as many).
LOGIN_FAILURES = 3


class SessionPortal:
    """
    A session's way to the service's portal: every login, and every refused
    one, counted and in the event journal (C{mailbox.login},
    C{mailbox.login_failed}).
    """

    def __init__(self, access: Access, session: MailSession) -> None:
        self.access = access
        self.session = session
        self.failures = 0

    def login(self, credentials: Any, mind: Any, *interfaces: Any) -> Deferred[Any]:
        user = _text(getattr(credentials, "username", b"")).lower()
        session = self.session
        context = self.access.context
        fields = {"protocol": session.protocol, "client": session.client, "user": user}
        namespace = login_namespace(user)
        if namespace is not None:
            # A namespace's login is its traffic: its journal filter shows it.
            fields["namespace"] = namespace

        def succeeded(result: Any) -> Any:
            context.stats.count("smtp_mailbox_logins")
            context.emit("mailbox.login", tls=session.is_tls(), **fields)
            return result

        def refused(reason: Failure) -> Failure:
            context.stats.count("smtp_mailbox_login_failures")
            context.emit("mailbox.login_failed", **fields)
            self.failures += 1
            if self.failures >= LOGIN_FAILURES:
                # After the refusal this failure is about to become.
                context.reactor.callLater(0, session.too_many_failures)
            return reason

        attempt: Deferred[Any] = self.access.portal.login(credentials, mind, *interfaces)
        return attempt.addCallbacks(succeeded, refused)


# The UID validity each spool folder's mailboxes last had: a reload numbers
# UIDs anew, so its mailboxes need a validity of their own, even within a second.
_VALIDITIES: dict[Path, int] = {}


def uid_validity(spool: Path, now: float) -> int:
    """A new UID validity for the mailboxes of C{spool}: the time, and always larger."""
    validity = max(int(now), _VALIDITIES.get(spool, 0) + 1)
    _VALIDITIES[spool] = validity
    return validity


# The BODY and BODYSTRUCTURE texts a service keeps, in octets: a hostile
# message's (10,000 parts) is under a megabyte, an ordinary one's a few
# hundred octets.
KEPT_STRUCTURE_OCTETS = 16 << 20


class Mailboxes:
    """The service's messages by login, with the flags and UIDs its sessions share."""

    def __init__(self, store: MailStore, uid_validity: int) -> None:
        self.store = store
        self.uid_validity = uid_validity
        self.uids: dict[str, int] = {}
        self.next_uid = 1
        self.flags: dict[str, set[str]] = {}
        self.inboxes: list[Inbox] = []
        # BODY and BODYSTRUCTURE in IMAP syntax by (id, extended, UTF-8
        # headers): a message never changes, so each is worked out once.
        self.structures: dict[tuple[str, bool, bool], bytes] = {}
        self.structure_octets = 0
        for envelope in store.messages.values():
            self._number(envelope.id)
        store.watchers.append(self)

    def _number(self, id: str) -> None:
        self.uids[id] = self.next_uid
        self.next_uid += 1
        self.flags[id] = set()

    @property
    def namespaced(self) -> bool:
        """Whether the service stamps its messages with namespaces (C{ns/KEY} logins)."""
        return self.store.context.namespaces.enabled

    def sees(self, login: str, envelope: Envelope) -> bool:
        if login == ALL:
            return True
        if login.startswith(NAMESPACE_LOGIN):
            # The store stamps a message before it tells its watchers.
            return self.store.namespaces.get(envelope.id) == login[len(NAMESPACE_LOGIN) :]
        return any(login == r.lower() for r in envelope.recipients)

    def ids_for(self, login: str) -> list[str]:
        return [id for id, e in self.store.messages.items() if self.sees(login, e)]

    # MailWatcher ---------------------------------------------------------

    def added(self, envelope: Envelope) -> None:
        self._number(envelope.id)
        for inbox in self.inboxes:
            if self.sees(inbox.login, envelope):
                inbox.arrived(envelope.id)

    def removed(self, envelopes: Iterable[Envelope]) -> None:
        gone = {envelope.id: envelope for envelope in envelopes}
        for inbox in self.inboxes:
            inbox.lost(gone)
        for id in gone:
            self.uids.pop(id, None)
            self.flags.pop(id, None)
            for key in itertools.product((id,), (False, True), (False, True)):
                self._forget_structure(key)

    # BODY and BODYSTRUCTURE kept -------------------------------------------

    def keep_structure(self, key: tuple[str, bool, bool], text: bytes) -> None:
        """
        Keep a message's BODY or BODYSTRUCTURE, while the message stays;
        past L{KEPT_STRUCTURE_OCTETS} in all the oldest kept go first.
        """
        if key[0] not in self.uids:
            return  # it left while it was worked out
        self._forget_structure(key)
        self.structures[key] = text
        self.structure_octets += len(text)
        while self.structure_octets > KEPT_STRUCTURE_OCTETS:
            self._forget_structure(next(iter(self.structures)))

    def _forget_structure(self, key: tuple[str, bool, bool]) -> None:
        text = self.structures.pop(key, None)
        if text is not None:
            self.structure_octets -= len(text)


# Messages -------------------------------------------------------------------


def _split(raw: bytes) -> tuple[bytes, bytes]:
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        return raw, b""
    return raw[: end + 2], raw[end + 4 :]


def header_block(raw: bytes) -> bytes:
    """
    C{BODY[HEADER]} (RFC 3501 6.4.5): the header as it came, with the blank
    line that ends it; a message without a body is all header.
    """
    end = raw.find(b"\r\n\r\n")
    return raw if end < 0 else raw[: end + 4]


def _fields(block: bytes) -> list[bytes]:
    """
    A header block's fields, each its first line and the folded lines that
    continue it (RFC 5322 2.2.3), ends included; lines end at CRLF only (a bare
    LF in a binary message's header is text of its line), and the blank line
    ends the header.
    """
    fields: list[bytes] = []
    for line in block.split(b"\r\n"):
        if not line:
            break
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line + b"\r\n"
        else:
            fields.append(line + b"\r\n")
    return fields


def header_section(block: bytes, fields: Collection[bytes], negate: bool, utf8: bool) -> bytes:
    """
    A header section of FETCH (RFC 3501 6.4.5) from a header block: only the
    fields named (C{HEADER.FIELDS}) or all but them (C{.NOT}), each as it
    came (repeated fields and the case of their names kept, in their order)
    and ended by a blank line.  For a session that did not enable UTF8=ACCEPT
    a field with 8-bit text goes out in RFC 2047 words (RFC 6855 3: no UTF-8
    to such a client).  All but none (C{HEADER}, as Twisted's parser has it)
    is the block as stored, 8-bit or not: it is the head of C{BODY[]}, which
    is served as received, and a client that builds the message from the
    header and C{BODY[TEXT]} (fetchmail) must get those octets, as many as
    C{RFC822.SIZE} said.
    """
    if negate and not fields:
        return block
    wanted = {name.lower() for name in fields}
    chosen = []
    for field in _fields(block):
        name = field.partition(b":")[0].strip().lower()
        if (name in wanted) == negate:
            continue
        chosen.append(field if utf8 or field.isascii() else _seven_bit_field(field))
    return b"".join(chosen) + b"\r\n"


def _seven_bit_field(field: bytes) -> bytes:
    name, _, value = field.partition(b":")
    text = value.decode("ascii", "surrogateescape")
    unfolded = "".join(text.splitlines()).strip()
    seven = _seven_bit(name.decode("ascii", "replace"), unfolded)
    return name + b": " + seven.encode("ascii") + b"\r\n"


def _header_dict(
    items: Iterable[tuple[str, Any]],
    negate: bool,
    names: tuple[str | bytes, ...],
    utf8: bool = False,
) -> dict[str, str]:
    wanted = {(n.decode() if isinstance(n, bytes) else n).lower() for n in names}
    found: dict[str, str] = {}
    for name, value in items:
        key = name.lower()
        if (key in wanted) != negate or (not names and negate):
            text = _unicode(str(value)) if utf8 else _seven_bit(name, str(value))
            found.setdefault(key, text)
    return found


_ADDRESS_HEADERS = frozenset({"from", "sender", "reply-to", "to", "cc", "bcc"})


def _unicode(value: str) -> str:
    """8-bit (UTF-8) header text, which the parser keeps as surrogates, as text."""
    if value.isascii():
        return value
    return value.encode("ascii", "surrogateescape").decode("utf-8", "replace")


def _seven_bit(name: str, value: str) -> str:
    """
    A header's value as IMAP's ENVELOPE and HEADER.FIELDS carry it to a
    client that did not enable UTF8=ACCEPT (7-bit): 8-bit text in RFC 2047
    words; in an address header only the display names, so the addresses
    stay readable.
    """
    if value.isascii():
        return value
    text = _unicode(value)
    if name.lower() in _ADDRESS_HEADERS:
        text = ", ".join(
            email.utils.formataddr(pair, charset="utf-8")
            for pair in email.utils.getaddresses([text])
        )
    else:
        text = Header(text, "utf-8", maxlinelen=0, header_name=name).encode()
    # An internationalised address (SMTPUTF8) has no 7-bit form.
    return text.encode("ascii", "replace").decode("ascii")


def _decoded(value: str) -> str:
    """A header's value as a reader sees it: 8-bit text and RFC 2047 words decoded."""
    text = _unicode(value)
    words = []
    for chunk, charset in decode_header(text):
        if isinstance(chunk, str):
            words.append(chunk)
            continue
        try:
            # Text outside encoded words comes back as raw-unicode-escape bytes.
            named = mime.mail_charset(charset) if charset else "raw-unicode-escape"
            words.append(chunk.decode(named, "replace"))
        except (LookupError, ValueError):  # a codec that is no text codec (base64, say)
            words.append(chunk.decode("utf-8", "replace"))
    return "".join(words)


# ENVELOPE ----------------------------------------------------------------------

_ADDRESS_PARSER = email.headerregistry.HeaderRegistry()
# What Dovecot puts for an address without a domain: NIL there would mark a group.
_NO_DOMAIN = "MISSING_DOMAIN"


def envelope(headers: Mapping[str, str], utf8: bool) -> list[Any]:
    """
    RFC 3501 7.4.2 ENVELOPE from a message's headers (the first of each name,
    as L{Message.getHeaders} gives them: 7-bit, or UTF-8 after UTF8=ACCEPT):
    date, subject, from, sender, reply-to, to, cc, bcc, in-reply-to,
    message-id.  Sender and Reply-To default to From; an address is (name,
    route, mailbox, host), a group is opened by (NIL NIL name NIL) and closed
    by (NIL NIL NIL NIL).  Twisted's gave three-item addresses for an address
    without a domain and none of the group markers.
    """
    from_ = _addresses(headers.get("from"), utf8)
    return [
        headers.get("date"),
        headers.get("subject"),
        from_,
        _addresses(headers.get("sender"), utf8) or from_,
        _addresses(headers.get("reply-to"), utf8) or from_,
        _addresses(headers.get("to"), utf8),
        _addresses(headers.get("cc"), utf8),
        _addresses(headers.get("bcc"), utf8),
        headers.get("in-reply-to"),
        headers.get("message-id"),
    ]


@functools.lru_cache(maxsize=4096)
def _addresses(value: str | None, utf8: bool) -> tuple[tuple[str | None, ...], ...] | None:
    # Kept per header text: the same senders and recipients recur, and the
    # parser takes ~80 us an address.
    if value is None or not value.strip():
        return None
    try:
        parsed: Any = _ADDRESS_PARSER("to", value)
    except Exception:  # a header the parser cannot take reads as no address
        return None
    groups = parsed.groups
    found: list[tuple[str | None, ...]] = []
    for group in groups:
        if group.display_name is not None:
            found.append((None, None, _envelope_text(group.display_name, utf8), None))
        for address in group.addresses:
            if not address.username and not address.domain:
                continue
            found.append(
                (
                    _envelope_text(address.display_name, utf8) or None,
                    None,
                    _address_part(address.username, utf8),
                    _address_part(address.domain, utf8) or _NO_DOMAIN,
                )
            )
        if group.display_name is not None:
            found.append((None, None, None, None))
    return tuple(found) or None


def _envelope_text(text: str, utf8: bool) -> str:
    """A name as the parser decoded it, back in RFC 2047 words for a 7-bit session."""
    if utf8 or text.isascii():
        return text
    return Header(text, "utf-8", maxlinelen=0).encode()


def _address_part(text: str, utf8: bool) -> str:
    # An internationalised address (SMTPUTF8) has no 7-bit form.
    if utf8 or text.isascii():
        return text
    return text.encode("ascii", "replace").decode("ascii")


# BODY and BODYSTRUCTURE --------------------------------------------------------


def _header_value(header: EmailMessage, name: str) -> str | None:
    value = header.get(name)
    return None if value is None else "".join(_unicode(str(value)).splitlines()).strip()


def _params(header: EmailMessage, name: str) -> tuple[str | None, list[str]]:
    """A header's value and its parameters, flat (name, value, ...), names in lower case."""
    found = header.get_params(header=name)
    if not found:
        return None, []
    flat: list[str] = []
    for key, value in found[1:]:
        flat += [_unicode(key).lower(), _unicode(email.utils.collapse_rfc2231_value(value))]
    return _unicode(found[0][0]), flat


def _disposition(header: EmailMessage) -> list[Any] | None:
    kind, params = _params(header, "content-disposition")
    return None if not kind else [kind.lower(), params or None]


def _language(header: EmailMessage) -> list[str] | None:
    value = _header_value(header, "content-language")
    tags = [tag.strip() for tag in value.split(",") if tag.strip()] if value else []
    return tags or None


def literal(data: bytes) -> bytes:
    """An IMAP literal (RFC 3501 4.3)."""
    return literal_head(data) + data


def literal_head(data: bytes) -> bytes:
    """What goes before C{data} in its literal, for a writer that sends C{data} as it is."""
    return b"{%d}\r\n" % len(data)


_QUOTABLE = re.compile(rb"[\x20-\x7e]*\Z")


def imap_list(items: list[Any] | tuple[Any, ...]) -> bytes:
    """
    A BODY or BODYSTRUCTURE list in IMAP syntax, without its parentheses: a
    string quoted (a literal if it has CR, LF or 8-bit octets), None as NIL.
    In a list that starts with a list (a multipart's bodies, an address list)
    lists in a row have no space between them (RFC 3501 9: body-type-mpart is
    1*body SP media-subtype, env-from "(" 1*address ")"), where Twisted's
    collapseNestedLists puts one.
    """
    pieces: list[bytes] = []
    abutting = bool(items) and isinstance(items[0], list | tuple)
    after_list = False
    for item in items:
        is_list = isinstance(item, list | tuple)
        if pieces and not (abutting and is_list and after_list):
            pieces.append(b" ")
        if item is None:
            pieces.append(b"NIL")
        elif isinstance(item, int):
            pieces.append(b"%d" % item)
        elif is_list:
            pieces.append(b"(" + imap_list(item) + b")")
        else:
            text = item.encode("utf-8") if isinstance(item, str) else item
            if _QUOTABLE.match(text):
                pieces.append(b'"' + text.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"')
            else:
                pieces.append(literal(text))
        after_list = is_list
    return b"".join(pieces)


def body_structure(raw: bytes, extended: bool, utf8: bool = False) -> list[Any]:
    """
    RFC 3501 7.4.2's BODY (or, C{extended}, BODYSTRUCTURE) of a message, read
    from its octets as Dovecot reads them (L{mime.read}): sizes and line
    counts of each body as it is (the CRLF before a delimiter not counted; a
    line is an LF), RFC 2045's defaults (text/plain; charset=us-ascii, 7bit)
    where a header says nothing.  Twisted's own gave a single part the whole
    message's size, counted a last line without its CRLF, and NIL for a
    missing type.
    """
    return _structure(mime.read(raw), extended, utf8)


def _structure(entity: mime.Entity, extended: bool, utf8: bool) -> list[Any]:
    header = entity.header
    main, sub = entity.main, entity.sub
    _, params = _params(header, "content-type")
    if main == "multipart":
        parts: list[Any] = [_structure(part, extended, utf8) for part in entity.parts]
        parts.append(sub)
        if extended:
            extension = [_disposition(header), _language(header)]
            parts += [params or None, *extension, _header_value(header, "content-location")]
        return parts
    if header.get_content_maintype() == "multipart":
        params = []  # no parts to list: read as text/plain, its parameters with it
    if main == "text" and "charset" not in params[::2]:
        params = ["charset", "us-ascii", *params]
    structure: list[Any] = [
        main,
        sub,
        params or None,
        _header_value(header, "content-id"),
        _header_value(header, "content-description"),
        _header_value(header, "content-transfer-encoding") or "7bit",
        entity.end - entity.body_start,
    ]
    if entity.parts:  # message/rfc822
        (contained,) = entity.parts
        headers = _header_dict(contained.header.raw_items(), True, (), utf8)
        structure += [envelope(headers, utf8), _structure(contained, extended, utf8), entity.lines]
    elif main == "text":
        structure.append(entity.lines)
    if extended:
        structure.append(_header_value(header, "content-md5"))
        structure += [_disposition(header), _language(header)]
        structure.append(_header_value(header, "content-location"))
    return structure


def section_entity(top: mime.Entity, numbers: Sequence[int]) -> mime.Entity | None:
    """
    The entity a FETCH section's part numbers name in a message (RFC 3501
    6.4.5; C{numbers} from 0, as Twisted parses them), or None if it has no
    such part: a multipart's parts are numbered, a message/rfc822 part's
    numbers go on in the message it holds, and a single part (a message
    without parts among them) is its own part 1.
    """
    entity, is_message = top, True
    for number in numbers:
        if entity.main == "multipart":
            children = entity.parts
        elif entity.parts and not is_message:  # message/rfc822
            (inner,) = entity.parts
            children = inner.parts if inner.main == "multipart" else (inner,)
        else:
            children = (entity,)
        if not 0 <= number < len(children):
            return None
        entity, is_message = children[number], False
    return entity


@implementer(IMessageFile)
class Message:
    """
    One message of a mailbox.  Headers come from the store's index (a copy
    of which the message keeps, so one removed meanwhile still has them); the
    whole message is read from the spool (in a thread) only by L{load}.

    @ivar gone: L{load} found the message removed from the spool: it reads as
        its header alone.

    Twisted's C{spew_*} methods read the members of its C{IMessageIMAP} they
    answer with (UID, flags, date, headers, size); it has no C{IMessageIMAPPart}
    parts: the sections of its parts are cut from its octets (L{entity}).
    """

    def __init__(
        self,
        mailboxes: Mailboxes,
        id: str,
        envelope: Envelope,
        uid: int,
        head: bytes,
        left_with: frozenset[str] | None = None,
    ) -> None:
        self.mailboxes = mailboxes
        self.id = id
        self.envelope = envelope
        self.uid = uid
        self.head = head
        # The flags of a message removed from the store, as it left.
        self.left_with = left_with
        self.gone = False
        self.raw: bytes | None = None
        self._entity: mime.Entity | None = None
        # Headers in UTF-8 as they are (the session enabled UTF8=ACCEPT), else 7-bit.
        self.utf8 = False

    def load(self) -> Deferred[None]:
        if self.raw is not None:
            return succeed(None)
        return self.mailboxes.store.read(self.id).addCallback(self.keep)

    def keep(self, raw: bytes | None) -> None:
        """The message as read; removed meanwhile, its header stands in for it."""
        if raw is None:
            self.gone = True
            raw = self.header_bytes()
        self.raw = raw

    def _head(self) -> bytes:
        return self.head

    def head_indexed(self) -> bool:
        """
        Whether the index's copy is the whole header: the store keeps the first
        C{HEAD_BYTES} of a message, so a longer header needs the message read.
        """
        return self.envelope.size <= HEAD_BYTES or len(self.head) < HEAD_BYTES

    def header_bytes(self) -> bytes:
        """C{BODY[HEADER]}: from the message once read, else from the index's copy."""
        if self.raw is not None:
            return header_block(self.raw)
        # The index keeps the header without the blank line that ends it.
        if len(self.head) < self.envelope.size:
            return self.head + b"\r\n"
        return self.head

    def getUID(self) -> int:
        return self.uid

    def flag_set(self) -> Collection[str]:
        if self.left_with is not None:
            return self.left_with
        return self.mailboxes.flags.get(self.id, ())

    def getFlags(self) -> list[str]:
        return sorted(self.flag_set())

    def getInternalDate(self) -> str:
        return email.utils.formatdate(self.envelope.received)

    def getHeaders(self, negate: bool, *names: str | bytes) -> dict[str, str]:
        head = self.raw if self.raw is not None else self._head()
        parsed = email.parser.BytesHeaderParser(policy=_POLICY).parsebytes(head)
        return _header_dict(parsed.raw_items(), negate, names, self.utf8)

    def header_text(self, name: str) -> str:
        """The decoded text of a header (the first of that name), for SEARCH."""
        head = self.raw if self.raw is not None else self._head()
        parsed = email.parser.BytesHeaderParser(policy=_POLICY).parsebytes(head)
        for found, value in parsed.raw_items():
            if found.lower() == name:
                return _decoded(value)
        return ""

    def getBodyFile(self) -> BytesIO:
        assert self.raw is not None, "load() first"
        return BytesIO(_split(self.raw)[1])

    def getSize(self) -> int:
        return self.envelope.size

    def entity(self) -> mime.Entity:
        """Its MIME entities as offsets into its octets, for sections of its parts."""
        if self._entity is None:
            assert self.raw is not None, "load() first"
            self._entity = mime.read(self.raw)
        return self._entity

    def structure(self, extended: bool) -> bytes:
        """
        Its BODY (or, C{extended}, BODYSTRUCTURE) in IMAP syntax (see
        L{body_structure}): as L{Inbox.describe} kept it, else worked out now.
        """
        kept = self.mailboxes.structures.get((self.id, extended, self.utf8))
        if kept is not None:
            return kept
        assert self.raw is not None, "load() first"
        return imap_list(body_structure(self.raw, extended, self.utf8))

    def open(self) -> BytesIO:
        assert self.raw is not None, "load() first"
        return BytesIO(self.raw)

    def text(self, body_only: bool = False) -> str:
        """The message (or its body) as lower-case text, for SEARCH TEXT and BODY."""
        assert self.raw is not None, "load() first"
        raw = _split(self.raw)[1] if body_only else self.raw
        return raw.decode("utf-8", "replace").lower()


# SEARCH -----------------------------------------------------------------------

_Test = Callable[[int, Message], bool]
_MONTHS = {
    month: number
    for number, month in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), 1
    )
}


def _day(token: Any) -> tuple[int, int, int]:
    """An IMAP date (1-Feb-2026) as (year, month, day)."""
    try:
        day, month, year = _text(token).split("-")
        return int(year), _MONTHS[month.lower()], int(day)
    except (ValueError, KeyError):
        raise IllegalClientResponse(f"bad date: {_text(token)!r}") from None


def _text(token: Any) -> str:
    if isinstance(token, bytes):
        return token.decode("utf-8", "replace")
    if isinstance(token, str):
        return token
    raise IllegalClientResponse("a string was expected, not a list")


def _received_day(message: Message) -> tuple[int, int, int]:
    return time.gmtime(message.envelope.received)[:3]


def _sent_day(message: Message) -> tuple[int, int, int] | None:
    parsed = email.utils.parsedate(message.getHeaders(False, "date").get("date", ""))
    return (parsed[0], parsed[1], parsed[2]) if parsed else None


def _flag(name: str, present: bool = True) -> _Test:
    return lambda seq, m: (name in m.flag_set()) == present


def _header(name: str, needle: str) -> _Test:
    wanted = needle.lower()
    return lambda seq, m: wanted in m.header_text(name).lower()


def _compare(
    day: Callable[[Message], tuple[int, int, int] | None], key: str, when: tuple[int, int, int]
) -> _Test:
    def test(seq: int, message: Message) -> bool:
        found = day(message)
        if found is None:
            return False
        if key.endswith("BEFORE"):
            return found < when
        if key.endswith("ON"):
            return found == when
        return found >= when

    return test


@attrs.frozen(repr=False)
class Search(Record):
    """
    A parsed SEARCH: the test, and whether it reads message bodies
    (C{needs_text}) or headers (C{needs_head}: the index has the start of a
    long header alone).
    """

    test: _Test
    needs_text: bool
    needs_head: bool


class _SearchParser:
    """
    RFC 3501 6.4.4 search keys, as a test of (sequence number, message);
    C{*} in a set is the last sequence number or UID of the mailbox.
    """

    def __init__(self, tokens: list[Any], last_seq: int, last_uid: int) -> None:
        self.tokens = tokens
        self.last_seq = last_seq
        self.last_uid = last_uid
        self.needs_text = False
        self.needs_head = False

    def all(self) -> _Test:
        tests = []
        while self.tokens:
            tests.append(self.one())
        return lambda seq, m: all(t(seq, m) for t in tests)

    def _take(self) -> Any:
        if not self.tokens:
            raise IllegalClientResponse("a search key lacks its argument")
        return self.tokens.pop(0)

    def one(self) -> _Test:
        token = self._take()
        if isinstance(token, list):
            return _SearchParser.nested(self, token)
        key = _text(token).upper()
        simple = {
            "ALL": lambda seq, m: True,
            "NEW": _flag("\\Seen", False),
            "OLD": lambda seq, m: True,
            "RECENT": lambda seq, m: False,
        }
        if key in simple:
            return simple[key]
        for flag in _SYSTEM_FLAGS:
            name = flag[1:].upper()
            if key == name:
                return _flag(flag)
            if key == "UN" + name:
                return _flag(flag, False)
        if key in ("FROM", "TO", "CC", "BCC", "SUBJECT"):
            self.needs_head = True
            return _header(key.lower(), _text(self._take()))
        if key == "HEADER":
            self.needs_head = True
            name = _text(self._take()).lower()
            return _header(name, _text(self._take()))
        if key in ("BODY", "TEXT"):
            self.needs_text = True
            needle = _text(self._take()).lower()
            return lambda seq, m: needle in m.text(body_only=key == "BODY")
        if key in ("SINCE", "BEFORE", "ON"):
            return _compare(_received_day, key, _day(self._take()))
        if key in ("SENTSINCE", "SENTBEFORE", "SENTON"):
            self.needs_head = True
            return _compare(_sent_day, key, _day(self._take()))
        if key in ("LARGER", "SMALLER"):
            try:
                size = int(_text(self._take()))
            except ValueError:
                raise IllegalClientResponse("a size is a number") from None
            if key == "LARGER":
                return lambda seq, m: m.getSize() > size
            return lambda seq, m: m.getSize() < size
        if key in ("KEYWORD", "UNKEYWORD"):
            return _flag(_text(self._take()), key == "KEYWORD")
        if key == "NOT":
            inner = self.one()
            return lambda seq, m: not inner(seq, m)
        if key == "OR":
            left, right = self.one(), self.one()
            return lambda seq, m: left(seq, m) or right(seq, m)
        if key == "UID":
            uids, last_uid = _id_set(self._take()), self.last_uid
            return lambda seq, m: _contains(uids, m.getUID(), last_uid)
        if key[:1].isdigit() or key[:1] == "*":
            numbers, last_seq = _id_set(token), self.last_seq
            return lambda seq, m: _contains(numbers, seq, last_seq)
        raise IllegalClientResponse(f"unknown search key {key}")

    def nested(self, tokens: list[Any]) -> _Test:
        inner = _SearchParser(list(tokens), self.last_seq, self.last_uid)
        test = inner.all()
        self.needs_text = self.needs_text or inner.needs_text
        self.needs_head = self.needs_head or inner.needs_head
        return test


def _id_set(token: Any) -> MessageSet:
    try:
        found: MessageSet = parseIdList(_text(token).encode())
    except Exception:
        raise IllegalClientResponse(f"bad message set {_text(token)!r}") from None
    return found


def _contains(ids: MessageSet, value: int, last: int) -> bool:
    # "*" is the last number in use, and a range is the same either way round,
    # so "9:*" names the last message even when there are fewer than 9 (RFC 3501 9).
    for low, high in ids.ranges:
        first = last if low is None else low
        end = last if high is None else high
        if min(first, end) <= value <= max(first, end):
            return True
    return False


def compile_search(tokens: list[Any], last_seq: int, last_uid: int) -> Search:
    """
    Parse SEARCH's keys once, before any message is looked at, with the
    mailbox's last sequence number and UID (what C{*} names).
    """
    parser = _SearchParser(list(tokens), last_seq, last_uid)
    if not parser.tokens:
        raise IllegalClientResponse("SEARCH needs a key")
    return Search(parser.all(), parser.needs_text, parser.needs_head)


# IMAP -------------------------------------------------------------------------


@implementer(IAccount)
class Account:
    """A login's IMAP account: one mailbox, INBOX."""

    def __init__(self, mailboxes: Mailboxes, login: str) -> None:
        self.mailboxes = mailboxes
        self.login = login

    def listMailboxes(self, ref: str, wildcard: str) -> list[tuple[str, _InboxInfo]]:
        if not wildcard:
            # RFC 3501 6.3.8: an empty name asks for the delimiter and the root.
            return [("", _InboxInfo(("\\Noselect",)))]
        # "*" matches anything, "%" anything but the delimiter; INBOX in any case.
        pattern = "".join(
            ".*" if c == "*" else "[^/]*" if c == "%" else re.escape(c) for c in ref + wildcard
        )
        return [(INBOX, _InboxInfo())] if re.fullmatch(pattern, INBOX, re.IGNORECASE) else []

    def select(self, name: str, rw: bool = True) -> Inbox | None:
        if name.upper() != INBOX:
            return None
        return Inbox(self.mailboxes, self.login, bool(rw))

    def isSubscribed(self, name: str) -> bool:
        return name.upper() == INBOX

    def _fixed(self, *args: Any) -> None:
        raise MailboxException("netd's mailboxes are fixed: INBOX only")

    addMailbox = create = delete = rename = subscribe = unsubscribe = _fixed


@implementer(IMailboxInfo)
class _InboxInfo:
    """
    A name as LIST shows it.  Twisted answers LIST with C{getFlags()}, which
    for a mailbox are its message flags (SELECT's C{FLAGS}): here they are the
    name's attributes (RFC 3501 7.2.2), as Dovecot gives them, INBOX's
    C{\\HasNoChildren} (RFC 3348) and the root's C{\\Noselect}.
    """

    def __init__(self, attributes: tuple[str, ...] = ("\\HasNoChildren",)) -> None:
        self.attributes = attributes

    def getFlags(self) -> list[str]:
        return list(self.attributes)

    def getHierarchicalDelimiter(self) -> str:
        return "/"


@attrs.frozen(repr=False)
class _Vanished(Record):
    """A message that left the store, as a session that still numbers it keeps it."""

    envelope: Envelope
    uid: int
    head: bytes
    flags: frozenset[str]


@implementer(IMailbox, ISearchableMailbox, ICloseableMailbox)
class Inbox(_InboxInfo):
    """
    One IMAP session's view of a login's messages, in sequence order.
    Messages arrive at the end; a removal renumbers the rest (C{EXPUNGE}).
    """

    def __init__(self, mailboxes: Mailboxes, login: str, writeable: bool) -> None:
        self.mailboxes = mailboxes
        self.login = login
        self.writeable = writeable
        super().__init__()
        self.ids = mailboxes.ids_for(login)
        # Messages that left the store, until this session says EXPUNGE: envelope, UID, header.
        self.vanishing: dict[str, _Vanished] = {}
        self.listeners: list[Any] = []
        # Messages read before a FETCH asked for them (L{read}), by id.
        self.read_ahead: dict[str, bytes] = {}
        # The sequence number after the last message a FETCH read (0: none yet).
        self.next_seq = 0

    def getFlags(self) -> list[str]:
        """SELECT's C{FLAGS}: the system flags (a client's keywords are kept too)."""
        return list(_SYSTEM_FLAGS)

    # Told by Mailboxes -----------------------------------------------------

    def arrived(self, id: str) -> None:
        self.ids.append(id)
        for listener in self.listeners:
            listener.newMessages(len(self.ids), None)

    def lost(self, gone: Mapping[str, Envelope]) -> None:
        """
        Messages left the store.  They keep their numbers until the session
        says EXPUNGE (RFC 3501 7.4.1: not while no command is in progress, nor
        in answer to FETCH, STORE or SEARCH); until then they read as their
        headers alone, with the flags they had.
        """
        mailboxes = self.mailboxes
        for id in gone:
            self.read_ahead.pop(id, None)
        vanished = {
            id: _Vanished(
                gone[id],
                mailboxes.uids.get(id, 0),
                mailboxes.store.heads.get(id, b""),
                frozenset(mailboxes.flags.get(id, ())),
            )
            for id in self.ids
            if id in gone
        }
        if not vanished:
            return
        self.vanishing.update(vanished)
        for listener in self.listeners:
            listener.expunge_due()

    def take_vanished(self) -> list[int]:
        """The numbers of the messages that left, highest first; they leave the view now."""
        if not self.vanishing:
            return []
        numbers = [seq for seq, id in enumerate(self.ids, 1) if id in self.vanishing]
        self.ids = [id for id in self.ids if id not in self.vanishing]
        self.vanishing.clear()
        return numbers[::-1]

    def _message(self, id: str) -> Message:
        store = self.mailboxes.store
        envelope = store.messages.get(id)
        if envelope is None:
            left = self.vanishing[id]
            return Message(self.mailboxes, id, left.envelope, left.uid, left.head, left.flags)
        uid = self.mailboxes.uids.get(id, 0)
        return Message(self.mailboxes, id, envelope, uid, store.heads.get(id, b""))

    # IMailboxInfo/IMailbox ---------------------------------------------------

    def getUIDValidity(self) -> int:
        return self.mailboxes.uid_validity

    def getUIDNext(self) -> int:
        return self.mailboxes.next_uid

    def getUID(self, message: int) -> int:
        return self._message(self.ids[message - 1]).getUID()

    def getMessageCount(self) -> int:
        return len(self.ids)

    def getRecentCount(self) -> int:
        return 0

    def getUnseenCount(self) -> int:
        flags = self.mailboxes.flags
        return sum(1 for id in self.ids if "\\Seen" not in flags.get(id, ()))

    def first_unseen(self) -> int | None:
        """The sequence number of the first message without \\Seen (SELECT's OK [UNSEEN])."""
        flags = self.mailboxes.flags
        for seq, id in enumerate(self.ids, 1):
            if "\\Seen" not in flags.get(id, ()):
                return seq
        return None

    def isWriteable(self) -> bool:
        return self.writeable

    def destroy(self) -> None:
        raise MailboxException("INBOX cannot be deleted")

    def requestStatus(self, names: Iterable[str | bytes]) -> dict[str, int]:
        values = {
            "MESSAGES": self.getMessageCount,
            "RECENT": self.getRecentCount,
            "UIDNEXT": self.getUIDNext,
            "UIDVALIDITY": self.getUIDValidity,
            "UNSEEN": self.getUnseenCount,
        }
        answer = {}
        for name in names:
            key = _text(name).upper()
            if key in values:
                answer[key] = values[key]()
        return answer

    def addListener(self, listener: Any) -> None:
        # Only a selected mailbox follows the store: STATUS opens one and drops it.
        if not self.listeners:
            self.mailboxes.inboxes.append(self)
        self.listeners.append(listener)

    def removeListener(self, listener: Any) -> None:
        if listener in self.listeners:
            self.listeners.remove(listener)
        if not self.listeners:
            self.close()

    def addMessage(self, message: Any, flags: Any = (), date: Any = None) -> Deferred[None]:
        return fail(MailboxException("netd's mailboxes take mail over SMTP only"))

    def close(self) -> None:
        if self in self.mailboxes.inboxes:
            self.mailboxes.inboxes.remove(self)

    def _numbered(self, messages: MessageSet, uid: bool) -> Iterator[tuple[int, str]]:
        """The (sequence number, id) of each message the set names that exists."""
        if uid:
            uids = self.mailboxes.uids
            numbers = [
                uids[id] if id in uids else self.vanishing[id].uid if id in self.vanishing else 0
                for id in self.ids
            ]
            messages.last = max(numbers, default=1)
            if all(a < b for a, b in itertools.pairwise(numbers)):
                # UIDs ascend with sequence numbers (RFC 3501 2.3.1.1): each range
                # is found by bisection, not by testing every message.
                return (
                    (s + 1, self.ids[s])
                    for low, high in messages.ranges
                    for s in range(bisect_left(numbers, low), bisect_right(numbers, high))
                )
            return ((s, self.ids[s - 1]) for s, n in enumerate(numbers, 1) if n in messages)
        count = len(self.ids)
        messages.last = max(count, 1)
        # The set's ranges, clamped to the mailbox (sorted and merged once
        # C{last} is set): a FETCH of one message costs one step, not a test
        # of every message in the mailbox.
        return (
            (s, self.ids[s - 1])
            for low, high in messages.ranges
            for s in range(max(low, 1), min(high, count) + 1)
        )

    def fetch(self, messages: MessageSet, uid: bool) -> list[tuple[int, Message]]:
        return [(seq, self._message(id)) for seq, id in self._numbered(messages, uid)]

    def read(self, batch: list[tuple[int, Message]], count: int, size: int) -> Deferred[None]:
        """
        Read a FETCH's messages (L{Message.load}), in one thread call.  A
        client that walks the mailbox (its FETCH starts at the message after
        the last one it read) has the messages after them read in the same
        call, up to C{count} messages or C{size} bytes in all, so that its
        next FETCHes are answered from memory rather than a thread hop each.
        A session's first FETCH is no walk yet: a client that reads one
        message does not have 64 read for it.
        """
        missing = []
        for _, message in batch:
            if message.raw is None:
                early = self.read_ahead.pop(message.id, None)
                if early is not None:
                    message.keep(early)
                else:
                    missing.append(message)
        walking = batch[0][0] == self.next_seq
        self.next_seq = batch[-1][0] + 1
        if not missing:
            return succeed(None)
        # A client that jumps about leaves nothing read for it in memory.
        self.read_ahead.clear()
        ahead: list[str] = []
        if walking:
            messages = self.mailboxes.store.messages
            room = size - sum(message.getSize() for message in missing)
            for id in self.ids[self.next_seq - 1 : self.next_seq - 1 + count - len(missing)]:
                envelope = messages.get(id)
                if envelope is None or envelope.size > room:
                    break
                room -= envelope.size
                ahead.append(id)

        def keep(found: list[bytes | None]) -> None:
            for message, raw in zip(missing, found, strict=False):
                message.keep(raw)
            for id, raw in zip(ahead, found[len(missing) :], strict=True):
                if raw is not None:
                    self.read_ahead[id] = raw

        ids = [message.id for message in missing] + ahead
        return self.mailboxes.store.read_many(ids).addCallback(keep)

    def describe(
        self, messages: list[Message], forms: Iterable[bool], utf8: bool
    ) -> Deferred[None]:
        """
        Have the BODY (or, for C{True} in C{forms}, BODYSTRUCTURE) of read
        messages ready for L{Message.structure}: those the service has not
        kept yet worked out in one thread call.  A message of 10,000 parts
        takes a good part of a second to describe, which must not hold up
        every other session.
        """
        mailboxes = self.mailboxes
        wanted: list[tuple[str, bytes, list[bool]]] = []
        for message in messages:
            missing = [e for e in forms if (message.id, e, utf8) not in mailboxes.structures]
            if missing and message.raw is not None and message.id in mailboxes.store.messages:
                wanted.append((message.id, message.raw, missing))
        if not wanted:
            return succeed(None)

        def work() -> list[list[bytes]]:
            found = []
            for _, raw, missing in wanted:
                tree = mime.read(raw)  # once, for both forms if both are wanted
                found.append([imap_list(_structure(tree, extended, utf8)) for extended in missing])
            return found

        def keep(found: list[list[bytes]]) -> None:
            for (id, _, missing), texts in zip(wanted, found, strict=True):
                for extended, text in zip(missing, texts, strict=True):
                    mailboxes.keep_structure((id, extended, utf8), text)

        return mailboxes.store.spool.run(work).addCallback(keep)

    def store(
        self, messages: MessageSet, flags: list[str], mode: int, uid: bool
    ) -> dict[int, list[str]]:
        if not self.writeable:
            raise MailboxException("the mailbox is read-only (EXAMINE)")
        changed = {}
        for seq, id in self._numbered(messages, uid):
            if id in self.vanishing:
                # Gone from the store: its flags are what it left with, kept by no one.
                changed[seq] = sorted(self.vanishing[id].flags)
                continue
            current = self.mailboxes.flags.setdefault(id, set())
            if mode > 0:
                current.update(flags)
            elif mode < 0:
                current.difference_update(flags)
            else:
                current.clear()
                current.update(flags)
            changed[seq] = sorted(current)
        return changed

    def expunge(self) -> Deferred[list[int]]:
        flags = self.mailboxes.flags
        doomed = [
            (seq, id) for seq, id in enumerate(self.ids, 1) if "\\Deleted" in flags.get(id, ())
        ]
        if not doomed:
            return succeed([])
        # This session says EXPUNGE itself (Twisted answers with the list), so
        # it leaves its own view before the store tells every other one.
        gone = {id for _, id in doomed}
        self.ids = [id for id in self.ids if id not in gone]
        numbers = sorted((seq for seq, _ in doomed), reverse=True)
        return self.mailboxes.store.forget(sorted(gone)).addCallback(lambda _: numbers)

    def search(self, query: Search, uid: bool) -> Deferred[list[int]]:
        """The sequence numbers (C{uid}: the UIDs) of the messages that match."""
        candidates = [(seq, self._message(id)) for seq, id in enumerate(self.ids, 1)]
        loading = [
            m.load()
            for _, m in candidates
            if query.needs_text or (query.needs_head and not m.head_indexed())
        ]

        def match(_: object) -> list[int]:
            return [m.getUID() if uid else seq for seq, m in candidates if query.test(seq, m)]

        return gatherResults(loading).addCallback(match)


# POP3 -------------------------------------------------------------------------


@implementer(pop3.IMailbox)
class Maildrop:
    """
    A POP3 session's maildrop: the login's messages when it logged in.
    Deletions take effect at QUIT (RFC 1939's UPDATE state).
    """

    def __init__(self, mailboxes: Mailboxes, login: str) -> None:
        self.mailboxes = mailboxes
        self.ids = mailboxes.ids_for(login)
        self.sizes = [mailboxes.store.messages[id].size for id in self.ids]
        self.deleted: set[int] = set()

    def _index(self, i: int) -> int:
        if not 0 <= i < len(self.ids):
            raise ValueError(f"no message {i + 1}")
        return i

    def listMessages(self, i: int | None = None) -> Any:
        if i is None:
            return [0 if n in self.deleted else size for n, size in enumerate(self.sizes)]
        index = self._index(i)
        return 0 if index in self.deleted else self.sizes[index]

    def live(self) -> list[tuple[int, int, bytes]]:
        """(number, size, unique id) of each message not marked deleted."""
        return [
            (n + 1, size, self.ids[n].encode())
            for n, size in enumerate(self.sizes)
            if n not in self.deleted
        ]

    def getMessage(self, i: int) -> Deferred[BytesIO]:
        index = self._index(i)

        def opened(raw: bytes | None) -> BytesIO:
            if raw is None:
                raise ValueError(f"message {i + 1} was removed")
            # Twisted's POP3 writes lines ending in LF as CRLF.
            return BytesIO(raw.replace(b"\r\n", b"\n"))

        return self.mailboxes.store.read(self.ids[index]).addCallback(opened)

    def getUidl(self, i: int) -> bytes:
        return self.ids[self._index(i)].encode()

    def deleteMessage(self, i: int) -> None:
        self.deleted.add(self._index(i))

    def undeleteMessages(self) -> None:
        self.deleted.clear()

    def sync(self) -> Deferred[None]:
        doomed = [self.ids[n] for n in sorted(self.deleted)]
        self.deleted.clear()
        return self.mailboxes.store.forget(doomed) if doomed else succeed(None)


# Logins -----------------------------------------------------------------------


@implementer(IRealm)
class MailRealm:
    """An IMAP account or a POP3 maildrop for an authenticated login."""

    def __init__(self, mailboxes: Mailboxes) -> None:
        self.mailboxes = mailboxes

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> tuple[Any, Any, Any]:
        login = (avatarId.decode() if isinstance(avatarId, bytes) else avatarId).lower()
        if login.startswith(NAMESPACE_LOGIN) and (
            login_namespace(login) is None or not self.mailboxes.namespaced
        ):
            # Without namespace_from no message has a namespace to read.
            raise UnauthorizedLogin()
        for interface in interfaces:
            if interface is IAccount:
                return IAccount, Account(self.mailboxes, login), lambda: None
            if interface is pop3.IMailbox:
                return pop3.IMailbox, Maildrop(self.mailboxes, login), lambda: None
        raise NotImplementedError(interfaces)


@implementer(ICredentialsChecker)
class AnyAddressChecker:
    """Lab mode: an address, C{all} or a namespace's C{ns/KEY}, with any password."""

    credentialInterfaces = (IUsernamePassword,)

    def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
        username = credentials.username
        name = username.decode("utf-8", "replace") if isinstance(username, bytes) else username
        login = name.lower()
        if login == ALL or login_namespace(login) is not None or "@" in name.strip("@"):
            return succeed(name.lower())
        return fail(UnauthorizedLogin())
