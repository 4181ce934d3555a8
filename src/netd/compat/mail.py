"""
Private twisted.mail names netd uses; see netd.compat.

Imported only by the smtp kind: it loads twisted.mail and twisted.cred.
"""

from twisted.mail._cred import LOGINCredentials, PLAINCredentials
from twisted.mail._except import IllegalClientResponse

__all__ = ["IllegalClientResponse", "LOGINCredentials", "PLAINCredentials"]

# Re-exported as they are: the SASL LOGIN and PLAIN challengers ESMTP takes in
# its C{chal=} map, and the error they raise on a malformed answer;
# twisted.mail.smtp uses them but does not export them.
