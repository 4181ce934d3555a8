"""
A proxy that is down stops listening, as Toxiproxy's disabled proxy does: a
client meets ECONNREFUSED, and coming up listens again on the same address.

The listening socket is shut down, not closed: Linux then refuses connections
to it (and resets those waiting in its backlog) while the socket stays bound,
so its port, the one the ports file and Toxiproxy's C{listen} show, does not
change hands, and C{listen()} on it accepts again.  A port bound as 0 is let go
by the shutdown; it is bound again at once to the number it had.  UNIX sockets
cannot listen again after a shutdown: theirs stay open (the proxy resets what
they accept while it is down).
"""

from __future__ import annotations

import contextlib
import socket
from typing import Any

from twisted.internet import tcp
from twisted.internet.interfaces import IListeningPort

__all__ = ["accept_again", "stop_accepting"]


def _inet_socket(port: IListeningPort) -> socket.socket | None:
    """The listening socket of a bound TCP port (TLS ones included), if C{port} is one."""
    listening: Any = port
    if not isinstance(port, tcp.Port) or not listening.connected or listening.disconnecting:
        return None
    found: socket.socket = listening.socket
    return found if found.family in (socket.AF_INET, socket.AF_INET6) else None


def _accepting(sock: socket.socket) -> bool:
    return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))


def stop_accepting(port: IListeningPort) -> None:
    """Refuse new connections on C{port}, keeping its address; nothing for a UNIX socket."""
    sock = _inet_socket(port)
    if sock is None or not _accepting(sock):
        return
    address = sock.getsockname()
    listening: Any = port
    listening.stopReading()
    sock.shutdown(socket.SHUT_RDWR)
    # EINVAL where the port was given in the map (the socket kept it); should
    # another program take a port-0 listener's number in this instant, the
    # next listen() picks a new one.
    with contextlib.suppress(OSError):
        sock.bind(address)


def accept_again(port: IListeningPort) -> None:
    """Listen again on a port L{stop_accepting} closed."""
    sock = _inet_socket(port)
    if sock is None or _accepting(sock):
        return
    listening: Any = port
    # A port that adopted its socket (a reload's handover) knows no backlog.
    backlog: int | None = listening.backlog
    sock.listen(*([backlog] if backlog else []))
    listening.startReading()
