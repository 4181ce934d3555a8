"""
The admin API: JSON over HTTP for operators and test suites.

The admin code knows no service kind: per-service views come from each kind's
L{netd.kinds.AdminView}s, counters from L{netd.events.ServiceStats}.
"""

from __future__ import annotations

import hmac
import json
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.interfaces import IListeningPort, IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from netd import endpoints
from netd.config import AdminConfig, ListenerConfig
from netd.listeners import ListenerGroup

if TYPE_CHECKING:
    from netd.runtime import Daemon

__all__ = ["AdminServer"]

log = Logger(namespace="netd.admin")

MAX_BODY = 64 * 1024
MAX_WAIT = 300.0
_METRIC_NAME = re.compile(r"[^a-zA-Z0-9_]")


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


class _LimitedRequest(Request):
    """Refuses bodies over L{MAX_BODY} before reading them (413), then closes."""

    _refused = False
    _body_bytes = 0

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > MAX_BODY:
            self._refuse()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._body_bytes += len(data)
        if self._body_bytes > MAX_BODY:
            self._refuse()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if not self._refused:
            super().requestReceived(command, path, version)

    def _refuse(self) -> None:
        self._refused = True
        body = json.dumps({"error": f"request body over {MAX_BODY} bytes"}).encode()
        transport: Any = self.channel.transport
        transport.write(
            b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        transport.loseConnection()


class AdminResource(Resource):
    isLeaf = True

    def __init__(self, daemon: Daemon, token: str | None) -> None:
        super().__init__()
        self.daemon = daemon
        self.token = token.encode() if token else None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(daemon))

    # Dispatch

    def render(self, request: Request) -> bytes | int:
        try:
            return self._dispatch(request)
        except _HTTPError as e:
            return _json(request, {"error": str(e)}, e.status, e.headers)

    def _dispatch(self, request: Request) -> bytes | int:
        method = (request.method or b"GET").decode("latin-1")
        parts = [p.decode("utf-8", "replace") for p in request.postpath or []]
        if parts == ["healthz"]:
            _allow(method, "GET", "HEAD")
            if not self.daemon.ready:
                return _text(request, "starting\n", 503)
            return _text(request, "ok\n")
        self._authorize(request)
        if parts == ["metrics"]:
            _allow(method, "GET", "HEAD")
            request.setHeader(b"Content-Type", b"text/plain; version=0.0.4; charset=utf-8")
            return generate_latest(self.registry)
        if parts[:1] != ["api"]:
            raise _HTTPError(404, "not found")
        return self._api(request, method, parts[1:])

    def _api(self, request: Request, method: str, parts: list[str]) -> bytes | int:
        if parts == ["reload"]:
            _allow(method, "POST")
            # A reload runs to its end even if the client hangs up: stopping it
            # between releasing old listeners and binding new ones would strand both.
            return self._deferred(request, _uncancellable(self.daemon.reload()), _reload_answer)
        if parts == ["events"]:
            _allow(method, "GET")
            return self._events(request)
        if parts == ["services"]:
            _allow(method, "GET", "HEAD")
            return _json(request, {"services": self.daemon.describe()})
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
                if method == "DELETE" and view.clear is not None:
                    return self._deferred(request, maybeDeferred(view.clear), lambda r: (200, r))
                _allow(method, "GET", "HEAD", *(["DELETE"] if view.clear else []))
                return self._deferred(
                    request, maybeDeferred(view.list, _query(request)), lambda r: (200, r)
                )
            if len(parts) == 4 and view.item is not None:
                _allow(method, "GET", "HEAD")
                return self._deferred(request, maybeDeferred(view.item, parts[3]), _item_answer)
        raise _HTTPError(404, "not found")

    def _authorize(self, request: Request) -> None:
        if self.token is None:
            return
        header = request.getHeader(b"authorization") or b""
        scheme, _, offered = header.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(offered.strip(), self.token):
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
        found = self.daemon.journal.wait(wait, since, service, types)
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

    def _deferred(
        self,
        request: Request,
        pending: Deferred[Any],
        answer: Callable[[Any], tuple[int, Any]],
    ) -> int:
        """Answer once C{pending} fires; cancel it if the client goes away."""
        gone: list[bool] = []

        def respond(result: Any) -> None:
            if gone:
                return
            status, body = answer(result)
            if isinstance(body, bytes):
                request.setResponseCode(status)
                request.setHeader(b"Content-Type", b"application/octet-stream")
                request.write(body)
            else:
                request.write(_json(request, body, status))
            request.finish()

        def failed(failure: Failure) -> None:
            if failure.check(CancelledError):
                return
            log.failure("admin request failed", failure)
            if gone:
                return
            request.write(_json(request, {"error": "internal error"}, 500))
            request.finish()

        def client_left(reason: Failure) -> None:
            gone.append(True)
            pending.cancel()

        request.notifyFinish().addErrback(client_left)
        pending.addCallback(respond).addErrback(failed)
        return NOT_DONE_YET


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
    return {
        key.decode("utf-8", "replace"): values[-1].decode("utf-8", "replace")
        for key, values in (request.args or {}).items()
        if values
    }


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

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def collect(self) -> list[Metric]:
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
        for name, service in self.daemon.services_by_name.items():
            counters = service.describe()["counters"]
            labels = [name, service.config.type]
            for key, value in counters.items():
                family = families.get(key)
                if family is None:
                    metric = "netd_" + _METRIC_NAME.sub("_", key)
                    family = families[key] = CounterMetricFamily(
                        metric, f"{key} (service-specific)", labels=["service", "type"]
                    )
                family.add_metric(labels, value)
            for key, value in service.stats.gauges.items():
                gauge_key = f"gauge:{key}"
                if gauge_key not in families:
                    families[gauge_key] = GaugeMetricFamily(
                        "netd_" + _METRIC_NAME.sub("_", key),
                        f"{key} (service-specific)",
                        labels=["service", "type"],
                    )
                families[gauge_key].add_metric(labels, value)
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
        self.listener_configs = config.listen
        self.listeners = []
        self.site = Site(AdminResource(daemon, config.token))
        self.site.requestFactory = _LimitedRequest
        self.site.noisy = False
        self.site.displayTracebacks = False

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
        listening: Deferred[IListeningPort] = endpoint.listen(self.site)
        return listening
