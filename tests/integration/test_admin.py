"""
The admin API and live reload, against the real daemon, with urllib and
prometheus-client's own text parser.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from netd.testing import NetdProcess
from tests.conftest import StartNetd, fixed_port

TOKEN = "s3cret-token"

BASE = f"""
admin:
  listen: ["tcp:0:interface=127.0.0.1"]
  token: {TOKEN}
services:
  echo:
    type: echo
    listen: ["tcp:0:interface=127.0.0.1", "udp:0:interface=127.0.0.1"]
  qotd:
    type: qotd
    listen: ["tcp:0:interface=127.0.0.1"]
    quotes: ["first"]
"""


def admin_url(netd: NetdProcess, path: str) -> str:
    entry = netd.ports["admin"]["listeners"][0]
    return f"http://{entry['host']}:{entry['port']}{path}"


def call(
    netd: NetdProcess,
    path: str,
    method: str = "GET",
    token: str | None = TOKEN,
    data: bytes | None = None,
    timeout: float = 10,
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(admin_url(netd, path), method=method, data=data)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def call_json(netd: NetdProcess, path: str, **kwargs: Any) -> tuple[int, Any]:
    status, headers, body = call(netd, path, **kwargs)
    assert headers["Content-Type"] == "application/json", body
    return status, json.loads(body)


@pytest.fixture
def netd(start_netd: StartNetd) -> NetdProcess:
    return start_netd(BASE)


def echo_once(address: tuple[str, int], payload: bytes = b"ping") -> bytes:
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(payload)
        return sock.recv(100)


def test_healthz_services_and_auth(netd: NetdProcess) -> None:
    assert call(netd, "/healthz", token=None)[::2] == (200, b"ok\n")
    echo_once(netd.address("echo"))
    status, body = call_json(netd, "/api/services")
    assert status == 200
    echo = body["services"]["echo"]
    assert echo["type"] == "echo" and echo["state"] == "running"
    assert echo["listeners"] == netd.listeners("echo")
    assert echo["counters"]["connections_total"] == 1
    assert echo["counters"]["bytes_in"] == 4 and echo["counters"]["bytes_out"] == 4

    status, headers, _ = call(netd, "/api/services", token=None)
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert call_json(netd, "/api/services", token="wrong")[0] == 401
    assert call_json(netd, "/api/nothing")[0] == 404
    assert call_json(netd, "/api/services/nosuch")[0] == 404
    status, headers, _ = call(netd, "/api/services", method="POST", data=b"")
    assert status == 405 and headers["Allow"] == "GET, HEAD"
    status, _, body = call(netd, "/api/reload", method="POST", data=b"x" * 100_000)
    assert status == 413


def test_metrics_parse_with_prometheus_client(netd: NetdProcess) -> None:
    echo_once(netd.address("echo"), b"12345")
    status, headers, body = call(netd, "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    samples = {
        (sample.name, sample.labels.get("service")): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }
    assert samples[("netd_connections_total", "echo")] == 1
    assert samples[("netd_received_bytes_total", "echo")] == 5
    assert samples[("netd_sent_bytes_total", "echo")] == 5
    assert samples[("netd_connections_active", "qotd")] == 0
    assert samples[("netd_ready", None)] == 1


def test_events_long_poll_wakes_on_matching_event(netd: NetdProcess) -> None:
    status, body = call_json(netd, "/api/events?service=echo")
    assert status == 200 and body["events"] == []
    since = body["last_id"]
    result: dict[str, Any] = {}

    def wait() -> None:
        result["reply"] = call_json(
            netd, f"/api/events?service=echo&type=connection.opened&since={since}&wait=20"
        )

    waiter = threading.Thread(target=wait)
    started = time.monotonic()
    waiter.start()
    echo_once(netd.address("qotd"))  # another service: must not wake the waiter
    echo_once(netd.address("echo"))
    waiter.join(15)
    assert not waiter.is_alive()
    assert time.monotonic() - started < 10
    status, body = result["reply"]
    assert status == 200
    [event] = body["events"]
    assert event["service"] == "echo" and event["type"] == "connection.opened"
    assert event["client"].startswith("127.0.0.1:")
    # With nothing new, wait=0.3 returns empty after about that long.
    status, body = call_json(netd, f"/api/events?service=echo&since={event['id'] + 99}&wait=0.3")
    assert body["events"] == []


def write_config(netd: NetdProcess, text: str) -> Path:
    path = netd.log_path.parent / "netd.yaml"
    path.write_text(text)
    return path


def test_reload_keeps_unchanged_connections_and_restarts_changed(netd: NetdProcess) -> None:
    echo_address = netd.address("echo")
    kept = socket.create_connection(echo_address, timeout=5)
    kept.sendall(b"before")
    assert kept.recv(100) == b"before"

    changed = BASE.replace('quotes: ["first"]', 'quotes: ["second"]') + (
        "  daytime:\n    type: daytime\n    listen: ['tcp:0:interface=127.0.0.1']\n"
    )
    write_config(netd, changed)
    status, body = call_json(netd, "/api/reload", method="POST", data=b"")
    assert status == 200, body
    assert body == {
        "started": ["daytime"],
        "restarted": ["qotd"],
        "stopped": [],
        "unchanged": ["echo"],
    }
    kept.sendall(b"after")
    assert kept.recv(100) == b"after"  # the open connection survived
    assert echo_once(echo_address) == b"ping"  # same listener, same port

    ports = json.loads((netd.log_path.parent / "ports.json").read_text())
    qotd = ports["services"]["qotd"]["listeners"][0]
    assert echo_once((qotd["host"], qotd["port"]), b"") == b"second\r\n"
    assert "daytime" in ports["services"]
    kept.close()


def test_invalid_reload_keeps_running_config(netd: NetdProcess) -> None:
    write_config(netd, BASE.replace("type: qotd", "type: qotd\n    colour: red"))
    status, body = call_json(netd, "/api/reload", method="POST", data=b"")
    assert status == 400
    [error] = body["errors"]
    assert error.endswith("services.qotd.colour: unknown key")
    assert echo_once(netd.address("qotd"), b"") == b"first\r\n"


def test_reload_that_cannot_bind_leaves_old_service(netd: NetdProcess) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    write_config(
        netd,
        BASE.replace('quotes: ["first"]', 'quotes: ["second"]').replace(
            'type: qotd\n    listen: ["tcp:0:interface=127.0.0.1"]',
            f'type: qotd\n    listen: ["tcp:{port}:interface=127.0.0.1"]',
        ),
    )
    status, body = call_json(netd, "/api/reload", method="POST", data=b"")
    assert status == 400
    assert "cannot listen on tcp:" in body["errors"][0]
    assert "Address already in use" in body["errors"][0]
    assert echo_once(netd.address("qotd"), b"") == b"first\r\n"
    taken.close()


def test_sighup_reloads(netd: NetdProcess) -> None:
    write_config(netd, BASE.replace('quotes: ["first"]', 'quotes: ["by signal"]'))
    _status, body = call_json(netd, "/api/events?service=netd&type=reload")
    since = body["last_id"]
    netd.signal(signal.SIGHUP)
    _, body = call_json(netd, f"/api/events?service=netd&type=reload&since={since}&wait=10")
    [event] = body["events"]
    assert event["restarted"] == ["qotd"]
    ports = json.loads((netd.log_path.parent / "ports.json").read_text())
    qotd = ports["services"]["qotd"]["listeners"][0]
    assert echo_once((qotd["host"], qotd["port"]), b"") == b"by signal\r\n"


def test_admin_burst_does_not_disturb_services(netd: NetdProcess) -> None:
    errors: list[BaseException] = []

    def hammer() -> None:
        try:
            for _ in range(250):
                assert call(netd, "/api/services")[0] == 200
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    echoes = [echo_once(netd.address("echo"), b"x%d" % i) for i in range(50)]
    for thread in threads:
        thread.join(60)
    assert not errors
    assert echoes == [b"x%d" % i for i in range(50)]


def test_non_loopback_admin_without_token_is_refused(start_netd: StartNetd) -> None:
    from netd.testing import StartFailed

    with pytest.raises(StartFailed) as failed:
        start_netd(
            'admin: {listen: ["tcp:0"]}\n'
            'services: {echo: {type: echo, listen: ["tcp:0:interface=127.0.0.1"]}}\n'
        )
    assert "admin listener 'tcp:0' is not loopback-only: set a 'token'" in failed.value.output


def test_reload_moves_a_fixed_port_to_another_interface(start_netd: StartNetd) -> None:
    port = fixed_port("")  # netd binds it on every interface first
    before = BASE.replace(
        'type: qotd\n    listen: ["tcp:0:interface=127.0.0.1"]',
        f'type: qotd\n    listen: ["tcp:{port}"]',
    )
    netd = start_netd(before)
    assert echo_once(("127.0.0.1", port), b"") == b"first\r\n"
    write_config(netd, before.replace(f'"tcp:{port}"', f'"tcp:{port}:interface=127.0.0.1"'))
    status, body = call_json(netd, "/api/reload", method="POST", data=b"")
    assert (status, body["restarted"]) == (200, ["qotd"]), body
    assert echo_once(("127.0.0.1", port), b"") == b"first\r\n"


def test_reload_whose_tls_files_are_missing_is_refused_cleanly(netd: NetdProcess) -> None:
    write_config(
        netd,
        "tls:\n  prod: {cert: missing.pem, key: missing.key}\n"
        + BASE.replace(
            'listen: ["tcp:0:interface=127.0.0.1"]\n    quotes',
            'listen: [{endpoint: "ssl:0:interface=127.0.0.1", tls: prod}]\n    quotes',
        ),
    )
    status, body = call_json(netd, "/api/reload", method="POST", data=b"")
    assert status == 400
    [error] = body["errors"]
    assert "tls.prod: cannot read certificate" in error and "missing.pem" in error
    assert echo_once(netd.address("qotd"), b"") == b"first\r\n"
    assert "Traceback" not in netd.output


def test_events_wait_must_be_a_finite_number(netd: NetdProcess) -> None:
    for bad in ("nan", "soon"):
        status, _ = call_json(netd, f"/api/events?wait={bad}")
        assert status == 400, bad
    assert call_json(netd, "/api/events?wait=0")[0] == 200


def test_a_rotated_token_closes_the_old_admin_apis_kept_alive_connections(
    netd: NetdProcess,
) -> None:
    entry = netd.ports["admin"]["listeners"][0]
    kept = http.client.HTTPConnection(entry["host"], entry["port"], timeout=10)
    old = {"Authorization": f"Bearer {TOKEN}"}
    kept.request("GET", "/api/services", headers=old)
    assert kept.getresponse().read() and kept.sock is not None
    write_config(netd, BASE.replace(TOKEN, "n3w-token"))
    kept.request("POST", "/api/reload", body=b"", headers=old)
    answer = kept.getresponse()
    assert answer.status == 200, answer.read()
    answer.read()
    # Answered, then closed: the old token is not honoured on it any more.
    assert kept.sock is None or kept.sock.recv(1) == b""
    kept.close()
    assert call(netd, "/api/services")[0] == 401
    assert call(netd, "/api/services", token="n3w-token")[0] == 200


def test_reloads_asked_during_a_reload_all_get_the_map_as_last_written(
    netd: NetdProcess,
) -> None:
    write_config(netd, BASE.replace('quotes: ["first"]', 'quotes: ["second"]'))
    answers: list[tuple[int, Any]] = []

    def reload() -> None:
        answers.append(call_json(netd, "/api/reload", method="POST", data=b""))

    threads = [threading.Thread(target=reload) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert [status for status, _ in answers] == [200] * 6, answers
    assert echo_once(netd.address("qotd"), b"") == b"second\r\n"


def test_a_udp_echo_sends_back_the_whole_datagram(netd: NetdProcess) -> None:
    payload = bytes(range(256)) * 200  # 51,200 bytes: over Twisted's 8 KiB default
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.sendto(payload, netd.address("echo", "udp"))
        assert sock.recv(65535) == payload


def test_json_nested_too_deeply_is_a_bad_request(netd: NetdProcess) -> None:
    status, body = call_json(netd, "/api/services/echo/rules", method="POST", data=b"[" * 5000)
    assert status == 400 and "nested too deeply" in body["error"]
    assert echo_once(netd.address("echo")) == b"ping"


def test_the_testing_handle_speaks_tls_to_a_tls_admin_listener(start_netd: StartNetd) -> None:
    netd = start_netd(
        """
tls:
  lab: {self_signed: [localhost, 127.0.0.1]}
admin:
  listen: [{endpoint: "ssl:0:interface=127.0.0.1", tls: lab}]
services:
  echo:
    type: echo
    listen: ["tcp:0:interface=127.0.0.1"]
"""
    )
    assert list(netd.services()) == ["echo"]


def test_pages_of_other_sites_change_nothing_and_a_rebound_name_reads_nothing(
    start_netd: StartNetd,
) -> None:
    """OWASP's CSRF defence by standard headers; DNS rebinding refused by Host."""
    netd = start_netd(BASE.replace(f"  token: {TOKEN}\n", ""))
    entry = netd.ports["admin"]["listeners"][0]
    base = f"http://127.0.0.1:{entry['port']}"
    rule = b'{"id": "r1", "close": true}'
    with httpx.Client(base_url=base, timeout=10) as client:
        # A form of another site posting JSON as text/plain, as a browser sends it.
        for headers in (
            {"Origin": "http://localhost:18932", "Content-Type": "text/plain"},
            {"Sec-Fetch-Site": "cross-site"},
            {"Sec-Fetch-Site": "same-site", "Origin": f"http://127.0.0.1:{entry['port'] + 1}"},
            {"Origin": "null"},
        ):
            refused = client.post("/api/services/echo/rules", content=rule, headers=headers)
            assert refused.status_code == 403, headers
            assert client.post("/api/reload", headers=headers).status_code == 403
        assert client.get("/api/services/echo/rules").json() == {"rules": []}
        # A name of the attacker's resolving to 127.0.0.1 reads nothing.
        assert client.get("/api/services", headers={"Host": "evil.example"}).status_code == 403
        # The dashboard's own page (same origin), and clients that are not browsers.
        same = {"Origin": base, "Sec-Fetch-Site": "same-origin"}
        assert client.post("/api/services/echo/rules", content=rule, headers=same).is_success
        assert client.get("/api/services", headers={"Host": "localhost"}).status_code == 200
    assert [r["id"] for r in netd.view("echo", "rules")] == ["r1"]


def test_a_toxiproxy_listener_answers_loopback_names_even_when_the_api_has_a_token(
    start_netd: StartNetd,
) -> None:
    netd = start_netd(
        BASE.replace(
            '  listen: ["tcp:0:interface=127.0.0.1"]\n  token:',
            '  listen: ["tcp:0:interface=127.0.0.1"]\n'
            '  toxiproxy: ["tcp:0:interface=127.0.0.1"]\n  token:',
        )
    )
    toxiproxy = netd.ports["admin"]["listeners"][1]
    assert toxiproxy["endpoint"] == "tcp:0:interface=127.0.0.1"
    url = f"http://127.0.0.1:{toxiproxy['port']}/proxies"
    # Toxiproxy's API asks for no token: a rebound name must not reach it.
    assert httpx.get(url, headers={"Host": "evil.example"}).status_code == 403
    for name in ("localhost.", "[::ffff:127.0.0.1]", "localhost", "app.localhost"):
        assert httpx.get(url, headers={"Host": f"{name}:1"}).status_code == 200, name
