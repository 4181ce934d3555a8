"""
The chat kind without sockets: its map section, the hub, and both wire protocols
driven through StringTransport and a Clock.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransportWithDisconnection
from twisted.logger import Logger

from netd.config import ConfigErrors, ListenerConfig, parse_config
from netd.events import Journal, ServiceStats
from netd.kinds import BuildContext, Handlers
from netd.schema import Position
from netd.services._chat_hub import MAX_BACKLOG, ChatOptions, FloodLimit, LineFramer
from netd.services.chat import CHAT

PEER = IPv4Address("TCP", "192.0.2.7", 40000)


def parse(tmp_path: Path, section: str) -> ChatOptions:
    text = f"services:\n  chat:\n    type: chat\n    listen: ['tcp:0']\n{section}"
    config = parse_config(text, tmp_path / "netd.yaml")
    options: ChatOptions = config.services["chat"].options
    return options


def errors(tmp_path: Path, section: str) -> list[str]:
    with pytest.raises(ConfigErrors) as raised:
        parse(tmp_path, section)
    return [str(e).removeprefix(f"{tmp_path}/") for e in raised.value.errors]


def test_parse_defaults_and_values(tmp_path: Path) -> None:
    assert parse(tmp_path, "") == ChatOptions()
    options = parse(
        tmp_path,
        "    server_name: irc.example\n"
        "    rooms: ['#lobby', ops, lobby]\n"
        "    create_rooms: false\n"
        "    motd: |\n      one\n      two\n"
        "    history: 5\n"
        "    flood: {messages: 3, per_seconds: 1.5}\n"
        "    password: s3cret\n"
        "    ping_interval: 30\n"
        "    ping_timeout: 10\n",
    )
    assert options == ChatOptions(
        server_name="irc.example",
        rooms=("lobby", "ops"),
        create_rooms=False,
        motd="one\ntwo\n",
        history=5,
        flood=FloodLimit(3, 1.5),
        password="s3cret",
        ping_interval=30.0,
        ping_timeout=10.0,
    )


def test_parse_reports_every_error_with_its_position(tmp_path: Path) -> None:
    found = errors(
        tmp_path,
        "    server_name: 'a b'\n"
        "    rooms: [ok, 'bad room', '#']\n"
        "    history: -1\n"
        "    flood: {messages: 0, per_seconds: 1, burst: 2}\n"
        "    password: 'two words'\n"
        "    colour: red\n",
    )
    assert found == [
        "netd.yaml:5:18: services.chat.server_name: not a valid server name",
        "netd.yaml:6:17: services.chat.rooms[1]: not a valid room name: 'bad room'"
        " (up to 32 letters, digits, '.', '_', '-', after an optional '#')",
        "netd.yaml:6:29: services.chat.rooms[2]: not a valid room name: '#'"
        " (up to 32 letters, digits, '.', '_', '-', after an optional '#')",
        "netd.yaml:7:14: services.chat.history: must be at least 0, got -1",
        "netd.yaml:8:23: services.chat.flood.messages: must be at least 1, got 0",
        "netd.yaml:8:42: services.chat.flood.burst: unknown key",
        "netd.yaml:9:15: services.chat.password: a password is one word of printable characters",
        "netd.yaml:10:5: services.chat.colour: unknown key",
    ]


def test_parse_needs_a_room_when_none_can_be_created(tmp_path: Path) -> None:
    assert errors(tmp_path, "    rooms: []\n    create_rooms: false\n") == [
        "netd.yaml:3:5: services.chat: with create_rooms: false, give at least one room in rooms"
    ]


def test_listener_protocols(tmp_path: Path) -> None:
    text = (
        "services:\n  chat:\n    type: chat\n"
        "    listen: ['tcp:0', {endpoint: 'tcp:0', protocol: line},"
        " {endpoint: 'tcp:0', protocol: smtp}]\n"
    )
    with pytest.raises(ConfigErrors) as raised:
        parse_config(text, tmp_path / "netd.yaml")
    assert [str(e).removeprefix(f"{tmp_path}/") for e in raised.value.errors] == [
        "netd.yaml:4:90: services.chat.listen[2].protocol: must be one of irc, line, got 'smtp'"
    ]


# --- the service, over fake transports -------------------------------------------------


@attrs.define
class Chat:
    handlers: Handlers
    clock: MemoryReactorClock
    stats: ServiceStats
    journal: Journal

    def connect(self, protocol: str = "line") -> Client:
        assert self.handlers.stream is not None
        listener = ListenerConfig(
            "tcp:0", Position("netd.yaml", 1, 1), "services.chat.listen[0]", protocol=protocol
        )
        session = self.handlers.stream(listener).buildProtocol(PEER)
        assert session is not None
        transport = StringTransportWithDisconnection(peerAddress=PEER)
        transport.protocol = session
        session.makeConnection(transport)
        return Client(session, transport)

    def events(self, type: str) -> list[dict[str, object]]:
        return [e.as_json() for e in self.journal.select(types=[type])]


@attrs.define
class Client:
    session: object
    transport: StringTransportWithDisconnection

    def send(self, *lines: str) -> None:
        for line in lines:
            self.session.dataReceived(line.encode() + b"\r\n")  # type: ignore[attr-defined]

    def read(self) -> list[str]:
        text = self.transport.value().decode()
        self.transport.clear()
        return text.splitlines()

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting) or not self.transport.connected


def serve(tmp_path: Path, section: str = "") -> Chat:
    options = parse(tmp_path, section)
    clock = MemoryReactorClock()
    clock.advance(1_700_000_000)
    stats = ServiceStats()
    journal = Journal(clock)
    text = "services:\n  chat:\n    type: chat\n    listen: ['tcp:0']\n"
    config = attrs.evolve(
        parse_config(text, tmp_path / "netd.yaml").services["chat"], options=options
    )
    context = BuildContext(
        reactor=clock,
        name="chat",
        state_dir=tmp_path,
        journal=journal,
        stats=stats,
        log=Logger(),
        tls={},
    )
    return Chat(CHAT.build(config, context), clock, stats, journal)


def line_user(chat: Chat, nick: str) -> Client:
    client = chat.connect("line")
    client.send(f"/nick {nick}")
    client.read()
    return client


def test_line_greeting_nick_and_room_talk(tmp_path: Path) -> None:
    chat = serve(tmp_path, "    motd: 'be nice'\n")
    alice = chat.connect("line")
    assert alice.read() == [
        "* welcome to chat.netd.test",
        "* be nice",
        "* choose a nick with /nick NAME; /help lists the commands",
    ]
    alice.send("hello?")
    assert alice.read() == ["* choose a nick first: /nick NAME"]
    alice.send("/nick alice")
    assert alice.read() == [
        "* you are alice",
        "* alice joined #lobby",
        "* in #lobby: alice",
    ]
    bob = line_user(chat, "bob")
    assert alice.read() == ["* bob joined #lobby"]
    alice.send("hi bob")
    assert bob.read() == ["<alice> hi bob"]
    assert alice.read() == []  # no echo of one's own lines
    assert chat.events("chat.message")[0]["text"] == "hi bob"
    assert chat.stats.counters["chat_messages"] == 1


def test_line_commands(tmp_path: Path) -> None:
    chat = serve(tmp_path)
    alice = line_user(chat, "alice")
    bob = line_user(chat, "bob")
    alice.read()
    bob.send("/nick bobby")
    assert alice.read() == ["* bob is now known as bobby"]
    assert bob.read() == ["* bob is now known as bobby"]
    bob.send("/nick ALICE")
    assert bob.read() == ["* nick ALICE is in use"]
    bob.send("/nick 9lives")
    assert bob.read()[0].startswith("* 9lives is not a valid nick")
    alice.send("/msg bobby psst")
    assert bob.read() == ["*alice* psst"]
    alice.send("/msg nobody psst")
    assert alice.read() == ["* nobody is called nobody"]
    alice.send("/join #dev")
    assert alice.read() == ["* alice joined #dev", "* in #dev: alice"]
    bob.send("/rooms")
    assert bob.read() == ["* #dev (1 users)", "* #lobby (2 users)"]
    alice.send("/topic all things dev")
    assert alice.read() == ["* alice set the topic of #dev: all things dev"]
    bob.send("/who dev")
    assert bob.read() == ["* in #dev: alice"]
    bob.send("/join dev")
    bob.read()
    bob.send("/join lobby")
    assert bob.read() == ["* now talking in #lobby"]
    alice.read()
    alice.send("in dev")
    # bob is in #dev too, but talking in #lobby: the room is named.
    assert bob.read() == ["[#dev] <alice> in dev"]
    alice.send("/part")
    assert bob.read() == ["* alice left #dev"]
    assert alice.read() == ["* alice left #dev", "* now talking in #lobby"]
    alice.send("/bogus")
    assert alice.read() == ["* unknown command /bogus; /help lists the commands"]
    alice.send("/help")
    assert len(alice.read()) == 9
    alice.send("/quit gone fishing")
    assert alice.read() == ["* bye: Quit: gone fishing"]
    assert alice.closed
    assert bob.read() == ["* alice quit (Quit: gone fishing)"]
    bob.send("/who")
    assert bob.read() == ["* in #lobby: bobby"]


def test_history_is_replayed_on_join(tmp_path: Path) -> None:
    chat = serve(tmp_path, "    history: 2\n")
    alice = line_user(chat, "alice")
    for n in range(3):
        alice.send(f"message {n}")
    bob = line_user(chat, "bob")
    assert bob.read() == []
    bob = chat.connect("line")
    bob.send("/nick carol")
    assert bob.read()[-2:] == ["<alice> message 1", "<alice> message 2"]


def test_rooms_cannot_be_created_when_forbidden(tmp_path: Path) -> None:
    chat = serve(tmp_path, "    rooms: [main]\n    create_rooms: false\n")
    alice = line_user(chat, "alice")
    alice.send("/join other")
    assert alice.read() == ["* no room other (new rooms cannot be created here)"]
    alice.send("/join bad!name")
    assert alice.read() == ["* no room bad!name"]


def test_line_flood_drops_then_disconnects(tmp_path: Path) -> None:
    chat = serve(tmp_path, "    flood: {messages: 3, per_seconds: 3}\n")
    alice = line_user(chat, "alice")
    bob = line_user(chat, "bob")
    alice.read()
    for n in range(4):
        alice.send(f"m{n}")
    assert bob.read() == ["<alice> m0", "<alice> m1", "<alice> m2"]
    assert alice.read() == ["* flood: more than 3 messages in 3 s; messages dropped"]
    chat.clock.advance(1)  # one message's worth of allowance comes back
    alice.send("m4")
    assert bob.read() == ["<alice> m4"]
    for n in range(3):
        alice.send(f"x{n}")
    assert not alice.closed
    alice.send("x3")
    assert alice.read()[-1] == "* bye: Excess flood"
    assert alice.closed
    assert bob.read() == ["* alice quit (Excess flood)"]
    assert [e["action"] for e in chat.events("chat.flood")] == ["drop", "drop", "disconnect"]


def test_long_lines_and_garbage(tmp_path: Path) -> None:
    chat = serve(tmp_path)
    alice = line_user(chat, "alice")
    bob = line_user(chat, "bob")
    alice.read()
    alice.session.dataReceived(b"x" * 10240)  # type: ignore[attr-defined]
    alice.session.dataReceived(b"y" * 10240 + b"\r\nafter\r\n")  # type: ignore[attr-defined]
    assert alice.read() == ["* line too long (over 510 bytes), dropped"]
    alice.session.dataReceived(b"\xff\xfe\x00\x07bin\x1b[2Jary\r\n")  # type: ignore[attr-defined]
    assert bob.read() == ["<alice> after", "<alice> \ufffd\ufffdbin[2Jary"]


def test_framer_keeps_partial_lines_and_bounds_them() -> None:
    dropped: list[int] = []
    framer = LineFramer(8, lambda: dropped.append(1))
    assert framer.feed(b"ab") == []
    assert framer.feed(b"c\r\nde") == [b"abc"]
    assert framer.feed(b"fghijk") == []
    assert dropped == [1]
    assert framer.buffer == b""
    assert framer.feed(b"klm\nok\n") == [b"ok"]
    assert dropped == [1]


def test_a_client_that_stops_reading_is_dropped(tmp_path: Path) -> None:
    chat = serve(tmp_path, "    flood: {messages: 100000, per_seconds: 1}\n")
    alice = line_user(chat, "alice")
    slow = line_user(chat, "slow")
    alice.read()
    # The transport says its buffer is full: output is counted from here on.
    slow.transport.producer.pauseProducing()
    text = "z" * 400
    for _ in range(MAX_BACKLOG // 400 + 2):
        alice.send(text)
        if slow.closed:
            break
    assert slow.closed
    assert chat.events("chat.dropped")[0]["nick"] == "slow"
    assert alice.read()[-1] == "* slow quit (Send queue exceeded)"
