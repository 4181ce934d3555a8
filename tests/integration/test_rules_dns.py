"""
dns rules in the real daemon, seen by dig and dnspython: a rebinding answer,
a SERVFAIL for one name only, a truncated UDP answer, a dropped query, a delay.
"""

from __future__ import annotations

import subprocess
import time

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import pytest

from netd.testing import NetdProcess
from tests.conftest import StartNetd

DNS_MAP = """
services:
  dns:
    type: dns
    listen: ["udp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.1"]
    query_log: true
    records:
      api.test: {A: [192.0.2.1]}
      ok.down.test: {A: [192.0.2.2]}
      big.test: {A: [192.0.2.3]}
    rules:
      - {match: {name: api.test, qtype: A}, answers: ["10.0.0.1"], times: 1, ttl: 5}
      - {match: {name: api.test, qtype: A}, answers: ["127.0.0.1"]}
      - {match: {name: "*.down.test"}, rcode: SERVFAIL}
      - {match: {name: big.test, transport: udp}, truncate: true}
      - {match: {name: lost.test}, drop: true}
      - {match: {name: slow.test}, delay: 1, answers: ["192.0.2.9", "MX 10 mx.slow.test"]}
"""


def dig(netd: NetdProcess, *args: str, transport: str = "udp") -> str:
    host, port = netd.address("dns", transport)
    tcp = ["+tcp"] if transport == "tcp" else []
    return subprocess.run(
        ["dig", f"@{host}", "-p", str(port), *tcp, "+short", "+tries=1", "+time=3", *args],
        capture_output=True,
        text=True,
        timeout=20,
    ).stdout


def ask(netd: NetdProcess, name: str, timeout: float = 5) -> dns.message.Message:
    host, port = netd.address("dns", "udp")
    return dns.query.udp(dns.message.make_query(name, "A"), host, port=port, timeout=timeout)


def test_dig_sees_the_rebinding(start_netd: StartNetd) -> None:
    netd = start_netd(DNS_MAP)
    assert dig(netd, "api.test", "A") == "10.0.0.1\n"
    assert dig(netd, "api.test", "A") == "127.0.0.1\n"
    assert dig(netd, "api.test", "AAAA") == ""  # its rules match A only: the records' NODATA
    [first, second] = netd.wait_for_count("dns", "rule.fired", 2)
    assert (first["rule"], second["rule"]) == ("m1", "m2")
    assert first["matched"] == {"name": "api.test", "qtype": "A", "transport": "udp"}
    sources = [q["source"] for q in netd.queries("dns")]
    assert sources == ["rule", "rule", "local"]


def test_servfail_for_one_name_only(start_netd: StartNetd) -> None:
    netd = start_netd(DNS_MAP)
    assert ask(netd, "x.down.test").rcode() == dns.rcode.SERVFAIL
    assert ask(netd, "ok.down.test").rcode() == dns.rcode.SERVFAIL
    netd.admin("DELETE", "/api/services/dns/rules/m3")
    answer = ask(netd, "ok.down.test")
    assert answer.rcode() == dns.rcode.NOERROR
    assert [a.address for a in answer.answer[0]] == ["192.0.2.2"]


def test_truncated_over_udp_then_answered_over_tcp(start_netd: StartNetd) -> None:
    netd = start_netd(DNS_MAP)
    truncated = ask(netd, "big.test")
    assert truncated.flags & dns.flags.TC and not truncated.answer
    assert dig(netd, "big.test", transport="tcp") == "192.0.2.3\n"  # the rule is UDP's only


def test_truncate_is_for_udp_answers_only(start_netd: StartNetd) -> None:
    netd = start_netd(DNS_MAP)
    with netd.rule("dns", match={"name": "big.test"}, truncate=True):
        assert dig(netd, "big.test", transport="tcp") == "192.0.2.3\n"  # the usual answer
    with netd.rule("dns", match={"name": "retry.test"}, truncate=True, answers=["192.0.2.7"]):
        truncated = ask(netd, "retry.test")
        assert truncated.flags & dns.flags.TC and not truncated.answer
        assert dig(netd, "retry.test", transport="tcp") == "192.0.2.7\n"  # the rule's own


def test_dropped_and_delayed(start_netd: StartNetd) -> None:
    netd = start_netd(DNS_MAP)
    with pytest.raises(dns.exception.Timeout):
        ask(netd, "lost.test", timeout=1)
    started = time.monotonic()
    answer = ask(netd, "slow.test")
    assert time.monotonic() - started >= 0.9
    assert [a.address for a in answer.answer[0]] == ["192.0.2.9"]
    assert "10 mx.slow.test." in dig(netd, "slow.test", "MX")


def test_bad_dns_rule_refused_with_its_path(start_netd: StartNetd) -> None:
    netd = start_netd(DNS_MAP)
    from netd.testing import AdminError

    with pytest.raises(AdminError) as refused:
        netd.rule("dns", match={"qtype": "AAAAA"}, answers=["nowhere"], rcode="BAD")
    assert refused.value.status == 400
    assert '"match.qtype"' in refused.value.body and '"answers[0]"' in refused.value.body
    assert '"rcode"' in refused.value.body
    assert dig(netd, "api.test") == "10.0.0.1\n"
