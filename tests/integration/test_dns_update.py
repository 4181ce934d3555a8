"""
RFC 2136 UPDATE with TSIG in the real daemon: nsupdate with and without a key
then dig, dnspython for prerequisites and a signature made at the wrong time.
"""

from __future__ import annotations

import base64
import io
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator

import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rrset
import dns.tsig
import dns.tsigkeyring
import dns.update
import pytest

from netd.testing import NetdProcess
from tests.conftest import StartNetd
from tests.integration.test_dns import shared_port

NSUPDATE = shutil.which("nsupdate")
DIG = shutil.which("dig")
needs_bind_tools = pytest.mark.skipif(
    NSUPDATE is None or DIG is None,
    reason="nsupdate and dig are not installed (apt-get install bind9-dnsutils)",
)
LOCAL = "127.0.0.1"
SECRET = base64.b64encode(b"a lab secret, 32 bytes long ....").decode()
KEYRING = dns.tsigkeyring.from_text({"ci-key": ("hmac-sha256", SECRET)})


@pytest.fixture
def netd(start_netd: StartNetd) -> Iterator[NetdProcess]:
    port = shared_port()
    yield start_netd(
        f"""
services:
  dns:
    type: dns
    listen: ["udp:{port}:interface=127.0.0.1", "tcp:{port}:interface=127.0.0.1"]
    records:
      www.dyn.test: {{A: [10.0.0.1], TXT: ["hello"]}}
      www.fixed.test: {{A: [10.0.1.1]}}
    update:
      keys: {{ci-key: {{algorithm: hmac-sha256, secret: "{SECRET}"}}}}
      allow: [dyn.test]
"""
    )


def port(netd: NetdProcess) -> int:
    return netd.address("dns", "udp")[1]


def nsupdate(
    netd: NetdProcess, script: str, *args: str, zone: str = "zone dyn.test\n"
) -> subprocess.CompletedProcess[str]:
    assert NSUPDATE is not None
    return subprocess.run(
        [NSUPDATE, "-t", "5", *args],
        input=f"server {LOCAL} {port(netd)}\n{zone}{script}\nsend\n",
        capture_output=True,
        text=True,
        timeout=30,
    )


def dig(netd: NetdProcess, name: str, rdtype: str = "A") -> list[str]:
    assert DIG is not None
    result = subprocess.run(
        [DIG, f"@{LOCAL}", "-p", str(port(netd)), "+short", "+time=5", "+tries=1", name, rdtype],
        capture_output=True,
        text=True,
        timeout=20,
    )
    return sorted(result.stdout.split("\n")[:-1])


def serial(netd: NetdProcess) -> int:
    return int(dig(netd, "dyn.test", "SOA")[0].split()[2])


@needs_bind_tools
def test_nsupdate_with_the_key_changes_what_dig_sees(netd: NetdProcess) -> None:
    before = serial(netd)
    done = nsupdate(
        netd,
        "update add new.dyn.test 300 A 10.0.0.5\nupdate delete www.dyn.test TXT",
        "-y",
        f"hmac-sha256:ci-key:{SECRET}",
    )
    assert done.returncode == 0, done.stderr
    assert dig(netd, "new.dyn.test") == ["10.0.0.5"]
    assert dig(netd, "www.dyn.test", "TXT") == []
    assert dig(netd, "www.dyn.test") == ["10.0.0.1"]
    assert serial(netd) == before + 1  # one update, one bump
    event = netd.wait_for("dns", "record", name="new.dyn.test")
    assert event["source"] == "update" and event["values"] == ["10.0.0.5"]
    listed = netd.admin("GET", "/api/services/dns/records/new.dyn.test/A")
    assert listed == {"name": "new.dyn.test", "type": "A", "ttl": 300, "values": ["10.0.0.5"]}


@needs_bind_tools
def test_nsupdate_finds_the_zone_with_a_signed_query(netd: NetdProcess) -> None:
    # Without a "zone" line nsupdate asks for the name's SOA, signed with the key, and
    # gives up on an answer that is not signed (RFC 8945 5.3).
    key = ("-y", f"hmac-sha256:ci-key:{SECRET}")
    done = nsupdate(netd, "update add found.dyn.test 300 A 10.0.0.7", *key, zone="")
    assert done.returncode == 0, done.stderr
    assert dig(netd, "found.dyn.test") == ["10.0.0.7"]
    assert DIG is not None
    signed = subprocess.run(
        [DIG, f"@{LOCAL}", "-p", str(port(netd)), "+time=5", "+tries=1", *key, "www.dyn.test"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert "10.0.0.1" in signed.stdout and "TSIG PSEUDOSECTION" in signed.stdout
    assert "Couldn't verify signature" not in signed.stdout + signed.stderr
    # A signed query with a key netd does not hold: NOTAUTH, nothing answered.
    query = dns.message.make_query("www.dyn.test", "A")
    query.use_tsig(dns.tsigkeyring.from_text({"other-key": SECRET}), keyname="other-key")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.sendto(query.to_wire(), (LOCAL, port(netd)))
        refused = sock.recv(4096)  # dnspython would drop it: its TSIG carries BADKEY
    rcode, answers = refused[3] & 0xF, struct.unpack(">H", refused[6:8])[0]
    assert (rcode, answers) == (dns.rcode.NOTAUTH, 0)


@needs_bind_tools
def test_nsupdate_over_tcp_replaces_and_deletes(netd: NetdProcess) -> None:
    key = ("-v", "-y", f"hmac-sha256:ci-key:{SECRET}")
    script = "update delete www.dyn.test A\nupdate add www.dyn.test 60 A 10.0.0.9"
    assert nsupdate(netd, script, *key).returncode == 0
    assert dig(netd, "www.dyn.test") == ["10.0.0.9"]
    assert nsupdate(netd, "update delete www.dyn.test", *key).returncode == 0
    assert dig(netd, "www.dyn.test", "TXT") == []
    assert dig(netd, "www.dyn.test") == []


@needs_bind_tools
def test_nsupdate_without_a_valid_key_changes_nothing(netd: NetdProcess) -> None:
    script = "update add evil.dyn.test 300 A 10.6.6.6"
    unsigned = nsupdate(netd, script)
    assert unsigned.returncode != 0 and "REFUSED" in unsigned.stderr
    wrong_secret = base64.b64encode(b"not the lab secret at all ......").decode()
    bad_mac = nsupdate(netd, script, "-y", f"hmac-sha256:ci-key:{wrong_secret}")
    assert bad_mac.returncode != 0 and "NOTAUTH(BADSIG)" in bad_mac.stderr
    unknown = nsupdate(netd, script, "-y", f"hmac-sha256:other-key:{SECRET}")
    assert unknown.returncode != 0 and "NOTAUTH(BADKEY)" in unknown.stderr
    assert dig(netd, "evil.dyn.test") == []
    assert serial(netd) == 1


def update(zone: str = "dyn.test") -> dns.update.UpdateMessage:
    return dns.update.UpdateMessage(zone, keyring=KEYRING, keyname="ci-key")


@pytest.mark.parametrize(
    ("prerequisite", "rcode"),
    [
        (lambda u: u.present("nobody.dyn.test."), dns.rcode.NXDOMAIN),
        (lambda u: u.absent("www.dyn.test."), dns.rcode.YXDOMAIN),
        (lambda u: u.present("www.dyn.test.", "MX"), dns.rcode.NXRRSET),
        (lambda u: u.absent("www.dyn.test.", "A"), dns.rcode.YXRRSET),
        (lambda u: u.present("www.dyn.test.", "A", "10.0.0.2"), dns.rcode.NXRRSET),
        (lambda u: u.present("www.fixed.test."), dns.rcode.NOTZONE),
    ],
)
def test_a_failing_prerequisite_answers_its_rcode(
    netd: NetdProcess, prerequisite: object, rcode: dns.rcode.Rcode
) -> None:
    message = update()
    assert callable(prerequisite)
    prerequisite(message)
    message.add("added.dyn.test.", 60, "A", "10.0.0.3")
    assert dns.query.udp(message, LOCAL, port=port(netd), timeout=5).rcode() == rcode
    assert ask(netd, "added.dyn.test").rcode() == dns.rcode.NXDOMAIN


def test_prerequisites_that_hold_let_the_update_through(netd: NetdProcess) -> None:
    message = update()
    message.present("www.dyn.test.", "A", "10.0.0.1")
    message.absent("added.dyn.test.")
    message.add("added.dyn.test.", 60, "A", "10.0.0.3")
    reply = dns.query.udp(message, LOCAL, port=port(netd), timeout=5)
    assert reply.rcode() == dns.rcode.NOERROR and reply.had_tsig  # dnspython checked its MAC
    assert [str(r) for r in ask(netd, "added.dyn.test").answer] == [
        "added.dyn.test. 60 IN A 10.0.0.3"
    ]


def test_a_zone_not_allowed_is_refused(netd: NetdProcess) -> None:
    message = update("fixed.test")
    message.add("www.fixed.test.", 60, "A", "10.0.0.3")
    assert dns.query.udp(message, LOCAL, port=port(netd), timeout=5).rcode() == dns.rcode.REFUSED
    assert [str(r) for r in ask(netd, "www.fixed.test").answer] == [
        "www.fixed.test. 60 IN A 10.0.1.1"
    ]


def signed_at(message: dns.message.Message, when: int) -> bytes:
    """C{message} signed with the lab key as if the clock said C{when}."""
    key = dns.tsig.Key("ci-key", SECRET, "hmac-sha256")
    unsigned = message.to_wire()
    (placeholder,) = dns.message.Message._make_tsig(
        key.name, key.algorithm, 0, 300, b"", message.id, 0, b""
    )
    rdata, _ = dns.tsig.sign(unsigned, key, placeholder, when, None)
    tsig = dns.rrset.from_rdata(key.name, 0, rdata)
    tail = io.BytesIO()
    tsig.to_wire(tail)
    (additional,) = struct.unpack_from(">H", unsigned, 10)
    return unsigned[:10] + struct.pack(">H", additional + 1) + unsigned[12:] + tail.getvalue()


def test_a_signature_from_the_wrong_time_is_badtime(netd: NetdProcess) -> None:
    message = dns.update.UpdateMessage("dyn.test")
    message.add("late.dyn.test.", 60, "A", "10.0.0.4")
    wire = signed_at(message, int(time.time()) - 3600)
    reply = dns.message.from_wire(raw_udp(netd, wire), keyring=False)
    assert reply.rcode() == dns.rcode.NOTAUTH
    assert reply.tsig_error == dns.rcode.BADTIME
    assert ask(netd, "late.dyn.test").rcode() == dns.rcode.NXDOMAIN
    # The same update signed now goes through: the daemon still serves.
    assert (
        dns.message.from_wire(
            raw_udp(netd, signed_at(message, int(time.time()))), keyring=False
        ).rcode()
        == dns.rcode.NOERROR
    )
    assert ask(netd, "late.dyn.test").rcode() == dns.rcode.NOERROR


def raw_udp(netd: NetdProcess, wire: bytes) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.sendto(wire, (LOCAL, port(netd)))
        return sock.recv(65535)


def ask(netd: NetdProcess, name: str, rdtype: str = "A") -> dns.message.Message:
    query = dns.message.make_query(name, rdtype)
    return dns.query.udp(query, LOCAL, port=port(netd), timeout=5)


def test_a_signed_answer_too_big_for_udp_with_its_tsig_comes_truncated_and_signed(
    netd: NetdProcess,
) -> None:
    # 474 bytes unsigned, so it fits 512; its TSIG record takes it past them.
    message = update()
    message.add("mid.dyn.test.", 60, "TXT", f'"{"x" * 215}" "{"y" * 215}"')
    assert dns.query.tcp(message, LOCAL, port=port(netd), timeout=5).rcode() == dns.rcode.NOERROR
    assert not ask(netd, "mid.dyn.test", "TXT").flags & dns.flags.TC
    query = dns.message.make_query("mid.dyn.test", "TXT")
    query.use_tsig(KEYRING, keyname="ci-key")
    answer = raw_udp(netd, query.to_wire())
    assert len(answer) <= 512
    # Read with the key: a MAC that does not verify raises.
    reply = dns.message.from_wire(answer, keyring=KEYRING, request_mac=query.mac)
    assert reply.had_tsig and reply.flags & dns.flags.TC and reply.answer == []
    whole, over_tcp = dns.query.udp_with_fallback(query, LOCAL, port=port(netd), timeout=5)
    assert over_tcp and whole.had_tsig
    assert [rdata.strings for rdata in whole.answer[0]] == [(b"x" * 215, b"y" * 215)]
