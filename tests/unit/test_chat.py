"""
The chat kind without sockets: its map section, the hub, and both wire protocols
driven through StringTransport and a Clock.
"""

from __future__ import annotations

import base64
import time
from pathlib import Path

import attrs
import bcrypt
import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock, StringTransportWithDisconnection
from twisted.logger import Logger

from netd.config import ConfigErrors, ListenerConfig, parse_config
from netd.events import Journal, ServiceStats
from netd.kinds import BuildContext, Handlers
from netd.schema import Position
from netd.services.chat import CHAT
from netd.services.chat.hub import (
    MAX_BACKLOG,
    MAX_QUEUED,
    FloodLimit,
    Hub,
    LineFramer,
    Options,
    Room,
    Session,
)
from netd.services.chat.irc import SASL_FAILURE_DELAY
from netd.services.chat.line import LineSession, LineWire
from tests.maps import ServiceMap

PEER = IPv4Address("TCP", "192.0.2.7", 40000)


CHAT_MAP = ServiceMap("chat", "chat", Options)
parse = CHAT_MAP.parse


def errors(tmp_path: Path, section: str) -> list[str]:
    return [e.removeprefix(f"{tmp_path}/") for e in CHAT_MAP.errors(tmp_path, section)]


def test_parse_defaults_and_values(tmp_path: Path) -> None:
    assert parse(tmp_path, "") == Options()
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
    assert options == Options(
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
        client = Client(session, transport, self.clock)
        self.clock.advance(0)
        return client

    def events(self, type: str) -> list[dict[str, object]]:
        return [e.as_json() for e in self.journal.select(types=[type])]


@attrs.define
class Client:
    session: object
    transport: StringTransportWithDisconnection
    clock: MemoryReactorClock

    def send(self, *lines: str) -> None:
        for line in lines:
            self.feed(line.encode() + b"\r\n")

    def feed(self, data: bytes) -> None:
        """One read, then what the reactor runs after its reads (the hub's flush)."""
        self.session.dataReceived(data)  # type: ignore[attr-defined]
        self.clock.advance(0)

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


# For tests of many commands at one instant: JOIN, MODE and the like spend the allowance too.
GENEROUS_FLOOD = "    flood: {messages: 1000, per_seconds: 1}\n"


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
        "* in #lobby: @alice",  # the first in a room is its operator
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
    assert alice.read() == ["* alice joined #dev", "* in #dev: @alice"]
    bob.send("/rooms")
    assert bob.read() == ["* #dev (1 users)", "* #lobby (2 users)"]
    alice.send("/topic all things dev")
    assert alice.read() == ["* alice set the topic of #dev: all things dev"]
    bob.send("/who dev")
    assert bob.read() == ["* in #dev: @alice"]
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
    for n in range(2):
        alice.send(f"message {n}")
    alice.send("\x01ACTION waves\x01")  # a CTCP ACTION, as IRC users send /me
    bob = line_user(chat, "bob")
    assert bob.read() == []
    bob = chat.connect("line")
    bob.send("/nick carol")
    assert bob.read()[-2:] == ["<alice> message 1", "* alice waves"]


def test_rooms_cannot_be_created_when_forbidden(tmp_path: Path) -> None:
    chat = serve(tmp_path, "    rooms: [main]\n    create_rooms: false\n")
    alice = line_user(chat, "alice")
    alice.send("/join other")
    assert alice.read() == ["* no room other (new rooms cannot be created here)"]
    alice.send("/join bad!name")
    assert alice.read() == ["* no room bad!name"]


def test_line_flood_waits_then_excess_flood_disconnects(tmp_path: Path) -> None:
    chat = serve(tmp_path, "    flood: {messages: 3, per_seconds: 3}\n")
    alice = line_user(chat, "alice")
    bob = line_user(chat, "bob")
    alice.read()
    alice.send("m0", "m1", "m2", "m3", "/msg bob m4")
    assert bob.read() == ["<alice> m0", "<alice> m1", "<alice> m2"]
    assert alice.read() == ["* flood: more than 3 messages in 3 s; messages delayed"]
    chat.clock.advance(0.999)
    assert bob.read() == []
    chat.clock.advance(0.001)  # one message's worth of allowance comes back
    assert bob.read() == ["<alice> m3"]
    chat.clock.advance(1)
    assert bob.read() == ["*alice* m4"]
    # Whatever waits past MAX_QUEUED bytes is a flood on purpose.
    assert MAX_QUEUED == 16 + 16 * 511
    alice.feed(b"y" * 16 + b"\r\n")
    alice.feed((b"x" * 511 + b"\n") * 16)  # 8192 bytes wait, line ends not counted
    assert not alice.closed
    alice.feed(b"x\n")
    assert alice.read()[-1] == "* bye: Excess Flood"
    assert alice.closed
    assert bob.read() == ["* alice quit (Excess Flood)"]
    assert [e["action"] for e in chat.events("chat.flood")] == ["delay", "delay", "disconnect"]
    assert chat.stats.counters["chat_flood_delayed"] == 3


def test_long_lines_and_garbage(tmp_path: Path) -> None:
    chat = serve(tmp_path)
    alice = line_user(chat, "alice")
    bob = line_user(chat, "bob")
    alice.read()
    alice.feed(b"x" * 10240)
    alice.feed(b"y" * 10240 + b"\r\nafter\r\n")
    assert alice.read() == ["* line too long (over 510 bytes), dropped"]
    alice.feed(b"\xc3\x28\x00\x07bin\x1b[2Jary\r\n")
    # Telnet negotiation is dropped; a doubled IAC is a 0xff byte (not UTF-8: replaced).
    alice.feed(b"\xff\xfd\x18\xff\xfa\x18\x00x\xff\xf0te\xff\xfflnet\r\n")
    assert bob.read() == ["<alice> after", "<alice> \ufffd(bin[2Jary", "<alice> te\ufffdlnet"]


def test_framer_keeps_partial_lines_and_bounds_them() -> None:
    framer = LineFramer(8)
    assert framer.feed(b"ab") == []
    assert framer.feed(b"c\r\nde") == [b"abc"]
    assert framer.feed(b"fghijk") == [None]  # dropped, once, where it began
    assert framer.buffer == b""
    assert framer.feed(b"klm\nok\n") == [b"ok"]
    assert framer.feed(b"before\n123456789\nafter\n") == [b"before", None, b"after"]


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


# --- IRC ---------------------------------------------------------------------------------


def irc_user(chat: Chat, nick: str) -> Client:
    client = chat.connect("irc")
    client.send(f"NICK {nick}", f"USER {nick} 0 * :{nick.title()} Example")
    assert f":chat.netd.test 001 {nick} " in client.transport.value().decode()
    client.read()
    return client


def in_lobby(chat: Chat, *nicks: str) -> list[Client]:
    """IRC users, registered and in #lobby, their output so far read."""
    users = [irc_user(chat, nick) for nick in nicks]
    for user in users:
        user.send("JOIN #lobby")
    for user in users:
        user.read()
    return users


def flood_waits(chat: Chat) -> list[object]:
    """The calls a session waiting for its flood allowance has pending."""
    return [call for call in chat.clock.getDelayedCalls() if call.func.__name__ == "_allowed"]


def test_irc_registration_and_welcome(tmp_path: Path) -> None:
    chat = serve(tmp_path, "    motd: 'line one'\n")
    bob = chat.connect("irc")
    bob.send("JOIN #lobby")
    assert bob.read() == [":chat.netd.test 451 * :You have not registered"]
    bob.send("CAP LS 302", "NICK bob", "USER bob 0 * :Bob Example")
    assert bob.read() == [  # and waits for CAP END; no sasl without accounts
        ":chat.netd.test CAP * LS :away-notify batch echo-message message-tags multi-prefix"
        " server-time"
    ]
    bob.send("CAP REQ :multi-prefix", "CAP END")
    lines = bob.read()
    assert lines[0] == ":chat.netd.test CAP * ACK :multi-prefix"
    assert [line.split()[1] for line in lines[1:]] == [
        "001", "002", "003", "004", "005", "251", "254", "255", "375", "372", "376",
    ]  # fmt: skip
    assert lines[1] == ":chat.netd.test 001 bob :Welcome to the netd IRC network bob!bob@192.0.2.7"
    assert "CASEMAPPING=ascii" in lines[5] and "NICKLEN=30" in lines[5]
    assert lines[10] == ":chat.netd.test 372 bob :- line one"
    bob.send("USER again 0 * :x")
    assert bob.read() == [":chat.netd.test 462 bob :You may not reregister"]
    other = chat.connect("irc")
    other.send("NICK BOB")
    assert other.read() == [":chat.netd.test 433 * BOB :Nickname is already in use"]
    other.send("NICK 1bad", "NICK")
    assert other.read() == [
        ":chat.netd.test 432 * 1bad :Erroneous nickname",
        ":chat.netd.test 431 * :No nickname given",
    ]
    other.send("FROB x")
    assert other.read() == [":chat.netd.test 451 * :You have not registered"]
    bob.send("FROB x")
    assert bob.read() == [":chat.netd.test 421 bob FROB :Unknown command"]
    assert chat.events("chat.login")[0]["nick"] == "bob"


def test_irc_password(tmp_path: Path) -> None:
    chat = serve(tmp_path, "    password: s3cret\n")
    bad = chat.connect("irc")
    bad.send("PASS wrong", "NICK mallory", "USER m 0 * :M")
    assert bad.read() == [
        ":chat.netd.test 464 * :Password incorrect",
        "ERROR :Closing Link: 192.0.2.7 (Bad password)",
    ]
    assert bad.closed
    good = chat.connect("irc")
    good.send("PASS s3cret", "NICK alice", "USER a 0 * :A")
    assert good.read()[0].startswith(":chat.netd.test 001 alice ")


def test_irc_rooms_and_queries(tmp_path: Path) -> None:
    chat = serve(tmp_path, "    rooms: [lobby, dev]\n" + GENEROUS_FLOOD)
    alice = irc_user(chat, "alice")
    bob = irc_user(chat, "bob")
    alice.send("JOIN #lobby,#dev,nohash")
    assert alice.read() == [
        ":alice!alice@192.0.2.7 JOIN #lobby",
        ":chat.netd.test 353 alice = #lobby :@alice",
        ":chat.netd.test 366 alice #lobby :End of /NAMES list",
        ":alice!alice@192.0.2.7 JOIN #dev",
        ":chat.netd.test 353 alice = #dev :@alice",
        ":chat.netd.test 366 alice #dev :End of /NAMES list",
        ":chat.netd.test 403 alice nohash :No such channel",
    ]
    bob.send("JOIN #Lobby")
    bob.read()
    assert alice.read() == [":bob!bob@192.0.2.7 JOIN #lobby"]
    bob.send("PRIVMSG #lobby :hi all", "PRIVMSG alice :psst", "NOTICE #lobby :fyi")
    assert alice.read() == [
        ":bob!bob@192.0.2.7 PRIVMSG #lobby :hi all",
        ":bob!bob@192.0.2.7 PRIVMSG alice :psst",
        ":bob!bob@192.0.2.7 NOTICE #lobby :fyi",
    ]
    bob.send("PRIVMSG #dev :not a member", "PRIVMSG ghost :hello", "PRIVMSG #nowhere :x")
    bob.send("NOTICE ghost :no reply to notices", "PRIVMSG", "PRIVMSG alice")
    assert bob.read() == [
        ":chat.netd.test 404 bob #dev :Cannot send to channel",
        ":chat.netd.test 401 bob ghost :No such nick/channel",
        ":chat.netd.test 403 bob #nowhere :No such channel",
        ":chat.netd.test 411 bob :No recipient given (PRIVMSG)",
        ":chat.netd.test 412 bob :No text to send",
    ]
    bob.send("TOPIC #lobby :mine now", "TOPIC #dev :not mine")
    assert bob.read() == [
        ":chat.netd.test 482 bob #lobby :You're not channel operator",  # +t
        ":chat.netd.test 442 bob #dev :You're not on that channel",
    ]
    alice.send("TOPIC #lobby :the lobby")
    alice.read()
    bob.send("TOPIC #lobby")
    assert bob.read() == [
        ":alice!alice@192.0.2.7 TOPIC #lobby :the lobby",
        ":chat.netd.test 332 bob #lobby :the lobby",
    ]
    bob.send("NAMES #lobby", "LIST")
    assert bob.read() == [
        ":chat.netd.test 353 bob = #lobby :@alice bob",
        ":chat.netd.test 366 bob #lobby :End of /NAMES list",
        ":chat.netd.test 321 bob Channel :Users  Name",
        ":chat.netd.test 322 bob #dev 1 :",
        ":chat.netd.test 322 bob #lobby 2 :the lobby",
        ":chat.netd.test 323 bob :End of /LIST",
    ]
    bob.send("WHO #lobby", "WHOIS alice", "WHOIS ghost")
    assert bob.read() == [
        ":chat.netd.test 352 bob #lobby alice 192.0.2.7 chat.netd.test alice H@ :0 Alice Example",
        ":chat.netd.test 352 bob #lobby bob 192.0.2.7 chat.netd.test bob H :0 Bob Example",
        ":chat.netd.test 315 bob #lobby :End of WHO list",
        ":chat.netd.test 311 bob alice alice 192.0.2.7 * :Alice Example",
        ":chat.netd.test 319 bob alice :@#lobby @#dev",
        ":chat.netd.test 312 bob alice chat.netd.test :netd (irc)",
        ":chat.netd.test 318 bob alice :End of /WHOIS list",
        ":chat.netd.test 401 bob ghost :No such nick/channel",
        ":chat.netd.test 318 bob ghost :End of /WHOIS list",
    ]
    bob.send("MODE #lobby", "MODE #lobby b", "MODE #lobby +o bob", "MODE bob", "MODE bob +i")
    bob.send("MODE alice", "MODE bob +x", "ISON alice ghost bob", "USERHOST alice ghost")
    assert bob.read() == [
        ":chat.netd.test 324 bob #lobby +nt",
        f":chat.netd.test 329 bob #lobby :{1_700_000_000}",
        ":chat.netd.test 368 bob #lobby :End of channel ban list",
        ":chat.netd.test 482 bob #lobby :You're not channel operator",
        ":chat.netd.test 221 bob :+",
        ":bob!bob@192.0.2.7 MODE bob :+i",
        ":chat.netd.test 502 bob :Cannot change mode for other users",
        ":chat.netd.test 501 bob :Unknown MODE flag",
        ":chat.netd.test 303 bob :alice bob",
        ":chat.netd.test 302 bob :alice=+alice@192.0.2.7",
    ]
    alice.send("AWAY :lunch")
    bob.send("PRIVMSG alice :there?", "WHO alice")
    assert bob.read() == [
        ":chat.netd.test 301 bob alice :lunch",
        ":chat.netd.test 352 bob #lobby alice 192.0.2.7 chat.netd.test alice G :0 Alice Example",
        ":chat.netd.test 315 bob alice :End of WHO list",
    ]
    alice.send("AWAY")
    assert alice.read()[-3:] == [
        ":chat.netd.test 306 alice :You have been marked as being away",
        ":bob!bob@192.0.2.7 PRIVMSG alice :there?",
        ":chat.netd.test 305 alice :You are no longer marked as being away",
    ]
    alice.read()
    bob.send("NICK robert")
    assert alice.read() == [":bob!bob@192.0.2.7 NICK :robert"]
    assert bob.read() == [":bob!bob@192.0.2.7 NICK :robert"]
    bob.send("PART #lobby :later", "PART #lobby")
    assert alice.read() == [":robert!bob@192.0.2.7 PART #lobby :later"]
    assert bob.read() == [
        ":robert!bob@192.0.2.7 PART #lobby :later",
        ":chat.netd.test 442 robert #lobby :You're not on that channel",
    ]
    alice.send("JOIN 0")
    assert alice.read() == [
        ":alice!alice@192.0.2.7 PART #lobby :Left all channels",
        ":alice!alice@192.0.2.7 PART #dev :Left all channels",
    ]
    alice.send("PING :tok", "PING")
    assert alice.read() == [
        ":chat.netd.test PONG chat.netd.test :tok",
        ":chat.netd.test 409 alice :No origin specified",
    ]
    alice.send("QUIT :done")
    assert alice.read() == ["ERROR :Closing Link: 192.0.2.7 (Quit: done)"]
    assert alice.closed


def test_irc_and_line_users_share_rooms(tmp_path: Path) -> None:
    chat = serve(tmp_path)
    alice = irc_user(chat, "alice")
    alice.send("JOIN #lobby")
    carol = line_user(chat, "carol")
    assert alice.read()[-1] == ":carol!line@192.0.2.7 JOIN #lobby"
    carol.send("hi irc")
    assert alice.read() == [":carol!line@192.0.2.7 PRIVMSG #lobby :hi irc"]
    alice.send("PRIVMSG #lobby :hi line", "PRIVMSG #lobby :\x01ACTION waves\x01")
    alice.send("PRIVMSG carol :psst")
    assert carol.read() == ["<alice> hi line", "* alice waves", "*alice* psst"]
    carol.send("/msg alice back")
    assert alice.read() == [":carol!line@192.0.2.7 PRIVMSG alice :back"]


def test_irc_history_long_lines_and_big_rooms(tmp_path: Path) -> None:
    chat = serve(tmp_path, "    flood: {messages: 1000, per_seconds: 1}\n")
    alice = irc_user(chat, "alice")
    alice.send("JOIN #lobby", "PRIVMSG #lobby :" + "é" * 240)
    users = [irc_user(chat, f"user{n:02d}_{'x' * 20}") for n in range(30)]
    for user in users:
        user.send("JOIN #lobby")
    lines = users[-1].read()
    names = [line for line in lines if " 353 " in line]
    assert len(names) > 1 and all(len(line.encode()) <= 510 for line in lines)
    history = lines[-1]
    assert history.startswith(":alice!history@chat.netd.test PRIVMSG #lobby :é")
    assert len(history.encode()) <= 510  # cut to fit, on a character boundary
    alice.feed(b"PRIVMSG #lobby :" + b"x" * 600 + b"\r\n")
    assert alice.read()[-1] == ":chat.netd.test 417 alice :Input line was too long"
    alice.feed(b":lonely-prefix\r\n   \r\n\xff\xfe\r\n")
    assert alice.read() == [":chat.netd.test 421 alice \ufffd\ufffd :Unknown command"]


def test_irc_ping_timeout(tmp_path: Path) -> None:
    chat = serve(tmp_path, "    ping_interval: 30\n    ping_timeout: 10\n")
    lazy = chat.connect("irc")
    chat.clock.advance(30)
    assert lazy.read() == ["ERROR :Closing Link: 192.0.2.7 (Registration timeout)"]
    alice = irc_user(chat, "alice")
    chat.clock.advance(30)  # she registered within the interval: no ping yet
    assert alice.read() == []
    chat.clock.advance(30)
    assert alice.read() == ["PING :chat.netd.test"]
    alice.send("PONG :chat.netd.test")
    chat.clock.advance(10)
    chat.clock.advance(30)
    assert alice.read() == ["PING :chat.netd.test"]
    chat.clock.advance(10)
    assert alice.read() == ["ERROR :Closing Link: 192.0.2.7 (Ping timeout: 40 seconds)"]
    assert alice.closed


def test_irc_flood_waits_and_what_follows_waits_behind_it(tmp_path: Path) -> None:
    chat = serve(tmp_path, "    flood: {messages: 2, per_seconds: 10}\n")
    alice, bob = in_lobby(chat, "alice", "bob")
    alice.send("PRIVMSG #lobby :m0", "PRIVMSG #lobby :m1", "PING :after m1")
    assert alice.read() == [
        ":chat.netd.test NOTICE alice :flood: more than 2 messages in 10 s; messages delayed"
    ]
    assert bob.read() == [":alice!alice@192.0.2.7 PRIVMSG #lobby :m0"]
    chat.clock.advance(5)
    assert bob.read() == [":alice!alice@192.0.2.7 PRIVMSG #lobby :m1"]
    assert alice.read() == [":chat.netd.test PONG chat.netd.test :after m1"]
    # No refusal (263) and no reply waits for ever: a JOIN delayed is answered late.
    alice.send("JOIN #late")
    assert alice.read() == [  # a new burst
        ":chat.netd.test NOTICE alice :flood: more than 2 messages in 10 s; messages delayed"
    ]
    chat.clock.advance(5)
    assert alice.read()[0] == ":alice!alice@192.0.2.7 JOIN #late"


def test_a_burst_is_handled_in_order_at_the_allowance_rate_and_others_are_not_slowed(
    tmp_path: Path,
) -> None:
    chat = serve(tmp_path, "    flood: {messages: 10, per_seconds: 5}\n")
    alice, bob, carol = in_lobby(chat, "alice", "bob", "carol")
    chat.clock.advance(5)  # the JOINs' allowance back
    alice.feed(b"".join(b"PRIVMSG #lobby :m%d\r\n" % n for n in range(50)))
    heard = [line.rsplit(":", 1)[1] for line in bob.read()]
    assert heard == [f"m{n}" for n in range(10)]
    carol.send("PRIVMSG #lobby :carol is not slowed")
    assert bob.read() == [":carol!carol@192.0.2.7 PRIVMSG #lobby :carol is not slowed"]
    for step in range(40):
        chat.clock.advance(0.5)  # a message's worth of allowance
        heard += [line.rsplit(":", 1)[1] for line in bob.read()]
        assert len(heard) == 11 + step
    assert heard == [f"m{n}" for n in range(50)]
    assert chat.stats.counters["chat_flood_delayed"] == 40
    assert flood_waits(chat) == []


def test_an_overlong_line_is_answered_in_its_turn_behind_delayed_lines(tmp_path: Path) -> None:
    chat = serve(tmp_path, "    flood: {messages: 2, per_seconds: 10}\n")
    alice = irc_user(chat, "alice")
    joins = b"".join(b"JOIN #r%d\r\n" % n for n in range(4))
    # Over the framer's limit (512 bytes and IRCv3 tags): dropped as it is read.
    alice.feed(joins + b"PRIVMSG #r0 :" + b"x" * 5000 + b"\r\nJOIN #after\r\n")
    for _ in range(3):
        chat.clock.advance(5)  # a message's worth of allowance
    answers = [
        line
        for line in alice.read()
        if line.startswith(":alice!alice@192.0.2.7 JOIN") or " 417 " in line
    ]
    assert answers == [
        ":alice!alice@192.0.2.7 JOIN #r0",
        ":alice!alice@192.0.2.7 JOIN #r1",
        ":alice!alice@192.0.2.7 JOIN #r2",  # these two were delayed
        ":alice!alice@192.0.2.7 JOIN #r3",
        ":chat.netd.test 417 alice :Input line was too long",
        ":alice!alice@192.0.2.7 JOIN #after",
    ]
    # What they owe counts for the queue's bound: a flood of them is one too.
    alice.feed(b"JOIN #r0,#r1\r\n" + (b"x" * 5000 + b"\r\n") * 130)
    assert alice.read()[-1] == "ERROR :Closing Link: 192.0.2.7 (Excess Flood)"


def test_irc_excess_flood_cuts_the_client_and_the_others_go_on(tmp_path: Path) -> None:
    chat = serve(tmp_path, "    flood: {messages: 2, per_seconds: 10}\n")
    alice, bob = in_lobby(chat, "alice", "bob")
    alice.feed(b"PRIVMSG #lobby :waiting\r\n" * 400)
    assert alice.read()[-1] == "ERROR :Closing Link: 192.0.2.7 (Excess Flood)"
    assert alice.closed
    assert bob.read() == [
        ":alice!alice@192.0.2.7 PRIVMSG #lobby :waiting",
        ":alice!alice@192.0.2.7 QUIT :Excess Flood",
    ]
    alice.transport.loseConnection()
    assert flood_waits(chat) == []
    chat.clock.advance(60)
    assert bob.read() == []  # nothing of alice's queue is handled after her
    carol = irc_user(chat, "carol")
    carol.send("JOIN #lobby", "PRIVMSG #lobby :still served")
    assert bob.read()[-1] == ":carol!carol@192.0.2.7 PRIVMSG #lobby :still served"
    assert [e["action"] for e in chat.events("chat.flood")] == ["delay", "disconnect"]


def test_sessions_view(tmp_path: Path) -> None:
    chat = serve(tmp_path)
    irc_user(chat, "alice").send("JOIN #lobby,#dev")
    line_user(chat, "carol")
    chat.connect("line")
    view = chat.handlers.views["sessions"]
    listing = view.list({})
    assert [(s["nick"], s["protocol"], s["rooms"]) for s in listing] == [
        ("alice", "irc", ["dev", "lobby"]),
        ("carol", "line", ["lobby"]),
        ("", "line", []),
    ]
    rooms = chat.handlers.views["rooms"]
    assert rooms.list({}) == [
        {
            "room": "dev",
            "topic": "",
            "members": ["alice"],
            "operators": ["alice"],
            "voiced": [],
            "modes": "+nt",
            "bans": [],
            "history": 0,
        },
        {
            "room": "lobby",
            "topic": "",
            "members": ["alice", "carol"],
            "operators": ["alice"],
            "voiced": [],
            "modes": "+nt",
            "bans": [],
            "history": 0,
        },
    ]
    assert rooms.item is not None
    assert rooms.item("#Lobby")["members"] == ["alice", "carol"]
    assert rooms.item("nowhere") is None
    assert rooms.item("bad name!") is None
    assert [s["nick"] for s in view.list({"room": "#DEV"})] == ["alice"]
    assert view.item is not None
    assert view.item("CAROL")["rooms"] == ["lobby"]
    assert view.item("nobody") is None
    assert chat.stats.gauges["chat_users"] == 2


def test_rooms_clients_made_go_with_their_last_member(tmp_path: Path) -> None:
    chat = serve(tmp_path, "    history: 5\n" + GENEROUS_FLOOD)
    alice = line_user(chat, "alice")
    alice.send("/join den", "secret", "/part den", "/part lobby")
    assert chat.stats.gauges["chat_rooms"] == 1  # lobby is configured: it stays
    alice.send("/join den")
    assert alice.read()[-1] == "* in #den: @alice"  # a new room: no history from before
    for n in range(19):
        alice.send(f"/join r{n}")
    alice.read()
    alice.send("/join one-too-many")
    assert alice.read() == ["* cannot join one-too-many: you are in too many rooms"]
    bob = irc_user(chat, "bob")
    bob.send("JOIN " + ",".join(f"#b{n}" for n in range(21)))
    assert bob.read()[-1] == ":chat.netd.test 405 bob #b20 :You have joined too many channels"


def test_netd_closes_sessions_gracefully(tmp_path: Path) -> None:
    chat = serve(tmp_path)
    alice = irc_user(chat, "alice")
    carol = line_user(chat, "carol")
    alice.send("JOIN #lobby")
    alice.read()
    alice.session.close_gracefully()  # type: ignore[attr-defined]
    assert alice.read() == ["ERROR :Closing Link: 192.0.2.7 (Closed by the server)"]
    assert alice.closed
    chat.clock.advance(0)
    assert carol.read()[-1] == "* alice quit (Closed by the server)"
    carol.session.close_gracefully()  # type: ignore[attr-defined]
    assert carol.read() == ["* bye: Closed by the server"]
    assert chat.stats.gauges["chat_users"] == 0


class _CountingWire(LineWire):
    def __init__(self) -> None:
        self.encoded = 0

    def _message(
        self, sender: Session, room: Room, text: str, notice: bool, current: bool
    ) -> bytes:
        self.encoded += 1
        return super()._message(sender, room, text, notice, current)


def test_fan_out_encodes_once_and_writes_once_per_member_and_turn(tmp_path: Path) -> None:
    clock = MemoryReactorClock()
    hub = Hub(Options(), clock, ServiceStats(), lambda type, **fields: None)
    wire = _CountingWire()
    writes: list[int] = []
    members = []
    for n in range(50):
        session = LineSession(hub, wire)
        transport = StringTransportWithDisconnection(peerAddress=PEER)
        transport.protocol = session
        transport.write = lambda data, n=n: writes.append(n)  # type: ignore[method-assign]
        session.makeConnection(transport)
        session.dataReceived(f"/nick user{n}\r\n".encode())
        members.append(session)
    clock.advance(0)
    writes.clear()
    # Two senders' reads in one reactor turn: one write per member for both.
    members[0].dataReceived(b"one\r\ntwo\r\n")
    members[1].dataReceived(b"three\r\n")
    assert writes == []
    clock.advance(0)
    assert wire.encoded == 3  # once per message, not once per member
    assert sorted(writes) == list(range(50))  # one write per member for the whole turn
    assert hub.stats.counters["chat_deliveries"] == 3 * 49


# --- IRCv3 ---------------------------------------------------------------------------------

STAMP = "2023-11-14T22:13:20.000Z"  # the test clock's 1_700_000_000


def test_cap_negotiation_as_clients_send_it(tmp_path: Path) -> None:
    chat = serve(tmp_path, "    users: {alice: {password: wonderland}}\n")
    client = chat.connect("irc")
    client.send("CAP LS")  # no version: no values
    assert client.read() == [
        ":chat.netd.test CAP * LS :away-notify batch echo-message message-tags multi-prefix"
        " sasl server-time"
    ]
    client.send("CAP LS 302")
    assert client.read() == [
        ":chat.netd.test CAP * LS :away-notify batch echo-message message-tags multi-prefix"
        " sasl=PLAIN server-time"
    ]
    client.send("CAP REQ :server-time bogus")
    assert client.read() == [":chat.netd.test CAP * NAK :server-time bogus"]  # all or nothing
    client.send("CAP REQ :server-time message-tags echo-message", "CAP REQ :-echo-message")
    assert client.read() == [
        ":chat.netd.test CAP * ACK :server-time message-tags echo-message",
        f"@time={STAMP} :chat.netd.test CAP * ACK :-echo-message",
    ]
    client.send("CAP LIST", "CAP FROB")
    assert client.read() == [
        f"@time={STAMP} :chat.netd.test CAP * LIST :message-tags server-time",
        f"@time={STAMP} :chat.netd.test 410 * FROB :Invalid CAP command",
    ]
    client.send("NICK alice", "USER alice 0 * :Alice")
    assert client.read() == []  # still negotiating
    client.send("CAP END")
    assert client.read()[0] == (
        f"@time={STAMP} :chat.netd.test 001 alice :Welcome to the netd IRC network"
        " alice!alice@192.0.2.7"
    )


def sasl(client: Client, payload: bytes) -> list[str]:
    client.send("AUTHENTICATE PLAIN")
    assert client.read() == ["AUTHENTICATE +"]
    client.send("AUTHENTICATE " + base64.b64encode(payload).decode())
    return client.read()


def test_sasl_plain_against_users(tmp_path: Path) -> None:
    # Hashed passwords go through the reactor's thread pool: the integration tests'.
    chat = serve(tmp_path, "    users: {alice: {password: wonderland}, bob: {password: builder}}\n")
    client = chat.connect("irc")
    client.send("AUTHENTICATE PLAIN")  # sasl not requested
    assert client.read() == [":chat.netd.test 904 * :SASL authentication failed"]
    client.send("CAP LS 302", "NICK alice", "USER alice 0 * :Alice", "CAP REQ :sasl")
    client.read()
    client.send("AUTHENTICATE SCRAM-SHA-256")
    assert client.read() == [
        ":chat.netd.test 908 * PLAIN :are available SASL mechanisms",
        ":chat.netd.test 904 * :SASL authentication failed",
    ]
    assert sasl(client, b"\0alice\0wrong") == []  # a wrong password is answered late
    client.send("AUTHENTICATE PLAIN")  # a guess meanwhile is refused at once
    assert client.read() == [":chat.netd.test 904 * :SASL authentication failed"]
    client.clock.advance(SASL_FAILURE_DELAY)
    assert client.read() == [":chat.netd.test 904 * :SASL authentication failed"]
    client.send("AUTHENTICATE PLAIN", "AUTHENTICATE *")
    assert client.read() == ["AUTHENTICATE +", ":chat.netd.test 906 * :SASL authentication aborted"]
    assert sasl(client, b"\0alice\0wonderland") == [
        ":chat.netd.test 900 * alice!alice@192.0.2.7 alice :You are now logged in as alice",
        ":chat.netd.test 903 * :SASL authentication successful",
    ]
    client.send("AUTHENTICATE PLAIN")
    assert client.read() == [":chat.netd.test 907 * :You have already authenticated using SASL"]
    client.send("CAP END")
    assert client.read()[0].startswith(":chat.netd.test 001 alice ")
    assert [e["ok"] for e in chat.events("chat.sasl")] == [False, True]
    # Another account, logging in as someone else, garbage, too long.
    other = chat.connect("irc")
    other.send("CAP REQ :sasl")
    other.read()
    assert sasl(other, b"bob\0bob\0builder")[-1].endswith(":SASL authentication successful")
    guesser = chat.connect("irc")
    guesser.send("CAP REQ :sasl")
    guesser.read()
    assert sasl(guesser, b"alice\0bob\0builder")[-1].endswith(" 904 * :SASL authentication failed")
    guesser.send("AUTHENTICATE PLAIN", "AUTHENTICATE !!notbase64!!")
    assert guesser.read()[-1].endswith(" 904 * :SASL authentication failed")
    guesser.send(
        "AUTHENTICATE PLAIN", "AUTHENTICATE " + "A" * 400, *["AUTHENTICATE " + "A" * 400] * 4
    )
    lines = guesser.read()
    assert lines[-2].endswith(" 904 * :SASL authentication failed")  # the third failure
    assert lines[-1].startswith("ERROR :Closing Link") and guesser.closed
    assert chat.stats.counters["chat_sasl_failures"] == 4


def test_tags_time_echo_and_tagmsg(tmp_path: Path) -> None:
    chat = serve(tmp_path)
    modern = chat.connect("irc")
    modern.send("CAP LS 302", "CAP REQ :server-time message-tags echo-message", "CAP END")
    modern.send("NICK modern", "USER m 0 * :M", "JOIN #lobby")
    plain = irc_user(chat, "plain")
    timed = chat.connect("irc")
    timed.send("CAP REQ server-time", "NICK timed", "USER t 0 * :T", "CAP END")
    plain.send("JOIN #lobby")
    timed.send("JOIN #lobby")
    for client in (modern, plain, timed):
        client.read()
    modern.send("@+draft/reply=abc;+typing=done;time=forged;label=x PRIVMSG #lobby :hi all")
    tags = "+draft/reply=abc;+typing=done"
    assert modern.read() == [f"@time={STAMP};{tags} :modern!m@192.0.2.7 PRIVMSG #lobby :hi all"]
    assert plain.read() == [":modern!m@192.0.2.7 PRIVMSG #lobby :hi all"]
    assert timed.read() == [f"@time={STAMP} :modern!m@192.0.2.7 PRIVMSG #lobby :hi all"]
    plain.send("PRIVMSG modern :psst")
    assert modern.read() == [f"@time={STAMP} :plain!plain@192.0.2.7 PRIVMSG modern :psst"]
    modern.send("@+typing=active TAGMSG #lobby", "@+typing=active TAGMSG plain", "TAGMSG #lobby")
    assert modern.read() == [  # its echoes; a TAGMSG without tags goes nowhere
        f"@time={STAMP};+typing=active :modern!m@192.0.2.7 TAGMSG #lobby",
        f"@time={STAMP};+typing=active :modern!m@192.0.2.7 TAGMSG plain",
    ]
    assert plain.read() == [] and timed.read() == []  # neither takes message tags
    modern.send("@+x=" + "y" * 5000 + " PRIVMSG #lobby :long tags")
    assert modern.read() == [f"@time={STAMP} :chat.netd.test 417 modern :Input line was too long"]
    plain.send("PRIVMSG #lobby :" + "z" * 600)
    assert plain.read() == [":chat.netd.test 417 plain :Input line was too long"]


def test_history_batch_and_away_notify(tmp_path: Path) -> None:
    chat = serve(tmp_path)
    alice = irc_user(chat, "alice")
    alice.send("JOIN #lobby", "PRIVMSG #lobby :first")
    chat.clock.advance(1.5)
    alice.send("PRIVMSG #lobby :second")
    late = chat.connect("irc")
    late.send("CAP REQ :batch server-time away-notify", "CAP END", "NICK late", "USER l 0 * :L")
    late.send("JOIN #lobby")
    lines = [line for line in late.read() if " 353 " not in line and " 366 " not in line]
    now = "2023-11-14T22:13:21.500Z"
    assert lines[-5:] == [
        f"@time={now} :late!l@192.0.2.7 JOIN #lobby",
        f"@time={now} :chat.netd.test BATCH +h1 chathistory #lobby",
        f"@time={STAMP};batch=h1 :alice!history@chat.netd.test PRIVMSG #lobby :first",
        f"@time={now};batch=h1 :alice!history@chat.netd.test PRIVMSG #lobby :second",
        f"@time={now} :chat.netd.test BATCH -h1",
    ]
    alice.read()
    alice.send("AWAY :lunch")
    assert late.read() == [f"@time={now} :alice!alice@192.0.2.7 AWAY :lunch"]
    alice.send("AWAY")
    assert late.read() == [f"@time={now} :alice!alice@192.0.2.7 AWAY"]
    plain = irc_user(chat, "plain")
    plain.send("AWAY :gone", "JOIN #lobby")
    assert late.read() == [
        f"@time={now} :plain!plain@192.0.2.7 JOIN #lobby",
        f"@time={now} :plain!plain@192.0.2.7 AWAY :gone",
    ]
    assert not any("AWAY" in line for line in alice.read())  # alice did not ask


# --- channel operators -------------------------------------------------------------------


def test_operators_modes_and_what_they_guard(tmp_path: Path) -> None:
    chat = serve(tmp_path, GENEROUS_FLOOD)
    alice = irc_user(chat, "alice")
    alice.send("JOIN #den")
    bob = irc_user(chat, "bob")
    bob.send("JOIN #den")
    carol = line_user(chat, "carol")
    carol.send("/join den")
    for client in (alice, bob, carol):
        client.read()
    bob.send("MODE #den +m", "KICK #den alice", "INVITE carol #den")
    assert bob.read() == [
        ":chat.netd.test 482 bob #den :You're not channel operator",
        ":chat.netd.test 482 bob #den :You're not channel operator",
        ":chat.netd.test 443 bob carol #den :is already on channel",
    ]
    alice.send("MODE #den +ov-n+mt bob carol")
    change = ":alice!alice@192.0.2.7 MODE #den +ov-n+m bob carol"  # +t was on already
    assert alice.read() == [change] and bob.read() == [change]
    assert carol.read() == [
        "* alice set #den: bob is an operator, carol has a voice, outsiders may talk, moderated"
    ]
    bob.send("NAMES #den", "WHO #den")
    assert bob.read() == [
        ":chat.netd.test 353 bob = #den :@alice @bob +carol",
        ":chat.netd.test 366 bob #den :End of /NAMES list",
        ":chat.netd.test 352 bob #den alice 192.0.2.7 chat.netd.test alice H@ :0 Alice Example",
        ":chat.netd.test 352 bob #den bob 192.0.2.7 chat.netd.test bob H@ :0 Bob Example",
        ":chat.netd.test 352 bob #den line 192.0.2.7 chat.netd.test carol H+ :0 carol",
        ":chat.netd.test 315 bob #den :End of WHO list",
    ]
    dave = irc_user(chat, "dave")
    dave.send("CAP REQ multi-prefix", "JOIN #den", "PRIVMSG #den :hello?", "TOPIC #den :mine")
    alice.send("MODE #den +v dave")
    dave.send("NAMES #den", "PRIVMSG #den :with a voice")
    lines = dave.read()
    assert ":chat.netd.test 404 dave #den :Cannot send to channel" in lines  # +m
    assert ":chat.netd.test 482 dave #den :You're not channel operator" in lines  # +t
    assert ":chat.netd.test 353 dave = #den :@alice @bob +carol +dave" in lines
    assert carol.read()[-1] == "<dave> with a voice"
    alice.read()
    alice.send("MODE #den -o+b bob bob", "MODE #den b", "KICK #den bob :behave")
    lines = alice.read()
    assert lines[:2] == [
        ":alice!alice@192.0.2.7 MODE #den -o+b bob bob!*@*",
        ":chat.netd.test 367 alice #den bob!*@* alice!alice@192.0.2.7 :1700000000",
    ]
    assert lines[-1] == ":alice!alice@192.0.2.7 KICK #den bob :behave"
    assert bob.read()[-1] == ":alice!alice@192.0.2.7 KICK #den bob :behave"
    assert carol.read()[-1] == "* alice kicked bob from #den (behave)"
    bob.send("JOIN #den")
    assert bob.read() == [":chat.netd.test 474 bob #den :Cannot join channel (+b)"]
    alice.send("MODE #den +ik-b secret bob", "MODE #den +l 4", "MODE #den")
    assert alice.read()[-2] == ":chat.netd.test 324 alice #den +imtkl secret 4"
    bob.send("JOIN #den", "MODE #den")
    assert bob.read() == [
        ":chat.netd.test 473 bob #den :Cannot join channel (+i)",
        ":chat.netd.test 324 bob #den +imtkl * 4",  # the key only for members
        f":chat.netd.test 329 bob #den :{1_700_000_000}",
    ]
    alice.send("INVITE bob #den", "INVITE ghost #den")
    assert bob.read() == [":alice!alice@192.0.2.7 INVITE bob #den"]
    assert alice.read() == [
        ":chat.netd.test 341 alice bob :#den",
        ":chat.netd.test 401 alice ghost :No such nick/channel",
    ]
    bob.send("JOIN #den wrong", "JOIN #den secret")
    lines = bob.read()
    assert lines[0] == ":chat.netd.test 475 bob #den :Cannot join channel (+k)"
    assert lines[1] == ":bob!bob@192.0.2.7 JOIN #den"
    erin = irc_user(chat, "erin")
    alice.send("INVITE erin #den")
    erin.send("JOIN #den secret")
    assert erin.read()[-1] == ":chat.netd.test 471 erin #den :Cannot join channel (+l)"
    alice.read()
    alice.send("MODE #den +x", "MODE #den +l many", "MODE #den +o ghost", "MODE #den +o erin")
    alice.send("MODE #den -k+v-l secret erin", "MODE #den +kl secret 4")
    assert alice.read() == [
        ":chat.netd.test 472 alice x :is unknown mode char to me",
        ":chat.netd.test 696 alice #den l many :Invalid limit",
        ":chat.netd.test 401 alice ghost :No such nick/channel",
        ":chat.netd.test 441 alice erin #den :They aren't on that channel",
        ":alice!alice@192.0.2.7 MODE #den -k *",  # +v erin failed, -l was not tried
        ":chat.netd.test 441 alice erin #den :They aren't on that channel",
        ":alice!alice@192.0.2.7 MODE #den +k secret",  # the limit was 4 already
    ]
    carol.send("/join den", "/topic x")
    assert carol.read()[-1] == "* you are not an operator of #den"
    room = chat.handlers.views["rooms"].item("den")  # type: ignore[misc]
    assert (room["operators"], room["modes"], room["bans"]) == (["alice"], "+imtkl * 4", [])
    assert [e["target"] for e in chat.events("chat.kick")] == ["bob"]


def test_bans_match_masks_and_silence_members(tmp_path: Path) -> None:
    chat = serve(tmp_path, GENEROUS_FLOOD)
    alice = irc_user(chat, "alice")
    alice.send("JOIN #den")
    bob = irc_user(chat, "bob")
    bob.send("JOIN #den")
    alice.read()
    alice.send("MODE #den +b *!*@192.0.2.*", "MODE #den +b *!*@192.0.2.*")
    assert alice.read() == [":alice!alice@192.0.2.7 MODE #den +b *!*@192.0.2.*"]  # once
    bob.read()
    bob.send("PRIVMSG #den :can I talk?")
    assert bob.read() == [":chat.netd.test 404 bob #den :Cannot send to channel"]
    alice.send("PRIVMSG #den :operators can")  # a ban does not silence an operator
    assert bob.read() == [":alice!alice@192.0.2.7 PRIVMSG #den :operators can"]
    for n in range(101):
        alice.send(f"MODE #den +b spam{n}")
    assert (
        alice.read()[-1] == ":chat.netd.test 478 alice #den spam100!*@* :Channel ban list is full"
    )
    outsider = irc_user(chat, "outsider")
    outsider.send("PRIVMSG #den :from outside")
    assert outsider.read() == [":chat.netd.test 404 outsider #den :Cannot send to channel"]  # +n


def test_a_ban_mask_of_many_stars_is_matched_in_linear_time(tmp_path: Path) -> None:
    chat = serve(tmp_path)
    alice = irc_user(chat, "alice")
    alice.send("JOIN #redos", "MODE #redos +b *a*a*a*a*a*a*a*a*b", "MODE #redos +b d?v*!*@*")
    alice.read()
    mallory = irc_user(chat, "a" * 30)
    started = time.perf_counter()
    mallory.send("JOIN #redos")  # a regular expression took seconds on this, doubling per star
    assert time.perf_counter() - started < 0.5
    assert mallory.read()[0].endswith(" JOIN #redos")  # no "b" in the prefix: not banned
    dave = irc_user(chat, "DAVE")
    dave.send("JOIN #redos")
    assert dave.read() == [":chat.netd.test 474 DAVE #redos :Cannot join channel (+b)"]


def test_a_line_of_tags_alone_is_ignored_and_the_connection_goes_on(tmp_path: Path) -> None:
    chat = serve(tmp_path)
    alice = irc_user(chat, "alice")
    alice.send("@+typing=active", "@+typing=active ", ":prefix.only", "PING :still-here")
    assert alice.read() == [":chat.netd.test PONG chat.netd.test :still-here"]
    assert not alice.closed


def test_a_line_user_kicked_from_its_current_room_is_told_where_it_talks_now(
    tmp_path: Path,
) -> None:
    chat = serve(tmp_path)
    alice = irc_user(chat, "alice")
    alice.send("JOIN #k1", "JOIN #k2")
    victim = line_user(chat, "victim")  # in #lobby
    victim.send("/join k1", "/join k2")  # talking in #k2
    victim.read()
    alice.send("KICK #k2 victim :out")
    assert victim.read() == ["* alice kicked victim from #k2 (out)", "* now talking in #lobby"]
    alice.send("KICK #k1 victim")  # not the current room: nothing more to say
    assert victim.read() == ["* alice kicked victim from #k1 (alice)"]
    victim.send("/part lobby")
    assert victim.read()[-1] == "* you are in no room now: /join ROOM"
    victim.send("/join k1")
    alice.send("KICK #k1 victim :again")
    assert victim.read()[-1] == "* you are in no room now: /join ROOM"
    victim.send("/topic", "still here?")
    assert victim.read() == ["* you are in no room", "* you are in no room: /join ROOM"]
    assert not victim.closed


def test_commands_others_hear_of_spend_the_flood_allowance(tmp_path: Path) -> None:
    chat = serve(tmp_path, "    flood: {messages: 3, per_seconds: 3}\n")
    alice = irc_user(chat, "alice")  # registering costs nothing
    bob = irc_user(chat, "bob")
    alice.send("JOIN #f", "NICK al", "TOPIC #f :t", "MODE #f +m")
    assert alice.read()[-1] == (
        ":chat.netd.test NOTICE al :flood: more than 3 messages in 3 s; messages delayed"
    )
    chat.clock.advance(1)
    assert alice.read() == [":al!alice@192.0.2.7 MODE #f +m"]
    chat.clock.advance(3)
    alice.send(*["INVITE bob #f"] * 5)
    assert [line.split()[1] for line in bob.read()] == ["INVITE"] * 3
    chat.clock.advance(2)
    assert [line.split()[1] for line in bob.read()] == ["INVITE"] * 2
    carol = line_user(chat, "carol")
    carol.send("/join a", "/part a", "/nick caroline", "/topic t")
    assert carol.read()[-1] == "* flood: more than 3 messages in 3 s; messages delayed"
    chat.clock.advance(1)
    assert carol.read() == ["* caroline set the topic of #lobby: t"]
    assert [e["action"] for e in chat.events("chat.flood")] == ["delay", "delay", "delay"]


def test_queries_a_client_sends_for_its_channels_are_free(tmp_path: Path) -> None:
    """As irssi syncs each channel it joins: MODE #c, MODE #c b, TOPIC #c, its own MODE."""
    chat = serve(tmp_path, "    flood: {messages: 3, per_seconds: 3}\n")
    alice = irc_user(chat, "alice")
    alice.send("MODE alice", "JOIN #a,#b,#c,#d,#e")
    for name in "abcde":
        alice.send(f"MODE #{name}", f"MODE #{name} b", f"MODE #{name} +b", f"TOPIC #{name}")
    alice.read()
    alice.send("JOIN #f", "TOPIC #f :set")
    assert alice.read()[0] == ":alice!alice@192.0.2.7 JOIN #f"
    assert chat.events("chat.flood") == []
    alice.send("JOIN #g")
    assert alice.read() == [
        ":chat.netd.test NOTICE alice :flood: more than 3 messages in 3 s; messages delayed"
    ]


def test_nicks_fold_ascii_letters_only(tmp_path: Path) -> None:
    chat = serve(tmp_path)
    karen = irc_user(chat, "karen")
    alice = irc_user(chat, "alice")
    alice.send("PRIVMSG \u212aaren :kelvin", "PRIVMSG KAREN :ascii")  # U+212A KELVIN SIGN
    assert alice.read() == [":chat.netd.test 401 alice \u212aaren :No such nick/channel"]
    assert karen.read() == [":alice!alice@192.0.2.7 PRIVMSG karen :ascii"]


def test_registering_aborts_a_sasl_exchange_under_way(tmp_path: Path) -> None:
    hashed = bcrypt.hashpw(b"wonderland", bcrypt.gensalt(4)).decode()
    chat = serve(tmp_path, f"    users: {{alice: {{password: '{hashed}'}}}}\n")
    early = chat.connect("irc")
    early.send("CAP REQ :sasl", "NICK early", "USER e 0 * :E", "AUTHENTICATE PLAIN")
    early.read()
    early.send("CAP END")
    lines = early.read()
    assert lines[0] == ":chat.netd.test 906 * :SASL authentication aborted"
    assert lines[1].startswith(":chat.netd.test 001 early ")
    # A password check still in its thread then logs no one in.
    checking: Deferred[None] = Deferred()
    late = chat.connect("irc")
    hub = late.session.hub  # type: ignore[attr-defined]
    hub.run_in_thread = lambda work, *args: checking.addCallback(lambda _: work(*args))
    late.send("CAP REQ :sasl", "NICK late", "USER l 0 * :L")
    late.read()
    assert sasl(late, b"\0alice\0wonderland") == []
    late.send("CAP END")
    assert late.read()[0] == ":chat.netd.test 906 * :SASL authentication aborted"
    checking.callback(None)
    chat.clock.advance(SASL_FAILURE_DELAY)
    assert late.read() == []
    assert late.session.account is None  # type: ignore[attr-defined]
    assert chat.events("chat.sasl") == []


def test_commands_short_of_arguments_or_naming_no_one_are_answered(tmp_path: Path) -> None:
    chat = serve(tmp_path)
    irc_user(chat, "karen")
    alice = irc_user(chat, "alice")
    alice.send("JOIN #c")
    alice.read()
    alice.send("MODE #c +k", "MODE #c +l", "MODE #c +o", "MODE ghost", "MODE karen", "USERHOST")
    alice.send("ISON karen KAREN ghost")
    short = ":chat.netd.test 461 alice {} :Not enough parameters"
    assert alice.read() == [
        *[short.format("MODE")] * 3,
        ":chat.netd.test 401 alice ghost :No such nick/channel",
        ":chat.netd.test 502 alice :Cannot change mode for other users",
        short.format("USERHOST"),
        ":chat.netd.test 303 alice :karen",
    ]


def test_a_message_reaches_each_target_once_with_its_trailing_spaces(tmp_path: Path) -> None:
    chat = serve(tmp_path)
    alice = irc_user(chat, "alice")
    bob = irc_user(chat, "bob")
    bob.send("JOIN #c")
    alice.send("JOIN #c")
    bob.read()
    alice.send("PRIVMSG #c,#C,#c :spaced  ", "PRIVMSG bob,BOB :once ")
    assert bob.read() == [
        ":alice!alice@192.0.2.7 PRIVMSG #c :spaced  ",
        ":alice!alice@192.0.2.7 PRIVMSG bob :once ",
    ]
