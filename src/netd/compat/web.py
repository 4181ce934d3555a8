"""
Private twisted.web names (HTTP/1.1 client, HTTP/2) netd uses; see netd.compat.

Imported only by the http kind: it loads twisted.web and h2.
"""

from __future__ import annotations

from twisted.web._http2 import H2Connection, H2Stream
from twisted.web._newclient import HTTP11ClientProtocol
from twisted.web.client import HTTPConnectionPool
from twisted.web.client import _HTTP11ClientFactory as HTTP11ClientFactory
from twisted.web.http import Request

__all__ = [
    "H2Connection",
    "HTTP11ClientFactory",
    "HTTP11ClientProtocol",
    "h2_producer_paused",
    "h2_stream_request",
    "set_pool_protocol_factory",
]

# Re-exported as they are:
# - H2Connection: twisted.web serves HTTP/2 with it but exports no class to
#   subclass for flow-control and body-size limits.
# - HTTP11ClientProtocol: twisted.web.client uses it but does not export it
#   (_newclient documents it as public).
# - HTTP11ClientFactory: the factory HTTPConnectionPool builds connections with;
#   a pool that should use another protocol has to subclass it.


def set_pool_protocol_factory(pool: HTTPConnectionPool, factory: type[HTTP11ClientFactory]) -> None:
    """
    Make C{pool} connect with C{factory}: the pool's private C{_factory} is the
    only way to choose the protocol its connections speak.
    """
    pool._factory = factory


def h2_stream_request(stream: H2Stream) -> Request:
    """The request an HTTP/2 stream feeds; H2Stream keeps it privately."""
    request: Request = stream._request
    return request


def h2_producer_paused(stream: H2Stream) -> bool:
    """
    Whether C{stream} has a producer and holds it paused.  H2Stream resumes it
    only on a WINDOW_UPDATE and keeps whether it paused it privately.
    """
    return stream.producer is not None and not stream._producerProducing
