#!/usr/bin/env python3
"""
Every benchmark in bench/, one after the other, as one dated run (`make bench`).

    .venv/bin/python bench/run_all.py [--quick] [--only echo,dns] [--list]

Each benchmark's tables (its stdout) go to bench/results/NAME-DATE.md, with the
command, the commit, the wall time, the exit status and the load average before
and after it (on a shared machine that says which figures to distrust); its
progress (stderr) goes to NAME-DATE.log.  bench/results/bench-DATE.md lists the
run.  A benchmark that fails or misses its target (exit status not 0) does not
stop the others.  --quick runs each one briefly (1 round, about a second per
case): a check that every entry starts, not figures to quote.  Environment:
BENCH_QUICK=1 and BENCH_ONLY=a,b do the same as the options (for make).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import attrs

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"


@attrs.frozen
class Bench:
    name: str
    script: str
    quick: tuple[str, ...]  # the options of a brief run
    needs: str = ""  # what it compares with, installed separately
    timeout: float = 1800.0  # seconds a full run may take before it is stopped


# In the order of the README: the project's cases first, then the features' own.
BENCHES = (
    Bench("echo", "echo.py", ("--rounds", "1", "--duration", "1", "--startup-runs", "1")),
    Bench("idle_rss", "idle_rss.py", ("--runs", "1")),
    Bench("startup", "startup.py", ("--runs", "2")),
    Bench("http", "http_bench.py", ("--rounds", "1", "--duration", "1"), "wrk nginx-light"),
    Bench("stubs", "stubs_bench.py", ("--rounds", "1", "--duration", "1"), "wrk, .[bench]"),
    Bench("dns", "dns_bench.py", ("--rounds", "1", "--duration", "1"), "dnsperf dnsmasq"),
    Bench("doh", "doh_bench.py", ("--rounds", "1", "--duration", "1"), "dnsperf nghttp2-client"),
    Bench("smtp", "smtp_bench.py", ("--rounds", "1", "--duration", "1", "--relay-messages", "100")),
    Bench("imap", "imap_bench.py", ("--rounds", "1", "--messages", "100"), "dovecot-imapd"),
    Bench(
        "ftp", "ftp_bench.py", ("--rounds", "1", "--duration", "1", "--size-mib", "8"), "pyftpdlib"
    ),
    Bench("chat", "chat_bench.py", ("--rounds", "1", "--messages", "200"), "ngircd"),
    Bench("proxy", "proxy_bench.py", ("--rounds", "1", "--duration", "1"), "socat"),
    Bench("workers", "workers_bench.py", ("--rounds", "1", "--duration", "1"), "wrk, dnsperf"),
    Bench("namespaces", "namespaces_bench.py", ("--tests", "10")),
)
_QUICK_TIMEOUT = 300.0


def _commit() -> str:
    done = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True
    )
    return done.stdout.strip() or "unknown"


def _load() -> str:
    return " ".join(f"{figure:.1f}" for figure in os.getloadavg())


def run_one(bench: Bench, stamp: str, quick: bool) -> tuple[int | str, float]:
    """Run one benchmark into its files; its exit status (or why none) and wall time."""
    command = [sys.executable, str(BENCH_DIR / bench.script), *(bench.quick if quick else ())]
    report, log = RESULTS / f"{bench.name}-{stamp}.md", RESULTS / f"{bench.name}-{stamp}.log"
    load_before, started = _load(), time.monotonic()
    print(f"{bench.name}: {' '.join(command[1:])}", file=sys.stderr, flush=True)
    with report.open("w") as out, log.open("w") as err:
        out.write(f"# {bench.name}, {stamp}{' (quick: a check, not figures)' * quick}\n\n")
        out.write(f"- command: `{' '.join(['python', *command[1:]])}`\n- commit: {_commit()}\n")
        out.flush()
        # Its own session, stopped by its PID: a benchmark's servers are its children.
        process = subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, start_new_session=True
        )
        try:
            tables, _ = process.communicate(timeout=_QUICK_TIMEOUT if quick else bench.timeout)
            status: int | str = process.returncode
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)
            tables, _ = process.communicate()
            status = "stopped: over its time limit"
        except KeyboardInterrupt:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait()
            raise
        took = time.monotonic() - started
        out.write(
            f"- wall time: {took:.0f} s, exit status: {status}\n"
            f"- load average (1, 5, 15 min) before: {load_before}, after: {_load()}\n\n"
            f"```\n{tables.decode(errors='replace').rstrip()}\n```\n"
        )
    return status, took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", default=bool(os.environ.get("BENCH_QUICK")))
    parser.add_argument("--only", default=os.environ.get("BENCH_ONLY", ""), help="a,b,...")
    parser.add_argument("--list", action="store_true", help="print the benchmarks and exit")
    options = parser.parse_args()
    if options.list:
        for bench in BENCHES:
            print(
                f"{bench.name:11} bench/{bench.script}"
                + (f" (needs {bench.needs})" * bool(bench.needs))
            )
        return
    chosen = [b for b in BENCHES if not options.only or b.name in options.only.split(",")]
    unknown = set(filter(None, options.only.split(","))) - {b.name for b in BENCHES}
    if unknown:
        raise SystemExit(f"no benchmark named {', '.join(sorted(unknown))}")
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H%MZ")
    rows = []
    for bench in chosen:
        status, took = run_one(bench, stamp, options.quick)
        rows.append(f"| {bench.name} | {status} | {took:.0f} | {bench.name}-{stamp}.md |")
    summary = RESULTS / f"bench-{stamp}.md"
    summary.write_text(
        f"# make bench, {stamp}{' (quick)' * options.quick}\n\ncommit {_commit()}, "
        f"{os.cpu_count()} CPUs\n\n| benchmark | exit status | wall s | tables |\n"
        "|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    print(summary.read_text())


if __name__ == "__main__":
    main()
