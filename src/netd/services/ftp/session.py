"""
The FTP protocol interpreter of the ftp kind: Twisted's L{ftp.FTP}, extended in
named places.

What Twisted's FTP lacks or gets wrong for a daemon, and where it is fixed here:
  - data connections (L{netd.services.ftp.data}): passive ports from a range,
    accepted only from the control connection's client; PORT/EPRT only to the
    client itself (no FTP bounce); a timeout when the connection never comes;
    TLS on them (PROT P) -- Twisted has no FTPS at all (#5099);
  - C{AUTH TLS}, C{PBSZ}, C{PROT}, C{REST}, C{APPE}, C{OPTS UTF8}, C{EPSV} with
    C{passive_host}, and C{require_tls};
  - C{MLSD}/C{MLST} (RFC 3659, #4819), C{MFMT}, C{HELP}, C{SITE CHMOD}; listings
    built in a thread and sent as a transfer, so a stalled one is cut;
  - transfers: C{sendfile} for downloads on plain connections (L{netd.sendfile}),
    uploads to a temporary name renamed when complete (L{netd.services.ftp.files});
  - login failures are delayed (more for an address that keeps failing) and
    counted; the injected reactor is used throughout (Twisted's FTP calls the
    global one).
"""

from __future__ import annotations

import calendar
import io
import ipaddress
import itertools
import os
import re
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import IO, Any

import attrs
from twisted.cred.portal import Portal
from twisted.internet import error as net_error
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import (
    IDelayedCall,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.protocol import (
    Factory,
    connectionDone,
)
from twisted.logger import Logger
from twisted.protocols import ftp
from twisted.protocols.basic import FileSender
from twisted.python.failure import Failure
from zope.interface import implementer

from netd.connections import cut_if_unread
from netd.events import ServiceStats
from netd.kinds import IOwesReplies, RepliesOwed, RunInThread
from netd.namespaces import NO_NAMESPACES, Namespacing, split_login
from netd.records import Record
from netd.rules import Fired, RuleSet
from netd.sendfile import send_file
from netd.services.ftp.data import (
    DataChannel,
    DataConnection,
    KernelPorts,
    LineEnds,
    ListenPassive,
    NoPassivePort,
    PassivePort,
    plain_host,
)
from netd.services.ftp.files import FACTS, Upload, remove_namespace_folders

__all__ = ["FTPServer", "FailedLogins", "Session", "SessionFactory", "SessionLimits"]

_log = Logger(namespace="netd.ftp")

# Replies Twisted's table does not have.
_AUTH_OK = "234 AUTH TLS successful, negotiating."
_TLS_REQUIRED = "530 TLS is required here: use AUTH TLS first."
_PROT_REQUIRED = "521 Data connections must be protected: send PBSZ 0 and PROT P."
_NO_TLS = "502 TLS is not configured on this server."
_BOUNCE = "504 Data connections go back to the client's own address only."
_LINE_TOO_LONG = "500 Command line too long."
_TOO_MANY_FAILURES = "421 Too many failed logins, closing."
_IDLE = "421 Idle timeout, closing control connection."
# RFC 959 4.2.1's own words for a server going away: a stop, or a reload retiring the service.
_CLOSING = "421 Service not available, closing control connection."
# Seconds a session asked to close during an upload stays open after its reply.
_GOODBYE_AFTER = 1.0
_SLOW_LINE = "421 Command line not complete in time, closing control connection."
_BAD_NAMESPACE = "530 Not a namespace after '@' (letters, digits, '_', '-'): USER name@NAMESPACE."
_NO_NAMESPACE_HOME = "530 Login incorrect: the namespace's folder cannot be opened."


# Path commands Twisted implements, parsing paths itself (see Session._segments).
_TWISTED_PATH_COMMANDS = frozenset({"CWD", "SIZE", "MDTM", "DELE", "RMD", "MKD", "RNFR"})
_DIRECTORY_PARTS = frozenset({"", ".", ".."})
# Commands that move data: a rule's throttle and close: N act on the data
# connection, what it sends (RETR, listings) or what it reads (STOR, APPE).
_TRANSFERS = frozenset({"RETR", "LIST", "NLST", "MLSD", "STOR", "APPE"})

_STAMP = re.compile(r"(\d{14})(\.\d{1,3})?")
_MODE = re.compile(r"[0-7]{1,4}")

_TELNET = bytes([255, 242, 244])
_ABORT = re.compile(rb"(?:^|\n)[\xff\xf2\xf4]*ABOR\r?\n", re.IGNORECASE)


@attrs.frozen(repr=False)
class SessionLimits(Record):
    max_line: int = 2048
    login_delay: float = 1.0
    max_login_failures: int = 3
    data_timeout: float = 30.0
    # Seconds from a command line's first byte to its end: bytes trickled to
    # keep a connection (slowloris) move no idle timer, so this one cuts them.
    line_timeout: float = 30.0


@attrs.define(repr=False)
class FailedLogins(Record):
    """
    Recent failed logins by client address: each one doubles the delay of the
    next answer to that address, so reconnecting does not reset the pace of a
    password guesser.  Forgotten after C{memory} seconds without failure, or at
    a successful login; at most C{size} addresses are remembered.
    """

    clock: Any
    longest: float = 30.0
    memory: float = 600.0
    size: int = 10_000
    _recent: dict[str, tuple[int, float]] = attrs.field(init=False, factory=dict)

    def delay(self, host: str, base: float) -> float:
        """Count a failure from C{host}; the seconds to wait before answering it."""
        now = self.clock.seconds()
        count, last = self._recent.pop(host, (0, now))
        if now - last > self.memory:
            count = 0
        if len(self._recent) >= self.size:
            # Oldest first: dicts keep insertion order and each failure re-inserts.
            del self._recent[next(iter(self._recent))]
        self._recent[host] = (count + 1, now)
        return float(min(base * 2 ** min(count, 16), max(base, self.longest)))

    def forget(self, host: str) -> None:
        self._recent.pop(host, None)


@attrs.define(eq=False, repr=False)
class FTPServer(Record):
    """What the sessions of one service share: options, accounts, TLS, bookkeeping."""

    reactor: Any
    portal: Portal
    stats: ServiceStats
    emit: Callable[..., None]
    run_in_thread: RunInThread
    limits: SessionLimits
    anonymous: bool
    passive_ports: tuple[int, int] | None = None
    passive_host: str | None = None
    kernel_ports: KernelPorts = attrs.field(factory=KernelPorts.of_this_system)
    tls: IOpenSSLServerConnectionCreator | None = None
    require_tls: bool = False
    rules: RuleSet = attrs.field(factory=RuleSet)
    # namespace_from (netd.namespaces); a login names an account of these as it is.
    namespaces: Namespacing = NO_NAMESPACES
    accounts: frozenset[str] = frozenset()
    # The roots clients write to: a namespace's folders there go when it is forgotten.
    writable_roots: tuple[Path, ...] = ()
    listen_passive: ListenPassive = attrs.field(
        default=attrs.Factory(lambda self: partial(PassivePort, self.reactor), takes_self=True)
    )
    sessions: dict[int, Session] = attrs.field(init=False, factory=dict)
    failed_logins: FailedLogins = attrs.field(
        init=False, default=attrs.Factory(lambda self: FailedLogins(self.reactor), takes_self=True)
    )
    _ids: Iterator[int] = attrs.field(init=False, factory=lambda: itertools.count(1))
    _next_port: int = attrs.field(init=False, default=0)

    def factory(
        self, data_tls: IOpenSSLServerConnectionCreator | None, implicit: bool
    ) -> SessionFactory:
        """
        The control-connection factory of one listener.

        @param data_tls: TLS for the data connections of an implicit-TLS listener.
        @param implicit: whether the listener itself is TLS (implicit FTPS).
        """
        return SessionFactory(self, data_tls, implicit)

    def next_id(self) -> int:
        return next(self._ids)

    def passive_candidates(self) -> Iterator[int]:
        """Ports to try for a passive listener, rotating through the range."""
        if self.passive_ports is None:
            yield from self.kernel_ports.candidates()
            return
        low, high = self.passive_ports
        size = high - low + 1
        start = self._next_port
        self._next_port = (self._next_port + 1) % size
        for i in range(size):
            yield low + (start + i) % size

    def list_sessions(self, query: Mapping[str, str]) -> list[dict[str, Any]]:
        return [session.describe() for session in self.sessions.values()]

    def read_login(self, text: str) -> tuple[str, str | None] | None:
        """
        USER's C{text} as the account to check and the login naming a namespace
        (C{user@t42} with the C{login} source), or L{None} when what follows
        its last C{@} is no namespace.  An account's own name (C{anonymous},
        C{bob@example.com} in C{users}) is that account, whatever it holds.
        """
        if not self.namespaces.reads_logins or text in self.accounts:
            return text, None
        split = split_login(text)
        if split is None:
            return None
        name, tag = split
        return name, text if tag is not None else None

    def namespace_of(self, login: str | None, client: str) -> str | None:
        if not self.namespaces.enabled:
            return None
        return self.namespaces.derive(login=login, client=client)

    def forget(self, namespace: str) -> Deferred[dict[str, int]]:
        """
        C{DELETE /api/namespaces/NS}: the namespace's folders in the writable
        roots go, off the reactor thread; its live sessions stay connected.
        """
        removed: Deferred[int] = self.run_in_thread(
            remove_namespace_folders, self.writable_roots, namespace
        )
        return removed.addCallback(lambda count: {"folders": count})


class SessionFactory(Factory):
    """Builds sessions; Twisted's FTP reads its anonymous settings from here."""

    noisy = False
    userAnonymous = "anonymous"
    welcomeMessage = "netd FTP server ready."

    def __init__(
        self, server: FTPServer, data_tls: IOpenSSLServerConnectionCreator | None, implicit: bool
    ) -> None:
        self.server = server
        self.data_tls = data_tls
        self.implicit = implicit
        self.allowAnonymous = server.anonymous

    def buildProtocol(self, addr: Any) -> Session:
        session = Session(self.server, self.data_tls, self.implicit)
        session.factory = self
        return session


@attrs.define(repr=False)
class Transfer(Record):
    direction: str
    path: str
    started: float
    bytes: int = 0


@implementer(IOwesReplies)
class Session(ftp.FTP):
    """One control connection."""

    PUBLIC_COMMANDS = ["FEAT", "QUIT", "AUTH", "PBSZ", "PROT", "SYST", "NOOP", "OPTS", "HELP"]
    _encoding = "utf-8"
    timeOut = None
    transport: Any
    shell: Any
    portal: Any

    def __init__(
        self,
        server: FTPServer,
        data_tls: IOpenSSLServerConnectionCreator | None = None,
        implicit: bool = False,
    ) -> None:
        self.server = server
        self.portal = server.portal
        self.MAX_LENGTH = server.limits.max_line
        self.id = server.next_id()
        self.client = ""
        self.client_host = ""
        self.user: str | None = None
        # Its namespace: the client's until a login names one (netd.namespaces).
        self.namespace: str | None = None
        self._login_namespace: str | None = None
        self.secure = implicit
        self.data_tls = data_tls or server.tls
        # Implicit FTPS protects data from the start, as clients expect.
        self.protect_data = implicit and self.data_tls is not None
        # PBSZ was said: PROT may follow (RFC 4217 9).
        self.buffer_size_set = False
        self.rest = 0
        self.failures = 0
        self.data: DataChannel | None = None
        self.transfer: Transfer | None = None
        self._watchdog: IDelayedCall | None = None
        # What ABOR stops: a transfer, or a transfer command still waiting for its
        # data connection; None when nothing runs.
        self._stop_transfer: Callable[[], object] | None = None
        # A rule's throttle or byte budget (clock, rate, budget) for the data
        # connection of the transfer it fired on, until that connection opens.
        self.data_shaping: tuple[Any, int | None, int | None] | None = None
        self._cleanup: list[Callable[[], Any]] = []
        self._owed = RepliesOwed()
        self._line_deadline: IDelayedCall | None = None
        # The 421 of a session asked to close: said at once, or once the transfer
        # running then is answered; from then on no transfer starts.
        self._goodbye: str | None = None
        self.started = time.time()
        self.workingDirectory: list[str] = []
        self.facts: tuple[str, ...] = FACTS

    # -- connection ------------------------------------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.client_host = plain_host(getattr(peer, "host", ""))
        self.client = f"{self.client_host}:{getattr(peer, 'port', '')}"
        self.namespace = self.server.namespace_of(None, self.client_host)
        self.server.sessions[self.id] = self
        handle = getattr(self.transport, "getHandle", lambda: None)()
        if isinstance(handle, socket.socket):
            # ABOR sent as urgent data (ftplib does) would lose its last byte.
            handle.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
        self.server.stats.count("sessions")
        super().connectionMade()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.server.sessions.pop(self.id, None)
        self.disconnected = True
        if self._line_deadline is not None and self._line_deadline.active():
            self._line_deadline.cancel()
        for cleanup in self._cleanup:
            cleanup()
        self._cleanup = []
        if self.data is not None:
            self.data.close()
            self.data = None
        super().connectionLost(reason)

    def close_gracefully(self) -> None:
        """
        Asked by netd's shutdown or a reload retiring the service: a transfer
        is never cut for it, and the session closes after that transfer, as an
        idle one does at once (left open, it held a stop to its grace and then
        was reset, as pyftpdlib and vsftpd do not): see L{_end} for when.
        """
        self._close(_CLOSING)

    def close_idle(self) -> None:
        """Asked by netd's idle sweep: as a stop, with a 421 that names the timeout."""
        self._close(_IDLE)

    @property
    def closing(self) -> bool:
        """Asked to close (a stop, a reload, the idle sweep): no transfer starts any more."""
        return self._goodbye is not None

    def _close(self, goodbye: str) -> None:
        self._goodbye = goodbye
        if self.transfer is None:
            self._say_goodbye()

    def _say_goodbye(self) -> None:
        if self._goodbye is not None and not (self.disconnected or self.transport.disconnecting):
            self.sendLine(self._goodbye)
            self.transport.loseConnection()

    def sendLine(self, line: str | bytes) -> None:
        if isinstance(line, str):
            line = line.encode("utf-8", "surrogateescape")
        if b"\r" in line or b"\n" in line or b"\0" in line:
            # Only a client's own bytes echoed back (a name, a command) hold these:
            # left in, they would end the reply early and forge the next one (RFC
            # 959 4.2: a reply line ends at its CRLF).
            line = line.replace(b"\r", b"?").replace(b"\n", b"?").replace(b"\0", b"?")
        self.transport.write(line + b"\r\n")

    def lineLengthExceeded(self, line: bytes) -> None:
        self.server.stats.count("bad_commands")
        self.sendLine(_LINE_TOO_LONG)
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.disconnected or self.transport is None or self.transport.disconnecting:
            # Closing (after a 421): lines still buffered from the client are not run.
            return
        # While a command runs, lines wait in the buffer (Twisted pauses the whole
        # transport instead, and then never sees the client go away mid-transfer).
        if self.paused and len(self._buffer) + len(data) > self.MAX_LENGTH * 4:
            self.lineLengthExceeded(data)
            return
        stop = self._stop_transfer
        if stop is not None and _ABORT.search(self._buffer[-8:] + data):
            # ABOR cuts the transfer now (426), and is answered in its turn after.
            self.server.stats.count("aborts")
            self._stop_transfer = None
            stop()
        waiting = len(self._buffer) + len(data)
        super().dataReceived(data)
        if self.disconnected:
            return
        if cut_if_unread(self.transport):
            return  # commands keep coming, replies are not read: not our memory
        if not self.paused:
            self._owed.settled()
        # The buffer shrinks only by whole lines taken from its front.
        self._watch_line(line_ended=len(self._buffer) < waiting)

    def _watch_line(self, line_ended: bool) -> None:
        """
        Time the line being received, from its first byte; not one a running
        command holds.  A read that ends a line and begins the next starts the
        clock again: a client pipelining commands, its reads ending mid-line,
        is not a slow one.
        """
        receiving = bool(self._buffer) and not self.paused
        deadline = self._line_deadline
        if not receiving:
            if deadline is not None:
                if deadline.active():
                    deadline.cancel()
                self._line_deadline = None
        elif deadline is None:
            self._line_deadline = self.server.reactor.callLater(
                self.server.limits.line_timeout, self._line_too_slow
            )
        elif line_ended:
            deadline.reset(self.server.limits.line_timeout)

    def _line_too_slow(self) -> None:
        self._line_deadline = None
        self.server.stats.count("line_timeouts")
        self.sendLine(_SLOW_LINE)
        self.transport.loseConnection()

    def when_replied(self) -> Deferred[None]:
        # Lines after a command still running wait in the buffer, and run once
        # it is answered (dataReceived above): only that waits.
        return self._owed.wait(self.paused)

    def lineReceived(self, line: bytes) -> None:
        # Telnet "interrupt process" and "synch" bytes clients send before ABOR.
        text = line.lstrip(_TELNET).decode("utf-8", "surrogateescape")
        command, _, argument = text.partition(" ")
        arguments = (argument,) if _ else ()
        done = maybeDeferred(self.processCommand, command, *arguments)
        done.addCallbacks(self._answer, self._failed, errbackArgs=(command,))
        done.addErrback(lambda f: _log.failure("FTP command {line!r} failed", f, line=text))
        # Not done.called: a Deferred that fired but waits on another (a login
        # check answered at once, then held back by the failed-login delay) is
        # "called" too, and the next lines would run before its answer.
        answered: list[object] = []
        done.addBoth(answered.append)
        if not answered:
            self.paused = True
            done.addBoth(self._resume)

    def _resume(self, result: object) -> None:
        # Fired from outside lineReceived (a login check, a transfer's end).
        self.paused = False
        if not self.disconnected and self.transport is not None:
            self.server.reactor.callLater(0, self.dataReceived, b"")

    def _answer(self, result: Any) -> None:
        if self.disconnected or self.transport is None:
            return
        if isinstance(result, tuple):
            self.reply(*result)
        elif isinstance(result, str) and result[:1].isdigit() and " " in result[:5]:
            self.sendLine(result)
        elif result is not None:
            self.reply(result)

    def _failed(self, reason: Failure, command: str) -> None:
        if self.disconnected or self.transport is None:
            return
        if reason.check(ftp.FTPCmdError):
            if reason.check(ftp.CmdNotImplementedError):
                self.server.stats.count("bad_commands")
            reply = _response(reason.value)
            # A repr: the reply may hold the client's bytes that are not UTF-8.
            _log.info(
                "ftp session {session} {client}: {command} refused: {reply!r}",
                session=self.id,
                client=self.client,
                command=command.upper(),
                reply=reply,
            )
            self.sendLine(reply)
        elif reason.check(TypeError):
            # RFC 959 4.2: 501 is a syntax error in the arguments.
            self.reply(ftp.SYNTAX_ERR_IN_ARGS, f"{command.upper()} needs other arguments.")
        else:
            _log.failure("FTP command {command} failed", reason, command=command)
            self.reply(ftp.REQ_ACTN_NOT_TAKEN, "internal server error")

    def processCommand(self, command: str, *params: str) -> Any:
        if self._goodbye is not None and command.upper() in _TRANSFERS:
            # Asked to close during a transfer, and a client starting another
            # after that one's reply: not served to its end.
            self._say_goodbye()
            return None
        rules = self.server.rules
        if rules.event_rules:
            path = params[0] if params else ""
            fired = rules.check(
                self.client_host, self.namespace, command=command.upper(), path=path
            )
            if fired is not None:
                return self._ruled(fired, command, params)
        return self._process(command, *params)

    def _ruled(self, fired: Fired, command: str, params: tuple[str, ...]) -> Deferred[Any]:
        """A rule's answer to a command (C{reply}), or the usual one after its acts."""
        result: Deferred[Any] = Deferred()
        reply: tuple[int, str] | None = fired.acts.get("reply")

        def answer() -> None:
            assert reply is not None
            code, text = reply
            # Sent as given, a bare code too (RFC 959 4.2: the code, a space,
            # then text that may be none): Twisted's reply() looks codes up.
            self.sendLine(f"{code} {text}")
            if code == 421:  # RFC 959 4.2.1: "closing control connection"
                self.transport.loseConnection()
            result.callback(None)

        def proceed() -> None:
            maybeDeferred(self._process, command, *params).chainDeferred(result)

        if command.upper() in _TRANSFERS:
            fired.act(_TransferActs(self), proceed, answer if reply is not None else None)
            result.addBoth(self._unshape_data)
        else:
            fired.act(self.transport, proceed, answer if reply is not None else None)
        return result

    def _unshape_data(self, result: object) -> object:
        # A transfer refused before its data connection (a 550) shapes no later one.
        self.data_shaping = None
        return result

    def _process(self, command: str, *params: str) -> Any:
        upper = command.upper()
        if upper in ("USER", "PASS") and self.server.require_tls and not self.secure:
            return _TLS_REQUIRED
        if upper in _TWISTED_PATH_COMMANDS and params and self.state == self.AUTHED:
            self._segments(params[0])  # the checks of ours that Twisted's commands lack
        return super().processCommand(command, *params)

    def describe(self) -> dict[str, Any]:
        transfer = None
        if self.transfer is not None:
            transfer = attrs.asdict(self.transfer)
        return {
            "id": self.id,
            "client": self.client,
            "user": self.user,
            "cwd": "/" + "/".join(self.workingDirectory),
            "tls": self.secure,
            "data_tls": self.protect_data,
            "since": self.started,
            "transfer": transfer,
            **self._stamp(),
        }

    def _stamp(self, namespace: str | None = None) -> dict[str, str]:
        """C{namespace} (default: the session's) as events and views carry it."""
        found = namespace or self.namespace
        return {"namespace": found} if found is not None else {}

    # -- login -----------------------------------------------------------------------

    def ftp_USER(self, username: str) -> Any:
        read = self.server.read_login(username)
        if read is None:
            self.server.stats.count("bad_namespaces")
            return _BAD_NAMESPACE
        name, login = read
        self._login_namespace = self.server.namespace_of(login, self.client_host)
        return super().ftp_USER(name)

    def ftp_PASS(self, password: str) -> Deferred[Any]:
        if self.state != self.INAUTH:
            # Twisted's state machine hands PASS on once logged in, to a method
            # that expects USER just before.
            return fail(ftp.BadCmdSequenceError("already logged in"))
        user = getattr(self, "_user", "")
        namespace = self._login_namespace
        logged_in: Deferred[Any] = super().ftp_PASS(password)

        def welcome(result: Any) -> Any:
            self.user = user
            self.namespace = namespace
            self.server.failed_logins.forget(self.client_host)
            self.server.stats.count("logins")
            self.server.emit(
                "ftp.login",
                client=self.client,
                user=user,
                session=self.id,
                tls=self.secure,
                **self._stamp(),
            )
            return result

        def success(result: Any) -> Any:
            if namespace is None:
                return welcome(result)
            # The session is rooted in the namespace's folder of its root, made
            # at its first login: two tests never see each other's files.
            made = self.server.run_in_thread(self.shell.for_namespace, namespace)
            return made.addCallbacks(lambda shell: welcome(self._rooted(shell, result)), no_home)

        def no_home(reason: Failure) -> str:
            # The operator's to fix (a root netd cannot write to, a link): a line, no traceback.
            _log.warn(
                "ftp session {session} {client}: no folder for namespace {namespace}: {why}",
                session=self.id,
                client=self.client,
                namespace=namespace,
                why=reason.getErrorMessage(),
            )
            self.state = self.UNAUTH
            self.shell = None
            return _NO_NAMESPACE_HOME

        def failure(reason: Failure) -> Deferred[Any]:
            # Every failed PASS takes this path, whatever made it fail: one that
            # answered at once would let a guesser skip the delay and the limit.
            self.state = self.UNAUTH
            if not reason.check(ftp.AuthorizationError):
                _log.failure("FTP login check failed", reason)
                reason = Failure(ftp.AuthorizationError())
            self.failures += 1
            self.server.stats.count("login_failures")
            self.server.emit(
                "ftp.login_failed",
                client=self.client,
                user=user,
                session=self.id,
                **self._stamp(namespace),
            )
            delayed: Deferred[Any] = Deferred()

            def answer() -> None:
                if self.failures >= self.server.limits.max_login_failures:
                    if not self.disconnected:
                        self.sendLine(_TOO_MANY_FAILURES)
                        self.transport.loseConnection()
                    delayed.callback(None)
                else:
                    delayed.errback(reason)

            delay = self.server.failed_logins.delay(
                self.client_host, self.server.limits.login_delay
            )
            call = self.server.reactor.callLater(delay, answer)
            self._guard(lambda: call.cancel() if call.active() else None, delayed)
            return delayed

        return logged_in.addCallbacks(success, failure)

    def _rooted(self, shell: Any, result: Any) -> Any:
        self.shell = shell
        return result

    # -- TLS (RFC 4217) --------------------------------------------------------------

    def ftp_AUTH(self, mechanism: str) -> Any:
        if self.server.tls is None:
            return _NO_TLS
        if mechanism.upper() not in ("TLS", "TLS-C", "SSL"):
            return fail(ftp.CmdNotImplementedForArgError(mechanism))
        if self.secure:
            return fail(ftp.BadCmdSequenceError("TLS is already on"))
        self.sendLine(_AUTH_OK)
        # Anything pipelined after AUTH arrived in plaintext: it must not run as if
        # it had come through TLS (the STARTTLS injection of CVE-2011-0411).
        self.clearLineBuffer()
        self.transport.startTLS(self.server.tls)
        self.secure = True
        self.server.stats.count("tls_upgrades")
        return None

    def ftp_PBSZ(self, size: str) -> Any:
        if not self.secure:
            return fail(ftp.BadCmdSequenceError("PBSZ needs AUTH TLS first"))
        if not size.isdigit():  # RFC 2228 3: a decimal integer
            return fail(ftp.CmdArgSyntaxError(size))
        self.buffer_size_set = True
        return "200 PBSZ=0"

    def ftp_CDUP(self) -> Any:
        if not self.workingDirectory:
            # At the root already: it stays there, as vsftpd and pyftpdlib answer
            # (Twisted's refuses the path above the root, 550).
            return (ftp.REQ_FILE_ACTN_COMPLETED_OK,)
        return super().ftp_CDUP()

    def ftp_PROT(self, level: str) -> Any:
        if not self.buffer_size_set:
            # RFC 4217 9, RFC 2228: PROT comes after PBSZ.
            return fail(ftp.BadCmdSequenceError("PROT needs PBSZ first"))
        level = level.upper()
        if level == "P":
            if not self.secure or self.data_tls is None:
                return fail(ftp.BadCmdSequenceError("PROT P needs AUTH TLS first"))
            self._protect(True)
            return "200 Data connections will be protected."
        if level == "C":
            if self.server.require_tls:
                return "534 Clear data connections are refused here."
            self._protect(False)
            return "200 Data connections will be in the clear."
        return "504 Only PROT C and PROT P are offered."

    def ftp_FEAT(self) -> None:
        chosen = "".join(f"{fact}{'*' if fact in self.facts else ''};" for fact in FACTS)
        features = [
            "EPRT",
            "EPSV",
            "MDTM",
            "MFMT",
            f"MLST {chosen}",
            "PASV",
            "REST STREAM",
            "SIZE",
            "TVFS",
            "TYPE A;I",
            "UTF8",
        ]
        if self.server.tls is not None:
            features[:0] = ["AUTH TLS", "PBSZ", "PROT"]
        self.sendLine("211-Features:")
        for feature in features:
            self.sendLine(" " + feature)
        self.sendLine("211 End")

    def ftp_OPTS(self, option: str) -> Any:
        words = option.split(None, 1)
        if [w.upper() for w in words] == ["UTF8", "ON"]:
            return "200 UTF8 is always on."
        if words and words[0].upper() == "MLST":
            # RFC 3659 section 7.9: the facts MLST and MLSD give from now on.
            wanted = (words[1] if len(words) > 1 else "").lower().split(";")
            self.facts = tuple(fact for fact in FACTS if fact in wanted)
            return "200 MLST OPTS " + "".join(f"{fact};" for fact in self.facts)
        return (ftp.OPTS_NOT_IMPLEMENTED, option)

    def ftp_HELP(self, topic: str = "") -> str:
        if topic.upper() == "SITE":
            return "214 SITE CHMOD <octal mode> <path>; SITE HELP."
        if topic:
            command = topic.upper()
            known = getattr(self, "ftp_" + command, None) is not None
            return f"214 {command} is {'' if known else 'not '}a command of this server."
        commands = sorted(name[4:] for name in dir(self) if name.startswith("ftp_"))
        self.sendLine("214-The following commands are recognized:")
        for start in range(0, len(commands), 10):
            self.sendLine(" " + " ".join(commands[start : start + 10]))
        return "214 Help OK."

    # -- data connections ------------------------------------------------------------

    def _protect(self, protected: bool) -> None:
        # A data channel opened before the change (PASV, then PROT P) was set up
        # for the old level: drop it, so the client must ask for a new one.
        if protected != self.protect_data and self.data is not None:
            self.data.close()
            self.data = None
        self.protect_data = protected

    def _new_channel(self) -> DataChannel:
        if self.data is not None:
            self.data.close()
        tls = self.data_tls if self.protect_data else None
        self.data = DataChannel(self, self.client_host, tls)
        return self.data

    def data_closed(self, channel: DataChannel) -> None:
        if self.data is channel:
            self.data = None
            if self.transfer is None:
                # A download's connection left open at a stop after its 226
                # (L{DataConnection.finish}): the client read it to the end.
                self._say_goodbye()

    def _passive(self) -> int:
        channel = self._new_channel()
        try:
            return channel.listen(self.transport.getHost().host)
        except NoPassivePort:
            channel.close()
            self.data = None
            self.server.stats.count("passive_exhausted")
            raise

    def ftp_TYPE(self, type: str) -> Any:
        if not type.strip():
            # Twisted answers an empty type with a 500 whose text it forgets to
            # fill in (a TypeError, no reply at all: found by make stress's fuzz).
            return (ftp.SYNTAX_ERR_IN_ARGS, "TYPE needs a type code")
        # "A N" (non-print, RFC 959 5.1's minimum) is A, and "L 8" (RFC 1123
        # 4.1.2.2: a MUST) is I; Twisted refuses both.
        words = type.upper().split()
        if words in (["A", "N"], ["L", "8"]):
            type = words[0].replace("L", "I")
        return super().ftp_TYPE(type)

    def ftp_PWD(self) -> Any:
        # RFC 959 Appendix II: a quote in a 257 reply's name is doubled; Twisted's is not,
        # so a client reads "/q"x" as "/q".
        return (ftp.PWD_REPLY, ("/" + "/".join(self.workingDirectory)).replace('"', '""'))

    def ftp_MKD(self, path: str) -> Deferred[Any]:
        made: Deferred[Any] = super().ftp_MKD(path)
        return made.addCallback(lambda reply: (reply[0], reply[1].replace('"', '""')))

    def ftp_SIZE(self, path: str) -> Deferred[Any]:
        # RFC 3659 4: the octets a RETR would send now, which in TYPE A depend on
        # every line end; as pyftpdlib, SIZE is refused there rather than guessed.
        if not self.binary:
            return succeed("550 SIZE not allowed in TYPE A.")
        segments = self._segments(path)

        def size(found: tuple[int, bool]) -> str:
            length, directory = found
            if directory:
                return "550 SIZE of a directory: not a file."
            return f"213 {length}"

        stated: Deferred[Any] = self.shell.stat(segments, ("size", "directory"))
        return stated.addCallback(size)

    def ftp_PASV(self) -> Any:
        if self._epsvAll:
            return fail(ftp.BadCmdSequenceError("may not send PASV after EPSV ALL"))
        local = plain_host(self.transport.getHost().host)
        if ":" in local:
            # PASV can only name an IPv4 address; the data port listens on the
            # control connection's address, so IPv6 clients use EPSV.
            return fail(ftp.PASVIPv6NotImplementedError())
        host = self.server.passive_host or local
        try:
            port = self._passive()
        except NoPassivePort:
            return (ftp.CANT_OPEN_DATA_CNX,)
        return ftp.ENTERING_PASV_MODE, ftp.encodeHostPort(host, port)

    def ftp_EPSV(self, protocol: str = "") -> Any:
        if protocol.upper() == "ALL":
            self._epsvAll = True
            return ftp.EPSV_ALL_OK
        if protocol:
            self._validateNetworkProtocol(protocol)
        try:
            port = self._passive()
        except NoPassivePort:
            return (ftp.CANT_OPEN_DATA_CNX,)
        return ftp.ENTERING_EPSV_MODE, port

    def _active(self, host: str, port: int) -> Any:
        if self._epsvAll:
            return fail(ftp.BadCmdSequenceError("may not send PORT after EPSV ALL"))
        if plain_host(host) != self.client_host or not 1024 <= port <= 65535:
            self.server.stats.count("bounce_refused")
            self.server.emit(
                "ftp.bounce_refused", client=self.client, target=f"{host}:{port}", **self._stamp()
            )
            return _BOUNCE
        self._new_channel().connect(host, port)
        return ftp.ENTERING_PORT_MODE

    def ftp_PORT(self, address: str) -> Any:
        try:
            numbers = [int(n) for n in address.split(",")]
            if len(numbers) != 6 or not all(0 <= n <= 255 for n in numbers):
                raise ValueError(address)
        except ValueError:
            return fail(ftp.CmdArgSyntaxError(address))
        host = ".".join(map(str, numbers[:4]))
        return self._active(host, numbers[4] << 8 | numbers[5])

    def ftp_EPRT(self, address: str) -> Any:
        try:
            protocol, host, port = ftp.decodeExtendedAddress(address)
            ipaddress.ip_address(host)
        except (ValueError, IndexError):
            return fail(ftp.CmdArgSyntaxError(address))
        if protocol:
            self._validateNetworkProtocol(protocol)
        return self._active(host, port)

    def _with_data(self, work: Callable[[DataConnection], Deferred[Any]]) -> Deferred[Any]:
        """Wait for the data connection, run C{work}, then answer for the transfer."""
        if self.server.require_tls and not self.protect_data:
            return succeed(_PROT_REQUIRED)
        if self.data is None:
            return fail(ftp.BadCmdSequenceError("PASV, EPSV, PORT or EPRT first"))
        channel = self.data
        aborted: list[bool] = []

        def abort_waiting() -> None:
            # RFC 959 4.1.3: ABOR ends the command in progress with 426 even
            # before its data connection is made, not when data_timeout runs out.
            aborted.append(True)
            channel.close()

        if channel.connection is None:
            self._abortable(abort_waiting)

        def no_connection(reason: Failure) -> Any:
            self._stop_transfer = None
            if channel is self.data:
                self.data = None
            if aborted:
                return (ftp.CNX_CLOSED_TXFR_ABORTED,)
            self.server.stats.count(
                "data_timeouts" if reason.check(net_error.TimeoutError) else "data_failures"
            )
            return (ftp.CANT_OPEN_DATA_CNX,)

        def opened(connection: DataConnection) -> Deferred[Any]:
            self._stop_transfer = None  # the transfer's own stop, from _begin on
            shaping, self.data_shaping = self.data_shaping, None
            if shaping is not None:
                connection.shape(*shaping)
            self.reply(ftp.DATA_CNX_ALREADY_OPEN_START_XFR)
            return work(connection)

        return channel.ready().addCallbacks(opened, no_connection)

    # -- listings --------------------------------------------------------------------

    def ftp_LIST(self, path: str = "") -> Deferred[Any]:
        self._take_rest()  # REST is for the transfer right after it (RFC 3659 5)
        if path.startswith("-"):
            path = path.partition(" ")[2]
        return self._listing(path, names_only=False)

    def ftp_NLST(self, path: str = "") -> Deferred[Any]:
        self._take_rest()
        if path.startswith("-"):
            path = path.partition(" ")[2]
        return self._listing(path, names_only=True)

    def _segments(self, path: str) -> list[str]:
        """
        C{path} from the working directory; commands run in maybeDeferred, so raising
        an L{ftp.FTPCmdError} here answers the client.

        Twisted's C{toSegments} drops a C{/}, C{.} or C{..} after a name, which
        would make C{RETR file/} serve C{file}: a name used that way must be a
        directory, as in POSIX path resolution.
        """
        try:
            segments: list[str] = ftp.toSegments(self.workingDirectory, path)
        except ftp.InvalidPath:
            raise ftp.FileNotFoundError(path) from None
        walked = [] if path.startswith("/") else list(self.workingDirectory)
        named = False
        for part in path.split("/"):
            if part in _DIRECTORY_PARTS:
                if named:
                    self.shell.require_directory(walked)
                if part == ".." and walked:
                    walked.pop()
                named = False
            else:
                walked.append(part)
                named = True
        return segments

    def _listing(self, path: str, names_only: bool) -> Deferred[Any]:
        segments = self._segments(path)
        built = self.server.run_in_thread(_joined, self.shell.listing, segments, not names_only)
        return built.addCallback(self._send_listing, segments)

    def ftp_MLSD(self, path: str = "") -> Deferred[Any]:
        self._take_rest()
        segments = self._segments(path)
        built = self.server.run_in_thread(_joined, self.shell.facts, segments, self.facts, True)
        return built.addCallback(self._send_listing, segments)

    def ftp_MLST(self, path: str = "") -> Deferred[Any]:
        segments = self._segments(path)

        def reply(lines: list[bytes]) -> str | None:
            if self.disconnected:
                return None
            self.sendLine("250-Listing /" + "/".join(segments))
            self.sendLine(b" " + lines[0])
            return "250 End"

        found = self.server.run_in_thread(self.shell.facts, segments, self.facts, False)
        return found.addCallback(reply)

    def _send_listing(self, listing: bytes, segments: list[str]) -> Deferred[Any]:
        """
        Send a listing built off the reactor thread (a missing path was 550 before
        any data connection was taken), as a transfer: cut if it stalls.
        """

        def work(connection: DataConnection) -> Deferred[Any]:
            transport = connection.transport
            transfer = self._begin("listing", segments, connection, transport.abortConnection)

            def counted(chunk: bytes) -> bytes:
                self._account(len(chunk), False)
                return chunk

            sender = FileSender()
            sent: Deferred[Any] = sender.beginFileTransfer(io.BytesIO(listing), transport, counted)

            def stop_sending(clean: bool) -> bool:
                # Gone before the last chunk (a stall cut, a reset): whether the
                # transport stops its producer then or not, the listing ends here.
                if not sent.called:
                    sender.stopProducing()
                return clean

            connection.closed.addCallback(stop_sending)

            def done(_: object) -> Deferred[bool]:
                return connection.finish()

            def failed(reason: Failure) -> bool:
                transport.abortConnection()
                return False

            return sent.addCallbacks(done, failed).addCallbacks(
                lambda clean: self._finished(transfer, clean),
                lambda reason: self._finished(transfer, False),
            )

        return self._with_data(work)

    # -- file facts (RFC 3659) and SITE ----------------------------------------------

    def ftp_MFMT(self, argument: str) -> Deferred[Any]:
        stamp, _, path = argument.partition(" ")
        when = _timestamp(stamp)
        if when is None or not path:
            return fail(ftp.CmdArgSyntaxError(argument))
        segments = self._segments(path)
        changed = self.server.run_in_thread(self.shell.set_modified, segments, when)
        return changed.addCallback(lambda _: f"213 Modify={stamp}; {path}")

    def ftp_SITE(self, argument: str) -> Any:
        command, _, rest = argument.partition(" ")
        command = command.upper()
        if command == "HELP":
            return self.ftp_HELP("SITE")
        if command != "CHMOD":
            return fail(ftp.CmdNotImplementedForArgError(command))
        mode_text, _, path = rest.strip().partition(" ")
        if _MODE.fullmatch(mode_text) is None or not path:
            return fail(ftp.CmdArgSyntaxError(argument))
        mode = int(mode_text, 8)
        if mode & ~0o777:
            return "550 SITE CHMOD sets permission bits only (no setuid, setgid or sticky)."
        segments = self._segments(path)
        changed = self.server.run_in_thread(self.shell.change_mode, segments, mode)
        return changed.addCallback(lambda granted: f"200 Mode of {path} set to {granted:04o}.")

    # -- transfers -------------------------------------------------------------------

    def ftp_REST(self, offset: str) -> Any:
        try:
            value = int(offset)
            if not 0 <= value < 2**63:  # beyond what a file offset can be
                raise ValueError(offset)
        except ValueError:
            return fail(ftp.CmdArgSyntaxError(offset))
        self.rest = value
        return f"350 Restarting at {value}. Send STOR or RETR."

    def _take_rest(self) -> int:
        offset, self.rest = self.rest, 0
        return offset

    def _account(self, count: int, incoming: bool) -> None:
        if self.transfer is not None:
            self.transfer.bytes += count
        # Data bytes count for the control connection too: the idle sweep then
        # leaves a session alone while its transfer moves.
        tracked = self.transport
        if incoming and hasattr(tracked, "bytes_in"):
            tracked.bytes_in += count
        elif hasattr(tracked, "bytes_out"):
            tracked.bytes_out += count

    def _begin(
        self,
        direction: str,
        segments: list[str],
        connection: DataConnection,
        stall: Callable[[], object],
    ) -> Transfer:
        """
        A transfer starts on C{connection}; C{stall} ends it if no byte moves
        for C{data_timeout} while netd is ready to move one.
        """
        transfer = Transfer(direction, "/" + "/".join(segments), time.time())
        self.transfer = transfer
        reactor = self.server.reactor
        timeout = self.server.limits.data_timeout
        seen = 0
        moved = reactor.seconds()
        queued = connection.sent_not_taken()

        def check() -> None:
            nonlocal seen, moved, queued
            if self.transfer is not transfer or self.disconnected:
                return
            now = reactor.seconds()
            in_kernel = connection.sent_not_taken()
            taken = in_kernel is not None and queued is not None and in_kernel < queued
            if transfer.bytes != seen or taken:
                seen, moved = transfer.bytes, now
            queued = in_kernel
            # A rule's throttle holding the bytes back is netd's pause, not the
            # client's: its data_timeout runs from when netd is ready again.
            waiting_since = max(moved, now + connection.paced_for())
            if now - waiting_since >= timeout:
                self.server.stats.count("data_stalls")
                stall()
                return
            self._watchdog = reactor.callLater(waiting_since + timeout - now, check)

        self._watchdog = reactor.callLater(timeout, check)
        self._abortable(stall)
        return transfer

    def _abortable(self, stop: Callable[[], object]) -> None:
        """
        C{stop} is what ABOR stops from now on.  An ABOR read while the command
        got ready (its file opened in a thread) waits in the buffer: it stops it
        at once.
        """
        self._stop_transfer = stop
        if _ABORT.search(self._buffer):
            self.server.stats.count("aborts")
            self._stop_transfer = None
            stop()

    def _end(self, transfer: Transfer, ok: bool) -> None:
        self.transfer = None
        self._stop_transfer = None
        if self._goodbye is not None and transfer.direction == "upload":
            # A moment after the reply, for a client that is done to say QUIT
            # by itself.
            self.server.reactor.callLater(_GOODBYE_AFTER, self._say_goodbye)
        elif self._goodbye is not None and self.data is None:
            # A download or a listing whose data connection is gone: the
            # client closed it, having read it all (TLS: after netd's
            # close_notify), or it was cut.  After the reply, which follows.
            self.server.reactor.callLater(0, self._say_goodbye)
        # Else the data connection is left half-closed (DataConnection.finish):
        # the 226 comes once the last byte is in the kernel, and a client may
        # still have megabytes to read from the socket buffers; lftp drops
        # them at a 421, however late it comes.  The 421 waits for the client
        # to close it (data_closed), or to start another transfer; the idle
        # sweep or the stop's grace ends a session whose client does neither.
        if self._watchdog is not None and self._watchdog.active():
            self._watchdog.cancel()
        self._watchdog = None
        stats = self.server.stats
        stats.count(f"{transfer.direction}s")
        stats.count(f"{transfer.direction}_bytes", transfer.bytes)
        if not ok:
            stats.count("transfers_failed")
        self.server.emit(
            "ftp.transfer",
            session=self.id,
            client=self.client,
            user=self.user,
            direction=transfer.direction,
            path=transfer.path,
            bytes=transfer.bytes,
            seconds=round(time.time() - transfer.started, 6),
            ok=ok,
            **self._stamp(),
        )

    def ftp_RETR(self, path: str) -> Deferred[Any]:
        offset = self._take_rest()
        segments = self._segments(path)
        opened = self.server.run_in_thread(_open_with_size, self.shell, segments)
        return opened.addCallback(self._send_file, segments, offset)

    def _send_file(
        self, opened: tuple[IO[bytes], int], segments: list[str], offset: int
    ) -> Deferred[Any]:
        source, size = opened
        if offset > size:
            source.close()
            return succeed("554 REST offset is beyond the end of the file.")

        def work(connection: DataConnection) -> Deferred[Any]:
            transport = connection.transport
            transfer = self._begin("download", segments, connection, transport.abortConnection)
            sent = send_file(
                transport,
                source,
                offset,
                progress=lambda n: self._account(n, False),
                transform=None if self.binary else _ToCRLF(),
            )

            def done(_: object) -> Deferred[bool]:
                return connection.finish()

            def failed(reason: Failure) -> bool:
                if not reason.check(net_error.ConnectionLost):
                    transport.abortConnection()  # what was sent cannot be completed
                return False

            return sent.addCallbacks(done, failed).addCallbacks(
                lambda clean: self._finished(transfer, clean),
                lambda reason: self._finished(transfer, False),
            )

        return self._with_data(work).addBoth(lambda result: _closing(source, result))

    def _guard(self, cleanup: Callable[[], object], until: Deferred[Any]) -> None:
        """Run C{cleanup} if the session ends before C{until} fires."""
        self._cleanup.append(cleanup)

        def forget(result: object) -> object:
            if cleanup in self._cleanup:
                self._cleanup.remove(cleanup)
            return result

        until.addBoth(forget)

    def _finished(self, transfer: Transfer, ok: bool) -> Any:
        self._end(transfer, ok)
        return (ftp.TXFR_COMPLETE_OK,) if ok else (ftp.CNX_CLOSED_TXFR_ABORTED,)

    def ftp_STOR(self, path: str) -> Deferred[Any]:
        return self._store(path, append=False)

    def ftp_APPE(self, path: str) -> Deferred[Any]:
        return self._store(path, append=True)

    def _store(self, path: str, append: bool) -> Deferred[Any]:
        offset = self._take_rest()
        segments = self._segments(path)
        if path.rpartition("/")[2] in _DIRECTORY_PARTS:
            raise ftp.IsADirectoryError(path)  # "new/" names a directory, never a file
        planned = self.server.run_in_thread(_upload_plan, self.shell, segments, append, offset)
        return planned.addCallback(self._receive_file, segments)

    def _receive_file(self, plan: tuple[Path, int | None], segments: list[str]) -> Deferred[Any]:
        target, offset = plan
        if offset is None:
            return succeed("554 REST offset is beyond the end of the file.")
        ascii = not self.binary

        def work(connection: DataConnection) -> Deferred[Any]:
            transport = connection.transport
            transfer = self._begin("upload", segments, connection, connection.cut)

            upload = Upload(
                target,
                offset,
                self.server.run_in_thread,
                partial(connection.hold, "writing"),
                self.shell.real_root,
                0o666 & ~self.shell.umask,
            )
            newlines = LineEnds() if ascii else None

            def receive(data: bytes) -> None:
                self._account(len(data), True)
                upload.write(newlines.to_local(data) if newlines is not None else data)

            def opened(_: object) -> Deferred[Any]:
                # A binary upload is read into the upload's own buffer (one copy
                # less); ASCII mode rewrites line ends on the way.
                into = _Counted(upload, self._account) if newlines is None else None
                connection.take(receive, into)
                return connection.closed.addCallback(closed)

            def closed(clean: bool) -> Deferred[Any]:
                # A clean end of the data stream is the end of the file, but only
                # if the client is still there to say so: a client that vanished
                # left half a file.
                if clean and not self.disconnected:
                    if newlines is not None:
                        upload.write(newlines.rest())
                    return upload.finish().addCallbacks(
                        lambda _: self._finished(transfer, True),
                        lambda f: self._finished(transfer, False),
                    )
                return upload.abort().addBoth(lambda _: self._finished(transfer, False))

            def open_failed(reason: Failure) -> Any:
                transport.abortConnection()
                self._end(transfer, False)
                return (ftp.REQ_ACTN_ABRTD_LOCAL_ERR,)

            storing = upload.open().addCallbacks(opened, open_failed)
            self._guard(upload.abort, storing)
            return storing

        if self.data is not None:
            self.data.upload_expected = True
        return self._with_data(work)

    def ftp_RNFR(self, from_name: str) -> Deferred[Any]:
        # RFC 959 5.4: RNFR of a name that is not there is answered 550 itself;
        # Twisted's says 350 and leaves the 550 to RNTO.
        found: Deferred[Any] = self.shell.stat(self._segments(from_name), ())
        return found.addCallback(lambda _: super(Session, self).ftp_RNFR(from_name))

    def ftp_RNTO(self, to_name: str) -> Any:
        if not hasattr(self, "_fromName"):
            return fail(ftp.BadCmdSequenceError("RNFR required before RNTO"))
        from_name: str = self._fromName
        try:
            self._segments(to_name)
            if to_name.rpartition("/")[2] in _DIRECTORY_PARTS:
                # rename("file", "new/") fails with ENOTDIR: the target names a directory.
                self.shell.require_directory(self._segments(from_name))
        except ftp.FTPCmdError:
            del self._fromName
            self.state = self.AUTHED
            raise
        return super().ftp_RNTO(to_name)

    def ftp_ABOR(self) -> Any:
        return (ftp.CLOSING_DATA_CNX,)


@attrs.define(repr=False)
class _TransferActs(Record):
    """
    The session's connection as a rule's acts on a transfer see it: a
    throttle or a byte budget shapes the data sent or received (as
    Toxiproxy's bandwidth and limit_data), not the reply lines; the other acts
    are the control connection's.
    """

    session: Session

    @property
    def closed(self) -> bool:
        return bool(getattr(self.session.transport, "closed", False))

    def abortConnection(self) -> None:
        self.session.transport.abortConnection()

    def loseConnection(self) -> None:
        self.session.transport.loseConnection()

    def shape(self, clock: Any, rate: int | None, budget: int | None) -> None:
        self.session.data_shaping = (clock, rate, budget)


class _Counted:
    """An upload read into (L{ReadInto}), its bytes counted as the session counts them."""

    def __init__(self, upload: Upload, account: Callable[[int, bool], None]) -> None:
        self.space = upload.space
        self._filled = upload.filled
        self._account = account

    def filled(self, count: int) -> None:
        self._account(count, True)
        self._filled(count)


def _response(error: Any) -> str:
    """
    The reply for an L{ftp.FTPCmdError}; Twisted's shell puts paths in its errors
    as lists of segments, which its own formatting shows as C{['a', 'b']}.
    """
    arguments = tuple("/".join(a) if isinstance(a, list) else a for a in error.errorMessage)
    template: str = ftp.RESPONSE[error.errorCode]  # type: ignore[assignment]
    return template % arguments


def _open_with_size(shell: Any, segments: list[str]) -> tuple[IO[bytes], int]:
    """RETR's file, opened, and its size (in a thread: both are system calls)."""
    source: IO[bytes] = shell.open_for_reading(segments)
    return source, os.fstat(source.fileno()).st_size


def _upload_plan(
    shell: Any, segments: list[str], append: bool, offset: int
) -> tuple[Path, int | None]:
    """
    Where STOR or APPE writes and from which offset (in a thread: the checks stat);
    None for a REST offset past the end of the file.
    """
    target: Path = shell.upload_target(segments)
    size = target.stat().st_size if target.exists() else None
    if append:
        return target, size or 0
    if offset and (size is None or size < offset):
        return target, None
    return target, offset


def _joined(build: Callable[..., list[bytes]], *args: Any) -> bytes:
    """C{build}'s lines as one CRLF-ended block (made in the thread that built them)."""
    return b"".join(line + b"\r\n" for line in build(*args))


def _timestamp(stamp: str) -> float | None:
    """MFMT's C{YYYYMMDDHHMMSS[.sss]} (UTC) as seconds since the epoch, or None."""
    match = _STAMP.fullmatch(stamp)
    if match is None:
        return None
    try:
        moment = time.strptime(match.group(1), "%Y%m%d%H%M%S")
    except ValueError:
        return None
    return calendar.timegm(moment) + float("0" + (match.group(2) or ""))


class _ToCRLF:
    """
    TYPE A: local line ends to the network's CRLF, a read at a time: a CRLF
    split between two reads stays one line end (it became CR CR LF).
    """

    def __init__(self) -> None:
        self.after_cr = False

    def __call__(self, data: bytes) -> bytes:
        head = b""
        if self.after_cr and data.startswith(b"\n"):
            head, data = b"\n", data[1:]  # the CR before it went out with the last read
        self.after_cr = data.endswith(b"\r")
        return head + data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _closing(source: IO[bytes], result: Any) -> Any:
    source.close()
    return result
