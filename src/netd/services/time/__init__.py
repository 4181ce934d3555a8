"""
The time protocol (RFC 868): the seconds since 1900-01-01 00:00 UTC as one
32-bit big-endian number, sent on a new stream connection (then closed) and
in answer to any datagram.
"""

from __future__ import annotations

import struct
from functools import partial
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol

from netd.config import ServiceConfig
from netd.datagrams import answering
from netd.kinds import BuildContext, Handlers, ServiceKind, no_options

__all__ = ["TIME", "rfc868_time"]

# Seconds from 1900-01-01 to the Unix epoch, 1970-01-01 (RFC 868's own figure).
_EPOCH_OFFSET = 2_208_988_800


def rfc868_time(unix_seconds: float) -> bytes:
    """
    RFC 868's four bytes for a Unix time.

    RFC 868 gives the count 32 bits and says it "will serve until the year
    2036": at 2036-02-07 06:28:16 UTC it wraps to 0 and counts on modulo
    2**32 (NTP's era rule, RFC 5905), so telling which era a count is in is
    the client's part, as it is for NTP.
    """
    return struct.pack("!I", (int(unix_seconds) + _EPOCH_OFFSET) % 2**32)


class Time(Protocol):
    """Sends the time on connecting, then closes; anything the client sends is ignored."""

    transport: Any

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock

    def connectionMade(self) -> None:
        self.transport.write(rfc868_time(self.clock.seconds()))
        self.transport.loseConnection()


def _build(service: ServiceConfig, context: BuildContext) -> Handlers:
    factory = Factory.forProtocol(partial(Time, context.reactor))
    factory.noisy = False
    return Handlers(
        stream=lambda listener: factory,
        # RFC 868 says answer any datagram (an empty one is expected).
        datagram=answering(context, lambda data: rfc868_time(context.reactor.seconds())),
    )


TIME: ServiceKind[None] = ServiceKind("time", no_options, _build, datagram=True, workers=True)
