"""
Private names of twisted.web's HTTP/1.1 client netd uses; see netd.compat.

Imported only by the http kind's proxy, for a map with a proxy route: it loads
twisted.web.client.
"""

from __future__ import annotations

from twisted.web._newclient import HTTP11ClientProtocol
from twisted.web.client import HTTPConnectionPool
from twisted.web.client import _HTTP11ClientFactory as HTTP11ClientFactory

__all__ = ["HTTP11ClientFactory", "HTTP11ClientProtocol", "set_pool_protocol_factory"]

# Re-exported as they are:
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
