"""
Relaying datagrams: each client source address gets its own socket to the
upstream, so the upstream's answers find their way back.  The mappings are
bounded (the least recently used goes first) and expire after a quiet period.
Datagram toxics (C{drop}, C{delay}, C{duplicate}) are decided per datagram.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import DatagramProtocol

if TYPE_CHECKING:
    from netd.services.proxy.state import Proxy

__all__ = ["DatagramRelay"]

Address = tuple[str, int]
# Datagrams held by delay toxics at once, per listener; more are dropped.
MAX_DELAYED = 10_000


class _Flow(DatagramProtocol):
    """One client's socket to the upstream."""

    noisy = False
    transport: Any

    def __init__(self, relay: DatagramRelay, client: Address) -> None:
        self.relay = relay
        self.client = client
        self.last_seen = relay.clock.seconds()

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.last_seen = self.relay.clock.seconds()
        self.relay.pass_on("downstream", data, self.client, self.relay.to_client(self.client))


class DatagramRelay(DatagramProtocol):
    """
    A proxy's udp: listener.

    @ivar max_clients: client source addresses mapped at once.
    @ivar idle: seconds without a datagram either way before a mapping ends.
    """

    noisy = False
    transport: Any

    def __init__(self, proxy: Proxy, max_clients: int, idle: float) -> None:
        self.proxy = proxy
        self.clock = proxy.clock
        self.max_clients = max_clients
        self.idle = idle
        self.flows: OrderedDict[Address, _Flow] = OrderedDict()
        self._delayed: dict[IDelayedCall, None] = {}
        self._sweep: IDelayedCall | None = None

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        stats = self.proxy.context.stats
        stats.bytes_in += len(data)
        stats.count("datagrams_in")
        if not self.proxy.enabled:
            return
        flow = self.flows.get(addr)
        if flow is None:
            flow = self._open(addr)
        else:
            self.flows.move_to_end(addr)
            flow.last_seen = self.clock.seconds()
        self.pass_on("upstream", data, addr, flow.transport.write)

    def _open(self, client: Address) -> _Flow:
        if len(self.flows) >= self.max_clients:
            _, oldest = self.flows.popitem(last=False)
            oldest.transport.stopListening()
            self.proxy.context.stats.count("udp_clients_evicted")
        host, port = self.proxy.upstream
        upstream = ipaddress.ip_address(host)
        # The upstream's answers come back to this socket only (connected UDP).
        interface = (
            ("::1" if upstream.version == 6 else "127.0.0.1") if upstream.is_loopback else ""
        )
        if not interface and upstream.version == 6:
            interface = "::"
        flow = _Flow(self, client)
        self.clock.listenUDP(0, flow, interface=interface)
        flow.transport.connect(host, port)
        self.flows[client] = flow
        self.proxy.context.stats.gauge("udp_clients", len(self.flows))
        if self._sweep is None:
            self._sweep = self.clock.callLater(self.idle / 4, self._expire)
        return flow

    def to_client(self, client: Address) -> Callable[[bytes], None]:
        def write(data: bytes) -> None:
            if self.transport is not None:
                self.transport.write(data, client)
                stats = self.proxy.context.stats
                stats.bytes_out += len(data)
                stats.count("datagrams_out")

        return write

    def pass_on(
        self, stream: str, data: bytes, client: Address, write: Callable[[bytes], None]
    ) -> None:
        """Send C{data} on with C{write}, through the datagram toxics of C{stream}."""
        delay, copies = 0.0, 1
        chance = self.proxy.chance
        for state in self.proxy.toxics:
            toxic = state.toxic
            if not toxic.datagram or toxic.stream != stream:
                continue
            if not state.decide(client[0], self.proxy.scenarios):
                continue
            self.proxy.fired(state, client[0], peer=f"{client[0]}:{client[1]}")
            if toxic.type == "drop":
                return
            if toxic.type == "delay":
                jitter = toxic["jitter"]
                delay += max(toxic["delay"] + (chance.uniform(-jitter, jitter) if jitter else 0), 0)
            else:
                copies += int(toxic["copies"])
        if delay <= 0:
            for _ in range(copies):
                write(data)
            return
        if len(self._delayed) >= MAX_DELAYED:
            self.proxy.context.stats.count("datagrams_dropped_delayed")
            return

        def send_late() -> None:
            del self._delayed[call]
            for _ in range(copies):
                write(data)

        call = self.clock.callLater(delay / 1000, send_late)
        self._delayed[call] = None

    def _expire(self) -> None:
        self._sweep = None
        stale = self.clock.seconds() - self.idle
        for client, flow in list(self.flows.items()):
            if flow.last_seen <= stale:
                del self.flows[client]
                flow.transport.stopListening()
        self.proxy.context.stats.gauge("udp_clients", len(self.flows))
        if self.flows:
            self._sweep = self.clock.callLater(self.idle / 4, self._expire)

    def stopProtocol(self) -> None:
        for flow in self.flows.values():
            flow.transport.stopListening()
        self.flows.clear()
        for call in self._delayed:
            call.cancel()
        self._delayed.clear()
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = None
