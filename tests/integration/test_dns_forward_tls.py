"""
Forwarding over DNS over TLS to a second netd with its own CA, and
forward_zones sending one suffix to its own upstreams (split horizon).
"""

from __future__ import annotations

import ssl
import textwrap
from pathlib import Path

import dns.flags
import dns.message
import dns.query
import dns.rcode
import pytest

from netd.testing import NetdProcess
from tests.conftest import StartNetd
from tests.integration.test_dns import Upstream

LOCAL = "127.0.0.1"


def start_resolver(start_netd: StartNetd, settings: str) -> NetdProcess:
    """A netd whose dns service C{resolver} listens on UDP with C{settings} (its YAML keys)."""
    return start_netd(
        'services:\n  resolver:\n    type: dns\n    listen: ["udp:0:interface=127.0.0.1"]\n'
        + textwrap.indent(settings.lstrip("\n"), "    ")
    )


def ask(netd: NetdProcess, name: str, rdtype: str = "A") -> dns.message.Message:
    query = dns.message.make_query(name, rdtype)
    return dns.query.udp(query, LOCAL, port=netd.address("resolver", "udp")[1], timeout=10)


@pytest.fixture
def upstream_netd(start_netd: StartNetd) -> NetdProcess:
    """The upstream: a netd serving up.test only over DNS over TLS, with its own CA."""
    return start_netd(
        """
tls:
  upstream: {self_signed: [dot.up.test, 127.0.0.1]}
services:
  upstream:
    type: dns
    listen: [{endpoint: "ssl:0:interface=127.0.0.1", tls: upstream}]
    records:
      www.up.test: {A: [10.8.0.1]}
"""
    )


def dot_port(netd: NetdProcess) -> int:
    return netd.address("upstream", tls=True)[1]


def test_forwarding_over_tls_verified_against_the_upstreams_ca(
    start_netd: StartNetd, upstream_netd: NetdProcess
) -> None:
    ca = upstream_netd.ca_file("upstream")
    address = f"tls://127.0.0.1:{dot_port(upstream_netd)}"
    resolver = start_resolver(
        start_netd,
        f"""
forward:
  upstreams:
    - {{address: "{address}", ca: {ca}, server_name: dot.up.test}}
  timeout: 5
""",
    )
    reply = ask(resolver, "www.up.test")
    assert [str(r) for r in reply.answer] == ["www.up.test. 60 IN A 10.8.0.1"]
    assert reply.rcode() == dns.rcode.NOERROR
    upstream_queries = upstream_netd.services()["upstream"]["counters"]["queries"]
    assert upstream_queries == 1


def test_a_certificate_not_for_the_server_name_or_ca_is_servfail(
    start_netd: StartNetd, upstream_netd: NetdProcess
) -> None:
    ca = upstream_netd.ca_file("upstream")
    port = dot_port(upstream_netd)
    resolver = start_resolver(
        start_netd,
        f"""
forward: [{{address: "tls://127.0.0.1:{port}", ca: {ca}, server_name: other.test}}]
forward_zones:
  up.test: ["tls://127.0.0.1:{port}"]       # the system store knows no lab CA
""",
    )
    assert ask(resolver, "www.up.test").rcode() == dns.rcode.SERVFAIL
    assert ask(resolver, "www.elsewhere.test").rcode() == dns.rcode.SERVFAIL
    assert upstream_netd.services()["upstream"]["counters"].get("queries", 0) == 0
    counters = resolver.services()["resolver"]["counters"]
    assert counters["upstream_failures"] == 2


def test_forward_zones_split_the_horizon(start_netd: StartNetd, upstream_netd: NetdProcess) -> None:
    ca = upstream_netd.ca_file("upstream")
    plain = Upstream()
    try:
        resolver = start_netd(
            f"""
services:
  resolver:
    type: dns
    listen: ["udp:0:interface=127.0.0.1"]
    forward: ["127.0.0.1:{plain.port}"]
    forward_zones:
      up.test:
        - {{address: "tls://127.0.0.1:{dot_port(upstream_netd)}", ca: {ca}, server_name: 127.0.0.1}}
"""
        )
        assert [str(r) for r in ask(resolver, "www.up.test").answer] == [
            "www.up.test. 60 IN A 10.8.0.1"
        ]
        assert plain.count("www.up.test") == 0
        assert ask(resolver, "a.fwd.test").rcode() == dns.rcode.NOERROR
        assert plain.count("a.fwd.test") == 1
        assert upstream_netd.services()["upstream"]["counters"]["queries"] == 1
    finally:
        plain.close()


def test_dnspython_over_tls_to_the_upstream(upstream_netd: NetdProcess) -> None:
    context = ssl.create_default_context(cafile=upstream_netd.ca_file("upstream"))
    reply = dns.query.tls(
        dns.message.make_query("www.up.test", "A"),
        LOCAL,
        port=dot_port(upstream_netd),
        ssl_context=context,
        server_hostname="dot.up.test",
        timeout=10,
    )
    assert [str(r) for r in reply.answer] == ["www.up.test. 60 IN A 10.8.0.1"]


def test_recorded_answers_replay_with_the_upstream_gone(
    start_netd: StartNetd, tmp_path: Path
) -> None:
    recording = tmp_path / "recorded.zone"
    upstream = Upstream()
    try:
        recorder = start_netd(
            f"""
services:
  resolver:
    type: dns
    listen: ["udp:0:interface=127.0.0.1"]
    forward: ["127.0.0.1:{upstream.port}"]
    record_to: {recording}
"""
        )
        seen = {name: texts(ask(recorder, name)) for name in ("a.fwd.test", "long.fwd.test")}
        assert ask(recorder, "big.fwd.test", "TXT").rcode() == dns.rcode.NOERROR
        assert ask(recorder, "nx.fwd.test").rcode() == dns.rcode.NXDOMAIN
        recorder.stop()  # stopping waits for the last write
    finally:
        upstream.close()
    text = recording.read_text()
    assert "a.fwd.test. 300 IN A 10.0.0.7\n" in text
    assert len([line for line in text.splitlines() if line.startswith("big.fwd.test.")]) == 40
    assert "nx.fwd.test" not in text
    replay = start_resolver(
        start_netd,
        f"""
zone_files: [{recording}]
""",
    )
    # No forward at all: the same names answer the same, now authoritatively.
    for name, answer in seen.items():
        reply = ask(replay, name)
        assert texts(reply) == answer and reply.flags & dns.flags.AA
    truncated = ask(replay, "big.fwd.test", "TXT")  # recorded from the TCP retry, all 40
    assert truncated.flags & dns.flags.TC and not truncated.answer


def texts(reply: dns.message.Message) -> list[str]:
    return [str(rrset) for rrset in reply.answer]
