#!/usr/bin/env python3
"""
Idle RSS of netd running one echo service against plain Twisted's echo under twistd.

    .venv/bin/python bench/idle_rss.py [--runs 5]

The same two servers as bench/echo.py's idle comparison (netd on its generated
echo-only map, no admin; plain Twisted's echo.tac under C{twistd -n -y}), started
in alternating order, each read from /proc/PID/status (VmRSS) once ready and
settled; netd's bytecode is compiled first, as in bench/startup.py.  Prints both
medians and the median of the per-run differences against bench/echo.py's
TARGET_RSS_MIB; exits 1 if the target is missed.
"""

from __future__ import annotations

import argparse
import compileall
import statistics
import sys
import tempfile
import time
from pathlib import Path

from echo import (
    IDLE_SETTLE,
    TARGET_RSS_MIB,
    Server,
    start_netd,
    start_twistd_tac,
    status_mib,
    stop_all,
)

import netd


def idle_rss(server: Server) -> float:
    time.sleep(IDLE_SETTLE)
    return status_mib(server.pid, "VmRSS")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, choices=range(1, 51), metavar="N")
    options = parser.parse_args()
    compileall.compile_dir(Path(netd.__file__).parent, quiet=1)
    netd_rss: list[float] = []
    twisted_rss: list[float] = []
    with tempfile.TemporaryDirectory(prefix="netd-rss-") as scratch:
        try:
            for run in range(options.runs):
                starts = [("netd", start_netd), ("twisted", start_twistd_tac)]
                for name, start in starts if run % 2 == 0 else starts[::-1]:
                    rss = idle_rss(start(Path(scratch) / f"{name}{run}", None))
                    (netd_rss if name == "netd" else twisted_rss).append(rss)
                    stop_all()
        finally:
            stop_all()
    differences = [n - t for n, t in zip(netd_rss, twisted_rss, strict=True)]
    print(f"idle RSS, {options.runs} starts each, alternating")
    for label, values in (("netd echo", netd_rss), ("twistd -y echo", twisted_rss)):
        print(
            f"{label + ':':16} median {statistics.median(values):.1f} MiB"
            f" (min {min(values):.1f}, max {max(values):.1f})"
        )
    gap = statistics.median(differences)
    print(f"netd - twistd:   median {gap:+.1f} MiB (target <= {TARGET_RSS_MIB:g})")
    sys.exit(0 if gap <= TARGET_RSS_MIB else 1)


if __name__ == "__main__":
    main()
