"""
Datagram services that answer each datagram with another (echo, chargen, time,
...): counted in the service's stats, and never answering the ports of the
inetd simple services.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.protocol import DatagramProtocol

from netd.config import ListenerConfig
from netd.kinds import BuildContext

__all__ = ["LOOP_PORTS", "Answering", "answering"]

# Datagrams from these source ports come from an inetd simple service (echo,
# discard, daytime, qotd, chargen, time): answering one is how two hosts'
# services ping-pong for ever (CVE-1999-0103).
LOOP_PORTS = frozenset({0, 7, 9, 13, 17, 19, 37})


class Answering(DatagramProtocol):
    """Answers each datagram with C{reply(data)}, or not at all for L{None}."""

    noisy = False
    transport: Any

    def __init__(self, context: BuildContext, reply: Callable[[bytes], bytes | None]) -> None:
        self.context = context
        self.reply = reply

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        stats = self.context.stats
        stats.bytes_in += len(data)
        stats.count("datagrams_in")
        if addr[1] in LOOP_PORTS:
            return
        answer = self.reply(data)
        if answer is not None:
            self.transport.write(answer, addr)
            stats.bytes_out += len(answer)


def answering(
    context: BuildContext, reply: Callable[[bytes], bytes | None]
) -> Callable[[ListenerConfig], DatagramProtocol]:
    """The C{Handlers.datagram} of a service answering datagrams with C{reply}."""
    return lambda listener: Answering(context, reply)
