"""
The running daemon: services built from the map, their listeners, readiness and shutdown.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import attrs
from twisted.application.service import MultiService, Service
from twisted.internet.defer import (
    Deferred,
    DeferredList,
    gatherResults,
    inlineCallbacks,
    succeed,
)
from twisted.internet.interfaces import IListeningPort, IOpenSSLServerConnectionCreator
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from netd import endpoints
from netd.config import (
    AdminConfig,
    ConfigErrors,
    ListenerConfig,
    NetdConfig,
    ServiceConfig,
    TLSProfileConfig,
    load_config,
)
from netd.connections import ConnectionSet, TrackingFactory
from netd.events import Event, Journal, ServiceStats
from netd.kinds import AdminView, BuildContext, Handlers
from netd.listeners import ListenerGroup, StartupError, handover_key, os_message
from netd.records import Record
from netd.rules import RuleSet, Scenarios
from netd.services import load_kind

if TYPE_CHECKING:
    from netd.admin import AdminServer

__all__ = ["Daemon", "LifecycleObserver", "RunningService", "StartupError", "build_tls"]

log = Logger(namespace="netd")


class LifecycleObserver(Protocol):
    """Told about the daemon's state changes (systemd notification, for one)."""

    def ready(self, daemon: Daemon) -> None: ...
    def reloading(self, daemon: Daemon) -> None: ...
    def reloaded(self, daemon: Daemon) -> None: ...
    def stopping(self, daemon: Daemon) -> None: ...


def build_tls(
    profiles: Mapping[str, TLSProfileConfig],
    state_dir: Path,
    materials: dict[str, str] | None = None,
) -> dict[str, IOpenSSLServerConnectionCreator]:
    """
    Load or generate every TLS profile; raise L{StartupError} naming the profile.

    @param materials: filled with a digest of each profile's files (L{tls.material}).
    """
    creators: dict[str, IOpenSSLServerConnectionCreator] = {}
    if not profiles:
        return creators
    # netd.tls (certificate checks and generation) loads only for maps with profiles.
    from netd import tls

    for name, profile in profiles.items():
        try:
            if profile.self_signed:
                keypair, _ = tls.ensure_self_signed(state_dir / "tls", name, profile.self_signed)
            else:
                assert profile.keypair is not None
                keypair = tls.KeyPair(profile.keypair.cert, profile.keypair.key)
            sni = {n: tls.KeyPair(k.cert, k.key) for n, k in profile.sni.items()}
            mint = (
                tls.minter(state_dir / "tls", name, profile.self_signed) if profile.mint else None
            )
            if materials is not None:
                # Digested before they are loaded: files renewed in between are
                # then seen as changed by the next reload, never the other way.
                materials[name] = tls.material(keypair, sni, profile.client_ca)
            creators[name] = tls.server_options(
                keypair,
                min_version=profile.min_version,
                client_ca=profile.client_ca,
                sni=sni or None,
                mint=mint,
            )
        except (tls.TLSError, OSError, ValueError) as e:
            raise StartupError(f"{profile.position}: tls.{name}: {e}") from None
    return creators


class RunningService(ListenerGroup, Service):
    """One service of the map: its handlers, listeners and live connections."""

    def __init__(
        self,
        config: ServiceConfig,
        reactor: Any,
        base_dir: Path,
        journal: Journal,
        tls_creators: Mapping[str, IOpenSSLServerConnectionCreator],
        state_dir: Path,
        scenarios: Scenarios | None = None,
        carried: dict[str, Any] | None = None,
        tables: dict[str, Any] | None = None,
    ) -> None:
        # Not setName(): during a reload the old and the new service of one
        # name overlap while the old one drains.
        self.label = f"service {config.name}"
        self.summary_prefix = f"service {config.name} ({config.type})"
        self.config = config
        self.reactor = reactor
        self.base_dir = base_dir
        self.stats = ServiceStats()
        self.state = "configured"
        self.tls_creators = tls_creators
        kind = load_kind(config.type)
        self.rules = RuleSet(config.name, kind.rules, reactor, journal, scenarios, config.rules)
        self.context = BuildContext(
            reactor=reactor,
            name=config.name,
            state_dir=state_dir,
            journal=journal,
            stats=self.stats,
            log=Logger(namespace=f"netd.{config.name}"),
            tls=tls_creators,
            rules=self.rules,
            namespaces=config.namespace_from,
            carried={} if carried is None else carried,
            tables={} if tables is None else tables,
            stream_ports=lambda: [b.port for b in self.listeners if not b.config.datagram],
        )
        handlers = kind.build(config, self.context)
        rules_view = AdminView(
            list=self.rules.list,
            item=self.rules.item,
            clear=self.rules.clear,
            post=self.rules.post,
            remove=self.rules.remove,
            forget=self.rules.forget,
        )
        # A kind may serve the rules view itself, over these (the proxy's adds its toxics).
        self.handlers: Handlers = attrs.evolve(
            handlers, views={"rules": rules_view, **handlers.views}
        )
        self.datagram_protocols: list[Any] = []
        self.rules.watchers.append(self._rules_changed)
        self.connections = ConnectionSet(
            reactor,
            config.name,
            self.stats,
            journal,
            config.max_connections,
            config.idle_timeout,
            self.handlers.busy_reply,
            config.max_connections_per_client,
            self.handlers.per_client_reply,
            self.rules,
            batch_writes=kind.batch_writes,
        )
        self.listeners = []
        self.listener_configs = config.listen

    def _listen_one(
        self, listener: ListenerConfig, held: endpoints.HeldSocket | None
    ) -> Deferred[IListeningPort]:
        if listener.datagram:
            assert self.handlers.datagram is not None
            protocol = self.handlers.datagram(listener)
            self.datagram_protocols.append(protocol)
            self._watch_datagrams(protocol)
            return succeed(
                endpoints.listen_datagram(self.reactor, listener.endpoint, protocol, held=held)
            )
        assert self.handlers.stream is not None
        creator = self.tls_creators[listener.tls_profile] if listener.tls_profile else None
        endpoint = endpoints.server_endpoint(
            self.reactor, listener.endpoint, self.base_dir, creator, held=held
        )
        factory = TrackingFactory(self.handlers.stream(listener), self.connections)
        listening: Deferred[IListeningPort] = endpoint.listen(factory)
        return listening

    def announce(self) -> None:
        self.state = "running"
        super().announce()

    def _rules_changed(self) -> None:
        for protocol in self.datagram_protocols:
            self._watch_datagrams(protocol)

    def _watch_datagrams(self, protocol: Any) -> None:
        """
        While a rule may drop datagrams, each passes it first; otherwise the
        protocol's own C{datagramReceived} is called directly (an instance
        attribute comes and goes: no cost without such a rule).
        """
        if not self.rules.datagram_rules:
            protocol.__dict__.pop("datagramReceived", None)
            return
        if "datagramReceived" in protocol.__dict__:
            return
        receive = type(protocol).datagramReceived.__get__(protocol)
        rules = self.rules

        def datagram_received(data: bytes, addr: Any) -> None:
            if rules.datagram_rules and rules.on_datagram(addr[0]) is not None:
                return
            receive(data, addr)

        protocol.datagramReceived = datagram_received

    def startService(self) -> None:
        super().startService()
        if self.handlers.service is not None:
            self.handlers.service.startService()

    def serving(self) -> Deferred[None]:
        """Fires once the service answers on its listeners and can do its work."""
        ready = self.handlers.ready
        return succeed(None) if ready is None else ready()

    def prepare(self) -> Deferred[None]:
        """
        Whether the service could do its work (L{Handlers.ready}), asked of a
        reload's replacement before it starts or takes a listener, while the
        service it replaces still serves; fails with the reason if not.
        """
        return RunningService.serving(self)

    @inlineCallbacks
    def stop(self, grace: float) -> Any:
        """Stop accepting at once, let exchanges finish for C{grace} seconds, then stop."""
        if self.state in ("stopping", "stopped"):
            return
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
            "views": sorted(self.handlers.views),
        }


def _first_error(failure: Failure) -> BaseException | None:
    """The error inside a L{gatherResults} failure."""
    error = failure.value
    sub = getattr(error, "subFailure", None)
    return sub.value if sub is not None else error


@attrs.frozen(repr=False)
class ReloadResult(Record):
    """What a reload did, or the errors that stopped it (then nothing changed)."""

    errors: tuple[str, ...] = ()
    started: tuple[str, ...] = ()
    restarted: tuple[str, ...] = ()
    stopped: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.errors

    def as_json(self) -> dict[str, Any]:
        if self.errors:
            return {"errors": list(self.errors)}
        return {
            "started": list(self.started),
            "restarted": list(self.restarted),
            "stopped": list(self.stopped),
            "unchanged": list(self.unchanged),
        }


class Daemon(MultiService):
    """
    The root of netd's service tree.

    Listeners are bound in L{privilegedStartService} so that ports below 1024
    are taken before twistd drops root; readiness is announced once all are bound.
    """

    def __init__(self, config: NetdConfig, reactor: Any, ports_file: Path | None = None) -> None:
        super().__init__()
        self.config = config
        self.scenarios = Scenarios(config.scenarios)
        self.reactor = reactor
        self.ports_file = ports_file
        self.observers: list[LifecycleObserver] = []
        self.journal = Journal(reactor, active=config.admin is not None)
        if config.log.events:
            self.journal.subscribe(_log_event)
        self.services_by_name: dict[str, RunningService] = {}
        # Services made at run time (the Toxiproxy API's proxies), kept across reloads.
        self.added: dict[str, ServiceConfig] = {}
        self.admin: AdminServer | None = None
        self.ready = False
        # Why the start failed once the reactor ran (an asynchronous bind):
        # the process running us decides what that means for its exit status.
        self.start_failure: Failure | None = None
        self._reloading = False
        self._reload_again: list[Deferred[ReloadResult]] = []
        self._tls_materials: dict[str, str] = {}
        self._carried: dict[str, dict[str, Any]] = {}
        self._tables: dict[str, Any] = {}

    def _running_service(
        self,
        service_config: ServiceConfig,
        config: NetdConfig,
        creators: Mapping[str, IOpenSSLServerConnectionCreator],
    ) -> RunningService:
        """Build one service; a kind's failure names the service instead of a traceback."""
        try:
            if service_config.workers:
                # AMP and process management load only for maps that use workers.
                from netd.workers import WorkerPool

                return WorkerPool(
                    service_config,
                    self.reactor,
                    config.file.parent,
                    self.journal,
                    creators,
                    config.state_dir,
                    config.tls,
                    config.shutdown_grace,
                    config.log,
                    self._carried.setdefault(service_config.name, {}),
                    self._tables,
                )
            return RunningService(
                service_config,
                self.reactor,
                config.file.parent,
                self.journal,
                creators,
                config.state_dir,
                self.scenarios,
                self._carried.setdefault(service_config.name, {}),
                self._tables,
            )
        except Exception as e:
            reason = os_message(e) if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
            where = f"{service_config.position}: services.{service_config.name}"
            raise StartupError(f"{where}: cannot start: {reason}") from None

    def added_at_run_time(self, name: str) -> bool:
        return name in self.added

    @inlineCallbacks
    def add_service(self, config: ServiceConfig) -> Any:
        """
        Build, bind and start a service that is not in the map; it runs like
        the map's and outlives reloads until removed, or until the map takes its name.
        """
        if config.name in self.services_by_name or config.name in self.added:
            raise ValueError(f"service {config.name!r} exists")
        # Claimed before binding: a second request for the name meets it.
        self.added[config.name] = config
        try:
            running = self._running_service(config, self.config, {})
            yield running.listen()
        except BaseException:
            del self.added[config.name]
            raise
        running.setServiceParent(self)
        self.services_by_name[config.name] = running
        running.announce()
        self._write_ports()
        return running

    @inlineCallbacks
    def remove_service(self, name: str) -> Any:
        """Stop a service made at run time, cutting its open connections."""
        if name not in self.added or name not in self.services_by_name:
            raise KeyError(name)
        del self.added[name]
        running = self.services_by_name.pop(name)
        self._write_ports()
        yield running.stop(0)
        running.disownServiceParent()

    def _build(self) -> None:
        try:
            self.config.state_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        except OSError as e:
            raise StartupError(f"{self.config.file}: state_dir: {os_message(e)}") from None
        creators = build_tls(self.config.tls, self.config.state_dir, self._tls_materials)
        for service_config in self.config.services.values():
            if service_config.enabled:
                running = self._running_service(service_config, self.config, creators)
                running.setServiceParent(self)
                self.services_by_name[service_config.name] = running
        if self.config.admin is not None:
            self.admin = _admin_server(self, self.config.admin, creators)

    def _bindables(self) -> list[RunningService | AdminServer]:
        admin: list[RunningService | AdminServer] = [self.admin] if self.admin else []
        return [*self.services_by_name.values(), *admin]

    def privilegedStartService(self) -> None:
        self._build()
        bound: list[Failure | Any] = []

        def settled(result: Any) -> Any:
            bound.append(result)
            return result  # a late failure goes on to _failed_late

        all_bound = gatherResults([s.listen() for s in self._bindables()], consumeErrors=True)
        all_bound.addBoth(settled)
        if bound and isinstance(bound[0], Failure):
            all_bound.addErrback(lambda _: None)  # raised here instead
            self._unbind()
            raise StartupError(str(_first_error(bound[0])))
        if not bound:
            # An endpoint that binds asynchronously (a plugin's): readiness waits for it.
            all_bound.addCallbacks(lambda _: self._announce_ready(), self._failed_late)

    def _unbind(self) -> None:
        for bindable in self._bindables():
            bindable.stop_listening()

    def _failed_late(self, failure: Failure) -> None:
        log.critical("{error}", error=_first_error(failure))
        self.start_failure = failure
        self._unbind()
        self.reactor.stop()

    def startService(self) -> None:
        super().startService()
        if all(s.listeners or not s.config.listen for s in self.services_by_name.values()):
            # Ready means serving: the reactor must run (and its signal handlers
            # be ours) before a watcher of the ports file sends us anything,
            # and worker processes must have taken their listeners.
            self.reactor.callWhenRunning(self._when_serving)

    def _when_serving(self) -> None:
        serving = [s.serving() for s in self.services_by_name.values()]
        gatherResults(serving, consumeErrors=True).addCallbacks(
            lambda _: self._announce_ready(), self._failed_late
        )

    def _announce_ready(self) -> None:
        if self.ready:
            return
        self.ready = True
        for service in self.services_by_name.values():
            service.announce()
        if self.admin is not None:
            self.admin.announce()
        self._write_ports()
        for observer in self.observers:
            observer.ready(self)

    def _write_ports(self) -> None:
        if self.ports_file is not None:
            write_atomically(self.ports_file, json.dumps(self.ports(), indent=2) + "\n")

    def ports(self) -> dict[str, Any]:
        ports: dict[str, Any] = {
            "pid": os.getpid(),
            "services": {
                name: {
                    "type": service.config.type,
                    "listeners": [b.describe() for b in service.listeners],
                }
                for name, service in self.services_by_name.items()
            },
        }
        if self.admin is not None:
            ports["admin"] = {"listeners": [b.describe() for b in self.admin.listeners]}
        return ports

    def describe(self) -> dict[str, Any]:
        return {name: service.describe() for name, service in self.services_by_name.items()}

    def reload(self) -> Deferred[ReloadResult]:
        """
        Re-read the map and apply the difference; returns a L{ReloadResult}.

        Unchanged services keep their listeners and connections.  A changed
        service gives up its listeners only once its replacement is built; if
        the replacement cannot bind, the old one takes its ports back and the
        whole reload is undone.

        Asked while one runs (a SIGHUP and an API call, an editor saving twice),
        it is not refused: the map may have changed after the running reload
        read it.  One more reload follows that one, and every request made
        meanwhile gets its result.
        """
        if self._reloading:
            follow_up: Deferred[ReloadResult] = Deferred()
            self._reload_again.append(follow_up)
            return follow_up
        done: Deferred[ReloadResult] = self._reload_once()
        done.addBoth(self._reload_queued)
        return done

    def _reload_queued(self, result: Any) -> Any:
        waiting, self._reload_again = self._reload_again, []
        if waiting and not self.running:
            refused = ReloadResult(errors=("netd is stopping",))
            for follow_up in waiting:
                follow_up.callback(refused)
        elif waiting:
            again = self.reload()

            def answer(outcome: ReloadResult) -> None:
                for follow_up in waiting:
                    follow_up.callback(outcome)

            again.addCallback(answer)
        return result

    @inlineCallbacks
    def _reload_once(self) -> Any:
        self._reloading = True
        for observer in self.observers:
            observer.reloading(self)
        try:
            result = yield self._reload()
        except Exception as e:
            # A reload must never take the daemon down; say what broke and keep running.
            log.failure("reload failed")
            result = ReloadResult(errors=(f"reload failed: {type(e).__name__}: {e}",))
        finally:
            self._reloading = False
            for observer in self.observers:
                observer.reloaded(self)
        if result.ok:
            log.info(
                "reloaded {file}: started {started}, restarted {restarted}, stopped {stopped}",
                file=self.config.file,
                started=list(result.started),
                restarted=list(result.restarted),
                stopped=list(result.stopped),
            )
        else:
            for error in result.errors:
                log.error("reload refused, configuration unchanged: {error}", error=error)
        self.journal.emit("netd", "reload", **result.as_json())
        return result

    @inlineCallbacks
    def _reload(self) -> Any:
        try:
            # Reading the map reads every file it names (zone files of a
            # million lines, say): in a thread, so services answer meanwhile.
            new = yield deferToThreadPool(
                self.reactor, self.reactor.getThreadPool(), load_config, self.config.file
            )
        except ConfigErrors as e:
            return ReloadResult(errors=tuple(str(error) for error in e.errors))
        if not self.running:
            # Stopped while the map was read: nothing is bound any more.
            return ReloadResult(errors=("netd is stopping",))
        materials: dict[str, str] = {}
        try:
            new.state_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
            creators = build_tls(new.tls, new.state_dir, materials)
        except (OSError, StartupError) as e:
            return ReloadResult(errors=(str(e),))

        wanted = {n: c for n, c in new.services.items() if c.enabled}
        # Run-time services stay, unless the map now names one of them.
        kept_added = {n: c for n, c in self.added.items() if n not in new.services}
        wanted.update(kept_added)
        changed_profiles = {
            name
            for name in set(self.config.tls) | set(new.tls)
            if self.config.tls.get(name) != new.tls.get(name)
            # The same file names, other certificates in them: renewed in place.
            or self._tls_materials.get(name) != materials.get(name)
        }
        old = self.services_by_name
        stopped = [n for n in old if n not in wanted]
        unchanged = [
            n
            for n, c in wanted.items()
            if n in old
            and old[n].config == c
            and not c.tls_profiles & changed_profiles
            and new.state_dir == self.config.state_dir
            # Workers hold the map's rules in their own processes: new ones, new workers.
            and not (c.workers and old[n].config.rules != c.rules)
        ]
        to_build = [n for n in wanted if n not in unchanged]
        fresh: dict[str, RunningService] = {}
        for name in to_build:
            try:
                fresh[name] = self._running_service(wanted[name], new, creators)
            except StartupError as e:
                return ReloadResult(errors=(str(e),))
        refused = yield self._prepare(fresh)
        if refused is not None:
            return refused
        if not self.running:
            return ReloadResult(errors=("netd is stopping",))
        admin_changed = new.admin != self.config.admin or bool(changed_profiles)
        new_admin = (
            _admin_server(self, new.admin, creators) if new.admin and admin_changed else None
        )

        retiring: list[ListenerGroup] = [
            *(old[n] for n in to_build if n in old),
            *(old[n] for n in stopped),
        ]
        if admin_changed and self.admin is not None:
            retiring.append(self.admin)
        binding: list[ListenerGroup] = [*fresh.values(), *([new_admin] if new_admin else [])]
        # A replacement listening as its predecessor did takes over its socket:
        # the port is never closed, so no client meets a refusal or a reset.
        successions: list[tuple[ListenerGroup, ListenerGroup]] = [
            (old[n], fresh[n]) for n in fresh if n in old
        ]
        if new_admin is not None and self.admin is not None:
            successions.append((self.admin, new_admin))
        handed_over = [(pair, _held_sockets(*pair)) for pair in successions]
        held = {id(group): sockets for pair, sockets in handed_over for group in pair}
        try:
            result = yield self._rebind(retiring, binding, held)
        finally:
            for _, sockets in handed_over:
                for socket in sockets.values():
                    socket.close()
        if result is not None:
            return result
        if not self.running:
            # Stopped while the listeners moved: the new ones go too, unserved.
            yield gatherResults([group.stop_listening() for group in binding])
            return ReloadResult(errors=("netd is stopping",))

        # Committed.  The map's rules are replaced; those added through the
        # API stay in force, in the replacement of a restarted service too.
        for name in unchanged:
            old[name].rules.replace_map(wanted[name].rules)
        for name, running in fresh.items():
            if name in old:
                running.rules.adopt(old[name].rules)
        self.scenarios.reconfigure(new.scenarios)
        # Old services finish their exchanges while the new ones serve.
        # Once the reload answers, none of the old accepts (a worker, told so, included).
        listening_stopped = gatherResults([r.stop_listening() for r in retiring])
        grace = new.shutdown_grace
        for retired in retiring:
            if isinstance(retired, RunningService):
                retired.stop(grace).addBoth(_disown, retired)
        if admin_changed:
            if self.admin is not None:
                # Its token rotated, say: the old API's kept-alive connections
                # must not go on answering by its rules.
                self.admin.retire(grace)
            self.admin = new_admin
        if new.log.events != self.config.log.events:
            if new.log.events:
                self.journal.subscribe(_log_event)
            else:
                self.journal.unsubscribe(_log_event)
        self.config = new
        self._tls_materials = materials
        self.added = kept_added
        # Recording costs a little per connection: only when someone can read it.
        self.journal.active = new.admin is not None or new.log.events
        self.services_by_name = {n: fresh[n] if n in fresh else old[n] for n in wanted}
        for name in stopped:
            self._carried.pop(name, None)
        for running in fresh.values():
            running.setServiceParent(self)
            running.announce()
        if new_admin is not None:
            new_admin.announce()
        self._write_ports()
        yield listening_stopped
        # A worker that cannot start is retried (and logged); the reload stands.
        yield DeferredList([running.serving() for running in fresh.values()], consumeErrors=True)
        return ReloadResult(
            started=tuple(n for n in fresh if n not in old),
            restarted=tuple(n for n in fresh if n in old),
            stopped=tuple(stopped),
            unchanged=tuple(unchanged),
        )

    @inlineCallbacks
    def _prepare(self, fresh: Mapping[str, RunningService]) -> Any:
        """
        Ask the replacements whether they could do their work before any
        listener moves; a L{ReloadResult} with the errors if one cannot, the
        old services then untouched, as when a listener cannot bind.  Nothing
        of theirs starts before the reload commits: a courier started here
        would send what the old one is sending, and state a kind publishes for
        its successor (carried) would outlive a reload that is undone.
        """
        outcome = yield DeferredList([r.prepare() for r in fresh.values()], consumeErrors=True)
        failures = [value for ok, value in outcome if not ok]
        if not failures:
            return None
        return ReloadResult(errors=tuple(str(f.value) for f in failures))

    @inlineCallbacks
    def _rebind(
        self,
        retiring: list[ListenerGroup],
        binding: list[ListenerGroup],
        held: Mapping[int, Mapping[str, endpoints.HeldSocket]],
    ) -> Any:
        """
        Bind the new listeners (all or none); a L{ReloadResult} with the errors
        if they cannot bind, the old listeners then as they were.
        """

        def fresh(group: ListenerGroup) -> list[ListenerConfig]:
            taken_over = held.get(id(group), {})
            return [c for c in group.listener_configs if handover_key(c) not in taken_over]

        # A replacement that binds a fixed port anew needs the old holder to let
        # go first; everything else binds beside the old listeners, so a failed
        # reload leaves the old ones exactly where they were.
        wanted_ports = {
            key
            for group in binding
            for listener in fresh(group)
            if (key := endpoints.port_of(listener.endpoint)) is not None
        }
        released = [
            group
            for group in retiring
            if any(endpoints.port_of(c.endpoint) in wanted_ports for c in fresh(group))
        ]
        yield gatherResults([group.stop_listening() for group in released])
        outcome = yield DeferredList(
            [b.listen(held.get(id(b))) for b in binding], consumeErrors=True
        )
        failures = [value for ok, value in outcome if not ok]
        if not failures:
            return None
        yield gatherResults([b.stop_listening() for b in binding])
        yield gatherResults([group.listen(held.get(id(group))) for group in released])
        return ReloadResult(errors=tuple(str(f.value) for f in failures))

    @inlineCallbacks
    def stopService(self) -> Any:
        log.info(
            "netd stopping: no new connections, {grace}s grace", grace=self.config.shutdown_grace
        )
        for observer in self.observers:
            observer.stopping(self)
        self.running = False
        if self.admin is not None:
            yield self.admin.stop_listening()
        services = list(self.services_by_name.values())
        yield gatherResults([s.stop(self.config.shutdown_grace) for s in services])
        if self.ports_file is not None:
            self.ports_file.unlink(missing_ok=True)
        log.info("netd stopped")


def _admin_server(
    daemon: Daemon, config: AdminConfig, creators: Mapping[str, IOpenSSLServerConnectionCreator]
) -> AdminServer:
    # twisted.web and prometheus-client cost ~6 MiB: only maps with an admin API pay.
    from netd.admin import AdminServer

    return AdminServer(daemon, config, creators)


def _log_event(event: Event) -> None:
    # In json mode every field of the event becomes a field of the log record.
    log.info(
        "event {event_type} {event_service} {event_fields}",
        event_type=event.type,
        event_service=event.service,
        event_fields=dict(event.fields),
        event_id=event.id,
    )


def _held_sockets(old: ListenerGroup, new: ListenerGroup) -> dict[str, endpoints.HeldSocket]:
    """
    The sockets of C{old}'s listeners that C{new} listens on the same way, by
    L{handover_key}; of listeners alike, the first.
    """
    wanted = {handover_key(c) for c in new.listener_configs}
    held: dict[str, endpoints.HeldSocket] = {}
    for bound in old.listeners:
        key = handover_key(bound.config)
        if key in wanted and key not in held and endpoints.can_hand_over(bound.config.endpoint):
            held[key] = endpoints.HeldSocket.of(bound.port)
    return held


def _disown(result: object, service: RunningService) -> None:
    service.disownServiceParent()


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
