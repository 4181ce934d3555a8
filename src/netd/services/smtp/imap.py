"""
IMAP4rev1 over the smtp kind's store: Twisted's IMAP4Server with netd's
mailboxes (L{netd.services.smtp.mailbox}), a reactor of its own (no global
one), and the edges a daemon facing the network needs: STARTTLS drops the
plaintext that came with it, malformed arguments get C{BAD} rather than a
logged traceback, an overlong line gets C{BYE}, a message is read from the
spool in a thread only when a FETCH wants more than its headers (and read
ahead for a client that walks the mailbox), its BODY and BODYSTRUCTURE are
worked out in a thread once and kept, and a message removed from the
store is C{EXPUNGE}d in every open session.  C{ENABLE UTF8=ACCEPT} (RFC
5161, 6855) has headers sent as they came, UTF-8 and all.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IAddress, IPushProducer
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from twisted.mail.imap4 import (
    IllegalClientResponse,
    IMAP4Exception,
    IMAP4Server,
    MessageSet,
    collapseNestedLists,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from netd.compat.mail import FetchParser
from netd.schema import client_address
from netd.services.smtp.mailbox import (
    MAX_WAITING_COMMANDS,
    Access,
    Inbox,
    Message,
    SessionPortal,
    compile_search,
    envelope,
    header_section,
    literal,
    literal_head,
    section_entity,
)

__all__ = ["IMAPFactory", "IMAPSession"]

# FETCH items answered from the store's index, without reading the message.
_FROM_INDEX = frozenset({"flags", "uid", "internaldate", "rfc822size", "envelope", "rfc822header"})
# Commands whose answer may not carry EXPUNGE (RFC 3501 7.4.1), unless as UID commands.
_NO_EXPUNGE_WITH = frozenset({b"FETCH", b"STORE", b"SEARCH"})
# A synchronizing literal ending a line of SEARCH keys: its octets come after our "+".
_TRAILING_LITERAL = re.compile(rb"\{(\d+)\}$")
# SEARCH keys compiled, and what follows them on the line.
_Keys = tuple[Any, bytes]


def _flags_item() -> Any:
    parser = FetchParser()
    parser.parseString(b"FLAGS")
    return parser.result[0]


_FLAGS = _flags_item()


@functools.lru_cache(maxsize=64)
def _fetch_items(line: bytes) -> tuple[Any, ...]:
    """
    FETCH's items, parsed once for each spelling a client uses (it uses the
    same one for every message); the parsed items are only read after.
    """
    parser = FetchParser()
    try:
        parser.parseString(line)
    except Exception as e:  # _FetchParser raises bare Exceptions
        raise IllegalClientResponse(f"bad FETCH items: {e}") from None
    return tuple(parser.result)


def _from_index(part: Any) -> bool:
    if part.type == "body":
        return bool(getattr(part, "header", None)) and not part.part
    return part.type in _FROM_INDEX


def _reads_header(part: Any) -> bool:
    """Answered from the message's header: from the index, unless the index has only its start."""
    return part.type in ("envelope", "rfc822header") or (
        part.type == "body" and bool(part.header) and not part.part
    )


def _section_label(part: Any) -> bytes:
    """
    How a FETCH answer names a body section (RFC 3501 7.4.2): C{BODY[...]}
    without C{.PEEK}, and a partial fetch by its first octet alone
    (C{BODY[]<0>}), which Twisted's label gives as C{<0.10>}.
    """
    numbers = b".".join(b"%d" % (number + 1) for number in part.part)
    if part.header:
        name = bytes(part.header)
    elif part.text:
        name = b"TEXT"
    elif part.mime:
        name = b"MIME"
    else:
        name = b""
    label = b"BODY[" + numbers + (b"." if numbers and name else b"") + name + b"]"
    if part.partialBegin is not None:
        label += b"<%d>" % part.partialBegin
    return label


def _partial(part: Any, data: bytes) -> bytes:
    """C{<start.length>}: those octets of the section; past its end, none (RFC 3501 6.4.5)."""
    if part.partialBegin is None:
        return data
    return data[part.partialBegin : part.partialBegin + part.partialLength]


def _is_structure(part: Any) -> bool:
    """BODY without a section: the body's structure, not its text."""
    return not (part.header or part.text or part.mime or part.empty)


def _is_form(part: Any) -> bool:
    """BODYSTRUCTURE, or BODY without a section."""
    return part.type == "bodystructure" or (part.type == "body" and _is_structure(part))


def _marks_seen(part: Any) -> bool:
    # RFC 3501 6.4.5: fetching a body section sets \Seen, unless BODY.PEEK;
    # BODY, the structure, does not.
    return part.type in ("rfc822", "rfc822text") or (
        part.type == "body" and not getattr(part, "peek", True) and not _is_structure(part)
    )


# A FETCH reads its messages from the spool this many (or this many bytes) at a
# time, each batch in one thread call, and reads the next batch only once the
# transport has room for it.
FETCH_BATCH = 64
FETCH_BATCH_BYTES = 1 << 20

_log = Logger()


def _ignore() -> None:
    pass


def _utf8(item: Any) -> Any:
    """An ENVELOPE's strings as UTF-8 bytes (Twisted's own encoding takes ASCII only)."""
    if isinstance(item, str):
        return item.encode("utf-8")
    if isinstance(item, list | tuple):
        return [_utf8(inner) for inner in item]
    return item


@implementer(IPushProducer)
class _FetchAnswer:
    """
    The answer of one FETCH: its messages read a batch at a time, each
    message's answer written in one piece, the next batch read only while
    the transport is not paused (a slow reader holds one batch in memory, not
    the mailbox).  Twisted's own loop reads each message in a thread hop of
    its own and writes it in pieces over several reactor turns.
    """

    def __init__(
        self,
        session: IMAPSession,
        inbox: Inbox,
        tag: bytes,
        fetched: list[tuple[int, Message]],
        query: list[Any],
        uid: bool,
    ) -> None:
        self.session = session
        self.inbox = inbox
        self.tag = tag
        self.fetched = fetched
        self.query = query
        self.uid = uid
        self.loads = not all(map(_from_index, query))
        self.reads_header = any(map(_reads_header, query))
        # Some message had been removed before its text could be read (RFC 5530 EXPUNGEISSUED).
        self.expunged = False
        # The structures it answers with (BODYSTRUCTURE: extended), worked out in a thread.
        self.forms = {part.type == "bodystructure" for part in query if _is_form(part)}
        self.next = 0
        self.paused = False
        self.reading = False
        self.stopped = False

    def start(self) -> None:
        self.session.transport.registerProducer(self, True)
        self._read_batch()

    def _read_batch(self) -> None:
        """Batches read and written until the transport pauses, a read waits or all are out."""
        while not self.paused and not self.stopped:
            start = end = self.next
            size = 0
            while (
                end < len(self.fetched) and end - start < FETCH_BATCH and size < FETCH_BATCH_BYTES
            ):
                size += self.fetched[end][1].getSize()
                end += 1
            if start == end:  # nothing matched
                self._finish()
                return
            self.next = end
            batch = self.fetched[start:end]
            if self.loads or (
                self.reads_header and not all(message.head_indexed() for _, message in batch)
            ):
                self.reading = True
                read = self.inbox.read(batch, FETCH_BATCH, FETCH_BATCH_BYTES)
                if self.forms:
                    read.addCallback(self._describe, batch)
                read.addCallback(self._loaded, batch).addErrback(self._failed)
                return
            try:
                self._write_batch(batch)
            except Exception:
                self._failed(Failure())

    def _describe(self, _: object, batch: list[tuple[int, Message]]) -> Deferred[None]:
        messages = [message for _, message in batch]
        return self.inbox.describe(messages, self.forms, self.session.utf8)

    def _loaded(self, _: object, batch: list[tuple[int, Message]]) -> None:
        self.reading = False
        if self.stopped:
            return
        self._write_batch(batch)
        self._read_batch()

    def _write_batch(self, batch: list[tuple[int, Message]]) -> None:
        # A batch's answers go out in one write (at most FETCH_BATCH_BYTES and
        # their framing), not one each: 4 KiB writes a message were a send(2)
        # each, and many small segments in a slow reader's buffer.
        session = self.session
        pieces: list[bytes] = []
        for number, message in batch:
            if message.gone and self.loads:
                # Its text went with it: no answer rather than a wrong one (RFC 2180 4.1.3).
                self.expunged = True
                continue
            session.fetch_answer(number, message, self.query, self.uid, pieces.append)
        answers = b"".join(pieces)
        if self.next == len(self.fetched):
            # The last answers and the tagged OK leave together.
            self._finish(answers)
        else:
            session.transport.write(answers)

    def _finish(self, last: bytes = b"") -> None:
        self.stopped = True
        self.session.transport.unregisterProducer()
        self.session.fetch_done(self.tag, last, self.expunged)

    def _failed(self, failure: Failure) -> None:
        # Part of the answer may be out already: nothing the client could parse.
        _log.failure("FETCH failed", failure)
        self.stopped = True
        self.session.transport.unregisterProducer()
        self.session.transport.loseConnection()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        if not self.reading and not self.stopped:
            self._read_batch()

    def stopProducing(self) -> None:
        self.stopped = True


class IMAPSession(IMAP4Server):
    """One IMAP connection."""

    IDENT = b"netd IMAP4rev1 ready"
    protocol = "imap"
    transport: Any

    def __init__(self, access: Access, secure: bool) -> None:
        super().__init__(contextFactory=access.starttls, scheduler=access.schedule)
        self.access = access
        self.secure = secure
        self._may_expunge = False
        # Lines held back to go out with a FETCH's last answer, in one write.
        self._held: list[bytes] | None = None
        # The idle timeout a FETCH answer still being written put aside.
        self._held_timeout: tuple[float | None] | None = None
        self._not_reading = False
        # ENABLE UTF8=ACCEPT (RFC 6855) said: headers go out as UTF-8, not 7-bit.
        self.utf8 = False
        self.portal = SessionPortal(access, self)  # type: ignore[assignment]
        self.client = ""
        # TimeoutMixin's timers run on the service's reactor, not the global one.
        self.callLater = access.reactor.callLater  # type: ignore[method-assign]

    def connectionMade(self) -> None:
        address = client_address(self.transport.getPeer())
        self.client = str(address) if address is not None else ""
        super().connectionMade()
        if self.secure:
            self.canStartTLS = False

    def is_tls(self) -> bool:
        return self.secure or self.startedTLS

    def too_many_failures(self) -> None:
        self.sendLine(b"* BYE Too many failed logins")
        self.transport.loseConnection()

    def close_gracefully(self) -> None:
        """netd stops, or the session idled past the service's idle_timeout."""
        self.sendLine(b"* BYE netd closes this session")
        self.transport.loseConnection()

    def capabilities(self) -> dict[bytes, Any]:
        found: dict[bytes, Any] = super().capabilities()
        if self.access.allow_insecure_auth:
            found.pop(b"LOGINDISABLED", None)
        found[b"ENABLE"] = None
        found[b"UTF8=ACCEPT"] = None
        found[b"CHILDREN"] = None  # LIST's \HasNoChildren (mailbox._InboxInfo)
        return found

    def do_ENABLE(self, tag: bytes, line: bytes) -> None:
        """RFC 5161: enable what netd knows of the extensions named (UTF8=ACCEPT), ignore others."""
        asked = {name.upper() for name in line.split()}
        if not asked:
            self.sendBadResponse(tag, b"ENABLE needs a capability")
            return
        if b"UTF8=ACCEPT" in asked and not self.utf8:
            self.utf8 = True
            self.sendUntaggedResponse(b"ENABLED UTF8=ACCEPT")
        self.sendPositiveResponse(tag, b"ENABLE completed")

    # RFC 5161 3.1: in the authenticated state only, before a mailbox is selected.
    auth_ENABLE = (do_ENABLE, IMAP4Server.arg_line)

    def lineReceived(self, line: bytes) -> None:
        super().lineReceived(line)
        # Twisted queues what comes while a FETCH is written, without limit.
        if self.blocked is not None and len(self.blocked) >= MAX_WAITING_COMMANDS:
            self._stop_reading()

    def _stop_reading(self) -> None:
        if not self._not_reading:
            self._not_reading = True
            self.transport.pauseProducing()

    def _unblock(self) -> None:
        super()._unblock()
        if self._not_reading and self.blocked is None:
            self._not_reading = False
            self.transport.resumeProducing()

    def lineLengthExceeded(self, line: bytes) -> None:
        self.sendLine(b"* BYE Line too long")
        self.transport.loseConnection()

    def do_STARTTLS(self, tag: bytes) -> None:
        super().do_STARTTLS(tag)
        if self.startedTLS:
            # Whatever came with the command was sent in plaintext: a man in the
            # middle's commands must not run as if they had come over TLS.
            self._buffer = b""

    unauth_STARTTLS = (do_STARTTLS,)  # type: ignore[assignment]

    def arg_seqset(self, line: bytes) -> tuple[MessageSet, bytes]:
        # One message (a client reading one FETCH a message) without
        # parseIdList's general parse, a third of the cost.
        first, _, rest = line.partition(b" ")
        if first.isdigit() and first[:1] != b"0":
            return MessageSet(int(first), int(first)), rest
        found: tuple[MessageSet, bytes] = super().arg_seqset(line)
        return found

    def arg_fetchatt(self, line: bytes) -> tuple[Any, bytes]:
        items = _fetch_items(line)
        if not items:
            # RFC 3501 9: FETCH takes one item or a list of one or more; Twisted answered OK.
            raise IllegalClientResponse("FETCH needs items")
        return list(items), b""

    def arg_searchkeys(self, line: bytes) -> _Keys | Deferred[_Keys]:
        return self._search_keys(b"", line)

    def _search_keys(self, before: bytes, line: bytes) -> _Keys | Deferred[_Keys]:
        """
        The keys of C{before} and C{line}, once the literal ending C{line}
        (and any ending the line after it) is in: imapclient sends a
        non-ASCII string as one (RFC 3501 4.3), and Twisted read on without
        it, matching every message and running its octets as a command.
        """
        pending = _TRAILING_LITERAL.search(line)
        if pending is None:
            return self._compiled_keys(before + line)
        # parseNestedParens reads a literal as "{n}" CRLF and its n octets.
        head = before + line + b"\r\n"
        octets: Deferred[tuple[bytes, bytes]] = self._stringLiteral(int(pending.group(1)))
        return octets.addCallback(lambda got: self._search_keys(head + got[0], got[1]))

    def _compiled_keys(self, line: bytes) -> _Keys:
        try:
            keys, rest = super().arg_searchkeys(line)
        except IMAP4Exception as e:
            raise IllegalClientResponse(f"bad SEARCH keys: {e}") from None
        assert self.mbox is not None
        count = self.mbox.getMessageCount()
        last_uid = self.mbox.getUID(count) if count else 0
        return compile_search(keys, count, last_uid), rest

    def do_SEARCH(self, tag: bytes, charset: Any, query: Any, uid: int = 0) -> None:
        # As for FETCH, the commands that come while its messages are read
        # wait for its answer: an EXPUNGE meanwhile would renumber what it found.
        assert self.mbox is not None
        self._hold_commands()
        # maybeDeferred: a search that raises still ends in an answer and lets go.
        found = maybeDeferred(self.mbox.search, query, bool(uid))
        found.addCallback(self._searched, tag).addErrback(self._failed, tag, b"SEARCH")
        found.addBoth(lambda _: self._unblock())

    def _searched(self, found: list[int], tag: bytes) -> None:
        self.sendUntaggedResponse(b"SEARCH " + b" ".join(b"%d" % number for number in found))
        self.sendPositiveResponse(tag, b"SEARCH completed")

    def do_EXPUNGE(self, tag: bytes) -> None:
        assert self.mbox is not None
        if not self.mbox.isWriteable():
            self.sendNegativeResponse(tag, b"EXPUNGE ignored on read-only mailbox")
            return
        # Its messages leave this session's numbering at once, so the commands
        # after it wait until its EXPUNGE lines are out (the removal from disk).
        self._hold_commands()
        gone = maybeDeferred(self.mbox.expunge)
        gone.addCallback(self._expunged, tag).addErrback(self._failed, tag, b"EXPUNGE")
        gone.addBoth(lambda _: self._unblock())

    def _expunged(self, numbers: list[int], tag: bytes) -> None:
        for number in numbers:
            self.sendUntaggedResponse(b"%d EXPUNGE" % number)
        self.sendPositiveResponse(tag, b"EXPUNGE completed")

    def _failed(self, failure: Failure, tag: bytes, command: bytes) -> None:
        _log.failure("{command} failed", failure, command=command.decode())
        self.sendNegativeResponse(tag, command + b" failed")

    def _hold_commands(self) -> None:
        """Commands that come from now on wait (Twisted's own mechanism, as FETCH uses)."""
        if self.blocked is None:
            self.blocked = []

    def _cbSelectWork(self, mbox: Inbox | None, cmdName: bytes, tag: bytes) -> None:
        """
        SELECT and EXAMINE's answer with all RFC 3501 6.3.1 requires: Twisted's
        leaves out OK [UNSEEN], [PERMANENTFLAGS] and [UIDNEXT], which clients
        that keep a copy (Thunderbird, offlineimap) use to sync.
        """
        if mbox is None:
            self.sendNegativeResponse(tag, b"No such mailbox")
            return
        flags = b" ".join(flag.encode() for flag in mbox.getFlags())
        self.sendUntaggedResponse(b"%d EXISTS" % mbox.getMessageCount())
        self.sendUntaggedResponse(b"%d RECENT" % mbox.getRecentCount())
        self.sendUntaggedResponse(b"FLAGS (" + flags + b")")
        unseen = mbox.first_unseen()
        if unseen is not None:
            self.sendPositiveResponse(None, b"[UNSEEN %d] First unseen" % unseen)
        if mbox.isWriteable():
            # Keywords too: STORE keeps any flag a client sets.
            self.sendPositiveResponse(None, b"[PERMANENTFLAGS (" + flags + b" \\*)] Kept")
        else:
            self.sendPositiveResponse(None, b"[PERMANENTFLAGS ()] Read-only")
        self.sendPositiveResponse(None, b"[UIDVALIDITY %d] UIDs valid" % mbox.getUIDValidity())
        self.sendPositiveResponse(None, b"[UIDNEXT %d] Predicted next UID" % mbox.getUIDNext())
        mode = b"READ-WRITE" if mbox.isWriteable() else b"READ-ONLY"
        mbox.addListener(self)
        self.sendPositiveResponse(tag, b"[" + mode + b"] " + cmdName + b" successful")
        self.state = "select"
        self.mbox = mbox

    def do_STORE(self, tag: bytes, *args: Any, **kwargs: Any) -> None:
        if self.mbox is not None and not self.mbox.isWriteable():
            # Twisted answers a mailbox's refusal as a server error (BAD).
            self.sendNegativeResponse(tag, b"STORE on a read-only mailbox (EXAMINE)")
            return
        super().do_STORE(tag, *args, **kwargs)

    select_STORE = (  # type: ignore[assignment]
        do_STORE,
        arg_seqset,
        IMAP4Server.arg_atom,
        IMAP4Server.arg_flaglist,
    )

    def do_FETCH(self, tag: bytes, messages: Any, query: list[Any], uid: int = 0) -> None:
        assert self.mbox is not None
        fetched = self.mbox.fetch(messages, uid=bool(uid))
        # As Twisted's FETCH: the commands that come meanwhile wait for it.
        if self.blocked is None:
            self.blocked = []
        answer = _FetchAnswer(self, self.mbox, tag, fetched, query, bool(uid))
        answer.start()
        if not answer.stopped:
            # Waiting for a read or a slow client: no idle timeout meanwhile
            # (an answer written at once leaves the timer as it is).
            self._held_timeout = (self.setTimeout(None),)

    def fetch_answer(
        self,
        number: int,
        message: Message,
        query: list[Any],
        uid: bool,
        write: Callable[[bytes], object],
    ) -> None:
        """
        The C{* N FETCH (...)} line of one message, its literals in it, given
        to C{write} in pieces: a batch's answers are joined once, so a message
        is copied once on its way out rather than once a layer.
        """
        message.utf8 = self.utf8
        writeable = self.mbox is not None and self.mbox.isWriteable()
        changed = writeable and any(map(_marks_seen, query)) and self.access.mark_seen(message.id)
        if changed and not any(part.type == "flags" for part in query):
            # RFC 3501 6.4.5: flags the fetch changed come with its answer.
            query = [*query, _FLAGS]
        write(b"* %d FETCH (" % number)
        seen_uid = False
        for index, part in enumerate(query):
            if index:
                write(b" ")
            if part.type == "uid":
                seen_uid = True
            if part.type == "body":
                self.spew_body(part, number, message, write, _ignore)
            else:
                getattr(self, "spew_" + part.type)(number, message, write, _ignore)
        if uid and not seen_uid:
            write(b" ")
            self.spew_uid(number, message, write, _ignore)
        write(b")\r\n")

    def fetch_done(self, tag: bytes, last: bytes = b"", expunged: bool = False) -> None:
        """
        The FETCH is answered: its tagged answer (with C{last}, in one write),
        then what waited.  C{expunged}: messages it asked for were removed before
        they could be read, and were left out (Dovecot's answer, RFC 5530).
        """
        if self._held_timeout is not None:
            self.setTimeout(self._held_timeout[0])
            self._held_timeout = None
        self._held = [last]
        try:
            if expunged:
                self.sendNegativeResponse(
                    tag, b"[EXPUNGEISSUED] Some of the messages were removed meanwhile"
                )
            else:
                self.sendPositiveResponse(tag, b"FETCH completed")
        finally:
            held, self._held = self._held, None
        self.transport.write(b"".join(held))
        self._unblock()

    def sendLine(self, line: bytes) -> None:
        if self._held is not None:
            self._held.append(line + self.delimiter)
            return
        super().sendLine(line)

    def spew_envelope(self, id: int, msg: Any, _w: Any = None, _f: Any = None) -> None:
        found = envelope(msg.getHeaders(True), self.utf8)
        (_w or self.transport.write)(b"ENVELOPE " + collapseNestedLists([_utf8(found)]))

    def spew_bodystructure(self, id: int, msg: Any, _w: Any = None, _f: Any = None) -> None:
        (_w or self.transport.write)(b"BODYSTRUCTURE (" + msg.structure(True) + b")")

    def spew_rfc822header(self, id: int, msg: Any, _w: Any = None, _f: Any = None) -> None:
        (_w or self.transport.write)(b"RFC822.HEADER " + literal(msg.header_bytes()))

    def spew_rfc822(self, id: int, msg: Any, _w: Any = None, _f: Any = None) -> None:
        (_w or self.transport.write)(b"RFC822 " + literal(msg.open().read()))

    def spew_rfc822text(self, id: int, msg: Any, _w: Any = None, _f: Any = None) -> None:
        (_w or self.transport.write)(b"RFC822.TEXT " + literal(msg.getBodyFile().read()))

    select_FETCH = (do_FETCH, arg_seqset, arg_fetchatt)  # type: ignore[assignment]
    select_SEARCH = (do_SEARCH, IMAP4Server.opt_charset, arg_searchkeys)  # type: ignore[assignment]
    select_EXPUNGE = (do_EXPUNGE,)  # type: ignore[assignment]
    # netd's mailboxes take mail over SMTP alone: no APPEND, no COPY.
    auth_APPEND = select_APPEND = select_COPY = None  # type: ignore[assignment]

    def dispatchCommand(
        self, tag: bytes, cmd: bytes, rest: bytes | None, uid: int | None = None
    ) -> None:
        # Which command the next tagged answer ends: EXPUNGEs of messages that
        # left the store may not come with a FETCH, STORE or SEARCH (RFC 3501 7.4.1).
        self._may_expunge = uid is not None or cmd.upper() not in _NO_EXPUNGE_WITH
        # A command without arguments has rest None, which Twisted's argument
        # parsers meet with an AttributeError (a logged "server error").
        super().dispatchCommand(tag, cmd, rest if rest is not None else b"", uid)

    def spew_body(self, part: Any, id: int, msg: Any, _w: Any = None, _f: Any = None) -> Any:
        write = _w or self.transport.write
        if not (part.header or part.mime or part.text or part.empty):
            # BODY without a section: the structure without extension data.
            write(b"BODY (" + msg.structure(False) + b")")
            return None
        if part.part:
            data = self._part_section(part, msg)
            if data is None:
                # A part the message does not have (BODY[2] of a single part) is
                # NIL, as Dovecot answers; Twisted raises, and drops the connection.
                write(_section_label(part) + b" NIL")
                return None
        elif part.header:
            fields = part.header.fields
            data = header_section(msg.header_bytes(), fields, part.header.negate, self.utf8)
        elif part.text:
            data = msg.getBodyFile().read()
        else:
            data = msg.open().read()
        data = _partial(part, data)
        # The message is read whole before its answer: its literal goes in the
        # same write, not through Twisted's FileProducer a turn later, and the
        # text is one piece, not copied into its literal's framing.
        write(_section_label(part) + b" " + literal_head(data))
        write(data)
        return None

    def _part_section(self, part: Any, msg: Message) -> bytes | None:
        """
        A section of one of the message's parts: its octets as they are stored,
        not a copy the email package wrote again, so that a signature over a
        part (S/MIME, PGP/MIME) still verifies on what the client reads.
        """
        target = section_entity(msg.entity(), part.part)
        if target is None:
            return None
        raw = msg.raw
        assert raw is not None, "load() first"
        if part.mime:
            return raw[target.start : target.body_start]
        if part.header or part.text:
            # Of a message/rfc822 part, they name the message it holds.
            inner = target.parts[0] if target.main == "message" and target.parts else target
            if part.text:
                return raw[inner.body_start : inner.end]
            block = raw[inner.start : inner.body_start]
            return header_section(block, part.header.fields, part.header.negate, self.utf8)
        return raw[target.body_start : target.end]

    def expunge_due(self) -> None:
        """Told by the selected mailbox: messages left the store."""
        if self.parseState == "idle":
            self._say_vanished()

    def _say_vanished(self) -> None:
        if self.mbox is not None:
            for number in self.mbox.take_vanished():
                self.sendUntaggedResponse(b"%d EXPUNGE" % number)

    def _ending(self, tag: bytes | None) -> None:
        if tag is not None and self._may_expunge:
            self._say_vanished()

    def sendPositiveResponse(self, tag: bytes | None = None, message: bytes = b"") -> None:
        self._ending(tag)
        super().sendPositiveResponse(tag, message)

    def sendNegativeResponse(self, tag: bytes | None = None, message: bytes = b"") -> None:
        self._ending(tag)
        super().sendNegativeResponse(tag, message)

    def connectionLost(self, reason: Any = None) -> None:
        if self.mbox is not None:
            self.mbox.removeListener(self)
            self.mbox.close()
            self.mbox = None
        super().connectionLost(reason)


class IMAPFactory(ServerFactory):
    """Builds the IMAP sessions of one listener."""

    noisy = False

    def __init__(self, access: Access, secure: bool) -> None:
        self.access = access
        self.secure = secure

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        session = IMAPSession(self.access, self.secure)
        session.factory = self
        return session
