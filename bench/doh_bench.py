"""
netd's DNS over HTTPS path as a share of its own UDP path: one netd, the same
1000 local names (hostN.bench.test from a hosts file, in a shuffled order) asked
over UDP by dnsperf and over DoH (GET, TLS) by h2load, HTTP/2 and HTTP/1.1, with
the same number of requests in flight, in interleaved rounds.

    python bench/doh_bench.py [--rounds 3] [--duration 5] [--outstanding 100] [--baseline SRC]

dnsperf's own DoH mode (2.10) waits about 100 ms between answers on a connection
whatever the server does, so it measures itself: h2load (nghttp2-client) loads
DoH here.  The issue's target is DoH >= 0.3x UDP.  Server on CPU 1, the load on
CPU 0 when taskset exists; medians of queries per second and the DoH/UDP ratio
of each round.  With C{--baseline SRC} (another netd's src/ folder, say
C{git archive main src | tar -x -C /tmp/base}) that netd is measured too, in
the same rounds, for a before/after on the same load.
"""

from __future__ import annotations

import argparse
import base64
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import _bench
import dns.message
from _bench import VENV_BIN, free_port, pinned
from dns_bench import answers, make_data

MODES = ("udp", "doh-h2", "doh-h1")


class Netd(_bench.Server):
    name = "netd"

    def __init__(self, work: Path, doh_port: int, source: Path | None = None) -> None:
        super().__init__(work)
        self.doh_port = doh_port
        self.source = source
        if source is not None:
            self.name = "baseline"

    def command(self) -> list[str]:
        config = self.work / f"doh-bench-{self.name}.yaml"
        config.write_text(
            f"""
state_dir: {self.work / "state"}
tls:
  bench: {{self_signed: [localhost, 127.0.0.1]}}
services:
  dns:
    type: dns
    listen: ["udp:{self.port}:interface=127.0.0.1"]
    doh: [{{endpoint: "ssl:{self.doh_port}:interface=127.0.0.1", tls: bench}}]
    hosts_file: {self.work / "hosts"}
    ttl: 3600
"""
        )
        if self.source is None:
            return [str(VENV_BIN / "netd"), "run", str(config)]
        # The same virtualenv, netd's code from SRC (PYTHONPATH comes before site-packages).
        return [
            "env",
            f"PYTHONPATH={self.source}",
            str(VENV_BIN / "python"),
            "-c",
            "from netd.cli import main; main()",
            "run",
            str(config),
        ]

    def ready(self) -> bool:
        return answers(self.port) and _bench.accepts(self.doh_port)


def udp_rate(netd: Netd, queries: Path, seconds: float, outstanding: int) -> float:
    """Queries per second of one dnsperf run over UDP (bounded in time and in passes)."""
    result = subprocess.run(
        [
            *pinned(0),
            "dnsperf",
            "-s",
            "127.0.0.1",
            "-p",
            str(netd.port),
            "-d",
            str(queries),
            "-l",
            str(seconds),
            "-n",
            "2000",
            "-q",
            str(outstanding),
            "-t",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
    )
    match = re.search(r"Queries per second:\s+([\d.]+)", result.stdout)
    if match is None:
        raise SystemExit(f"dnsperf failed:\n{result.stdout}\n{result.stderr}")
    return float(match.group(1))


def doh_rate(mode: str, netd: Netd, uris: Path, seconds: float, outstanding: int) -> float:
    """
    Requests per second of one h2load run: GETs of the query URIs, with
    C{outstanding} requests in flight (HTTP/2: 4 connections, streams
    multiplexed; HTTP/1.1: one connection per request in flight).
    """
    if mode == "doh-h2":
        shape = ["-c", "4", "-m", str(max(1, outstanding // 4))]
    else:
        shape = ["--h1", "-c", str(outstanding), "-m", "1"]
    result = subprocess.run(
        [
            *pinned(0),
            "h2load",
            "-t",
            "1",
            *shape,
            "-D",
            str(max(1, round(seconds))),
            "--warm-up-time",
            "1",
            "-i",
            str(uris),
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    )
    match = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", result.stdout)
    failed = re.search(r"(\d+) failed, (\d+) errored", result.stdout)
    if match is None or failed is None:
        raise SystemExit(f"h2load {mode} failed:\n{result.stdout}\n{result.stderr}")
    if failed.group(1) != "0" or failed.group(2) != "0":
        print(f"    warning: {mode}: {failed.group(0)}", file=sys.stderr)
    return float(match.group(1))


def make_uris(work: Path, port: int) -> Path:
    """The DoH GET URI of every query in queries.txt, in its order."""
    uris = work / f"uris-{port}.txt"
    lines = []
    for line in (work / "queries.txt").read_text().splitlines():
        name, rdtype = line.split()
        wire = dns.message.make_query(name, rdtype, id=0).to_wire()
        encoded = base64.urlsafe_b64encode(wire).rstrip(b"=").decode()
        lines.append(f"https://127.0.0.1:{port}/dns-query?dns={encoded}\n")
    uris.write_text("".join(lines))
    return uris


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--outstanding", type=int, default=100)
    parser.add_argument("--baseline", type=Path, help="another netd's src/ to measure too")
    args = parser.parse_args()
    sources: list[Path | None] = [None] if args.baseline is None else [None, args.baseline]
    names = ["netd", "baseline"][: len(sources)]
    results = {(name, mode): [] for name in names for mode in MODES}
    ratios = {(name, mode): [] for name in names for mode in MODES[1:]}
    with tempfile.TemporaryDirectory(prefix="doh-bench-") as scratch:
        work = Path(scratch)
        make_data(work)
        queries = work / "queries.txt"
        for round_number in range(args.rounds):
            # Rotated, so neither netd nor any mode always runs first.
            for source in sources[round_number % 2 :] + sources[: round_number % 2]:
                netd = Netd(work, free_port(), source)
                netd.start()
                try:
                    figures = {}
                    order = MODES[round_number % 3 :] + MODES[: round_number % 3]
                    uris = make_uris(work, netd.doh_port)
                    for mode in order:
                        if mode == "udp":
                            udp_rate(netd, queries, 1, args.outstanding)  # warm-up
                            rate = udp_rate(netd, queries, args.duration, args.outstanding)
                        else:
                            rate = doh_rate(mode, netd, uris, args.duration, args.outstanding)
                        figures[mode] = rate
                finally:
                    netd.stop()
                for mode, qps in figures.items():
                    results[netd.name, mode].append(qps)
                for mode in MODES[1:]:
                    ratios[netd.name, mode].append(figures[mode] / figures["udp"])
                shown = ", ".join(f"{mode} {figures[mode]:,.0f} q/s" for mode in MODES)
                print(f"round {round_number + 1} {netd.name}: {shown}", flush=True)
    print("\nmedians:")
    for (name, mode), values in results.items():
        print(f"  {name:8} {mode:9} {statistics.median(values):>10,.0f} q/s")
    for (name, mode), values in ratios.items():
        low, high = min(values), max(values)
        print(f"  {name:8} {mode} / udp: {statistics.median(values):.2f}x ({low:.2f}-{high:.2f})")


if __name__ == "__main__":
    main()
