"""
The smtp kind without sockets: its map section, its paths, its sessions driven
through StringTransport and a Clock, its spool and its message store.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from queue import SimpleQueue
from typing import Any

import attrs
import bcrypt
import crypt_r
import pytest
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger
from twisted.names import dns
from twisted.names import error as dns_error
from twisted.test import iosim

from netd.config import ConfigErrors, ServiceConfig, parse_config
from netd.events import Journal, ServiceStats
from netd.kinds import BuildContext
from netd.rules import RuleSet
from netd.services.smtp import RULES as SMTP_RULES
from netd.services.smtp import (
    AuthOptions,
    DeliveryOptions,
    Options,
    _PasswordChecker,
    _Realm,
)
from netd.services.smtp.address import Mailbox, PathRefused, parse_path
from netd.services.smtp.mx import MxOptions, addresses, exchangers
from netd.services.smtp.relay import Courier, Hop, Outcome, SmarthostOptions
from netd.services.smtp.server import (
    Limits,
    Receiver,
    SessionFactory,
    Transaction,
)
from netd.services.smtp.spool import Envelope, Spool, Writers, new_id
from netd.services.smtp.store import MailStore
from tests.fakes.transports import TLSStringTransport
from tests.maps import ServiceMap

MAIL = ServiceMap("smtp", "mail", Options)
parse = MAIL.parse
errors = MAIL.errors


def test_parse_defaults_and_values(tmp_path: Path) -> None:
    assert parse(tmp_path, "") == Options()
    assert parse(tmp_path, "    bare_newlines: reject\n").bare_newlines == "reject"
    options = parse(
        tmp_path,
        "    hostname: mx.netd.test\n"
        "    tls: lab\n"
        "    max_message_size: 2048\n"
        "    max_recipients: 3\n"
        "    command_timeout: 5\n"
        "    auth: {users: {bob: {password: pw}}, allow_insecure_auth: true}\n"
        "    relay: {allow_from: [10.0.0.0/8, '::1'], domains: [Netd.Test.]}\n"
        "    delivery: {mode: capture}\n",
        top="tls:\n  lab: {self_signed: [localhost]}\n",
    )
    assert options.hostname == "mx.netd.test" and options.tls == "lab"
    assert options.limits == Limits(max_message_size=2048, max_recipients=3, command_timeout=5)
    assert options.auth == AuthOptions(users={"bob": "pw"}, allow_insecure_auth=True)
    assert options.relay.allow_from == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1"),
    )
    assert options.relay.domains == ("netd.test",)


def test_parse_reports_every_error_with_its_position(tmp_path: Path) -> None:
    found = errors(
        tmp_path,
        "    hostname: 'not a host'\n"
        "    tls: nowhere\n"
        "    max_message_size: 10\n"
        "    auth: {users: {bob: {password: '$9$what'}, eve: {}}, colour: red}\n"
        "    relay: {allow_from: [10.0.0.300/8], domains: ['@x'], open: true}\n"
        "    delivery: {mode: pigeon, speed: 3}\n"
        "    colour: blue\n",
    )
    path = str(tmp_path / "netd.yaml")
    assert found == [
        f"{path}:5:15: services.mail.hostname: not a host name: 'not a host'",
        f"{path}:6:10: services.mail.tls: unknown TLS profile 'nowhere' (known: none defined)",
        f"{path}:7:23: services.mail.max_message_size: must be at least 1024, got 10",
        f"{path}:8:36: services.mail.auth.users.bob.password: "
        "not a bcrypt ($2b$...) or crypt(3) ($6$..., $5$..., $1$...) hash",
        f"{path}:8:53: services.mail.auth.users.eve: missing required key 'password'",
        f"{path}:8:58: services.mail.auth.colour: unknown key",
        f"{path}:9:26: services.mail.relay.allow_from[0]: "
        "not an address or network: '10.0.0.300/8'",
        f"{path}:9:51: services.mail.relay.domains[0]: not a domain: '@x'",
        f"{path}:9:58: services.mail.relay.open: unknown key",
        f"{path}:10:22: services.mail.delivery.mode: "
        "must be one of capture, smarthost, mx, got 'pigeon'",
        f"{path}:10:30: services.mail.delivery.speed: unknown key",
        f"{path}:11:5: services.mail.colour: unknown key",
    ]


# Paths -------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        b"<user%other.org@netd.test>",
        b'<"user@other.org"@netd.test>',
        b'<"user%other.org"@netd.test>',
        b"<@netd.test:user@other.org>",
        b"<@a,@b:user@other.org>",
        b"<user@other.org@netd.test>",
        b"<other.org!user@netd.test>",
        b"<user@[127.0.0.1]>",
        b"<user@[IPv6:::1]>",
    ],
)
def test_routing_tricks_are_refused_as_recipients(path: bytes) -> None:
    with pytest.raises(PathRefused) as refused:
        parse_path(path, True, "mx.netd.test")
    assert (refused.value.code, refused.value.status) == (550, "5.7.1")


@pytest.mark.parametrize(
    "path",
    [b"<>", b"<user>", b"<a b@c>", b"<user@-bad-.test>", b"<user@x..y>", b"<a@b", b"<.a@b.c>"],
)
def test_malformed_recipients_are_syntax_errors(path: bytes) -> None:
    with pytest.raises(PathRefused) as refused:
        parse_path(path, True, "mx.netd.test")
    assert refused.value.code == 501 and refused.value.status == "5.1.3"


def test_paths_that_are_fine() -> None:
    assert parse_path(b"<Bob@Netd.TEST>", True, "mx") == Mailbox("Bob", "netd.test")
    assert parse_path(b"bob@netd.test", True, "mx") == Mailbox("bob", "netd.test")
    assert parse_path(b"<Postmaster>", True, "MX.netd.test") == Mailbox(
        "postmaster", "mx.netd.test"
    )
    assert parse_path(b'<"john smith"@netd.test>', True, "mx") == Mailbox(
        '"john smith"', "netd.test"
    )
    assert parse_path(b"<>", False, "mx") is None
    assert parse_path(b"<@relay.test:bob@netd.test>", False, "mx") == Mailbox("bob", "netd.test")
    with pytest.raises(PathRefused) as refused:
        parse_path("<bøb@netd.test>".encode(), True, "mx")
    assert refused.value.code == 553


# Sessions ----------------------------------------------------------------


class Harness:
    """A receiver whose spool answers when the test says so."""

    def __init__(self, **overrides: Any) -> None:
        self.clock = Clock()
        self.stats = ServiceStats()
        self.accepted: list[Transaction] = []
        self.pending: list[Deferred[str]] = []
        self.immediate = True
        fields: dict[str, Any] = dict(
            hostname="mx.netd.test",
            limits=Limits(
                max_message_size=4096, max_recipients=3, command_timeout=30, data_timeout=60
            ),
            domains=frozenset({"netd.test"}),
            allow_from=(),
            accept=self.accept,
            stats=self.stats,
            log=Logger(),
        )
        fields.update(overrides)
        self.receiver = Receiver(**fields)
        self.factory = SessionFactory(self.receiver, secure=False)

    def accept(self, transaction: Transaction) -> Deferred[str]:
        self.accepted.append(transaction)
        if self.immediate:
            return succeed(f"id{len(self.accepted)}")
        pending: Deferred[str] = Deferred()
        self.pending.append(pending)
        return pending

    def connect(self, host: str = "192.0.2.1", tls: bool = True) -> tuple[Any, StringTransport]:
        session = self.factory.buildProtocol(IPv4Address("TCP", host, 4000))
        assert session is not None
        session.callLater = self.clock.callLater
        transport = (
            TLSStringTransport(peerAddress=IPv4Address("TCP", host, 4000))
            if tls
            else StringTransport(peerAddress=IPv4Address("TCP", host, 4000))
        )
        session.makeConnection(transport)
        return session, transport


def replies(transport: StringTransport) -> list[str]:
    """Reply lines since the last call, without EHLO's extension lines."""
    text = transport.value().decode()
    transport.clear()
    return [line for line in text.split("\r\n") if line]


def codes(transport: StringTransport) -> list[str]:
    """Reply codes with their enhanced status, if any: C{["250 2.1.0", "354"]}."""
    found = []
    for line in replies(transport):
        status = re.match(r"(\d{3}) ([245]\.\d+\.\d+)", line)
        found.append(" ".join(status.groups()) if status else line[:3])
    return found


def send(session: Any, text: str | bytes) -> None:
    session.dataReceived(text.encode() if isinstance(text, str) else text)


MESSAGE = "Subject: hi\r\n\r\nhello\r\n.\r\n"


def test_a_whole_transaction() -> None:
    harness = Harness()
    session, transport = harness.connect()
    assert replies(transport) == ["220 mx.netd.test ESMTP netd"]
    send(session, "EHLO client.test\r\n")
    assert replies(transport) == [
        "250-mx.netd.test Hello client.test",
        "250-SIZE 4096",
        "250-8BITMIME",
        "250-PIPELINING",
        "250-ENHANCEDSTATUSCODES",
        "250-SMTPUTF8",
        "250-CHUNKING",
        "250 DSN",
    ]
    send(session, "MAIL FROM:<a@b.test> SIZE=100 BODY=8BITMIME\r\nRCPT TO:<x@netd.test>\r\n")
    send(session, "DATA\r\n" + "Subject: hi\r\n\r\n..dotted\r\nhello\r\n.\r\nQUIT\r\n")
    assert replies(transport) == [
        "250 2.1.0 Sender ok",
        "250 2.1.5 Recipient ok",
        "354 End data with <CR><LF>.<CR><LF>",
        "250 2.0.0 Ok: queued as id1",
        "221 2.0.0 Bye",
    ]
    (accepted,) = harness.accepted
    assert accepted.data == b"Subject: hi\r\n\r\n.dotted\r\nhello\r\n"
    assert accepted.sender == Mailbox("a", "b.test")
    assert accepted.recipients == (Mailbox("x", "netd.test"),)
    assert (accepted.helo, accepted.client, accepted.protocol) == (
        "client.test",
        "192.0.2.1",
        "ESMTP",
    )


def test_pipelined_commands_wait_for_the_spool() -> None:
    harness = Harness()
    harness.immediate = False
    session, transport = harness.connect()
    send(session, "EHLO c\r\n")
    replies(transport)
    burst = "MAIL FROM:<a@b.test>\r\nRCPT TO:<x@netd.test>\r\nDATA\r\n" + MESSAGE
    send(session, burst + burst + "NOOP\r\n")
    # The second transaction is not even read while the first is being synced.
    assert codes(transport) == ["250 2.1.0", "250 2.1.5", "354"]
    harness.pending[0].callback("first")
    assert codes(transport) == ["250 2.0.0", "250 2.1.0", "250 2.1.5", "354"]
    harness.pending[1].callback("second")
    assert codes(transport) == ["250 2.0.0", "250 2.0.0"]


def test_a_failed_spool_write_answers_451_and_the_session_goes_on() -> None:
    harness = Harness()
    harness.immediate = False
    session, transport = harness.connect()
    send(session, "HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<x@netd.test>\r\nDATA\r\n" + MESSAGE)
    replies(transport)
    harness.pending[0].errback(OSError("disk full"))
    send(session, "NOOP\r\n")
    assert codes(transport) == ["451 4.3.0", "250 2.0.0"]


def test_a_client_gone_before_the_spool_answers() -> None:
    harness = Harness()
    harness.immediate = False
    session, transport = harness.connect()
    send(session, "HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<x@netd.test>\r\nDATA\r\n" + MESSAGE)
    send(session, "NOOP\r\n")
    session.connectionLost(None)
    replies(transport)
    harness.pending[0].callback("late")  # the message is kept; the reply goes nowhere
    assert codes(transport) == ["250 2.0.0"]  # StringTransport keeps what a socket drops
    assert len(harness.accepted) == 1


def test_unread_replies_are_looked_at_once_per_64_kib_of_replies() -> None:
    """
    A client that never reads is cut once a read's commands take its replies
    past 64 KiB more: the reads before it cost no look at the transport's
    buffers, and the look needs no next read (a client may send no more).
    """
    harness = Harness()
    session, transport = harness.connect(tls=False)
    transport.dataBuffer = b"x" * (2 << 20)  # a socket buffer the client never drains
    noops = "NOOP\r\n" * 1000  # 14,000 bytes of "250 2.0.0 Ok" replies
    for _ in range(4):
        send(session, noops)
    assert not transport.disconnected
    send(session, noops)
    assert transport.disconnected
    assert transport.value().count(b"250 2.0.0 Ok") == 5000


def test_starttls_discards_plaintext_pipelined_behind_it() -> None:
    harness = Harness(starttls=object())
    session, transport = harness.connect()
    send(session, "EHLO c\r\n")
    replies(transport)
    # An attacker in the middle appends a command to the client's STARTTLS.
    send(session, "STARTTLS\r\nMAIL FROM:<evil@attacker.test>\r\n")
    assert replies(transport) == ["220 2.0.0 Ready to start TLS"]
    assert transport.started_tls == [harness.receiver.starttls] and session.startedTLS
    # Everything learnt before TLS is forgotten: EHLO again, and no MAIL is open.
    send(session, "MAIL FROM:<a@b.test>\r\nEHLO c\r\nRCPT TO:<x@netd.test>\r\n")
    lines = replies(transport)
    assert lines[0] == "503 5.5.1 Send EHLO or HELO first"
    assert "250 STARTTLS" not in lines and lines[-1] == "503 5.5.1 Need MAIL before RCPT"


def test_a_tls_listener_offers_no_starttls() -> None:
    # RFC 3207 4.2: never after a TLS handshake, the implicit one of ssl: too
    # (msmtp --serverinfo listed it on the submissions port).
    harness = Harness(starttls=object())
    harness.factory = SessionFactory(harness.receiver, secure=True)
    session, transport = harness.connect()
    send(session, "EHLO c\r\n")
    assert not any("STARTTLS" in line for line in replies(transport))
    send(session, "STARTTLS\r\n")
    assert replies(transport) == ["503 5.5.1 TLS already active"]
    assert transport.started_tls == []


def test_starttls_when_it_is_not_available() -> None:
    harness = Harness()
    session, transport = harness.connect()
    send(session, "EHLO c\r\nSTARTTLS\r\n")
    assert replies(transport)[-1] == "454 4.7.0 TLS not available"


def test_auth_is_offered_and_taken_only_over_tls() -> None:
    portal = Portal(_Realm(), [_PasswordChecker({"bob": "pw"}, maybeDeferred)])
    harness = Harness(starttls=object(), portal=portal)
    session, transport = harness.connect()
    send(session, "EHLO c\r\n")
    assert not any("AUTH" in line for line in replies(transport))
    send(session, "AUTH PLAIN AGJvYgBwdw==\r\n")
    assert replies(transport) == ["538 5.7.11 Encryption required: STARTTLS first"]
    send(session, "STARTTLS\r\n")
    send(session, "EHLO c\r\n")
    assert replies(transport)[-1] == "250 AUTH PLAIN LOGIN"
    send(session, "AUTH PLAIN AGJvYgB3cm9uZw==\r\n")
    assert codes(transport) == ["535 5.7.8"]
    send(session, "AUTH\r\nAUTH BOGUS\r\nAUTH PLAIN =\r\nAUTH PLAIN !!!\r\n")
    assert codes(transport) == ["501 5.5.4", "504 5.5.4", "501 5.5.2", "501 5.5.2"]
    send(session, "AUTH PLAIN AGJvYgBwdw==\r\n")
    assert codes(transport) == ["235 2.7.0"]
    assert session.user == "bob"
    # An authenticated user may relay anywhere.
    send(session, "MAIL FROM:<bob@b.test>\r\nRCPT TO:<x@elsewhere.test>\r\nDATA\r\n" + MESSAGE)
    assert codes(transport)[-1] == "250 2.0.0"
    assert harness.accepted[0].protocol == "ESMTPSA" and harness.accepted[0].user == "bob"


def test_auth_login_with_a_bcrypt_hash_and_too_many_failures() -> None:
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()
    portal = Portal(_Realm(), [_PasswordChecker({"bob": hashed}, maybeDeferred)])
    harness = Harness(portal=portal, allow_insecure_auth=True)
    session, transport = harness.connect()
    send(session, "EHLO c\r\nAUTH LOGIN\r\nYm9i\r\ncHc=\r\n")
    # "Username:" and "Password:", as RFC 4954's examples and every client expect.
    assert replies(transport)[-3:] == [
        "334 VXNlcm5hbWU6",
        "334 UGFzc3dvcmQ6",
        "235 2.7.0 Authentication successful.",
    ]
    session, transport = harness.connect()
    send(session, "EHLO c\r\n" + "AUTH PLAIN AGJvYgB4\r\n" * 3)
    assert codes(transport)[-4:] == ["535 5.7.8", "535 5.7.8", "535 5.7.8", "421 4.7.0"]
    assert transport.disconnecting


def test_relay_policy_per_recipient() -> None:
    harness = Harness()
    session, transport = harness.connect()
    send(session, "EHLO c\r\nMAIL FROM:<a@b.test>\r\n")
    replies(transport)
    send(session, "RCPT TO:<x@netd.test>\r\nRCPT TO:<x@other.test>\r\nRCPT TO:<x%y@netd.test>\r\n")
    assert replies(transport) == [
        "250 2.1.5 Recipient ok",
        "550 5.7.1 <x@other.test>: Relay access denied",
        "550 5.7.1 a % or ! route in the local part: routing through this server is not allowed",
    ]
    trusted = Harness(allow_from=(__import__("ipaddress").ip_network("192.0.2.0/24"),))
    session, transport = trusted.connect("::ffff:192.0.2.9")
    send(session, "EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@other.test>\r\n")
    assert codes(transport)[-1] == "250 2.1.5"


def test_limits_on_size_and_recipients() -> None:
    harness = Harness()
    session, transport = harness.connect()
    send(session, "EHLO c\r\n")
    replies(transport)
    send(session, "MAIL FROM:<a@b.test> SIZE=5000\r\nMAIL FROM:<a@b.test> COLOUR=red\r\n")
    assert codes(transport) == ["552 5.3.4", "555 5.5.4"]
    send(session, "MAIL FROM:<a@b.test>\r\n" + "RCPT TO:<x@netd.test>\r\n" * 4)
    assert codes(transport) == ["250 2.1.0"] + ["250 2.1.5"] * 3 + ["452 4.5.3"]
    send(session, "DATA\r\n" + ("x" * 100 + "\r\n") * 50 + ".\r\nNOOP\r\n")
    assert codes(transport) == ["354", "552 5.3.4", "250 2.0.0"]
    send(session, "MAIL FROM:<a@b.test>\r\nRCPT TO:<x@netd.test>\r\nDATA\r\n")
    send(session, "x" * 1001 + "\r\n.\r\n")
    assert codes(transport)[-1] == "554 5.6.0"
    assert harness.accepted == []


def test_a_stopping_session_finishes_its_transaction_then_says_421() -> None:
    harness = Harness()
    session, transport = harness.connect()
    send(session, "EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@netd.test>\r\nDATA\r\n")
    replies(transport)
    session.close_gracefully()
    assert codes(transport) == []  # a message is on its way: it is finished first
    send(session, MESSAGE)
    assert codes(transport) == ["250 2.0.0"]
    send(session, "MAIL FROM:<a@b.test>\r\n")  # a second one is not taken
    assert codes(transport) == ["421 4.3.2"] and transport.disconnecting
    # A session idle after a message of its own has two seconds to say QUIT.
    idle, idle_transport = harness.connect()
    send(idle, "EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@netd.test>\r\nDATA\r\n")
    send(idle, MESSAGE)
    replies(idle_transport)
    idle.close_gracefully()
    harness.clock.advance(1.9)
    assert codes(idle_transport) == []
    harness.clock.advance(0.1)
    assert codes(idle_transport) == ["421 4.3.2"]
    assert len(harness.accepted) == 2


def test_a_session_stopped_before_its_first_message_may_send_one_and_quit() -> None:
    # Accepted just before a reload retired its service: its commands are on the way.
    harness = Harness()
    session, transport = harness.connect()
    send(session, "EHLO c\r\n")
    replies(transport)
    session.close_gracefully()
    assert codes(transport) == []
    send(session, "MAIL FROM:<a@b.test>\r\nRCPT TO:<x@netd.test>\r\nDATA\r\n")
    send(session, MESSAGE + "QUIT\r\n")
    assert codes(transport)[-2:] == ["250 2.0.0", "221 2.0.0"]
    assert len(harness.accepted) == 1


def test_a_line_may_be_1000_octets_with_its_crlf_not_one_more() -> None:
    harness = Harness()
    session, transport = harness.connect()
    send(session, "EHLO c\r\n")
    replies(transport)
    for line, code in (("y" * 998, "250 2.0.0"), ("z" * 999, "554 5.6.0")):
        send(session, "MAIL FROM:<a@b.test>\r\nRCPT TO:<x@netd.test>\r\nDATA\r\n")
        send(session, f"Subject: long\r\n\r\nshort\r\n{line}\r\nshort\r\n.\r\n")
        assert codes(transport)[-1] == code
    assert [len(max(t.data.split(b"\r\n"), key=len)) for t in harness.accepted] == [998]


SMUGGLED = [
    b"hello\r\n\n.\r\nMAIL FROM:<evil@x.test>\r\n",  # <LF>.<CR><LF>
    b"hello\n.\nMAIL FROM:<evil@x.test>\r\n",  # <LF>.<LF>
    b"hello\r\n.\rMAIL FROM:<evil@x.test>\r\n",  # <CR><LF>.<CR>
    b"hello\r.\r\nMAIL FROM:<evil@x.test>\r\n",  # <CR>.<CR><LF>
]


def smuggle(harness: Harness, smuggled: bytes) -> list[str]:
    session, transport = harness.connect()
    send(session, "EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@netd.test>\r\nDATA\r\n")
    replies(transport)
    send(session, smuggled + b"RCPT TO:<y@netd.test>\r\nDATA\r\nevil\r\n")
    assert codes(transport) == []  # all of it is still one message
    send(session, b".\r\nNOOP\r\n")
    return codes(transport)


@pytest.mark.parametrize("smuggled", SMUGGLED)
def test_bare_cr_or_lf_cannot_smuggle_a_second_message(smuggled: bytes) -> None:
    harness = Harness()
    assert smuggle(harness, smuggled) == ["250 2.0.0", "250 2.0.0"]
    [accepted] = harness.accepted
    assert accepted.recipients == (Mailbox("x", "netd.test"),)
    # Normalised into lines of the one message: no bare CR or LF is left.
    assert b"\r\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<y@netd.test>\r\n" in accepted.data
    assert accepted.data.replace(b"\r\n", b"").count(b"\r") == 0
    assert accepted.data.replace(b"\r\n", b"").count(b"\n") == 0


@pytest.mark.parametrize("smuggled", SMUGGLED)
def test_bare_cr_or_lf_can_be_refused_instead(smuggled: bytes) -> None:
    harness = Harness(reject_bare_newlines=True)
    assert smuggle(harness, smuggled) == ["554 5.6.0", "250 2.0.0"]
    assert harness.accepted == []


def test_a_looping_message_is_refused() -> None:
    harness = Harness()
    session, transport = harness.connect()
    send(session, "EHLO c\r\n")
    replies(transport)
    for hops, code in ((49, "250 2.0.0"), (50, "554 5.4.6")):
        head = "Received: from a by b; Thu, 1 Jan 2026 00:00:00 +0000\r\n" * hops
        send(session, "MAIL FROM:<a@b.test>\r\nRCPT TO:<x@netd.test>\r\nDATA\r\n")
        send(session, head + "Subject: loop\r\n\r\nreceived: in the body does not count\r\n.\r\n")
        assert codes(transport)[-1] == code
    assert len(harness.accepted) == 1


def test_malformed_commands_get_500_or_501_and_the_session_goes_on() -> None:
    harness = Harness()
    session, transport = harness.connect()
    replies(transport)
    send(session, "EHLO\r\nBOGUS\r\nMAIL FROM:<a@b.test>\r\nEHLO c\r\n")
    assert codes(transport)[:3] == ["501 5.5.4", "500 5.5.2", "503 5.5.1"]
    send(session, b"NOOP\x00\r\nMAIL FROM a@b\r\nRCPT TO:<x@netd.test>\r\nDATA x\r\n")
    assert codes(transport) == ["500 5.5.2", "501 5.5.4", "503 5.5.1", "501 5.5.4"]
    send(session, "A" * 20000 + "\r\nNOOP\r\nMAIL FROM:<a@b.test>\r\nDATA\r\n")
    assert codes(transport) == ["500 5.5.6", "250 2.0.0", "250 2.1.0", "554 5.5.1"]
    send(session, b"\xff\xfe\r\nMAIL\xff FROM:<a@b.test>\r\n")
    assert codes(transport) == ["500 5.5.2", "500 5.5.2"]
    send(session, "VRFY x\r\nHELP\r\nRSET\r\nQUIT\r\n")
    assert codes(transport) == ["252 2.5.0", "214 2.0.0", "250 2.0.0", "221 2.0.0"]


def test_command_and_data_timeouts() -> None:
    harness = Harness()
    session, transport = harness.connect()
    harness.clock.advance(29)
    send(session, "EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@netd.test>\r\nDATA\r\n")
    replies(transport)
    harness.clock.advance(59)
    send(session, "still writing\r\n")
    harness.clock.advance(59)
    assert not transport.disconnecting
    harness.clock.advance(1)
    assert replies(transport) == ["421 4.4.2 mx.netd.test Error: timeout exceeded"]
    assert transport.disconnecting


# The spool -----------------------------------------------------------------


class ManualThreads:
    """Runs thread work only when the test says so."""

    def __init__(self) -> None:
        self.work: list[tuple[Callable[[], Any], Deferred[Any]]] = []

    def __call__(self, work: Callable[[], Any]) -> Deferred[Any]:
        done: Deferred[Any] = Deferred()
        self.work.append((work, done))
        return done

    def run_one(self) -> None:
        work, done = self.work.pop(0)
        maybeDeferred(work).chainDeferred(done)


def envelope(id: str, size: int, to: tuple[str, ...] = ("x@netd.test",)) -> Envelope:
    return Envelope(id=id, sender="a@b.test", recipients=to, received=1.0, size=size)


def test_spool_syncs_each_message_in_its_own_thread_and_recovers(tmp_path: Path) -> None:
    threads = ManualThreads()
    spool = Spool(tmp_path, threads)
    fired: list[str] = []
    for id in ("a", "b", "c"):
        spool.store(envelope(id, 5), b"data" + id.encode()).addCallback(
            lambda _, id=id: fired.append(id)
        )
    assert len(threads.work) == 3  # side by side: no message waits for another
    threads.run_one()
    assert fired == ["a"] and os.listdir(tmp_path) == ["a.msg"]
    threads.run_one()
    threads.run_one()
    assert fired == ["a", "b", "c"]
    # Damaged files (netd died while writing them) were never acknowledged: the
    # old ones go; a young one may still be being written (a reload) and stays.
    torn = b"NETD-SPOOL-1 " + json.dumps(envelope("d", 99).as_json()).encode() + b"\nshort"
    (tmp_path / "d.msg").write_bytes(torn)
    (tmp_path / "e.msg").write_bytes(torn.replace(b'"d"', b'"e"'))
    (tmp_path / "junk.msg").write_bytes(b"not a spool file")
    for name in ("d.msg", "junk.msg"):
        os.utime(tmp_path / name, (1, 1))
    found = result_of(Spool(tmp_path, maybeDeferred).recover())
    assert [(e.id, start) for e, start in found] == [
        ("a", b"dataa"),
        ("b", b"datab"),
        ("c", b"datac"),
    ]
    assert sorted(os.listdir(tmp_path)) == ["a.msg", "b.msg", "c.msg", "e.msg"]


@contextlib.contextmanager
def unwritable(folder: Path) -> Iterator[None]:
    """C{folder} refuses new entries, to root too (its mode does not stop root)."""
    if os.geteuid() != 0:
        folder.chmod(0o500)
        try:
            yield
        finally:
            folder.chmod(0o700)
        return
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
        pytest.skip("root, and no chattr +i here to make a folder unwritable")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_the_spool_check_makes_nothing_and_refuses_a_folder_it_could_not_make(
    tmp_path: Path,
) -> None:
    """A reload undone after its checks leaves no folder; start-up's recovery makes it."""
    missing = tmp_path / "state" / "smtp" / "mail"
    assert result_of(Spool(missing, maybeDeferred).check()) is None
    assert os.listdir(tmp_path) == []
    (tmp_path / "file").write_text("a file where a folder goes")
    refused = result_of(Spool(tmp_path / "file" / "mail", maybeDeferred).check())
    assert refused.check(NotADirectoryError)
    parent = tmp_path / "parent"
    parent.mkdir()
    with unwritable(parent):
        refused = result_of(Spool(parent / "smtp" / "mail", maybeDeferred).check())
    assert refused.check(PermissionError)


def test_a_failed_write_fails_its_message(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "missing", maybeDeferred)
    failures: list[Any] = []
    spool.store(envelope("a", 1), b"x").addErrback(failures.append)
    assert failures and failures[0].check(FileNotFoundError)


def test_a_message_whose_sync_fails_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not acknowledged, so not listed after a restart either (it would be a copy)."""

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    failures: list[Any] = []
    Spool(tmp_path, maybeDeferred).store(envelope("a", 1), b"x").addErrback(failures.append)
    assert failures and failures[0].check(OSError)
    assert os.listdir(tmp_path) == []


class HandedBack:
    """A reactor's side of thread work: what threads hand back waits for the test."""

    def __init__(self) -> None:
        self.calls: SimpleQueue[Callable[[], None]] = SimpleQueue()
        self.shutdown: list[Callable[[], None]] = []

    def callFromThread(self, call: Callable[..., None], *args: Any) -> None:
        self.calls.put(lambda: call(*args))

    def addSystemEventTrigger(self, phase: str, event: str, call: Callable[[], None]) -> None:
        assert (phase, event) == ("during", "shutdown")
        self.shutdown.append(call)


def spool_threads() -> int:
    return sum(thread.name == "netd-spool" for thread in threading.enumerate())


def test_spool_writers_sync_side_by_side_and_answer_together(tmp_path: Path) -> None:
    """
    A thread a file on its way, up to the most allowed; every file finished
    before the reactor looks is answered in one call; a failure fails its own
    message only; the reactor's shutdown ends the threads once their files are done.
    """
    reactor = HandedBack()
    writers = Writers(reactor, most=3)
    spool = Spool(tmp_path, maybeDeferred, write=writers)
    broken = Spool(tmp_path / "missing", maybeDeferred, write=writers)
    before = spool_threads()
    fired: list[str] = []
    failures: list[Any] = []
    for id in ("a", "b", "c"):
        spool.store(envelope(id, 5), b"data" + id.encode()).addCallback(
            lambda _, id=id: fired.append(id)
        )
    broken.store(envelope("d", 1), b"x").addErrback(failures.append)
    assert spool_threads() == before + 3
    [stop] = reactor.shutdown
    stop()  # the files are all written before it returns
    assert spool_threads() == before
    assert sorted(os.listdir(tmp_path)) == ["a.msg", "b.msg", "c.msg"]
    assert fired == [] and failures == []
    reactor.calls.get_nowait()()
    assert reactor.calls.empty()
    assert sorted(fired) == ["a", "b", "c"]
    assert failures and failures[0].check(FileNotFoundError)


# The store -----------------------------------------------------------------


def make_store(
    tmp_path: Path, tables: dict[str, Any] | None = None
) -> tuple[MailStore, Journal, Clock]:
    """A started store; one given a daemon's C{tables} shares its spool folders as a reload's."""
    clock = Clock()
    clock.advance(1_800_000_000)
    journal = Journal(clock)
    context = BuildContext(
        reactor=clock,
        name="mail",
        state_dir=tmp_path,
        journal=journal,
        stats=ServiceStats(),
        log=Logger(),
        tls={},
        tables={} if tables is None else tables,
    )
    store = MailStore(Spool(tmp_path / "spool", maybeDeferred), context, "mx.netd.test")
    store.startService()
    return store, journal, clock


def result_of(deferred: Deferred[Any]) -> Any:
    found: list[Any] = []
    deferred.addBoth(found.append)
    (result,) = found
    return result


def test_store_accepts_lists_filters_reads_and_clears(tmp_path: Path) -> None:
    store, journal, _ = make_store(tmp_path)
    for to in ("x", "y"):
        transaction = Transaction(
            sender=Mailbox("a", "b.test"),
            recipients=(Mailbox(to, "netd.test"),),
            data=b"Subject: for " + to.encode() + b"\r\nX-Long: a\r\n b\r\n\r\nbody\r\n",
            helo="c.test",
            client="::1",
            user=None,
            protocol="ESMTPS",
        )
        result_of(store.accept(transaction))
    listed = result_of(store.list({}))["messages"]
    assert [m["subject"] for m in listed] == ["for x", "for y"]
    first = listed[0]
    assert first["to"] == ["x@netd.test"] and first["from"] == "a@b.test"
    received = first["headers"][0]
    assert received[0] == "Received"
    assert received[1].startswith(
        "from c.test ([IPv6:::1])\r\n\tby mx.netd.test (netd) with ESMTPS id "
    )
    assert ["X-Long", "a\r\n b"] in first["headers"]
    only_y = result_of(store.list({"to": "Y@netd.test"}))["messages"]
    assert [m["id"] for m in only_y] == [listed[1]["id"]]
    raw = result_of(store.item(first["id"]))
    assert raw.startswith(b"Received: from c.test") and raw.endswith(b"\r\n\r\nbody\r\n")
    assert len(raw) == first["size"]
    assert result_of(store.item("nope")) is None
    events = journal.select(types=["message.accepted"])
    assert [e.fields["recipients"] for e in events] == [["x@netd.test"], ["y@netd.test"]]
    assert result_of(store.clear()) == {"deleted": 2}
    assert result_of(store.list({})) == {"messages": [], "total": 0}
    assert os.listdir(tmp_path / "spool") == []


def test_subject_and_searches_read_headers_unfolded_and_decoded(tmp_path: Path) -> None:
    store, _, _ = make_store(tmp_path)
    head = (
        b"From: =?utf-8?q?Zo=C3=AB_M=C3=BCller?= <zoe@b.test>\r\n"
        b"Subject: =?utf-8?b?Q2Fmw6kgcsOpc3Vtw6k=?=\r\n"
        b"X-Note: =?x-unknown?q?kept?=\r\n\r\n",
        b"Subject: Please confirm your account for the\r\n Example Service today\r\n\r\n",
    )
    for data in head:
        result_of(
            store.accept(attrs.evolve(transaction(None, "x@netd.test"), data=data + b"b\r\n"))
        )
    listed = result_of(store.list({}))["messages"]
    assert [m["subject"] for m in listed] == [
        "Café résumé",
        "Please confirm your account for the Example Service today",
    ]
    assert ["X-Note", "=?x-unknown?q?kept?="] in listed[0]["headers"]  # headers as they came
    for query in (
        {"subject": "CAFÉ"},
        {"from": "zoë"},
        {"q": "müller"},
        {"q": "unknown?q?kept"},
        {"subject": "for the example service"},
        {"q": "the example"},
    ):
        assert result_of(store.list(query))["total"] == 1, query


def test_text_search_reads_visible_text_and_the_first_mib_of_each_message(
    tmp_path: Path,
) -> None:
    store, _, _ = make_store(tmp_path)
    html = (
        b"Subject: page\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
        b"<p>Caf<b>&eacute;</b> <a href='https://x.test/'>menu</a></p><script>hidden</script>\r\n"
    )
    # The first MiB of each message is searched (extract.SEARCHED).
    past = b"Subject: long\r\n\r\n" + b"filler line\r\n" * (2**20 // 13) + b"needle\r\n"
    for data in (html, past):
        result_of(store.accept(attrs.evolve(transaction(None, "x@netd.test"), data=data)))

    def found(text: str) -> list[str]:
        return [m["subject"] for m in result_of(store.list({"text": text}))["messages"]]

    assert found("CAFÉ MENU") == ["page"]  # HTML as it reads: tags and entities gone
    assert found("<b>") == found("hidden") == found("needle") == []
    assert found("filler line") == ["long"]


def test_parse_delivery(tmp_path: Path) -> None:
    options = parse(
        tmp_path,
        "    delivery:\n"
        "      mode: smarthost\n"
        "      smarthost: '[::1]:2526'\n"
        "      tls: required\n"
        "      username: relay\n"
        "      password: pw\n"
        "      retry: [1, 2.5]\n"
        "      max_age: 100\n",
    )
    assert options.delivery == DeliveryOptions(
        route=SmarthostOptions("::1", 2526, "required", "relay", "pw"),
        retry=(1.0, 2.5),
        max_age=100.0,
    )
    assert parse(tmp_path, "    delivery: {mode: smarthost, smarthost: relay.test}\n").delivery == (
        DeliveryOptions(route=SmarthostOptions("relay.test"))
    )
    found = errors(
        tmp_path,
        "    delivery: {mode: smarthost, username: u, retry: [0], smarthost: 'h:99999'}\n",
    )
    assert [e.split(": ", 1)[1] for e in found] == [
        "services.mail.delivery: 'username' and 'password' go together",
        "services.mail.delivery.retry[0]: must be at least 0.01, got 0",
        "services.mail.delivery.smarthost: not HOST[:PORT]: 'h:99999' "
        "(as in 127.0.0.1:25 or [::1]:25)",
    ]
    assert errors(tmp_path, "    delivery: {mode: smarthost}\n")[0].endswith(
        "services.mail.delivery: mode smarthost needs 'smarthost: HOST:PORT'"
    )
    in_the_clear = (
        "    delivery: {mode: smarthost, smarthost: h, tls: none, username: u, password: p}\n"
    )
    assert errors(tmp_path, in_the_clear)[0].endswith(
        "services.mail.delivery: 'username' needs tls: opportunistic or required:"
        " AUTH credentials never go over a connection without TLS"
    )


# Delivery ------------------------------------------------------------------


class Upstream:
    """A stand-in smarthost: answers each attempt from a script."""

    def __init__(self) -> None:
        self.attempts: list[tuple[Envelope, bytes]] = []
        self.answers: list[Outcome | Exception] = []

    def __call__(self, envelope: Envelope, data: bytes) -> Deferred[Outcome]:
        self.attempts.append((envelope, data))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            failed: Deferred[Outcome] = Deferred()
            failed.errback(answer)
            return failed
        return succeed(answer)


def make_courier(
    tmp_path: Path, max_age: float = 1000
) -> tuple[Courier, MailStore, Upstream, Clock, Journal]:
    store, journal, clock = make_store(tmp_path)
    upstream = Upstream()
    courier = Courier(store.context, store.spool, upstream, "mx.netd.test", (10, 60), max_age)
    store.deliver = courier.schedule
    courier.store = store
    courier.startService()
    return courier, store, upstream, clock, journal


def transaction(sender: Mailbox | None, *to: str) -> Transaction:
    return Transaction(
        sender=sender,
        recipients=tuple(Mailbox(*r.split("@")) for r in to),
        data=b"Subject: s\r\n\r\nbody\r\n",
        helo="c.test",
        client="127.0.0.1",
        user=None,
        protocol="ESMTP",
    )


def accept(store: MailStore, sender: Mailbox | None, *to: str) -> str:
    id: str = result_of(store.accept(transaction(sender, *to)))
    return id


def test_courier_retries_on_the_schedule_then_delivers(tmp_path: Path) -> None:
    courier, store, upstream, clock, journal = make_courier(tmp_path)
    upstream.answers = [
        ConnectionRefusedError("down"),
        {"a@far.test": (250, "ok"), "b@far.test": (451, "4.3.0 later")},
        {"b@far.test": (451, "4.3.0 later")},
        {"b@far.test": (250, "ok")},
    ]
    id = accept(store, Mailbox("s", "client.test"), "a@far.test", "b@far.test")
    clock.advance(0)
    assert len(upstream.attempts) == 1 and courier.queue[id].attempts == 1
    clock.advance(9.9)
    assert len(upstream.attempts) == 1
    clock.advance(0.1)  # first retry after 10 s: a is done, b waits
    [(on_disk, _)] = result_of(Spool(store.spool.directory, maybeDeferred).recover())
    assert on_disk.recipients == ("b@far.test",)
    assert [e.recipients for e, _ in upstream.attempts] == [("a@far.test", "b@far.test")] * 2
    clock.advance(60)  # the second retry after 60 s, only for b
    clock.advance(60)  # the last interval repeats
    assert [e.recipients for e, _ in upstream.attempts[2:]] == [("b@far.test",)] * 2
    assert id not in store.messages and id not in courier.queue
    assert courier.context.stats.gauges["smtp_queue_messages"] == 0
    kinds = [e.type for e in journal.select() if e.type.startswith("message.")]
    assert kinds == [
        "message.accepted",
        "message.deferred",  # refused connection
        "message.delivered",  # a
        "message.deferred",  # b
        "message.deferred",
        "message.delivered",  # b at last
    ]
    assert not os.listdir(store.spool.directory)


@pytest.mark.parametrize("b_waits", [False, True])
def test_a_reload_s_new_courier_waits_for_the_old_one_s_attempt(
    tmp_path: Path, b_waits: bool
) -> None:
    store, _, clock = make_store(tmp_path)
    answer: Deferred[Outcome] = Deferred()
    old_attempts: list[Envelope] = []

    def slow(envelope: Envelope, data: bytes) -> Deferred[Outcome]:
        old_attempts.append(envelope)
        return answer

    old = Courier(store.context, store.spool, slow, "mx.netd.test", (10, 60), 1000)
    store.deliver, old.store = old.schedule, store
    old.startService()
    id = accept(store, Mailbox("s", "client.test"), "a@far.test", "b@far.test")
    clock.advance(0)
    assert len(old_attempts) == 1
    # The reload: a new store and courier on the same spool recover the
    # message while the old courier's attempt waits for the smarthost.
    new_store = MailStore(Spool(store.spool.directory, maybeDeferred), store.context, "x.test")
    upstream = Upstream()
    new = Courier(store.context, new_store.spool, upstream, "x.test", (10, 60), 1000)
    new_store.deliver, new.store = new.schedule, new_store
    new_store.startService()
    new.startService()
    old.stopService()
    clock.advance(0)
    assert id in new.queue and upstream.attempts == []
    answer.callback({"a@far.test": (250, "ok"), "b@far.test": (451 if b_waits else 250, "x")})
    assert upstream.attempts == []
    if not b_waits:
        assert id not in new.queue and id not in new_store.messages
        return
    upstream.answers = [{"b@far.test": (250, "ok")}]
    clock.advance(9.9)
    assert upstream.attempts == []
    clock.advance(0.1)  # at the old courier's retry, only to b
    assert [e.recipients for e, _ in upstream.attempts] == [("b@far.test",)]
    assert id not in new.queue and id not in new_store.messages


def test_courier_bounces_refusals_and_expired_messages_but_never_a_bounce(tmp_path: Path) -> None:
    courier, store, upstream, clock, journal = make_courier(tmp_path, max_age=30)
    upstream.answers = [
        {"a@far.test": (550, "5.1.1 no such user"), "b@far.test": (451, "later")},
        {"alice@client.test": (250, "ok")},  # the first bounce
        {"b@far.test": (451, "still later")},  # 10 s later: not expired yet
        {"b@far.test": (451, "still later")},  # 70 s: expired, bounced
        {"alice@client.test": (550, "5.1.1 gone")},  # the second bounce fails
    ]
    accept(store, Mailbox("alice", "client.test"), "a@far.test", "b@far.test")
    clock.advance(0)
    clock.advance(0)
    bounce_envelope, report = upstream.attempts[1]
    assert bounce_envelope.sender == "" and bounce_envelope.recipients == ("alice@client.test",)
    assert bounce_envelope.bounce
    assert b"Final-Recipient: rfc822; a@far.test\r\nAction: failed\r\nStatus: 5.1.1" in report
    assert b"Content-Type: text/rfc822-headers\r\n\r\nReceived: from c.test" in report
    clock.advance(10)
    clock.advance(60)
    clock.advance(0)
    assert b"Status: 4.4.7" in upstream.attempts[4][1]
    bounced = [e.fields for e in journal.select(types=["message.bounced"])]
    assert [b["recipients"] for b in bounced] == [
        ["a@far.test"],
        ["b@far.test"],
        ["alice@client.test"],
    ]
    assert [b["notified"] for b in bounced] == ["alice@client.test", "alice@client.test", None]
    assert not upstream.answers and not store.messages and not courier.queue


def test_a_bounce_that_cannot_be_stored_keeps_the_original(tmp_path: Path) -> None:
    """The original leaves the spool only once its bounce is on disk."""
    courier, store, upstream, clock, _ = make_courier(tmp_path)
    upstream.answers = [{"a@far.test": (550, "5.1.1 no such user")}]
    store.add_own = lambda envelope, data: fail(OSError("disk full"))  # type: ignore[method-assign]
    id = accept(store, Mailbox("alice", "client.test"), "a@far.test")
    clock.advance(0)
    assert id in store.messages
    assert [path.name for path in tmp_path.rglob("*.msg")] == [f"{id}.msg"]
    courier.stopService()


def test_a_message_deleted_while_queued_is_dropped(tmp_path: Path) -> None:
    courier, store, upstream, clock, _ = make_courier(tmp_path)
    upstream.answers = [ConnectionRefusedError("down")]
    id = accept(store, None, "a@far.test")
    clock.advance(0)
    result_of(store.clear())
    clock.advance(10)
    assert len(upstream.attempts) == 1 and id not in courier.queue
    courier.stopService()


class FakeResolver:
    """Answers twisted.names lookups from a table; a missing name is NXDOMAIN."""

    def __init__(self, records: dict[tuple[str, int], list[Any]], broken: bool = False) -> None:
        self.records = records
        self.broken = broken

    def _lookup(self, name: str, kind: int) -> Deferred[Any]:
        if self.broken:
            return fail(dns_error.DNSServerError("SERVFAIL"))
        if not any(n == name for n, _ in self.records):
            return fail(dns_error.DNSNameError(name))
        answers = [
            dns.RRHeader(name, kind, payload=payload)
            for payload in self.records.get((name, kind), [])
        ]
        return succeed((answers, [], []))

    def lookupMailExchange(self, name: str) -> Deferred[Any]:
        return self._lookup(name, dns.MX)

    def lookupAddress(self, name: str) -> Deferred[Any]:
        return self._lookup(name, dns.A)

    def lookupIPV6Address(self, name: str) -> Deferred[Any]:
        return self._lookup(name, dns.AAAA)


def test_exchangers_and_their_addresses() -> None:
    resolver = FakeResolver(
        {
            ("far.test", dns.MX): [
                dns.Record_MX(20, b"b.far.test"),
                dns.Record_MX(10, b"a.far.test"),
            ],
            ("a.far.test", dns.A): [dns.Record_A("127.0.0.2")],
            ("a.far.test", dns.AAAA): [dns.Record_AAAA("::1")],
            ("plain.test", dns.A): [dns.Record_A("127.0.0.3")],
            ("nullmx.test", dns.MX): [dns.Record_MX(0, b"")],
        }
    )

    def run(coroutine: Any) -> Any:
        return result_of(Deferred.fromCoroutine(coroutine))

    assert run(exchangers(resolver, "far.test")) == ["a.far.test", "b.far.test"]
    assert run(exchangers(resolver, "plain.test")) == ["plain.test"]  # no MX: itself
    refused = run(exchangers(resolver, "nowhere.test"))
    assert (refused.value.code, refused.value.text) == (550, "5.1.2 No such domain")
    assert run(exchangers(resolver, "nullmx.test")).value.code == 556
    assert run(exchangers(FakeResolver({}, broken=True), "far.test")).value.code == 451
    assert run(addresses(resolver, "a.far.test")) == [
        (socket.AF_INET, "127.0.0.2"),
        (socket.AF_INET6, "::1"),
    ]
    assert run(addresses(resolver, "b.far.test")) == []


def test_parse_mx_delivery(tmp_path: Path) -> None:
    options = parse(
        tmp_path, "    delivery: {mode: mx, port: 2525, resolver: '127.0.0.1:5353', tls: none}\n"
    )
    assert options.delivery.route == MxOptions(port=2525, tls="none", resolver=("127.0.0.1", 5353))
    assert parse(
        tmp_path, "    delivery: {mode: mx, resolver: '::1'}\n"
    ).delivery.route == MxOptions(resolver=("::1", 53))


def test_a_replaced_service_hands_what_it_still_accepts_to_its_successor(tmp_path: Path) -> None:
    old, _, _ = make_store(tmp_path)
    # A reload: both serve the same folder for a while.
    new, _, _ = make_store(tmp_path, old.context.tables)
    id = accept(old, None, "late@netd.test")
    assert id in new.messages
    old.stopService()
    assert [m["id"] for m in result_of(new.list({}))["messages"]] == [id]
    new.stopService()


def test_stores_of_two_daemons_in_one_process_keep_their_own_mail(tmp_path: Path) -> None:
    """What hands mail across a reload is the daemon's: another daemon's store is no successor."""
    first, _, _ = make_store(tmp_path)
    second, _, _ = make_store(tmp_path)
    id = accept(first, None, "own@netd.test")
    assert id in first.messages and id not in second.messages


def test_recovery_leaves_files_being_written_alone(tmp_path: Path) -> None:
    young, old = tmp_path / "young.tmp", tmp_path / "old.tmp"
    young.write_bytes(b"half")
    old.write_bytes(b"half")
    os.utime(old, (1, 1))
    result_of(Spool(tmp_path, maybeDeferred).recover())
    assert young.exists() and not old.exists()


class Endpoints:
    """Connection attempts that stay pending until the test ends them."""

    def __init__(self) -> None:
        self.attempts: list[Deferred[Any]] = []

    def __call__(self) -> Any:
        attempts = self.attempts

        class Endpoint:
            def connect(self, factory: Any) -> Deferred[Any]:
                attempt: Deferred[Any] = Deferred()
                attempts.append(attempt)
                return attempt

        return Endpoint()


def test_a_hop_opens_connections_up_to_its_limit_and_fails_the_queue_when_down() -> None:
    endpoints = Endpoints()
    hop = Hop("mx.netd.test", SmarthostOptions("relay.test"), None, endpoints, connections=2)
    results = [hop.send(envelope(str(i), 1), ["x@far.test"], b"x\r\n") for i in range(5)]
    assert len(endpoints.attempts) == 2 and len(hop.pending) == 5
    endpoints.attempts[0].errback(ConnectionRefusedError())
    assert len(hop.pending) == 5  # the other attempt may still serve them
    endpoints.attempts[1].errback(ConnectionRefusedError())
    failures = [result_of(r) for r in results]
    assert all(f.check(ConnectionRefusedError) for f in failures) and not hop.pending
    assert hop.connections == 0


def test_a_hop_sends_queued_messages_one_after_another_on_one_connection() -> None:
    harness = Harness()
    pumps: list[Any] = []
    client_address = IPv4Address("TCP", "127.0.0.1", 4000)

    class Endpoint:
        def connect(self, factory: Any) -> Deferred[Any]:
            client = factory.buildProtocol(None)
            server = harness.factory.buildProtocol(client_address)
            pumps.append(
                iosim.connect(
                    server,
                    iosim.FakeTransport(server, True, peerAddress=client_address),
                    client,
                    iosim.FakeTransport(client, False),
                    greet=False,
                )
            )
            return succeed(client)

    hop = Hop(
        "relay.netd.test",
        SmarthostOptions("mx.netd.test", tls="none"),
        None,
        Endpoint,
        connections=1,
    )
    results = [
        hop.send(envelope(str(i), 1), [f"to{i}@netd.test"], b"Subject: %d\r\n\r\n.dot\r\n" % i)
        for i in range(3)
    ]
    pumps[0].flush()
    assert len(pumps) == 1  # one connection, three messages
    assert [result_of(r) for r in results] == [
        {f"to{i}@netd.test": (250, f"2.0.0 Ok: queued as id{i + 1}")} for i in range(3)
    ]
    assert [t.data for t in harness.accepted] == [
        b"Subject: %d\r\n\r\n.dot\r\n" % i for i in range(3)
    ]
    assert [t.helo for t in harness.accepted] == ["relay.netd.test"] * 3


def test_a_message_queued_while_the_connection_quits_gets_a_new_one() -> None:
    harness = Harness()
    pumps: list[Any] = []
    client_address = IPv4Address("TCP", "127.0.0.1", 4000)

    class Endpoint:
        def connect(self, factory: Any) -> Deferred[Any]:
            client = factory.buildProtocol(None)
            server = harness.factory.buildProtocol(client_address)
            server_transport = iosim.FakeTransport(server, True, peerAddress=client_address)
            client_transport = iosim.FakeTransport(client, False)
            pumps.append(
                iosim.connect(server, server_transport, client, client_transport, greet=False)
            )
            return succeed(client)

    options = SmarthostOptions("mx.netd.test", tls="none")
    hop = Hop("relay.netd.test", options, None, Endpoint, connections=1)
    first = hop.send(envelope("0", 1), ["a@netd.test"], b"x\r\n")
    while not pumps[0].clientIO.stream or b"QUIT" not in b"".join(pumps[0].clientIO.stream):
        pumps[0].pump()
    second = hop.send(envelope("1", 1), ["b@netd.test"], b"y\r\n")
    pumps[0].flush()
    assert len(pumps) == 2  # the first connection quit; a fresh one takes the late message
    pumps[1].flush()
    assert result_of(first)["a@netd.test"][0] == 250
    assert result_of(second)["b@netd.test"][0] == 250


def test_auth_with_a_crypt_hash() -> None:
    hashed = crypt_r.crypt("pw", crypt_r.mksalt(crypt_r.METHOD_SHA512))
    checker = _PasswordChecker({"bob": hashed}, maybeDeferred)
    portal = Portal(_Realm(), [checker])
    harness = Harness(portal=portal, allow_insecure_auth=True)
    session, transport = harness.connect()
    send(session, "EHLO c\r\nAUTH PLAIN AGJvYgB4\r\nAUTH PLAIN AGJvYgBwdw==\r\n")
    assert codes(transport)[-2:] == ["535 5.7.8", "235 2.7.0"]


FUZZ_PIECES = [
    b"HELO", b"EHLO x", b"MAIL", b"MAIL FROM:", b"MAIL FROM:<>", b"MAIL FROM:<a@b.c> SIZE=",
    b"MAIL FROM:<a@b.c> =", b"RCPT", b"RCPT TO:", b"RCPT TO:<>", b"RCPT TO:<x@netd.test>",
    b'RCPT TO:<"@netd.test>', b"RCPT TO:<@:>", b"RCPT TO:<a@>", b"DATA", b"DATA x", b"RSET",
    b"STARTTLS", b"STARTTLS x", b"AUTH", b"AUTH LOGIN", b"AUTH PLAIN", b"AUTH PLAIN =", b"*",
    b"=", b"", b" ", b"\x00", b"\xff\xfe", b"MAIL FROM:<\xff@b.c>", b".", b"BDAT 10", b"\r",
    b"\n", b"\r\n.\r\n", b"A" * 50, b"BDAT 3 LAST", b"BDAT 0", b"BDAT 99999", b"BDAT 1 LAST x",
    b"MAIL FROM:<a@b.c> SMTPUTF8 RET=HDRS ENVID=x+2B", "RCPT TO:<ю@netd.test>".encode(),
    b"RCPT TO:<x@netd.test> NOTIFY=NEVER ORCPT=rfc822;x", b"RCPT TO:<x@netd.test> NOTIFY=",
]  # fmt: skip


def test_random_input_never_breaks_a_session() -> None:
    import random

    chooser = random.Random(7)
    portal = Portal(_Realm(), [_PasswordChecker({"bob": "pw"}, maybeDeferred)])
    for _ in range(400):
        harness = Harness(portal=portal, allow_insecure_auth=True, starttls=object())
        session, transport = harness.connect()
        stream = b"".join(
            chooser.choice(FUZZ_PIECES) + chooser.choice([b"\r\n", b""])
            for _ in range(chooser.randint(1, 30))
        )
        while stream:  # in pieces, as TCP may deliver it
            size = chooser.randint(1, 40)
            session.dataReceived(stream[:size])
            stream = stream[size:]
        assert all(line[:3].isdigit() for line in replies(transport))


def test_idle_timeout_follows_the_longest_smtp_timeout(tmp_path: Path) -> None:
    def service(section: str) -> ServiceConfig:
        text = f"services:\n  mail:\n    type: smtp\n    listen: ['tcp:0']\n{section}"
        return parse_config(text, tmp_path / "netd.yaml").services["mail"]

    assert service("").idle_timeout == 600  # data_timeout's default, over the 300 s default
    assert service("    data_timeout: 30\n    command_timeout: 20\n").idle_timeout == 300
    assert service("    command_timeout: 900\n").idle_timeout == 900
    quick = "    data_timeout: 30\n    command_timeout: 30\n    idle_timeout: 60\n"
    assert service(quick).idle_timeout == 60
    with pytest.raises(ConfigErrors) as raised:
        service("    data_timeout: 600\n    idle_timeout: 300\n")
    assert [str(e) for e in raised.value.errors] == [
        f"{tmp_path / 'netd.yaml'}:6:19: services.mail.idle_timeout: shorter than the 600 s "
        "this smtp service's own timeouts allow a client to stay silent"
    ]


def rules_harness(*bodies: dict[str, Any]) -> Harness:
    clock = Clock()
    ruleset = RuleSet("mail", SMTP_RULES, clock, Journal(clock))
    for body in bodies:
        ruleset.post(body)
    harness = Harness(rules=ruleset)
    harness.clock = clock
    return harness


def test_a_delay_at_eom_keeps_pipelined_commands_behind_the_spool_write() -> None:
    harness = rules_harness({"match": {"stage": "eom"}, "delay": 5})
    harness.immediate = False
    session, transport = harness.connect()
    send(session, "HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<x@netd.test>\r\nDATA\r\n" + MESSAGE)
    send(session, "NOOP\r\n")
    assert codes(transport)[-1] == "354"
    harness.clock.advance(5)
    # The delay is over and the spool write begins: NOOP still waits for it.
    assert codes(transport) == [] and len(harness.pending) == 1
    harness.pending[0].callback("late")
    assert codes(transport) == ["250 2.0.0", "250 2.0.0"]


def test_rules_answer_at_their_stage_and_then_no_more() -> None:
    harness = rules_harness(
        {"match": {"stage": "connect"}, "reply": "554 5.3.2 not now", "times": 1},
        {"match": {"stage": "mail", "mail": ""}, "reply": "550 no bounces here"},
        {"match": {"stage": "rcpt", "rcpt": "*@netd.test"}, "reply": "452 4.2.2 full", "nth": 2},
    )
    refused_session, refused = harness.connect()
    assert replies(refused) == ["554 5.3.2 not now"]
    # RFC 5321 3.1: after a 554 greeting, 503 to all but QUIT, then closed by QUIT.
    send(refused_session, "EHLO c\r\nMAIL FROM:<a@b.test>\r\nQUIT\r\n")
    assert codes(refused) == ["503 5.5.1", "503 5.5.1", "221 2.0.0"]
    assert refused.disconnecting
    session, transport = harness.connect()
    assert codes(transport) == ["220"]
    send(session, "HELO c\r\nMAIL FROM:<>\r\nMAIL FROM:<a@b.test>\r\n")
    send(session, "RCPT TO:<x@netd.test>\r\nRCPT TO:<y@netd.test>\r\nRCPT TO:<z@netd.test>\r\n")
    assert codes(transport) == [
        "250",
        "550 5.7.1",
        "250 2.1.0",
        "250 2.1.5",
        "452 4.2.2",
        "250 2.1.5",
    ]


def test_a_message_waits_for_the_spool_to_be_read_before_it_is_written(tmp_path: Path) -> None:
    """Recovery makes the spool's folder and lists it: a message written meanwhile is not lost."""
    pending: list[tuple[Deferred[Any], Callable[[], Any]]] = []

    def later(work: Callable[[], Any]) -> Deferred[Any]:
        done: Deferred[Any] = Deferred()
        pending.append((done, work))
        return done

    def run_next() -> None:
        done, work = pending.pop(0)
        done.callback(work())

    store, journal, _ = make_store(tmp_path)
    store = MailStore(Spool(tmp_path / "later", later), store.context, "mx.netd.test")
    store.startService()
    accepted = store.accept(transaction(Mailbox("a", "b.test"), "x@netd.test"))
    assert len(pending) == 1  # the recovery alone: the message waits for it
    run_next()
    run_next()
    assert result_of(accepted) == result_of(store.list({}))["messages"][0]["id"]
    assert len(journal.select(types=["message.accepted"])) == 1


def test_a_report_an_old_courier_writes_during_a_reload_goes_through_the_new_store(
    tmp_path: Path,
) -> None:
    """The old courier is stopping: its bounce is the new one's to list and send."""
    old, _, _ = make_store(tmp_path)
    sent: list[str] = []
    new = MailStore(
        old.spool, old.context, "mx.netd.test", deliver=lambda e, data: sent.append(e.id)
    )
    new.startService()
    bounce = Envelope(id=new_id(1.0), sender="", recipients=("a@b.test",), received=1.0, size=9)
    result_of(old.add_own(bounce, b"\r\nbounced"))
    assert bounce.id in new.messages and bounce.id not in old.messages
    assert sent == [bounce.id]


def test_a_line_too_long_over_many_reads_gets_one_answer() -> None:
    # RFC 2920 3: one reply a command, in order, however TCP splits the line.
    harness = Harness()
    session, transport = harness.connect()
    send(session, "EHLO c\r\n")
    replies(transport)
    for _ in range(4):
        send(session, "A" * 15000)
    send(session, "\r\nNOOP\r\n")
    assert codes(transport) == ["500 5.5.6", "250 2.0.0"]
    # Its CRLF split across reads: the LF does not end a line of its own.
    send(session, "NOOP " + "a" * 13000 + "\r")
    send(session, "\nNOOP\r\n")
    assert codes(transport) == ["500 5.5.6", "250 2.0.0"]
    # Ended by a bare LF, still one answer.
    send(session, "B" * 13000)
    send(session, "\nNOOP\r\n")
    assert codes(transport) == ["500 5.5.6", "250 2.0.0"]


def test_the_size_limit_does_not_count_the_dots_the_client_doubled() -> None:
    # RFC 1870 4: the size excludes dot-stuffing, so a message at the limit passes
    # whether it comes in one read or in many.
    lines = "." + "x" * 98 + "\r\n"  # 101 octets sent, 100 in the message
    body = lines * 40 + "y" * 54 + "\r\n"  # 4,096 octets once unstuffed
    for step in (10_000, 100):
        harness = Harness()
        session, transport = harness.connect()
        send(session, "EHLO c\r\nMAIL FROM:<a@b.test> SIZE=4096\r\nRCPT TO:<x@netd.test>\r\n")
        send(session, "DATA\r\n")
        stuffed = ("." + lines) * 40 + "y" * 54 + "\r\n.\r\n"
        for start in range(0, len(stuffed), step):
            send(session, stuffed[start : start + step])
        assert codes(transport)[-1] == "250 2.0.0", step
        assert len(harness.accepted[0].data) == 4096 and harness.accepted[0].data == body.encode()


def test_postmaster_at_a_hostname_with_capitals() -> None:
    # RFC 5321 4.5.1: postmaster is accepted, whatever case the hostname was written in.
    harness = Harness(hostname="MX.Netd.Test", domains=frozenset())
    session, transport = harness.connect()
    send(session, "EHLO c\r\nMAIL FROM:<a@b.test>\r\n")
    send(session, "RCPT TO:<postmaster@mx.netd.test>\r\nRCPT TO:<Postmaster@MX.NETD.TEST>\r\n")
    assert codes(transport)[-2:] == ["250 2.1.5", "250 2.1.5"]


def test_starttls_forgets_a_login_made_before_it() -> None:
    # RFC 3207 4.2: a man in the middle could log in before STARTTLS with its own password.
    portal = Portal(_Realm(), [_PasswordChecker({"bob": "pw"}, maybeDeferred)])
    harness = Harness(starttls=object(), portal=portal, allow_insecure_auth=True)
    session, transport = harness.connect()
    send(session, "EHLO c\r\nAUTH PLAIN AGJvYgBwdw==\r\n")
    assert codes(transport)[-1] == "235 2.7.0" and session.user == "bob"
    send(session, "STARTTLS\r\n")
    send(session, "EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@elsewhere.test>\r\n")
    assert codes(transport)[-1] == "550 5.7.1"
    assert session.user is None
    send(session, "RSET\r\nAUTH PLAIN AGJvYgBwdw==\r\n")
    assert codes(transport)[-1] == "235 2.7.0"


def test_helo_sessions_are_smtp_and_small_commands_answer_as_rfc_5321_has_them() -> None:
    harness = Harness()
    session, transport = harness.connect()
    send(session, "HELO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@netd.test>\r\nDATA\r\n" + MESSAGE)
    assert harness.accepted[0].protocol == "SMTP"  # RFC 5321 4.4: ESMTP is for EHLO
    replies(transport)
    send(session, "VRFY\r\nEXPN staff\r\nVRFY x\r\n")
    assert codes(transport) == ["501 5.5.4", "502 5.5.1", "252 2.5.0"]


def test_a_last_chunk_ending_in_a_bare_cr_gets_one_line_end() -> None:
    harness = Harness()
    session, transport = harness.connect()
    send(session, "EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@netd.test>\r\n")
    send(session, "BDAT 13 LAST\r\nSubject: x\r\n\r")
    assert codes(transport)[-1] == "250 2.0.0"
    assert harness.accepted[0].data == b"Subject: x\r\n\r\n"


def test_a_rules_banner_or_4xx_greeting_leaves_the_session_as_twisteds_would() -> None:
    for greeting in ("220 custom banner here", "450 4.3.2 busy, try on"):
        harness = rules_harness({"match": {"stage": "connect"}, "reply": greeting, "times": 1})
        session, transport = harness.connect()
        assert replies(transport) == [greeting]
        send(session, "EHLO c\r\nMAIL FROM:<a@b.test>\r\n")
        assert codes(transport)[-1] == "250 2.1.0"  # only a 554 refuses the session
