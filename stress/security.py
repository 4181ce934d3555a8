"""
Security batteries: open relay, SMTP smuggling, FTP traversal and bounce,
HTTP traversal and request smuggling, SSRF through the proxy route, forged DNS
answers to the forwarder, and the admin token.  Each attempt is counted as
refused (good) or accepted.
"""

from __future__ import annotations

import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rrset

from netd.testing import AdminError, NetdProcess
from tests.batteries import FTP_TRAVERSAL_READS, FTP_TRAVERSAL_WRITES, OPEN_RELAY_TRICKS

from ._harness import (
    ADMIN_TOKEN,
    LOCAL,
    SECRET,
    Budget,
    Daemon,
    DnsUpstream,
    Row,
    Sampler,
    admin_address,
    connect,
    full_daemon,
    read_until_closed,
    smtp_reply,
)

FAMILY = "security"

SMUGGLED_ENDINGS = [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r\n.\r", b"\r.\r\n"]

FTP_TRAVERSAL = [*FTP_TRAVERSAL_READS, *FTP_TRAVERSAL_WRITES]

FTP_BOUNCE = [
    b"PORT 127,0,0,2,4,1",
    b"PORT 127,0,0,1,0,25",
    b"EPRT |1|127.0.0.2|1025|",
    b"EPRT |2|::1|1025|",
    b"PORT 10,0,0,1,4,1",
    b"PORT 192,168,0,1,0,80",
]

HTTP_TRAVERSAL = [
    "/../secret.txt",
    "/%2e%2e/secret.txt",
    "/..%2fsecret.txt",
    "/%2e%2e%2fsecret.txt",
    "/.%2e/secret.txt",
    "/..\\secret.txt",
    "/..%5csecret.txt",
    "/%252e%252e/secret.txt",
    "/big.bin/../../secret.txt",
    "//..//..//secret.txt",
    "/%00/../secret.txt",
    "/./.././secret.txt",
]

_SMUGGLED = "GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
_CHUNKED_END = "0\r\n\r\n"


def _post(*headers: str, body: str = _CHUNKED_END + _SMUGGLED) -> str:
    return "\r\n".join(["POST /health HTTP/1.1", "Host: x", *headers, "", ""]) + body


HTTP_SMUGGLING = [
    _post("Content-Length: 6", "Transfer-Encoding: chunked"),
    _post("Content-Length: 0", f"Content-Length: {len(_SMUGGLED)}", body=_SMUGGLED),
    _post("Transfer-Encoding: chunked", "Transfer-Encoding: identity"),
    _post("Transfer-Encoding : chunked", "Content-Length: 4"),
    _post("Transfer-Encoding: xchunked", "Content-Length: 4"),
    _post("Transfer-Encoding:\r\n chunked", "Content-Length: 4"),
    _post("Content-Length: 4", "Transfer-Encoding: chunked").replace("\r\n", "\n"),
    # Two honest requests, the first with a body that looks like a request.
    f"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: {len(_SMUGGLED)}\r\n\r\n{_SMUGGLED}"
    "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
]


class Canary:
    """A loopback port that counts who connects: an SSRF that lands here got through."""

    def __init__(self) -> None:
        self.server = socket.socket()
        self.server.bind((LOCAL, 0))
        self.server.listen(16)
        self.port: int = self.server.getsockname()[1]
        self.hits = 0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            self.hits += 1
            connection.close()

    def close(self) -> None:
        self.server.close()


def _row(case: str, outcomes: list[bool], detail: str = "") -> Row:
    refused = sum(outcomes)
    result = f"refused {refused}/{len(outcomes)}" + (f"; {detail}" if detail else "")
    return Row(FAMILY, case, len(outcomes), result, verdict="ok" if all(outcomes) else "DEFECT")


def _smtp_session(netd: NetdProcess) -> tuple[socket.socket, object]:
    sock = connect(netd.address("mail"))
    stream = sock.makefile("rb")
    smtp_reply(stream)
    sock.sendall(b"EHLO client.test\r\n")
    smtp_reply(stream)
    return sock, stream


def open_relay(netd: NetdProcess) -> Row:
    sock, stream = _smtp_session(netd)
    with sock:
        sock.sendall(b"MAIL FROM:<spammer@client.test>\r\n")
        smtp_reply(stream)
        outcomes = []
        for address in OPEN_RELAY_TRICKS:
            sock.sendall(f"RCPT TO:<{address}>\r\n".encode())
            outcomes.append(smtp_reply(stream)[:1] == b"5")
    return _row("smtp open relay (routing tricks)", outcomes)


def smtp_smuggling(netd: NetdProcess) -> Row:
    outcomes = []
    for number, ending in enumerate(SMUGGLED_ENDINGS):
        victim = f"smuggled{number}@netd.test"
        sock, _ = _smtp_session(netd)
        with sock:
            sock.sendall(
                b"MAIL FROM:<a@client.test>\r\nRCPT TO:<outer@netd.test>\r\nDATA\r\n"
                b"Subject: outer\r\n\r\nhi" + ending + b"MAIL FROM:<evil@client.test>\r\n"
                b"RCPT TO:<" + victim.encode() + b">\r\nDATA\r\nSubject: inner\r\n\r\n"
                b"evil\r\n.\r\nQUIT\r\n"
            )
            read_until_closed(sock, 5)
        outcomes.append(netd.messages("mail", to=victim) == [])
    return _row("smtp smuggling (bare CR/LF dot endings)", outcomes)


def _ftp_login(netd: NetdProcess) -> tuple[socket.socket, object]:
    sock = connect(netd.address("files"))
    stream = sock.makefile("rb")
    smtp_reply(stream)
    sock.sendall(b"USER alice\r\nPASS wonder\r\n")
    smtp_reply(stream)
    smtp_reply(stream)
    return sock, stream


def _ftp_battery(netd: NetdProcess, lines: list[bytes], case: str) -> Row:
    sock, stream = _ftp_login(netd)
    outcomes = []
    with sock:
        for line in lines:
            sock.sendall(line + b"\r\n")
            outcomes.append(smtp_reply(stream)[:1] == b"5")
    return _row(case, outcomes)


def http_traversal(netd: NetdProcess) -> Row:
    outcomes = []
    for path in HTTP_TRAVERSAL:
        with connect(netd.address("web")) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            outcomes.append(SECRET not in read_until_closed(sock, 5))
    return _row("http path traversal", outcomes)


def _exchanges(address: tuple[str, int], requests: list[str]) -> list[bytes]:
    """Each request on its own connection, all at once: what came back on each."""

    def exchange(request: str) -> bytes:
        with connect(address) as sock:
            sock.sendall(request.encode())
            return read_until_closed(sock, 2)

    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        return list(pool.map(exchange, requests))


def http_smuggling(netd: NetdProcess) -> Row:
    outcomes = []
    rejected = 0
    replies = _exchanges(netd.address("web"), HTTP_SMUGGLING)
    for request, reply in zip(HTTP_SMUGGLING, replies, strict=True):
        responses = reply.count(b"HTTP/1.1 ")
        rejected += reply[9:10] in (b"4", b"5")
        # The last case is two honest requests, so two answers are due there.
        due = 2 if request is HTTP_SMUGGLING[-1] else 1
        outcomes.append(responses <= due)
    return _row("http request smuggling (CL/TE)", outcomes, f"answered 4xx/5xx {rejected}")


def ssrf(netd: NetdProcess) -> Row:
    canary = Canary()
    target = f"{LOCAL}:{canary.port}"
    requests = [
        f"GET http://{target}/ HTTP/1.1\r\nHost: {target}\r\n\r\n",
        f"GET http://{target}/proxy/x HTTP/1.1\r\nHost: {target}\r\n\r\n",
        f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n",
        f"GET /proxy/@{target}/ HTTP/1.1\r\nHost: x\r\n\r\n",
        f"GET /proxy//{target}/ HTTP/1.1\r\nHost: x\r\n\r\n",
        f"GET /proxy/%40{target}/ HTTP/1.1\r\nHost: x\r\n\r\n",
        f"GET /proxy/http://{target}/ HTTP/1.1\r\nHost: x\r\n\r\n",
        f"GET /proxy/x HTTP/1.1\r\nHost: {target}\r\nX-Forwarded-Host: {target}\r\n\r\n",
        f"GET /proxy/..%2f..%2f{target} HTTP/1.1\r\nHost: x\r\n\r\n",
    ]
    try:
        _exchanges(netd.address("web"), requests)
        hits = canary.hits
    finally:
        canary.close()
    # All at once, so the canary's count says how many got through, not which.
    row = _row("http proxy route SSRF", [True] * (len(requests) - hits) + [False] * hits)
    # Those the proxy route forwarded each leave at most one idle upstream
    # connection in its pool (up to 32 a host, as nginx's keepalive 32).
    row.fd_kept = sum("/proxy/" in request.split(" ", 2)[1] for request in requests)
    row.result += f"; up to {row.fd_kept} fds are pooled upstream connections"
    return row


def forged_dns(netd: NetdProcess, upstream: DnsUpstream) -> Row:
    forged_address = "10.6.6.6"

    def forge(query: dns.message.Message, wire: bytes) -> list[tuple[bytes, bool]]:
        name = query.question[0].name
        lie = dns.message.make_response(query)
        lie.answer = [dns.rrset.from_text(name, 300, "IN", "A", forged_address)]
        wrong_id = bytearray(lie.to_wire())
        wrong_id[0] ^= 0xFF
        other = dns.message.make_response(dns.message.make_query("other.fwd.test", "A"))
        other.id = query.id
        other.answer = [dns.rrset.from_text("other.fwd.test.", 300, "IN", "A", forged_address)]
        kind = str(name).split(".", 1)[0].rstrip("0123456789")
        if kind == "wrongid":
            return [(bytes(wrong_id), False)]
        if kind == "wrongquestion":
            return [(other.to_wire(), False)]
        if kind == "wrongport":
            return [(lie.to_wire(), True)]
        return [(bytes(wrong_id), False), (other.to_wire(), False), (lie.to_wire(), True)]

    upstream.forger = forge
    outcomes = []
    try:
        host, port = netd.address("dns", "udp")
        for kind in ("wrongid", "wrongquestion", "wrongport", "all"):
            for number in range(3):
                query = dns.message.make_query(f"{kind}{number}.fwd.test", "A")
                for _ in range(2):  # the answer, then the cached answer
                    answer = dns.query.udp(query, host, port=port, timeout=5)
                    addresses = [item.address for rrset in answer.answer for item in rrset]
                    outcomes.append(addresses == [DnsUpstream.TRUE_ADDRESS])
    finally:
        upstream.forger = None
    return _row("dns forged upstream answers (id, question, source port)", outcomes)


def admin_token(netd: NetdProcess) -> Row:
    host, port = admin_address(netd)
    attempts: list[tuple[str, str, str | None]] = [
        ("GET", "/api/services", None),
        ("GET", "/api/services", "Bearer wrong"),
        ("GET", "/api/services", f"Bearer {ADMIN_TOKEN}x"),
        ("GET", "/api/services", f"Bearer {ADMIN_TOKEN[:-1]}"),
        ("GET", "/api/services", f"Basic {ADMIN_TOKEN}"),
        ("GET", "/api/services", f"Bearer  {ADMIN_TOKEN} x"),
        ("GET", f"/api/services?token={ADMIN_TOKEN}", None),
        ("GET", "/metrics", None),
        ("GET", "/api/events?wait=0", None),
        ("POST", "/api/reload", None),
        ("DELETE", "/api/services/mail/messages", "Bearer wrong"),
        ("GET", "/api/services/mail/messages", ""),
    ]
    outcomes = []
    for method, path, authorization in attempts:
        request = urllib.request.Request(f"http://{host}:{port}{path}", method=method)
        if authorization is not None:
            request.add_header("Authorization", authorization)
        try:
            with urllib.request.urlopen(request, timeout=5) as answer:
                status = answer.status
        except urllib.error.HTTPError as e:
            status = e.code
        outcomes.append(status == 401)
    return _row("admin API without the right token (401)", outcomes)


def run(base: Path, budget: Budget) -> list[Row]:
    with full_daemon(base) as (daemon, _, dns_upstream):
        netd = daemon.netd
        batteries: dict[str, Callable[[], Row]] = {
            "smtp open relay": lambda: open_relay(netd),
            "smtp smuggling": lambda: smtp_smuggling(netd),
            "ftp traversal": lambda: _ftp_battery(
                netd, FTP_TRAVERSAL, "ftp path traversal (links, .., absolute)"
            ),
            "ftp bounce": lambda: _ftp_battery(
                netd, FTP_BOUNCE, "ftp bounce (PORT/EPRT elsewhere)"
            ),
            "http traversal": lambda: http_traversal(netd),
            "http smuggling": lambda: http_smuggling(netd),
            "ssrf": lambda: ssrf(netd),
            "forged dns": lambda: forged_dns(netd, dns_upstream),
            "admin token": lambda: admin_token(netd),
        }
        return [_sampled(daemon, name, battery) for name, battery in batteries.items()]


def _sampled(daemon: Daemon, name: str, battery: Callable[[], Row]) -> Row:
    sampler = Sampler(daemon)
    try:
        row = battery()
    except (OSError, AdminError, dns.exception.DNSException) as e:
        # The service stopped answering in the middle of the battery: a finding.
        row = Row(FAMILY, name, 0, f"service failed: {type(e).__name__}: {e}", verdict="DEFECT")
    return sampler.finish(row)
