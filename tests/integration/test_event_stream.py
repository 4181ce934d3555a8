"""
C{/api/events/stream} against the real daemon, read with http.client as an
EventSource reads it: live events, resuming with Last-Event-ID, filters.
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from netd.testing import NetdProcess
from tests.conftest import StartNetd

TOKEN = "stream-token"

MAP = f"""
admin:
  listen: ["tcp:0:interface=127.0.0.1"]
  token: {TOKEN}
services:
  echo:
    type: echo
    listen: ["tcp:0:interface=127.0.0.1"]
  qotd:
    type: qotd
    listen: ["tcp:0:interface=127.0.0.1"]
"""


@pytest.fixture
def netd(start_netd: StartNetd) -> NetdProcess:
    return start_netd(MAP)


@contextmanager
def stream(
    netd: NetdProcess, target: str, last_event_id: int | None = None
) -> Iterator[http.client.HTTPResponse]:
    entry = netd.ports["admin"]["listeners"][0]
    connection = http.client.HTTPConnection(entry["host"], entry["port"], timeout=10)
    headers = {"Authorization": f"Bearer {TOKEN}", "Accept": "text/event-stream"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    connection.request("GET", target, headers=headers)
    response = connection.getresponse()
    try:
        yield response
    finally:
        connection.close()


def next_event(response: http.client.HTTPResponse) -> dict[str, Any]:
    """The next event's data, past the retry field and heartbeat comments."""
    fields: dict[str, str] = {}
    while True:
        line = response.readline().decode().rstrip("\n")
        if line:
            name, _, value = line.partition(": ")
            fields[name] = value
        elif "data" in fields:
            event: dict[str, Any] = json.loads(fields["data"])
            assert int(fields["id"]) == event["id"]
            return event


def touch(address: tuple[str, int]) -> None:
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(b"x")
        sock.recv(10)


def test_a_stream_shows_events_live_and_resumes_after_last_event_id(netd: NetdProcess) -> None:
    with stream(netd, "/api/events/stream?service=echo&type=connection.opened") as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        touch(netd.address("qotd"))  # another service: filtered out
        touch(netd.address("echo"))
        first = next_event(response)
        assert (first["service"], first["type"]) == ("echo", "connection.opened")

    touch(netd.address("echo"))  # while no stream is open
    touch(netd.address("echo"))
    with stream(
        netd, "/api/events/stream?service=echo&type=connection.opened", first["id"]
    ) as response:
        missed = [next_event(response), next_event(response)]
        assert [e["type"] for e in missed] == ["connection.opened"] * 2
        assert first["id"] < missed[0]["id"] < missed[1]["id"]


def test_a_stream_needs_the_token_and_the_daemon_serves_on_after_a_reader_leaves(
    netd: NetdProcess,
) -> None:
    entry = netd.ports["admin"]["listeners"][0]
    connection = http.client.HTTPConnection(entry["host"], entry["port"], timeout=10)
    connection.request("GET", "/api/events/stream")
    assert connection.getresponse().status == 401
    connection.close()
    touch(netd.address("echo"))
    for _ in range(3):  # readers that hang up mid-stream
        with stream(netd, "/api/events/stream?since=0") as response:
            next_event(response)
    with stream(netd, "/api/events/stream?type=connection.closed") as response:
        touch(netd.address("echo"))
        assert next_event(response)["service"] == "echo"
