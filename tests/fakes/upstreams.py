"""Upstream servers on loopback for the daemon under test to proxy or relay to."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from websockets.sync.server import Server, ServerConnection, serve

MiB = 1024 * 1024


class QuietHandler(BaseHTTPRequestHandler):
    """http.server's handler without its line on stderr for every request."""

    def log_message(self, format: str, *args: object) -> None:
        pass

    def answer(self, status: int, body: bytes) -> None:
        """A whole answer: C{status} and C{body}, with its length."""
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@contextmanager
def serving_http(handler: type[BaseHTTPRequestHandler], **attributes: object) -> Iterator[int]:
    """
    An HTTP upstream on a loopback port (the value): C{handler}, given
    C{attributes} as class attributes, answers each request in its own thread.
    """
    if attributes:
        handler = type(handler.__name__, (handler,), attributes)
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


class RawUpstream:
    """
    A TCP upstream that takes one connection at a time and lets C{behave(sock)}
    script it byte by byte; C{served} is set each time a connection is done.
    """

    def __init__(self, behave: Callable[[socket.socket], None]) -> None:
        self.behave = behave
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port: int = self.listener.getsockname()[1]
        self.errors: list[BaseException] = []
        self.served = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            try:
                self.behave(sock)
            except BaseException as e:
                self.errors.append(e)
            finally:
                sock.close()
                self.served.set()

    def stop(self) -> None:
        self.listener.close()


def read_head(sock: socket.socket) -> bytes:
    """Bytes up to the blank line that ends an HTTP head (less if the peer closes first)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


class WebSocketUpstream:
    """
    A WebSocket server (the C{websockets} library's) that echoes every
    message, says goodbye and closes on 'bye', and keeps each handshake.
    """

    def __init__(self) -> None:
        self.handshakes: list[Any] = []
        self.server: Server = serve(self.handle, "127.0.0.1", 0, max_size=4 * MiB)
        self.port: int = self.server.socket.getsockname()[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def handle(self, connection: ServerConnection) -> None:
        assert connection.request is not None
        self.handshakes.append(connection.request)
        for message in connection:
            if message == "bye":
                connection.send("goodbye")
                connection.close()
                return
            connection.send(message)

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(10)
