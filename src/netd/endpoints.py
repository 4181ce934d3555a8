"""
Endpoint strings: Twisted's server endpoint syntax plus netd's datagram forms,
C{udp:PORT[:interface=ADDR]} and C{systemd-udp:domain=INET:name=NAME}.

Everything that looks inside an endpoint string lives here, so the rest of netd
treats listeners as opaque descriptions.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import (
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
    serverFromString,
    wrapServerTLS,
)
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import DatagramProtocol
from zope.interface import implementer

from netd.compat import inherited_descriptors, parse_endpoint, share_listening_socket
from netd.connections import SendsNowFactory
from netd.records import Record

__all__ = [
    "MAX_DATAGRAM",
    "HeldSocket",
    "can_hand_over",
    "can_share",
    "check",
    "has_own_tls",
    "identity",
    "inherited_socket",
    "is_datagram",
    "is_loopback",
    "listen_datagram",
    "normalize",
    "parse_udp",
    "server_endpoint",
    "wants_profile",
]

# Sockets handed over by systemd, by prefix: the socket type each form adopts.
_SYSTEMD_TYPES = {"systemd": socket.SOCK_STREAM, "systemd-udp": socket.SOCK_DGRAM}
_TRANSPORTS: dict[int, str] = {socket.SOCK_STREAM: "stream", socket.SOCK_DGRAM: "datagram"}
_SYSTEMD_DOMAINS = {"systemd": ("INET", "INET6", "UNIX"), "systemd-udp": ("INET", "INET6")}

_SSL_KEY_OPTIONS = ("privateKey", "certKey", "extraCertChain", "dhParameters")
# The unix: socket path is the first argument or address=; lockfile= is a flag, not a path.
_PATH_OPTIONS = {"ssl": _SSL_KEY_OPTIONS, "unix": ("address",)}


def _split(description: str) -> tuple[str, list[str], dict[str, str]]:
    args, kwargs = parse_endpoint(description)
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
    return _split(description)[0] in ("udp", "systemd-udp")


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


# Endpoint constructors only keep their reactor; checking a description builds
# one and never listens, so no reactor (real or fake) is needed.
_NO_REACTOR = object()


def check(description: str, base_dir: Path) -> str | None:
    """Validate C{description} offline; return what is wrong, or L{None}."""
    try:
        prefix, args, kwargs = _split(description)
    except (ValueError, StopIteration, IndexError):
        return f"not an endpoint description: {description!r}"
    try:
        if prefix == "udp":
            parse_udp(description)
        elif prefix in _SYSTEMD_TYPES:
            _check_systemd(prefix, args, kwargs)
        elif wants_profile(description):
            _plain_tcp(_NO_REACTOR, args, kwargs)
        else:
            serverFromString(_NO_REACTOR, normalize(description, base_dir))
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
    if prefix in _SYSTEMD_TYPES:
        # A socket unit gives one name to all its sockets: stream and datagram differ.
        selector = f"name={kwargs['name']}" if "name" in kwargs else f"index={kwargs.get('index')}"
        return f"{prefix}:{selector}"
    family = {"ssl": "tcp", "tcp6": "tcp", "tls": "tcp"}.get(prefix, prefix)
    port = args[0] if args else kwargs.get("port")
    if port in (None, "0"):
        return None
    return f"{family}:{kwargs.get('interface', '*')}:{port}"


def _check_systemd(prefix: str, args: list[str], kwargs: dict[str, str]) -> None:
    # Descriptors exist only once systemd hands them over; check the syntax.
    domains = _SYSTEMD_DOMAINS[prefix]
    unknown = set(kwargs) - {"domain", "index", "name"}
    if args or unknown:
        raise ValueError(f"expected {prefix}:domain=DOMAIN:name=NAME (or index=N)")
    if ("index" in kwargs) == ("name" in kwargs):
        raise ValueError("give exactly one of index= or name=")
    if kwargs.get("domain") not in domains:
        raise ValueError(f"domain= must be {' or '.join(domains)}")
    if "index" in kwargs and int(kwargs["index"]) < 0:
        raise ValueError("index= must not be negative")


def _inherited() -> list[tuple[str, int]]:
    """The (name, descriptor) pairs systemd handed to this process, in order."""
    # The names are read again (the descriptors cannot be: see inherited_descriptors)
    # because ListenFDs maps each name to one descriptor, while a socket unit gives
    # its one name to all of its sockets.
    descriptors = inherited_descriptors()
    given = os.environ.get("LISTEN_FDNAMES")
    # sd_listen_fds_with_names(3): a launcher that names none names each "unknown".
    names = given.split(":") if given is not None else ["unknown"] * len(descriptors)
    return list(zip(names, descriptors, strict=True)) if len(names) == len(descriptors) else []


def _socket_kind(descriptor: int) -> tuple[int, int] | None:
    """(family, type) of the socket open as C{descriptor}, or None if it is none."""
    try:
        probe = socket.socket(fileno=descriptor)
    except OSError:
        return None
    try:
        return probe.family, probe.type
    finally:
        probe.detach()


def _kind_name(kind: tuple[int, int] | None) -> str:
    if kind is None:
        return "not a socket"
    family, type_ = kind
    try:
        domain = socket.AddressFamily(family).name.removeprefix("AF_")
    except ValueError:
        domain = f"family {family}"
    return f"{_TRANSPORTS.get(type_, 'other')} {domain}"


def inherited_socket(
    description: str, inherited: Sequence[tuple[str, int]] | None = None
) -> tuple[int, int]:
    """
    The (descriptor, address family) systemd handed over for a C{systemd:} or
    C{systemd-udp:} description, chosen by name (or index) and by socket type,
    and set non-blocking as the reactor needs.

    @param inherited: (name, descriptor) pairs; by default those systemd passed.
    @raise ValueError: naming what was asked for and what systemd did pass.
    """
    prefix, args, kwargs = _split(description)
    if prefix not in _SYSTEMD_TYPES:
        raise ValueError(f"not a systemd socket: {description!r}")
    _check_systemd(prefix, args, kwargs)
    if inherited is None:
        inherited = _inherited()
    wanted = (getattr(socket, "AF_" + kwargs["domain"]), _SYSTEMD_TYPES[prefix])
    if "index" in kwargs:
        index = int(kwargs["index"])
        candidates = inherited[index : index + 1]
        which = f"with index {index}"
    else:
        candidates = [entry for entry in inherited if entry[0] == kwargs["name"]]
        which = f"named {kwargs['name']!r}"
    for _, descriptor in candidates:
        if _socket_kind(descriptor) == wanted:
            os.set_blocking(descriptor, False)
            return descriptor, wanted[0]
    passed = ", ".join(
        f"{name} ({_kind_name(_socket_kind(descriptor))})" for name, descriptor in inherited
    )
    raise ValueError(
        f"systemd passed no {_kind_name(wanted)} socket {which} (passed: {passed or 'none'})"
    )


@implementer(IStreamServerEndpoint)
@attrs.frozen(repr=False)
class _InheritedStreamEndpoint(Record):
    """
    Listens on a dup of a socket systemd passed, leaving systemd's descriptor
    open; or on a dup of the socket of a listener being replaced.

    Twisted's C{systemd:} endpoint closes the inherited descriptor once adopted,
    so a service restarted by a reload could not adopt it again.
    """

    reactor: Any
    descriptor: int
    family: int

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        try:
            port: IListeningPort = self.reactor.adoptStreamPort(
                self.descriptor, self.family, factory
            )
            listening: Any = port
            if not listening.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                # The listener it replaces had stopped accepting (a proxy that
                # is down, netd.services.proxy.listening): this one accepts,
                # with the system's backlog (an adopted port knows none).
                listening.socket.listen()
        except Exception:
            return fail()
        return succeed(port)


def can_hand_over(description: str) -> bool:
    """
    Whether a listener of C{description} can pass its bound socket to its
    successor (a service restarted by a reload), so that no connection attempt
    meets a closed port in between.  A UNIX socket cannot: Twisted unlinks its
    path when the old listener stops.  Nor can TLS built from the string's own
    key material, which only Twisted's parser knows how to wrap.
    """
    return _split(description)[0] not in ("unix", "tls") and not has_own_tls(description)


def can_share(description: str) -> bool:
    """
    Whether worker processes can serve a listener of C{description} on the
    socket the main process binds: as for L{can_hand_over}, and not a UNIX
    socket systemd passed, whose path a worker's Twisted port would unlink
    when it stops.
    """
    prefix, _, kwargs = _split(description)
    return can_hand_over(description) and not (
        prefix == "systemd" and kwargs.get("domain") == "UNIX"
    )


@attrs.frozen(repr=False)
class HeldSocket(Record):
    """
    A dup of a bound listener's socket, held while a reload replaces the
    listener: whichever listener closes first, the socket stays bound.
    """

    descriptor: int
    family: int

    @classmethod
    def of(cls, port: IListeningPort) -> HeldSocket:
        share_listening_socket(port)
        listening: Any = port
        return cls(os.dup(listening.fileno()), listening.socket.family)

    def close(self) -> None:
        os.close(self.descriptor)


# The largest UDP payload: Twisted reads 8 KiB by default and cuts the rest off
# silently (an echo of 20,000 bytes came back as 8,192).  A larger read costs
# nothing measurable (730 ns a recvfrom of 40 bytes either way).
MAX_DATAGRAM = 65535


def listen_datagram(
    reactor: Any,
    description: str,
    protocol: DatagramProtocol,
    inherited: Sequence[tuple[str, int]] | None = None,
    held: HeldSocket | None = None,
) -> IListeningPort:
    """
    Listen for datagrams as C{description} says: C{udp:PORT[:interface=ADDR]}
    binds, C{systemd-udp:domain=INET:name=NAME} adopts a socket systemd passed
    (a dup of it: systemd's descriptor stays open for the next adoption).

    @param inherited: as for L{inherited_socket}.
    @param held: the socket of the listener this one replaces, to take over
        (a dup of it) instead of binding.
    """
    # UDP has no endpoint API in Twisted (#4471): this is its one place.
    port: IListeningPort
    if held is not None:
        port = reactor.adoptDatagramPort(
            held.descriptor, held.family, protocol, maxPacketSize=MAX_DATAGRAM
        )
    elif _split(description)[0] == "udp":
        number, interface = parse_udp(description)
        port = reactor.listenUDP(number, protocol, interface=interface, maxPacketSize=MAX_DATAGRAM)
    else:
        descriptor, family = inherited_socket(description, inherited)
        port = reactor.adoptDatagramPort(descriptor, family, protocol, maxPacketSize=MAX_DATAGRAM)
    return port


def port_of(description: str) -> str | None:
    """Family and fixed port, whatever the interface: listeners that may contend for it."""
    key = identity(description)
    if key is None or key.startswith(("unix:", "systemd")):
        return key
    family, _, interface_and_port = key.partition(":")
    return f"{family}:{interface_and_port.rsplit(':', 1)[1]}"


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
    held: HeldSocket | None = None,
) -> IStreamServerEndpoint:
    """
    The stream endpoint for C{description}, wrapped in C{tls} when a profile applies.

    @param held: the socket of the listener this one replaces: the endpoint
        listens on a dup of it, so the kernel's listening socket, and the
        connections waiting in its backlog, pass to the new factory.
    """
    prefix, args, kwargs = _split(description)
    inner: IStreamServerEndpoint
    if held is not None:
        inner = _InheritedStreamEndpoint(reactor, held.descriptor, held.family)
    elif prefix == "systemd":
        inner = _InheritedStreamEndpoint(reactor, *inherited_socket(description))
    elif prefix == "ssl" and tls is not None:
        inner = _plain_tcp(reactor, args, kwargs)
    else:
        inner = serverFromString(reactor, normalize(description, base_dir))
    if tls is None:
        return inner
    return wrapServerTLS(tls, _SendingNow(inner), reactor)


@implementer(IStreamServerEndpoint)
class _SendingNow:
    """A TLS listener's stream endpoint: TLS sends through L{SendsNow}."""

    def __init__(self, inner: IStreamServerEndpoint) -> None:
        self.inner = inner

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        listening: Deferred[IListeningPort] = self.inner.listen(SendsNowFactory(factory))
        return listening
