"""
The IRC side of the chat kind: the RFC 2812 subset ordinary clients and bots use,
and the IRCv3 capabilities today's clients ask for (C{server-time},
C{message-tags}, C{echo-message}, C{multi-prefix}, C{away-notify}, C{batch},
C{sasl} PLAIN).

L{twisted.words.protocols.irc.IRC} supplies the message parser, the command
dispatch (C{irc_COMMAND} methods) and the numerics; netd replaces its framing,
which decodes each read as strict UTF-8 (one stray byte raised out of
C{dataReceived}) and allowed 16 KiB lines, with bytes framing at 512 bytes
(plus IRCv3 message tags).
"""

from __future__ import annotations

import base64
import binascii
import itertools
import re
import time
from collections.abc import Iterable, Mapping
from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.words.protocols import irc

from netd.rules import Fired
from netd.services.chat.hub import (
    MAX_BANS,
    MAX_ROOMS_PER_USER,
    NICK_LENGTH,
    ROOM_LENGTH,
    TOPIC_LENGTH,
    ChatError,
    Hub,
    ModeChange,
    Room,
    Session,
    Wire,
    fold,
)

__all__ = ["IrcSession", "IrcWire"]

_log = Logger(namespace="netd.chat")

# RFC 2812 2.3: 512 bytes a message, CRLF included.
MAX_LINE = 512
# IRCv3 message-tags: a client's tags take at most 4094 bytes, with "@" and a space.
MAX_TAGS = 4096
# What a client's tag profile (Session.tag_profile) asks for.
SERVER_TIME = 1
MESSAGE_TAGS = 2
_CAPABILITIES = (
    "away-notify",
    "batch",
    "echo-message",
    "message-tags",
    "multi-prefix",
    "sasl",
    "server-time",
)
# SASL: a client's response arrives in base64 lines of 400; PLAIN needs few of them.
_SASL_CHUNK = 400
_SASL_MOST = 4 * _SASL_CHUNK
_SASL_TRIES = 3
# A wrong password is answered this late (as ftp's login_delay): a client that
# guesses gets one try a second on each connection, not as many as it can send.
SASL_FAILURE_DELAY = 1.0
_CLIENT_TAG = re.compile(r"\+[A-Za-z0-9/.-]+[A-Za-z0-9-]*(=[^\0\r\n; ]*)?\Z")
VERSION = "netd-chat-1"
# From the modern IRC client protocol, not RFC 2812.
ERR_INPUTTOOLONG = "417"
ERR_INVALIDCAPCMD = "410"
# ircu's and InspIRCd's answer to a USER name refused.
ERR_INVALIDUSERNAME = "468"
_NO_NAMESPACE = "Not a namespace after '@' (letters, digits, '_', '-'): USER name@NAMESPACE"
# Channel mode changes that take an argument, at most, in one MODE command.
MAX_MODE_ARGUMENTS = 4
_ISUPPORT = (
    "CASEMAPPING=ascii",
    "CHANTYPES=#",
    "CHANMODES=b,k,l,imnt",
    "PREFIX=(ov)@+",
    f"MODES={MAX_MODE_ARGUMENTS}",
    f"MAXLIST=b:{MAX_BANS}",
    f"NICKLEN={NICK_LENGTH}",
    f"CHANNELLEN={ROOM_LENGTH + 1}",
    f"TOPICLEN={TOPIC_LENGTH}",
    "MAXTARGETS=4",
    f"CHANLIMIT=#:{MAX_ROOMS_PER_USER}",
    "NETWORK=netd",
)
# Commands that spend from the flood allowance (RFC 2812 5.8): messages, and the
# commands that reach other users as messages do.  Not their queries
# (L{_charged}), which clients send for each channel they join.
_FLOOD_CHARGED = frozenset(
    {"PRIVMSG", "NOTICE", "TAGMSG", "NICK", "JOIN", "PART", "TOPIC", "INVITE", "KICK", "MODE"}
)
# Commands a client may send before it has registered.
_BEFORE_REGISTRATION = frozenset(
    {"CAP", "AUTHENTICATE", "PASS", "NICK", "USER", "PING", "PONG", "QUIT"}
)


def _charged(command: str, params: list[str]) -> bool:
    """
    Whether C{command} spends from the flood allowance: a query (C{MODE NICK},
    C{MODE #c}, the ban list's C{MODE #c b}, C{TOPIC #c}) reaches no one.
    """
    if command == "TOPIC":
        return len(params) > 1
    if command == "MODE":
        return len(params) > 2 or (len(params) == 2 and not set(params[1]) <= set("+-b"))
    return command in _FLOOD_CHARGED


def _line(text: str) -> bytes:
    """One outgoing message, cut to fit 512 bytes without splitting a character."""
    data = text.encode("utf-8")
    if len(data) > MAX_LINE - 2:
        data = data[: MAX_LINE - 2].decode("utf-8", "ignore").encode("utf-8")
    return data + b"\r\n"


def with_tags(tags: bytes, line: bytes) -> bytes:
    """C{line} with C{tags} (C{name=value;...}) first among its message tags."""
    if not tags:
        return line
    if line.startswith(b"@"):
        return b"@" + tags + b";" + line[1:]
    return b"@" + tags + b" " + line


def server_time(when: float) -> bytes:
    """The IRCv3 C{time} tag for C{when}: UTC, milliseconds."""
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when))
    return f"time={seconds}.{int(when * 1000) % 1000:03d}Z".encode()


def mode_string(changes: list[ModeChange]) -> str:
    """C{+o-v alice bob}: the changes as one MODE message writes them."""
    flags = ""
    sign = ""
    arguments = []
    for change in changes:
        wanted = "+" if change.adding else "-"
        if wanted != sign:
            flags += wanted
            sign = wanted
        flags += change.mode
        if change.argument is not None:
            arguments.append(change.argument)
    return " ".join([flags, *arguments])


def _client_tags(raw: str) -> bytes:
    """The client-only tags (C{+name[=value]}) of a received tag list, as they came."""
    kept = [tag for tag in raw.split(";") if _CLIENT_TAG.match(tag)]
    return ";".join(kept).encode()


class IrcWire(Wire):
    """Hub happenings as IRC messages; one instance serves every IRC session of a hub."""

    def __init__(self, server_name: str, clock: Any) -> None:
        self.server_name = server_name
        self.clock = clock

    def room_message(self, sender: Session, room: Room, text: str, notice: bool) -> bytes:
        verb = "NOTICE" if notice else "PRIVMSG"
        return _line(f":{sender.prefix} {verb} #{room.name} :{text}")

    def deliver(
        self,
        members: Mapping[Session, None],
        sender: Session,
        room: Room,
        text: str,
        notice: bool,
        tags: bytes = b"",
    ) -> None:
        plain = self.room_message(sender, room, text, notice)
        # One encoding per tag profile: members without IRCv3 tags share the plain bytes.
        tagged: dict[int, bytes] = {}
        for member in members:
            if member is sender:
                continue
            profile = member.tag_profile
            if not profile:
                member.out.append(plain)
                continue
            data = tagged.get(profile)
            if data is None:
                data = tagged[profile] = self.tagged(profile, plain, tags)
            member.out.append(data)

    def tagged(self, profile: int, line: bytes, tags: bytes) -> bytes:
        """C{line} as a client of C{profile} gets it: client tags, then server time first."""
        if profile & MESSAGE_TAGS:
            line = with_tags(tags, line)
        if profile & SERVER_TIME:
            line = with_tags(server_time(self.clock.seconds()), line)
        return line

    def joined(self, user: Session, room: Room) -> bytes:
        return _line(f":{user.prefix} JOIN #{room.name}")

    def parted(self, user: Session, room: Room, reason: str) -> bytes:
        return _line(f":{user.prefix} PART #{room.name} :{reason}")

    def quit(self, user: Session, reason: str) -> bytes:
        return _line(f":{user.prefix} QUIT :{reason}")

    def renamed(self, user: Session, old_prefix: str, old_nick: str) -> bytes:
        return _line(f":{old_prefix} NICK :{user.nick}")

    def topic(self, user: Session, room: Room) -> bytes:
        return _line(f":{user.prefix} TOPIC #{room.name} :{room.topic}")

    def kicked(self, kicker: Session, room: Room, target: Session, reason: str) -> bytes:
        return _line(f":{kicker.prefix} KICK #{room.name} {target.nick} :{reason}")

    def modes(self, user: Session, room: Room, changes: list[ModeChange]) -> bytes:
        return _line(f":{user.prefix} MODE #{room.name} {mode_string(changes)}")

    def invited(self, inviter: Session, target: Session, room: Room) -> bytes:
        return _line(f":{inviter.prefix} INVITE {target.nick} #{room.name}")

    def private(
        self, sender: Session, target: Session, text: str, notice: bool, tags: bytes = b""
    ) -> bytes:
        verb = "NOTICE" if notice else "PRIVMSG"
        line = _line(f":{sender.prefix} {verb} {target.nick} :{text}")
        # The time tag, if wanted, is added as the target's write queues it.
        return with_tags(tags, line) if target.tag_profile & MESSAGE_TAGS else line


_REFUSALS = {
    ChatError.NICK_IN_USE: (irc.ERR_NICKNAMEINUSE, "Nickname is already in use"),
    ChatError.BAD_NICK: (irc.ERR_ERRONEUSNICKNAME, "Erroneous nickname"),
    ChatError.BAD_ROOM: (irc.ERR_NOSUCHCHANNEL, "No such channel"),
    ChatError.NO_CREATE: (irc.ERR_NOSUCHCHANNEL, "No such channel (cannot create channels)"),
    ChatError.NOT_IN_ROOM: (irc.ERR_NOTONCHANNEL, "You're not on that channel"),
    ChatError.NO_SUCH_NICK: (irc.ERR_NOSUCHNICK, "No such nick/channel"),
    ChatError.TOO_MANY_ROOMS: (irc.ERR_TOOMANYCHANNELS, "You have joined too many channels"),
    ChatError.NOT_OPERATOR: (irc.ERR_CHANOPRIVSNEEDED, "You're not channel operator"),
    ChatError.CANNOT_SEND: (irc.ERR_CANNOTSENDTOCHAN, "Cannot send to channel"),
    ChatError.BANNED: (irc.ERR_BANNEDFROMCHAN, "Cannot join channel (+b)"),
    ChatError.INVITE_ONLY: (irc.ERR_INVITEONLYCHAN, "Cannot join channel (+i)"),
    ChatError.BAD_KEY: (irc.ERR_BADCHANNELKEY, "Cannot join channel (+k)"),
    ChatError.FULL: (irc.ERR_CHANNELISFULL, "Cannot join channel (+l)"),
    ChatError.THEY_ARE_NOT_IN_ROOM: (irc.ERR_USERNOTINCHANNEL, "They aren't on that channel"),
    ChatError.ALREADY_IN_ROOM: (irc.ERR_USERONCHANNEL, "is already on channel"),
    ChatError.BAN_LIST_FULL: ("478", "Channel ban list is full"),
}
# Stands for "MODE #channel b" among parsed changes: the list of bans, asked for.
_BAN_LIST = ModeChange(True, "b")
# Refusals about a user in a channel name the user first (441, 443), a mask second (478).
_NICK_FIRST = frozenset({ChatError.THEY_ARE_NOT_IN_ROOM, ChatError.ALREADY_IN_ROOM})


class IrcSession(Session, irc.IRC):
    """One IRC client."""

    protocol_name = "irc"
    max_line = MAX_LINE + MAX_TAGS

    def __init__(self, hub: Hub, wire: IrcWire) -> None:
        super().__init__(hub)
        self.wire = wire
        self.hostname = self.server_name = hub.options.server_name
        self.password_ok = hub.options.password is None
        self.wanted_nick = ""
        self.negotiating = False
        self.invisible = False
        self._seen_at_check = -1
        self._awaiting_pong = False
        self._timer: IDelayedCall | None = None
        self.caps: set[str] = set()
        self.account: str | None = None
        # Logins naming a namespace (alice@t42), by where they came from.
        self.sasl_login: str | None = None
        self.user_login: str | None = None
        self._sasl: list[str] | None = None
        self._sasl_failures = 0
        self._sasl_checking = False
        # Numbers each password check, so the result of one aborted meanwhile is ignored.
        self._sasl_checks = 0
        # The client tags of the command being handled.
        self._tags = b""
        self._batches = itertools.count(1)

    @property
    def login(self) -> str | None:
        """The SASL account's, the USER name's or the nick's login (C{alice@t42}), in that order."""
        return self.sasl_login or self.user_login or self.nick_login

    # --- connection ---------------------------------------------------------------

    def connectionMade(self) -> None:
        # IRC.connectionMade would look up the host's FQDN: a blocking DNS query.
        super().connectionMade()
        self._schedule(self.hub.options.ping_interval)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        super().connectionLost(reason)

    def _schedule(self, delay: float) -> None:
        self._timer = self.hub.clock.callLater(delay, self._check)

    def _check(self) -> None:
        """Every ping interval: a silent client is pinged, one still silent is dropped."""
        options = self.hub.options
        if not self.registered:
            self.disconnect("Registration timeout")
        elif self.lines_seen != self._seen_at_check:
            self._seen_at_check = self.lines_seen
            self._awaiting_pong = False
            self._schedule(options.ping_interval)
        elif not self._awaiting_pong:
            self._awaiting_pong = True
            self.write(_line(f"PING :{options.server_name}"))
            self._schedule(options.ping_timeout)
        else:
            self.disconnect(
                f"Ping timeout: {options.ping_interval + options.ping_timeout:g} seconds"
            )
        self.hub.flush_soon()

    def farewell(self, reason: str) -> bytes:
        return _line(f"ERROR :Closing Link: {self.host} ({reason})")

    # --- framing and replies ----------------------------------------------------------

    def line_received(self, line: str) -> None:
        text = line.lstrip(" ")  # trailing spaces may be a trailing parameter's own
        if not text:
            return
        self._tags = b""
        if text.startswith("@"):
            raw, _, text = text.partition(" ")
            text = text.lstrip(" ")
            if len(raw.encode()) > MAX_TAGS - 2:
                self.too_long()
                return
            self._tags = _client_tags(raw[1:])
        if len(text.encode()) > MAX_LINE - 2:
            self.too_long()
            return
        try:
            prefix, command, params = irc.parsemsg(text)
        except (ValueError, IndexError, irc.IRCBadMessage):
            return  # a lone prefix or lone tags: no command to answer
        command = command.upper()
        if not self.registered:
            if command not in _BEFORE_REGISTRATION:
                self.numeric(irc.ERR_NOTREGISTERED, "You have not registered")
                return
        elif _charged(command, params) and not self.hub.allow(self):
            # It waits for the allowance, unseen by the rules until it is handled.
            return
        rules = self.hub.rules
        if rules.event_rules:
            channel = params[0] if params and params[0][:1] in ("#", "&") else ""
            namespace = self.hub.namespace(self, channel or None)
            fired = rules.check(self.host, namespace, command=command, channel=channel)
            if fired is not None:
                self._ruled(fired, command, prefix, params, channel)
                return
        self.handleCommand(command, prefix, params)

    def _ruled(
        self, fired: Fired, command: str, prefix: str, params: list[str], channel: str
    ) -> None:
        """A rule's numeric or disconnect instead of the command, or the command after its acts."""
        acts = fired.acts
        numeric: tuple[int, str] | None = acts.get("numeric")
        reason: str | None = acts.get("disconnect")

        def answer() -> None:
            if reason is not None:
                self.disconnect(reason)
            elif numeric is not None:
                self.numeric(f"{numeric[0]:03d}", channel or command, numeric[1])
            self.hub.flush_soon()

        def proceed() -> None:
            self.handleCommand(command, prefix, params)
            self.hub.flush_soon()

        own = numeric is not None or reason is not None
        done = fired.act(self.transport, proceed, answer if own else None)
        if not done.called:
            self.hold(done)

    def too_long(self) -> None:
        self.numeric(ERR_INPUTTOOLONG, "Input line was too long")

    def sendLine(self, line: str) -> None:
        self.write(_line(line))

    def write(self, data: bytes) -> None:
        # One line at a time; a line that carries its own time (history) keeps it.
        if self.tag_profile & SERVER_TIME and not data.startswith(b"@time="):
            data = with_tags(server_time(self.hub.clock.seconds()), data)
        super().write(data)

    def numeric(self, code: str, *params: str) -> None:
        """A reply from the server to this client; the last parameter is the trailing one."""
        *middle, last = params
        self.sendCommand(code, [self.nick or "*", *middle, f":{last}"], self.server_name)

    def notify(self, text: str) -> None:
        self.sendCommand("NOTICE", [self.nick or "*", f":{text}"], self.server_name)

    def refuse(self, error: ChatError) -> None:
        code, text = _REFUSALS[error.reason]
        if not error.nick:
            self.numeric(code, error.name, text)
        elif error.reason in _NICK_FIRST:
            self.numeric(code, error.nick, error.name, text)
        else:
            self.numeric(code, error.name, error.nick, text)

    def irc_unknown(self, prefix: str, command: str, params: list[str]) -> None:
        self.numeric(irc.ERR_UNKNOWNCOMMAND, command, "Unknown command")

    def _enough(self, command: str, params: list[str], count: int = 1) -> bool:
        if len(params) < count or not params[0]:
            self.numeric(irc.ERR_NEEDMOREPARAMS, command, "Not enough parameters")
            return False
        return True

    # --- IRCv3 capabilities and SASL ----------------------------------------------------

    def _available(self) -> tuple[str, ...]:
        # SASL only where there are accounts to log in to.
        return tuple(c for c in _CAPABILITIES if c != "sasl" or self.hub.options.users)

    def irc_CAP(self, prefix: str, params: list[str]) -> None:
        sub = params[0].upper() if params else ""
        nick = self.nick or "*"
        if sub == "LS":
            # Registration waits for CAP END once a client has asked (IRCv3 302).
            self.negotiating = not self.registered
            version = params[1] if len(params) > 1 else ""
            values = version.isdigit() and int(version) >= 302
            offered = [
                f"{cap}=PLAIN" if cap == "sasl" and values else cap for cap in self._available()
            ]
            self.sendCommand("CAP", [nick, "LS", f":{' '.join(offered)}"], self.server_name)
        elif sub == "LIST":
            self.sendCommand(
                "CAP", [nick, "LIST", f":{' '.join(sorted(self.caps))}"], self.server_name
            )
        elif sub == "REQ":
            self.negotiating = not self.registered
            asked = params[1].split() if len(params) > 1 else []
            available = self._available()
            if not asked or not all(cap.removeprefix("-") in available for cap in asked):
                # All or nothing.
                self.sendCommand("CAP", [nick, "NAK", f":{' '.join(asked)}"], self.server_name)
                return
            # Acknowledged as things were: the changes apply from the next message on.
            self.sendCommand("CAP", [nick, "ACK", f":{' '.join(asked)}"], self.server_name)
            for cap in asked:
                if cap.startswith("-"):
                    self.caps.discard(cap[1:])
                else:
                    self.caps.add(cap)
            self.tag_profile = (SERVER_TIME if "server-time" in self.caps else 0) | (
                MESSAGE_TAGS if "message-tags" in self.caps else 0
            )
        elif sub == "END":
            self.negotiating = False
            self._try_register()
        else:
            self.numeric(ERR_INVALIDCAPCMD, sub or "*", "Invalid CAP command")

    def irc_AUTHENTICATE(self, prefix: str, params: list[str]) -> None:
        if "sasl" not in self.caps or not params or not params[0]:
            self.numeric("904", "SASL authentication failed")
            return
        if self.account is not None:
            self.numeric("907", "You have already authenticated using SASL")
            return
        if self._sasl_checking:
            self.numeric("904", "SASL authentication failed")  # one check at a time
            return
        argument = params[0]
        if argument == "*":
            self._sasl = None
            self.numeric("906", "SASL authentication aborted")
            return
        if self._sasl is None:
            if argument.upper() != "PLAIN":
                self.numeric("908", "PLAIN", "are available SASL mechanisms")
                self.numeric("904", "SASL authentication failed")
                return
            self._sasl = []
            self.write(_line("AUTHENTICATE +"))
            return
        if argument != "+":
            self._sasl.append(argument)
        if sum(map(len, self._sasl)) > _SASL_MOST:
            self._sasl = None
            self._sasl_failed("")
            return
        if len(argument) == _SASL_CHUNK:
            return  # more lines of the same response follow
        response, self._sasl = "".join(self._sasl), None
        try:
            authorize, name, password = base64.b64decode(response, validate=True).split(b"\0")
            account = name.decode("utf-8")
        except (binascii.Error, ValueError):
            self._sasl_failed("")
            return
        if authorize and authorize != name:
            self._sasl_failed(account)  # no logging in as someone else
            return
        read = self.hub.read_login(account)
        if read is None:
            self._sasl_failed(account)  # alice@: no namespace to log in to
            return
        self._sasl_checking = True
        self._sasl_checks += 1
        checked = self.hub.check_password(read[0], password)
        checked.addErrback(self._check_failed)
        checked.addCallback(self._sasl_checked, self._sasl_checks, *read)

    @staticmethod
    def _check_failed(reason: Failure) -> bool:
        _log.failure("chat: SASL password check failed", reason)
        return False

    def _sasl_checked(self, ok: bool, check: int, account: str, login: str | None = None) -> None:
        if check != self._sasl_checks:
            return  # aborted while the password was checked
        if self.gone:
            self._sasl_checking = False
            return
        if not ok:
            # Still "checking" until the answer: a guess sent meanwhile gets 904 at once.
            self.hub.clock.callLater(SASL_FAILURE_DELAY, self._sasl_refused, check, account)
            return
        self._sasl_checking = False
        self.account = account
        self.sasl_login = login
        nick = self.nick or self.wanted_nick or "*"
        mask = f"{nick}!{self.user or 'user'}@{self.host}"
        self.numeric("900", mask, account, f"You are now logged in as {account}")
        self.numeric("903", "SASL authentication successful")
        self.hub.emit(
            "chat.sasl", account=account, client=self.host, ok=True, **self.hub.stamp(self)
        )
        self.hub.flush_soon()

    def _sasl_refused(self, check: int, account: str) -> None:
        if check != self._sasl_checks:
            return
        self._sasl_checking = False
        if self.gone:
            return
        self._sasl_failed(account)
        self.hub.flush_soon()

    def _sasl_failed(self, account: str) -> None:
        self._sasl_failures += 1
        self.hub.stats.count("chat_sasl_failures")
        self.hub.emit("chat.sasl", account=account, client=self.host, ok=False)
        self.numeric("904", "SASL authentication failed")
        if self._sasl_failures >= _SASL_TRIES:
            self.disconnect("Too many failed SASL attempts")

    # --- registration -------------------------------------------------------------------

    def irc_PASS(self, prefix: str, params: list[str]) -> None:
        if self.registered:
            self.numeric(irc.ERR_ALREADYREGISTRED, "You may not reregister")
        elif self._enough("PASS", params):
            self.password_ok = params[0] == self.hub.options.password

    def irc_NICK(self, prefix: str, params: list[str]) -> None:
        if not params or not params[0]:
            self.numeric(irc.ERR_NONICKNAMEGIVEN, "No nickname given")
            return
        nick = params[0]
        try:
            if self.registered:
                if nick != self.nick:
                    self.hub.rename(self, nick)
                return
            nick, login = self.hub.read_nick(nick)
            self.hub.check_nick(nick, self)
        except ChatError as e:
            self.refuse(e)
            return
        self.wanted_nick, self.nick_login = nick, login
        self._try_register()

    def irc_USER(self, prefix: str, params: list[str]) -> None:
        if self.registered:
            self.numeric(irc.ERR_ALREADYREGISTRED, "You may not reregister")
        elif self._enough("USER", params, 4):
            read = self.hub.read_login(params[0])
            if read is None:
                self.numeric(ERR_INVALIDUSERNAME, params[0], _NO_NAMESPACE)
                return
            name, self.user_login = read
            self.user = "".join(c for c in name if c.isalnum() or c in "-_.")[:10] or "user"
            self.realname = params[3]
            self._try_register()

    def _try_register(self) -> None:
        if not (self.wanted_nick and self.user) or self.negotiating:
            return
        if not self.password_ok:
            self.numeric(irc.ERR_PASSWDMISMATCH, "Password incorrect")
            self.disconnect("Bad password")
            return
        if self._sasl is not None or self._sasl_checking:
            # IRCv3 sasl-3.1: registration completing ends an exchange under way.
            self._sasl = None
            self._sasl_checking = False
            self._sasl_checks += 1
            self.numeric("906", "SASL authentication aborted")
        try:
            self.hub.register(self, self.wanted_nick)
        except ChatError as e:
            self.refuse(e)
            return
        self._welcome()

    def _welcome(self) -> None:
        server = self.server_name
        created = self.hub.started
        self.numeric(irc.RPL_WELCOME, f"Welcome to the netd IRC network {self.prefix}")
        self.numeric(irc.RPL_YOURHOST, f"Your host is {server}, running version {VERSION}")
        self.numeric(irc.RPL_CREATED, f"This server was created {created:.0f}")
        self.sendCommand(
            irc.RPL_MYINFO, [self.nick, server, VERSION, "i", "biklmnotv", "bklov"], server
        )
        self.numeric(irc.RPL_ISUPPORT, *_ISUPPORT, "are supported by this server")
        self._lusers()
        self.irc_MOTD("", [])

    def _lusers(self) -> None:
        users = len(self.hub.users)
        self.numeric(irc.RPL_LUSERCLIENT, f"There are {users} users and 0 invisible on 1 servers")
        self.numeric(irc.RPL_LUSERCHANNELS, str(len(self.hub.rooms)), "channels formed")
        self.numeric(irc.RPL_LUSERME, f"I have {users} clients and 0 servers")

    def irc_MOTD(self, prefix: str, params: list[str]) -> None:
        motd = self.hub.options.motd
        if not motd:
            self.numeric(irc.ERR_NOMOTD, "MOTD File is missing")
            return
        self.numeric(irc.RPL_MOTDSTART, f"- {self.server_name} Message of the day - ")
        for line in motd.splitlines():
            self.numeric(irc.RPL_MOTD, f"- {line}")
        self.numeric(irc.RPL_ENDOFMOTD, "End of MOTD command")

    def irc_PING(self, prefix: str, params: list[str]) -> None:
        if not params:
            self.numeric(irc.ERR_NOORIGIN, "No origin specified")
            return
        self.sendCommand("PONG", [self.server_name, f":{params[-1]}"], self.server_name)

    def irc_PONG(self, prefix: str, params: list[str]) -> None:
        """Any line counts as a sign of life; the PONG needs nothing more."""

    def irc_QUIT(self, prefix: str, params: list[str]) -> None:
        reason = params[0] if params and params[0] else "Client quit"
        self.disconnect(f"Quit: {reason}")

    # --- rooms --------------------------------------------------------------------------

    def irc_JOIN(self, prefix: str, params: list[str]) -> None:
        if not self._enough("JOIN", params):
            return
        if params[0] == "0":
            for joined in list(self.rooms.values()):
                self.hub.part(self, joined.name, "Left all channels")
            return
        keys = params[1].split(",") if len(params) > 1 else []
        for index, name in enumerate(params[0].split(",")):
            if not name.startswith("#"):
                self.numeric(irc.ERR_NOSUCHCHANNEL, name, "No such channel")
                continue
            try:
                room = self.hub.join(self, name, keys[index] if index < len(keys) else "")
            except ChatError as e:
                self.refuse(e)
                continue
            if room is None:
                continue
            if room.topic:
                self.numeric(irc.RPL_TOPIC, f"#{room.name}", room.topic)
            self._names(room)
            self._replay(room)
            if self.away:
                self._tell_away(room.all_members())

    def _replay(self, room: Room) -> None:
        """The room's history, each line at its own time, in a batch for clients that asked."""
        if not room.history:
            return
        channel = f"#{room.name}"
        batch = b""
        if "batch" in self.caps:
            batch = f"h{next(self._batches)}".encode()
            self.write(_line(f":{self.server_name} BATCH +{batch.decode()} chathistory {channel}"))
        for when, nick, text in room.history:
            line = _line(f":{nick}!history@{self.server_name} PRIVMSG {channel} :{text}")
            if batch:
                line = with_tags(b"batch=" + batch, line)
            if self.tag_profile & SERVER_TIME:
                line = with_tags(server_time(when), line)
            self.write(line)
        if batch:
            self.write(_line(f":{self.server_name} BATCH -{batch.decode()}"))

    def _names(self, room: Room) -> None:
        # 353 lines of up to about 400 bytes, so a big room fits in 512-byte messages.
        channel = f"#{room.name}"
        batch: list[str] = []
        size = 0
        for nick in self._prefixed(room):
            if batch and size + len(nick) > 400:
                self.numeric(irc.RPL_NAMREPLY, "=", channel, " ".join(batch))
                batch, size = [], 0
            batch.append(nick)
            size += len(nick) + 1
        if batch:
            self.numeric(irc.RPL_NAMREPLY, "=", channel, " ".join(batch))
        self.numeric(irc.RPL_ENDOFNAMES, channel, "End of /NAMES list")

    def _prefixed(self, room: Room) -> list[str]:
        """Members as NAMES shows them: C{@} and C{+}, only the highest without multi-prefix."""
        every = "multi-prefix" in self.caps
        shown = []
        for member in sorted(room.all_members(), key=lambda m: fold(m.nick)):
            prefixes = room.prefixes(member)
            shown.append((prefixes if every else prefixes[:1]) + member.nick)
        return shown

    def irc_PART(self, prefix: str, params: list[str]) -> None:
        if not self._enough("PART", params):
            return
        reason = params[1] if len(params) > 1 else ""
        for name in params[0].split(","):
            try:
                self.hub.part(self, name, reason)
            except ChatError as e:
                self.refuse(e)

    def irc_NAMES(self, prefix: str, params: list[str]) -> None:
        if not params or not params[0]:
            for room in sorted(self.rooms.values(), key=lambda r: r.key):
                self._names(room)
            self.numeric(irc.RPL_ENDOFNAMES, "*", "End of /NAMES list")
            return
        for name in params[0].split(","):
            try:
                self._names(self.hub.find_room(name))
            except ChatError:
                self.numeric(irc.RPL_ENDOFNAMES, name, "End of /NAMES list")

    def irc_LIST(self, prefix: str, params: list[str]) -> None:
        wanted = None
        if params and params[0]:
            wanted = {fold(n.removeprefix("#")) for n in params[0].split(",")}
        self.numeric(irc.RPL_LISTSTART, "Channel", "Users  Name")
        for room in sorted(self.hub.rooms.values(), key=lambda r: r.key):
            if wanted is None or room.key in wanted:
                self.numeric(irc.RPL_LIST, f"#{room.name}", str(room.count), room.topic)
        self.numeric(irc.RPL_LISTEND, "End of /LIST")

    def irc_TOPIC(self, prefix: str, params: list[str]) -> None:
        if not self._enough("TOPIC", params):
            return
        try:
            room = self.hub.find_room(params[0])
            if len(params) > 1:
                self.hub.set_topic(self, params[0], params[1])
            elif room.topic:
                self.numeric(irc.RPL_TOPIC, f"#{room.name}", room.topic)
            else:
                self.numeric(irc.RPL_NOTOPIC, f"#{room.name}", "No topic is set")
        except ChatError as e:
            self.refuse(e)

    def irc_MODE(self, prefix: str, params: list[str]) -> None:
        if not self._enough("MODE", params):
            return
        target = params[0]
        if target.startswith("#"):
            self._channel_mode(target, params[1:])
        elif fold(target) not in self.hub.users:
            self.numeric(irc.ERR_NOSUCHNICK, target, "No such nick/channel")
        elif fold(target) != fold(self.nick):
            self.numeric(irc.ERR_USERSDONTMATCH, "Cannot change mode for other users")
        elif len(params) == 1:
            self.numeric(irc.RPL_UMODEIS, "+i" if self.invisible else "+")
        else:
            self._user_mode(params[1])

    def _channel_mode(self, name: str, changes: list[str]) -> None:
        try:
            room = self.hub.find_room(name)
        except ChatError as e:
            self.refuse(e)
            return
        channel = f"#{room.name}"
        if not changes:
            shown = room.mode_flags(with_key=room.key in self.rooms)
            self.sendCommand(irc.RPL_CHANNELMODEIS, [self.nick, channel, *shown], self.server_name)
            self.numeric("329", channel, f"{room.created:.0f}")
            return
        parsed = self._parse_modes(channel, changes)
        if parsed is None:
            return
        if parsed == [_BAN_LIST]:
            # A ban-list query ("MODE #c b", "+b" with no mask): open to anyone.
            for mask, setter, when in room.bans:
                self.numeric(irc.RPL_BANLIST, channel, mask, setter, f"{when:.0f}")
            self.numeric(irc.RPL_ENDOFBANLIST, channel, "End of channel ban list")
            return
        parsed = [change for change in parsed if change is not _BAN_LIST]
        if not parsed:
            return
        try:
            self.hub.change_modes(self, channel, parsed)
        except ChatError as e:
            self.refuse(e)

    def _parse_modes(self, channel: str, words: list[str]) -> list[ModeChange] | None:
        """
        C{+o-v alice bob}, as changes; None once an unknown mode was answered (472).
        A ban without a mask is the list query (L{_BAN_LIST}); another change that
        lacks its argument is answered 461, as ngircd does, and one past
        L{MAX_MODE_ARGUMENTS} is ignored.
        """
        flags, arguments = words[0], list(words[1:])
        changes: list[ModeChange] = []
        adding = True
        taken = 0
        for flag in flags:
            if flag in "+-":
                adding = flag == "+"
                continue
            if flag not in "biklmnotv":
                self.numeric(irc.ERR_UNKNOWNMODE, flag, "is unknown mode char to me")
                return None
            argument = None
            if flag == "b" and not arguments:
                if _BAN_LIST not in changes:
                    changes.append(_BAN_LIST)
                continue
            if flag == "k" and not adding:
                # The key's argument is taken when unset too (CHANMODES type B), unchecked.
                if arguments:
                    arguments.pop(0)
                changes.append(ModeChange(False, "k"))
                continue
            if flag in "bovk" or (flag == "l" and adding):
                if not arguments:
                    self.numeric(irc.ERR_NEEDMOREPARAMS, "MODE", "Not enough parameters")
                    continue
                if taken >= MAX_MODE_ARGUMENTS:
                    continue
                argument = arguments.pop(0)
                taken += 1
            if (
                flag == "l"
                and argument is not None
                and not (argument.isdigit() and 0 < int(argument) < 10**6)
            ):
                self.numeric("696", channel, "l", argument, "Invalid limit")
                continue
            if (
                flag == "k"
                and argument is not None
                and (not argument or any(c in argument for c in " ,:"))
            ):
                self.numeric("696", channel, "k", argument, "Invalid key")
                continue
            changes.append(ModeChange(adding, flag, argument))
        return changes

    def irc_KICK(self, prefix: str, params: list[str]) -> None:
        if not self._enough("KICK", params, 2):
            return
        reason = params[2] if len(params) > 2 else ""
        for nick in params[1].split(",")[:4]:
            try:
                self.hub.kick(self, params[0], nick, reason)
            except ChatError as e:
                self.refuse(e)

    def irc_INVITE(self, prefix: str, params: list[str]) -> None:
        if not self._enough("INVITE", params, 2):
            return
        try:
            target = self.hub.invite(self, params[0], params[1])
        except ChatError as e:
            self.refuse(e)
            return
        channel = f"#{self.hub.find_room(params[1]).name}"
        self.numeric(irc.RPL_INVITING, target.nick, channel)

    def _user_mode(self, change: str) -> None:
        # Only "invisible" exists, and it changes nothing here: no one is listed
        # outside the rooms they share anyway.
        adding = True
        for flag in change:
            if flag in "+-":
                adding = flag == "+"
            elif flag == "i":
                self.invisible = adding
            else:
                self.numeric(irc.ERR_UMODEUNKNOWNFLAG, "Unknown MODE flag")
                return
        self.write(_line(f":{self.prefix} MODE {self.nick} :{'+' if self.invisible else '-'}i"))

    # --- messages -----------------------------------------------------------------------

    def irc_PRIVMSG(self, prefix: str, params: list[str]) -> None:
        self._message(params, notice=False)

    def irc_NOTICE(self, prefix: str, params: list[str]) -> None:
        self._message(params, notice=True)

    def _message(self, params: list[str], notice: bool) -> None:
        command = "NOTICE" if notice else "PRIVMSG"
        if not params or not params[0]:
            if not notice:
                self.numeric(irc.ERR_NORECIPIENT, f"No recipient given ({command})")
            return
        if len(params) < 2 or not params[1]:
            if not notice:
                self.numeric(irc.ERR_NOTEXTTOSEND, "No text to send")
            return
        text = params[1]
        targets: dict[str, str] = {}
        for target in params[0].split(",")[:4]:
            targets.setdefault(fold(target), target)  # #a,#A is one message to #a
        for target in targets.values():
            try:
                if target.startswith("#"):
                    room = self.hub.say(self, target, text, notice, self._tags)
                    self._echo(f":{self.prefix} {command} #{room.name} :{text}")
                else:
                    user = self.hub.tell(self, target, text, notice, self._tags)
                    self._echo(f":{self.prefix} {command} {user.nick} :{text}")
                    if user.away and not notice:
                        self.numeric(irc.RPL_AWAY, user.nick, user.away)
            except ChatError as e:
                if notice:
                    continue  # RFC 2812 3.3.2: never an automatic reply to a NOTICE
                if e.reason == ChatError.NOT_IN_ROOM:
                    self.numeric(irc.ERR_CANNOTSENDTOCHAN, target, "Cannot send to channel")
                else:
                    self.refuse(e)

    def _echo(self, message: str) -> None:
        """echo-message: the client sees what it sent as the others do, tags and all."""
        if "echo-message" in self.caps:
            line = _line(message)
            self.write(with_tags(self._tags, line) if self.tag_profile & MESSAGE_TAGS else line)

    def irc_TAGMSG(self, prefix: str, params: list[str]) -> None:
        """A message of tags alone (typing notices, reactions), to clients that take tags."""
        if not self._enough("TAGMSG", params) or not self._tags:
            return
        target = params[0].split(",")[0]
        recipients: list[Session]
        try:
            if target.startswith("#"):
                room = self.hub.find_room(target)
                if room.key not in self.rooms:
                    self.numeric(irc.ERR_CANNOTSENDTOCHAN, target, "Cannot send to channel")
                    return
                target = f"#{room.name}"
                recipients = [m for m in room.all_members() if m is not self]
            else:
                user = self.hub.users.get(fold(target))
                if user is None:
                    raise ChatError(ChatError.NO_SUCH_NICK, target)
                target, recipients = user.nick, [user]
        except ChatError as e:
            self.refuse(e)
            return
        line = with_tags(self._tags, _line(f":{self.prefix} TAGMSG {target}"))
        for member in recipients:
            if member.tag_profile & MESSAGE_TAGS:
                member.write(line)
        if "echo-message" in self.caps and self.tag_profile & MESSAGE_TAGS:
            self.write(line)

    # --- who is who ---------------------------------------------------------------------

    def irc_WHO(self, prefix: str, params: list[str]) -> None:
        mask = params[0] if params else "*"
        if mask.startswith("#"):
            try:
                room = self.hub.find_room(mask)
            except ChatError:
                room = None
            members = list(room.all_members()) if room is not None else []
            channel = f"#{room.name}" if room is not None else mask
            for member in sorted(members, key=lambda m: fold(m.nick)):
                assert room is not None
                self._who_line(channel, member, room.prefixes(member))
        else:
            user = self.hub.users.get(fold(mask))
            if user is not None:
                first = next(iter(user.rooms.values()), None)
                self._who_line(f"#{first.name}" if first else "*", user)
        self.numeric(irc.RPL_ENDOFWHO, mask, "End of WHO list")

    def _who_line(self, channel: str, user: Session, prefixes: str = "") -> None:
        if "multi-prefix" not in self.caps:
            prefixes = prefixes[:1]
        self.numeric(
            irc.RPL_WHOREPLY,
            channel,
            user.user or "user",
            user.host,
            self.server_name,
            user.nick,
            ("G" if user.away else "H") + prefixes,
            f"0 {user.realname or user.nick}",
        )

    def irc_WHOIS(self, prefix: str, params: list[str]) -> None:
        if not params or not params[-1]:
            self.numeric(irc.ERR_NONICKNAMEGIVEN, "No nickname given")
            return
        for nick in params[-1].split(",")[:4]:
            user = self.hub.users.get(fold(nick))
            if user is None:
                self.numeric(irc.ERR_NOSUCHNICK, nick, "No such nick/channel")
            else:
                self.numeric(
                    irc.RPL_WHOISUSER,
                    user.nick,
                    user.user or "user",
                    user.host,
                    "*",
                    user.realname or user.nick,
                )
                if user.rooms:
                    every = "multi-prefix" in self.caps
                    channels = " ".join(
                        f"{r.prefixes(user) if every else r.prefixes(user)[:1]}#{r.name}"
                        for r in user.rooms.values()
                    )
                    self.numeric(irc.RPL_WHOISCHANNELS, user.nick, channels)
                self.numeric(
                    irc.RPL_WHOISSERVER, user.nick, self.server_name, f"netd ({user.protocol_name})"
                )
                if user.away:
                    self.numeric(irc.RPL_AWAY, user.nick, user.away)
            self.numeric(irc.RPL_ENDOFWHOIS, nick, "End of /WHOIS list")

    def irc_AWAY(self, prefix: str, params: list[str]) -> None:
        self.away = params[0][:TOPIC_LENGTH] if params else ""
        if self.away:
            self.numeric(irc.RPL_NOWAWAY, "You have been marked as being away")
        else:
            self.numeric(irc.RPL_UNAWAY, "You are no longer marked as being away")
        self._tell_away(m for room in self.rooms.values() for m in room.all_members())

    def _tell_away(self, members: Iterable[Session]) -> None:
        """away-notify: this user's away state, to the others that asked for it."""
        line = _line(f":{self.prefix} AWAY :{self.away}" if self.away else f":{self.prefix} AWAY")
        told: set[Session] = {self}
        for member in members:
            if member not in told and isinstance(member, IrcSession):
                told.add(member)
                if "away-notify" in member.caps:
                    member.write(line)

    def irc_USERHOST(self, prefix: str, params: list[str]) -> None:
        if not self._enough("USERHOST", params):
            return
        replies = []
        for nick in params[:5]:
            user = self.hub.users.get(fold(nick))
            if user is not None:
                state = "-" if user.away else "+"
                replies.append(f"{user.nick}={state}{user.user or 'user'}@{user.host}")
        self.numeric(irc.RPL_USERHOST, " ".join(replies))

    def irc_LUSERS(self, prefix: str, params: list[str]) -> None:
        self._lusers()

    def irc_ISON(self, prefix: str, params: list[str]) -> None:
        asked = dict.fromkeys(fold(n) for n in " ".join(params).split())
        present = [self.hub.users[n].nick for n in asked if n in self.hub.users]
        self.numeric(irc.RPL_ISON, " ".join(present))
