"""
The dns kind in the real daemon, asked by dig and dnspython over UDP, TCP and TLS,
forwarding to an upstream on loopback (dnspython-built) that counts what it is asked.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from netd.testing import NetdProcess
from tests.conftest import StartNetd, fixed_port
from tests.maps import lab_map

DIG = shutil.which("dig")
needs_dig = pytest.mark.skipif(
    DIG is None, reason="dig is not installed (apt-get install dnsutils)"
)
LOCAL = "127.0.0.1"


class Upstream:
    """
    A resolver on loopback, UDP and TCP on one port, answering from rules by name:
    C{*.fwd.test} A records, C{big.fwd.test} (and C{wide.fwd.test}, for other
    tests to count apart) 40 TXT strings truncated over UDP, C{nx.fwd.test}
    NXDOMAIN with an SOA, C{fail.fwd.test} SERVFAIL, C{spoof.fwd.test} with two
    wrong answers before the right one, C{long.fwd.test} with a day's TTL.
    """

    def __init__(self, host: str = LOCAL) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        while True:
            self.tcp = socket.socket(family)
            self.tcp.bind((host, 0))
            self.port = self.tcp.getsockname()[1]
            self.udp = socket.socket(family, socket.SOCK_DGRAM)
            try:
                self.udp.bind((host, self.port))
            except OSError:
                # Some other test's UDP socket has that port: try another.
                self.tcp.close()
                self.udp.close()
                continue
            break
        self.tcp.listen(16)
        self.lock = threading.Lock()
        self.counts: Counter[tuple[str, str]] = Counter()
        self.sources: list[tuple[int, int]] = []  # (source port, query ID) of UDP queries
        self.stopping = False
        for target in (self._serve_udp, self._serve_tcp):
            threading.Thread(target=target, daemon=True).start()

    def count(self, name: str, transport: str = "udp") -> int:
        with self.lock:
            return self.counts[(name, transport)]

    def answer(self, query: dns.message.Message, transport: str) -> list[bytes]:
        name = str(query.question[0].name).lower().rstrip(".")
        with self.lock:
            self.counts[(name, transport)] += 1
        reply = dns.message.make_response(query)
        big = name in ("big.fwd.test", "wide.fwd.test")
        if big and transport == "udp":
            reply.flags |= dns.flags.TC
        elif big:
            strings = [f'"{i:02d} {"b" * 60}"' for i in range(40)]
            reply.answer = [dns.rrset.from_text(name + ".", 300, "IN", "TXT", *strings)]
        elif name == "nx.fwd.test":
            reply.set_rcode(dns.rcode.NXDOMAIN)
            reply.authority = [
                dns.rrset.from_text(
                    "fwd.test.", 3600, "IN", "SOA", "ns.fwd.test. host.fwd.test. 1 2 3 4 60"
                )
            ]
        elif name == "fail.fwd.test":
            reply.set_rcode(dns.rcode.SERVFAIL)
        elif name == "long.fwd.test":
            reply.answer = [dns.rrset.from_text(name + ".", 86400, "IN", "A", "10.0.0.8")]
        elif name.endswith(".fwd.test"):
            reply.answer = [dns.rrset.from_text(name + ".", 300, "IN", "A", "10.0.0.7")]
        else:
            reply.set_rcode(dns.rcode.NXDOMAIN)
        wire: bytes = reply.to_wire(max_size=65535)
        if name == "spoof.fwd.test" and transport == "udp":
            wrong_id = bytearray(wire)
            wrong_id[0] ^= 0xFF
            other = dns.message.make_response(dns.message.make_query("other.fwd.test", "A"))
            other.id = query.id
            other.answer = [dns.rrset.from_text("other.fwd.test.", 300, "IN", "A", "10.6.6.6")]
            return [bytes(wrong_id), other.to_wire(), wire]
        return [wire]

    def _serve_udp(self) -> None:
        while not self.stopping:
            try:
                data, peer = self.udp.recvfrom(65535)
            except OSError:
                return
            query = dns.message.from_wire(data)
            with self.lock:
                self.sources.append((peer[1], query.id))
            for wire in self.answer(query, "udp"):
                self.udp.sendto(wire, peer)

    def _serve_tcp(self) -> None:
        while not self.stopping:
            try:
                connection, _ = self.tcp.accept()
            except OSError:
                return
            with connection:
                connection.settimeout(5)
                query = dns.message.from_wire(read_framed(connection))
                for wire in self.answer(query, "tcp"):
                    connection.sendall(struct.pack(">H", len(wire)) + wire)

    def close(self) -> None:
        self.stopping = True
        self.udp.close()
        self.tcp.close()


def read_framed(connection: socket.socket) -> bytes:
    def exactly(count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = connection.recv(count - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    (length,) = struct.unpack(">H", exactly(2))
    return exactly(length)


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    server = Upstream()
    yield server
    server.close()


def shared_port() -> int:
    """A loopback port free for both TCP and UDP: dig retries a truncated answer on the same one."""
    return fixed_port(LOCAL, udp=True)


_REFUSING: list[socket.socket] = []


def dead_udp_port() -> int:
    """
    A loopback UDP port that refuses for the rest of the run (ICMP port
    unreachable, at once): bound, so that another test's upstream cannot take
    it meanwhile and answer in its place, and connected elsewhere, so that the
    kernel gives it no datagram.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((LOCAL, 0))
    sock.connect((LOCAL, 9))
    _REFUSING.append(sock)
    port: int = sock.getsockname()[1]
    return port


@pytest.fixture(scope="module")
def netd(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream) -> Iterator[NetdProcess]:
    base = tmp_path_factory.mktemp("netd")
    strings = ", ".join(f"'{i:02d} {'t' * 60}'" for i in range(30))
    (base / "lab.test.zone").write_text(
        "$TTL 120\n@ SOA ns.lab.test. admin.lab.test. 1 3600 600 86400 30\n"
        "www A 10.1.0.1\nmail MX 10 www\n"
    )
    (base / "hosts").write_text("10.2.0.1 printer.lan printer\n")
    port = shared_port()
    config = lab_map(
        f"""
  dns:
    type: dns
    listen:
      - "udp:{port}:interface=127.0.0.1"
      - "tcp:{port}:interface=127.0.0.1"
      - {{endpoint: "ssl:0:interface=127.0.0.1", tls: lab}}
    idle_timeout: 1
    records:
      www.netd.test: {{A: [127.0.0.1], AAAA: ["::1"]}}
      netd.test: {{MX: ["10 mx.netd.test"], TXT: ["v=spf1 -all"], CAA: ['0 issue "ca.test"']}}
      alias.netd.test: {{CNAME: [www.netd.test]}}
      "*.apps.netd.test": {{A: [127.0.0.2]}}
      many.netd.test: {{TXT: [{strings}]}}
    zone_files: [{base / "lab.test.zone"}]
    hosts_file: {base / "hosts"}
    forward: ["127.0.0.1:{dead_udp_port()}", "127.0.0.1:{upstream.port}"]
    query_log: true
  closed:
    type: dns
    listen: ["udp:0:interface=127.0.0.1"]
    records:
      www.closed.test: {{A: [127.0.0.5]}}
    forward: ["127.0.0.1:{upstream.port}"]
    recursion_from: [10.0.0.0/8]
  lab:
    type: dns
    listen: ["udp:0:interface=127.0.0.1"]
    catch_all: 10.9.9.9
  tuned:
    type: dns
    listen: ["udp:0:interface=127.0.0.1"]
    forward: ["127.0.0.1:{upstream.port}"]
    cache: {{max_ttl: 600}}
    udp_payload: 4096
    records:
      mid.netd.test: {{TXT: ['{"x" * 200}', '{"y" * 200}', '{"z" * 200}']}}
  small:
    type: dns
    listen: ["udp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.1"]
    records:
      mid.netd.test: {{TXT: ['{"x" * 200}', '{"y" * 200}', '{"z" * 200}']}}
    udp_payload: 512
"""
    )
    process = NetdProcess.start(config, base)
    yield process
    process.stop()


def udp_port(netd: NetdProcess, service: str = "dns") -> int:
    return netd.address(service, "udp")[1]


def ask_udp(
    netd: NetdProcess, name: str, rdtype: str = "A", **kwargs: object
) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, **kwargs)  # type: ignore[arg-type]
    return dns.query.udp(query, LOCAL, port=udp_port(netd), timeout=5)


def ask_tcp(netd: NetdProcess, name: str, rdtype: str = "A") -> dns.message.Message:
    query = dns.message.make_query(name, rdtype)
    return dns.query.tcp(query, LOCAL, port=netd.address("dns")[1], timeout=5)


def texts(reply: dns.message.Message) -> list[str]:
    return [str(rrset) for rrset in reply.answer]


def dig(netd: NetdProcess, *args: str, port: int | None = None) -> str:
    assert DIG is not None
    port = port or udp_port(netd)
    result = subprocess.run(
        [DIG, f"@{LOCAL}", "-p", str(port), "+time=5", "+tries=1", *args],
        capture_output=True,
        text=True,
        timeout=20,
    )
    return result.stdout


# -- local data ----------------------------------------------------------------


def test_local_records_over_udp_and_tcp(netd: NetdProcess) -> None:
    for ask in (ask_udp, ask_tcp):
        reply = ask(netd, "www.netd.test", "AAAA")
        assert reply.flags & dns.flags.AA and texts(reply) == ["www.netd.test. 60 IN AAAA ::1"]
        assert texts(ask(netd, "x.apps.netd.test")) == ["x.apps.netd.test. 60 IN A 127.0.0.2"]
        assert texts(ask(netd, "netd.test", "CAA")) == ['netd.test. 60 IN CAA 0 issue "ca.test"']
    assert texts(ask_udp(netd, "www.lab.test")) == ["www.lab.test. 120 IN A 10.1.0.1"]
    assert texts(ask_udp(netd, "printer")) == ["printer. 60 IN A 10.2.0.1"]
    assert texts(ask_udp(netd, "1.0.2.10.in-addr.arpa", "PTR"))[0].startswith(
        "1.0.2.10.in-addr.arpa. 60 IN PTR printer"
    )


def test_negative_answers_carry_the_soa(netd: NetdProcess) -> None:
    missing = ask_udp(netd, "nope.lab.test")
    assert missing.rcode() == dns.rcode.NXDOMAIN and missing.flags & dns.flags.AA
    assert str(missing.authority[0]) == (
        "lab.test. 30 IN SOA ns.lab.test. admin.lab.test. 1 3600 600 86400 30"
    )
    nodata = ask_udp(netd, "www.netd.test", "MX")
    assert nodata.rcode() == dns.rcode.NOERROR and nodata.answer == []
    assert nodata.authority[0].rdtype == dns.rdatatype.SOA


@needs_dig
def test_dig_over_udp_and_tcp(netd: NetdProcess) -> None:
    out = dig(netd, "alias.netd.test")
    assert "status: NOERROR" in out and "flags: qr aa rd" in out
    assert "alias.netd.test.\t60\tIN\tCNAME\twww.netd.test." in out
    assert "www.netd.test.\t\t60\tIN\tA\t127.0.0.1" in out
    assert "udp: 1232" in out  # our EDNS0 OPT record
    out = dig(netd, "+tcp", "netd.test", "MX", port=netd.address("dns")[1])
    assert "10 mx.netd.test." in out and "(TCP)" in out
    out = dig(netd, "nope.netd.test")
    assert "status: NXDOMAIN" in out and "SOA\tns.netd.test. hostmaster.netd.test." in out


@needs_dig
def test_dig_retries_a_truncated_answer_over_tcp(netd: NetdProcess) -> None:
    out = dig(netd, "+noedns", "many.netd.test", "TXT")
    assert "Truncated, retrying in TCP mode" in out
    assert len(re.findall(r"^many\.netd\.test\.\s+60\s+IN\s+TXT", out, re.M)) == 30


def test_truncation_and_edns_with_dnspython(netd: NetdProcess) -> None:
    small = ask_udp(netd, "many.netd.test", "TXT")
    assert small.flags & dns.flags.TC and small.answer == []
    query = dns.message.make_query("many.netd.test", "TXT", use_edns=0, payload=4096)
    reply, used_tcp = dns.query.udp_with_fallback(query, LOCAL, port=udp_port(netd), timeout=5)
    assert used_tcp and len(reply.answer[0]) == 30
    edns = ask_udp(netd, "www.netd.test", use_edns=0, payload=4096)
    assert edns.edns == 0 and edns.payload == 1232


def test_udp_payload_is_the_smaller_of_the_clients_and_ours(
    netd: NetdProcess, upstream: Upstream
) -> None:
    # wide.fwd.test is 40 TXT strings, some 2.7 KB: tuned (udp_payload 4096) sends it whole.
    tuned = udp_port(netd, "tuned")
    query = dns.message.make_query("wide.fwd.test", "TXT", use_edns=0, payload=4096)
    whole = dns.query.udp(query, LOCAL, port=tuned, timeout=5)
    assert not whole.flags & dns.flags.TC and len(whole.answer[0]) == 40
    assert whole.payload == 4096
    for edns in ({"use_edns": 0, "payload": 1232}, {}):
        query = dns.message.make_query("wide.fwd.test", "TXT", **edns)  # type: ignore[arg-type]
        cut = dns.query.udp(query, LOCAL, port=tuned, timeout=5)
        assert cut.flags & dns.flags.TC and cut.answer == []
    # A 650-byte answer: whole for a client offering 1232, TC for one offering 512 or no EDNS0.
    query = dns.message.make_query("mid.netd.test", "TXT", use_edns=0, payload=1232)
    assert len(dns.query.udp(query, LOCAL, port=tuned, timeout=5).answer[0]) == 3
    for edns in ({"use_edns": 0, "payload": 512}, {}):
        query = dns.message.make_query("mid.netd.test", "TXT", **edns)  # type: ignore[arg-type]
        assert dns.query.udp(query, LOCAL, port=tuned, timeout=5).flags & dns.flags.TC
    # small (udp_payload 512) truncates a 600-byte answer whatever the client offers.
    small = udp_port(netd, "small")
    query = dns.message.make_query("mid.netd.test", "TXT", use_edns=0, payload=4096)
    reply = dns.query.udp(query, LOCAL, port=small, timeout=5)
    assert reply.flags & dns.flags.TC and reply.payload == 512
    over_tcp = dns.query.tcp(query, LOCAL, port=netd.address("small")[1], timeout=5)
    assert len(over_tcp.answer[0]) == 3


@needs_dig
def test_dig_sees_udp_payload_and_truncation(netd: NetdProcess, upstream: Upstream) -> None:
    port = udp_port(netd, "tuned")
    out = dig(netd, "+bufsize=4096", "wide.fwd.test", "TXT", port=port)
    assert "udp: 4096" in out and "flags: qr rd ra;" in out
    assert len(re.findall(r"^wide\.fwd\.test\.\s+\d+\s+IN\s+TXT", out, re.M)) == 40
    out = dig(netd, "+bufsize=1232", "+ignore", "wide.fwd.test", "TXT", port=port)
    assert "flags: qr tc rd ra" in out and "ANSWER: 0" in out
    for edns in ("+bufsize=512", "+noedns"):
        out = dig(netd, edns, "+ignore", "mid.netd.test", "TXT", port=port)
        assert "flags: qr aa tc rd ra" in out and "ANSWER: 0" in out


def test_max_ttl_caps_what_clients_see(netd: NetdProcess, upstream: Upstream) -> None:
    port = udp_port(netd, "tuned")
    query = dns.message.make_query("long.fwd.test", "A")
    fresh = dns.query.udp(query, LOCAL, port=port, timeout=5)
    assert texts(fresh) == ["long.fwd.test. 600 IN A 10.0.0.8"]  # the upstream said 86400
    cached = dns.query.udp(query, LOCAL, port=port, timeout=5)
    assert 0 < cached.answer[0].ttl <= 600
    assert upstream.count("long.fwd.test") == 1
    if DIG is not None:
        out = dig(netd, "long.fwd.test", port=port)
        ttl = re.search(r"^long\.fwd\.test\.\s+(\d+)\s+IN\s+A\s+10\.0\.0\.8", out, re.M)
        assert ttl is not None and 0 < int(ttl.group(1)) <= 600


# -- TCP and TLS ---------------------------------------------------------------


def framed(name: str, rdtype: str = "A") -> tuple[int, bytes]:
    query = dns.message.make_query(name, rdtype)
    wire = query.to_wire()
    return query.id, struct.pack(">H", len(wire)) + wire


def test_several_queries_on_one_tcp_connection(netd: NetdProcess) -> None:
    with socket.create_connection(netd.address("dns"), timeout=5) as connection:
        queries = [framed(n) for n in ("www.netd.test", "alias.netd.test", "a.fwd.test")]
        connection.sendall(b"".join(q for _, q in queries))
        replies = [dns.message.from_wire(read_framed(connection)) for _ in queries]
    assert sorted(r.id for r in replies) == sorted(i for i, _ in queries)
    assert all(r.rcode() == dns.rcode.NOERROR and r.answer for r in replies)


def test_a_length_prefix_without_its_body_times_out(netd: NetdProcess) -> None:
    with socket.create_connection(netd.address("dns"), timeout=5) as connection:
        connection.sendall(b"\xff\xff" + b"partial")
        started = time.monotonic()
        with contextlib.suppress(ConnectionResetError):
            assert connection.recv(10) == b""
        assert time.monotonic() - started < 4
    assert ask_tcp(netd, "www.netd.test").rcode() == dns.rcode.NOERROR


def test_dns_over_tls(netd: NetdProcess) -> None:
    context = ssl.create_default_context(cafile=str(netd.log_path.parent / "state/tls/lab-ca.pem"))
    host, port = netd.address("dns", tls=True)
    query = dns.message.make_query("www.netd.test", "A")
    reply = dns.query.tls(
        query, host, port=port, ssl_context=context, server_hostname="localhost", timeout=5
    )
    assert texts(reply) == ["www.netd.test. 60 IN A 127.0.0.1"]


@needs_dig
def test_dig_over_tls(netd: NetdProcess) -> None:
    ca = str(netd.log_path.parent / "state/tls/lab-ca.pem")
    out = dig(
        netd,
        "+tls",
        f"+tls-ca={ca}",
        "+tls-hostname=localhost",
        "www.netd.test",
        port=netd.address("dns", tls=True)[1],
    )
    if "unknown option" in out or "Invalid option" in out:
        pytest.skip("this dig has no DNS over TLS")
    assert "127.0.0.1" in out and "(TLS)" in out


# -- bad input -----------------------------------------------------------------


def send_raw(netd: NetdProcess, data: bytes) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.5)
        sock.sendto(data, (LOCAL, udp_port(netd)))
        try:
            return sock.recv(65535)
        except TimeoutError:
            return None


HEADER = struct.pack(">HHHHHH", 0xBEEF, 0x0100, 1, 0, 0, 0)


@pytest.mark.parametrize(
    ("data", "rcode"),
    [
        (HEADER + b"\xc0\x0c\x00\x01\x00\x01", dns.rcode.FORMERR),  # pointer loop
        (HEADER + b"\x03www\x04ne", dns.rcode.FORMERR),  # truncated
        (HEADER[:4] + b"\x00\x00" + HEADER[6:], dns.rcode.FORMERR),  # no question
        (HEADER[:4] + b"\x00\x05" + HEADER[6:] + b"\x00\x00\x01\x00\x01" * 5, dns.rcode.FORMERR),
        (b"\xbe\xef\x01", None),
    ],
)
def test_bad_datagrams_get_formerr_or_silence(
    netd: NetdProcess, data: bytes, rcode: int | None
) -> None:
    answer = send_raw(netd, data)
    if rcode is None:
        assert answer is None
    else:
        assert answer is not None
        reply = dns.message.from_wire(answer, question_only=True)
        assert reply.id == 0xBEEF and reply.rcode() == rcode
    assert ask_udp(netd, "www.netd.test").rcode() == dns.rcode.NOERROR


OPT_RR = b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00"
WWW = b"\x03www\x04netd\x04test\x00\x00\x01\x00\x01"


@pytest.mark.parametrize(
    ("counts", "flags", "body", "rcode"),
    [
        ((1, 0, 0, 1), 0x1100, WWW + OPT_RR, dns.rcode.NOTIMP),  # opcode STATUS
        ((2, 0, 0, 1), 0x0100, WWW + WWW + OPT_RR, dns.rcode.FORMERR),
        ((1, 0, 0, 2), 0x0100, WWW + OPT_RR + OPT_RR, dns.rcode.FORMERR),
    ],
    ids=["status", "two questions", "two OPTs"],
)
def test_formerr_and_notimp_carry_an_opt_when_the_query_did(
    netd: NetdProcess, counts: tuple[int, int, int, int], flags: int, body: bytes, rcode: int
) -> None:
    answer = send_raw(netd, struct.pack(">HH4H", 0xBEEF, flags, *counts) + body)
    assert answer is not None
    reply = dns.message.from_wire(answer)
    assert (reply.id, reply.rcode(), reply.edns) == (0xBEEF, rcode, 0)


@needs_dig
def test_an_unknown_edns_version_is_badvers_with_version_0(netd: NetdProcess) -> None:
    out = dig(netd, "+edns=1", "+noednsnegotiation", "+qr", "www.netd.test")
    assert "status: BADVERS" in out and "EDNS: version: 0" in out


def test_random_bytes_do_not_stop_the_server(netd: NetdProcess) -> None:
    generator = random.Random(6)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _ in range(6):
            # In rounds: a burst bigger than the socket's buffer would drop the check too.
            for _ in range(50):
                size = generator.randrange(0, 600)
                sock.sendto(generator.randbytes(size), (LOCAL, udp_port(netd)))
            assert ask_udp(netd, "www.netd.test").rcode() == dns.rcode.NOERROR
    with socket.create_connection(netd.address("dns"), timeout=5) as connection:
        connection.sendall(struct.pack(">H", 40) + os.urandom(40))
    assert ask_udp(netd, "www.netd.test").rcode() == dns.rcode.NOERROR
    assert ask_tcp(netd, "www.netd.test").rcode() == dns.rcode.NOERROR
    assert netd.process.poll() is None


# -- forwarding and the cache --------------------------------------------------


def test_forwarded_answers_are_cached(netd: NetdProcess, upstream: Upstream) -> None:
    first = ask_udp(netd, "cached.fwd.test")
    assert texts(first) == ["cached.fwd.test. 300 IN A 10.0.0.7"]
    assert first.flags & dns.flags.RA and not first.flags & dns.flags.AA
    second = ask_udp(netd, "CACHED.fwd.test")
    assert str(second.question[0].name) == "CACHED.fwd.test."
    assert second.answer[0].ttl <= 300 and second.answer[0][0].address == "10.0.0.7"
    assert ask_tcp(netd, "cached.fwd.test").answer[0][0].address == "10.0.0.7"
    assert upstream.count("cached.fwd.test") == 1


def test_negative_answers_are_cached(netd: NetdProcess, upstream: Upstream) -> None:
    for _ in range(3):
        reply = ask_udp(netd, "nx.fwd.test")
        assert reply.rcode() == dns.rcode.NXDOMAIN
        assert reply.authority[0].rdtype == dns.rdatatype.SOA
    assert upstream.count("nx.fwd.test") == 1


def test_truncated_upstream_answers_are_fetched_over_tcp(
    netd: NetdProcess, upstream: Upstream
) -> None:
    query = dns.message.make_query("big.fwd.test", "TXT")
    reply = dns.query.tcp(query, LOCAL, port=netd.address("dns")[1], timeout=5)
    assert len(reply.answer[0]) == 40
    assert upstream.count("big.fwd.test", "udp") == 1
    assert upstream.count("big.fwd.test", "tcp") == 1
    # The same answer is too big for a client's UDP: TC, from the cache.
    assert ask_udp(netd, "big.fwd.test", "TXT").flags & dns.flags.TC
    assert upstream.count("big.fwd.test", "tcp") == 1


def test_all_upstreams_failing_is_servfail(netd: NetdProcess, upstream: Upstream) -> None:
    assert ask_udp(netd, "fail.fwd.test").rcode() == dns.rcode.SERVFAIL
    assert upstream.count("fail.fwd.test") == 1
    # SERVFAIL is not cached.
    assert ask_udp(netd, "fail.fwd.test").rcode() == dns.rcode.SERVFAIL
    assert upstream.count("fail.fwd.test") == 2


def test_only_matching_upstream_answers_are_taken(netd: NetdProcess, upstream: Upstream) -> None:
    assert texts(ask_udp(netd, "spoof.fwd.test")) == ["spoof.fwd.test. 300 IN A 10.0.0.7"]
    metrics = netd.admin("GET", "/metrics").decode()
    assert isinstance(metrics, str) and "upstream_mismatched" in metrics


def test_upstream_queries_use_random_ports_and_ids(netd: NetdProcess, upstream: Upstream) -> None:
    for i in range(8):
        ask_udp(netd, f"r{i}.fwd.test")
    with upstream.lock:
        recent = upstream.sources[-8:]
    assert len({port for port, _ in recent}) >= 7
    assert len({ident for _, ident in recent}) >= 7


def ask_service(netd: NetdProcess, service: str, name: str, rdtype: str) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype)
    return dns.query.udp(query, LOCAL, port=udp_port(netd, service), timeout=5)


def test_recursion_from_refuses_others(netd: NetdProcess, upstream: Upstream) -> None:
    assert ask_service(netd, "closed", "x.fwd.test", "A").rcode() == dns.rcode.REFUSED
    local = ask_service(netd, "closed", "www.closed.test", "A")
    assert texts(local) == ["www.closed.test. 60 IN A 127.0.0.5"]
    assert not local.flags & dns.flags.RA
    assert upstream.count("x.fwd.test") == 0


@needs_dig
def test_catch_all_with_dig(netd: NetdProcess) -> None:
    out = dig(netd, "anything.example", port=udp_port(netd, "lab"))
    assert "anything.example.\t60\tIN\tA\t10.9.9.9" in out and "flags: qr aa rd" in out
    out = dig(netd, "anything.example", "AAAA", port=udp_port(netd, "lab"))
    assert "status: NOERROR" in out and "ANSWER: 0" in out


# -- admin ---------------------------------------------------------------------


def test_query_log_in_the_admin_api(netd: NetdProcess) -> None:
    netd.admin("DELETE", "/api/services/dns/queries")
    ask_udp(netd, "www.netd.test")
    ask_udp(netd, "logged.fwd.test")
    ask_tcp(netd, "logged.fwd.test")
    entries = netd.admin("GET", "/api/services/dns/queries")
    assert isinstance(entries, list)
    assert [(e["name"], e["source"], e["transport"]) for e in entries] == [
        ("www.netd.test.", "local", "udp"),
        ("logged.fwd.test.", "upstream", "udp"),
        ("logged.fwd.test.", "cache", "tcp"),
    ]
    assert entries[1]["answer"] == ["logged.fwd.test 300 A 10.0.0.7"]
    assert entries[0]["rcode"] == "NOERROR" and entries[0]["client"].startswith("127.0.0.1:")
    assert netd.admin("DELETE", "/api/services/dns/queries") == {"cleared": 3}
    ask_udp(netd, "nope.lab.test")  # an NXDOMAIN of its own: the test may run alone
    metrics = netd.admin("GET", "/metrics").decode()
    assert isinstance(metrics, str)
    for counter in ("cache_hits", "cache_misses", "rcode_NOERROR", "rcode_NXDOMAIN"):
        assert counter in metrics


def test_dead_upstream_is_skipped(
    tmp_path: Path, start_netd: StartNetd, upstream: Upstream
) -> None:
    config = f"""
services:
  dns:
    type: dns
    listen: ["udp:0:interface=127.0.0.1"]
    forward: ["127.0.0.1:{dead_udp_port()}", "127.0.0.1:{dead_udp_port()}"]
"""
    netd = start_netd(config)
    started = time.monotonic()
    reply = dns.query.udp(
        dns.message.make_query("a.fwd.test", "A"), LOCAL, port=udp_port(netd), timeout=5
    )
    assert reply.rcode() == dns.rcode.SERVFAIL
    assert time.monotonic() - started < 2  # refused ports fail at once, no timeout


def test_reload_reads_changed_zone_files(tmp_path: Path, start_netd: StartNetd) -> None:
    zone = tmp_path / "reload.test.zone"
    zone.write_text("www A 10.3.0.1\n")
    # A fixed port: a changed service is rebuilt, and would bind another port 0.
    config = f"""
admin: {{listen: ["tcp:0:interface=127.0.0.1"]}}
services:
  dns:
    type: dns
    listen: ["udp:{shared_port()}:interface=127.0.0.1"]
    zone_files: [{zone}]
"""
    netd = start_netd(config)
    assert texts(ask_udp(netd, "www.reload.test")) == ["www.reload.test. 60 IN A 10.3.0.1"]
    zone.write_text("www A 10.3.0.2\nnew A 10.3.0.3\n")
    changes = netd.reload()
    assert "dns" in json.dumps(changes)
    assert texts(ask_udp(netd, "www.reload.test")) == ["www.reload.test. 60 IN A 10.3.0.2"]
    assert texts(ask_udp(netd, "new.reload.test")) == ["new.reload.test. 60 IN A 10.3.0.3"]


def test_ipv6_listener_and_upstream(start_netd: StartNetd) -> None:
    upstream = Upstream("::1")
    try:
        config = f"""
services:
  dns:
    type: dns
    listen: ['udp:0:interface=\\:\\:1', 'tcp:0:interface=\\:\\:1']
    records:
      www.netd.test: {{AAAA: ["::1"]}}
    forward: ["[::1]:{upstream.port}"]
"""
        netd = start_netd(config)
        host, port = netd.address("dns", "udp")
        assert host == "::1"
        local = dns.query.udp(dns.message.make_query("www.netd.test", "AAAA"), host, port=port)
        assert texts(local) == ["www.netd.test. 60 IN AAAA ::1"]
        query = dns.message.make_query("v6.fwd.test", "A")
        assert texts(dns.query.udp(query, host, port=port, timeout=5)) == [
            "v6.fwd.test. 300 IN A 10.0.0.7"
        ]
        query = dns.message.make_query("big.fwd.test", "TXT")
        tcp_port = netd.address("dns")[1]
        assert len(dns.query.tcp(query, host, port=tcp_port, timeout=5).answer[0]) == 40
        assert upstream.count("v6.fwd.test") == 1 and upstream.count("big.fwd.test", "tcp") == 1
    finally:
        upstream.close()


def test_ipv4_clients_of_a_dual_stack_listener_get_recursion(
    start_netd: StartNetd, upstream: Upstream
) -> None:
    config = f"""
services:
  dns:
    type: dns
    listen: ['udp:0:interface=\\:\\:', 'tcp6:0:interface=\\:\\:']
    forward: ["127.0.0.1:{upstream.port}"]
    recursion_from: [127.0.0.0/8]
"""
    netd = start_netd(config)
    assert netd.address("dns", "udp")[0] == "::"
    # 127.0.0.1 reaches a listener on :: as ::ffff:127.0.0.1, and is inside 127.0.0.0/8.
    query = dns.message.make_query("dual.fwd.test", "A")
    over_udp = dns.query.udp(query, LOCAL, port=udp_port(netd), timeout=5)
    over_tcp = dns.query.tcp(query, LOCAL, port=netd.address("dns")[1], timeout=5)
    for reply in (over_udp, over_tcp):
        assert texts(reply) == ["dual.fwd.test. 300 IN A 10.0.0.7"]
        assert reply.flags & dns.flags.RA
    # ::1 is not in 127.0.0.0/8: the check still tells clients apart.
    refused = dns.query.udp(query, "::1", port=udp_port(netd), timeout=5)
    assert refused.rcode() == dns.rcode.REFUSED
    assert upstream.count("dual.fwd.test") == 1


def query_logging(upstream: Upstream) -> str:
    return f"""
services:
  dns:
    type: dns
    listen: ["udp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.1"]
    records:
      www.netd.test: {{A: [127.0.0.1]}}
    forward: ["127.0.0.1:{upstream.port}"]
    query_log: true
"""


def test_query_log_writes_one_line_per_query(start_netd: StartNetd, upstream: Upstream) -> None:
    netd = start_netd(query_logging(upstream))
    ask_udp(netd, "www.netd.test")
    ask_udp(netd, "logline.fwd.test", "A")
    ask_tcp(netd, "logline.fwd.test")
    ask_udp(netd, "nope.netd.test", "AAAA")
    if DIG is not None:
        dig(netd, "+tcp", "www.netd.test", "MX", port=netd.address("dns")[1])
    # Stopping writes out what the log still buffers.
    assert netd.stop() == 0
    lines = re.findall(
        r"^\S+ \[netd\.dns#info\] 127\.0\.0\.1:\d+ (udp|tcp) (\S+) (\w+) (\w+) (\w+) [\d.]+ms$",
        netd.output,
        re.M,
    )
    expected = [
        ("udp", "www.netd.test.", "A", "NOERROR", "local"),
        ("udp", "logline.fwd.test.", "A", "NOERROR", "upstream"),
        ("tcp", "logline.fwd.test.", "A", "NOERROR", "cache"),
        ("udp", "nope.netd.test.", "AAAA", "NXDOMAIN", "upstream"),
    ]
    if DIG is not None:
        expected.append(("tcp", "www.netd.test.", "MX", "NOERROR", "local"))
    assert lines == expected


def test_query_log_lines_in_json_carry_their_fields(
    start_netd: StartNetd, upstream: Upstream
) -> None:
    netd = start_netd("log: {format: json}\n" + query_logging(upstream))
    ask_udp(netd, "json.fwd.test", "A")
    assert netd.stop() == 0
    records = [json.loads(line) for line in netd.output.splitlines() if line.strip()]
    queries = [r for r in records if r.get("log_namespace") == "netd.dns"]
    assert len(queries) == 1
    query = queries[0]
    assert query["client"].startswith("127.0.0.1:") and query["latency_ms"] >= 0
    assert (query["transport"], query["name"], query["qtype"], query["rcode"]) == (
        "udp",
        "json.fwd.test.",
        "A",
        "NOERROR",
    )
    assert query["source"] == "upstream" and query["query_line"].endswith("ms")
