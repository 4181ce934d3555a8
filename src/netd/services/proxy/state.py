"""
A proxy service's live state: its upstream, whether it is up, its toxics and
its open relays; what the map, the admin views and the Toxiproxy API change.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IAddress, IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from netd.kinds import BuildContext
from netd.records import Record
from netd.rules import moved
from netd.schema import client_address
from netd.services.proxy.listening import accept_again, stop_accepting
from netd.services.proxy.relay import (
    RELAY_READ_SIZE,
    ClientSide,
    Relay,
    UpstreamSide,
    connecting,
)
from netd.services.proxy.toxics import Toxic, ToxicSet, ToxicState

__all__ = ["Proxy", "UpstreamTLS"]

# Seconds to reach the upstream before the client is closed.
CONNECT_TIMEOUT = 10
# The key of BuildContext.carried under which a proxy hands its toxics to its successor.
_CARRIED_TOXICS = "toxics"


@attrs.frozen(repr=False)
class UpstreamTLS(Record):
    """TLS to the upstream: verified against C{ca} (or the system's), for C{server_name}."""

    server_name: str
    ca_pem: bytes | None = None

    def creator(self) -> IOpenSSLClientConnectionCreator:
        from twisted.internet.ssl import Certificate, optionsForClientTLS, platformTrust

        if self.ca_pem is not None:
            trust: Any = Certificate.loadPEM(self.ca_pem)
        else:
            trust = platformTrust()
        return optionsForClientTLS(self.server_name, trustRoot=trust)


class Proxy(Service):
    """One proxy service: a map's, or one made through the Toxiproxy API."""

    def __init__(
        self,
        context: BuildContext,
        upstream: tuple[str, int],
        upstream_tls: UpstreamTLS | None,
        toxics: tuple[Toxic, ...],
        connect: Callable[[UpstreamSide], Deferred[Any]] | None = None,
    ) -> None:
        """
        @param connect: opens the upstream connection for one relay; by
            default to C{upstream} (with C{upstream_tls}) through the reactor.
        """
        self.context = context
        self.connect = connect or self._connect
        self.clock = context.reactor
        self.upstream = upstream
        self.upstream_tls = upstream_tls
        self._tls_creator = upstream_tls.creator() if upstream_tls is not None else None
        self.configured_toxics = toxics
        self.toxics = ToxicSet()
        for toxic in toxics:
            self.toxics.add(toxic, source="map")
        older = context.carried.get(_CARRIED_TOXICS)
        if isinstance(older, ToxicSet):
            for name in self.toxics.adopt(older):
                context.log.warn(
                    "run-time toxic {toxic} not kept across the reload: the map has its name",
                    toxic=name,
                )
        self.toxics.watchers.append(self._toxics_changed)
        self.enabled = True
        self.chance = random.Random()
        self.live: dict[Relay, None] = {}
        self._read_buffer: memoryview | None = None
        # The daemon's scenarios, which toxics read (state) and move (next_state) as rules do.
        self.scenarios = context.rules.scenarios

    # Connections

    @property
    def read_buffer(self) -> memoryview:
        """
        Where every relay between plain sockets reads, made on first use:
        bytes are sent from it before the next read, so one serves them all.
        """
        if self._read_buffer is None:
            self._read_buffer = memoryview(bytearray(RELAY_READ_SIZE))
        return self._read_buffer

    def relay(self, client: ClientSide) -> Relay:
        relay = Relay(self, client)
        self.live[relay] = None
        connecting(relay, self.connect)
        return relay

    def _connect(self, side: UpstreamSide) -> Deferred[Any]:
        host, port = self.upstream
        endpoint: Any = HostnameEndpoint(self.clock, host, port, timeout=CONNECT_TIMEOUT)
        if self._tls_creator is not None:
            endpoint = wrapClientTLS(self._tls_creator, endpoint)
        factory = Factory.forProtocol(lambda: side)
        factory.noisy = False
        connected: Deferred[Any] = endpoint.connect(factory)
        return connected

    def _toxics_changed(self) -> None:
        # Toxiproxy's toxics join every open link as they come, idle ones too.
        for relay in list(self.live):
            if not relay.closed:
                relay.follow_toxics()

    def forget(self, relay: Relay) -> None:
        self.live.pop(relay, None)

    def upstream_failed(self, relay: Relay, failure: Failure) -> None:
        self.context.stats.count("upstream_failures")
        host, port = self.upstream
        self.context.emit(
            "proxy.upstream_failed",
            connection=relay.connection_id,
            upstream=f"{host}:{port}",
            error=failure.getErrorMessage(),
        )

    def fired(self, state: ToxicState, client: IAddress | str | None, **where: Any) -> None:
        """
        A toxic acts on one more connection (datagram): its scenario moves to its
        C{next_state}, and C{toxic.fired} is journaled with the fields of the
        rules' C{rule.fired} (C{rule} is the toxic's name), then the toxic's own.
        """
        toxic, rule = state.toxic, state.rule
        address = client_address(client)
        scenario = moved(rule, self.scenarios)
        self.context.stats.count("toxics_fired")
        self.context.emit(
            "toxic.fired",
            rule=toxic.name,
            source=rule.source,
            fired=rule.fired,
            client=str(address) if address is not None else "",
            matched={},
            acts=[toxic.type],
            toxic=toxic.name,
            toxic_type=toxic.type,
            stream=toxic.stream,
            **scenario,
            **where,
        )

    # Control

    def set_enabled(self, enabled: bool) -> None:
        """
        Down stops listening (L{netd.services.proxy.listening}) and cuts the
        open connections, as Toxiproxy's disabled proxy; up listens again.
        """
        if enabled == self.enabled:
            return
        self.enabled = enabled
        self.context.emit("proxy.enabled" if enabled else "proxy.disabled")
        for port in self.context.stream_ports():
            if enabled:
                accept_again(port)
            else:
                stop_accepting(port)
        if not enabled:
            for relay in list(self.live):
                relay.cut()

    def reset(self) -> None:
        """Toxiproxy's reset: up again, and no toxic left."""
        self.set_enabled(True)
        self.clear_toxics()

    def clear_toxics(self) -> None:
        self.toxics.clear()

    def startService(self) -> None:
        super().startService()
        # Serving now: the API's toxics are what a reload that rebuilds it carries over.
        self.context.carried[_CARRIED_TOXICS] = self.toxics

    def carry_no_toxics(self) -> None:
        """Deleted, not rebuilt: a proxy made again under its name starts with no toxics."""
        self.context.carried.pop(_CARRIED_TOXICS, None)

    def stopService(self) -> None:
        super().stopService()
        for relay in list(self.live):
            relay.cut()
