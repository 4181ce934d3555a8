"""Fixtures shared by netd's tests."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from itertools import count
from pathlib import Path

import pytest
from twisted.logger import LogEvent, globalLogPublisher

from netd.pytest_plugin import daemons_for
from netd.testing import NetdProcess

StartNetd = Callable[..., NetdProcess]


@pytest.fixture
def start_netd(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StartNetd]:
    """
    Start the real daemon on a config text; every one started is stopped at
    teardown.  The shipped plugin's factory, under a name that several test
    modules' own C{netd} fixtures do not hide.
    """
    counter = count()
    with daemons_for(request.node, lambda: tmp_path / f"netd{next(counter)}") as start:
        yield start


@pytest.fixture
def logged() -> Iterator[list[LogEvent]]:
    """Every event logged through Twisted's global publisher while the test runs."""
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def unused_port() -> int:
    """A loopback TCP port nothing listens on just now (an upstream that is down)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
