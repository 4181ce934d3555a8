"""An http exchange that records the answer instead of writing it to a wire."""

from __future__ import annotations

from typing import Any

from netd.services.http.app import BodyStream, Exchange, Headers


class FakeExchange(Exchange):
    """A request as the wire would have parsed it; its answer kept in fields."""

    def __init__(self, method: str, target: str, headers: Headers | None = None) -> None:
        self.method = method
        self.target = target
        self.version = "HTTP/1.1"
        self.headers = headers or []
        self.client = "192.0.2.1"
        self.scheme = "http"
        self.body = BodyStream(0, 100)
        self.body.end()
        self.response_headers: dict[bytes, bytes] = {}
        self.data = b""
        self.finished = False
        self.producer: Any = None
        self.aborted = False

    def respond(self, status: int, headers: Headers, body: bytes) -> None:
        self.start(status, headers, len(body))
        self.data = body
        self.sent = len(body)
        self.finished = True

    def start(self, status: int, headers: Headers, length: int | None) -> None:
        self.status = status
        self.response_headers = dict(headers)

    def write(self, data: bytes) -> None:
        self.data += data
        self.sent += len(data)

    def finish(self) -> None:
        self.finished = True

    def abort(self) -> None:
        self.aborted = True

    def register_producer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregister_producer(self) -> None:
        self.producer = None
