"""
Sending a file's bytes over a connection, for every kind that serves files.

L{send_file} picks the way: C{sendfile(2)} when the consumer is a plain TCP (or
UNIX) socket, so the kernel copies from the page cache to the socket and no
byte passes through Python; reads of L{READ_CHUNK} written to the consumer
otherwise (TLS, HTTP/2 streams, test transports, or when the bytes must be
transformed on the way).  Either way the file is sent as a pull producer: the
transport asks for more only when it has sent what it had, so a slow client
holds back the reads instead of filling memory.

Both ways read on the reactor thread.  A page-cache miss makes one call wait
for the disk: at most L{SENDFILE_CHUNK} for C{sendfile}, L{READ_CHUNK} for a
read.  Handing each chunk to a thread would cost a thread switch per chunk on
every download to spare the rare cold one; no kind does it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import IO

import attrs
from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IConsumer, IPullProducer
from twisted.python.failure import Failure
from zope.interface import implementer

from netd.compat import may_send_now
from netd.connections import TrackedConnection, plain_socket
from netd.records import Record

__all__ = ["READ_CHUNK", "SENDFILE_CHUNK", "Truncated", "plain_socket", "send_file"]

SENDFILE_CHUNK = 1 << 20
READ_CHUNK = 256 << 10

_TCP_FAMILIES = (socket.AF_INET, socket.AF_INET6)


class Truncated(Exception):
    """The file ended before the bytes promised for it: the receiver cannot be told in-band."""


def send_file(
    consumer: IConsumer,
    file: IO[bytes],
    offset: int = 0,
    count: int | None = None,
    progress: Callable[[int], None] | None = None,
    transform: Callable[[bytes], bytes] | None = None,
) -> Deferred[None]:
    """
    Send C{count} bytes of C{file} from C{offset} (to its end if C{None}) to C{consumer}.

    Fires once the last byte is handed to the transport and the producer is
    unregistered; fails with L{Truncated} if the file ends first, the C{OSError}
    of a failed C{sendfile}, or L{ConnectionLost} when the consumer stops it.
    On failure the caller decides what the connection becomes (the bytes it
    promised can no longer all come); the file is never closed here, so that
    one file can give several ranges.

    @param progress: called with the number of bytes of each write or send.
    @param transform: applied to each chunk read (FTP's ASCII line ends); it
        rules C{sendfile} out.
    """
    raw = plain_socket(consumer) if transform is None else None
    fd = file.fileno()
    producer: _FileProducer
    if raw is not None:
        producer = _Sendfile(consumer, fd, offset, count, progress, raw)
        # Nothing queued ahead (a response head already went, sent at once):
        # the file may start in the call that registers it.
        producer.primed = may_send_now(raw)
    else:
        producer = _Chunks(consumer, fd, offset, count, progress, transform)
    consumer.registerProducer(producer, False)
    return producer.done


@attrs.define(eq=False, repr=False)
class _FileProducer(Record):
    """What both ways share: the range left (C{remaining} C{None}: to the end) and how it ends."""

    consumer: IConsumer
    fd: int
    offset: int
    remaining: int | None
    progress: Callable[[int], None] | None
    done: Deferred[None] = attrs.field(init=False, factory=Deferred)

    def _chunk(self, most: int) -> int:
        return most if self.remaining is None else min(most, self.remaining)

    def _advance(self, size: int) -> None:
        self.offset += size
        if self.remaining is not None:
            self.remaining -= size

    def _count(self, size: int) -> None:
        if self.progress is not None:
            self.progress(size)

    def _ended(self) -> None:
        """The file has no byte left at C{offset}."""
        if self.remaining:
            self._finish(Failure(Truncated(f"{self.remaining} bytes missing")))
        else:
            self._finish(None)

    def _finish(self, reason: Failure | None) -> None:
        self.consumer.unregisterProducer()
        if reason is None:
            self.done.callback(None)
        else:
            self.done.errback(reason)

    def stopProducing(self) -> None:
        if not self.done.called:
            self.done.errback(Failure(ConnectionLost("the file's consumer went away")))


@implementer(IPullProducer)
@attrs.define(eq=False, repr=False)
class _Chunks(_FileProducer):
    """Reads of L{READ_CHUNK}, each written to the consumer when it asks for more."""

    transform: Callable[[bytes], bytes] | None

    def resumeProducing(self) -> None:
        if self.done.called:
            return
        if self.remaining == 0:
            self._finish(None)
            return
        try:
            data = os.pread(self.fd, self._chunk(READ_CHUNK), self.offset)
        except OSError as e:
            self._finish(Failure(e))
            return
        if not data:
            self._ended()
            return
        self._advance(len(data))
        if self.transform is not None:
            data = self.transform(data)
        self.consumer.write(data)
        self._count(len(data))


@implementer(IPullProducer)
@attrs.define(eq=False, repr=False)
class _Sendfile(_FileProducer):
    """
    C{sendfile(2)} straight to the socket, each time the transport has sent
    what it had buffered (a response head, a part's preamble) and asks for more.

    With nothing buffered ahead, the first C{sendfile} is made at once, in the
    call that registers the producer: waiting for the transport to ask cost a
    reactor turn, two C{epoll_ctl} calls, an empty C{send} (Twisted's doWrite
    with nothing to write) and two C{setsockopt} calls a response.  Otherwise
    the socket is corked from the first ask until the first C{sendfile}, so
    that what was buffered and the file's start leave in full segments rather
    than a small one first (a client then pays a wake-up less per response:
    wrk at 1 MiB was CPU-bound on exactly that).  It is uncorked right after:
    corked for the whole file, a 1 GiB download ran at 0.4-0.6x the rate of an
    uncorked one, the kernel holding each call's last partial segment back.
    Bytes sent this way bypass the core's wrapper, so they are counted into
    its C{bytes_out} here, or the idle sweep would take a long download for a
    dead connection.
    """

    raw: tcp.Connection
    tracked: TrackedConnection | None = attrs.field(init=False)
    corked: bool = attrs.field(init=False, default=False)
    primed: bool = attrs.field(init=False, default=False)

    def __attrs_post_init__(self) -> None:
        self.tracked = self.consumer if isinstance(self.consumer, TrackedConnection) else None

    def _cork(self, on: bool) -> None:
        if on != self.corked and self.raw.socket.family in _TCP_FAMILIES:
            self.raw.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, int(on))
            self.corked = on

    def resumeProducing(self) -> None:
        if self.done.called:
            return
        if not self.primed:
            # Asked at once by registerProducer, with bytes still buffered
            # before the file: the transport asks again once they are sent.
            self.primed = True
            self._cork(True)
            self.raw.startWriting()
            return
        if self.remaining == 0:
            self._finish(None)
            return
        try:
            sent = os.sendfile(self.raw.fileno(), self.fd, self.offset, self._chunk(SENDFILE_CHUNK))
        except BlockingIOError:
            self.raw.startWriting()
            return
        except OSError as e:
            self._finish(Failure(e))
            return
        if sent == 0:
            self._ended()
            return
        self._cork(False)
        self._advance(sent)
        self._count(sent)
        if self.tracked is not None:
            self.tracked.bytes_out += sent
        if self.remaining == 0:
            self._finish(None)
            return
        self.raw.startWriting()

    def _finish(self, reason: Failure | None) -> None:
        self._cork(False)
        super()._finish(reason)
