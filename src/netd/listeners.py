"""
Binding a group of listeners all together or not at all, and describing them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import attrs
from twisted.internet.defer import Deferred, DeferredList, fail, gatherResults, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure

from netd.config import ListenerConfig
from netd.endpoints import HeldSocket
from netd.records import Record

__all__ = ["BoundListener", "ListenerGroup", "StartupError", "handover_key", "os_message"]

log = Logger(namespace="netd")


class StartupError(Exception):
    """netd cannot start as configured; str() is the operator's message."""


@attrs.frozen(repr=False)
class BoundListener(Record):
    config: ListenerConfig
    port: IListeningPort

    def describe(self) -> dict[str, Any]:
        address: Any = self.port.getHost()
        entry: dict[str, Any] = {"endpoint": self.config.endpoint}
        name = getattr(address, "name", None)
        if name is not None or not hasattr(address, "host"):
            entry["transport"] = "unix"
            entry["path"] = name.decode() if isinstance(name, bytes) else name
        else:
            entry["transport"] = "udp" if self.config.datagram else "tcp"
            entry["host"] = address.host
            entry["port"] = address.port
        entry["tls"] = self.config.tls
        if self.config.protocol is not None:
            entry["protocol"] = self.config.protocol
        return entry

    def summary(self) -> str:
        entry = self.describe()
        where = entry.get("path") or (
            f"[{entry['host']}]:{entry['port']}"
            if ":" in entry["host"]
            else f"{entry['host']}:{entry['port']}"
        )
        protocol = f" {entry['protocol']}" if "protocol" in entry else ""
        return f"{entry['transport']} {where}{' tls' if entry['tls'] else ''}{protocol}"


class ListenerGroup(ABC):
    """Listeners that come and go together: a service's, or the admin API's."""

    label: str
    summary_prefix: str
    listener_configs: Sequence[ListenerConfig]
    listeners: list[BoundListener]

    @abstractmethod
    def _listen_one(
        self, listener: ListenerConfig, held: HeldSocket | None
    ) -> Deferred[IListeningPort]:
        """Start one listener: on C{held} (a listener it replaces) if given."""

    def listen(self, held: Mapping[str, HeldSocket] | None = None) -> Deferred[list[BoundListener]]:
        """
        Bind every listener, or none: a failure unbinds the ones already bound.

        @param held: sockets of listeners this group replaces, by L{handover_key}:
            taken over instead of bound anew.
        """
        held = held or {}
        attempts = []
        handed: set[str] = set()
        for listener in self.listener_configs:
            # One socket, one listener: two listeners alike (tcp:0 twice) bind anew.
            key = handover_key(listener)
            socket = held.get(key) if key not in handed else None
            handed.add(key)
            try:
                attempt = self._listen_one(listener, socket)
            except Exception:
                attempt = fail(Failure())
            attempts.append(attempt.addCallback(partial(BoundListener, listener)))

        def settled(results: list[tuple[bool, Any]]) -> Any:
            bound = [value for ok, value in results if ok]
            failures = [
                (listener, value)
                for listener, (ok, value) in zip(self.listener_configs, results, strict=True)
                if not ok
            ]
            if not failures:
                self.listeners = bound
                return bound
            listener, failure = failures[0]
            reason = failure.value
            if isinstance(reason, CannotListenError) and reason.socketError is not None:
                reason = reason.socketError
            message = (
                f"{listener.position}: {self.label}: cannot listen on "
                f"{listener.endpoint}: {os_message(reason)}"
            )
            unbound = [maybeDeferred(b.port.stopListening) for b in bound]
            return gatherResults(unbound).addBoth(lambda _: Failure(StartupError(message)))

        return DeferredList(attempts, consumeErrors=True).addCallback(settled)

    def stop_listening(self) -> Deferred[None]:
        stopping = [maybeDeferred(b.port.stopListening) for b in self.listeners]
        self.listeners = []
        return gatherResults(stopping).addCallback(lambda _: None)

    def announce(self) -> None:
        for listener in self.listeners:
            log.info(
                "{what} listening on {where}", what=self.summary_prefix, where=listener.summary()
            )


def handover_key(listener: ListenerConfig) -> str:
    """
    What a reload's new listener must share with an old one to take over its
    socket: the endpoint and the protocol (smtp's imap listener on C{tcp:0}
    is not its smtp one on C{tcp:0}).
    """
    if listener.protocol is None:
        return listener.endpoint
    return f"{listener.endpoint} protocol={listener.protocol}"


def os_message(reason: BaseException) -> str:
    if isinstance(reason, OSError) and reason.strerror:
        return f"{reason.strerror} (errno {reason.errno})"
    return str(reason) or type(reason).__name__
