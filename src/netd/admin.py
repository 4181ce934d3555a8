"""
The admin API: JSON over HTTP for operators and test suites.

The admin code knows no service kind: per-service views come from each kind's
L{netd.kinds.AdminView}s, counters from L{netd.events.ServiceStats}.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLServerConnectionCreator,
    IReactorTime,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from netd import endpoints
from netd.config import AdminConfig, ListenerConfig
from netd.connections import ConnectionSet, TrackingFactory, cut_if_unread, describe_address
from netd.dashboard import Dashboard
from netd.events import Event, Journal, ServiceStats
from netd.eventstream import EventStreams, StreamRefused
from netd.kinds import AdminRoot, AdminView, IOwesReplies, RepliesOwed, ViewRefused
from netd.later import answer_later, finish
from netd.listeners import ListenerGroup
from netd.namespaces import in_namespace
from netd.namespaces import key as namespace_key
from netd.rules import is_name
from netd.schema import ConfigErrors
from netd.services import admin_root

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import Metric

    from netd.runtime import Daemon

__all__ = ["AdminServer"]

log = Logger(namespace="netd.admin")

MAX_WAIT = 300.0
# The admin listener's name in the journal and in metrics (with type "admin").
NAME = "admin"
_BUSY_BODY = b'{"error": "too many admin connections"}\n'
_BUSY_REPLY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\nRetry-After: 1\r\nConnection: close\r\n\r\n%s"
    % (len(_BUSY_BODY), _BUSY_BODY)
)
_REASONS = {408: b"Request Timeout", 413: b"Payload Too Large"}
_METRIC_NAME = re.compile(r"[^a-zA-Z0-9_]")


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


class _LimitedRequest(Request):
    """Refuses bodies over C{max_body} before reading them (413), then closes."""

    channel: _AdminChannel
    _refused = False
    _body_bytes = 0
    # A long poll's way to answer at once: its client half-closed, so it waits
    # for the answer, not for events still to come.
    answer_now: Callable[[], None] | None = None

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.channel.site.config.max_body:
            self._refuse()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._body_bytes += len(data)
        if self._body_bytes > self.channel.site.config.max_body:
            self._refuse()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if not self._refused:
            super().requestReceived(command, path, version)

    def _refuse(self) -> None:
        self._refused = True
        max_body = self.channel.site.config.max_body
        self.channel.refuse(413, f"request body over {max_body} bytes")


@implementer(IOwesReplies)
class _AdminChannel(HTTPChannel):
    """
    HTTP/1.1 with deadlines that a trickling client cannot push back.

    Twisted's C{timeOut} is an idle timeout that every byte resets: one header
    byte every few seconds holds a connection for ever.  Here a request's head
    must be complete within C{header_timeout} of the connection opening (or of
    its first byte, after an earlier answer), and its body within
    C{body_timeout} of the head; bytes move neither deadline.  TimeoutMixin's
    one timer carries them, and between requests Twisted's own idle timeout
    (C{idle_timeout}), which Twisted stops while an answer is produced: a long
    poll is not idle.
    """

    site: _AdminSite
    transport: Any
    # waiting (new, nothing read) -> head -> body -> answering -> idle -> head ...;
    # closing once the connection is to end.
    _stage = "waiting"

    def connectionMade(self) -> None:
        super().connectionMade()
        self.setTimeout(self.site.config.header_timeout)
        self._owed = RepliesOwed()

    def when_replied(self) -> Deferred[None]:
        # Only a request read whole is owed an answer: one cut short by the
        # client's FIN never will be whole, and its connection closes now.
        for request in list(self.requests):
            if request.answer_now is not None:
                request.answer_now()
        return self._owed.wait(self._stage == "answering" and bool(self.requests))

    def dataReceived(self, data: bytes) -> None:
        if self._stage == "closing":
            return  # answered and closing: nothing more is read
        if cut_if_unread(self.transport):
            # Requests keep coming, answers are not read: not our memory.  Asked
            # before the next request, not after one: an answer may be large.
            return
        if self._stage == "idle":
            self.setTimeout(self.site.config.header_timeout)
        if self._stage in ("waiting", "idle"):
            self._stage = "head"
        super().dataReceived(data)

    def resetTimeout(self) -> None:
        """Bytes move no deadline: a trickle is what they are for."""

    def allHeadersReceived(self) -> None:
        super().allHeadersReceived()
        if self._stage == "head" and self.length != 0:
            self._stage = "body"
            self.setTimeout(self.site.config.body_timeout)

    def allContentReceived(self) -> None:
        if self._stage == "closing":
            return  # a refused body's end: nothing to answer
        self._stage = "answering"
        # Twisted stops the timer while the answer is produced and restores
        # this period, the idle timeout, once it is sent.
        self.setTimeout(self.site.config.idle_timeout)
        super().allContentReceived()

    def requestDone(self, request: Request) -> None:
        # Before Twisted replays pipelined bytes through dataReceived.
        self._stage = "idle"
        super().requestDone(request)
        if not self.requests:
            self._owed.settled()

    def timeoutConnection(self) -> None:
        stage = self._stage
        if stage in ("head", "body"):
            limit = self.site.config.header_timeout
            if stage == "body":
                limit = self.site.config.body_timeout
            self.site.timed_out(stage, self.transport)
            self._write_error(408, f"request {stage} not complete within {limit:g} s")
        super().timeoutConnection()

    def close_gracefully(self) -> None:
        """Asked by a retiring admin API: close once the request in hand is answered."""
        self.persistent = False
        for request in list(self.requests):
            if request.answer_now is not None:
                request.answer_now()  # a long poll or an event stream ends now
        if not self.requests:
            self.loseConnection()

    def loseConnection(self) -> None:
        # Closing waits for the client to read what is pending; one that never
        # does is cut after abortTimeout, as Twisted does after its own timeout.
        self._stage = "closing"
        self.setTimeout(None)
        if self._abortingCall is None:
            self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)
        super().loseConnection()

    def refuse(self, status: int, message: str) -> None:
        """Answer an error that ends the connection, whatever is still unread."""
        if self._stage == "closing":
            return
        self._write_error(status, message)
        self.loseConnection()

    def _write_error(self, status: int, message: str) -> None:
        body = json.dumps({"error": message}).encode() + b"\n"
        head = (
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n" % (status, _REASONS[status], len(body))
        )
        # The method is known once the request line is in.
        if getattr(self, "_command", None) == b"HEAD":
            body = b""
        self.transport.write(head + body)


class _AdminSite(Site):
    """The admin resource behind L{_AdminChannel}s, HTTP/1.1 only."""

    protocol = _AdminChannel  # type: ignore[assignment]
    requestFactory = _LimitedRequest
    noisy = False
    displayTracebacks = False

    def __init__(
        self,
        resource: AdminResource,
        config: AdminConfig,
        reactor: IReactorTime,
        stats: ServiceStats,
        journal: Journal,
        toxiproxy_only: bool = False,
    ) -> None:
        super().__init__(resource, timeout=config.idle_timeout, reactor=reactor)
        self.config = config
        self.stats = stats
        self.journal = journal
        # An admin toxiproxy: listener's site: Toxiproxy's API alone, no token asked.
        self.toxiproxy_only = toxiproxy_only

    def acceptableProtocols(self) -> list[bytes]:
        # No h2 over TLS: the deadlines are HTTP/1.1's, and an operator's API needs no more.
        return [b"http/1.1"]

    def timed_out(self, stage: str, transport: Any) -> None:
        self.stats.count(f"{stage}_timeouts")
        self.journal.emit(
            NAME, "request.timeout", stage=stage, client=describe_address(transport.getPeer())
        )


class _RefusalsOnly(Journal):
    """
    The daemon's journal as the admin listener's connections see it: refusals
    and idle cuts go in, each connection's opening and closing do not (the
    connection set records those only while its journal is C{active}).
    Journal readers poll through this listener: each poll would add events.
    """

    def __init__(self, journal: Journal, clock: IReactorTime) -> None:
        super().__init__(clock, size=0, active=False)
        self._journal = journal

    def emit(self, service: str, type: str, **fields: Any) -> Event:
        return self._journal.emit(service, type, **fields)


class AdminResource(Resource):
    isLeaf = True

    def __init__(
        self,
        daemon: Daemon,
        token: str | None,
        own_counters: Callable[[], dict[str, int]],
    ) -> None:
        super().__init__()
        self.daemon = daemon
        self.token = token.encode() if token else None
        self.collector = _Collector(daemon, own_counters)
        self.registry: CollectorRegistry | None = None
        self.streams = EventStreams(daemon.journal, daemon.reactor, self._stream_cut)
        self.dashboard = Dashboard(daemon, self.token, self._login_failed)

    # Dispatch

    def render(self, request: Request) -> bytes | int:
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        try:
            answer = self._dispatch(request)
        except _HTTPError as e:
            answer = _json(request, {"error": str(e)}, e.status, e.headers)
        except ViewRefused as e:
            answer = _json(request, {"error": e.reason}, e.status)
        if isinstance(answer, bytes) and request.method == b"HEAD":
            # GET's headers without its body: given one, Twisted drops it and logs a warning.
            request.setHeader(b"Content-Length", b"%d" % len(answer))
            return b""
        return answer

    def _dispatch(self, request: Request) -> bytes | int:
        method = (request.method or b"GET").decode("latin-1")
        parts = [p.decode("utf-8", "replace") for p in request.postpath or []]
        if parts == ["healthz"]:  # says nothing but "ok", to any monitor under any name
            _allow(method, "GET", "HEAD")
            if not self.daemon.ready:
                return _text(request, "starting\n", 503)
            return _text(request, "ok\n")
        self._refuse_other_sites(request, method)
        site = getattr(request, "site", None)  # one made without a site (DummyRequest) has none
        if isinstance(site, _AdminSite) and site.toxiproxy_only:
            root = admin_root(parts[0]) if parts else None
            if root is None:
                raise _HTTPError(404, "not found: this listener serves Toxiproxy's API alone")
            return self._root(request, method, parts, root)
        if self.dashboard.is_public(parts):
            return self.dashboard.render_public(request, method, parts)
        self._authorize(request)
        if parts[:1] == ["ui"]:
            return self.dashboard.render_private(request, method, parts)
        root = admin_root(parts[0]) if parts else None
        if root is not None:
            return self._root(request, method, parts, root)
        if parts == ["metrics"]:
            _allow(method, "GET", "HEAD")
            request.setHeader(b"Content-Type", b"text/plain; version=0.0.4; charset=utf-8")
            return self._metrics()
        if parts[:1] != ["api"]:
            raise _HTTPError(404, "not found")
        return self._api(request, method, parts[1:])

    def _root(self, request: Request, method: str, parts: list[str], root: AdminRoot) -> int:
        # A kind's own API at the root (Toxiproxy's): it answers in its own shapes.
        body = request.content.read() if request.content is not None else b""
        handled = maybeDeferred(root.handle, self.daemon, method, parts, body)
        return self._deferred(request, handled, lambda answer: answer)

    def _metrics(self) -> bytes:
        # prometheus-client loads on the first scrape: an admin API nobody
        # scrapes never pays for it (~10 ms of start-up, ~0.5 MiB).
        from prometheus_client import CollectorRegistry, generate_latest

        if self.registry is None:
            self.registry = CollectorRegistry(auto_describe=False)
            self.registry.register(self.collector)
        return generate_latest(self.registry)

    def _api(self, request: Request, method: str, parts: list[str]) -> bytes | int:
        if parts == ["reload"]:
            _allow(method, "POST")
            # A reload runs to its end even if the client hangs up: stopping it
            # between releasing old listeners and binding new ones would strand both.
            return self._deferred(request, _uncancellable(self.daemon.reload()), _reload_answer)
        if parts == ["events"]:
            _allow(method, "GET", "HEAD")
            return self._events(request)
        if parts == ["events", "stream"]:
            _allow(method, "GET", "HEAD")
            return self._stream(request)
        if parts == ["services"]:
            _allow(method, "GET", "HEAD")
            return _json(request, {"services": self.daemon.describe()})
        if len(parts) == 3 and parts[0] == "tls" and parts[2] == "ca.pem":
            _allow(method, "GET", "HEAD")
            return self._ca_pem(request, parts[1])
        if parts[:1] == ["scenarios"]:
            return self._scenarios(request, method, parts[1:])
        if len(parts) == 2 and parts[0] == "namespaces":
            _allow(method, "DELETE")
            return self._forget_namespace(request, parts[1])
        if len(parts) >= 2 and parts[0] == "services":
            service = self.daemon.services_by_name.get(parts[1])
            if service is None:
                raise _HTTPError(404, f"no service {parts[1]!r}")
            if len(parts) == 2:
                _allow(method, "GET", "HEAD")
                return _json(request, service.describe())
            view = service.handlers.views.get(parts[2])
            if view is None:
                known = ", ".join(sorted(service.handlers.views)) or "none"
                raise _HTTPError(404, f"service {parts[1]} has no view {parts[2]!r} ({known})")
            if len(parts) == 3:
                return self._view(request, method, view)
            return self._view_entry(request, method, view, "/".join(parts[3:]))
        raise _HTTPError(404, "not found")

    def _ca_pem(self, request: Request, profile: str) -> bytes:
        """The CA of a C{self_signed} profile: trusting it trusts its leaves, minted ones too."""
        config = self.daemon.config.tls.get(profile)
        if config is None or not config.self_signed:
            raise _HTTPError(404, f"no self_signed TLS profile {profile!r}")
        # A few hundred bytes the profile wrote at start: no reason to defer.
        path = self.daemon.config.state_dir / "tls" / f"{profile}-ca.pem"
        try:
            pem = path.read_bytes()
        except OSError as e:
            raise _HTTPError(404, f"{path}: {e.strerror}") from None
        request.setHeader(b"Content-Type", b"application/x-pem-file")
        return pem

    def _scenarios(self, request: Request, method: str, parts: list[str]) -> bytes:
        """The named states of rules (netd.rules): read, set one, reset all."""
        scenarios = self.daemon.scenarios
        if parts == ["reset"]:
            _allow(method, "POST")
            scenarios.reset()
        elif len(parts) == 1:
            _allow(method, "GET", "HEAD", "PUT")
            if method == "PUT":
                body = _json_body(request)
                state = body.get("state") if isinstance(body, dict) else body
                if not isinstance(state, str) or not state:
                    raise _HTTPError(400, 'give the state: {"state": "NAME"}')
                # As rules name them: a state no rule could name would never match.
                if not _scenario_name(parts[0]) or not is_name(state):
                    raise _HTTPError(
                        400,
                        "a scenario and its state are names (letters, digits, '_', '.', ':', "
                        "'-'), a scenario's copy in a namespace NAME@NS",
                    )
                scenarios.set(parts[0], state)
            return _json(request, {"name": parts[0], "state": scenarios.state(parts[0])})
        elif parts:
            raise _HTTPError(404, "not found")
        else:
            _allow(method, "GET", "HEAD")
        described = scenarios.describe()
        namespace = _query(request).get("namespace")
        if namespace is not None:  # its own copies, NAME@NS (netd.rules.scoped_scenario)
            described = {n: s for n, s in described.items() if n.endswith("@" + namespace)}
        return _json(request, {"scenarios": described})

    def _forget_namespace(self, request: Request, name: str) -> int:
        """
        C{DELETE /api/namespaces/NS}: every view's entries of NS, its rules,
        its scenarios' states and its events.
        """
        namespace = namespace_key(name)
        if namespace is None:
            raise _HTTPError(400, f"not a namespace: {name!r} (letters, digits, '_', '-')")
        forgetting: list[Deferred[tuple[str, str, Any]]] = []
        for service_name, service in self.daemon.services_by_name.items():
            for view_name, view in service.handlers.views.items():
                if view.forget is not None:
                    forgetting.append(_labelled(service_name, view_name, view.forget, namespace))
        events = self.daemon.journal.forget(namespace)
        scenarios = self.daemon.scenarios.forget(namespace)

        def answer(results: list[tuple[str, str, Any]]) -> tuple[int, Any]:
            services: dict[str, dict[str, Any]] = {}
            for service_name, view_name, result in results:
                services.setdefault(service_name, {})[view_name] = result
            return 200, {
                "namespace": namespace,
                "events": events,
                "scenarios": scenarios,
                "services": services,
            }

        return self._deferred(request, gatherResults(forgetting, consumeErrors=True), answer)

    def _view(self, request: Request, method: str, view: AdminView) -> bytes | int:
        query = _query(request)
        namespace = query.get("namespace")
        if method == "DELETE" and view.clear is not None:
            if namespace is None:
                return self._deferred(request, maybeDeferred(view.clear), lambda r: (200, r))
            if view.forget is None:
                raise _HTTPError(400, "this view's entries belong to no namespace")
            # One test's cleanup in a parallel run: never the other tests' entries.
            forgetting = maybeDeferred(view.forget, namespace)
            return self._deferred(request, forgetting, lambda r: (200, r))
        if method == "POST" and view.post is not None:
            return self._deferred(
                request, maybeDeferred(view.post, _json_body(request)), lambda r: (201, r)
            )
        _allow(
            method,
            "GET",
            "HEAD",
            *(["DELETE"] if view.clear else []),
            *(["POST"] if view.post else []),
        )
        return self._deferred(
            request,
            maybeDeferred(view.list, query),
            lambda r: (200, r if namespace is None else _in_namespace(r, namespace)),
        )

    def _view_entry(self, request: Request, method: str, view: AdminView, key: str) -> bytes | int:
        if method == "PUT" and view.put is not None:
            return self._deferred(
                request, maybeDeferred(view.put, key, _json_body(request)), lambda r: (200, r)
            )
        if method == "DELETE" and view.remove is not None:
            return self._deferred(request, maybeDeferred(view.remove, key), _item_answer)
        if method == "POST" and view.act is not None:
            acted = maybeDeferred(view.act, key, _json_body(request))
            return self._deferred(request, acted, _item_answer)
        if view.item is None and view.put is None and view.remove is None and view.act is None:
            raise _HTTPError(404, "not found")
        _allow(
            method,
            *(["GET", "HEAD"] if view.item else []),
            *(["PUT"] if view.put else []),
            *(["DELETE"] if view.remove else []),
            *(["POST"] if view.act else []),
        )
        assert view.item is not None
        return self._deferred(request, maybeDeferred(view.item, key), _item_answer)

    def _refuse_other_sites(self, request: Request, method: str) -> None:
        """
        What a web page the user's browser shows must not do to the API.

        Without a token (loopback only) the API answers loopback names alone:
        a name of the attacker's that resolves to 127.0.0.1 (DNS rebinding)
        would otherwise read its answers.  A change (a method other than GET,
        HEAD, OPTIONS) from a page of another origin is refused whatever the
        credentials: a form posts JSON as text/plain without a preflight
        (OWASP's CSRF cheat sheet: verify the origin with standard headers).
        Clients that are not browsers send neither header.
        """
        host = request.getHeader(b"host")
        site = getattr(request, "site", None)
        # A Toxiproxy listener asks for no token even when the API has one.
        tokenless = self.token is None or (isinstance(site, _AdminSite) and site.toxiproxy_only)
        if tokenless and host is not None and not _loopback_host(host):
            raise _HTTPError(
                403, "without a token this API answers loopback names only (localhost, 127.0.0.1)"
            )
        if method in ("GET", "HEAD", "OPTIONS"):
            return
        fetched_from = request.getHeader(b"sec-fetch-site")
        origin = request.getHeader(b"origin")
        if fetched_from not in (None, b"same-origin", b"none") or (
            origin is not None and origin.partition(b"://")[2].lower() != (host or b"").lower()
        ):
            raise _HTTPError(403, "a page of another origin may not change anything here")

    def _authorize(self, request: Request) -> None:
        if self.token is None:
            return
        header = request.getHeader(b"authorization") or b""
        scheme, _, offered = header.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(offered.strip(), self.token):
            return
        if not header and self.dashboard.signed_in(request):
            return
        raise _HTTPError(
            401, "missing or wrong bearer token", {"WWW-Authenticate": 'Bearer realm="netd"'}
        )

    def _events(self, request: Request) -> bytes | int:
        query = _query(request)
        try:
            since = int(query.get("since", "0"))
            wait = min(float(query.get("wait", "0")), MAX_WAIT)
            if not math.isfinite(wait):
                raise ValueError(wait)
        except ValueError:
            raise _HTTPError(400, "since must be an integer and wait a number") from None
        types = [t for t in query.get("type", "").split(",") if t]
        service = query.get("service") or None
        namespace = query.get("namespace") or None
        journal = self.daemon.journal
        found = journal.wait(wait, since, service, types, namespace)
        if isinstance(request, _LimitedRequest):
            request.answer_now = lambda: journal.end_wait(found)
        return self._deferred(
            request,
            found,
            lambda events: (
                200,
                {
                    "events": [e.as_json() for e in events],
                    "last_id": events[-1].id if events else max(since, 0),
                },
            ),
        )

    def _stream(self, request: Request) -> bytes | int:
        try:
            stream = self.streams.open(request, _query(request))
        except StreamRefused as e:
            raise _HTTPError(400, str(e)) from None
        if stream is None:
            return b""
        if isinstance(request, _LimitedRequest):
            request.answer_now = stream.finish
        return NOT_DONE_YET

    def _login_failed(self, client: str) -> None:
        self.daemon.journal.emit(NAME, "login.failed", client=client)

    def _stream_cut(self, client: str, unread: int) -> None:
        self.daemon.journal.emit(NAME, "stream.cut", client=client, unread=unread)

    def _deferred(
        self,
        request: Request,
        pending: Deferred[Any],
        answer: Callable[[Any], tuple[int, Any]],
    ) -> int:
        """Answer once C{pending} fires; cancel it if the client goes away."""

        def respond(result: Any) -> None:
            if isinstance(result, Failure):  # a view refused: its status, or each error at its path
                status, refusal = _refusal(result.value)
                finish(request, _json(request, refusal, status))
                return
            status, body = answer(result)
            if body is None:
                request.setResponseCode(status)
                request.finish()
            elif isinstance(body, bytes):
                request.setResponseCode(status)
                request.setHeader(b"Content-Type", b"application/octet-stream")
                finish(request, body)
            else:
                finish(request, _json(request, body, status))

        return answer_later(request, pending, respond, (ViewRefused, ConfigErrors))


def _uncancellable(work: Deferred[Any]) -> Deferred[Any]:
    """A Deferred for C{work}'s result whose cancellation leaves C{work} alone."""
    result: Deferred[Any] = Deferred()

    def relay(outcome: Any) -> None:
        if result.called:  # cancelled: the client is gone, nobody to tell
            return
        if isinstance(outcome, Failure):
            result.errback(outcome)
        else:
            result.callback(outcome)

    work.addBoth(relay)
    return result


def _refusal(error: BaseException | None) -> tuple[int, Any]:
    """The answer to a view's refused write: a status and a reason, or each error at its path."""
    if isinstance(error, ViewRefused):
        return error.status, {"error": error.reason}
    assert isinstance(error, ConfigErrors)
    return 400, {
        "error": str(error),
        "errors": [{"path": e.path, "message": e.message} for e in error.errors],
    }


def _json_body(request: Request) -> Any:
    """A write's JSON body (already bounded by C{max_body}); 400 if it is not JSON."""
    raw = request.content.read() if request.content is not None else b""
    try:
        return json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError) as e:
        raise _HTTPError(400, f"the body is not JSON: {e}") from None
    except RecursionError:  # thousands of nested brackets: not a map anyone wrote
        raise _HTTPError(400, "the body is not JSON: nested too deeply") from None


def _loopback_host(host: bytes) -> bool:
    """Whether a Host header names the loopback: localhost (RFC 6761 6.3) or an address."""
    name = host.decode("latin-1").lower()
    if name.startswith("["):
        name = name[1:].partition("]")[0]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    name = name.removesuffix(".")  # a fully qualified localhost. is localhost
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # [::ffff:127.0.0.1]
    return bool((mapped or address).is_loopback)


def _scenario_name(text: str) -> bool:
    """A scenario's name, or its copy in a namespace (C{signup@t42}, L{scoped_scenario})."""
    name, scoped, namespace = text.partition("@")
    return is_name(name) and (not scoped or namespace_key(namespace) == namespace)


def _labelled(
    service: str, view: str, forget: Callable[[str], Any], namespace: str
) -> Deferred[tuple[str, str, Any]]:
    def label(result: Any) -> tuple[str, str, Any]:
        return service, view, result

    return maybeDeferred(forget, namespace).addCallback(label)


def _in_namespace(listed: Any, namespace: str) -> Any:
    """
    A view's list cut to one namespace's entries: the list itself, or each
    list a JSON object wraps (C{{"messages": [...]}}).  A view that pages
    filters before paging, which leaves nothing for this to drop.
    """
    if isinstance(listed, list):
        return in_namespace(listed, namespace)
    if isinstance(listed, dict):
        return {
            name: in_namespace(value, namespace) if isinstance(value, list) else value
            for name, value in listed.items()
        }
    return listed


def _reload_answer(result: Any) -> tuple[int, Any]:
    return (200 if result.ok else 400), result.as_json()


def _item_answer(item: Any) -> tuple[int, Any]:
    if item is None:
        return 404, {"error": "not found"}
    return 200, item


def _allow(method: str, *allowed: str) -> None:
    if method not in allowed:
        raise _HTTPError(405, f"method {method} not allowed", {"Allow": ", ".join(allowed)})


def _query(request: Request) -> dict[str, str]:
    query = {
        key.decode("utf-8", "replace"): values[-1].decode("utf-8", "replace")
        for key, values in (request.args or {}).items()
        if values
    }
    given = query.pop("namespace", "")
    if given:
        # As entries are labelled: folded to its key (X-Netd-Namespace: T42 is t42).
        namespace = namespace_key(given)
        if namespace is None:
            raise _HTTPError(400, f"not a namespace: {given!r} (letters, digits, '_', '-')")
        query["namespace"] = namespace
    return query


def _json(
    request: Request, body: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    for name, value in (headers or {}).items():
        request.setHeader(name.encode(), value.encode())
    return json.dumps(body, indent=1, default=str).encode() + b"\n"


def _text(request: Request, body: str, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    return body.encode()


class _Collector:
    """Reads the daemon's counters at scrape time: nothing to keep in step."""

    def __init__(self, daemon: Daemon, own_counters: Callable[[], dict[str, int]]) -> None:
        self.daemon = daemon
        self.own_counters = own_counters

    def collect(self) -> list[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        fixed: list[tuple[str, Any, str, str]] = [
            ("connections_total", CounterMetricFamily, "netd_connections", "connections accepted"),
            ("connections_active", GaugeMetricFamily, "netd_connections_active", "open now"),
            (
                "connections_refused",
                CounterMetricFamily,
                "netd_connections_refused",
                "refused by max_connections",
            ),
            ("bytes_in", CounterMetricFamily, "netd_received_bytes", "bytes received"),
            ("bytes_out", CounterMetricFamily, "netd_sent_bytes", "bytes sent"),
            ("errors", CounterMetricFamily, "netd_errors", "protocol and internal errors"),
        ]
        families: dict[str, Any] = {
            key: kind(name, help, labels=["service", "type"]) for key, kind, name, help in fixed
        }
        # The admin listener's own connections, under a type no service kind has.
        rows: list[tuple[list[str], Mapping[str, int], Mapping[str, float]]] = [
            ([NAME, NAME], self.own_counters(), {})
        ]
        for name, service in self.daemon.services_by_name.items():
            rows.append(
                ([name, service.config.type], service.describe()["counters"], service.stats.gauges)
            )
        for labels, counters, gauges in rows:
            for key, value in counters.items():
                family = families.get(key)
                if family is None:
                    metric = "netd_" + _METRIC_NAME.sub("_", key)
                    family = families[key] = CounterMetricFamily(
                        metric, f"{key} (service-specific)", labels=["service", "type"]
                    )
                family.add_metric(labels, value)
            for key, level in gauges.items():
                gauge_key = f"gauge:{key}"
                if gauge_key not in families:
                    families[gauge_key] = GaugeMetricFamily(
                        "netd_" + _METRIC_NAME.sub("_", key),
                        f"{key} (service-specific)",
                        labels=["service", "type"],
                    )
                families[gauge_key].add_metric(labels, level)
        up = GaugeMetricFamily("netd_ready", "1 once every listener is bound")
        up.add_metric([], 1 if self.daemon.ready else 0)
        return [up, *families.values()]


class AdminServer(ListenerGroup):
    """The admin API's listeners and site."""

    def __init__(
        self,
        daemon: Daemon,
        config: AdminConfig,
        creators: Mapping[str, IOpenSSLServerConnectionCreator],
    ) -> None:
        self.daemon = daemon
        self.config = config
        self.creators = creators
        self.label = "admin"
        self.summary_prefix = "admin API"
        self.listener_configs = (*config.listen, *config.toxiproxy)
        self.listeners = []
        self.stats = ServiceStats()
        reactor = daemon.reactor
        self.connections = ConnectionSet(
            reactor,
            NAME,
            self.stats,
            _RefusalsOnly(daemon.journal, reactor),
            config.max_connections,
            # Only a backstop here: the channel's own deadlines close idle and
            # slow connections, but an answer that never comes (or is never
            # read) is cut once quiet for longer than the longest long poll.
            MAX_WAIT + config.idle_timeout,
            _BUSY_REPLY,
            # Idle connections held open would lock tests and dashboards out for
            # the whole header deadline; every client of the API speaks first.
            evict_silent=True,
        )
        resource = AdminResource(daemon, config.token, self.counters)
        self.site = _AdminSite(resource, config, reactor, self.stats, daemon.journal)
        self.toxiproxy_site = _AdminSite(
            resource, config, reactor, self.stats, daemon.journal, toxiproxy_only=True
        )

    def retire(self, grace: float) -> Deferred[None]:
        """
        Replaced by a reload: stop listening, close idle connections now and the
        others once the request in hand is answered (at most C{grace} seconds).
        """
        self.stop_listening()
        draining = self.connections.drain(grace)
        draining.addCallback(lambda _: self.connections.stop())
        return draining

    def counters(self) -> dict[str, int]:
        counters = self.stats.snapshot()
        live_in, live_out = self.connections.bytes_in_flight()
        counters["bytes_in"] += live_in
        counters["bytes_out"] += live_out
        return counters

    def _listen_one(
        self, listener: ListenerConfig, held: endpoints.HeldSocket | None
    ) -> Deferred[IListeningPort]:
        creator = self.creators[listener.tls_profile] if listener.tls_profile else None
        endpoint = endpoints.server_endpoint(
            self.daemon.reactor,
            listener.endpoint,
            Path(self.daemon.config.file).parent,
            creator,
            held=held,
        )
        site = self.toxiproxy_site if listener.protocol == "toxiproxy" else self.site
        factory = TrackingFactory(site, self.connections)
        listening: Deferred[IListeningPort] = endpoint.listen(factory)
        return listening
