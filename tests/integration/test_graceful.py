"""
SIGTERM stops accepting at once but lets an exchange in progress finish within
shutdown_grace: a proxied request whose upstream is still thinking gets its answer.
"""

from __future__ import annotations

import http.client
import http.server
import socket
import threading
from collections.abc import Iterator

import pytest

from tests.conftest import StartNetd
from tests.fakes.upstreams import QuietHandler, serving_http
from tests.signals import wait_until


class _SlowUpstream(QuietHandler):
    arrived: threading.Event
    release: threading.Event

    def do_GET(self) -> None:
        self.arrived.set()
        self.release.wait(10)
        self.answer(200, b"worth the wait")


@pytest.fixture
def upstream() -> Iterator[tuple[int, threading.Event, threading.Event]]:
    arrived, release = threading.Event(), threading.Event()
    with serving_http(_SlowUpstream, arrived=arrived, release=release) as port:
        yield port, arrived, release
        release.set()


def test_sigterm_lets_the_exchange_in_progress_finish(
    start_netd: StartNetd, upstream: tuple[int, threading.Event, threading.Event]
) -> None:
    port, arrived, release = upstream
    netd = start_netd(
        f"""
shutdown_grace: 10
services:
  web:
    type: http
    listen: ["tcp:0:interface=127.0.0.1"]
    routes:
      - {{path: /slow, proxy: "http://127.0.0.1:{port}/slow", timeout: 10}}
"""
    )
    host, web_port = netd.address("web")
    client = http.client.HTTPConnection(host, web_port, timeout=15)
    client.request("GET", "/slow")
    assert arrived.wait(10), "the request never reached the upstream"

    netd.signal(15)
    wait_until(lambda: "netd stopping" in netd.output, "sign of stopping", timeout=10)
    # The listening socket closes within a reactor turn of that line; from then
    # on new connections are refused while the old one finishes.
    for _ in range(100):
        try:
            socket.create_connection((host, web_port), timeout=1).close()
        except (ConnectionRefusedError, ConnectionResetError):
            break
        except TimeoutError:
            continue  # queued in a backlog nobody accepts from any more
    else:
        pytest.fail("netd still accepts connections after SIGTERM")
    release.set()
    response = client.getresponse()
    assert (response.status, response.read()) == (200, b"worth the wait")
    assert netd.process.wait(15) == 0
