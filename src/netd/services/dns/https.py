"""
DNS over HTTPS upstreams (RFC 8484): each query a POST of
C{application/dns-message} over a kept-alive HTTPS connection.

twisted.web's Agent speaks HTTP/1.1 only (its HTTP/2 is server-side), so the
TLS handshake offers C{http/1.1} alone by ALPN and connections are reused
through an L{HTTPConnectionPool}: one query at a time on each, as many
connections as queries in flight, the idle ones kept for the next queries.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import optionsForClientTLS, platformTrust, trustRootFromCertificates
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from netd.services.dns.forward import Upstream, UpstreamFailed, certificates

__all__ = ["HTTPSClient"]

_MEDIA_TYPE = b"application/dns-message"
_MAX_MESSAGE = 65535
# Idle connections kept per upstream; more queries in flight open more connections.
_KEPT_CONNECTIONS = 8
# Below the idle timeout of common DoH servers, so a kept connection is rarely stale.
_IDLE_SECONDS = 30


@implementer(IBodyProducer)
class _Query:
    """The query's bytes as a request body, written at once."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _Body(Protocol):
    """A response body of at most one DNS message; longer ones abort the connection."""

    transport: Any

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.size = 0
        self.finished: Deferred[bytes] = Deferred(lambda d: self._abort())

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    def discard(self) -> None:
        """Read no more of it: the connection goes, and nobody waits on the body."""
        self.finished.addErrback(lambda reason: None)
        self.finished.cancel()

    def dataReceived(self, data: bytes) -> None:
        if self.finished.called:
            return  # over the limit already, the connection on its way out
        self.size += len(data)
        if self.size > _MAX_MESSAGE:
            self._finish(Failure(UpstreamFailed("an answer over 65535 bytes")))
            self._abort()
            return
        self.chunks.append(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        # Without a Content-Length the body ends when the connection does.
        if reason is not None and reason.check(ResponseDone, PotentialDataLoss):
            self._finish(b"".join(self.chunks))
        else:
            self._finish(Failure(UpstreamFailed("the answer was cut short")))

    def _finish(self, result: bytes | Failure) -> None:
        if not self.finished.called:
            self.finished.callback(result)


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """The upstream's host and port, with TLS verified for its C{server_name}."""

    def __init__(self, reactor: Any, upstream: Upstream, timeout: float) -> None:
        self.reactor = reactor
        self.upstream = upstream
        self.timeout = timeout
        trust = platformTrust()
        if upstream.ca is not None:
            trust = trustRootFromCertificates(certificates(upstream.ca))
        self.tls = optionsForClientTLS(
            upstream.server_name or upstream.host,
            trustRoot=trust,
            acceptableProtocols=[b"http/1.1"],
        )

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        host, port = self.upstream.host, self.upstream.port
        tcp: IStreamClientEndpoint
        if not _is_address(host):
            tcp = HostnameEndpoint(self.reactor, host, port, timeout=self.timeout)
        elif ":" in host:
            tcp = TCP6ClientEndpoint(self.reactor, host, port, timeout=self.timeout)
        else:
            tcp = TCP4ClientEndpoint(self.reactor, host, port, timeout=self.timeout)
        return wrapClientTLS(self.tls, tcp)


def _host(name: str, port: int) -> bytes:
    """A Host header's value for C{name} on C{port} of HTTPS (RFC 9110 7.2)."""
    host = f"[{name}]".encode("ascii") if ":" in name else name.encode("idna")
    return host if port == 443 else b"%b:%d" % (host, port)


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class HTTPSClient:
    """Asks one DoH upstream; L{close} drops its kept connections."""

    def __init__(self, reactor: Any, upstream: Upstream, timeout: float) -> None:
        self.reactor = reactor
        self.timeout = timeout
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = _KEPT_CONNECTIONS
        self.pool.cachedConnectionTimeout = _IDLE_SECONDS
        self.agent = Agent.usingEndpointFactory(
            reactor, _Endpoints(reactor, upstream, timeout), self.pool
        )
        self.url = str(upstream).encode("ascii")
        self.headers = Headers({b"content-type": [_MEDIA_TYPE], b"accept": [_MEDIA_TYPE]})
        if upstream.server_name is not None:
            # The name the certificate is verified for is the one the server
            # is asked by, or a name-based virtual host would send it elsewhere.
            self.headers.addRawHeader(b"host", _host(upstream.server_name, upstream.port))

    def ask(self, query: bytes) -> Deferred[bytes]:
        """The upstream's answer to C{query}, in C{timeout} seconds or a failure."""
        answer = Deferred.fromCoroutine(self._ask(query))
        return answer.addTimeout(self.timeout, self.reactor)

    async def _ask(self, query: bytes) -> bytes:
        try:
            response = await self._post(query)
        except (ResponseNeverReceived, RequestTransmissionFailed):
            # A kept connection the server closed while idle: POST is not
            # retried by the pool, so once more on a connection of its own.
            response = await self._post(query)
        body = _Body()
        response.deliverBody(body)
        media = response.headers.getRawHeaders(b"content-type", [b""])[0]
        if response.code != 200 or media.split(b";")[0].strip().lower() != _MEDIA_TYPE:
            # Whatever the body is, it is no answer: not worth reading, nor the connection.
            body.discard()
            raise UpstreamFailed(f"HTTP {response.code} {media!r}")
        return await body.finished

    def _post(self, query: bytes) -> Deferred[IResponse]:
        response: Deferred[IResponse] = self.agent.request(
            b"POST", self.url, self.headers, _Query(query)
        )
        return response

    def close(self) -> Deferred[None]:
        closed: Deferred[None] = self.pool.closeCachedConnections()
        return closed
