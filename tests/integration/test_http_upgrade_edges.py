"""Edges of the upgrade (WebSocket) proxy path, against the real daemon and a scripted upstream."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Callable

from netd.testing import NetdProcess
from tests.conftest import StartNetd

HANDSHAKE = (
    b"GET /ws/ HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


class RawUpstream:
    """One-connection-at-a-time raw TCP upstream; `behave(sock)` scripts it."""

    def __init__(self, behave: Callable[[socket.socket], None]) -> None:
        self.behave = behave
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            try:
                self.behave(sock)
            except BaseException as e:
                self.errors.append(e)
            finally:
                sock.close()

    def stop(self) -> None:
        self.listener.close()


def read_head(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def start(start_netd: StartNetd, port: int) -> NetdProcess:
    return start_netd(
        f"""
services:
  web:
    type: http
    listen: ["tcp:0:interface=127.0.0.1"]
    record: 20
    routes:
      - {{path: /ws/, proxy: "http://127.0.0.1:{port}/", timeout: 5}}
"""
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
        netd = start(start_netd, upstream.port)
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
                time.sleep(0.05)
        client.close()  # the client leaves while netd has paused it
        time.sleep(0.5)
        go_read.set()
        upstream.thread.join(0)  # upstream reads what netd buffered, then waits for EOF
        deadline = time.monotonic() + 20
        while not outcome and time.monotonic() < deadline:
            time.sleep(0.1)
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
                time.sleep(0.01)
            outcome["still_open_after"] = time.monotonic() - start
        except OSError as e:
            outcome["closed"] = repr(e)

    upstream = RawUpstream(behave)
    try:
        netd = start(start_netd, upstream.port)
        client = socket.create_connection(netd.address("web"), timeout=10)
        client.sendall(HANDSHAKE)
        assert read_head(client).startswith(b"HTTP/1.1 200")
        client.close()
        upstream.thread.join(0)
        deadline = time.monotonic() + 20
        while not outcome and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "closed" in outcome, f"netd kept reading the upstream for nobody: {outcome}"
    finally:
        upstream.stop()


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


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
        netd = start(start_netd, upstream.port)
        pid = netd.ports["pid"]
        before = _rss_kib(pid)
        client = socket.create_connection(netd.address("web"), timeout=10)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        client.sendall(
            b"GET /ws/ HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n"
        )
        time.sleep(6)  # the client reads nothing
        grown = _rss_kib(pid) - before
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
        netd = start(start_netd, upstream.port)
        host, port = netd.address("web")
        conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.request("GET", "/ws/", headers={"Upgrade": "websocket", "Connection": "Upgrade"})
        answer = conn.getresponse()
        assert answer.status == 403
        assert answer.read() == b"no websockets\n"
    finally:
        upstream.stop()
