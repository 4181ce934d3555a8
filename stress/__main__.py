"""
C{python -m stress}: run the probe families against real daemons, print one table.

It exits 0 whatever the probes find (finding defects is its job) and 1 only
when a probe itself broke (an ERROR row).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from . import fuzz, half_close, reload_load, security, slow_clients, smtp_kill
from ._harness import Budget, Row, render_table, rows_as_json

Family = Callable[[Path, Budget], list[Row]]

FAMILIES: dict[str, Family] = {
    "smtp_kill": smtp_kill.run,
    "fuzz": fuzz.run,
    "security": security.run,
    "slow_clients": slow_clients.run,
    "half_close": half_close.run,
    "reload_load": reload_load.run,
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stress", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smoke run of about a minute")
    parser.add_argument("--seed", type=int, default=13, help="seed of every random choice")
    parser.add_argument(
        "--only", action="append", choices=sorted(FAMILIES), help="run only these families"
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the rows as JSON")
    return parser.parse_args(argv)


def run_family(name: str, family: Family, base: Path, budget: Budget) -> list[Row]:
    """A family's rows, or one ERROR row if the probe itself raised."""
    try:
        return family(base / name, budget)
    except Exception:
        traceback.print_exc()
        last = traceback.format_exc(limit=1).strip().splitlines()[-1]
        return [Row(name, "probe broke", 0, last, verdict="ERROR")]


def main(argv: list[str] | None = None) -> int:
    options = parse(argv)
    budget = Budget(quick=options.quick, seed=options.seed)
    started = time.monotonic()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="netd-stress-") as scratch:
        for name in options.only or list(FAMILIES):
            print(f"[stress] {name} ...", file=sys.stderr, flush=True)
            began = time.monotonic()
            found = run_family(name, FAMILIES[name], Path(scratch), budget)
            print(f"[stress] {name}: {time.monotonic() - began:.0f} s", file=sys.stderr)
            rows += found
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(
        f"netd stress, {stamp}, seed {budget.seed}{', quick' if budget.quick else ''}, "
        f"{platform.node()} ({platform.machine()}, Python {platform.python_version()}), "
        f"{time.monotonic() - started:.0f} s"
    )
    print(render_table(rows))
    defects = sum(row.verdict == "DEFECT" for row in rows)
    print(f"{len(rows)} rows, {defects} DEFECT")
    if options.json is not None:
        options.json.write_text(rows_as_json(rows) + "\n", encoding="utf-8")
    return 1 if any(row.verdict == "ERROR" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
