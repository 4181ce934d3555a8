"""
The one place netd reaches into Twisted's private names.

Each use says what public API is missing; a test exercises each, so a Twisted
upgrade that moves one fails here, by name, rather than somewhere in a kind.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IListeningPort

__all__ = ["share_listening_socket"]


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
