"""
The IRC side of the chat kind: the RFC 2812 subset ordinary clients and bots use.

L{twisted.words.protocols.irc.IRC} supplies the message parser, the command
dispatch (C{irc_COMMAND} methods) and the numerics; netd replaces its framing,
which decodes each read as strict UTF-8 (one stray byte raised out of
C{dataReceived}) and allowed 16 KiB lines, with bytes framing at 512 bytes.
"""

from __future__ import annotations

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.words.protocols import irc

from netd.rules import Fired
from netd.services.chat.hub import (
    MAX_ROOMS_PER_USER,
    NICK_LENGTH,
    ROOM_LENGTH,
    TOPIC_LENGTH,
    ChatError,
    Hub,
    Room,
    Session,
    Wire,
    fold,
)

__all__ = ["IrcSession", "IrcWire"]

# RFC 2812 2.3: 512 bytes a message, CRLF included.
MAX_LINE = 512
VERSION = "netd-chat-1"
# From the modern IRC client protocol, not RFC 2812.
ERR_INPUTTOOLONG = "417"
ERR_INVALIDCAPCMD = "410"
_ISUPPORT = (
    "CASEMAPPING=ascii",
    "CHANTYPES=#",
    "CHANMODES=b,,,nt",
    "PREFIX=(ov)@+",
    f"NICKLEN={NICK_LENGTH}",
    f"CHANNELLEN={ROOM_LENGTH + 1}",
    f"TOPICLEN={TOPIC_LENGTH}",
    "MAXTARGETS=4",
    f"CHANLIMIT=#:{MAX_ROOMS_PER_USER}",
    "NETWORK=netd",
)
# Commands a client may send before it has registered.
_BEFORE_REGISTRATION = frozenset({"CAP", "PASS", "NICK", "USER", "PING", "PONG", "QUIT"})


def _line(text: str) -> bytes:
    """One outgoing message, cut to fit 512 bytes without splitting a character."""
    data = text.encode("utf-8")
    if len(data) > MAX_LINE - 2:
        data = data[: MAX_LINE - 2].decode("utf-8", "ignore").encode("utf-8")
    return data + b"\r\n"


class IrcWire(Wire):
    """Hub happenings as IRC messages; one instance serves every IRC session of a hub."""

    def __init__(self, server_name: str) -> None:
        self.server_name = server_name

    def room_message(self, sender: Session, room: Room, text: str, notice: bool) -> bytes:
        verb = "NOTICE" if notice else "PRIVMSG"
        return _line(f":{sender.prefix} {verb} #{room.name} :{text}")

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

    def private(self, sender: Session, target: Session, text: str, notice: bool) -> bytes:
        verb = "NOTICE" if notice else "PRIVMSG"
        return _line(f":{sender.prefix} {verb} {target.nick} :{text}")


_REFUSALS = {
    ChatError.NICK_IN_USE: (irc.ERR_NICKNAMEINUSE, "Nickname is already in use"),
    ChatError.BAD_NICK: (irc.ERR_ERRONEUSNICKNAME, "Erroneous nickname"),
    ChatError.BAD_ROOM: (irc.ERR_NOSUCHCHANNEL, "No such channel"),
    ChatError.NO_CREATE: (irc.ERR_NOSUCHCHANNEL, "No such channel (cannot create channels)"),
    ChatError.NOT_IN_ROOM: (irc.ERR_NOTONCHANNEL, "You're not on that channel"),
    ChatError.NO_SUCH_NICK: (irc.ERR_NOSUCHNICK, "No such nick/channel"),
    ChatError.TOO_MANY_ROOMS: (irc.ERR_TOOMANYCHANNELS, "You have joined too many channels"),
}


class IrcSession(Session, irc.IRC):
    """One IRC client."""

    protocol_name = "irc"

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
        text = line.strip(" ")
        if not text:
            return
        try:
            prefix, command, params = irc.parsemsg(text)
        except (ValueError, IndexError):
            return  # a lone prefix: nothing to answer
        command = command.upper()
        if not self.registered and command not in _BEFORE_REGISTRATION:
            self.numeric(irc.ERR_NOTREGISTERED, "You have not registered")
            return
        rules = self.hub.rules
        if rules.event_rules:
            channel = params[0] if params and params[0][:1] in ("#", "&") else ""
            fired = rules.check(self.host, command=command, channel=channel)
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
        fired.act(self.transport, proceed, answer if own else None)

    def too_long(self) -> None:
        self.numeric(ERR_INPUTTOOLONG, "Input line was too long")

    def sendLine(self, line: str) -> None:
        self.write(_line(line))

    def numeric(self, code: str, *params: str) -> None:
        """A reply from the server to this client; the last parameter is the trailing one."""
        *middle, last = params
        self.sendCommand(code, [self.nick or "*", *middle, f":{last}"], self.server_name)

    def notify(self, text: str) -> None:
        self.sendCommand("NOTICE", [self.nick or "*", f":{text}"], self.server_name)

    def refuse(self, error: ChatError) -> None:
        code, text = _REFUSALS[error.reason]
        self.numeric(code, error.name, text)

    def irc_unknown(self, prefix: str, command: str, params: list[str]) -> None:
        self.numeric(irc.ERR_UNKNOWNCOMMAND, command, "Unknown command")

    def _enough(self, command: str, params: list[str], count: int = 1) -> bool:
        if len(params) < count or not params[0]:
            self.numeric(irc.ERR_NEEDMOREPARAMS, command, "Not enough parameters")
            return False
        return True

    # --- registration -------------------------------------------------------------------

    def irc_CAP(self, prefix: str, params: list[str]) -> None:
        # No capabilities: answer the listing and refuse requests, so IRCv3
        # clients finish negotiation at once.
        sub = params[0].upper() if params else ""
        if sub == "LS":
            self.negotiating = not self.registered
            self.sendCommand("CAP", [self.nick or "*", "LS", ":"], self.server_name)
        elif sub == "LIST":
            self.sendCommand("CAP", [self.nick or "*", "LIST", ":"], self.server_name)
        elif sub == "REQ":
            self.sendCommand(
                "CAP", [self.nick or "*", "NAK", f":{' '.join(params[1:])}"], self.server_name
            )
        elif sub == "END":
            self.negotiating = False
            self._try_register()
        else:
            self.numeric(ERR_INVALIDCAPCMD, sub or "*", "Invalid CAP command")

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
            self.hub.check_nick(nick, self)
        except ChatError as e:
            self.refuse(e)
            return
        self.wanted_nick = nick
        self._try_register()

    def irc_USER(self, prefix: str, params: list[str]) -> None:
        if self.registered:
            self.numeric(irc.ERR_ALREADYREGISTRED, "You may not reregister")
        elif self._enough("USER", params, 4):
            self.user = "".join(c for c in params[0] if c.isalnum() or c in "-_.")[:10] or "user"
            self.realname = params[3]
            self._try_register()

    def _try_register(self) -> None:
        if not (self.wanted_nick and self.user) or self.negotiating:
            return
        if not self.password_ok:
            self.numeric(irc.ERR_PASSWDMISMATCH, "Password incorrect")
            self.disconnect("Bad password")
            return
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
        self.sendCommand(irc.RPL_MYINFO, [self.nick, server, VERSION, "i", "bnt"], server)
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
        for name in params[0].split(","):
            if not name.startswith("#"):
                self.numeric(irc.ERR_NOSUCHCHANNEL, name, "No such channel")
                continue
            try:
                room = self.hub.join(self, name)
            except ChatError as e:
                self.refuse(e)
                continue
            if room is None:
                continue
            if room.topic:
                self.numeric(irc.RPL_TOPIC, f"#{room.name}", room.topic)
            self._names(room)
            for _, nick, text in room.history:
                self.write(
                    _line(f":{nick}!history@{self.server_name} PRIVMSG #{room.name} :{text}")
                )

    def _names(self, room: Room) -> None:
        # 353 lines of up to about 400 bytes, so a big room fits in 512-byte messages.
        channel = f"#{room.name}"
        batch: list[str] = []
        size = 0
        for nick in room.nicks():
            if batch and size + len(nick) > 400:
                self.numeric(irc.RPL_NAMREPLY, "=", channel, " ".join(batch))
                batch, size = [], 0
            batch.append(nick)
            size += len(nick) + 1
        if batch:
            self.numeric(irc.RPL_NAMREPLY, "=", channel, " ".join(batch))
        self.numeric(irc.RPL_ENDOFNAMES, channel, "End of /NAMES list")

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
            self.numeric(irc.RPL_CHANNELMODEIS, channel, "+nt")
            self.numeric("329", channel, f"{self.hub.started:.0f}")
        elif changes[0].lstrip("+") == "b":
            self.numeric(irc.RPL_ENDOFBANLIST, channel, "End of channel ban list")
        else:
            self.numeric(irc.ERR_CHANOPRIVSNEEDED, channel, "You're not channel operator")

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
        if not self.hub.allow(self):
            return
        text = params[1]
        for target in params[0].split(",")[:4]:
            try:
                if target.startswith("#"):
                    self.hub.say(self, target, text, notice)
                else:
                    user = self.hub.tell(self, target, text, notice)
                    if user.away and not notice:
                        self.numeric(irc.RPL_AWAY, user.nick, user.away)
            except ChatError as e:
                if notice:
                    continue  # RFC 2812 3.3.2: never an automatic reply to a NOTICE
                if e.reason == ChatError.NOT_IN_ROOM:
                    self.numeric(irc.ERR_CANNOTSENDTOCHAN, target, "Cannot send to channel")
                else:
                    self.refuse(e)

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
                self._who_line(channel, member)
        else:
            user = self.hub.users.get(fold(mask))
            if user is not None:
                first = next(iter(user.rooms.values()), None)
                self._who_line(f"#{first.name}" if first else "*", user)
        self.numeric(irc.RPL_ENDOFWHO, mask, "End of WHO list")

    def _who_line(self, channel: str, user: Session) -> None:
        self.numeric(
            irc.RPL_WHOREPLY,
            channel,
            user.user or "user",
            user.host,
            self.server_name,
            user.nick,
            "G" if user.away else "H",
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
                    channels = " ".join(f"#{r.name}" for r in user.rooms.values())
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

    def irc_USERHOST(self, prefix: str, params: list[str]) -> None:
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
        present = [
            self.hub.users[fold(n)].nick
            for n in " ".join(params).split()
            if fold(n) in self.hub.users
        ]
        self.numeric(irc.RPL_ISON, " ".join(present))
