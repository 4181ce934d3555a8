"""The stress runner's own parts, so that `make stress` does not rot between runs."""

from __future__ import annotations

import random
from pathlib import Path

from stress.__main__ import FAMILIES, run_family
from stress._harness import Budget, Row, bad_records, render_table
from stress.fuzz import mutate, targets


def test_table_has_a_line_per_row_with_every_column() -> None:
    rows = [
        Row("fuzz", "smtp", 1500, "1500 inputs; then serving", 0, 120, 0),
        Row("half-close", "echo", 3, "reply whole 0/3", verdict="DEFECT"),
    ]
    lines = render_table(rows).splitlines()
    assert len(lines) == 4
    assert lines[0].split("|")[1].strip() == "family"
    assert [line.split("|")[-2].strip() for line in lines[2:]] == ["ok", "DEFECT"]
    assert lines[3].split("|")[5].strip() == "-"  # no fd figure for that row


def test_mutations_are_reproducible_from_the_seed() -> None:
    seed = targets()[0].seeds[0]
    first = [mutate(random.Random(7), seed) for _ in range(3)]
    again = [mutate(random.Random(7), seed) for _ in range(3)]
    assert first == again
    assert any(mutated != seed for mutated in first)


def test_a_probe_that_raises_is_an_error_row_not_a_crash(tmp_path: Path) -> None:
    def broken(base: Path, budget: Budget) -> list[Row]:
        raise RuntimeError("harness bug")

    [row] = run_family("broken", broken, tmp_path, Budget(quick=True, seed=1))
    assert row.verdict == "ERROR" and "harness bug" in row.result


def test_every_family_the_issue_names_is_run() -> None:
    assert set(FAMILIES) == {
        "smtp_kill",
        "fuzz",
        "security",
        "slow_clients",
        "half_close",
        "reload_load",
    }


def test_a_critical_record_and_its_traceback_count_once() -> None:
    log = (
        "2026-12-03T08:24:58+0000 [netd#info] service ftp listening\n"
        "2026-12-03T08:24:59+0000 [netd.ftp#critical] FTP command PASS failed\n"
        "\tTraceback (most recent call last):\n"
        '\t  File "ftp.py", line 962, in ftp_PASS\n'
        "\tbuiltins.AttributeError: 'Session' object has no attribute '_user'\n"
        "2026-12-03T08:25:00+0000 [netd#error] Unhandled error\n"
        "\tTraceback (most recent call last):\n"
        "Traceback (most recent call last):\n"
        '  File "x.py", line 1, in <module>\n'
        "2026-12-03T08:25:01+0000 [netd#warn] a warning\n"
    )
    assert bad_records(log) == 3
