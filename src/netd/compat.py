"""
The one place netd imports Twisted's private names or reads their private attributes.

Each use says what public API is missing; tests/unit/test_compat.py exercises
each, and checks that the private methods netd's subclasses override (left in
those subclasses) still exist, so a Twisted upgrade that moves one fails there,
by name, rather than somewhere in a kind.  setup.cfg bounds Twisted to the
versions that test passed on.
"""

from __future__ import annotations

import inspect
from typing import Any

from twisted.internet._sslverify import protosFromProtocol
from twisted.internet.abstract import FileDescriptor
from twisted.internet.endpoints import _parse, _SystemdParser
from twisted.internet.interfaces import IListeningPort
from twisted.mail._cred import LOGINCredentials, PLAINCredentials
from twisted.mail._except import IllegalClientResponse
from twisted.web._http2 import H2Connection, H2Stream
from twisted.web._newclient import HTTP11ClientProtocol
from twisted.web.client import HTTPConnectionPool
from twisted.web.client import _HTTP11ClientFactory as HTTP11ClientFactory
from twisted.web.http import Request

__all__ = [
    "H2Connection",
    "HTTP11ClientFactory",
    "HTTP11ClientProtocol",
    "IllegalClientResponse",
    "LOGINCredentials",
    "PLAINCredentials",
    "buffered_bytes",
    "h2_producer_paused",
    "h2_stream_request",
    "inherited_descriptors",
    "parse_endpoint",
    "protosFromProtocol",
    "set_pool_protocol_factory",
    "share_listening_socket",
    "unwritten_bytes",
]

# Re-exported as they are:
# - H2Connection: twisted.web serves HTTP/2 with it but exports no class to
#   subclass for flow-control and body-size limits.
# - HTTP11ClientProtocol: twisted.web.client uses it but does not export it
#   (_newclient documents it as public).
# - HTTP11ClientFactory: the factory HTTPConnectionPool builds connections with;
#   a pool that should use another protocol has to subclass it.
# - LOGINCredentials, PLAINCredentials, IllegalClientResponse: the SASL LOGIN and
#   PLAIN challengers ESMTP takes in its C{chal=} map, and the error they raise
#   on a malformed answer; twisted.mail.smtp uses them but does not export them.
# - protosFromProtocol: the ALPN protocols a TLS connection offers (its wrapped
#   factory's and the options' own), which a replacement ALPN selection
#   callback needs; only Twisted's own callback is public.


def parse_endpoint(description: str) -> tuple[list[str], dict[str, str]]:
    """
    Split an endpoint string into its positional and C{key=value} parts, with
    Twisted's quoting (C{\\:} and C{\\=}): what C{serverFromString} sees.  There
    is no public parser, only C{serverFromString}, which also builds the endpoint.
    """
    parsed: tuple[list[str], dict[str, str]] = _parse(description)
    return parsed


def inherited_descriptors() -> list[int]:
    """
    The descriptors systemd handed this process, in order.

    Twisted reads C{LISTEN_FDS} once, when twisted.internet.endpoints is first
    imported, and removes it from the environment: its C{systemd:} parser holds
    the only copy, and exports no accessor.
    """
    descriptors: list[int] = _SystemdParser._sddaemon.inheritedDescriptors()
    return descriptors


def share_listening_socket(port: IListeningPort) -> None:
    """
    Let C{port} close its socket without shutting it down: another descriptor
    (a successor adopting a dup, across a reload) still listens on it.

    Twisted's TCP port calls C{shutdown(SHUT_RDWR)} before C{close()} unless it
    adopted its socket, and shutdown acts on the socket, not the descriptor:
    every dup would stop accepting.  There is no public switch for it.
    """
    listening: Any = port
    if hasattr(listening, "_shouldShutdown"):
        listening._shouldShutdown = False


def set_pool_protocol_factory(pool: HTTPConnectionPool, factory: type[HTTP11ClientFactory]) -> None:
    """
    Make C{pool} connect with C{factory}: the pool's private C{_factory} is the
    only way to choose the protocol its connections speak.
    """
    pool._factory = factory


def unwritten_bytes(descriptor: FileDescriptor) -> int:
    """
    Bytes C{descriptor} buffers for its socket: its current buffer past what was
    sent, and the writes queued behind it (kept privately until the next send).
    """
    return len(descriptor.dataBuffer) - descriptor.offset + descriptor._tempDataLen


def buffered_bytes(layer: object) -> int:
    """
    Bytes one transport layer holds that it has not passed down: a
    FileDescriptor's write buffers, or the cleartext TLS keeps (privately)
    until its handshake is done.

    Reads the layer's own attributes only: a ProtocolWrapper answers any other
    name for its transport, which would count that layer twice.
    """
    total = 0
    buffered = inspect.getattr_static(layer, "dataBuffer", b"")
    if isinstance(buffered, bytes):
        total += len(buffered) - inspect.getattr_static(layer, "offset", 0)
        total += inspect.getattr_static(layer, "_tempDataLen", 0)
    return total + sum(map(len, inspect.getattr_static(layer, "_appSendBuffer", ())))


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
