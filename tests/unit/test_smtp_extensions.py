"""
The SMTP extensions beyond RFC 5321 the smtp kind speaks, without sockets:
SMTPUTF8 (RFC 6531), CHUNKING/BDAT (RFC 3030) and DSN (RFC 3461).
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.test import iosim

from netd.services.smtp.address import Mailbox, PathRefused, parse_path
from netd.services.smtp.relay import Hop, SmarthostOptions
from netd.services.smtp.server import Limits, Session, SessionFactory
from netd.services.smtp.spool import Envelope
from tests.unit.test_smtp import Harness, codes, replies, result_of, rules_harness, send

USER = "пользователь@пример.рф"


# SMTPUTF8 ------------------------------------------------------------------


def test_utf8_paths_are_read_only_with_smtputf8() -> None:
    raw = f"<{USER}>".encode()
    with pytest.raises(PathRefused) as refused:
        parse_path(raw, True, "mx")
    assert (refused.value.code, refused.value.status) == (553, "5.6.7")
    assert parse_path(raw, True, "mx", utf8=True) == Mailbox("пользователь", "пример.рф")
    assert parse_path("<Jörg@Bücher.Example>".encode(), False, "mx", utf8=True) == Mailbox(
        "Jörg", "bücher.example"
    )
    assert parse_path(b"<bob@netd.test>", True, "mx", utf8=True) == Mailbox("bob", "netd.test")


@pytest.mark.parametrize(
    ("path", "code"),
    [
        (b"<\xff@netd.test>", 501),  # not UTF-8
        ("<a@bad..домен>".encode(), 501),
        ("<a b@домен.test>".encode(), 501),
        ("<a@\u2028.test>".encode(), 501),  # a line separator is no part of a name
        ("<ю" * 30 + "@netd.test>", 501),  # 60 characters, 120 octets: too long
        ("<ю%far.test@netd.test>".encode(), 550),  # routing tricks stay refused
        ("<@домен.test:ю@far.test>".encode(), 550),
    ],
)
def test_bad_utf8_paths(path: bytes | str, code: int) -> None:
    raw = path.encode() if isinstance(path, str) else path
    with pytest.raises(PathRefused) as refused:
        parse_path(raw, True, "mx", utf8=True)
    assert refused.value.code == code


def test_a_smtputf8_transaction_is_accepted_and_marked() -> None:
    harness = Harness()
    session, transport = harness.connect()
    send(session, "EHLO client.test\r\n")
    assert "SMTPUTF8" in [line[4:] for line in replies(transport)]
    send(session, f"MAIL FROM:<{USER}>\r\n")
    send(session, f"MAIL FROM:<{USER}> SMTPUTF8=yes\r\n")
    send(session, f"MAIL FROM:<{USER}> BODY=8BITMIME SMTPUTF8\r\n")
    send(session, "RCPT TO:<Jörg@netd.test>\r\nDATA\r\n")
    send(session, "Subject: Grüße\r\n\r\nhallo\r\n.\r\n")
    assert codes(transport) == [
        "553 5.6.7",
        "501 5.5.4",
        "250 2.1.0",
        "250 2.1.5",
        "354",
        "250 2.0.0",
    ]
    (accepted,) = harness.accepted
    assert accepted.utf8 and accepted.protocol == "UTF8SMTP"
    assert accepted.sender == Mailbox("пользователь", "пример.рф")
    assert accepted.recipients == (Mailbox("Jörg", "netd.test"),)
    # Without SMTPUTF8 the next transaction's UTF-8 recipient is refused again.
    send(session, "MAIL FROM:<a@b.test>\r\nRCPT TO:<Jörg@netd.test>\r\nRSET\r\n")
    assert codes(transport) == ["250 2.1.0", "553 5.6.7", "250 2.0.0"]


class _NoUTF8Session(Session):
    def extensions(self) -> dict[bytes, list[bytes] | None]:
        found = super().extensions()
        del found[b"SMTPUTF8"]
        return found


class _NoUTF8Factory(SessionFactory):
    def buildProtocol(self, addr: Any) -> Any:
        session = _NoUTF8Session(self.receiver, self.secure)
        session.factory = self
        return session


def _relay_to(harness: Harness, factory: SessionFactory) -> Hop:
    client_address = IPv4Address("TCP", "127.0.0.1", 4000)

    class Endpoint:
        def connect(self, hop: Any) -> Deferred[Any]:
            client = hop.buildProtocol(None)
            server = factory.buildProtocol(client_address)
            iosim.connect(
                server,
                iosim.FakeTransport(server, True, peerAddress=client_address),
                client,
                iosim.FakeTransport(client, False),
                greet=False,
            ).flush()
            return succeed(client)

    options = SmarthostOptions("mx.netd.test", tls="none")
    return Hop("relay.netd.test", options, None, Endpoint, connections=1)


def _utf8_envelope(id: str, sender: str, utf8: bool = True) -> Envelope:
    return Envelope(id, sender, ("x@netd.test",), 0.0, 1, utf8=utf8)


def test_a_message_needing_smtputf8_goes_only_to_a_hop_offering_it() -> None:
    harness = Harness()
    hop = _relay_to(harness, _NoUTF8Factory(harness.receiver, secure=False))
    results = [
        hop.send(_utf8_envelope("1", USER), ["x@netd.test"], b"Subject: a\r\n\r\nb\r\n"),
        # SMTPUTF8 said but not needed: sent without it.
        hop.send(_utf8_envelope("2", "a@b.test"), ["x@netd.test"], b"Subject: a\r\n\r\nb\r\n"),
        hop.send(_utf8_envelope("3", "a@b.test"), ["x@netd.test"], "Subject: ü\r\n\r\n".encode()),
    ]
    outcomes = [result_of(r)["x@netd.test"] for r in results]
    assert [code for code, _ in outcomes] == [550, 250, 550]
    assert outcomes[0][1].startswith("5.6.7 SMTPUTF8 is required")
    assert [t.utf8 for t in harness.accepted] == [False]

    harness = Harness()
    hop = _relay_to(harness, harness.factory)
    sent = hop.send(_utf8_envelope("1", USER), ["Jörg@netd.test"], b"Subject: a\r\n\r\nb\r\n")
    assert result_of(sent)["Jörg@netd.test"][0] == 250
    (accepted,) = harness.accepted
    assert accepted.utf8 and str(accepted.sender) == USER
    assert accepted.recipients == (Mailbox("Jörg", "netd.test"),)


# CHUNKING / BDAT -------------------------------------------------------------


def test_pipelined_bdat_chunks_make_one_message() -> None:
    harness = Harness()
    session, transport = harness.connect()
    send(session, "EHLO client.test\r\n")
    assert "CHUNKING" in [line[4:] for line in replies(transport)]
    first = b"Subject: chunks\r\n\r\nline one\r\n.dot\r\n"
    second = b"bare\nLF and no final CRLF"
    send(
        session,
        b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@netd.test>\r\n"
        + b"BDAT %d\r\n" % len(first)
        + first
        + b"BDAT %d LAST\r\n" % len(second)
        + second
        + b"NOOP\r\n",
    )
    assert replies(transport) == [
        "250 2.1.0 Sender ok",
        "250 2.1.5 Recipient ok",
        f"250 2.0.0 {len(first)} octets received",
        "250 2.0.0 Ok: queued as id1",
        "250 2.0.0 Ok",
    ]
    (accepted,) = harness.accepted
    # Not dot-stuffed, so not unstuffed; bare LF normalised; a final CRLF added.
    assert accepted.data == first + b"bare\r\nLF and no final CRLF\r\n"


def test_bdat_split_across_reads_and_bdat_zero_last() -> None:
    harness = Harness()
    session, transport = harness.connect()
    send(session, "EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<x@netd.test>\r\nBDAT 20\r\nSubj")
    send(session, "ect: ")
    send(session, "s\r\n\r\nbody\r\nBDAT 0 last\r\n")
    assert codes(transport)[-2:] == ["250 2.0.0", "250 2.0.0"]
    assert harness.accepted[0].data == b"Subject: s\r\n\r\nbody\r\n"


def test_bdat_refusals_read_and_discard_the_chunk() -> None:
    harness = Harness()  # max_message_size 4096
    session, transport = harness.connect()
    send(session, "EHLO c\r\n")
    replies(transport)
    # No transaction: refused, and its octets (which look like commands) skipped.
    send(session, "BDAT 6\r\nQUIT\r\nBDAT x\r\nNOOP\r\n")
    assert codes(transport) == ["503 5.5.1", "501 5.5.4", "250 2.0.0"]
    send(session, "MAIL FROM:<a@b.test>\r\nBDAT 4 LAST\r\nabcd")
    assert codes(transport) == ["250 2.1.0", "554 5.5.1"]
    send(session, "RSET\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@netd.test>\r\n")
    send(session, b"BDAT 3000\r\n" + b"x" * 3000 + b"BDAT 3000 LAST\r\n" + b"y" * 3000)
    send(session, "BDAT 1 LAST\r\nz")  # the transaction failed: 503
    assert codes(transport) == [
        *("250 2.0.0", "250 2.1.0", "250 2.1.5"),  # RSET, MAIL, RCPT
        *("250 2.0.0", "552 5.3.4", "503 5.5.1"),
    ]
    # A huge size is refused at once and its octets thrown away, not kept.
    send(session, "MAIL FROM:<a@b.test>\r\nRCPT TO:<x@netd.test>\r\nBDAT 99999999999999999999\r\n")
    send(session, b"q" * 100_000)
    assert session._chunk is None and len(session._input) == 0
    assert codes(transport) == ["250 2.1.0", "250 2.1.5"]
    assert not harness.accepted


def test_bdat_and_data_do_not_mix_and_lines_are_checked() -> None:
    harness = Harness(limits=Limits(max_message_size=4096, max_line_length=100))
    session, transport = harness.connect()
    send(session, "EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@netd.test>\r\n")
    send(session, "BDAT 3\r\nab\nDATA\r\n")
    send(session, b"BDAT 201 LAST\r\n" + b"x" * 199 + b"\r\n")
    assert codes(transport)[-3:] == ["250 2.0.0", "503 5.5.1", "554 5.6.0"]
    assert not harness.accepted
    send(session, "MAIL FROM:<a@b.test>\r\nRCPT TO:<x@netd.test>\r\nBDAT 2 LAST\r\nok")
    assert codes(transport) == ["250 2.1.0", "250 2.1.5", "250 2.0.0"]


def test_bdat_timeout_and_a_client_gone_mid_chunk() -> None:
    harness = Harness()
    session, transport = harness.connect()
    send(session, "EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@netd.test>\r\nBDAT 10\r\nabc")
    replies(transport)
    harness.clock.advance(59)
    assert transport.connected
    harness.clock.advance(2)  # data_timeout (60) since the last octets
    assert codes(transport) == ["421 4.4.2"]
    session.connectionLost(Failure(ConnectionDone()))
    assert not harness.accepted


def test_rules_see_bdat_at_data_and_eom() -> None:
    harness = rules_harness(
        {"match": {"stage": "data"}, "reply": "554 5.7.0 no data today", "times": 1},
        {"match": {"stage": "data"}, "delay": 5},
    )
    session, transport = harness.connect()
    send(session, "EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@netd.test>\r\n")
    replies(transport)
    # The rule answers the first chunk: the transaction is over, later chunks get 503.
    send(session, "BDAT 2\r\nabBDAT 2 LAST\r\ncd")
    assert codes(transport) == ["554 5.7.0", "503 5.5.1"]
    send(session, "MAIL FROM:<a@b.test>\r\nRCPT TO:<x@netd.test>\r\nBDAT 2\r\nabBDAT 2 LAST\r\ncd")
    assert codes(transport) == ["250 2.1.0", "250 2.1.5"]  # the delay holds the rest
    harness.clock.advance(5)
    assert codes(transport) == ["250 2.0.0", "250 2.0.0"]
    assert harness.accepted[0].data == b"abcd\r\n"
