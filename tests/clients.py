"""
Clients the integration tests share: raw FTP control connections, raw HTTP,
smtplib, Toxiproxy's Python client, and the Debian tools they run.
"""

from __future__ import annotations

import re
import shutil
import smtplib
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from toxiproxy import Toxiproxy
from toxiproxy.api import APIConsumer

from netd.testing import NetdProcess


def tool(name: str) -> str:
    """The path of the client C{name}; the test is skipped where it is not installed."""
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (.ci/run installs it)")
    return found


@contextmanager
def toxiproxy_client(netd: NetdProcess) -> Iterator[Toxiproxy]:
    """Toxiproxy's Python client on netd's admin listener (it keeps its address class-wide)."""
    admin = netd.ports["admin"]["listeners"][0]
    saved = APIConsumer.host, APIConsumer.port
    server = Toxiproxy()
    server.update_api_consumer(admin["host"], admin["port"])
    try:
        yield server
    finally:
        APIConsumer.host, APIConsumer.port = saved


def control(netd: NetdProcess, service: str = "files") -> tuple[socket.socket, Any]:
    """A raw FTP control connection to C{service} and a reader of its replies, greeted."""
    sock = socket.create_connection(netd.address(service), timeout=10)
    reader = sock.makefile("rb")
    assert reader.readline().startswith(b"220")
    return sock, reader


def command(sock: socket.socket, reader: Any, line: bytes) -> bytes:
    """Send one FTP command; its reply's last line."""
    sock.sendall(line + b"\r\n")
    reply: bytes = reader.readline()
    while reply[3:4] == b"-":
        reply = reader.readline()
    return reply


def passive_port(reply: bytes) -> int:
    """The port of a 227 reply to PASV."""
    numbers = re.search(rb"\((\d+),(\d+),(\d+),(\d+),(\d+),(\d+)\)", reply)
    assert numbers is not None, reply
    return int(numbers.group(5)) << 8 | int(numbers.group(6))


def hang_up(sock: socket.socket, reader: Any = None) -> None:
    # A socket's makefile() keeps it open until the file is closed too.
    if reader is not None:
        reader.close()
    sock.close()


def raw_http(netd: NetdProcess, data: bytes, service: str = "web") -> bytes:
    """Send bytes as they are; return everything until netd closes (or 5 s pass)."""
    with socket.create_connection(netd.address(service), timeout=5) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (TimeoutError, ConnectionResetError):
            pass
    return b"".join(chunks)


def smtp(netd: NetdProcess) -> smtplib.SMTP:
    """smtplib on the C{mail} service, saying EHLO as client.test."""
    host, port = netd.address("mail")
    return smtplib.SMTP(host, port, local_hostname="client.test", timeout=10)


def deliver(netd: NetdProcess, to: str, raw: bytes) -> str:
    """C{raw} mailed to C{to} from shop@client.test as it is; the id the admin API gives it."""
    last = netd.admin("GET", "/api/events?service=mail")["last_id"]
    with smtp(netd) as client:
        client.sendmail("shop@client.test", [to], raw)
    [event] = netd.events("mail", "message.accepted", last, wait=10)
    message_id: str = event["message_id"]
    return message_id


def lftp_as(
    user: str, address: tuple[str, int], script: str, cwd: Path, timeout: float = 30
) -> subprocess.CompletedProcess[bytes]:
    """Debian's lftp logged in as C{user} ("name,password"), running C{script}."""
    lftp = shutil.which("lftp")
    assert lftp is not None
    host, port = address
    return subprocess.run(
        [lftp, "-u", user, "-p", str(port), "-e", script, host],
        capture_output=True,
        cwd=cwd,
        timeout=timeout,
        check=False,
    )


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


# Whether this machine's loopback has ::1 (a container may have IPv6 off).
IPV6 = _ipv6_loopback()
