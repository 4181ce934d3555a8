"""
netd's http kind against `twistd web --path` and nginx, same wrk load, same run.

    python bench/http_bench.py [--rounds 3] [--duration 5] [--connections 50]

Each round starts every server fresh on a free loopback port (in a rotated order),
warms it up for a second, then runs `wrk -t1 -cN` against a 1 KiB file, a 1 MiB
file and a canned route (nginx: `return 200`; twistd web has none).  Servers run
on CPU 1 and wrk on CPU 0 when taskset exists.  Every server logs each request:
netd through twisted.logger to its log file, twistd web its combined log, nginx
its access log.  Prints medians of req/s, MiB/s, requests per server CPU-second
(the server's process and its children: nginx's worker), peak RSS, and netd's
ratios in both.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _bench
from _bench import VENV_BIN, pinned, proc_mib, tree_cpu_seconds

CASES = {"1k": "/1k.bin", "1m": "/1m.bin", "canned": "/canned"}
HERE = Path(__file__).resolve().parent


class Server(_bench.Server):
    def __init__(self, work: Path, www: Path) -> None:
        super().__init__(work)
        self.www = www


class Netd(Server):
    name = "netd"

    def command(self) -> list[str]:
        config = self.work / "netd-bench.yaml"
        config.write_text(
            f"""
services:
  web:
    type: http
    listen: ["tcp:{self.port}:interface=127.0.0.1"]
    root: {self.www}
    access_log: true
    max_connections: 4096
    routes:
      - {{path: /canned, body: "ok\\n"}}
"""
        )
        self.ports = self.work / "netd-ports.json"
        self.ports.unlink(missing_ok=True)
        return [
            str(VENV_BIN / "twistd"),
            "-n",
            "--pidfile=",
            f"--logfile={self.work / 'netd.log'}",
            "netd",
            "-c",
            str(config),
            "--ports-file",
            str(self.ports),
        ]

    def ready(self) -> bool:
        return self.ports.exists()


class TwistdWeb(Server):
    name = "twistd-web"

    def command(self) -> list[str]:
        return [
            str(VENV_BIN / "twistd"),
            "-n",
            "--pidfile=",
            f"--logfile={self.work / 'twistd-web.log'}",
            "web",
            "--listen",
            f"tcp:{self.port}:interface=127.0.0.1",
            "--path",
            str(self.www),
        ]


class Nginx(Server):
    name = "nginx"

    def command(self) -> list[str]:
        prefix = self.work / "nginx"
        (prefix / "logs").mkdir(parents=True, exist_ok=True)
        conf = prefix / "nginx.conf"
        conf.write_text(
            f"""
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log;
events {{ worker_connections 4096; }}
http {{
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    access_log {prefix}/logs/access.log;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen 127.0.0.1:{self.port};
        root {self.www};
        location = /canned {{ default_type text/plain; return 200 "ok\\n"; }}
    }}
}}
"""
        )
        return ["nginx", "-p", str(prefix), "-c", str(conf)]


class FloorEpoll(Server):
    """CPython's floor: no reactor, no parsing (http_floor.py); the 1 KiB case only."""

    name = "floor-epoll"
    flags: tuple[str, ...] = ()

    def command(self) -> list[str]:
        floor = HERE / "http_floor.py"
        return [sys.executable, str(floor), str(self.port), str(self.www / "1k.bin"), *self.flags]


class FloorTwisted(FloorEpoll):
    """What Twisted's reactor adds to that floor: a bare protocol, Twisted's writes."""

    name = "floor-twisted"
    flags = ("--twisted",)


class FloorTwistedNow(FloorEpoll):
    """The bare protocol writing as netd does: at once when nothing is queued."""

    name = "floor-twisted-now"
    flags = ("--twisted-now",)


FLOORS = ("floor-epoll", "floor-twisted", "floor-twisted-now")
_UNITS = {"B": 1 / 2**20, "KB": 1 / 1024, "MB": 1, "GB": 1024}


def wrk(port: int, path: str, seconds: int, connections: int) -> tuple[float, float]:
    """req/s and MiB/s of one wrk run."""
    result = subprocess.run(
        [
            *pinned(0),
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            f"http://127.0.0.1:{port}{path}",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", result.stdout).group(1))  # type: ignore[union-attr]
    amount, unit = re.search(r"Transfer/sec:\s+([\d.]+)(\w+)", result.stdout).groups()  # type: ignore[union-attr]
    if "Non-2xx" in result.stdout or "Socket errors" in result.stdout:
        print(f"    warning: {result.stdout.strip().splitlines()[-3:]}", file=sys.stderr)
    return rps, float(amount) * _UNITS[unit]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument(
        "--servers",
        default="netd,twistd-web,nginx,floor-twisted,floor-twisted-now",
        help="also: floor-epoll",
    )
    options = parser.parse_args()
    missing = [tool for tool in ("wrk", "nginx") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"needs {' and '.join(missing)}: apt-get install -y wrk nginx-light")
    kinds = {k.name: k for k in (Netd, TwistdWeb, Nginx, FloorEpoll, FloorTwisted, FloorTwistedNow)}
    chosen = [kinds[name] for name in options.servers.split(",")]
    with tempfile.TemporaryDirectory(prefix="netd-bench-") as scratch:
        work = Path(scratch)
        work.chmod(0o755)  # nginx's worker drops root and must reach the files
        www = work / "www"
        www.mkdir()
        (www / "1k.bin").write_bytes(os.urandom(1024))
        (www / "1m.bin").write_bytes(os.urandom(1 << 20))
        results: dict[str, dict[str, list[tuple[float, float, float]]]] = {}
        rss: dict[str, list[float]] = {}
        for round_number in range(options.rounds):
            shift = round_number % len(chosen)
            for kind in chosen[shift:] + chosen[:shift]:
                server = kind(work, www)
                server.start()
                try:
                    wrk(server.port, CASES["1k"], 1, options.connections)
                    for case, path in CASES.items():
                        if (case == "canned" and kind is TwistdWeb) or (
                            case != "1k" and server.name in FLOORS
                        ):
                            continue
                        cpu, started = tree_cpu_seconds(server.pid), time.monotonic()
                        rps, mib = wrk(server.port, path, options.duration, options.connections)
                        busy = tree_cpu_seconds(server.pid) - cpu
                        per_cpu = rps * (time.monotonic() - started) / busy if busy else 0.0
                        measured = (rps, mib, per_cpu)
                        results.setdefault(server.name, {}).setdefault(case, []).append(measured)
                        print(
                            f"round {round_number + 1} {server.name:10} {case:6} "
                            f"{rps:10,.0f} req/s {mib:8,.1f} MiB/s {per_cpu:10,.0f} per CPU-s",
                            file=sys.stderr,
                        )
                    rss.setdefault(server.name, []).append(proc_mib(server.pid))
                finally:
                    server.stop()
        report(results, rss, options)


def report(
    results: dict[str, dict[str, list[tuple[float, float, float]]]],
    rss: dict[str, list[float]],
    options: argparse.Namespace,
) -> None:
    def median(name: str, case: str, index: int) -> float | None:
        runs = results.get(name, {}).get(case)
        return statistics.median(r[index] for r in runs) if runs else None

    print(
        f"\nwrk -t1 -c{options.connections}, {options.duration} s a case, "
        f"{options.rounds} rounds, medians\n"
    )
    print("| server | case | req/s | MiB/s | req per server CPU-s | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for name in results:
        for case in CASES:
            rps = median(name, case, 0)
            if rps is None:
                continue
            mib = median(name, case, 1) or 0.0
            per_cpu = median(name, case, 2) or 0.0
            print(
                f"| {name} | {case} | {rps:,.0f} | {mib:,.1f} | {per_cpu:,.0f} | "
                f"{statistics.median(rss[name]):.1f} |"
            )
    print()
    summary: dict[str, float] = {}
    for case in CASES:
        netd = median("netd", case, 0)
        for peer in ("twistd-web", "nginx", *FLOORS):
            other = median(peer, case, 0)
            if not (netd and other):
                continue
            for index, measure, key in ((0, "req/s", ""), (2, "per CPU-s", " per CPU")):
                # Other work on the machine moves whole rounds; ratios within a round do not.
                pairs = zip(results["netd"][case], results[peer][case], strict=True)
                rounds = [ours[index] / theirs[index] for ours, theirs in pairs if theirs[index]]
                if not rounds:
                    continue
                summary[f"{case} netd/{peer}{key}"] = round(statistics.median(rounds), 2)
                print(
                    f"{case:6} netd / {peer} {measure}: {statistics.median(rounds):.2f}x median"
                    f" of rounds ({', '.join(f'{r:.2f}' for r in rounds)})"
                )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
