"""
The server end of a stubbed WebSocket (L{netd.services.http.websocket}): frames
read and written by wsproto, the sans-IO WebSocket library Twisted's own
C{websocket} extra uses.  It sits where a proxied WebSocket's upstream would
(L{netd.services.http.app.Upgrade.splice}), so the wire's splice, back-pressure
and shutdown handling serve both.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IPushProducer
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Ping,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError
from zope.interface import implementer

from netd.services.http.websocket import Script, Send

__all__ = ["MAX_MESSAGE", "StubSocket"]

# A message longer than this (assembled from its frames) closes with 1009.
MAX_MESSAGE = 1 << 20


@implementer(IPushProducer)
class StubSocket:
    """
    The server end of one stubbed WebSocket: what the wire splices the client to.

    The wire calls L{write} with the client's bytes and L{loseConnection} when
    the client goes; L{splice} is the client side (C{to_client},
    C{upstream_lost}).
    """

    def __init__(self, script: Script, splice: Any) -> None:
        self.script = script
        self.splice = splice
        self.ws = Connection(ConnectionType.SERVER)
        self.parts: list[str | bytes] = []
        self.size = 0
        self.ended = False

    def open(self) -> None:
        self._send(self.script.on_open)

    # -- what the wire calls ------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.ended:
            return
        try:
            self.ws.receive_data(data)
        except LocalProtocolError:
            self._end()
            return
        for event in self.ws.events():
            self._event(event)
            if self.ended:
                return

    def loseConnection(self) -> None:
        self._end()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        """The client's transport: our replies are small, its pace is not ours to set."""

    def unregisterProducer(self) -> None:
        pass

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        self._end()

    # -- the script -------------------------------------------------------------------

    def _event(self, event: Event) -> None:
        if isinstance(event, CloseConnection):
            if self.ws.state is ConnectionState.REMOTE_CLOSING:
                self._out(event.response())
            elif self.ws.state is ConnectionState.OPEN:
                self._close(event.code, event.reason or "")  # a frame wsproto could not parse
            self._end()
        elif isinstance(event, Ping):
            self._out(event.response())
        elif isinstance(event, Message):
            self.size += len(event.data)
            if self.size > MAX_MESSAGE:
                self._close(1009, "message too big")
                return
            self.parts.append(event.data)
            if event.message_finished:
                message: str | bytes = (
                    "".join(p for p in self.parts if isinstance(p, str))
                    if isinstance(event, TextMessage)
                    else b"".join(p for p in self.parts if isinstance(p, bytes))
                )
                self.parts, self.size = [], 0
                self._message(message)

    def _message(self, message: str | bytes) -> None:
        for reply in self.script.replies:
            if reply.matches(message):
                self._send(reply.send)
                if reply.close is not None:
                    self._close(*reply.close)
                return
        if self.script.echo:
            self._send((Send(message),))

    def _send(self, messages: tuple[Send, ...]) -> None:
        for message in messages:
            if isinstance(message.data, str):
                self._out(TextMessage(data=message.data))
            else:
                self._out(BytesMessage(data=message.data))

    def _close(self, code: int, reason: str) -> None:
        """Send a Close; the client answers it and the connection ends then (or now)."""
        if self.ws.state is ConnectionState.OPEN:
            self._out(CloseConnection(code=code, reason=reason))

    def _out(self, event: Event) -> None:
        if self.ended:
            return
        try:
            data = self.ws.send(event)
        except LocalProtocolError:
            return
        self.splice.to_client(data)

    def _end(self) -> None:
        if not self.ended:
            self.ended = True
            self.splice.upstream_lost()
