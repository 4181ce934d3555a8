"""
Private twisted.mail names netd uses; see netd.compat.

Imported only by the smtp kind: it loads twisted.mail and twisted.cred.
"""

from collections.abc import Callable
from typing import IO, Any

from twisted.internet.defer import Deferred
from twisted.mail._cred import LOGINCredentials, PLAINCredentials
from twisted.mail._except import IllegalClientResponse
from twisted.mail.imap4 import _FetchParser as FetchParser
from twisted.mail.pop3 import POP3

__all__ = [
    "FetchParser",
    "IllegalClientResponse",
    "LOGINCredentials",
    "PLAINCredentials",
    "send_pop3_message",
]

# Re-exported as they are: the SASL LOGIN and PLAIN challengers ESMTP takes in
# its C{chal=} map, and the error they raise on a malformed answer;
# twisted.mail.smtp uses them but does not export them.

# IMAP4Server parses FETCH items with this class and no public name; netd's
# IMAP session calls it itself to answer a malformed list with BAD (the
# parser raises bare Exceptions, which IMAP4Server logs as server errors).


def send_pop3_message(
    server: POP3,
    number: bytes,
    wrap: Callable[[IO[bytes]], IO[bytes]],
    status: Callable[[int], str],
) -> Deferred[Any] | None:
    """
    What POP3's RETR and TOP share: message C{number} (as the client wrote it)
    found or refused, C{+OK} with C{status(size)}, then C{wrap} of its file,
    dot-stuffed and ended by a lone dot.  Twisted's TOP passes a wrapper that
    cuts the body short and has no public name for the rest; netd's TOP
    passes its own.
    """
    sent: Deferred[Any] | None = server._sendMessageContent(number, wrap, status)
    return sent
