"""
The SMTP extensions beyond RFC 5321 the smtp kind speaks, without sockets:
SMTPUTF8 (RFC 6531), CHUNKING/BDAT (RFC 3030) and DSN (RFC 3461).
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.test import iosim

from netd.services.smtp.address import Mailbox, PathRefused, parse_path
from netd.services.smtp.relay import Hop, SmarthostOptions
from netd.services.smtp.server import Session, SessionFactory
from netd.services.smtp.spool import Envelope
from tests.unit.test_smtp import Harness, codes, replies, result_of, send

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
    assert "250 SMTPUTF8" in replies(transport)
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
