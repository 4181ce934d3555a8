"""
WebSockets through a proxy route, with the `websockets` library on both ends: a
real upstream server and a real client, netd splicing them after the handshake.
"""

from __future__ import annotations

import base64
import os
import socket
import ssl
import urllib.request
from collections.abc import Iterator

import pytest
from websockets.exceptions import ConnectionClosedOK, InvalidStatus
from websockets.sync.client import connect

from netd.testing import NetdProcess
from tests.conftest import StartNetd, unused_port
from tests.fakes.upstreams import MiB, QuietHandler, WebSocketUpstream, serving_http


class _NoWebSockets(QuietHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.answer(403, b"no websockets here\n")


@pytest.fixture
def upstream() -> Iterator[WebSocketUpstream]:
    server = WebSocketUpstream()
    yield server
    server.stop()


@pytest.fixture
def refusing() -> Iterator[int]:
    with serving_http(_NoWebSockets) as port:
        yield port


@pytest.fixture
def netd(start_netd: StartNetd, upstream: WebSocketUpstream, refusing: int) -> NetdProcess:
    return start_netd(
        f"""
tls:
  lab: {{self_signed: [localhost, 127.0.0.1]}}
services:
  web:
    type: http
    listen: ["tcp:0:interface=127.0.0.1", {{endpoint: "ssl:0:interface=127.0.0.1", tls: lab}}]
    record: 20
    routes:
      - {{path: /ws/, proxy: "http://127.0.0.1:{upstream.port}/", timeout: 5}}
      - {{path: /refused/, proxy: "http://127.0.0.1:{refusing}/"}}
      - {{path: /down/, proxy: "http://127.0.0.1:{unused_port()}/"}}
      - {{path: /health, body: "ok\\n"}}
"""
    )


def ws_url(netd: NetdProcess, path: str, tls: bool = False) -> str:
    host, port = netd.address("web", tls=tls)
    return f"{'wss' if tls else 'ws'}://{host}:{port}{path}"


def still_serving(netd: NetdProcess) -> None:
    host, port = netd.address("web")
    with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=10) as answer:
        assert answer.read() == b"ok\n"


def test_messages_flow_both_ways_through_the_proxy(
    netd: NetdProcess, upstream: WebSocketUpstream
) -> None:
    with connect(ws_url(netd, "/ws/chat?room=1"), max_size=4 * MiB, open_timeout=10) as ws:
        ws.send("hello")
        assert ws.recv(timeout=10) == "hello"
        big = bytes(range(256)) * (2 * MiB // 256)  # more than any socket buffer holds
        ws.send(big)
        assert ws.recv(timeout=30) == big
    [handshake] = upstream.handshakes
    assert handshake.path == "/chat?room=1"
    assert handshake.headers["X-Forwarded-For"] == "127.0.0.1"
    assert handshake.headers["Host"] == f"127.0.0.1:{upstream.port}"
    [record] = [r for r in netd.requests("web") if r["path"].startswith("/ws/")]
    assert record["status"] == 101
    still_serving(netd)


def test_the_upstream_closing_closes_the_client(netd: NetdProcess) -> None:
    with connect(ws_url(netd, "/ws/"), open_timeout=10) as ws:
        ws.send("bye")
        assert ws.recv(timeout=10) == "goodbye"
        with pytest.raises(ConnectionClosedOK):
            ws.recv(timeout=10)
    still_serving(netd)


def test_wss_on_a_tls_listener(netd: NetdProcess) -> None:
    context = ssl.create_default_context(cafile=str(netd.ca_file("lab")))
    with connect(ws_url(netd, "/ws/secure", tls=True), ssl=context, open_timeout=10) as ws:
        ws.send("over tls")
        assert ws.recv(timeout=10) == "over tls"


def test_an_upstream_that_refuses_the_upgrade_answers_the_client(netd: NetdProcess) -> None:
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url(netd, "/refused/"), open_timeout=10)
    assert refused.value.response.status_code == 403
    assert refused.value.response.body == b"no websockets here\n"
    still_serving(netd)


def test_an_upstream_that_is_down_is_a_502(netd: NetdProcess) -> None:
    with pytest.raises(InvalidStatus) as failed:
        connect(ws_url(netd, "/down/"), open_timeout=10)
    assert failed.value.response.status_code == 502
    still_serving(netd)


def test_an_upgrade_to_a_route_that_does_not_proxy_is_answered_as_http(netd: NetdProcess) -> None:
    with pytest.raises(InvalidStatus) as answered:
        connect(ws_url(netd, "/health"), open_timeout=10)
    assert answered.value.response.status_code == 200
    still_serving(netd)


def test_a_frame_sent_with_the_handshake_is_not_lost(netd: NetdProcess) -> None:
    """Bytes after the request head are held until the upstream has switched."""
    key = base64.b64encode(os.urandom(16))
    mask = os.urandom(4)
    payload = b"early"
    frame = bytes([0x81, 0x80 | len(payload)]) + mask
    frame += bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    handshake = (
        b"GET /ws/ HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    with socket.create_connection(netd.address("web"), timeout=10) as sock:
        sock.sendall(handshake + frame)
        received = b""
        while not received.endswith(b"\x81\x05early"):
            chunk = sock.recv(4096)
            assert chunk, received
            received += chunk
    assert received.startswith(b"HTTP/1.1 101 ")
