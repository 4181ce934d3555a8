"""
The inetd simple services: echo (RFC 862), discard (863), chargen (864),
quote of the day (865) and daytime (867), over streams and datagrams.
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet import tcp
from twisted.internet.interfaces import IProtocolFactory, IPullProducer
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from netd.compat import read_with
from netd.config import ListenerConfig, ServiceConfig, TLSProfiles
from netd.connections import TrackedConnection, plain_socket, read_into, send_now
from netd.datagrams import answering
from netd.kinds import BuildContext, Handlers, ServiceKind, no_options
from netd.records import Record
from netd.schema import Section

__all__ = ["CHARGEN", "DAYTIME", "DISCARD", "ECHO", "QOTD"]

# RFC 865: "the quote may be ... limited to 512 characters".
_QUOTE_LIMIT = 512

_PRINTABLE = bytes(range(32, 127))
_LINE = 72
# The chargen pattern repeats every len(_PRINTABLE) lines; one full cycle is one write.
_CHARGEN_CYCLE = b"".join((_PRINTABLE * 2)[i : i + _LINE] + b"\r\n" for i in range(len(_PRINTABLE)))


def _stream(protocol: type[Protocol]) -> Callable[[ListenerConfig], IProtocolFactory]:
    factory = Factory.forProtocol(protocol)
    factory.noisy = False
    return lambda listener: factory


class Echo(Protocol):
    transport: Any  # a TCP, TLS or UNIX transport: all are producers and consumers

    def connectionMade(self) -> None:
        # A client that sends without reading would otherwise grow our write
        # buffer forever: stop reading while the echo backs up.
        self.transport.registerProducer(self.transport, True)
        # Reads go straight to the transport's write: one Python call fewer per echo.
        self.dataReceived = self.transport.write  # type: ignore[method-assign]
        connection = plain_socket(self.transport)
        if connection is not None and isinstance(self.transport, TrackedConnection):
            read_with(
                connection,
                functools.partial(_echo_straight, connection, self.transport, _read_buffer()),
            )

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


@functools.cache
def _read_buffer() -> memoryview:
    """
    What an echo reads at once on a plain socket, into one buffer every echo
    connection of the process shares (made at the first, not at import: idle
    memory): each read is sent back, or what the socket does not take copied
    into Twisted's write buffer, before the next read.
    """
    return memoryview(bytearray(1 << 18))


def _echo_straight(
    connection: tcp.Connection, tracked: TrackedConnection, buffer: memoryview
) -> Any:
    """
    Twisted's C{doRead} for an echo over a plain socket: read into the shared
    buffer and send from it, with no bytes object made for what the socket
    takes at once (Twisted's own reads allocate 64 KiB each and its writes wait
    for the next reactor turn).  Returns what C{doRead} returns.
    """
    size = read_into(connection, buffer)
    if not isinstance(size, int):
        return size
    chunk = buffer[:size]
    if tracked.shaper is not None:
        tracked.dataReceived(bytes(chunk))  # a rule paces or cuts the writes: through it
        return None
    tracked.bytes_in += size
    tracked.bytes_out += size
    send_now(connection, chunk)
    return None


class Discard(Protocol):
    def dataReceived(self, data: bytes) -> None:
        pass


@implementer(IPullProducer)
class Chargen(Protocol):
    transport: Any

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, False)

    def resumeProducing(self) -> None:
        self.transport.write(_CHARGEN_CYCLE)

    def stopProducing(self) -> None:
        pass


class _OneShot(Protocol):
    """Sends one answer and closes (daytime, qotd)."""

    answer: Callable[[], bytes]
    transport: Any

    def connectionMade(self) -> None:
        self.transport.write(self.answer())
        self.transport.loseConnection()


def _daytime(clock: Any) -> bytes:
    return time.strftime("%A, %B %d, %Y %H:%M:%S-UTC\r\n", time.gmtime(clock.seconds())).encode()


def _build_echo(service: ServiceConfig, context: BuildContext) -> Handlers:
    return Handlers(stream=_stream(Echo), datagram=answering(context, lambda data: data))


def _build_discard(service: ServiceConfig, context: BuildContext) -> Handlers:
    return Handlers(stream=_stream(Discard), datagram=answering(context, lambda data: None))


def _build_chargen(service: ServiceConfig, context: BuildContext) -> Handlers:
    # RFC 864 leaves the datagram size to the server "between 0 and 512"; a fixed
    # 512 keeps answers predictable.
    answer = _CHARGEN_CYCLE[:_QUOTE_LIMIT]
    return Handlers(stream=_stream(Chargen), datagram=answering(context, lambda data: answer))


def _one_shot(answer: Callable[[], bytes]) -> type[_OneShot]:
    return type("OneShot", (_OneShot,), {"answer": staticmethod(answer)})


def _build_daytime(service: ServiceConfig, context: BuildContext) -> Handlers:
    def answer() -> bytes:
        return _daytime(context.reactor)

    return Handlers(
        stream=_stream(_one_shot(answer)), datagram=answering(context, lambda data: answer())
    )


@attrs.frozen(repr=False)
class QuoteOptions(Record):
    quotes: tuple[str, ...]


_DEFAULT_QUOTES = (
    "Be conservative in what you do, be liberal in what you accept from others. - RFC 793",
    "There is no silver bullet. - Fred Brooks",
)


def _parse_qotd(section: Section, profiles: TLSProfiles) -> QuoteOptions:
    value = section.get("quotes")
    if value is None:
        return QuoteOptions(_DEFAULT_QUOTES)
    quotes = []
    reported = len(value.problems.errors)
    for element in value.elements():
        before = len(value.problems.errors)
        quote = element.as_str()
        if len(value.problems.errors) != before:
            continue  # not a string: already reported
        if not quote.strip():
            element.error("a quote cannot be empty")
        elif len(quote.encode()) > _QUOTE_LIMIT - 2:
            element.error(f"a quote must fit in {_QUOTE_LIMIT} bytes (RFC 865)")
        else:
            quotes.append(quote)
    if not quotes and value.is_sequence and len(value.problems.errors) == reported:
        value.error("give at least one quote")
    return QuoteOptions(tuple(quotes) or _DEFAULT_QUOTES)


def _build_qotd(service: ServiceConfig, context: BuildContext) -> Handlers:
    options: QuoteOptions = service.options
    rotation = itertools.cycle(q.rstrip("\r\n").encode() + b"\r\n" for q in options.quotes)

    def answer() -> bytes:
        return next(rotation)

    return Handlers(
        stream=_stream(_one_shot(answer)), datagram=answering(context, lambda data: answer())
    )


ECHO: ServiceKind[None] = ServiceKind("echo", no_options, _build_echo, datagram=True, workers=True)
DISCARD: ServiceKind[None] = ServiceKind(
    "discard", no_options, _build_discard, datagram=True, workers=True
)
CHARGEN: ServiceKind[None] = ServiceKind(
    "chargen", no_options, _build_chargen, datagram=True, workers=True
)
DAYTIME: ServiceKind[None] = ServiceKind(
    "daytime", no_options, _build_daytime, datagram=True, workers=True
)
QOTD: ServiceKind[QuoteOptions] = ServiceKind(
    "qotd", _parse_qotd, _build_qotd, datagram=True, workers=True
)
