"""Fixtures shared by netd's tests."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from netd.testing import NetdProcess

StartNetd = Callable[..., NetdProcess]


@pytest.fixture
def start_netd(tmp_path: Path) -> Iterator[StartNetd]:
    """Start the real daemon on a config text; every one started is stopped at teardown."""
    started: list[NetdProcess] = []

    def start(config: str, **kwargs: object) -> NetdProcess:
        netd = NetdProcess.start(config, tmp_path / f"netd{len(started)}", **kwargs)  # type: ignore[arg-type]
        started.append(netd)
        return netd

    yield start
    for netd in started:
        netd.stop()


def unused_port() -> int:
    """A loopback TCP port nothing listens on just now (an upstream that is down)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
