"""
The chat kind in the real daemon: line users on raw sockets, IRC clients from
the C{irc} library and Twisted's IRCClient, and the admin API's view of them.
"""

from __future__ import annotations

import functools
import signal
import socket
import ssl
import time
from collections.abc import Iterator
from typing import Any

import irc.client
import irc.connection
import pytest
import pytest_twisted
from twisted.internet import defer, protocol
from twisted.internet import reactor as global_reactor
from twisted.internet.threads import deferToThread
from twisted.words.protocols.irc import IRCClient

from netd.testing import NetdProcess

TIMEOUT = 10.0


@pytest.fixture(scope="module")
def netd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetdProcess]:
    config = """
state_dir: state
admin: {listen: ["tcp:0:interface=127.0.0.1"]}
tls:
  lab: {self_signed: [localhost, 127.0.0.1]}
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
  strict:
    type: chat
    listen: ["tcp:0:interface=127.0.0.1"]
    password: s3cret
    ping_interval: 1
    ping_timeout: 1
    max_connections: 2
  secure:
    type: chat
    listen: [{endpoint: "ssl:0:interface=127.0.0.1", tls: lab}]
  paced:
    type: chat
    listen: ["tcp:0:interface=127.0.0.1"]
    flood: {messages: 10, per_seconds: 0.5}
"""
    process = NetdProcess.start(config, tmp_path_factory.mktemp("netd"))
    yield process
    process.stop()


def port(netd: NetdProcess, protocol: str, service: str = "chat") -> int:
    if protocol != "irc":
        tagged: int = netd.listener(service, protocol=protocol)["port"]
        return tagged
    number: int = netd.listeners(service)[0]["port"]
    return number


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
    assert bob.expect("in #garden") == "* in #garden: @alice1 bob1"
    sessions = netd.view("chat", "sessions", room="garden")
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
        events = netd.events("fast", "chat.dropped")
        if events:
            break
    assert events and events[0]["nick"] == "sleeper"
    quit = "* sleeper quit (Send queue exceeded)"
    assert quit in reader.seen or reader.expect("sleeper quit") == quit
    talker.send("after the drop")
    assert reader.expect("after the drop") == "<talker> after the drop"
    assert sleeper.closed()


class Bots:
    """Clients of the PyPI C{irc} library, driven from the test's thread."""

    def __init__(self, netd: NetdProcess, service: str = "chat", tls: bool = False) -> None:
        self.reactor = irc.client.Reactor()
        self.port = port(netd, "irc", service)
        self.factory = irc.connection.Factory()
        if tls:
            context = ssl.create_default_context(
                cafile=str(netd.log_path.parent / "state/tls/lab-ca.pem")
            )
            wrap = functools.partial(context.wrap_socket, server_hostname="localhost")
            self.factory = irc.connection.Factory(wrapper=wrap)
        self.events: list[tuple[str, irc.client.Event]] = []
        self.reactor.add_global_handler("all_events", self._record, -10)

    def _record(self, connection: irc.client.ServerConnection, event: irc.client.Event) -> None:
        self.events.append((connection.get_nickname(), event))

    def connect(self, nick: str) -> irc.client.ServerConnection:
        connection = self.reactor.server().connect(
            "127.0.0.1", self.port, nick, ircname=nick, connect_factory=self.factory
        )
        self.wait(nick, "welcome")
        return connection

    def wait(self, nick: str, type: str, text: str = "") -> irc.client.Event:
        """The next event of this type for this bot; earlier ones of this bot are skipped."""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            mine = [i for i, (who, _) in enumerate(self.events) if who == nick]
            for index in mine:
                event = self.events[index][1]
                if event.type == type and text in " ".join(map(str, event.arguments)):
                    for earlier in reversed([i for i in mine if i <= index]):
                        del self.events[earlier]
                    return event
            self.reactor.process_once(0.05)
        raise AssertionError(f"{nick} got no {type} event with {text!r}")


def test_two_irc_clients_and_a_line_user_converse(netd: NetdProcess) -> None:
    bots = Bots(netd)
    alice = bots.connect("alice4")
    bob = bots.connect("bob4")
    carol = line_user(netd, "carol4", "cafe")
    alice.join("#cafe")
    bots.wait("alice4", "endofnames")
    bob.join("#cafe")
    names = bots.wait("bob4", "namreply")
    # carol made the room: its operator.
    assert sorted(names.arguments[2].split()) == ["@carol4", "alice4", "bob4"]
    carol.expect("bob4 joined #cafe")
    alice.privmsg("#cafe", "hello from irc")
    assert bots.wait("bob4", "pubmsg").arguments == ["hello from irc"]
    assert carol.expect("hello from irc") == "<alice4> hello from irc"
    carol.send("hello from the line")
    event = bots.wait("alice4", "pubmsg", "hello from the line")
    assert (event.source.nick, event.target) == ("carol4", "#cafe")
    bots.wait("bob4", "pubmsg", "hello from the line")
    bob.privmsg("carol4", "just for carol")
    assert carol.expect("just for carol") == "*bob4* just for carol"
    carol.send("/msg alice4 and for alice")
    assert bots.wait("alice4", "privmsg").arguments == ["and for alice"]
    bob.notice("#cafe", "a notice")
    assert carol.expect("a notice") == "-bob4- a notice"
    bob.topic("#cafe", "tea")
    bots.wait("bob4", "chanoprivsneeded")  # +t: not an operator
    carol.send("/topic coffee")
    assert bots.wait("alice4", "topic").arguments == ["coffee"]
    room = netd.admin("GET", "/api/services/chat/rooms/cafe")
    assert (room["topic"], room["members"]) == ("coffee", ["alice4", "bob4", "carol4"])
    alice.whois(["carol4"])
    nick, channels = bots.wait("alice4", "whoischannels").arguments
    assert nick == "carol4" and "@#cafe" in channels.split()
    assert [channel.lstrip("@+") for channel in channels.split()] == ["#lobby", "#cafe"]
    alice.list()
    assert bots.wait("alice4", "list", "#cafe").arguments == ["#cafe", "3", "coffee"]
    alice.who("#cafe")
    bots.wait("alice4", "endofwho")
    alice.mode("#cafe", "")
    assert bots.wait("alice4", "channelmodeis").arguments == ["#cafe", "+nt"]
    bob.send_raw("FROBNICATE now")
    bots.wait("bob4", "unknowncommand")
    # A third client asking for a nick in use gets 433, then registers under another.
    dave = bots.reactor.server()
    dave.connect("127.0.0.1", bots.port, "Alice4")
    bots.wait("Alice4", "nicknameinuse")
    dave.nick("dave4")
    bots.wait("dave4", "welcome")
    sessions = netd.view("chat", "sessions", room="cafe")
    assert sorted((s["nick"], s["protocol"]) for s in sessions) == [
        ("alice4", "irc"),
        ("bob4", "irc"),
        ("carol4", "line"),
    ]
    bob.quit("see you")
    assert carol.expect("bob4 quit") == "* bob4 quit (Quit: see you)"
    bots.wait("alice4", "quit")
    metrics = netd.admin("GET", "/metrics")
    assert b'netd_chat_messages_total{service="chat",type="chat"}' in metrics
    assert b'netd_chat_users{service="chat",type="chat"}' in metrics
    joins = netd.events("chat", "chat.join")
    assert {"nick": "bob4", "room": "cafe"}.items() <= joins[-1].items()
    for connection in (alice, dave):
        connection.disconnect()
    carol.close()


def test_password_ping_and_max_connections(netd: NetdProcess) -> None:
    wrong = Raw(netd, "irc", "strict")
    wrong.send("PASS nope", "NICK eve", "USER eve 0 * :Eve")
    wrong.expect(" 464 ")
    assert wrong.expect("ERROR") == "ERROR :Closing Link: 127.0.0.1 (Bad password)"
    assert wrong.closed()
    pinged = Raw(netd, "irc", "strict")
    pinged.send("PASS s3cret", "NICK frank", "USER frank 0 * :Frank")
    pinged.expect(" 001 frank ")
    token = pinged.expect("PING").split(":", 1)[1]
    pinged.send(f"PONG :{token}")
    pinged.expect("PING")
    others = [Raw(netd, "irc", "strict") for _ in range(2)]
    assert others[-1].expect("ERROR") == "ERROR :Closing Link: too many connections"
    # Silent after the second PING: dropped for it.
    assert "Ping timeout" in pinged.expect("ERROR")
    for other in others[:-1]:
        other.close()


def test_a_burst_waits_for_the_flood_allowance_in_order_and_others_are_not_slowed(
    netd: NetdProcess,
) -> None:
    bots = Bots(netd, "paced")
    alice = bots.connect("alice7")
    bob = bots.connect("bob7")
    carol = bots.connect("carol7")
    for user, nick in ((bob, "bob7"), (carol, "carol7")):
        user.join("#burst")
        bots.wait(nick, "endofnames")
    rooms = [f"#burst{n}" for n in range(10)] + ["#burst"]
    said = [f"m{n}" for n in range(39)]
    sent = time.monotonic()
    for room in rooms:
        alice.send_raw(f"JOIN {room}")
    for text in said:
        alice.privmsg("#burst", text)
    carol.privmsg("#burst", "carol is not slowed")
    heard: list[str] = []
    deadline = time.monotonic() + TIMEOUT
    while said[-1] not in heard and time.monotonic() < deadline:
        bots.reactor.process_once(0.05)
        heard += [e.arguments[0] for who, e in bots.events if who == "bob7" and e.type == "pubmsg"]
        bots.events = [(who, e) for who, e in bots.events if who != "bob7"]
    # 40 of the 50 past the allowance of 10, at 20 a second.
    assert time.monotonic() - sent >= 1.8
    assert heard == ["carol is not slowed", *said]
    joined = [e.target for who, e in bots.events if who == "alice7" and e.type == "join"]
    assert joined == rooms
    assert [e["action"] for e in netd.events("paced", "chat.flood") if e["nick"] == "alice7"] == [
        "delay"
    ]
    for user in (alice, bob, carol):
        user.disconnect()


def test_excess_flood_cuts_one_client_and_the_service_goes_on(netd: NetdProcess) -> None:
    bots = Bots(netd, "paced")
    dave = bots.connect("dave7")
    erin = bots.connect("erin7")
    for user, nick in ((erin, "erin7"), (dave, "dave7")):
        user.join("#excess")
        bots.wait(nick, "endofnames")
    dave.socket.sendall(b"PRIVMSG #excess :flooding on and on\r\n" * 500)
    assert bots.wait("dave7", "error").target == "Closing Link: 127.0.0.1 (Excess Flood)"
    bots.wait("dave7", "disconnect")
    assert bots.wait("erin7", "quit").arguments == ["Excess Flood"]
    frank = bots.connect("frank7")
    frank.join("#excess")
    frank.privmsg("#excess", "still served")
    assert bots.wait("erin7", "pubmsg", "still served").source.nick == "frank7"
    flood = [e for e in netd.events("paced", "chat.flood") if e["nick"] == "dave7"]
    assert [e["action"] for e in flood] == ["delay", "disconnect"]
    for user in (erin, frank):
        user.disconnect()


class _Bot(IRCClient):
    """Twisted's own IRC client as a bot: joins, answers !ping in the room."""

    nickname = "twistbot"

    def signedOn(self) -> None:
        self.join("#bots")

    def joined(self, channel: str) -> None:
        self.factory.joined.callback(channel)

    def privmsg(self, user: str, channel: str, message: str) -> None:
        if message == "!ping":
            self.msg(channel, f"pong, {user.split('!')[0]}")


@pytest_twisted.inlineCallbacks
def test_twisted_ircclient_bot_answers_a_line_user(netd: NetdProcess) -> Any:
    factory = protocol.ClientFactory.forProtocol(_Bot)
    factory.joined = defer.Deferred()
    connector = global_reactor.connectTCP("127.0.0.1", port(netd, "irc"), factory)
    try:
        channel = yield factory.joined
        assert channel == "#bots"
        line = yield deferToThread(lambda: line_user(netd, "gina", "bots"))
        line.send("!ping")
        answer = yield deferToThread(lambda: line.expect("pong"))
        assert answer == "<twistbot> pong, gina"
        line.close()
    finally:
        connector.disconnect()


def test_irc_over_tls(netd: NetdProcess) -> None:
    bots = Bots(netd, "secure", tls=True)
    alice = bots.connect("alice5")
    bob = bots.connect("bob5")
    alice.join("#lobby")
    bots.wait("alice5", "endofnames")
    bob.join("#lobby")
    bots.wait("alice5", "join")
    alice.privmsg("#lobby", "over tls")
    assert bots.wait("bob5", "pubmsg").arguments == ["over tls"]
    alice.disconnect()
    bob.disconnect()


def test_shutdown_tells_users_and_exits(start_netd: Any) -> None:
    netd = start_netd(
        "shutdown_grace: 5\n"
        "services:\n  chat:\n    type: chat\n"
        "    listen: ['tcp:0:interface=127.0.0.1', {endpoint: 'tcp:0:interface=127.0.0.1',"
        " protocol: line}]\n"
    )
    irc_user = Raw(netd, "irc")
    irc_user.send("NICK henry", "USER henry 0 * :Henry", "JOIN #lobby")
    irc_user.expect(" 366 ")
    line = line_user(netd, "ida")
    netd.signal(signal.SIGTERM)
    assert irc_user.expect("ERROR") == "ERROR :Closing Link: 127.0.0.1 (Closed by the server)"
    assert line.expect("bye") == "* bye: Closed by the server"
    assert netd.process.wait(TIMEOUT) == 0
