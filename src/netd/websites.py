"""
A twisted.web site for a kind that answers over HTTP without being the http
kind (dns's DNS over HTTPS): HTTP/1.1, and HTTP/2 wherever TLS negotiates
C{h2} (twisted.web's L{server.Site} offers it through ALPN once the h2 package
is installed, netd's C{twisted[http2]}), with request bodies bounded.

Imported only by the kinds that serve such a site: it loads twisted.web.
"""

from __future__ import annotations

from typing import Any, ClassVar

from twisted.web import server
from twisted.web.resource import Resource

from netd.compat.web import site_channel_with_batching_h2

__all__ = ["BoundedRequest", "bounded_site"]


class BoundedRequest(server.Request):
    """
    A request whose body stops being stored past C{max_body} bytes: then
    C{too_large} is set, for the resource to answer 413.  A declared
    Content-Length over the limit gets no buffer of that size.
    """

    max_body: ClassVar[int] = 0
    too_large = False

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.max_body:
            self.too_large = True
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.too_large:
            return
        assert self.content is not None
        if self.content.tell() + len(data) > self.max_body:
            self.too_large = True
            self.content.seek(0)
            self.content.truncate()
            return
        super().handleContentChunk(data)


class _QuietSite(server.Site):
    noisy = False
    displayTracebacks = False
    # HTTP/2 with the frames of every stream ready sent in one write.
    protocol = site_channel_with_batching_h2

    def log(self, request: Any) -> None:
        """The kind logs its own exchanges (dns's query_log): no access log here."""


def bounded_site(resource: Resource, reactor: Any, max_body: int, timeout: float) -> server.Site:
    """
    A site answering from C{resource}, bodies bounded to C{max_body} bytes,
    connections idle for C{timeout} seconds closed.
    """

    class Request(BoundedRequest):
        pass

    Request.max_body = max_body
    site = _QuietSite(resource, timeout=timeout, reactor=reactor)
    site.requestFactory = Request
    return site
