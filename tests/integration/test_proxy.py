"""
The proxy kind with real clients and real servers behind it: a stdlib
socketserver echo, netd's own echo and http.  Each toxic is timed or counted
from the client's side.
"""

from __future__ import annotations

import socket
import socketserver
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netd.testing import AdminError, NetdProcess
from tests.conftest import StartNetd, unused_port
from tests.signals import wait_until


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)
        self.request.shutdown(socket.SHUT_WR)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture(scope="module")
def echo_port() -> Iterator[int]:
    server = _Server(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def netd(start_netd: StartNetd, tmp_path: Path, echo_port: int) -> NetdProcess:
    www = tmp_path / "www"
    www.mkdir()
    (www / "hello.txt").write_text("hello through the proxy\n")
    web_port = unused_port()
    return start_netd(
        f"""
services:
  web: {{type: http, listen: ["tcp:{web_port}:interface=127.0.0.1"], root: {www}}}
  web-px:
    type: proxy
    listen: ["tcp:0:interface=127.0.0.1", "unix:{tmp_path}/px.sock"]
    upstream: "127.0.0.1:{web_port}"
  echo:
    type: proxy
    listen: ["tcp:0:interface=127.0.0.1"]
    upstream: 127.0.0.1:{echo_port}
"""
    )


def _one_proxy(upstream_port: int) -> str:
    return f"""
services:
  px:
    type: proxy
    listen: ["tcp:0:interface=127.0.0.1"]
    upstream: "127.0.0.1:{upstream_port}"
"""


def _connect(netd: NetdProcess, service: str = "echo") -> socket.socket:
    sock = socket.create_connection(netd.address(service), timeout=10)
    return sock


def _send_then_fin(sock: socket.socket, payload: bytes) -> threading.Thread:
    def send() -> None:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send)
    sender.start()
    return sender


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _toxic(netd: NetdProcess, service: str, **toxic: Any) -> Any:
    import json

    return netd.admin("POST", f"/api/services/{service}/toxics", json.dumps(toxic).encode())


def _round_trip(sock: socket.socket, payload: bytes = b"x" * 64) -> float:
    started = time.monotonic()
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        got += sock.recv(65536)
    return time.monotonic() - started


def test_bytes_pass_both_ways_and_half_close_is_passed_through(netd: NetdProcess) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB: more than any buffer on the way
    with _connect(netd) as sock:
        sender = _send_then_fin(sock, payload)
        # The echo answers all, then closes only after reading our FIN through netd.
        assert _read_all(sock) == payload
        sender.join(10)
    closed = netd.wait_for("echo", "connection.closed")
    assert closed["bytes_in"] == closed["bytes_out"] == len(payload)


def test_netd_http_behind_the_proxy_over_tcp_and_unix(netd: NetdProcess, tmp_path: Path) -> None:
    host, port = netd.address("web-px")
    with urllib.request.urlopen(f"http://{host}:{port}/hello.txt", timeout=10) as r:
        assert r.read() == b"hello through the proxy\n"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(tmp_path / "px.sock"))
        sock.sendall(b"GET /hello.txt HTTP/1.0\r\n\r\n")
        assert _read_all(sock).endswith(b"hello through the proxy\n")


def test_latency_is_added_within_a_fifth(netd: NetdProcess) -> None:
    with _connect(netd) as sock:
        baseline = min(_round_trip(sock) for _ in range(5))
    _toxic(netd, "echo", type="latency", attributes={"latency": 300})
    with _connect(netd) as sock:
        measured = sorted(_round_trip(sock) for _ in range(3))[1] - baseline
    assert 0.24 <= measured <= 0.36, measured
    fired = netd.wait_for("echo", "toxic.fired", toxic="latency_downstream")
    assert fired["toxic_type"] == "latency"
    assert "toxics_fired" in netd.services()["echo"]["counters"]


def test_toxic_handle_adds_counts_and_removes_a_toxic(netd: NetdProcess) -> None:
    with netd.toxic("echo", "latency", latency=200, stream="downstream", nth=2) as toxic:
        assert toxic.id == "latency_downstream"
        with _connect(netd) as sock:
            first = _round_trip(sock)  # the 1st connection: nth=2 lets it be
        with _connect(netd) as sock:
            second = _round_trip(sock)
        assert first < 0.15 <= second, (first, second)
        (fired,) = toxic.wait_fired()
        assert toxic.fired == 1
        # toxic.fired carries rule.fired's fields: what a rule's watcher reads.
        assert fired["rule"] == "latency_downstream" and fired["source"] == "api"
        assert fired["fired"] == 1 and fired["client"] == "127.0.0.1"
        assert fired["acts"] == ["latency"] and fired["stream"] == "downstream"
    assert netd.view("echo", "toxics") == []
    with _connect(netd) as sock:
        assert _round_trip(sock) < 0.15  # gone with the block


def test_a_toxic_acts_while_the_daemons_scenario_is_in_its_state(netd: NetdProcess) -> None:
    with netd.toxic("echo", "latency", latency=200, scenario="db", state="slow") as toxic:
        with _connect(netd) as sock:
            assert _round_trip(sock) < 0.15
        netd.scenario("db", "slow")  # the scenarios every service's rules share
        with _connect(netd) as sock:
            assert _round_trip(sock) >= 0.15
        assert toxic.fired == 1


def test_toxic_handle_refusal_names_the_key_and_the_proxy_serves_on(netd: NetdProcess) -> None:
    with pytest.raises(AdminError) as refused:
        netd.toxic("echo", "latency", latncy=5)
    assert refused.value.status == 400 and "attributes.latncy" in refused.value.body
    with _connect(netd) as sock:
        _round_trip(sock)


def test_bandwidth_is_kept_within_a_fifth(netd: NetdProcess) -> None:
    _toxic(netd, "echo", type="bandwidth", attributes={"rate": 100})  # KB/s back to the client
    payload = b"b" * 150_000
    with _connect(netd) as sock:
        started = time.monotonic()
        sender = _send_then_fin(sock, payload)
        got = _read_all(sock)
        elapsed = time.monotonic() - started
        sender.join(10)
    assert got == payload
    assert 1.2 <= elapsed <= 1.8, elapsed


def test_reset_peer_is_seen_as_econnreset(netd: NetdProcess) -> None:
    _toxic(netd, "echo", type="reset_peer", stream="upstream", attributes={"timeout": 0})
    with _connect(netd) as sock:
        sock.sendall(b"anything")
        with pytest.raises(ConnectionResetError):
            _read_all(sock)
    # The daemon goes on: the toxic gone, the proxy relays again.
    netd.admin("DELETE", "/api/services/echo/toxics/reset_peer_upstream")
    with _connect(netd) as sock:
        assert _round_trip(sock) < 5


def test_limit_data_closes_after_exactly_n_bytes(netd: NetdProcess) -> None:
    _toxic(netd, "echo", type="limit_data", attributes={"bytes": 1000})
    with _connect(netd) as sock:
        sock.sendall(b"z" * 700)
        sock.sendall(b"z" * 700)
        assert _read_all(sock) == b"z" * 1000


def test_timeout_stalls_then_closes(netd: NetdProcess) -> None:
    _toxic(netd, "echo", type="timeout", attributes={"timeout": 500})
    with _connect(netd) as sock:
        started = time.monotonic()
        sock.sendall(b"are you there?")
        assert _read_all(sock) == b""
        assert 0.4 <= time.monotonic() - started <= 3


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise LookupError("no VmRSS")


def _send_until_stuck(sock: socket.socket) -> int:
    """Send until the peer's side has stopped taking bytes for a second; bounded."""
    sock.setblocking(False)
    sent, chunk = 0, b"s" * 65536
    deadline = time.monotonic() + 20
    stuck_since = None
    while sent < 256 * 2**20 and time.monotonic() < deadline:
        try:
            sent += sock.send(chunk)
            stuck_since = None
        except BlockingIOError:
            stuck_since = stuck_since or time.monotonic()
            if time.monotonic() - stuck_since > 1.0:
                break
            time.sleep(0.01)
    return sent


@pytest.mark.parametrize("slow", ["upstream", "client"])
def test_slow_reader_does_not_make_netd_buffer_without_bound(
    start_netd: StartNetd, slow: str
) -> None:
    # One side never reads: the other must end up blocked, netd's memory flat.
    listener = socket.create_server(("127.0.0.1", 0))
    netd = start_netd(_one_proxy(listener.getsockname()[1]))
    before = _rss_mib(netd.ports["pid"])
    with listener, _connect(netd, "px") as client:
        upstream, _ = listener.accept()
        with upstream:
            sent = _send_until_stuck(client if slow == "upstream" else upstream)
            grown = _rss_mib(netd.ports["pid"]) - before
    # Kernel buffers on both hops (a few MiB each on loopback) plus netd's bound.
    assert sent < 48 * 2**20, sent
    assert grown < 16, grown


def test_a_refused_upstream_closes_the_client_and_is_journaled(
    start_netd: StartNetd,
) -> None:
    netd = start_netd(_one_proxy(unused_port()))
    with _connect(netd, "px") as sock:
        assert _read_all(sock) == b""
    assert "refused" in netd.wait_for("px", "proxy.upstream_failed")["error"].lower()


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def udp_netd(start_netd: StartNetd) -> NetdProcess:
    dns_port, echo_port = _free_udp_port(), _free_udp_port()
    return start_netd(
        f"""
services:
  dns:
    type: dns
    listen: ["udp:{dns_port}:interface=127.0.0.1"]
    records: {{www.netd.test: {{A: [127.0.0.9]}}}}
  dns-px:
    type: proxy
    listen: ["udp:0:interface=127.0.0.1"]
    upstream: 127.0.0.1:{dns_port}
  echo: {{type: echo, listen: ["udp:{echo_port}:interface=127.0.0.1"]}}
  echo-px:
    type: proxy
    listen: ["udp:0:interface=127.0.0.1"]
    upstream: 127.0.0.1:{echo_port}
    udp_idle: 1.0
    udp_clients: 2
"""
    )


def _ask(netd: NetdProcess, timeout: float = 5.0) -> tuple[list[str], float]:
    import dns.message
    import dns.query

    host, port = netd.address("dns-px", "udp")
    query = dns.message.make_query("www.netd.test", "A")
    started = time.monotonic()
    answer = dns.query.udp(query, host, port=port, timeout=timeout)
    return [r.address for r in answer.answer[0]], time.monotonic() - started


def test_dns_over_udp_through_the_proxy_with_delay_and_drop(udp_netd: NetdProcess) -> None:
    import dns.exception

    assert _ask(udp_netd)[0] == ["127.0.0.9"]
    _toxic(udp_netd, "dns-px", type="delay", stream="upstream", attributes={"delay": 300})
    addresses, elapsed = _ask(udp_netd)
    assert addresses == ["127.0.0.9"] and 0.24 <= elapsed <= 0.36 + 0.05, elapsed
    udp_netd.admin("DELETE", "/api/services/dns-px/toxics")
    _toxic(udp_netd, "dns-px", type="drop", times=1)
    with pytest.raises(dns.exception.Timeout):
        _ask(udp_netd, timeout=0.5)
    # Spent after one datagram: the next query is answered.
    assert _ask(udp_netd)[0] == ["127.0.0.9"]
    fired = udp_netd.wait_for("dns-px", "toxic.fired", toxic="drop_downstream")
    assert fired["toxic_type"] == "drop"


def test_udp_duplicate_and_mappings_expire(udp_netd: NetdProcess) -> None:
    _toxic(udp_netd, "echo-px", type="duplicate", attributes={"copies": 2})
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.sendto(b"once", udp_netd.address("echo-px", "udp"))
        assert [sock.recv(100) for _ in range(3)] == [b"once"] * 3
    udp_netd.admin("DELETE", "/api/services/echo-px/toxics")
    clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
    for sock in clients:
        sock.settimeout(5)
        sock.sendto(b"hi", udp_netd.address("echo-px", "udp"))
        assert sock.recv(100) == b"hi"
        sock.close()
    # Each client had its own mapping, two at most; all go once quiet for udp_idle (1 s).
    counters = udp_netd.services()["echo-px"]["counters"]
    # The three came within much less than udp_idle: the third pushed one out at least.
    assert counters["datagrams_in"] == 4 and counters["udp_clients_evicted"] >= 1
    deadline = time.monotonic() + 10
    gauge = b'netd_udp_clients{service="echo-px",type="proxy"} 0.0'
    while gauge not in udp_netd.admin("GET", "/metrics"):
        assert time.monotonic() < deadline, "mappings never expired"
        time.sleep(0.1)


def test_tls_terminated_at_the_proxy_and_originated_to_the_upstream(
    start_netd: StartNetd, tmp_path: Path
) -> None:
    import ssl

    www = tmp_path / "www"
    www.mkdir()
    (www / "hello.txt").write_text("hello over tls twice\n")
    upstream = start_netd(
        f"""
tls: {{up: {{self_signed: [web.lab.test]}}}}
services:
  web:
    type: http
    listen: [{{endpoint: "ssl:0:interface=127.0.0.1", tls: up}}]
    root: {www}
"""
    )
    port = upstream.address("web", tls=True)[1]
    proxy = start_netd(
        f"""
tls: {{front: {{self_signed: [localhost]}}}}
services:
  px:
    type: proxy
    listen: [{{endpoint: "ssl:0:interface=127.0.0.1", tls: front}}]
    upstream: 127.0.0.1:{port}
    upstream_tls: {{server_name: web.lab.test, ca: {upstream.ca_file("up")}}}
  wrong-name:
    type: proxy
    listen: ["tcp:0:interface=127.0.0.1"]
    upstream: 127.0.0.1:{port}
    upstream_tls: {{server_name: other.lab.test, ca: {upstream.ca_file("up")}}}
"""
    )
    context = ssl.create_default_context(cafile=str(proxy.ca_file("front")))
    with (
        socket.create_connection(proxy.address("px", tls=True), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as sock,
    ):
        sock.sendall(b"GET /hello.txt HTTP/1.0\r\nHost: web.lab.test\r\n\r\n")
        assert _read_all(sock).endswith(b"hello over tls twice\n")
    # An upstream whose certificate does not name server_name is never spoken to.
    with _connect(proxy, "wrong-name") as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert _read_all(sock) == b""
    failed = proxy.wait_for("wrong-name", "proxy.upstream_failed")
    assert "other.lab.test" in failed["error"] or "certificate" in failed["error"].lower()


def test_enabled_false_in_a_reload_cuts_open_connections_and_refuses_new_ones(
    netd: NetdProcess,
) -> None:
    address = netd.address("echo")
    with _connect(netd) as sock:
        assert _round_trip(sock) < 5
        text = netd.config_path.read_text()  # type: ignore[union-attr]
        off = text.replace(
            "  echo:\n    type: proxy\n", "  echo:\n    type: proxy\n    enabled: false\n"
        )
        assert off != text
        assert "echo" in netd.reload(off)["stopped"]
        assert _read_all(sock) == b""
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=5).close()


def test_a_client_gone_before_the_upstream_answers_leaves_nothing_open(
    netd: NetdProcess,
) -> None:
    _toxic(netd, "echo", type="latency", attributes={"latency": 200})
    for _ in range(5):
        with _connect(netd) as sock:
            sock.sendall(b"never read")
    deadline = time.monotonic() + 10
    while netd.services()["echo"]["counters"]["connections_active"]:
        assert time.monotonic() < deadline, "relays left open"
        time.sleep(0.05)
    with _connect(netd) as sock:
        assert 0.15 < _round_trip(sock) < 5


def _rules(netd: NetdProcess, service: str = "echo") -> dict[str, Any]:
    listed = netd.admin("GET", f"/api/services/{service}/rules")["rules"]
    return {rule["id"]: rule for rule in listed}


def test_toxics_are_rules_on_the_rules_view(netd: NetdProcess) -> None:
    with netd.rule("echo", id="slow", type="latency", attributes={"latency": 200}) as slow:
        with _connect(netd) as sock:
            assert 0.16 < _round_trip(sock) < 5
        # Journaled with rule.fired's fields, and awaited through the netd.testing handle.
        (fired,) = slow.wait_fired(1)
        assert (fired["type"], fired["rule"], fired["source"]) == ("toxic.fired", "slow", "api")
        assert fired["acts"] == ["latency"] and fired["fired"] == 1
        assert slow.fired == 1
        # A toxic applies to the connections open when it comes, as Toxiproxy's do:
        # the one above must be gone, or a loaded netd counts it for the next too.
        wait_until(
            lambda: not netd.services()["echo"]["counters"]["connections_active"],
            "the first connection closed",
        )
        # One toxic, two views: the rules view lists it as a rule with its count, and the
        # toxics view (and a toxic added there) the same.
        with netd.toxic("echo", "limit_data", name="cap", stream="upstream", bytes=1 << 20):
            with _connect(netd) as sock:
                _round_trip(sock)
            rules = _rules(netd)
            assert rules["slow"]["fired"] == 2 and rules["slow"]["attributes"]["latency"] == 200
            assert rules["cap"]["fired"] == 1 and rules["cap"]["type"] == "limit_data"
            assert rules["slow"]["source"] == "api" and rules["slow"]["spent"] is False
        toxics = netd.view("echo", "toxics")
        assert [(t["name"], t["fired"]) for t in toxics] == [("slow", 2)]
        # A core connection rule sits beside the toxics, ids and names one namespace.
        with netd.rule("echo", id="cut", reset=True, times=1):
            assert set(_rules(netd)) == {"cut", "slow"}
            with pytest.raises(AdminError) as taken:
                netd.rule("echo", id="cut", type="latency")
            assert taken.value.status == 409
            for toxics in ("/api/services/echo/toxics", "/proxies/echo/toxics"):
                with pytest.raises(AdminError) as taken:
                    netd.admin("POST", toxics, b'{"name": "cut", "type": "latency"}')
                assert taken.value.status == 409, toxics
            # The reset may reach a loaded client while its connect() is still returning.
            with pytest.raises(ConnectionResetError), _connect(netd) as sock:
                if not sock.recv(10):
                    raise AssertionError("closed without a reset")
    # Leaving the block DELETEd it through the rules view: no toxic acts any more.
    assert "slow" not in _rules(netd) and netd.view("echo", "toxics") == []
    with _connect(netd) as sock:
        assert _round_trip(sock) < 0.15


def test_a_bad_toxic_on_the_rules_view_names_its_key_and_the_proxy_serves_on(
    netd: NetdProcess,
) -> None:
    for bad, key in (
        ({"type": "latency", "attributes": {"lag": 1}}, "attributes.lag"),
        ({"type": "latency", "stream": "sideways"}, "stream"),
        ({"type": "warp"}, "type"),
    ):
        with pytest.raises(AdminError) as refused:
            netd.rule("echo", **bad)
        assert refused.value.status == 400 and key in refused.value.body
    assert _rules(netd) == {}
    with _connect(netd) as sock:
        assert _round_trip(sock) < 5


def test_down_refuses_tcp_and_resets_unix_connections(netd: NetdProcess, tmp_path: Path) -> None:
    netd.admin("POST", "/proxies/web-px", b'{"enabled": false}')
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(netd.address("web-px"), timeout=5).close()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(tmp_path / "px.sock"))
        assert sock.recv(10) == b""  # closed at once, never relayed
    netd.admin("POST", "/proxies/web-px", b'{"enabled": true}')
    host, port = netd.address("web-px")
    with urllib.request.urlopen(f"http://{host}:{port}/hello.txt", timeout=10) as r:
        assert r.read() == b"hello through the proxy\n"


def test_an_open_connection_passes_from_straight_reads_to_a_toxic_and_back(
    netd: NetdProcess,
) -> None:
    payload = bytes(range(256)) * 2048  # 512 KiB: more than one read of either path
    with _connect(netd) as sock:
        assert _round_trip(sock) < 0.15
        with netd.toxic("echo", "latency", latency=200, stream="upstream"):
            assert 0.16 < _round_trip(sock) < 5  # the toxic takes the next chunk
            sock.sendall(payload)
            got = b""
            while len(got) < len(payload):
                got += sock.recv(1 << 20)
            assert got == payload  # in order, none lost, across the paths
        assert _round_trip(sock) < 0.15  # straight again once it is gone
    closed = netd.wait_for("echo", "connection.closed")
    assert closed["bytes_in"] == closed["bytes_out"] == 3 * 64 + len(payload)
