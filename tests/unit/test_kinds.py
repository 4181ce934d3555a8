"""Tests for netd.kinds: what the daemon hands its kinds' builds across reloads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import succeed
from twisted.logger import Logger

from netd.events import Journal, ServiceStats
from netd.kinds import BuildContext, Holders
from netd.runtime import Daemon, ReloadResult
from tests.fakes.reactors import ListeningReactor
from tests.unit.test_runtime import moving_qotd, started

SPOOL = Path("/spool")


def test_the_newest_holder_started_holds_the_key() -> None:
    holders = Holders[Path, str]()
    assert holders.holder(SPOOL) is None
    assert holders.take(SPOOL, "old") is None
    assert holders.take(SPOOL, "new") == "old"  # what a reload's replacement takes over
    assert holders.holder(SPOOL) == "new"
    assert holders.holder(Path("/other")) is None


def test_a_holder_that_stops_hands_the_key_back_to_one_still_running() -> None:
    """A replacement's service leaves the map while the build it replaced still drains."""
    holders = Holders[Path, str]()
    holders.take(SPOOL, "old")
    holders.take(SPOOL, "new")
    assert holders.leave(SPOOL, "new") == "old"
    assert holders.holder(SPOOL) == "old"


def test_a_stopped_holder_is_skipped_by_the_hand_back() -> None:
    holders = Holders[Path, str]()
    for holder in ("first", "second", "third"):
        holders.take(SPOOL, holder)
    assert holders.leave(SPOOL, "second") is None  # it did not hold the key
    assert holders.holder(SPOOL) == "third"
    assert holders.leave(SPOOL, "third") == "first"


def test_the_last_holder_to_stop_leaves_the_key_free() -> None:
    holders = Holders[Path, str]()
    holders.take(SPOOL, "old")
    holders.take(SPOOL, "new")
    assert holders.leave(SPOOL, "old") is None  # the reload's usual end: the old one drained
    assert holders.holder(SPOOL) == "new"
    assert holders.leave(SPOOL, "new") is None
    assert holders.holder(SPOOL) is None
    assert holders.leave(SPOOL, "new") is None  # a second stop changes nothing


def context(tables: dict[str, Any]) -> BuildContext:
    reactor = ListeningReactor()
    return BuildContext(
        reactor=reactor,
        name="mail",
        state_dir=Path("/state"),
        journal=Journal(reactor),
        stats=ServiceStats(),
        log=Logger(),
        tls={},
        tables=tables,
    )


def test_a_shared_table_is_made_once_per_key() -> None:
    tables: dict[str, Any] = {}
    first = context(tables).shared("smtp", Holders[Path, str])
    assert context(tables).shared("smtp", Holders[Path, str]) is first
    assert context(tables).shared("http", Holders[Path, str]) is not first
    assert context({}).shared("smtp", Holders[Path, str]) is not first


def test_a_daemons_services_share_its_tables_across_reloads_and_no_other_daemon_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, daemon = moving_qotd(tmp_path, monkeypatch, lambda r, p, read, *a: succeed(read(*a)))
    other = started(tmp_path, ListeningReactor())

    def table(daemon: Daemon, name: str) -> Holders[Path, str]:
        return daemon.services_by_name[name].context.shared("spools", Holders[Path, str])

    shared = table(daemon, "echo")
    assert table(daemon, "qotd") is shared
    assert table(other, "echo") is not shared
    reloaded: list[ReloadResult] = []
    daemon.reload().addCallback(reloaded.append)
    assert [r.restarted for r in reloaded] == [("qotd",)]
    assert table(daemon, "qotd") is shared
