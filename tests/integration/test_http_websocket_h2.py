"""
WebSocket stub routes over HTTP/2 (RFC 8441): a bare h2 client opens the WebSocket
with an extended CONNECT, and wsproto frames the messages on the stream.
"""

from __future__ import annotations

import socket
import ssl
import time

import h2.config
import h2.connection
import h2.events
import h2.settings
import httpx
from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection, Event, Message, TextMessage

from netd.testing import NetdProcess
from tests.conftest import StartNetd

MAP = """
tls:
  lab: {self_signed: [localhost, 127.0.0.1]}
services:
  web:
    type: http
    listen: [{endpoint: "ssl:0:interface=127.0.0.1", tls: lab}]
    record: 20
    routes:
      - {path: /health, body: "ok\\n"}
      - path: /ws/prices
        websocket:
          on_open: [welcome]
          subprotocols: [chat]
          replies:
            - {text: ping, send: pong}
            - {regex: "^bye", send: "see you", close: {code: 4000, reason: bye}}
          echo: true
"""


class H2WebSocket:
    """One WebSocket on stream 1 of a bare h2 connection."""

    def __init__(self, netd: NetdProcess) -> None:
        context = ssl.create_default_context(cafile=str(netd.ca_file("lab")))
        context.set_alpn_protocols(["h2"])
        raw = socket.create_connection(netd.address("web", tls=True), timeout=10)
        self.sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
        assert self.sock.selected_alpn_protocol() == "h2"
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.h2.initiate_connection()
        self.sock.sendall(self.h2.data_to_send())
        self.ws = Connection(ConnectionType.CLIENT)
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self.ended = False
        self.connect_protocol = False

    def pump(self) -> list[h2.events.Event]:
        data = self.sock.recv(65536)
        assert data, "netd closed the connection"
        events = self.h2.receive_data(data)
        for event in events:
            if isinstance(event, h2.events.RemoteSettingsChanged):
                setting = event.changed_settings.get(
                    h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL
                )
                self.connect_protocol = self.connect_protocol or (
                    setting is not None and setting.new_value == 1
                )
            elif isinstance(event, h2.events.ResponseReceived):
                self.headers = dict(event.headers)
                self.status = int(self.headers[b":status"])
            elif isinstance(event, h2.events.DataReceived):
                self.ws.receive_data(event.data)
                self.h2.acknowledge_received_data(event.flow_controlled_length, 1)
            elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                self.ended = True
        self.sock.sendall(self.h2.data_to_send())
        return events

    def open(self, path: str, **extra: str) -> None:
        deadline = time.monotonic() + 10
        while not self.connect_protocol and time.monotonic() < deadline:
            self.pump()
        assert self.connect_protocol, "netd did not offer SETTINGS_ENABLE_CONNECT_PROTOCOL"
        headers = [
            (":method", "CONNECT"),
            (":protocol", "websocket"),
            (":scheme", "https"),
            (":path", path),
            (":authority", "localhost"),
            *extra.items(),
        ]
        self.h2.send_headers(1, headers)
        self.sock.sendall(self.h2.data_to_send())
        while not self.status and time.monotonic() < deadline:
            self.pump()

    def send(self, text: str) -> None:
        self.h2.send_data(1, self.ws.send(Message(data=text)))
        self.sock.sendall(self.h2.data_to_send())

    def messages(self, count: int) -> list[str | Event]:
        found: list[str | Event] = []
        deadline = time.monotonic() + 10
        while len(found) < count and time.monotonic() < deadline:
            for event in self.ws.events():
                found.append(event.data if isinstance(event, TextMessage) else event)
            if len(found) < count:
                self.pump()
        return found

    def close(self) -> None:
        self.sock.close()


def test_websocket_stub_over_h2(start_netd: StartNetd) -> None:
    netd = start_netd(MAP)
    client = H2WebSocket(netd)
    client.open("/ws/prices", **{"sec-websocket-version": "13", "sec-websocket-protocol": "chat"})
    assert client.status == 200 and client.headers[b"sec-websocket-protocol"] == b"chat"
    assert client.messages(1) == ["welcome"]
    client.send("ping")
    assert client.messages(1) == ["pong"]
    client.send("anything")
    assert client.messages(1) == ["anything"]  # echoed
    client.send("bye now")
    said, closed = client.messages(2)
    assert said == "see you"
    assert isinstance(closed, CloseConnection) and closed.code == 4000
    client.h2.end_stream(1)  # the client's half of the stream ends the WebSocket
    client.sock.sendall(client.h2.data_to_send())
    deadline = time.monotonic() + 10
    while not client.ended and time.monotonic() < deadline:
        client.pump()
    assert client.ended
    client.close()
    record = netd.wait_for("web", "http.request", method="CONNECT")
    assert (record["path"], record["status"]) == ("/ws/prices", 200)


def test_websocket_over_h2_needs_version_13_and_serving_goes_on(start_netd: StartNetd) -> None:
    netd = start_netd(MAP)
    client = H2WebSocket(netd)
    client.open("/ws/prices", **{"sec-websocket-version": "8"})
    assert client.status == 400 and client.headers[b"sec-websocket-version"] == b"13"
    client.close()
    # A route that is not a WebSocket's never answers an extended CONNECT (200 would open one).
    canned = H2WebSocket(netd)
    canned.open("/health", **{"sec-websocket-version": "13"})
    assert canned.status == 404
    canned.close()
    ca = ssl.create_default_context(cafile=str(netd.ca_file("lab")))
    with httpx.Client(http2=True, verify=ca, timeout=10) as http:
        health = http.get(netd.url("web", True, "/health"))
    assert (health.http_version, health.text) == ("HTTP/2", "ok\n")
