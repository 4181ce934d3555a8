"""
systemd integration: sd_notify over a real datagram socket, the watchdog cadence on
a Clock, and choosing among the sockets systemd hands over.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.logger import LogEvent

from netd import endpoints
from netd.compat import unnamed_descriptors
from netd.systemd import Notifier, notify_address
from tests.fakes.reactors import ListeningReactor


@attrs.frozen
class FakeConfig:
    file: Path = Path("/etc/netd/netd.yaml")
    shutdown_grace: float = 10.0


@attrs.frozen
class FakeDaemon:
    """What a notifier reads from the daemon: its ports view and its config."""

    listeners: tuple[int, ...] = (2, 1)
    config: FakeConfig = FakeConfig()

    def ports(self) -> dict[str, Any]:
        return {
            "pid": 1,
            "services": {
                f"s{i}": {"type": "echo", "listeners": [{}] * n}
                for i, n in enumerate(self.listeners)
            },
        }


DAEMON: Any = FakeDaemon()


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[socket.socket]:
    """The service manager's end: a datagram socket bound in tmp_path."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify"))
        sock.setblocking(False)
        yield sock


def received(sock: socket.socket) -> list[list[str]]:
    """Every notification waiting on C{sock}, each as its lines."""
    messages = []
    while True:
        try:
            messages.append(sock.recv(4096).decode().split("\n"))
        except BlockingIOError:
            return messages


def notifier(manager: socket.socket, clock: Clock | None = None, **environ: str) -> Notifier:
    env = {"NOTIFY_SOCKET": manager.getsockname(), **environ}
    return Notifier.from_environment(env, clock or Clock())


def test_ready_reload_stop(manager: socket.socket) -> None:
    sender = Notifier(os.fsencode(manager.getsockname()), Clock(), monotonic_usec=lambda: 42)
    sender.ready(DAEMON)
    sender.reloading(DAEMON)
    sender.reloaded(FakeDaemon((1,)))  # type: ignore[arg-type]
    sender.stopping(DAEMON)
    assert received(manager) == [
        ["READY=1", "STATUS=2 services, 3 listeners"],
        ["RELOADING=1", "MONOTONIC_USEC=42", "STATUS=reloading /etc/netd/netd.yaml"],
        ["READY=1", "STATUS=1 service, 1 listener"],
        ["STOPPING=1", "STATUS=stopping, up to 10s for open exchanges"],
    ]


def test_monotonic_usec_is_clock_monotonic(manager: socket.socket) -> None:
    """systemd compares MONOTONIC_USEC with its own CLOCK_MONOTONIC reading."""
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier(manager).reloading(DAEMON)
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    [message] = received(manager)
    assert before <= int(message[1].removeprefix("MONOTONIC_USEC=")) <= after


def test_watchdog_pings_at_half_the_period(manager: socket.socket) -> None:
    clock = Clock()
    sender = notifier(manager, clock, WATCHDOG_USEC="2000000")
    assert sender.watchdog_interval == 1.0
    clock.advance(5)
    assert received(manager) == []  # not before the daemon is ready
    sender.ready(DAEMON)
    assert received(manager) == [["READY=1", "STATUS=2 services, 3 listeners"], ["WATCHDOG=1"]]
    clock.advance(0.99)
    assert received(manager) == []
    clock.advance(0.01)
    assert received(manager) == [["WATCHDOG=1"]]
    clock.pump([1.0] * 3)
    assert received(manager) == [["WATCHDOG=1"]] * 3
    sender.stopping(DAEMON)
    sender.reloaded(DAEMON)  # READY=1 again does not start a second chain
    received(manager)
    clock.advance(1.0)
    assert received(manager) == [["WATCHDOG=1"]]


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"WATCHDOG_USEC": "0"},
        {"WATCHDOG_USEC": "soon"},
        {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"},
    ],
)
def test_no_watchdog(manager: socket.socket, environ: dict[str, str]) -> None:
    clock = Clock()
    sender = notifier(manager, clock, **environ)
    assert sender.watchdog_interval is None
    sender.ready(DAEMON)
    clock.advance(10)
    assert received(manager) == [["READY=1", "STATUS=2 services, 3 listeners"]]
    assert clock.getDelayedCalls() == []


def test_watchdog_for_this_process(manager: socket.socket) -> None:
    sender = notifier(manager, WATCHDOG_USEC="30000000", WATCHDOG_PID=str(os.getpid()))
    assert sender.watchdog_interval == 15.0


def test_abstract_socket() -> None:
    name = f"netd-test-{uuid.uuid4().hex}"
    assert notify_address("@" + name) == b"\0" + name.encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.setblocking(False)
        Notifier.from_environment({"NOTIFY_SOCKET": "@" + name}, Clock()).ready(DAEMON)
        assert received(sock) == [["READY=1", "STATUS=2 services, 3 listeners"]]


def test_without_notify_socket_nothing_is_sent(logged: list[LogEvent]) -> None:
    clock = Clock()
    sender = Notifier.from_environment({"WATCHDOG_USEC": "1000000"}, clock)
    assert sender.address is None and sender.watchdog_interval is None
    sender.ready(DAEMON)
    sender.stopping(DAEMON)
    assert clock.getDelayedCalls() == [] and logged == []


def test_unusable_notify_socket_is_reported_and_ignored(logged: list[LogEvent]) -> None:
    sender = Notifier.from_environment({"NOTIFY_SOCKET": "vsock:2:1234"}, Clock())
    assert sender.address is None
    sender.ready(DAEMON)
    [event] = logged
    assert "vsock:2:1234" in event["reason"]


def test_failure_to_send_never_raises_and_is_logged_once(
    tmp_path: Path, logged: list[LogEvent]
) -> None:
    clock = Clock()
    gone = str(tmp_path / "nobody-listens")
    sender = Notifier.from_environment({"NOTIFY_SOCKET": gone, "WATCHDOG_USEC": "1000000"}, clock)
    sender.ready(DAEMON)
    clock.pump([0.5] * 10)
    sender.reloading(DAEMON)
    sender.stopping(DAEMON)
    [event] = [e for e in logged if e.get("log_namespace") == "netd"]
    assert event["log_level"].name == "warn"
    assert isinstance(event["error"], FileNotFoundError)
    assert clock.getDelayedCalls(), "the watchdog keeps trying"


def test_full_queue_does_not_block(manager: socket.socket, logged: list[LogEvent]) -> None:
    """A service manager that does not read costs notifications, never the reactor."""
    sender = notifier(manager)
    for _ in range(10_000):
        sender.send("X=" + "x" * 1000)
    assert len(logged) == 1 and isinstance(logged[0]["error"], BlockingIOError)


# Sockets handed over by systemd.


@pytest.fixture
def passed() -> Iterator[list[tuple[str, int]]]:
    """What a socket unit with ListenStream= and ListenDatagram= and one name passes."""
    sockets = [
        socket.socket(socket.AF_INET, socket.SOCK_STREAM),
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM),
        socket.socket(socket.AF_INET6, socket.SOCK_STREAM),
    ]
    yield [
        ("echo", sockets[0].fileno()),
        ("echo", sockets[1].fileno()),
        ("web", sockets[2].fileno()),
    ]
    for sock in sockets:
        sock.close()


def test_inherited_socket_by_name_and_type(passed: list[tuple[str, int]]) -> None:
    (_, stream), (_, datagram), (_, web) = passed
    os.set_blocking(datagram, True)
    assert endpoints.inherited_socket("systemd:domain=INET:name=echo", passed) == (
        stream,
        socket.AF_INET,
    )
    assert endpoints.inherited_socket("systemd-udp:domain=INET:name=echo", passed) == (
        datagram,
        socket.AF_INET,
    )
    assert not os.get_blocking(datagram), "a blocking socket would stall the reactor"
    assert endpoints.inherited_socket("systemd:domain=INET6:index=2", passed) == (
        web,
        socket.AF_INET6,
    )


@pytest.mark.parametrize(
    ("description", "message"),
    [
        (
            "systemd-udp:domain=INET:name=dns",
            "systemd passed no datagram INET socket named 'dns' (passed: echo (stream INET), "
            "echo (datagram INET), web (stream INET6))",
        ),
        ("systemd-udp:domain=INET6:name=echo", "no datagram INET6 socket named 'echo'"),
        ("systemd:domain=INET:index=2", "no stream INET socket with index 2"),
        ("systemd:domain=INET:index=7", "no stream INET socket with index 7"),
    ],
)
def test_inherited_socket_missing(
    passed: list[tuple[str, int]], description: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        endpoints.inherited_socket(description, passed)


def test_nothing_inherited_outside_systemd() -> None:
    with pytest.raises(ValueError, match=r"named 'echo' \(passed: none\)"):
        endpoints.server_endpoint(MemoryReactor(), "systemd:domain=INET:name=echo", Path("."))


def test_listen_datagram(passed: list[tuple[str, int]]) -> None:
    reactor = ListeningReactor()
    protocol = DatagramProtocol()
    endpoints.listen_datagram(reactor, "udp:5353:interface=127.0.0.1", protocol)
    assert reactor.udpPorts == [(5353, protocol, "127.0.0.1")]
    endpoints.listen_datagram(reactor, "systemd-udp:domain=INET:name=echo", protocol, passed)
    assert reactor.adoptedPorts == [
        (passed[1][1], socket.AF_INET, protocol, endpoints.MAX_DATAGRAM)
    ]


def test_adopting_leaves_the_inherited_descriptor_open(passed: list[tuple[str, int]]) -> None:
    """A service restarted by a reload adopts the same socket again."""
    reactor = MemoryReactor()
    _, stream = passed[0]
    endpoint = endpoints._InheritedStreamEndpoint(reactor, stream, socket.AF_INET)
    endpoint.listen(Factory.forProtocol(Protocol))
    endpoint.listen(Factory.forProtocol(Protocol))
    assert [port[0] for port in reactor.adoptedPorts] == [stream, stream]
    os.fstat(stream)


@pytest.mark.parametrize(
    ("description", "problem"),
    [
        ("systemd-udp:domain=INET:name=dns", None),
        ("systemd-udp:domain=INET6:index=0", None),
        ("systemd:domain=UNIX:name=ctl", None),
        ("systemd-udp:domain=UNIX:name=dns", "domain= must be INET or INET6"),
        ("systemd-udp:name=dns", "domain= must be INET or INET6"),
        ("systemd:domain=INET", "give exactly one of index= or name="),
        ("systemd-udp:domain=INET:name=dns:index=0", "give exactly one of index= or name="),
        ("systemd-udp:domain=INET:name=dns:port=53", "expected systemd-udp:domain=DOMAIN"),
        ("systemd:domain=INET:index=-1", "index= must not be negative"),
        ("systemd:domain=INET:index=x", "invalid literal"),
    ],
)
def test_check(description: str, problem: str | None) -> None:
    found = endpoints.check(description, Path("."))
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


def test_datagram_and_identity() -> None:
    assert endpoints.is_datagram("systemd-udp:domain=INET:name=dns")
    assert not endpoints.is_datagram("systemd:domain=INET:name=dns")
    stream = endpoints.identity("systemd:domain=INET:name=dns")
    datagram = endpoints.identity("systemd-udp:domain=INET6:name=dns")
    assert stream != datagram
    assert datagram == endpoints.identity("systemd-udp:domain=INET:name=dns")
    assert endpoints.identity("systemd:domain=INET:name=0") != endpoints.identity(
        "systemd:domain=INET:index=0"
    )


def test_descriptors_passed_without_names_are_read_as_sd_listen_fds_does() -> None:
    mine = {"LISTEN_PID": "42", "LISTEN_FDS": "2"}
    assert unnamed_descriptors(mine, 42) == [3, 4]
    assert unnamed_descriptors(mine, 43) == []  # passed to another process
    assert unnamed_descriptors({**mine, "LISTEN_FDNAMES": "a:b"}, 42) == []  # Twisted's to read
    assert unnamed_descriptors({"LISTEN_PID": "42", "LISTEN_FDS": "x"}, 42) == []
