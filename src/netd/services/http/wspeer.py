"""
The server end of a stubbed WebSocket (L{netd.services.http.websocket}): frames
read and written by L{netd.websockets.Frames}.  It sits where a proxied
WebSocket's upstream would (L{netd.services.http.app.Upgrade.splice}), so the
wire's splice, back-pressure and shutdown handling serve both.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from netd.services.http.websocket import Script, Send
from netd.websockets import Frames

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
        self.frames = Frames(splice.to_client, self._message, splice.upstream_lost, MAX_MESSAGE)

    @property
    def ended(self) -> bool:
        return self.frames.ended

    def open(self) -> None:
        self._send(self.script.on_open)

    # -- what the wire calls ------------------------------------------------------------

    def write(self, data: bytes) -> None:
        self.frames.receive(data)

    def loseConnection(self) -> None:
        self.frames.end()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        """The client's transport: our replies are small, its pace is not ours to set."""

    def unregisterProducer(self) -> None:
        pass

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        self.frames.end()

    # -- the script -------------------------------------------------------------------

    def _message(self, message: str | bytes) -> None:
        for reply in self.script.replies:
            if reply.matches(message):
                self._send(reply.send)
                if reply.close is not None:
                    self.frames.close(*reply.close)
                return
        if self.script.echo:
            self._send((Send(message),))

    def _send(self, messages: tuple[Send, ...]) -> None:
        for message in messages:
            self.frames.send(message.data)
