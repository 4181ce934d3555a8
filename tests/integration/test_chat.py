"""
The chat kind in the real daemon: line users on raw sockets, IRC clients from
the C{irc} library and Twisted's IRCClient, and the admin API's view of them.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from netd.testing import NetdProcess

TIMEOUT = 10.0


@pytest.fixture(scope="module")
def netd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetdProcess]:
    config = """
admin: {listen: ["tcp:0:interface=127.0.0.1"]}
services:
  chat:
    type: chat
    listen:
      - "tcp:0:interface=127.0.0.1"
      - {endpoint: "tcp:0:interface=127.0.0.1", protocol: line}
    server_name: chat.netd.test
    rooms: [lobby]
    motd: "welcome to the test"
    history: 3
    flood: {messages: 50, per_seconds: 1}
    max_connections: 40
  fast:
    type: chat
    listen: [{endpoint: "tcp:0:interface=127.0.0.1", protocol: line}]
    rooms: [busy]
    flood: {messages: 100000, per_seconds: 1}
"""
    process = NetdProcess.start(config, tmp_path_factory.mktemp("netd"))
    yield process
    process.stop()


def port(netd: NetdProcess, protocol: str, service: str = "chat") -> int:
    listeners = netd.listeners(service)
    number: int = listeners[0 if protocol == "irc" and service == "chat" else -1]["port"]
    return number


def admin(netd: NetdProcess, path: str) -> Any:
    entry = netd.ports["admin"]["listeners"][0]
    url = f"http://{entry['host']}:{entry['port']}{path}"
    with urllib.request.urlopen(url, timeout=TIMEOUT) as answer:
        return json.load(answer)


class Raw:
    """A line-oriented client on a plain socket: netcat, or an IRC client typed by hand."""

    def __init__(self, netd: NetdProcess, protocol: str, service: str = "chat") -> None:
        address = ("127.0.0.1", port(netd, protocol, service))
        self.sock = socket.create_connection(address, timeout=TIMEOUT)
        self.pending = b""
        self.seen: list[str] = []

    def send(self, *lines: str | bytes) -> None:
        for line in lines:
            data = line.encode() if isinstance(line, str) else line
            self.sock.sendall(data + b"\r\n")

    def expect(self, fragment: str) -> str:
        """Read lines until one contains C{fragment}; return it."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            while b"\n" in self.pending:
                line, _, self.pending = self.pending.partition(b"\n")
                text = line.rstrip(b"\r").decode("utf-8", "replace")
                self.seen.append(text)
                if fragment in text:
                    return text
            if time.monotonic() > deadline:
                raise AssertionError(f"no line with {fragment!r}")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError(f"closed before a line with {fragment!r}")
            self.pending += chunk

    def closed(self) -> bool:
        """Whether netd closes the connection (reading and dropping what comes first)."""
        try:
            while self.sock.recv(65536):
                pass
        except ConnectionResetError:
            pass
        return True

    def close(self) -> None:
        self.sock.close()


def line_user(netd: NetdProcess, nick: str, room: str = "lobby", service: str = "chat") -> Raw:
    user = Raw(netd, "line", service)
    user.expect("choose a nick")
    user.send(f"/nick {nick}")
    user.expect(f"you are {nick}")
    if room not in ("lobby", "busy"):
        user.send(f"/join {room}")
    user.expect(f"* in #{room}:")
    return user


def test_line_users_talk_in_a_room(netd: NetdProcess) -> None:
    alice = line_user(netd, "alice1", "garden")
    bob = line_user(netd, "bob1", "garden")
    alice.expect("* bob1 joined #garden")
    alice.send("hello bob")
    assert bob.expect("hello") == "<alice1> hello bob"
    bob.send("/msg alice1 psst")
    assert alice.expect("psst") == "*bob1* psst"
    bob.send("/who")
    assert bob.expect("in #garden") == "* in #garden: alice1 bob1"
    sessions = admin(netd, "/api/services/chat/sessions?room=garden")["sessions"]
    assert sorted(s["nick"] for s in sessions) == ["alice1", "bob1"]
    assert {s["protocol"] for s in sessions} == {"line"}
    bob.send("/quit bye")
    bob.expect("bye: Quit: bye")
    assert alice.expect("bob1 quit") == "* bob1 quit (Quit: bye)"
    alice.close()


def test_history_is_replayed_to_a_late_joiner(netd: NetdProcess) -> None:
    alice = line_user(netd, "alice2", "attic")
    for n in range(5):
        alice.send(f"note {n}")
    alice.send("/who")
    alice.expect("in #attic")  # every note has been handled
    carol = Raw(netd, "line")
    carol.send("/nick carol2", "/join attic")
    assert carol.expect("note") == "<alice2> note 2"
    assert carol.expect("note") == "<alice2> note 3"
    assert carol.expect("note") == "<alice2> note 4"
    alice.close()
    carol.close()


def test_garbage_and_long_lines_leave_the_service_serving(netd: NetdProcess) -> None:
    alice = line_user(netd, "alice3", "junk")
    bob = line_user(netd, "bob3", "junk")
    alice.sock.sendall(bytes(range(11, 256)) * 40 + b"\n")
    alice.expect("line too long")
    alice.sock.sendall(b"A" * 10240 + b"\r\n")
    alice.expect("line too long")
    irc = Raw(netd, "irc")
    irc.sock.sendall(b"\xff\xfe\x00garbage\x01\r\n" + b"B" * 10240 + b"\r\nNICK x3\r\n")
    irc.expect(" 417 ")
    irc.send("USER x 0 * :x", "JOIN #junk")
    irc.expect("366")
    alice.send("still here")
    assert bob.expect("still") == "<alice3> still here"
    assert irc.expect("still") == ":alice3!line@127.0.0.1 PRIVMSG #junk :still here"
    for user in (alice, bob, irc):
        user.close()


def test_a_client_that_never_reads_is_dropped_and_others_keep_up(netd: NetdProcess) -> None:
    talker = line_user(netd, "talker", "busy", "fast")
    reader = line_user(netd, "reader", "busy", "fast")
    sleeper = line_user(netd, "sleeper", "busy", "fast")
    reader.expect("sleeper joined")
    text = "x" * 400
    events: list[dict[str, Any]] = []
    # The sleeper's kernel buffers fill first, then netd's; the reader keeps
    # receiving every batch meanwhile.
    for batch in range(200):
        for _ in range(100):
            talker.send(text)
        talker.send(f"end of batch {batch}")
        reader.expect(f"end of batch {batch}")
        events = admin(netd, "/api/events?service=fast&type=chat.dropped")["events"]
        if events:
            break
    assert events and events[0]["nick"] == "sleeper"
    assert "* sleeper quit (Send queue exceeded)" in reader.seen
    talker.send("after the drop")
    assert reader.expect("after the drop") == "<talker> after the drop"
    assert sleeper.closed()
