"""
The running daemon: services built from the map, their listeners, readiness and shutdown.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import attrs
from twisted.application.service import MultiService, Service
from twisted.internet.defer import (
    Deferred,
    DeferredList,
    fail,
    gatherResults,
    inlineCallbacks,
    maybeDeferred,
    succeed,
)
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from twisted.python.failure import Failure

from netd import endpoints, tls
from netd.config import ListenerConfig, NetdConfig, ServiceConfig, TLSProfileConfig
from netd.connections import ConnectionSet, TrackingFactory
from netd.events import Journal, ServiceStats
from netd.kinds import BuildContext, Handlers
from netd.services import load_kind

__all__ = ["Daemon", "LifecycleObserver", "RunningService", "StartupError", "build_tls"]

log = Logger(namespace="netd")


class LifecycleObserver(Protocol):
    """Told about the daemon's state changes (systemd notification, for one)."""

    def ready(self, daemon: Daemon) -> None: ...
    def reloading(self, daemon: Daemon) -> None: ...
    def reloaded(self, daemon: Daemon) -> None: ...
    def stopping(self, daemon: Daemon) -> None: ...


class StartupError(Exception):
    """netd cannot start as configured; str() is the operator's message."""


@attrs.frozen
class BoundListener:
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
        return entry

    def summary(self) -> str:
        entry = self.describe()
        where = entry.get("path") or (
            f"[{entry['host']}]:{entry['port']}"
            if ":" in entry["host"]
            else f"{entry['host']}:{entry['port']}"
        )
        return f"{entry['transport']} {where}{' tls' if entry['tls'] else ''}"


def build_tls(
    profiles: Mapping[str, TLSProfileConfig], state_dir: Path
) -> dict[str, IOpenSSLServerConnectionCreator]:
    """Load or generate every TLS profile; raise L{StartupError} naming the profile."""
    creators: dict[str, IOpenSSLServerConnectionCreator] = {}
    for name, profile in profiles.items():
        try:
            if profile.self_signed:
                keypair, _ = tls.ensure_self_signed(state_dir / "tls", name, profile.self_signed)
            else:
                assert profile.keypair is not None
                keypair = tls.KeyPair(profile.keypair.cert, profile.keypair.key)
            sni = {n: tls.KeyPair(k.cert, k.key) for n, k in profile.sni.items()}
            creators[name] = tls.server_options(
                keypair,
                min_version=profile.min_version,
                client_ca=profile.client_ca,
                sni=sni or None,
            )
        except (tls.TLSError, OSError) as e:
            raise StartupError(f"{profile.position}: tls.{name}: {e}") from None
    return creators


class RunningService(Service):
    """One service of the map: its handlers, listeners and live connections."""

    def __init__(
        self,
        config: ServiceConfig,
        reactor: Any,
        base_dir: Path,
        journal: Journal,
        tls_creators: Mapping[str, IOpenSSLServerConnectionCreator],
        state_dir: Path,
    ) -> None:
        self.setName(config.name)
        self.config = config
        self.reactor = reactor
        self.base_dir = base_dir
        self.stats = ServiceStats()
        self.state = "configured"
        self.tls_creators = tls_creators
        self.context = BuildContext(
            reactor=reactor,
            name=config.name,
            state_dir=state_dir,
            journal=journal,
            stats=self.stats,
            log=Logger(namespace=f"netd.{config.name}"),
            tls=tls_creators,
        )
        self.handlers: Handlers = load_kind(config.type).build(config, self.context)
        self.connections = ConnectionSet(
            reactor,
            config.name,
            self.stats,
            journal,
            config.max_connections,
            config.idle_timeout,
            self.handlers.busy_reply,
        )
        self.listeners: list[BoundListener] = []

    def _listen_one(self, listener: ListenerConfig) -> Deferred[IListeningPort]:
        if listener.datagram:
            assert self.handlers.datagram is not None
            port, interface = endpoints.parse_udp(listener.endpoint)
            # UDP has no endpoint API in Twisted (#4471): this is its one place.
            udp_port = self.reactor.listenUDP(
                port, self.handlers.datagram(listener), interface=interface
            )
            return succeed(udp_port)
        assert self.handlers.stream is not None
        creator = self.tls_creators[listener.tls_profile] if listener.tls_profile else None
        endpoint = endpoints.server_endpoint(
            self.reactor, listener.endpoint, self.base_dir, creator
        )
        factory = TrackingFactory(self.handlers.stream(listener), self.connections)
        listening: Deferred[IListeningPort] = endpoint.listen(factory)
        return listening

    def listen(self) -> Deferred[list[BoundListener]]:
        """Bind every listener, or none: a failure unbinds the ones already bound."""
        attempts = []
        for listener in self.config.listen:
            try:
                attempt = self._listen_one(listener)
            except Exception:
                attempt = fail(Failure())
            attempts.append(attempt.addCallback(partial(BoundListener, listener)))

        def settled(results: list[tuple[bool, Any]]) -> Any:
            bound = [value for ok, value in results if ok]
            failures = [
                (listener, value)
                for listener, (ok, value) in zip(self.config.listen, results, strict=True)
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
                f"{listener.position}: service {self.config.name}: cannot listen on "
                f"{listener.endpoint}: {_os_message(reason)}"
            )
            unbound = [maybeDeferred(b.port.stopListening) for b in bound]
            return gatherResults(unbound).addBoth(lambda _: Failure(StartupError(message)))

        return DeferredList(attempts, consumeErrors=True).addCallback(settled)

    def announce(self) -> None:
        self.state = "running"
        for listener in self.listeners:
            log.info(
                "service {name} ({type}) listening on {where}",
                name=self.config.name,
                type=self.config.type,
                where=listener.summary(),
            )

    def startService(self) -> None:
        super().startService()
        if self.handlers.service is not None:
            self.handlers.service.startService()

    def stop_listening(self) -> Deferred[None]:
        stopping = [maybeDeferred(b.port.stopListening) for b in self.listeners]
        self.listeners = []
        return gatherResults(stopping).addCallback(lambda _: None)

    @inlineCallbacks
    def stop(self, grace: float) -> Any:
        """Stop accepting at once, let exchanges finish for C{grace} seconds, then stop."""
        self.state = "stopping"
        yield self.stop_listening()
        yield self.connections.drain(grace)
        self.connections.stop()
        if self.handlers.service is not None:
            yield self.handlers.service.stopService()
        self.state = "stopped"
        yield Service.stopService(self)

    def stopService(self) -> Deferred[None]:
        # The daemon stops its services itself so that all drain together.
        return self.stop(0)

    def describe(self) -> dict[str, Any]:
        stats = self.stats.snapshot()
        live_in, live_out = self.connections.bytes_in_flight()
        stats["bytes_in"] += live_in
        stats["bytes_out"] += live_out
        return {
            "type": self.config.type,
            "state": self.state,
            "listeners": [b.describe() for b in self.listeners],
            "counters": stats,
        }


def _first_error(failure: Failure) -> BaseException | None:
    """The error inside a L{gatherResults} failure."""
    error = failure.value
    sub = getattr(error, "subFailure", None)
    return sub.value if sub is not None else error


def _os_message(reason: BaseException) -> str:
    if isinstance(reason, OSError) and reason.strerror:
        return f"{reason.strerror} (errno {reason.errno})"
    return str(reason) or type(reason).__name__


class Daemon(MultiService):
    """
    The root of netd's service tree.

    Listeners are bound in L{privilegedStartService} so that ports below 1024
    are taken before twistd drops root; readiness is announced once all are bound.
    """

    def __init__(
        self,
        config: NetdConfig,
        reactor: Any,
        ports_file: Path | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.ports_file = ports_file
        self.observers: list[LifecycleObserver] = []
        self.journal = Journal(reactor)
        self.services_by_name: dict[str, RunningService] = {}
        self.ready = False

    def _build(self) -> None:
        self.config.state_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        creators = build_tls(self.config.tls, self.config.state_dir)
        for service_config in self.config.services.values():
            if not service_config.enabled:
                continue
            running = RunningService(
                service_config,
                self.reactor,
                self.config.file.parent,
                self.journal,
                creators,
                self.config.state_dir,
            )
            running.setServiceParent(self)
            self.services_by_name[service_config.name] = running

    def privilegedStartService(self) -> None:
        try:
            self._build()
        except OSError as e:
            raise StartupError(f"{self.config.file}: state_dir: {_os_message(e)}") from None
        bound: list[Failure | Any] = []
        all_bound = gatherResults(
            [s.listen() for s in self.services_by_name.values()], consumeErrors=True
        )
        all_bound.addBoth(bound.append)
        if bound and isinstance(bound[0], Failure):
            self._unbind()
            failure: Failure = bound[0]
            raise StartupError(str(_first_error(failure)))
        if not bound:
            # An endpoint that binds asynchronously (a plugin's): readiness waits for it.
            all_bound.addCallbacks(lambda _: self._announce_ready(), self._failed_late)

    def _unbind(self) -> None:
        for service in self.services_by_name.values():
            service.stop_listening()

    def _failed_late(self, failure: Failure) -> None:
        log.critical("{error}", error=_first_error(failure))
        self._unbind()
        self.reactor.stop()

    def startService(self) -> None:
        super().startService()
        if all(s.listeners or not s.config.listen for s in self.services_by_name.values()):
            self._announce_ready()

    def _announce_ready(self) -> None:
        if self.ready:
            return
        self.ready = True
        for service in self.services_by_name.values():
            service.announce()
        if self.ports_file is not None:
            write_atomically(self.ports_file, json.dumps(self.ports(), indent=2) + "\n")
        for observer in self.observers:
            observer.ready(self)

    def ports(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "services": {
                name: {
                    "type": service.config.type,
                    "listeners": [b.describe() for b in service.listeners],
                }
                for name, service in self.services_by_name.items()
            },
        }

    @inlineCallbacks
    def stopService(self) -> Any:
        log.info(
            "netd stopping: no new connections, {grace}s grace", grace=self.config.shutdown_grace
        )
        for observer in self.observers:
            observer.stopping(self)
        self.running = False
        services = list(self.services_by_name.values())
        yield gatherResults([s.stop(self.config.shutdown_grace) for s in services])
        if self.ports_file is not None:
            self.ports_file.unlink(missing_ok=True)
        log.info("netd stopped")


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
