"""
The table of service kinds: the one place that names them.

Kinds are imported on first use, so a map that uses only echo never imports
the HTTP/2 stack.  The order here is the order of documentation and of
C{netd check}'s listing.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from netd.kinds import ServiceKind

__all__ = ["KINDS", "kind_names", "load_kind"]

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


def kind_names() -> tuple[str, ...]:
    return tuple(KINDS)


def load_kind(name: str) -> ServiceKind[Any]:
    module_name, _, attribute = KINDS[name].partition(":")
    kind: ServiceKind[Any] = getattr(import_module(module_name), attribute)
    return kind
