"""
The chat hub: rooms, users, history and flood control, independent of any wire
protocol.

Each connection is a L{Session}; its protocol (IRC, line) supplies a L{Wire} that
turns hub happenings into bytes.  A room message is encoded once per wire and the
same bytes are written to every member that speaks it, in one pass.
"""

from __future__ import annotations

import itertools
import re
import string
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import attrs
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from netd import passwords
from netd.events import ServiceStats
from netd.kinds import RunInThread
from netd.namespaces import NO_NAMESPACES, Namespacing, split_login
from netd.namespaces import key as namespace_key
from netd.records import Record
from netd.rules import RuleSet

__all__ = [
    "ChannelPrefix",
    "ChatError",
    "Flood",
    "Hub",
    "LineFramer",
    "Options",
    "Room",
    "Session",
    "Wire",
    "clean",
    "fold",
]

NICK_LENGTH = 30
ROOM_LENGTH = 32
TOPIC_LENGTH = 300
MAX_ROOMS_PER_USER = 20
MAX_BANS = 100
# RFC 2812 2.3.1: a letter or "special" first, then letters, digits, specials and "-".
_NICK = re.compile(r"[A-Za-z\[\]\\`_^{|}][A-Za-z0-9\[\]\\`_^{|}-]*\Z")
_ROOM = re.compile(r"[A-Za-z0-9_.-]+\Z")
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
# Output a client that has stopped reading may still queue (beyond the transport's
# own buffer) before it is dropped; a room must not hold memory for its slowest member.
MAX_BACKLOG = 256 * 1024
# Lines beyond the flood allowance wait for it, as IRC servers delay a flood
# (InspIRCd's fakelag, ircd-hybrid's and ngircd's penalties); a client with more
# than this waiting (InspIRCd's recvq) is cut off with "Excess Flood".
MAX_QUEUED = 8 * 1024
# What a line dropped as too long weighs there: none of its bytes wait, only
# its answer (IRC's 417), about this long.
_DROPPED_LINE_WEIGHT = 64


def fold(name: str) -> str:
    """
    The key two nicks or room names share when they differ only in case: A-Z
    only (CASEMAPPING=ascii), where str.lower() would make the Kelvin sign
    reach "karen".
    """
    return name.translate(_ASCII_LOWER)


def valid_nick(nick: str) -> bool:
    return len(nick) <= NICK_LENGTH and _NICK.match(nick) is not None


def room_key(name: str) -> str | None:
    """The hub's key for a room written C{#name} or C{name}, or None when not valid."""
    bare = name[1:] if name.startswith("#") else name
    if not bare or len(bare) > ROOM_LENGTH or _ROOM.match(bare) is None:
        return None
    return fold(bare)


@attrs.frozen(repr=False)
class ChannelPrefix(Record):
    """
    C{channel_prefix}: the label before the first C{-} of a room's name,
    C{#t42-room} -> C{t42}; what the hub carries as C{channel} is a name, or
    a session's room names (the first that yields a key wins).
    """

    def __call__(self, carried: Mapping[str, Any]) -> str | None:
        names = carried.get("channel")
        for name in [names] if isinstance(names, str) else names or ():
            label, dash, _ = name.removeprefix("#").partition("-")
            found = namespace_key(label) if dash else None
            if found is not None:
                return found
        return None


@attrs.frozen(repr=False)
class FloodLimit(Record):
    messages: int = 10
    per_seconds: float = 5.0


@attrs.frozen(repr=False)
class Options(Record):
    server_name: str = "chat.netd.test"
    rooms: tuple[str, ...] = ("lobby",)
    create_rooms: bool = True
    motd: str = ""
    history: int = 20
    flood: FloodLimit = attrs.field(factory=FloodLimit)
    password: str | None = None
    # SASL PLAIN accounts of IRC clients: name to password, in clear or hashed.
    users: Mapping[str, str] = attrs.field(factory=dict)
    ping_interval: float = 120.0
    ping_timeout: float = 60.0


class ChatError(Exception):
    """A request the hub refuses; C{reason} is one of the class constants."""

    NICK_IN_USE = "nick in use"
    BAD_NICK = "erroneous nick"
    BAD_ROOM = "no such room"
    NO_CREATE = "rooms cannot be created"
    NOT_IN_ROOM = "not in room"
    NO_SUCH_NICK = "no such nick"
    TOO_MANY_ROOMS = "too many rooms"
    NOT_OPERATOR = "not operator"
    CANNOT_SEND = "cannot send"
    BANNED = "banned"
    INVITE_ONLY = "invite only"
    BAD_KEY = "bad key"
    FULL = "full"
    THEY_ARE_NOT_IN_ROOM = "they are not in room"
    ALREADY_IN_ROOM = "already in room"
    BAN_LIST_FULL = "ban list full"

    def __init__(self, reason: str, name: str, nick: str = "") -> None:
        super().__init__(reason, name, nick)
        self.reason = reason
        self.name = name
        # The other user a refusal is about (KICK, INVITE, MODE +o of someone absent).
        self.nick = nick


def ban_mask(mask: str) -> str:
    """C{mask} completed to C{nick!user@host} as IRC servers do (C{bob} is C{bob!*@*})."""
    if "!" not in mask and "@" not in mask:
        return f"{mask}!*@*"
    if "!" not in mask:
        return f"*!{mask}"
    if "@" not in mask:
        return f"{mask}@*"
    return mask


def mask_matches(mask: str, prefix: str) -> bool:
    """
    Whether C{prefix} (C{nick!user@host}) matches the ban C{mask}; C{*} and C{?} are wild.

    A star only ever resumes from the last one seen, so a mask costs at most
    len(mask) x len(prefix) steps: a regular expression of many stars
    backtracks exponentially, and any client may set a ban.
    """
    mask, prefix = fold(mask), fold(prefix)
    m = p = 0  # the next character of each
    star = -1  # the mask just after its last star seen, if any
    star_p = 0  # where that star's match ends in the prefix so far
    while p < len(prefix):
        if m < len(mask) and mask[m] == "*":
            m += 1
            star, star_p = m, p
        elif m < len(mask) and mask[m] in ("?", prefix[p]):
            m += 1
            p += 1
        elif star >= 0:
            star_p += 1  # the star takes one character more
            m, p = star, star_p
        else:
            return False
    return not mask[m:].strip("*")


@attrs.frozen(repr=False)
class ModeChange(Record):
    """One channel mode change: C{+o nick}, C{-k}, C{+b mask}..."""

    adding: bool
    mode: str
    argument: str | None = None


@attrs.define(eq=False, repr=False)
class Flood(Record):
    """
    A token bucket: C{messages} at once, refilled over C{per_seconds}.
    """

    limit: FloodLimit
    clock: Any
    tokens: float = attrs.field(init=False)
    updated: float = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.tokens = float(self.limit.messages)
        self.updated = self.clock.seconds()

    @property
    def rate(self) -> float:
        return self.limit.messages / self.limit.per_seconds

    def spend(self) -> bool:
        now = self.clock.seconds()
        self.tokens = min(self.limit.messages, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        # A token due within a microsecond is there: a line that waited L{wait}
        # for it must not wait again because the clock's floats rounded its time.
        if self.tokens < 1 - self.rate * 1e-6:
            return False
        self.tokens = max(0.0, self.tokens - 1)
        return True

    def wait(self) -> float:
        """Seconds until the next token, as of the last L{spend}."""
        return (1 - self.tokens) / self.rate


@attrs.define(eq=False, repr=False)
class LineFramer(Record):
    """
    Splits a byte stream into lines of at most C{limit} bytes, CRLF included.

    A longer line is dropped whole, L{None} in its place among the lines (once,
    where it began), and the partial line kept between reads never grows past
    the limit.
    """

    limit: int
    buffer: bytes = b""
    discarding: bool = False

    def feed(self, data: bytes) -> list[bytes | None]:
        *complete, rest = (self.buffer + data).split(b"\n")
        lines: list[bytes | None] = []
        for line in complete:
            if self.discarding:
                self.discarding = False
            elif len(line) + 1 > self.limit:
                lines.append(None)
            else:
                lines.append(line.rstrip(b"\r"))
        self.buffer = rest
        if len(rest) + 1 > self.limit:
            if not self.discarding:
                lines.append(None)
            self.discarding = True
            self.buffer = b""
        return lines


def _weight(line: bytes | None) -> int:
    """What a queued line counts for against MAX_QUEUED."""
    return _DROPPED_LINE_WEIGHT if line is None else len(line)


def clean(line: bytes) -> str:
    """Text of a received line: undecodable bytes replaced, control characters dropped."""
    text = line.decode("utf-8", "replace")
    if text.isprintable():
        return text
    # IRC formatting (bold, colours) and CTCP's \x01 are kept.
    return "".join(c for c in text if c.isprintable() or c in "\x01\x02\x03\x0f\x16\x1d\x1f")


class Wire(ABC):
    """How one protocol says what happens in the hub; each method returns bytes to send."""

    @abstractmethod
    def room_message(self, sender: Session, room: Room, text: str, notice: bool) -> bytes:
        """Room message, in this wire's words."""

    def deliver(
        self,
        members: Mapping[Session, None],
        sender: Session,
        room: Room,
        text: str,
        notice: bool,
        tags: bytes = b"",
    ) -> None:
        """
        Queue one room message for these members of the room (never for C{sender}).

        @param tags: the client's own message tags (IRCv3 C{+name=value;...}), for
            wires that carry them.
        """
        data = self.room_message(sender, room, text, notice)
        # The hot loop of fan-out: one append per member; the hub marks them for flushing.
        for member in members:
            if member is not sender:
                member.out.append(data)

    @abstractmethod
    def joined(self, user: Session, room: Room) -> bytes:
        """Joined, in this wire's words."""

    @abstractmethod
    def parted(self, user: Session, room: Room, reason: str) -> bytes:
        """Parted, in this wire's words."""

    @abstractmethod
    def quit(self, user: Session, reason: str) -> bytes:
        """Quit, in this wire's words."""

    @abstractmethod
    def renamed(self, user: Session, old_prefix: str, old_nick: str) -> bytes:
        """Renamed, in this wire's words."""

    @abstractmethod
    def topic(self, user: Session, room: Room) -> bytes:
        """Topic, in this wire's words."""

    @abstractmethod
    def kicked(self, kicker: Session, room: Room, target: Session, reason: str) -> bytes:
        """Kicked, in this wire's words."""

    @abstractmethod
    def modes(self, user: Session, room: Room, changes: list[ModeChange]) -> bytes:
        """Channel modes changed, in this wire's words."""

    @abstractmethod
    def invited(self, inviter: Session, target: Session, room: Room) -> bytes:
        """An invitation to the target, in this wire's words."""

    @abstractmethod
    def private(
        self, sender: Session, target: Session, text: str, notice: bool, tags: bytes = b""
    ) -> bytes:
        """Private, in this wire's words (C{tags} as for L{deliver})."""


@attrs.define(eq=False, repr=False)
class Room(Record):
    name: str
    history: deque[tuple[float, str, str]]
    created: float = 0.0
    topic: str = ""
    # Members by wire, so a message is encoded once per wire.
    members: dict[Wire, dict[Session, None]] = attrs.field(factory=dict)
    count: int = 0
    operators: set[Session] = attrs.field(factory=set)
    voiced: set[Session] = attrs.field(factory=set)
    # Channel modes (+i, +m, +n, +t, +k, +l) and bans (mask, set by, when).
    invite_only: bool = False
    moderated: bool = False
    no_outside: bool = True
    topic_locked: bool = True
    join_key: str | None = None
    limit: int | None = None
    bans: list[tuple[str, str, float]] = attrs.field(factory=list)
    invited: set[str] = attrs.field(factory=set)

    def mode_flags(self, with_key: bool) -> tuple[str, ...]:
        """C{+flags} and their arguments, the key shown only to members (C{with_key})."""
        flags = "".join(
            flag
            for flag, on in (
                ("i", self.invite_only),
                ("m", self.moderated),
                ("n", self.no_outside),
                ("t", self.topic_locked),
                ("k", self.join_key is not None),
                ("l", self.limit is not None),
            )
            if on
        )
        arguments = []
        if self.join_key is not None:
            arguments.append(self.join_key if with_key else "*")
        if self.limit is not None:
            arguments.append(str(self.limit))
        return ("+" + flags, *arguments)

    def prefixes(self, member: Session) -> str:
        """C{@} for an operator, C{+} for a voiced member, both in that order."""
        return ("@" if member in self.operators else "") + ("+" if member in self.voiced else "")

    def banned(self, session: Session) -> bool:
        return any(mask_matches(mask, session.prefix) for mask, _, _ in self.bans)

    @property
    def key(self) -> str:
        return fold(self.name)

    def all_members(self) -> Iterator[Session]:
        for group in list(self.members.values()):
            yield from list(group)

    def nicks(self) -> list[str]:
        return sorted((m.nick for m in self.all_members()), key=fold)


@implementer(IPushProducer)
class Session(Protocol, ABC):
    """
    One connected user, whatever its protocol; the protocols subclass it.

    It registers itself as the transport's producer only to learn when the
    client stops reading: then further output is counted, and past
    L{MAX_BACKLOG} the client is cut off rather than slowing its rooms.
    """

    wire: Wire
    transport: Any
    protocol_name = ""
    # RFC 2812's 512 bytes a line, CRLF included, for both protocols.
    max_line = 512

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.nick = ""
        self.user = ""
        self.realname = ""
        self.away = ""
        self.host = ""
        # A nick given as bob@t42 (namespace_from: login): registered as bob.
        self.nick_login: str | None = None
        self.rooms: dict[str, Room] = {}
        self.flood = Flood(hub.options.flood, hub.clock)
        self.connected_at = hub.clock.seconds()
        self.backlog = 0
        self.paused = False
        self.gone = False
        self.lines_seen = 0
        # Lines received and not yet handled, in order, and their bytes: while a
        # rule holds the session (its delay) or the flood allowance is spent.
        # None is a line dropped as too long, answered in its turn.
        self.queue: deque[bytes | None] = deque()
        self.queued = 0
        self.held = False
        self.flood_wait: IDelayedCall | None = None
        # Told of its flood once per burst: until its queue has drained.
        self.flooding = False
        # The line being handled: first in the queue again if it must wait.
        self._line = b""
        # The IRCv3 tags this client takes (see netd.services.chat.irc); 0 for none.
        self.tag_profile = 0
        # Output waits here until the hub flushes, so the messages of one
        # reactor turn cost each member one transport write, not one per message.
        self.out: list[bytes] = []
        self._framer = LineFramer(self.max_line)

    @property
    def prefix(self) -> str:
        return f"{self.nick}!{self.user or 'user'}@{self.host}"

    @property
    def login(self) -> str | None:
        """The login naming the session's namespace (C{bob@t42}), if one does."""
        return self.nick_login

    @property
    def registered(self) -> bool:
        return bool(self.nick) and self.hub.users.get(fold(self.nick)) is self

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.host = getattr(peer, "host", None) or "localhost"
        self.transport.registerProducer(self, True)
        self.hub.connected(self)

    def makeConnection(self, transport: Any) -> None:
        super().makeConnection(transport)
        self.hub.flush_soon()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.gone = True
        self.queue.clear()
        if self.flood_wait is not None and self.flood_wait.active():
            self.flood_wait.cancel()
        self.hub.leave(self, "Connection closed")
        self.hub.flush_soon()

    def dataReceived(self, data: bytes) -> None:
        lines = self._framer.feed(data)
        self.queue.extend(lines)
        self.queued += sum(map(_weight, lines))
        self._take()
        # Reading goes on while the flood allowance refills, as IRC servers
        # read into their receive queue; only a rule's hold stops it.
        if self.flood_wait is not None and self.queued > MAX_QUEUED:
            self.hub.excess_flood(self)

    def _take(self) -> None:
        """Handle the queued lines, in order, until one must wait."""
        queue = self.queue
        while queue and not (self.gone or self.held or self.flood_wait):
            line = queue.popleft()
            self.queued -= _weight(line)
            if line is None:
                self.too_long()
                continue
            self._line = line
            self.lines_seen += 1
            self.line_received(clean(line))
        if not queue and self.flood_wait is None:
            self.flooding = False
        self.hub.flush_soon()

    def hold(self, until: Deferred[None]) -> None:
        """
        Take the lines after this one only once C{until} fires (a rule's
        answer, after its delay), so they are answered in order; never if it
        does not (a stall), and meanwhile read nothing more.
        """
        self.held = True
        self.transport.pauseProducing()
        until.addCallback(self._release)

    def _release(self, result: object) -> None:
        self.held = False
        if not self.gone:
            self.transport.resumeProducing()
            self._take()

    def wait_for_allowance(self) -> None:
        """
        Take the line being handled again, and the lines after it, once the
        flood allowance has a message for it; the client is read meanwhile.
        """
        self.queue.appendleft(self._line)
        self.queued += len(self._line)
        self.flood_wait = self.hub.clock.callLater(self.flood.wait(), self._allowed)

    def _allowed(self) -> None:
        self.flood_wait = None
        self._take()

    @abstractmethod
    def line_received(self, line: str) -> None:
        """One line from the client, cleaned, in this protocol's syntax."""

    def kicked_out(self, room: Room) -> None:
        """Put out of C{room} by an operator, after the kick was announced to it."""

    @abstractmethod
    def too_long(self) -> None:
        """A line over L{max_line} was dropped: tell the client."""

    def write(self, data: bytes) -> None:
        """Queue C{data}; it reaches the transport when the hub flushes."""
        if not self.gone:
            self.out.append(data)
            self.hub.dirty[self] = None

    def flush(self) -> None:
        if self.gone or not self.out:
            self.out.clear()
            return
        data = b"".join(self.out)
        self.out.clear()
        if self.paused:
            self.backlog += len(data)
            if self.backlog > MAX_BACKLOG:
                self.hub.dropped_slow(self)
                self.drop()
                return
        self.transport.write(data)

    def drop(self) -> None:
        """Cut the connection now, discarding whatever it has not read."""
        self.gone = True
        self.hub.leave(self, "Send queue exceeded")
        self.transport.abortConnection()

    # IPushProducer: the transport's verdict on whether the client keeps up.
    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self.backlog = 0

    def stopProducing(self) -> None:
        self.paused = False

    @abstractmethod
    def notify(self, text: str) -> None:
        """A message from the server to this user (a refusal, a flood warning)."""

    @abstractmethod
    def farewell(self, reason: str) -> bytes:
        """The last words to a client being disconnected."""

    def disconnect(self, reason: str) -> None:
        """Say why and close once the reason is sent."""
        if self.gone:
            return
        self.hub.leave(self, reason)
        self.write(self.farewell(reason))
        # Only this session's output must precede the close; the others' (its
        # quit) waits for the turn's flush, so closing n users is not n x n writes.
        self.flush()
        self.hub.flush_soon()
        self.gone = True
        # A paused transport with a producer would wait for it to resume
        # instead of closing once its buffer is sent.
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def close_gracefully(self) -> None:
        """Called by netd on idle timeout, reload and shutdown."""
        self.disconnect("Closed by the server")

    def describe(self) -> dict[str, Any]:
        return {
            "nick": self.nick,
            "protocol": self.protocol_name,
            "client": self.host,
            "rooms": sorted(room.name for room in self.rooms.values()),
            "away": self.away or None,
            "since": self.connected_at,
            **self.hub.stamp(self),
        }


@attrs.define(eq=False, repr=False)
class Hub(Record):
    """Every room and user of one chat service."""

    options: Options
    clock: Any
    stats: ServiceStats
    emit: Callable[..., None]
    # Messages are the one event frequent enough to cost when nobody reads the journal.
    journal_active: Callable[[], bool] = lambda: True
    rules: RuleSet = attrs.field(factory=RuleSet)
    # Password hashes are checked here (bcrypt is slow on purpose): a thread pool.
    run_in_thread: RunInThread = maybeDeferred
    # namespace_from (netd.namespaces): stamped on events and view entries.
    namespaces: Namespacing = NO_NAMESPACES
    rooms: dict[str, Room] = attrs.field(init=False, factory=dict)
    users: dict[str, Session] = attrs.field(init=False, factory=dict)
    sessions: dict[Session, None] = attrs.field(init=False, factory=dict)
    # Sessions with output queued since the last flush.
    dirty: dict[Session, None] = attrs.field(init=False, factory=dict)
    _flush_call: Any = attrs.field(init=False, default=None)
    started: float = attrs.field(init=False)
    permanent: frozenset[str] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.started = self.clock.seconds()
        for name in self.options.rooms:
            self._create(name)
        self.permanent = frozenset(self.rooms)
        self._gauges()

    def _create(self, name: str) -> Room:
        bare = name.removeprefix("#")
        room = Room(bare, deque(maxlen=self.options.history), self.clock.seconds())
        self.rooms[room.key] = room
        return room

    def _gauges(self) -> None:
        self.stats.gauge("chat_users", len(self.users))
        self.stats.gauge("chat_rooms", len(self.rooms))

    # --- connections and nicks -------------------------------------------------

    def flush_soon(self) -> None:
        """
        Flush once the reactor has handled every read of this turn.

        The reactor runs due timed calls right after dispatching a poll's events,
        so all messages read in one turn reach each member in one write.
        """
        if self._flush_call is None:
            self._flush_call = self.clock.callLater(0, self.flush)

    def flush(self) -> None:
        """Hand every queued output to its transport."""
        call, self._flush_call = self._flush_call, None
        if call is not None and call.active():
            call.cancel()
        dirty = self.dirty
        while dirty:
            session, _ = dirty.popitem()
            session.flush()

    def connected(self, session: Session) -> None:
        self.sessions[session] = None

    # --- namespaces ---------------------------------------------------------------

    def read_login(self, text: str) -> tuple[str, str | None] | None:
        """
        A login (a nick, a USER name, a SASL account) as the name it stands for
        and the login naming a namespace (C{bob@t42} with the C{login} source),
        or L{None} when what follows its last C{@} is no namespace.  An
        account of C{users} is that account, whatever its name holds.
        """
        if not self.namespaces.reads_logins or text in self.options.users:
            return text, None
        split = split_login(text)
        if split is None:
            return None
        name, tag = split
        return name, text if tag is not None else None

    def read_nick(self, text: str) -> tuple[str, str | None]:
        """A nick to register and its login: C{bob@t42} is bob in t42; BAD_NICK if no key."""
        read = self.read_login(text) if "@" in text else (text, None)
        if read is None:
            raise ChatError(ChatError.BAD_NICK, text)
        return read

    def namespace(self, session: Session, channel: str | None = None) -> str | None:
        """
        The namespace of what C{session} does in C{channel}, or of the session
        itself (then its rooms, by name, are the channels its prefix is read from).
        """
        if not self.namespaces.enabled:
            return None
        channels = (
            channel if channel is not None else sorted(r.name for r in session.rooms.values())
        )
        return self.namespaces.derive(channel=channels, login=session.login, client=session.host)

    def stamp(self, session: Session, channel: str | None = None) -> dict[str, str]:
        """What an event or a view entry carries of the namespace: C{namespace}, or nothing."""
        found = self.namespace(session, channel)
        return {"namespace": found} if found is not None else {}

    def room_namespace(self, room: Room) -> str | None:
        return self.namespaces.derive(channel=room.name) if self.namespaces.enabled else None

    def forget(self, namespace: str) -> dict[str, int]:
        """
        C{DELETE /api/namespaces/NS}: the history of its rooms goes, so a room
        joined again replays nothing of before; connected users stay.
        """
        cleared = 0
        for room in self.rooms.values():
            if room.history and self.room_namespace(room) == namespace:
                room.history.clear()
                cleared += 1
        return {"rooms": cleared}

    def nick_free(self, nick: str, session: Session | None = None) -> bool:
        holder = self.users.get(fold(nick))
        return holder is None or holder is session

    def check_nick(self, nick: str, session: Session) -> None:
        if not valid_nick(nick):
            raise ChatError(ChatError.BAD_NICK, nick)
        if not self.nick_free(nick, session):
            raise ChatError(ChatError.NICK_IN_USE, nick)

    def register(self, session: Session, nick: str) -> None:
        self.check_nick(nick, session)
        session.nick = nick
        self.users[fold(nick)] = session
        self._gauges()
        self.emit(
            "chat.login",
            nick=nick,
            protocol=session.protocol_name,
            client=session.host,
            **self.stamp(session),
        )

    def rename(self, session: Session, nick: str) -> None:
        self.check_nick(nick, session)
        old_nick, old_prefix = session.nick, session.prefix
        del self.users[fold(old_nick)]
        session.nick = nick
        self.users[fold(nick)] = session
        self._announce(
            itertools.chain((session,), self._neighbours(session)),
            lambda wire: wire.renamed(session, old_prefix, old_nick),
        )
        self.emit("chat.nick", old=old_nick, nick=nick, **self.stamp(session))

    @staticmethod
    def _announce(members: Iterable[Session], encode: Callable[[Wire], bytes]) -> None:
        """Write one happening to each member once, encoded once per wire."""
        data: dict[Wire, bytes] = {}
        seen: set[Session] = set()
        for member in members:
            if member in seen:
                continue
            seen.add(member)
            wire = member.wire
            if wire not in data:
                data[wire] = encode(wire)
            member.write(data[wire])

    def _neighbours(self, session: Session) -> Iterator[Session]:
        for room in list(session.rooms.values()):
            yield from room.all_members()

    def leave(self, session: Session, reason: str) -> None:
        """The session is gone (QUIT, closed, dropped): tell its rooms once."""
        self.sessions.pop(session, None)
        if not session.nick or self.users.get(fold(session.nick)) is not session:
            return
        del self.users[fold(session.nick)]
        self._announce(
            (m for m in self._neighbours(session) if m is not session),
            lambda wire: wire.quit(session, reason),
        )
        stamp = self.stamp(session)  # read from its rooms too: before it leaves them
        for room in list(session.rooms.values()):
            self._remove(session, room)
        self._gauges()
        self.emit("chat.quit", nick=session.nick, reason=reason, **stamp)

    def dropped_slow(self, session: Session) -> None:
        self.stats.count("chat_dropped_slow")
        self.emit(
            "chat.dropped",
            nick=session.nick,
            client=session.host,
            reason="send queue",
            **self.stamp(session),
        )

    # --- rooms ------------------------------------------------------------------

    def find_room(self, name: str) -> Room:
        key = room_key(name)
        room = self.rooms.get(key) if key else None
        if room is None:
            raise ChatError(ChatError.BAD_ROOM, name)
        return room

    def join(self, session: Session, name: str, channel_key: str = "") -> Room | None:
        """Join (creating if allowed); None when already a member."""
        key = room_key(name)
        if key is None:
            raise ChatError(ChatError.BAD_ROOM, name)
        room = self.rooms.get(key)
        if room is None:
            if not self.options.create_rooms:
                raise ChatError(ChatError.NO_CREATE, name)
            if len(session.rooms) >= MAX_ROOMS_PER_USER:
                raise ChatError(ChatError.TOO_MANY_ROOMS, name)
            room = self._create(name)
            self._gauges()
        if key in session.rooms:
            return None
        if len(session.rooms) >= MAX_ROOMS_PER_USER:
            raise ChatError(ChatError.TOO_MANY_ROOMS, name)
        self._may_join(session, room, channel_key)
        room.invited.discard(fold(session.nick))
        session.rooms[key] = room
        room.members.setdefault(session.wire, {})[session] = None
        room.count += 1
        if room.count == 1:
            room.operators.add(session)  # whoever opens an empty room runs it
        self._announce(room.all_members(), lambda wire: wire.joined(session, room))
        self.emit("chat.join", nick=session.nick, room=room.name, **self.stamp(session, room.name))
        return room

    @staticmethod
    def _may_join(session: Session, room: Room, key: str) -> None:
        channel = f"#{room.name}"
        invited = fold(session.nick) in room.invited
        if room.banned(session):
            raise ChatError(ChatError.BANNED, channel)
        if room.invite_only and not invited:
            raise ChatError(ChatError.INVITE_ONLY, channel)
        if room.join_key is not None and key != room.join_key:
            raise ChatError(ChatError.BAD_KEY, channel)
        if room.limit is not None and room.count >= room.limit:
            raise ChatError(ChatError.FULL, channel)

    def part(self, session: Session, name: str, reason: str) -> Room:
        room = self.find_room(name)
        if room.key not in session.rooms:
            raise ChatError(ChatError.NOT_IN_ROOM, name)
        self._announce(room.all_members(), lambda wire: wire.parted(session, room, reason))
        self._remove(session, room)
        self.emit(
            "chat.part",
            nick=session.nick,
            room=room.name,
            reason=reason,
            **self.stamp(session, room.name),
        )
        return room

    def _remove(self, session: Session, room: Room) -> None:
        session.rooms.pop(room.key, None)
        room.operators.discard(session)
        room.voiced.discard(session)
        group = room.members.get(session.wire)
        if group is not None and session in group:
            del group[session]
            room.count -= 1
            if not group:
                del room.members[session.wire]
        if not room.count and room.key not in self.permanent and room.key in self.rooms:
            # Rooms clients made go when their last member leaves, so rooms
            # (and their history) stay bounded by users x MAX_ROOMS_PER_USER.
            del self.rooms[room.key]
            self._gauges()

    def set_topic(self, session: Session, name: str, topic: str) -> Room:
        room = self.find_room(name)
        if room.key not in session.rooms:
            raise ChatError(ChatError.NOT_IN_ROOM, name)
        if room.topic_locked and session not in room.operators:
            raise ChatError(ChatError.NOT_OPERATOR, f"#{room.name}")
        room.topic = topic[:TOPIC_LENGTH]
        self._announce(room.all_members(), lambda wire: wire.topic(session, room))
        self.emit(
            "chat.topic",
            nick=session.nick,
            room=room.name,
            topic=room.topic,
            **self.stamp(session, room.name),
        )
        return room

    # --- messages -----------------------------------------------------------------

    def allow(self, session: Session) -> bool:
        """
        Spend one message of the session's flood allowance for the line it is
        handling; False when none is left: the line (nothing of it done yet)
        waits for the allowance to refill, and the lines after it behind it.
        """
        if session.flood.spend():
            return True
        self.stats.count("chat_flood_delayed")
        if not session.flooding:
            session.flooding = True
            self._flood_event(session, "delay")
            session.notify(
                f"flood: more than {self.options.flood.messages} messages in "
                f"{self.options.flood.per_seconds:g} s; messages delayed"
            )
        session.wait_for_allowance()
        return False

    def excess_flood(self, session: Session) -> None:
        """More waits for the session's flood allowance than L{MAX_QUEUED}: cut it off."""
        self._flood_event(session, "disconnect")
        session.disconnect("Excess Flood")

    def _flood_event(self, session: Session, action: str) -> None:
        self.emit(
            "chat.flood",
            nick=session.nick,
            client=session.host,
            action=action,
            **self.stamp(session),
        )

    def say(
        self, session: Session, name: str, text: str, notice: bool = False, tags: bytes = b""
    ) -> Room:
        room = self.find_room(name)
        self._may_speak(session, room, name)
        for wire, members in list(room.members.items()):
            wire.deliver(members, session, room, text, notice, tags)
            self.dirty.update(members)
        if not notice:
            room.history.append((self.clock.seconds(), session.nick, text))
        self.stats.count("chat_messages")
        self.stats.count("chat_deliveries", room.count - 1)
        if self.journal_active():
            self.emit(
                "chat.message",
                nick=session.nick,
                room=room.name,
                text=text,
                **self.stamp(session, room.name),
            )
        return room

    @staticmethod
    def _may_speak(session: Session, room: Room, name: str) -> None:
        member = room.key in session.rooms
        if not member and room.no_outside:
            raise ChatError(ChatError.NOT_IN_ROOM, name)
        if session in room.operators or session in room.voiced:
            return
        if room.moderated or room.banned(session):
            raise ChatError(ChatError.CANNOT_SEND, f"#{room.name}")

    # --- channel operators ----------------------------------------------------------

    def _operated(self, session: Session, name: str) -> Room:
        """The room C{name}, where C{session} must be an operator."""
        room = self.find_room(name)
        if room.key not in session.rooms:
            raise ChatError(ChatError.NOT_IN_ROOM, f"#{room.name}")
        if session not in room.operators:
            raise ChatError(ChatError.NOT_OPERATOR, f"#{room.name}")
        return room

    def _member(self, room: Room, nick: str) -> Session:
        target = self.users.get(fold(nick))
        if target is None:
            raise ChatError(ChatError.NO_SUCH_NICK, nick)
        if room.key not in target.rooms:
            raise ChatError(ChatError.THEY_ARE_NOT_IN_ROOM, f"#{room.name}", target.nick)
        return target

    def kick(self, session: Session, name: str, nick: str, reason: str) -> Room:
        room = self._operated(session, name)
        target = self._member(room, nick)
        reason = reason or session.nick
        self._announce(room.all_members(), lambda wire: wire.kicked(session, room, target, reason))
        self._remove(target, room)
        target.kicked_out(room)
        self.emit(
            "chat.kick",
            nick=session.nick,
            room=room.name,
            target=target.nick,
            reason=reason,
            **self.stamp(session, room.name),
        )
        return room

    def invite(self, session: Session, nick: str, name: str) -> Session:
        room = self.find_room(name)
        channel = f"#{room.name}"
        if room.key not in session.rooms:
            raise ChatError(ChatError.NOT_IN_ROOM, channel)
        if room.invite_only and session not in room.operators:
            raise ChatError(ChatError.NOT_OPERATOR, channel)
        target = self.users.get(fold(nick))
        if target is None:
            raise ChatError(ChatError.NO_SUCH_NICK, nick)
        if room.key in target.rooms:
            raise ChatError(ChatError.ALREADY_IN_ROOM, channel, target.nick)
        # Bounded: one entry per user at most, dropped at its join.
        if len(room.invited) < len(self.users):
            room.invited.add(fold(target.nick))
        target.write(target.wire.invited(session, target, room))
        self.emit(
            "chat.invite",
            nick=session.nick,
            room=room.name,
            target=target.nick,
            **self.stamp(session, room.name),
        )
        return target

    def change_modes(self, session: Session, name: str, changes: list[ModeChange]) -> Room:
        """
        Apply C{changes} (an operator's), telling the room those that changed
        something; a change naming a user not in the room fails after the ones
        before it are applied, as IRC servers do.
        """
        room = self._operated(session, name)
        applied: list[ModeChange] = []
        try:
            for change in changes:
                done = self._apply(session, room, change)
                if done is not None:
                    applied.append(done)
        finally:
            if applied:
                self._announce(room.all_members(), lambda wire: wire.modes(session, room, applied))
                self.emit(
                    "chat.mode",
                    nick=session.nick,
                    room=room.name,
                    changes=[attrs.astuple(change) for change in applied],
                    **self.stamp(session, room.name),
                )
        return room

    def _apply(self, session: Session, room: Room, change: ModeChange) -> ModeChange | None:
        """Apply one change; what the room is told of it, or None if nothing changed."""
        adding, mode, argument = change.adding, change.mode, change.argument
        if mode in "ov":
            assert argument is not None
            target = self._member(room, argument)
            group = room.operators if mode == "o" else room.voiced
            if (target in group) == adding:
                return None
            if adding:
                group.add(target)
            else:
                group.discard(target)
            return attrs.evolve(change, argument=target.nick)
        if mode == "b":
            assert argument is not None
            mask = ban_mask(argument)
            present = [ban for ban in room.bans if fold(ban[0]) == fold(mask)]
            if adding and not present:
                if len(room.bans) >= MAX_BANS:
                    raise ChatError(ChatError.BAN_LIST_FULL, f"#{room.name}", mask)
                room.bans.append((mask, session.prefix, self.clock.seconds()))
            elif not adding and present:
                room.bans.remove(present[0])
            else:
                return None
            return attrs.evolve(change, argument=mask)
        if mode == "k":
            key = argument if adding else None
            if key == room.join_key:
                return None
            room.join_key = key
            return attrs.evolve(change, argument=argument if adding else "*")
        if mode == "l":
            limit = int(argument) if adding and argument is not None else None
            if limit == room.limit:
                return None
            room.limit = limit
            return change
        flag = {"i": "invite_only", "m": "moderated", "n": "no_outside", "t": "topic_locked"}[mode]
        if getattr(room, flag) == adding:
            return None
        setattr(room, flag, adding)
        return change

    def tell(
        self, session: Session, nick: str, text: str, notice: bool = False, tags: bytes = b""
    ) -> Session:
        target = self.users.get(fold(nick))
        if target is None:
            raise ChatError(ChatError.NO_SUCH_NICK, nick)
        target.write(target.wire.private(session, target, text, notice, tags))
        self.stats.count("chat_messages")
        self.stats.count("chat_deliveries")
        if self.journal_active():
            self.emit(
                "chat.message", nick=session.nick, to=target.nick, text=text, **self.stamp(session)
            )
        return target

    def check_password(self, account: str, password: bytes) -> Deferred[bool]:
        """Whether C{password} is C{account}'s, from the C{users} map."""
        stored = self.options.users.get(account)
        if stored is None:
            return succeed(False)
        return passwords.check(password, stored, self.run_in_thread)

    # --- the admin view -------------------------------------------------------------

    def describe_sessions(self) -> list[dict[str, Any]]:
        return [session.describe() for session in self.sessions]

    def describe_rooms(self) -> list[dict[str, Any]]:
        return [
            self.describe_room(room) for room in sorted(self.rooms.values(), key=lambda r: r.key)
        ]

    def describe_room(self, room: Room) -> dict[str, Any]:
        namespace = self.room_namespace(room)
        return {
            "room": room.name,
            "topic": room.topic,
            "members": room.nicks(),
            "operators": sorted((m.nick for m in room.operators), key=fold),
            "voiced": sorted((m.nick for m in room.voiced), key=fold),
            "modes": " ".join(room.mode_flags(with_key=False)),
            "bans": [mask for mask, _, _ in room.bans],
            "history": len(room.history),
            **({"namespace": namespace} if namespace is not None else {}),
        }
