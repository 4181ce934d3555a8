"""
What the benchmark scripts share: free ports, CPU pinning, readiness, figures
from /proc, and a server run as a child process.  Run from bench/ (the scripts'
own folder is first on sys.path), never imported by netd or its tests.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "VENV_BIN",
    "Server",
    "accepts",
    "cpu_seconds",
    "free_port",
    "pinned",
    "proc_mib",
    "wait_for",
]

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    """
    A loopback port free for TCP and UDP just now, below the ephemeral range:
    one the kernel hands out to outgoing connections (the load generator's,
    say) may be taken again before the server binds it.
    """
    for _ in range(200):
        candidate = random.randrange(20000, 32000)
        try:
            with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                tcp.bind(("127.0.0.1", candidate))
                udp.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return candidate
    raise RuntimeError("no free port in 20000-32000")


def pinned(cpu: int) -> list[str]:
    """A command prefix that runs on one CPU, where there are two to share."""
    if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        return ["taskset", "-c", str(cpu)]
    return []


def wait_for(check: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} did not come up")
        time.sleep(0.05)


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True


def proc_mib(pid: int, field: str = "VmHWM") -> float:
    """A size from /proc/PID/status in MiB: VmHWM (peak RSS), VmRSS ..."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """
    C{cpu_seconds} of a process and of its children alive now: nginx's worker
    does its work, not the master the benchmark started.
    """
    total = cpu_seconds(pid)
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            with contextlib.suppress(FileNotFoundError):  # ended meanwhile
                total += tree_cpu_seconds(int(child))
    return total


class Server:
    """One server under test, pinned to CPU 1 (the load runs on CPU 0)."""

    name = ""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        return accepts(self.port)

    def start(self) -> None:
        with (self.work / f"{self.name}.out").open("wb") as log:
            self.process = subprocess.Popen(
                pinned(1) + self.command(), cwd=self.work, stdout=log, stderr=subprocess.STDOUT
            )
        wait_for(self.ready, self.name)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
