"""
Many tests at once on one daemon, each in its namespace (netd_ns): xdist
workers send mail, HTTP and DNS to the same daemon, and each test counts
exactly its own traffic.
"""

from __future__ import annotations

import pytest

from netd.pytest_plugin import NAMESPACED_MAP
from tests.conftest import StartNetd

# The workers' tests all use the daemon the outer test started.
SHARED = """
import os
from pathlib import Path

import pytest

from netd.testing import NetdProcess


@pytest.fixture(scope="session")
def netd_ns_server():
    return NetdProcess.attach(Path(os.environ["NETD_SHARED_WORKDIR"]))
"""

TESTS = """
import smtplib

import dns.resolver
import httpx
import pytest


@pytest.mark.parametrize("number", range({tests}))
def test_sees_exactly_its_own_traffic(netd_ns, number):
    # Each test sends a different amount, so traffic seen in the wrong
    # namespace changes a count.
    sent = number % 4 + 1
    with smtplib.SMTP(*netd_ns.address("mail"), timeout=10) as smtp:
        for i in range(sent):
            to = netd_ns.email(f"user{{i}}@example.test")
            text = f"Subject: {{number}}/{{i}}\\r\\n\\r\\nhi\\r\\n"
            smtp.sendmail("app@example.test", [to], text)
    api = netd_ns.url("api")
    with httpx.Client(headers=netd_ns.headers, timeout=10) as http:
        for i in range(sent):
            assert http.get(f"{{api}}item/{{i}}").status_code == 404
        with netd_ns.rule("api", match={{"path": "/ruled"}}, reply={{"status": 418}}) as rule:
            assert http.get(f"{{api}}ruled").status_code == 418
            assert rule.fired == 1
    host, port = netd_ns.address("dns", "udp")
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers, resolver.port = [host], port
    for i in range(sent):
        resolver.resolve(netd_ns.hostname("lab.test", f"h{{i}}"), "A")

    messages = netd_ns.messages("mail")
    assert sorted(m["subject"] for m in messages) == [f"{{number}}/{{i}}" for i in range(sent)]
    assert len(netd_ns.requests("api")) == sent + 1
    assert len(netd_ns.queries("dns")) == sent
    assert len(netd_ns.events("mail", "message.accepted")) == sent
    assert len(netd_ns.events("api", "rule.fired")) == 1
"""


def run_in_parallel(
    pytester: pytest.Pytester,
    start_netd: StartNetd,
    monkeypatch: pytest.MonkeyPatch,
    workers: int,
    per_worker: int,
) -> None:
    shared = start_netd(NAMESPACED_MAP)
    monkeypatch.setenv("NETD_SHARED_WORKDIR", str(shared.workdir))
    pytester.makeconftest(SHARED)
    pytester.makepyfile(test_parallel=TESTS.format(tests=workers * per_worker))
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-n", str(workers), timeout=600
    )
    result.assert_outcomes(passed=workers * per_worker)
    # Every test reset its namespace when it ended: nothing is left, of any.
    assert shared.messages("mail") == []
    assert shared.requests("api") == []
    assert shared.queries("dns") == []
    assert shared.events(type="message.accepted") == []


# Two workers already interleave; four more interpreters would be most of the cost on the
# two cores make test runs on (the slow test below takes four).
def test_two_workers_each_see_their_own_traffic(
    pytester: pytest.Pytester, start_netd: StartNetd, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_in_parallel(pytester, start_netd, monkeypatch, workers=2, per_worker=6)


@pytest.mark.slow
def test_four_workers_of_fifty_tests(
    pytester: pytest.Pytester, start_netd: StartNetd, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_in_parallel(pytester, start_netd, monkeypatch, workers=4, per_worker=50)
