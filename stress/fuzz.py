"""
A seeded fuzz batch per protocol: valid exchanges mutated (bit flips, cuts,
repeats, long runs, stray CR/LF/NUL, numbers out of range), each sent on its
own connection or datagram.  After each batch: the daemon's fd count, RSS and
new tracebacks, and whether one valid exchange still works.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import dns.message
import h2.connection

from ._harness import (
    ADMIN_TOKEN,
    Budget,
    Daemon,
    Row,
    Sampler,
    admin_address,
    doh_parameter,
    full_daemon,
    line_chat_address,
    serving,
    tls_client_context,
)

FAMILY = "fuzz"

TOKENS = [
    b"\r",
    b"\n",
    b"\r\n",
    b"\x00",
    b"\xff\xfe",
    b"\r\n.\r\n",
    b"\r\n\r\n",
    b"%s%n%x",
    b"../../",
    b"-1",
    b"0",
    b"4294967296",
    b"9" * 40,
    b":",
    b"<>",
    b"@",
    b"\x1b[2J",
    "é\u202e".encode(),
]
RUN_LENGTHS = [300, 1100, 5000, 70_000]


def mutate(rng: random.Random, seed: bytes) -> bytes:
    data = bytearray(seed)
    for _ in range(rng.randint(1, 4)):
        pos = rng.randint(0, len(data))
        op = rng.randrange(8)
        if op == 0 and data:
            data[pos % len(data)] ^= 1 << rng.randrange(8)
        elif op == 1:
            data[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif op == 2:
            del data[pos : pos + rng.randint(1, 32)]
        elif op == 3:
            data[pos:pos] = data[pos : pos + rng.randint(1, 64)] * rng.randint(2, 20)
        elif op == 4:
            data[pos:pos] = rng.choice(TOKENS)
        elif op == 5:
            data[pos:pos] = bytes([rng.randrange(256)]) * rng.choice(RUN_LENGTHS)
        elif op == 6:
            del data[pos:]
        elif data:
            data[pos % len(data)] = rng.randrange(256)
    return bytes(data)


def _lines(*lines: str) -> bytes:
    return "".join(line + "\r\n" for line in lines).encode()


def _http_request(path: str, *headers: str, method: str = "GET", body: str = "") -> bytes:
    head = [f"{method} {path} HTTP/1.1", "Host: stress.test", *headers]
    if body:
        head.append(f"Content-Length: {len(body)}")
    return _lines(*head, "") + body.encode()


def _h2_seeds() -> list[bytes]:
    seeds = []
    for method, path, body in (("GET", "/health", b""), ("POST", "/health", b"x" * 100)):
        connection = h2.connection.H2Connection()
        connection.initiate_connection()
        headers = [(":method", method), (":path", path), (":scheme", "https"), (":authority", "x")]
        connection.send_headers(1, headers, end_stream=not body)
        if body:
            connection.send_data(1, body, end_stream=True)
        connection.ping(b"12345678")
        seeds.append(connection.data_to_send())
    return seeds


def _doh_seeds() -> list[bytes]:
    """DoH over HTTP/2 (RFC 8484): a GET with ?dns= and a POST of a message, on one stream each."""
    query = dns.message.make_query("www.netd.test", "A", id=0).to_wire()
    connection = h2.connection.H2Connection()
    connection.initiate_connection()
    get = f"/dns-query?dns={doh_parameter('www.netd.test')}"
    common = [(":scheme", "https"), (":authority", "x"), ("accept", "application/dns-message")]
    connection.send_headers(1, [(":method", "GET"), (":path", get), *common], end_stream=True)
    post = [(":method", "POST"), (":path", "/dns-query"), *common]
    post.append(("content-type", "application/dns-message"))
    connection.send_headers(3, post)
    connection.send_data(3, query, end_stream=True)
    connection.ping(b"12345678")
    return [connection.data_to_send()]


def _dns_queries() -> list[bytes]:
    queries = [
        dns.message.make_query("www.netd.test", "A"),
        dns.message.make_query("mx.netd.test", "MX", use_edns=0, payload=4096),
        dns.message.make_query("fuzz.fwd.test", "A"),
        dns.message.make_query("1.0.0.127.in-addr.arpa", "PTR", want_dnssec=True),
    ]
    return [query.to_wire() for query in queries]


Address = Callable[[Daemon], tuple[str, int]]


@dataclass
class Target:
    name: str
    check: str  # which valid exchange shows it still serves (see _harness.serving)
    address: Address
    seeds: list[bytes]
    transport: str = "tcp"  # tcp | tls-h2 | udp | tcp-framed


def targets() -> list[Target]:
    token = f"Authorization: Bearer {ADMIN_TOKEN}"
    return [
        Target(
            "smtp",
            "smtp",
            lambda d: d.netd.address("mail"),
            [
                _lines(
                    "EHLO fuzz.test",
                    "MAIL FROM:<a@fuzz.test> SIZE=100 BODY=8BITMIME",
                    "RCPT TO:<fuzz@netd.test>",
                    "DATA",
                    "Subject: fuzz",
                    "",
                    "body",
                    ".",
                    "QUIT",
                ),
                _lines(
                    "HELO x", "RSET", "VRFY root", "NOOP", "AUTH PLAIN AGJvYgBzZWNyZXQ=", "QUIT"
                ),
            ],
        ),
        Target(
            "ftp",
            "ftp",
            lambda d: d.netd.address("files"),
            [
                _lines("USER anonymous", "PASS a@b", "PWD", "TYPE I", "SIZE hello.txt", "QUIT"),
                _lines("USER alice", "PASS wonder", "CWD /", "MDTM link_out", "REST 5", "QUIT"),
                _lines("USER anonymous", "PASS x", "EPSV", "PORT 127,0,0,1,4,1", "FEAT", "QUIT"),
            ],
        ),
        Target(
            "http/1.1",
            "http",
            lambda d: d.netd.address("web"),
            [
                _http_request("/health", "Connection: close"),
                _http_request("/big.bin", "Range: bytes=0-99,200-299", 'If-None-Match: "x"'),
                _http_request("/proxy/fuzz?a=b", "X-Forwarded-For: 1.2.3.4"),
                _http_request("/index.html", method="POST", body="a=b&c=d"),
                _lines(
                    "POST /health HTTP/1.1",
                    "Host: x",
                    "Transfer-Encoding: chunked",
                    "",
                    "5",
                    "hello",
                    "0",
                    "",
                ),
            ],
        ),
        Target("h2", "h2", lambda d: d.netd.address("web", tls=True), _h2_seeds(), "tls-h2"),
        Target("doh h2", "doh", lambda d: d.netd.address("dns", tls=True), _doh_seeds(), "tls-h2"),
        Target("dns udp", "dns-udp", lambda d: d.netd.address("dns", "udp"), _dns_queries(), "udp"),
        Target(
            "dns tcp",
            "dns-tcp",
            lambda d: d.netd.address("dns"),
            [struct.pack(">H", len(q)) + q for q in _dns_queries()],
            "tcp-framed",
        ),
        Target(
            "irc",
            "irc",
            lambda d: d.netd.address("chat"),
            [
                _lines(
                    "CAP LS 302",
                    "NICK fuzzer",
                    "USER f 0 * :f",
                    "CAP END",
                    "JOIN #lobby,#fuzz",
                    "PRIVMSG #lobby :hi",
                    "MODE #lobby +b",
                    "WHO #lobby",
                    "TOPIC #fuzz :t",
                    "QUIT :bye",
                ),
            ],
        ),
        Target(
            "line chat",
            "line",
            lambda d: line_chat_address(d.netd),
            [
                _lines(
                    "/nick fuzzer", "/join fuzz", "hello", "/who", "/msg x hi", "/topic t", "/quit"
                )
            ],
        ),
        Target(
            "admin api",
            "admin",
            lambda d: admin_address(d.netd),
            [
                _http_request("/api/services", token),
                _http_request("/metrics", token),
                _http_request("/api/events?service=web&type=request&since=0&wait=0", token),
                _http_request("/api/services/mail/messages?to=x@netd.test", token),
                _http_request("/healthz"),
            ],
        ),
    ]


def _send_stream(address: tuple[str, int], data: bytes, rng: random.Random, h2: bool) -> None:
    with socket.create_connection(address, timeout=2) as raw:
        sock: socket.socket = raw
        if h2:
            sock = tls_client_context(["h2"]).wrap_socket(raw, server_hostname="localhost")
        sock.sendall(data)
        sock.settimeout(0.02)
        with contextlib.suppress(TimeoutError, OSError):
            sock.recv(65536)
        if rng.random() < 0.25:  # leave with a reset instead of a FIN
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _batch(daemon: Daemon, target: Target, rng: random.Random, count: int, cap: float) -> Row:
    sampler = Sampler(daemon)
    address = target.address(daemon)
    started = time.monotonic()
    sent = failures = 0
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM) if target.transport == "udp" else None
    try:
        while sent < count and time.monotonic() - started < cap:
            seed = rng.choice(target.seeds)
            if target.transport == "tcp-framed" and rng.random() < 0.5:
                # Half keep a true length prefix, so the fuzz reaches the parser.
                body = mutate(rng, seed[2:])
                data = struct.pack(">H", len(body) & 0xFFFF) + body
            elif target.transport == "tls-h2" and rng.random() < 0.75:
                data = seed[:24] + mutate(rng, seed[24:])  # past the connection preface
            else:
                data = mutate(rng, seed)
            sent += 1
            try:
                if udp is not None:
                    udp.sendto(data[:65507], address)
                    if sent % 50 == 0:  # in rounds, or the socket buffer drops them
                        time.sleep(0.01)
                else:
                    _send_stream(address, data, rng, target.transport == "tls-h2")
            except OSError:
                failures += 1
    finally:
        if udp is not None:
            udp.close()
    elapsed = time.monotonic() - started
    alive = serving(daemon, target.check)
    result = (
        f"{sent} inputs in {elapsed:.0f} s, {failures} cut or refused; "
        f"then {'serving' if alive else 'NOT serving'}"
    )
    row = sampler.finish(Row(FAMILY, target.name, sent, result))
    if not alive:
        row.verdict = "DEFECT"
    return row


def run(base: Path, budget: Budget) -> list[Row]:
    rows = []
    left = targets()
    restarts = 0
    while left:
        # A batch that kills the daemon is reported; the next batches get a new one.
        with full_daemon(base / f"daemon{restarts}") as (daemon, _, _):
            while left and daemon.alive():
                target = left.pop(0)
                rng = random.Random(f"{budget.seed}-fuzz-{target.name}")
                count = budget.count(2000, 60)
                rows.append(_batch(daemon, target, rng, count, budget.seconds(15, 3)))
        restarts += 1
    return rows
