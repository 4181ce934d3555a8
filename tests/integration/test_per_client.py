"""
max_connections_per_client in the real daemon: one key for every stream kind,
an IPv4 address or an IPv6 /64 per client, UNIX sockets not limited.
"""

from __future__ import annotations

import socket
from pathlib import Path

from netd.testing import NetdProcess
from tests.clients import IPV6
from tests.conftest import StartNetd

IPV6_LISTENER = ', "tcp6:0:interface=\\\\:\\\\:1"' if IPV6 else ""


def echo_map(per_client: int) -> str:
    return f"""
services:
  echo:
    type: echo
    listen: ["tcp:0:interface=127.0.0.1", "unix:echo.sock"{IPV6_LISTENER}]
    max_connections_per_client: {per_client}
  web:
    type: http
    listen: ["tcp:0:interface=127.0.0.1"]
    max_connections_per_client: 1
    routes: [{{path: /, body: "ok\\n"}}]
"""


def echo_address(netd: NetdProcess, host: str) -> tuple[str, int]:
    port = next(e["port"] for e in netd.listeners("echo") if e.get("host") == host)
    return host, port


def connect(address: tuple[str, int] | str) -> socket.socket:
    if isinstance(address, str):
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(5)
        sock.connect(address)
        return sock
    return socket.create_connection(address, timeout=5)


def echoes(sock: socket.socket) -> bool:
    """Whether the connection was let in: it echoes, where a refused one is just closed."""
    try:
        sock.sendall(b"x")
        return sock.recv(1) == b"x"
    except ConnectionError:
        return False


def closed_by_netd(netd: NetdProcess, sock: socket.socket) -> None:
    """Close C{sock} and wait until netd has seen it go: its slot is free then."""
    host, port = sock.getsockname()[:2]
    client = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    sock.close()
    netd.wait_for("echo", "connection.closed", client=client)


def test_echo_counts_each_ipv4_client_and_ipv6_64_apart(start_netd: StartNetd) -> None:
    netd = start_netd(echo_map(2))
    ipv4 = echo_address(netd, "127.0.0.1")
    held = [connect(ipv4), connect(ipv4)]
    assert all(echoes(sock) for sock in held)
    with connect(ipv4) as third:
        assert not echoes(third)
    refused = netd.wait_for("echo", "connection.refused")
    assert refused["reason"] == "max_connections_per_client"
    assert refused["client"].startswith("127.0.0.1:")
    if IPV6:
        # ::1 is another client than 127.0.0.1, with a count of its own.
        ipv6 = echo_address(netd, "::1")
        held += [connect(ipv6), connect(ipv6)]
        assert all(echoes(sock) for sock in held[2:])
        with connect(ipv6) as third:
            assert not echoes(third)
    # A UNIX socket has no address to count.
    unix = str(Path(netd.listener("echo", "unix")["path"]))
    local = [connect(unix) for _ in range(4)]
    assert all(echoes(sock) for sock in local)
    # A slot frees once netd has seen one of the client's connections close.
    closed_by_netd(netd, held.pop(0))
    with connect(ipv4) as again:
        assert echoes(again)
    counters = netd.services()["echo"]["counters"]
    assert counters["per_client_refused"] == (2 if IPV6 else 1)
    assert counters["connections_refused"] == 0  # max_connections was never reached
    for sock in held + local:
        sock.close()


def test_http_refuses_past_the_limit_with_503(start_netd: StartNetd) -> None:
    netd = start_netd(echo_map(2))
    address = netd.address("web")
    with connect(address) as kept:
        kept.sendall(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
        assert kept.recv(1000).startswith(b"HTTP/1.1 200")  # kept alive, holding its slot
        with connect(address) as second:
            answer = b""
            while chunk := second.recv(1000):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1" in answer
        # The one let in goes on being served.
        kept.sendall(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
        assert kept.recv(1000).startswith(b"HTTP/1.1 200")
    assert netd.wait_for("web", "connection.refused")["reason"] == "max_connections_per_client"


def test_a_changed_limit_restarts_the_service(start_netd: StartNetd) -> None:
    netd = start_netd(echo_map(1))
    ipv4 = echo_address(netd, "127.0.0.1")
    with connect(ipv4) as first, connect(ipv4) as second:
        assert echoes(first) and not echoes(second)
    answer = netd.reload(echo_map(3))
    assert answer["restarted"] == ["echo"] and "web" in answer["unchanged"]
    ipv4 = echo_address(netd, "127.0.0.1")
    held = [connect(ipv4) for _ in range(4)]
    assert [echoes(sock) for sock in held] == [True, True, True, False]
    for sock in held:
        sock.close()
