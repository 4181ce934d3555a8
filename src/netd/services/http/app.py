"""
What an HTTP request gets, whatever carried it: routes, static files, records, logs.

The wire (L{netd.services.http.wire}: HTTP/1.1 on our own parser, HTTP/2 through
twisted.web) turns each request into an L{Exchange}; L{App.handle} answers it through
the exchange's small response interface, so every rule here holds on both.
"""

from __future__ import annotations

import email.utils
import re
import time
import urllib.parse
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import IO, Any, Protocol

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IConsumer
from twisted.logger import Logger, LogLevel
from zope.interface import implementer

from netd.events import ServiceStats
from netd.namespaces import NO_NAMESPACES, Namespacing
from netd.records import Record
from netd.rules import Fired, RuleSet
from netd.sendfile import send_file
from netd.services.http.match import WAIT, Conditions, Request
from netd.services.http.record import InThread, Recorder, Recorders
from netd.services.http.stubs import Stub, Stubs, explain, near_miss
from netd.services.http.websocket import Script, serve

__all__ = [
    "HELD_MAX",
    "HOP_BY_HOP_FRAMING",
    "App",
    "BodyStream",
    "Exchange",
    "Reply",
    "Route",
    "StaticOptions",
    "Upgrade",
    "WebSocketStream",
    "authority",
    "peer_host",
]

Headers = list[tuple[bytes, bytes]]

_REASONS: dict[int, bytes] = {
    100: b"Continue",
    200: b"OK",
    204: b"No Content",
    206: b"Partial Content",
    301: b"Moved Permanently",
    302: b"Found",
    303: b"See Other",
    304: b"Not Modified",
    307: b"Temporary Redirect",
    308: b"Permanent Redirect",
    400: b"Bad Request",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    411: b"Length Required",
    412: b"Precondition Failed",
    413: b"Content Too Large",
    414: b"URI Too Long",
    416: b"Range Not Satisfiable",
    417: b"Expectation Failed",
    426: b"Upgrade Required",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}


# Request body bytes kept for a taker that has not come yet, before the client is paused.
HELD_MAX = 256 * 1024

# What HTTP/1.1 and HTTP/2 each frame their own way: never copied into a response.
HOP_BY_HOP_FRAMING = frozenset((b"content-length", b"transfer-encoding", b"connection"))


def peer_host(address: IAddress | None) -> str:
    host = getattr(address, "host", None)
    return str(host) if host is not None else "unix"


def reason(status: int) -> bytes:
    found = _REASONS.get(status)
    if found is None:
        # A stub's own status (201, 409, 429...): the standard phrase, which clients show.
        try:
            found = HTTPStatus(status).phrase.encode()
        except ValueError:
            found = b"Unknown"
        _REASONS[status] = found  # at most the 500 three-digit codes
    return found


@attrs.frozen(repr=False)
class Route(Record):
    """
    One entry of C{routes}: a canned answer, a redirect, a reverse proxy or a
    stub (L{netd.services.http.stubs}), for a path and, with C{when}, what
    else the request must be (L{netd.services.http.match}).
    """

    path: str
    prefix: bool
    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None
    body_file: str | None = None
    redirect: str | None = None
    proxy: str | None = None
    timeout: float = 30.0
    # A glob or regex path, matched against the whole path.
    pattern: re.Pattern[str] | None = None
    glob: bool = False
    when: Conditions | None = None
    priority: int = 5
    id: str = ""
    stub: Stub | None = None
    websocket: Script | None = None
    record_to: str | None = None
    record_secrets: bool = False

    def matches(self, path: str) -> bool:
        if self.pattern is not None:
            return self.pattern.fullmatch(path) is not None
        return path.startswith(self.path) if self.prefix else path == self.path


def in_order(routes: tuple[Route, ...] | list[Route]) -> tuple[Route, ...]:
    """Routes as they are tried: by priority (lower first, WireMock's way), then as listed."""
    return tuple(sorted(routes, key=lambda route: route.priority))


@attrs.frozen(repr=False)
class Reply(Record):
    """A rule's C{reply}: the answer it gives instead of the service's."""

    status: int = 200
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""


@attrs.frozen(repr=False)
class StaticOptions(Record):
    root: str | None
    listing: bool


class BodyStream:
    """
    A request body on its way in: buffered until a consumer takes it, then passed on.

    The wire calls L{feed} and L{end}; a consumer (the proxy) calls L{take}.  When
    nobody takes it, the body is dropped as it arrives, apart from what the record keeps,
    unless it is held from the start (C{hold}: some route matches on bodies, and a
    body may come in before its request is handled: pipelined, or over h2).

    What waits for a taker (an upstream still connecting, a rule's delay) is
    bounded: past L{HELD_MAX} bytes the wire is paused (L{pause}) until L{take}.

    A body still coming when its response is sent goes on being read (and kept,
    up to C{keep}) until its end, or until the wire L{cut}s it short.
    """

    def __init__(self, expected: int | None, keep: int, hold: bool = False) -> None:
        self.expected = expected
        self.keep = keep
        self.kept = bytearray()
        self.size = 0
        self.ended = False
        # The client (or its stream) went before the body had all come in.
        self.cut_short = False
        self._over: Callable[[], None] | None = None
        self._pending: list[bytes] | None = [] if hold else None
        self._pending_size = 0
        self._held_back = False
        self._sink: Callable[[bytes], None] | None = None
        self._done: Callable[[], None] | None = None
        self.pause: Callable[[], None] = _nothing
        self.resume: Callable[[], None] = _nothing

    def want(self) -> None:
        """Someone will L{take} this body: keep what arrives until then."""
        if self._pending is None:
            self._pending = []

    def feed(self, data: bytes) -> None:
        self.size += len(data)
        room = self.keep - len(self.kept)
        if room > 0:
            self.kept += data[:room]
        if self._sink is not None:
            self._sink(data)
        elif self._pending is not None:
            self._pending.append(data)
            self._pending_size += len(data)
            if self._pending_size > HELD_MAX and not self._held_back:
                self._held_back = True
                self.pause()

    def end(self) -> None:
        self.ended = True
        # Let go of the taker: its callbacks often hold this stream (a closure over
        # it), and a cycle a request would leave every collection of the young
        # generation to find.
        done, self._sink, self._done = self._done, None, None
        if done is not None:
            done()
        self._call_over()

    def cut(self) -> None:
        """Nothing more of the body comes: its client or its stream is gone."""
        if not self.over:
            self.cut_short = True
        self._call_over()

    @property
    def over(self) -> bool:
        """Whether nothing more of the body will come: all of it is in, or it was cut."""
        return self.ended or self.size == self.expected or self.cut_short

    @property
    def taken(self) -> bool:
        """Whether a taker has the body and reads the rest of it as it comes."""
        return self._sink is not None

    def when_over(self, then: Callable[[], None]) -> None:
        """
        The response is sent, the body still comes: C{then} once it is L{over}.
        Without a taker, what was held for one is dropped and the rest comes
        unpaused, for the record alone.
        """
        self._over = then
        if self._sink is None:
            self._pending = None
            self._held_back = False
            self.resume()

    def _call_over(self) -> None:
        then, self._over = self._over, None
        if then is not None:
            then()

    def whole(self) -> bytes | None:
        """The whole body, if it has all come in and is still held (not taken)."""
        pending = self._pending
        if not self.ended or pending is None or self._pending_size != self.size:
            return None
        return pending[0] if len(pending) == 1 else b"".join(pending)

    def rewind(self, body: bytes) -> None:
        """The whole body, read by a first taker, held again for the next one."""
        self._pending = [body]
        self._pending_size = len(body)

    def take(self, sink: Callable[[bytes], None], done: Callable[[], None]) -> None:
        for chunk in self._pending or ():
            sink(chunk)
        self._pending = None
        if self.ended:
            done()
            return
        self._sink, self._done = sink, done
        if self._held_back:
            self._held_back = False
            self.resume()


def _nothing() -> None:
    pass


class Upgrade(Protocol):
    """
    A client connection that may switch protocols (RFC 9110 7.8), as the proxy
    sees it while it asks the upstream to switch too.
    """

    def splice(self, head: bytes, upstream: Any) -> None:
        """The upstream switched with C{head}: send it on, then copy both ways."""

    def take_held(self) -> bytes:
        """What the client sent after the request head so far (a body, early frames)."""
        return b""

    def to_client(self, data: bytes) -> None:
        """Bytes the upstream sent after switching."""

    def upstream_lost(self) -> None:
        """The upstream closed the spliced connection."""


class WebSocketStream(Protocol):
    """
    A WebSocket on an HTTP/2 stream (RFC 8441: an extended CONNECT), as a
    stub route runs one: frames go both ways as the stream's DATA.
    """

    def accept(self, headers: Headers, peer: Any) -> None:
        """Answer 200 with C{headers}; then the client's bytes go to C{peer.write}."""

    def to_client(self, data: bytes) -> None:
        """Bytes for the client (frames)."""

    def upstream_lost(self) -> None:
        """The WebSocket is over: end the stream."""


class Exchange(ABC):
    """
    One request and its response, as the wire sees it.

    Subclasses provide the response methods; the request fields are filled by the wire.
    """

    method: str
    target: str
    # The target's path as App.handle normalised it (decoded once): what routes
    # match, the proxy strips and forwards, redirects keep and the root looks up.
    path: str = "/"
    version: str
    headers: Headers
    client: str
    scheme: str
    body: BodyStream
    status: int = 0
    sent: int = 0
    started: float = 0.0
    # Whether the response's bytes are all handed to the connection once it is
    # complete (HTTP/1.x), so a shaper can pace those alone; HTTP/2's frames
    # leave on later turns, interleaved with other streams'.
    written_when_complete = True
    # Set by the proxy while it waits on the upstream (a stub while it delays);
    # the wire calls it if the client goes.
    proxy_cancel: Callable[[], None] | None = None
    # The route that answered, for the record; or what the request missed when none did.
    route: str | None = None
    unmatched: bool = False
    near_miss: dict[str, Any] | None = None
    # Its namespace (netd.namespaces), on its event and its record.
    namespace: str | None = None
    # A rule paces this response or cuts it after N bytes: that ends with it.
    shaped = False
    # Answered, or its client is gone: nothing more is sent for it.
    done = False
    # HTTP/1.x: whether the connection goes on after this response.
    keep_alive = True

    _by_name: dict[bytes, bytes] | None = None

    def header(self, name: bytes) -> bytes | None:
        """The value of header C{name} (lower case); repeated headers joined by commas."""
        return self.by_name().get(name)

    def by_name(self) -> dict[bytes, bytes]:
        """
        Every header's value (L{header}) by its lower-case name: what asks for
        several costs one call (each was a noticeable part of a small response).
        """
        by_name = self._by_name
        if by_name is None:
            by_name = self._by_name = {}
            for key, value in self.headers:
                key = key.lower()
                by_name[key] = by_name[key] + b", " + value if key in by_name else value
        return by_name

    def header_lines(self, name: bytes) -> list[bytes]:
        """Each value of header C{name} (lower case) as it came, one a line."""
        return [value for key, value in self.headers if key.lower() == name]

    def upgrade(self) -> Upgrade | None:
        """
        The connection, if this request asks to switch protocols and its
        connection can (HTTP/1.1); None otherwise.
        """
        return None

    def websocket_stream(self) -> WebSocketStream | None:
        """The stream, if this request opens a WebSocket over HTTP/2 (RFC 8441); else None."""
        return None

    def connection_transport(self) -> Any:
        """The transport of the whole connection: what a rule's generic acts act on."""
        return None

    @abstractmethod
    def respond(self, status: int, headers: Headers, body: bytes) -> None:
        """The whole response at once; the wire drops the body for HEAD and 304."""

    @abstractmethod
    def start(self, status: int, headers: Headers, length: int | None) -> None:
        """Send the status and headers of a response whose body follows in L{write}s."""

    @abstractmethod
    def write(self, data: bytes) -> None:
        """Send the next piece of a started response's body."""

    @abstractmethod
    def finish(self) -> None:
        """End a started response."""

    @abstractmethod
    def abort(self) -> None:
        """Cut the connection: a response already started cannot become an error."""

    @abstractmethod
    def register_producer(self, producer: Any, streaming: bool) -> None:
        """Let C{producer} write the body at the pace the client reads."""

    @abstractmethod
    def unregister_producer(self) -> None:
        """The producer has written everything."""

    def count_sent(self, size: int) -> None:
        """Body bytes that went out past L{write}."""
        self.sent += size

    def send_file(self, file: IO[bytes], offset: int, count: int) -> Deferred[None]:
        """
        Send C{count} bytes of C{file} from C{offset} as the next piece of the body.

        Fires when they are sent; fails as L{netd.sendfile.send_file} does.
        """
        return send_file(_BodyConsumer(self), file, offset, count)


@implementer(IConsumer)
class _BodyConsumer:
    """An exchange as what a file is sent to: its writes are the response body."""

    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.exchange.register_producer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.exchange.unregister_producer()

    def write(self, data: bytes) -> None:
        self.exchange.write(data)


class _DateCache:
    """HTTP and log dates change once a second; formatting them per request is waste."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self._second = -1
        self.http = b""
        self.log = ""

    def refresh(self) -> None:
        now = int(self.clock.seconds())
        if now != self._second:
            self._second = now
            self.http = email.utils.formatdate(now, usegmt=True).encode()
            self.log = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(now))


class Files(Protocol):
    """The static root behind the routes (L{netd.services.http.static.StaticFiles})."""

    def serve(self, exchange: Exchange, path: str) -> None: ...


def respond_error(exchange: Exchange, status: int, headers: Headers | None = None) -> None:
    """A short plain-text answer for C{status}."""
    body = b"%d %s\n" % (status, reason(status))
    exchange.respond(
        status,
        [*(headers or ()), (b"Content-Type", b"text/plain; charset=utf-8")],
        body,
    )


class App:
    """One service's answers: routes first, then the static root (C{files})."""

    def __init__(
        self,
        clock: Any,
        routes: tuple[Route, ...],
        files: Files | None,
        record: int,
        record_body: int,
        access_log: bool,
        log: Logger,
        stats: ServiceStats,
        emit: Callable[..., None],
        proxy: Callable[[Exchange, Route, str], None] | None,
        rules: RuleSet | None = None,
        namespaces: Namespacing = NO_NAMESPACES,
        in_thread: InThread | None = None,
        journal_active: Callable[[], bool] = lambda: True,
        recording: Recorders | None = None,
    ) -> None:
        self.namespaces = namespaces
        self.clock = clock
        self.map_routes = routes
        self.added: list[Route] = []
        self.routes = in_order(routes)
        self.reads_bodies = _reads_bodies(self.routes)
        self.files = files
        self.records: deque[dict[str, Any]] = deque(maxlen=max(record, 1))
        self.record_size = record
        self.record_body = record_body if record else 0
        self.access_log = access_log
        self.log = log
        self.stats = stats
        self.emit = emit
        # Requests come too often to build an event nobody can read (no admin API,
        # no events in the log).
        self.journal_active = journal_active
        self.proxy = proxy
        self.rules = rules if rules is not None else RuleSet()
        self.dates = _DateCache(clock)
        self.bodies = {r.body_file: _read(r.body_file) for r in routes if r.body_file}
        for route in routes:
            for answer in route.stub.answers if route.stub is not None else ():
                if answer.body_file is not None:
                    self.bodies[answer.body_file] = _read(answer.body_file)
        self.stubs = Stubs(clock, self.bodies)
        # Requests each route answered, by id: a stub's sequence and counter, the routes view.
        self.matched: dict[str, int] = {}
        # The daemon's recorder of each record_to file (BuildContext.shared);
        # an app built alone (a test) shares its files with no other.
        serving = Recorders() if recording is None else recording
        self.recorders = {
            r.id: Recorder(r.record_to, r.record_secrets, serving, in_thread)
            for r in routes
            if r.record_to
        }

    # -- the admin view ------------------------------------------------------------

    def list_requests(self, query: Mapping[str, str]) -> list[dict[str, Any]]:
        if query.get("unmatched", "").lower() in ("1", "true", "yes"):
            return [r for r in self.records if r.get("unmatched")]
        return list(self.records)

    def forget_requests(self, namespace: str) -> dict[str, int]:
        """C{DELETE /api/namespaces/NS}: the records of one namespace go."""
        kept = [r for r in self.records if r.get("namespace") != namespace]
        forgotten = len(self.records) - len(kept)
        self.records = deque(kept, maxlen=self.records.maxlen)
        return {"cleared": forgotten}

    def clear_requests(self) -> dict[str, int]:
        cleared = len(self.records)
        self.records.clear()
        return {"cleared": cleared}

    # -- routes added at run time (L{netd.services.http.stubs.RoutesView}) ------------

    def add_route(self, route: Route) -> None:
        """A route from the admin API: tried before the map's routes of its priority."""
        self.added.insert(0, route)
        self.routes = in_order([*self.added, *self.map_routes])
        self.reads_bodies = _reads_bodies(self.routes)

    def remove_route(self, route_id: str) -> None:
        self.added = [r for r in self.added if r.id != route_id]
        self.routes = in_order([*self.added, *self.map_routes])
        self.reads_bodies = _reads_bodies(self.routes)
        self.matched.pop(route_id, None)

    # -- answering -----------------------------------------------------------------

    def handle(self, exchange: Exchange) -> None:
        try:
            self._handle(exchange)
        except Exception:
            # netd's fault, not the client's: a 500 for this request (the
            # connection, and an HTTP/2 connection's other streams, go on).
            self.log.failure(
                "answering {method} {target}", method=exchange.method, target=exchange.target
            )
            self.stats.errors += 1
            if not exchange.status:
                self.error(exchange, 500)

    def _handle(self, exchange: Exchange) -> None:
        self.dates.refresh()
        exchange.started = self.clock.seconds()
        path = _path_of(exchange.target)
        if path is None:
            self.error(exchange, 400)
            return
        exchange.path = path
        if self.namespaces.enabled:
            exchange.namespace = self.namespaces.derive(
                client=exchange.client,
                host=_host(exchange),
                header=lambda name: _text(exchange.header(name.encode("latin-1"))),
            )
        rules = self.rules
        if rules.event_rules:
            fired = rules.check(
                exchange.client,
                exchange.namespace,
                method=exchange.method,
                path=path,
                host=_host(exchange),
                header=lambda name: _text(exchange.header(name.encode("latin-1"))),
            )
            if fired is not None:
                self._act(exchange, fired, path)
                return
        self._dispatch(exchange, path, None)

    def _act(self, exchange: Exchange, fired: Fired, path: str) -> None:
        """A rule fired on this request: its answer, or the usual one after its acts."""
        reply: Reply | None = fired.acts.get("reply")
        answer = None
        if reply is not None:

            def answer() -> None:
                headers = list(reply.headers)
                if reply.body and not any(n.lower() == b"content-type" for n, _ in headers):
                    headers.append((b"Content-Type", b"text/plain; charset=utf-8"))
                exchange.respond(reply.status, headers, reply.body)

        def proceed() -> None:
            if not exchange.done:  # the client may have left while a rule delayed it
                self._dispatch(exchange, path, None)

        close = fired.acts.get("close")
        if close is True and reply is not None:
            exchange.keep_alive = False  # its reply says so, and nothing is answered after it
        exchange.shaped = "throttle" in fired.acts or close not in (None, True)
        fired.act(exchange.connection_transport(), proceed, answer)

    def _dispatch(
        self,
        exchange: Exchange,
        path: str,
        request: Request | None,
        start: int = 0,
        resumed: int = -1,
    ) -> None:
        """
        Answer from the first route that takes the request, from C{start};
        C{resumed}: the route whose head conditions held before its body came in.
        """
        routes = self.routes
        # Over h2 a 200 opens a WebSocket (RFC 8441): only a WebSocket route may answer one.
        websocket = exchange.method == "CONNECT" and exchange.websocket_stream() is not None
        for index in range(start, len(routes)):
            route = routes[index]
            if not route.matches(path) or (websocket and route.websocket is None):
                continue
            when = route.when
            if when is not None:
                if request is None:
                    request = Request(exchange, path)
                verdict = when.body_holds(request) if index == resumed else when.verdict(request)
                if verdict is WAIT:
                    self._after_body(exchange, path, request, index)
                    return
                if not verdict:
                    continue
            stub = route.stub
            if stub is not None:
                if request is None:
                    request = Request(exchange, path)
                if request.body is None and stub.reads_body:
                    self._after_body(exchange, path, request, index)
                    return
            exchange.route = route.id
            matched = self.matched
            count = matched[route.id] = matched.get(route.id, 0) + 1
            if route.websocket is not None:
                serve(exchange, route.websocket, self.clock)
            elif stub is not None:
                assert request is not None
                self.stubs.answer(exchange, route, request, count, self.error)
            else:
                self._route(exchange, route, path)
            return
        if self.files is not None:
            self.files.serve(exchange, path)
            return
        exchange.unmatched = True
        if not self.routes:
            self.error(exchange, 404)
            return
        if request is None:
            request = Request(exchange, path)
        exchange.near_miss = near_miss(self.routes, request)
        exchange.respond(
            404,
            [(b"Content-Type", b"text/plain; charset=utf-8")],
            explain(request, exchange.near_miss),
        )

    def _after_body(self, exchange: Exchange, path: str, request: Request, index: int) -> None:
        """
        Route C{index} looks at the body: take it all, then match again from
        that route (those before it did not match without the body).
        """
        received = bytearray()
        stream = exchange.body
        routes = self.routes

        def done() -> None:
            request.body = body = bytes(received)
            # What the route chosen next (a proxy, say) takes: the same body, whole.
            stream.rewind(body)
            if self.routes is routes:
                self._dispatch(exchange, path, request, index, resumed=index)
            else:  # routes added or removed meanwhile: their order is new, start over
                self._dispatch(exchange, path, request)

        stream.want()
        stream.take(received.extend, done)

    def error(self, exchange: Exchange, status: int, headers: Headers | None = None) -> None:
        respond_error(exchange, status, headers)

    def _route(self, exchange: Exchange, route: Route, path: str) -> None:
        if route.proxy is not None and self.proxy is not None:
            recorder = self.recorders.get(route.id)
            self.proxy(
                recorder.wrap(exchange) if recorder is not None else exchange,
                route,
                path[len(route.path) :] if route.prefix else "",
            )
            return
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in route.headers]
        if route.redirect is not None:
            location = route.redirect
            if route.prefix:
                location += quote_path(path[len(route.path) :])
            if location.startswith("//") and not route.redirect.startswith("//"):
                # Protocol-relative: the browser would go to another host.
                location = "/" + location.lstrip("/")
            query = query_of(exchange.target)
            if query:
                location += "?" + query
            headers.append((b"Location", location.encode("latin-1", "replace")))
            self.error(exchange, route.status, headers)
            return
        body = self.bodies[route.body_file] if route.body_file else route.body or b""
        if not any(k.lower() == "content-type" for k, _ in route.headers):
            headers.append((b"Content-Type", b"text/plain; charset=utf-8"))
        exchange.respond(route.status, headers, body)

    # -- after the response ----------------------------------------------------------

    def completed(self, exchange: Exchange) -> None:
        """
        Count, journal, log and record one finished exchange: at once, or once
        its request's body is over (L{BodyStream.over}) if it still comes.
        """
        if exchange.shaped:
            shaper = getattr(exchange.connection_transport(), "shaper", None)
            if shaper is not None:
                shaper.release(written=exchange.written_when_complete)
        # The response's last byte handed to the transport: its duration ends there.
        finished = self.clock.seconds()
        body = exchange.body
        if body.over:
            self._journal(exchange, finished)
        else:
            # Answered before its body was all in: the record shows the body as
            # the client sent it, so it (and the event) waits for the body's end.
            body.when_over(lambda: self._journal(exchange, finished))

    def _journal(self, exchange: Exchange, finished: float) -> None:
        stats = self.stats
        stats.count("requests")
        if exchange.status >= 500:
            stats.errors += 1
        target = exchange.target
        journal_active = self.journal_active()
        # From the request's head parsed to its response's last byte; worked out
        # only for a reader (round() was no small part of a request's cost).
        duration_ms = (
            round((finished - exchange.started) * 1000, 3)
            if journal_active or self.record_size
            else 0.0
        )
        if journal_active:
            self.emit(
                "http.request",
                method=exchange.method,
                path=target,
                status=exchange.status,
                client=exchange.client,
                duration_ms=duration_ms,
                **({"namespace": exchange.namespace} if exchange.namespace is not None else {}),
            )
        if self.access_log:
            self._access(exchange, target)
        if self.record_size:
            body = bytes(exchange.body.kept)
            self.records.append(
                {
                    "time": exchange.started,
                    "client": exchange.client,
                    "method": exchange.method,
                    "path": target,
                    "protocol": exchange.version,
                    "headers": [
                        [n.decode("latin-1"), v.decode("latin-1")] for n, v in exchange.headers
                    ],
                    "body": body.decode("utf-8", "replace"),
                    "body_size": exchange.body.size,
                    "body_truncated": exchange.body.size > len(body),
                    **({"body_cut": True} if exchange.body.cut_short else {}),
                    "status": exchange.status,
                    "duration_ms": duration_ms,
                    "route": exchange.route,
                    "unmatched": exchange.unmatched,
                    **({"near_miss": exchange.near_miss} if exchange.near_miss else {}),
                    **({"namespace": exchange.namespace} if exchange.namespace else {}),
                }
            )

    def _access(self, exchange: Exchange, target: str) -> None:
        """
        The access log's line, as the event C{log.info("{access}", ...)} makes,
        handed to the logger's observer (levels, netd's file) without
        C{Logger.emit}'s check of its own level constant and copies of the
        fields: those were a tenth of a small response's cost.
        """
        self.dates.refresh()
        client, method, version, status, sent = (
            exchange.client,
            exchange.method,
            exchange.version,
            exchange.status,
            exchange.sent,
        )
        by_name = exchange.by_name()
        referer = _log_text(by_name.get(b"referer"))
        agent = _log_text(by_name.get(b"user-agent"))
        log = self.log
        log.observer(
            {
                "access": f'{client} - - [{self.dates.log}] "{method} {target} {version}" '
                f'{status} {sent or "-"} "{referer}" "{agent}"',
                "client": client,
                "method": method,
                "path": target,
                "protocol": version,
                "status": status,
                "size": sent,
                "referer": referer,
                "user_agent": agent,
                "log_logger": log,
                "log_level": LogLevel.info,
                "log_namespace": log.namespace,
                "log_source": log.source,
                "log_format": "{access}",
                "log_time": time.time(),
            }
        )


def _reads_bodies(routes: tuple[Route, ...]) -> bool:
    return any(
        (route.when is not None and route.when.body is not None)
        or (route.stub is not None and route.stub.reads_body)
        for route in routes
    )


def authority(exchange: Exchange) -> bytes | None:
    """
    The host (and port) a request names: an absolute-form target's, whose Host
    field is then ignored (RFC 9112 3.2.2), else its Host field.
    """
    target = exchange.target
    if not target.startswith("/") and "://" in target[:8]:
        netloc = urllib.parse.urlsplit(target).netloc.rpartition("@")[2]
        return netloc.encode("latin-1") or None
    return exchange.header(b"host")


def _host(exchange: Exchange) -> str | None:
    """The host a request names, without its port, as a rule's C{host} matches it."""
    host = authority(exchange)
    if host is None:
        return None
    text = host.decode("latin-1")
    if text.startswith("["):
        return text[1:].partition("]")[0]
    return text.rpartition(":")[0] if text.count(":") == 1 else text


def _text(value: bytes | None) -> str | None:
    return value.decode("latin-1") if value is not None else None


def _read(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


def _log_text(value: bytes | None) -> str:
    if value is None:
        return "-"
    return value.decode("latin-1").replace("\\", "\\\\").replace('"', '\\"')


# RFC 3986 pchar (sub-delims, ':' and '@' stay literal, as nginx writes them) and '/'.
_PATH_SAFE = "/!$&'()*+,;=:@~"


def _path_of(target: str) -> str | None:
    """
    The path of a request target (origin or absolute form), normalised once, or None.

    Percent-decoded once (bytes that are not UTF-8 become surrogate escapes, as
    file names do) and repeated slashes collapsed, so that routes, the proxy,
    redirects and the static root all judge the same path: matching the raw
    target while the root decoded it let C{/%73ecret} and C{//secret} past a
    route guarding C{/secret}.  None (400) for a target without a path, and for
    encoded slashes or backslashes, NULs and dot segments: no client needs
    them, and each means different things to different readers.
    """
    if target.startswith("/"):
        raw = target.partition("?")[0]
    elif target[:8].lower().startswith(("http://", "https://")):  # a scheme in any case
        raw = urllib.parse.urlsplit(target).path or "/"
    else:
        return None
    if (
        raw.isascii()
        and "%" not in raw
        and "//" not in raw
        and "/." not in raw
        and "\\" not in raw
        and "\x00" not in raw
    ):
        return raw  # nearly every request: nothing to decode or collapse
    lowered = raw.lower()
    if "%2f" in lowered or "%5c" in lowered:
        return None
    try:
        # The wire hands targets over as latin-1 text: these are the bytes sent.
        decoded = urllib.parse.unquote_to_bytes(raw.encode("latin-1"))
    except UnicodeEncodeError:
        return None
    if b"\\" in decoded or b"\x00" in decoded:
        return None
    segments = [s for s in decoded.split(b"/") if s]
    if any(s in (b".", b"..") for s in segments):
        return None
    path = b"/" + b"/".join(segments)
    if segments and decoded.endswith(b"/"):
        path += b"/"
    return path.decode("utf-8", "surrogateescape")


def quote_path(path: str) -> str:
    """A normalised path (or a piece of one) as it goes on the wire: percent-encoded once."""
    return urllib.parse.quote(path.encode("utf-8", "surrogateescape"), safe=_PATH_SAFE)


def query_of(target: str) -> str:
    """The query of a request target, as the client sent it."""
    if target.startswith("/"):
        return target.partition("?")[2]
    return urllib.parse.urlsplit(target).query
