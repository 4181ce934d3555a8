#!/usr/bin/env python3
"""
The proxy kind against the TCP forwarders people use: Twisted's portforward
(`twistd portforward`) and socat, in front of one asyncio echo server.

    proxy_bench.py [--rounds N] [--duration S] [--proxies netd,portforward,socat]

Per round, each proxy (and the echo server alone, "direct") is measured by
bench/echo_client.py, the client of every echo benchmark:
  bulk  4 connections streaming 256 KiB writes: echoed bytes/s (MB/s here);
  rr    1 connection, one 64-byte message in flight: p50 round trip, and what
        the proxy adds to the direct p50.
The proxy's own CPU seconds per GB echoed during bulk are shown too (not for
socat, which forks a process per connection): steadier than MB/s on a loaded
machine.  netd runs with no toxics.  The rounds interleave the proxies so that a load
change on the machine hits all of them alike; the table gives each one's median,
and netd's bulk against each peer as the median of the ratios within each round.
Every run is bounded: at most 10 rounds of at most 10 s per case.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _bench import VENV_BIN, Server, cpu_seconds, pinned, wait_for

BENCH_DIR = Path(__file__).parent
CLIENT = BENCH_DIR / "echo_client.py"
MAX_ROUNDS, MAX_DURATION = 10, 10.0
WARMUP = 0.5  # echo_client.py's, before its measured window


class Upstream(Server):
    """The asyncio echo server of bench/echo_servers.py: it prints its port."""

    name = "upstream"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [*pinned(1), sys.executable, str(BENCH_DIR / "echo_servers.py"), "asyncio"],
            stdout=subprocess.PIPE,
        )
        assert self.process.stdout is not None
        self.port = int(self.process.stdout.readline())


class Netd(Server):
    name = "netd"

    def __init__(self, work: Path, upstream: int) -> None:
        super().__init__(work)
        (work / "proxy.yaml").write_text(
            "services:\n  px:\n    type: proxy\n"
            f'    listen: ["tcp:{self.port}:interface=127.0.0.1"]\n'
            f"    upstream: 127.0.0.1:{upstream}\n"
        )

    def command(self) -> list[str]:
        return [str(VENV_BIN / "netd"), "run", str(self.work / "proxy.yaml")]


class PortForward(Server):
    name = "portforward"

    def __init__(self, work: Path, upstream: int) -> None:
        super().__init__(work)
        self.upstream = upstream

    def command(self) -> list[str]:
        return [
            *[str(VENV_BIN / "twistd"), "--nodaemon", "--pidfile=", "portforward"],
            *["-p", f"tcp:{self.port}:interface=127.0.0.1", "-h", "127.0.0.1"],
            *["-d", str(self.upstream)],
        ]


class Socat(Server):
    name = "socat"

    def __init__(self, work: Path, upstream: int) -> None:
        super().__init__(work)
        self.upstream = upstream

    def command(self) -> list[str]:
        return [
            "socat",
            f"TCP-LISTEN:{self.port},bind=127.0.0.1,fork,reuseaddr",
            f"TCP:127.0.0.1:{self.upstream}",
        ]


def measure(port: int, mode: str, duration: float) -> dict[str, float]:
    args = ["--duration", str(duration)]
    if mode == "rr":
        args += ["--conns", "1", "--size", "64"]
    done = subprocess.run(
        [*pinned(0), sys.executable, str(CLIENT), str(port), mode, *args],
        capture_output=True,
        text=True,
        timeout=duration + 30,
        check=True,
    )
    for line in done.stdout.splitlines():
        row = json.loads(line)
        if "result" in row:
            result: dict[str, float] = row["result"]
            return result
    raise SystemExit(f"no result from the client on port {port}: {done.stderr}")


def _p50_us(result: dict[str, float]) -> float:
    """
    The client's p50 (it samples every 16th round trip, so it needs 1,600 of
    them); a short run on a slow machine gets the mean instead, which one
    connection with one message in flight gives as 1 / rate.
    """
    return result.get("lat_p50_us", 1e6 / result["rate"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--proxies", default="netd,portforward,socat")
    options = parser.parse_args(argv)
    rounds = max(1, min(options.rounds, MAX_ROUNDS))
    duration = max(0.5, min(options.duration, MAX_DURATION))
    wanted = [name for name in options.proxies.split(",") if name]
    if "socat" in wanted and shutil.which("socat") is None:
        print("socat is not installed: left out", file=sys.stderr)
        wanted.remove("socat")
    kinds = {"netd": Netd, "portforward": PortForward, "socat": Socat}
    with tempfile.TemporaryDirectory(prefix="proxy-bench-") as scratch:
        upstream = Upstream(Path(scratch))
        upstream.start()
        wait_for(lambda: upstream.ready(), "the upstream echo")
        servers = {name: kinds[name](Path(scratch), upstream.port) for name in wanted}
        rows: dict[str, dict[str, list[float]]] = {
            name: {"bulk": [], "p50": [], "cpu": []} for name in ["direct", *servers]
        }
        try:
            for server in servers.values():
                server.start()
            for round_number in range(rounds):
                print(f"round {round_number + 1}/{rounds}", file=sys.stderr)
                ports = {"direct": upstream.port, **{n: s.port for n, s in servers.items()}}
                for name, port in ports.items():
                    server = servers.get(name)
                    before = cpu_seconds(server.pid) if server is not None else 0.0
                    bulk = measure(port, "bulk", duration)
                    rows[name]["bulk"].append(bulk["rate"])
                    if server is not None:
                        # Over the client's warm-up and window alike.
                        echoed = bulk["rate"] * (bulk["window_s"] + WARMUP)
                        rows[name]["cpu"].append((cpu_seconds(server.pid) - before) / echoed * 1e9)
                    rows[name]["p50"].append(_p50_us(measure(port, "rr", duration)))
        finally:
            for server in servers.values():
                if server.process is not None:
                    server.stop()
            upstream.stop()
    direct_p50 = statistics.median(rows["direct"]["p50"])
    netd_bulk = rows["netd"]["bulk"] if "netd" in rows else []
    print("| proxy | bulk MB/s | netd's bulk is | CPU s/GB | p50 64 B round trip µs | added µs |")
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        bulk, p50 = statistics.median(row["bulk"]), statistics.median(row["p50"])
        ratio = ""
        if netd_bulk and name not in ("netd", "direct"):
            # Within each round, then the median: a load change between rounds cancels out.
            ratios = [n / b for n, b in zip(netd_bulk, row["bulk"], strict=True)]
            ratio = f"{statistics.median(ratios):.2f}x"
        added = f"{p50 - direct_p50:.0f}" if name != "direct" else ""
        cpu = f"{statistics.median(row['cpu']):.2f}" if row["cpu"] and name != "socat" else ""
        print(f"| {name} | {bulk / 1e6:.0f} | {ratio} | {cpu} | {p50:.0f} | {added} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
