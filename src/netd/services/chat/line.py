"""
The line protocol of the chat kind: telnet and netcat users.

Lines starting with C{/} are commands; any other line goes to the user's
current room and reaches everyone else as C{<nick> text}.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from netd.services.chat.hub import ChatError, Hub, ModeChange, Room, Session, Wire, fold

__all__ = ["LineSession", "LineWire"]

# Commands that spend from the flood allowance as a room line does: others hear of them.
_FLOOD_CHARGED = frozenset({"nick", "join", "part", "topic"})
# IAC IAC, IAC SB ... IAC SE, IAC WILL/WONT/DO/DONT option, IAC command (RFC 854).
_TELNET = re.compile(rb"\xff\xff|\xff\xfa.*?\xff\xf0|\xff[\xfb-\xfe].|\xff[\xf0-\xf9]", re.DOTALL)

HELP = (
    "/nick NAME        choose or change your nick (NAME@NAMESPACE: in a namespace)",
    "/join ROOM [KEY]  join ROOM (created if new) and make it current",
    "/part [ROOM]      leave ROOM (default: the current room)",
    "/msg NICK TEXT    a private message",
    "/who [ROOM]       who is in ROOM (default: the current room)",
    "/rooms            every room, its users and topic",
    "/topic TEXT       set the current room's topic",
    "/quit [REASON]    leave",
    "other lines go to the current room",
)

_REFUSALS = {
    ChatError.NICK_IN_USE: "nick {} is in use",
    ChatError.BAD_NICK: "{} is not a valid nick (a letter first, letters, digits, -_[]{{}}|^`)",
    ChatError.BAD_ROOM: "no room {}",
    ChatError.NO_CREATE: "no room {} (new rooms cannot be created here)",
    ChatError.NOT_IN_ROOM: "you are not in {}",
    ChatError.NO_SUCH_NICK: "nobody is called {}",
    ChatError.TOO_MANY_ROOMS: "cannot join {}: you are in too many rooms",
    ChatError.NOT_OPERATOR: "you are not an operator of {}",
    ChatError.CANNOT_SEND: "you cannot talk in {} (moderated, or banned)",
    ChatError.BANNED: "cannot join {}: you are banned",
    ChatError.INVITE_ONLY: "cannot join {}: invitation only",
    ChatError.BAD_KEY: "cannot join {}: wrong key (/join ROOM KEY)",
    ChatError.FULL: "cannot join {}: it is full",
    ChatError.THEY_ARE_NOT_IN_ROOM: "they are not in {}",
    ChatError.ALREADY_IN_ROOM: "they are already in {}",
    ChatError.BAN_LIST_FULL: "the ban list of {} is full",
}


# How line users read a channel mode change.
_MODE_WORDS = {
    "o": ("{} is an operator", "{} is no longer an operator"),
    "v": ("{} has a voice", "{} no longer has a voice"),
    "b": ("{} is banned", "{} is no longer banned"),
    "i": ("invitation only", "open to all"),
    "m": ("moderated", "not moderated"),
    "n": ("members only may talk", "outsiders may talk"),
    "t": ("operators only set the topic", "anyone sets the topic"),
    "k": ("key required", "no key"),
    "l": ("at most {} users", "no user limit"),
}


def _mode_text(change: ModeChange) -> str:
    on, off = _MODE_WORDS[change.mode]
    return (on if change.adding else off).format(change.argument)


def _members(room: Room) -> str:
    """Who is in C{room}, operators marked C{@} and voiced users C{+}, as on IRC."""
    members = sorted(room.all_members(), key=lambda m: fold(m.nick))
    return " ".join(room.prefixes(member) + member.nick for member in members)


def _action(nick: str, text: str) -> str | None:
    if text.startswith("\x01ACTION ") and text.endswith("\x01"):
        return f"* {nick} {text[8:-1]}"
    return None


class LineWire(Wire):
    def room_message(self, sender: Session, room: Room, text: str, notice: bool) -> bytes:
        return self._message(sender, room, text, notice, current=True)

    def _message(
        self, sender: Session, room: Room, text: str, notice: bool, current: bool
    ) -> bytes:
        shown = _action(sender.nick, text) or (
            f"-{sender.nick}- {text}" if notice else f"<{sender.nick}> {text}"
        )
        where = "" if current else f"[#{room.name}] "
        return f"{where}{shown}\r\n".encode()

    def deliver(
        self,
        members: Mapping[Session, None],
        sender: Session,
        room: Room,
        text: str,
        notice: bool,
        tags: bytes = b"",
    ) -> None:
        # Two forms: plain for those whose current room it is, tagged for the others.
        here = elsewhere = b""
        for member in members:
            if member is sender:
                continue
            assert isinstance(member, LineSession)
            if member.current == room.key:
                here = here or self._message(sender, room, text, notice, current=True)
                member.out.append(here)
            else:
                elsewhere = elsewhere or self._message(sender, room, text, notice, current=False)
                member.out.append(elsewhere)

    def joined(self, user: Session, room: Room) -> bytes:
        return f"* {user.nick} joined #{room.name}\r\n".encode()

    def parted(self, user: Session, room: Room, reason: str) -> bytes:
        why = f" ({reason})" if reason else ""
        return f"* {user.nick} left #{room.name}{why}\r\n".encode()

    def quit(self, user: Session, reason: str) -> bytes:
        return f"* {user.nick} quit ({reason})\r\n".encode()

    def renamed(self, user: Session, old_prefix: str, old_nick: str) -> bytes:
        return f"* {old_nick} is now known as {user.nick}\r\n".encode()

    def topic(self, user: Session, room: Room) -> bytes:
        return f"* {user.nick} set the topic of #{room.name}: {room.topic}\r\n".encode()

    def kicked(self, kicker: Session, room: Room, target: Session, reason: str) -> bytes:
        return f"* {kicker.nick} kicked {target.nick} from #{room.name} ({reason})\r\n".encode()

    def modes(self, user: Session, room: Room, changes: list[ModeChange]) -> bytes:
        shown = ", ".join(_mode_text(change) for change in changes)
        return f"* {user.nick} set #{room.name}: {shown}\r\n".encode()

    def invited(self, inviter: Session, target: Session, room: Room) -> bytes:
        return f"* {inviter.nick} invites you to #{room.name} (/join {room.name})\r\n".encode()

    def private(
        self, sender: Session, target: Session, text: str, notice: bool, tags: bytes = b""
    ) -> bytes:
        shown = _action(sender.nick, text) or (
            f"-{sender.nick}- {text}" if notice else f"*{sender.nick}* {text}"
        )
        return f"{shown}\r\n".encode()


class LineSession(Session):
    """One telnet or netcat user."""

    protocol_name = "line"

    def __init__(self, hub: Hub, wire: LineWire) -> None:
        super().__init__(hub)
        self.wire = wire
        self.user = "line"
        self.current: str | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        options = self.hub.options
        self.notify(f"welcome to {options.server_name}")
        for line in options.motd.splitlines():
            self.notify(line)
        self.notify("choose a nick with /nick NAME; /help lists the commands")

    def notify(self, text: str) -> None:
        self.write(f"* {text}\r\n".encode())

    def farewell(self, reason: str) -> bytes:
        return f"* bye: {reason}\r\n".encode()

    def too_long(self) -> None:
        self.notify(f"line too long (over {self.max_line - 2} bytes), dropped")

    def dataReceived(self, data: bytes) -> None:
        if b"\xff" in data:
            # Telnet option negotiation (IAC ...) is not text; a doubled IAC is a 0xff byte.
            data = _TELNET.sub(lambda m: b"\xff" if m.group() == b"\xff\xff" else b"", data)
        super().dataReceived(data)

    def line_received(self, line: str) -> None:
        if not line.strip():
            return
        if line.startswith("/"):
            command, _, rest = line[1:].partition(" ")
            handler = getattr(self, f"do_{command.lower()}", None)
            if handler is None:
                self.notify(f"unknown command /{command}; /help lists the commands")
                return
            if self.registered and command.lower() in _FLOOD_CHARGED and not self.hub.allow(self):
                return
            try:
                handler(rest.strip())
            except ChatError as e:
                self.notify(_REFUSALS[e.reason].format(e.name))
            return
        if not self.registered:
            self.notify("choose a nick first: /nick NAME")
        elif self.current is None:
            self.notify("you are in no room: /join ROOM")
        elif self.hub.allow(self):
            try:
                self.hub.say(self, self.current, line)
            except ChatError as e:
                self.notify(_REFUSALS[e.reason].format(e.name))

    def do_help(self, rest: str) -> None:
        for line in HELP:
            self.notify(line)

    def do_nick(self, rest: str) -> None:
        if not rest:
            self.notify(f"you are {self.nick}" if self.nick else "usage: /nick NAME")
        elif self.registered:
            self.hub.rename(self, rest)
        else:
            nick, self.nick_login = self.hub.read_nick(rest)
            self.hub.register(self, nick)
            self.notify(f"you are {self.nick}")
            if self.hub.options.rooms:
                self.do_join(self.hub.options.rooms[0])

    def _need_nick(self) -> bool:
        if not self.registered:
            self.notify("choose a nick first: /nick NAME")
        return self.registered

    def do_join(self, rest: str) -> None:
        if not self._need_nick():
            return
        name, _, channel_key = rest.partition(" ")
        if not name:
            self.notify("usage: /join ROOM [KEY]")
            return
        room = self.hub.join(self, name, channel_key.strip())
        key = room.key if room is not None else self.hub.find_room(name).key
        self.current = key
        joined = self.rooms[key]
        if room is None:
            self.notify(f"now talking in #{joined.name}")
            return
        if joined.topic:
            self.notify(f"topic of #{joined.name}: {joined.topic}")
        self.notify(f"in #{joined.name}: {_members(joined)}")
        for _, nick, text in joined.history:
            shown = _action(nick, text) or f"<{nick}> {text}"
            self.write(f"{shown}\r\n".encode())

    def do_part(self, rest: str) -> None:
        if not self._need_nick():
            return
        name = rest.split(" ", 1)[0] if rest else self.current
        if name is None:
            self.notify("you are in no room")
            return
        room = self.hub.part(self, name, "")
        if self.current == room.key:
            self._talk_elsewhere()

    def kicked_out(self, room: Room) -> None:
        if self.current == room.key:
            self._talk_elsewhere()

    def _talk_elsewhere(self) -> None:
        """The current room was left: another becomes current, and the user hears which."""
        self.current = next(iter(self.rooms), None)
        if self.current is not None:
            self.notify(f"now talking in #{self.rooms[self.current].name}")
        else:
            self.notify("you are in no room now: /join ROOM")

    def do_msg(self, rest: str) -> None:
        if not self._need_nick():
            return
        nick, _, text = rest.partition(" ")
        if not nick or not text:
            self.notify("usage: /msg NICK TEXT")
        elif self.hub.allow(self):
            self.hub.tell(self, nick, text)

    def do_who(self, rest: str) -> None:
        name = rest or self.current
        if name is None:
            self.notify("usage: /who ROOM")
            return
        room = self.hub.find_room(name)
        self.notify(f"in #{room.name}: {_members(room)}")

    def do_rooms(self, rest: str) -> None:
        for room in sorted(self.hub.rooms.values(), key=lambda r: r.key):
            topic = f": {room.topic}" if room.topic else ""
            self.notify(f"#{room.name} ({room.count} users){topic}")

    def do_topic(self, rest: str) -> None:
        if not self._need_nick():
            return
        if self.current is None:
            self.notify("you are in no room")
        elif not rest:
            room = self.rooms[self.current]
            self.notify(f"topic of #{room.name}: {room.topic or '(none)'}")
        else:
            self.hub.set_topic(self, self.current, rest)

    def do_quit(self, rest: str) -> None:
        self.disconnect(f"Quit: {rest}" if rest else "Quit")
