"""
Telling systemd how the daemon is doing: sd_notify(3) without libsystemd.

The protocol is one datagram of C{NAME=VALUE} lines sent to the AF_UNIX socket
that C{NOTIFY_SOCKET} names (a path, or an abstract name written with a leading
C{@}).  L{Notifier} sends C{READY=1} once every listener is bound,
C{RELOADING=1} and C{READY=1} around a reload, C{STOPPING=1} on the way out,
and C{WATCHDOG=1} at half the C{WATCHDOG_USEC} period for as long as the
reactor keeps turning.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

if TYPE_CHECKING:
    from netd.runtime import Daemon

__all__ = ["Notifier", "notify_address"]

log = Logger(namespace="netd")


def notify_address(value: str) -> bytes | None:
    """
    The socket address for a C{NOTIFY_SOCKET} value, or None for an empty one.

    @raise ValueError: for a kind of address netd cannot send to (systemd 254
        also allows C{vsock:} addresses, for virtual machines).
    """
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + os.fsencode(value[1:])
    if value.startswith("/"):
        return os.fsencode(value)
    raise ValueError(f"NOTIFY_SOCKET={value!r} is neither a path nor an abstract socket (@name)")


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _counted(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _status(daemon: Daemon) -> str:
    services = daemon.ports()["services"]
    listeners = sum(len(service["listeners"]) for service in services.values())
    return f"{_counted(len(services), 'service')}, {_counted(listeners, 'listener')}"


class Notifier:
    """
    A L{netd.runtime.LifecycleObserver} that keeps systemd informed.

    Without an address every notification is dropped, so the daemon need not
    know whether it runs under systemd.
    """

    def __init__(
        self,
        address: bytes | None,
        clock: IReactorTime,
        watchdog_interval: float | None = None,
        monotonic_usec: Callable[[], int] = _monotonic_usec,
    ) -> None:
        """
        @param address: where to send, as L{notify_address} gives it.
        @param clock: schedules the watchdog pings; the daemon's reactor, so
            that a blocked reactor stops them and systemd notices.
        @param watchdog_interval: seconds between C{WATCHDOG=1} pings, or None.
        @param monotonic_usec: CLOCK_MONOTONIC in microseconds, the clock
            systemd compares C{MONOTONIC_USEC=} with.
        """
        self.address = address
        self.watchdog_interval = watchdog_interval
        self._monotonic_usec = monotonic_usec
        self._socket: socket.socket | None = None
        self._failed = False
        self._watchdog = LoopingCall(self.send, "WATCHDOG=1")
        self._watchdog.clock = clock

    @classmethod
    def from_environment(
        cls, environ: Mapping[str, str], clock: IReactorTime, pid: int | None = None
    ) -> Notifier:
        """
        The notifier that C{NOTIFY_SOCKET}, C{WATCHDOG_USEC} and C{WATCHDOG_PID}
        ask for; one that sends nothing when C{NOTIFY_SOCKET} is unset or unusable.

        @param pid: this process's id (by default the real one): a watchdog
            meant for another process (C{WATCHDOG_PID}) is not ours to feed.
        """
        try:
            address = notify_address(environ.get("NOTIFY_SOCKET", ""))
        except ValueError as e:
            log.warn("not notifying systemd: {reason}", reason=str(e))
            address = None
        interval = None
        watchdog_pid = environ.get("WATCHDOG_PID", "")
        mine = not watchdog_pid or watchdog_pid == str(os.getpid() if pid is None else pid)
        try:
            usec = int(environ.get("WATCHDOG_USEC", ""))
        except ValueError:
            usec = 0
        if address is not None and mine and usec > 0:
            # Half the period, as sd_watchdog_enabled(3) advises: one late ping is not fatal.
            interval = usec / 2 / 1_000_000
        return cls(address, clock, interval)

    def send(self, *fields: str) -> None:
        """Send C{fields} as one notification; never raises, and complains only once."""
        if self.address is None:
            return
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                # The reactor must not wait on a busy service manager; like a
                # failed send, a full queue costs one notification.
                self._socket.setblocking(False)
            self._socket.sendto("\n".join(fields).encode(), self.address)
        except OSError as e:
            if not self._failed:
                self._failed = True
                log.warn(
                    "cannot notify systemd at {address!r}: {error}",
                    address=self.address,
                    error=e,
                )

    def ready(self, daemon: Daemon) -> None:
        self.send("READY=1", f"STATUS={_status(daemon)}")
        if self.watchdog_interval is not None and not self._watchdog.running:
            self._watchdog.start(self.watchdog_interval, now=True)

    def reloading(self, daemon: Daemon) -> None:
        self.send(
            "RELOADING=1",
            f"MONOTONIC_USEC={self._monotonic_usec()}",
            f"STATUS=reloading {daemon.config.file}",
        )

    def reloaded(self, daemon: Daemon) -> None:
        self.send("READY=1", f"STATUS={_status(daemon)}")

    def stopping(self, daemon: Daemon) -> None:
        # The watchdog keeps going: open exchanges may take shutdown_grace
        # seconds to finish, and a reactor that hangs meanwhile is still news.
        self.send(
            "STOPPING=1",
            f"STATUS=stopping, up to {daemon.config.shutdown_grace:g}s for open exchanges",
        )
