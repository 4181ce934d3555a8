"""
The SMTP extensions beyond RFC 5321 the smtp kind speaks, without sockets:
SMTPUTF8 (RFC 6531), CHUNKING/BDAT (RFC 3030) and DSN (RFC 3461).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.test import iosim

from netd.services.smtp.address import Mailbox, PathRefused, parse_path
from netd.services.smtp.relay import Courier, Hop, Replies, SmarthostOptions
from netd.services.smtp.server import Limits, Session, SessionFactory, Transaction
from netd.services.smtp.spool import Envelope, Notify, Spool
from netd.services.smtp.store import MailStore
from tests.unit.test_smtp import (
    Harness,
    accept,
    codes,
    make_courier,
    replies,
    result_of,
    rules_harness,
    send,
)

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


# RFC 5322 3.2.3's atext, to which RFC 6531 3.3 adds every non-ASCII character.
_ATEXT = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~")


@pytest.mark.parametrize(
    "character", [chr(c) for c in range(33, 127) if chr(c) != "."] + list("éß中😀\U0010fffd")
)
def test_a_utf8_local_part_takes_atext_and_non_ascii(character: str) -> None:
    raw = f"<a{character}b@netd.test>".encode()
    if character in _ATEXT or ord(character) > 127:
        assert parse_path(raw, False, "mx", utf8=True) == Mailbox(f"a{character}b", "netd.test")
    else:
        with pytest.raises(PathRefused):
            parse_path(raw, False, "mx", utf8=True)


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


# BINARYMIME ------------------------------------------------------------------

BINARY = b"Subject: bin\r\nContent-Transfer-Encoding: binary\r\n\r\n\x00\xff\rraw\n" + b"z" * 300


def test_binarymime_is_offered_and_kept_octet_for_octet() -> None:
    harness = Harness(limits=Limits(max_message_size=4096, max_line_length=100), binarymime=True)
    session, transport = harness.connect()
    send(session, "EHLO c\r\n")
    assert "BINARYMIME" in [line[4:] for line in replies(transport)]
    send(session, "MAIL FROM:<a@b.test> BODY=BINARYMIME\r\nRCPT TO:<x@netd.test>\r\n")
    half = len(BINARY) // 2
    send(session, b"BDAT %d\r\n" % half + BINARY[:half])
    send(session, b"BDAT %d LAST\r\n" % (len(BINARY) - half) + BINARY[half:])
    assert codes(transport) == ["250 2.1.0", "250 2.1.5", "250 2.0.0", "250 2.0.0"]
    # No bare CR or LF rewriting, no line-length limit, no final CRLF added.
    assert harness.accepted[0].data == BINARY


def test_binarymime_refusals() -> None:
    harness = Harness(binarymime=True)  # max_message_size 4096
    session, transport = harness.connect()
    send(session, "EHLO c\r\nMAIL FROM:<a@b.test> BODY=BINARYMIME\r\nRCPT TO:<x@netd.test>\r\n")
    replies(transport)
    # RFC 3030 3: DATA after BODY=BINARYMIME is 503; the client is to RSET.
    send(session, "DATA\r\nRSET\r\n")
    assert replies(transport) == [
        "503 5.5.1 BODY=BINARYMIME comes by BDAT, not DATA (RFC 3030 3)",
        "250 2.0.0 Ok",
    ]
    # The size limit holds for binary chunks too; the chunk is read and dropped.
    send(session, "MAIL FROM:<a@b.test> BODY=BINARYMIME\r\nRCPT TO:<x@netd.test>\r\n")
    send(session, b"BDAT 5000 LAST\r\n" + b"\x00" * 5000 + b"NOOP\r\n")
    assert codes(transport) == ["250 2.1.0", "250 2.1.5", "552 5.3.4", "250 2.0.0"]
    send(session, "MAIL FROM:<a@b.test> BODY=binarymime\r\nRCPT TO:<x@netd.test>\r\n")
    send(session, b"BDAT 2 LAST\r\n\x00\x01")
    assert codes(transport) == ["250 2.1.0", "250 2.1.5", "250 2.0.0"]
    assert [t.data for t in harness.accepted] == [b"\x00\x01"]


def test_binarymime_is_refused_where_it_could_not_be_sent_on() -> None:
    harness = Harness()  # binarymime False: a relaying service
    session, transport = harness.connect()
    send(session, "EHLO c\r\n")
    assert "BINARYMIME" not in [line[4:] for line in replies(transport)]
    send(session, "MAIL FROM:<a@b.test> BODY=BINARYMIME\r\nMAIL FROM:<a@b.test> BODY=QP\r\n")
    assert replies(transport) == [
        "555 5.5.4 BODY=BINARYMIME is taken in capture mode only",
        "501 5.5.4 BODY is 7BIT, 8BITMIME or BINARYMIME",
    ]


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


# DSN -------------------------------------------------------------------------


def test_dsn_parameters_are_checked_and_kept() -> None:
    harness = Harness()
    session, transport = harness.connect()
    send(session, "EHLO c\r\n")
    assert "DSN" in [line[4:] for line in replies(transport)]
    for bad in ("RET=PART", "ENVID=a+zz", "ENVID=" + "x" * 101, "RET=FULL RET=HDRS", "X=1"):
        send(session, f"MAIL FROM:<a@b.test> {bad}\r\n")
    send(session, "MAIL FROM:<a@b.test> RET=hdrs ENVID=QQ+2B314\r\n")
    for bad in ("NOTIFY=NEVER,SUCCESS", "NOTIFY=SOMETIMES", "NOTIFY=", "ORCPT=bob", "ORCPT=;x"):
        send(session, f"RCPT TO:<x@netd.test> {bad}\r\n")
    send(session, "RCPT TO:<x@netd.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Bob+40old.test\r\n")
    send(session, "RCPT TO:<y@netd.test> NOTIFY=never\r\nRCPT TO:<z@netd.test>\r\n")
    send(session, "RCPT TO:<w@netd.test> COLOUR=red\r\nDATA\r\n" + "Subject: s\r\n\r\nb\r\n.\r\n")
    assert codes(transport) == [
        *["501 5.5.4"] * 4,
        "555 5.5.4",
        "250 2.1.0",
        *["501 5.5.4"] * 5,
        *["250 2.1.5"] * 3,
        "555 5.5.4",
        "354",
        "250 2.0.0",
    ]
    (accepted,) = harness.accepted
    assert (accepted.ret, accepted.envid) == ("HDRS", "QQ+314")
    assert accepted.dsn == {
        "x@netd.test": Notify(("SUCCESS", "FAILURE"), "rfc822;Bob@old.test"),
        "y@netd.test": Notify(("NEVER",)),
    }


def _accept_with_dsn(store: MailStore, ret: str | None, **dsn: Notify) -> str:
    transaction = Transaction(
        sender=Mailbox("alice", "client.test"),
        recipients=tuple(Mailbox(r, "far.test") for r in dsn),
        data=b"Subject: s\r\n\r\nthe secret body\r\n",
        helo="c.test",
        client="127.0.0.1",
        user=None,
        protocol="ESMTP",
        ret=ret,
        envid="env-1",
        dsn={f"{r}@far.test": notify for r, notify in dsn.items()},
    )
    id: str = result_of(store.accept(transaction))
    return id


@pytest.mark.parametrize("ret", ["HDRS", "FULL"])
def test_bounces_honour_ret_envid_orcpt_and_notify_never(tmp_path: Path, ret: str) -> None:
    _, store, upstream, clock, journal = make_courier(tmp_path)
    refused = (550, "5.1.1 no such user")
    upstream.answers = [
        {"a@far.test": refused, "b@far.test": refused},
        {"alice@client.test": (250, "ok")},  # the bounce, for a only
    ]
    _accept_with_dsn(
        store,
        ret,
        a=Notify(("FAILURE",), "rfc822;old-a@far.test"),
        b=Notify(("NEVER",)),
    )
    clock.advance(0)
    bounce, report = upstream.attempts[1]
    assert bounce.recipients == ("alice@client.test",) and bounce.bounce
    assert b"Original-Envelope-Id: env-1\r\nReporting-MTA: dns; mx.netd.test" in report
    assert (
        b"Original-Recipient: rfc822;old-a@far.test\r\nFinal-Recipient: rfc822; a@far.test"
        in report
    )
    assert b"b@far.test" not in report  # NOTIFY=NEVER
    if ret == "HDRS":
        assert b"Content-Type: text/rfc822-headers\r\n\r\nReceived: from c.test" in report
        assert b"the secret body" not in report
    else:
        assert b"Content-Type: message/rfc822\r\n\r\nReceived: from c.test" in report
        assert b"Subject: s\r\n\r\nthe secret body\r\n\r\n--netd-" in report
    [event] = journal.select(types=["message.bounced"])
    assert event.fields["recipients"] == ["a@far.test", "b@far.test"]
    assert not upstream.answers and not store.messages


def test_notify_never_alone_sends_no_bounce(tmp_path: Path) -> None:
    _, store, upstream, clock, journal = make_courier(tmp_path)
    upstream.answers = [{"a@far.test": (550, "5.1.1 no such user")}]
    _accept_with_dsn(store, None, a=Notify(("NEVER",)))
    clock.advance(0)
    clock.advance(0)
    assert len(upstream.attempts) == 1 and not store.messages
    [event] = journal.select(types=["message.bounced"])
    assert event.fields["notified"] is None


def test_notify_success_reports_relaying_unless_the_hop_took_it_on(tmp_path: Path) -> None:
    _, store, upstream, clock, _ = make_courier(tmp_path)
    took_on = Replies({"c@far.test": (250, "2.0.0 ok")})
    took_on.passed_on = frozenset({"c@far.test"})
    upstream.answers = [
        {"a@far.test": (250, "2.0.0 queued"), "b@far.test": (250, "2.0.0 queued")},
        {"alice@client.test": (250, "ok")},  # the report, for a only
        took_on,
    ]
    _accept_with_dsn(store, None, a=Notify(("SUCCESS",)), b=Notify(("FAILURE", "DELAY")))
    clock.advance(0)
    clock.advance(0)
    report_envelope, report = upstream.attempts[1]
    assert report_envelope.sender == "" and report_envelope.recipients == ("alice@client.test",)
    assert b"Subject: Successful Mail Relay Report" in report
    assert b"Final-Recipient: rfc822; a@far.test\r\nAction: relayed\r\nStatus: 2.0.0" in report
    assert b"b@far.test" not in report
    _accept_with_dsn(store, None, c=Notify(("SUCCESS",)))
    clock.advance(0)
    clock.advance(0)
    assert len(upstream.attempts) == 3 and not upstream.answers and not store.messages


def test_dsn_requests_go_on_to_a_hop_offering_dsn() -> None:
    harness = Harness()
    hop = _relay_to(harness, harness.factory)
    envelope = Envelope(
        "1",
        "a@b.test",
        ("x@netd.test",),
        0.0,
        1,
        ret="FULL",
        envid="id with space+",
        dsn={"x@netd.test": Notify(("SUCCESS", "DELAY"), "rfc822;x=y@old.test")},
    )
    outcome = result_of(hop.send(envelope, ["x@netd.test"], b"Subject: a\r\n\r\nb\r\n"))
    assert outcome["x@netd.test"][0] == 250 and outcome.passed_on == {"x@netd.test"}
    (accepted,) = harness.accepted
    assert (accepted.ret, accepted.envid) == ("FULL", "id with space+")
    assert accepted.dsn == {"x@netd.test": Notify(("SUCCESS", "DELAY"), "rfc822;x=y@old.test")}


# Delay reports (RFC 3461 NOTIFY=DELAY) -----------------------------------------


def test_a_message_waiting_past_delay_warning_earns_one_delay_report(tmp_path: Path) -> None:
    courier, store, upstream, clock, journal = make_courier(tmp_path)  # retry (10, 60)
    courier.delay_warning = 65
    later = (451, "4.2.0 mailbox busy")
    upstream.answers = [
        {"a@far.test": later, "b@far.test": later},  # at 0 s
        {"a@far.test": later, "b@far.test": later},  # at 10 s
        {"a@far.test": later, "b@far.test": later},  # at 70 s: past delay_warning
        {"alice@client.test": (250, "ok")},  # the delay report, for a only
        {"a@far.test": later, "b@far.test": later},  # at 130 s: no second report
    ]
    id = _accept_with_dsn(store, None, a=Notify(("DELAY", "FAILURE")), b=Notify(("FAILURE",)))
    clock.advance(0)
    clock.advance(10)
    assert len(upstream.attempts) == 2 and not journal.select(types=["message.delayed"])
    clock.advance(60)
    clock.advance(0)
    notice, report = upstream.attempts[3]
    assert notice.recipients == ("alice@client.test",) and notice.sender == ""
    assert b"Subject: Delayed Mail (still being retried)" in report
    assert b"Final-Recipient: rfc822; a@far.test\r\nAction: delayed\r\nStatus: 4.2.0" in report
    assert b"Will-Retry-Until: " in report and b"b@far.test" not in report
    [event] = journal.select(types=["message.delayed"])
    assert event.fields["recipients"] == ["a@far.test", "b@far.test"]
    assert event.fields["notified"] == "alice@client.test"
    assert id in store.messages  # still queued
    clock.advance(60)
    assert len(upstream.attempts) == 5 and len(journal.select(types=["message.delayed"])) == 1
    # The warning is part of the retry state: a restart does not warn again.
    [state] = result_of(store.spool.retries()).values()
    assert state.warned


def test_no_delay_report_without_notify_delay_or_with_delay_warning_0(tmp_path: Path) -> None:
    for delay_warning, notify in ((65.0, None), (0.0, Notify(("DELAY",)))):
        courier, store, upstream, clock, journal = make_courier(tmp_path / str(delay_warning))
        courier.delay_warning = delay_warning
        upstream.answers = [{"a@far.test": (451, "4.2.0 busy")}] * 3
        dsn = {} if notify is None else {"a": notify}
        if dsn:
            _accept_with_dsn(store, None, **dsn)
        else:
            accept(store, Mailbox("alice", "client.test"), "a@far.test")
        for step in (0, 10, 60):
            clock.advance(step)
        assert len(upstream.attempts) == 3  # three tries, no report among them
        delayed = journal.select(types=["message.delayed"])
        assert [e.fields["notified"] for e in delayed] == ([None] if delay_warning else [])


# Retry state across a restart -------------------------------------------------


def test_a_restart_takes_up_each_message_s_retry_schedule(tmp_path: Path) -> None:
    courier, store, upstream, clock, _ = make_courier(tmp_path)  # retry (10, 60)
    upstream.answers = [ConnectionRefusedError("down")] * 3
    first = accept(store, Mailbox("s", "client.test"), "a@far.test")
    clock.advance(0)  # attempt 1 fails: next in 10 s
    clock.advance(10)  # attempt 2 fails: next in 60 s
    second = accept(store, Mailbox("s", "client.test"), "b@far.test")
    clock.advance(0)  # its attempt 1 fails: next in 10 s
    courier.stopService()
    store.stopService()
    retries = {p.name for p in store.spool.directory.glob("*.retry")}
    assert retries == {f"{first}.retry", f"{second}.retry"}

    # The restart, 5 s later: neither is tried at once.
    clock.advance(5)
    store = MailStore(store.spool, store.context, "mx.netd.test")
    courier = Courier(store.context, store.spool, upstream, "mx.netd.test", (10, 60), 1000)
    store.deliver = courier.schedule
    courier.store = store
    store.startService()
    courier.startService()
    upstream.answers = [{"b@far.test": (250, "ok")}, {"a@far.test": (250, "ok")}]
    clock.advance(0)
    assert len(upstream.attempts) == 3
    clock.advance(5)  # the second's retry was due 10 s after its first attempt
    assert [e.recipients for e, _ in upstream.attempts[3:]] == [("b@far.test",)]
    clock.advance(49)
    assert len(upstream.attempts) == 4
    clock.advance(1)  # the first's, 60 s after its second attempt
    assert [e.recipients for e, _ in upstream.attempts[4:]] == [("a@far.test",)]
    assert not store.messages and not list(store.spool.directory.iterdir())


def test_a_retry_state_without_its_message_is_removed(tmp_path: Path) -> None:
    spool = Spool(tmp_path, maybeDeferred)
    (tmp_path / "gone.retry").write_text('{"attempts": 2, "due": 5}')
    (tmp_path / "bad.retry").write_text("{")
    (tmp_path / "bad.msg").write_bytes(b"")
    assert result_of(spool.retries()) == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.msg", "bad.retry"]
