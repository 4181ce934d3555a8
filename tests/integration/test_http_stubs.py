"""
Stub routes in the real daemon, asked by curl and httpx: matching on the whole
request, the closest route named in a 404, templated and sequenced answers,
routes added through the admin API and netd.testing's C{route}.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import time

import httpx
import pytest

from netd.testing import AdminError, NetdProcess
from tests.conftest import StartNetd

MAP = """
tls:
  lab: {self_signed: [localhost, 127.0.0.1]}
services:
  web:
    type: http
    listen: ["tcp:0:interface=127.0.0.1", {endpoint: "ssl:0:interface=127.0.0.1", tls: lab}]
    record: 50
    routes:
      - {path: /health, body: "ok\\n"}
      - id: create-order
        path: /orders
        method: POST
        match:
          headers: {Content-Type: {contains: json}}
          body: {json: {customer: {name: alice}}}
        template: true
        status: 201
        headers: {Location: "/orders/{{counter}}"}
        json: {id: "{{counter}}", customer: "{{request.json.customer.name}}", at: "{{now}}"}
      - id: big-order
        path: /orders
        method: POST
        priority: 1
        match: {body: {jsonpath: "$.items[?@.qty > 100]"}}
        status: 422
        json: {error: too many}
      - id: user
        path: {regex: "/users/(?P<name>[a-z]+)"}
        method: GET
        match: {query: {view: full}, cookies: {session: {regex: "^s-"}}}
        template: true
        body: "{{request.path.name}} seen by {{request.headers.User-Agent}}\\n"
      - id: form
        path: /login
        method: POST
        match: {body: {form: {user: alice}}}
        body: "welcome alice\\n"
      - id: flaky
        path: /flaky
        responses:
          - {status: 503, body: "busy\\n", headers: {Retry-After: "1"}}
          - {status: 200, json: {ok: true}}
      - {id: slow, path: /slow, delay: 0.5, body: "late\\n"}
"""


@pytest.fixture
def netd(start_netd: StartNetd) -> NetdProcess:
    return start_netd(MAP)


def curl(netd: NetdProcess, *args: str) -> tuple[int, str]:
    """curl's status and body for a request to the service's plain listener."""
    result = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}", *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=20,
    )
    body, _, status = result.stdout.rpartition("\n")
    return int(status), body


def test_curl_matches_on_method_headers_and_json(netd: NetdProcess) -> None:
    url = netd.url("web", tls=False, path="/orders")
    order = json.dumps({"customer": {"name": "alice", "vip": True}, "items": [{"qty": 1}]})
    status, body = curl(netd, "-H", "Content-Type: application/json", "-d", order, url)
    assert status == 201
    answer = json.loads(body)
    assert answer["id"] == 1 and answer["customer"] == "alice"
    big = json.dumps({"customer": {"name": "alice"}, "items": [{"qty": 500}]})
    assert curl(netd, "-H", "Content-Type: application/json", "-d", big, url) == (
        422,
        '{"error": "too many"}',
    )
    status, body = curl(netd, "-d", "user=alice&remember=1", netd.url("web", False, "/login"))
    assert (status, body) == (200, "welcome alice\n")
    # Not JSON: the closest route and why are in the 404.
    status, body = curl(netd, "-H", "Content-Type: text/plain", "-d", order, url)
    assert status == 404
    assert "closest route: create-order (/orders)" in body
    assert 'header Content-Type: expected containing "json", got "text/plain"' in body


def test_httpx_over_http1_and_h2(netd: NetdProcess) -> None:
    with httpx.Client(timeout=10) as client:
        answer = client.get(
            netd.url("web", tls=False, path="/users/ann?view=full"),
            headers={"User-Agent": "httpx-test", "Cookie": "session=s-1"},
        )
        assert (answer.status_code, answer.text) == (200, "ann seen by httpx-test\n")
        missed = client.get(netd.url("web", tls=False, path="/users/ann?view=short"))
        assert missed.status_code == 404
        assert 'query view: expected "full", got "short"' in missed.text
        assert "cookie session: expected matching /^s-/, got nothing" in missed.text
    verify = ssl.create_default_context(cafile=str(netd.ca_file("lab")))
    with httpx.Client(http2=False, verify=verify, timeout=10) as client:
        order = {"customer": {"name": "alice"}}
        made = client.post(netd.url("web", tls=True, path="/orders"), json=order)
        assert made.status_code == 201 and made.headers["location"] == "/orders/1"


def test_h2_bodies_are_matched_too(netd: NetdProcess) -> None:
    verify = ssl.create_default_context(cafile=str(netd.ca_file("lab")))
    with httpx.Client(http2=True, verify=verify, timeout=10) as client:
        made = client.post(
            netd.url("web", tls=True, path="/orders"), json={"customer": {"name": "alice"}}
        )
    assert made.http_version == "HTTP/2"
    assert made.status_code == 201 and made.json()["customer"] == "alice"


def test_sequences_delays_and_the_record(netd: NetdProcess) -> None:
    with httpx.Client(timeout=10) as client:
        flaky = [client.get(netd.url("web", False, "/flaky")) for _ in range(3)]
        assert [a.status_code for a in flaky] == [503, 200, 200]
        assert flaky[0].headers["retry-after"] == "1" and flaky[2].json() == {"ok": True}
        started = time.monotonic()
        assert client.get(netd.url("web", False, "/slow")).text == "late\n"
        assert time.monotonic() - started >= 0.45
        assert client.get(netd.url("web", False, "/nowhere")).status_code == 404
    [unmatched] = netd.requests("web", unmatched=True)
    assert unmatched["path"] == "/nowhere" and unmatched["near_miss"]["route"]
    assert {r["route"] for r in netd.requests("web")} >= {"flaky", "slow"}


def test_routes_at_run_time(netd: NetdProcess) -> None:
    url = netd.url("web", False, "/health")
    with httpx.Client(timeout=10) as client:
        with netd.route("web", path="/health", method="GET", status=503, body="down\n") as added:
            assert added["source"] == "api"
            assert (client.get(url).status_code, client.get(url).text) == (503, "down\n")
            ids = [r["id"] for r in netd.view("web", "routes")]
            assert ids[0] == "big-order"  # priority 1
            assert ids.index(added["id"]) < ids.index("routes[0]")  # before the map's
        assert client.get(url).text == "ok\n"
        with pytest.raises(AdminError) as refused:
            netd.admin(
                "POST",
                "/api/services/web/routes",
                json.dumps(
                    {"path": "/x", "template": True, "body": "{{open('/etc/passwd')}}"}
                ).encode(),
            )
        assert refused.value.status == 400 and '"path": "route.body"' in refused.value.body
        with pytest.raises(AdminError) as in_map:
            netd.admin("DELETE", "/api/services/web/routes/create-order")
        assert in_map.value.status == 403
        assert client.get(url).text == "ok\n"  # still serving
