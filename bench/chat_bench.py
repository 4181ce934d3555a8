#!/usr/bin/env python3
"""
netd's chat benchmark: fan-out in one IRC room, netd against ngIRCd.

    .venv/bin/python bench/chat_bench.py [--rounds 3] [--clients 100] [--senders 1,10]
        [--baseline OTHER_CHECKOUT/.venv/bin/twistd]

The servers are measured in the same run, by the same client, in interleaved
rounds (the order rotates each round):

  netd       twistd -n netd on a generated map: one chat service on tcp:0
  ngircd     Debian's ngircd -n on a generated config (penalties off, no DNS/ident)
  netd-base  with --baseline: the same map under another build's twistd, so a
             change is measured against the code before it in the same rounds

The load: C{--clients} IRC clients register and join #bench; in each case of
C{--senders}, that many of them send C{--messages} PRIVMSGs in all, as fast as
the room drains (at most C{--window} messages in flight past the slowest
receiver).  Every other member
receives each message.  Headline: messages delivered per second (deliveries to
members / time from the first send to the last delivery).  Also the server's RSS
when idle, its peak RSS, and its CPU seconds over the fan-out.

Loopback only; the server is pinned to CPU 1 and this client to CPU 0 when there
are two; each round is bounded by C{--timeout}; every server started here is
stopped by its PID.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from _bench import cpu_seconds, free_port, proc_mib

ROOT = Path(__file__).resolve().parent.parent
TWISTD = Path(sys.executable).parent / "twistd"
MARKER = b" PRIVMSG #bench :"

NETD_MAP = """\
state_dir: state
services:
  chat:
    type: chat
    listen: ["tcp:{port}:interface=127.0.0.1"]
    rooms: [bench]
    history: 0
    flood: {{messages: 100000, per_seconds: 1}}
    max_connections: 10000
"""

NGIRCD_CONF = """\
[Global]
Name = bench.ngircd.test
Info = bench
Listen = 127.0.0.1
Ports = {port}
PidFile = {dir}/ngircd.pid
MotdPhrase = bench
[Limits]
MaxConnections = 0
MaxConnectionsIP = 0
MaxJoins = 0
MaxNickLength = 30
MaxPenaltyTime = 0
PingTimeout = 600
PongTimeout = 600
[Options]
DNS = no
Ident = no
PAM = no
"""


def pin(pid: int, cpu: int) -> None:
    if os.cpu_count() and os.cpu_count() >= 2:  # type: ignore[operator]
        with contextlib.suppress(OSError):
            os.sched_setaffinity(pid, {cpu})


@contextlib.contextmanager
def server(name: str, workdir: Path, twistd: Path) -> Iterator[tuple[int, int]]:
    """Start one server; yield (pid, port) once it accepts connections."""
    port = free_port()
    if name.startswith("netd"):
        config = workdir / "chat.yaml"
        config.write_text(NETD_MAP.format(port=port))
        command = [str(twistd), "--nodaemon", "--pidfile=", "netd", "-c", str(config)]
    else:
        config = workdir / "ngircd.conf"
        config.write_text(NGIRCD_CONF.format(port=port, dir=workdir))
        command = ["ngircd", "--nodaemon", "--config", str(config)]
    log = (workdir / f"{name}.log").open("wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    try:
        pin(process.pid, 1)
        deadline = time.monotonic() + 20
        while True:
            if process.poll() is not None:
                output = (workdir / f"{name}.log").read_text(errors="replace")
                raise RuntimeError(f"{name} exited:\n{output[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not start listening") from None
                time.sleep(0.05)
        yield process.pid, port
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@dataclass
class Member:
    sock: socket.socket
    nick: str
    buffer: bytes = b""
    received: int = 0
    registered: bool = False
    joined: bool = False
    tail: bytes = b""


def _drain(sel: selectors.BaseSelector, timeout: float) -> None:
    for key, _ in sel.select(timeout):
        member: Member = key.data
        try:
            data = member.sock.recv(1 << 18)
        except BlockingIOError:
            continue
        if not data:
            raise RuntimeError(f"{member.nick}: the server closed the connection")
        # A marker may straddle two reads: count across the previous read's tail.
        member.received += (member.tail + data).count(MARKER)
        member.tail = data[-(len(MARKER) - 1) :]
        if member.joined:
            if b"PING" in data:
                for line in (member.buffer + data).split(b"\r\n"):
                    if line.startswith(b"PING"):
                        member.sock.sendall(b"PONG" + line[4:] + b"\r\n")
            member.buffer = data[-600:]
            continue
        member.buffer += data
        if b" 001 " in member.buffer:
            member.registered = True
        if b" 366 " in member.buffer:
            member.joined = True
            member.buffer = b""
        elif b"PING" in member.buffer:
            for line in member.buffer.split(b"\r\n"):
                if line.startswith(b"PING"):
                    member.sock.sendall(b"PONG" + line[4:] + b"\r\n")
            member.buffer = member.buffer[-600:]


def fan_out(
    port: int, clients: int, senders: int, messages: int, window: int, timeout: float
) -> dict[str, float]:
    sel = selectors.DefaultSelector()
    members = []
    deadline = time.monotonic() + timeout
    for n in range(clients):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setblocking(False)
        member = Member(sock, f"b{n:03d}")
        members.append(member)
        sel.register(sock, selectors.EVENT_READ, member)
        sock.sendall(f"NICK {member.nick}\r\nUSER {member.nick} 0 * :bench\r\n".encode())
        while not member.registered:
            _drain(sel, 0.05)
            if time.monotonic() > deadline:
                raise RuntimeError("registration timed out")
        sock.sendall(b"JOIN #bench\r\n")
    while not all(m.joined for m in members):
        _drain(sel, 0.05)
        if time.monotonic() > deadline:
            raise RuntimeError("joining timed out")
    time.sleep(0.2)
    _drain(sel, 0)
    for member in members:
        member.received = 0
    speakers = members[:senders]
    text = b"x" * 80
    sent = 0
    start = time.monotonic()
    expected = messages * (clients - 1)
    while sum(m.received for m in members) < expected:
        slowest = min(m.received + (sent // senders if m in speakers else 0) for m in members)
        while sent < messages and sent - slowest < window:
            speaker = speakers[sent % senders]
            speaker.sock.sendall(b"PRIVMSG #bench :" + text + b" %d\r\n" % sent)
            sent += 1
        _drain(sel, 0.01)
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"fan-out timed out: {sum(m.received for m in members)} of {expected}"
            )
    elapsed = time.monotonic() - start
    for member in members:
        sel.unregister(member.sock)
        member.sock.close()
    return {
        "deliveries_s": expected / elapsed,
        "messages_s": messages / elapsed,
        "seconds": elapsed,
    }


def measure(name: str, workdir: Path, args: argparse.Namespace, senders: int) -> dict[str, float]:
    twistd = args.baseline if name == "netd-base" else TWISTD
    with server(name, workdir, twistd) as (pid, port):
        time.sleep(0.3)
        idle = proc_mib(pid, "VmRSS") * 1024
        cpu_before = cpu_seconds(pid)
        try:
            result = fan_out(port, args.clients, senders, args.messages, args.window, args.timeout)
        except (OSError, RuntimeError):
            output = (workdir / f"{name}.log").read_text(errors="replace")
            print(f"{name} failed; the end of its log:\n{output[-3000:]}", file=sys.stderr)
            raise
        result["cpu_s"] = cpu_seconds(pid) - cpu_before
        result["idle_rss_mib"] = idle / 1024
        result["peak_rss_mib"] = proc_mib(pid)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, choices=range(1, 11), metavar="N")
    parser.add_argument("--clients", type=int, default=100, choices=range(2, 1001), metavar="N")
    parser.add_argument("--senders", default="1,10", help="cases: senders among the clients")
    parser.add_argument(
        "--messages", type=int, default=3000, choices=range(1, 100_001), metavar="N"
    )
    parser.add_argument("--window", type=int, default=100, choices=range(1, 10_001), metavar="N")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--servers", default="netd,ngircd")
    parser.add_argument(
        "--baseline", type=Path, metavar="TWISTD", help="also run netd-base under this twistd"
    )
    args = parser.parse_args()
    names = args.servers.split(",")
    if args.baseline:
        names.append("netd-base")
    cases = [int(n) for n in args.senders.split(",")]
    if "ngircd" in names and shutil.which("ngircd") is None:
        print("ngircd is not installed (apt-get install ngircd): netd alone", file=sys.stderr)
        names.remove("ngircd")
    pin(0, 0)
    rows: dict[tuple[int, str], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="chat-bench-") as tmp:
        for round_number in range(args.rounds):
            for senders in cases:
                turn = round_number % len(names)
                order = names[turn:] + names[:turn]
                for name in order:
                    workdir = Path(tmp) / f"{name}-{senders}-{round_number}"
                    workdir.mkdir()
                    result = measure(name, workdir, args, senders)
                    rows.setdefault((senders, name), []).append(result)
                    print(
                        f"round {round_number + 1}, {senders} sender(s), {name}:"
                        f" {result['deliveries_s']:,.0f} deliveries/s,"
                        f" cpu {result['cpu_s']:.2f} s, peak RSS {result['peak_rss_mib']:.1f} MiB",
                        file=sys.stderr,
                    )
    print(
        f"fan-out: {args.clients} clients in #bench, {args.messages} messages of 80 B,"
        f" window {args.window}; medians (min-max) of {args.rounds} rounds"
    )
    print("| senders | server | deliveries/s | server CPU s | idle RSS MiB | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for (senders, name), results in rows.items():
        deliveries = [r["deliveries_s"] for r in results]
        median = {key: statistics.median(r[key] for r in results) for key in results[0]}
        print(
            f"| {senders} | {name} | {median['deliveries_s']:,.0f}"
            f" ({min(deliveries):,.0f}-{max(deliveries):,.0f}) | {median['cpu_s']:.2f}"
            f" | {median['idle_rss_mib']:.1f} | {median['peak_rss_mib']:.1f} |"
        )
    for senders in cases:
        for netd in ("netd", "netd-base"):
            if (senders, netd) not in rows or (senders, "ngircd") not in rows:
                continue
            pairs = list(zip(rows[senders, netd], rows[senders, "ngircd"], strict=True))
            ratios = [n["deliveries_s"] / g["deliveries_s"] for n, g in pairs]
            cpu = [n["cpu_s"] / g["cpu_s"] for n, g in pairs]
            print(
                f"{senders} sender(s): {netd} / ngircd deliveries"
                f" {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}),"
                f" server CPU {statistics.median(cpu):.2f}x, ratios within each round"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
