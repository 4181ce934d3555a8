"""
The reverse proxy of C{routes}: twisted.web's client L{Agent}, streaming both ways.

The request body flows to the upstream as the client sends it (the client is paused
while the upstream is slow) and the response body flows back the same way.  An
upstream that cannot be reached or answers garbage gets the client a 502; one that
has not answered within the route's C{timeout} gets it a 504.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any

import httptools
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers as TwistedHeaders
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer, IResponse
from zope.interface import implementer

from netd.compat.web_client import (
    HTTP11ClientFactory,
    HTTP11ClientProtocol,
    set_pool_protocol_factory,
)
from netd.events import ServiceStats
from netd.services.http.app import (
    BodyStream,
    Exchange,
    Headers,
    Route,
    Upgrade,
    authority,
    query_of,
    quote_path,
)

__all__ = ["Proxy"]

# RFC 9110 7.6.1: these describe one connection, not the message; never forwarded.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Framing of the request towards the upstream is the Agent's: it writes its own
# Content-Length (from the body producer's length) or chunks, so the client's
# Content-Length would go twice (a strict upstream answers 400).  Expect was
# answered here already (100 Continue), and the Agent sends the body at once.
_NOT_FORWARDED_UP = frozenset({b"content-length", b"expect"})
# The Date and Server of a response are ours, as nginx does.
_OURS = frozenset({b"date", b"server"})
# An upgrade answer's head is read whole before the switch; bounded like a request's.
_MAX_UPSTREAM_HEAD = 65536
# Idle connections kept for each upstream host, to be reused.
_IDLE_UPSTREAM_CONNECTIONS = 32


def _forwardable(headers: Headers) -> Headers:
    named = {
        token.strip().lower()
        for name, value in headers
        if name.lower() == b"connection"
        for token in value.split(b",")
    }
    return [(n, v) for n, v in headers if n.lower() not in _HOP_BY_HOP and n.lower() not in named]


@implementer(IBodyProducer)
class _Upload:
    """The client's request body, as the Agent's body producer."""

    def __init__(self, body: BodyStream) -> None:
        self.body = body
        self.length = UNKNOWN_LENGTH if body.expected is None else body.expected
        body.want()

    def startProducing(self, consumer: Any) -> Deferred[None]:
        finished: Deferred[None] = Deferred()
        self.body.take(consumer.write, lambda: finished.callback(None))
        return finished

    def pauseProducing(self) -> None:
        self.body.pause()

    def resumeProducing(self) -> None:
        self.body.resume()

    def stopProducing(self) -> None:
        self.body.resume()


class _Relay(Protocol):
    """Copies the upstream's response body to the client, pausing it when the client lags."""

    transport: Any

    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange

    def connectionMade(self) -> None:
        self.exchange.register_producer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
        self.exchange.write(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        self.exchange.unregister_producer()
        if reason.check(ResponseDone, PotentialDataLoss):
            self.exchange.finish()
        else:
            self.exchange.abort()


class _UpgradingUpstream(Protocol):
    """
    The upstream side of an upgrade request: sends the handshake, then either
    splices on C{101 Switching Protocols} or relays the refusal as a response.
    """

    transport: Any

    def __init__(self, exchange: Exchange, upgrade: Upgrade, head: bytes) -> None:
        self.exchange = exchange
        self.upgrade = upgrade
        self.head = head
        self.parser = httptools.HttpResponseParser(self)
        self.answer_head = bytearray()
        self.fields: Headers = []
        self.status = 0
        self.started = False
        self.spliced = False
        self.complete = False
        self.over = False
        self.interim = False
        self.until_close = False
        self.switched: Callable[[], None] = lambda: None
        self.failed: Callable[[Failure], None] = lambda failure: None

    def connectionMade(self) -> None:
        if self.over:
            self.transport.abortConnection()
            return
        self.transport.write(self.head + self.upgrade.take_held())

    def dataReceived(self, data: bytes) -> None:
        if self.spliced:
            self.upgrade.to_client(data)
            return
        if self.complete or self.over:
            return
        if not self.started:
            self.answer_head += data
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            if self.status != 101:
                self._fail(ValueError(f"upstream upgraded with status {self.status}"))
                return
            rest = data[e.args[0] :]
            head = bytes(self.answer_head[: len(self.answer_head) - len(rest)])
            self.spliced = True
            self.switched()
            self.upgrade.splice(head, self.transport)
            if rest:
                self.upgrade.to_client(rest)
            return
        except httptools.HttpParserError as e:
            self._fail(e)
            return
        if not self.started and len(self.answer_head) > _MAX_UPSTREAM_HEAD:
            # Still no end of head (a 101's own frames never count here: they
            # arrive in the read that switches, handled above).
            self._fail(ValueError("upstream answer head too large"))

    def _fail(self, error: Exception) -> None:
        self.over = True
        self.transport.abortConnection()
        if self.started:
            self.exchange.unregister_producer()
            self.exchange.abort()
        else:
            self.failed(Failure(error))

    def give_up(self) -> None:
        """The client left or the upstream took too long: drop the upstream."""
        self.over = True
        if self.transport is not None and not self.spliced:
            self.transport.abortConnection()

    def connect_failed(self, failure: Failure) -> None:
        if not self.over:
            self.over = True
            self.failed(failure)

    # llhttp's callbacks for the upstream's answer

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if self.status == 101:
            return
        if 100 <= self.status < 200:
            # 100 Continue, 103 Early Hints: the answer that counts follows, and
            # only its head goes to the client (a WebSocket client expects 101 first).
            self.interim = True
            self.fields = []
            del self.answer_head[: self.answer_head.find(b"\r\n\r\n") + 4]
            return
        # Refused (a 4xx, say): that is the client's answer, and the connection
        # ends with it since the client may already be speaking the new protocol.
        self.started = True
        self.switched()
        self.exchange.proxy_cancel = self.give_up
        self.exchange.keep_alive = False
        fields = [(n, v) for n, v in _forwardable(self.fields) if n.lower() not in _OURS]
        length = next((int(v) for n, v in self.fields if n.lower() == b"content-length"), None)
        chunked = any(
            n.lower() == b"transfer-encoding" and b"chunked" in v.lower() for n, v in self.fields
        )
        self.until_close = length is None and not chunked and self.status not in (204, 304)
        self.exchange.start(self.status, fields, length)
        # The client sets the pace: the upstream is paused while it does not read.
        self.exchange.register_producer(self.transport, True)

    def on_body(self, data: bytes) -> None:
        if self.started:
            self.exchange.write(data)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        if self.started and not self.complete:
            self.complete = True
            self.exchange.unregister_producer()
            self.exchange.finish()
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.spliced:
            self.upgrade.upstream_lost()
        elif self.started and not self.complete:
            self.complete = True
            self.exchange.unregister_producer()
            if self.until_close and not self.over and reason.check(ConnectionDone):
                self.exchange.finish()  # a body that ends with the connection: whole
            else:
                self.exchange.abort()
        elif not self.started and not self.over:
            self.over = True
            self.failed(reason)


def _persists(version: tuple[bytes, int, int], connection: Sequence[bytes]) -> bool:
    """
    RFC 9112 9.3: whether the upstream keeps the connection open after a
    response of this C{version} with these C{Connection} field values.
    """
    options = {token.strip().lower() for value in connection for token in value.split(b",")}
    if b"close" in options:
        return False
    return version[1:] >= (1, 1) or b"keep-alive" in options


class _UpstreamProtocol(HTTP11ClientProtocol):
    """
    Twisted's client protocol, but a connection goes back to the pool only if
    the upstream keeps it open.  Twisted closes it only on a C{Connection}
    field that is exactly C{close}: after an HTTP/1.0 answer without
    keep-alive (http.server's default) or C{Connection: Close} the pool kept a
    connection the upstream was closing, and the next request sent on it
    failed with a 502 (the pool does not retry).
    """

    # Twisted dispatches its private _finishResponse on the state: this is the
    # one place between "the response is whole" and "closed, or handed to the
    # pool".  The private _parser alone holds the version and the Connection
    # field values (Response.headers leaves them out).  In the TRANSMITTING
    # state (answered before the request was all sent) Twisted closes anyway;
    # with no parser left the connection is already lost.
    def _finishResponse_WAITING(self, rest: bytes) -> None:
        parser = self._parser
        if parser is not None and not _persists(
            parser.response.version, parser.connHeaders.getRawHeaders(b"connection", [])
        ):
            # What Twisted itself closes on: a request that is not persistent.
            parser.request.persistent = False
        super()._finishResponse_WAITING(rest)


class _QuietClientFactory(HTTP11ClientFactory):
    """
    The pool's protocol factory with netd's protocol (the pool's private
    C{_factory} is the only way to choose it); quiet, since one log line per
    upstream connection would drown the access log.
    """

    noisy = False

    def buildProtocol(self, addr: IAddress | None) -> _UpstreamProtocol:
        # The pool's callback (kept privately by the base class) that takes
        # the connection back once it is idle.
        return _UpstreamProtocol(self._quiescentCallback)


class Proxy:
    """Forwards requests of C{proxy:} routes; one connection pool per service."""

    def __init__(self, reactor: Any, stats: ServiceStats, log: Logger) -> None:
        self.reactor = reactor
        self.stats = stats
        self.log = log
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        # Twisted keeps 2 idle connections a host: with more clients at once
        # than that, most requests would connect anew (and leave a TIME_WAIT
        # socket) each time.  As nginx's `keepalive 32` for an upstream.
        self.pool.maxPersistentPerHost = _IDLE_UPSTREAM_CONNECTIONS
        # A request the upstream may have half-processed must not be sent twice.
        self.pool.retryAutomatically = False
        set_pool_protocol_factory(self.pool, _QuietClientFactory)
        self.agent = Agent(reactor, pool=self.pool, connectTimeout=10)

    def close(self) -> Deferred[None]:
        closed: Deferred[None] = self.pool.closeCachedConnections()
        return closed

    def __call__(self, exchange: Exchange, route: Route, rest: str) -> None:
        assert route.proxy is not None
        url = _upstream_url(route.proxy, exchange, rest, route.prefix)
        upgrade = exchange.upgrade()
        if upgrade is not None:
            self._tunnel(exchange, upgrade, route, url)
            return
        headers = TwistedHeaders()
        for name, value in _upstream_fields(exchange):
            headers.addRawHeader(name, value)
        upload = _Upload(exchange.body) if exchange.body.expected != 0 else None
        asked = self.agent.request(exchange.method.encode(), url, headers, upload)
        # Deferred.addTimeout cannot tell our cancel from the Agent's own errors
        # (it wraps the CancelledError), so the timer remembers that it fired.
        expired: list[bool] = []

        def expire() -> None:
            expired.append(True)
            asked.cancel()

        timer = self.reactor.callLater(route.timeout, expire)

        def cancel() -> None:
            if timer.active():
                timer.cancel()
            asked.cancel()

        exchange.proxy_cancel = cancel

        def settled(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        asked.addBoth(settled)
        asked.addCallbacks(
            lambda response: self._answered(exchange, response),
            lambda failure: self._failed(exchange, failure, url, bool(expired)),
        )

    def _tunnel(self, exchange: Exchange, upgrade: Upgrade, route: Route, url: bytes) -> None:
        """
        An upgrade request (a WebSocket handshake): its own connection to the
        upstream, spliced to the client's once the upstream switches protocols.
        """
        parts = urllib.parse.urlsplit(url.decode("latin-1"))
        secure = parts.scheme == "https"
        host = parts.hostname or "localhost"
        endpoint: Any = HostnameEndpoint(
            self.reactor, host, parts.port or (443 if secure else 80), timeout=route.timeout
        )
        if secure:
            endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        # The request's own framing goes along: its body, if any, follows raw.
        framing = [
            (name, value)
            for name, value in exchange.headers
            if name.lower() in (b"content-length", b"transfer-encoding")
        ]
        fields = [
            (b"Host", parts.netloc.encode("latin-1")),
            *_upstream_fields(exchange),
            *framing,
            (b"Upgrade", exchange.header(b"upgrade") or b""),
            (b"Connection", b"Upgrade"),
        ]
        head = b"".join(
            [
                b"%s %s HTTP/1.1\r\n" % (exchange.method.encode(), target.encode("latin-1")),
                *(b"%s: %s\r\n" % field for field in fields),
                b"\r\n",
            ]
        )
        upstream = _UpgradingUpstream(exchange, upgrade, head)
        connecting = connectProtocol(endpoint, upstream)

        def expire() -> None:
            upstream.give_up()
            connecting.cancel()
            self._failed(exchange, Failure(TimeoutError()), url, expired=True)

        timer = self.reactor.callLater(route.timeout, expire)
        upstream.switched = lambda: timer.cancel() if timer.active() else None

        def cancel() -> None:
            if timer.active():
                timer.cancel()
            connecting.cancel()
            upstream.give_up()

        exchange.proxy_cancel = cancel
        upstream.failed = lambda failure: self._failed(exchange, failure, url, expired=False)
        connecting.addErrback(upstream.connect_failed)

    def _answered(self, exchange: Exchange, response: IResponse) -> None:
        exchange.proxy_cancel = None
        headers = [
            (n, v)
            for n, v in _forwardable(
                [(n, v) for n, values in response.headers.getAllRawHeaders() for v in values]
            )
            if n.lower() not in _OURS
        ]
        length = None if response.length is UNKNOWN_LENGTH else response.length
        if exchange.method == "HEAD":
            # Twisted's client gives any answer to HEAD the length 0; the upstream's
            # Content-Length, what GET would send (RFC 9110 9.3.2), goes as it came.
            given = response.headers.getRawHeaders(b"content-length")
            length = int(given[0]) if given and given[0].isdigit() else None
        exchange.start(response.code, headers, length)
        response.deliverBody(_Relay(exchange))

    def _failed(self, exchange: Exchange, failure: Failure, url: bytes, expired: bool) -> None:
        exchange.proxy_cancel = None
        if exchange.status or getattr(exchange, "done", False):
            # The client went away (our cancel is the failure), or its request
            # turned out bad and was answered: nobody is left to tell.
            return
        self.stats.count("proxy_errors")
        status = 504 if expired else 502
        self.log.warn(
            "proxy to {url} failed: {error}",
            url=url.decode("latin-1"),
            error=failure.getErrorMessage(),
        )
        body = b"%d upstream %s\n" % (status, b"timed out" if status == 504 else b"failed")
        exchange.respond(status, [(b"Content-Type", b"text/plain; charset=utf-8")], body)


def _upstream_fields(exchange: Exchange) -> Headers:
    """The client's header fields as the upstream gets them: end to end, plus X-Forwarded-*."""
    fields: Headers = []
    host = authority(exchange)
    forwarded_for = b""
    for name, value in _forwardable(exchange.headers):
        lower = name.lower()
        if lower == b"host":
            continue  # the upstream's own goes in its place
        if lower == b"x-forwarded-for":
            # Repeated lines are one list (RFC 9110 5.3), each hop's kept.
            forwarded_for += value + b", "
        elif lower not in _NOT_FORWARDED_UP and lower not in (
            b"x-forwarded-proto",
            b"x-forwarded-host",
        ):
            fields.append((name, value))
    fields.append((b"X-Forwarded-For", forwarded_for + exchange.client.encode()))
    fields.append((b"X-Forwarded-Proto", exchange.scheme.encode()))
    if host:
        fields.append((b"X-Forwarded-Host", host))
    return fields


def _upstream_url(base: str, exchange: Exchange, rest: str, prefix: bool) -> bytes:
    """
    nginx's rule: an upstream URL with a path replaces the route's; without, keeps it.

    The path is the one the route matched (normalised, decoded; C{rest} is what
    follows the route's prefix in it), encoded again once: forwarding the raw
    target would hand the upstream a path other than the one the routes judged.
    """
    parts = urllib.parse.urlsplit(base)
    if parts.path:
        path = parts.path + quote_path(rest) if prefix else parts.path
    else:
        path = quote_path(exchange.path)
    url = urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, query_of(exchange.target), ""))
    return url.encode("latin-1")
