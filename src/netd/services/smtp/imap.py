"""
IMAP4rev1 over the smtp kind's store: Twisted's IMAP4Server with netd's
mailboxes (L{netd.services.smtp.mailbox}), a reactor of its own (no global
one), and the edges a daemon facing the network needs: STARTTLS drops the
plaintext that came with it, malformed arguments get C{BAD} rather than a
logged traceback, an overlong line gets C{BYE}, a message is read from the
spool in a thread only when a FETCH wants more than its headers, and a
message removed from the store is C{EXPUNGE}d in every open session.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.mail.imap4 import IllegalClientResponse, IMAP4Exception, IMAP4Server

from netd.compat.mail import FetchParser
from netd.schema import client_address
from netd.services.smtp.mailbox import (
    MAX_WAITING_COMMANDS,
    Access,
    Message,
    SessionPortal,
    compile_search,
)

__all__ = ["IMAPFactory", "IMAPSession"]

# FETCH items answered from the store's index, without reading the message.
_FROM_INDEX = frozenset({"flags", "uid", "internaldate", "rfc822size", "envelope", "rfc822header"})
# Commands whose answer may not carry EXPUNGE (RFC 3501 7.4.1), unless as UID commands.
_NO_EXPUNGE_WITH = frozenset({b"FETCH", b"STORE", b"SEARCH"})


def _flags_item() -> Any:
    parser = FetchParser()
    parser.parseString(b"FLAGS")
    return parser.result[0]


_FLAGS = _flags_item()


def _from_index(part: Any) -> bool:
    if part.type == "body":
        return bool(getattr(part, "header", None)) and not part.part
    return part.type in _FROM_INDEX


def _marks_seen(part: Any) -> bool:
    # RFC 3501 6.4.5: fetching a body sets \Seen, unless BODY.PEEK.
    return part.type in ("rfc822", "rfc822text") or (
        part.type == "body" and not getattr(part, "peek", True)
    )


def _no_delay(transport: Any) -> None:
    # A FETCH answer goes out in pieces over reactor turns (the literal, its
    # ")", the tagged OK): with Nagle's algorithm the last piece would wait for
    # the client's delayed ACK, ~40 ms a command.
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        set_no_delay(True)


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
        self._not_reading = False
        self.portal = SessionPortal(access, self)  # type: ignore[assignment]
        self.client = ""
        # TimeoutMixin's timers run on the service's reactor, not the global one.
        self.callLater = access.reactor.callLater  # type: ignore[method-assign]

    def connectionMade(self) -> None:
        _no_delay(self.transport)
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
        return found

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

    def arg_fetchatt(self, line: bytes) -> tuple[Any, bytes]:
        parser = FetchParser()
        try:
            parser.parseString(line)
        except Exception as e:  # _FetchParser raises bare Exceptions
            raise IllegalClientResponse(f"bad FETCH items: {e}") from None
        return parser.result, b""

    def arg_searchkeys(self, line: bytes) -> tuple[Any, bytes]:
        try:
            keys, rest = super().arg_searchkeys(line)
        except IMAP4Exception as e:
            raise IllegalClientResponse(f"bad SEARCH keys: {e}") from None
        return compile_search(keys), rest

    def do_STORE(self, tag: bytes, *args: Any, **kwargs: Any) -> None:
        if self.mbox is not None and not self.mbox.isWriteable():
            # Twisted answers a mailbox's refusal as a server error (BAD).
            self.sendNegativeResponse(tag, b"STORE on a read-only mailbox (EXAMINE)")
            return
        super().do_STORE(tag, *args, **kwargs)

    select_STORE = (  # type: ignore[assignment]
        do_STORE,
        IMAP4Server.arg_seqset,
        IMAP4Server.arg_atom,
        IMAP4Server.arg_flaglist,
    )
    select_FETCH = (IMAP4Server.do_FETCH, IMAP4Server.arg_seqset, arg_fetchatt)  # type: ignore[assignment]
    select_SEARCH = (IMAP4Server.do_SEARCH, IMAP4Server.opt_charset, arg_searchkeys)  # type: ignore[assignment]
    # netd's mailboxes take mail over SMTP alone: no APPEND, no COPY.
    auth_APPEND = select_APPEND = select_COPY = None  # type: ignore[assignment]

    def spewMessage(self, id: int, msg: Message, query: list[Any], uid: bool) -> Any:
        writeable = self.mbox is not None and self.mbox.isWriteable()
        changed = writeable and any(map(_marks_seen, query)) and self.access.mark_seen(msg.id)
        if changed and not any(part.type == "flags" for part in query):
            # RFC 3501 6.4.5: flags the fetch changed come with its answer.
            query = [*query, _FLAGS]
        if all(map(_from_index, query)):
            return super().spewMessage(id, msg, query, uid)
        return msg.load().addCallback(lambda _: IMAP4Server.spewMessage(self, id, msg, query, uid))

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
        # A part the message does not have (BODY[2] of a single part) is NIL,
        # as Dovecot answers; Twisted raises, and drops the connection for it.
        target = msg
        for number in part.part:
            if target.isMultipart():
                try:
                    target = target.getSubPart(number)
                except IndexError:
                    target = None
            elif number > 0:
                target = None
            if target is None:
                (_w or self.transport.write)(part.__bytes__() + b" NIL")
                return None
        return super().spew_body(part, id, msg, _w, _f)

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
