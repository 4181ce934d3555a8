"""
Rules and scenarios in the real daemon: connection acts, the admin API, reloads.
"""

from __future__ import annotations

import json
import socket
import time

import pytest

from netd.testing import AdminError, NetdProcess
from tests.conftest import StartNetd

ECHO_MAP = """
scenarios: {signup: started}
services:
  echo:
    type: echo
    listen: ["tcp:0:interface=127.0.0.1"]
    idle_timeout: 2
    rules:
      - {id: first-cut, reset: true, times: 1}
"""


def echoes(netd: NetdProcess) -> bytes:
    with socket.create_connection(netd.address("echo"), timeout=5) as sock:
        sock.sendall(b"ping")
        return sock.recv(4)


def add_rule(netd: NetdProcess, service: str, rule: dict[str, object]) -> dict[str, object]:
    answer: dict[str, object] = netd.admin(
        "POST", f"/api/services/{service}/rules", json.dumps(rule).encode()
    )
    return answer


def test_reset_then_normal_service(start_netd: StartNetd) -> None:
    netd = start_netd(ECHO_MAP)
    with (
        pytest.raises(ConnectionResetError),
        socket.create_connection(netd.address("echo"), timeout=5) as sock,
    ):
        sock.sendall(b"ping")
        sock.recv(4)
    event = netd.wait_for("echo", "rule.fired", rule="first-cut")
    assert event["source"] == "map" and event["acts"] == ["reset"]
    assert echoes(netd) == b"ping"
    [rule] = netd.view("echo", "rules")
    assert rule["fired"] == 1 and rule["spent"] is True


def test_api_rule_stalls_until_deleted(start_netd: StartNetd) -> None:
    netd = start_netd(ECHO_MAP)
    netd.admin("DELETE", "/api/services/echo/rules")
    added = add_rule(netd, "echo", {"stall": True})
    assert added["id"] == "r1" and added["source"] == "api"
    with socket.create_connection(netd.address("echo"), timeout=5) as sock:
        sock.settimeout(0.5)
        sock.sendall(b"ping")
        with pytest.raises(TimeoutError):
            sock.recv(4)
        # The idle timeout (2 s) still ends a stalled connection.
        sock.settimeout(5)
        assert sock.recv(4) == b""
    assert netd.admin("DELETE", "/api/services/echo/rules/r1")["removed"]["id"] == "r1"
    assert echoes(netd) == b"ping"
    with pytest.raises(AdminError) as missing:
        netd.admin("DELETE", "/api/services/echo/rules/r1")
    assert missing.value.status == 404


def test_delay_and_close_after_bytes(start_netd: StartNetd) -> None:
    netd = start_netd(ECHO_MAP)
    netd.admin("DELETE", "/api/services/echo/rules")
    add_rule(netd, "echo", {"delay": 1, "close": 2, "times": 1})
    started = time.monotonic()
    with socket.create_connection(netd.address("echo"), timeout=5) as sock:
        sock.sendall(b"ping")
        got = b""
        while chunk := sock.recv(10):
            got += chunk
    assert got == b"pi"
    assert 0.9 <= time.monotonic() - started < 4


def test_bad_rules_are_refused_with_paths(start_netd: StartNetd) -> None:
    netd = start_netd(ECHO_MAP)
    with pytest.raises(AdminError) as refused:
        add_rule(netd, "echo", {"match": {"stage": "rcpt"}, "delay": "soon"})
    assert refused.value.status == 400
    paths = {e["path"] for e in json.loads(refused.value.body)["errors"]}
    assert paths == {"match.stage", "delay"}
    deep = "[" * 900 + "]" * 900
    with pytest.raises(AdminError) as nested:
        netd.admin("POST", "/api/services/echo/rules", f'{{"delay": {deep}}}'.encode())
    assert nested.value.status == 400 and "nested too deeply" in nested.value.body
    assert [r["id"] for r in netd.view("echo", "rules")] == ["first-cut"]
    netd.admin("DELETE", "/api/services/echo/rules/first-cut")
    assert echoes(netd) == b"ping"


def test_api_rules_survive_a_reload_and_map_rules_are_replaced(start_netd: StartNetd) -> None:
    netd = start_netd(ECHO_MAP)
    add_rule(netd, "echo", {"id": "mine", "delay": 0.1})
    netd.reload(ECHO_MAP.replace("first-cut", "second-cut"))
    assert [r["id"] for r in netd.view("echo", "rules")] == ["second-cut", "mine"]
    # A restarting change (a new idle_timeout) keeps them too.
    netd.reload(ECHO_MAP.replace("idle_timeout: 2", "idle_timeout: 3"))
    assert [r["id"] for r in netd.view("echo", "rules")] == ["first-cut", "mine"]


def test_scenarios_api(start_netd: StartNetd) -> None:
    netd = start_netd(ECHO_MAP)
    assert netd.admin("GET", "/api/scenarios") == {"scenarios": {"signup": "started"}}
    netd.admin("PUT", "/api/scenarios/signup", b'{"state": "created"}')
    netd.admin("PUT", "/api/scenarios/other", b'"half"')
    assert netd.admin("GET", "/api/scenarios/signup")["state"] == "created"
    assert netd.admin("GET", "/api/scenarios") == {
        "scenarios": {"other": "half", "signup": "created"}
    }
    netd.admin("POST", "/api/scenarios/reset")
    assert netd.admin("GET", "/api/scenarios") == {"scenarios": {"signup": "started"}}
    with pytest.raises(AdminError) as refused:
        netd.admin("PUT", "/api/scenarios/signup", b"{}")
    assert refused.value.status == 400
    # Names as rules take them: no rule could ever name these.
    for path, body in (("signup", b'{"state": "bad state!"}'), ("a%20b", b'"half"')):
        with pytest.raises(AdminError) as refused:
            netd.admin("PUT", f"/api/scenarios/{path}", body)
        assert refused.value.status == 400
    netd.admin("PUT", "/api/scenarios/signup@t42", b'"created"')  # a namespace's copy
    assert netd.admin("GET", "/api/scenarios/signup")["state"] == "started"


def test_udp_drop_at_the_connection_level(start_netd: StartNetd) -> None:
    netd = start_netd("""
services:
  echo:
    type: echo
    listen: ["udp:0:interface=127.0.0.1"]
    rules:
      - {drop: true, nth: 1}
""")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(1)
        sock.sendto(b"first", netd.address("echo", "udp"))
        with pytest.raises(TimeoutError):
            sock.recvfrom(100)
        sock.settimeout(5)
        sock.sendto(b"second", netd.address("echo", "udp"))
        assert sock.recvfrom(100)[0] == b"second"
    [rule] = netd.view("echo", "rules")
    assert rule["fired"] == 1 and rule["spent"]
