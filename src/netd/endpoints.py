"""
Endpoint strings: Twisted's server endpoint syntax plus netd's C{udp:} form.

Everything that looks inside an endpoint string lives here, so the rest of netd
treats listeners as opaque descriptions.
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import Any

from twisted.internet.endpoints import (
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
    _parse,
    serverFromString,
    wrapServerTLS,
)
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IStreamServerEndpoint
from twisted.internet.testing import MemoryReactor

__all__ = [
    "check",
    "has_own_tls",
    "identity",
    "is_datagram",
    "is_loopback",
    "normalize",
    "parse_udp",
    "server_endpoint",
    "wants_profile",
]

_SSL_KEY_OPTIONS = ("privateKey", "certKey", "extraCertChain", "dhParameters")
# The unix: socket path is the first argument or address=; lockfile= is a flag, not a path.
_PATH_OPTIONS = {"ssl": _SSL_KEY_OPTIONS, "unix": ("address",)}


def _split(description: str) -> tuple[str, list[str], dict[str, str]]:
    args, kwargs = _parse(description)
    return args[0].lower(), args[1:], kwargs


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def _join(prefix: str, args: list[str], kwargs: dict[str, str]) -> str:
    parts = [prefix, *(_quote(a) for a in args), *(f"{k}={_quote(v)}" for k, v in kwargs.items())]
    return ":".join(parts)


def normalize(description: str, base_dir: Path) -> str:
    """Make the file paths in C{description} absolute, relative to the service map's folder."""
    prefix, args, kwargs = _split(description)
    changed = False
    if prefix == "unix" and args and not Path(args[0]).is_absolute():
        args[0] = str(base_dir / args[0])
        changed = True
    for option in _PATH_OPTIONS.get(prefix, ()):
        if option in kwargs and not Path(kwargs[option]).is_absolute():
            kwargs[option] = str(base_dir / kwargs[option])
            changed = True
    return _join(prefix, args, kwargs) if changed else description


def is_datagram(description: str) -> bool:
    return _split(description)[0] == "udp"


def has_own_tls(description: str) -> bool:
    """Whether the string itself carries TLS key material (C{ssl:...:privateKey=}, C{tls:})."""
    prefix, _, kwargs = _split(description)
    return prefix == "tls" or (prefix == "ssl" and "privateKey" in kwargs)


def wants_profile(description: str) -> bool:
    """An C{ssl:} endpoint without key material takes its key from a TLS profile."""
    prefix, _, kwargs = _split(description)
    return prefix == "ssl" and "privateKey" not in kwargs


def parse_udp(description: str) -> tuple[int, str]:
    """C{udp:PORT[:interface=ADDR]} to (port, interface)."""
    prefix, args, kwargs = _split(description)
    if prefix != "udp" or len(args) != 1:
        raise ValueError("expected udp:PORT[:interface=ADDRESS]")
    unknown = set(kwargs) - {"interface"}
    if unknown:
        raise ValueError(f"unknown udp: option {', '.join(sorted(unknown))}")
    port = int(args[0])
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range")
    interface = kwargs.get("interface", "")
    if interface:
        ipaddress.ip_address(interface)
    return port, interface


def check(description: str, base_dir: Path) -> str | None:
    """Validate C{description} offline; return what is wrong, or L{None}."""
    try:
        prefix, args, kwargs = _split(description)
    except (ValueError, StopIteration, IndexError):
        return f"not an endpoint description: {description!r}"
    try:
        if prefix == "udp":
            parse_udp(description)
        elif prefix == "systemd":
            # Descriptors exist only once systemd hands them over; check the syntax.
            if ("index" in kwargs) == ("name" in kwargs):
                raise ValueError("give exactly one of index= or name=")
            if not hasattr(socket, "AF_" + kwargs.get("domain", "")):
                raise ValueError("domain= must be INET, INET6 or UNIX")
            if "index" in kwargs:
                int(kwargs["index"])
        elif wants_profile(description):
            _plain_tcp(MemoryReactor(), args, kwargs)
        else:
            serverFromString(MemoryReactor(), normalize(description, base_dir))
    except (ValueError, TypeError, KeyError, OSError, ImportError) as e:
        reason = str(e) or type(e).__name__
        if isinstance(e, TypeError):
            reason = "unexpected or missing arguments"
        return f"bad endpoint {description!r}: {reason}"
    except Exception as e:
        # Key-loading errors from pyOpenSSL and plugin parsers come in many types.
        return f"bad endpoint {description!r}: {e}"
    return None


def identity(description: str) -> str | None:
    """A key that two listeners share only if they would collide; L{None} for port 0."""
    prefix, args, kwargs = _split(description)
    if prefix == "unix":
        path = args[0] if args else kwargs.get("address")
        return f"unix:{path}" if path else None
    if prefix == "systemd":
        return f"systemd:{kwargs.get('name') or kwargs.get('index')}"
    family = {"ssl": "tcp", "tcp6": "tcp", "tls": "tcp"}.get(prefix, prefix)
    port = args[0] if args else kwargs.get("port")
    if port in (None, "0"):
        return None
    return f"{family}:{kwargs.get('interface', '*')}:{port}"


def is_loopback(description: str) -> bool:
    prefix, _, kwargs = _split(description)
    if prefix == "unix":
        return True
    interface = kwargs.get("interface")
    if prefix not in ("tcp", "tcp6", "ssl", "udp") or not interface:
        return False
    try:
        return ipaddress.ip_address(interface).is_loopback
    except ValueError:
        return False


def _plain_tcp(reactor: Any, args: list[str], kwargs: dict[str, str]) -> IStreamServerEndpoint:
    """The TCP endpoint under an C{ssl:} description, for TLS from a profile."""
    unknown = set(kwargs) - {"interface", "backlog", "port"}
    if unknown:
        raise ValueError(f"option {', '.join(sorted(unknown))} cannot be combined with a profile")
    port = int(args[0] if args else kwargs["port"])
    backlog = int(kwargs.get("backlog", 50))
    interface = kwargs.get("interface", "")
    if ":" in interface:
        return TCP6ServerEndpoint(reactor, port, backlog, interface)
    return TCP4ServerEndpoint(reactor, port, backlog, interface)


def server_endpoint(
    reactor: Any,
    description: str,
    base_dir: Path,
    tls: IOpenSSLServerConnectionCreator | None = None,
) -> IStreamServerEndpoint:
    """The stream endpoint for C{description}, wrapped in C{tls} when a profile applies."""
    if tls is None:
        endpoint: IStreamServerEndpoint = serverFromString(
            reactor, normalize(description, base_dir)
        )
        return endpoint
    prefix, args, kwargs = _split(description)
    if prefix == "ssl":
        inner = _plain_tcp(reactor, args, kwargs)
    else:
        inner = serverFromString(reactor, normalize(description, base_dir))
    return wrapServerTLS(tls, inner, reactor)
