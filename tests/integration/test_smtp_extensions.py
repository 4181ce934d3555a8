"""
The SMTP extensions in the real daemon: SMTPUTF8 with smtplib and IMAP,
CHUNKING/BDAT over raw sockets, DSN bounces and release through a relay to
an aiosmtpd smarthost.
"""

from __future__ import annotations

import email
import imaplib
import json
import poplib
import socket
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from netd.testing import AdminError, NetdProcess
from tests.clients import smtp
from tests.conftest import StartNetd
from tests.integration.test_smtp import Smarthost
from tests.maps import mail_map, relaying

pytestmark = pytest.mark.integration

USER = "пользователь@netd.test"


@pytest.fixture(scope="module")
def netd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetdProcess]:
    base = tmp_path_factory.mktemp("smtpext")
    text = mail_map(
        base / "state",
        imap='{listen: ["tcp:0:interface=127.0.0.1"]}',
        pop3='{listen: ["tcp:0:interface=127.0.0.1"]}',
        mailboxes="{any_password: true, allow_insecure_auth: true}",
    )
    with NetdProcess.start(text, base) as process:
        yield process


def _send(netd: NetdProcess, mail: EmailMessage) -> str:
    last = netd.admin("GET", "/api/events?service=mail")["last_id"]
    with smtp(netd) as client:
        client.send_message(mail)
    [event] = netd.events("mail", "message.accepted", last, wait=10)
    message_id: str = event["message_id"]
    return message_id


def _imap_line(sock: socket.socket, reader: object, tag: bytes) -> list[bytes]:
    lines = []
    while True:
        line = reader.readline()  # type: ignore[attr-defined]
        assert line, lines
        lines.append(line)
        if line.startswith(tag + b" "):
            return lines


def test_smtputf8_addresses_are_stored_listed_and_read_over_imap(netd: NetdProcess) -> None:
    mail = EmailMessage()
    mail["From"] = "Jörg <jörg@bücher.example>"
    mail["To"] = USER
    mail["Subject"] = "Grüße"
    mail.set_content("Привет.\n")
    with smtp(netd) as client:
        client.ehlo()
        assert client.has_extn("smtputf8")
        # Without SMTPUTF8 a UTF-8 address is refused, and the session goes on.
        client.send("MAIL FROM:<jörg@bücher.example>\r\n".encode())
        code, reply = client.getreply()
        assert (code, reply[:5]) == (553, b"5.6.7")
    message_id = _send(netd, mail)  # smtplib says SMTPUTF8 for a UTF-8 address
    [listed] = netd.messages("mail", to=USER)
    assert listed["id"] == message_id
    assert listed["from"] == "jörg@bücher.example" and listed["to"] == [USER]
    assert listed["smtputf8"] is True and listed["subject"] == "Grüße"
    raw = netd.message("mail", message_id)
    assert b"with UTF8SMTP id" in raw and f"for <{USER}>".encode() in raw

    # The recipient's mailbox: its login is the UTF-8 address, sent as a literal.
    login = USER.encode()
    with socket.create_connection(netd.address("mail", protocol="imap"), timeout=10) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"* OK")
        sock.sendall(b"a LOGIN {%d}\r\n" % len(login))
        assert reader.readline().startswith(b"+")
        sock.sendall(login + b" secret\r\n")
        assert _imap_line(sock, reader, b"a")[-1].startswith(b"a OK")
        sock.sendall(b"b SELECT INBOX\r\n")
        assert b"* 1 EXISTS\r\n" in _imap_line(sock, reader, b"b")
        sock.sendall(b"c FETCH 1 BODY[]\r\n")
        fetched = b"".join(_imap_line(sock, reader, b"c"))
        assert f"To: {USER}".encode() in fetched and "Привет".encode() in fetched
        reader.close()
    # And over POP3 (poplib speaks UTF-8).
    pop = poplib.POP3(*netd.address("mail", protocol="pop3"), timeout=10)
    try:
        pop.user(USER)
        pop.pass_("secret")
        assert pop.stat()[0] == 1
        assert "Привет".encode() in b"\r\n".join(pop.retr(1)[1])
    finally:
        pop.quit()
    # Still serving plain SMTP.
    with smtp(netd) as client:
        assert client.noop()[0] == 250


def test_a_smtputf8_parameter_with_a_value_is_refused(netd: NetdProcess) -> None:
    with smtp(netd) as client:
        client.ehlo()
        code, _ = client.docmd("MAIL FROM:<a@b.test> SMTPUTF8=1")
        assert code == 501
        assert client.docmd("MAIL FROM:<a@b.test> SMTPUTF8")[0] == 250
        client.send(b"RCPT TO:<\xff@netd.test>\r\n")  # not UTF-8
        assert client.getreply()[0] == 501
        assert client.rset()[0] == 250


def _replies(reader: object, count: int) -> list[bytes]:
    """The last lines of C{count} replies."""
    found = []
    while len(found) < count:
        line = reader.readline()  # type: ignore[attr-defined]
        assert line, found
        if line[3:4] != b"-":
            found.append(line.rstrip(b"\r\n"))
    return found


def test_pipelined_bdat_chunks_over_a_socket(netd: NetdProcess) -> None:
    last = netd.admin("GET", "/api/events?service=mail")["last_id"]
    head = b"Subject: chunked\r\nTo: chunks@netd.test\r\n\r\n"
    body = b"".join(b"line %04d of a chunked message\r\n" % n for n in range(2000))
    with socket.create_connection(netd.address("mail"), timeout=10) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"220")
        sock.sendall(b"EHLO client.test\r\n")
        extensions = [reader.readline()]
        while extensions[-1][3:4] == b"-":
            extensions.append(reader.readline())
        assert b"CHUNKING" in [line[4:].strip() for line in extensions]
        # Everything in one write: the chunks pipelined behind MAIL and RCPT.
        sock.sendall(
            b"MAIL FROM:<alice@client.test>\r\nRCPT TO:<chunks@netd.test>\r\n"
            + b"BDAT %d\r\n" % len(head)
            + head
            + b"BDAT %d LAST\r\n" % len(body)
            + body
            + b"BDAT 5 LAST\r\nhello"  # after LAST: no transaction, 503, skipped
            + b"QUIT\r\n"
        )
        answers = _replies(reader, 6)
        reader.close()
    assert [a[:9] for a in answers] == [
        b"250 2.1.0",
        b"250 2.1.5",
        b"250 2.0.0",
        b"250 2.0.0",
        b"503 5.5.1",
        b"221 2.0.0",
    ]
    [event] = netd.events("mail", "message.accepted", last, wait=10)
    raw = netd.message("mail", event["message_id"])
    assert raw.endswith(head + body)
    [listed] = netd.messages("mail", to="chunks@netd.test")
    assert listed["subject"] == "chunked" and listed["size"] == len(raw)


def test_an_oversized_bdat_is_refused_and_the_session_goes_on(netd: NetdProcess) -> None:
    with socket.create_connection(netd.address("mail"), timeout=10) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"220")
        sock.sendall(b"HELO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<big@netd.test>\r\n")
        sock.sendall(b"BDAT 70000 LAST\r\n" + b"x" * 70000 + b"NOOP\r\n")
        answers = _replies(reader, 5)
        reader.close()
    assert [a[:9] for a in answers] == [
        b"250 mx.ne",
        b"250 2.1.0",
        b"250 2.1.5",
        b"552 5.3.4",  # max_message_size is 65536 here
        b"250 2.0.0",
    ]
    assert netd.messages("mail", to="big@netd.test") == []


def test_binarymime_by_bdat_is_stored_octet_for_octet_and_read_over_imap(
    netd: NetdProcess,
) -> None:
    last = netd.admin("GET", "/api/events?service=mail")["last_id"]
    head = b"Subject: binary\r\nTo: bin@netd.test\r\nContent-Transfer-Encoding: binary\r\n\r\n"
    body = b"\x00\x01\xfe\xff bare\nLF, bare\rCR, " + b"long" * 500 + b"\x00"
    with smtp(netd) as client:
        client.ehlo()
        assert client.has_extn("binarymime") and client.has_extn("chunking")
        assert client.mail("alice@client.test", ["BODY=BINARYMIME"])[0] == 250
        assert client.rcpt("bin@netd.test")[0] == 250
        client.send(b"BDAT %d\r\n" % len(head) + head)
        assert client.getreply()[0] == 250
        client.send(b"BDAT %d LAST\r\n" % len(body) + body)
        code, reply = client.getreply()
        assert code == 250 and reply.startswith(b"2.0.0 Ok: queued"), reply
    [event] = netd.events("mail", "message.accepted", last, wait=10)
    raw = netd.message("mail", event["message_id"])
    assert raw.endswith(head + body)  # no CRLF rewriting, no line limit, no CRLF added
    client_imap = imaplib.IMAP4(*netd.address("mail", protocol="imap"), timeout=10)
    try:
        client_imap.login("bin@netd.test", "secret")
        client_imap.select("INBOX")
        status, data = client_imap.fetch("1", "(BODY.PEEK[TEXT])")
        assert status == "OK" and data[0][1] == body
    finally:
        client_imap.logout()


def test_binarymime_by_data_or_over_the_size_is_refused_and_the_session_goes_on(
    netd: NetdProcess,
) -> None:
    with smtp(netd) as client:
        client.ehlo()
        client.mail("alice@client.test", ["BODY=BINARYMIME"])
        client.rcpt("binbad@netd.test")
        assert client.docmd("DATA") == (
            503,
            b"5.5.1 BODY=BINARYMIME comes by BDAT, not DATA (RFC 3030 3)",
        )
        assert client.rset()[0] == 250
        client.mail("alice@client.test", ["BODY=BINARYMIME"])
        client.rcpt("binbad@netd.test")
        client.send(b"BDAT 70000 LAST\r\n" + b"\x00" * 70000)
        assert client.getreply()[0] == 552  # max_message_size is 65536 here
        assert client.noop()[0] == 250
    assert netd.messages("mail", to="binbad@netd.test") == []
    with smtp(netd) as client:
        assert client.noop()[0] == 250


@pytest.fixture
def smarthost() -> Iterator[Smarthost]:
    """aiosmtpd on loopback, without AUTH; recipients named reject* are refused."""
    host = Smarthost(auth_required=False)
    host.start()
    try:
        yield host
    finally:
        host.stop()


def _wait_received(smarthost: Smarthost, count: int) -> list[tuple[str, list[str], bytes]]:
    with smarthost.arrived:
        assert smarthost.arrived.wait_for(lambda: len(smarthost.received) >= count, timeout=20)
    return smarthost.received


def test_a_dsn_with_ret_hdrs_bounces_with_headers_only(
    start_netd: StartNetd, tmp_path: Path, smarthost: Smarthost
) -> None:
    netd = start_netd(
        relaying(
            tmp_path / "state",
            f"mode: smarthost, smarthost: '127.0.0.1:{smarthost.port}', tls: none",
        )
    )
    body = b"Subject: secret\r\n\r\nthe body stays home\r\n"
    with smtp(netd) as client:
        refused = client.sendmail(
            "alice@client.test",
            ["reject@far.test", "reject-quietly@far.test"],
            body,
            mail_options=["RET=HDRS", "ENVID=order+2B42"],
            rcpt_options=["NOTIFY=FAILURE ORCPT=rfc822;reject+40old.test"],
        )
        assert refused == {}
        # NOTIFY=NEVER: refused as well, and no bounce at all.
        client.sendmail(
            "alice@client.test", ["reject@far.test"], body, rcpt_options=["NOTIFY=NEVER"]
        )
    [(sender, recipients, report)] = _wait_received(smarthost, 1)
    assert (sender, recipients) == ("<>", ["alice@client.test"])
    parsed = email.message_from_bytes(report)
    assert parsed.get_content_type() == "multipart/report"
    _, status, returned = parsed.get_payload()
    assert returned.get_content_type() == "text/rfc822-headers"
    assert b"Subject: secret" in report and b"the body stays home" not in report
    text = status.as_string()
    assert "Original-Envelope-Id: order+42" in text
    assert "Original-Recipient: rfc822;reject@old.test" in text
    bounced = _events(netd, "message.bounced", 2)
    assert sorted(b["notified"] or "" for b in bounced) == ["", "alice@client.test"]
    # The report delivered, and nothing else: no report for NOTIFY=NEVER.
    [delivered] = _events(netd, "message.delivered", 1)
    assert delivered["recipients"] == ["alice@client.test"]
    assert len(smarthost.received) == 1


def test_notify_delay_earns_one_delay_report_once_delay_warning_passes(
    start_netd: StartNetd, tmp_path: Path, smarthost: Smarthost
) -> None:
    netd = start_netd(
        relaying(
            tmp_path / "state",
            f"mode: smarthost, smarthost: '127.0.0.1:{smarthost.port}', tls: none,"
            " retry: [0.3], delay_warning: 0.5",
        )
    )
    with smtp(netd) as client:
        client.sendmail(
            "alice@client.test",
            ["later@far.test"],  # the smarthost answers 451 to later*
            b"Subject: slow\r\n\r\nstill trying\r\n",
            rcpt_options=["NOTIFY=DELAY,FAILURE"],
        )
    [(sender, recipients, report)] = _wait_received(smarthost, 1)
    assert (sender, recipients) == ("<>", ["alice@client.test"])
    parsed = email.message_from_bytes(report)
    assert parsed["Subject"] == "Delayed Mail (still being retried)"
    _, status, _ = parsed.get_payload()
    recipient = status.get_payload()[1]
    assert recipient["Action"] == "delayed" and recipient["Status"] == "4.3.0"
    assert recipient["Will-Retry-Until"]
    [delayed] = _events(netd, "message.delayed", 1)
    assert delayed["notified"] == "alice@client.test"
    # Still queued and retried, and not reported on again.
    _events(netd, "message.deferred", 4)
    assert len(netd.events("mail", "message.delayed", 0)) == 1
    assert len(smarthost.received) == 1


def _events(netd: NetdProcess, kind: str, count: int) -> list[dict[str, Any]]:
    """The first C{count} events of C{kind}, waiting for them up to 20 s."""
    deadline = time.monotonic() + 20
    found = netd.events("mail", kind, 0)
    while len(found) < count and time.monotonic() < deadline:
        since = found[-1]["id"] if found else 0
        found += netd.events("mail", kind, since, wait=max(deadline - time.monotonic(), 0.1))
    assert len(found) >= count, found
    return found[:count]


def _release(netd: NetdProcess, message_id: str, body: object) -> Any:
    return netd.admin(
        "POST",
        f"/api/services/mail/messages/{message_id}/release",
        json.dumps(body).encode(),
    )


def test_release_sends_a_captured_message_on_to_a_smarthost(
    netd: NetdProcess, smarthost: Smarthost
) -> None:
    mail = EmailMessage()
    mail["From"] = "shop@client.test"
    mail["To"] = "held@netd.test"
    mail["Subject"] = "release me"
    mail.set_content("Captured, then sent on.\n")
    message_id = _send(netd, mail)
    last = netd.admin("GET", "/api/events?service=mail")["last_id"]
    answer = _release(
        netd,
        message_id,
        {"to": ["real@far.test", "reject@far.test"], "smarthost": f"127.0.0.1:{smarthost.port}"},
    )
    assert answer["id"] == message_id and answer["released"] == 1
    assert answer["to"]["real@far.test"]["code"] == 250
    assert answer["to"]["reject@far.test"] == {"code": 550, "reply": "5.1.1 No such user here"}
    [(sender, recipients, content)] = _wait_received(smarthost, 1)
    assert (sender, recipients) == ("shop@client.test", ["real@far.test"])
    assert content == netd.message("mail", message_id)  # as captured, Received: and all
    [event] = netd.events("mail", "message.released", last, wait=10)
    assert event["recipients"] == ["real@far.test", "reject@far.test"]
    # The message stays captured.
    assert [m["id"] for m in netd.messages("mail", to="held@netd.test")] == [message_id]


def _bdat_binarymime(netd: NetdProcess, to: str, message: bytes) -> str:
    """C{message} sent with BODY=BINARYMIME in one BDAT; its id."""
    last = netd.admin("GET", "/api/events?service=mail")["last_id"]
    with smtp(netd) as client:
        client.ehlo()
        assert client.mail("alice@client.test", ["BODY=BINARYMIME"])[0] == 250
        assert client.rcpt(to)[0] == 250
        client.send(b"BDAT %d LAST\r\n" % len(message) + message)
        assert client.getreply()[0] == 250
    [event] = netd.events("mail", "message.accepted", last, wait=10)
    message_id: str = event["message_id"]
    return message_id


def test_a_released_binarymime_message_goes_on_as_7bit_mime(
    netd: NetdProcess, smarthost: Smarthost
) -> None:
    binary = bytes(range(256)) + b"bare\nLF, bare\rCR, " + b"long" * 500
    message = (
        b"From: alice@client.test\r\nTo: bin-release@netd.test\r\nSubject: binary\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=zz\r\n\r\n"
        b"--zz\r\nContent-Type: text/plain\r\n\r\nSee the attachment.\r\n"
        b"--zz\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Transfer-Encoding: binary\r\n\r\n" + binary + b"\r\n--zz--\r\n"
    )
    message_id = _bdat_binarymime(netd, "bin-release@netd.test", message)
    assert netd.messages("mail", to="bin-release@netd.test")[0]["binarymime"] is True
    answer = _release(
        netd, message_id, {"to": ["real@far.test"], "smarthost": f"127.0.0.1:{smarthost.port}"}
    )
    assert answer["released"] == 1
    [*_, (sender, recipients, content)] = _wait_received(smarthost, 1)
    assert (sender, recipients) == ("alice@client.test", ["real@far.test"])
    # Lines of 7-bit text, each CRLF-ended and short enough for DATA...
    assert content.isascii() and b"\x00" not in content
    lines = content.split(b"\r\n")
    assert all(b"\r" not in line and b"\n" not in line and len(line) <= 998 for line in lines)
    # ... that parse as the message captured: the text as it was, the binary in base64.
    parsed = email.message_from_bytes(content)
    text, attachment = parsed.get_payload()  # type: ignore[misc]
    assert text.get_payload() == "See the attachment."
    assert attachment["Content-Transfer-Encoding"] == "base64"
    assert attachment.get_payload(decode=True) == binary
    captured = netd.message("mail", message_id)
    assert content.startswith(captured[: captured.index(b"--zz\r\nContent-Type: application")])


def test_a_binarymime_message_that_cannot_be_made_7bit_is_not_released(
    netd: NetdProcess, smarthost: Smarthost
) -> None:
    # Binary in a quoted-printable part: no encoding to give it but its own.
    message = b"Subject: broken\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n\x00=00\n"
    message_id = _bdat_binarymime(netd, "bin-refused@netd.test", message)
    target = {"to": ["real@far.test"], "smarthost": f"127.0.0.1:{smarthost.port}"}
    with pytest.raises(AdminError) as refused:
        _release(netd, message_id, target)
    assert refused.value.status == 422
    assert "BINARYMIME" in str(refused.value) and smarthost.received == []
    # The daemon goes on: the message is still there, and a 7-bit one is released.
    assert [m["id"] for m in netd.messages("mail", to="bin-refused@netd.test")] == [message_id]
    plain = _bdat_binarymime(netd, "bin-refused@netd.test", b"Subject: fine\r\n\r\nlines\r\n")
    assert _release(netd, plain, target)["released"] == 1
    [(_, _, content)] = _wait_received(smarthost, 1)
    assert content.endswith(b"Subject: fine\r\n\r\nlines\r\n")


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("nope/release", {"to": ["a@far.test"], "smarthost": "127.0.0.1:25"}, 404),
        ("{id}/launch", {"to": ["a@far.test"], "smarthost": "127.0.0.1:25"}, 404),
        ("{id}/release", {"to": [], "smarthost": "127.0.0.1:25"}, 400),
        ("{id}/release", {"to": ["a%b@far.test"], "smarthost": "127.0.0.1:25"}, 400),
        ("{id}/release", {"to": ["a@far.test"], "smarthost": "127.0.0.1"}, 400),
        ("{id}/release", {"to": ["a@far.test"], "smarthost": "127.0.0.1:99999"}, 400),
        ("{id}/release", {"to": ["a@far.test"], "smarthost": "h:1", "x": 1}, 400),
        ("{id}/release", ["a@far.test"], 400),
    ],
)
def test_bad_releases_are_refused_and_the_daemon_goes_on(
    netd: NetdProcess, path: str, body: object, status: int
) -> None:
    message_id = _send(netd, _plain("bad-release@netd.test"))
    with pytest.raises(AdminError) as refused:
        netd.admin(
            "POST",
            "/api/services/mail/messages/" + path.format(id=message_id),
            json.dumps(body).encode(),
        )
    assert refused.value.status == status
    assert netd.messages("mail", to="bad-release@netd.test")


def test_a_release_to_a_smarthost_that_is_down_is_502(netd: NetdProcess) -> None:
    message_id = _send(netd, _plain("down@netd.test"))
    with socket.socket() as holder:  # bound, not listening: connections are refused
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        with pytest.raises(AdminError) as refused:
            _release(netd, message_id, {"to": ["a@far.test"], "smarthost": f"127.0.0.1:{port}"})
    assert refused.value.status == 502 and f"127.0.0.1:{port}" in refused.value.body
    assert netd.messages("mail", to="down@netd.test")


def _plain(to: str) -> EmailMessage:
    mail = EmailMessage()
    mail["From"] = "shop@client.test"
    mail["To"] = to
    mail["Subject"] = "plain"
    mail.set_content("x\n")
    return mail


class _AsciiSmarthost(Smarthost):
    """The smarthost without SMTPUTF8 (aiosmtpd's Controller offers it by default)."""

    def start(self) -> None:
        self.controller = Controller(
            self, hostname="127.0.0.1", port=self.port, enable_SMTPUTF8=False
        )
        self.controller.start()


@pytest.mark.parametrize("offered", [True, False])
def test_a_message_needing_smtputf8_goes_only_to_a_hop_offering_it(
    start_netd: StartNetd, tmp_path: Path, offered: bool
) -> None:
    smarthost = Smarthost(auth_required=False) if offered else _AsciiSmarthost()
    smarthost.start()
    try:
        netd = start_netd(
            relaying(
                tmp_path / "state",
                f"mode: smarthost, smarthost: '127.0.0.1:{smarthost.port}', tls: none",
            )
        )
        with smtp(netd) as client:
            client.sendmail(
                "alice@client.test",
                ["юля@far.test", "plain@far.test"],
                b"Subject: hi\r\n\r\nhello\r\n",
                mail_options=["SMTPUTF8"],
            )
        [(sender, recipients, content)] = _wait_received(smarthost, 1)
    finally:
        smarthost.stop()
    if offered:
        assert (sender, recipients) == ("alice@client.test", ["юля@far.test", "plain@far.test"])
        assert b"with UTF8SMTP id" in content
        return
    # Not sent without SMTPUTF8 (RFC 6531 3.2): bounced to the sender instead.
    assert (sender, recipients) == ("<>", ["alice@client.test"])
    text = content.decode()
    assert "Final-Recipient: utf-8; юля@far.test" in text
    assert "Status: 5.6.7" in text and "SMTPUTF8 is required" in text
    [bounced] = _events(netd, "message.bounced", 1)
    assert bounced["recipients"] == ["юля@far.test", "plain@far.test"]


def test_a_restart_keeps_a_deferred_message_s_schedule(tmp_path: Path) -> None:
    smarthost = Smarthost(auth_required=False)  # bound, not listening: down
    text = relaying(
        tmp_path / "state",
        f"mode: smarthost, smarthost: '127.0.0.1:{smarthost.port}', tls: none, retry: [60]",
    )
    try:
        with NetdProcess.start(text, tmp_path / "first") as netd:
            with smtp(netd) as client:
                client.sendmail(
                    "alice@client.test", ["queued@far.test"], b"Subject: s\r\n\r\nx\r\n"
                )
            [deferred] = netd.events("mail", "message.deferred", 0, wait=10)
            assert deferred["retry_in"] == 60
        assert len(list((tmp_path / "state" / "smtp" / "mail").glob("*.retry"))) == 1
        smarthost.start()  # up now: a restart that retried at once would deliver at once
        with NetdProcess.start(text, tmp_path / "second") as netd:
            assert netd.events("mail", "spool.recovered", 0, wait=10)
            tried = netd.events("mail", "message.delivered,message.deferred", 0, wait=3)
            assert tried == [] and len(netd.messages("mail")) == 1
        assert smarthost.received == []
    finally:
        smarthost.stop()
