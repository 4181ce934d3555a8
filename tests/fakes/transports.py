"""Transports that record what a protocol asks of them."""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import ITLSTransport
from twisted.internet.testing import StringTransport
from zope.interface import implementer


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    """Records each STARTTLS (its context factory) instead of doing it."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.started_tls: list[object] = []

    def startTLS(self, contextFactory: object) -> None:
        self.started_tls.append(contextFactory)


class HalfClosingStringTransport(StringTransport):
    """A TCP connection's transport: records a half-close (our FIN) too."""

    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True
