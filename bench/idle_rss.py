#!/usr/bin/env python3
"""
Idle RSS of netd running one echo service against bare Twisted echo servers.

    .venv/bin/python bench/idle_rss.py [--runs 5]

Four servers, started one after the other in an order that rotates every run,
each read from /proc/PID/status (VmRSS) once ready and settled:

- netd on bench/echo.py's echo-only map (no admin API), under twistd
  (C{twistd -n netd -c MAP}) and under C{netd run MAP} (twistd's runner without
  its look through every installed plugin);
- bare Twisted: bench/echo_servers.py twisted, the peer baseline's
  echo_twisted.py (a script, no twistd), in this venv;
- the same script under C{twistd -n -y} (bench/echo.py's echo.tac): what twistd
  itself adds to any application;
- bare Twisted without TLS support: the same script with pyOpenSSL kept out,
  as in the peer baseline's venv, which has no pyOpenSSL.  Twisted's TCP
  transport imports pyOpenSSL and cryptography whenever they are installed,
  and netd needs them, so this one is for scale, not the target.

netd's bytecode is compiled first, as in bench/startup.py.  Prints each
server's median and netd's median difference (per run) from each; the target
(bench/echo.py's TARGET_RSS_MIB) is netd against bare Twisted in the same venv;
exits 1 if it is missed.
"""

from __future__ import annotations

import argparse
import compileall
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from echo import (
    IDLE_SETTLE,
    NETD_CONFIG,
    TARGET_RSS_MIB,
    Server,
    _wait_ports_file,
    spawn,
    start_netd,
    start_reference,
    start_twistd_tac,
    status_mib,
    stop_all,
)

import netd


def start_netd_run(work: Path) -> Server:
    """C{netd run MAP}: ready once the ports file exists, as start_netd."""
    work.mkdir(parents=True)
    config, ports, log = work / "netd.yaml", work / "ports.json", work / "netd.log"
    config.write_text(NETD_CONFIG)
    command = [str(Path(sys.executable).parent / "netd"), "run", str(config)]
    with log.open("wb") as out:
        process = spawn(
            [*command, "--ports-file", str(ports)],
            None,
            cwd=work,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    _wait_ports_file(process, ports, log)
    port = json.loads(ports.read_text())["services"]["echo"]["listeners"][0]["port"]
    return Server("netd-run", process, int(port), 0.0)


STARTS: dict[str, Callable[[Path], Server]] = {
    "netd echo": lambda work: start_netd(work, None),
    "netd run echo": start_netd_run,
    "bare Twisted": lambda work: start_reference("twisted", None),
    "twistd -y echo": lambda work: start_twistd_tac(work, None),
    "bare Twisted, no TLS": lambda work: start_reference("twisted-without-tls", None),
}
TARGET_PEER = "bare Twisted"


def idle_rss(server: Server) -> float:
    time.sleep(IDLE_SETTLE)
    return status_mib(server.pid, "VmRSS")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, choices=range(1, 51), metavar="N")
    options = parser.parse_args()
    compileall.compile_dir(Path(netd.__file__).parent, quiet=1)
    rss: dict[str, list[float]] = {name: [] for name in STARTS}
    names = list(STARTS)
    with tempfile.TemporaryDirectory(prefix="netd-rss-") as scratch:
        try:
            for run in range(options.runs):
                shift = run % len(names)
                for name in names[shift:] + names[:shift]:
                    work = Path(scratch) / f"{name.replace(' ', '-')}{run}"
                    rss[name].append(idle_rss(STARTS[name](work)))
                    stop_all()
        finally:
            stop_all()
    print(f"idle RSS, {options.runs} starts each, rotating order (VmRSS, MiB)")
    print("| server | median | min-max | netd minus it, median |\n|---|---|---|---|")
    for name, values in rss.items():
        gap = "" if name == "netd echo" else f"{_median_gap(rss['netd echo'], values):+.1f}"
        print(
            f"| {name} | {statistics.median(values):.1f} | {min(values):.1f}-{max(values):.1f}"
            f" | {gap} |"
        )
    gap = _median_gap(rss["netd echo"], rss[TARGET_PEER])
    run_gap = _median_gap(rss["netd run echo"], rss[TARGET_PEER])
    print(
        f"\nnetd - {TARGET_PEER}: {gap:+.1f} MiB under twistd, {run_gap:+.1f} MiB under"
        f" netd run (target <= {TARGET_RSS_MIB:g} under twistd)"
    )
    sys.exit(0 if gap <= TARGET_RSS_MIB else 1)


def _median_gap(ours: list[float], theirs: list[float]) -> float:
    return statistics.median(n - t for n, t in zip(ours, theirs, strict=True))


if __name__ == "__main__":
    main()
