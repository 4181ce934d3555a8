"""Tests for netd.runtime: binding, readiness and shutdown on a memory reactor."""

from __future__ import annotations

import errno
import json
import os
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.testing import StringTransportWithDisconnection
from twisted.python.failure import Failure

from netd.config import NetdConfig, parse_config
from netd.connections import TrackedConnection, TrackingFactory
from netd.events import Journal
from netd.runtime import Daemon, ReloadResult, RunningService, StartupError
from tests.fakes.reactors import ListeningReactor


class LingeringTransport(StringTransportWithDisconnection):
    """A client that has not read everything yet: a graceful close waits, an abort does not."""

    aborted = False

    def loseConnection(self) -> None:
        self.disconnecting = True

    def abortConnection(self) -> None:
        self.aborted = True
        super().loseConnection()


def load(tmp_path: Path, text: str) -> NetdConfig:
    return parse_config(textwrap.dedent(text), tmp_path / "netd.yaml")


MAP = """\
    shutdown_grace: 5
    services:
      echo:
        type: echo
        listen: ["tcp:0:interface=127.0.0.1", "udp:0:interface=127.0.0.1", "unix:run/echo.sock"]
      qotd:
        type: qotd
        listen: "tcp:7017"
      off:
        type: discard
        enabled: false
        listen: ["tcp:7009"]
    """


def started(tmp_path: Path, reactor: ListeningReactor) -> Daemon:
    reactor.running = True  # so callWhenRunning runs its hooks at once
    daemon = Daemon(load(tmp_path, MAP), reactor, ports_file=tmp_path / "ports.json")
    daemon.privilegedStartService()
    daemon.startService()
    return daemon


def test_binds_every_listener_and_writes_the_ports_file(tmp_path: Path) -> None:
    reactor = ListeningReactor()
    daemon = Daemon(load(tmp_path, MAP), reactor, ports_file=tmp_path / "ports.json")
    daemon.privilegedStartService()

    assert [(port, backlog, interface) for port, _, backlog, interface in reactor.tcpServers] == [
        (0, 50, "127.0.0.1"),
        (7017, 50, ""),
    ]
    assert all(isinstance(factory, TrackingFactory) for _, factory, _, _ in reactor.tcpServers)
    ((udp_port, protocol, udp_interface),) = reactor.udpPorts
    assert (udp_port, udp_interface) == (0, "127.0.0.1")
    assert isinstance(protocol, DatagramProtocol)
    assert [address for address, *_ in reactor.unixServers] == [str(tmp_path / "run/echo.sock")]
    assert set(daemon.services_by_name) == {"echo", "qotd"}  # not the disabled one
    assert not (tmp_path / "ports.json").exists()  # bound, but not yet ready

    daemon.startService()
    assert not daemon.ready  # serving starts with the reactor
    reactor.running = True
    for hook, args, kwargs in reactor.whenRunningHooks:
        hook(*args, **kwargs)
    assert daemon.ready
    assert json.loads((tmp_path / "ports.json").read_text()) == {
        "pid": os.getpid(),
        "services": {
            "echo": {
                "type": "echo",
                "listeners": [
                    {
                        "endpoint": "tcp:0:interface=127.0.0.1",
                        "transport": "tcp",
                        "host": "127.0.0.1",
                        "port": 40001,
                        "tls": False,
                    },
                    {
                        "endpoint": "udp:0:interface=127.0.0.1",
                        "transport": "udp",
                        "host": "127.0.0.1",
                        "port": 40002,
                        "tls": False,
                    },
                    {
                        "endpoint": "unix:run/echo.sock",
                        "transport": "unix",
                        "path": str(tmp_path / "run/echo.sock"),
                        "tls": False,
                    },
                ],
            },
            "qotd": {
                "type": "qotd",
                "listeners": [
                    {
                        "endpoint": "tcp:7017",
                        "transport": "tcp",
                        "host": "0.0.0.0",
                        "port": 7017,
                        "tls": False,
                    }
                ],
            },
        },
    }
    # Written atomically: nothing but the file itself is left beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ports.json", "state"]
    assert all(s.describe()["state"] == "running" for s in daemon.services_by_name.values())


def test_a_listener_that_cannot_bind_fails_start_up_as_a_whole(tmp_path: Path) -> None:
    reactor = ListeningReactor(refuse=[("TCP", 8080, errno.EADDRINUSE)])
    config = load(
        tmp_path,
        """\
        services:
          echo: {type: echo, listen: ["tcp:7007", "udp:7007"]}
          web:
            type: discard
            listen:
              - "tcp:0"
              - "tcp:8080:interface=127.0.0.1"
              - "tcp:8081"
        """,
    )
    daemon = Daemon(config, reactor, ports_file=tmp_path / "ports.json")
    with pytest.raises(StartupError) as excinfo:
        daemon.privilegedStartService()
    assert str(excinfo.value) == (
        f"{tmp_path / 'netd.yaml'}:7:9: service web: cannot listen on "
        f"tcp:8080:interface=127.0.0.1: Address already in use (errno {errno.EADDRINUSE})"
    )
    # Every other listener was bound, and every one of them is closed again.
    assert len(reactor.ports) == 4
    assert [p.listening for p in reactor.ports] == [False] * 4
    assert not daemon.ready
    assert not (tmp_path / "ports.json").exists()


def test_running_service_unbinds_what_it_bound(tmp_path: Path) -> None:
    reactor = ListeningReactor(refuse=[("UDP", 7, errno.EACCES)])
    config = load(tmp_path, 'services: {echo: {type: echo, listen: ["tcp:7", "udp:7", "tcp:0"]}}\n')
    service = RunningService(
        config.services["echo"], reactor, tmp_path, Journal(reactor), {}, tmp_path / "state"
    )
    outcome: list[Any] = []
    service.listen().addBoth(outcome.append)
    (failure,) = outcome
    assert isinstance(failure, Failure)
    assert failure.check(StartupError)
    assert str(failure.value) == (
        f"{tmp_path / 'netd.yaml'}:1:49: service echo: cannot listen on udp:7: "
        f"Permission denied (errno {errno.EACCES})"
    )
    assert [getattr(p.address, "port", None) for p in reactor.ports] == [7, 40001]
    assert not any(p.listening for p in reactor.ports)
    assert service.listeners == []


def test_stop_stops_listening_at_once_then_drains_for_the_grace(tmp_path: Path) -> None:
    reactor = ListeningReactor()
    daemon = started(tmp_path, reactor)
    assert not daemon.journal.active  # no admin API: nobody could read the events
    daemon.journal.active = True
    _, factory, _, _ = reactor.tcpServers[0]
    connection = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
    assert isinstance(connection, TrackedConnection)
    transport = LingeringTransport()
    transport.protocol = connection
    connection.makeConnection(transport)

    stopped = daemon.stopService()
    assert not any(p.listening for p in reactor.ports)
    assert transport.disconnecting  # asked to finish
    assert not stopped.called
    reactor.advance(4.9)
    assert not stopped.called and not transport.aborted
    reactor.advance(0.1)
    assert transport.aborted
    assert stopped.called
    assert not (tmp_path / "ports.json").exists()
    assert {s.describe()["state"] for s in daemon.services_by_name.values()} == {"stopped"}
    events = [(e.service, e.type) for e in daemon.journal.select(service="echo")]
    assert events == [("echo", "connection.opened"), ("echo", "connection.closed")]


def test_stop_without_connections_is_immediate(tmp_path: Path) -> None:
    reactor = ListeningReactor()
    daemon = started(tmp_path, reactor)
    assert (tmp_path / "ports.json").exists()
    stopped = daemon.stopService()
    assert stopped.called
    assert not any(p.listening for p in reactor.ports)
    assert not (tmp_path / "ports.json").exists()


def moving_qotd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, read_map: Callable[..., Deferred[Any]]
) -> tuple[ListeningReactor, Daemon]:
    """A started daemon whose map on disk now moves qotd; C{read_map} reads it for a reload."""
    reactor = ListeningReactor()
    daemon = started(tmp_path, reactor)
    (tmp_path / "netd.yaml").write_text(textwrap.dedent(MAP).replace("7017", "7018"))
    monkeypatch.setattr("netd.runtime.deferToThreadPool", read_map)
    monkeypatch.setattr(reactor, "getThreadPool", lambda: None, raising=False)
    return reactor, daemon


def test_reloads_asked_while_netd_stops_are_refused_and_change_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One whose map was still being read, and one queued behind it: neither binds anything."""
    reading: list[Deferred[Any]] = []

    def read_later(reactor: Any, pool: Any, read: Any, *args: Any) -> Deferred[Any]:
        reading.append(Deferred())
        return reading[-1].addCallback(lambda _: read(*args))

    reactor, daemon = moving_qotd(tmp_path, monkeypatch, read_later)
    refused: list[ReloadResult] = []
    daemon.reload().addCallback(refused.append)
    daemon.reload().addCallback(refused.append)
    assert len(reading) == 1  # the second waits for the first
    daemon.stopService()
    bound_before = len(reactor.ports)
    reading[0].callback(None)
    assert [r.errors for r in refused] == [("netd is stopping",)] * 2
    assert len(reading) == 1 and len(reactor.ports) == bound_before
    assert daemon.services_by_name["qotd"].config.listen[0].endpoint == "tcp:7017"


def test_a_reload_whose_replacements_were_asked_while_netd_stopped_binds_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Their check took a thread (an smtp spool): SIGTERM came meanwhile."""
    reactor, daemon = moving_qotd(tmp_path, monkeypatch, lambda r, p, read, *a: succeed(read(*a)))
    asked: list[Deferred[None]] = []

    def prepare(service: RunningService) -> Deferred[None]:
        asked.append(Deferred())
        return asked[-1]

    monkeypatch.setattr(RunningService, "prepare", prepare)
    refused: list[ReloadResult] = []
    daemon.reload().addCallback(refused.append)
    [check] = asked
    daemon.stopService()
    check.callback(None)
    assert [r.errors for r in refused] == [("netd is stopping",)]
    assert not any(p.listening for p in reactor.ports)
    assert all(s.config.listen[0].endpoint != "tcp:7018" for s in daemon.services_by_name.values())
