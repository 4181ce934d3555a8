"""
Private twisted.web names of its HTTP/2 server netd uses, and one of h2's
(its GOAWAY handler); see netd.compat (the HTTP/1.1 client's are in
netd.compat.web_client).

Imported only by the http kind: it loads twisted.web and h2.
"""

from __future__ import annotations

import h2.connection
import h2.errors
from h2.events import Event
from hyperframe.frame import Frame, GoAwayFrame
from twisted.web._http2 import H2Connection, H2Stream
from twisted.web.http import Request

__all__ = ["GracefulH2", "H2Connection", "h2_producer_paused", "h2_stream_request"]

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


class GracefulH2(h2.connection.H2Connection):
    """
    h2's connection, still open after its peer's GOAWAY without error.

    h2 closes its state machine on any GOAWAY it receives (python-hyper/h2
    issue 1181), so nothing, not even the answers the peer still waits for,
    could be sent.  RFC 9113 6.8: a GOAWAY's last stream ID limits only the
    streams its receiver opened; the peer's own are still answered.
    """

    peer_went_away = False

    def _receive_goaway_frame(self, frame: GoAwayFrame) -> tuple[list[Frame], list[Event]]:
        if frame.error_code != h2.errors.ErrorCodes.NO_ERROR:
            return super()._receive_goaway_frame(frame)
        self.peer_went_away = True
        return [], []
