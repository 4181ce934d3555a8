"""
The smtp kind's outbound side: a retry scheduler over the spool, delivery
through twisted.mail's ESMTP client, and RFC 3464 bounces.

twisted.mail's own queue (C{relaymanager}) is broken on Python 3 and keeps
pickles; this one keeps the spool files and, beside each message deferred, a
small file saying where its retries have got to, so a restart takes up each
message's schedule where it was rather than trying the whole queue at once.
"""

from __future__ import annotations

import io
import re
import secrets
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from email.utils import formatdate
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults, succeed
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ClientFactory, connectionDone
from twisted.mail import smtp
from twisted.python.failure import Failure

from netd.kinds import BuildContext
from netd.records import Record
from netd.services.smtp.spool import Envelope, RetryState, Spool, new_id

if TYPE_CHECKING:
    from netd.services.smtp.store import MailStore

__all__ = [
    "Courier",
    "Hop",
    "Outcome",
    "Releaser",
    "Replies",
    "Send",
    "SmarthostOptions",
    "client_tls",
    "delivery_report",
    "error_reply",
    "send_message",
    "smarthost_sender",
]

_LINE_END = re.compile(rb"\r\n|\r|\n")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def error_reply(failure: Failure) -> str:
    """
    Why an attempt failed, on one line for events, logs and DSNs: the next
    hop's reply (code and text) when it refused, never a session transcript.
    """
    error = failure.value
    if isinstance(error, smtp.SMTPClientError):
        reply = error.resp.decode("utf-8", "replace")
        return _one_line(f"{error.code} {reply}" if error.code > 0 else reply)
    return _one_line(failure.getErrorMessage())


class Replies(dict[str, tuple[int, str]]):
    """
    An attempt's replies by recipient, and those recipients whose DSN requests
    the next hop took on (it offered DSN): their reports are its to send
    (RFC 3461 5.2.2).  C{plaintext_after} is why opportunistic TLS failed,
    when the message then went in plaintext ("" when it did not).
    """

    passed_on: frozenset[str] = frozenset()
    plaintext_after: str = ""


# What happened to each recipient of one attempt: address -> (code, text).
Outcome = Mapping[str, tuple[int, str]]
Send = Callable[[Envelope, bytes], Deferred[Outcome]]

_STATUS = re.compile(r"([245]\.\d{1,3}\.\d{1,3})\b")
# A refusal asking for TLS: "Must issue a STARTTLS command first", "TLS required".
_WANTS_TLS = re.compile(r"\b(?:START)?TLS\b", re.IGNORECASE)
_CONCURRENT_DELIVERIES = 10


@attrs.frozen(repr=False)
class SmarthostOptions(Record):
    host: str
    port: int = 25
    tls: str = "opportunistic"  # none | opportunistic | required
    username: str | None = None
    password: str | None = None
    timeout: float = 60.0
    ca: Path | None = None


def _status_of(code: int, text: str) -> str:
    found = _STATUS.match(text)
    return found.group(1) if found else f"{code // 100}.0.0"


@attrs.define(repr=False)
class _Job(Record):
    """
    One message for one destination; C{data} is dot-stuffed already, C{size}
    its length before.
    """

    envelope: Envelope
    recipients: tuple[str, ...]
    data: bytes
    size: int
    result: Deferred[Outcome] = attrs.field(factory=Deferred)
    # Why TLS failed, when it goes on in plaintext (Hop.plaintext).
    tls_failure: str = ""

    @property
    def needs_utf8(self) -> bool:
        """
        Whether only a next hop that offers SMTPUTF8 may take it (RFC 6531
        3.2): it came with SMTPUTF8 and has a UTF-8 address or header.  One
        that said SMTPUTF8 but needs none goes on without it.
        """
        if not self.envelope.utf8:
            return False
        addresses = (self.envelope.sender, *self.recipients)
        if not all(address.isascii() for address in addresses):
            return True
        end = self.data.find(b"\r\n\r\n")
        return not self.data[: end if end >= 0 else len(self.data)].isascii()

    @property
    def needs_8bit(self) -> bool:
        """
        Whether only a next hop that offers 8BITMIME may take it (RFC 6152 3):
        it came with BODY=8BITMIME and has an 8-bit octet.
        """
        return self.envelope.eight_bit and not self.data.isascii()

    def refusal(self, offered: frozenset[bytes], size_limit: int) -> tuple[int, str] | None:
        """
        Why a next hop offering C{offered}, and taking messages up to
        C{size_limit} octets (0: any), cannot be sent this message, if it cannot.
        """
        if self.needs_utf8 and b"SMTPUTF8" not in offered:
            return _NO_SMTPUTF8
        if self.needs_8bit and b"8BITMIME" not in offered:
            return _NO_8BITMIME
        if size_limit and self.size > size_limit:
            return _TOO_BIG  # RFC 1870 6: not sent only to be refused after DATA
        return None


# RFC 6531 3.2: what becomes of a message needing SMTPUTF8 at a hop without it.
_NO_SMTPUTF8 = (550, "5.6.7 SMTPUTF8 is required, but was not offered by the next hop")
# RFC 6152 3 and RFC 3463 5.6.3: 8-bit MIME to a hop without 8BITMIME.  Making it
# 7-bit would re-encode every 8-bit part as quoted-printable or base64 (RFC 1652 3)
# and could not mend 8-bit headers: it is returned instead.
_NO_8BITMIME = (
    554,
    "5.6.3 8BITMIME is required, but was not offered by the next hop;"
    " conversion to 7 bits is not supported",
)
_TOO_BIG = (552, "5.3.4 Message size exceeds the fixed maximum message size of the next hop")


def _size_limit(ehlo: bytes) -> int:
    """The largest message an EHLO reply's C{SIZE} takes (RFC 1870 4), 0 for any."""
    for line in ehlo.splitlines():
        words = line.split()
        if len(words) == 2 and words[0].upper() == b"SIZE" and words[1].isdigit():
            return int(words[1])
    return 0


class _Sender(smtp.ESMTPSender):
    """
    One connection to a destination, sending the messages its L{Hop} has
    queued one after another (RSET between them), then QUIT.

    It reports every recipient's reply rather than an error for the whole
    message, sends the spool's CRLF lines as they are, and fails the message in
    hand when the connection is lost (endpoints never call the factory's
    C{clientConnectionLost}).  It writes MAIL and RCPT itself (Twisted's
    C{quoteaddr} is ASCII only) with the parameters the next hop offers.
    """

    factory: Hop
    # Twisted's transcript of the last lines would carry AUTH's credentials
    # into every error, and from there into events and bounces.
    debug = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Twisted reads these when MAIL FROM is refused, before RCPT sets them.
        self.toAddressesResult: list[Any] = []
        self.successAddresses: list[Any] = []
        self.job: _Job | None = None
        self.sent = 0
        self.idle = False
        self.error: Failure | None = None
        # The extensions the next hop's last EHLO offered (none after HELO).
        self.offered: frozenset[bytes] = frozenset()
        self.size_limit = 0
        # From STARTTLS to the first line read through TLS: a failure
        # meanwhile is TLS's (STARTTLS refused, or the handshake failed).
        self.securing = False

    def connectionMade(self) -> None:
        # The body goes out in chunks and ".\r\n" after them: with Nagle's
        # algorithm the last piece waits for the peer's delayed ACK, ~40 ms a message.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        super().connectionMade()

    def lineReceived(self, line: bytes) -> None:
        if self._tlsMode:  # read through TLS: the handshake is done
            self.securing = False
        super().lineReceived(line)

    def esmtpState_starttls(self, code: int, resp: bytes) -> None:
        self.securing = True
        super().esmtpState_starttls(code, resp)

    def esmtpTLSFailed(self, code: int = -1, resp: bytes | None = None) -> None:
        self.securing = True
        super().esmtpTLSFailed(code, resp)

    def authenticate(self, code: int, resp: bytes, items: dict[bytes, bytes | None]) -> None:
        if self.secret and not self._tlsMode:
            # A hop that offers no STARTTLS may be a man in the middle who took
            # it out of the EHLO reply: no credentials in the clear, whatever
            # the mechanism (Postfix's smtp_sasl_security_options = noplaintext
            # keeps only PLAIN and LOGIN back).  The message waits for a retry.
            self.sendError(
                smtp.SMTPClientError(
                    454, b"4.7.0 no TLS to this hop: its AUTH credentials are not sent in the clear"
                )
            )
            return
        super().authenticate(code, resp, items)

    def esmtpState_serverConfig(self, code: int, resp: bytes) -> None:
        self.offered = frozenset(
            line.split(None, 1)[0].upper() for line in resp.splitlines() if line.strip()
        )
        self.size_limit = _size_limit(resp)
        super().esmtpState_serverConfig(code, resp)

    def smtpState_from(self, code: int, resp: bytes) -> None:
        self._failresponse = self.smtpTransferFailed
        while True:
            self._from = self.getMailFrom()
            if self._from is None:
                self._disconnectFromServer()  # all messages sent
                return
            assert self.job is not None
            refusal = self.job.refusal(self.offered, self.size_limit)
            if refusal is None:
                break
            self._finish(dict.fromkeys(self.job.recipients, refusal))
        envelope = self.job.envelope
        parameters = b""
        if envelope.eight_bit and b"8BITMIME" in self.offered:
            parameters += b" BODY=8BITMIME"
        if b"SIZE" in self.offered:
            parameters += b" SIZE=%d" % self.job.size
        if self.job.needs_utf8:
            parameters += b" SMTPUTF8"
        if b"DSN" in self.offered:
            if envelope.ret is not None:
                parameters += b" RET=" + envelope.ret.encode()
            if envelope.envid is not None:
                parameters += b" ENVID=" + _xtext(envelope.envid)
        self.sendLine(b"MAIL FROM:<" + self._from.encode() + b">" + parameters)
        self._expected = [250]
        self._okresponse = self.smtpState_to

    def smtpState_toOrData(self, code: int, resp: bytes) -> Any:
        # Twisted's, with the RCPT line written here.
        if self.lastAddress is not None:
            self.toAddressesResult.append((self.lastAddress, code, resp))
            if code in smtp.SUCCESS:
                self.successAddresses.append(self.lastAddress)
        try:
            self.lastAddress = next(self.toAddresses)
        except StopIteration:
            if not self.successAddresses:
                return self.smtpState_msgSent(code, "No recipients accepted")
            self.sendLine(b"DATA")
            self._expected = [354]
            self._okresponse = self.smtpState_data
        else:
            address: bytes = self.lastAddress
            self.sendLine(b"RCPT TO:<" + address + b">" + self._rcpt_parameters(address))
        return None

    def _rcpt_parameters(self, address: bytes) -> bytes:
        """A recipient's DSN request, passed on to a next hop that offers DSN."""
        assert self.job is not None
        if b"DSN" not in self.offered:
            return b""
        notify = self.job.envelope.notify(address.decode())
        parameters = b""
        if notify.notify is not None:
            parameters += b" NOTIFY=" + ",".join(notify.notify).encode()
        if notify.orcpt is not None:
            kind, _, original = notify.orcpt.partition(";")
            parameters += b" ORCPT=" + kind.encode() + b";" + _xtext(original)
        return parameters

    def getMailFrom(self) -> str | None:
        self.job = self.factory.take()
        if self.job is None:
            self.idle = True  # about to QUIT: nothing is wrong with this destination
            return None
        return self.job.envelope.sender

    def getMailTo(self) -> list[bytes]:
        assert self.job is not None
        return [recipient.encode() for recipient in self.job.recipients]

    def getMailData(self) -> io.BytesIO:
        assert self.job is not None
        return io.BytesIO(self.job.data)

    def transformChunk(self, chunk: bytes) -> bytes:
        # Twisted's version would turn every CRLF into CR CR LF.
        self.resetTimeout()
        return chunk

    def sendError(self, exc: Exception) -> None:
        smtp.SMTPClient.sendError(self, exc)
        self.error = Failure(exc)
        self._finish(self.error)

    def sentMail(self, code: int, resp: bytes, numOk: int, addresses: list[Any], log: Any) -> None:
        assert self.job is not None
        # A multi-line reply comes joined with LF; the text goes into bounces,
        # where a bare LF (and what follows it) must not reach the next hop.
        text = _one_line(resp.decode("utf-8", "replace") if isinstance(resp, bytes) else str(resp))
        outcome = Replies()
        outcome.plaintext_after = self.job.tls_failure
        if b"DSN" in self.offered:
            outcome.passed_on = frozenset(self.job.recipients)
        for address, rcpt_code, rcpt_text in addresses:
            name = address.decode() if isinstance(address, bytes) else str(address)
            detail = _one_line(rcpt_text.decode("utf-8", "replace"))
            # An accepted recipient shares the fate of the DATA that followed.
            outcome[name] = (code, text) if rcpt_code // 100 == 2 else _refused(rcpt_code, detail)
        for recipient in self.job.recipients:
            outcome.setdefault(recipient, (code, text))  # MAIL FROM refused: all alike
        if self.job.tls_failure:
            # "530 Must issue a STARTTLS command first" (RFC 3207 4): the hop
            # wants the TLS that failed, which may be mended: a wait, not a
            # bounce.  "530 5.7.0 Authentication required" (RFC 4954 6) has the
            # same code and status, and only its text tells it apart: it stays a
            # bounce, as TLS mended would bring no credentials (with credentials
            # nothing goes in plaintext, see Hop._may_go_plaintext).
            for recipient, (reply_code, reply) in outcome.items():
                if reply_code == 530 and _WANTS_TLS.search(reply):
                    outcome[recipient] = (454, f"4.7.0 {self.job.tls_failure}; then 530 {reply}")
        self.sent += 1
        self._finish(outcome)

    def _finish(self, result: Outcome | Failure) -> None:
        job, self.job = self.job, None
        if job is None:
            return
        if isinstance(result, Failure):
            job.result.errback(result)
        else:
            job.result.callback(result)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        error = self.error or Failure(
            smtp.SMTPConnectError(-1, f"connection lost: {error_reply(reason)}")
        )
        self._finish(error)
        self.factory.lost(self, error)


def _refused(code: int, text: str) -> tuple[int, str]:
    """
    A recipient's refusal as the courier takes it.  552 to RCPT (too many
    recipients) is a temporary failure, whatever its first digit (RFC 5321
    4.5.3.1.10): it becomes 452, as Postfix has it, and a later attempt tries again.
    """
    if code != 552:
        return code, text
    status = _STATUS.match(text)
    return 452, f"4{text[1:]}" if status and text.startswith("5") else text


# Not slotted: Twisted's factories set attributes of their own.
@attrs.define(slots=False, eq=False, repr=False)
class Hop(Record, ClientFactory):
    """
    A destination (a smarthost, or one exchanger's address) and the messages
    waiting for it.  Up to C{connections} connections each send message after
    message, so a busy relay pays for a connection and EHLO once, not per
    message.
    """

    noisy = False

    hostname: str
    options: SmarthostOptions
    context: Any
    endpoint: Callable[[], Any]
    # How many connections may be open at once, given as connections=.
    limit: int = attrs.field(default=_CONCURRENT_DELIVERIES, alias="connections")
    pending: deque[_Job] = attrs.field(init=False, factory=deque)
    connections: int = attrs.field(init=False, default=0)
    # The same destination without STARTTLS, made at the first TLS failure.
    plaintext: Hop | None = attrs.field(init=False, default=None)

    def send(self, envelope: Envelope, recipients: Sequence[str], data: bytes) -> Deferred[Outcome]:
        # Every line end a CRLF (no bare CR or LF can end DATA downstream), then
        # dot-stuffed.
        lines = _LINE_END.sub(b"\r\n", data)
        stuffed = (b"\r\n" + lines).replace(b"\r\n.", b"\r\n..")[2:]
        job = _Job(envelope, tuple(recipients), stuffed, len(lines))
        self._queue([job])
        return job.result

    def _queue(self, jobs: Iterable[_Job]) -> None:
        self.pending.extend(jobs)
        if self.connections < min(self.limit, len(self.pending)):
            self._connect()

    def take(self) -> _Job | None:
        return self.pending.popleft() if self.pending else None

    def _connect(self) -> None:
        self.connections += 1
        connecting = self.endpoint().connect(self)

        def failed(failure: Failure) -> None:
            self.connections -= 1
            if self.connections == 0:
                self._fail_pending(failure)

        connecting.addErrback(failed)

    def _fail_pending(self, failure: Failure) -> None:
        waiting, self.pending = self.pending, deque()
        for job in waiting:
            job.result.errback(failure)

    def lost(self, sender: _Sender, error: Failure) -> None:
        self.connections -= 1
        if not self.pending or self.connections > 0:
            return
        if sender.sent or sender.idle:
            self._connect()  # the connection had worked: a fresh one for the rest
        elif sender.securing and self._may_go_plaintext():
            self._go_plaintext(error)
        else:
            self._fail_pending(error)  # it never sent a message: neither would another

    def _may_go_plaintext(self) -> bool:
        """
        Whether mail may go on in plaintext when STARTTLS fails: as Postfix's
        C{may} level (its smtp_proto.c: "If TLS is optional, try delivery to
        the same server over a plaintext connection. Otherwise we would defer
        mail forever with destinations that have no alternate MX host."), only
        for opportunistic TLS, and never with AUTH credentials, which must not
        go in the clear (Postfix: no fallback "if we were willing to use
        SASL-over-TLS authentication").
        """
        return self.options.tls == "opportunistic" and self.options.username is None

    def _go_plaintext(self, error: Failure) -> None:
        """
        The waiting messages, STARTTLS having failed, sent again at once over
        a connection without it (Postfix falls back for a message that waited
        once already; here the attempt in hand does).
        """
        if self.plaintext is None:
            self.plaintext = Hop(
                self.hostname,
                attrs.evolve(self.options, tls="none"),
                None,
                self.endpoint,
                connections=self.limit,
            )
        waiting, self.pending = self.pending, deque()
        for job in waiting:
            job.tls_failure = f"STARTTLS failed: {error_reply(error)}"
        self.plaintext._queue(waiting)

    def buildProtocol(self, addr: Any) -> Any:
        options = self.options
        sender = _Sender(
            options.username.encode() if options.username else None,
            options.password.encode() if options.password else None,
            self.context,
            self.hostname.encode(),
            hostname=self.hostname,
        )
        # netd chose the TLS policy (client_tls), and none means none: given
        # none, Twisted's sender makes one verifying the hop's name, and starts
        # TLS whenever the hop offers STARTTLS (a self-signed hop then failed).
        sender.context = self.context
        sender.heloFallback = True
        sender.requireAuthentication = options.username is not None
        sender.requireTransportSecurity = options.tls == "required"
        sender.timeout = options.timeout  # type: ignore[assignment]
        sender.factory = self
        return sender


def _pem_blocks(data: bytes) -> list[bytes]:
    end = b"-----END CERTIFICATE-----"
    return [block + end for block in data.split(end) if b"-----BEGIN" in block]


def client_tls(options: SmarthostOptions) -> Any:
    from twisted.internet.ssl import (
        Certificate,
        CertificateOptions,
        optionsForClientTLS,
        trustRootFromCertificates,
    )

    if options.tls == "required":
        # service-identity checks the name (or IP) against the certificate.
        if options.ca is None:
            return optionsForClientTLS(options.host)
        roots = trustRootFromCertificates(
            [Certificate.loadPEM(pem) for pem in _pem_blocks(options.ca.read_bytes())]
        )
        return optionsForClientTLS(options.host, trustRoot=roots)
    if options.tls == "opportunistic":
        # Encrypt when offered; an unverifiable certificate must not stop mail.
        return CertificateOptions(verify=False)
    return None


def send_message(
    hostname: str,
    hop: SmarthostOptions,
    context: Any,
    endpoint: Any,
    envelope: Envelope,
    recipients: Sequence[str],
    data: bytes,
) -> Deferred[Outcome]:
    """One attempt to hand C{recipients}' copy to C{hop} over C{endpoint}, alone."""
    return Hop(hostname, hop, context, lambda: endpoint, connections=1).send(
        envelope, recipients, data
    )


# Smarthosts a Releaser keeps a Hop for; past it, an idle one is let go.
_RELEASE_HOPS = 16


@attrs.define(repr=False)
class Releaser(Record):
    """
    Sends captured messages on to a smarthost named with each (Mailpit's
    release), through a L{Hop} per smarthost: its queue and its connections,
    opportunistic TLS, SMTPUTF8 and DSN as for relayed mail.  One attempt: the
    caller hears each recipient's reply, or why the smarthost was not reached.
    """

    reactor: Any
    hostname: str
    timeout: float = 60.0
    hops: dict[tuple[str, int], Hop] = attrs.field(factory=dict)

    def send(self, host: str, port: int, envelope: Envelope, data: bytes) -> Deferred[Outcome]:
        hop = self.hops.get((host, port))
        if hop is None:
            idle = [key for key, h in self.hops.items() if not (h.connections or h.pending)]
            if len(self.hops) >= _RELEASE_HOPS and idle:
                del self.hops[idle[0]]
            options = SmarthostOptions(host, port, timeout=self.timeout)
            reactor = self.reactor

            def endpoint() -> HostnameEndpoint:
                return HostnameEndpoint(reactor, host, port, timeout=options.timeout)

            hop = self.hops[host, port] = Hop(
                self.hostname, options, client_tls(options), endpoint, connections=2
            )
        return hop.send(envelope, envelope.recipients, data)


def smarthost_sender(reactor: Any, hostname: str, options: SmarthostOptions) -> Send:
    """Sends every message to one smarthost, over connections that it reuses."""

    def endpoint() -> HostnameEndpoint:
        return HostnameEndpoint(reactor, options.host, options.port, timeout=options.timeout)

    hop = Hop(hostname, options, client_tls(options), endpoint)

    def send(envelope: Envelope, data: bytes) -> Deferred[Outcome]:
        return hop.send(envelope, envelope.recipients, data)

    return send


def _xtext(text: str) -> bytes:
    """RFC 3461 4's xtext: "+", "=", controls, spaces and 8-bit octets as "+XX"."""
    return b"".join(
        bytes([octet]) if 0x21 <= octet <= 0x7E and octet not in b"+=" else b"+%02X" % octet
        for octet in text.encode()
    )


def delivery_report(
    hostname: str,
    envelope: Envelope,
    results: Mapping[str, tuple[int, str]],
    original: bytes,
    whole: bool,
    now: float,
    action: str = "failed",
    expired: bool = False,
    retry_until: float | None = None,
) -> bytes:
    """
    An RFC 3464 delivery status notification to the sender on the C{results}
    of some recipients, by C{action}: C{failed} (a bounce; C{expired} when
    C{max_age} ran out), C{relayed} (to a next hop that sends no reports, RFC
    3461 5.2.2) or C{delayed} (still queued, tried until C{retry_until}).
    C{original} is the whole message if C{whole}, its header otherwise.
    """
    boundary = "netd-" + secrets.token_hex(8)
    lines = "\r\n".join(f"  <{r}>: {code} {text}" for r, (code, text) in results.items())
    will_retry = ""
    if action == "relayed":
        subject = "Successful Mail Relay Report"
        summary = "was relayed to these recipients, to a server that sends no delivery reports"
    elif action == "delayed":
        assert retry_until is not None
        subject = "Delayed Mail (still being retried)"
        summary = (
            "is not yet delivered to these recipients; no action is required on your part,"
            f" delivery is tried until {formatdate(retry_until)}"
        )
        will_retry = f"Will-Retry-Until: {formatdate(retry_until)}\r\n"
    else:
        subject = "Undelivered Mail Returned to Sender"
        reason = "it could not be delivered in time" if expired else "it was refused"
        summary = f"was not delivered to these recipients, as {reason}"
    per_recipient = "".join(
        "\r\n"
        + _original_recipient(envelope, r)
        + f"Final-Recipient: {_address_type(r)}; {r}\r\nAction: {action}\r\n"
        f"Status: {'4.4.7' if expired else _status_of(code, text)}\r\n"
        f"Diagnostic-Code: smtp; {code} {text}\r\n{will_retry}"
        for r, (code, text) in results.items()
    )
    envid = f"Original-Envelope-Id: {envelope.envid}\r\n" if envelope.envid else ""
    text = (
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>\r\n"
        f"To: <{envelope.sender}>\r\n"
        f"Subject: {subject}\r\n"
        f"Date: {formatdate(now)}\r\n"
        f"Message-ID: <{envelope.id}.{_REPORT_TAG[action]}@{hostname}>\r\n"
        f"Auto-Submitted: auto-replied\r\n"
        f"MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"\r\n'
        f"\r\n"
        f"--{boundary}\r\n"
        f"Content-Type: text/plain; charset={'us-ascii' if lines.isascii() else 'utf-8'}\r\n"
        f"\r\n"
        f"This is the mail system at {hostname}.\r\n"
        f"Your message {envelope.id} {summary}:\r\n"
        f"\r\n{lines}\r\n"
        f"\r\n--{boundary}\r\n"
        f"Content-Type: message/delivery-status\r\n"
        f"\r\n"
        f"{envid}"
        f"Reporting-MTA: dns; {hostname}\r\n"
        f"X-Netd-Queue-ID: {envelope.id}\r\n"
        f"Arrival-Date: {formatdate(envelope.received)}\r\n"
        f"{per_recipient}"
        f"\r\n--{boundary}\r\n"
        f"Content-Type: {'message/rfc822' if whole else 'text/rfc822-headers'}\r\n"
        f"\r\n"
    )
    quoted = original if whole else original.rstrip(b"\r\n") + b"\r\n"
    return text.encode() + quoted + f"\r\n--{boundary}--\r\n".encode()


_REPORT_TAG = {"failed": "bounce", "relayed": "relayed", "delayed": "delayed"}
_REPORT_COUNTER = {
    "failed": "smtp_bounces",
    "relayed": "smtp_delivery_reports",
    "delayed": "smtp_delay_reports",
}


def _original_recipient(envelope: Envelope, recipient: str) -> str:
    orcpt = envelope.notify(recipient).orcpt
    return f"Original-Recipient: {orcpt}\r\n" if orcpt else ""


def _address_type(address: str) -> str:
    # RFC 6533 3: an internationalised address is of type utf-8.
    return "rfc822" if address.isascii() else "utf-8"


@attrs.define(repr=False)
class _Queued(Record):
    envelope: Envelope
    attempts: int = 0
    timer: IDelayedCall | None = None
    busy: bool = False
    data: bytes | None = None
    warned: bool = False


# Per spool directory, the messages a courier is attempting now, and who waits
# to hear what the attempt left in its queue (None: nothing, done with): a
# reload's new courier recovers from the spool a message the old one is still
# sending, and waits for that attempt instead of sending it a second time.
# Kept in the daemon's table (BuildContext.shared) under this key.
_ATTEMPTING = "smtp.relay.attempting"
_Attempts = dict[Path, dict[str, list[Callable[[_Queued | None], None]]]]


def _seconds(values: Sequence[float]) -> tuple[float, ...]:
    return tuple(values)


# Not slotted: twisted.application's Service sets attributes of its own.
@attrs.define(slots=False, eq=False, repr=False)
class Courier(Record, Service):
    """
    Sends spooled messages on and retries them on the C{retry} schedule.

    Per recipient: 2xx is done, 4xx waits for the next attempt, 5xx (or 4xx
    once the message is C{max_age} old) goes back to the sender as a bounce.
    A message with the null sender (a bounce itself) is never bounced.  Once
    a message has waited C{delay_warning} seconds (0: never), its recipients
    that asked for C{NOTIFY=DELAY} earn the sender one delay report, as
    sendmail's C{Timeout.queuewarn} and Postfix's C{delay_warning_time} send.

    @ivar store: forgets delivered messages and spools bounces; set once the
        store that feeds this courier exists.
    """

    context: BuildContext
    spool: Spool
    send: Send
    hostname: str
    retry: tuple[float, ...] = attrs.field(converter=_seconds)
    max_age: float = 0.0
    delay_warning: float = 0.0
    store: MailStore | None = attrs.field(init=False, default=None)
    queue: dict[str, _Queued] = attrs.field(init=False, factory=dict)
    limit: DeferredSemaphore = attrs.field(
        init=False, factory=lambda: DeferredSemaphore(_CONCURRENT_DELIVERIES)
    )
    stopped: bool = attrs.field(init=False, default=False)
    # The retry states the spool kept (None until read), and the recovered
    # messages waiting for them.
    resumed: dict[str, RetryState] | None = attrs.field(init=False, default=None)
    recovered: list[str] = attrs.field(init=False, factory=list)

    def startService(self) -> None:
        super().startService()
        self.spool.retries().addCallbacks(self._resume, self._no_states)

    def _no_states(self, failure: Failure) -> None:
        self.context.log.failure("reading the retry states failed", failure)
        self._resume({})

    def _resume(self, states: dict[str, RetryState]) -> None:
        self.resumed = states
        waiting, self.recovered = self.recovered, []
        for id in waiting:
            self._resume_one(id)

    def _resume_one(self, id: str) -> None:
        queued = self.queue.get(id)
        if queued is None or self.stopped:
            return
        assert self.resumed is not None
        state = self.resumed.pop(id, RetryState(0, 0.0))
        queued.attempts = state.attempts
        queued.warned = state.warned
        self._later(id, max(state.due - self.context.reactor.seconds(), 0.0))

    def schedule(self, envelope: Envelope, data: bytes | None = None) -> None:
        """
        Deliver C{envelope}: now when it is new (C{data} spares the first
        attempt a read of the spool), when its retry state says when recovered
        from the spool (C{data} None).
        """
        if envelope.id in self.queue:
            return
        self.queue[envelope.id] = _Queued(envelope, data=data)
        self._gauge()
        if data is not None:
            self._later(envelope.id, 0)
        elif self.resumed is None:
            self.recovered.append(envelope.id)
        else:
            self._resume_one(envelope.id)

    def stopService(self) -> None:
        super().stopService()
        self.stopped = True
        for queued in self.queue.values():
            if queued.timer is not None and queued.timer.active():
                queued.timer.cancel()

    def _gauge(self) -> None:
        self.context.stats.gauge("smtp_queue_messages", len(self.queue))

    def _later(self, id: str, delay: float) -> None:
        queued = self.queue[id]
        queued.timer = self.context.reactor.callLater(delay, self._attempt, id)

    def _attempt(self, id: str) -> None:
        queued = self.queue.get(id)
        if queued is None or queued.busy or self.stopped:
            return
        queued.busy = True
        attempts = self.context.shared(_ATTEMPTING, _Attempts)
        attempting = attempts.setdefault(self.spool.directory, {})
        if id in attempting:  # by the courier this one replaces
            attempting[id].append(lambda left: self._take_over(id, left))
            return
        waiting = attempting[id] = []
        queued.attempts += 1
        attempt = self.limit.run(self._deliver, queued)

        def failed(failure: Failure) -> None:
            # The spool could not be read or written: try again later.
            self.context.log.failure("delivering {id} failed", failure, id=id)
            if id in self.queue and not self.stopped:
                self._later(id, self.retry[0])

        def idle(_: object) -> None:
            queued.busy = False
            del attempting[id]
            for take_over in waiting:
                take_over(self.queue.get(id))

        attempt.addErrback(failed).addBoth(idle)

    def _take_over(self, id: str, left: _Queued | None) -> None:
        """
        Carry on with a message after the attempt of the courier this one
        replaces: at its next retry, with the recipients it left, or not at
        all once it was delivered or bounced.
        """
        queued = self.queue.get(id)
        if queued is None or self.stopped:
            return
        queued.busy = False
        if left is None:
            del self.queue[id]
            self._gauge()
            return
        queued.envelope, queued.attempts, queued.warned = left.envelope, left.attempts, left.warned
        now = self.context.reactor.seconds()
        due = left.timer.getTime() if left.timer is not None else now
        self._later(id, max(due - now, 0.0))

    def _deliver(self, queued: _Queued) -> Deferred[Any]:
        envelope = queued.envelope

        def send(data: bytes | None) -> Any:
            if data is None:
                return None  # deleted through the admin API meanwhile
            sent: Deferred[Any] = self.send(envelope, data)
            return sent.addErrback(
                lambda failure: dict.fromkeys(
                    envelope.recipients, (451, f"4.4.1 {error_reply(failure)}")
                )
            )

        if queued.data is not None:
            reading: Deferred[Any] = succeed(queued.data)
            queued.data = None  # later attempts read the spool: memory stays small
        else:
            reading = self.spool.read(envelope.id)
        settled: Deferred[Any] = reading.addCallback(send).addCallback(self._settle, queued)
        return settled

    def _settle(self, outcome: Outcome | None, queued: _Queued) -> Deferred[None] | None:
        envelope = queued.envelope
        if outcome is None:
            self.forget(envelope.id)
            return None
        now = self.context.reactor.seconds()
        expired = now - envelope.received >= self.max_age
        passed_on = outcome.passed_on if isinstance(outcome, Replies) else frozenset()
        plaintext_after = outcome.plaintext_after if isinstance(outcome, Replies) else ""
        # Opportunistic TLS failed and it went in plaintext: the events say so, and why.
        noted = {"plaintext_after": plaintext_after} if plaintext_after else {}
        unanswered = (451, "4.4.0 No reply for this recipient")
        outcome = {r: outcome.get(r, unanswered) for r in envelope.recipients}
        done = [r for r in envelope.recipients if outcome[r][0] // 100 == 2]
        waiting = [r for r in envelope.recipients if outcome[r][0] // 100 == 4 and not expired]
        failed = {r: outcome[r] for r in envelope.recipients if r not in done and r not in waiting}
        stats = self.context.stats
        if done:
            stats.count("smtp_delivered_recipients", len(done))
            self.context.emit("message.delivered", message_id=envelope.id, recipients=done, **noted)
        if failed:
            stats.count("smtp_failed_recipients", len(failed))
        steps: list[Deferred[Any]] = []
        # NOTIFY=SUCCESS: a report unless the next hop took the request on.
        relayed = {
            r: outcome[r]
            for r in done
            if r not in passed_on and envelope.notify(r).wants("SUCCESS")
        }
        reports = [
            *([self._bounce(envelope, failed, expired)] if failed else []),
            *([self._report(envelope, relayed, action="relayed")] if relayed else []),
        ]
        bounced = _all(reports) if reports else None
        if waiting:
            stats.count("smtp_deferred_recipients", len(waiting))
            delay = self.retry[min(queued.attempts - 1, len(self.retry) - 1)]
            reason = outcome[waiting[0]]
            self.context.emit(
                "message.deferred",
                message_id=envelope.id,
                recipients=waiting,
                reply=f"{reason[0]} {reason[1]}",
                retry_in=delay,
                **noted,
            )
            if len(waiting) < len(envelope.recipients):
                queued.envelope = attrs.evolve(envelope, recipients=tuple(waiting))
                steps.append(self.spool.replace(queued.envelope))
                assert self.store is not None
                self.store.replace(queued.envelope)
            if self._late(queued, now):
                queued.warned = True
                steps.append(self._warn(envelope, {r: outcome[r] for r in waiting}))
            state = RetryState(queued.attempts, now + delay, queued.warned)
            steps.append(self.spool.save_retry(envelope.id, state))
            self._later(envelope.id, delay)
            if bounced is not None:
                steps.append(bounced)
        elif bounced is not None:
            # The original goes only once its bounce is on disk: if storing the
            # bounce fails, the message stays spooled rather than vanish untold.
            steps.append(bounced.addCallback(lambda _: self.forget(envelope.id)))
        else:
            steps.append(self.forget(envelope.id))
        return _all(steps)

    def _bounce(
        self, envelope: Envelope, failed: Mapping[str, tuple[int, str]], expired: bool
    ) -> Deferred[Any]:
        # NOTIFY=NEVER, or a NOTIFY without FAILURE: no report for that recipient.
        wanted = {r: result for r, result in failed.items() if envelope.notify(r).wants("FAILURE")}
        told = wanted and envelope.sender and not envelope.bounce
        self.context.emit(
            "message.bounced",
            message_id=envelope.id,
            recipients=list(failed),
            replies=[f"{code} {text}" for code, text in failed.values()],
            notified=envelope.sender if told else None,
        )
        return self._report(envelope, wanted, expired=expired)

    def _late(self, queued: _Queued, now: float) -> bool:
        waited = now - queued.envelope.received
        return bool(self.delay_warning) and not queued.warned and waited >= self.delay_warning

    def _warn(self, envelope: Envelope, waiting: Mapping[str, tuple[int, str]]) -> Deferred[Any]:
        # A NOTIFY without DELAY (or none: FAILURE only here): no delay report.
        wanted = {r: result for r, result in waiting.items() if envelope.notify(r).wants("DELAY")}
        told = wanted and envelope.sender and not envelope.bounce
        self.context.emit(
            "message.delayed",
            message_id=envelope.id,
            recipients=list(waiting),
            notified=envelope.sender if told else None,
        )
        return self._report(envelope, wanted, action="delayed")

    def _report(
        self,
        envelope: Envelope,
        results: Mapping[str, tuple[int, str]],
        action: str = "failed",
        expired: bool = False,
    ) -> Deferred[Any]:
        """Spool a delivery report on C{results} to the sender, and send it on."""
        if not results or not envelope.sender or envelope.bounce:
            return _all([])  # never report on a report: that is how mail loops start
        store = self.store
        assert store is not None
        head = store.heads.get(envelope.id, b"")
        if envelope.ret == "FULL":
            original: Deferred[bytes | None] = self.spool.read(envelope.id)
        else:
            original = succeed(head)

        def spool(text: bytes | None) -> Deferred[None]:
            now = self.context.reactor.seconds()
            quoted = text or b""
            # An 8-bit body quoted whole would make the report 8-bit MIME, which a
            # hop without 8BITMIME refuses (the very hop that refused the message
            # for it, maybe): the sender would never hear.  The header says which
            # message it was, as with RET=HDRS.
            whole = envelope.ret == "FULL" and not (envelope.eight_bit and not quoted.isascii())
            data = delivery_report(
                self.hostname,
                envelope,
                results,
                quoted if whole else head,
                whole,
                now,
                action,
                expired,
                retry_until=envelope.received + self.max_age,
            )
            notice = Envelope(
                id=new_id(now),
                sender="",
                recipients=(envelope.sender,),
                received=now,
                size=len(data),
                client="",
                helo=self.hostname,
                bounce=True,
                utf8=envelope.utf8,  # its To: and the headers it quotes may be UTF-8
                eight_bit=envelope.eight_bit and not data.isascii(),  # UTF-8 it quotes
            )
            self.context.stats.count(_REPORT_COUNTER[action])
            return store.add_own(notice, data)

        return original.addCallback(spool)

    def forget(self, id: str) -> Deferred[Any]:
        queued = self.queue.pop(id, None)
        if queued is not None and queued.timer is not None and queued.timer.active():
            queued.timer.cancel()
        self._gauge()
        assert self.store is not None
        return self.store.forget([id])


def _all(steps: Iterable[Deferred[Any]]) -> Deferred[None]:
    return gatherResults(list(steps), consumeErrors=True).addCallback(lambda _: None)
