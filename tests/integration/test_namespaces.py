"""
Namespaces in the real daemon: one daemon, many tests, each seeing its own
mail, requests, queries, rules and events (netd.namespaces).
"""

from __future__ import annotations

import smtplib
import socket

import dns.resolver
import httpx
import pytest

from netd.pytest_plugin import NAMESPACED_MAP
from netd.testing import AdminError, Namespace, NetdProcess
from tests.conftest import StartNetd


def send_mail(ns: Namespace, to: str, subject: str = "hello") -> None:
    with smtplib.SMTP(*ns.address("mail"), timeout=10) as smtp:
        smtp.sendmail("app@example.test", [to], f"Subject: {subject}\r\n\r\nhi\r\n")


def resolve(ns: Namespace, name: str) -> list[str]:
    host, port = ns.address("dns", "udp")
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers, resolver.port = [host], port
    return [a.address for a in resolver.resolve(name, "A")]


@pytest.fixture
def shared(start_netd: StartNetd) -> NetdProcess:
    return start_netd(NAMESPACED_MAP)


def test_each_namespace_sees_only_its_mail_requests_and_queries(shared: NetdProcess) -> None:
    red, blue = shared.namespace("red"), shared.namespace("blue")
    send_mail(red, red.email("bob@example.test"))
    send_mail(blue, "ann@blue.mail.test")
    send_mail(blue, blue.email("carl@example.test"))
    send_mail(red, "untagged@example.test")
    httpx.get(shared.url("api", path="/a"), headers=red.headers)
    httpx.get(shared.url("api", path="/b"), headers={"Host": "blue.api.test"})
    assert resolve(red, red.hostname("lab.test", "www")) == ["127.0.0.1"]

    assert [m["to"] for m in red.messages("mail")] == [["bob+red@example.test"]]
    assert sorted(m["to"][0] for m in blue.messages("mail")) == [
        "ann@blue.mail.test",
        "carl+blue@example.test",
    ]
    assert len(shared.messages("mail")) == 4  # unscoped: every message
    assert [r["path"] for r in red.requests("api")] == ["/a"]
    assert [r["path"] for r in blue.requests("api")] == ["/b"]
    assert [q["name"] for q in red.queries("dns")] == ["www.red.lab.test."]
    assert blue.queries("dns") == []
    assert red.wait_for_message("mail", to="bob+red@example.test")["namespace"] == "red"
    with pytest.raises(TimeoutError):
        blue.wait_for_message("mail", to="bob+red@example.test", timeout=0.2)
    assert shared.namespace("RED").name == "red"
    with pytest.raises(ValueError):
        shared.namespace("a/b")
    accepted = red.wait_for("mail", "message.accepted")
    assert accepted["recipients"] == ["bob+red@example.test"]
    assert {e["namespace"] for e in blue.events()} == {"blue"}
    assert len(blue.events("mail", "message.accepted")) == 2


def test_a_scoped_rule_fires_only_in_its_namespace(shared: NetdProcess) -> None:
    red, blue = shared.namespace("red"), shared.namespace("blue")
    with red.rule("mail", match={"stage": "rcpt"}, reply="451 4.3.0 red only") as rule:
        with smtplib.SMTP(*shared.address("mail"), timeout=10) as smtp:
            smtp.ehlo("client.test")
            smtp.mail("app@example.test")
            assert smtp.rcpt(blue.email("bob@example.test"))[0] == 250
            assert smtp.rcpt("someone@example.test")[0] == 250
            assert smtp.rcpt(red.email("bob@example.test"))[0] == 451
        assert rule.fired == 1
    assert red.wait_for("mail", "rule.fired")["namespace"] == "red"
    assert blue.events("mail", "rule.fired") == []


def test_a_namespace_rule_without_a_match_answers_its_events(shared: NetdProcess) -> None:
    red = shared.namespace("red")
    red.rule("api", reply={"status": 503})
    assert httpx.get(shared.url("api"), headers=red.headers).status_code == 503
    assert httpx.get(shared.url("api")).status_code == 404
    assert httpx.get(shared.url("api"), headers={"X-Netd-Namespace": "blue"}).status_code == 404


def test_resetting_one_namespace_leaves_the_others(shared: NetdProcess) -> None:
    red, blue = shared.namespace("red"), shared.namespace("blue")
    for ns in (red, blue):
        send_mail(ns, ns.email("bob@example.test"))
        httpx.get(shared.url("api"), headers=ns.headers)
        resolve(ns, ns.hostname("lab.test"))
        ns.rule("mail", match={"stage": "rcpt", "rcpt": "nobody@*"}, reply="550 no")
    answer = red.reset()
    assert answer["services"]["mail"] == {"messages": {"deleted": 1}, "rules": {"removed": 1}}
    assert answer["events"] >= 3
    assert red.messages("mail") == red.requests("api") == red.queries("dns") == []
    assert red.events() == []
    assert len(blue.messages("mail")) == len(blue.requests("api")) == 1
    assert len(blue.queries("dns")) == 1
    assert [r["namespace"] for r in shared.view("mail", "rules")] == ["blue"]
    assert blue.events("mail", "message.accepted")


def test_the_client_source_reads_a_loopback_address(start_netd: StartNetd) -> None:
    netd = start_netd(
        """
services:
  web:
    type: http
    listen: ["tcp:0:interface=127.0.0.1"]
    record: 100
    namespace_from: [header, client]
"""
    )
    port = netd.address("web")[1]
    with socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.42", 0)) as sock:
        sock.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        assert sock.recv(12).startswith(b"HTTP/1.1 404")
    httpx.get(netd.url("web", path="/tagged"), headers={"X-Netd-Namespace": "t7"})
    assert [r["path"] for r in netd.namespace("t7").requests("web")] == ["/tagged"]
    assert [r["path"] for r in netd.namespace("42").requests("web")] == ["/x"]
    assert netd.requests("web", namespace="1") == []


def test_bad_namespace_input_is_refused_and_the_daemon_serves_on(shared: NetdProcess) -> None:
    with smtplib.SMTP(*shared.address("mail"), timeout=10) as smtp:
        # A tag that is no namespace key: the mail is kept, in no namespace.
        smtp.sendmail("a@example.test", ["bob+bad/tag@example.test"], "Subject: x\r\n\r\nx\r\n")
    assert [m.get("namespace") for m in shared.messages("mail")] == [None]
    too_long = "x" * 70
    httpx.get(shared.url("api"), headers={"X-Netd-Namespace": too_long})
    assert "namespace" not in shared.requests("api")[0]
    with pytest.raises(AdminError) as refused:
        shared.admin("DELETE", "/api/namespaces/no/such")
    assert refused.value.status == 404
    with pytest.raises(AdminError) as bad:
        shared.forget_namespace(too_long)
    assert bad.value.status == 400
    assert shared.namespace("red").reset()["namespace"] == "red"


def test_a_scoped_scenario_moves_in_its_namespace_only(shared: NetdProcess) -> None:
    red, blue = shared.namespace("red"), shared.namespace("blue")
    step = {"scenario": "signup", "state": "started", "next_state": "created"}
    for ns in (red, blue):
        ns.rule("api", match={"path": "/users"}, reply={"status": 201}, **step)
        ns.rule("api", match={"path": "/users"}, scenario="signup", state="created", reply=409)

    def post(ns: Namespace) -> int:
        return httpx.post(shared.url("api", path="/users"), headers=ns.headers).status_code

    assert [post(red), post(red)] == [201, 409]
    assert blue.scenario("signup") == "started"
    assert post(blue) == 201
    assert red.reset()["scenarios"] == 1
    assert (red.scenario("signup"), blue.scenario("signup")) == ("started", "created")
    assert shared.scenario("signup") == "started"  # the daemon's own copy never moved


def test_a_namespace_is_forgotten_in_every_worker(start_netd: StartNetd) -> None:
    netd = start_netd(
        """
services:
  dns:
    type: dns
    workers: 2
    listen: ["udp:0:interface=127.0.0.1"]
    query_log: true
    records: {"*.lab.test": {A: [127.0.0.1]}}
    namespace_from: [{suffix: lab.test}]
"""
    )
    netd.wait_for_count("dns", "worker.started", 2)
    red, blue = netd.namespace("red"), netd.namespace("blue")
    # Each query on a new socket: the kernel spreads them over both workers.
    for number in range(20):
        for ns in (red, blue):
            resolve(ns, ns.hostname("lab.test", f"h{number}"))
    assert len(red.queries("dns")) == len(blue.queries("dns")) == 20
    assert red.reset()["services"]["dns"]["queries"] == {"cleared": 20}
    assert red.queries("dns") == []
    assert len(blue.queries("dns")) == 20


def test_clearing_a_view_for_one_namespace_keeps_the_others(shared: NetdProcess) -> None:
    red, blue = shared.namespace("red"), shared.namespace("blue")
    for ns in (red, blue):
        httpx.get(shared.url("api", path=f"/{ns.name}"), headers=ns.headers)
    httpx.get(shared.url("api", path="/green"), headers={"X-Netd-Namespace": "Green"})
    # A query names a namespace as a header does: in any case.
    assert [r["path"] for r in shared.view("api", "requests", namespace="GREEN")] == ["/green"]
    assert [e["namespace"] for e in shared.events(namespace="GREEN")] == ["green"]
    shared.admin("DELETE", "/api/services/api/requests?namespace=Red")
    assert red.requests("api") == []
    assert [r["path"] for r in blue.requests("api")] == ["/blue"]
    assert len(shared.requests("api")) == 2
    with pytest.raises(AdminError) as bad:
        shared.admin("GET", "/api/services/api/requests?namespace=a/b")
    assert bad.value.status == 400
    assert [r["path"] for r in blue.requests("api")] == ["/blue"]
