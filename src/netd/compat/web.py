"""
Private twisted.web names of its HTTP/2 server netd uses; see netd.compat (the
HTTP/1.1 client's are in netd.compat.web_client).

Imported only by the http kind: it loads twisted.web and h2.
"""

from __future__ import annotations

from twisted.web._http2 import H2Connection, H2Stream
from twisted.web.http import Request

__all__ = ["H2Connection", "h2_producer_paused", "h2_stream_request"]

# Re-exported as it is: twisted.web serves HTTP/2 with H2Connection but exports
# no class to subclass for flow-control and body-size limits.


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
