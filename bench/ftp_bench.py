"""
netd's ftp kind against pyftpdlib, same clients, same run.

    python bench/ftp_bench.py [--rounds 3] [--duration 5] [--size-mib 100]

pyftpdlib must be importable by this Python (``pip install pyftpdlib``: a benchmark
peer, not a dependency of netd).  Each round starts both servers fresh on free
loopback ports, in a rotated order, anonymous with write access to a scratch root,
and measures with curl a 100 MiB download and a 100 MiB upload (3 of each, the
servers alternating), then a loop of connect + anonymous login + LIST + QUIT
from 4 ftplib threads (``--duration`` seconds per server, in two alternating
halves).  Servers run on CPU 1 and clients on CPU 0 when taskset exists.  Prints
the medians per server, netd/pyftpdlib ratios (taken within each round) and
idle and peak RSS.
"""

from __future__ import annotations

import argparse
import ftplib
import importlib.util
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import _bench
from _bench import VENV_BIN, cpu_seconds, pinned, proc_mib


def greets(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            return sock.recv(100).startswith(b"220")
    except OSError:
        return False


class Server(_bench.Server):
    def __init__(self, work: Path, root: Path) -> None:
        super().__init__(work)
        self.root = root

    def ready(self) -> bool:
        return greets(self.port)


class Netd(Server):
    name = "netd"

    def command(self) -> list[str]:
        config = self.work / "netd-ftp-bench.yaml"
        config.write_text(
            f"""
services:
  files:
    type: ftp
    listen: ["tcp:{self.port}:interface=127.0.0.1"]
    root: {self.root}
    anonymous: write
    max_connections: 4096
    max_connections_per_client: 4096
"""
        )
        return [
            str(VENV_BIN / "twistd"),
            "-n",
            "--pidfile=",
            f"--logfile={self.work / 'netd.log'}",
            "netd",
            "-c",
            str(config),
        ]


class Pyftpdlib(Server):
    name = "pyftpdlib"

    def command(self) -> list[str]:
        # -w: anonymous write, as netd's anonymous: write above.
        return [sys.executable, "-m", "pyftpdlib", "-i", "127.0.0.1", "-p", str(self.port),
                "-d", str(self.root), "-w"]  # fmt: skip


def curl_rate(*args: str) -> float:
    """MiB/s of one curl transfer, by curl's own clock."""
    done = subprocess.run(
        [*pinned(0), "curl", "-sS", "--max-time", "60", "-o", "/dev/null",
         "-w", "%{size_download} %{size_upload} %{time_total}", *args],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    down, up, seconds = done.stdout.split()
    return max(float(down), float(up)) / float(seconds) / 2**20


def sessions_per_second(port: int, duration: float, client: str, threads: int = 4) -> float:
    """
    Completed sessions a second; failed ones (the machine out of ports) do not count.

    Every session's control and data connections come from C{client}, a loopback
    address of this run and server alone: thousands of sessions leave their
    connections in TIME_WAIT, and a server measured after another would otherwise
    meet the earlier one's leftovers on the same address pairs (the peer harness's
    sessions case was skewed that way).
    """
    completed = [0] * threads
    end = time.monotonic() + duration

    def worker(i: int) -> None:
        lines: list[str] = []
        while time.monotonic() < end:
            try:
                session = ftplib.FTP(source_address=(client, 0))
                session.connect("127.0.0.1", port, timeout=10)
                session.login()
                session.retrlines("LIST", lines.append)
                session.quit()
            except (OSError, ftplib.Error, EOFError):
                time.sleep(0.01)
                continue
            completed[i] += 1

    started = time.monotonic()
    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    return sum(completed) / (time.monotonic() - started)


# A fresh loopback source address for each sessions measurement (see sessions_per_second).
_clients = (f"127.0.{high}.{low}" for high in range(1, 255) for low in range(1, 255))


def measure_round(
    servers: list[Server], source: Path, duration: float
) -> dict[str, dict[str, float]]:
    """
    One round with every server up at once: each measurement alternates between
    the servers, so a burst of load on this shared machine hits both alike.
    """
    found: dict[str, dict[str, list[float]]] = {s.name: {} for s in servers}

    def record(server: Server, key: str, value: float) -> None:
        found[server.name].setdefault(key, []).append(value)

    for server in servers:
        record(server, "rss_idle_mib", proc_mib(server.pid, "VmRSS"))
        curl_rate(f"ftp://127.0.0.1:{server.port}/big.bin")  # warm the page cache and server
        # And one upload: on this VM a process's first 100 MiB written to the page
        # cache often cost 150-300 ms of kernel CPU (in the copy into new pages),
        # later ones 20 ms, in any program (a plain Python writer too), which
        # made a server's upload CPU depend on which run was its first.
        curl_rate("-T", str(source), f"ftp://127.0.0.1:{server.port}/up.bin")
        os.unlink(server.root / "up.bin")
    size_mib = source.stat().st_size / 2**20

    def timed(
        server: Server, key: str, per_run: float | None, run: Callable[..., float], *args: object
    ) -> None:
        """Record the rate, and the work done and the server CPU it took (busy-proof)."""
        before = cpu_seconds(server.pid)
        started = time.monotonic()
        rate = run(*args)
        elapsed = time.monotonic() - started
        record(server, key, rate)
        work[server.name][key][0] += per_run if per_run is not None else rate * elapsed
        work[server.name][key][1] += cpu_seconds(server.pid) - before

    cases = ("download_mib_s", "upload_mib_s", "sessions_s")
    work = {s.name: {case: [0.0, 0.0] for case in cases} for s in servers}

    for _ in range(3):
        for server in servers:
            base = f"ftp://127.0.0.1:{server.port}"
            timed(server, "download_mib_s", size_mib, curl_rate, f"{base}/big.bin")
            timed(server, "upload_mib_s", size_mib, curl_rate, "-T", str(source), f"{base}/up.bin")
            os.unlink(server.root / "up.bin")
    for _ in range(2):
        for server in servers:
            client = next(_clients)
            run = sessions_per_second
            timed(server, "sessions_s", None, run, server.port, duration / 2, client)
    for server in servers:
        record(server, "rss_peak_mib", proc_mib(server.pid))
        # Summed over the repeats: one transfer takes a few clock ticks of CPU.
        for case, (amount, spent) in work[server.name].items():
            record(server, case.rsplit("_", 1)[0] + "_per_cpu_s", amount / max(spent, 0.01))
    return {
        name: {key: statistics.median(values) for key, values in keys.items()}
        for name, keys in found.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--size-mib", type=int, default=100)
    options = parser.parse_args()
    options.rounds = min(options.rounds, 10)
    options.duration = min(options.duration, 15.0)
    if shutil.which("curl") is None:
        raise SystemExit("curl is needed")
    if importlib.util.find_spec("pyftpdlib") is None:
        raise SystemExit("pyftpdlib is needed: pip install pyftpdlib")
    with tempfile.TemporaryDirectory(prefix="ftp-bench-") as scratch:
        work = Path(scratch)
        block = os.urandom(1 << 20)
        source = work / "upload.bin"
        with source.open("wb") as big:
            for _ in range(options.size_mib):
                big.write(block)
        results: dict[str, list[dict[str, float]]] = {"netd": [], "pyftpdlib": []}
        kinds: list[type[Server]] = [Netd, Pyftpdlib]
        for round_number in range(options.rounds):
            order = kinds[round_number % 2 :] + kinds[: round_number % 2]
            servers = []
            for kind in order:
                # Each its own root: uploads land next to the file the other serves.
                root = work / kind.name
                root.mkdir(exist_ok=True)
                if not (root / "big.bin").exists():
                    shutil.copyfile(source, root / "big.bin")
                    for i in range(20):
                        (root / f"small-{i}.txt").write_text("x" * 100)
                server = kind(work, root)
                server.start()
                servers.append(server)
            try:
                measured = measure_round(servers, source, options.duration)
            finally:
                for server in servers:
                    server.stop()
            for name, values in measured.items():
                results[name].append(values)
                print(f"round {round_number + 1} {name}: {values}", file=sys.stderr)
        report(results)


def report(results: dict[str, list[dict[str, float]]]) -> None:
    keys = list(results["netd"][0])
    names = list(results)
    print(f"{'':22}" + "".join(f"{name:>14}" for name in names) + f"{'netd/pyftpdlib':>26}")
    for key in keys:
        per_round = [
            n[key] / p[key]
            for n, p in zip(results["netd"], results["pyftpdlib"], strict=True)
            if p[key]
        ]
        medians = [statistics.median(r[key] for r in results[name]) for name in names]
        ratio = f"{statistics.median(per_round):.2f}x ({min(per_round):.2f}-{max(per_round):.2f})"
        print(f"{key:22}" + "".join(f"{m:14.1f}" for m in medians) + f"{ratio:>26}")


if __name__ == "__main__":
    main()
