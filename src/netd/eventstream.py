"""
The event journal as Server-Sent Events: C{GET /api/events/stream}.

A stream subscribes to the L{Journal} and writes each matching event as it is
emitted, batched once per reactor turn.  Its client resumes after a dropped
connection with C{Last-Event-ID}; a comment every C{heartbeat} seconds keeps
proxies and the connection's idle sweep from taking a quiet stream for a dead
one.  A client that stops reading is cut once C{max_unread} bytes wait for it:
a stream is never buffered without bound.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure
from twisted.web.server import Request

from netd.connections import describe_address, unsent_bytes
from netd.events import Event, Journal

__all__ = ["EventStream", "EventStreams", "StreamRefused"]

HEARTBEAT = 15.0
# Unread bytes (the socket's and TLS's buffers) past which a stream's client is cut.
MAX_UNREAD = 1 << 20
# Events held between reactor turns before they are written at once.
_BATCH = 256
# How long an EventSource waits before it reconnects, in milliseconds.
_RETRY_MS = 2000


class StreamRefused(Exception):
    """A stream request the client must fix (400)."""


class EventStreams:
    """
    Opens event streams on admin requests.

    @ivar on_cut: called with a cut stream's client address and unread bytes.
    """

    def __init__(
        self,
        journal: Journal,
        clock: IReactorTime,
        on_cut: Callable[[str, int], None],
        heartbeat: float = HEARTBEAT,
        max_unread: int = MAX_UNREAD,
    ) -> None:
        self.journal = journal
        self.clock = clock
        self.on_cut = on_cut
        self.heartbeat = heartbeat
        self.max_unread = max_unread

    def open(self, request: Request, query: Mapping[str, str]) -> EventStream | None:
        """
        Answer C{request} with a stream of the events after C{Last-Event-ID}
        (or C{?since=}; by default only the events still to come) that match
        C{?service=}, C{?type=} (comma-separated) and C{?namespace=}.  A C{HEAD} request gets
        the headers alone (L{None}: the caller finishes it).
        """
        resume = request.getHeader(b"last-event-id")
        try:
            since = int(resume) if resume else int(query.get("since", self.journal.last_id))
        except ValueError:
            raise StreamRefused("Last-Event-ID and since must be integers") from None
        types = frozenset(t for t in query.get("type", "").split(",") if t)
        service = query.get("service") or None
        namespace = query.get("namespace") or None
        request.setHeader(b"Content-Type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        if request.method == b"HEAD":
            return None
        stream = EventStream(self, request, service, types, namespace)
        stream.start(self.journal.select(since, service, types, namespace))
        return stream


class EventStream:
    """One client's stream; C{finish} ends it (the client half-closed)."""

    def __init__(
        self,
        streams: EventStreams,
        request: Request,
        service: str | None,
        types: frozenset[str],
        namespace: str | None = None,
    ) -> None:
        self.streams = streams
        self.request = request
        self.service = service
        self.types = types
        self.namespace = namespace
        self.pending: list[Event] = []
        self.flush_call: IDelayedCall | None = None
        self.heartbeat_call: IDelayedCall | None = None
        self.open = True

    def start(self, backlog: list[Event]) -> None:
        self.streams.journal.subscribe(self.emitted)
        self.request.notifyFinish().addBoth(self.ended)
        self.write(b"retry: %d\n\n" % _RETRY_MS + b"".join(map(_encode, backlog)))
        self.schedule_heartbeat()

    def emitted(self, event: Event) -> None:
        if not self.open:
            return
        if self.service is not None and event.service != self.service:
            return
        if self.types and event.type not in self.types:
            return
        if self.namespace is not None and event.fields.get("namespace") != self.namespace:
            return
        self.pending.append(event)
        if len(self.pending) >= _BATCH:
            self.flush()
        elif self.flush_call is None:
            self.flush_call = self.streams.clock.callLater(0, self.flush)

    def flush(self) -> None:
        if self.flush_call is not None and self.flush_call.active():
            self.flush_call.cancel()
        self.flush_call = None
        events, self.pending = self.pending, []
        if self.open and events:
            self.write(b"".join(map(_encode, events)))

    def beat(self) -> None:
        self.heartbeat_call = None
        self.write(b": heartbeat\n\n")
        self.schedule_heartbeat()

    def schedule_heartbeat(self) -> None:
        if self.open:
            self.heartbeat_call = self.streams.clock.callLater(self.streams.heartbeat, self.beat)

    def write(self, data: bytes) -> None:
        if not self.open:
            return
        transport: Any = self.request.channel.transport
        unread = unsent_bytes(transport)
        if unread > self.streams.max_unread:
            self.stop()
            self.streams.on_cut(describe_address(transport.getPeer()), unread)
            transport.abortConnection()
            return
        self.request.write(data)

    def finish(self) -> None:
        if self.open:
            self.stop()
            self.request.finish()

    def ended(self, result: Failure | None) -> None:
        self.stop()

    def stop(self) -> None:
        if not self.open:
            return
        self.open = False
        self.pending = []
        self.streams.journal.unsubscribe(self.emitted)
        for call in (self.flush_call, self.heartbeat_call):
            if call is not None and call.active():
                call.cancel()
        self.flush_call = self.heartbeat_call = None


def _encode(event: Event) -> bytes:
    data = json.dumps(event.as_json(), default=str, separators=(",", ":"))
    return b"id: %d\ndata: %s\n\n" % (event.id, data.encode())
