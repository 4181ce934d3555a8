"""
The dns kind asked by resolvers and tools nobody here wrote: ldns's drill (UDP,
TCP, DO bit, a trace from a lab root), BIND's delv and host, unbound-host, an
unbound forwarder and stub (EDNS, TCP on TC, 0x20 case randomisation),
knsupdate with TSIG, getdns_query over DoT, dig over DoT and DoH, and short
dnsperf and resperf runs over every transport.
"""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from netd.testing import NetdProcess
from tests.integration.test_dns import shared_port
from tests.maps import lab_map

LOCAL = "127.0.0.1"
# The lab root listens on a second loopback address with the same port number,
# as a delegation names addresses but no port and drill -T asks every server on -p.
ROOT = "127.0.0.2"
SECRET = base64.b64encode(b"an interop secret, 32 bytes long").decode()
TXT_STRINGS = 30  # over 1232 bytes: truncated over UDP with EDNS0


def tool(name: str, package: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        shutil.which(name) is None, reason=f"{name} is not installed (apt-get install {package})"
    )


@pytest.fixture(scope="module")
def netd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetdProcess]:
    base = tmp_path_factory.mktemp("netd")
    (base / "hosts").write_text("10.2.0.1 printer.lan printer\n")
    port = shared_port()
    strings = ", ".join(f"'{i:02d} {'t' * 60}'" for i in range(TXT_STRINGS))
    config = lab_map(
        f"""
  dns:
    type: dns
    listen:
      - "udp:{port}:interface={LOCAL}"
      - "tcp:{port}:interface={LOCAL}"
      - {{endpoint: "ssl:0:interface={LOCAL}", tls: lab}}
    doh: [{{endpoint: "ssl:0:interface={LOCAL}", tls: lab}}]
    records:
      www.interop.test: {{A: [127.0.0.1], AAAA: ["::1"]}}
      interop.test: {{MX: ["10 mx.interop.test"], NS: [ns.interop.test]}}
      ns.interop.test: {{A: [{LOCAL}]}}
      mx.interop.test: {{A: [127.0.0.25]}}
      alias.interop.test: {{CNAME: [www.interop.test]}}
      "*.apps.interop.test": {{A: [127.0.0.2]}}
      big.interop.test: {{TXT: [{strings}]}}
    hosts_file: {base / "hosts"}
    query_log: true
    update:
      keys: {{ci-key: {{algorithm: hmac-sha256, secret: "{SECRET}"}}}}
      allow: [interop.test]
  root:
    type: dns
    listen: ["udp:{port}:interface={ROOT}", "tcp:{port}:interface={ROOT}"]
    records:
      ".": {{SOA: ["a.root.test. hostmaster.root.test. 1 3600 600 86400 60"], NS: [a.root.test]}}
      a.root.test: {{A: [{ROOT}]}}
      interop.test: {{NS: [ns.interop.test]}}
      ns.interop.test: {{A: [{LOCAL}]}}
"""
    )
    process = NetdProcess.start(config, base)
    yield process
    process.stop()


def port(netd: NetdProcess) -> int:
    return netd.address("dns", "udp")[1]


def dot_port(netd: NetdProcess) -> int:
    return netd.address("dns", "tcp", tls=True)[1]


def doh_port(netd: NetdProcess) -> int:
    return netd.address("dns", "tcp", tls=True, protocol="doh")[1]


def run(*command: str | Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(part) for part in command],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
    )


def asked(netd: NetdProcess, name: str) -> list[tuple[str, str]]:
    """(transport, qtype) of each query netd logged for C{name}, oldest first."""
    return [
        (entry["transport"], entry["qtype"])
        for entry in netd.queries("dns")
        if entry["name"] == name
    ]


# -- drill (ldnsutils) -----------------------------------------------------------


@tool("drill", "ldnsutils")
def test_drill_over_udp_and_tcp_with_the_do_bit(netd: NetdProcess) -> None:
    udp = run("drill", "-p", port(netd), f"@{LOCAL}", "alias.interop.test", "A")
    assert "rcode: NOERROR" in udp.stdout and "flags: qr aa rd ;" in udp.stdout
    assert "alias.interop.test.\t60\tIN\tCNAME\twww.interop.test." in udp.stdout
    assert "www.interop.test.\t60\tIN\tA\t127.0.0.1" in udp.stdout
    tcp = run("drill", "-t", "-p", port(netd), f"@{LOCAL}", "big.interop.test", "TXT")
    assert f"ANSWER: {TXT_STRINGS}," in tcp.stdout, tcp.stdout + tcp.stderr
    # RFC 3225: the DO bit of the query is copied into the answer's OPT.
    dnssec = run("drill", "-D", "-p", port(netd), f"@{LOCAL}", "www.interop.test", "AAAA")
    assert ";; EDNS: version 0; flags: do ; udp: 1232" in dnssec.stdout, dnssec.stdout
    assert "www.interop.test.\t60\tIN\tAAAA\t::1" in dnssec.stdout


@tool("drill", "ldnsutils")
def test_drill_traces_from_a_lab_root(netd: NetdProcess, tmp_path: Path) -> None:
    hints = tmp_path / "root.hints"
    hints.write_text(f".\t3600000\tIN\tNS\ta.root.test.\na.root.test.\t3600000\tIN\tA\t{ROOT}\n")
    traced = run("drill", "-T", "-r", hints, "-p", port(netd), "alias.interop.test", "A")
    assert traced.returncode == 0, traced.stderr
    assert traced.stdout.splitlines() == [
        ".\t60\tIN\tNS\ta.root.test.",
        "interop.test.\t60\tIN\tNS\tns.interop.test.",
        "alias.interop.test.\t60\tIN\tCNAME\twww.interop.test.",
        "www.interop.test.\t60\tIN\tA\t127.0.0.1",
    ]


# -- BIND's delv and host ----------------------------------------------------------


@tool("delv", "bind9-dnsutils")
def test_delv_reports_unsigned_local_answers_cleanly(netd: NetdProcess, tmp_path: Path) -> None:
    # A trust anchor for a name netd does not serve: the lab's names lie under
    # none, so delv validates nothing and must not call them bogus or broken.
    anchors = tmp_path / "anchors.conf"
    anchors.write_text(
        'trust-anchors { elsewhere.invalid. static-key 257 3 13 "mdsswUyr3DPW132mOi8V9xESWE8j'
        'To0dxCjjnopKl+GqJxpVXckHAeF+KkxLbxILfDLUT0rAK9iUzy1L53eKGQ=="; };\n'
    )
    delv = ("delv", "-a", anchors, "+root=elsewhere.invalid", "-p", port(netd), f"@{LOCAL}")
    found = run(*delv, "www.interop.test", "A")
    assert found.returncode == 0 and found.stderr == "", found.stderr
    assert found.stdout.splitlines() == [
        "; authoritative",
        "www.interop.test.\t60\tIN\tA\t127.0.0.1",
    ]
    missing = run(*delv, "nope.interop.test", "A")
    assert missing.returncode == 0
    assert missing.stdout.splitlines()[0] == "; negative response, unsigned answer"
    assert "nope.interop.test.\t300\tIN\t\\-ANY\t;-$NXDOMAIN" in missing.stdout
    assert missing.stderr == ";; resolution failed: ncache nxdomain\n"


@tool("host", "bind9-host")
def test_host_lookups(netd: NetdProcess) -> None:
    def host(*args: str) -> subprocess.CompletedProcess[str]:
        return run("host", "-p", str(port(netd)), *args, LOCAL)

    def answers(result: subprocess.CompletedProcess[str]) -> list[str]:
        # host prints which server it used first, then one line an answer.
        return result.stdout.split("\n\n", 1)[1].splitlines()

    assert answers(host("www.interop.test")) == [
        "www.interop.test has address 127.0.0.1",
        "www.interop.test has IPv6 address ::1",
    ]
    assert answers(host("-t", "MX", "interop.test")) == [
        "interop.test mail is handled by 10 mx.interop.test."
    ]
    assert sorted(answers(host("10.2.0.1"))) == [
        "1.0.2.10.in-addr.arpa domain name pointer printer.",
        "1.0.2.10.in-addr.arpa domain name pointer printer.lan.",
    ]
    over_tcp = host("-T", "-t", "TXT", "big.interop.test")
    assert len(answers(over_tcp)) == TXT_STRINGS
    missing = host("nope.interop.test")
    assert missing.returncode == 1
    assert "Host nope.interop.test not found: 3(NXDOMAIN)" in missing.stdout
    transfer = host("-l", "interop.test")
    assert transfer.returncode == 1 and "5(REFUSED)" in transfer.stdout


# -- unbound-host and an unbound resolver in front of netd --------------------------


def unbound_server_conf(netd: NetdProcess, listen: int) -> str:
    """
    unbound on C{listen}: C{interop.test} as a stub zone (netd authoritative, asked
    without RD and with QNAME minimisation), reverse names forwarded (RD), every
    question's case randomised (0x20), nothing validated.
    """
    return f"""server:
  interface: {LOCAL}@{listen}
  port: {listen}
  do-daemonize: no
  username: ""
  chroot: ""
  pidfile: ""
  use-syslog: no
  logfile: ""
  verbosity: 1
  do-ip6: no
  do-not-query-localhost: no
  local-zone: "test." nodefault
  local-zone: "10.in-addr.arpa." nodefault
  use-caps-for-id: yes
  module-config: "iterator"
stub-zone:
  name: "interop.test."
  stub-addr: {LOCAL}@{port(netd)}
forward-zone:
  name: "in-addr.arpa."
  forward-addr: {LOCAL}@{port(netd)}
"""


@tool("unbound-host", "unbound-host")
def test_unbound_host_through_netd(netd: NetdProcess, tmp_path: Path) -> None:
    conf = tmp_path / "unbound.conf"
    # unbound answers the special-use test. zone itself (RFC 6761) unless told not to.
    conf.write_text(
        'server:\n  do-not-query-localhost: no\n  local-zone: "test." nodefault\n'
        f'forward-zone:\n  name: "."\n  forward-addr: {LOCAL}@{port(netd)}\n'
    )
    found = run("unbound-host", "-C", conf, "-v", "-t", "A", "alias.interop.test")
    assert found.stdout.splitlines() == [
        "alias.interop.test is an alias for www.interop.test. (insecure)",
        "www.interop.test has address 127.0.0.1 (insecure)",
    ]
    missing = run("unbound-host", "-C", conf, "nope.interop.test")
    assert missing.stdout == "Host nope.interop.test not found: 3(NXDOMAIN).\n"


@pytest.fixture
def unbound(netd: NetdProcess, tmp_path: Path) -> Iterator[int]:
    if shutil.which("unbound") is None:
        pytest.skip("unbound is not installed (apt-get install unbound)")
    listen = shared_port()
    conf = tmp_path / "unbound.conf"
    conf.write_text(unbound_server_conf(netd, listen))
    log = tmp_path / "unbound.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            ["unbound", "-d", "-c", str(conf)], stdout=output, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 15
        while "start of service" not in log.read_text():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        yield listen
    finally:
        process.terminate()
        process.wait(10)


def dig(port: int, *args: str) -> str:
    result = run("dig", f"@{LOCAL}", "-p", str(port), "+time=5", "+tries=1", *args)
    return result.stdout


@tool("dig", "bind9-dnsutils")
def test_unbound_resolves_netd_names_with_0x20_edns_and_tcp(
    netd: NetdProcess, unbound: int
) -> None:
    netd.admin("DELETE", "/api/services/dns/queries")
    mixed = dig(unbound, "WwW.InTeRoP.TeSt", "AAAA")
    assert "status: NOERROR" in mixed and "WwW.InTeRoP.TeSt.\t60\tIN\tAAAA\t::1" in mixed
    # unbound drops an answer whose question's case differs from the one it
    # randomised and asks again: one query each (A first, QNAME minimisation's
    # look at the name) means netd echoed it.
    assert asked(netd, "www.interop.test.") == [("udp", "A"), ("udp", "AAAA")]
    big = dig(unbound, "big.interop.test", "TXT")
    assert len(re.findall(r"^big\.interop\.test\.\s+60\s+IN\s+TXT", big, re.M)) == TXT_STRINGS
    # unbound offers EDNS0 1232: netd's answer came back truncated, unbound asked over TCP.
    assert asked(netd, "big.interop.test.")[-2:] == [("udp", "TXT"), ("tcp", "TXT")]
    wildcard = dig(unbound, "+short", "a.b.apps.interop.test")
    assert wildcard == "127.0.0.2\n"
    missing = dig(unbound, "nope.interop.test")
    assert "status: NXDOMAIN" in missing
    assert "interop.test.\t\t300\tIN\tSOA\tns.interop.test. hostmaster.interop.test." in missing
    reverse = dig(unbound, "+short", "-x", "10.2.0.1")
    assert sorted(reverse.split()) == ["printer.", "printer.lan."]


# -- knsupdate (Knot) with TSIG ---------------------------------------------------


@tool("knsupdate", "knot-dnsutils")
def test_knsupdate_with_tsig(netd: NetdProcess) -> None:
    def knsupdate(script: str, secret: str = SECRET) -> subprocess.CompletedProcess[str]:
        return run(
            "knsupdate",
            "-y",
            f"hmac-sha256:ci-key:{secret}",
            stdin=f"server {LOCAL} {port(netd)}\nzone interop.test.\n{script}\nsend\n",
        )

    added = knsupdate(
        'update add k.interop.test. 300 A 10.0.0.9\nupdate add k.interop.test. 300 TXT "hi there"'
    )
    assert added.returncode == 0, added.stdout + added.stderr
    assert netd.admin("GET", "/api/services/dns/records/k.interop.test/TXT")["values"] == [
        '"hi there"'
    ]
    held = knsupdate(
        "prereq nxdomain www.interop.test.\nupdate add k2.interop.test. 300 A 10.0.0.2"
    )
    assert held.returncode == 1 and "update failed with error 'YXDOMAIN'" in held.stderr
    other = base64.b64encode(b"not the secret at all, 32 bytes.").decode()
    forged = knsupdate("update add k3.interop.test. 300 A 10.0.0.3", secret=other)
    assert forged.returncode == 1 and "status: BADSIG" in forged.stdout
    over_tcp = run(
        "knsupdate",
        "-v",
        "-y",
        f"hmac-sha256:ci-key:{SECRET}",
        stdin=f"server {LOCAL} {port(netd)}\nzone interop.test.\ndel k.interop.test. A\nsend\n",
    )
    assert over_tcp.returncode == 0, over_tcp.stdout + over_tcp.stderr
    records = netd.admin("GET", "/api/services/dns/records?name=k.interop.test")
    assert [record["type"] for record in records] == ["TXT"]


# -- DNS over TLS and HTTPS -------------------------------------------------------


@tool("getdns_query", "getdns-utils")
def test_getdns_over_tls_verifies_netd(netd: NetdProcess) -> None:
    settings = f'{{"tls_ca_file": "{netd.ca_file("lab")}"}}'
    result = run(
        "getdns_query",
        "-s",
        "-L",
        "-m",
        settings,
        f"@{LOCAL}#{dot_port(netd)}~localhost",
        "www.interop.test",
        "A",
    )
    assert '"status": GETDNS_RESPSTATUS_GOOD' in result.stdout, result.stdout + result.stderr
    assert '"address_data": <bindata for 127.0.0.1>' in result.stdout


@tool("dig", "bind9-dnsutils")
@pytest.mark.parametrize("transport", ["+tls", "+https", "+https-get"])
def test_dig_over_tls_and_https(netd: NetdProcess, transport: str) -> None:
    listener = dot_port(netd) if transport == "+tls" else doh_port(netd)
    out = dig(
        listener,
        transport,
        f"+tls-ca={netd.ca_file('lab')}",
        "+tls-hostname=localhost",
        "big.interop.test",
        "TXT",
    )
    assert "status: NOERROR" in out, out
    assert len(re.findall(r"^big\.interop\.test\.\s+60\s+IN\s+TXT", out, re.M)) == TXT_STRINGS
    assert f"SERVER: {LOCAL}#{listener}({LOCAL}) ({transport[1:].upper()})" in out


# -- dnsperf and resperf ----------------------------------------------------------

QUERIES = "www.interop.test A\ninterop.test MX\nnope.interop.test A\nalias.interop.test A\n"


def statistics(output: str) -> dict[str, str]:
    return dict(re.findall(r"^ +([A-Z][\w /]+?): +(.*)$", output, re.M))


@tool("dnsperf", "dnsperf")
@pytest.mark.parametrize("mode", ["udp", "tcp", "dot", "doh"])
def test_dnsperf_loses_nothing(netd: NetdProcess, tmp_path: Path, mode: str) -> None:
    queries = tmp_path / "queries"
    queries.write_text(QUERIES)
    target = {"dot": dot_port(netd), "doh": doh_port(netd)}.get(mode, port(netd))
    # dnsperf 2.10 loses DoH answers that arrive in one read with another
    # (DNS-OARC/dnsperf#240): one query in flight there.
    in_flight = "1" if mode == "doh" else "10"
    result = run(
        "dnsperf", "-m", mode, "-s", LOCAL, "-p", str(target), "-d", queries,
        "-l", "1", "-q", in_flight, "-c", "1", "-Q", "400",
    )  # fmt: skip
    stats = statistics(result.stdout)
    assert stats["Queries lost"] == "0 (0.00%)", result.stdout + result.stderr
    sent = int(stats["Queries sent"])
    assert sent >= 4 and stats["Queries completed"] == f"{sent} (100.00%)"
    codes = dict(
        re.findall(r"(NOERROR|NXDOMAIN|SERVFAIL|REFUSED|FORMERR) (\d+)", stats["Response codes"])
    )
    assert set(codes) == {"NOERROR", "NXDOMAIN"}
    # Every fourth question is the NXDOMAIN one, from the first.
    assert int(codes["NXDOMAIN"]) == Counter(i % 4 for i in range(sent))[2]


@tool("resperf", "dnsperf")
def test_resperf_ramp_loses_nothing(netd: NetdProcess, tmp_path: Path) -> None:
    queries = tmp_path / "queries"
    queries.write_text(QUERIES * 100)  # resperf stops when its file runs out
    result = run(
        "resperf", "-s", LOCAL, "-p", str(port(netd)), "-d", queries, "-m", "200", "-r", "1",
        "-c", "1", "-P", tmp_path / "plot",
    )  # fmt: skip
    stats = statistics(result.stdout)
    assert stats["Queries lost"] == "0", result.stdout + result.stderr
    assert stats["Queries completed"] == stats["Queries sent"]
    assert stats["Lost at that point"] == "0.00%"
