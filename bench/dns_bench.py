"""
netd's dns kind against `twistd dns` and dnsmasq, same dnsperf load, same run.

    python bench/dns_bench.py [--rounds 3] [--duration 5] [--outstanding 100] [--baseline SRC]

Two cases over UDP, 1000 names hostN.bench.test (TTL 3600) asked in a shuffled order:
- local: answered from local data: netd from a hosts file, `twistd dns --pyzone`
  (twistd's faster local source: its --hosts-file is ten times slower), dnsmasq
  from --addn-hosts;
- cached: a caching forwarder in front of an upstream dnsmasq on loopback, after
  one warm-up pass over all names: netd's `forward` and dnsmasq's `--server`.
  twistd dns forwards only to resolv.conf servers on port 53, so it is left out.

Both cases also run `python-floor` (dns_floor.py): a bare CPython loop of recvfrom,
a dict lookup and sendto, answers learned from the upstream in the warm-up pass.
It is what the interpreter alone costs a query, the most any CPython server could
reach here; the run prints it against dnsmasq too.

Each round starts every server fresh on a free loopback port (in a rotated order).
Servers run on CPU 1 and dnsperf on CPU 0 when taskset exists.  Prints medians of
queries per second and peak RSS, and netd's ratios within each round.  With
C{--baseline SRC} (another netd's src/ folder, say C{git archive main src | tar
-x -C /tmp/base}) that netd runs too, as C{baseline}, for a before/after.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import _bench
from _bench import VENV_BIN, cpu_seconds, pinned, proc_mib

HERE = Path(__file__).resolve().parent
NAMES = 1000
DOMAIN = "bench.test"


def answers(port: int) -> bool:
    query = struct.pack(">HHHHHH", 7, 0x0100, 1, 0, 0, 0)
    query += b"".join(bytes([len(p)]) + p.encode() for p in f"host0.{DOMAIN}".split("."))
    query += b"\x00\x00\x01\x00\x01"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.2)
        try:
            sock.sendto(query, ("127.0.0.1", port))
            return sock.recv(512)[:2] == b"\x00\x07"
        except OSError:
            return False


class Server(_bench.Server):
    cases: tuple[str, ...] = ()

    def __init__(self, work: Path, upstream: int) -> None:
        super().__init__(work)
        self.upstream = upstream

    def ready(self) -> bool:
        return answers(self.port)


def twistd(*args: str) -> list[str]:
    return [str(VENV_BIN / "twistd"), "-n", "--pidfile=", *args]


class NetdLocal(Server):
    name = "netd"
    cases = ("local",)
    # Another netd's src/ folder, for --baseline (PYTHONPATH comes before site-packages).
    source: Path | None = None

    def command(self) -> list[str]:
        config = self.work / f"{self.name}-{self.port}.yaml"
        config.write_text(
            f"""
services:
  dns:
    type: dns
    listen: ["udp:{self.port}:interface=127.0.0.1"]
    ttl: 3600
    {self.data()}
"""
        )
        command = twistd(f"--logfile={self.work / f'{self.name}.log'}", "netd", "-c", str(config))
        if self.source is None:
            return command
        return ["env", f"PYTHONPATH={self.source}", *command]

    def data(self) -> str:
        return f"hosts_file: {self.work / 'hosts'}"


class NetdCached(NetdLocal):
    name = "netd"
    cases = ("cached",)

    def data(self) -> str:
        return f'forward: ["127.0.0.1:{self.upstream}"]'


class TwistdDns(Server):
    name = "twistd-dns"
    cases = ("local",)

    def command(self) -> list[str]:
        return twistd(
            f"--logfile={self.work / 'twistd-dns.log'}",
            "dns",
            "-i",
            "127.0.0.1",
            "-p",
            str(self.port),
            "--pyzone",
            str(self.work / "zone.py"),
        )


def dnsmasq(port: int, *args: str) -> list[str]:
    return [
        "dnsmasq",
        "--conf-file=/dev/null",
        "--no-daemon",
        f"--port={port}",
        "--listen-address=127.0.0.1",
        "--bind-interfaces",
        "--no-resolv",
        "--no-hosts",
        "--pid-file=",
        "--log-facility=-",
        *args,
    ]


class DnsmasqLocal(Server):
    name = "dnsmasq"
    cases = ("local",)

    def command(self) -> list[str]:
        return dnsmasq(self.port, f"--addn-hosts={self.work / 'hosts'}", "--local-ttl=3600")


class DnsmasqCached(Server):
    name = "dnsmasq"
    cases = ("cached",)

    def command(self) -> list[str]:
        return dnsmasq(self.port, f"--server=127.0.0.1#{self.upstream}", "--cache-size=10000")


class PythonFloor(Server):
    """dns_floor.py: what the interpreter alone costs a query (learned from the upstream)."""

    name = "python-floor"
    cases = ("local", "cached")

    def command(self) -> list[str]:
        return [sys.executable, str(HERE / "dns_floor.py"), str(self.port), str(self.upstream)]


SERVERS: dict[str, dict[str, type[Server]]] = {
    "local": {
        "netd": NetdLocal,
        "twistd-dns": TwistdDns,
        "dnsmasq": DnsmasqLocal,
        "python-floor": PythonFloor,
    },
    "cached": {"netd": NetdCached, "dnsmasq": DnsmasqCached, "python-floor": PythonFloor},
}


def address(i: int) -> str:
    return f"127.1.{i // 250}.{i % 250 + 1}"


def make_data(work: Path) -> None:
    names = [f"host{i}.{DOMAIN}" for i in range(NAMES)]
    (work / "hosts").write_text("".join(f"{address(i)}\t{n}\n" for i, n in enumerate(names)))
    zone = [
        f"zone = [\n    SOA('{DOMAIN}', mname='ns.{DOMAIN}', rname='root.{DOMAIN}', serial=1,"
        " refresh='1H', retry='1H', expire='1H', minimum='1H', ttl=3600),\n"
    ]
    zone += [f"    A('{n}', '{address(i)}', ttl=3600),\n" for i, n in enumerate(names)]
    (work / "zone.py").write_text("".join(zone) + "]\n")
    shuffled = names[:]
    random.Random(42).shuffle(shuffled)
    (work / "queries.txt").write_text("".join(f"{n} A\n" for n in shuffled))


def dnsperf(port: int, queries: Path, seconds: float, outstanding: int) -> float:
    """Queries per second of one dnsperf run (bounded in time and in passes)."""
    result = subprocess.run(
        [
            *pinned(0),
            "dnsperf",
            "-s",
            "127.0.0.1",
            "-p",
            str(port),
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
    lost = re.search(r"Queries lost:\s+(\d+)", result.stdout)
    if match is None:
        raise SystemExit(f"dnsperf failed:\n{result.stdout}\n{result.stderr}")
    if lost and int(lost.group(1)):
        print(f"    warning: {lost.group(0)}", file=sys.stderr)
    return float(match.group(1))


def warm_up(port: int, queries: Path) -> None:
    """One pass over every name: fills the caches."""
    subprocess.run(
        ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(queries), "-n", "1", "-t", "2"],
        capture_output=True,
        timeout=60,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5)
    parser.add_argument("--outstanding", type=int, default=100)
    parser.add_argument("--cases", default="local,cached")
    parser.add_argument("--servers", default="netd,twistd-dns,dnsmasq,python-floor")
    parser.add_argument("--baseline", type=Path, help="another netd's src/ to measure too")
    options = parser.parse_args()
    if options.baseline is not None:
        for case, netd in (("local", NetdLocal), ("cached", NetdCached)):
            SERVERS[case]["baseline"] = type(
                "Baseline", (netd,), {"name": "baseline", "source": options.baseline.resolve()}
            )
        options.servers += ",baseline"
    if not 1 <= options.rounds <= 20 or not 0.5 <= options.duration <= 15:
        raise SystemExit("--rounds 1 to 20, --duration 0.5 to 15")
    missing = [tool for tool in ("dnsperf", "dnsmasq") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"needs {' and '.join(missing)}: apt-get install -y dnsperf dnsmasq")
    wanted = options.servers.split(",")
    with tempfile.TemporaryDirectory(prefix="netd-dns-bench-") as scratch:
        work = Path(scratch)
        work.chmod(0o755)  # dnsmasq drops root and must reach the hosts file
        make_data(work)
        queries = work / "queries.txt"
        upstream = DnsmasqLocal(work, 0)
        upstream.name = "upstream"
        upstream.start()
        results: dict[str, dict[str, list[float]]] = {}
        rss: dict[str, list[float]] = {}
        cpu: dict[str, list[float]] = {}
        try:
            for round_number in range(options.rounds):
                for case in options.cases.split(","):
                    chosen = [k for n, k in SERVERS[case].items() if n in wanted]
                    shift = round_number % len(chosen)
                    for kind in chosen[shift:] + chosen[:shift]:
                        server = kind(work, upstream.port)
                        server.start()
                        try:
                            warm_up(server.port, queries)
                            used = cpu_seconds(server.pid)
                            qps = dnsperf(
                                server.port, queries, options.duration, options.outstanding
                            )
                            # CPU per query moves less than q/s when other work shares the CPU.
                            used = cpu_seconds(server.pid) - used
                            per_query = used / (qps * options.duration) * 1e6
                            results.setdefault(case, {}).setdefault(server.name, []).append(qps)
                            rss.setdefault(f"{case} {server.name}", []).append(proc_mib(server.pid))
                            cpu.setdefault(f"{case} {server.name}", []).append(per_query)
                            print(
                                f"round {round_number + 1} {case:6} {server.name:10} "
                                f"{qps:10,.0f} q/s {per_query:6.1f} us CPU a query",
                                file=sys.stderr,
                            )
                        finally:
                            server.stop()
        finally:
            upstream.stop()
        report(results, rss, cpu, options)


def report(
    results: dict[str, dict[str, list[float]]],
    rss: dict[str, list[float]],
    cpu: dict[str, list[float]],
    options: argparse.Namespace,
) -> None:
    print(
        f"\ndnsperf -q {options.outstanding} over UDP, {options.duration:g} s a case, "
        f"{options.rounds} rounds, medians\n"
    )
    print("| case | server | queries/s | server CPU us a query | peak RSS MiB |")
    print("|---|---|---|---|---|")
    for case, servers in results.items():
        for name, runs in servers.items():
            print(
                f"| {case} | {name} | {statistics.median(runs):,.0f} | "
                f"{statistics.median(cpu[f'{case} {name}']):.1f} | "
                f"{statistics.median(rss[f'{case} {name}']):.1f} |"
            )
    print()
    summary: dict[str, float] = {}
    for case, servers in results.items():
        ours = servers.get("netd")
        for peer, theirs in servers.items():
            if peer == "netd" or not ours:
                continue
            # Other work on the machine moves whole rounds; ratios within a round do not.
            rounds = [a / b for a, b in zip(ours, theirs, strict=True)]
            summary[f"{case} netd/{peer}"] = round(statistics.median(rounds), 2)
            print(
                f"{case:6} netd / {peer}: {statistics.median(rounds):.2f}x median of rounds "
                f"({', '.join(f'{r:.2f}' for r in rounds)})"
            )
        floor, dnsmasq = servers.get("python-floor"), servers.get("dnsmasq")
        if floor and dnsmasq:
            # Where the interpreter alone stands: the most any netd could reach.
            rounds = [a / b for a, b in zip(floor, dnsmasq, strict=True)]
            summary[f"{case} python-floor/dnsmasq"] = round(statistics.median(rounds), 2)
            print(
                f"{case:6} python-floor / dnsmasq: {statistics.median(rounds):.2f}x median of "
                f"rounds ({', '.join(f'{r:.2f}' for r in rounds)})"
            )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
