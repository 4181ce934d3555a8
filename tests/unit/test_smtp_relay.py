"""
The smtp kind's outbound side against a scripted next hop, without sockets:
what reaches events and bounces, the MAIL parameters it sends, and how the
courier settles each recipient's reply.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.task import Clock
from twisted.mail import smtp
from twisted.protocols.basic import LineReceiver
from twisted.test import iosim

from netd.events import Journal
from netd.services.smtp.address import Mailbox
from netd.services.smtp.relay import Courier, Hop, Outcome, SmarthostOptions, client_tls
from netd.services.smtp.spool import Envelope, Spool
from netd.services.smtp.store import MailStore
from tests.unit.test_smtp import Harness, accept, make_store, result_of, send, transaction


class ScriptedHop(LineReceiver):
    """
    A next hop that answers each command by the first of its C{replies} whose
    key begins the command line ("HANG": no answer at all); EHLO offers
    C{extensions}.  STARTTLS, unless scripted, starts iosim's pretend TLS.
    """

    delimiter = b"\r\n"

    def __init__(self, extensions: list[str], replies: dict[str, str]) -> None:
        self.extensions = extensions
        self.replies = replies
        self.commands: list[bytes] = []
        self.messages: list[bytes] = []
        self.data: bytearray | None = None

    def connectionMade(self) -> None:
        self.sendLine(b"220 hop.test ESMTP")

    def lineReceived(self, line: bytes) -> None:
        if self.data is not None:
            if line == b".":
                self.messages.append(bytes(self.data))
                self.data = None
                self._answer(b"END OF DATA", "250 2.0.0 queued")
            else:
                self.data += line + b"\r\n"
            return
        self.commands.append(line)
        if line.upper().startswith(b"EHLO"):
            lines = ["hop.test", *self.extensions]
            for i, text in enumerate(lines):
                self.sendLine(f"250{' ' if i == len(lines) - 1 else '-'}{text}".encode())
        elif line.upper() == b"STARTTLS" and "STARTTLS" not in self.replies:
            self.sendLine(b"220 2.0.0 go ahead")
            self.transport.startTLS(PretendTLS())
        elif line.upper() == b"DATA":
            self.data = bytearray()
            self.sendLine(b"354 go ahead")
        else:
            self._answer(line)

    def _answer(self, line: bytes, default: str = "250 2.0.0 ok") -> None:
        upper = line.decode().upper()
        replies = {"AUTH": "235 2.7.0 ok", "QUIT": "221 2.0.0 bye", **self.replies}
        reply = next((r for key, r in replies.items() if upper.startswith(key)), default)
        if reply != "HANG":
            self.sendLine(reply.encode())


class PretendTLS:
    """A TLS context for iosim's connections, whose handshakes always succeed."""

    def iosimVerify(self, other: object) -> bool:
        return True


class NextHop:
    """The endpoint of a L{Hop}: every connection goes to a new L{ScriptedHop}."""

    def __init__(self, clock: Clock, extensions: list[str], replies: dict[str, str]) -> None:
        self.clock = clock
        self.extensions = extensions
        self.replies = replies
        self.servers: list[ScriptedHop] = []
        self.pumps: list[iosim.IOPump] = []

    def __call__(self) -> NextHop:
        return self

    def connect(self, hop: Hop) -> Deferred[Any]:
        client = hop.buildProtocol(None)
        client.callLater = self.clock.callLater  # its timeout
        server = ScriptedHop(self.extensions, self.replies)
        self.servers.append(server)
        address = IPv4Address("TCP", "127.0.0.1", 4000)
        pump = iosim.connect(
            server,
            iosim.FakeTransport(server, True, peerAddress=address),
            client,
            iosim.FakeTransport(client, False),
            greet=False,
        )
        self.pumps.append(pump)
        pump.flush()
        return succeed(client)

    def flush(self) -> None:
        for pump in self.pumps:
            pump.flush()


@attrs.define
class Relay:
    """A courier sending through a L{Hop} to a scripted next hop; its reports go aside."""

    courier: Courier
    store: MailStore
    next_hop: NextHop
    clock: Clock
    journal: Journal
    reports: list[bytes]


def relay_through(
    tmp_path: Path,
    extensions: list[str],
    replies: dict[str, str],
    max_age: float = 1000,
    reports_to_hop: bool = False,
    **options: Any,
) -> Relay:
    store, journal, clock = make_store(tmp_path)
    next_hop = NextHop(clock, extensions, replies)
    tls = "opportunistic" if "STARTTLS" in extensions else "none"
    smarthost = SmarthostOptions("hop.test", **{"tls": tls, "timeout": 5, **options})
    context = None if smarthost.tls == "none" else PretendTLS()
    hop = Hop("relay.netd.test", smarthost, context, next_hop, connections=1)
    reports: list[bytes] = []

    def send(envelope: Envelope, data: bytes) -> Deferred[Outcome]:
        if envelope.bounce:
            reports.append(data)
            if reports_to_hop:
                return hop.send(envelope, envelope.recipients, data)
            return succeed(dict.fromkeys(envelope.recipients, (250, "2.0.0 ok")))
        return hop.send(envelope, envelope.recipients, data)

    courier = Courier(store.context, store.spool, send, "mx.netd.test", (10, 60), max_age)
    store.deliver = courier.schedule
    courier.store = store
    courier.startService()
    return Relay(courier, store, next_hop, clock, journal, reports)


# What the next hop saw and said reaches events and bounces as its reply alone.

SECRET = "TopSecret-42"
AUTH = ["AUTH PLAIN"]
AUTH_AFTER_TLS = ["STARTTLS", *AUTH]


def test_a_timed_out_delivery_reports_no_transcript(tmp_path: Path) -> None:
    relay = relay_through(
        tmp_path, AUTH_AFTER_TLS, {"MAIL": "HANG"}, username="relayuser", password=SECRET
    )
    accept(relay.store, Mailbox("alice", "client.test"), "bob@far.test")
    relay.clock.advance(0)
    assert relay.next_hop.servers[0].commands[3].startswith(b"AUTH PLAIN ")  # the secret went out
    relay.clock.advance(5)
    relay.next_hop.flush()
    [deferred] = relay.journal.select(types=["message.deferred"])
    assert deferred.fields["reply"] == "451 4.4.1 Timeout waiting for SMTP server response"
    relay.courier.stopService()


def test_a_refused_login_bounces_with_the_reply_on_one_line(tmp_path: Path) -> None:
    relay = relay_through(
        tmp_path,
        AUTH_AFTER_TLS,
        {"AUTH": "535-5.7.8 Authentication credentials invalid\r\n535 5.7.8 try again"},
        max_age=0,
        username="relayuser",
        password=SECRET,
    )
    accept(relay.store, Mailbox("alice", "client.test"), "bob@far.test")
    relay.clock.advance(0)
    reply = "451 4.4.1 535 5.7.8 Authentication credentials invalid 5.7.8 try again"
    [bounced] = relay.journal.select(types=["message.bounced"])
    assert bounced.fields["replies"] == [reply]
    [report] = relay.reports
    assert f"Diagnostic-Code: smtp; {reply}\r\n".encode() in report
    assert b"AUTH" not in report and b">>>" not in report
    assert b"\n" not in report.replace(b"\r\n", b"")  # no bare LF from a multi-line reply
    events = str([e.fields for e in relay.journal.select()])
    assert "AUTH" not in events and ">>>" not in events


@pytest.mark.parametrize(
    ("refusal", "outcome"),
    [
        (
            "530 5.7.0 Must issue a STARTTLS command first",  # RFC 3207 4: TLS may be mended
            (
                454,
                "4.7.0 STARTTLS failed: 454 Could not complete the SSL/TLS handshake;"
                " then 530 5.7.0 Must issue a STARTTLS command first",
            ),
        ),
        (
            "530 5.7.0 Authentication required",  # RFC 4954 6: TLS would not log in
            (530, "5.7.0 Authentication required"),
        ),
    ],
)
def test_a_530_after_tls_failed_waits_only_when_it_asks_for_tls(
    refusal: str, outcome: tuple[int, str]
) -> None:
    next_hop = NextHop(Clock(), ["STARTTLS"], {"STARTTLS": "454 4.7.0 not now", "MAIL": refusal})
    options = SmarthostOptions("hop.test")
    hop = Hop("relay.netd.test", options, client_tls(options), next_hop)
    sent = hop.send(eight_bit_envelope("1", False), ["x@far.test"], b"Subject: s\r\n\r\nb\r\n")
    next_hop.flush()
    assert [c.split(b" ")[0] for c in next_hop.servers[1].commands][:2] == [b"EHLO", b"MAIL"]
    assert result_of(sent)["x@far.test"] == outcome


@pytest.mark.parametrize("tls", ["opportunistic", "none"])
def test_credentials_never_go_to_a_hop_without_tls(tmp_path: Path, tls: str) -> None:
    # A man in the middle took STARTTLS out of the EHLO reply, or tls: none
    # (which a map refuses with credentials): the message waits instead.
    relay = relay_through(tmp_path, AUTH, {}, tls=tls, username="relayuser", password=SECRET)
    accept(relay.store, Mailbox("alice", "client.test"), "bob@far.test")
    relay.clock.advance(0)
    relay.next_hop.flush()
    [server] = relay.next_hop.servers
    assert [c.split(b" ")[0] for c in server.commands] == [b"EHLO", b"QUIT"]
    [deferred] = relay.journal.select(types=["message.deferred"])
    assert deferred.fields["reply"] == (
        "451 4.4.1 454 4.7.0 no TLS to this hop: its AUTH credentials are not sent in the clear"
    )
    assert relay.journal.select(types=["message.delivered", "message.bounced"]) == []
    relay.courier.stopService()


# 8BITMIME (RFC 6152) on the way out.

EIGHT_BIT = "Subject: 8bit\r\n\r\nGrüße aus Köln\r\n".encode()


def test_body_8bitmime_is_kept_and_survives_the_spool(tmp_path: Path) -> None:
    harness = Harness()
    session, _ = harness.connect()
    send(session, "EHLO c\r\nMAIL FROM:<a@b.test> BODY=8BITMIME\r\nRCPT TO:<x@netd.test>\r\n")
    send(session, b"DATA\r\n" + EIGHT_BIT + b".\r\n")
    send(session, "MAIL FROM:<a@b.test> BODY=7BIT\r\nRCPT TO:<x@netd.test>\r\nDATA\r\nb\r\n.\r\n")
    assert [t.eight_bit for t in harness.accepted] == [True, False]
    store, _, _ = make_store(tmp_path)
    id = result_of(store.accept(harness.accepted[0]))
    [(recovered, _)] = result_of(Spool(store.spool.directory, maybeDeferred).recover())
    assert recovered.id == id and recovered.eight_bit
    # A spool file written before netd kept the body type reads as 7-bit.
    older = {k: v for k, v in recovered.as_json().items() if k != "8bitmime"}
    assert not Envelope.from_json(older).eight_bit


def eight_bit_envelope(id: str, eight_bit: bool = True) -> Envelope:
    return Envelope(id, "a@b.test", ("x@far.test",), 0.0, 1, eight_bit=eight_bit)


def test_8bit_mime_goes_with_body_8bitmime_only_to_a_hop_offering_it() -> None:
    for extensions, mail in ((["8BITMIME"], b" BODY=8BITMIME"), (["PIPELINING"], b"")):
        next_hop = NextHop(Clock(), extensions, {})
        options = SmarthostOptions("hop.test", tls="none")
        hop = Hop("relay.netd.test", options, None, next_hop, connections=1)
        results = [
            hop.send(eight_bit_envelope("1"), ["x@far.test"], EIGHT_BIT),
            hop.send(eight_bit_envelope("2"), ["x@far.test"], b"Subject: 7bit\r\n\r\nb\r\n"),
            hop.send(eight_bit_envelope("3", False), ["x@far.test"], b"Subject: s\r\n\r\nb\r\n"),
        ]
        outcomes = [result_of(r)["x@far.test"] for r in results]
        sent = [c for s in next_hop.servers for c in s.commands if c.startswith(b"MAIL")]
        messages = [m for s in next_hop.servers for m in s.messages]
        if mail:
            assert [code for code, _ in outcomes] == [250, 250, 250]
            assert sent == [b"MAIL FROM:<a@b.test>" + mail] * 2 + [b"MAIL FROM:<a@b.test>"]
            assert messages[0] == EIGHT_BIT
        else:
            # Declared 8-bit but all 7-bit: it goes on without BODY=8BITMIME.
            assert [code for code, _ in outcomes] == [554, 250, 250]
            assert outcomes[0][1].startswith("5.6.3 8BITMIME is required")
            assert sent == [b"MAIL FROM:<a@b.test>"] * 2
            assert EIGHT_BIT not in messages


@pytest.mark.parametrize("ret", ["FULL", "HDRS"])
def test_a_bounce_for_want_of_8bitmime_quotes_the_header_only_and_gets_out(
    tmp_path: Path, ret: str
) -> None:
    relay = relay_through(tmp_path, ["PIPELINING"], {}, reports_to_hop=True)
    sent = attrs.evolve(
        transaction(Mailbox("alice", "client.test"), "bob@far.test"),
        data=EIGHT_BIT,
        eight_bit=True,
        ret=ret,
    )
    result_of(relay.store.accept(sent))
    relay.clock.advance(0)
    relay.next_hop.flush()
    [bounced] = relay.journal.select(types=["message.bounced"])  # none for the report
    assert bounced.fields["replies"][0].startswith("554 5.6.3 8BITMIME is required")
    assert bounced.fields["notified"] == "alice@client.test"
    [report] = relay.reports
    assert [m for s in relay.next_hop.servers for m in s.messages] == [report]
    assert b"Content-Type: text/rfc822-headers\r\n" in report and b"Subject: 8bit\r\n" in report
    assert report.isascii()
    mail = [c for s in relay.next_hop.servers for c in s.commands if c.startswith(b"MAIL")]
    assert mail == [b"MAIL FROM:<>"]
    relay.courier.stopService()


# How the courier settles each recipient's reply.


def test_552_to_rcpt_waits_and_the_list_shows_the_recipients_still_to_deliver(
    tmp_path: Path,
) -> None:
    relay = relay_through(
        tmp_path,
        [],
        {
            "RCPT TO:<TMP@": "450 4.2.1 try later",
            "RCPT TO:<BAD@": "550 5.1.1 no such user",
            "RCPT TO:<FULL@": "552 5.5.3 too many recipients",
        },
    )
    id = accept(
        relay.store,
        Mailbox("alice", "client.test"),
        *(f"{r}@far.test" for r in ("ok", "tmp", "bad", "full")),
    )
    relay.clock.advance(0)
    [deferred] = relay.journal.select(types=["message.deferred"])
    assert deferred.fields["recipients"] == ["tmp@far.test", "full@far.test"]
    [bounced] = relay.journal.select(types=["message.bounced"])
    assert bounced.fields["recipients"] == ["bad@far.test"]
    [listed] = result_of(relay.store.list({}))["messages"]
    assert listed["id"] == id and listed["to"] == ["tmp@far.test", "full@far.test"]
    assert result_of(relay.store.list({"to": "ok@far.test"}))["total"] == 0
    relay.next_hop.replies.clear()
    relay.clock.advance(10)
    relay.next_hop.flush()
    rcpts = [c for c in relay.next_hop.servers[-1].commands if c.startswith(b"RCPT")]
    assert rcpts == [b"RCPT TO:<tmp@far.test>", b"RCPT TO:<full@far.test>"]
    assert not relay.store.messages


def test_size_goes_on_mail_and_a_message_past_the_hop_s_limit_is_not_sent() -> None:
    small, large = b"Subject: s\r\n\r\nb\r\n", b"Subject: s\r\n\r\n" + b"x" * 100 + b"\r\n"
    for extensions, sent_whole in ((["SIZE 100"], [small]), (["SIZE"], [small, large])):
        next_hop = NextHop(Clock(), extensions, {})
        options = SmarthostOptions("hop.test", tls="none")
        hop = Hop("relay.netd.test", options, None, next_hop, connections=1)
        results = [
            hop.send(eight_bit_envelope(str(i), False), ["x@far.test"], data)
            for i, data in enumerate((small, large))
        ]
        outcomes = [result_of(r)["x@far.test"] for r in results]
        sent = [c for s in next_hop.servers for c in s.commands if c.startswith(b"MAIL")]
        assert sent == [b"MAIL FROM:<a@b.test> SIZE=%d" % len(data) for data in sent_whole]
        assert [m for s in next_hop.servers for m in s.messages] == sent_whole
        if len(sent_whole) == 1:
            assert outcomes[1] == (
                552,
                "5.3.4 Message size exceeds the fixed maximum message size of the next hop",
            )


def test_tls_none_sends_no_starttls_to_a_hop_that_offers_it() -> None:
    """tls: none means none: Twisted's sender would start TLS, verifying the hop's name."""
    next_hop = NextHop(Clock(), ["STARTTLS"], {"STARTTLS": "454 4.7.0 not now"})
    hop = Hop("relay.netd.test", SmarthostOptions("hop.test", tls="none"), None, next_hop)
    sent = hop.send(eight_bit_envelope("1", False), ["x@far.test"], b"Subject: s\r\n\r\nb\r\n")
    assert result_of(sent)["x@far.test"][0] == 250
    commands = [c.split(b" ")[0] for s in next_hop.servers for c in s.commands]
    assert b"STARTTLS" not in commands and b"MAIL" in commands


@pytest.mark.parametrize("username", [None, "relayuser"])
def test_opportunistic_tls_refused_goes_on_in_plaintext_unless_it_would_log_in(
    username: str | None,
) -> None:
    next_hop = NextHop(Clock(), ["STARTTLS", *AUTH], {"STARTTLS": "454 4.7.0 not now"})
    options = SmarthostOptions("hop.test", username=username, password=username)
    hop = Hop("relay.netd.test", options, client_tls(options), next_hop)
    sent = hop.send(eight_bit_envelope("1", False), ["x@far.test"], b"Subject: s\r\n\r\nb\r\n")
    next_hop.flush()
    commands = [[c.split(b" ")[0] for c in s.commands] for s in next_hop.servers]
    if username is None:
        assert commands[0] == [b"EHLO", b"STARTTLS", b"QUIT"]
        assert commands[1][:4] == [b"EHLO", b"MAIL", b"RCPT", b"DATA"]  # no STARTTLS
        outcome = result_of(sent)
        assert outcome["x@far.test"][0] == 250
        assert (
            outcome.plaintext_after
            == "STARTTLS failed: 454 Could not complete the SSL/TLS handshake"
        )
    else:
        assert commands == [[b"EHLO", b"STARTTLS", b"QUIT"]]  # its password stays unsent
        assert result_of(sent).check(smtp.TLSError)
