"""A memory reactor that listens on every kind of port netd binds."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable
from typing import Literal

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IAddress, IListeningPort, IProtocolFactory
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.testing import MemoryReactorClock
from zope.interface import implementer


@implementer(IListeningPort)
class FakePort:
    """A listening port that only remembers whether it listens."""

    def __init__(self, address: IAddress) -> None:
        self.address = address
        self.listening = True

    def startListening(self) -> None:
        self.listening = True

    def stopListening(self) -> None:
        self.listening = False

    def getHost(self) -> IAddress:
        return self.address


class ListeningReactor(MemoryReactorClock):
    """
    A MemoryReactorClock that also listens for datagrams, gives port 0 a real
    number, remembers every port it handed out, and refuses the ports in C{refuse}
    as a real reactor does: by raising L{CannotListenError}.
    """

    def __init__(self, refuse: Iterable[tuple[str, int, int]] = ()) -> None:
        super().__init__()
        self.refuse = {(kind, port): code for kind, port, code in refuse}
        self.udpPorts: list[tuple[int, DatagramProtocol, str]] = []
        self.ports: list[FakePort] = []
        self._ephemeral = itertools.count(40001)

    def _port(self, kind: Literal["TCP", "UDP"], port: int, interface: str) -> FakePort:
        code = self.refuse.get((kind, port))
        if code is not None:
            raise CannotListenError(interface, port, OSError(code, os.strerror(code)))
        number = next(self._ephemeral) if port == 0 else port
        host = interface or "0.0.0.0"
        address = IPv6Address if ":" in host else IPv4Address
        listening = FakePort(address(kind, host, number))
        self.ports.append(listening)
        return listening

    def listenTCP(
        self, port: int, factory: IProtocolFactory, backlog: int = 50, interface: str = ""
    ) -> FakePort:
        self.tcpServers.append((port, factory, backlog, interface))
        return self._port("TCP", port, interface)

    def listenUDP(
        self,
        port: int,
        protocol: DatagramProtocol,
        interface: str = "",
        maxPacketSize: int = 8192,
    ) -> FakePort:
        self.udpPorts.append((port, protocol, interface))
        return self._port("UDP", port, interface)

    def listenUNIX(
        self,
        address: str,
        factory: IProtocolFactory,
        backlog: int = 50,
        mode: int = 0o666,
        wantPID: int = 0,
    ) -> FakePort:
        self.unixServers.append((address, factory, backlog, mode, wantPID))
        listening = FakePort(UNIXAddress(address))
        self.ports.append(listening)
        return listening
