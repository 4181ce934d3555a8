"""
Hostile inputs kept as one list each, for the integration tests and for
`make stress` (stress/security.py), so a new trick joins both.
"""

from __future__ import annotations

__all__ = ["FTP_TRAVERSAL_READS", "FTP_TRAVERSAL_WRITES", "OPEN_RELAY_TRICKS"]

# Recipients that route mail elsewhere through a host that only takes it for itself.
OPEN_RELAY_TRICKS = [
    "victim@elsewhere.test",
    "victim%elsewhere.test@netd.test",
    '"victim@elsewhere.test"@netd.test',
    "@netd.test:victim@elsewhere.test",
    "victim@elsewhere.test@netd.test",
    "elsewhere.test!victim@netd.test",
    "victim@[127.0.0.1]",
    "victim@[IPv6:::1]",
    "victim@elsewhere.test.",
    "victim@netd.test.elsewhere.test",
    "victim@NETD.TEST.elsewhere.test",
    "@netd.test,@elsewhere.test:victim@elsewhere.test",
]

# From a home holding link_out (a file link) and dir_out (a folder link) leading out.
FTP_TRAVERSAL_READS = [
    b"SIZE ../secret.txt",
    b"SIZE /../secret.txt",
    b"SIZE ../../../../etc/passwd",
    b"SIZE /etc/passwd",
    b"SIZE link_out",
    b"SIZE dir_out/secret.txt",
    b"MDTM link_out",
    b"CWD ..",
    b"CWD dir_out",
    b"CWD /../..",
    b"SIZE ..%2fsecret.txt",
    b"SIZE \\..\\secret.txt",
]
FTP_TRAVERSAL_WRITES = [
    b"MKD ../made",
    b"MKD dir_out/made",
    b"DELE link_out",
    b"DELE dir_out/secret.txt",
    b"RMD ../alice",
    b"RMD dir_out",
]
