"""
POP3 over the smtp kind's store: Twisted's POP3 with STLS (RFC 2595) and an
honest CAPA (RFC 2449), timers on the service's reactor, its own line
splitting (STLS drops the plaintext that came with it; an overlong line is
refused and the connection closed) and protocol errors answered C{-ERR}
without a logged traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from io import BytesIO
from typing import Any

from twisted.internet.interfaces import IAddress, ITLSTransport
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.mail import pop3

from netd.compat.mail import send_pop3_message
from netd.schema import client_address
from netd.services.smtp.mailbox import MAX_WAITING_COMMANDS, Access, Maildrop, SessionPortal

__all__ = ["POP3Factory", "POP3Session", "top_of"]

_MAX_LINE = 1024  # RFC 2449 4: 255 octets a command; generous, bounded


def top_of(message: bytes, lines: int) -> bytes:
    """
    RFC 1939 TOP: the header, the blank line after it, then the first
    C{lines} lines of the body (all of a shorter one).  Lines end in LF here
    (the maildrop hands POP3 its messages so).
    """
    cut = message.find(b"\n\n")
    if cut < 0:
        return message
    cut += 2
    for _ in range(lines):
        end = message.find(b"\n", cut)
        if end < 0:
            return message
        cut = end + 1
    return message[:cut]


class POP3Session(pop3.POP3):
    """One POP3 connection."""

    AUTH_CMDS = [*pop3.POP3.AUTH_CMDS, b"STLS"]
    protocol = "pop3"
    transport: Any

    def __init__(self, access: Access, secure: bool) -> None:
        self.access = access
        self.secure = secure
        self.portal = SessionPortal(access, self)  # type: ignore[assignment]
        self.client = ""
        self.started_tls = False
        self._line_start = True
        self._not_reading = False
        # No APOP timestamp in the greeting: clients (curl) would try APOP,
        # which needs the password in clear on the server, then give up.
        self.magic = b"netd POP3 ready"
        self._input = b""
        # TimeoutMixin's timers run on the service's reactor, not the global one.
        self.callLater = access.reactor.callLater  # type: ignore[method-assign]

    def is_tls(self) -> bool:
        return self.secure or self.started_tls

    def connectionMade(self) -> None:
        address = client_address(self.transport.getPeer())
        self.client = str(address) if address is not None else ""
        super().connectionMade()

    def do_RETR(self, i: bytes) -> Any:
        self._line_start = True
        return super().do_RETR(i)

    def do_TOP(self, i: bytes, size: bytes) -> Any:
        # Twisted's TOP looks for the blank line in each 16 KiB read on its own
        # (one that straddles two reads is missed, and body lines follow up to
        # the next), and takes a read without a whole line for the end.
        if not size.isdigit():
            self.failResponse(b"Bad line count argument")
            return None
        self._line_start = True
        lines = int(size)
        return send_pop3_message(
            self,
            i,
            lambda file: BytesIO(top_of(file.read(), lines)),
            lambda _: "Top of message follows",
        )

    def do_DELE(self, i: bytes) -> None:
        # RFC 1939 5: a message marked deleted may not be named again; Twisted says +OK.
        if not any(i.isdigit() and number == int(i) for number, _, _ in self._live()):
            self.failResponse(b"no such message")
            return
        super().do_DELE(i)

    def transformChunk(self, chunk: bytes) -> bytes:
        # Twisted's dot-stuffing misses a "." that starts the message or the
        # chunk (the line began in the one before): a message could end its
        # own answer early and have the client read the rest as replies.
        text = chunk.replace(b"\n", b"\r\n").replace(b"\r\n.", b"\r\n..")
        if self._line_start and chunk.startswith(b"."):
            text = b"." + text
        if chunk:
            self._line_start = chunk.endswith(b"\n")
        return text

    def too_many_failures(self) -> None:
        self.transport.loseConnection()

    def _tls_offered(self) -> bool:
        return (
            self.access.starttls is not None
            and not self.secure
            and not self.started_tls
            and ITLSTransport.providedBy(self.transport)
        )

    def _needs_tls_first(self) -> bool:
        return self._tls_offered() and not self.access.allow_insecure_auth

    def dataReceived(self, data: bytes) -> None:
        self._input += data
        while not self.transport.disconnecting:
            end = self._input.find(b"\r\n")
            if end < 0:
                if len(self._input) > _MAX_LINE:
                    self.failResponse(b"line too long")
                    self.transport.loseConnection()
                break
            line, self._input = self._input[:end], self._input[end + 2 :]
            if end > _MAX_LINE:
                self.failResponse(b"line too long")
                continue
            self.lineReceived(line)

    def processCommand(self, command: bytes, *args: bytes) -> Any:
        result = super().processCommand(command, *args)
        # Twisted queues what comes while a RETR is written, without limit.
        waiting = self.blocked is not None and len(self.blocked) >= MAX_WAITING_COMMANDS
        if waiting and not self._not_reading:
            self._not_reading = True
            self.transport.pauseProducing()
        return result

    def _unblock(self, _: object) -> None:
        # Twisted's runs the queued commands without state_COMMAND's error
        # handling: one bad command among them raised out of the RETR's
        # callbacks, and the commands after it were lost.
        commands: list[Any] = self.blocked or []
        self.blocked = None  # type: ignore[assignment]  # Twisted's None: nothing waits
        while commands and self.blocked is None:
            command, args = commands.pop(0)
            self._run(command, *args)
        if self.blocked is not None:
            self.blocked.extend(commands)
        elif self._not_reading:
            self._not_reading = False
            self.transport.resumeProducing()

    def state_COMMAND(self, line: bytes) -> None:
        self._run(*line.split(b" "))

    def _run(self, command: bytes, *args: bytes) -> None:
        try:
            self.processCommand(command, *args)
        except (ValueError, AttributeError, pop3.POP3Error, TypeError) as e:
            reason = e.args[0] if e.args and isinstance(e.args[0], bytes) else b"bad command"
            self.failResponse(reason)

    def listCapabilities(self) -> list[bytes]:
        found = [b"TOP", b"UIDL", b"RESP-CODES", b"IMPLEMENTATION netd"]
        if not self._needs_tls_first():
            found.append(b"USER")
        if self._tls_offered():
            found.append(b"STLS")
        return found

    # STAT, LIST and UIDL leave out messages marked deleted (RFC 1939 5);
    # Twisted's count them with size 0.  The sizes are in the index: no disk.

    def _live(self) -> list[tuple[int, int, bytes]]:
        # Only a logged-in session gets here (processCommand): mbox is its maildrop.
        assert isinstance(self.mbox, Maildrop)
        return self.mbox.live()

    def do_STAT(self) -> None:
        live = self._live()
        self.successResponse(b"%d %d" % (len(live), sum(size for _, size, _ in live)))

    def do_LIST(self, i: bytes | None = None) -> None:
        self._listing(i, lambda number, size, _: b"%d %d" % (number, size))

    def do_UIDL(self, i: bytes | None = None) -> None:
        self._listing(i, lambda number, _, uid: b"%d %s" % (number, uid))

    def _listing(self, i: bytes | None, line: Callable[[int, int, bytes], bytes]) -> None:
        live = self._live()
        if i is None:
            self.successResponse(b"%d messages" % len(live))
            self.transport.writeSequence([line(*entry) + b"\r\n" for entry in live] + [b".\r\n"])
            return
        wanted = [entry for entry in live if i.isdigit() and entry[0] == int(i)]
        if not wanted:
            self.failResponse(b"no such message")
        else:
            self.successResponse(line(*wanted[0]))

    def do_STLS(self) -> None:
        if self.secure or self.started_tls:
            self.failResponse(b"TLS already active")
        elif not self._tls_offered():
            self.failResponse(b"TLS not available")
        else:
            self.successResponse(b"Begin TLS negotiation")
            # Whatever came with the command was sent in plaintext: a man in the
            # middle's commands must not run as if they had come over TLS.
            self._input = b""
            self.transport.startTLS(self.access.starttls)
            self.started_tls = True

    def do_USER(self, user: bytes) -> None:
        if self._needs_tls_first():
            self.failResponse(b"[AUTH] STLS first")
        else:
            super().do_USER(user)

    def do_PASS(self, password: bytes, *words: bytes) -> None:
        if self._needs_tls_first():
            self.failResponse(b"[AUTH] STLS first")
        else:
            super().do_PASS(password, *words)


class POP3Factory(ServerFactory):
    """Builds the POP3 sessions of one listener."""

    noisy = False

    def __init__(self, access: Access, secure: bool) -> None:
        self.access = access
        self.secure = secure

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        session = POP3Session(self.access, self.secure)
        session.factory = self  # type: ignore[assignment]
        return session
