"""
Captured mail read over IMAP and POP3 with real clients: imaplib, poplib,
curl and Twisted's IMAP4Client, over plain connections upgraded with
STARTTLS/STLS and over implicit TLS, each verifying the lab profile's CA.
"""

from __future__ import annotations

import email.policy
import imaplib
import poplib
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, protocol
from twisted.internet import reactor as global_reactor
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.threads import deferToThread
from twisted.mail import imap4

from netd.testing import AdminError, NetdProcess
from tests.clients import deliver, smtp
from tests.maps import mail_map

PASSWORD = "mail-secret"
MAILBOXES = {
    "imap": '{listen: ["tcp:0:interface=127.0.0.1", '
    '{endpoint: "ssl:0:interface=127.0.0.1", tls: lab}]}',
    "pop3": '{listen: ["tcp:0:interface=127.0.0.1", '
    '{endpoint: "ssl:0:interface=127.0.0.1", tls: lab}]}',
    "mailboxes": f'{{users: {{all: {{password: "{PASSWORD}"}}, '
    f'"ann@netd.test": {{password: "{PASSWORD}"}}, '
    f'"ben@netd.test": {{password: "{PASSWORD}"}}, '
    f'"cy@netd.test": {{password: "{PASSWORD}"}}, '
    f'"dee@netd.test": {{password: "{PASSWORD}"}}, '
    f'"eve@netd.test": {{password: "{PASSWORD}"}}, '
    f'"fay@netd.test": {{password: "{PASSWORD}"}}, '
    f'"gus@netd.test": {{password: "{PASSWORD}"}}, '
    f'"hal@netd.test": {{password: "{PASSWORD}"}}}}}}',
}


def test_links_codes_and_waiting_for_a_message(netd: NetdProcess) -> None:
    mail = EmailMessage()
    mail["From"] = "accounts@client.test"
    mail["To"] = "new.user@netd.test"
    mail["Subject"] = "Confirm your address"
    mail.set_content("Your code: 604211\nOr open https://app.test/confirm?t=Zx9&u=7 today.\n")
    mail.add_alternative(
        '<p>Code <b>604211</b></p><p><a href="https://app.test/confirm?t=Zx9&amp;u=7">Confirm'
        '</a> or <a href="https://app.test/help">get help</a></p><p>Expires 2026-12-31</p>',
        subtype="html",
    )
    sender = threading.Thread(target=lambda: _send_message(netd, mail))
    sender.start()
    try:
        found = netd.wait_for_message("mail", to="New.User@netd.test", timeout=10)
    finally:
        sender.join()
    assert found["subject"] == "Confirm your address"
    assert netd.links("mail", found["id"]) == [
        "https://app.test/confirm?t=Zx9&u=7",
        "https://app.test/help",
    ]
    assert netd.codes("mail", found["id"]) == ["604211"]
    with pytest.raises(AdminError) as missing:
        netd.links("mail", "no-such-message")
    assert missing.value.status == 404
    with pytest.raises(AdminError) as unknown:
        netd.admin("GET", f"/api/services/mail/messages/{found['id']}/attachments")
    assert unknown.value.status == 404
    with pytest.raises(TimeoutError):
        netd.wait_for_message("mail", to="nobody@netd.test", timeout=0.5)


def _send_message(netd: NetdProcess, mail: EmailMessage) -> None:
    with smtp(netd) as client:
        client.send_message(mail)


@pytest.fixture(scope="module")
def netd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetdProcess]:
    base = tmp_path_factory.mktemp("mailboxes")
    with NetdProcess.start(mail_map(base / "state", **MAILBOXES), base) as process:
        yield process


def tls(netd: NetdProcess) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(netd.ca_file("lab")))


def send(netd: NetdProcess, to: str, subject: str, body: str) -> str:
    """Mail C{to} over SMTP; the id the admin API gives the message."""
    mail = EmailMessage()
    mail["From"] = "shop@client.test"
    mail["To"] = to
    mail["Subject"] = subject
    mail.set_content(body)
    return deliver(netd, to, mail.as_bytes(policy=email.policy.SMTP))


def imap(netd: NetdProcess, login: str) -> imaplib.IMAP4:
    """imaplib on the plain IMAP listener, upgraded with STARTTLS, logged in."""
    host, port = netd.address("mail", protocol="imap")
    client = imaplib.IMAP4(host, port, timeout=10)
    client.starttls(tls(netd))
    client.login(login, PASSWORD)
    return client


def ids(netd: NetdProcess, to: str) -> list[str]:
    return [m["id"] for m in netd.messages("mail", to=to)]


def test_imap_starttls_fetch_search_store_expunge(netd: NetdProcess) -> None:
    first = send(netd, "ann@netd.test", "Welcome", "Your code is 482913.\n")
    second = send(netd, "ann@netd.test", "Receipt", "Thanks for the order.\n")
    send(netd, "ben@netd.test", "Not for ann", "Private.\n")
    host, port = netd.address("mail", protocol="imap")
    with imaplib.IMAP4(host, port, timeout=10) as plain:
        assert "LOGINDISABLED" in plain.capabilities and "STARTTLS" in plain.capabilities
        with pytest.raises(imaplib.IMAP4.error):
            plain.login("ann@netd.test", PASSWORD)
    client = imap(netd, "ann@netd.test")
    status, listed = client.list()
    assert status == "OK" and listed == [b'(\\HasNoChildren) "/" "INBOX"']
    assert "CHILDREN" in client.capabilities
    assert client.select("INBOX") == ("OK", [b"2"])
    status, data = client.fetch("1:*", "(UID FLAGS ENVELOPE BODYSTRUCTURE)")
    assert status == "OK"
    first_line = data[0]
    assert isinstance(first_line, bytes)
    assert b'"Welcome" ((NIL NIL "shop" "client.test"))' in first_line
    assert b'BODYSTRUCTURE ("text" "plain" ("charset" "utf-8")' in first_line
    assert b"FLAGS ()" in first_line
    status, data = client.fetch("1", "(BODY.PEEK[])")
    raw = data[0][1]  # type: ignore[index]
    assert raw == netd.message("mail", first)
    assert client.search(None, "UNSEEN") == ("OK", [b"1 2"])
    client.fetch("1", "(BODY[TEXT])")
    assert client.search(None, "UNSEEN") == ("OK", [b"2"])
    assert client.search(None, "TEXT", "482913") == ("OK", [b"1"])
    assert client.search(None, "FROM", "shop", "SUBJECT", "receipt") == ("OK", [b"2"])
    assert client.search(None, "TO", "ben@netd.test") == ("OK", [b""])
    assert client.search(None, "SINCE", "1-Jan-2020", "NOT", "SEEN") == ("OK", [b"2"])
    _, [uids] = client.uid("SEARCH", "ALL")  # type: ignore[misc]
    second_uid = uids.split()[1]
    _, data = client.uid("FETCH", second_uid.decode(), "(FLAGS)")
    assert data == [b"2 (FLAGS () UID %s)" % second_uid]
    assert client.store("2", "+FLAGS", "(\\Deleted)")[0] == "OK"
    assert client.expunge() == ("OK", [b"2"])
    # Gone from the store, so from the admin API too.
    assert ids(netd, "ann@netd.test") == [first]
    assert second not in ids(netd, "ann@netd.test")
    client.logout()


def test_imap_bodystructure_sizes_and_fetch_without_items(netd: NetdProcess) -> None:
    send(netd, "hal@netd.test", "Structure", "line one\nline two\n")
    client = imap(netd, "hal@netd.test")
    try:
        assert client.select("INBOX") == ("OK", [b"1"])
        # The body's octets and lines, not the whole message's (as Dovecot answers).
        status, data = client.fetch("1", "(BODYSTRUCTURE BODY.PEEK[TEXT])")
        assert status == "OK"
        head, body = data[0]  # type: ignore[misc]
        assert body == b"line one\r\nline two\r\n"
        assert (
            b'BODYSTRUCTURE ("text" "plain" ("charset" "utf-8") NIL NIL "7bit" 20 2 '
            b"NIL NIL NIL NIL)" in head
        )
        with pytest.raises(imaplib.IMAP4.error, match="FETCH needs items"):
            client.fetch("1", "")
        assert client.noop()[0] == "OK"
        assert client.fetch("1", "(FLAGS)") == ("OK", [b"1 (FLAGS ())"])
    finally:
        client.logout()


def _crafted() -> bytes:
    """A message at Dovecot's limits: multiparts 100 deep, 10,000 parts with headers."""
    levels = b"".join(
        b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (n, n) for n in range(99)
    )
    parts = b"".join(
        b"--w\r\nContent-Type: text/plain; charset=utf-8; format=flowed\r\n"
        b"Content-ID: <%d@netd.test>\r\nContent-Language: en, fr\r\n"
        b'Content-Disposition: inline; filename="part%d.txt"\r\n\r\nx\r\n' % (n, n)
        for n in range(10_000)
    )
    return (
        b"From: shop@client.test\r\nTo: ann@netd.test\r\nSubject: crafted\r\n"
        + levels
        + b"Content-Type: multipart/mixed; boundary=w\r\n\r\n"
        + parts
        + b"--w--\r\n"
    )


def test_a_crafted_bodystructure_does_not_hold_up_other_sessions(tmp_path: Path) -> None:
    crafted = _crafted()
    text = mail_map(tmp_path / "state", **MAILBOXES)
    text = text.replace("max_message_size: 65536", f"max_message_size: {2 * len(crafted)}")
    with NetdProcess.start(text, tmp_path) as process:
        with smtp(process) as client:
            client.sendmail("shop@client.test", ["ann@netd.test"], crafted)
        process.wait_for_message("mail", to="ann@netd.test", timeout=10)
        _fetch_while_another_session_waits(process)


class _LongLines(imaplib.IMAP4):
    """imaplib without its limit of a million octets a line (a BODYSTRUCTURE of 10,000 parts)."""

    def readline(self) -> bytes:
        line: bytes = self.file.readline()
        return line


def _fetch_while_another_session_waits(netd: NetdProcess) -> None:
    host, port = netd.address("mail", protocol="imap")
    reader = _LongLines(host, port, timeout=30)
    reader.starttls(tls(netd))
    reader.login("ann@netd.test", PASSWORD)
    other = imap(netd, "ann@netd.test")
    try:
        assert reader.select("INBOX") == other.select("INBOX") == ("OK", [b"1"])
        answers: list[Any] = []
        fetching = threading.Thread(
            target=lambda: answers.append(reader.fetch("1", "BODYSTRUCTURE"))
        )
        fetching.start()
        waits = []
        # The other session's NOOPs while the structure is worked out (about a
        # second's work, in a thread): each answered at once.
        deadline = time.monotonic() + 60
        while fetching.is_alive() and len(waits) < 2_000 and time.monotonic() < deadline:
            started = time.monotonic()
            assert other.noop()[0] == "OK"
            waits.append(time.monotonic() - started)
        fetching.join(60)
        assert len(waits) >= 2 and max(waits) < 0.5, waits
        [(status, [text])] = answers
        assert status == "OK" and text.startswith(b"1 (BODYSTRUCTURE ((")
        assert text.count(b'"mixed" ("boundary"') == 100
        assert text.count(b'("inline" ("filename" "part') == 9_900
        # Kept: the same answer, without the work.
        assert reader.fetch("1", "BODYSTRUCTURE") == answers[0]
    finally:
        reader.logout()
        other.logout()


def test_imap_implicit_tls_and_the_all_mailbox(netd: NetdProcess) -> None:
    send(netd, "cy@netd.test", "For cy", "Hello cy.\n")
    host, port = netd.address("mail", tls=True, protocol="imap")
    with imaplib.IMAP4_SSL(host, port, ssl_context=tls(netd), timeout=10) as client:
        assert "STARTTLS" not in client.capabilities
        client.login("all", PASSWORD)
        _, count = client.select("INBOX", readonly=True)
        assert int(count[0]) == len(netd.messages("mail"))  # type: ignore[arg-type]
        assert client.search(None, "TO", "cy@netd.test")[1][0] != b""
        # EXAMINE is read-only.
        assert client.store("1", "+FLAGS", "(\\Deleted)")[0] == "NO"
    with (
        imaplib.IMAP4_SSL(host, port, ssl_context=tls(netd), timeout=10) as client,
        pytest.raises(imaplib.IMAP4.error),
    ):
        client.login("cy@netd.test", "wrong")


def test_admin_delete_is_expunged_in_an_open_session(netd: NetdProcess) -> None:
    kept = send(netd, "dee@netd.test", "Keep", "One.\n")
    dropped = send(netd, "dee@netd.test", "Drop", "Two.\n")
    client = imap(netd, "dee@netd.test")
    client.select("INBOX")
    netd.admin("DELETE", f"/api/services/mail/messages/{dropped}")
    status, _ = client.noop()
    assert status == "OK"
    assert client.untagged_responses.get("EXPUNGE") == [b"2"]
    assert client.search(None, "ALL") == ("OK", [b"1"])
    assert ids(netd, "dee@netd.test") == [kept]
    client.logout()


def test_imap_utf8_accept_shows_an_smtputf8_message_as_it_came(netd: NetdProcess) -> None:
    raw = (
        "From: Jörg Müller <jörg@bücher.test>\r\nTo: gus@netd.test\r\n"
        "Subject: Grüße aus Köln\r\n\r\nHallo.\r\n"
    ).encode()
    last = netd.admin("GET", "/api/events?service=mail")["last_id"]
    with smtp(netd) as client:
        client.ehlo()
        client.sendmail("jörg@bücher.test", ["gus@netd.test"], raw, mail_options=["SMTPUTF8"])
    netd.events("mail", "message.accepted", last, wait=10)
    client = imap(netd, "gus@netd.test")
    assert "UTF8=ACCEPT" in client.capabilities
    assert client.enable("UTF8=ACCEPT") == ("OK", [b"ENABLE completed"])
    client.select("INBOX")
    _, data = client.fetch("1", "(ENVELOPE BODY.PEEK[HEADER.FIELDS (FROM)])")
    envelope, header = data[0]  # type: ignore[misc]
    assert '"Grüße aus Köln" (("Jörg Müller" NIL "jörg" "bücher.test"))'.encode() in envelope
    assert header == "From: Jörg Müller <jörg@bücher.test>\r\n\r\n".encode()
    # imaplib now sends its commands in UTF-8: a quoted UTF-8 string is searched for.
    assert client.search(None, "FROM", '"jörg@bücher"') == ("OK", [b"1"])
    client.logout()


def test_pop3_stls_retrieve_top_delete(netd: NetdProcess) -> None:
    first = send(netd, "eve@netd.test", "Hello eve", "Line one.\n.starts with a dot\n")
    second = send(netd, "eve@netd.test", "Again", "Second.\n")
    host, port = netd.address("mail", protocol="pop3")
    client = poplib.POP3(host, port, timeout=10)
    assert "STLS" in client.capa() and "USER" not in client.capa()
    with pytest.raises(poplib.error_proto, match="STLS first"):
        client.user("eve@netd.test")
    client.stls(tls(netd))
    assert "USER" in client.capa() and "STLS" not in client.capa()
    client.user("eve@netd.test")
    client.pass_(PASSWORD)
    count, size = client.stat()
    assert count == 2
    raw = netd.message("mail", first)
    assert size == len(raw) + len(netd.message("mail", second))
    _, listing, _ = client.uidl()
    assert listing == [f"1 {first}".encode(), f"2 {second}".encode()]
    _, lines, _ = client.retr(1)
    assert b"\r\n".join(lines) + b"\r\n" == raw and b".starts with a dot" in lines
    _, top, _ = client.top(2, 0)
    assert top[-1] == b"" and b"Subject: Again" in top
    client.dele(1)
    client.rset()
    client.dele(2)
    with pytest.raises(poplib.error_proto):
        client.retr(2)
    assert ids(netd, "eve@netd.test") == [first, second]  # until QUIT
    client.quit()
    assert ids(netd, "eve@netd.test") == [first]


def test_pop3_implicit_tls_and_commands_before_login(netd: NetdProcess) -> None:
    host, port = netd.address("mail", tls=True, protocol="pop3")
    client = poplib.POP3_SSL(host, port, context=tls(netd), timeout=10)
    for command in ("STAT", "LIST", "RETR 1", "DELE 1", "UIDL"):
        with pytest.raises(poplib.error_proto, match="not authenticated"):
            client._shortcmd(command)
    with pytest.raises(poplib.error_proto):
        client._shortcmd("BOGUS")
    with pytest.raises(poplib.error_proto, match="already"):
        client._shortcmd("STLS")
    client.user("all")
    client.pass_(PASSWORD)
    assert client.stat()[0] == len(netd.messages("mail"))
    client.quit()


def _curl(*args: str) -> str:
    done = subprocess.run(
        ["curl", "--silent", "--show-error", "--max-time", "10", *args],
        capture_output=True,
        check=True,
        text=True,
    )
    return done.stdout


def test_curl_reads_over_imap_starttls_and_pop3s(netd: NetdProcess) -> None:
    message_id = send(netd, "fay@netd.test", "For curl", "Fetched by curl.\n")
    host, port = netd.address("mail", protocol="imap")
    ca = str(netd.ca_file("lab"))
    user = f"fay@netd.test:{PASSWORD}"
    fetched = _curl(
        "--ssl-reqd", "--cacert", ca, "--user", user, f"imap://{host}:{port}/INBOX;MAILINDEX=1"
    )
    assert "Fetched by curl." in fetched and "Subject: For curl" in fetched
    host, port = netd.address("mail", tls=True, protocol="pop3")
    listed = _curl("--cacert", ca, "--user", user, f"pop3s://{host}:{port}/")
    assert listed.split() == ["1", str(len(netd.message("mail", message_id)))]
    retrieved = _curl("--cacert", ca, "--user", user, f"pop3s://{host}:{port}/1")
    assert "Fetched by curl." in retrieved


def _raw(netd: NetdProcess, protocol: str) -> socket.socket:
    sock = socket.create_connection(netd.address("mail", protocol=protocol), timeout=10)
    sock.recv(4096)  # the greeting
    return sock


def _ask(sock: socket.socket, line: bytes, until: bytes) -> bytes:
    sock.sendall(line)
    answer = b""
    while until not in answer:
        chunk = sock.recv(65536)
        if not chunk:
            break
        answer += chunk
    return answer


def test_imap_bad_input_is_refused_and_the_daemon_serves_on(netd: NetdProcess) -> None:
    sock = _raw(netd, "imap")
    # An overlong literal is refused before the client may send it.
    assert b"a1 BAD" in _ask(sock, b"a1 LOGIN {100000000}\r\n", b"a1 ")
    assert b"a2 BAD" in _ask(sock, b"a2 LOGIN\r\n", b"a2 ")
    # LOGIN waits for STARTTLS (LOGINDISABLED).
    assert b"a3 BAD" in _ask(sock, b'a3 LOGIN "x@netd.test" "bad"\r\n', b"a3 ")
    sock.close()
    client = imap(netd, "all")
    client.select("INBOX")
    tag = client._new_tag()  # type: ignore[attr-defined]
    sock = client.sock
    for command, expected in (
        (b"FETCH 1 (FLAGS", b"BAD"),
        (b"FETCH 1 FLAGS)", b"BAD"),
        (b"FETCH 1 BODY[", b"BAD"),
        (b"SEARCH (FROM x", b"BAD"),
        (b"SEARCH NOSUCHKEY", b"BAD"),
        (b"SEARCH SINCE yesterday", b"BAD"),
        (b"FETCH 0 FLAGS", b"BAD"),
        (b"APPEND INBOX {5}", b"BAD"),
        (b"FETCH 1:1000000 (FLAGS)", b"OK"),
        (b"UID FETCH 1:1000000 (UID)", b"OK"),
    ):
        answer = _ask(sock, tag + b" " + command + b"\r\n", tag + b" ")
        assert answer.split(tag + b" ", 1)[1].startswith(expected), (command, answer)
    answer = _ask(sock, b"x " + b"A" * 70000 + b"\r\n", b"BYE")
    assert b"* BYE" in answer
    sock.close()
    imap(netd, "all").logout()
    assert "Traceback" not in netd.output, netd.output


def test_pop3_overlong_line_closes_and_the_daemon_serves_on(netd: NetdProcess) -> None:
    sock = _raw(netd, "pop3")
    assert _ask(sock, b"USER " + b"a" * 5000 + b"\r\n", b"\r\n").startswith(b"-ERR")
    assert _ask(sock, b"X" * 5000, b"\r\n").startswith(b"-ERR line too long")
    sock.close()
    host, port = netd.address("mail", tls=True, protocol="pop3")
    client = poplib.POP3_SSL(host, port, context=tls(netd), timeout=10)
    client.user("all")
    client.pass_(PASSWORD)
    client.quit()
    assert "Traceback" not in netd.output, netd.output


class _IdlingClient(imap4.IMAP4Client):
    """Twisted's IMAP client, noting the EXISTS it is told while it idles."""

    def __init__(self) -> None:
        super().__init__()
        self.exists: defer.Deferred[int] = defer.Deferred()
        self.idling = False

    def serverGreeting(self, caps: Any) -> None:
        self.factory.ready.callback(self)

    def lineReceived(self, line: bytes) -> None:
        if self.idling and line.endswith(b" EXISTS") and not self.exists.called:
            self.exists.callback(int(line.split()[1]))
        super().lineReceived(line)

    def idle(self) -> defer.Deferred[Any]:
        started: defer.Deferred[None] = defer.Deferred()

        def continued(_: Any) -> None:
            self.idling = True
            started.callback(None)

        self.finished = self.sendCommand(imap4.Command(b"IDLE", continuation=continued))
        return started

    def done(self) -> defer.Deferred[Any]:
        self.transport.write(b"DONE\r\n")
        return self.finished


@pytest_twisted.inlineCallbacks
def test_twisted_imap4client_idles_and_sees_new_mail(netd: NetdProcess) -> Any:
    factory = protocol.ClientFactory.forProtocol(_IdlingClient)
    factory.ready = defer.Deferred()
    host, port = netd.address("mail", protocol="imap")
    client: Any = None
    connector = global_reactor.connectTCP(host, port, factory)
    try:
        client = yield factory.ready
        trusted = Certificate.loadPEM(netd.ca_file("lab").read_bytes())
        yield client.startTLS(optionsForClientTLS("127.0.0.1", trusted))
        yield client.login(b"ann@netd.test", PASSWORD.encode())
        selected = yield client.select("INBOX")
        before = selected["EXISTS"]
        yield client.idle()
        yield deferToThread(send, netd, "ann@netd.test", "While idle", "Hello.\n")
        exists = yield client.exists
        assert exists == before + 1
        yield client.done()
        yield client.logout()
    finally:
        connector.disconnect()


def test_reload_adds_and_removes_the_mail_readers(tmp_path: Path) -> None:
    without = mail_map(tmp_path / "state")
    with NetdProcess.start(without, tmp_path) as process:
        assert [e.get("protocol") for e in process.listeners("mail")] == [None, None]
        message_id = send(process, "ann@netd.test", "Before the reload", "Kept.\n")
        answer = process.reload(mail_map(tmp_path / "state", **MAILBOXES))
        assert answer["restarted"] == ["mail"]
        protocols = [e.get("protocol") for e in process.listeners("mail")]
        assert protocols == [None, None, "imap", "imap", "pop3", "pop3"]
        client = imap(process, "ann@netd.test")
        client.select("INBOX")
        assert client.search(None, "ALL") == ("OK", [b"1"])
        # An unchanged map keeps the service, its listeners and this session.
        assert process.reload(mail_map(tmp_path / "state", **MAILBOXES))["unchanged"] == ["mail"]
        assert client.noop()[0] == "OK"
        client.logout()
        process.reload(without)
        assert [e.get("protocol") for e in process.listeners("mail")] == [None, None]
        assert [m["id"] for m in process.messages("mail")] == [message_id]


def test_each_namespace_reads_only_its_own_mail(tmp_path: Path) -> None:
    namespaced = {
        **MAILBOXES,
        "namespace_from": "[plus_tag]",
        "mailboxes": f'{{users: {{"ns/*": {{password: "{PASSWORD}"}}}}}}',
    }
    with NetdProcess.start(mail_map(tmp_path / "state", **namespaced), tmp_path) as process:
        mine = send(process, "ann+t1@netd.test", "For t1", "One.\n")
        theirs = send(process, "ann+t2@netd.test", "For t2", "Two.\n")
        send(process, "ann@netd.test", "No namespace", "Three.\n")
        client = imap(process, "ns/t1")
        assert client.select("INBOX") == ("OK", [b"1"])
        _, data = client.fetch("1", "(BODY.PEEK[])")
        assert data[0][1] == process.message("mail", mine)  # type: ignore[index]
        # A message of t1 sent now shows up in t1's open session, t2's does not.
        later = send(process, "bob+t1@netd.test", "Later for t1", "Four.\n")
        send(process, "bob+t2@netd.test", "Later for t2", "Five.\n")
        assert client.noop()[0] == "OK"
        assert client.untagged_responses["EXISTS"][-1] == b"2"
        host, port = process.address("mail", tls=True, protocol="pop3")
        pop = poplib.POP3_SSL(host, port, context=tls(process), timeout=10)
        pop.user("ns/t2")
        pop.pass_(PASSWORD)
        _, listing, _ = pop.uidl()
        assert listing[0] == f"1 {theirs}".encode() and len(listing) == 2
        pop.dele(1)
        pop.quit()
        assert theirs not in [m["id"] for m in process.messages("mail")]
        assert client.store("1", "+FLAGS", "(\\Deleted)")[0] == "OK"
        assert client.expunge() == ("OK", [b"1"])
        assert [m["id"] for m in process.messages("mail", namespace="t1")] == [later]
        client.logout()
        host, port = process.address("mail", protocol="imap")
        ca = str(process.ca_file("lab"))
        url = f"imap://{host}:{port}/INBOX;MAILINDEX=1"
        fetched = _curl("--ssl-reqd", "--cacert", ca, "--user", f"ns/t1:{PASSWORD}", url)
        assert "Subject: Later for t1" in fetched
        with pytest.raises(imaplib.IMAP4.error):
            imap(process, "ns/t1.x")
