"""
netd.sendfile: reads through a StringTransport, and sendfile(2) through a real
loopback socket pair whose writability is driven by hand (a MemoryReactor).
"""

from __future__ import annotations

import io
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure

from netd.connections import TrackedConnection
from netd.sendfile import READ_CHUNK, SENDFILE_CHUNK, Truncated, plain_socket, send_file

CONTENT = os.urandom(SENDFILE_CHUNK * 2 + 12345)


@pytest.fixture
def source(tmp_path: Path) -> Iterator[io.FileIO]:
    path = tmp_path / "data.bin"
    path.write_bytes(CONTENT)
    with io.FileIO(path, "r") as opened:
        yield opened


def outcome(sending: Deferred[None]) -> list[object]:
    """What C{sending} fired with so far (a failure's exception), kept from being logged."""
    seen: list[object] = []
    sending.addCallbacks(seen.append, lambda f: seen.append(f.value))
    return seen


# -- reads, for whatever is not a plain socket -----------------------------------------


def pull(transport: StringTransport, turns: int = 1000) -> None:
    """Ask the registered pull producer for more, as a transport whose buffer empties would."""
    for _ in range(turns):
        if transport.producer is None:
            return
        transport.producer.resumeProducing()
    raise AssertionError("the producer never finished")


def test_a_whole_file_is_read_to_its_end(source: io.FileIO) -> None:
    transport = StringTransport()
    counted: list[int] = []
    seen = outcome(send_file(transport, source, progress=counted.append))
    assert transport.streaming is False
    pull(transport)
    assert seen == [None]
    assert transport.value() == CONTENT
    assert sum(counted) == len(CONTENT)
    assert max(counted) == READ_CHUNK
    assert not source.closed  # the caller's, for its next range


def test_a_range_is_read_from_its_offset(source: io.FileIO) -> None:
    transport = StringTransport()
    seen = outcome(send_file(transport, source, 1000, READ_CHUNK + 7))
    pull(transport)
    assert seen == [None]
    assert transport.value() == CONTENT[1000 : 1000 + READ_CHUNK + 7]


def test_a_transform_applies_to_every_chunk(source: io.FileIO) -> None:
    transport = StringTransport()
    counted: list[int] = []
    send_file(transport, source, 0, 10, counted.append, lambda data: data * 2)
    pull(transport)
    assert transport.value() == CONTENT[:10] * 2
    assert counted == [20]  # what went out, not what was read


def test_a_file_truncated_under_the_reads_fails(source: io.FileIO, tmp_path: Path) -> None:
    transport = StringTransport()
    seen = outcome(send_file(transport, source, 0, len(CONTENT)))
    transport.producer.resumeProducing()
    os.truncate(tmp_path / "data.bin", READ_CHUNK + 5)
    pull(transport)
    assert len(seen) == 1 and isinstance(seen[0], Truncated)
    assert transport.value() == CONTENT[: READ_CHUNK + 5]
    assert transport.producer is None


def test_a_consumer_that_stops_ends_the_reads(source: io.FileIO) -> None:
    transport = StringTransport()
    seen = outcome(send_file(transport, source))
    producer = transport.producer
    producer.resumeProducing()
    producer.stopProducing()
    producer.resumeProducing()  # a late call reads nothing more
    assert len(seen) == 1 and isinstance(seen[0], ConnectionLost)
    assert transport.value() == CONTENT[:READ_CHUNK]


# -- which transports sendfile can write to ---------------------------------------------


class Pair:
    """A server-side Twisted TCP connection over a real loopback socket, and its peer."""

    def __init__(self, family: int = socket.AF_INET) -> None:
        if family == socket.AF_UNIX:
            ours, self.peer = socket.socketpair()
        else:
            with socket.create_server(("127.0.0.1", 0)) as listener:
                self.peer = socket.create_connection(listener.getsockname())
                ours, _ = listener.accept()
        self.peer.setblocking(False)
        self.reactor = MemoryReactor()
        self.ours = ours  # Twisted forgets its socket once the connection is lost
        self.raw = tcp.Connection(ours, Protocol(), cast(Any, self.reactor))
        self.raw.connected = True

    def corked(self) -> bool:
        return bool(self.raw.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK))

    def drain(self) -> bytes:
        received = bytearray()
        while True:
            try:
                data = self.peer.recv(1 << 20)
            except BlockingIOError:
                return bytes(received)
            if not data:
                return bytes(received)
            received += data

    def run(self, sending: Deferred[None], turns: int = 10000) -> bytes:
        """Let the socket write whenever the transport asks to, until C{sending} fires."""
        received = bytearray()
        for _ in range(turns):
            if sending.called:
                return bytes(received + self.drain())
            if self.raw in self.reactor.getWriters():
                self.raw.doWrite()
            received += self.drain()
        raise AssertionError("sendfile never finished")

    def close(self) -> None:
        self.ours.close()
        self.peer.close()


@pytest.fixture
def pair() -> Iterator[Pair]:
    made = Pair()
    yield made
    made.close()


def test_sendfile_writes_only_to_a_plain_socket(pair: Pair) -> None:
    assert plain_socket(StringTransport()) is None
    assert plain_socket(pair.raw) is pair.raw
    tracked = TrackedConnection(cast(Any, None), Protocol())
    tracked.transport = pair.raw
    assert plain_socket(tracked) is pair.raw
    # A TLS wrapper's transport is the socket under it: not one to write plaintext to.
    tls = TLSMemoryBIOProtocol(cast(Any, None), Protocol())
    tls.transport = pair.raw
    assert plain_socket(tls) is None
    tracked.transport = tls
    assert plain_socket(tracked) is None
    pair.raw.TLS = True  # startTLS on the connection itself
    assert plain_socket(pair.raw) is None


def test_sendfile_sends_what_was_buffered_then_the_whole_file(
    pair: Pair, source: io.FileIO
) -> None:
    pair.raw.write(b"head\r\n")
    counted: list[int] = []
    sending = send_file(pair.raw, source, progress=counted.append)
    seen = outcome(sending)
    assert pair.corked()  # the head waits for the file's first bytes
    assert pair.raw.dataBuffer or pair.raw._tempDataBuffer
    received = pair.run(sending)
    assert seen == [None]
    assert received == b"head\r\n" + CONTENT
    assert sum(counted) == len(CONTENT)
    assert max(counted) <= SENDFILE_CHUNK
    assert not pair.corked()
    assert pair.raw.producer is None


def test_with_nothing_queued_the_file_starts_at_once(pair: Pair, source: io.FileIO) -> None:
    # No reactor turn, no writer registered and no cork: what waiting for the
    # transport to ask cost every response whose head had already gone.
    sending = send_file(pair.raw, source, 0, 5000)
    seen = outcome(sending)
    assert seen == [None]
    assert pair.raw not in pair.reactor.getWriters()
    assert pair.raw.producer is None
    assert pair.drain() == CONTENT[:5000]


def test_the_cork_is_lifted_once_the_file_has_started(pair: Pair, source: io.FileIO) -> None:
    # Corked for the whole file, the kernel held each call's last partial
    # segment back: a 1 GiB download ran at half the rate.
    pair.raw.write(b"head\r\n")
    sending = send_file(pair.raw, source)
    assert pair.corked()
    pair.raw.doWrite()  # the head, then the file's first chunk
    assert pair.raw.producer is not None  # more of the file is still to come
    assert not pair.corked()
    pair.run(sending)


def test_sendfile_sends_a_range(pair: Pair, source: io.FileIO) -> None:
    sending = send_file(pair.raw, source, SENDFILE_CHUNK - 3, SENDFILE_CHUNK + 10)
    seen = outcome(sending)
    received = pair.run(sending)
    assert seen == [None]
    assert received == CONTENT[SENDFILE_CHUNK - 3 : 2 * SENDFILE_CHUNK + 7]


def test_sendfile_counts_its_bytes_into_the_core_wrapper(pair: Pair, source: io.FileIO) -> None:
    tracked = TrackedConnection(cast(Any, None), Protocol())
    tracked.transport = pair.raw
    sending = send_file(tracked, source, 0, 5000)
    pair.run(sending)
    assert tracked.bytes_out == 5000


def test_sendfile_fails_when_the_file_is_truncated_under_it(
    pair: Pair, source: io.FileIO, tmp_path: Path
) -> None:
    sending = send_file(pair.raw, source, 0, len(CONTENT))
    seen = outcome(sending)
    # The first chunk went at once (nothing was queued); the file ends in the second.
    os.truncate(tmp_path / "data.bin", SENDFILE_CHUNK + 100)
    received = pair.run(sending)
    assert len(seen) == 1 and isinstance(seen[0], Truncated)
    assert received == CONTENT[: SENDFILE_CHUNK + 100]
    assert pair.raw.producer is None
    assert not pair.corked()


def test_sendfile_stops_when_the_connection_is_lost(pair: Pair, source: io.FileIO) -> None:
    sending = send_file(pair.raw, source)
    seen = outcome(sending)
    pair.raw.doWrite()  # the first chunk
    pair.raw.connectionLost(Failure(ConnectionLost()))
    assert len(seen) == 1 and isinstance(seen[0], ConnectionLost)
    assert pair.raw.producer is None


def test_sendfile_to_a_unix_socket_is_not_corked(source: io.FileIO) -> None:
    pair = Pair(socket.AF_UNIX)
    try:
        sending = send_file(pair.raw, source, 0, 70000)
        seen = outcome(sending)
        assert pair.run(sending) == CONTENT[:70000]
        assert seen == [None]
    finally:
        pair.close()


def test_a_transform_rules_sendfile_out(pair: Pair, source: io.FileIO) -> None:
    sending = send_file(pair.raw, source, 0, 6, transform=bytes.upper)
    seen = outcome(sending)
    assert not pair.corked()
    assert pair.run(sending) == CONTENT[:6].upper()
    assert seen == [None]


def test_over_tls_the_file_is_read_and_written_through_the_wrapper(
    source: io.FileIO,
) -> None:
    # As http's connections over TLS: the core's wrapper on a transport that is
    # not a socket (a StringTransport standing for the TLS protocol).
    tracked = TrackedConnection(cast(Any, None), Protocol())
    below = StringTransport()
    tracked.transport = below
    counted: list[int] = []
    seen = outcome(send_file(tracked, source, 10, 300000, counted.append))
    pull(below)
    assert seen == [None]
    assert below.value() == CONTENT[10:300010]
    assert tracked.bytes_out == sum(counted) == 300000
