"""The time kind (RFC 868) in the real daemon, read with plain sockets and Debian's rdate."""

from __future__ import annotations

import calendar
import contextlib
import os
import shutil
import socket
import subprocess
import time

import pytest

from netd.testing import NetdProcess
from tests.conftest import StartNetd

RFC868_OFFSET = 2_208_988_800  # seconds from 1900 to 1970
RDATE = shutil.which("rdate")
TIME = """
services:
  clock:
    type: time
    listen: ["tcp:0:interface=127.0.0.1", "udp:0:interface=127.0.0.1"]
"""


@pytest.fixture
def netd(start_netd: StartNetd) -> NetdProcess:
    return start_netd(TIME)


def unix_seconds(answer: bytes) -> int:
    assert len(answer) == 4, answer
    return int.from_bytes(answer, "big") - RFC868_OFFSET


def assert_now(seconds: float) -> None:
    assert abs(seconds - time.time()) < 5


def read_stream(address: tuple[str, int], send: bytes = b"", half_close: bool = False) -> bytes:
    with socket.create_connection(address, timeout=5) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(send)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(100):
            chunks.append(chunk)
    return b"".join(chunks)


def ask_udp(address: tuple[str, int], payload: bytes = b"") -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.sendto(payload, address)
        answer, source = sock.recvfrom(100)
    assert source == address
    return answer


def test_tcp_sends_the_time_and_closes(netd: NetdProcess) -> None:
    assert_now(unix_seconds(read_stream(netd.address("clock"))))


def test_udp_answers_an_empty_datagram(netd: NetdProcess) -> None:
    assert_now(unix_seconds(ask_udp(netd.address("clock", "udp"))))


def test_bad_input_leaves_it_serving(netd: NetdProcess) -> None:
    address = netd.address("clock")
    # Input is never read: whatever a client sends, it gets the four bytes.
    assert_now(unix_seconds(read_stream(address, bytes(range(256)) * 64)))
    assert_now(unix_seconds(read_stream(address, half_close=True)))
    assert_now(unix_seconds(ask_udp(netd.address("clock", "udp"), b"\xff" * 60000)))
    assert_now(unix_seconds(read_stream(address)))
    assert netd.process.poll() is None


@pytest.mark.skipif(RDATE is None, reason="needs rdate (Debian rdate)")
@pytest.mark.parametrize("transport", ["tcp", "udp"])
def test_rdate_reads_it(netd: NetdProcess, transport: str) -> None:
    assert RDATE is not None
    host, port = netd.address("clock", transport)
    udp = ["-u"] if transport == "udp" else []
    # -p prints and never sets the clock; TZ and LC_ALL fix how it prints the date.
    result = subprocess.run(
        [RDATE, "-p", *udp, "-o", str(port), host],
        capture_output=True,
        text=True,
        timeout=10,
        env={**os.environ, "TZ": "UTC", "LC_ALL": "C"},
        check=True,
    )
    printed = time.strptime(result.stdout.strip(), "%a %b %d %H:%M:%S UTC %Y")  # date(1)'s form
    assert_now(calendar.timegm(printed))
