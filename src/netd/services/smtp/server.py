"""
The smtp kind's server side: L{twisted.mail.smtp.ESMTP} with the places where
it falls short for a relay replaced by name.

  - Input is split into lines here, not by C{LineOnlyReceiver}: a command whose
    reply waits (the end of DATA while the spool syncs, a password check) holds
    the lines behind it, so pipelined replies stay in order (Twisted #8126),
    and C{STARTTLS} drops whatever plaintext came with it (command injection).
  - DATA is taken in chunks, not line by line: only C{CRLF.CRLF} ends it, and a
    bare CR or LF becomes CRLF (or rejects the message), so nothing can be
    smuggled past another server's idea of the end (CVE-2023-51764).
  - Paths are read by L{netd.services.smtp.address}, not by
    L{twisted.mail.smtp.Address} (which strips source routes), and the relay
    policy is applied per recipient.
  - Every reply carries an enhanced status code (RFC 2034); AUTH is offered and
    accepted only over TLS unless the map allows otherwise.
  - SMTPUTF8 (RFC 6531): a transaction that says so may use UTF-8 addresses.
  - CHUNKING (RFC 3030): BDAT chunks are read by count, not by lines, and
    meet DATA's checks (size, line length, bare CR or LF, hops) and spool.
  - BINARYMIME (RFC 3030 3), where the receiver offers it (capture only: the
    relay sends by DATA, which cannot carry binary): such a message comes by
    BDAT only, and is kept octet for octet, checked for size and hops only.
  - DSN (RFC 3461): RET, ENVID, NOTIFY and ORCPT are checked and kept with the
    message for the relay's reports.
  - The service's rules (L{netd.rules}) are checked at each stage (connect,
    helo, auth, starttls, mail, rcpt, data, eom) when it has any: a rule may
    answer instead (C{reply}), or delay, throttle, stall, close or reset.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.python.failure import Failure
from zope.interface import implementer

from netd.compat.mail import IllegalClientResponse, LOGINCredentials, PLAINCredentials
from netd.connections import cut_if_unread
from netd.events import ServiceStats
from netd.kinds import IOwesReplies, RepliesOwed
from netd.namespaces import NO_NAMESPACES, Namespacing
from netd.records import Record
from netd.rules import RuleSet
from netd.schema import Network, client_address, in_networks
from netd.services.smtp.address import Mailbox, PathRefused, parse_path
from netd.services.smtp.namespace import derive_namespace
from netd.services.smtp.spool import Notify

__all__ = ["Limits", "Receiver", "Session", "SessionFactory", "Transaction", "busy_reply"]


# Defaults when a message text has no status of its own (RFC 3463).
_STATUS = {
    211: b"2.0.0",
    214: b"2.0.0",
    221: b"2.0.0",
    235: b"2.7.0",
    250: b"2.0.0",
    252: b"2.5.0",
    421: b"4.3.0",
    451: b"4.3.0",
    452: b"4.5.3",
    454: b"4.7.0",
    500: b"5.5.2",
    501: b"5.5.4",
    502: b"5.5.1",
    503: b"5.5.1",
    504: b"5.5.4",
    530: b"5.7.0",
    535: b"5.7.8",
    550: b"5.7.1",
    552: b"5.3.4",
    553: b"5.1.3",
    554: b"5.0.0",
}
_NO_STATUS = frozenset({220, 334, 354})
_HAS_STATUS = re.compile(rb"[245]\.\d{1,3}\.\d{1,3}( |\Z)")
_BAD_COMMAND = re.compile(rb"[\r\n\x00]")
_END_OF_DATA = b"\r\n.\r\n"
_MAIL_ARGUMENT = re.compile(rb"FROM:\s*(?P<path><[^<>]*>|[^\s<>]*)(?:\s+(?P<params>.*))?\Z", re.I)
_RCPT_ARGUMENT = re.compile(rb"TO:\s*(?P<path><[^<>]*>|[^\s<>]*)(?:\s+(?P<params>.*))?\Z", re.I)
_BDAT_ARGUMENT = re.compile(rb"(?P<size>\d{1,20})(?: +(?P<last>LAST))?\Z", re.I)
# RFC 3461 4: xtext, "+" and two upper-case hex digits for what is not xchar.
_XTEXT = re.compile(rb"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*\Z")
_ADDR_TYPE = re.compile(rb"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+\Z")
_NOTIFY_WHEN = frozenset({"SUCCESS", "FAILURE", "DELAY"})
_MAX_ENVID = 100  # RFC 3461 4.4
_MAX_ORCPT = 500  # RFC 3461 4.2
# Lines held while a reply is pending, before reading from the client stops.
_HOLD_LIMIT = 256 * 1024
# Seconds a stopping session that has sent its mail is given to say QUIT.
_QUIT_WAIT = 2.0
# Reply bytes written between two looks at what the client has left unread
# (netd.connections.cut_if_unread): not a look per read.
_UNREAD_LOOK_EVERY = 64 * 1024
# RFC 5321 4.5.3.1.4: 512 for a command line; AUTH responses may be longer (RFC 4954: 12288).
_COMMAND_LINE = 12288
_AUTH_FAILURES = 3
# RFC 5321 6.3: a message that has passed this many relays is looping (Postfix: 50).
_MAX_HOPS = 50


@attrs.frozen(repr=False)
class Limits(Record):
    max_message_size: int = 10 * 1024 * 1024
    max_recipients: int = 100
    max_line_length: int = 1000
    command_timeout: float = 300.0
    data_timeout: float = 600.0


@attrs.frozen(repr=False)
class Transaction(Record):
    """One message as the session hands it over, before it is spooled."""

    sender: Mailbox | None
    recipients: tuple[Mailbox, ...]
    data: bytes
    helo: str
    client: str
    user: str | None
    protocol: str
    utf8: bool = False
    ret: str | None = None
    envid: str | None = None
    dsn: Mapping[str, Notify] = attrs.field(factory=dict)
    binary: bool = False  # BODY=BINARYMIME
    eight_bit: bool = False  # BODY=8BITMIME


@attrs.define(repr=False)
class _Mail(Record):
    sender: Mailbox | None
    parameters: _MailParameters
    recipients: list[Mailbox] = attrs.field(factory=list)
    dsn: dict[str, Notify] = attrs.field(factory=dict)
    # The BDAT chunks so far; None: no BDAT yet (DATA may still come).
    chunks: bytearray | None = None


@attrs.frozen(repr=False)
class _MailParameters(Record):
    """What MAIL FROM's parameters asked for."""

    utf8: bool = False
    ret: str | None = None
    envid: str | None = None
    binary: bool = False  # BODY=BINARYMIME
    eight_bit: bool = False  # BODY=8BITMIME


def _xtext(value: bytes) -> str | None:
    """RFC 3461 4's xtext decoded, or None if it is not xtext."""
    if not _XTEXT.match(value):
        return None
    return re.sub(rb"\+([0-9A-F]{2})", lambda m: bytes([int(m.group(1), 16)]), value).decode(
        "utf-8", "replace"
    )


def _rcpt_parameters(params: bytes) -> Notify | tuple[int, bytes]:
    """RCPT TO's parameters (DSN's NOTIFY and ORCPT), or the reply refusing them."""
    notify: tuple[str, ...] | None = None
    orcpt: str | None = None
    seen: set[bytes] = set()
    for param in params.split():
        key, _, value = param.partition(b"=")
        key = key.upper()
        if key in seen:
            return 501, b"5.5.4 " + _printable(key, 32).encode() + b" given twice"
        seen.add(key)
        if key == b"NOTIFY":
            words = tuple(value.decode("ascii", "replace").upper().split(","))
            if words != ("NEVER",) and not (words and set(words) <= _NOTIFY_WHEN):
                return 501, b"5.5.4 NOTIFY is NEVER, or SUCCESS, FAILURE and DELAY"
            notify = tuple(dict.fromkeys(words))
        elif key == b"ORCPT":
            kind, semicolon, address = value.partition(b";")
            decoded = _xtext(address)
            if not (semicolon and _ADDR_TYPE.match(kind)) or not decoded:
                return 501, b"5.5.4 ORCPT is addr-type;xtext"
            if len(value) > _MAX_ORCPT:
                return 501, b"5.5.4 ORCPT is longer than 500 characters"
            orcpt = kind.decode("ascii") + ";" + decoded
        else:
            return 555, b"5.5.4 Unsupported parameter " + _printable(key, 32).encode()
    return Notify(notify=notify, orcpt=orcpt)


@attrs.frozen(repr=False)
class Receiver(Record):
    """
    What every session of one service shares.

    @ivar accept: spools a transaction; fires with its queue id once it is on disk.
    @ivar starttls: the TLS creator STARTTLS uses, or None (not offered).
    @ivar portal: checks AUTH PLAIN/LOGIN, or None (not offered).
    @ivar reject_bare_newlines: 554 for a bare CR or LF in DATA; otherwise each
        becomes CRLF.
    @ivar binarymime: BINARYMIME offered and BODY=BINARYMIME taken; otherwise
        it is refused with 555 (nothing downstream could send it on).
    """

    hostname: str
    limits: Limits
    domains: frozenset[str]
    allow_from: tuple[Network, ...]
    accept: Callable[[Transaction], Deferred[str]]
    stats: ServiceStats
    log: Logger
    starttls: Any = None
    portal: Portal | None = None
    allow_insecure_auth: bool = False
    reject_bare_newlines: bool = False
    binarymime: bool = False
    rules: RuleSet = attrs.field(factory=RuleSet)
    namespaces: Namespacing = NO_NAMESPACES

    def may_relay(self, client: str) -> bool:
        return in_networks(client, self.allow_from)


@functools.lru_cache(maxsize=1024)
def _client_host(address: IAddress | None) -> str:
    # One client, one name, whichever listener (IPv4 or dual-stack) it came through.
    host = client_address(address)
    return "" if host is None else str(host)


def _lines_fit(text: bytes, limit: int) -> bool:
    """
    Whether every line of C{text} (which ends in CRLF, and whose every CR and
    LF is part of a CRLF) is at most C{limit} octets with its CRLF.

    Window by window: the last CRLF within a line's reach starts the next
    window, so a message costs a C search per C{limit} octets, not a Python
    step per line, nor a copy per line (a regex scan cost 0.6 ms per 10 KiB).
    """
    start, end = 0, len(text)
    while end - start > limit:
        crlf = text.rfind(b"\r\n", start, start + limit)
        if crlf < 0:
            return False
        start = crlf + 2
    return True


# Every octet but a visible ASCII character becomes "?".
_VISIBLE = bytes(c if 32 < c < 127 else ord("?") for c in range(256))


def _printable(text: bytes, limit: int = 255) -> str:
    return text[:limit].translate(_VISIBLE).decode("ascii")


def _hops(text: bytes) -> int:
    """C{Received:} lines in the header of C{text} (which starts with CRLF)."""
    end = text.find(b"\r\n\r\n")
    head = text[: end if end >= 0 else len(text)].lower()
    return head.count(b"\r\nreceived:")


class _LoginCredentials(LOGINCredentials):
    """AUTH LOGIN with the prompts clients expect (Twisted sends "User Name\\0")."""

    def __init__(self) -> None:
        super().__init__()
        self.challenges = [b"Password:", b"Username:"]


@implementer(IOwesReplies)
class Session(smtp.ESMTP):
    """One SMTP connection."""

    noisy = False
    transport: Any

    def __init__(self, receiver: Receiver, secure: bool) -> None:
        challengers: dict[bytes, Any] = {}
        if receiver.portal is not None:
            challengers = {b"PLAIN": PLAINCredentials, b"LOGIN": _LoginCredentials}
        super().__init__(chal=challengers, contextFactory=receiver.starttls)
        self.receiver = receiver
        self.secure = secure
        self.host = receiver.hostname.encode()
        self.timeout = receiver.limits.command_timeout  # type: ignore[assignment]
        self.portal: Any = receiver.portal
        self.user: str | None = None
        self._input = b""
        self._replied_since_look = 0
        self._body: bytearray | None = None
        # The dots the client doubled in the body so far (not the message's own).
        self._body_dots = 0
        self._body_too_big = False
        # A BDAT chunk being read: octets still due (None: none is), what has
        # come (None: it is thrown away), whether it is the last, and the reply
        # refusing it once read.
        self._chunk_left: int | None = None
        self._chunk: bytearray | None = None
        self._chunk_last = False
        self._chunk_refusal: tuple[int, bytes] | None = None
        self._mail: _Mail | None = None
        self._greeted = False
        # EHLO rather than HELO: what the Received line's "with" says.
        self._extended = False
        self._held = False
        self._holds = 0
        self._processing = False
        self._gone = False
        self._closing = False
        self._transactions = 0
        # Closing: may this session still finish one transaction (it had none
        # yet)?  Once it has, only QUIT is still answered as usual.
        self._may_finish_one = False
        self._only_quit = False
        self._refused = False
        self._skip_line = False
        self._paused = False
        self._auth_failures = 0
        self._login: Deferred[Any] | None = None
        self._owed = RepliesOwed()
        self.client = ""

    # Connection ----------------------------------------------------------

    def connectionMade(self) -> None:
        self.client = _client_host(self.transport.getPeer())
        if self.receiver.rules.event_rules:
            self._ruled("connect", super().connectionMade, self._greeted_by_rule)
            return
        super().connectionMade()

    def _greeted_by_rule(self, code: int) -> None:
        """
        A rule's reply was the greeting.  After a 554 (RFC 5321 3.1) the session
        waits for QUIT, every other command 503, until its timeout; after a 220
        (a banner of the test's own) or a 4xx it goes on as after Twisted's.
        """
        self._refused = code == 554
        self.setTimeout(self.timeout)

    def _ruled(
        self,
        stage: str,
        proceed: Callable[[], None],
        refused: Callable[[int], None] | None = None,
        **fields: str,
    ) -> None:
        """
        At C{stage}, the first of the service's rules that fires acts instead
        of C{proceed} (or before it: a delay, a throttle); none fires, it runs.
        C{refused} runs after a rule's reply, which answered instead, with its code.
        """
        # The event's namespace: this RCPT's recipient first, then those given
        # before it, the AUTH user, the client.
        recipients = [fields["rcpt"]] if "rcpt" in fields else []
        recipients += [str(r) for r in self._mail.recipients] if self._mail else []
        namespace = derive_namespace(self.receiver.namespaces, recipients, self.user, self.client)
        fired = self.receiver.rules.check(self.client, namespace, stage=stage, **fields)
        if fired is None:
            proceed()
            return
        reply: tuple[int, str] | None = fired.acts.get("reply")
        answer = None
        if reply is not None:
            code, text = reply

            def answer() -> None:
                self.sendCode(code, text.encode("ascii"))
                if code == 421:  # RFC 5321 3.8: the server closes after a 421
                    self.transport.loseConnection()
                if refused is not None:
                    refused(code)

        done = fired.act(self.transport, proceed, answer)
        if not done.called:
            self._hold(done)

    def greeting(self) -> bytes:
        host: bytes = self.host
        return host + b" ESMTP netd"

    def timeoutConnection(self) -> None:
        if self._only_quit:
            self._only_quit = False
            self._close_if_idle()
            return
        self.sendCode(421, b"4.4.2 " + self.host + b" Error: timeout exceeded")
        self.transport.loseConnection()

    def sendCode(self, code: int, message: bytes = b"") -> None:
        if code not in _NO_STATUS and not _HAS_STATUS.match(message):
            status = _STATUS.get(code, b"%d.0.0" % (code // 100))
            message = status + b" " + message
        super().sendCode(code, message)
        self._close_if_idle()  # stopping: the reply that ends a transaction is the last

    def _send_plain(self, code: int, message: bytes) -> None:
        """A reply without a status code: EHLO and HELO (RFC 2034 exempts them)."""
        smtp.ESMTP.sendCode(self, code, message)

    def sendLine(self, line: bytes) -> None:
        self._replied_since_look += len(line) + 2
        super().sendLine(line)

    def dataReceived(self, data: bytes) -> None:
        self._input += data
        self._process()
        if self._replied_since_look > _UNREAD_LOOK_EVERY and not self._gone:
            # Commands keep coming, replies are not read: cut it, not our memory.
            self._replied_since_look = 0
            cut_if_unread(self.transport)

    def _process(self) -> None:
        if self._processing:
            return  # a reply released the hold from inside the loop below
        self._processing = True
        try:
            while self._input and not self._held and not self._gone:
                if self._body is not None:
                    self._take_data()
                elif self._chunk_left is not None:
                    self._take_chunk()
                elif not self._take_line():
                    break
        finally:
            self._processing = False
        if self._held and len(self._input) > _HOLD_LIMIT and not self._paused:
            self._paused = True
            self.transport.pauseProducing()

    def _take_line(self) -> bool:
        """Handle one command line; False when only part of a line is buffered."""
        if self._skip_line:
            # The rest of a line already answered as too long, dropped up to its
            # end (a CRLF or a bare LF) however many reads it takes.
            end = self._input.find(b"\n")
            if end < 0:
                self._input = b""
                return False
            self._input = self._input[end + 1 :]
            self._skip_line = False
            return True
        end = self._input.find(b"\r\n")
        if end < 0:
            bare = self._input.find(b"\n")
            if bare >= 0:
                # Ended by a bare LF (netcat, a broken script): answered, not
                # left to wait for a CRLF until the command timeout.
                self._input = self._input[bare + 1 :]
                self.sendCode(500, b"5.5.2 Bare LF in a command: end lines with CRLF")
                return True
            if len(self._input) <= _COMMAND_LINE:
                return False
            # One answer for a line too long (RFC 2920 3: one reply a command).
            self._skip_line = True
            self.sendCode(500, b"5.5.6 Line too long")
            return True
        line, self._input = self._input[:end], self._input[end + 2 :]
        if len(line) > _COMMAND_LINE:
            self.sendCode(500, b"5.5.6 Line too long")
        else:
            self.lineReceived(line)
        return True

    def lookupMethod(self, command: bytes) -> Any:
        # Twisted decodes the verb as ASCII unchecked: b"\xff" would raise.
        if not command.isalpha():
            return None
        return super().lookupMethod(command)

    def lineReceived(self, line: bytes) -> None:
        if self._refused:
            # Not a reset of the timeout: commands alone do not keep it open.
            if line.strip().upper() == b"QUIT":
                self.sendCode(221, b"2.0.0 Bye")
                self.transport.loseConnection()
            else:
                self.sendCode(503, b"5.5.1 Bad sequence of commands: this session was refused")
            return
        if self._only_quit and self.mode == smtp.COMMAND and line.upper() != b"QUIT":
            self._only_quit = False
            self._close_if_idle()
            return
        if self.mode == smtp.COMMAND and _BAD_COMMAND.search(line):
            self.resetTimeout()
            self.sendCode(500, b"5.5.2 Bare CR, LF or NUL in a command")
            return
        super().lineReceived(line)

    def _hold(self, pending: Deferred[Any]) -> None:
        """
        Hold further commands until C{pending} (whose callbacks reply) has
        fired, and every other hold taken meanwhile (a rule's delay, then the
        spool write it let through).
        """
        self._held = True
        self._holds += 1

        def release(result: object) -> None:
            self._holds -= 1
            if self._holds:
                return
            self._held = False
            if self._paused and not self._gone:
                self._paused = False
                self.transport.resumeProducing()
            self._close_if_idle()
            if not self._gone:
                self._process()
            if not self._held:
                self._owed.settled()

        pending.addBoth(release)

    def when_replied(self) -> Deferred[None]:
        return self._owed.wait(self._held)

    def close_gracefully(self) -> None:
        """
        netd is stopping, or this service is retired by a reload: a message in
        flight (MAIL given, DATA coming, its spool write) is finished and
        answered first; then, or at once if none is, the client is told 421.

        A session in a transaction, or with none yet (accepted just before a
        reload retired its service, its EHLO and MAIL maybe on their way), may
        finish one, and its QUIT after it is answered 221, as Postfix lets a
        session finish on reload; any other command then gets the 421, and so
        does silence for _QUIT_WAIT seconds (shutdown_grace bounds it all).
        """
        self._closing = True
        if self._mail is None and self._body is None and self._transactions:
            # Its last message is answered or being answered: its QUIT may be on
            # its way.  A client keeping the session for more gets the 421 soon.
            self._await_quit()
        else:
            self._may_finish_one = True
        self._close_if_idle()

    def _await_quit(self) -> None:
        self._may_finish_one, self._only_quit = False, True
        self.setTimeout(_QUIT_WAIT)

    def _close_if_idle(self) -> None:
        if (
            self._closing
            and not (self._may_finish_one or self._only_quit)
            and not (self._gone or self._held or self._mail or self._body)
            and self._chunk_left is None
        ):
            self._gone = True
            self.sendCode(421, b"4.3.2 " + self.host + b" Service shutting down")
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._body = None
        self._chunk = None
        super().connectionLost(reason)
        # Replies still due (a spool write, a password check) go to a closed
        # transport, which drops them; nothing more is read.
        self._gone = True

    # Greetings and the small commands ------------------------------------

    def _greet(self, rest: bytes, extended: bool) -> None:
        self._helo = (rest, self.client.encode())
        self._mail = None
        self._greeted = True
        self._extended = extended

    def do_HELO(self, rest: bytes) -> None:
        if not rest.strip():
            self.sendCode(501, b"5.5.4 HELO needs a domain")
            return
        if self.receiver.rules.event_rules:
            self._ruled("helo", lambda: self._helo_ok(rest), helo=_printable(rest))
            return
        self._helo_ok(rest)

    def _helo_ok(self, rest: bytes) -> None:
        self._greet(rest, extended=False)
        self._send_plain(250, self.host)

    def do_EHLO(self, rest: bytes) -> None:
        if not rest.strip():
            self.sendCode(501, b"5.5.4 EHLO needs a domain")
            return
        if self.receiver.rules.event_rules:
            self._ruled("helo", lambda: self._ehlo_ok(rest), helo=_printable(rest))
            return
        self._ehlo_ok(rest)

    def _ehlo_ok(self, rest: bytes) -> None:
        self._greet(rest, extended=True)
        greeting = self.host + b" Hello " + _printable(rest).encode()
        self._send_plain(250, greeting + b"\n" + self.listExtensions())

    def extensions(self) -> dict[bytes, list[bytes] | None]:
        found: dict[bytes, list[bytes] | None] = {
            b"SIZE": [b"%d" % self.receiver.limits.max_message_size],
            b"8BITMIME": None,
            b"PIPELINING": None,
            b"ENHANCEDSTATUSCODES": None,
            b"SMTPUTF8": None,
            b"CHUNKING": None,
            b"DSN": None,
        }
        if self.receiver.binarymime:
            found[b"BINARYMIME"] = None
        # Not on a TLS listener either (RFC 3207 4.2), whatever twisted's
        # connectionMade made of canStartTLS: that transport starts TLS too.
        if self.canStartTLS and not (self.startedTLS or self.secure):
            found[b"STARTTLS"] = None
        if self.challengers and self._auth_allowed():
            found[b"AUTH"] = list(self.challengers)
        return found

    def _auth_allowed(self) -> bool:
        return self.secure or self.startedTLS or self.receiver.allow_insecure_auth

    def do_NOOP(self, rest: bytes) -> None:
        self.sendCode(250, b"2.0.0 Ok")

    def do_RSET(self, rest: bytes) -> None:
        self._mail = None
        self.sendCode(250, b"2.0.0 Ok")

    def do_VRFY(self, rest: bytes) -> None:
        if not rest.strip():
            self.sendCode(501, b"5.5.4 VRFY needs a name or an address (RFC 5321 4.1.1.6)")
            return
        self.sendCode(252, b"2.5.0 Cannot VRFY; send mail and it will be delivered")

    def do_EXPN(self, rest: bytes) -> None:
        # RFC 5321 3.5.3: recognised, not done (502), rather than unknown (500).
        self.sendCode(502, b"5.5.1 EXPN is not done here")

    def do_HELP(self, rest: bytes) -> None:
        self.sendCode(214, b"2.0.0 See RFC 5321")

    def do_QUIT(self, rest: bytes) -> None:
        self.sendCode(221, b"2.0.0 Bye")
        self.transport.loseConnection()

    def do_UNKNOWN(self, rest: bytes) -> None:
        self.receiver.stats.errors += 1
        self.sendCode(500, b"5.5.2 Command not recognized")

    # The mail transaction ------------------------------------------------

    def _ready_for_mail(self) -> bool:
        if not self._greeted:
            self.sendCode(503, b"5.5.1 Send EHLO or HELO first")
            return False
        return True

    def do_MAIL(self, rest: bytes) -> None:
        if not self._ready_for_mail():
            return
        if self._mail is not None:
            self.sendCode(503, b"5.5.1 Nested MAIL command")
            return
        match = _MAIL_ARGUMENT.match(rest.strip())
        if match is None:
            self.sendCode(501, b"5.5.4 Syntax: MAIL FROM:<address>")
            return
        parameters = self._mail_parameters(match.group("params") or b"")
        if isinstance(parameters, tuple):
            self.sendCode(*parameters)
            return
        try:
            sender = parse_path(
                match.group("path"), False, self.receiver.hostname, utf8=parameters.utf8
            )
        except PathRefused as e:
            self.sendCode(e.code, e.reply)
            return
        if self.receiver.rules.event_rules:
            proceed = functools.partial(self._mail_ok, sender, parameters)
            self._ruled("mail", proceed, mail=_path_text(sender))
            return
        self._mail_ok(sender, parameters)

    def _mail_ok(self, sender: Mailbox | None, parameters: _MailParameters) -> None:
        self._mail = _Mail(sender, parameters)
        self.sendCode(250, b"2.1.0 Sender ok")

    def _mail_parameters(self, params: bytes) -> _MailParameters | tuple[int, bytes]:
        """MAIL FROM's parameters, or the reply refusing them."""
        utf8 = binary = eight_bit = False
        ret = envid = None
        seen: set[bytes] = set()
        for param in params.split():
            key, _, value = param.partition(b"=")
            key = key.upper()
            if key in seen:
                return 501, b"5.5.4 " + _printable(key, 32).encode() + b" given twice"
            seen.add(key)
            if key == b"RET":
                if value.upper() not in (b"FULL", b"HDRS"):
                    return 501, b"5.5.4 RET is FULL or HDRS"
                ret = value.upper().decode()
            elif key == b"ENVID":
                envid = _xtext(value)
                if not envid or len(value) > _MAX_ENVID:
                    return 501, b"5.5.4 ENVID is up to 100 characters of xtext"
            elif key == b"SIZE":
                if not value.isdigit():
                    return 501, b"5.5.4 SIZE takes a number"
                # Twenty digits is beyond any size; int() of thousands raises.
                if len(value) > 20 or int(value) > self.receiver.limits.max_message_size:
                    return 552, b"5.3.4 Message size exceeds fixed maximum message size"
            elif key == b"BODY":
                binary = value.upper() == b"BINARYMIME"
                eight_bit = value.upper() == b"8BITMIME"
                if binary and not self.receiver.binarymime:
                    return 555, b"5.5.4 BODY=BINARYMIME is taken in capture mode only"
                if not binary and value.upper() not in (b"7BIT", b"8BITMIME"):
                    return 501, b"5.5.4 BODY is 7BIT, 8BITMIME or BINARYMIME"
            elif key == b"SMTPUTF8":
                if value or b"=" in param:
                    return 501, b"5.5.4 SMTPUTF8 takes no value"
                utf8 = True
            elif key != b"AUTH":  # RFC 4954 5: AUTH= may be ignored
                return 555, b"5.5.4 Unsupported parameter " + _printable(key, 32).encode()
        return _MailParameters(utf8=utf8, ret=ret, envid=envid, binary=binary, eight_bit=eight_bit)

    def do_RCPT(self, rest: bytes) -> None:
        if self._mail is None:
            self.sendCode(503, b"5.5.1 Need MAIL before RCPT")
            return
        match = _RCPT_ARGUMENT.match(rest.strip())
        if match is None:
            self.sendCode(501, b"5.5.4 Syntax: RCPT TO:<address>")
            return
        notify = _rcpt_parameters(match.group("params") or b"")
        if isinstance(notify, tuple):
            self.sendCode(*notify)
            return
        if len(self._mail.recipients) >= self.receiver.limits.max_recipients:
            self.sendCode(452, b"4.5.3 Too many recipients")
            return
        try:
            recipient = parse_path(
                match.group("path"), True, self.receiver.hostname, utf8=self._mail.parameters.utf8
            )
            assert recipient is not None
            self._check_relay(recipient)
        except PathRefused as e:
            self.receiver.stats.count("smtp_recipients_refused")
            self.sendCode(e.code, e.reply)
            return
        if self.receiver.rules.event_rules:
            sender = _path_text(self._mail.sender)
            accept = functools.partial(self._rcpt_ok, self._mail, recipient, notify)
            self._ruled("rcpt", accept, mail=sender, rcpt=str(recipient))
            return
        self._rcpt_ok(self._mail, recipient, notify)

    def _rcpt_ok(self, mail: _Mail, recipient: Mailbox, notify: Notify) -> None:
        if mail is not self._mail:
            return  # the transaction was reset while a rule delayed this answer
        mail.recipients.append(recipient)
        if notify != Notify():
            mail.dsn[str(recipient)] = notify
        self.sendCode(250, b"2.1.5 Recipient ok")

    def _check_relay(self, recipient: Mailbox) -> None:
        if recipient.domain in self.receiver.domains:
            return
        postmaster = recipient.local.lower() == "postmaster"
        if postmaster and recipient.domain == self.receiver.hostname.lower():
            return  # RFC 5321 4.5.1: accepted from anyone
        if self.user is not None or self.receiver.may_relay(self.client):
            return
        raise PathRefused(550, "5.7.1", f"<{recipient}>: Relay access denied")

    def do_DATA(self, rest: bytes) -> None:
        if rest.strip():
            self.sendCode(501, b"5.5.4 DATA takes no arguments")
            return
        if self._mail is None:
            self.sendCode(503, b"5.5.1 Need MAIL before DATA")
            return
        if not self._mail.recipients:
            self.sendCode(554, b"5.5.1 No valid recipients")
            return
        if self._mail.chunks is not None:
            self.sendCode(503, b"5.5.1 DATA cannot follow BDAT (RFC 3030 2)")
            return
        if self._mail.parameters.binary:
            # RFC 3030 3: the transaction is left as it is, for the client to RSET.
            self.sendCode(503, b"5.5.1 BODY=BINARYMIME comes by BDAT, not DATA (RFC 3030 3)")
            return
        if self.receiver.rules.event_rules:
            self._ruled("data", self._data_ok, mail=_path_text(self._mail.sender))
            return
        self._data_ok()

    def _data_ok(self) -> None:
        self._body = bytearray(b"\r\n")  # the CRLF before a first line of "."
        self._body_dots = 0
        self._body_too_big = False
        self.setTimeout(self.receiver.limits.data_timeout)
        self.sendCode(354, b"End data with <CR><LF>.<CR><LF>")

    def _take_data(self) -> None:
        body = self._body
        assert body is not None
        start = max(len(body) - len(_END_OF_DATA) + 1, 0)
        stuffing_from = max(len(body) - 2, 0)
        body += self._input
        self._input = b""
        self.resetTimeout()
        end = body.find(_END_OF_DATA, start)
        if end < 0:
            # The dots the client doubled are not the message's (RFC 1870 4):
            # counted as they come, so the limit is the same however TCP splits it.
            self._body_dots += body.count(b"\r\n.", stuffing_from)
            # Two bytes of slack: the CRLF sentinel and the final CRLF.
            if len(body) - self._body_dots > self.receiver.limits.max_message_size + 4:
                self._body_too_big = True
                del body[: -len(_END_OF_DATA)]
            return
        self._input = bytes(body[end + len(_END_OF_DATA) :])
        self._body = None
        self.setTimeout(self.receiver.limits.command_timeout)
        mail, self._mail = self._mail, None
        assert mail is not None
        self._transactions += 1
        if self._may_finish_one:
            self._await_quit()
        self._end_of_data(mail, bytes(body[: end + 2]))

    def do_BDAT(self, rest: bytes) -> None:
        match = _BDAT_ARGUMENT.match(rest.strip())
        if match is None:
            # With no size to go by, what follows can only be read as commands.
            self.sendCode(501, b"5.5.4 Syntax: BDAT size [LAST]")
            return
        size = int(match.group("size"))
        refusal = self._chunk_refused(size)
        # A refused chunk is still read (RFC 3030 2), and thrown away.
        self._chunk_left = size
        self._chunk = bytearray() if refusal is None else None
        self._chunk_last = match.group("last") is not None
        self._chunk_refusal = refusal
        self.setTimeout(self.receiver.limits.data_timeout)
        if size == 0:
            self._chunk_read()

    def _chunk_refused(self, size: int) -> tuple[int, bytes] | None:
        mail = self._mail
        if not self._greeted:
            return 503, b"5.5.1 Send EHLO or HELO first"
        if mail is None:
            return 503, b"5.5.1 Need MAIL before BDAT"
        if not mail.recipients:
            return 554, b"5.5.1 No valid recipients"
        so_far = len(mail.chunks) if mail.chunks is not None else 0
        if so_far + size > self.receiver.limits.max_message_size:
            self._mail = None  # the transaction has failed: later chunks get 503
            self.receiver.stats.count("smtp_messages_rejected")
            return 552, b"5.3.4 Message size exceeds fixed maximum message size"
        return None

    def _take_chunk(self) -> None:
        left = self._chunk_left
        assert left is not None
        taken = self._input[:left]
        self._input = self._input[len(taken) :]
        self._chunk_left = left - len(taken)
        if self._chunk is not None:
            self._chunk += taken
        self.resetTimeout()
        if self._chunk_left == 0:
            self._chunk_read()

    def _chunk_read(self) -> None:
        chunk, self._chunk = self._chunk, None
        refusal, self._chunk_refusal = self._chunk_refusal, None
        self._chunk_left = None
        self.setTimeout(self.receiver.limits.command_timeout)
        if refusal is not None:
            self.sendCode(*refusal)
            return
        mail = self._mail
        assert mail is not None and chunk is not None
        proceed = functools.partial(self._chunk_ok, mail, chunk, self._chunk_last)
        if mail.chunks is None and self.receiver.rules.event_rules:

            def refused(code: int) -> None:
                if self._mail is mail:
                    self._mail = None  # a rule answered the first chunk: no message

            self._ruled("data", proceed, refused, mail=_path_text(mail.sender))
            return
        proceed()

    def _chunk_ok(self, mail: _Mail, chunk: bytearray, last: bool) -> None:
        if mail.chunks is None:
            mail.chunks = chunk
        else:
            mail.chunks += chunk
        if not last:
            self.sendCode(250, b"2.0.0 %d octets received" % len(chunk))
            return
        self._mail = None
        self._transactions += 1
        if self._may_finish_one:
            self._await_quit()
        # RFC 5322 text ends with a CRLF, which BDAT does not promise; a
        # binary body is kept as it came.
        binary = mail.parameters.binary
        if binary or mail.chunks.endswith(b"\r\n"):
            end = b""
        else:
            end = b"\n" if mail.chunks.endswith(b"\r") else b"\r\n"
        self._end_of_data(mail, b"\r\n" + bytes(mail.chunks) + end, stuffed=False)

    def _end_of_data(self, mail: _Mail, text: bytes, stuffed: bool = True) -> None:
        """
        Check and spool C{text} (the message after a CRLF sentinel), which
        DATA dot-stuffed (C{stuffed}) and BDAT did not.
        """
        limits = self.receiver.limits
        stats = self.receiver.stats
        if self._body_too_big:
            self._body_too_big = False
            stats.count("smtp_messages_rejected")
            self.sendCode(552, b"5.3.4 Message size exceeds fixed maximum message size")
            return
        # Unstuff first: only the client's CRLF lines were dot-stuffed.
        if stuffed and b"\r\n." in text:
            text = text.replace(b"\r\n.", b"\r\n")
        # Binary octets have no lines: neither bare CR or LF nor line length applies.
        binary = mail.parameters.binary
        if not binary and not text.count(b"\r") == text.count(b"\n") == text.count(b"\r\n"):
            if self.receiver.reject_bare_newlines:
                stats.count("smtp_messages_rejected")
                self.sendCode(554, b"5.6.0 Bare CR or LF in message text (RFC 5321 2.3.8)")
                return
            # As lines of this message, never as an end of DATA here or downstream
            # (the relay dot-stuffs what it sends).
            text = text.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
            stats.count("smtp_bare_newlines_normalised")
        if not binary and not _lines_fit(text, limits.max_line_length):
            stats.count("smtp_messages_rejected")
            self.sendCode(
                554,
                b"5.6.0 Line longer than %d octets (RFC 5321 4.5.3.1.6)" % limits.max_line_length,
            )
            return
        data = text[2:]
        if len(data) > limits.max_message_size:
            stats.count("smtp_messages_rejected")
            self.sendCode(552, b"5.3.4 Message size exceeds fixed maximum message size")
            return
        if _hops(text) >= _MAX_HOPS:
            stats.count("smtp_messages_rejected")
            self.sendCode(554, b"5.4.6 Too many hops: a mail loop?")
            return
        if self.receiver.rules.event_rules:
            proceed = functools.partial(self._spool, mail, data)
            self._ruled("eom", proceed, mail=_path_text(mail.sender), size=str(len(data)))
            return
        self._spool(mail, data)

    def _spool(self, mail: _Mail, data: bytes) -> None:
        transaction = Transaction(
            sender=mail.sender,
            recipients=tuple(mail.recipients),
            data=data,
            helo=_printable(self._helo[0] if self._helo and self._helo[0] else b""),
            client=self.client,
            user=self.user,
            protocol=self._protocol_name(mail.parameters.utf8),
            utf8=mail.parameters.utf8,
            ret=mail.parameters.ret,
            envid=mail.parameters.envid,
            dsn=mail.dsn,
            binary=mail.parameters.binary,
            eight_bit=mail.parameters.eight_bit,
        )
        accepted = self.receiver.accept(transaction)

        def queued(id: str) -> None:
            self.sendCode(250, b"2.0.0 Ok: queued as " + id.encode())

        def failed(failure: Failure) -> None:
            self.receiver.log.failure("spooling a message failed", failure)
            self.receiver.stats.errors += 1
            self.sendCode(451, b"4.3.0 Could not store the message; try again later")

        accepted.addCallbacks(queued, failed)
        self._hold(accepted)

    def _protocol_name(self, utf8: bool) -> str:
        # RFC 3848's "with" keywords, and RFC 6531 4.3's for SMTPUTF8; a HELO
        # session is plain SMTP (RFC 5321 4.4), its suffixes are for ESMTP's.
        if not self._extended:
            return "SMTP"
        tls = "S" if self.secure or self.startedTLS else ""
        return ("UTF8SMTP" if utf8 else "ESMTP") + tls + ("A" if self.user is not None else "")

    # STARTTLS and AUTH ---------------------------------------------------

    def ext_STARTTLS(self, rest: bytes) -> None:
        if self.startedTLS or self.secure:
            self.sendCode(503, b"5.5.1 TLS already active")
        elif not self.canStartTLS:
            self.sendCode(454, b"4.7.0 TLS not available")
        elif rest.strip():
            self.sendCode(501, b"5.5.4 STARTTLS takes no arguments")
        else:
            # Whatever came with the command was sent in plaintext: a man in the
            # middle's commands must not run as if they had come over TLS.
            self._input = b""
            if self.receiver.rules.event_rules:
                self._ruled("starttls", self._starttls_ok)
                return
            self._starttls_ok()

    def _starttls_ok(self) -> None:
        self._input = b""  # sent in plaintext while a rule delayed the answer, too
        self.sendCode(220, b"2.0.0 Ready to start TLS")
        self.transport.startTLS(self.ctx)
        self.startedTLS = True
        # RFC 3207 4.2: forget everything learnt before TLS, a login too: a man
        # in the middle could have logged in with credentials of its own.
        self._greeted = False
        self._mail = None
        self._helo = (None, self.client.encode())
        if self.user is not None:
            self.user = None
            self.authenticated = False
            if self._onLogout is not None:
                self._onLogout()
                self._onLogout = None

    def ext_AUTH(self, rest: bytes) -> None:
        if not self.challengers:
            self.sendCode(502, b"5.5.1 AUTH not available")
        elif not self._auth_allowed():
            self.sendCode(538, b"5.7.11 Encryption required: STARTTLS first")
        elif not self._greeted:
            self.sendCode(503, b"5.5.1 Send EHLO first")
        elif self._mail is not None:
            self.sendCode(503, b"5.5.1 AUTH not allowed during a mail transaction")
        elif not rest.strip():
            # Twisted's ext_AUTH indexes the mechanism unchecked.
            self.sendCode(501, b"5.5.4 Syntax: AUTH mechanism [initial-response]")
        elif self.receiver.rules.event_rules:
            mechanism = _printable(rest.split()[0], 32)
            self._ruled("auth", lambda: smtp.ESMTP.ext_AUTH(self, rest), mechanism=mechanism)
        else:
            super().ext_AUTH(rest)

    def state_AUTH(self, response: bytes | None) -> None:
        self._login = None
        if response == b"=":
            response = b""  # RFC 4954 4: "=" is an empty initial response
        try:
            super().state_AUTH(response)
        except IllegalClientResponse:
            self.mode = smtp.COMMAND
            self.challenger = None
            self.sendCode(501, b"5.5.2 Malformed authentication response")
            return
        if self._login is not None:
            self._hold(self._login)

    def _cbAuthenticated(self, loginInfo: tuple[Any, str, Callable[[], None]]) -> None:
        _, self.user, self._onLogout = loginInfo
        self.authenticated = True
        self.challenger = None

    def _ebAuthenticated(self, reason: Failure) -> None:
        self.challenger = None
        self._auth_failures += 1
        self.receiver.stats.count("smtp_auth_failures")
        super()._ebAuthenticated(reason)
        if self._auth_failures >= _AUTH_FAILURES:
            self.sendCode(421, b"4.7.0 Too many failed authentications")
            self.transport.loseConnection()


class _SessionPortal:
    """Lets the session hold pipelined commands while a password is checked."""

    def __init__(self, portal: Portal, session: Session) -> None:
        self.portal = portal
        self.session = session

    def login(self, credentials: Any, mind: Any, *interfaces: Any) -> Deferred[Any]:
        pending: Deferred[Any] = self.portal.login(credentials, mind, *interfaces)
        self.session._login = pending
        return pending


class SessionFactory(ServerFactory):
    """Builds the sessions of one listener."""

    noisy = False

    def __init__(self, receiver: Receiver, secure: bool) -> None:
        self.receiver = receiver
        self.secure = secure

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        session = Session(self.receiver, self.secure)
        session.factory = self
        if self.receiver.portal is not None:
            session.portal = _SessionPortal(self.receiver.portal, session)
        return session


def _path_text(path: Mailbox | None) -> str:
    """A path as rules match it: the address, or "" for the null sender."""
    return "" if path is None else str(path)


def busy_reply() -> bytes:
    return b"421 4.3.2 Too many connections, try again later\r\n"
