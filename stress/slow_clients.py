"""
Slow and non-reading clients: slowloris (a request head or command line one
byte at a time), idle connections held open, and clients that pipeline
requests and never read the answers.  Did netd cut them, how fast, what did
they cost in memory, and did everyone else go on being served meanwhile?
"""

from __future__ import annotations

import contextlib
import select
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from netd.testing import NetdProcess

from ._harness import (
    ADMIN_TOKEN,
    Budget,
    Daemon,
    Row,
    Sampler,
    admin_address,
    full_daemon,
    serving,
)

FAMILY = "slow clients"
RSS_GROWTH_LIMIT_KIB = 50_000
RSS_ABORT_KIB = 300_000  # a non-reader that has cost this much is let go at once

Address = Callable[[NetdProcess], tuple[str, int]]


@dataclass
class Slow:
    case: str
    address: Address
    check: str
    opening: bytes  # sent at once
    trickle: bytes  # then one byte of this per tick, over and over
    count: int


def _slow_cases(budget: Budget) -> list[Slow]:
    head = b"GET /health HTTP/1.1\r\nHost: x\r\n"
    many = budget.count(200, 40)
    few = budget.count(20, 5)
    return [
        Slow("slowloris http", lambda n: n.address("web"), "http", head, b"X-a: b\r\n", few),
        Slow(
            "slowloris admin",
            admin_address,
            "admin",
            b"GET /api/services HTTP/1.1\r\nHost: x\r\n",
            b"X-a: b\r\n",
            few,
        ),
        Slow("slowloris smtp (one line)", lambda n: n.address("mail"), "smtp", b"", b"NOOP", few),
        Slow("slowloris ftp (one line)", lambda n: n.address("files"), "ftp", b"", b"NOOP", few),
        Slow("idle connections http", lambda n: n.address("web"), "http", b"", b"", many),
        Slow("idle connections admin", admin_address, "admin", b"", b"", many),
    ]


def _slowloris(daemon: Daemon, slow: Slow, cap: float) -> Row:
    sampler = Sampler(daemon)
    started = time.monotonic()
    sockets: dict[socket.socket, int] = {}
    cut_after: list[float] = []
    peak = 0
    refused = 0
    served = True
    try:
        for _ in range(slow.count):
            try:
                sock = socket.create_connection(slow.address(daemon.netd), timeout=5)
            except OSError:
                refused += 1  # turned away at once: not holding anything either
                continue
            sock.setblocking(False)
            if slow.opening:
                sock.send(slow.opening)
            sockets[sock] = 0
        checked = False
        while sockets and time.monotonic() - started < cap:
            readable, _, _ = select.select(list(sockets), [], [], 0.5)
            for sock in readable:
                if _closed_by_peer(sock):
                    cut_after.append(time.monotonic() - started)
                    del sockets[sock]
                    sock.close()
            for sock, sent in list(sockets.items()):
                if slow.trickle:
                    with contextlib.suppress(OSError):
                        sock.send(
                            slow.trickle[sent % len(slow.trickle) : sent % len(slow.trickle) + 1]
                        )
                    sockets[sock] = sent + 1
            peak = max(peak, daemon.rss_kib() - sampler.rss)
            if not checked and time.monotonic() - started > 1:
                served = serving(daemon, slow.check)
                checked = True
    finally:
        for sock in sockets:
            sock.close()
    held = len(sockets)
    result = f"cut {len(cut_after)}/{slow.count} within {cap:.0f} s"
    if refused:
        result += f", refused {refused}"
    if cut_after:
        result += f" (median {statistics.median(cut_after):.1f} s)"
    result += f"; others {'served' if served else 'NOT served'}; RSS peak +{peak} KiB"
    row = sampler.finish(Row(FAMILY, slow.case, slow.count, result))
    if held or not served or peak > RSS_GROWTH_LIMIT_KIB:
        row.verdict = "DEFECT"
    return row


def _closed_by_peer(sock: socket.socket) -> bool:
    """Drain what the peer sent; whether it has closed (EOF or reset)."""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


@dataclass
class NonReader:
    case: str
    address: Address
    check: str
    chunk: bytes
    total: int  # bytes to send at most


def _non_reader_cases() -> list[NonReader]:
    auth = f"Authorization: Bearer {ADMIN_TOKEN}\r\n".encode()
    return [
        NonReader(
            "non-reading echo client", lambda n: n.address("echo"), "echo", b"x" * 65536, 32 << 20
        ),
        NonReader(
            "pipelining http, never reads",
            lambda n: n.address("web"),
            "http",
            b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" * 1024,
            8 << 20,
        ),
        NonReader(
            "pipelining smtp EHLO, never reads",
            lambda n: n.address("mail"),
            "smtp",
            b"EHLO x\r\n" * 8192,
            8 << 20,
        ),
        NonReader(
            "pipelining admin, never reads",
            admin_address,
            "admin",
            b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n",
            4 << 20,
        ),
        NonReader(
            "pipelining irc PING, never reads",
            lambda n: n.address("chat"),
            "irc",
            b"NICK slow\r\nUSER s 0 * :s\r\n" + b"PING :x\r\n" * 4096,
            8 << 20,
        ),
    ]


def _non_reader(daemon: Daemon, case: NonReader, budget: Budget) -> Row:
    hold = budget.seconds(2, 0.5)  # held unread this long once netd stops reading
    stall = budget.seconds(3, 1)  # a send blocked this long: netd stopped reading
    total = budget.count(case.total, case.total // 4)
    sampler = Sampler(daemon)
    sent = 0
    peak = 0
    stopped_reading = False
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(stall)
        try:
            sock.connect(case.address(daemon.netd))
            while sent < total and peak < RSS_ABORT_KIB:
                sock.sendall(case.chunk)
                sent += len(case.chunk)
                peak = max(peak, daemon.rss_kib() - sampler.rss)
        except TimeoutError:
            stopped_reading = True  # back-pressure: netd stopped reading from it
        except OSError:
            stopped_reading = True  # netd cut it
        # Held unread a while, as a stuck client would.
        deadline = time.monotonic() + hold
        served = serving(daemon, case.check)
        while time.monotonic() < deadline:
            peak = max(peak, daemon.rss_kib() - sampler.rss)
            time.sleep(0.2)
    result = (
        f"sent {sent >> 10} KiB, netd {'stopped reading' if stopped_reading else 'took all'}; "
        f"others {'served' if served else 'NOT served'}; RSS peak +{peak} KiB"
    )
    row = sampler.finish(Row(FAMILY, case.case, 1, result))
    if not served or peak > RSS_GROWTH_LIMIT_KIB:
        row.verdict = "DEFECT"
    return row


def run(base: Path, budget: Budget) -> list[Row]:
    rows = []
    with full_daemon(base) as (daemon, _, _):
        for slow in _slow_cases(budget):
            rows.append(_slowloris(daemon, slow, budget.seconds(10, 6)))
        for non_reader in _non_reader_cases():
            rows.append(_non_reader(daemon, non_reader, budget))
    return rows
