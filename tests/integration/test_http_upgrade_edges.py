"""Edges of the upgrade (WebSocket) proxy path, against the real daemon and a scripted upstream."""

from __future__ import annotations

import http.client
import select
import socket
import threading
import time

from tests.conftest import StartNetd
from tests.fakes.upstreams import RawUpstream, read_head
from tests.maps import proxying
from tests.signals import status_kib

HANDSHAKE = (
    b"GET /ws/ HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def test_client_leaving_while_upstream_is_backpressured_releases_the_upstream(
    start_netd: StartNetd,
) -> None:
    """A client that leaves while the upstream is paused for it still releases the upstream."""
    go_read = threading.Event()
    outcome: dict[str, object] = {}

    def behave(sock: socket.socket) -> None:
        read_head(sock)
        sock.sendall(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        )
        go_read.wait(30)  # not reading: netd's buffer towards us fills up
        sock.settimeout(8)
        total = 0
        try:
            while True:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    outcome["eof"] = total
                    return
                total += len(chunk)
        except TimeoutError:
            outcome["hung"] = total

    upstream = RawUpstream(behave)
    try:
        netd = start_netd(proxying(upstream.port, "/ws/", timeout=5, record=20))
        client = socket.create_connection(netd.address("web"), timeout=10)
        client.sendall(HANDSHAKE)
        assert read_head(client).startswith(b"HTTP/1.1 101")
        client.setblocking(False)
        blob = b"\x00" * 65536
        last_progress = time.monotonic()
        while time.monotonic() - last_progress < 1.5:
            try:
                client.send(blob)
                last_progress = time.monotonic()
            except BlockingIOError:
                select.select([], [client], [], 0.1)
        client.close()  # the client leaves while netd has paused it
        # netd reads nothing from a paused client, so it shows no sign of the
        # close: this is time for the FIN to reach its socket before the upstream
        # lets netd's buffer drain and netd reads the client again.
        time.sleep(0.5)
        go_read.set()
        # The upstream reads what netd buffered, then waits for EOF.
        assert upstream.served.wait(20), "the upstream is still reading"
        assert "eof" in outcome, f"upstream connection never closed by netd: {outcome}"
        # and the exchange is logged/recorded once both sides are gone
        assert [r for r in netd.requests("web") if r["path"] == "/ws/"]
    finally:
        go_read.set()
        upstream.stop()


def test_client_leaving_during_a_refusal_drops_the_upstream(start_netd: StartNetd) -> None:
    """A client that leaves during a relayed refusal has its upstream dropped, not read on."""
    outcome: dict[str, object] = {}

    def behave(sock: socket.socket) -> None:
        read_head(sock)
        sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (1024, b"x" * 1024)
        start = time.monotonic()
        try:
            while time.monotonic() - start < 15:
                sock.sendall(chunk)
                time.sleep(0.01)  # a trickle: the upstream is still sending when the client goes
            outcome["still_open_after"] = time.monotonic() - start
        except OSError as e:
            outcome["closed"] = repr(e)

    upstream = RawUpstream(behave)
    try:
        netd = start_netd(proxying(upstream.port, "/ws/", timeout=5, record=20))
        client = socket.create_connection(netd.address("web"), timeout=10)
        client.sendall(HANDSHAKE)
        assert read_head(client).startswith(b"HTTP/1.1 200")
        client.close()
        assert upstream.served.wait(20), "the upstream is still sending"
        assert "closed" in outcome, f"netd kept reading the upstream for nobody: {outcome}"
    finally:
        upstream.stop()


def test_a_refusal_body_is_relayed_with_back_pressure(start_netd: StartNetd) -> None:
    """
    Any GET with Upgrade (curl --http2 sends Upgrade: h2c) to a proxy route takes the
    tunnel path; an upstream that ignores the Upgrade answers normally, and that body
    flows at the pace the client reads, not into netd's memory.
    """
    size = 300 << 20

    def behave(sock: socket.socket) -> None:
        read_head(sock)
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        block = b"y" * (1 << 20)
        for _ in range(size >> 20):
            sock.sendall(block)

    upstream = RawUpstream(behave)
    try:
        netd = start_netd(proxying(upstream.port, "/ws/", timeout=5, record=20))
        before = status_kib(netd)
        client = socket.create_connection(netd.address("web"), timeout=10)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        client.sendall(
            b"GET /ws/ HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n"
        )
        # What is under test: six seconds in which the client reads nothing
        # (netd gives no sign that it paused the upstream).
        time.sleep(6)
        grown = status_kib(netd) - before
        client.close()
        assert grown < 64 * 1024, f"netd grew by {grown // 1024} MiB buffering for a slow client"
    finally:
        upstream.stop()


def test_a_close_delimited_refusal_reaches_the_client_whole(start_netd: StartNetd) -> None:
    """A refusal whose body ends with the connection (no length) reaches the client whole."""

    def behave(sock: socket.socket) -> None:
        read_head(sock)
        sock.sendall(b"HTTP/1.1 403 Forbidden\r\nConnection: close\r\n\r\nno websockets\n")

    upstream = RawUpstream(behave)
    try:
        netd = start_netd(proxying(upstream.port, "/ws/", timeout=5, record=20))
        host, port = netd.address("web")
        conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.request("GET", "/ws/", headers={"Upgrade": "websocket", "Connection": "Upgrade"})
        answer = conn.getresponse()
        assert answer.status == 403
        assert answer.read() == b"no websockets\n"
    finally:
        upstream.stop()
