"""
C{/api/events/stream} on the admin channel, a StringTransport and a Clock:
the events as Server-Sent Events, resuming, filters, heartbeats, and a client
that stops reading.
"""

from __future__ import annotations

import json
import re
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from netd.eventstream import HEARTBEAT
from tests.unit.test_admin import Client, headers_and_body, status_line

_FRAME = re.compile(rb"id: (\d+)\ndata: ([^\n]*)\n\n")


def frames(answer: bytes) -> list[dict[str, Any]]:
    found = [json.loads(data) for _, data in _FRAME.findall(answer)]
    assert [e["id"] for e in found] == [int(i) for i, _ in _FRAME.findall(answer)]
    return found


def open_stream(client: Client, target: bytes, *headers: bytes) -> bytes:
    head = b"".join(h + b"\r\n" for h in headers)
    client.send(b"GET " + target + b" HTTP/1.1\r\nHost: localhost\r\n" + head + b"\r\n")
    client.clock.advance(0)
    return client.answer()


def test_events_stream_live_with_their_ids_as_they_are_emitted() -> None:
    client = Client()
    client.daemon.journal.emit("echo", "connection.opened")  # before: not sent
    answer = open_stream(client, b"/api/events/stream")
    assert status_line(answer) == b"HTTP/1.1 200 OK"
    headers, body = headers_and_body(answer)
    assert headers[b"content-type"] == b"text/event-stream; charset=utf-8"
    assert headers[b"cache-control"] == b"no-store"
    assert b"retry: 2000\n\n" in body and frames(body) == []

    client.daemon.journal.emit("echo", "connection.closed", bytes_in=4)
    client.daemon.journal.emit("web", "request", path="/<script>\n")
    assert client.answer() == b""  # written together, on the reactor's next turn
    client.clock.advance(0)
    sent = frames(client.answer())
    assert [(e["id"], e["service"], e["type"]) for e in sent] == [
        (2, "echo", "connection.closed"),
        (3, "web", "request"),
    ]
    assert sent[1]["path"] == "/<script>\n"  # one data line: JSON escapes the newline


def test_a_stream_resumes_after_last_event_id_and_filters_by_service_and_type() -> None:
    client = Client()
    journal = client.daemon.journal
    for service, type in [("echo", "a"), ("echo", "b"), ("web", "a"), ("echo", "a")]:
        journal.emit(service, type)
    answer = open_stream(client, b"/api/events/stream?service=echo&type=a,c", b"Last-Event-ID: 1")
    assert [e["id"] for e in frames(answer)] == [4]
    journal.emit("echo", "c")
    journal.emit("echo", "b")
    journal.emit("web", "c")
    client.clock.advance(0)
    assert [(e["id"], e["type"]) for e in frames(client.answer())] == [(5, "c")]

    since = Client()
    since.daemon.journal.emit("echo", "a")
    since.daemon.journal.emit("echo", "b")
    assert [e["id"] for e in frames(open_stream(since, b"/api/events/stream?since=0"))] == [1, 2]


def test_a_bad_last_event_id_is_refused() -> None:
    client = Client()
    answer = open_stream(client, b"/api/events/stream", b"Last-Event-ID: soon")
    assert status_line(answer) == b"HTTP/1.1 400 Bad Request"
    assert "integers" in json.loads(headers_and_body(answer)[1])["error"]


def test_a_quiet_stream_sends_a_heartbeat_comment() -> None:
    client = Client()
    open_stream(client, b"/api/events/stream")
    client.clock.advance(HEARTBEAT - 1)
    assert client.answer() == b""
    client.clock.advance(1)
    assert b": heartbeat\n\n" in client.answer()
    client.clock.advance(HEARTBEAT)
    assert b": heartbeat\n\n" in client.answer()
    assert not client.transport.disconnecting


class UnreadTransport(StringTransport):
    """A socket whose peer reads nothing: what is written stays in its buffer."""

    def __init__(self) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "127.0.0.1", 40001))
        # The attribute Twisted's FileDescriptor buffers in, as netd reads it.
        self.dataBuffer = b""

    def write(self, data: bytes) -> None:
        super().write(data)
        self.dataBuffer += data

    def writeSequence(self, data: list[bytes]) -> None:
        self.write(b"".join(data))


def test_a_client_that_stops_reading_is_cut_not_buffered() -> None:
    transport = UnreadTransport()
    client = Client(transport=transport)
    client.resource.streams.max_unread = 10_000
    open_stream(client, b"/api/events/stream?service=echo")
    for _ in range(200):
        client.daemon.journal.emit("echo", "connection.opened", client="127.0.0.1:1234")
        client.clock.advance(0)
        if transport.disconnected:
            break
    assert transport.disconnected  # aborted, not closed politely after the backlog
    assert len(transport.dataBuffer) < 12_000
    [cut] = client.daemon.journal.select(types=["stream.cut"])
    assert cut.service == "admin" and cut.fields["client"] == "127.0.0.1:40001"
    assert cut.fields["unread"] > 10_000
    # The stream left the journal: later events cost it nothing.
    assert client.daemon.journal._listeners == []


def test_a_half_closed_client_ends_its_stream_and_a_hang_up_unsubscribes() -> None:
    client = Client()
    open_stream(client, b"/api/events/stream")
    replied = client.channel.when_replied()
    assert replied.called
    assert client.answer().endswith(b"0\r\n\r\n")  # the last chunk
    assert client.daemon.journal._listeners == []

    gone = Client()
    open_stream(gone, b"/api/events/stream")
    gone.channel.connectionLost(Exception("reset"))  # type: ignore[arg-type]
    assert gone.daemon.journal._listeners == []
    gone.clock.advance(HEARTBEAT)
    assert gone.answer() == b""


def test_head_of_the_stream_is_its_headers() -> None:
    client = Client()
    client.send(b"HEAD /api/events/stream HTTP/1.1\r\nHost: localhost\r\n\r\n")
    headers, body = headers_and_body(client.answer())
    assert headers[b"content-type"].startswith(b"text/event-stream")
    assert body == b"" and client.daemon.journal._listeners == []
