"""
chat rules in the real daemon, seen by an IRC client (jaraco's irc): a numeric
instead of a JOIN to one channel, a disconnect on a command.
"""

from __future__ import annotations

import time

import irc.client
import irc.connection

from netd.testing import NetdProcess
from tests.conftest import StartNetd

CHAT_MAP = """
services:
  chat:
    type: chat
    listen: ["tcp:0:interface=127.0.0.1"]
    rooms: [lobby]
    rules:
      - {match: {command: JOIN, channel: "#locked*"}, numeric: "474 Cannot join channel (+b)"}
      - {match: {command: PRIVMSG, channel: "#lobby"}, disconnect: "flooding, says a rule", nth: 2}
"""
TIMEOUT = 10.0


class Client:
    """One IRC connection through the irc library, its events kept in order."""

    def __init__(self, netd: NetdProcess, nick: str) -> None:
        self.reactor = irc.client.Reactor()
        self.events: list[irc.client.Event] = []
        self.reactor.add_global_handler("all_events", lambda c, e: self.events.append(e), -10)
        host, port = netd.address("chat")
        self.connection = self.reactor.server().connect(host, port, nick, ircname=nick)
        self.wait("welcome")

    def wait(self, type: str) -> irc.client.Event:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            for index, event in enumerate(self.events):
                if event.type == type:
                    del self.events[: index + 1]
                    return event
            self.reactor.process_once(0.05)
        raise AssertionError(f"no {type} event")


def test_an_irc_client_gets_the_numeric(start_netd: StartNetd) -> None:
    netd = start_netd(CHAT_MAP)
    client = Client(netd, "alice")
    client.connection.join("#locked-room")
    banned = client.wait("bannedfromchan")
    assert banned.arguments == ["#locked-room", "Cannot join channel (+b)"]
    client.connection.join("#lobby")
    assert client.wait("join").target == "#lobby"
    assert [s["rooms"] for s in netd.sessions("chat")] == [["lobby"]]
    event = netd.wait_for("chat", "rule.fired", rule="m1")
    assert event["matched"] == {"command": "JOIN", "channel": "#locked-room"}


def test_disconnect_on_the_second_message(start_netd: StartNetd) -> None:
    netd = start_netd(CHAT_MAP)
    client = Client(netd, "bob")
    client.connection.join("#lobby")
    client.wait("join")
    client.connection.privmsg("#lobby", "one")
    client.connection.privmsg("#lobby", "two")
    assert "flooding, says a rule" in client.wait("error").target
    client.wait("disconnect")
    netd.admin("DELETE", "/api/services/chat/rules")
    again = Client(netd, "bob")
    again.connection.join("#locked")
    assert again.wait("join").target == "#locked"


def in_lobby(netd: NetdProcess, nick: str) -> Client:
    client = Client(netd, nick)
    client.connection.join("#lobby")
    client.wait("join")
    return client


def test_a_delayed_command_holds_the_commands_after_it(start_netd: StartNetd) -> None:
    netd = start_netd(CHAT_MAP)
    carol = in_lobby(netd, "carol")
    bob = Client(netd, "bob")
    with netd.rule("chat", match={"command": "JOIN"}, delay=0.5):
        bob.connection.socket.sendall(b"JOIN #lobby\r\nPRIVMSG #lobby :after my join\r\n")
        # Sent once bob is in: not refused as from outside the channel.
        assert carol.wait("pubmsg").arguments == ["after my join"]


def test_a_stalled_command_stalls_the_commands_after_it(start_netd: StartNetd) -> None:
    netd = start_netd(CHAT_MAP)
    carol = in_lobby(netd, "carol")
    bob = Client(netd, "bob")
    with netd.rule("chat", match={"command": "JOIN"}, stall=True):
        bob.connection.socket.sendall(b"JOIN #lobby\r\nPING :after my join\r\n")
        carol.connection.ping("carol")  # answered after bob's lines were read
        carol.wait("pong")
        bob.reactor.process_once(0.2)
        assert "pong" not in [event.type for event in bob.events]
