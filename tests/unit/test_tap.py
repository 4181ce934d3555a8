"""The answer a daemonizing twistd's parent waits for."""

from __future__ import annotations

import os
from typing import Any

from netd.tap import _ParentNotice

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
