"""
Namespaces against a daemon per test: the same N tests (200 by default) run by
pytest, once with C{netd_ns} (one daemon for the run, a namespace per test) and
once with C{netd} (each test starts its own daemon); wall time of each run and
their ratio (the issue's target: at most 0.2).

    .venv/bin/python bench/namespaces_bench.py [--tests 200] [--workers 0]

Each test sends one mail with smtplib and checks that it sees exactly that
mail.  Both runs are one pytest process (C{-n WORKERS} with xdist when
workers > 0), timed from spawning it to its exit, so interpreter and
collection cost count in both.  Each run must pass every test, or the bench
stops: a fast run that failed measures nothing.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = """
import smtplib

import pytest


@pytest.mark.parametrize("number", range({tests}))
def test_mail(netd_ns, number):
    to = netd_ns.email("bob@example.test")
    with smtplib.SMTP(*netd_ns.address("mail"), timeout=10) as smtp:
        smtp.sendmail("app@example.test", [to], "Subject: hi\\r\\n\\r\\nhi\\r\\n")
    assert [m["to"] for m in netd_ns.messages("mail")] == [[to]]
"""

OWN_DAEMON = """
import smtplib

import pytest

MAIL = {{"services": {{"mail": {{
    "type": "smtp", "listen": ["tcp:0:interface=127.0.0.1"],
    "relay": {{"allow_from": ["127.0.0.0/8"]}}, "delivery": {{"mode": "capture"}}}}}}}}


@pytest.mark.parametrize("number", range({tests}))
def test_mail(netd, number):
    server = netd(MAIL)
    to = "bob@example.test"
    with smtplib.SMTP(*server.address("mail"), timeout=10) as smtp:
        smtp.sendmail("app@example.test", [to], "Subject: hi\\r\\n\\r\\nhi\\r\\n")
    assert [m["to"] for m in server.messages("mail")] == [[to]]
"""


def run(source: str, tests: int, workers: int, into: Path) -> float:
    folder = into / f"run{len(list(into.iterdir()))}"
    folder.mkdir()
    (folder / "test_bench.py").write_text(source.format(tests=tests))
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_bench.py"]
    command += ["-n", str(workers)] if workers else ["-p", "no:xdist"]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=3600)
    elapsed = time.perf_counter() - started
    passed = re.search(r"(\d+) passed", done.stdout)
    if done.returncode != 0 or passed is None or int(passed.group(1)) != tests:
        sys.exit(f"the run did not pass all {tests} tests:\n{done.stdout[-3000:]}{done.stderr}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tests", type=int, default=200)
    parser.add_argument("--workers", type=int, default=0, help="xdist workers; 0: none")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="netd-ns-bench-") as scratch:
        into = Path(scratch)
        shared = run(SHARED, options.tests, options.workers, into)
        own = run(OWN_DAEMON, options.tests, options.workers, into)
    print(f"{options.tests} tests, {options.workers or 'no'} xdist workers")
    print(f"netd_ns (one daemon):   {shared:7.2f} s  ({shared / options.tests * 1000:.0f} ms/test)")
    print(f"netd (daemon per test): {own:7.2f} s  ({own / options.tests * 1000:.0f} ms/test)")
    print(f"ratio: {shared / own:.3f} (target <= 0.2)")


if __name__ == "__main__":
    main()
