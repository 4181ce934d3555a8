"""
IRC over WebSocket (the IRCv3 spec) in the real daemon: a client of the
C{websockets} library on a chat service's C{websocket:} listener talks with an
C{irc}-library client in the same room; bad frames, oversize messages and bad
handshakes are refused while the service keeps serving.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from netd.testing import NetdProcess
from tests.integration.test_chat import Bots, line_user

pytestmark = pytest.mark.integration

TIMEOUT = 10.0


@pytest.fixture(scope="module")
def netd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetdProcess]:
    config = """
state_dir: state
admin: {listen: ["tcp:0:interface=127.0.0.1"]}
services:
  chat:
    type: chat
    listen: ["tcp:0:interface=127.0.0.1", {endpoint: "tcp:0:interface=127.0.0.1", protocol: line}]
    websocket: ["tcp:0:interface=127.0.0.1"]
    rooms: [lobby]
    flood: {messages: 100, per_seconds: 1}
"""
    process = NetdProcess.start(config, tmp_path_factory.mktemp("netd"))
    yield process
    process.stop()


def url(netd: NetdProcess) -> str:
    port = netd.listener("chat", protocol="websocket")["port"]
    return f"ws://127.0.0.1:{port}/"


def expect(ws: ClientConnection, fragment: str) -> str:
    """Messages until one contains C{fragment}; each is one IRC line without CRLF."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        message = ws.recv(timeout=TIMEOUT)
        assert isinstance(message, str)
        assert not message.endswith(("\r", "\n")), message
        if fragment in message:
            return message
    raise AssertionError(f"no message with {fragment!r}")


@contextlib.contextmanager
def register(netd: NetdProcess, nick: str, subprotocols: list[str]) -> Iterator[ClientConnection]:
    offered: list[Any] = subprotocols
    with connect(url(netd), subprotocols=offered, open_timeout=TIMEOUT) as ws:
        ws.send(f"NICK {nick}")
        ws.send(f"USER {nick} 0 * :A browser")
        expect(ws, f" 001 {nick} ")
        yield ws


def test_a_websocket_client_talks_with_irc_and_line_users(netd: NetdProcess) -> None:
    bots = Bots(netd)
    alice = bots.connect("alice")
    alice.join("#web")
    bots.wait("alice", "endofnames")
    carol = line_user(netd, "carol", "web")
    with register(netd, "browser", ["text.ircv3.net", "binary.ircv3.net"]) as ws:
        talk(netd, bots, alice, carol, ws)
    carol.close()


def talk(netd: NetdProcess, bots: Bots, alice: Any, carol: Any, ws: ClientConnection) -> None:
    assert ws.subprotocol == "text.ircv3.net"
    ws.send("JOIN #web")
    assert expect(ws, " 353 ").split(":")[-1].split() == ["@alice", "browser", "carol"]
    bots.wait("alice", "join")
    ws.send("PRIVMSG #web :hello from a browser ✓")
    event = bots.wait("alice", "pubmsg", "hello from a browser")
    assert (event.source.nick, event.arguments) == ("browser", ["hello from a browser ✓"])
    assert carol.expect("hello from a browser") == "<browser> hello from a browser ✓"
    alice.privmsg("#web", "hello from irc")
    assert expect(ws, "hello from irc").endswith(" PRIVMSG #web :hello from irc")
    carol.send("hello from the line")
    assert expect(ws, "hello from the line").startswith(":carol!")
    # A frame may end with CRLF; two lines in one message are not IRC over WebSocket.
    ws.send("PING :crlf\r\n")
    assert expect(ws, "PONG").endswith(":crlf")
    sessions = netd.view("chat", "sessions", room="web")
    assert sorted(s["nick"] for s in sessions) == ["alice", "browser", "carol"]
    ws.send("QUIT :bye")
    assert expect(ws, "ERROR").startswith("ERROR :Closing Link")
    with pytest.raises(ConnectionClosed):
        ws.recv(timeout=TIMEOUT)
    assert bots.wait("alice", "quit").arguments == ["Quit: bye"]


def test_binary_is_chosen_when_the_client_prefers_it(netd: NetdProcess) -> None:
    offered: list[Any] = ["binary.ircv3.net", "text.ircv3.net"]
    with connect(url(netd), subprotocols=offered, open_timeout=TIMEOUT) as ws:
        assert ws.subprotocol == "binary.ircv3.net"
        ws.send(b"NICK bin")
        ws.send(b"USER bin 0 * :bytes")
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            message = ws.recv(timeout=TIMEOUT)
            assert isinstance(message, bytes)
            if b" 001 bin " in message:
                break
        else:
            raise AssertionError("no welcome")


def closed_with(ws: ClientConnection) -> int | None:
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            ws.recv(timeout=TIMEOUT)
    return closed.value.rcvd.code if closed.value.rcvd is not None else None


def test_bad_messages_are_refused_with_a_close_code_and_the_service_keeps_serving(
    netd: NetdProcess,
) -> None:
    with register(netd, "big", ["text.ircv3.net"]) as oversize:
        oversize.send("PRIVMSG #lobby :" + "x" * 10_000)
        assert closed_with(oversize) == 1009
    with register(netd, "two", ["text.ircv3.net"]) as two_lines:
        two_lines.send("PING :a\r\nPING :b")
        assert closed_with(two_lines) == 1008
    # A text frame that is not UTF-8 (masked, with a zero key): 1007.
    raw = _raw_upgrade(netd)
    raw.sendall(b"\x81\x88\0\0\0\0PING :\xff\xfe")
    assert _close_code(raw.recv(256)) == 1007
    raw.close()
    # An unmasked client frame breaks RFC 6455 5.1: 1002.
    raw = _raw_upgrade(netd)
    raw.sendall(b"\x81\x04PING")
    assert _close_code(raw.recv(256)) == 1002
    raw.close()
    # Not a handshake, a head that never ends, a version not spoken.
    assert _answer(netd, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 426 ")
    endless = b"GET / HTTP/1.1\r\n" + b"X-Filler: y\r\n" * 1000
    assert _answer(netd, endless).startswith(b"HTTP/1.1 431 ")
    old = b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 8\r\n\r\n"
    refused = _answer(netd, old)
    assert refused.startswith(b"HTTP/1.1 426 ") and b"\r\nSec-WebSocket-Version: 13\r\n" in refused
    with pytest.raises(InvalidStatus):
        connect(url(netd), additional_headers={"Sec-WebSocket-Version": "8"}, open_timeout=TIMEOUT)
    # Still serving, even a message of tags alone (answered with nothing).
    with register(netd, "after", ["text.ircv3.net"]) as after:
        after.send("@+typing=active")
        after.send("JOIN #lobby")
        expect(after, " 366 after #lobby ")


def _port(netd: NetdProcess) -> int:
    port: int = netd.listener("chat", protocol="websocket")["port"]
    return port


def _close_code(frame: bytes) -> int:
    """The code of an unmasked Close frame (a short one: its length fits in a byte)."""
    assert frame[0] == 0x88 and frame[1] < 126, frame
    return int.from_bytes(frame[2:4], "big")


def _answer(netd: NetdProcess, request: bytes) -> bytes:
    """What netd answers a raw request with, read until it closes."""
    sock = socket.create_connection(("127.0.0.1", _port(netd)), timeout=TIMEOUT)
    sock.sendall(request)
    answer = b""
    while chunk := sock.recv(4096):
        answer += chunk
    sock.close()
    return answer


def _raw_upgrade(netd: NetdProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", _port(netd)), timeout=TIMEOUT)
    sock.sendall(
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101 ")
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head
    return sock
