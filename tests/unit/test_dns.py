"""
The dns kind without sockets: options, local answers, the wire reader against bad
input, the cache on a fake clock, TCP framing on a string transport.
"""

from __future__ import annotations

import functools
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import Logger, formatEvent
from twisted.python.failure import Failure

from netd.config import parse_config
from netd.events import Journal, ServiceStats
from netd.kinds import BuildContext
from netd.services.dns import Options, build
from netd.services.dns.forward import Cache, Forwarder, Upstream, UpstreamFailed, _matches
from netd.services.dns.server import _BURST, Datagrams, Server, Stream
from netd.services.dns.wire import name_to_wire
from tests.maps import ServiceMap

RECORDS = """\
    records:
      www.netd.test: {A: [127.0.0.1, 127.0.0.9], AAAA: ["::1"]}
      netd.test:
        MX: ["10 mx.netd.test"]
        TXT: ["v=spf1 -all"]
        NS: [ns.netd.test]
        CAA: ['0 issue "letsencrypt.org"']
        ttl: 300
      alias.netd.test: {CNAME: [alias2.netd.test]}
      alias2.netd.test: {CNAME: [www.netd.test]}
      outside.netd.test: {CNAME: [www.example.com]}
      loop.netd.test: {CNAME: [loop.netd.test]}
      _sip._udp.netd.test: {SRV: ["0 5 5060 sip.netd.test"]}
      1.0.0.127.in-addr.arpa: {PTR: [www.netd.test]}
      "*.apps.netd.test": {A: [127.0.0.2]}
"""


DNS = ServiceMap("dns", "dns", Options, listen="['udp:0', 'tcp:0']")
options = DNS.parse
errors = DNS.errors


def server(
    tmp_path: Path,
    section: str = RECORDS,
    clock: Clock | None = None,
    log: EventLoggingObserver | None = None,
) -> Server:
    context = BuildContext(
        reactor=clock or Clock(),
        name="dns",
        state_dir=tmp_path,
        journal=Journal(Clock()),
        stats=ServiceStats(),
        log=Logger(observer=log),
        tls={},
    )
    return Server(options(tmp_path, section), context)


CLIENT = ("127.0.0.1", 40000)


def ask(
    srv: Server, name: str, rdtype: str = "A", udp: bool = True, **kwargs: Any
) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, **kwargs)
    answer = srv.handle(query.to_wire(), CLIENT, udp)
    assert isinstance(answer, bytes)
    reply = dns.message.from_wire(answer)
    assert reply.id == query.id
    return reply


def make_wire(name: str, rdtype: str = "A") -> bytes:
    wire: bytes = dns.message.make_query(name, rdtype).to_wire()
    return wire


def texts(reply: dns.message.Message) -> list[str]:
    return [str(rrset) for rrset in reply.answer]


# -- options -------------------------------------------------------------------


def test_defaults(tmp_path: Path) -> None:
    parsed = options(tmp_path, "")
    assert parsed.records == () and parsed.forward == () and parsed.catch_all is None
    assert parsed.cache.size == 10000 and parsed.cache.negative_ttl == 300
    assert [str(n) for n in parsed.recursion_from] == ["127.0.0.0/8", "::1/128"]
    assert parsed.udp_payload == 1232 and not parsed.query_log


def test_values(tmp_path: Path) -> None:
    parsed = options(
        tmp_path,
        "    forward: ['127.0.0.1:5300', '::1', '[::1]:5301', 10.0.0.1]\n"
        "    cache: {size: 5, max_ttl: 60, negative_ttl: 10}\n"
        "    recursion_from: [10.0.0.0/8]\n"
        "    catch_all: 10.9.9.9\n"
        "    udp_payload: 4096\n"
        "    query_log: true\n",
    )
    assert [str(u) for u in parsed.forward] == [
        "127.0.0.1:5300",
        "[::1]:53",
        "[::1]:5301",
        "10.0.0.1:53",
    ]
    assert (parsed.cache.size, parsed.cache.max_ttl, parsed.cache.negative_ttl) == (5, 60, 10)
    assert parsed.catch_all == bytes([10, 9, 9, 9]) and parsed.query_log
    assert parsed.udp_payload == 4096


@pytest.mark.parametrize(
    ("value", "message"), [(511, "must be at least 512"), (4097, "must be at most 4096")]
)
def test_udp_payload_outside_its_range_is_an_error_in_place(
    tmp_path: Path, value: int, message: str
) -> None:
    assert errors(tmp_path, f"    udp_payload: {value}\n") == [
        f"{tmp_path / 'netd.yaml'}:5:18: services.dns.udp_payload: {message}, got {value}"
    ]


def test_config_errors_name_their_place(tmp_path: Path) -> None:
    found = errors(
        tmp_path,
        "    records:\n"
        "      www.netd.test: {A: [1.2.3], MX: ['ten mx'], BOGUS: [x]}\n"
        "      'bad..name': {A: [127.0.0.1]}\n"
        "      six.netd.test: {AAAA: [127.0.0.1], SRV: ['1 2 3'], CAA: ['0 is-sue x']}\n"
        "    forward: [nowhere:53, '127.0.0.1:99999']\n"
        "    recursion_from: [10.0.0.0/33]\n"
        "    catch_all: '::1'\n"
        "    cache: {size: -1, bogus: 1}\n"
        "    zone_files: [missing.zone]\n",
    )
    text = "\n".join(found)
    for expected in (
        ":6:27: services.dns.records.www.netd.test.A[0]: not an IPv4 address: '1.2.3'",
        "services.dns.records.www.netd.test.MX[0]: not a 16-bit number: 'ten'",
        "services.dns.records.www.netd.test.BOGUS: unsupported record type 'BOGUS'",
        "services.dns.records.bad..name: not a domain name: 'bad..name'",
        "services.dns.records.six.netd.test.AAAA[0]: not an IPv6 address",
        "services.dns.records.six.netd.test.SRV[0]: expected PRIORITY WEIGHT PORT TARGET",
        "services.dns.records.six.netd.test.CAA[0]: not a CAA tag: 'is-sue'",
        "services.dns.forward[0]: not IP[:PORT]: 'nowhere:53'",
        "services.dns.forward[1]: not IP[:PORT]: '127.0.0.1:99999'",
        "services.dns.recursion_from[0]: not an address or network: '10.0.0.0/33'",
        "services.dns.catch_all: not an IPv4 address: '::1'",
        "services.dns.cache.size: must be at least 0",
        "services.dns.cache.bogus: unknown key",
        "services.dns.zone_files[0]: cannot read",
    ):
        assert expected in text, (expected, text)


def test_zone_file_errors_carry_the_line(tmp_path: Path) -> None:
    (tmp_path / "a.test.zone").write_text("$TTL 60\nwww A 127.0.0.1\nmail MX ten mail\n")
    (tmp_path / "b.test.zone").write_text("$INCLUDE other.zone\n")
    (tmp_path / "hosts").write_text("127.0.0.1 localhost\nnot-an-address host\n")
    found = errors(tmp_path, "    zone_files: [a.test.zone, b.test.zone]\n    hosts_file: hosts\n")
    assert any("a.test.zone line 3: not a 16-bit number: 'ten'" in e for e in found)
    assert any("b.test.zone line 1: $INCLUDE other.zone: cannot read" in e for e in found)
    assert any("hosts line 2: not an IP address: 'not-an-address'" in e for e in found)


def test_a_zone_file_without_soa_still_owns_its_origin(tmp_path: Path) -> None:
    (tmp_path / "plain.test.zone").write_text("www A 10.0.0.1\n")
    srv = server(tmp_path, "    zone_files: [plain.test.zone]\n    cache: {negative_ttl: 42}\n")
    assert texts(ask(srv, "www.plain.test")) == ["www.plain.test. 60 IN A 10.0.0.1"]
    missing = ask(srv, "other.plain.test")
    assert missing.rcode() == dns.rcode.NXDOMAIN
    assert str(missing.authority[0]).startswith("plain.test. 42 IN SOA ns.plain.test.")


def test_zone_file_and_hosts_file(tmp_path: Path) -> None:
    (tmp_path / "lab.test.zone").write_text(
        "; comment\n"
        "$TTL 120\n"
        "@ IN SOA ns.lab.test. admin.lab.test. ( 7 3600 600\n"
        "     86400 30 ) ; minimum 30\n"
        "  IN NS ns\n"
        "ns 60 IN A 10.0.0.1\n"
        "www IN 90 A 10.0.0.2\n"
        '    TXT "a b; c" plain\n'
        "$ORIGIN sub.lab.test.\n"
        "x CNAME www.lab.test.\n"
    )
    (tmp_path / "hosts").write_text("# hosts\n10.1.1.1 printer printer.lan\nfe80::1%lo v6host\n")
    srv = server(tmp_path, "    zone_files: [lab.test.zone]\n    hosts_file: hosts\n")
    assert texts(ask(srv, "ns.lab.test")) == ["ns.lab.test. 60 IN A 10.0.0.1"]
    assert texts(ask(srv, "www.lab.test", "TXT")) == ['www.lab.test. 120 IN TXT "a b; c" "plain"']
    assert texts(ask(srv, "www.lab.test")) == ["www.lab.test. 90 IN A 10.0.0.2"]
    assert texts(ask(srv, "x.sub.lab.test"))[0] == "x.sub.lab.test. 120 IN CNAME www.lab.test."
    missing = ask(srv, "nope.lab.test")
    assert missing.rcode() == dns.rcode.NXDOMAIN
    # RFC 2308: the SOA in a negative answer has min(TTL, minimum) = 30.
    assert str(missing.authority[0]).startswith(
        "lab.test. 30 IN SOA ns.lab.test. admin.lab.test. 7"
    )
    assert texts(ask(srv, "printer.lan")) == ["printer.lan. 60 IN A 10.1.1.1"]
    assert texts(ask(srv, "v6host", "AAAA")) == ["v6host. 60 IN AAAA fe80::1"]
    assert texts(ask(srv, "1.1.1.10.in-addr.arpa", "PTR")) == [
        "1.1.1.10.in-addr.arpa. 60 IN PTR printer.\n1.1.1.10.in-addr.arpa. 60 IN PTR printer.lan."
    ]
    # Hosts names own only themselves: their neighbours are not local.
    assert ask(srv, "scanner.lan").rcode() == dns.rcode.REFUSED


# -- local answers -------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "rdtype", "expected"),
    [
        (
            "www.netd.test",
            "A",
            ["www.netd.test. 60 IN A 127.0.0.1\nwww.netd.test. 60 IN A 127.0.0.9"],
        ),
        ("www.netd.test", "AAAA", ["www.netd.test. 60 IN AAAA ::1"]),
        ("netd.test", "MX", ["netd.test. 300 IN MX 10 mx.netd.test."]),
        ("netd.test", "TXT", ['netd.test. 300 IN TXT "v=spf1 -all"']),
        ("netd.test", "NS", ["netd.test. 300 IN NS ns.netd.test."]),
        ("netd.test", "CAA", ['netd.test. 300 IN CAA 0 issue "letsencrypt.org"']),
        ("_sip._udp.netd.test", "SRV", ["_sip._udp.netd.test. 60 IN SRV 0 5 5060 sip.netd.test."]),
        ("1.0.0.127.in-addr.arpa", "PTR", ["1.0.0.127.in-addr.arpa. 60 IN PTR www.netd.test."]),
        ("a.apps.netd.test", "A", ["a.apps.netd.test. 60 IN A 127.0.0.2"]),
        ("b.a.apps.netd.test", "A", ["b.a.apps.netd.test. 60 IN A 127.0.0.2"]),
        ("WwW.NeTd.TeSt", "AAAA", ["WwW.NeTd.TeSt. 60 IN AAAA ::1"]),
    ],
)
def test_local_records_answer_authoritatively(
    tmp_path: Path, name: str, rdtype: str, expected: list[str]
) -> None:
    reply = ask(server(tmp_path), name, rdtype)
    assert reply.rcode() == dns.rcode.NOERROR
    assert reply.flags & dns.flags.AA
    assert texts(reply) == expected
    assert str(reply.question[0].name) == name + "."


def test_cname_chain_is_followed_inside_local_data(tmp_path: Path) -> None:
    srv = server(tmp_path)
    assert texts(ask(srv, "alias.netd.test")) == [
        "alias.netd.test. 60 IN CNAME alias2.netd.test.",
        "alias2.netd.test. 60 IN CNAME www.netd.test.",
        "www.netd.test. 60 IN A 127.0.0.1\nwww.netd.test. 60 IN A 127.0.0.9",
    ]
    assert texts(ask(srv, "outside.netd.test")) == [
        "outside.netd.test. 60 IN CNAME www.example.com."
    ]
    loop = ask(srv, "loop.netd.test")
    assert loop.rcode() == dns.rcode.NOERROR and len(loop.answer[0]) == 1
    assert struct.unpack(">H", srv.handle(make_wire("loop.netd.test"), CLIENT, True)[6:8]) == (1,)  # type: ignore[index]
    assert texts(ask(srv, "alias.netd.test", "CNAME")) == [
        "alias.netd.test. 60 IN CNAME alias2.netd.test."
    ]


def test_nxdomain_and_nodata_carry_the_soa(tmp_path: Path) -> None:
    srv = server(tmp_path)
    missing = ask(srv, "nope.netd.test")
    assert missing.rcode() == dns.rcode.NXDOMAIN and missing.flags & dns.flags.AA
    assert missing.answer == []
    (soa,) = missing.authority
    assert soa.rdtype == dns.rdatatype.SOA and str(soa.name) == "netd.test."
    nodata = ask(srv, "www.netd.test", "MX")
    assert nodata.rcode() == dns.rcode.NOERROR and nodata.answer == []
    assert nodata.authority[0].rdtype == dns.rdatatype.SOA
    # An empty non-terminal exists: NODATA, not NXDOMAIN.
    assert ask(srv, "_udp.netd.test", "SRV").rcode() == dns.rcode.NOERROR
    assert ask(srv, "apps.netd.test").rcode() == dns.rcode.NOERROR
    assert texts(ask(srv, "netd.test", "SOA"))[0].startswith(
        "netd.test. 300 IN SOA ns.netd.test. hostmaster.netd.test. 1"
    )


def test_other_names_and_classes_are_refused_without_upstreams(tmp_path: Path) -> None:
    srv = server(tmp_path)
    assert ask(srv, "example.com").rcode() == dns.rcode.REFUSED
    assert ask(srv, "netd.test", "AXFR").rcode() == dns.rcode.REFUSED
    chaos = dns.message.make_query("version.bind", "TXT", "CH")
    answer = srv.handle(chaos.to_wire(), CLIENT, True)
    assert isinstance(answer, bytes)
    assert dns.message.from_wire(answer).rcode() == dns.rcode.REFUSED


def test_recursion_only_for_recursion_from(tmp_path: Path) -> None:
    srv = server(
        tmp_path, RECORDS + "    forward: ['127.0.0.1:9']\n    recursion_from: [10.0.0.0/8]\n"
    )
    assert ask(srv, "example.com").rcode() == dns.rcode.REFUSED
    # Local names answer everyone.
    assert ask(srv, "www.netd.test").rcode() == dns.rcode.NOERROR


def test_ipv4_clients_of_a_dual_stack_listener_are_checked_as_ipv4(tmp_path: Path) -> None:
    srv = server(tmp_path, "    forward: ['127.0.0.1:9']\n    recursion_from: [127.0.0.0/8]\n")
    srv.forwarder.resolve = lambda q: Deferred()  # type: ignore[method-assign,union-attr]
    # A listener on :: sees 127.0.0.1 as ::ffff:127.0.0.1: forwarded, not REFUSED.
    forwarded = srv.handle(make_wire("a.example"), ("::ffff:127.0.0.1", 40000), True)
    assert isinstance(forwarded, Deferred)
    for outsider in ("::ffff:10.0.0.1", "::1"):
        refused = srv.handle(make_wire("a.example"), (outsider, 40000), True)
        assert isinstance(refused, bytes)
        assert dns.message.from_wire(refused).rcode() == dns.rcode.REFUSED


def test_catch_all_answers_other_a_queries(tmp_path: Path) -> None:
    srv = server(tmp_path, RECORDS + "    catch_all: 10.9.9.9\n")
    assert texts(ask(srv, "anything.example.com")) == ["anything.example.com. 60 IN A 10.9.9.9"]
    assert texts(ask(srv, "www.netd.test"))[0].startswith("www.netd.test. 60 IN A 127.0.0.1")
    nodata = ask(srv, "anything.example.com", "AAAA")
    assert nodata.rcode() == dns.rcode.NOERROR and nodata.answer == []


# -- EDNS0 and truncation ------------------------------------------------------


def test_edns_is_echoed_and_advertises_our_payload(tmp_path: Path) -> None:
    srv = server(tmp_path)
    reply = ask(srv, "www.netd.test", use_edns=0, payload=4096)
    assert reply.edns == 0 and reply.payload == 1232
    assert ask(srv, "www.netd.test").edns == -1
    bad = ask(srv, "www.netd.test", use_edns=1)
    assert (bad.rcode(), bad.edns, bad.ednsflags & dns.flags.DO) == (dns.rcode.BADVERS, 0, 0)
    bad = ask(srv, "www.netd.test", use_edns=1, want_dnssec=True)
    assert bad.rcode() == dns.rcode.BADVERS and bad.ednsflags & dns.flags.DO
    # RFC 3225 3: the DO bit is copied into the answer's OPT, asked twice (the
    # second from the prepared answers, which keep queries with and without it apart).
    for _ in range(2):
        assert ask(srv, "www.netd.test", want_dnssec=True).ednsflags & dns.flags.DO
        assert not ask(srv, "www.netd.test", use_edns=0).ednsflags & dns.flags.DO


def big_server(tmp_path: Path) -> Server:
    strings = ", ".join(f"'{i:03d} {'y' * 60}'" for i in range(30))
    return server(tmp_path, f"    records:\n      many.netd.test: {{TXT: [{strings}]}}\n")


def test_udp_answers_over_512_bytes_are_truncated_without_edns(tmp_path: Path) -> None:
    srv = big_server(tmp_path)
    small = ask(srv, "many.netd.test", "TXT")
    assert small.flags & dns.flags.TC and small.answer == []
    # EDNS0 with a big buffer still gets at most our 1232 bytes.
    edns = ask(srv, "many.netd.test", "TXT", use_edns=0, payload=4096)
    assert edns.flags & dns.flags.TC and edns.edns == 0
    full = ask(srv, "many.netd.test", "TXT", udp=False)
    assert not full.flags & dns.flags.TC and len(full.answer[0]) == 30
    assert len(srv.prepared) == 2  # the two TC answers; the 2 KiB one is not kept
    assert srv.stats.counters["truncated"] == 2


def test_edns_lets_a_mid_sized_answer_through(tmp_path: Path) -> None:
    values = ", ".join(f"'{c * 200}'" for c in "xyz")
    srv = server(tmp_path, f"    records:\n      mid.netd.test: {{TXT: [{values}]}}\n")
    assert ask(srv, "mid.netd.test", "TXT").flags & dns.flags.TC
    reply = ask(srv, "mid.netd.test", "TXT", use_edns=0, payload=1232)
    assert not reply.flags & dns.flags.TC and len(reply.answer[0]) == 3


def test_udp_payload_is_what_we_advertise_and_at_most_what_we_send(tmp_path: Path) -> None:
    strings = ", ".join(f"'{i:03d} {'y' * 60}'" for i in range(30))
    srv = server(
        tmp_path,
        f"    udp_payload: 4096\n    records:\n      many.netd.test: {{TXT: [{strings}]}}\n",
    )
    whole = ask(srv, "many.netd.test", "TXT", use_edns=0, payload=4096)
    assert not whole.flags & dns.flags.TC and len(whole.answer[0]) == 30
    assert whole.payload == 4096
    # min(client's, ours): the client's smaller buffer rules, and 512 without EDNS0.
    assert ask(srv, "many.netd.test", "TXT", use_edns=0, payload=1232).flags & dns.flags.TC
    assert ask(srv, "many.netd.test", "TXT").flags & dns.flags.TC
    assert ask(srv, "many.netd.test", "TXT", use_edns=1).payload == 4096  # BADVERS
    values = ", ".join(f"'{c * 200}'" for c in "xyz")
    small = server(
        tmp_path, f"    udp_payload: 512\n    records:\n      mid.netd.test: {{TXT: [{values}]}}\n"
    )
    reply = ask(small, "mid.netd.test", "TXT", use_edns=0, payload=4096)
    assert reply.flags & dns.flags.TC and reply.payload == 512
    assert len(ask(small, "mid.netd.test", "TXT", udp=False).answer[0]) == 3


# -- bad input -----------------------------------------------------------------


def header(qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0, flags: int = 0x0100) -> bytes:
    return struct.pack(">HHHHHH", 0x1234, flags, qd, an, ns, ar)


QUESTION = name_to_wire("www.netd.test") + b"\x00\x01\x00\x01"


@pytest.mark.parametrize(
    ("data", "rcode"),
    [
        (b"", None),
        (b"\x12\x34\x01", None),
        (header(flags=0x8000) + QUESTION, None),  # a response
        (header(qd=0), dns.rcode.FORMERR),
        (header(qd=2) + QUESTION + QUESTION, dns.rcode.FORMERR),
        (header(qd=65535) + QUESTION, dns.rcode.FORMERR),
        (header() + b"\xc0\x0c\x00\x01\x00\x01", dns.rcode.FORMERR),  # a pointer to itself
        (header() + b"\x03www\xc0\x0c\x00\x01\x00\x01", dns.rcode.FORMERR),
        (header() + b"\x03ww", dns.rcode.FORMERR),  # the name runs out
        (header() + QUESTION[:-2], dns.rcode.FORMERR),
        (header() + b"\x41" + b"x" * 65 + b"\x00\x00\x01\x00\x01", dns.rcode.FORMERR),
        (header() + (b"\x3f" + b"x" * 63) * 4 + b"\x00\x00\x01\x00\x01", dns.rcode.FORMERR),
        (header(ar=1) + QUESTION + b"\x00\x00\x29", dns.rcode.FORMERR),  # a cut OPT
        (
            header(ar=2) + QUESTION + (b"\x00\x00\x29\x10\x00\x00\x00\x00\x00\x00\x00") * 2,
            dns.rcode.FORMERR,
        ),
        (
            header(an=1) + QUESTION + b"\x00\x00\x29\x10\x00\x00\x00\x00\x00\x00\x00",
            dns.rcode.FORMERR,
        ),
        (header(flags=0x1000) + QUESTION, dns.rcode.NOTIMP),  # opcode STATUS
    ],
)
def test_bad_input_gets_formerr_or_silence(tmp_path: Path, data: bytes, rcode: int | None) -> None:
    srv = server(tmp_path)
    answer = srv.handle(data, CLIENT, True)
    if rcode is None:
        assert answer is None
    else:
        assert isinstance(answer, bytes)
        reply = dns.message.from_wire(answer, question_only=True)
        assert reply.id == 0x1234 and reply.rcode() == rcode
    assert srv.stats.counters["malformed"] == 1
    assert ask(srv, "www.netd.test").rcode() == dns.rcode.NOERROR


OPT_RR = b"\x00\x00\x29\x10\x00\x00\x00\x00\x00\x00\x00"
# The same with the DO bit (RFC 3225) set.
OPT_DO = b"\x00\x00\x29\x10\x00\x00\x00\x80\x00\x00\x00"


@pytest.mark.parametrize(
    ("data", "rcode"),
    [
        (header(flags=0x1000, ar=1) + QUESTION + OPT_RR, dns.rcode.NOTIMP),  # opcode STATUS
        (header(flags=0x2000, ar=1) + QUESTION + OPT_RR, dns.rcode.NOTIMP),  # opcode NOTIFY
        (header(qd=2, ar=1) + QUESTION + QUESTION + OPT_RR, dns.rcode.FORMERR),
        (header(qd=0, ar=1) + OPT_RR, dns.rcode.FORMERR),
        (header(ar=2) + QUESTION + OPT_RR * 2, dns.rcode.FORMERR),  # RFC 6891 6.1.1
        (header(an=1) + QUESTION + OPT_RR, dns.rcode.FORMERR),
        (header(ar=1) + QUESTION + b"\x01a" + OPT_RR, dns.rcode.FORMERR),  # not the root's
        (header(flags=0x2800, ar=1) + QUESTION + OPT_RR, dns.rcode.REFUSED),  # no update keys
    ],
    ids=["status", "notify", "two questions", "none", "two OPTs", "answer", "owner", "update"],
)
def test_errors_to_a_query_with_an_opt_carry_ours(tmp_path: Path, data: bytes, rcode: int) -> None:
    # RFC 6891 7: a client tells a FORMERR or NOTIMP from a server without EDNS by the OPT.
    answer = server(tmp_path).handle(data, CLIENT, True)
    assert isinstance(answer, bytes)
    reply = dns.message.from_wire(answer)
    assert (reply.id, reply.rcode()) == (0x1234, rcode)
    assert (reply.edns, reply.payload) == (0, 1232)
    without = server(tmp_path).handle(header(flags=0x1000) + QUESTION, CLIENT, True)
    assert isinstance(without, bytes) and dns.message.from_wire(without).edns == -1


@pytest.mark.parametrize(
    ("data", "rcode"),
    [
        (header(flags=0x1000, ar=1) + QUESTION + OPT_DO, dns.rcode.NOTIMP),  # opcode STATUS
        (header(qd=2, ar=1) + QUESTION + QUESTION + OPT_DO, dns.rcode.FORMERR),
        (header(flags=0x2800, ar=1) + QUESTION + OPT_DO, dns.rcode.REFUSED),  # no update keys
    ],
    ids=["status", "two questions", "update"],
)
def test_errors_to_a_query_with_do_copy_it(tmp_path: Path, data: bytes, rcode: int) -> None:
    # RFC 3225 3: the DO bit of the query goes into the answer's OPT.
    answer = server(tmp_path).handle(data, CLIENT, True)
    assert isinstance(answer, bytes)
    reply = dns.message.from_wire(answer)
    assert reply.rcode() == rcode and reply.ednsflags & dns.flags.DO
    without = server(tmp_path).handle(data.replace(OPT_DO, OPT_RR), CLIENT, True)
    assert isinstance(without, bytes) and not dns.message.from_wire(without).ednsflags


@functools.cache
def fuzz_server() -> Server:
    """One server for every generated example: no files are read, so no tmp_path."""
    return server(Path("/nonexistent"))


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=600))
def test_random_bytes_never_crash(data: bytes) -> None:
    srv = fuzz_server()
    answer = srv.handle(data, CLIENT, True)
    assert answer is None or (isinstance(answer, bytes) and answer[:2] == data[:2])


@settings(max_examples=300, deadline=None)
@given(tail=st.binary(max_size=200), counts=st.tuples(*[st.integers(0, 3)] * 3))
def test_mutated_queries_never_crash(tail: bytes, counts: tuple[int, int, int]) -> None:
    data = header(1, *counts) + QUESTION + tail
    answer = fuzz_server().handle(data, CLIENT, True)
    assert answer is None or (isinstance(answer, bytes) and answer[:2] == b"\x12\x34")


# -- TCP framing ---------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(chunks=st.lists(st.binary(max_size=300), max_size=8))
def test_random_streams_never_crash(chunks: list[bytes]) -> None:
    protocol = Stream(fuzz_server(), 5.0)
    transport = StringTransport(peerAddress=_Peer())
    protocol.makeConnection(transport)
    for chunk in chunks:
        protocol.dataReceived(chunk)
    protocol.connectionLost(None)


def stream(tmp_path: Path, clock: Clock) -> tuple[Stream, StringTransport]:
    srv = server(tmp_path, clock=clock)
    protocol = Stream(srv, 5.0)
    transport = StringTransport(peerAddress=_Peer())
    protocol.makeConnection(transport)
    return protocol, transport


class _Peer:
    host = "127.0.0.1"
    port = 40000


def framed(name: str, rdtype: str = "A") -> bytes:
    wire = dns.message.make_query(name, rdtype).to_wire()
    return struct.pack(">H", len(wire)) + wire


def unframe(data: bytes) -> list[dns.message.Message]:
    found = []
    while data:
        (length,) = struct.unpack_from(">H", data)
        found.append(dns.message.from_wire(data[2 : 2 + length]))
        data = data[2 + length :]
    return found


def test_tcp_answers_several_queries_per_connection(tmp_path: Path) -> None:
    protocol, transport = stream(tmp_path, Clock())
    two = framed("www.netd.test") + framed("netd.test", "MX")
    protocol.dataReceived(two)
    third = framed("nope.netd.test")
    for byte in range(len(third)):
        protocol.dataReceived(third[byte : byte + 1])
    replies = unframe(transport.value())
    assert [r.rcode() for r in replies] == [0, 0, dns.rcode.NXDOMAIN]
    assert str(replies[1].answer[0]) == "netd.test. 300 IN MX 10 mx.netd.test."


def test_unix_socket_clients_count_as_loopback(tmp_path: Path) -> None:
    srv = server(tmp_path, RECORDS + "    forward: ['127.0.0.1:9']\n")
    protocol = Stream(srv, 5.0)
    transport = StringTransport(peerAddress=UNIXAddress(None))
    protocol.makeConnection(transport)
    protocol.dataReceived(framed("www.netd.test"))
    (reply,) = unframe(transport.value())
    assert reply.flags & dns.flags.RA and reply.answer


def test_tcp_connection_without_a_whole_message_times_out(tmp_path: Path) -> None:
    clock = Clock()
    protocol, transport = stream(tmp_path, clock)
    clock.advance(4)
    protocol.dataReceived(framed("www.netd.test"))
    clock.advance(4)
    protocol.dataReceived(b"\xff\xff" + b"x" * 100)  # 64 KiB announced, never sent
    clock.advance(0.9)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting


# -- cache ---------------------------------------------------------------------


def upstream_reply(
    question: bytes, rrsets: list[str], rcode: int = 0, authority: list[str] = ()
) -> bytes:  # type: ignore[assignment]
    name = dns.name.from_wire(question, 0)[0]
    rdtype = struct.unpack(">H", question[-4:-2])[0]
    query = dns.message.make_query(name, rdtype, use_edns=0)
    reply = dns.message.make_response(query)
    reply.set_rcode(rcode)
    reply.answer = [dns.rrset.from_text(*text.split(" ", 4)) for text in rrsets]  # type: ignore[misc]
    reply.authority = [dns.rrset.from_text(*text.split(" ", 4)) for text in authority]  # type: ignore[misc]
    wire: bytes = reply.to_wire()
    return wire


def key(name: str, rdtype: int = 1) -> bytes:
    return name_to_wire(name) + struct.pack(">HH", rdtype, 1)


def cached_ttls(sections_body: bytes, question: bytes, an: int, ns: int) -> list[int]:
    wire = header(1, an, ns, 0, 0x8000) + question + sections_body
    message = dns.message.from_wire(wire)
    return [rrset.ttl for rrset in message.answer + message.authority]


def test_cache_counts_ttls_down_and_expires(tmp_path: Path) -> None:
    clock = Clock()
    cache = Cache(clock, size=10, max_ttl=1000, negative_ttl=300)
    question = key("a.example")
    reply = upstream_reply(
        question, ["a.example. 100 IN A 10.0.0.1", "a.example. 100 IN A 10.0.0.2"][:1]
    )
    put = cache.put(question, reply)
    assert put.ar == 0  # the upstream's OPT is not passed on
    clock.advance(30.5)
    hit = cache.get(question)
    assert hit is not None and cached_ttls(hit.body, question, hit.an, hit.ns) == [70]
    clock.advance(70)
    assert cache.get(question) is None and len(cache) == 0


def test_cache_caps_ttls_at_max_ttl(tmp_path: Path) -> None:
    clock = Clock()
    cache = Cache(clock, size=10, max_ttl=50, negative_ttl=300)
    question = key("a.example")
    fresh = cache.put(
        question,
        upstream_reply(question, ["a.example. 1000 IN A 10.0.0.1"], 0, ["example. 20 IN NS ns."]),
    )
    # Clients see max_ttl, not the upstream's TTL; shorter TTLs stay as they are.
    assert cached_ttls(fresh.body, question, fresh.an, fresh.ns) == [50, 20]
    clock.advance(10)
    hit = cache.get(question)
    assert hit is not None and cached_ttls(hit.body, question, hit.an, hit.ns) == [40, 10]
    clock.advance(39)
    assert cache.get(question) is not None
    clock.advance(1)
    assert cache.get(question) is None


def test_negative_answers_live_for_the_soa_minimum(tmp_path: Path) -> None:
    clock = Clock()
    cache = Cache(clock, size=10, max_ttl=1000, negative_ttl=300)
    question = key("nope.example")
    soa = "example. 3600 IN SOA ns.example. host.example. 1 2 3 4 20"
    sections = cache.put(question, upstream_reply(question, [], 3, [soa]))
    assert sections.rcode == 3
    # RFC 2308 5: the SOA passes on with the TTL netd keeps it for, not its 3600 s.
    assert cached_ttls(sections.body, question, sections.an, sections.ns) == [20]
    clock.advance(19)
    hit = cache.get(question)
    assert hit is not None and hit.rcode == 3
    assert cached_ttls(hit.body, question, hit.an, hit.ns) == [1]
    clock.advance(1)
    assert cache.get(question) is None
    # negative_ttl caps it; without an SOA nothing is cached (RFC 2308 section 5).
    capped = Cache(clock, size=10, max_ttl=1000, negative_ttl=5)
    fresh = capped.put(question, upstream_reply(question, [], 3, [soa]))
    assert cached_ttls(fresh.body, question, fresh.an, fresh.ns) == [5]
    clock.advance(5)
    assert capped.get(question) is None
    capped.put(question, upstream_reply(question, [], 3))
    assert capped.get(question) is None


def test_cache_evicts_the_least_recently_used(tmp_path: Path) -> None:
    clock = Clock()
    cache = Cache(clock, size=2, max_ttl=1000, negative_ttl=300)
    questions = [key(f"n{i}.example") for i in range(3)]
    for q in questions[:2]:
        cache.put(q, upstream_reply(q, [f"{dns.name.from_wire(q, 0)[0]} 100 IN A 10.0.0.1"]))
    assert cache.get(questions[0]) is not None
    q = questions[2]
    cache.put(q, upstream_reply(q, ["n2.example. 100 IN A 10.0.0.1"]))
    assert len(cache) == 2
    assert cache.get(questions[1]) is None
    assert cache.get(questions[0]) is not None and cache.get(questions[2]) is not None


def test_upstream_replies_must_match_id_and_question() -> None:
    question = key("a.example")
    reply = upstream_reply(question, ["a.example. 100 IN A 10.0.0.1"])
    ident = struct.unpack(">H", reply[:2])[0]
    assert _matches(reply, ident, question)
    assert not _matches(reply, ident ^ 1, question)
    assert not _matches(reply, ident, key("b.example"))
    assert not _matches(reply, ident, key("a.example", 28))
    assert not _matches(reply[:14], ident, question)
    # The name in any case, the type exactly: HTTPS is 0x0041, an upper-case A.
    https = key("a.example", 65)
    reply = upstream_reply(https, []).replace(b"a\x07example", b"A\x07EXAMPLE", 1)
    assert _matches(reply, struct.unpack(">H", reply[:2])[0], https)


# -- query log -----------------------------------------------------------------


def test_query_log_and_its_view(tmp_path: Path) -> None:
    clock = Clock()
    logged = EventLoggingObserver()
    context = BuildContext(
        reactor=clock,
        name="dns",
        state_dir=tmp_path,
        journal=Journal(clock),
        stats=ServiceStats(),
        log=Logger(observer=logged),
        tls={},
    )
    config = parse_config(
        "services:\n  dns:\n    type: dns\n    listen: ['udp:0']\n"
        + RECORDS
        + "    query_log: true\n",
        tmp_path / "netd.yaml",
    )
    handlers = build(config.services["dns"], context)
    datagram = handlers.datagram
    assert datagram is not None
    view = handlers.views["queries"]
    protocol = datagram(config.services["dns"].listen[0])
    transport = _Datagrams()
    protocol.makeConnection(transport)  # type: ignore[arg-type]
    protocol.datagramReceived(dns.message.make_query("www.netd.test", "A").to_wire(), CLIENT)
    protocol.datagramReceived(dns.message.make_query("nope.netd.test", "A").to_wire(), CLIENT)
    assert len(transport.sent) == 2
    entries = view.list({})
    assert [(e["name"], e["qtype"], e["rcode"], e["source"]) for e in entries] == [
        ("www.netd.test.", "A", "NOERROR", "local"),
        ("nope.netd.test.", "A", "NXDOMAIN", "local"),
    ]
    assert entries[0]["client"] == "127.0.0.1:40000" and len(entries[0]["answer"]) == 2
    assert [e.type for e in context.journal.select(service="dns")] == ["query", "query"]
    assert context.stats.counters["rcode_NXDOMAIN"] == 1
    assert view.clear is not None and view.clear() == {"cleared": 2}
    assert view.list({}) == []
    # One log line a query: client, transport, name, type, rcode, source, time taken.
    assert [formatEvent(event) for event in logged] == [
        "127.0.0.1:40000 udp www.netd.test. A NOERROR local 0.0ms",
        "127.0.0.1:40000 udp nope.netd.test. A NXDOMAIN local 0.0ms",
    ]
    assert logged[1]["rcode"] == "NXDOMAIN" and logged[1]["latency_ms"] == 0.0
    assert "answer" not in logged[0]


def test_query_log_lines_escape_odd_names_and_are_off_by_default(tmp_path: Path) -> None:
    logged = EventLoggingObserver()
    srv = server(tmp_path, RECORDS + "    query_log: true\n", log=logged)
    odd = dns.name.Name([b"a b", b'"q"\n', b"netd", b"test", b""])
    ask(srv, odd.to_text(), use_edns=0)
    assert [formatEvent(event) for event in logged] == [
        '127.0.0.1:40000 udp a\\032b.\\"q\\"\\010.netd.test. A NXDOMAIN local 0.0ms'
    ]
    quiet = EventLoggingObserver()
    ask(server(tmp_path, log=quiet), "www.netd.test")
    assert len(quiet) == 0


class _Datagrams:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []

    def write(self, data: bytes, addr: Any) -> None:
        self.sent.append((data, addr))


# -- forwarding ----------------------------------------------------------------


class _FakeSocket:
    """A UDP socket that records what is sent and hands out queued datagrams."""

    def __init__(self, family: int, kind: int) -> None:
        self.sent: list[bytes] = []
        self.inbox: list[tuple[bytes, tuple[str, int]] | OSError] = []
        self.peer: tuple[str, int] | None = None
        self.closed = False

    def setblocking(self, flag: bool) -> None:
        pass

    def bind(self, address: tuple[str, int]) -> None:
        pass

    def connect(self, address: tuple[str, int]) -> None:
        self.peer = address

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        return len(data)

    def recvfrom(self, size: int) -> tuple[bytes, tuple[str, int]]:
        if not self.inbox:
            raise BlockingIOError
        item = self.inbox.pop(0)
        if isinstance(item, OSError):
            raise item
        return item

    def fileno(self) -> int:
        return -1 if self.closed else 99

    def close(self) -> None:
        self.closed = True


class _FakeConnector:
    def __init__(self, host: str, port: int) -> None:
        self.destination = IPv4Address("TCP", host, port)
        self.stopped = False

    def stopConnecting(self) -> None:
        self.stopped = True

    def getDestination(self) -> IPv4Address:
        return self.destination


class _FakeReactor(Clock):
    """A clock that keeps readers and records TCP connection attempts."""

    def __init__(self) -> None:
        super().__init__()
        self.sockets: list[_FakeSocket] = []
        self.readers: list[Any] = []
        self.tcp: list[tuple[str, int, Any]] = []
        self.connectors: list[_FakeConnector] = []

    def socket(self, family: int, kind: int) -> _FakeSocket:
        sock = _FakeSocket(family, kind)
        self.sockets.append(sock)
        return sock

    def addReader(self, reader: Any) -> None:
        self.readers.append(reader)

    def removeReader(self, reader: Any) -> None:
        if reader in self.readers:
            self.readers.remove(reader)

    def connectTCP(
        self, host: str, port: int, factory: Any, timeout: float, bindAddress: Any = None
    ) -> _FakeConnector:
        self.tcp.append((host, port, factory))
        connector = _FakeConnector(host, port)
        factory.startedConnecting(connector)
        self.connectors.append(connector)
        return connector

    def deliver(self, index: int, data: bytes | OSError, source: tuple[str, int]) -> None:
        """A datagram (or an error) arrives on the index-th upstream socket."""
        sock = self.sockets[index]
        sock.inbox.append(data if isinstance(data, OSError) else (data, source))
        for reader in list(self.readers):
            if reader.socket is sock:
                reader.doRead()


UPSTREAMS = (Upstream("127.0.0.1", 5300), Upstream("127.0.0.2", 5301))


def forwarder(reactor: _FakeReactor, **kwargs: Any) -> tuple[Forwarder, ServiceStats]:
    stats = ServiceStats()
    return Forwarder(reactor, UPSTREAMS, stats, socket_factory=reactor.socket, **kwargs), stats


def answer_to(sent: bytes, tc: bool = False, rcode: int = 0) -> bytes:
    query = dns.message.from_wire(sent)
    reply = dns.message.make_response(query)
    reply.set_rcode(rcode)
    if tc:
        reply.flags |= dns.flags.TC
    else:
        reply.answer = [dns.rrset.from_text(query.question[0].name, 60, "IN", "A", "10.0.0.1")]
    wire: bytes = reply.to_wire()
    return wire


def test_forwarder_takes_only_the_matching_answer() -> None:
    reactor = _FakeReactor()
    fwd, stats = forwarder(reactor)
    result = fwd.resolve(key("a.example"))
    (sock,) = reactor.sockets
    assert sock.peer == ("127.0.0.1", 5300)
    (sent,) = sock.sent
    right = answer_to(sent)
    wrong_id = bytes([right[0] ^ 1]) + right[1:]
    other = answer_to(
        dns.message.make_query("b.example", "A", id=struct.unpack(">H", sent[:2])[0]).to_wire()
    )
    reactor.deliver(0, right, ("127.0.0.9", 5300))
    reactor.deliver(0, wrong_id, ("127.0.0.1", 5300))
    reactor.deliver(0, other, ("127.0.0.1", 5300))
    assert not result.called
    reactor.deliver(0, right, ("127.0.0.1", 5300))
    assert result.called and result.result == right
    assert sock.closed and reactor.readers == []
    assert stats.counters["upstream_mismatched"] == 3


def test_forwarder_uses_a_fresh_port_and_id_per_query() -> None:
    reactor = _FakeReactor()
    fwd, _ = forwarder(reactor)
    for i in range(20):
        fwd.resolve(key(f"n{i}.example"))
    assert len(reactor.sockets) == 20
    assert len({sock.sent[0][:2] for sock in reactor.sockets}) >= 18


def test_forwarder_moves_on_after_silence_and_fails_when_all_fail() -> None:
    reactor = _FakeReactor()
    fwd, stats = forwarder(reactor)
    result = fwd.resolve(key("a.example"))
    reactor.advance(2)
    first, second = reactor.sockets
    assert first.closed and second.peer == ("127.0.0.2", 5301)
    reactor.deliver(1, answer_to(second.sent[0], rcode=2), ("127.0.0.2", 5301))
    failure = result.result
    result.addErrback(lambda f: None)
    assert failure.check(UpstreamFailed) and stats.counters["upstream_failures"] == 2


def test_forwarder_moves_on_from_a_refused_port_at_once() -> None:
    reactor = _FakeReactor()
    fwd, stats = forwarder(reactor)
    result = fwd.resolve(key("a.example"))
    reactor.deliver(0, ConnectionRefusedError(), ("127.0.0.1", 5300))
    assert len(reactor.sockets) == 2 and reactor.sockets[0].closed
    # An error with nothing to read reaches the reader as connectionLost (epoll's EPOLLERR).
    (reader,) = reactor.readers
    reader.connectionLost(Failure(ConnectionDone()))
    failure = result.result
    result.addErrback(lambda f: None)
    assert failure.check(UpstreamFailed) and stats.counters["upstream_failures"] == 2
    assert reactor.readers == []


def test_forwarder_starts_with_the_upstream_that_answered_last() -> None:
    reactor = _FakeReactor()
    fwd, _ = forwarder(reactor)
    first = fwd.resolve(key("a.example"))
    reactor.advance(2)
    reactor.deliver(1, answer_to(reactor.sockets[1].sent[0]), ("127.0.0.2", 5301))
    assert first.called
    fwd.resolve(key("b.example"))
    assert reactor.sockets[2].peer == ("127.0.0.2", 5301)


def test_forwarder_retries_a_truncated_answer_over_tcp() -> None:
    reactor = _FakeReactor()
    fwd, stats = forwarder(reactor)
    result = fwd.resolve(key("a.example"))
    (sock,) = reactor.sockets
    reactor.deliver(0, answer_to(sock.sent[0], tc=True), ("127.0.0.1", 5300))
    ((host, tcp_port, factory),) = reactor.tcp
    assert (host, tcp_port) == ("127.0.0.1", 5300)
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    sent = transport.value()
    assert struct.unpack(">H", sent[:2])[0] == len(sent) - 2
    full = answer_to(sent[2:])
    for byte in range(0, len(full) + 2, 7):
        protocol.dataReceived((struct.pack(">H", len(full)) + full)[byte : byte + 7])
    assert result.result == full and stats.counters["upstream_tcp_retries"] == 1


def test_forwarder_gives_up_a_slow_tcp_connection() -> None:
    reactor = _FakeReactor()
    fwd, _ = forwarder(reactor)
    fwd.resolve(key("a.example"))
    reactor.deliver(0, answer_to(reactor.sockets[0].sent[0], tc=True), ("127.0.0.1", 5300))
    assert len(reactor.tcp) == 1
    reactor.advance(2)
    assert reactor.connectors[0].stopped
    assert reactor.sockets[1].peer == ("127.0.0.2", 5301)


def test_forwarder_shares_questions_in_flight_and_bounds_them() -> None:
    reactor = _FakeReactor()
    fwd, stats = forwarder(reactor, max_in_flight=1)
    first, again = fwd.resolve(key("a.example")), fwd.resolve(key("a.example"))
    other = fwd.resolve(key("b.example"))
    assert len(reactor.sockets) == 1 and stats.counters["upstream_overload"] == 1
    failure = other.result
    other.addErrback(lambda f: None)
    assert failure.check(UpstreamFailed)
    reply = answer_to(reactor.sockets[0].sent[0])
    reactor.deliver(0, reply, ("127.0.0.1", 5300))
    assert first.result == again.result == reply


def test_forwarder_offers_upstreams_our_udp_payload() -> None:
    reactor = _FakeReactor()
    fwd, _ = forwarder(reactor, payload=4096)
    fwd.resolve(key("a.example"))
    assert dns.message.from_wire(reactor.sockets[0].sent[0]).payload == 4096


def test_forwarded_answers_carry_at_most_max_ttl(tmp_path: Path) -> None:
    clock = Clock()
    srv = server(tmp_path, "    forward: ['127.0.0.1:9']\n    cache: {max_ttl: 600}\n", clock=clock)
    upstream: Deferred[bytes] = Deferred()
    srv.forwarder.resolve = lambda q: upstream  # type: ignore[method-assign,union-attr]
    waiting = srv.handle(make_wire("long.example"), CLIENT, True)
    assert isinstance(waiting, Deferred)
    question = key("long.example")
    upstream.callback(upstream_reply(question, ["long.example. 86400 IN A 10.0.0.1"]))
    fresh = dns.message.from_wire(waiting.result)
    assert fresh.answer[0].ttl == 600
    clock.advance(100)
    assert ask(srv, "long.example").answer[0].ttl == 500  # from the cache, counting down
    clock.advance(500)
    assert srv.cache.get(question) is None


def test_forwarded_answers_say_recursion_is_available(tmp_path: Path) -> None:
    srv = server(tmp_path, RECORDS + "    forward: ['127.0.0.1:9']\n")
    assert ask(srv, "www.netd.test").flags & dns.flags.RA
    closed = server(
        tmp_path, RECORDS + "    forward: ['127.0.0.1:9']\n    recursion_from: [10.0.0.0/8]\n"
    )
    assert not ask(closed, "www.netd.test").flags & dns.flags.RA


def test_forwarder_moves_on_from_an_unreadable_answer() -> None:
    reactor = _FakeReactor()
    fwd, stats = forwarder(reactor)
    result = fwd.resolve(key("a.example"))
    sent = reactor.sockets[0].sent[0]
    cut = answer_to(sent)[:-3]  # announces an answer record it does not hold
    reactor.deliver(0, cut, ("127.0.0.1", 5300))
    assert len(reactor.sockets) == 2 and stats.counters["upstream_failures"] == 1
    good = answer_to(reactor.sockets[1].sent[0])
    reactor.deliver(1, good, ("127.0.0.2", 5301))
    assert result.result == good


def test_repeated_queries_get_the_same_answer_with_their_own_id(tmp_path: Path) -> None:
    srv = server(tmp_path)
    # ask() checks that each answer carries its own query's ID.
    first, second = ask(srv, "www.netd.test"), ask(srv, "www.netd.test")
    assert texts(first) == texts(second) and second.flags & dns.flags.AA
    big = big_server(tmp_path)
    for _ in range(3):
        assert ask(big, "many.netd.test", "TXT").flags & dns.flags.TC
    assert big.stats.counters["truncated"] == 3 and big.stats.counters["queries"] == 3
    assert srv.stats.counters["rcode_NOERROR"] == 2 and len(srv.prepared) == 1


def test_repeated_cached_answers_follow_the_ttl_countdown(tmp_path: Path) -> None:
    clock = Clock()
    srv = server(tmp_path, "    forward: ['127.0.0.1:9']\n", clock=clock)
    question = key("a.example")
    srv.cache.put(question, upstream_reply(question, ["a.example. 100 IN A 10.0.0.1"]))
    assert [ask(srv, "a.example").answer[0].ttl for _ in range(2)] == [100, 100]
    assert len(srv.prepared) == 1
    clock.advance(10)
    assert ask(srv, "a.example").answer[0].ttl == 90
    clock.advance(90)
    srv.forwarder.resolve = lambda q: Deferred()  # type: ignore[method-assign,union-attr]
    assert not isinstance(srv.handle(make_wire("a.example"), CLIENT, True), bytes)
    assert srv.stats.counters["cache_hits"] == 3 and srv.stats.counters["cache_misses"] == 1


def test_a_prepared_cached_answer_asks_the_cache_once_a_second(tmp_path: Path) -> None:
    clock = Clock()
    srv = server(tmp_path, "    forward: ['127.0.0.1:9']\n", clock=clock)
    question = key("a.example")
    srv.cache.put(question, upstream_reply(question, ["a.example. 100 IN A 10.0.0.1"]))
    asked: list[bytes] = []
    get_until = srv.cache.get_until

    def counted(question: bytes) -> tuple[Any, float]:
        asked.append(question)
        return get_until(question)

    srv.cache.get_until = counted  # type: ignore[method-assign]
    # The first answer is made (one look), the second kept with the time its TTLs hold.
    assert {ask(srv, "a.example").answer[0].ttl for _ in range(5)} == {100}
    assert len(asked) == 2
    clock.advance(1)
    assert {ask(srv, "a.example").answer[0].ttl for _ in range(5)} == {99}
    assert len(asked) == 3 and srv.stats.counters["cache_hits"] == 10


def test_prepared_cached_answers_take_what_the_cache_holds_now(tmp_path: Path) -> None:
    clock = Clock()
    srv = server(tmp_path, "    forward: ['127.0.0.1:9']\n", clock=clock)
    question = key("a.example")
    srv.cache.put(question, upstream_reply(question, ["a.example. 100 IN A 10.0.0.1"]))
    ask(srv, "a.example")
    clock.advance(100.5)
    # Fetched again, same length, other address: spliced into the kept answer.
    srv.cache.put(question, upstream_reply(question, ["a.example. 50 IN A 10.0.0.2"]))
    clock.advance(3)
    assert str(ask(srv, "a.example").answer[0]) == "a.example. 47 IN A 10.0.0.2"
    # Two records now: the kept answer is made again.
    clock.advance(48)
    two = ["a.example. 60 IN A 10.0.0.3", "a.example. 60 IN A 10.0.0.4"]
    srv.cache.put(question, upstream_reply(question, two))
    assert len(ask(srv, "a.example").answer[0]) == 2
    assert srv.stats.counters["cache_hits"] == 3 and srv.stats.counters["queries"] == 3
    assert len(srv.prepared) == 1


class ReadingPort:
    """What L{Datagrams.read} uses of a udp.Port, over a real loopback socket."""

    maxPacketSize = 8192
    addressFamily = socket.AF_INET

    def __init__(self, max_throughput: int = 256 * 1024) -> None:
        self.maxThroughput = max_throughput
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind(("127.0.0.1", 0))
        self.socket.setblocking(False)

    def doRead(self) -> None:
        raise AssertionError("the protocol reads the socket itself")


@pytest.fixture
def udp_pair(tmp_path: Path) -> Iterator[tuple[Server, ReadingPort, socket.socket]]:
    srv = server(tmp_path)
    port = ReadingPort()
    Datagrams(srv).makeConnection(port)  # type: ignore[arg-type]
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(2)
    client.connect(port.socket.getsockname())
    yield srv, port, client
    client.close()
    port.socket.close()


def replies(client: socket.socket, count: int) -> list[dns.message.Message]:
    return [dns.message.from_wire(client.recv(4096)) for _ in range(count)]


def test_udp_read_answers_every_waiting_query_prepared_or_not(
    udp_pair: tuple[Server, ReadingPort, socket.socket],
) -> None:
    srv, port, client = udp_pair
    queries = [dns.message.make_query(name, "A") for name in ("www.netd.test",) * 3]
    queries.append(dns.message.make_query("elsewhere.example", "A"))
    for query in queries:
        client.send(query.to_wire())
    port.doRead()  # the reactor's call: all four wait, all four are answered
    answers = replies(client, 4)
    assert [a.id for a in answers] == [q.id for q in queries]
    assert [dns.rcode.to_text(a.rcode()) for a in answers] == ["NOERROR"] * 3 + ["REFUSED"]
    assert texts(answers[2]) == texts(answers[0])  # the third sent as prepared
    counters = srv.stats.counters
    assert counters["queries"] == 4 and counters["rcode_NOERROR"] == 3
    assert srv.stats.bytes_in == sum(len(q.to_wire()) for q in queries)
    assert srv.stats.bytes_out == sum(len(a.to_wire()) for a in answers)
    port.doRead()  # nothing waits: returns at once
    assert counters["queries"] == 4


class _RecordingSocket:
    """A socket whose receives and sends are noted in order: in, out, or empty."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.calls: list[str] = []

    def recvfrom(self, size: int) -> tuple[bytes, Any]:
        try:
            received = self.sock.recvfrom(size)
        except OSError:
            self.calls.append("empty")
            raise
        self.calls.append("in")
        return received

    def sendto(self, data: bytes, addr: Any) -> int:
        self.calls.append("out")
        return self.sock.sendto(data, addr)


def test_udp_read_sends_a_turns_answers_in_bursts(tmp_path: Path) -> None:
    srv = server(tmp_path)
    port = ReadingPort()
    recording = _RecordingSocket(port.socket)
    port.socket = recording  # type: ignore[assignment]
    Datagrams(srv).makeConnection(port)  # type: ignore[arg-type]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(2)
        client.connect(recording.sock.getsockname())
        queries = [dns.message.make_query("www.netd.test", "A") for _ in range(_BURST + 8)]
        for query in queries:
            client.send(query.to_wire())
        port.doRead()
        # A whole burst is sent before the next query is read; the rest once
        # the socket is found empty.
        assert recording.calls == (
            ["in"] * _BURST + ["out"] * _BURST + ["in"] * 8 + ["empty"] + ["out"] * 8
        )
        assert [a.id for a in replies(client, len(queries))] == [q.id for q in queries]
        recording.calls.clear()
        client.send(queries[0].to_wire())
        port.doRead()  # a lone query is not held for company
        assert recording.calls == ["in", "empty", "out"]
        assert replies(client, 1)[0].id == queries[0].id
    recording.sock.close()


def test_udp_read_counts_a_turns_prepared_answers_by_their_counters(
    udp_pair: tuple[Server, ReadingPort, socket.socket],
) -> None:
    srv, port, client = udp_pair
    asked = [("www.netd.test", "A"), ("netd.test", "MX"), ("nope.netd.test", "A")]
    for name, rdtype in asked:  # one turn each: answered, then prepared
        client.send(make_wire(name, rdtype))
        port.doRead()
    replies(client, 3)
    # Two answers of one kind (NOERROR), one of another (NXDOMAIN): two sets of counters.
    www, mx, nope = (srv.prepared_for(make_wire(n, t), True, False) for n, t in asked)
    assert www is not None and mx is not None and nope is not None
    assert www.counters is mx.counters and nope.counters != www.counters
    for _ in range(3):
        for name, rdtype in asked:
            client.send(make_wire(name, rdtype))
    port.doRead()  # one turn: nine prepared answers
    rcodes = [dns.rcode.to_text(a.rcode()) for a in replies(client, 9)]
    assert rcodes == ["NOERROR", "NOERROR", "NXDOMAIN"] * 3
    counters = srv.stats.counters
    assert counters["queries"] == 12
    assert counters["rcode_NOERROR"] == 8 and counters["rcode_NXDOMAIN"] == 4


def test_udp_read_sends_prepared_cached_answers_with_the_turns_ttls(tmp_path: Path) -> None:
    clock = Clock()
    srv = server(tmp_path, "    forward: ['127.0.0.1:9']\n", clock=clock)
    question = key("a.example")
    srv.cache.put(question, upstream_reply(question, ["a.example. 100 IN A 10.0.0.1"]))
    port = ReadingPort()
    Datagrams(srv).makeConnection(port)  # type: ignore[arg-type]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(2)
        client.connect(port.socket.getsockname())
        for seconds in (0, 0, 10):
            clock.advance(seconds)
            for _ in range(3):
                client.send(make_wire("a.example"))
            port.doRead()
            assert [a.answer[0].ttl for a in replies(client, 3)] == [100 - int(clock.seconds())] * 3
        # Gone from the cache: the prepared answer is not sent, the upstream is asked.
        clock.advance(90)
        srv.forwarder.resolve = lambda q: Deferred()  # type: ignore[method-assign,union-attr]
        client.send(make_wire("a.example"))
        port.doRead()
    port.socket.close()
    counters = srv.stats.counters
    assert counters["cache_hits"] == 9 and counters["cache_misses"] == 1
    assert counters["queries"] == 10


def test_a_transport_without_a_socket_gets_answers_through_datagram_received(
    tmp_path: Path,
) -> None:
    srv = server(tmp_path)
    sent: list[tuple[bytes, Any]] = []

    class Transport:
        def write(self, data: bytes, addr: Any) -> None:
            sent.append((data, addr))

    protocol = Datagrams(srv)
    protocol.makeConnection(Transport())  # type: ignore[arg-type]
    query = dns.message.make_query("www.netd.test", "A")
    protocol.datagramReceived(query.to_wire(), CLIENT)
    ((answer, addr),) = sent
    assert addr == CLIENT and dns.message.from_wire(answer).id == query.id
    assert srv.stats.bytes_out == len(answer)


def test_udp_read_takes_at_most_the_ports_throughput_a_turn(tmp_path: Path) -> None:
    srv = server(tmp_path)
    port = ReadingPort(max_throughput=1)  # one datagram a turn
    Datagrams(srv).makeConnection(port)  # type: ignore[arg-type]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(2)
        client.connect(port.socket.getsockname())
        for _ in range(2):
            client.send(make_wire("www.netd.test"))
        port.doRead()
        assert srv.stats.counters["queries"] == 1
        port.doRead()
        assert srv.stats.counters["queries"] == 2 and len(replies(client, 2)) == 2
    port.socket.close()


def test_a_query_that_fails_is_logged_and_the_next_still_answered(tmp_path: Path) -> None:
    log = EventLoggingObserver()
    srv = server(tmp_path, log=log)
    port = ReadingPort()
    Datagrams(srv).makeConnection(port)  # type: ignore[arg-type]
    answer = srv.answer

    def fails_once(data: bytes, *args: Any) -> Any:
        srv.answer = answer  # type: ignore[method-assign]
        raise RuntimeError("a defect")

    srv.answer = fails_once  # type: ignore[method-assign]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(2)
        client.connect(port.socket.getsockname())
        client.send(make_wire("www.netd.test"))
        client.send(make_wire("netd.test", "MX"))
        port.doRead()
        (reply,) = replies(client, 1)
    port.socket.close()
    assert texts(reply) == ["netd.test. 300 IN MX 10 mx.netd.test."]
    assert srv.stats.errors == 1
    assert [e["log_failure"].value.args for e in log if "log_failure" in e] == [("a defect",)]


def test_oversized_queries_are_not_kept(tmp_path: Path) -> None:
    srv = server(tmp_path)
    padding = dns.edns.GenericOption(65001, b"p" * 600)
    query = dns.message.make_query("www.netd.test", "A", use_edns=0, options=[padding])
    wire = query.to_wire()
    assert len(wire) > 512
    answer = srv.handle(wire, CLIENT, False)
    assert isinstance(answer, bytes) and dns.message.from_wire(answer).answer
    assert len(srv.prepared) == 0
