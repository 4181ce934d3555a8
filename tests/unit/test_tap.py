"""The answer a daemonizing twistd's parent waits for; the collector's pause at start-up."""

from __future__ import annotations

import gc
import os
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netd.tap import Options, makeService
from netd.twistd_service import _CollectorPause, _ParentNotice

NO_DAEMON: Any = None


def read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 100):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def test_ready_says_zero_once() -> None:
    read, write = os.pipe()
    notice = _ParentNotice(write)
    notice.ready(NO_DAEMON)
    notice.stopping(NO_DAEMON)
    assert read_all(read) == b"0"


def test_stopping_before_ready_is_a_failure_in_twistds_format() -> None:
    read, write = os.pipe()
    notice = _ParentNotice(write)
    notice.stopping(NO_DAEMON)
    notice.ready(NO_DAEMON)
    # twistd's parent prints what follows the first two bytes ("1 ").
    assert read_all(read).startswith(b"1 netd stopped before it was ready")


class _Cyclic:
    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def collector_restored() -> Iterator[None]:
    yield
    gc.enable()


def _paused_start(tmp_path: Path) -> tuple[Any, _CollectorPause]:
    service_map = tmp_path / "netd.yaml"
    service_map.write_text(
        "state_dir: state\n"
        "services:\n  echo:\n    type: echo\n    listen: ['tcp:0:interface=127.0.0.1']\n"
    )
    options = Options()
    options.parseOptions(["-c", str(service_map)])
    root = makeService(options)
    [pause] = [o for o in root.daemon.observers if isinstance(o, _CollectorPause)]
    return root.daemon, pause


def test_the_collector_is_off_from_reading_the_map_until_ready(
    tmp_path: Path, collector_restored: None
) -> None:
    daemon, pause = _paused_start(tmp_path)
    assert not gc.isenabled()
    garbage = weakref.ref(_Cyclic())
    for _ in range(10 * gc.get_threshold()[0]):
        _Cyclic()  # allocations that would start collections, were it on
    pause.reloading(daemon)
    pause.reloaded(daemon)
    assert not gc.isenabled()
    assert garbage() is not None
    pause.ready(daemon)
    assert gc.isenabled()
    assert garbage() is None  # what start-up left in cycles is collected at ready


def test_the_collection_at_ready_is_a_full_one(tmp_path: Path, collector_restored: None) -> None:
    daemon, pause = _paused_start(tmp_path)
    collected: list[int] = []

    def watch(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collected.append(info["generation"])

    gc.callbacks.append(watch)
    try:
        pause.ready(daemon)
    finally:
        gc.callbacks.remove(watch)
    # A collection of the young generations alone was quicker at ready, but
    # left the collector due a full one (25 ms) in the first second of serving.
    assert collected == [2]


def test_a_daemon_stopping_before_ready_turns_the_collector_back_on(
    tmp_path: Path, collector_restored: None
) -> None:
    daemon, pause = _paused_start(tmp_path)
    pause.stopping(daemon)
    assert gc.isenabled()
