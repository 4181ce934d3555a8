"""
The smtp kind in the real daemon, driven by smtplib, swaks and raw sockets,
with the admin API as the window into what was captured.
"""

from __future__ import annotations

import contextlib
import email
import shutil
import smtplib
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

from netd.testing import AdminError, NetdProcess
from netd.tls import ensure_self_signed
from tests.batteries import OPEN_RELAY_TRICKS
from tests.clients import smtp
from tests.conftest import StartNetd
from tests.maps import mail_map, relaying

SWAKS = shutil.which("swaks")


@pytest.fixture(scope="module")
def netd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetdProcess]:
    base = tmp_path_factory.mktemp("smtp")
    with NetdProcess.start(mail_map(base / "state"), base) as process:
        yield process


def tls_context(netd: NetdProcess) -> ssl.SSLContext:
    """Trusts the lab profile's CA (the module's daemon keeps its state next to its log)."""
    ca = netd.log_path.parent / "state" / "tls" / "lab-ca.pem"
    return ssl.create_default_context(cafile=str(ca))


def message(to: str, subject: str = "hello", body: str = "Hi there.\n") -> EmailMessage:
    mail = EmailMessage()
    mail["From"] = "alice@client.test"
    mail["To"] = to
    mail["Subject"] = subject
    mail.set_content(body)
    return mail


def test_smtplib_message_is_spooled_listed_read_and_deleted(netd: NetdProcess) -> None:
    last = netd.admin("GET", "/api/events?service=mail")["last_id"]
    with smtp(netd) as client:
        code, features = client.ehlo()
        assert code == 250
        for extension in (b"SIZE 65536", b"8BITMIME", b"PIPELINING", b"ENHANCEDSTATUSCODES"):
            assert extension in features
        assert b"STARTTLS" in features and b"AUTH" not in features
        client.send_message(message("listed@netd.test", "captured", "Line one.\n.dot\n"))
    events = netd.events("mail", "message.accepted", last, wait=10)
    assert [e["recipients"] for e in events] == [["listed@netd.test"]]
    [listed] = netd.messages("mail", to="listed@netd.test")
    assert listed["id"] == events[0]["message_id"] and listed["subject"] == "captured"
    assert listed["from"] == "alice@client.test" and listed["client"] == "127.0.0.1"
    raw = netd.message("mail", listed["id"])
    assert raw.startswith(b"Received: from client.test ([127.0.0.1])\r\n\tby mx.netd.test (netd)")
    assert b"\r\nLine one.\r\n.dot\r\n" in raw and len(raw) == listed["size"]
    assert netd.admin("DELETE", "/api/services/mail/messages")["deleted"] >= 1
    assert netd.messages("mail", to="listed@netd.test") == []


def test_messages_are_searched_paged_and_deleted_one_by_one(netd: NetdProcess) -> None:
    with smtp(netd) as client:
        for n in range(5):
            body = f"Your code is {n}4217.\n" if n == 3 else "Nothing here.\n"
            client.send_message(message(f"page{n}@netd.test", f"Paged {n} of five", body))
    path = "/api/services/mail/messages?q=paged&order=newest&limit=2"
    first = netd.admin("GET", path)
    assert first["total"] == 5
    assert [m["to"] for m in first["messages"]] == [["page4@netd.test"], ["page3@netd.test"]]
    last = netd.admin("GET", path + "&offset=4")["messages"]
    assert [m["subject"] for m in last] == ["Paged 0 of five"]
    assert netd.admin("GET", "/api/services/mail/messages?subject=2+OF+FIVE")["total"] == 1
    assert netd.messages("mail", **{"from": "ALICE@client", "subject": "paged"})[0]["subject"]
    [coded] = netd.messages("mail", text="34217", q="paged")
    assert coded["to"] == ["page3@netd.test"]
    assert netd.messages("mail", text="not in any message") == []
    with pytest.raises(AdminError, match="offset and limit must be integers") as refused:
        netd.admin("GET", "/api/services/mail/messages?limit=many")
    assert refused.value.status == 400
    assert netd.admin("DELETE", f"/api/services/mail/messages/{coded['id']}") == {"deleted": 1}
    assert netd.admin("GET", "/api/services/mail/messages?q=paged")["total"] == 4
    with pytest.raises(AdminError) as gone:
        netd.admin("DELETE", f"/api/services/mail/messages/{coded['id']}")
    assert gone.value.status == 404


def test_text_search_reads_the_decoded_text_as_mailpit_does(netd: NetdProcess) -> None:
    bodies = {
        "qp": ("y" * 68 + " marmalade and café crème\n", "utf-8", "quoted-printable"),
        "b64": ("Grüße aus Köln: the zeppelin lands\n", "utf-8", "base64"),
        "latin": ("Un déjà-vu à Zürich\n", "iso-8859-1", "8bit"),
    }
    with smtp(netd) as client:
        for name, (body, charset, cte) in bodies.items():
            mail = message(f"search-{name}@netd.test", f"decoded {name}")
            mail.set_content(body, charset=charset, cte=cte)
            client.sendmail("alice@client.test", [f"search-{name}@netd.test"], bytes(mail))
    raw = netd.message("mail", netd.messages("mail", to="search-qp@netd.test")[0]["id"])
    assert b"marmalad=\r\ne" in raw and b"caf=C3=A9" in raw  # a soft break splits the word
    for word, found in (
        ("MARMALADE", "qp"),
        ("café crème", "qp"),
        ("the zeppelin", "b64"),
        ("grüße aus köln", "b64"),
        ("déjà-vu à zürich", "latin"),
        ("decoded latin", "latin"),  # the headers, decoded, still count
    ):
        assert [m["to"] for m in netd.messages("mail", text=word)] == [
            [f"search-{found}@netd.test"]
        ], word
    # Only the encoding holds these: Mailpit searches the decoded text, and so does netd.
    for encoded in ("caf=c3=a9", "marmalad=", "R3LDvMOfZSBhdXMg"):
        assert netd.messages("mail", text=encoded, q="decoded") == [], encoded


def test_swaks_over_starttls_with_auth(netd: NetdProcess) -> None:
    if SWAKS is None:
        pytest.skip("swaks is not installed (apt-get install swaks)")
    host, port = netd.address("mail")
    done = subprocess.run(
        [SWAKS, "--server", f"{host}:{port}", "--from", "bob@client.test",
         "--to", "swaks@elsewhere.test", "--tls", "--auth", "LOGIN",
         "--auth-user", "bob", "--auth-password", "secret",
         "--header", "Subject: from swaks", "--pipeline"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    [listed] = netd.messages("mail", to="swaks@elsewhere.test")
    assert listed["user"] == "bob" and listed["subject"] == "from swaks"


def test_starttls_and_implicit_tls_with_auth(netd: NetdProcess) -> None:
    context = tls_context(netd)
    with smtp(netd) as client:
        with pytest.raises(smtplib.SMTPNotSupportedError):
            client.login("bob", "secret")  # AUTH is hidden until TLS
        client.starttls(context=context)
        client.login("carol", "plain")
        client.sendmail(
            "carol@client.test", ["starttls@elsewhere.test"], b"Subject: s\r\n\r\nx\r\n"
        )
    host, port = netd.address("mail", tls=True)
    with smtplib.SMTP_SSL(host, port, context=context, timeout=10) as client:
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            client.login("bob", "wrong")
        assert refused.value.smtp_code == 535
        client.login("bob", "secret")
        client.sendmail("bob@client.test", ["implicit@elsewhere.test"], b"Subject: i\r\n\r\nx\r\n")
    assert netd.messages("mail", to="starttls@elsewhere.test")[0]["user"] == "carol"
    raw = netd.message("mail", netd.messages("mail", to="implicit@elsewhere.test")[0]["id"])
    assert b" with ESMTPSA id " in raw


def test_plaintext_pipelined_behind_starttls_is_discarded(netd: NetdProcess) -> None:
    host, port = netd.address("mail")
    with socket.create_connection((host, port), timeout=10) as raw:
        plain = raw.makefile("rb")
        plain.readline()
        raw.sendall(b"EHLO client.test\r\n")
        while plain.readline()[3:4] == b"-":
            pass
        # A man in the middle appends a command to the client's STARTTLS.
        raw.sendall(b"STARTTLS\r\nMAIL FROM:<evil@attacker.test>\r\n")
        assert plain.readline() == b"220 2.0.0 Ready to start TLS\r\n"
        with tls_context(netd).wrap_socket(raw, server_hostname="localhost") as secure:
            secure.sendall(b"EHLO client.test\r\nRCPT TO:<x@netd.test>\r\nQUIT\r\n")
            answer = b""
            while not answer.endswith(b"221 2.0.0 Bye\r\n"):
                chunk = secure.recv(4096)
                assert chunk, answer
                answer += chunk
    # Nothing answers the injected MAIL (not even a 503 inside TLS), and it set
    # nothing up: the RCPT finds no transaction.
    assert answer.startswith(b"250-")
    assert [line[:3] for line in answer.split(b"\r\n") if line[3:4] == b" "] == [
        b"250", b"503", b"221"
    ]  # fmt: skip


def test_open_relay_battery(netd: NetdProcess) -> None:
    with smtp(netd) as client:
        client.ehlo()
        assert client.mail("spammer@client.test")[0] == 250
        refusals = {address: client.rcpt(f"<{address}>") for address in OPEN_RELAY_TRICKS}
        # Relaying denied, or (a trailing dot) a malformed address: never taken.
        assert {
            a: (c, t[:5]) for a, (c, t) in refusals.items() if (c, t[:5]) != (550, b"5.7.1")
        } == {"victim@elsewhere.test.": (501, b"5.1.3")}
        # Still serving, and the final destination is still accepted.
        assert client.rcpt("<relay-battery@netd.test>")[0] == 250
        assert client.data(b"Subject: ok\r\n\r\nok\r\n")[0] == 250
    [listed] = netd.messages("mail", to="relay-battery@netd.test")
    assert listed["to"] == ["relay-battery@netd.test"]


def test_smuggling_with_bare_lf_stays_inside_one_message(netd: NetdProcess) -> None:
    host, port = netd.address("mail")
    with socket.create_connection((host, port), timeout=10) as sock:
        stream = sock.makefile("rb")

        def reply() -> bytes:
            lines = [stream.readline()]
            while lines[-1][3:4] == b"-":
                lines.append(stream.readline())
            return lines[-1]

        reply()
        sock.sendall(b"EHLO client.test\r\n")
        reply()
        sock.sendall(
            b"MAIL FROM:<a@client.test>\r\nRCPT TO:<smuggle@netd.test>\r\nDATA\r\n"
            b"Subject: outer\r\n\r\nhi\n.\nMAIL FROM:<evil@client.test>\r\n"
            b"RCPT TO:<smuggled@netd.test>\r\nDATA\r\nSubject: inner\r\n\r\nevil\r\n.\r\n"
        )
        assert [reply()[:9] for _ in range(4)] == [
            b"250 2.1.0", b"250 2.1.5", b"354 End d", b"250 2.0.0"
        ]  # fmt: skip
        sock.sendall(b"NOOP\r\n")
        assert reply()[:9] == b"250 2.0.0"
    assert netd.messages("mail", to="smuggled@netd.test") == []
    [outer] = netd.messages("mail", to="smuggle@netd.test")
    raw = netd.message("mail", outer["id"])
    assert raw.endswith(
        b"\r\n\r\nhi\r\n.\r\nMAIL FROM:<evil@client.test>\r\n"
        b"RCPT TO:<smuggled@netd.test>\r\nDATA\r\nSubject: inner\r\n\r\nevil\r\n"
    )


def test_limits_and_malformed_commands_leave_the_session_going(netd: NetdProcess) -> None:
    with smtp(netd) as client:
        client.ehlo()
        assert client.docmd("BOGUS")[0] == 500
        assert client.docmd("MAIL", "FROM:<broken")[0] == 501
        assert client.docmd("MAIL", "FROM:<a@client.test> SIZE=999999")[0] == 552
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail("a@client.test", ["big@netd.test"], b"x" * 70000)
        assert refused.value.smtp_code == 552
        client.rset()
        client.mail("a@client.test")
        codes = [client.rcpt(f"<r{i}@netd.test>")[0] for i in range(6)]
        assert codes == [250] * 5 + [452]
        client.rset()
        # No SIZE= this time: the limit holds at the end of DATA too.
        client.mail("a@client.test")
        client.rcpt("<big@netd.test>")
        big = b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 70
        assert client.data(big)[0] == 552
        assert client.sendmail("a@client.test", ["after-limits@netd.test"], b"\r\nok\r\n") == {}
    assert len(netd.messages("mail", to="after-limits@netd.test")) == 1


def test_pipelined_burst_answers_in_order(netd: NetdProcess) -> None:
    host, port = netd.address("mail")
    count = 20
    burst = (
        b"EHLO client.test\r\n"
        + b"".join(
            b"MAIL FROM:<a@client.test>\r\nRCPT TO:<burst@netd.test>\r\nDATA\r\n"
            b"Subject: %d\r\n\r\nbody %d\r\n.\r\n" % (i, i)
            for i in range(count)
        )
        + b"QUIT\r\n"
    )
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(burst)
        received = b""
        while not received.endswith(b"221 2.0.0 Bye\r\n"):
            chunk = sock.recv(65536)
            assert chunk, received
            received += chunk
    lines = [line for line in received.split(b"\r\n") if line and line[3:4] == b" "]
    expected = [b"220", b"250"] + [b"250", b"250", b"354", b"250"] * count + [b"221"]
    assert [line[:3] for line in lines] == expected
    listed = netd.messages("mail", to="burst@netd.test")
    assert [m["subject"] for m in listed] == [str(i) for i in range(count)]


def test_connections_per_client(netd: NetdProcess) -> None:
    host, port = netd.address("mail")
    sockets = [socket.create_connection((host, port), timeout=10) for _ in range(9)]
    try:
        greetings = [s.recv(200) for s in sockets]
        assert [g[:3] for g in greetings] == [b"220"] * 8 + [b"421"]
    finally:
        for sock in sockets:
            sock.close()
    # The per-client count drops as netd sees each close: wait for it to.
    netd.wait_for_count("mail", "connection.closed", 8)
    with smtp(netd) as client:
        assert client.noop()[0] == 250


def test_a_message_answered_250_survives_sigkill(start_netd: StartNetd, tmp_path: Path) -> None:
    text = mail_map(tmp_path / "state")
    first = start_netd(text)
    with smtp(first) as client:
        client.sendmail("a@client.test", ["durable@netd.test"], b"Subject: durable\r\n\r\nkept\r\n")
        # Killed right after the 250, before QUIT: no chance to flush anything.
        first.process.kill()
        first.process.wait()
    second = start_netd(text)
    [listed] = second.messages("mail", to="durable@netd.test")
    raw = second.message("mail", listed["id"])
    assert raw.endswith(b"Subject: durable\r\n\r\nkept\r\n") and listed["subject"] == "durable"


class Smarthost:
    """aiosmtpd on loopback as the upstream relay; recipients named reject*/later* fail."""

    def __init__(
        self,
        auth_required: bool = True,
        tls: ssl.SSLContext | None = None,
        require_starttls: bool | None = None,
    ) -> None:
        # Bound but not listening, the port refuses connections (the smarthost
        # is down) and no other test can take it; aiosmtpd binds it too
        # (SO_REUSEADDR on both) when switched on.
        self.holder = socket.socket()
        self.holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.holder.bind(("127.0.0.1", 0))
        self.port: int = self.holder.getsockname()[1]
        self.auth_required = auth_required
        self.tls = tls
        self.require_starttls = tls is not None if require_starttls is None else require_starttls
        self.received: list[tuple[str, list[str], bytes]] = []
        self.logins: list[bytes] = []
        self.arrived = threading.Condition()
        self.controller: Controller | None = None

    def start(self) -> None:
        def authenticate(
            server: Any, session: Any, envelope: Any, mechanism: str, data: Any
        ) -> AuthResult:
            self.logins.append(data.login)
            ok = (data.login, data.password) == (b"relayuser", b"relaypass")
            return AuthResult(success=ok)

        self.controller = Controller(
            self,
            hostname="127.0.0.1",
            port=self.port,
            authenticator=authenticate,
            auth_require_tls=False,
            auth_required=self.auth_required,
            tls_context=self.tls,
            require_starttls=self.require_starttls,
        )
        self.controller.start()

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
        self.holder.close()

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if address.startswith("reject"):
            return "550 5.1.1 No such user here"
        if address.startswith("later"):
            return "451 4.3.0 Try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.arrived:
            self.received.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
            self.arrived.notify_all()
        return "250 OK"


def wait_event(netd: NetdProcess, kind: str, since: int) -> dict[str, Any]:
    events = netd.events("mail", kind, since, wait=20)
    assert events, f"no {kind} event"
    found: dict[str, Any] = events[0]
    return found


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_smarthost_delivery_retries_and_bounces(start_netd: StartNetd, tmp_path: Path) -> None:
    keypair, _ = ensure_self_signed(tmp_path / "upstream", "upstream", ["localhost"])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(keypair.chain, keypair.key)
    smarthost = Smarthost(tls=context)  # credentials go only over TLS
    text = mail_map(tmp_path / "state").replace(
        "relay: {allow_from: [], ", "relay: {allow_from: [127.0.0.1], "
    )
    text += (
        f"    delivery: {{mode: smarthost, smarthost: '127.0.0.1:{smarthost.port}',\n"
        "      username: relayuser, password: relaypass, retry: [0.2], max_age: 60}\n"
    )
    netd = start_netd(text)
    # The smarthost is down: the message waits in the queue.
    with smtp(netd) as client:
        client.sendmail(
            "alice@client.test", ["first@far.test"], b"Subject: one\r\n\r\n.leading dot\r\n"
        )
    deferred = wait_event(netd, "message.deferred", 0)
    assert deferred["recipients"] == ["first@far.test"] and deferred["reply"].startswith(
        "451 4.4.1"
    )
    smarthost.start()
    try:
        delivered = wait_event(netd, "message.delivered", deferred["id"] - 1)
        assert delivered["recipients"] == ["first@far.test"]
        [(sender, recipients, content)] = smarthost.received
        assert (sender, recipients) == ("alice@client.test", ["first@far.test"])
        assert content.startswith(b"Received: from client.test ([127.0.0.1])")
        assert content.endswith(b"Subject: one\r\n\r\n.leading dot\r\n")
        # One recipient refused for good, one accepted: a bounce goes to the sender.
        since = netd.admin("GET", "/api/events?service=mail")["last_id"]
        with smtp(netd) as client:
            client.sendmail(
                "alice@client.test",
                ["reject@far.test", "second@far.test"],
                b"Subject: two\r\n\r\nx\r\n",
            )
        bounced = wait_event(netd, "message.bounced", since)
        assert (
            bounced["recipients"] == ["reject@far.test"]
            and bounced["notified"] == "alice@client.test"
        )
        with smarthost.arrived:
            assert smarthost.arrived.wait_for(lambda: len(smarthost.received) == 3, timeout=20)
        bounce_from, bounce_to, report = smarthost.received[2]
        assert (bounce_from, bounce_to) == (
            "<>",
            ["alice@client.test"],
        )  # aiosmtpd spells null "<>"
        parsed = email.message_from_bytes(report)
        assert parsed.get_content_type() == "multipart/report"
        assert parsed.get_param("report-type") == "delivery-status"
        status = parsed.get_payload()[1]
        assert status.get_content_type() == "message/delivery-status"
        assert "Status: 5.1.1" in status.as_string() and "reject@far.test" in status.as_string()
        # A bounce that cannot be delivered is dropped, never bounced again.
        since = netd.admin("GET", "/api/events?service=mail")["last_id"]
        with smtp(netd) as client:
            client.sendmail("", ["reject2@far.test"], b"Subject: three\r\n\r\nx\r\n")
        bounced = wait_event(netd, "message.bounced", since)
        assert bounced["notified"] is None
        metrics = netd.admin("GET", "/metrics").decode()
        assert 'netd_smtp_delivered_recipients_total{service="mail",type="smtp"} 3.0' in metrics
        assert 'netd_smtp_queue_messages{service="mail",type="smtp"} 0.0' in metrics
    finally:
        smarthost.stop()


class FakeDNS:
    """A loopback DNS server (dnspython) with a few zones' worth of records."""

    def __init__(self, records: dict[tuple[str, str], list[str]]) -> None:
        self.records = records
        self.names = {name for name, _ in records}
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            query = dns.message.from_wire(data)
            response = dns.message.make_response(query)
            question = query.question[0]
            name = question.name.to_text()
            kind = dns.rdatatype.to_text(question.rdtype)
            values = self.records.get((name, kind))
            if values:
                response.answer.append(dns.rrset.from_text(name, 60, "IN", kind, *values))
            elif name not in self.names:
                response.set_rcode(dns.rcode.NXDOMAIN)
            self.sock.sendto(response.to_wire(), peer)

    def close(self) -> None:
        self.sock.close()


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_mx_delivery_through_twisted_names(start_netd: StartNetd, tmp_path: Path) -> None:
    resolver = FakeDNS(
        {
            ("far.test.", "MX"): ["10 mx1.far.test.", "20 mx2.far.test."],
            ("mx1.far.test.", "A"): ["127.0.0.2"],  # nothing listens there: the next MX
            ("mx2.far.test.", "A"): ["127.0.0.1"],
            ("client.test.", "A"): ["127.0.0.1"],  # no MX: the domain itself (bounces)
            ("nullmx.test.", "MX"): ["0 ."],
        }
    )
    exchanger = Smarthost(auth_required=False)
    exchanger.start()
    try:
        text = relaying(
            tmp_path / "state",
            f"mode: mx, port: {exchanger.port}, tls: none, retry: [0.2],"
            f" resolver: '127.0.0.1:{resolver.port}'",
        )
        netd = start_netd(text)
        with smtp(netd) as client:
            client.sendmail(
                "alice@client.test",
                ["bob@far.test", "carol@nowhere.test", "dave@nullmx.test"],
                b"Subject: mx\r\n\r\nvia MX\r\n",
            )
        bounced = wait_event(netd, "message.bounced", 0)
        assert sorted(bounced["recipients"]) == ["carol@nowhere.test", "dave@nullmx.test"]
        assert sorted(r[:10] for r in bounced["replies"]) == ["550 5.1.2 ", "556 5.1.10"]
        with exchanger.arrived:
            assert exchanger.arrived.wait_for(lambda: len(exchanger.received) == 2, timeout=20)
        by_sender = {sender: recipients for sender, recipients, _ in exchanger.received}
        assert by_sender == {"alice@client.test": ["bob@far.test"], "<>": ["alice@client.test"]}
    finally:
        exchanger.stop()
        resolver.close()


def relay_to_smarthosts(
    start_netd: StartNetd, tmp_path: Path, routes: list[tuple[str, str, str]]
) -> NetdProcess:
    """
    A daemon with an smtp service per route (name, smarthost, tls) that has
    mailed NAME@far.test through it, retrying only after 30 seconds.
    """
    services = "".join(
        f"""
  {name}:
    type: smtp
    listen: ["tcp:0:interface=127.0.0.1"]
    delivery: {{mode: smarthost, smarthost: "{smarthost}", tls: {tls}, retry: [30]}}
"""
        for name, smarthost, tls in routes
    )
    netd = start_netd(
        f"state_dir: {tmp_path / 'state'}\n"
        'admin: {listen: ["tcp:0:interface=127.0.0.1"]}\n'
        f"services:{services}"
    )
    for name, _, _ in routes:
        host, port = netd.address(name)
        with smtplib.SMTP(host, port, timeout=10) as client:
            client.sendmail("a@client.test", [f"{name}@far.test"], b"Subject: t\r\n\r\nx\r\n")
    return netd


def test_smarthost_tls_required_verifies_and_opportunistic_encrypts(
    start_netd: StartNetd, tmp_path: Path
) -> None:
    keypair, ca = ensure_self_signed(tmp_path / "upstream", "upstream", ["localhost"])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(keypair.chain, keypair.key)
    upstream = Smarthost(auth_required=False, tls=context)
    upstream.start()
    try:
        netd = relay_to_smarthosts(
            start_netd,
            tmp_path,
            [
                ("good", f"localhost:{upstream.port}", f"required, ca: {ca}"),
                ("bad", f"127.0.0.1:{upstream.port}", f"required, ca: {ca}"),
                # Encrypted without a check: the name mismatch does not matter.
                ("opportunistic", f"127.0.0.1:{upstream.port}", "opportunistic"),
            ],
        )
        with upstream.arrived:
            assert upstream.arrived.wait_for(lambda: len(upstream.received) == 2, timeout=20)
        assert sorted(r for _, [r], _ in upstream.received) == [
            "good@far.test",
            "opportunistic@far.test",
        ]
        events = netd.events("bad", "message.deferred", wait=20)
        # The certificate names localhost, not 127.0.0.1: not delivered, kept for later.
        assert events and events[0]["reply"].startswith("451 4.4.1"), events
        assert "IPAddressMismatch" in events[0]["reply"]
        assert messages_to_service(netd, "bad") == ["bad@far.test"]
    finally:
        upstream.stop()


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_opportunistic_tls_that_fails_goes_on_in_plaintext_at_once(
    start_netd: StartNetd, tmp_path: Path
) -> None:
    keypair, ca = ensure_self_signed(tmp_path / "upstream", "upstream", ["localhost"])
    # STARTTLS offered, but every handshake fails: it demands a client certificate.
    broken = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca))
    broken.load_cert_chain(keypair.chain, keypair.key)
    broken.verify_mode = ssl.CERT_REQUIRED
    upstream = Smarthost(auth_required=False, tls=broken, require_starttls=False)
    upstream.start()
    strict = Smarthost(auth_required=False, tls=broken)  # and says 530 to plaintext MAIL
    strict.start()
    try:
        netd = relay_to_smarthosts(
            start_netd,
            tmp_path,
            [
                ("opportunistic", f"localhost:{upstream.port}", "opportunistic"),
                ("required", f"localhost:{upstream.port}", f"required, ca: {ca}"),
                # AUTH's password never goes in the clear: no plaintext without TLS.
                (
                    "login",
                    f"localhost:{upstream.port}",
                    "opportunistic, username: relayuser, password: relaypass",
                ),
                ("strict", f"localhost:{strict.port}", "opportunistic"),
            ],
        )
        [delivered] = netd.events("opportunistic", "message.delivered", wait=20)
        assert delivered["recipients"] == ["opportunistic@far.test"]
        assert delivered["plaintext_after"].startswith("STARTTLS failed: "), delivered
        assert netd.events("opportunistic", "message.deferred") == []
        for name in ("required", "login"):
            [deferred] = netd.events(name, "message.deferred", wait=20)
            assert deferred["reply"].startswith("451 4.4.1") and "plaintext_after" not in deferred
            assert messages_to_service(netd, name) == [f"{name}@far.test"]
        # The hop wants the TLS that failed: kept for when it is mended, not bounced.
        [deferred] = netd.events("strict", "message.deferred", wait=20)
        assert deferred["reply"].startswith("454 4.7.0 STARTTLS failed: "), deferred
        assert deferred["reply"].endswith("530 Must issue a STARTTLS command first")
        assert deferred["plaintext_after"] and netd.events("strict", "message.bounced") == []
        assert [r for _, [r], _ in upstream.received] == ["opportunistic@far.test"]
        assert strict.received == []
    finally:
        upstream.stop()
        strict.stop()


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_credentials_never_go_to_a_smarthost_that_offers_no_starttls(
    start_netd: StartNetd, tmp_path: Path
) -> None:
    # As when a man in the middle takes STARTTLS out of the hop's EHLO reply.
    stripped = Smarthost()  # AUTH offered, STARTTLS not
    stripped.start()
    try:
        netd = relay_to_smarthosts(
            start_netd,
            tmp_path,
            [
                (
                    "login",
                    f"127.0.0.1:{stripped.port}",
                    "opportunistic, username: relayuser, password: relaypass",
                )
            ],
        )
        [deferred] = netd.events("login", "message.deferred", wait=20)
        assert deferred["reply"] == (
            "451 4.4.1 454 4.7.0 no TLS to this hop: its AUTH credentials are not sent in the clear"
        )
        assert messages_to_service(netd, "login") == ["login@far.test"]
        assert stripped.logins == [] and stripped.received == []
    finally:
        stripped.stop()


def messages_to_service(netd: NetdProcess, service: str) -> list[str]:
    listed = netd.messages(service)
    return [recipient for message in listed for recipient in message["to"]]


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_a_queued_message_survives_sigkill_and_is_delivered_after_restart(
    start_netd: StartNetd, tmp_path: Path
) -> None:
    smarthost = Smarthost(auth_required=False)  # down for now: the message stays queued
    text = relaying(
        tmp_path / "state",
        f"mode: smarthost, smarthost: '127.0.0.1:{smarthost.port}', tls: none, retry: [0.2]",
    )
    first = start_netd(text)
    with smtp(first) as client:
        client.sendmail("a@client.test", ["kept@far.test"], b"Subject: kept\r\n\r\nqueued\r\n")
        first.process.kill()
        first.process.wait()
    smarthost.start()
    try:
        second = start_netd(text)
        assert wait_event(second, "message.delivered", 0)["recipients"] == ["kept@far.test"]
        [(sender, recipients, content)] = smarthost.received
        assert (sender, recipients) == ("a@client.test", ["kept@far.test"])
        assert content.endswith(b"\r\n\r\nqueued\r\n")
    finally:
        smarthost.stop()


def test_messages_stay_listed_across_a_reload(start_netd: StartNetd, tmp_path: Path) -> None:
    text = mail_map(tmp_path / "state")
    netd = start_netd(text)
    with smtp(netd) as client:
        client.sendmail("a@client.test", ["before@netd.test"], b"Subject: before\r\n\r\nx\r\n")
    changes = netd.reload(text.replace("max_recipients: 5", "max_recipients: 6"))
    assert changes["restarted"] == ["mail"]
    [listed] = netd.messages("mail", to="before@netd.test")
    assert listed["subject"] == "before"


def assert_refused_reload_keeps_mail(netd: NetdProcess, new_map: str, reason: str) -> None:
    """A reload that fails after the new smtp service was built: the old one serves on."""
    with smtp(netd) as client:
        client.sendmail("a@client.test", ["before@netd.test"], b"Subject: before\r\n\r\nx\r\n")
    with pytest.raises(AdminError) as refused:
        netd.reload(new_map)
    assert refused.value.status == 400
    assert reason in refused.value.body
    assert netd.services()["mail"]["state"] == "running"
    with smtp(netd) as client:
        client.sendmail("a@client.test", ["after@netd.test"], b"Subject: after\r\n\r\ny\r\n")
    subjects = sorted(listed["subject"] for listed in netd.messages("mail"))
    assert subjects == ["after", "before"]


def test_a_reload_to_a_spool_that_cannot_be_read_is_refused(
    start_netd: StartNetd, tmp_path: Path
) -> None:
    """The replacement would answer 220 and keep nothing: undone, as a busy port is."""
    text = mail_map(tmp_path / "state")
    netd = start_netd(text)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "smtp").write_text("a file where the spools' folder goes")
    new_map = text.replace(str(tmp_path / "state"), str(broken))
    assert_refused_reload_keeps_mail(netd, new_map, "services.mail: cannot read its spool")


@contextlib.contextmanager
def mail_on_a_busy_port(text: str) -> Iterator[str]:
    """C{text} with C{mail}'s plain listener on a port held meanwhile."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = f'"tcp:{holder.getsockname()[1]}:interface=127.0.0.1"'
        yield text.replace('"tcp:0:interface=127.0.0.1"', busy)


def test_a_reload_undone_by_a_busy_port_keeps_the_mail_listed(
    start_netd: StartNetd, tmp_path: Path
) -> None:
    """The replacement read the spool before its port failed: the old service lists on."""
    text = mail_map(tmp_path / "state")
    netd = start_netd(text)
    with mail_on_a_busy_port(text) as new_map:
        assert_refused_reload_keeps_mail(netd, new_map, "Address already in use")


def test_a_reload_undone_by_another_service_leaves_no_new_spool_folder(
    start_netd: StartNetd, tmp_path: Path
) -> None:
    """The new service's spool check makes nothing: that is its start's work, never done here."""
    text = mail_map(tmp_path / "state")
    netd = start_netd(text)
    fresh = (
        "  fresh:\n"
        "    type: smtp\n"
        '    listen: ["tcp:0:interface=127.0.0.1"]\n'
        "    relay: {allow_from: [], domains: [fresh.test]}\n"
    )
    with mail_on_a_busy_port(text) as new_map:
        assert_refused_reload_keeps_mail(netd, new_map + fresh, "Address already in use")
    assert [p.name for p in (tmp_path / "state" / "smtp").iterdir()] == ["mail"]


def test_a_silent_client_is_timed_out_and_others_are_served(
    start_netd: StartNetd, tmp_path: Path
) -> None:
    netd = start_netd(mail_map(tmp_path / "state", command_timeout="0.5", data_timeout="0.5"))
    host, port = netd.address("mail")
    with socket.create_connection((host, port), timeout=10) as silent:
        replies = silent.makefile("rb")
        assert replies.readline().startswith(b"220 ")
        silent.sendall(b"EHLO client.test\r\nMAIL FROM:<a@client.test>\r\n")
        silent.sendall(b"RCPT TO:<slow@netd.test>\r\nDATA\r\nSubject: slow\r\n")
        lines = [replies.readline() for _ in range(14)]
        assert lines[-1] == b"421 4.4.2 mx.netd.test Error: timeout exceeded\r\n", lines
        assert replies.readline() == b""  # closed
    with smtp(netd) as client:
        assert client.sendmail("a@client.test", ["fast@netd.test"], b"\r\nok\r\n") == {}
    assert netd.messages("mail", to="slow@netd.test") == []


def test_a_client_silent_in_data_gets_the_data_timeout_reply(
    start_netd: StartNetd, tmp_path: Path
) -> None:
    # idle_timeout is left to its default: at least the longest smtp timeout, so
    # the core's idle sweep never cuts a client before smtp's own timer answers.
    netd = start_netd(mail_map(tmp_path / "state", command_timeout="0.5", data_timeout="1.5"))
    assert netd.services()["mail"]["state"] == "running"
    with socket.create_connection(netd.address("mail"), timeout=10) as sock:
        sock.sendall(
            b"EHLO client.test\r\nMAIL FROM:<a@client.test>\r\nRCPT TO:<b@netd.test>\r\n"
            b"DATA\r\nSubject: slow\r\n"
        )
        started = time.monotonic()
        received = bytearray()
        while chunk := sock.recv(4096):
            received += chunk
        silent_for = time.monotonic() - started
    assert received.splitlines()[-1].startswith(b"421 4.4.2"), received
    assert 1.4 < silent_for < 5
