#!/usr/bin/env python3
"""
TCP echo load client: the same client drives every echo server of the benchmark.

    echo_client.py PORT MODE [--host H] [--conns N] [--duration S] [--size B] [--max-ops N]

MODE
  rr       N (50) connections; each sends SIZE (64) bytes, waits for all of them to
           come back, repeats.  -> rate = round trips/s, plus lat_p50_us, lat_p99_us
  bulk     N (4) connections stream 256 KiB writes, at most 2 MiB un-echoed per
           connection.  -> rate = echoed bytes/s received back
  connect  N (16) concurrent workers: connect, send SIZE bytes, read the echo,
           close, repeat.  -> rate = completed connections/s

Adapted from the peer baseline's client (peer-bench load/echo_client.py) so that netd
is measured exactly like the anchors were: a plain non-blocking epoll loop, stdlib
only, because an asyncio client was the bottleneck against the faster servers.

Every run is bounded in time and in count: a 0.5 s warm-up, then a measured window
that ends after DURATION seconds (at most 30) or after --max-ops operations,
whichever comes first; connect mode drains for at most 5 s more.

Output is JSON, one object a line, so that the driver (bench/echo.py) can sample the
server's CPU time exactly over the measured window:
  {"event": "start"}   the measured window begins
  {"event": "end"}     the measured window is over
  {"result": {...}}    rate, errors, latencies, client_cpu_pct, window_s
"""

from __future__ import annotations

import argparse
import errno
import json
import resource
import select
import socket
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

MAX_DURATION = 30.0
WARMUP = 0.5
CHUNK = 256 * 1024
WINDOW = 2 << 20  # bytes un-echoed per bulk connection: keeps both sides' buffers bounded
DEFAULT_CONNS = {"rr": 50, "bulk": 4, "connect": 16}
DEFAULT_MAX_OPS = {"rr": 5e7, "bulk": 100 * 2**30, "connect": 2e6}
IN, OUT, ERR = select.EPOLLIN, select.EPOLLOUT, select.EPOLLERR | select.EPOLLHUP


def _emit(obj: dict[str, Any]) -> None:
    # Flushed at once: the driver reads the server's CPU counters when this line arrives.
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Clock:
    """A warm-up, then a measured window bounded by duration and max_ops."""

    def __init__(self, duration: float, max_ops: float) -> None:
        self.t_start = time.perf_counter() + WARMUP
        self.t_end = self.t_start + duration
        self.max_ops = max_ops
        self.c0: int | None = None
        self.t0 = 0.0
        self.cpu0 = 0.0
        self.cpu_pct = 0.0
        self.window = 0.0
        self.ended = False

    def tick(self, now: float, count: int) -> bool:
        """Whether the run is over; starts the window once the warm-up has passed."""
        if self.c0 is None:
            if now >= self.t_start:
                self.c0, self.t0 = count, now
                self.t_end = now + (self.t_end - self.t_start)
                self.cpu0 = _cpu()
                _emit({"event": "start"})
            # Callers tick at least every 50 ms (their poll timeout), so the window
            # always opens and the run always ends.
            return False
        return now >= self.t_end or count - self.c0 >= self.max_ops

    def rate(self, now: float, count: int) -> float:
        """Closes the window (once) and returns operations per second within it."""
        if self.c0 is None or now <= self.t0:
            return 0.0
        if not self.ended:
            self.ended = True
            _emit({"event": "end"})
            self.window = now - self.t0
            self.cpu_pct = 100 * (_cpu() - self.cpu0) / self.window
        return (count - self.c0) / self.window


@dataclass
class Outcome:
    rate: float
    errors: int
    window: float
    client_cpu_pct: float
    latencies: list[float] = field(default_factory=list)


def _connect(host: str, port: int) -> socket.socket:
    s = socket.create_connection((host, port), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.setblocking(False)
    return s


def run_rr(host: str, port: int, conns: int, size: int, duration: float, max_ops: float) -> Outcome:
    """Request/response: every connection keeps one SIZE-byte message in flight."""
    ep = select.epoll()
    msg = b"m" * size
    st: dict[int, list[Any]] = {}  # fd -> [socket, bytes still expected, sent at]
    for _ in range(conns):
        s = _connect(host, port)
        st[s.fileno()] = [s, 0, 0.0]
        ep.register(s.fileno(), IN)
    now = time.perf_counter()
    for first in st.values():
        first[1], first[2] = size, now
        first[0].send(msg)
    clock = Clock(duration, max_ops)
    count = errors = 0
    lat: list[float] = []
    while True:
        events = ep.poll(0.05)
        now = time.perf_counter()
        for fd, _ev in events:
            rec = st.get(fd)
            if rec is None:
                continue
            try:
                data = rec[0].recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                errors += 1
                ep.unregister(fd)
                rec[0].close()
                del st[fd]
                continue
            rec[1] -= len(data)
            if rec[1] <= 0:
                count += 1
                # Every 16th round trip is enough for p99 and keeps the list small.
                if clock.c0 is not None and not count & 15:
                    lat.append(now - rec[2])
                rec[1], rec[2] = size, now
                rec[0].send(msg)
        if clock.tick(now, count) or not st:
            break
    rate = clock.rate(now, count)
    for rec in st.values():
        rec[0].close()
    ep.close()
    return Outcome(rate, errors, clock.window, clock.cpu_pct, lat)


def run_bulk(
    host: str, port: int, conns: int, size: int, duration: float, max_ops: float
) -> Outcome:
    """Streaming: count echoed bytes received back; SIZE is unused (CHUNK-sized writes)."""
    ep = select.epoll()
    chunk = b"x" * CHUNK
    buf = bytearray(1 << 20)
    st: dict[int, list[Any]] = {}  # fd -> [socket, sent, received, wants EPOLLOUT]
    for _ in range(conns):
        s = _connect(host, port)
        st[s.fileno()] = [s, 0, 0, True]
        ep.register(s.fileno(), IN | OUT)
    clock = Clock(duration, max_ops)
    total = errors = 0
    while True:
        events = ep.poll(0.05)
        now = time.perf_counter()
        for fd, ev in events:
            rec = st.get(fd)
            if rec is None:
                continue
            s = rec[0]
            if ev & (IN | ERR):
                try:
                    n = s.recv_into(buf)
                except BlockingIOError:
                    n = -1
                except OSError:
                    n = 0
                if n == 0:
                    errors += 1
                    ep.unregister(fd)
                    s.close()
                    del st[fd]
                    continue
                if n > 0:
                    rec[2] += n
                    total += n
            if ev & OUT and rec[1] - rec[2] < WINDOW:
                # try/except, not contextlib.suppress: this is the client's hot loop.
                try:  # noqa: SIM105
                    rec[1] += s.send(chunk)
                except BlockingIOError:
                    pass
            want = rec[1] - rec[2] < WINDOW
            if want != rec[3]:
                rec[3] = want
                ep.modify(fd, IN | OUT if want else IN)
        if clock.tick(now, total) or not st:
            break
    rate = clock.rate(now, total)
    for rec in st.values():
        rec[0].close()
    ep.close()
    return Outcome(rate, errors, clock.window, clock.cpu_pct)


def run_connect(
    host: str, port: int, workers: int, size: int, duration: float, max_ops: float
) -> Outcome:
    """Connection churn: connect, one SIZE-byte echo, close, again."""
    ep = select.epoll()
    msg = b"m" * size
    addr = (host, port)
    st: dict[int, list[Any]] = {}  # fd -> [socket, bytes still expected, connected]
    count = errors = 0

    def start() -> bool:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        rc = s.connect_ex(addr)
        if rc not in (0, errno.EINPROGRESS):
            s.close()
            return False
        st[s.fileno()] = [s, size, False]
        ep.register(s.fileno(), OUT)
        return True

    def finish(fd: int, ok: bool) -> None:
        nonlocal count, errors
        rec = st.pop(fd)
        ep.unregister(fd)
        rec[0].close()
        if ok:
            count += 1
        else:
            errors += 1

    for _ in range(workers):
        start()
    clock = Clock(duration, max_ops)
    stopping = False
    rate = 0.0
    while st:
        events = ep.poll(0.05)
        now = time.perf_counter()
        for fd, _ev in events:
            rec = st.get(fd)
            if rec is None:
                continue
            s = rec[0]
            if not rec[2]:
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
                    finish(fd, False)
                else:
                    rec[2] = True
                    s.send(msg)
                    ep.modify(fd, IN)
                    continue
            else:
                try:
                    data = s.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    finish(fd, False)
                else:
                    rec[1] -= len(data)
                    if rec[1] > 0:
                        continue
                    finish(fd, True)
            if not stopping:
                while not start():
                    errors += 1
                    time.sleep(0.01)
                    if errors > 10000:
                        stopping = True
                        break
        if not stopping and clock.tick(now, count):
            stopping = True
            rate = clock.rate(now, count)
        # The drain after the window is bounded too (a worker stuck on a dead server).
        if time.perf_counter() > clock.t_end + 5:
            break
    if not stopping:
        rate = clock.rate(now, count)
    for rec in st.values():
        rec[0].close()
    ep.close()
    return Outcome(rate, errors, clock.window, clock.cpu_pct)


RUNNERS = {"rr": run_rr, "bulk": run_bulk, "connect": run_connect}


def summarize(outcome: Outcome) -> dict[str, Any]:
    """The result object: rate plus latency percentiles when there are enough samples."""
    result: dict[str, Any] = {
        "rate": outcome.rate,
        "errors": outcome.errors,
        "window_s": outcome.window,
        "client_cpu_pct": outcome.client_cpu_pct,
    }
    lat = sorted(outcome.latencies)
    if len(lat) > 100:
        q = statistics.quantiles(lat, n=100)
        result["lat_p50_us"] = q[49] * 1e6
        result["lat_p99_us"] = q[98] * 1e6
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("port", type=int)
    ap.add_argument("mode", choices=sorted(RUNNERS))
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--conns", type=int, default=None)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--max-ops", type=float, default=None)
    a = ap.parse_args(argv)
    duration = max(0.1, min(a.duration, MAX_DURATION))
    conns = a.conns or DEFAULT_CONNS[a.mode]
    max_ops = a.max_ops or DEFAULT_MAX_OPS[a.mode]
    outcome = RUNNERS[a.mode](a.host, a.port, conns, a.size, duration, max_ops)
    _emit({"result": summarize(outcome)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
