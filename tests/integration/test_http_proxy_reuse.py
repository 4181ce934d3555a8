"""
Which upstream connections the proxy reuses: an HTTP/1.0 answer without
C{Connection: keep-alive}, or any answer with C{Connection: close}, ends its
connection (RFC 9112 9.3), so the next request must go out on another one.
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack

import pytest

from netd.testing import NetdProcess
from tests.conftest import StartNetd
from tests.fakes.upstreams import QuietHandler, serving_http
from tests.maps import proxying


class _Upstream(QuietHandler):
    """Echoes method, path and body as JSON; notes which connection each request came on."""

    connection_field: str | None = None
    peers: list[int]

    def _answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.peers.append(self.client_address[1])
        reply = json.dumps(
            {"method": self.command, "path": self.path, "body": body.decode()}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        if self.connection_field is not None:
            self.send_header("Connection", self.connection_field)
        self.end_headers()
        self.wfile.write(reply)

    do_GET = do_POST = _answer


class _LingeringUpstream(_Upstream):
    """
    Closes at the worst moment: only once the proxy has sent more on the
    connection (or closed its side), so a proxy that wrongly reuses the
    connection always loses that request, whatever the timing.
    """

    def _answer(self) -> None:
        super()._answer()
        if self.close_connection:
            self.wfile.flush()
            select.select([self.connection], [], [], 5)

    do_GET = do_POST = _answer


StartUpstream = Callable[..., tuple[int, list[int]]]


@pytest.fixture
def start_upstream() -> Iterator[StartUpstream]:
    """
    Starts upstreams (HTTP/1.0 unless told: http.server's default); each gives
    its port and the client port of each request it answered.
    """
    with ExitStack() as servers:

        def start(
            base: type[_Upstream] = _Upstream,
            protocol_version: str = "HTTP/1.0",
            connection_field: str | None = None,
        ) -> tuple[int, list[int]]:
            peers: list[int] = []
            port = servers.enter_context(
                serving_http(
                    base,
                    protocol_version=protocol_version,
                    connection_field=connection_field,
                    peers=peers,
                )
            )
            return port, peers

        yield start


def _pipelined(netd: NetdProcess, count: int) -> list[bytes]:
    """C{count} GETs in one write; the last asks to close, so the answers end with EOF."""
    requests = b"".join(
        b"GET /up/%d HTTP/1.1\r\nHost: x\r\n%s\r\n"
        % (n, b"Connection: close\r\n" if n == count - 1 else b"")
        for n in range(count)
    )
    with socket.create_connection(netd.address("web"), timeout=15) as sock:
        sock.sendall(requests)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return [line.split(b"\r\n", 1)[0] for line in received.split(b"HTTP/1.1 ")[1:]]


def _sequential(netd: NetdProcess, count: int, method: str = "GET") -> list[tuple[int, bytes]]:
    """C{count} requests one after the other on one keep-alive client connection."""
    client = http.client.HTTPConnection(*netd.address("web"), timeout=15)
    answers = []
    try:
        for n in range(count):
            body = b"payload %d" % n if method == "POST" else None
            client.request(method, f"/up/{n}", body=body)
            response = client.getresponse()
            answers.append((response.status, response.read()))
            assert not response.will_close, "netd closed the client's connection"
    finally:
        client.close()
    return answers


@pytest.mark.parametrize("base", [_Upstream, _LingeringUpstream], ids=["default", "lingering"])
def test_pipelined_requests_to_an_http10_upstream_all_succeed(
    start_netd: StartNetd, start_upstream: StartUpstream, base: type[_Upstream]
) -> None:
    port, peers = start_upstream(base)
    netd = start_netd(proxying(port, "/up/", timeout=10))
    statuses = _pipelined(netd, 3)
    assert statuses == [b"200 OK"] * 3, netd.output
    assert "failed" not in netd.output
    assert len(set(peers)) == 3, "each answer closed its upstream connection"


@pytest.mark.parametrize("base", [_Upstream, _LingeringUpstream], ids=["default", "lingering"])
def test_sequential_requests_to_an_http10_upstream_all_succeed(
    start_netd: StartNetd, start_upstream: StartUpstream, base: type[_Upstream]
) -> None:
    port, peers = start_upstream(base)
    netd = start_netd(proxying(port, "/up/", timeout=10))
    answers = _sequential(netd, 6)
    assert [status for status, _ in answers] == [200] * 6, netd.output
    assert [json.loads(body)["path"] for _, body in answers] == [f"/{n}" for n in range(6)]
    assert len(set(peers)) == 6


def test_posts_to_an_http10_upstream_carry_their_bodies(
    start_netd: StartNetd, start_upstream: StartUpstream
) -> None:
    port, _ = start_upstream(_LingeringUpstream)
    netd = start_netd(proxying(port, "/up/", timeout=10))
    answers = _sequential(netd, 4, method="POST")
    assert [status for status, _ in answers] == [200] * 4, netd.output
    echoed = [json.loads(body) for _, body in answers]
    assert [(e["method"], e["body"]) for e in echoed] == [
        ("POST", f"payload {n}") for n in range(4)
    ]


@pytest.mark.parametrize("field", ["close", "Close", "keep-alive, close"])
def test_an_http11_upstream_saying_close_in_any_spelling_is_not_reused(
    start_netd: StartNetd, start_upstream: StartUpstream, field: str
) -> None:
    """Connection options are case-insensitive tokens (RFC 9110 7.6.1)."""
    port, peers = start_upstream(_LingeringUpstream, "HTTP/1.1", field)
    netd = start_netd(proxying(port, "/up/", timeout=10))
    statuses = _pipelined(netd, 3)
    assert statuses == [b"200 OK"] * 3, netd.output
    assert len(set(peers)) == 3


@pytest.mark.parametrize(
    ("version", "field"),
    [("HTTP/1.1", None), ("HTTP/1.0", "keep-alive"), ("HTTP/1.0", "Keep-Alive")],
)
def test_a_persistent_upstream_connection_is_reused(
    start_netd: StartNetd, start_upstream: StartUpstream, version: str, field: str | None
) -> None:
    """HTTP/1.1, or HTTP/1.0 with keep-alive: one upstream connection serves them all."""
    port, peers = start_upstream(_Upstream, version, field)
    netd = start_netd(proxying(port, "/up/", timeout=10))
    assert _pipelined(netd, 3) == [b"200 OK"] * 3, netd.output
    assert [status for status, _ in _sequential(netd, 3, method="POST")] == [200] * 3
    assert len(peers) == 6 and len(set(peers)) == 1, peers


def test_a_proxied_answer_does_not_wait_for_the_clients_delayed_ack(
    start_netd: StartNetd,
) -> None:
    """
    The proxy writes an answer's head and then its body: on a kept-alive
    connection with Nagle's algorithm on, the body would wait for the client's
    delayed ACK (40 ms) every time; accepted connections turn it off.
    """
    origin = start_netd(
        "services:\n  origin:\n    type: http\n"
        '    listen: ["tcp:0:interface=127.0.0.1"]\n'
        "    routes: [{path: '/*', body: origin}]\n"
    )
    netd = start_netd(proxying(origin.address("origin")[1], "/up/", timeout=10))
    _sequential(netd, 1)  # the upstream connection, made
    started = time.monotonic()
    answers = _sequential(netd, 20)
    elapsed = time.monotonic() - started
    assert answers == [(200, b"origin")] * 20
    assert elapsed < 0.8, f"20 proxied answers took {elapsed:.2f} s: 40 ms each is Nagle's"


def test_upstream_connections_are_kept_for_as_many_clients_at_once(
    start_netd: StartNetd, start_upstream: StartUpstream
) -> None:
    """Eight clients at once, five requests each: eight upstream connections, reused."""
    port, peers = start_upstream(_Upstream, "HTTP/1.1")
    netd = start_netd(proxying(port, "/up/", timeout=10))
    barrier = threading.Barrier(8)
    answers: list[list[tuple[int, bytes]]] = []

    def client() -> None:
        barrier.wait(10)
        answers.append(_sequential(netd, 5))

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert [status for each in answers for status, _ in each] == [200] * 40
    # Twisted's pool keeps 2 idle a host: most requests would have connected anew.
    assert len(peers) == 40 and len(set(peers)) <= 8, len(set(peers))
