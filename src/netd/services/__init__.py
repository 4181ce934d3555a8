"""
The table of service kinds: the one place that names them.

Kinds are imported on first use, so a map that uses only echo never imports
the HTTP/2 stack.  The order here is the order of documentation and of
C{netd check}'s listing.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from netd.kinds import AdminRoot, ServiceKind

__all__ = ["ADMIN_ROOTS", "KINDS", "admin_root", "kind_names", "load_kind"]

KINDS: dict[str, str] = {
    "echo": "netd.services.simple:ECHO",
    "discard": "netd.services.simple:DISCARD",
    "chargen": "netd.services.simple:CHARGEN",
    "daytime": "netd.services.simple:DAYTIME",
    "qotd": "netd.services.simple:QOTD",
    "time": "netd.services.time:TIME",
    "http": "netd.services.http:HTTP",
    "dns": "netd.services.dns:DNS",
    "smtp": "netd.services.smtp:SMTP",
    "ftp": "netd.services.ftp:FTP",
    "chat": "netd.services.chat:CHAT",
    "proxy": "netd.services.proxy:PROXY",
}

# First segments of admin API paths that a kind serves itself (L{AdminRoot}).
_TOXIPROXY_API = "netd.services.proxy.api:TOXIPROXY_API"
ADMIN_ROOTS: dict[str, str] = {
    "proxies": _TOXIPROXY_API,
    "populate": _TOXIPROXY_API,
    "reset": _TOXIPROXY_API,
    "version": _TOXIPROXY_API,
}


def kind_names() -> tuple[str, ...]:
    return tuple(KINDS)


def load_kind(name: str) -> ServiceKind[Any]:
    module_name, _, attribute = KINDS[name].partition(":")
    kind: ServiceKind[Any] = getattr(import_module(module_name), attribute)
    return kind


def admin_root(segment: str) -> AdminRoot | None:
    """The kind's resource serving admin paths that start with C{segment}, if any."""
    where = ADMIN_ROOTS.get(segment)
    if where is None:
        return None
    module_name, _, attribute = where.partition(":")
    root: AdminRoot = getattr(import_module(module_name), attribute)
    return root
