"""
Private twisted.mail names netd uses; see netd.compat.

Imported only by the smtp kind: it loads twisted.mail and twisted.cred.
"""

from twisted.mail._cred import LOGINCredentials, PLAINCredentials
from twisted.mail._except import IllegalClientResponse
from twisted.mail.imap4 import _FetchParser as FetchParser

__all__ = ["FetchParser", "IllegalClientResponse", "LOGINCredentials", "PLAINCredentials"]

# Re-exported as they are: the SASL LOGIN and PLAIN challengers ESMTP takes in
# its C{chal=} map, and the error they raise on a malformed answer;
# twisted.mail.smtp uses them but does not export them.

# IMAP4Server parses FETCH items with this class and no public name; netd's
# IMAP session calls it itself to answer a malformed list with BAD (the
# parser raises bare Exceptions, which IMAP4Server logs as server errors).
