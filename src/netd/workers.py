"""
Worker processes: one service answered by N processes on the sockets the main
process bound (C{workers: N} in the service map).

The main process binds every listener as it would for itself (privileged ports,
systemd sockets and port 0 work unchanged), never reads from them, and passes
them to each worker as inherited descriptors; the worker builds the service as
the main process would and adopts them (C{adoptStreamPort},
C{adoptDatagramPort}).  The kernel gives each connection or datagram to
whichever worker takes it first.

Main and worker talk AMP over the worker's stdin and stdout: the main process
boots the worker with the service's configuration, tells it to stop listening
and to stop; the worker sends its journal events as they happen and its
counters when they change, and answers the service's admin views.  A worker
that dies is started again, sooner the longer it had been up (L{Backoff}).
What the admin API writes to a kind that keeps it (http's run-time routes,
dns's live records: L{netd.kinds.Handlers.keep}) the main process holds too,
and each worker boots with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import sys
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import (
    Deferred,
    gatherResults,
    inlineCallbacks,
    maybeDeferred,
    succeed,
)
from twisted.internet.error import ProcessTerminated, ReactorNotRunning
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IListeningPort,
    IOpenSSLServerConnectionCreator,
    IProcessTransport,
    IReactorTime,
)
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import ILogObserver, LogEvent, Logger, LogLevel, formatEvent, globalLogBeginner
from twisted.protocols import amp
from twisted.python.components import proxyForInterface
from twisted.python.failure import Failure
from zope.interface import implementer

from netd import endpoints
from netd.compat import share_listening_socket, wake_one_waiter
from netd.config import ListenerConfig, LogConfig, ServiceConfig, TLSProfileConfig
from netd.events import Journal
from netd.kinds import AdminView, ViewRefused
from netd.listeners import BoundListener
from netd.records import Record
from netd.runtime import RunningService, build_tls
from netd.schema import ConfigError, ConfigErrors, Position

__all__ = ["Backoff", "WorkerPool", "main"]

log = Logger(namespace="netd")

# The child runs this; -m would import this module twice (as __main__ too).
_BOOT = "from netd.workers import main; main()"
# The first inherited listener's descriptor in a worker (after stdin, stdout, stderr).
_FIRST_LISTENER_FD = 3
# Seconds a worker may take beyond the grace to finish before it is killed.
_KILL_MARGIN = 5.0
# How often a worker looks whether its counters changed, and sends them if so.
_REPORT_INTERVAL = 0.2
# An AMP value holds at most 64 KiB; longer ones are split over numbered keys.
_CHUNK = 60_000
# The systemd hand-over is the main process's alone.
_PARENT_ONLY = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET")


class _Big(amp.Argument):
    """Bytes of any length, split over C{NAME.0}, C{NAME.1}, ... keys."""

    def toBox(self, name: bytes, strings: Any, objects: Any, proto: Any) -> None:
        value: bytes = objects[name.decode()]
        chunks = [value[i : i + _CHUNK] for i in range(0, len(value), _CHUNK)] or [b""]
        strings[name] = b"%d" % len(chunks)
        for index, chunk in enumerate(chunks):
            strings[b"%s.%d" % (name, index)] = chunk

    def fromBox(self, name: bytes, strings: Any, objects: Any, proto: Any) -> None:
        count = int(strings[name])
        objects[name.decode()] = b"".join(strings[b"%s.%d" % (name, i)] for i in range(count))


class _BootFailed(Exception):
    pass


class _Boot(amp.Command):
    # The spec is pickled once a pool; what changes from one boot to the next
    # (what the main process keeps, whether its journal is read) comes apart.
    arguments = [(b"spec", _Big()), (b"carried", _Big()), (b"journal_active", amp.Boolean())]
    errors = {_BootFailed: b"BOOT_FAILED"}


class _JournalActive(amp.Command):
    """Whether the main process's journal is read: a reload added or removed its reader."""

    arguments = [(b"active", amp.Boolean())]
    requiresAnswer = False


class _StopListening(amp.Command):
    """Stop accepting; the main process closes its own descriptor too."""


class _Stop(amp.Command):
    arguments = [(b"grace", amp.Float())]


class _CallView(amp.Command):
    # kept: a write the main process took first (Handlers.keep) and journaled.
    arguments = [
        (b"view", amp.Unicode()),
        (b"action", amp.Unicode()),
        (b"key", amp.Unicode()),
        (b"body", _Big()),
        (b"kept", amp.Boolean()),
    ]
    response = [(b"outcome", _Big())]


class _Emit(amp.Command):
    arguments = [(b"event", _Big())]
    requiresAnswer = False


class _Log(amp.Command):
    arguments = [(b"level", amp.Unicode()), (b"namespace", amp.Unicode()), (b"text", _Big())]
    requiresAnswer = False


class _Report(amp.Command):
    arguments = [(b"report", _Big())]
    requiresAnswer = False


# A write to a view as it crosses to a worker: view, action, key, JSON body.
_Write = tuple[str, str, str, bytes]


@attrs.frozen(repr=False)
class _Spec(Record):
    """What a worker needs to build its service, the same for each of a pool's workers."""

    service: ServiceConfig
    tls: Mapping[str, TLSProfileConfig]
    base_dir: Path
    state_dir: Path
    shutdown_grace: float
    log: LogConfig
    # (endpoint, family) of each inherited listener, from _FIRST_LISTENER_FD on.
    listeners: tuple[tuple[str, int], ...]


# -- the main process's side ---------------------------------------------------------


@attrs.define(repr=False)
class Backoff(Record):
    """
    How long to wait before starting a dead worker again: C{first} seconds,
    doubling with each death up to C{most}; a worker that was up for
    C{stable} seconds starts the count again.
    """

    clock: IReactorTime
    first: float = 0.1
    most: float = 30.0
    stable: float = 10.0
    _deaths: int = 0

    def delay(self, started_at: float) -> float:
        if self.clock.seconds() - started_at >= self.stable:
            self._deaths = 0
        delay = min(self.most, self.first * float(2**self._deaths))
        self._deaths += 1
        return delay


class _Link(amp.AMP):
    """The main process's end of one worker's channel; ends when the process does."""

    def __init__(self, pool: WorkerPool) -> None:
        super().__init__()
        self.pool = pool
        self.pid = 0
        # Fires with how the process ended, said for the log.
        self.ended: Deferred[str] = Deferred()

    @_Emit.responder
    def emit(self, event: bytes) -> dict[str, Any]:
        fields = json.loads(event)
        self.pool.journal.emit(fields.pop("service"), fields.pop("type"), worker=self.pid, **fields)
        return {}

    @_Log.responder
    def log(self, level: str, namespace: str, text: bytes) -> dict[str, Any]:
        Logger(namespace=namespace).emit(
            LogLevel.levelWithName(level), "{text}", text=text.decode(), worker=self.pid
        )
        return {}

    @_Report.responder
    def report(self, report: bytes) -> dict[str, Any]:
        self.pool.reports[self.pid] = json.loads(report)
        self.pool.reported()
        return {}

    def kill(self) -> None:
        transport: Any = self.transport
        # Already gone: nothing left to kill.
        with contextlib.suppress(Exception):
            transport.signalProcess("KILL")

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        super().connectionLost(reason)
        self.ended.callback(_exit_reason(reason))


@implementer(IAddress)
class _PipeAddress:
    """Where a worker's channel leads: its parent's or child's pipes, no address."""

    def __repr__(self) -> str:
        return "pipes"


class _Pipes(proxyForInterface(IProcessTransport, "_process")):  # type: ignore[misc]
    """A worker's stdin and stdout as the transport of its channel."""

    def getPeer(self) -> _PipeAddress:
        return _PipeAddress()

    def getHost(self) -> _PipeAddress:
        return _PipeAddress()


class _Process(ProcessProtocol):
    """Carries a worker's stdout to its link, and its end."""

    def __init__(self, link: _Link) -> None:
        self.link = link

    def connectionMade(self) -> None:
        transport: Any = self.transport
        self.link.pid = transport.pid
        self.link.makeConnection(_Pipes(transport))

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 1:
            self.link.dataReceived(data)

    def processEnded(self, reason: Failure) -> None:
        self.link.connectionLost(reason)


class _Slot:
    """
    One worker's place in a pool: keeps a worker running there until stopped.

    @param spawn: starts a worker; fires with its link once it serves.
    @param exited: told of each end (pid, reason, seconds until the next
        worker starts: L{None} when the worker ended because it was told to stop).
    """

    def __init__(
        self,
        clock: IReactorTime,
        spawn: Callable[[], Deferred[_Link]],
        exited: Callable[[int, str, float | None], None],
    ) -> None:
        self.clock = clock
        self.spawn = spawn
        self.exited = exited
        self.backoff = Backoff(clock)
        self.link: _Link | None = None
        self.booting = False
        self.stopping = False
        self.started_at = 0.0
        self.timer: IDelayedCall | None = None
        # Workers told to stop while the slot goes on: their ends, by link.
        self.retired: dict[_Link, Deferred[None]] = {}
        # A replacement asked for while a worker was booting on the old sockets.
        self.replace_when_up: float | None = None
        # Fires once a worker booting when the slot was stopped has ended.
        self.boot_ended: Deferred[None] | None = None

    def start(self) -> Deferred[None]:
        """Start a worker; fires once it serves, or fails if it could not."""
        self.timer = None
        self.booting = True
        self.started_at = self.clock.seconds()
        starting = maybeDeferred(self.spawn)
        booted: Deferred[None] = Deferred()

        def up(link: _Link) -> None:
            self.booting = False
            self.link = link
            link.ended.addCallback(partial(self._ended, link))
            if self.stopping:
                self._retire(link, 0)
                if self.boot_ended is not None:
                    self.retired[link].chainDeferred(self.boot_ended)
            elif self.replace_when_up is not None:
                grace, self.replace_when_up = self.replace_when_up, None
                self.replace(grace)
            booted.callback(None)

        def failed(failure: Failure) -> None:
            self.booting = False
            if self.boot_ended is not None:
                self.boot_ended.callback(None)
            self._again(0, f"did not start: {failure.getErrorMessage()}")
            booted.errback(failure)

        starting.addCallbacks(up, failed)
        return booted

    def _ended(self, link: _Link, reason: str) -> None:
        if link in self.retired:
            del self.retired[link]
            self.exited(link.pid, reason, None)
            return
        self.link = None
        self._again(link.pid, reason)

    def _again(self, pid: int, reason: str) -> None:
        if self.stopping:
            return
        delay = self.backoff.delay(self.started_at)
        self.exited(pid, reason, delay)
        self.timer = self.clock.callLater(delay, self._restart)

    def _restart(self) -> None:
        # A failed start is reported and retried by _again; nothing to add here.
        self.start().addErrback(lambda _: None)

    def replace(self, grace: float) -> None:
        """Start a new worker now; the one serving finishes within C{grace}."""
        if self.booting:
            self.replace_when_up = grace
            return
        if self.link is not None:
            self._retire(self.link, grace)
        if self.timer is None or not self.timer.active():
            self._restart()

    def _retire(self, link: _Link, grace: float) -> None:
        """Tell C{link}'s worker to finish within C{grace}; kill it after that."""
        if self.link is link:
            self.link = None
        link.callRemote(_Stop, grace=grace).addErrback(lambda _: None)
        killer = self.clock.callLater(grace + _KILL_MARGIN, link.kill)
        finished: Deferred[None] = Deferred()

        def ended(_: object) -> None:
            if killer.active():
                killer.cancel()
            finished.callback(None)

        # After _ended, which looks the link up here.
        self.retired[link] = finished
        link.ended.addCallback(ended)

    def stop(self, grace: float) -> Deferred[None]:
        """Stop the slot: its workers finish within C{grace}; fires once all ended."""
        self.stopping = True
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        if self.link is not None:
            self._retire(self.link, grace)
        ends = list(self.retired.values())
        if self.booting:
            self.boot_ended = Deferred()
            ends.append(self.boot_ended)
        return gatherResults(ends).addCallback(lambda _: None)


def _exit_reason(reason: Failure) -> str:
    error = reason.value
    if isinstance(error, ProcessTerminated) and error.signal is not None:
        return f"killed by signal {error.signal}"
    return f"exited with status {getattr(error, 'exitCode', 0)}"


class WorkerPool(RunningService):
    """
    A service of the map run by C{config.workers} worker processes.

    The main process builds the service too, and never starts it: a kind's
    error names the service at start-up as it does without workers, the
    build tells which admin views the workers have, and it keeps the writes
    to them of a kind with L{netd.kinds.Handlers.keep}.
    """

    def __init__(
        self,
        config: ServiceConfig,
        reactor: Any,
        base_dir: Path,
        journal: Journal,
        tls_creators: Mapping[str, IOpenSSLServerConnectionCreator],
        state_dir: Path,
        tls_profiles: Mapping[str, TLSProfileConfig],
        shutdown_grace: float,
        log_config: LogConfig,
        carried: dict[str, Any] | None = None,
        tables: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            config,
            reactor,
            base_dir,
            journal,
            tls_creators,
            state_dir,
            carried=carried,
            tables=tables,
        )
        self.journal = journal
        self.tls_profiles = {name: tls_profiles[name] for name in config.tls_profiles}
        self.shutdown_grace = shutdown_grace
        self.log_config = log_config
        # The built handlers bind the listeners here; their service (caches,
        # queues) runs only in the workers, and their views ask the workers.
        self.handlers = attrs.evolve(
            self.handlers,
            service=None,
            views={name: self._fan_out(name, view) for name, view in self.handlers.views.items()},
        )
        self.slots = [_Slot(reactor, self._spawn, self._exited) for _ in range(config.workers)]
        # Each live worker's last report, by pid; the dead ones' counters, summed.
        self.reports: dict[int, dict[str, Any]] = {}
        self.departed: dict[str, int] = {}
        self._first_boots: list[object] = []
        self._serving_waiters: list[Callable[[object], None]] = []
        # Kept writes each booting worker has yet to take: it was built before them.
        self._booting: list[list[_Write]] = []
        self._spec: bytes | None = None
        # Every worker's channel from its spawn to its end, booting and retiring ones too.
        self._channels: set[_Link] = set()

    def _listen_one(
        self, listener: ListenerConfig, held: endpoints.HeldSocket | None
    ) -> Deferred[IListeningPort]:
        def hold(port: IListeningPort) -> IListeningPort:
            # Bound here, served by the workers: this process never accepts,
            # and closing its descriptor must leave the workers' sockets alone.
            listening: Any = port
            listening.stopReading()
            share_listening_socket(port)
            return port

        return super()._listen_one(listener, held).addCallback(hold)

    def startService(self) -> None:
        RunningService.startService(self)
        self.journal.watch_activity(self._journal_activity)
        if self.handlers.keep is not None:
            # This build keeps the run-time state from now on: the workers and
            # the service's next build start from what it holds.
            self.handlers.keep()
        booted = gatherResults([slot.start() for slot in self.slots], consumeErrors=True)
        booted.addBoth(self._booted)

    def _booted(self, outcome: object) -> None:
        self._first_boots.append(outcome)
        waiters, self._serving_waiters = self._serving_waiters, []
        for told in waiters:
            told(outcome)

    def serving(self) -> Deferred[None]:
        """Fires once every worker serves; fails if one could not start (it is retried)."""
        waiting: Deferred[None] = Deferred()

        def told(outcome: object) -> None:
            if isinstance(outcome, Failure):
                reason = _first_failure(outcome).getErrorMessage()
                waiting.errback(
                    RuntimeError(f"service {self.config.name}: a worker did not start: {reason}")
                )
            else:
                waiting.callback(None)

        if self._first_boots:
            told(self._first_boots[0])
        else:
            self._serving_waiters.append(told)
        return waiting

    def _spawn(self) -> Deferred[_Link]:
        listening = [(bound.config.endpoint, bound.port) for bound in self.listeners]
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: 2}
        for offset, (_, port) in enumerate(listening):
            child_fds[_FIRST_LISTENER_FD + offset] = _fileno(port)
        spec, carried = self._boot_arguments()
        environment = {k: v for k, v in os.environ.items() if k not in _PARENT_ONLY}
        link = _Link(self)
        self._channels.add(link)
        link.ended.addCallback(self._channel_closed, link)
        self.reactor.spawnProcess(
            _Process(link),
            sys.executable,
            [sys.executable, "-c", _BOOT],
            env=environment,
            childFDs=child_fds,
        )

        # Pickled now: the writes kept after this reach the worker as it boots.
        missed: list[_Write] = []
        self._booting.append(missed)

        def boot() -> Deferred[_Link]:
            booting: Deferred[dict[str, Any]] = link.callRemote(
                _Boot, spec=spec, carried=carried, journal_active=self.journal.active
            )
            caught_up = booting.addCallback(lambda _: self._catch_up(link, missed))

            def no_longer_booting(result: object) -> object:
                self._booting.remove(missed)
                return result

            caught_up.addBoth(no_longer_booting)

            def booted(_: object) -> _Link:
                log.info(
                    "service {name}: worker {pid} serving", name=self.config.name, pid=link.pid
                )
                self.journal.emit(self.config.name, "worker.started", worker=link.pid)
                return link

            def refused(failure: Failure) -> Failure:
                link.kill()
                return failure

            serving: Deferred[_Link] = caught_up.addCallbacks(booted, refused)
            return serving

        return boot()

    def _channel_closed(self, reason: str, link: _Link) -> str:
        self._channels.discard(link)
        return reason

    def _journal_activity(self, active: bool) -> None:
        # A worker booting has its Boot, with the value before, ahead of this on its channel.
        for link in self._channels:
            link.callRemote(_JournalActive, active=active)

    def _boot_arguments(self) -> tuple[bytes, bytes]:
        """
        The pool's spec, pickled at its first boot only: a map's records or
        routes can take a third of a second to pickle (200,000 zone records),
        and a worker replaced in a crash loop would hold the reactor, and every
        other service, that long each time.  What the main process keeps
        (L{netd.kinds.Handlers.keep}) is pickled as each worker boots.
        """
        if self._spec is None:
            self._spec = pickle.dumps(
                _Spec(
                    service=self.config,
                    tls=self.tls_profiles,
                    base_dir=self.base_dir,
                    state_dir=self.context.state_dir,
                    shutdown_grace=self.shutdown_grace,
                    log=self.log_config,
                    listeners=tuple(
                        (bound.config.endpoint, _family(bound.port)) for bound in self.listeners
                    ),
                )
            )
        kept = dict(self.context.carried) if self.handlers.keep is not None else {}
        return self._spec, pickle.dumps(kept)

    def _catch_up(self, link: _Link, missed: list[_Write]) -> Deferred[None]:
        """Give a booted worker, in their order, the kept writes made while it booted."""
        if not missed:
            return succeed(None)
        view, action, key, body = missed.pop(0)
        told: Deferred[Any] = link.callRemote(
            _CallView, view=view, action=action, key=key, body=body, kept=True
        )
        caught_up: Deferred[None] = told.addCallback(lambda _: self._catch_up(link, missed))
        return caught_up

    def _exited(self, pid: int, reason: str, restart_in: float | None) -> None:
        report = self.reports.pop(pid, None)
        if report is not None:
            for key, value in report["counters"].items():
                if key != "connections_active":
                    self.departed[key] = self.departed.get(key, 0) + value
            self.reported()
        name = self.config.name
        if restart_in is None:
            log.info(
                "service {name}: worker {pid} stopped, {reason}", name=name, pid=pid, reason=reason
            )
            self.journal.emit(name, "worker.stopped", worker=pid, reason=reason)
            return
        log.warn(
            "service {name}: worker {pid} {reason}; another starts in {delay:.1f}s",
            name=name,
            pid=pid,
            reason=reason,
            delay=restart_in,
        )
        self.journal.emit(name, "worker.exited", worker=pid, reason=reason, restart_in=restart_in)

    def reported(self) -> None:
        """Sum the live workers' levels (queues, caches) into this service's gauges."""
        gauges: dict[str, float] = {}
        for report in self.reports.values():
            for key, value in report["gauges"].items():
                gauges[key] = gauges.get(key, 0) + value
        self.stats.gauges.clear()
        self.stats.gauges.update(gauges)

    def _links(self) -> list[_Link]:
        return [slot.link for slot in self.slots if slot.link is not None and slot.link.pid]

    def listen(
        self, held: Mapping[str, endpoints.HeldSocket] | None = None
    ) -> Deferred[list[BoundListener]]:
        listening = super().listen(held)
        if self.running:
            # Bound again after a reload that failed had taken the sockets away:
            # the workers serving the old ones make way for workers on these.
            listening.addCallback(self._hand_over_anew)
        return listening

    def _hand_over_anew(self, bound: list[BoundListener]) -> list[BoundListener]:
        for slot in self.slots:
            slot.replace(self.shutdown_grace)
        return bound

    def stop_listening(self) -> Deferred[None]:
        closed = super().stop_listening()
        told = [
            link.callRemote(_StopListening).addTimeout(_KILL_MARGIN, self.reactor)
            for link in self._links()
        ]
        return gatherResults([closed, *told], consumeErrors=True).addBoth(lambda _: None)

    @inlineCallbacks
    def stop(self, grace: float) -> Any:
        if self.state in ("stopping", "stopped"):
            return
        self.state = "stopping"
        yield self.stop_listening()
        try:
            yield gatherResults([slot.stop(grace) for slot in self.slots])
        finally:
            # A pool built by a reload that failed is stopped unstarted: it never watched.
            if self.running:
                self.journal.unwatch_activity(self._journal_activity)
        self.state = "stopped"
        yield Service.stopService(self)

    def describe(self) -> dict[str, Any]:
        counters = dict(self.departed)
        for report in self.reports.values():
            for key, value in report["counters"].items():
                counters[key] = counters.get(key, 0) + value
        base = super().describe()
        base["counters"] = {**base["counters"], **counters}
        base["workers"] = [
            {"pid": pid, "counters": report["counters"]} for pid, report in self.reports.items()
        ]
        return base

    def _fan_out(self, name: str, view: AdminView) -> AdminView:
        """The view as one: every live worker asked, their answers merged."""
        # The core's rules are not carried: a worker started later has the map's.
        kept = self.handlers.keep is not None and name in self.handlers.kept_views

        def call(action: str, key: str = "", body: Any = None) -> Deferred[list[Any]]:
            asked = [
                link.callRemote(
                    _CallView,
                    view=name,
                    action=action,
                    key=key,
                    body=json.dumps(body).encode(),
                    kept=kept and action not in ("list", "item"),
                ).addCallback(lambda answer: _outcome(answer["outcome"]))
                for link in self._links()
            ]
            return gatherResults(asked, consumeErrors=True).addErrback(_first_failure)

        def first(results: list[Any]) -> Any:
            return next((r for r in results if r is not None), None)

        def write(action: str, own: Callable[[], Any], key: str = "", body: Any = None) -> Any:
            if not kept:
                return call(action, key, body).addCallback(first)
            return maybeDeferred(own).addCallback(self._kept, name, action, key, body, call)

        def listing(query: Mapping[str, str]) -> Any:
            listed = call("list", body=dict(query))
            if not kept:
                return listed.addCallback(_merged)
            own = maybeDeferred(view.list, query)
            both = gatherResults([own, listed], consumeErrors=True).addErrback(_first_failure)
            return both.addCallback(lambda answers: _counted(*answers))

        def when(present: object, function: Callable[..., Any]) -> Any:
            return function if present is not None else None

        def clear() -> Any:
            if not kept:
                return call("clear").addCallback(_merged)
            # Kept: the main process's answer, as for any write (dns: back to the map).
            return write("clear", lambda: _must(view.clear)())

        def post(body: Any) -> Any:
            return write("post", lambda: _must(view.post)(body), body=body)

        def put(key: str, body: Any) -> Any:
            return write("put", lambda: _must(view.put)(key, body), key, body)

        def remove(key: str) -> Any:
            return write("remove", lambda: _must(view.remove)(key), key)

        return AdminView(
            list=listing,
            item=when(view.item, lambda key: call("item", key).addCallback(first)),
            clear=when(view.clear, clear),
            post=when(view.post, post),
            put=when(view.put, put),
            remove=when(view.remove, remove),
            act=when(view.act, lambda key, body: call("act", key, body).addCallback(first)),
            forget=when(
                view.forget, lambda namespace: call("forget", namespace).addCallback(_merged)
            ),
        )

    def _kept(
        self,
        answer: Any,
        name: str,
        action: str,
        key: str,
        body: Any,
        call: Callable[[str, str, Any], Deferred[list[Any]]],
    ) -> Any:
        """
        A write this process's build took (and completed: an id it chose is
        in C{body} now), passed on to every worker, those booting included;
        the answer is this build's.
        """
        if answer is None:
            return None  # nothing of that key here, nor in any worker
        for missed in self._booting:
            missed.append((name, action, key, json.dumps(body).encode()))

        def not_taken(failure: Failure) -> None:
            # A worker that died meanwhile is replaced from what this process keeps.
            log.warn(
                "service {name}: a worker did not take a {action} on {view}: {error}",
                name=self.config.name,
                action=action,
                view=name,
                error=failure.getErrorMessage(),
            )

        return call(action, key, body).addErrback(not_taken).addCallback(lambda _: answer)


def _fileno(port: IListeningPort) -> int:
    listening: Any = port
    descriptor: int = listening.fileno()
    return descriptor


def _family(port: IListeningPort) -> int:
    listening: Any = port
    family: int = listening.socket.family
    return family


def _first_failure(failure: Failure) -> Failure:
    error = failure.value
    sub = getattr(error, "subFailure", None)
    return sub if sub is not None else failure


def _merged(results: list[Any]) -> Any:
    """Workers' answers as one: lists joined, counts summed, the rest from the first."""
    if not results:
        return []
    if all(isinstance(r, list) for r in results):
        return [entry for r in results for entry in r]
    if all(isinstance(r, dict) for r in results):
        merged: dict[str, Any] = {}
        for result in results:
            for key, value in result.items():
                if key not in merged:
                    merged[key] = value
                elif isinstance(value, list) and isinstance(merged[key], list):
                    merged[key] = merged[key] + value
                elif _is_count(value) and _is_count(merged[key]):
                    merged[key] += value
        return merged
    return results[0]


def _counted(own: Any, answers: list[Any]) -> Any:
    """
    A kept view's list: this process's entries (one a key, in order), the
    C{matched} of each the sum over the workers' entries of its C{id}.
    """
    totals: dict[Any, int] = {}
    for answer in answers:
        for entry in _listed(answer):
            if _counts_matches(entry):
                totals[entry["id"]] = totals.get(entry["id"], 0) + entry["matched"]

    def counted(entry: Any) -> Any:
        if not _counts_matches(entry):
            return entry
        return {**entry, "matched": totals.get(entry["id"], 0)}

    if isinstance(own, dict):
        return {
            key: [counted(e) for e in value] if isinstance(value, list) else value
            for key, value in own.items()
        }
    if isinstance(own, list):
        return [counted(entry) for entry in own]
    return own


def _listed(answer: Any) -> list[Any]:
    """The entries of a list answer: a list, or the lists a mapping holds."""
    if isinstance(answer, list):
        return answer
    if isinstance(answer, dict):
        return [e for value in answer.values() if isinstance(value, list) for e in value]
    return []


def _counts_matches(entry: Any) -> bool:
    return isinstance(entry, dict) and "id" in entry and _is_count(entry.get("matched"))


def _is_count(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _outcome(encoded: bytes) -> Any:
    """A view's answer from a worker, or what it raised, raised again here."""
    outcome = json.loads(encoded)
    if "refused" in outcome:
        status, reason = outcome["refused"]
        raise ViewRefused(status, reason)
    if "errors" in outcome:
        raise ConfigErrors(
            [
                ConfigError(Position(file, line, column), path, message)
                for file, line, column, path, message in outcome["errors"]
            ]
        )
    if "raw" in outcome:
        return outcome["raw"].encode("latin-1")
    return outcome["value"]


# -- the worker's side ---------------------------------------------------------------


class _Worker(amp.AMP):
    """A worker process's end of the channel: serves one service until told to stop."""

    def __init__(self, reactor: Any) -> None:
        super().__init__()
        self.reactor = reactor
        self.service: RunningService | None = None
        self.grace = 0.0
        self.journal = Journal(reactor)
        self.journal.subscribe(self._forward)
        self.repeating = False
        self.stopped: Deferred[None] | None = None
        self.last_report: dict[str, Any] | None = None
        self.reporting = LoopingCall(self._report)
        self.reporting.clock = reactor
        self.log_observer = _LogToMain(self)

    @property
    def channel_open(self) -> bool:
        transport: Any = self.transport
        return transport is not None and not transport.disconnected

    def send_log(self, level: str, namespace: str, text: str) -> None:
        if not self.channel_open:
            # The channel is gone (the worker is finishing): stderr is all there is.
            sys.stderr.write(f"netd worker {os.getpid()}: {text}\n")
            return
        self.callRemote(_Log, level=level, namespace=namespace, text=text.encode())

    @_Boot.responder
    def boot(self, spec: bytes, carried: bytes, journal_active: bool) -> Deferred[dict[str, Any]]:
        booting = maybeDeferred(
            self._boot, pickle.loads(spec), pickle.loads(carried), journal_active
        )
        return booting.addErrback(_boot_failed)

    @inlineCallbacks
    def _boot(self, spec: _Spec, carried: dict[str, Any], journal_active: bool) -> Any:
        self.log_observer.least = _LEVELS.index(LogLevel.levelWithName(spec.log.level))
        self.grace = spec.shutdown_grace
        self.journal.active = journal_active
        service = RunningService(
            spec.service,
            self.reactor,
            spec.base_dir,
            self.journal,
            build_tls(spec.tls, spec.state_dir),
            spec.state_dir,
            carried=carried,
        )
        held = {
            endpoint: endpoints.HeldSocket(_FIRST_LISTENER_FD + offset, family)
            for offset, (endpoint, family) in enumerate(spec.listeners)
        }
        try:
            bound = yield service.listen(held)
        finally:
            # Adopting took dups of them.
            for socket in held.values():
                socket.close()
        for listener in bound:
            # Every worker waits on this socket: one is woken per datagram or connection.
            wake_one_waiter(self.reactor, listener.port)
        self.service = service
        service.startService()
        # A worker that cannot do the service's work fails its boot (and is
        # retried) rather than accept what it cannot keep.
        yield service.serving()
        service.state = "running"
        self.reporting.start(_REPORT_INTERVAL, now=False)
        return {}

    def _forward(self, event: Any) -> None:
        # Nobody reads the main process's journal (no admin API, no event
        # log), or the main process is gone and this worker is finishing.
        if not self.journal.active or not self.channel_open or self.repeating:
            return
        fields = {"service": event.service, "type": event.type, **event.fields}
        self.callRemote(_Emit, event=json.dumps(fields, default=str).encode())

    def _report(self) -> None:
        assert self.service is not None
        report = {
            "counters": self.service.describe()["counters"],
            "gauges": dict(self.service.stats.gauges),
        }
        if report != self.last_report and self.channel_open:
            self.last_report = report
            self.callRemote(_Report, report=json.dumps(report).encode())

    @_JournalActive.responder
    def journal_activity(self, active: bool) -> dict[str, Any]:
        self.journal.active = active
        return {}

    @_StopListening.responder
    def stop_listening(self) -> Deferred[dict[str, Any]]:
        if self.service is None:
            return succeed({})
        return self.service.stop_listening().addCallback(lambda _: {})

    @_Stop.responder
    def stop(self, grace: float) -> Deferred[dict[str, Any]]:
        return self.finish(grace).addCallback(lambda _: {})

    def finish(self, grace: float) -> Deferred[None]:
        """Stop listening, let exchanges finish for C{grace} seconds, report, then exit."""
        if self.stopped is None:
            service = self.service
            stopping = succeed(None) if service is None else service.stop(grace)

            def done(result: object) -> None:
                if isinstance(result, Failure):
                    log.failure("stopping the service failed", result)
                if self.reporting.running:
                    self.reporting.stop()
                if service is not None:
                    self._report()
                # The answer to Stop goes out first; the exit follows the close.
                self.reactor.callLater(0, self._close)

            self.stopped = stopping.addBoth(done)
        finished: Deferred[None] = Deferred()

        def tell(result: object) -> object:
            finished.callback(None)
            return result

        self.stopped.addBoth(tell)
        return finished

    def _close(self) -> None:
        transport: Any = self.transport
        if self.channel_open:
            transport.loseConnection()
        else:
            self._exit()

    def _exit(self) -> None:
        # Both the close of the channel and a signal may end the worker.
        with contextlib.suppress(ReactorNotRunning):
            self.reactor.stop()

    @_CallView.responder
    def call_view(
        self, view: str, action: str, key: str, body: bytes, kept: bool
    ) -> Deferred[dict[str, Any]]:
        assert self.service is not None
        found = self.service.handlers.views[view]
        argument = json.loads(body)
        calls: dict[str, Callable[[], Any]] = {
            "list": lambda: found.list(argument),
            "item": lambda: _must(found.item)(key),
            "clear": lambda: _must(found.clear)(),
            "post": lambda: _must(found.post)(argument),
            "put": lambda: _must(found.put)(key, argument),
            "remove": lambda: _must(found.remove)(key),
            "act": lambda: _must(found.act)(key, argument),
            "forget": lambda: _must(found.forget)(key),
        }
        # The main process journaled a kept write when it took it: the events
        # this worker's copy of it makes would repeat that once a worker.
        self.repeating = kept
        try:
            done = maybeDeferred(calls[action])
        finally:
            self.repeating = False
        return done.addCallbacks(_encode_value, _encode_refusal)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        super().connectionLost(reason)
        # Stopped as asked, or the main process is gone: an orphan finishes and exits.
        self.finish(self.grace).addCallback(lambda _: self._exit())


def _must(call: Callable[..., Any] | None) -> Callable[..., Any]:
    assert call is not None
    return call


def _encode_value(value: Any) -> dict[str, bytes]:
    if isinstance(value, bytes):
        return {"outcome": json.dumps({"raw": value.decode("latin-1")}).encode()}
    return {"outcome": json.dumps({"value": value}, default=str).encode()}


def _encode_refusal(failure: Failure) -> dict[str, bytes]:
    error = failure.value
    if isinstance(error, ViewRefused):
        outcome: dict[str, Any] = {"refused": [error.status, error.reason]}
    elif isinstance(error, ConfigErrors):
        outcome = {
            "errors": [
                [e.position.file, e.position.line, e.position.column, e.path, e.message]
                for e in error.errors
            ]
        }
    else:
        failure.raiseException()
    return {"outcome": json.dumps(outcome).encode()}


def _boot_failed(failure: Failure) -> Failure:
    error = failure.value
    return Failure(_BootFailed(f"{type(error).__name__}: {error}"))


_LEVELS = list(LogLevel.iterconstants())


@implementer(ILogObserver)
class _LogToMain:
    """
    A worker's log observer: netd's own records, and anything of warn and
    above, go to the main process's log; Twisted's chatter about ports and
    pipes stays behind (the main process says the same once).
    """

    def __init__(self, worker: _Worker) -> None:
        self.worker = worker
        self.least = _LEVELS.index(LogLevel.info)

    def __call__(self, event: LogEvent) -> None:
        level: LogLevel = event.get("log_level", LogLevel.info)
        namespace: str = event.get("log_namespace") or ""
        rank = _LEVELS.index(level)
        if rank < self.least:
            return
        if rank < _LEVELS.index(LogLevel.warn) and not namespace.startswith("netd"):
            return
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text = f"{text}\n{failure.getTraceback()}"
        self.worker.send_log(level.name, namespace, text)


def main() -> None:
    """A worker process: AMP on stdin and stdout, listeners from descriptor 3 on."""
    from twisted.internet import reactor as installed
    from twisted.internet import stdio

    reactor: Any = installed

    # Anything written to stdout by mistake would corrupt the channel: the
    # channel gets its own descriptor and stdout goes where stderr goes.
    channel_out = os.dup(1)
    os.dup2(2, 1)
    worker = _Worker(reactor)
    globalLogBeginner.beginLoggingTo([worker.log_observer], redirectStandardIO=False)
    standard_io: Any = stdio.StandardIO
    standard_io(worker, stdin=0, stdout=channel_out, reactor=reactor)

    def finish(signum: int, frame: Any) -> None:
        reactor.callFromThread(worker.finish, worker.grace)

    def take_signals() -> None:
        # SIGTERM or SIGINT sent to the whole group (systemd, a terminal):
        # drain as the main process does.  Reloading is the main process's.
        signal.signal(signal.SIGTERM, finish)
        signal.signal(signal.SIGINT, finish)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    reactor.callWhenRunning(take_signals)
    reactor.run()
