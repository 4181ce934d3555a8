"""
The contract between netd's core and its service kinds.

A kind module under L{netd.services} exposes one or more L{ServiceKind} objects.
The core reads a service's generic keys (C{type}, C{listen}, limits), hands the
rest of its mapping to L{ServiceKind.parse}, and later calls L{ServiceKind.build}
with a L{BuildContext} to get the L{Handlers} it puts behind the listeners.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import attrs
from twisted.application.service import IService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
)
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import Interface

from netd.events import Journal, ServiceStats
from netd.namespaces import NO_NAMESPACES, Namespacing, SourceReader
from netd.records import Record
from netd.rules import CONNECTIONS_ONLY, RuleSet, Vocabulary

if TYPE_CHECKING:
    from netd.config import ListenerConfig, ServiceConfig, TLSProfiles
    from netd.schema import Section

__all__ = [
    "AdminRoot",
    "AdminView",
    "BuildContext",
    "Handlers",
    "Holders",
    "HostedService",
    "IOwesReplies",
    "RepliesOwed",
    "RunInThread",
    "ServiceHost",
    "ServiceKind",
    "ViewRefused",
]

Options = TypeVar("Options")
Result = TypeVar("Result")
Key = TypeVar("Key", bound=Hashable)
Holder = TypeVar("Holder")

RunInThread = Callable[..., "Deferred[Any]"]
"""
Runs a blocking callable with its arguments off the reactor thread and gives a
Deferred of its result: L{BuildContext.in_thread} in netd, C{maybeDeferred} in
unit tests that want it synchronous.
"""


class IOwesReplies(Interface):
    """
    A stream protocol that answers some requests later than it reads them (a
    spool write, an upstream, a thread).

    When a client half-closes (C{shutdown(SHUT_WR)}, what C{nc -q} and many
    scripts do after their last request), the core's connection wrapper keeps
    the connection open until this fires, then closes once the replies are
    written.  A protocol that answers as it reads need not provide it.
    """

    def when_replied() -> Deferred[None]:
        """
        Fires once every request read so far has been answered: its reply
        written, or streaming through a registered producer.  A request the
        client cut short is not waited for.
        """


@attrs.define(repr=False)
class RepliesOwed(Record):
    """
    What a protocol providing L{IOwesReplies} keeps: who waits for its replies.

    The protocol answers C{when_replied} with C{wait(owed)}, saying whether a
    reply is still owed now, and calls C{settled()} whenever the last one owed
    has been written.
    """

    _waiting: list[Deferred[None]] = attrs.field(factory=list)

    def wait(self, owed: bool) -> Deferred[None]:
        if not owed:
            return succeed(None)
        replied: Deferred[None] = Deferred()
        self._waiting.append(replied)
        return replied

    @property
    def awaited(self) -> bool:
        return bool(self._waiting)

    def settled(self) -> None:
        waiting, self._waiting = self._waiting, []
        for replied in waiting:
            replied.callback(None)


class Holders(Generic[Key, Holder]):
    """
    Which running build holds each key (a spool folder, a C{record_to} file)
    that builds of one service across a reload, or of several services, share.

    The newest holder started of those still running holds the key: a
    reload's replacement takes it over while the build it replaces drains
    its connections and hands their work to the holder, and one that stops
    while a holder started before it still runs (a replacement whose service
    leaves the map meanwhile) hands the key back.  Only running holders are
    kept, so a stopped build is not kept alive through its successor.
    """

    def __init__(self) -> None:
        self._running: dict[Key, list[Holder]] = {}

    def holder(self, key: Key) -> Holder | None:
        """The holder of C{key} now; L{None} while none runs."""
        running = self._running.get(key)
        return running[-1] if running else None

    def take(self, key: Key, holder: Holder) -> Holder | None:
        """C{holder} started and holds C{key} from now on; the holder it took it from."""
        replaced = self.holder(key)
        self._running.setdefault(key, []).append(holder)
        return replaced

    def leave(self, key: Key, holder: Holder) -> Holder | None:
        """
        C{holder} stopped; the holder it hands C{key} back to, when it held
        the key and one started before it still runs.
        """
        running = self._running.pop(key, [])
        held = bool(running) and running[-1] is holder
        left = [other for other in running if other is not holder]
        if left:
            self._running[key] = left
        return left[-1] if held and left else None


@attrs.frozen(repr=False)
class BuildContext(Record):
    """What a kind's builder may use: never the global reactor, always this one."""

    reactor: Any
    name: str
    state_dir: Path
    journal: Journal
    stats: ServiceStats
    log: Logger
    tls: Mapping[str, IOpenSSLServerConnectionCreator]
    # The service's rules (netd.rules): a kind with a rule vocabulary checks
    # them at its events; they change at run time through the admin API.
    rules: RuleSet = attrs.field(factory=RuleSet)
    # The service's namespace_from (netd.namespaces): the kind derives each
    # exchange's namespace with it and stamps it on events and view entries.
    namespaces: Namespacing = NO_NAMESPACES
    carried: dict[str, Any] = attrs.field(factory=dict)
    """
    What a service hands to its successor of the same name when a reload
    rebuilds it (state changed at run time, outside the map); the same dict
    for every build of the name, forgotten once the service leaves the map.
    A kind reads it while building and writes it only once started, so a
    replacement whose reload fails leaves its predecessor's state as it was.
    """
    tables: dict[str, Any] = attrs.field(factory=dict)
    """
    What the builds of every service share across reloads (L{Holders} of
    spool folders, say), each under a key its kind names: the daemon's one
    dict, which ends with it, so two daemons in one process share nothing.
    Reached through L{shared}.
    """
    # The service's bound stream listeners, as they are now: a kind that stops
    # accepting for a while (a proxy that is down) reaches its ports here.
    stream_ports: Callable[[], Sequence[IListeningPort]] = tuple

    def emit(self, type: str, **fields: Any) -> None:
        self.journal.emit(self.name, type, **fields)

    def shared(self, key: str, make: Callable[[], Result]) -> Result:
        """The daemon's one table under C{key} in L{tables}, made on first use."""
        if key not in self.tables:
            self.tables[key] = make()
        table: Result = self.tables[key]
        return table

    def in_thread(self, work: Callable[..., Result], *args: Any) -> Deferred[Result]:
        """
        C{work(*args)} on this reactor's thread pool: what blocks (a file
        system call, an fsync, a password hash) never runs on the reactor thread.
        """
        ran: Deferred[Result] = deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), work, *args
        )
        return ran


@attrs.frozen(repr=False)
class AdminView(Record):
    """
    One per-service view of the admin API, under C{/api/services/NAME/VIEW}.

    @ivar list: C{GET .../VIEW?query}: anything JSON can encode.
    @ivar item: C{GET .../VIEW/KEY}: JSON-able, or L{bytes} sent as they are
        (a raw message), or L{None} for 404.
    @ivar clear: C{DELETE .../VIEW}: forget what the view holds; returns JSON-able.
    @ivar post: C{POST .../VIEW} with a JSON body: add to the view; returns
        JSON-able (answered 201).
    @ivar put: C{PUT .../VIEW/KEY} with a JSON body: set one entry.
    @ivar remove: C{DELETE .../VIEW/KEY}: forget one entry; L{None} for 404.
    @ivar act: C{POST .../VIEW/KEY} with a JSON body: an action on one entry
        (C{messages/ID/release}); returns JSON-able, or L{None} for 404.
    @ivar forget: C{DELETE /api/namespaces/NS}: forget the entries of one
        namespace (L{netd.namespaces}); returns JSON-able.  A view whose list
        entries carry C{namespace} is filtered by C{?namespace=} by the core;
        one that pages its entries filters them itself before paging.

    A KEY is the rest of the path, its segments joined with C{/}
    (C{records/www.lab.test/A}).  A write may raise L{ViewRefused} (its status
    and reason are the answer) or L{netd.schema.ConfigErrors} (400, each error
    with its path, as the map's own errors read).  Each may return a Deferred.
    """

    list: Callable[[Mapping[str, str]], Any]
    item: Callable[[str], Any] | None = None
    clear: Callable[[], Any] | None = None
    post: Callable[[Any], Any] | None = None
    put: Callable[[str, Any], Any] | None = None
    remove: Callable[[str], Any] | None = None
    act: Callable[[str, Any], Any] | None = None
    forget: Callable[[str], Any] | None = None


class ViewRefused(Exception):
    """A view's refusal of a request: the HTTP status and a reason for the client."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@attrs.frozen(repr=False)
class Handlers(Record):
    """
    What a built service puts behind its listeners.

    @ivar stream: the protocol factory for a stream listener (TCP, TLS, UNIX).
    @ivar datagram: a new protocol for each datagram listener.
    @ivar busy_reply: written to a connection refused by C{max_connections}.
    @ivar per_client_reply: written to a connection refused by
        C{max_connections_per_client}; L{None}: the C{busy_reply}.
    @ivar service: started before and stopped after the listeners (queues, caches).
    @ivar views: per-service admin views by name (C{requests}, C{messages}, ...);
        the core adds C{rules} (over L{BuildContext.rules}) unless the kind serves it.
    @ivar keep: for a kind whose views' writes change what it answers (http's
        routes, dns's live records), run in C{workers} (L{netd.workers}): the
        main process's build, which never serves, keeps the writes to the
        views named in C{kept_views}.  Each such write reaches it before the
        workers (its refusal is the answer); this, called as the workers
        start, writes what it holds to L{BuildContext.carried}, and each
        worker is built from C{carried} as a rebuilt service is.  Those views
        list what the main process holds, an entry's C{matched} (with an
        C{id}) summed over the live workers.  L{None}: a worker started later
        starts from the map.
    @ivar kept_views: the views whose writes C{keep} is for; the others (a
        query log, say) are each worker's own, and join.
    @ivar ready: whether the service could do its work (smtp: its spool's
        folder can be made and read), a check that starts nothing: asked at
        start-up, where a failure stops it as a listener that cannot bind
        does, and of a reload's replacement before it starts, where a failure
        undoes the reload.  L{None}: nothing to check.
    """

    stream: Callable[[ListenerConfig], IProtocolFactory] | None = None
    datagram: Callable[[ListenerConfig], DatagramProtocol] | None = None
    busy_reply: bytes = b""
    per_client_reply: bytes | None = None
    service: IService | None = None
    views: Mapping[str, AdminView] = attrs.field(factory=dict)
    keep: Callable[[], None] | None = None
    kept_views: frozenset[str] = frozenset()
    ready: Callable[[], Deferred[None]] | None = None


class HostedService(Protocol):
    """A running service as an L{AdminRoot} sees it."""

    @property
    def config(self) -> ServiceConfig: ...
    @property
    def handlers(self) -> Handlers: ...
    def describe(self) -> dict[str, Any]:
        """Type, state, listeners (as in the ports file) and counters."""


class ServiceHost(Protocol):
    """
    The daemon as an L{AdminRoot} sees it: its services, and services made at
    run time, which run like the map's (journal, metrics, ports file) and
    outlive reloads until removed or until the map takes their name.
    """

    @property
    def services_by_name(self) -> Mapping[str, HostedService]: ...
    def added_at_run_time(self, name: str) -> bool: ...
    def add_service(self, config: ServiceConfig) -> Deferred[Any]:
        """Build, bind and start C{config}; fires with the running service."""

    def remove_service(self, name: str) -> Deferred[None]:
        """Stop a service made at run time, cutting its connections."""


@attrs.frozen(repr=False)
class AdminRoot(Record):
    """
    A kind's own resource at the admin API's root, for clients that expect an
    API at fixed paths (Toxiproxy's C{/proxies}).  The first path segments it
    serves are listed in L{netd.services.ADMIN_ROOTS}, so the admin API loads
    the kind only when such a path is asked for.

    @ivar handle: C{(host, method, path segments from the root on, body)} to
        C{(status, JSON-able answer)}, or a Deferred of it; an answer of
        L{None} has no body (204).
    """

    handle: Callable[[ServiceHost, str, Sequence[str], bytes], Any]


@attrs.frozen(repr=False)
class ServiceKind(Record, Generic[Options]):
    """
    One service type of the service map.

    @ivar parse: reads the kind's own keys from the service's mapping; a key
        naming a TLS profile is read with L{TLSProfiles.reference}.
    @ivar build: turns the parsed service into handlers.
    @ivar datagram: whether C{udp:} listeners are allowed.
    @ivar protocols: values allowed for a listener's C{protocol:}, default first.
    @ivar longest_silence: how long (seconds) the kind's own timers let a
        client stay silent (smtp's C{data_timeout}, say).  The service's
        C{idle_timeout}, the core's backstop, defaults to at least that and may
        not be set below it, so the kind's timer, which answers as its protocol
        says (421 and a reason), always fires first.
    @ivar per_client_default: the service's C{max_connections_per_client}
        when the map does not set it; 0 is no per-client limit.
    @ivar workers: whether the kind's state allows running one service in
        several worker processes (C{workers: N}), each with its own copy of it
        (a cache, a log of queries): nothing a client would notice depends on
        which process answered.
    @ivar workers_refusal: why a service's options keep it in one process
        (http's C{record}), or L{None} where they do not.
    @ivar rules: what the service's C{rules:} may match and do at the kind's
        events (L{netd.rules.Vocabulary}); without one, rules act on
        connections only (delay, throttle, reset, close, stall, drop).
    @ivar listener_keys: keys of the service besides C{listen} that hold
        stream listeners of another protocol: a listener list (dns's C{doh:})
        or a mapping with a C{listen:} list of its own (smtp's C{imap:},
        C{pop3:}; the kind reads the mapping's other keys).  The core reads
        those listeners with the service's, each tagged with its key as its
        C{protocol}, so they bind, reload, count and show in the ports file as
        the service's; L{Handlers.stream} tells them apart by
        C{listener.protocol}.
    @ivar namespaces: the sources of C{namespace_from:} the kind's exchanges
        carry, by name (L{netd.namespaces}); C{client} is the core's.
    @ivar batch_writes: whether a connection's writes on a plain socket leave
        at the end of the reactor turn, together with the other connections'
        (L{netd.connections.ConnectionSet.hold}), rather than each at once: for
        a kind that never writes to a socket past the connection's C{write}.
    """

    name: str
    parse: Callable[[Section, TLSProfiles], Options]
    build: Callable[[ServiceConfig, BuildContext], Handlers]
    datagram: bool = False
    protocols: tuple[str, ...] = ()
    longest_silence: Callable[[Options], float] | None = None
    per_client_default: int = 0
    workers: bool = False
    workers_refusal: Callable[[Options], str | None] | None = None
    rules: Vocabulary = CONNECTIONS_ONLY
    listener_keys: tuple[str, ...] = ()
    namespaces: Mapping[str, SourceReader] = attrs.field(factory=dict)
    batch_writes: bool = False


def no_options(section: Section, profiles: TLSProfiles) -> None:
    """For kinds that take no keys of their own."""
