"""
echo over a plain socket reads into one shared buffer and sends from it (the
simple kind's straight reads): every byte comes back in order and is counted,
a client that stops reading is held back, and a rule that paces writes still does.
"""

from __future__ import annotations

import os
import socket
import threading
import time

from netd.testing import NetdProcess
from tests.conftest import StartNetd

ECHO = """
services:
  echo:
    type: echo
    listen: ["tcp:0:interface=127.0.0.1"]
"""


def _connect(netd: NetdProcess) -> socket.socket:
    return socket.create_connection(netd.address("echo"), timeout=10)


def _echo_through(sock: socket.socket, payload: bytes) -> bytes:
    """Send C{payload} while reading its echo in another thread; what came back."""
    received = bytearray()

    def read() -> None:
        while len(received) < len(payload):
            chunk = sock.recv(1 << 16)
            if not chunk:
                return
            received.extend(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    sock.sendall(payload)
    reader.join(timeout=30)
    return bytes(received)


def test_bulk_comes_back_whole_in_order_and_counted(start_netd: StartNetd) -> None:
    netd = start_netd(ECHO)
    payload = os.urandom(8 << 20)  # many 256 KiB reads, some sends partial
    with _connect(netd) as sock:
        assert _echo_through(sock, payload) == payload
    deadline = time.monotonic() + 10
    while True:
        counters = netd.services()["echo"]["counters"]
        if counters.get("bytes_out") == len(payload) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert counters["bytes_in"] == counters["bytes_out"] == len(payload)


def test_a_client_that_does_not_read_is_held_back(start_netd: StartNetd) -> None:
    netd = start_netd(ECHO)
    with _connect(netd) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        sock.setblocking(False)
        sent = 0
        deadline = time.monotonic() + 5
        block = b"x" * (1 << 16)
        while time.monotonic() < deadline:
            try:
                sent += sock.send(block)
            except BlockingIOError:
                time.sleep(0.05)  # the socket is full: is netd still reading?
                try:
                    sent += sock.send(block)
                except BlockingIOError:
                    break
        # Both socket buffers and netd's own write buffer filled, then netd stopped
        # reading: the client could not push more than a few MiB.
        assert sent < 64 << 20, sent
    with _connect(netd) as other:
        assert _echo_through(other, b"still serving") == b"still serving"


def test_a_throttle_rule_still_paces_the_echo(start_netd: StartNetd) -> None:
    netd = start_netd(ECHO)
    with netd.rule("echo", throttle=100_000) as rule, _connect(netd) as sock:
        started = time.monotonic()
        assert _echo_through(sock, b"y" * 200_000) == b"y" * 200_000
        elapsed = time.monotonic() - started
        assert rule.fired == 1
    assert elapsed > 1.2, elapsed  # 200 kB at 100 kB/s, after the first burst
