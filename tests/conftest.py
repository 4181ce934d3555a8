"""Fixtures shared by netd's tests."""

from __future__ import annotations

import random
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


def fixed_port(host: str = "127.0.0.1", udp: bool = False) -> int:
    """
    A port free just now on C{host} (TCP, and UDP too if asked), for a map that
    names its port.  Below the kernel's ephemeral range: a port the kernel hands
    out and takes back (port 0) may be another test daemon's port 0 a moment
    later, and netd, binding it after that, fails to start or loses a listener
    (CI runs failed both ways).
    """
    ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    while True:
        port = random.randrange(10000, ephemeral)
        try:
            with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as dgram:
                tcp.bind((host, port))
                if udp:
                    dgram.bind((host, port))
        except OSError:
            continue
        return port
