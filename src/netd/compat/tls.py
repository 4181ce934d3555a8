"""
Private TLS names netd uses; see netd.compat.

Imported only by netd.tls, which a map loads only when it has TLS profiles.
"""

from twisted.internet._sslverify import protosFromProtocol

__all__ = ["protosFromProtocol"]

# Re-exported as it is: the ALPN protocols a TLS connection offers (its wrapped
# factory's and the options' own), which a replacement ALPN selection callback
# needs; only Twisted's own callback is public.
