"""
Zone features in the real daemon: minimal ANY over UDP and full over TCP
(dig, kdig), $INCLUDE and $GENERATE zone files, and a reload that reads a
large zone in a thread while the old records go on answering.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import pytest

from netd.testing import NetdProcess
from tests.conftest import StartNetd

pytestmark = pytest.mark.integration

LOCAL = "127.0.0.1"
DIG = shutil.which("dig")
KDIG = shutil.which("kdig")
# 2001:db8::/64's reverse zone, its pointers made by $GENERATE in nibble format.
REVERSE = "0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa"


@pytest.fixture
def zones(tmp_path: Path) -> Path:
    folder = tmp_path / "zones"
    (folder / "parts").mkdir(parents=True)
    (folder / "lab.test.zone").write_text(
        "$TTL 300\n@ SOA ns hostmaster 5 3600 600 86400 30\n"
        '@ MX 10 mail\n@ TXT "v=spf1 -all"\n'
        "$INCLUDE parts/hosts.inc\n"
        "$GENERATE 1-20 node-${0,2} A 10.0.1.$\n"
    )
    (folder / "parts" / "hosts.inc").write_text("www A 10.0.0.1\nmail A 10.0.0.2\n")
    (folder / f"{REVERSE}.zone").write_text(
        "$TTL 300\n$GENERATE 0-4095 ${0,31,n} PTR host-${0,3,x}.lab.test.\n"
    )
    return folder


@pytest.fixture
def netd(start_netd: StartNetd, zones: Path) -> NetdProcess:
    return start_netd(
        f"""
services:
  dns:
    type: dns
    listen: ["udp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.1"]
    zone_files: [{zones / "lab.test.zone"}, {zones / f"{REVERSE}.zone"}]
"""
    )


def ask(netd: NetdProcess, name: str, rdtype: str = "A", timeout: float = 5) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype)
    return dns.query.udp(query, LOCAL, port=netd.address("dns", "udp")[1], timeout=timeout)


def texts(reply: dns.message.Message) -> list[str]:
    return [str(rrset) for rrset in reply.answer]


def run(tool: str | None, *args: str) -> str:
    assert tool is not None
    limits = ["+time=5", "+tries=1"] if tool == DIG else ["+timeout=5", "+retry=0"]
    result = subprocess.run(
        [tool, f"@{LOCAL}", *limits, *args],
        capture_output=True,
        text=True,
        timeout=20,
    )
    return result.stdout


@pytest.mark.skipif(DIG is None, reason="dig is not installed (apt-get install dnsutils)")
def test_dig_any_is_minimal_over_udp_and_whole_over_tcp(netd: NetdProcess) -> None:
    udp = run(DIG, "+notcp", "-p", str(netd.address("dns", "udp")[1]), "lab.test", "ANY")
    assert "status: NOERROR" in udp
    assert 'lab.test.\t\t8482\tIN\tHINFO\t"RFC8482" ""' in udp
    assert "ANSWER: 1," in udp and "MX" not in udp.split("ANSWER SECTION")[1]
    tcp = run(DIG, "+tcp", "-p", str(netd.address("dns")[1]), "lab.test", "ANY")
    assert "HINFO" not in tcp
    assert "MX\t10 mail.lab.test." in tcp and '"v=spf1 -all"' in tcp and "SOA" in tcp
    missing = run(DIG, "+notcp", "-p", str(netd.address("dns", "udp")[1]), "nope.lab.test", "ANY")
    assert "status: NXDOMAIN" in missing
    assert netd.services()["dns"]["counters"]["queries"] == 3  # and it still serves


@pytest.mark.skipif(KDIG is None, reason="kdig is not installed (apt-get install knot-dnsutils)")
def test_kdig_any_over_udp(netd: NetdProcess) -> None:
    out = run(KDIG, "+notcp", "-p", str(netd.address("dns", "udp")[1]), "www.lab.test", "ANY")
    assert "status: NOERROR" in out and "ANSWER: 1" in out
    assert 'HINFO\t"RFC8482" ""' in out


def test_include_and_generate_answer(netd: NetdProcess) -> None:
    assert texts(ask(netd, "www.lab.test")) == ["www.lab.test. 300 IN A 10.0.0.1"]
    assert texts(ask(netd, "node-07.lab.test")) == ["node-07.lab.test. 300 IN A 10.0.1.7"]
    assert ask(netd, "node-21.lab.test").rcode() == dns.rcode.NXDOMAIN


def test_a_reload_reads_a_large_zone_while_the_old_one_answers(
    netd: NetdProcess, zones: Path
) -> None:
    zone = zones / "lab.test.zone"
    big = [
        "$TTL 300",
        "@ SOA ns hostmaster 6 3600 600 86400 30",
        "www A 10.0.0.99",
        "$GENERATE 0-65535 h$.g0 A 10.0.0.1",
    ]
    zone.write_text("\n".join(big) + "\n")
    old, new = ["www.lab.test. 300 IN A 10.0.0.1"], ["www.lab.test. 300 IN A 10.0.0.99"]
    seen = []
    with ThreadPoolExecutor(1) as pool:
        reloading = pool.submit(netd.reload)
        deadline = time.monotonic() + 120
        for _ in range(100_000):
            started = time.monotonic()
            answer = texts(ask(netd, "www.lab.test", timeout=2))
            seen.append((time.monotonic() - started, answer))
            if answer != old or time.monotonic() > deadline:
                break
        assert reloading.result(timeout=120)["restarted"] == ["dns"]
    # The zone took a while to read, and all that time the old records answered
    # at once; then the new ones, and never the old again.
    assert [answer for _, answer in seen] == [old] * (len(seen) - 1) + [new]
    assert len(seen) >= 5, seen
    # Read on the reactor thread, the zone would hold a query for the whole read (5 s or
    # more here); in a thread, a query waits at most for the GIL's turns.
    assert max(latency for latency, _ in seen) < 2.0, seen
    assert texts(ask(netd, "www.lab.test")) == new
    assert texts(ask(netd, "h65535.g0.lab.test")) == ["h65535.g0.lab.test. 300 IN A 10.0.0.1"]


@pytest.mark.skipif(DIG is None, reason="dig is not installed (apt-get install dnsutils)")
def test_dig_resolves_a_generated_ip6_arpa_pointer(netd: NetdProcess) -> None:
    port = str(netd.address("dns", "udp")[1])
    out = run(DIG, "+notcp", "-p", port, "+short", "-x", "2001:db8::abc")
    assert out.strip() == "host-abc.lab.test."
    missing = run(DIG, "+notcp", "-p", port, "-x", "2001:db8::1000")
    assert "status: NXDOMAIN" in missing and f"\n{REVERSE}. 300 IN SOA ns.{REVERSE}." in missing
