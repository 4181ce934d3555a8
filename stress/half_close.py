"""
Half-close per kind: a client sends its request, then shutdown(SHUT_WR) (as
C{nc -N}, C{curl} with some proxies or a script's C{printf | nc} do), and reads.
The whole reply must still come; SMTP's 250 too, with the message stored once.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dns.message

from netd.testing import AdminError, NetdProcess

from ._harness import (
    ADMIN_TOKEN,
    BIG_FILE_SIZE,
    Budget,
    Daemon,
    Row,
    Sampler,
    admin_address,
    connect,
    full_daemon,
    line_chat_address,
    read_until_closed,
)

FAMILY = "half-close"
READ_TIMEOUT = 3.0

# A case: the address to reach, what to send, and the check of what came back
# (None when good, else what was wrong).
Check = Callable[[bytes], str | None]
Case = Callable[[NetdProcess, int], tuple[tuple[str, int], bytes, Check]]


def _expect(needle: bytes) -> Check:
    return lambda reply: None if needle in reply else f"{len(reply)} B, no {needle!r}"


def _echo(netd: NetdProcess, trial: int) -> tuple[tuple[str, int], bytes, Check]:
    return netd.address("echo"), b"hello\n", lambda r: None if r == b"hello\n" else f"{r[:20]!r}"


def _echo_64k(netd: NetdProcess, trial: int) -> tuple[tuple[str, int], bytes, Check]:
    data = bytes(range(256)) * 256
    return netd.address("echo"), data, lambda r: None if r == data else f"{len(r)} of 65536 B"


def _chargen(netd: NetdProcess, trial: int) -> tuple[tuple[str, int], bytes, Check]:
    return netd.address("chargen"), b"", lambda r: None if len(r) >= 74 else f"{len(r)} B"


def _daytime(netd: NetdProcess, trial: int) -> tuple[tuple[str, int], bytes, Check]:
    return netd.address("daytime"), b"", lambda r: None if r.endswith(b"\n") else f"{r!r}"


def _irc(netd: NetdProcess, trial: int) -> tuple[tuple[str, int], bytes, Check]:
    nick = f"hc{trial}i"
    return netd.address("chat"), f"NICK {nick}\r\nUSER h 0 * :h\r\n".encode(), _expect(b" 001 ")


def _line(netd: NetdProcess, trial: int) -> tuple[tuple[str, int], bytes, Check]:
    request = f"/nick hc{trial}l\r\n/rooms\r\n".encode()
    return line_chat_address(netd), request, _expect(b"lobby")


def _http(path: str, check: Check) -> Case:
    def case(netd: NetdProcess, trial: int) -> tuple[tuple[str, int], bytes, Check]:
        # No "Connection: close": a keep-alive request, as curl or a script sends.
        request = f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        return netd.address("web"), request, check

    return case


def _whole_big_file(reply: bytes) -> str | None:
    head, _, body = reply.partition(b"\r\n\r\n")
    if head.startswith(b"HTTP/1.1 200") and len(body) == BIG_FILE_SIZE:
        return None
    return f"{head[:12]!r}, {len(body)} of {BIG_FILE_SIZE} B"


def _dns_tcp(netd: NetdProcess, trial: int) -> tuple[tuple[str, int], bytes, Check]:
    wire = dns.message.make_query("www.netd.test", "A").to_wire()

    def check(reply: bytes) -> str | None:
        if len(reply) < 2 or len(reply) - 2 != struct.unpack(">H", reply[:2])[0]:
            return f"{len(reply)} B"
        return None

    return netd.address("dns"), struct.pack(">H", len(wire)) + wire, check


def _admin(netd: NetdProcess, trial: int) -> tuple[tuple[str, int], bytes, Check]:
    request = (
        f"GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\r\n"
    ).encode()
    return admin_address(netd), request, _expect(b" 200 ")


def _ftp(netd: NetdProcess, trial: int) -> tuple[tuple[str, int], bytes, Check]:
    request = b"USER anonymous\r\nPASS x@y\r\nPWD\r\nQUIT\r\n"
    return netd.address("files"), request, _expect(b"221")


def _smtp(netd: NetdProcess, trial: int) -> tuple[tuple[str, int], bytes, Check]:
    request = (
        "EHLO client.test\r\nMAIL FROM:<a@client.test>\r\nRCPT TO:<half@netd.test>\r\n"
        f"DATA\r\nSubject: half-close {trial}\r\n\r\nbody\r\n.\r\nQUIT\r\n"
    ).encode()

    def check(reply: bytes) -> str | None:
        answered = b"250 2.0.0" in reply
        # The spool write may end after the connection did: give it a moment.
        deadline = time.monotonic() + 2
        while True:
            stored = [m for m in netd.messages("mail") if m["subject"] == f"half-close {trial}"]
            if stored or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if answered and len(stored) == 1:
            return None
        return f"250 {'read' if answered else 'lost'}, stored {len(stored)}x"

    return netd.address("mail"), request, check


CASES: dict[str, Case] = {
    "echo": _echo,
    "echo 64 KiB": _echo_64k,
    "chargen": _chargen,
    "daytime": _daytime,
    "irc registration": _irc,
    "line chat": _line,
    "http canned route": _http("/health", _expect(b" 200 ")),
    "http static 1 MiB": _http("/big.bin", _whole_big_file),
    "http proxy route": _http("/proxy/half", _expect(b"upstream /half")),
    "dns over tcp": _dns_tcp,
    "admin /healthz": _admin,
    "ftp login, PWD, QUIT": _ftp,
    "smtp EHLO..DATA..QUIT": _smtp,
}


def _one(netd: NetdProcess, case: Case, trial: int) -> str | None:
    address, request, check = case(netd, trial)
    try:
        with connect(address) as sock:
            if request:
                sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
            reply = read_until_closed(sock, READ_TIMEOUT)
    except OSError as e:
        return f"{type(e).__name__}"
    try:
        return check(reply)
    except (OSError, AdminError) as e:
        return f"check failed: {e}"


def _probe(netd: NetdProcess, name: str, trials: int) -> Row:
    # SMTP trials are numbered apart so that each message's subject is its own.
    offset = 1000 * list(CASES).index(name)
    failures = [_one(netd, CASES[name], offset + trial) for trial in range(trials)]
    failed = [f for f in failures if f is not None]
    result = f"reply whole {trials - len(failed)}/{trials}"
    if failed:
        result += f"; e.g. {failed[0]}"
    return Row(FAMILY, name, trials, result, verdict="DEFECT" if failed else "ok")


def probe_all(daemon: Daemon, trials: int) -> list[Row]:
    sampler = Sampler(daemon)
    with ThreadPoolExecutor(max_workers=len(CASES)) as pool:
        rows = list(pool.map(lambda name: _probe(daemon.netd, name, trials), CASES))
    summary = sampler.finish(Row(FAMILY, "daemon after all kinds", trials * len(CASES), "-"))
    summary.result = "still running" if daemon.alive() else summary.result
    return [*rows, summary]


def run(base: Path, budget: Budget) -> list[Row]:
    with full_daemon(base) as (daemon, _, _):
        return probe_all(daemon, budget.count(3, 1))
