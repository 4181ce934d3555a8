"""
http rules in the real daemon, seen by curl and openssl s_client: a
canned failure once, a scenario that moves, a throttled body that takes as
long as it should, a reset.
"""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path
from typing import Any

from netd.testing import NetdProcess
from tests.conftest import StartNetd

SIZE = 60000
RATE = 20000


def web_map(site: Path) -> str:
    return f"""
scenarios: {{signup: started}}
tls:
  lab: {{self_signed: [localhost, 127.0.0.1]}}
services:
  web:
    type: http
    listen: ["tcp:0:interface=127.0.0.1"]
    root: {site}
    routes:
      - {{path: /v1/users, body: "usual\\n"}}
    rules:
      - {{match: {{method: POST, path: /v1/users}}, reply: {{status: 503}}, times: 1}}
      - {{match: {{path: /v1/users}}, scenario: signup, state: started, next_state: created,
         reply: {{status: 201, body: '{{"id": 7}}', headers: {{Content-Type: application/json}}}}}}
      - {{match: {{path: "/slow/*"}}, throttle: {RATE}}}
      - {{match: {{header: {{X-Fault: cut}}}}, close: 10}}
  secure:
    type: http
    listen: [{{endpoint: "ssl:0:interface=127.0.0.1", tls: lab}}]
    routes:
      - {{path: /, body: "fine\\n"}}
"""


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "20", *args], capture_output=True, text=True, timeout=30
    )


def started(start_netd: StartNetd, tmp_path: Path) -> NetdProcess:
    site = tmp_path / "site"
    (site / "slow").mkdir(parents=True)
    (site / "slow" / "big.bin").write_bytes(b"z" * SIZE)
    return start_netd(web_map(site))


def test_503_once_then_201_and_the_scenario_moves(start_netd: StartNetd, tmp_path: Path) -> None:
    netd = started(start_netd, tmp_path)
    users = netd.url("web", path="/v1/users")
    first = curl("-X", "POST", "-o", "/dev/null", "-w", "%{http_code}", users)
    assert first.stdout == "503"
    second = curl("-X", "POST", "-w", " %{http_code}", users)
    assert second.stdout == '{"id": 7} 201'
    assert netd.admin("GET", "/api/scenarios")["scenarios"] == {"signup": "created"}
    # Its state moved on: the usual answer again.
    assert curl(users).stdout == "usual\n"
    fired = netd.wait_for_count("web", "rule.fired", 2)
    assert [e["rule"] for e in fired] == ["m1", "m2"]
    assert fired[1]["matched"] == {"method": "POST", "path": "/v1/users", "host": "127.0.0.1"}
    assert fired[1]["scenario"] == "signup" and fired[1]["state"] == "created"
    netd.admin("POST", "/api/scenarios/reset")
    assert curl(users).stdout == '{"id": 7}'


def test_throttled_body_takes_as_long_as_it_should(start_netd: StartNetd, tmp_path: Path) -> None:
    netd = started(start_netd, tmp_path)
    done = curl(
        "-o",
        "/dev/null",
        "-w",
        "%{size_download} %{time_total}",
        netd.url("web", path="/slow/big.bin"),
    )
    size, seconds = done.stdout.split()
    assert int(size) == SIZE
    expected = SIZE / RATE
    assert expected * 0.8 <= float(seconds) <= expected * 1.2, seconds
    # The next response on another path is not throttled.
    quick = curl("-o", "/dev/null", "-w", "%{time_total}", netd.url("web", path="/v1/users"))
    assert float(quick.stdout) < 0.5


def test_a_throttled_reply_the_connection_ends_with_arrives_whole(
    start_netd: StartNetd, tmp_path: Path
) -> None:
    """Its last bytes, held for the end of the turn, were lost with the close."""
    netd = started(start_netd, tmp_path)
    body = bytes(range(256)) * 40
    (tmp_path / "site" / "slow" / "last.bin").write_bytes(body)
    url = netd.url("web", path="/slow/last.bin")
    got = tmp_path / "got.bin"
    for closing in (["-H", "Connection: close"], ["--http1.0"]):
        done = curl(*closing, "-o", str(got), url)
        assert done.returncode == 0, (closing, done.stderr)
        assert got.read_bytes() == body, closing


def test_a_partial_answer_then_deleting_the_rule(start_netd: StartNetd, tmp_path: Path) -> None:
    netd = started(start_netd, tmp_path)
    url = netd.url("web", path="/missing")
    with socket.create_connection(netd.address("web"), timeout=5) as sock:
        sock.sendall(b"GET /missing HTTP/1.1\r\nHost: a\r\nX-Fault: cut\r\n\r\n")
        got = b""
        while chunk := sock.recv(100):
            got += chunk
    assert got == b"HTTP/1.1 4"  # ten bytes, then FIN
    assert curl("-H", "X-Fault: cut", url).returncode != 0
    netd.admin("DELETE", "/api/services/web/rules/m4")
    whole = curl("-H", "X-Fault: cut", "-w", "%{http_code}", "-o", "/dev/null", url)
    assert (whole.returncode, whole.stdout) == (0, "404")


def test_openssl_s_client_sees_the_reset(start_netd: StartNetd, tmp_path: Path) -> None:
    netd = started(start_netd, tmp_path)
    added: dict[str, Any] = netd.admin(
        "POST", "/api/services/secure/rules", json.dumps({"reset": True}).encode()
    )
    host, port = netd.address("secure", tls=True)
    seen = subprocess.run(
        ["openssl", "s_client", "-connect", f"{host}:{port}"],
        input="",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "errno=104" in seen.stderr + seen.stdout or "reset" in (seen.stderr + seen.stdout)
    netd.admin("DELETE", f"/api/services/secure/rules/{added['id']}")
    fine = curl("--cacert", str(netd.ca_file("lab")), netd.url("secure", path="/"))
    assert fine.stdout == "fine\n"


def test_rules_answer_http2_streams(start_netd: StartNetd, tmp_path: Path) -> None:
    netd = started(start_netd, tmp_path)
    netd.rule("secure", match={"path": "/teapot"}, reply={"status": 418, "body": "short\n"})
    ca = str(netd.ca_file("lab"))
    url = netd.url("secure", path="/teapot")
    answer = curl("--http2", "--cacert", ca, "-w", " %{http_version} %{http_code}", url)
    assert answer.stdout == "short\n 2 418"
    usual = curl("--http2", "--cacert", ca, netd.url("secure", path="/"))
    assert usual.stdout == "fine\n"


def test_a_throttled_http2_stream(start_netd: StartNetd, tmp_path: Path) -> None:
    netd = started(start_netd, tmp_path)
    netd.rule("secure", match={"path": "/"}, throttle=200)
    ca = str(netd.ca_file("lab"))
    url = netd.url("secure", path="/")
    answer = curl("--http2", "--cacert", ca, "-w", " %{http_version} %{time_total}", url)
    body, version, seconds = answer.stdout.split()
    assert (body, version) == ("fine", "2")
    assert float(seconds) >= 0.3  # its frames (headers, data, settings) at 200 bytes/s


def pipelined(netd: NetdProcess, *targets: str) -> bytes:
    """What the connection answers to GETs of C{targets} sent at once, until its FIN."""
    with socket.create_connection(netd.address("web"), timeout=5) as sock:
        sock.sendall(b"".join(b"GET %s HTTP/1.1\r\nHost: a\r\n\r\n" % t.encode() for t in targets))
        sock.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
    return got


def test_a_reply_with_close_is_the_connections_last(start_netd: StartNetd, tmp_path: Path) -> None:
    netd = started(start_netd, tmp_path)
    with netd.rule("web", match={"path": "/busy"}, reply={"status": 503}, close=True):
        got = pipelined(netd, "/busy", "/v1/users")
    assert got.startswith(b"HTTP/1.1 503 ")
    assert got.endswith(b"Content-Length: 0\r\nConnection: close\r\n\r\n")
    assert got.count(b"HTTP/1.1") == 1


def test_close_n_ends_with_the_reply_it_matched(start_netd: StartNetd, tmp_path: Path) -> None:
    netd = started(start_netd, tmp_path)
    (tmp_path / "site" / "whole.bin").write_bytes(b"w" * 20000)
    with netd.rule("web", match={"path": "/missing"}, close=5000):
        got = pipelined(netd, "/missing", "/whole.bin")
    assert got.startswith(b"HTTP/1.1 404 ")
    assert got.endswith(b"Connection: keep-alive\r\n\r\n" + b"w" * 20000)
