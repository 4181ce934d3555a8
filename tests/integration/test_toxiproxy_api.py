"""
Toxiproxy's API on netd's admin listener: Toxiproxy's own Python client
(toxiproxy-python) and the raw HTTP calls of Toxiproxy's README, unchanged.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from toxiproxy import Toxiproxy
from toxiproxy.api import APIConsumer

from netd.testing import AdminError, NetdProcess
from tests.clients import toxiproxy_client
from tests.conftest import StartNetd, unused_port


@pytest.fixture
def netd(start_netd: StartNetd) -> NetdProcess:
    return start_netd(
        """
services:
  echo: {type: echo, listen: ["tcp:0:interface=127.0.0.1"]}
  mapped:
    type: proxy
    listen: ["tcp:0:interface=127.0.0.1"]
    upstream: 127.0.0.1:1
"""
    )


@pytest.fixture
def toxiproxy(netd: NetdProcess) -> Iterator[Toxiproxy]:
    with toxiproxy_client(netd) as server:
        yield server


def _call(netd: NetdProcess, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    try:
        return 200, netd.admin(method, path, data)
    except AdminError as e:
        return e.status, json.loads(e.body) if e.body else None


def _round_trip(address: tuple[str, int]) -> tuple[bytes, float]:
    with socket.create_connection(address, timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(b"ping")
        return sock.recv(100), time.monotonic() - started


def _address(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host, int(port)


def test_the_python_client_makes_a_proxy_and_a_toxic_that_acts(
    netd: NetdProcess, toxiproxy: Toxiproxy
) -> None:
    echo = netd.address("echo")
    proxy = toxiproxy.create(upstream=f"127.0.0.1:{echo[1]}", name="echo_px")
    assert proxy.enabled and proxy.listen.startswith("127.0.0.1:")
    assert netd.wait_for("echo_px", "proxy.created")["listen"] == proxy.listen
    address = _address(proxy.listen)
    assert _round_trip(address)[0] == b"ping"

    proxy.add_toxic(type="latency", attributes={"latency": 300})
    assert set(proxy.toxics()) == {"latency_downstream"}
    answer, elapsed = _round_trip(address)
    assert answer == b"ping" and 0.24 <= elapsed <= 0.5, elapsed
    netd.wait_for("echo_px", "toxic.fired", toxic="latency_downstream")

    # Down: not listening, as Toxiproxy's.
    with proxy.down(), pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, 5).close()
    proxy.destroy_toxic("latency_downstream")
    assert _round_trip(address)[1] < 0.2
    # A run-time proxy is a service like the map's: listed, counted, in /metrics.
    assert netd.services()["echo_px"]["counters"]["connections_total"] >= 3
    assert b'netd_toxics_fired_total{service="echo_px",type="proxy"}' in netd.admin(
        "GET", "/metrics"
    )
    assert set(toxiproxy.proxies()) == {"echo_px", "mapped"}
    proxy.destroy()
    assert set(toxiproxy.proxies()) == {"mapped"}
    netd.wait_for("echo_px", "proxy.deleted")
    with pytest.raises(OSError):
        _round_trip(address)


def test_a_run_time_proxy_outlives_a_reload(netd: NetdProcess, toxiproxy: Toxiproxy) -> None:
    proxy = toxiproxy.create(upstream=f"127.0.0.1:{netd.address('echo')[1]}", name="kept")
    assert "kept" in netd.reload()["unchanged"]
    assert _round_trip(_address(proxy.listen))[0] == b"ping"


def test_status_codes_and_shapes_are_toxiproxys(netd: NetdProcess) -> None:
    echo = f"127.0.0.1:{netd.address('echo')[1]}"
    assert _call(netd, "GET", "/version")[1]["version"].startswith("netd-")
    status, made = _call(netd, "POST", "/proxies", {"name": "db", "upstream": echo})
    assert status == 200  # netd.testing's admin() reads 201 as a success
    assert set(made) == {"name", "listen", "upstream", "enabled", "toxics"}
    assert _call(netd, "POST", "/proxies", {"name": "db", "upstream": echo}) == (
        409,
        {"error": "proxy already exists", "status": 409},
    )
    assert _call(netd, "POST", "/proxies", {"name": "x"})[0] == 400
    assert _call(netd, "GET", "/proxies/nope") == (
        404,
        {"error": "proxy not found", "status": 404},
    )
    toxic = {"type": "latency", "stream": "upstream", "attributes": {"latency": 10}}
    status, created = _call(netd, "POST", "/proxies/db/toxics", toxic)
    assert status == 200 and created["name"] == "latency_upstream"
    assert _call(netd, "POST", "/proxies/db/toxics", toxic)[0] == 409
    assert _call(netd, "POST", "/proxies/db/toxics", {"type": "lag"}) == (
        400,
        {"error": "invalid toxic type", "status": 400},
    )
    assert _call(netd, "POST", "/proxies/db/toxics", b"{".decode())[0] == 400
    status, updated = _call(
        netd, "POST", "/proxies/db/toxics/latency_upstream", {"attributes": {"latency": 20}}
    )
    assert updated["attributes"] == {"latency": 20, "jitter": 0}
    assert _call(netd, "GET", "/proxies/db/toxics/nope")[0] == 404
    assert _call(netd, "POST", "/proxies/db", {"enabled": False})[1]["enabled"] is False
    assert _call(netd, "POST", "/reset")[0] == 200  # 204: no body
    shown = _call(netd, "GET", "/proxies/db")[1]
    assert shown["enabled"] is True and shown["toxics"] == []
    # The map's proxy may change, not go.
    assert _call(netd, "DELETE", "/proxies/mapped")[0] == 409
    status, populated = _call(
        netd,
        "POST",
        "/populate",
        [{"name": "db", "upstream": echo}, {"name": "cache", "upstream": echo}],
    )
    assert [p["name"] for p in populated["proxies"]] == ["db", "cache"]
    assert _call(netd, "POST", "/populate", [{"upstream": echo}]) == (
        400,
        {"error": "missing required field: name at proxy 1", "status": 400},
    )
    assert _call(netd, "DELETE", "/proxies/db")[0] == 200  # 204
    assert _call(netd, "GET", "/proxies/db")[0] == 404
    # Still serving after all that.
    assert netd.admin("GET", "/healthz") == b"ok\n"


@pytest.mark.parametrize("fixed", [False, True], ids=["port-0", "fixed-port"])
def test_down_refuses_connections_cuts_open_ones_and_up_listens_on_the_same_port(
    netd: NetdProcess, toxiproxy: Toxiproxy, fixed: bool
) -> None:
    listen = f"127.0.0.1:{unused_port() if fixed else 0}"
    proxy = toxiproxy.create(
        upstream=f"127.0.0.1:{netd.address('echo')[1]}", name="flappy", listen=listen
    )
    address = _address(proxy.listen)
    with socket.create_connection(address, timeout=10) as open_one:
        open_one.sendall(b"ping")
        assert open_one.recv(100) == b"ping"
        for _ in range(3):  # down and up again, more than once
            proxy.disable()
            netd.wait_for("flappy", "proxy.disabled")
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(address, timeout=5).close()
            # The port stays ours while down: nobody else may bind it.
            with socket.socket() as squatter, pytest.raises(OSError):
                squatter.bind(address)
            assert _call(netd, "GET", "/proxies/flappy")[1]["listen"] == proxy.listen
            proxy.enable()
            assert _round_trip(address)[0] == b"ping"
        # The connection open before the first down was cut (aborted: a reset).
        with pytest.raises(ConnectionResetError):
            open_one.recv(100)
    assert netd.services()["flappy"]["listeners"][0]["port"] == address[1]
    assert netd.admin("GET", "/healthz") == b"ok\n"


def test_a_proxy_made_down_never_accepts_until_enabled(netd: NetdProcess) -> None:
    echo = f"127.0.0.1:{netd.address('echo')[1]}"
    status, made = _call(
        netd, "POST", "/proxies", {"name": "later", "upstream": echo, "enabled": False}
    )
    assert status == 200 and made["enabled"] is False
    address = _address(made["listen"])
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=5).close()
    _call(netd, "POST", "/proxies/later", {"enabled": True})
    assert _round_trip(address)[0] == b"ping"
    # Deleted while down: its port is let go like any other.
    _call(netd, "POST", "/proxies/later", {"enabled": False})
    assert _call(netd, "DELETE", "/proxies/later")[0] == 200  # 204
    netd.wait_for("later", "proxy.deleted")
    with socket.socket() as successor:
        successor.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        successor.bind(address)
        successor.listen()
    assert netd.admin("GET", "/healthz") == b"ok\n"


def test_a_proxy_restarted_by_a_reload_while_down_accepts_again(netd: NetdProcess) -> None:
    address = netd.address("mapped")
    _call(netd, "POST", "/proxies/mapped", {"enabled": False})
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=5).close()
    text = netd.config_path.read_text()  # type: ignore[union-attr]
    moved = text.replace("upstream: 127.0.0.1:1", f"upstream: 127.0.0.1:{netd.address('echo')[1]}")
    assert moved != text
    # The successor takes the same socket over, and starts up, as a new map's proxy does.
    assert "mapped" in netd.reload(moved)["restarted"]
    assert netd.address("mapped") == address
    assert _round_trip(address)[0] == b"ping"
    assert _call(netd, "GET", "/proxies/mapped")[1]["enabled"] is True


def _toxic_names(netd: NetdProcess, proxy: str) -> list[tuple[str, str]]:
    return [(t["name"], t["type"]) for t in _call(netd, "GET", f"/proxies/{proxy}/toxics")[1]]


def test_the_apis_toxics_outlive_a_reload_or_a_move_that_restarts_their_proxy(
    netd: NetdProcess,
) -> None:
    for name in ("kept", "shadowed"):
        _call(netd, "POST", "/proxies/mapped/toxics", {"name": name, "type": "latency"})
    text = netd.config_path.read_text()  # type: ignore[union-attr]
    edited = text.replace(
        "upstream: 127.0.0.1:1",
        "upstream: 127.0.0.1:2\n    toxics: [{name: shadowed, type: bandwidth}]",
    )
    assert "mapped" in netd.reload(edited)["restarted"]
    # The map's toxics first; of the API's, those the map has not named since.
    assert _toxic_names(netd, "mapped") == [("shadowed", "bandwidth"), ("kept", "latency")]
    # A run-time proxy moved to another port is restarted too, its toxics with it...
    echo = f"127.0.0.1:{netd.address('echo')[1]}"
    _call(netd, "POST", "/proxies", {"name": "mover", "upstream": echo})
    _call(netd, "POST", "/proxies/mover/toxics", {"name": "kept", "type": "latency"})
    status, moved = _call(netd, "POST", "/proxies/mover", {"listen": "127.0.0.1:0"})
    assert status == 200 and moved["toxics"][0]["name"] == "kept"
    assert _toxic_names(netd, "mover") == [("kept", "latency")]
    # ...while one deleted and made again under its name starts with none, as Toxiproxy's.
    assert _call(netd, "DELETE", "/proxies/mover")[0] == 200  # 204
    _call(netd, "POST", "/proxies", {"name": "mover", "upstream": echo})
    assert _toxic_names(netd, "mover") == []


def test_odd_bodies_are_refused_and_a_move_to_a_busy_port_keeps_the_proxy(
    netd: NetdProcess,
) -> None:
    echo = f"127.0.0.1:{netd.address('echo')[1]}"
    assert _call(netd, "POST", "/populate", [{"name": ["a"], "upstream": echo}])[0] == 400
    with pytest.raises(AdminError) as refused:
        netd.admin("POST", "/proxies", b"[" * 5000 + b"]" * 5000)
    assert refused.value.status == 400
    for enabled in ("false", 0):
        made = {"name": "en", "upstream": echo, "enabled": enabled}
        assert _call(netd, "POST", "/proxies", made)[0] == 400
    assert _call(netd, "GET", "/proxies/en")[0] == 404
    _, made = _call(netd, "POST", "/proxies", {"name": "mvx", "upstream": echo})
    _call(netd, "POST", "/proxies/mvx/toxics", {"type": "latency"})
    assert _call(netd, "POST", "/proxies/mvx", {"enabled": "false"})[0] == 400
    # Toxiproxy answers a listen error as its 500, and keeps the proxy.
    status, answer = _call(netd, "POST", "/proxies/mvx", {"listen": echo})
    assert (status, answer["status"]) == (500, 500)
    kept = _call(netd, "GET", "/proxies/mvx")[1]
    assert kept["listen"] == made["listen"] and kept["enabled"] is True
    assert [t["name"] for t in kept["toxics"]] == ["latency_downstream"]
    assert _round_trip(_address(kept["listen"]))[0] == b"ping"
    assert netd.admin("GET", "/healthz") == b"ok\n"


def test_a_toxiproxy_listener_serves_its_api_without_the_admin_token(
    start_netd: StartNetd,
) -> None:
    netd = start_netd(
        """
admin:
  listen: ["tcp:0:interface=127.0.0.1"]
  token: s3cret
  toxiproxy: ["tcp:0:interface=127.0.0.1"]
services:
  echo: {type: echo, listen: ["tcp:0:interface=127.0.0.1"]}
"""
    )
    admin, plain = netd.ports["admin"]["listeners"]
    assert plain["protocol"] == "toxiproxy" and "protocol" not in admin
    saved = APIConsumer.host, APIConsumer.port
    server = Toxiproxy()
    server.update_api_consumer(plain["host"], plain["port"])
    try:
        proxy = server.create(upstream=f"127.0.0.1:{netd.address('echo')[1]}", name="open")
        assert _round_trip(_address(proxy.listen))[0] == b"ping"
    finally:
        APIConsumer.host, APIConsumer.port = saved
    # That listener serves nothing else; the admin listener still asks for the token.
    for path, where in (("/api/services", plain), ("/proxies", admin)):
        request = urllib.request.Request(f"http://127.0.0.1:{where['port']}{path}")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == (404 if where is plain else 401)
    assert "open" in netd.admin("GET", "/proxies")  # with the token, as before
