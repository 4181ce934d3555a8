"""
The one place netd imports Twisted's private names or reads their private attributes.

Each use says what public API is missing; tests/unit/test_compat.py exercises
each, and checks that the private methods netd's subclasses override (left in
those subclasses) still exist, so a Twisted upgrade that moves one fails there,
by name, rather than somewhere in a kind.  setup.cfg bounds Twisted to the
versions that test passed on.

This module holds what the core needs, from modules the reactor and
twisted.internet.endpoints load anyway; the names of a heavier area live in
their own submodule (netd.compat.web: HTTP/2; netd.compat.web_client: the
HTTP/1.1 client; netd.compat.mail: SASL; netd.compat.tls: ALPN), imported by
the code that serves it, so a map without web or mail services never loads
twisted.web, h2 or twisted.mail, nor one without a proxy route twisted.web.client.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.abstract import FileDescriptor
from twisted.internet.endpoints import _parse, _SystemdParser
from twisted.internet.interfaces import IListeningPort

from netd import LISTEN_ENVIRONMENT

__all__ = [
    "buffered_bytes",
    "inherited_descriptors",
    "may_send_now",
    "own_attribute",
    "parse_endpoint",
    "read_with",
    "run_twistd_with",
    "share_listening_socket",
    "unnamed_descriptors",
    "wake_one_waiter",
]


def parse_endpoint(description: str) -> tuple[list[str], dict[str, str]]:
    """
    Split an endpoint string into its positional and C{key=value} parts, with
    Twisted's quoting (C{\\:} and C{\\=}): what C{serverFromString} sees.  There
    is no public parser, only C{serverFromString}, which also builds the endpoint.
    Each call gets its own list and dict: callers rewrite them.
    """
    args, options = _parsed(description)
    return list(args), dict(options)


@functools.lru_cache(maxsize=1024)
def _parsed(description: str) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    # Checking a map reads each listener's string a dozen times (kind, TLS
    # profile, identity, address...), and Twisted's tokenizer walks it a
    # character at a time: 5 ms of the showcase map's start, once per string here.
    args, options = _parse(description)
    return tuple(args), tuple(options.items())


# sd-daemon.h's SD_LISTEN_FDS_START: the first descriptor systemd passes.
_SD_LISTEN_FDS_START = 3


def inherited_descriptors() -> list[int]:
    """
    The descriptors systemd handed this process, in order.

    Twisted reads C{LISTEN_FDS} once, when twisted.internet.endpoints is first
    imported, and removes it from the environment: its C{systemd:} parser holds
    the only copy, and exports no accessor.
    """
    descriptors: list[int] = _SystemdParser._sddaemon.inheritedDescriptors()
    if descriptors:
        return descriptors
    # Twisted keeps none when the launcher named none; sd_listen_fds(3) needs no names.
    return unnamed_descriptors(LISTEN_ENVIRONMENT, os.getpid())


def unnamed_descriptors(environment: Mapping[str, str], pid: int) -> list[int]:
    """The descriptors C{environment} says were passed to C{pid}, named or not."""
    if environment.get("LISTEN_PID") != str(pid) or "LISTEN_FDNAMES" in environment:
        return []  # not ours, or named: Twisted read them (or found them inconsistent)
    try:
        count = int(environment.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    return list(range(_SD_LISTEN_FDS_START, _SD_LISTEN_FDS_START + max(count, 0)))


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


def may_send_now(socket: Any) -> bool:
    """
    Whether a write to C{socket} (a TCP or UNIX connection) may go straight to
    the kernel: nothing queued ahead of it, not closing or half-closed, no pull
    producer (Twisted asks one for more only from its own doWrite), and no TLS
    started on it (after STARTTLS Twisted routes writes through TLS).

    FileDescriptor keeps its queue (C{_tempDataLen}) and half-close state
    (C{_writeDisconnecting}) private; there is no public "is anything queued".
    Nor is there a public "aborted": C{abortConnection} leaves C{disconnecting}
    alone and only stops Twisted's own writes (C{_aborting}).
    """
    return (
        not socket._tempDataLen
        and not socket.dataBuffer
        and not socket.TLS
        and socket.connected
        and not socket.disconnecting
        and not socket._writeDisconnecting
        and not getattr(socket, "_aborting", False)
        and (socket.producer is None or socket.streamingProducer)
    )


def own_attribute(layer: object, name: str, default: Any) -> Any:
    """
    C{layer}'s own attribute C{name} (its instance's or its class's), never
    one a C{__getattr__} answers for it: a ProtocolWrapper answers any name it
    lacks with its transport's.  What C{inspect.getattr_static} finds for an
    instance attribute or a class's plain value, for a fortieth of the cost
    (it was 40% of an FTP session's reactor time, asked at each command).
    """
    own = getattr(layer, "__dict__", None)
    if own is not None and name in own:
        return own[name]
    found, value = _class_attribute(type(layer), name)
    return value if found else default


_CLASS_ATTRIBUTES: dict[tuple[type, str], tuple[bool, Any]] = {}


def _class_attribute(klass: type, name: str) -> tuple[bool, Any]:
    """
    What C{klass} or a class it inherits from holds for C{name}: looked up once
    a class and name (a walk along the MRO each time was most of what asking
    an FTP connection's unsent bytes cost, at every command).  Classes here
    are not changed while netd runs.
    """
    key = (klass, name)
    known = _CLASS_ATTRIBUTES.get(key)
    if known is None:
        known = next(
            ((True, base.__dict__[name]) for base in klass.__mro__ if name in base.__dict__),
            (False, None),
        )
        _CLASS_ATTRIBUTES[key] = known
    return known


def buffered_bytes(layer: object) -> int:
    """
    Bytes one transport layer holds that it has not passed down: a
    FileDescriptor's write buffers, or the cleartext TLS keeps (privately)
    until its handshake is done.

    Reads the layer's own attributes only: a ProtocolWrapper answers any other
    name for its transport, which would count that layer twice.
    """
    if isinstance(layer, FileDescriptor):
        # A socket (the layer asked about most, at every command of a session)
        # answers no name for another layer: its attributes are its own.
        return len(layer.dataBuffer) - layer.offset + layer._tempDataLen
    total = 0
    buffered = own_attribute(layer, "dataBuffer", b"")
    if isinstance(buffered, bytes):
        total += len(buffered) - own_attribute(layer, "offset", 0)
        total += own_attribute(layer, "_tempDataLen", 0)
    return total + sum(map(len, own_attribute(layer, "_appSendBuffer", ())))


def run_twistd_with(plugin: Any) -> None:
    """
    Run twistd on C{sys.argv} with C{plugin} as its only plugin.  twistd's
    own option parser looks through every installed plugin, importing the
    interfaces they provide (twisted.trial's brings unittest): start-up time
    and memory a daemon never uses.  C{ServerOptions._getPlugins} is the
    private seam twistd reads its plugins through.
    """
    from twisted.application import app
    from twisted.scripts.twistd import ServerOptions, runApp  # type: ignore[attr-defined]

    class PluginOnly(ServerOptions):
        @staticmethod
        def _getPlugins(interface: Any, package: Any = None) -> list[Any]:
            return [plugin]

    app.run(runApp, PluginOnly)


def read_with(descriptor: Any, read: Callable[[], object]) -> None:
    """
    Have the reactor call C{read} where it calls C{descriptor.doRead}: the
    protocol reads the socket itself.  Twisted has no hook between its read
    loop and the protocol: a udp.Port calls C{datagramReceived} for each
    datagram, and for a server whose whole work a datagram is a dict lookup
    (dns's prepared answers) that loop and the call are most of the Python it
    runs; a tcp.Connection reads into a new bytes object each time, which an
    upload then copies into its own buffer (ftp's uploads read into that buffer
    instead).  C{read} returns what C{doRead} would: None, or why the
    connection ended (L{twisted.internet.main}'s C{CONNECTION_DONE} or
    C{CONNECTION_LOST}).  The reactor looks C{doRead} up on the descriptor each
    time, so an attribute of the instance takes its place; the class's own
    method stays for anyone who calls it by class.
    """
    descriptor.doRead = read


def wake_one_waiter(reactor: Any, port: Any) -> bool:
    """
    Have the kernel wake one of the processes waiting on C{port}'s socket, not
    all of them: workers share each listening socket, and without
    C{EPOLLEXCLUSIVE} (Linux 4.5) a datagram or a connection wakes every
    worker and all but one find nothing to read.  Twisted's epoll reactor
    keeps its epoll object private (C{_poller}) and registers readers without
    the flag; it is re-registered here with it.  Only for a port registered for
    reading alone: an exclusive registration cannot be modified, and Twisted
    modifies one to add writing (a listening or UDP port never writes through
    the reactor).  Should Twisted register it again (a port that stopped
    reading and starts again), it goes back to waking every waiter.  Returns
    whether the flag was set.
    """
    import select

    exclusive = getattr(select, "EPOLLEXCLUSIVE", None)
    poller = getattr(reactor, "_poller", None)
    if exclusive is None or not isinstance(poller, select.epoll):
        return False
    if port not in reactor.getReaders() or port in reactor.getWriters():
        return False
    descriptor = port.fileno()
    poller.unregister(descriptor)
    poller.register(descriptor, select.EPOLLIN | exclusive)
    return True
