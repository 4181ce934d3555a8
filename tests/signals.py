"""Waiting on what netd's journal says about a test's own connections."""

from __future__ import annotations

import socket
from typing import Any

from netd.testing import NetdProcess


def client_address(sock: socket.socket) -> str:
    """How netd's journal names the client end of C{sock}."""
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def wait_closed(netd: NetdProcess, service: str, client: str) -> dict[str, Any]:
    """
    netd's C{connection.closed} event for C{client} (see L{client_address}):
    netd has seen the connection go and let go of what it held for it.
    """
    return netd.wait_for(service, "connection.closed", client=client)
