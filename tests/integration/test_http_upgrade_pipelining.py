"""Pipelining and HTTP/1.0 around upgrade requests."""

from __future__ import annotations

import socket
import threading
import time

from tests.conftest import StartNetd
from tests.fakes.upstreams import RawUpstream, read_head
from tests.maps import proxying


def test_a_request_pipelined_behind_a_pending_one_with_upgrade_is_answered(
    start_netd: StartNetd,
) -> None:
    """B (with Upgrade: h2c, to a plain route) queued behind a proxied A is answered too."""

    def slow(sock: socket.socket) -> None:
        read_head(sock)
        # A stays pending a while (the point of the test): B has arrived behind it
        # by then, and netd shows no sign of having read B.
        time.sleep(0.5)
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nA\n")

    upstream = RawUpstream(slow)
    try:
        netd = start_netd(
            f"""
services:
  web:
    type: http
    listen: ["tcp:0:interface=127.0.0.1"]
    routes:
      - {{path: /slow, proxy: "http://127.0.0.1:{upstream.port}/slow"}}
      - {{path: /health, body: "ok\\n"}}
"""
        )
        with socket.create_connection(netd.address("web"), timeout=10) as sock:
            sock.sendall(
                b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"
                b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
            )
            received = b""
            while True:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                received += chunk
        assert received.count(b"HTTP/1.1 200") == 2, received
    finally:
        upstream.stop()


def test_an_http10_upgrade_is_not_switched(start_netd: StartNetd) -> None:
    """RFC 9110 7.8: a server MUST ignore Upgrade in an HTTP/1.0 request."""
    seen: list[bytes] = []
    answered = threading.Event()

    def switching(sock: socket.socket) -> None:
        seen.append(read_head(sock))
        sock.sendall(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        )
        answered.wait(10)  # open until the client has its answer, so no EOF decides it

    upstream = RawUpstream(switching)
    try:
        netd = start_netd(proxying(upstream.port, "/ws/", timeout=5, record=20))
        with socket.create_connection(netd.address("web"), timeout=10) as sock:
            sock.sendall(b"GET /ws/ HTTP/1.0\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
            head = read_head(sock)
        answered.set()
        assert not head.startswith(b"HTTP/1.1 101"), (head, seen)
    finally:
        upstream.stop()


def test_the_body_of_an_upgrade_request_reaches_the_upstream(start_netd: StartNetd) -> None:
    seen: list[bytes] = []

    def plain(sock: socket.socket) -> None:
        request = read_head(sock)
        while not request.endswith(b"body"):
            request += sock.recv(4096)
        seen.append(request)
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")

    upstream = RawUpstream(plain)
    try:
        netd = start_netd(proxying(upstream.port, "/ws/", timeout=5, record=20))
        with socket.create_connection(netd.address("web"), timeout=10) as sock:
            sock.sendall(
                b"GET /ws/ HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Content-Length: 4\r\n\r\nbody"
            )
            received = b""
            while chunk := sock.recv(4096):
                received += chunk
        assert received.startswith(b"HTTP/1.1 200") and received.endswith(b"ok\n")
        [request] = seen
        assert b"content-length: 4\r\n" in request.lower() and request.endswith(b"\r\n\r\nbody")
    finally:
        upstream.stop()
