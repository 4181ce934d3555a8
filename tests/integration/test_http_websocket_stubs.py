"""
WebSocket stub routes, with the `websockets` library as the client: on-open
messages, replies to text, JSON and regex matches, echo, close codes, over ws and wss.
"""

from __future__ import annotations

import json
import socket
import ssl

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from netd.testing import NetdProcess
from tests.conftest import StartNetd

MAP = """
tls:
  lab: {self_signed: [localhost, 127.0.0.1]}
services:
  web:
    type: http
    listen: ["tcp:0:interface=127.0.0.1", {endpoint: "ssl:0:interface=127.0.0.1", tls: lab}]
    record: 20
    routes:
      - {path: /health, body: "ok\\n"}
      - path: /ws/prices
        websocket:
          on_open: ["welcome", {json: {type: hello}}]
          replies:
            - {text: ping, send: pong}
            - {json: {type: subscribe}, send: [{json: {type: subscribed}}, tick]}
            - {regex: "^bye", send: "see you", close: {code: 4000, reason: bye}}
          echo: true
      - path: /ws/quiet
        websocket:
          subprotocols: [graphql-transport-ws, chat]
          replies: [{contains: hi, send: {base64: AAEC}}]
"""


@pytest.fixture
def netd(start_netd: StartNetd) -> NetdProcess:
    return start_netd(MAP)


def url(netd: NetdProcess, path: str, tls: bool = False) -> str:
    host, port = netd.address("web", tls=tls)
    return f"{'wss' if tls else 'ws'}://{host}:{port}{path}"


def still_serving(netd: NetdProcess) -> None:
    assert httpx.get(netd.url("web", False, "/health"), timeout=10).text == "ok\n"


def test_the_script_runs(netd: NetdProcess) -> None:
    with connect(url(netd, "/ws/prices"), open_timeout=10) as ws:
        assert ws.recv(timeout=10) == "welcome"
        assert json.loads(ws.recv(timeout=10)) == {"type": "hello"}
        ws.send("ping")
        assert ws.recv(timeout=10) == "pong"
        ws.send(json.dumps({"type": "subscribe", "symbol": "NETD"}))
        assert json.loads(ws.recv(timeout=10)) == {"type": "subscribed"}
        assert ws.recv(timeout=10) == "tick"
        ws.send("anything else")
        assert ws.recv(timeout=10) == "anything else"
        ws.send(b"\x00\xffbinary")
        assert ws.recv(timeout=10) == b"\x00\xffbinary"
        big = "x" * 300_000  # several frames and reads
        ws.send(big)
        assert ws.recv(timeout=10) == big
        ws.send("bye now")
        assert ws.recv(timeout=10) == "see you"
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
    assert ws.close_code == 4000 and ws.close_reason == "bye"
    [record] = [r for r in netd.requests("web") if r["path"] == "/ws/prices"]
    assert record["status"] == 101 and record["route"] == "routes[1]"
    still_serving(netd)


def test_wss_and_a_client_that_closes(netd: NetdProcess) -> None:
    context = ssl.create_default_context(cafile=str(netd.ca_file("lab")))
    with connect(
        url(netd, "/ws/quiet", tls=True),
        ssl=context,
        open_timeout=10,
        subprotocols=["chat", "graphql-transport-ws"],  # type: ignore[list-item]
    ) as ws:
        assert ws.subprotocol == "graphql-transport-ws"  # the server's preference
        ws.send("say hi")
        assert ws.recv(timeout=10) == b"\x00\x01\x02"
        ws.send("nothing matches this and there is no echo")
        ws.ping()
    assert ws.close_code == 1000
    still_serving(netd)


def test_a_plain_request_and_a_bad_handshake(netd: NetdProcess) -> None:
    plain = httpx.get(netd.url("web", False, "/ws/prices"), timeout=10)
    assert plain.status_code == 426 and plain.headers["upgrade"] == "websocket"
    verify = ssl.create_default_context(cafile=str(netd.ca_file("lab")))
    with httpx.Client(http2=True, verify=verify, timeout=10) as client:
        over_h2 = client.get(netd.url("web", True, "/ws/prices"))
    assert over_h2.http_version == "HTTP/2" and over_h2.status_code == 426
    with socket.create_connection(netd.address("web"), timeout=10) as sock:
        sock.sendall(
            b"GET /ws/prices HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Version: 8\r\n\r\n"
        )
        refused = sock.recv(4096)  # RFC 6455 4.2.2: 426 and the version spoken
        assert refused.startswith(b"HTTP/1.1 426 ")
        assert b"\r\nSec-WebSocket-Version: 13\r\n" in refused
    # Garbage after the handshake: a protocol error closes that socket only.
    with socket.create_connection(netd.address("web"), timeout=10) as sock:
        sock.sendall(
            b"GET /ws/prices HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            + b"\xff"
            * 64
        )
        received = b""
        while chunk := sock.recv(4096):
            received += chunk
        assert received.startswith(b"HTTP/1.1 101 ")
        assert b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in received
        assert b"\x88" in received  # a Close frame before the end
    still_serving(netd)
