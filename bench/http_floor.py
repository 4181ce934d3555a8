"""
The least a CPython HTTP/1.1 server can cost a request, two ways:

    python bench/http_floor.py PORT FILE                # no reactor: one epoll loop
    python bench/http_floor.py PORT FILE --twisted      # a bare Twisted protocol
    python bench/http_floor.py PORT FILE --twisted-now  # the same, writing as netd does

Not an HTTP server: each request is only counted by its blank line and
answered with the same head and FILE's bytes (read once), keep-alive, no
parsing, no logging, no limits.  http_bench.py runs them as peers
(``floor-epoll``, ``floor-twisted``, ``floor-twisted-now``), so a run says how
far netd is from what the interpreter and the reactor themselves cost a
request, and how far those are from nginx.

Twisted's own C{transport.write} only buffers: the bytes leave on the
reactor's next turn, after two epoll_ctl calls and a writable event.  netd
sends at once when nothing is queued ahead (L{netd.connections.TrackedConnection.write}),
so ``--twisted-now`` does the same, and is the floor netd's HTTP/1.1 path
stands on; ``--twisted`` is what a plain Twisted server pays.
"""

from __future__ import annotations

import select
import socket
import sys
from pathlib import Path


def answer_for(file: Path) -> bytes:
    body = file.read_bytes()
    head = (
        b"HTTP/1.1 200 OK\r\nServer: floor\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    return head + body


def serve_epoll(port: int, answer: bytes) -> None:
    listener = socket.create_server(("127.0.0.1", port), backlog=1024)
    listener.setblocking(False)
    poll = select.epoll()
    poll.register(listener.fileno(), select.EPOLLIN)
    clients: dict[int, tuple[socket.socket, bytearray]] = {}
    while True:
        for fd, _ in poll.poll():
            if fd == listener.fileno():
                try:
                    client, _ = listener.accept()
                except BlockingIOError:
                    continue
                client.setblocking(False)
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                clients[client.fileno()] = (client, bytearray())
                poll.register(client.fileno(), select.EPOLLIN)
                continue
            client, pending = clients[fd]
            try:
                data = client.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                poll.unregister(fd)
                del clients[fd]
                client.close()
                continue
            pending += data
            requests = pending.count(b"\r\n\r\n")
            if requests:
                del pending[: pending.rfind(b"\r\n\r\n") + 4]
                client.send(answer * requests)  # wrk's replies fit the socket's buffer


def serve_twisted(port: int, answer: bytes, now: bool) -> None:
    from twisted.internet import protocol, reactor, tcp

    from netd.compat import may_send_now

    class Floor(protocol.Protocol):
        transport: tcp.Server

        def connectionMade(self) -> None:
            self.pending = b""
            self.transport.setTcpNoDelay(True)

        def dataReceived(self, data: bytes) -> None:
            self.pending += data
            requests = self.pending.count(b"\r\n\r\n")
            if requests:
                self.pending = self.pending[self.pending.rfind(b"\r\n\r\n") + 4 :]
                out = answer * requests
                if now and not may_send_now(self.transport):
                    self.transport.write(out)
                elif now:
                    sent = self.transport.socket.send(out)
                    if sent < len(out):
                        self.transport.write(out[sent:])
                else:
                    self.transport.write(out)

    factory = protocol.Factory.forProtocol(Floor)
    reactor.listenTCP(port, factory, interface="127.0.0.1", backlog=1024)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    served = answer_for(Path(sys.argv[2]))
    if "--twisted" in sys.argv[3:] or "--twisted-now" in sys.argv[3:]:
        serve_twisted(int(sys.argv[1]), served, now="--twisted-now" in sys.argv[3:])
    else:
        serve_epoll(int(sys.argv[1]), served)
