"""
What a matched JSON stub route costs: netd's stub route against its own plain
canned route, and against pytest-httpserver (werkzeug) serving the same stub.

    python bench/stubs_bench.py [--rounds 3] [--duration 5] [--connections 20]

Every case gets the same request from `wrk -t1 -cN` (a Lua script): a POST of a
small JSON order with `Content-Type: application/json`.  The cases:

- `netd canned`: a plain route (`{path: /canned, body: ...}`) answers it, body unread;
- `netd stub`: a route that matches on the method, the Content-Type and a JSON
  subset of the body, and answers JSON with the order's customer in it (a template);
- `httpserver stub`: pytest-httpserver (`pip install -e '.[bench]'`) with
  `expect_request(method, json=..., headers=...)` answering the same JSON.

Each round starts every server fresh on a free loopback port (rotated order),
pinned to CPU 1 with wrk on CPU 0 when taskset exists; netd logs each request,
werkzeug too.  Prints medians and the ratios taken within each round.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import _bench
from _bench import VENV_BIN, pinned

ORDER = {"customer": {"name": "alice", "tier": "gold"}, "items": [{"sku": "A-1", "qty": 2}]}
ANSWER = {"id": 1, "customer": "alice", "status": "accepted"}
CASES = {"netd canned": "/canned", "netd stub": "/orders", "httpserver stub": "/orders"}


class Netd(_bench.Server):
    name = "netd"

    def command(self) -> list[str]:
        config = self.work / "netd-stubs.yaml"
        config.write_text(
            f"""
services:
  web:
    type: http
    listen: ["tcp:{self.port}:interface=127.0.0.1"]
    access_log: true
    max_connections: 4096
    routes:
      - {{path: /canned, body: '{json.dumps(ANSWER)}', headers: {{Content-Type: application/json}}}}
      - path: /orders
        method: POST
        match:
          headers: {{Content-Type: {{contains: json}}}}
          body: {{json: {{customer: {{name: alice}}}}}}
        template: true
        json: {{id: 1, customer: "{{{{request.json.customer.name}}}}", status: accepted}}
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


class HTTPServer(_bench.Server):
    name = "httpserver"

    def command(self) -> list[str]:
        return [sys.executable, str(Path(__file__).resolve()), "--serve", str(self.port)]


def serve(port: int) -> None:
    """pytest-httpserver as a suite uses it, on C{port} until SIGTERM."""
    import signal
    import threading

    from pytest_httpserver import HTTPServer as Stubbed

    server = Stubbed(host="127.0.0.1", port=port)
    server.expect_request(
        "/orders", method="POST", json=ORDER, headers={"Content-Type": "application/json"}
    ).respond_with_json(ANSWER)
    server.start()
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    stopped.wait()
    server.stop()


def wrk(port: int, path: str, seconds: int, connections: int, script: Path) -> float:
    """req/s of one wrk run; non-2xx answers are reported, not counted as fine."""
    result = subprocess.run(
        [
            *pinned(0),
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            "-s",
            str(script),
            f"http://127.0.0.1:{port}{path}",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    if "Non-2xx" in result.stdout or "Socket errors" in result.stdout:
        raise SystemExit(f"{path} on {port} answered badly:\n{result.stdout}")
    found = re.search(r"Requests/sec:\s+([\d.]+)", result.stdout)
    assert found is not None, result.stdout
    return float(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.serve:
        serve(options.serve)
        return
    if shutil.which("wrk") is None:
        raise SystemExit("needs wrk: apt-get install -y wrk")
    results: dict[str, list[float]] = {case: [] for case in CASES}
    with tempfile.TemporaryDirectory(prefix="netd-stubs-bench-") as scratch:
        work = Path(scratch)
        script = work / "post.lua"
        body = json.dumps(ORDER).replace("\\", "\\\\").replace('"', '\\"')
        script.write_text(
            'wrk.method = "POST"\n'
            f'wrk.body = "{body}"\n'
            'wrk.headers["Content-Type"] = "application/json"\n'
        )
        kinds: list[type[_bench.Server]] = [Netd, HTTPServer]
        for round_number in range(options.rounds):
            shift = round_number % len(kinds)
            for kind in kinds[shift:] + kinds[:shift]:
                server = kind(work)
                server.start()
                try:
                    cases = [c for c in CASES if c.startswith(server.name + " ")]
                    wrk(server.port, CASES[cases[-1]], 1, options.connections, script)  # warm
                    for case in cases:
                        rps = wrk(
                            server.port, CASES[case], options.duration, options.connections, script
                        )
                        results[case].append(rps)
                        print(
                            f"round {round_number + 1} {case:16} {rps:10,.0f} req/s",
                            file=sys.stderr,
                        )
                finally:
                    server.stop()
    report(results, options)


def report(results: dict[str, list[float]], options: argparse.Namespace) -> None:
    print(
        f"\nwrk -t1 -c{options.connections}, {options.duration} s a case, "
        f"{options.rounds} rounds, medians\n"
    )
    print("| case | req/s |")
    print("|---|---|")
    for case, runs in results.items():
        print(f"| {case} | {statistics.median(runs):,.0f} |")
    print()
    summary: dict[str, float] = {}
    for ours, theirs in (("netd stub", "netd canned"), ("netd stub", "httpserver stub")):
        # Other work on the machine moves whole rounds; ratios within a round do not.
        rounds = [a / b for a, b in zip(results[ours], results[theirs], strict=True)]
        summary[f"{ours} / {theirs}"] = round(statistics.median(rounds), 2)
        print(
            f"{ours} / {theirs}: {statistics.median(rounds):.2f}x median of rounds "
            f"({', '.join(f'{r:.2f}' for r in rounds)})"
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
