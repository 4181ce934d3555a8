"""
How netd scales with worker processes: `workers: N` for each N asked (default
1 and 2), http 1 KiB under wrk and dns local under a UDP load, same run.

    python bench/workers_bench.py [--workers 1,2] [--rounds 2] [--duration 5]

Each round starts netd fresh for each N (in a rotated order) with one map: an
http service serving a 1 KiB file (no access log) and a dns service answering
1000 names from a hosts file, both with `workers: N` and no admin API (so no
journal traffic between the processes).  netd (main process and workers) runs
on --server-cpus and the load on --load-cpus when taskset exists: give the
server as many cores as the largest N, or the figures measure the pinning.

The http load is `wrk -t1 -cC`; the dns load is dnsperf when installed, else
the UDP client below (one socket, --outstanding queries in flight).  Server CPU
is the main process's plus its workers', read from /proc around each case.
Prints medians of the throughput, of the work per server CPU-second, and the
ratio of each N to the first.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _bench import VENV_BIN, cpu_seconds, wait_for

NAMES = 1000
DOMAIN = "bench.test"
_MOST_ROUNDS = 10
_MOST_SECONDS = 30


def _taskset(cpus: str) -> list[str]:
    return ["taskset", "-c", cpus] if cpus and shutil.which("taskset") else []


class Netd:
    """netd with http and dns services, each run by C{workers} processes."""

    def __init__(self, work: Path, workers: int, cpus: str) -> None:
        self.work = work
        self.workers = workers
        self.cpus = cpus
        self.ports_file = work / f"ports-{workers}.json"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        config = self.work / f"netd-{self.workers}.yaml"
        config.write_text(
            f"""
services:
  web:
    type: http
    workers: {self.workers}
    listen: ["tcp:0:interface=127.0.0.1"]
    root: {self.work / "www"}
    access_log: false
    max_connections: 4096
  dns:
    type: dns
    workers: {self.workers}
    listen: ["udp:0:interface=127.0.0.1"]
    ttl: 3600
    hosts_file: {self.work / "hosts"}
"""
        )
        self.ports_file.unlink(missing_ok=True)
        command = [
            str(VENV_BIN / "twistd"),
            "-n",
            "--pidfile=",
            f"--logfile={self.work / f'netd-{self.workers}.log'}",
            "netd",
            "-c",
            str(config),
            "--ports-file",
            str(self.ports_file),
        ]
        self.process = subprocess.Popen(_taskset(self.cpus) + command, cwd=self.work)
        wait_for(self.ports_file.exists, f"netd with {self.workers} workers", timeout=60)
        ports = json.loads(self.ports_file.read_text())["services"]
        self.http_port = ports["web"]["listeners"][0]["port"]
        self.dns_port = ports["dns"]["listeners"][0]["port"]

    @property
    def pids(self) -> list[int]:
        """The main process and its workers."""
        assert self.process is not None
        main = self.process.pid
        children = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue  # gone meanwhile
                if int(stat.rpartition(")")[2].split()[1]) == main:
                    children.append(int(entry.name))
        return [main, *children]

    def cpu(self) -> float:
        total = 0.0
        for pid in self.pids:
            try:
                total += cpu_seconds(pid)
            except OSError:
                continue  # gone meanwhile
        return total

    def stop(self) -> None:
        assert self.process is not None
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def wrk(port: int, seconds: int, connections: int, cpus: str) -> float:
    """Requests per second of one wrk run on the 1 KiB file."""
    result = subprocess.run(
        [
            *_taskset(cpus),
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            f"http://127.0.0.1:{port}/1k.bin",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 30,
    )
    if "Non-2xx" in result.stdout or "Socket errors" in result.stdout:
        print(f"    warning: {result.stdout.strip().splitlines()[-3:]}", file=sys.stderr)
    found = re.search(r"Requests/sec:\s+([\d.]+)", result.stdout)
    assert found is not None, result.stdout
    return float(found.group(1))


def _query(ident: int, name: str) -> bytes:
    header = struct.pack(">HHHHHH", ident, 0x0100, 1, 0, 0, 0)
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return header + labels + b"\x00\x00\x01\x00\x01"


def udp_load(port: int, seconds: int, outstanding: int) -> float:
    """
    Answers per second from one socket keeping C{outstanding} queries in
    flight; a query unanswered for a second is sent again, as dnsperf would
    count it lost.
    """
    queries = [_query(i, f"host{i % NAMES}.{DOMAIN}") for i in range(65536)]
    sent_at: dict[int, float] = {}
    answered = 0
    next_id = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
        end = time.monotonic() + seconds
        while (now := time.monotonic()) < end:
            for ident, when in list(sent_at.items()):
                if now - when > 1.0:
                    del sent_at[ident]
            while len(sent_at) < outstanding:
                ident = next_id
                next_id = (next_id + 1) % 65536
                try:
                    sock.send(queries[ident])
                except BlockingIOError:
                    break
                sent_at[ident] = now
            readable, _, _ = select.select([sock], [], [], 0.05)
            while readable:
                try:
                    answer = sock.recv(512)
                except BlockingIOError:
                    break
                if sent_at.pop(struct.unpack(">H", answer[:2])[0], None) is not None:
                    answered += 1
    return answered / seconds


def dnsperf(port: int, seconds: int, outstanding: int, cpus: str, work: Path) -> float:
    result = subprocess.run(
        [
            *_taskset(cpus),
            "dnsperf",
            "-s",
            "127.0.0.1",
            "-p",
            str(port),
            "-d",
            str(work / "queries"),
            "-l",
            str(seconds),
            "-q",
            str(outstanding),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 30,
    )
    found = re.search(r"Queries per second:\s+([\d.]+)", result.stdout)
    assert found is not None, result.stdout
    return float(found.group(1))


def prepare(work: Path) -> None:
    (work / "www").mkdir()
    (work / "www" / "1k.bin").write_bytes(os.urandom(1024))
    (work / "hosts").write_text(
        "".join(f"127.0.{i // 256}.{i % 256} host{i}.{DOMAIN}\n" for i in range(NAMES))
    )
    (work / "queries").write_text("".join(f"host{i}.{DOMAIN} A\n" for i in range(NAMES)))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=int, default=5, help="seconds of load a case")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections")
    parser.add_argument("--outstanding", type=int, default=100, help="dns queries in flight")
    parser.add_argument("--cases", default="http,dns")
    cores = os.cpu_count() or 1
    parser.add_argument("--load-cpus", default="0" if cores > 1 else "")
    parser.add_argument("--server-cpus", default=f"1-{cores - 1}" if cores > 2 else "")
    options = parser.parse_args()
    counts = [int(n) for n in options.workers.split(",")]
    cases = options.cases.split(",")
    if not 1 <= options.rounds <= _MOST_ROUNDS or not 1 <= options.duration <= _MOST_SECONDS:
        raise SystemExit(f"--rounds 1-{_MOST_ROUNDS}, --duration 1-{_MOST_SECONDS}")
    if "http" in cases and shutil.which("wrk") is None:
        raise SystemExit("needs wrk: apt-get install -y wrk")
    if cores < 3:
        print(
            f"note: {cores} cores: netd shares its cores with the load; "
            "the ratios show overhead, not scaling",
            file=sys.stderr,
        )

    # rows[case][workers] = [(throughput, per server CPU-second), ...]
    rows: dict[str, dict[int, list[tuple[float, float]]]] = {
        c: {n: [] for n in counts} for c in cases
    }
    with tempfile.TemporaryDirectory(prefix="netd-workers-bench-") as scratch:
        work = Path(scratch)
        prepare(work)
        for round_number in range(options.rounds):
            order = counts[round_number % len(counts) :] + counts[: round_number % len(counts)]
            for workers in order:
                netd = Netd(work, workers, options.server_cpus)
                netd.start()
                try:
                    for case in cases:
                        print(
                            f"round {round_number + 1}: {case}, {workers} workers", file=sys.stderr
                        )
                        before = netd.cpu()
                        if case == "http":
                            rate = wrk(
                                netd.http_port,
                                options.duration,
                                options.connections,
                                options.load_cpus,
                            )
                        elif shutil.which("dnsperf"):
                            rate = dnsperf(
                                netd.dns_port,
                                options.duration,
                                options.outstanding,
                                options.load_cpus,
                                work,
                            )
                        else:
                            rate = udp_load(netd.dns_port, options.duration, options.outstanding)
                        used = netd.cpu() - before
                        rows[case][workers].append(
                            (rate, rate * options.duration / max(used, 1e-9))
                        )
                finally:
                    netd.stop()
    report(rows, counts, options)


def report(
    rows: dict[str, dict[int, list[tuple[float, float]]]],
    counts: list[int],
    options: argparse.Namespace,
) -> None:
    dns_load = "dnsperf" if shutil.which("dnsperf") else "the built-in UDP client"
    print(
        f"\n{options.rounds} rounds x {options.duration} s; http: wrk -t1 -c{options.connections} "
        f"on 1 KiB; dns: {dns_load}, {options.outstanding} in flight; "
        f"server CPUs {options.server_cpus or 'any'}, load CPUs {options.load_cpus or 'any'}\n"
    )
    print("| case | workers | per second | per server CPU-second | vs first (throughput, CPU) |")
    print("|---|---|---|---|---|")
    for case, by_count in rows.items():
        base = by_count[counts[0]]
        base_rate = statistics.median(r for r, _ in base)
        base_efficiency = statistics.median(e for _, e in base)
        for workers in counts:
            rate = statistics.median(r for r, _ in by_count[workers])
            efficiency = statistics.median(e for _, e in by_count[workers])
            print(
                f"| {case} | {workers} | {rate:,.0f} | {efficiency:,.0f} | "
                f"{rate / base_rate:.2f}x, {efficiency / base_efficiency:.2f}x |"
            )


if __name__ == "__main__":
    main()
