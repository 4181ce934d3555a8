"""
The C{http} service kind: static files, canned routes, redirects, a reverse proxy,
request recording and HTTP/2, from one section of the service map.

    web:
      type: http
      listen: ["tcp:8080", {endpoint: "ssl:8443", tls: lab}]
      root: www
      routes:
        - {path: /health, status: 200, body: "ok\\n"}
        - {path: /api/, proxy: "http://127.0.0.1:9000/"}
        - {path: /old, redirect: /new, status: 301}
      record: 100

HTTP/1.1 runs on a lean connection of our own over llhttp (L{netd.services.http.wire});
HTTP/2 goes through twisted.web; both hand requests to the same L{App}.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable, Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList

from netd.config import ListenerConfig, ServiceConfig, TLSProfiles
from netd.kinds import AdminView, BuildContext, Handlers, ServiceKind
from netd.namespaces import Derive, SourceReader, suffix_source
from netd.namespaces import key as namespace_key
from netd.records import Record
from netd.rules import Vocabulary, exact, fields, glob
from netd.schema import Section, Value, compose
from netd.services.http.app import App, Reply, Route, StaticOptions
from netd.services.http.match import Conditions, path_pattern, read_conditions
from netd.services.http.record import recorders
from netd.services.http.static import StaticFiles
from netd.services.http.stubs import RoutesView, read_stub
from netd.services.http.websocket import read_script
from netd.services.http.wire import Limits, busy_reply, factory_for

if TYPE_CHECKING:
    from netd.services.http.proxy import Proxy
    from netd.services.http.record import Recorder

__all__ = ["HTTP", "Limits", "Options", "Route"]

_REDIRECTS = (301, 302, 303, 307, 308)
_FRAMING = ("content-length", "transfer-encoding")


@attrs.frozen(repr=False)
class Options(Record):
    root: Path | None = None
    listing: bool = False
    routes: tuple[Route, ...] = ()
    record: int = 0
    record_body: int = 65536
    access_log: bool = True
    http2: bool = True
    limits: Limits = attrs.field(factory=Limits)


def parse(section: Section, profiles: TLSProfiles) -> Options:
    root_value = section.get("root")
    root = None
    if root_value is not None:
        root = root_value.as_path()
        if root_value.is_scalar and not root.is_dir():
            root_value.error(f"not a directory: {root}")
    no_routes: tuple[Route, ...] = ()
    options = Options(
        root=root,
        listing=section.flag("listing", False),
        routes=section.read("routes", _routes, no_routes)
        + section.read("routes_from", _routes_from, no_routes)
        + section.read("openapi", _openapi_routes, no_routes),
        record=section.integer("record", 0, minimum=0, maximum=100_000),
        record_body=section.integer("record_body", 65536, minimum=0, maximum=16 << 20),
        access_log=section.flag("access_log", True),
        http2=section.flag("http2", True),
        limits=section.read("limits", _limits, Limits()),
    )
    return options


def _limits(value: Value) -> Limits:
    section = value.section()
    defaults = Limits()
    limits = Limits(
        max_request_line=section.integer(
            "max_request_line", defaults.max_request_line, minimum=64, maximum=1 << 20
        ),
        max_header_bytes=section.integer(
            "max_header_bytes", defaults.max_header_bytes, minimum=256, maximum=1 << 20
        ),
        max_headers=section.integer("max_headers", defaults.max_headers, minimum=1, maximum=10000),
        max_body=section.integer("max_body", defaults.max_body, minimum=0),
        header_timeout=section.number("header_timeout", defaults.header_timeout, minimum=0.1),
        body_timeout=section.number("body_timeout", defaults.body_timeout, minimum=0.1),
        keepalive_timeout=section.number(
            "keepalive_timeout", defaults.keepalive_timeout, minimum=0.1
        ),
        keepalive_requests=section.integer(
            "keepalive_requests", defaults.keepalive_requests, minimum=1
        ),
    )
    section.finish()
    return limits


def _route(value: Value) -> Route:
    section = value.section()
    path_value = section.require("path")
    path, pattern = "/", None
    if path_value is not None and path_value.is_mapping:
        pattern = path_pattern(path_value, "")
        path = pattern.pattern if pattern is not None else "/"
    elif path_value is not None:
        path = path_value.as_str("/")
        if path_value.is_scalar and not path.startswith("/"):
            path_value.error("a route path starts with /")
        pattern = path_pattern(path_value, path)
    when = read_conditions(section.get("method"), section.get("match"))
    route_id = section.optional_str("id") or ""
    priority = section.integer("priority", 5, minimum=1, maximum=1_000_000)
    stub = read_stub(section, value, _headers)
    redirect = section.optional_str("redirect")
    proxy_value = section.get("proxy")
    websocket = section.read("websocket", read_script, None)
    canned = stub is not None or any(section.has(k) for k in ("body", "body_file"))
    kinds = (redirect is not None, proxy_value is not None, canned, websocket is not None)
    if sum(map(bool, kinds)) > 1:
        value.error("a route is one of: a canned answer (body), a redirect, a proxy, a websocket")
    status = 302 if redirect is not None else 200
    headers: tuple[tuple[str, str], ...] = ()
    body_text = body_file = None
    if stub is None:
        status_value = section.get("status")
        if status_value is not None:
            status = status_value.as_int(status, minimum=100, maximum=599)
            if redirect is not None and status not in _REDIRECTS:
                status_value.error(f"a redirect status is one of {', '.join(map(str, _REDIRECTS))}")
        headers = section.read("headers", _headers, ())
        body_text = section.optional_str("body")
        body_file = section.file_path("body_file")
        if body_file is not None and not body_file.is_file():
            entry = section.get("body_file")
            assert entry is not None
            entry.error(f"not a file: {body_file}")
        if body_text is not None and body_file is not None:
            value.error("give body or body_file, not both")
    proxy = None
    if proxy_value is not None:
        proxy = proxy_value.as_str()
        parts = urllib.parse.urlsplit(proxy)
        if proxy_value.is_scalar and (parts.scheme not in ("http", "https") or not parts.netloc):
            proxy_value.error(f"not an http:// or https:// URL: {proxy!r}")
    timeout = section.number("timeout", 30.0, minimum=0.1)
    record_to = section.file_path("record_to")
    record_secrets = section.flag("record_secrets", False)
    if record_to is not None:
        entry = section.get("record_to")
        assert entry is not None
        if proxy_value is None:
            entry.error("only a proxy route records")
        elif not record_to.parent.is_dir():
            entry.error(f"not a directory: {record_to.parent}")
    section.finish()
    return Route(
        path=path,
        prefix=pattern is None and path.endswith("/"),
        status=status,
        headers=headers,
        body=body_text.encode() if body_text is not None else None,
        body_file=str(body_file) if body_file is not None else None,
        redirect=redirect,
        proxy=proxy,
        timeout=timeout,
        pattern=pattern,
        glob=pattern is not None and not (path_value is not None and path_value.is_mapping),
        when=when,
        priority=priority,
        id=route_id,
        stub=stub,
        websocket=websocket,
        record_to=str(record_to) if record_to is not None else None,
        record_secrets=record_secrets,
    )


def _routes(value: Value, name: str = "routes") -> tuple[Route, ...]:
    """The map's routes, each with an id: its own, or where it stands (C{routes[2]})."""
    routes = value.list_of(_route)
    named = [r if r.id else attrs.evolve(r, id=f"{name}[{i}]") for i, r in enumerate(routes)]
    seen: set[str] = set()
    for route, element in zip(named, value.elements(), strict=False):
        if route.id in seen:
            element.error(f"another route has the id {route.id!r}")
        seen.add(route.id)
    return tuple(named)


def _routes_from(value: Value) -> tuple[Route, ...]:
    """Routes kept in other files (recorded ones, say), each read as the map's are."""
    found: list[Route] = []
    for entry in value.elements(single=True):
        path = entry.as_path()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            entry.error(f"cannot read {path}: {e}")
            continue
        node = compose(text, str(path), value.problems)
        if node is None:
            continue
        routes = Value(node, "", str(path), path.parent, value.problems)
        if routes.is_null:
            continue  # an empty recording: nothing to replay yet
        found.extend(_routes(routes, path.name))
    return tuple(found)


def _openapi_routes(value: Value) -> tuple[Route, ...]:
    """A route for each operation of an OpenAPI description (L{netd.services.http.openapi})."""
    path = value.as_path()
    try:
        # Loaded only for a map that names a file: it brings werkzeug and jsonschema.
        from netd.services.http import openapi
    except ImportError as e:
        value.error(f"needs openapi-core: pip install 'netd[openapi]' ({e})")
        return ()
    try:
        found = openapi.operations(path)
    except openapi.OpenAPIError as e:
        value.error(str(e))
        return ()
    return tuple(
        Route(
            path=operation.path,
            prefix=False,
            pattern=operation.pattern,
            when=Conditions(methods=frozenset({operation.method})),
            id=f"openapi:{operation.name}",
            stub=operation.stub,
        )
        for operation in found
    )


def _headers(value: Value) -> tuple[tuple[str, str], ...]:
    """C{{NAME: VALUE}}; C{[VALUE, ...]} sends the header once for each (Set-Cookie)."""
    found = []
    for name, entry in value.items():
        for item in entry.elements() if entry.is_sequence else [entry]:
            text = item.as_str()
            if not name or any(c in name for c in " \t\r\n:") or any(c in text for c in "\r\n\0"):
                item.error("not a valid header name and value")
                continue
            try:
                name.encode("latin-1")
                text.encode("latin-1")
            except UnicodeEncodeError:
                item.error("headers are latin-1 text")
                continue
            if name.lower() in _FRAMING:
                # The framing is the body's: a configured length was announced to
                # HEAD (and an unparsable one answered 400) while GET sent the body.
                item.error("set by netd from the body")
                continue
            found.append((name, text))
    return tuple(found)


class _Running(Service):
    """
    Hands the run-time routes on to the next build once this one serves, and its
    C{record_to} files to its recorders; when it stops, closes the proxy's
    kept-alive upstream connections and waits for recordings still read back,
    so the exchanges waiting for them are written.
    """

    def __init__(
        self,
        routes: RoutesView,
        carried: dict[str, Any],
        proxy: Proxy | None,
        recorders: Iterable[Recorder],
    ) -> None:
        self.routes = routes
        self.carried = carried
        self.proxy = proxy
        self.recorders = tuple(recorders)

    def startService(self) -> None:
        super().startService()
        self.routes.publish(self.carried)
        for recorder in self.recorders:
            recorder.start()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        for recorder in self.recorders:
            recorder.stop()
        waits = [recorder.read for recorder in self.recorders]
        if self.proxy is not None:
            waits.append(self.proxy.close())
        return DeferredList(waits).addCallback(lambda _: None) if waits else None


def build(service: ServiceConfig, context: BuildContext) -> Handlers:
    options: Options = service.options
    proxy = None
    if any(route.proxy for route in options.routes):
        # Imported here: the proxy loads twisted.web.client, which a map
        # without a proxy route never needs.
        from netd.services.http.proxy import Proxy

        proxy = Proxy(context.reactor, context.stats, context.log)
    app = App(
        clock=context.reactor,
        routes=options.routes,
        files=(
            StaticFiles(StaticOptions(str(options.root), options.listing), context.reactor)
            if options.root
            else None
        ),
        record=options.record,
        record_body=options.record_body,
        access_log=options.access_log,
        log=context.log,
        stats=context.stats,
        emit=context.emit,
        proxy=proxy,
        rules=context.rules,
        namespaces=context.namespaces,
        in_thread=context.in_thread,
        journal_active=lambda: context.journal.active,
        recording=recorders(context),
    )

    def stream(listener: ListenerConfig) -> Any:
        return factory_for(app, options.limits, listener.tls, options.http2)

    routes = RoutesView(app, _route)
    for route_id in routes.restore(context.carried):
        context.log.warn(
            "run-time route {route} not kept across the reload: the map has its id, "
            "or it no longer reads",
            route=route_id,
        )
    return Handlers(
        stream=stream,
        busy_reply=busy_reply(),
        service=_Running(routes, context.carried, proxy, app.recorders.values()),
        keep=partial(routes.keep, context.carried),
        kept_views=frozenset({"routes"}),
        views={
            "requests": AdminView(
                list=app.list_requests, clear=app.clear_requests, forget=app.forget_requests
            ),
            "routes": AdminView(list=routes.list, post=routes.post, remove=routes.remove),
        },
    )


def _workers_refusal(options: Options) -> str | None:
    if options.record:
        return "'record' keeps the requests in one process (leave it out, or run one process)"
    if any(route.record_to for route in options.routes):
        # Each worker would append its own exchanges to the one file.
        return "a route's 'record_to' writes one file from one process (run one process)"
    return None


def _reply(value: Value) -> Reply | None:
    """
    A rule's C{reply}: C{{status, headers, body}}, each optional (200, none,
    empty), or a bare status.
    """
    if value.is_scalar:
        return Reply(status=value.as_int(200, minimum=100, maximum=599))
    section = value.section()
    no_headers: tuple[tuple[str, str], ...] = ()
    headers = section.read("headers", _headers, no_headers)
    reply = Reply(
        status=section.integer("status", 200, minimum=100, maximum=599),
        headers=tuple((n.encode("latin-1"), v.encode("latin-1")) for n, v in headers),
        body=section.text("body").encode(),
    )
    section.finish(known="status, headers, body")
    return reply


RULES = Vocabulary(
    match={
        "method": exact(),
        "path": glob(case_sensitive=True),
        "host": glob(),
        "header": fields(),
    },
    acts={"reply": _reply},
    generic=("delay", "throttle", "reset", "close", "stall"),
)

NAMESPACE_HEADER = "X-Netd-Namespace"


@attrs.frozen(repr=False)
class Header(Record):
    """C{header}: the namespace a request names in a header."""

    name: str

    def __call__(self, carried: Mapping[str, Any]) -> str | None:
        lookup = carried.get("header")
        return namespace_key(lookup(self.name.lower())) if lookup is not None else None


def _header_source(argument: Value | None) -> Derive | None:
    """C{header} (C{X-Netd-Namespace}), or C{{header: NAME}}."""
    name = NAMESPACE_HEADER
    if argument is not None:
        name = argument.as_str()
        if argument.is_scalar and not _TOKEN.match(name):
            argument.error(f"not a header name: {name!r}")
            return None
    return Header(name)


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")

# namespace_from's sources: a header, or the Host's label under a suffix.
NAMESPACES: Mapping[str, SourceReader] = {"header": _header_source, "suffix": suffix_source("host")}

HTTP: ServiceKind[Options] = ServiceKind(
    "http",
    parse,
    build,
    workers=True,
    workers_refusal=_workers_refusal,
    rules=RULES,
    namespaces=NAMESPACES,
    batch_writes=True,
)
