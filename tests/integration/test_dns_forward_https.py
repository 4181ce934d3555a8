"""
Forwarding over DNS over HTTPS (RFC 8484) to a second netd's DoH listener with
its own CA: dnspython asks the first netd, which posts the query upstream on a
kept-alive connection verified for the upstream's server_name.
"""

from __future__ import annotations

import time

import dns.message
import dns.query
import dns.rcode
import pytest

from netd.testing import NetdProcess
from tests.conftest import StartNetd
from tests.integration.test_dns_forward_tls import ask, start_resolver

pytestmark = pytest.mark.integration


@pytest.fixture
def upstream_netd(start_netd: StartNetd) -> NetdProcess:
    """The upstream: a netd serving up.test only over DNS over HTTPS, with its own CA."""
    return start_netd(
        """
tls:
  upstream: {self_signed: [doh.up.test, 127.0.0.1]}
services:
  upstream:
    type: dns
    listen: ["udp:0:interface=127.0.0.1"]
    doh: [{endpoint: "ssl:0:interface=127.0.0.1", tls: upstream}]
    records:
      www.up.test: {A: [10.8.0.1]}
"""
    )


def doh_port(netd: NetdProcess) -> int:
    listener = next(e for e in netd.listeners("upstream") if e["tls"])
    port: int = listener["port"]
    return port


def test_forwarding_over_https_reuses_one_verified_connection(
    start_netd: StartNetd, upstream_netd: NetdProcess
) -> None:
    ca = upstream_netd.ca_file("upstream")
    url = f"https://127.0.0.1:{doh_port(upstream_netd)}/dns-query"
    resolver_map = f"""
services:
  resolver:
    type: dns
    listen: ["udp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.1"]
    forward:
      upstreams: [{{address: "{url}", ca: {ca}, server_name: doh.up.test}}]
      timeout: 5
    cache: {{size: 0}}
"""
    resolver = start_netd(resolver_map)
    for _ in range(3):
        reply = ask(resolver, "www.up.test")
        assert [str(r) for r in reply.answer] == ["www.up.test. 60 IN A 10.8.0.1"]
    assert ask(resolver, "nx.www.up.test").rcode() == dns.rcode.NXDOMAIN
    upstream = upstream_netd.services()["upstream"]["counters"]
    assert upstream["doh_requests"] == 4
    # Kept alive: the four queries went over one connection.
    assert upstream["connections_total"] == 1
    counters = resolver.services()["resolver"]["counters"]
    assert counters["upstream_queries"] == 4
    assert "upstream_failures" not in counters
    # A reload that replaces the resolver closes the connection it kept.
    resolver.reload(resolver_map.replace("timeout: 5", "timeout: 4"))
    assert connections_closed(upstream_netd)


def connections_closed(netd: NetdProcess) -> bool:
    """Whether the upstream sees every connection to it closed, within 5 s."""
    deadline = time.monotonic() + 5
    while netd.services()["upstream"]["counters"]["connections_active"]:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_certificate_not_for_the_server_name_is_servfail(
    start_netd: StartNetd, upstream_netd: NetdProcess
) -> None:
    ca = upstream_netd.ca_file("upstream")
    url = f"https://127.0.0.1:{doh_port(upstream_netd)}/dns-query"
    resolver = start_resolver(
        start_netd,
        f"""
forward: [{{address: "{url}", ca: {ca}, server_name: other.test}}]
forward_zones:
  up.test: ["{url}"]       # the system store knows no lab CA
""",
    )
    assert ask(resolver, "www.elsewhere.test").rcode() == dns.rcode.SERVFAIL
    assert ask(resolver, "www.up.test").rcode() == dns.rcode.SERVFAIL
    assert upstream_netd.services()["upstream"]["counters"].get("doh_requests", 0) == 0
    assert resolver.services()["resolver"]["counters"]["upstream_failures"] == 2


def test_an_upstream_that_is_not_doh_fails_over_to_the_next(
    start_netd: StartNetd, upstream_netd: NetdProcess
) -> None:
    ca = upstream_netd.ca_file("upstream")
    port = doh_port(upstream_netd)
    resolver = start_resolver(
        start_netd,
        f"""
forward:
  upstreams:
    - {{address: "https://127.0.0.1:{port}/elsewhere", ca: {ca}, server_name: doh.up.test}}
    - {{address: "https://127.0.0.1:{port}/dns-query", ca: {ca}, server_name: doh.up.test}}
""",
    )
    reply = ask(resolver, "www.up.test")
    assert [str(r) for r in reply.answer] == ["www.up.test. 60 IN A 10.8.0.1"]
    counters = resolver.services()["resolver"]["counters"]
    assert counters["upstream_failures"] == 1  # the 404 of the wrong path
