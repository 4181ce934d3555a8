"""
The reverse proxy of C{routes}: twisted.web's client L{Agent}, streaming both ways.

The request body flows to the upstream as the client sends it (the client is paused
while the upstream is slow) and the response body flows back the same way.  An
upstream that cannot be reached or answers garbage gets the client a 502; one that
has not answered within the route's C{timeout} gets it a 504.
"""

from __future__ import annotations

import urllib.parse
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.client import _HTTP11ClientFactory as HTTP11ClientFactory
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers as TwistedHeaders
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer, IResponse
from zope.interface import implementer

from netd.events import ServiceStats
from netd.services._http_app import BodyStream, Exchange, Headers, Route, query_of, quote_path

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


class _QuietClientFactory(HTTP11ClientFactory):
    """One log line per upstream connection would drown the access log."""

    noisy = False


class Proxy:
    """Forwards requests of C{proxy:} routes; one connection pool per service."""

    def __init__(self, reactor: Any, stats: ServiceStats, log: Logger) -> None:
        self.reactor = reactor
        self.stats = stats
        self.log = log
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        # A request the upstream may have half-processed must not be sent twice.
        self.pool.retryAutomatically = False
        self.pool._factory = _QuietClientFactory
        self.agent = Agent(reactor, pool=self.pool, connectTimeout=10)

    def close(self) -> Deferred[None]:
        closed: Deferred[None] = self.pool.closeCachedConnections()
        return closed

    def __call__(self, exchange: Exchange, route: Route, rest: str) -> None:
        assert route.proxy is not None
        url = _upstream_url(route.proxy, exchange, rest, route.prefix)
        headers = TwistedHeaders()
        host = b""
        forwarded_for = b""
        for name, value in _forwardable(exchange.headers):
            lower = name.lower()
            if lower == b"host":
                host = value
            elif lower == b"x-forwarded-for":
                forwarded_for = value + b", "
            elif lower not in _NOT_FORWARDED_UP and lower not in (
                b"x-forwarded-proto",
                b"x-forwarded-host",
            ):
                headers.addRawHeader(name, value)
        headers.addRawHeader(b"X-Forwarded-For", forwarded_for + exchange.client.encode())
        headers.addRawHeader(b"X-Forwarded-Proto", exchange.scheme.encode())
        if host:
            headers.addRawHeader(b"X-Forwarded-Host", host)
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

    def _answered(self, exchange: Exchange, response: IResponse) -> None:
        exchange.proxy_cancel = None
        headers = [
            (n, v)
            for n, v in _forwardable(
                [(n, v) for n, values in response.headers.getAllRawHeaders() for v in values]
            )
            if n.lower() not in (b"date", b"server")  # ours, as nginx does
        ]
        length = None if response.length is UNKNOWN_LENGTH else response.length
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
