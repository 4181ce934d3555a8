"""
The C{chat} service kind: shared rooms for IRC clients and telnet users.

    chat:
      type: chat
      listen: ["tcp:6667", {endpoint: "tcp:7777", protocol: line}]
      server_name: chat.netd.test
      rooms: [lobby]
      motd: "welcome to netd"
      history: 20
      flood: {messages: 10, per_seconds: 5}
      users: {alice: {password: "..."}}   # IRCv3 SASL PLAIN accounts
      websocket: ["tcp:8067"]             # IRC over WebSocket (browsers)
      namespace_from: [channel_prefix, login, client]   # #t42-room, alice@t42

One L{Hub} per service holds the rooms and users; each listener's C{protocol:}
picks the wire its connections speak (C{irc}, the default, or C{line}); the
C{websocket:} listeners speak IRC in WebSocket messages (the IRCv3 spec,
L{netd.websockets.LinesOverWebSocket}).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.protocol import Factory, Protocol

from netd import passwords
from netd.config import ListenerConfig, ServiceConfig, TLSProfiles
from netd.kinds import AdminView, BuildContext, Handlers, ServiceKind
from netd.namespaces import Derive, SourceReader, login_source
from netd.rules import Vocabulary, exact, glob, reply_line
from netd.schema import Section, Value
from netd.services.chat.hub import (
    NICK_LENGTH,
    ChannelPrefix,
    FloodLimit,
    Hub,
    Options,
    Session,
    fold,
    room_key,
)
from netd.services.chat.irc import IrcSession, IrcWire
from netd.services.chat.line import LineSession, LineWire

__all__ = ["CHAT", "FloodLimit", "Options"]

_PROTOCOLS = ("irc", "line")
# IRC over WebSocket: the IRCv3 subprotocols, each with whether its messages are binary.
_WEBSOCKET_SUBPROTOCOLS = {"text.ircv3.net": False, "binary.ircv3.net": True}
# The handshake must be done within this (or the idle timeout, if shorter).
_WEBSOCKET_HEAD_TIMEOUT = 10.0


def parse(section: Section, profiles: TLSProfiles) -> Options:
    defaults = Options()
    server_name = section.text("server_name", defaults.server_name)
    server_value = section.get("server_name")
    if server_value is not None and (
        not server_name or any(c in server_name for c in " :!@\r\n\0,*?")
    ):
        server_value.error("not a valid server name")
    rooms = section.read("rooms", lambda v: v.list_of(_room, single=True), defaults.rooms)
    password_value = section.get("password")
    password = None
    if password_value is not None:
        password = password_value.as_str()
        if password_value.is_scalar and (not password or any(c in password for c in " \r\n\0")):
            password_value.error("a password is one word of printable characters")
    motd = section.text("motd", defaults.motd)
    if any(c in motd for c in "\r\0"):
        entry = section.get("motd")
        assert entry is not None
        entry.error("the motd cannot hold CR or NUL")
    options = Options(
        server_name=server_name,
        rooms=tuple(dict.fromkeys(rooms)),
        create_rooms=section.flag("create_rooms", defaults.create_rooms),
        motd=motd,
        history=section.integer("history", defaults.history, minimum=0, maximum=10_000),
        flood=section.read("flood", _flood, defaults.flood),
        password=password,
        users=section.read(
            "users",
            lambda users: passwords.read_users(users, _account_name_problem),
            defaults.users,
        ),
        ping_interval=section.number("ping_interval", defaults.ping_interval, minimum=1),
        ping_timeout=section.number("ping_timeout", defaults.ping_timeout, minimum=1),
    )
    if not options.rooms and not options.create_rooms:
        section.value.error("with create_rooms: false, give at least one room in rooms")
    return options


def _room(value: Value) -> str:
    name = value.as_str()
    if value.is_scalar and room_key(name) is None:
        value.error(
            f"not a valid room name: {name!r} (up to 32 letters, digits, '.', '_', '-',"
            " after an optional '#')"
        )
    return name.removeprefix("#")


def _account_name_problem(name: str) -> str | None:
    if not name or len(name) > 64 or any(c in name for c in " \0\r\n"):
        return "account names are 1-64 characters, no spaces"
    return None


def _flood(value: Value) -> FloodLimit:
    section = value.section()
    defaults = FloodLimit()
    limit = FloodLimit(
        messages=section.integer("messages", defaults.messages, minimum=1, maximum=100_000),
        per_seconds=section.number("per_seconds", defaults.per_seconds, minimum=0.001),
    )
    section.finish()
    return limit


class _ChatFactory(Factory):
    noisy = False

    def __init__(self, make: Any) -> None:
        self.make = make

    def buildProtocol(self, addr: Any) -> Protocol:
        protocol: Protocol = self.make()
        protocol.factory = self
        return protocol


def build(service: ServiceConfig, context: BuildContext) -> Handlers:
    options: Options = service.options
    hub = Hub(
        options,
        context.reactor,
        context.stats,
        context.emit,
        journal_active=lambda: context.journal.active,
        rules=context.rules,
        run_in_thread=context.in_thread,
        namespaces=context.namespaces,
    )
    irc_wire = IrcWire(options.server_name, context.reactor)
    line_wire = LineWire()
    factories: dict[str, IProtocolFactory] = {
        "irc": _ChatFactory(lambda: IrcSession(hub, irc_wire)),
        "line": _ChatFactory(lambda: LineSession(hub, line_wire)),
    }

    if any(listener.protocol == "websocket" for listener in service.listen):
        # wsproto loads with the first map that has a WebSocket listener.
        from netd.websockets import LineSocketOptions, LinesOverWebSocket

        socket_options = LineSocketOptions(
            subprotocols=_WEBSOCKET_SUBPROTOCOLS,
            max_line=IrcSession.max_line,
            head_timeout=min(_WEBSOCKET_HEAD_TIMEOUT, service.idle_timeout),
        )
        factories["websocket"] = _ChatFactory(
            lambda: LinesOverWebSocket(IrcSession(hub, irc_wire), context.reactor, socket_options)
        )

    def stream(listener: ListenerConfig) -> IProtocolFactory:
        return factories[listener.protocol or _PROTOCOLS[0]]

    def sessions(query: Mapping[str, str]) -> Any:
        found = hub.describe_sessions()
        room = query.get("room")
        if room:
            wanted = room_key(room)
            found = [s for s in found if any(fold(r) == wanted for r in s["rooms"])]
        return found

    def session(nick: str) -> Any:
        user: Session | None = hub.users.get(fold(nick)) if len(nick) <= NICK_LENGTH else None
        return user.describe() if user is not None else None

    def room(name: str) -> Any:
        key = room_key(name)
        found = hub.rooms.get(key) if key is not None else None
        return hub.describe_room(found) if found is not None else None

    return Handlers(
        stream=stream,
        busy_reply=b"ERROR :Closing Link: too many connections\r\n",
        views={
            "sessions": AdminView(list=sessions, item=session),
            "rooms": AdminView(
                list=lambda query: hub.describe_rooms(), item=room, forget=hub.forget
            ),
        },
    )


def _disconnect(value: Value) -> str | None:
    """A rule's C{disconnect}: the reason the client is told (C{true}: a plain one)."""
    if value.node.tag == "tag:yaml.org,2002:bool":
        return "Disconnected by a rule" if value.as_bool() else None
    return value.as_str()


# IRC commands' rules: the command and the channel it names (its first parameter).
RULES = Vocabulary(
    match={"command": exact(), "channel": glob()},
    acts={"numeric": reply_line("0123456789"), "disconnect": _disconnect},
    generic=("delay", "reset", "close", "stall"),
)


def _channel_prefix(argument: Value | None) -> Derive | None:
    if argument is not None:
        argument.error("'channel_prefix' takes no argument")
        return None
    return ChannelPrefix()


# namespace_from: a room's prefix (#t42-room), a login (alice@t42: nick, USER or SASL).
NAMESPACES: Mapping[str, SourceReader] = {
    "channel_prefix": _channel_prefix,
    "login": login_source,
}

CHAT: ServiceKind[Options] = ServiceKind(
    "chat",
    parse,
    build,
    protocols=_PROTOCOLS,
    rules=RULES,
    listener_keys=("websocket",),
    namespaces=NAMESPACES,
)
