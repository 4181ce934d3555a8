"""Waiting on netd's own signals: its journal, its ports file, its log lines."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from netd.testing import NetdProcess


def status_kib(netd: NetdProcess, field: str = "VmRSS") -> int:
    """A size in /proc/PID/status of the daemon (VmRSS, VmHWM: its peak), in KiB."""
    for line in Path(f"/proc/{netd.process.pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field}")


def client_address(sock: socket.socket) -> str:
    """How netd's journal names the client end of C{sock}."""
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def wait_closed(
    netd: NetdProcess, service: str, client: str, timeout: float = 10.0
) -> dict[str, Any]:
    """
    netd's C{connection.closed} event for C{client} (see L{client_address}):
    netd has seen the connection go and let go of what it held for it.
    """
    return netd.wait_for(service, "connection.closed", timeout, client=client)


def wait_until(
    ready: Callable[[], object],
    what: str,
    timeout: float = 15.0,
    process: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
) -> None:
    """
    Poll C{ready} until it is true: for what netd shows only in files (a
    ports file, a log line) or in a view, where the journal has no event, and
    for what a test's own clients have seen of it.
    Fails naming C{what} once C{timeout} passes or C{process} (a netd run
    by hand, logging to C{log}) exits.
    """
    deadline = time.monotonic() + timeout
    while not ready():
        logged = log.read_text() if log is not None and log.exists() else ""
        if process is not None:
            assert process.poll() is None, f"netd exited before {what}\n{logged}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s\n{logged}"
        time.sleep(0.01)
