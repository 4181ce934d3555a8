"""
Tests for netd.workers' supervision (a dead worker started again, with backoff)
driven by a Clock, and for the map's C{workers} key.
"""

from __future__ import annotations

import os
import pickle
import textwrap
from pathlib import Path
from typing import Any, cast

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols import amp
from twisted.python.failure import Failure

from netd.config import ConfigErrors, NetdConfig, ServiceConfig, parse_config
from netd.events import Journal
from netd.kinds import AdminView, ViewRefused
from netd.runtime import RunningService
from netd.schema import ConfigError, Position
from netd.services.http.stubs import RoutesView
from netd.workers import (
    Backoff,
    WorkerPool,
    _Big,
    _Boot,
    _CallView,
    _Emit,
    _encode_refusal,
    _encode_value,
    _JournalActive,
    _Link,
    _merged,
    _must,
    _outcome,
    _Slot,
    _Worker,
    _Write,
)


def test_backoff_doubles_to_its_ceiling() -> None:
    clock = Clock()
    backoff = Backoff(clock, first=0.5, most=4.0)
    assert [backoff.delay(clock.seconds()) for _ in range(6)] == [0.5, 1, 2, 4, 4, 4]


def test_backoff_starts_over_after_a_stable_run() -> None:
    clock = Clock()
    backoff = Backoff(clock, first=0.5, most=4.0, stable=10)
    assert [backoff.delay(clock.seconds()) for _ in range(3)] == [0.5, 1, 2]
    started = clock.seconds()
    clock.advance(9)
    assert backoff.delay(started) == 4  # up, but not long enough to count as stable
    started = clock.seconds()
    clock.advance(10)
    assert backoff.delay(started) == 0.5


class _Spawner:
    """Hands out links whose processes the test ends, or spawns that fail."""

    def __init__(self) -> None:
        self.spawned: list[Deferred[_Link]] = []
        self.links: list[_Link] = []

    def __call__(self) -> Deferred[_Link]:
        starting: Deferred[_Link] = Deferred()
        self.spawned.append(starting)
        return starting

    def serve(self, pid: int) -> _Link:
        link = _Link.__new__(_Link)
        link.pid = pid
        link.ended = Deferred()
        self.links.append(link)
        self.spawned[-1].callback(link)
        return link


def _slot() -> tuple[Clock, _Spawner, list[tuple[int, str, float | None]], _Slot]:
    clock, spawner = Clock(), _Spawner()
    told: list[tuple[int, str, float | None]] = []
    slot = _Slot(clock, spawner, lambda *end: told.append(end))
    return clock, spawner, told, slot


def test_a_dead_worker_is_started_again_later_each_time() -> None:
    clock, spawner, told, slot = _slot()
    slot.start()
    spawner.serve(101).ended.callback("killed by signal 9")
    assert told == [(101, "killed by signal 9", 0.1)]
    clock.advance(0.05)
    assert len(spawner.spawned) == 1  # not before its delay
    clock.advance(0.05)
    assert len(spawner.spawned) == 2
    spawner.serve(102).ended.callback("exited with status 1")
    assert told[-1] == (102, "exited with status 1", 0.2)
    clock.advance(0.2)
    assert len(spawner.spawned) == 3


def test_a_worker_that_cannot_start_is_tried_again() -> None:
    clock, spawner, told, slot = _slot()
    booted = slot.start()
    spawner.spawned[-1].errback(RuntimeError("no such kind"))
    assert told == [(0, "did not start: no such kind", 0.1)]
    assert booted.called and isinstance(booted.result.value, RuntimeError)
    booted.addErrback(lambda _: None)
    clock.advance(0.1)
    spawner.serve(103)
    assert slot.link is not None and slot.link.pid == 103


def test_stop_cancels_a_pending_start_and_reports_a_stop() -> None:
    clock, spawner, told, slot = _slot()
    slot.start()
    spawner.serve(104).ended.callback("killed by signal 9")
    stopped = slot.stop(5)
    assert stopped.called
    clock.advance(60)
    assert len(spawner.spawned) == 1  # the pending start was cancelled
    assert told == [(104, "killed by signal 9", 0.1)]


def test_a_stopped_worker_is_not_replaced() -> None:
    clock, spawner, told, slot = _slot()
    slot.start()
    link = spawner.serve(105)
    calls: list[object] = []
    _answering(link, calls)
    stopped = slot.stop(2)
    assert not stopped.called and len(calls) == 1
    clock.advance(2 + 5)
    assert calls[-1] == "kill"  # past its grace and margin
    link.ended.callback("killed by signal 9")
    assert stopped.called
    assert told == [(105, "killed by signal 9", None)]
    clock.advance(60)
    assert len(spawner.spawned) == 1


def _answering(link: _Link, calls: list[object]) -> None:
    link.callRemote = lambda *args, **kwargs: calls.append(args) or Deferred()  # type: ignore[method-assign]
    link.kill = lambda: calls.append("kill")  # type: ignore[method-assign]


def test_replace_starts_a_worker_at_once_and_lets_the_old_one_finish() -> None:
    clock, spawner, told, slot = _slot()
    slot.start()
    old = spawner.serve(106)
    calls: list[object] = []
    _answering(old, calls)
    slot.replace(3)
    assert len(calls) == 1 and len(spawner.spawned) == 2  # told to stop; the next one starts
    new = spawner.serve(107)
    old.ended.callback("exited with status 0")
    assert told == [(106, "exited with status 0", None)]  # no restart for a retired worker
    clock.advance(60)
    assert len(spawner.spawned) == 2 and slot.link is new


def test_replace_while_booting_waits_for_the_worker_then_replaces_it() -> None:
    _, spawner, told, slot = _slot()
    slot.start()
    slot.replace(3)
    assert len(spawner.spawned) == 1
    calls: list[object] = []
    link = _Link.__new__(_Link)
    link.pid, link.ended = 108, Deferred()
    _answering(link, calls)
    spawner.spawned[-1].callback(link)
    assert len(calls) == 1 and len(spawner.spawned) == 2  # booted on old sockets: replaced
    stopped = slot.stop(1)
    link.ended.callback("exited with status 0")
    assert not stopped.called  # the replacement still boots; it is stopped once up
    replacement = _Link.__new__(_Link)
    replacement.pid, replacement.ended = 109, Deferred()
    _answering(replacement, calls)
    spawner.spawned[-1].callback(replacement)
    assert not stopped.called
    replacement.ended.callback("exited with status 0")
    assert stopped.called
    assert told == [(108, "exited with status 0", None), (109, "exited with status 0", None)]


def test_views_merge_lists_and_sum_counts() -> None:
    assert _merged([[1, 2], [3]]) == [1, 2, 3]
    assert _merged([{"cleared": 2, "note": "a"}, {"cleared": 3, "note": "b"}]) == {
        "cleared": 5,
        "note": "a",
    }
    assert _merged([]) == []


def test_big_values_cross_amp_in_pieces() -> None:
    value = bytes(range(256)) * 1000  # 256 KB: four times what one AMP value holds
    box: dict[bytes, bytes] = {}
    _Big().toBox(b"body", box, {"body": value}, None)
    assert all(len(piece) <= 0xFFFF for piece in box.values()) and len(box) > 4
    decoded: dict[str, bytes] = {}
    _Big().fromBox(b"body", box, decoded, None)
    assert decoded == {"body": value}


def test_view_answers_and_refusals_cross_from_a_worker() -> None:
    assert _outcome(_encode_value([{"name": "a"}])["outcome"]) == [{"name": "a"}]
    assert _outcome(_encode_value(b"raw\xff")["outcome"]) == b"raw\xff"
    with pytest.raises(ViewRefused) as refused:
        _outcome(_encode_refusal(Failure(ViewRefused(409, "exists")))["outcome"])
    assert (refused.value.status, refused.value.reason) == (409, "exists")
    error = ConfigError(Position("body", 1, 2), "records.www", "not an address")
    with pytest.raises(ConfigErrors) as invalid:
        _outcome(_encode_refusal(Failure(ConfigErrors([error])))["outcome"])
    assert invalid.value.errors == [error]
    with pytest.raises(ZeroDivisionError):
        _encode_refusal(Failure(ZeroDivisionError()))


# --- the map's workers key ----------------------------------------------------------


def _parse(tmp_path: Path, text: str) -> NetdConfig:
    return parse_config(textwrap.dedent(text), tmp_path / "netd.yaml")


def _errors(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigErrors) as raised:
        _parse(tmp_path, text)
    return [str(e).split(":", 1)[1] for e in raised.value.errors]


def test_workers_auto_is_the_number_of_cores(tmp_path: Path) -> None:
    config = _parse(
        tmp_path,
        """
        services:
          web: {type: http, listen: ["tcp:0"], workers: auto}
          echo: {type: echo, listen: ["tcp:0"], workers: 3}
          dns: {type: dns, listen: ["udp:0"]}
        """,
    )
    assert config.services["web"].workers == os.cpu_count()
    assert config.services["echo"].workers == 3
    assert config.services["dns"].workers == 0


def test_workers_are_refused_where_state_or_a_listener_cannot_be_shared(tmp_path: Path) -> None:
    assert _errors(
        tmp_path,
        """
        services:
          mail: {type: smtp, listen: ["tcp:0"], workers: 2}
          web: {type: http, listen: ["tcp:0"], record: 10, workers: 2}
          echo:
            type: echo
            workers: 2
            listen: ["unix:echo.sock", "tcp:0"]
          time: {type: time, listen: ["tcp:0"], workers: many}
        """,
    ) == [
        "3:50: services.mail.workers: a smtp service keeps its state in one process: "
        "it cannot run in workers",
        "4:61: services.web.workers: cannot run in workers: 'record' keeps the requests "
        "in one process (leave it out, or run one process)",
        "8:14: services.echo.listen[0]: 'unix:echo.sock' cannot be shared with workers "
        "(a UNIX path, or TLS keys in the string: use a 'tls:' profile)",
        "9:50: services.time.workers: expected an integer, got a string",
    ]


# --- run-time routes kept by the main process ---------------------------------------


class _InProcessLink:
    """A link whose worker is a L{_Worker} in this process, its service built, never bound."""

    def __init__(self, pid: int, config: ServiceConfig, reactor: MemoryReactorClock) -> None:
        self.pid = pid
        self.worker = _Worker(reactor)
        self.worker.service = RunningService(
            config, reactor, Path("/"), Journal(reactor), {}, Path("/")
        )
        self.asked: list[tuple[str, str, str]] = []

    def callRemote(self, command: object, **arguments: Any) -> Deferred[dict[str, bytes]]:
        assert command is _CallView
        self.asked.append((arguments["view"], arguments["action"], arguments["key"]))
        answered: Deferred[dict[str, bytes]] = self.worker.call_view(**arguments)
        return answered

    def routes(self) -> dict[str, int]:
        listed = self._view().list({})
        return {route["id"]: route["matched"] for route in listed["routes"]}

    def matched(self, route_id: str, count: int) -> None:
        """As if C{count} requests had matched the route in this worker."""
        # The view's methods are its RoutesView's, which counts in its app.
        post: Any = self._view().post
        routes: RoutesView = post.__self__
        routes.app.matched[route_id] = count

    def _view(self) -> AdminView:
        assert self.worker.service is not None
        return self.worker.service.handlers.views["routes"]


def _pool(tmp_path: Path) -> tuple[WorkerPool, list[_InProcessLink]]:
    config = _parse(
        tmp_path,
        """
        services:
          web:
            type: http
            workers: 2
            listen: ["tcp:0:interface=127.0.0.1"]
            routes: [{id: health, path: /health, body: ok}]
        """,
    )
    reactor = MemoryReactorClock()
    web = config.services["web"]
    pool = WorkerPool(
        web, reactor, tmp_path, Journal(reactor), {}, tmp_path, {}, 1.0, config.log, {}
    )
    links = [_InProcessLink(pid, web, reactor) for pid in (201, 202)]
    for slot, link in zip(pool.slots, links, strict=True):
        slot.link = cast(_Link, link)
    return pool, links


def _answer(result: Deferred[Any] | Any) -> Any:
    found: list[Any] = []
    result.addBoth(found.append)
    [answer] = found
    if isinstance(answer, Failure):
        answer.raiseException()
    return answer


def test_the_main_process_takes_a_route_first_and_chooses_its_id(tmp_path: Path) -> None:
    pool, links = _pool(tmp_path)
    routes = pool.handlers.views["routes"]
    added = _answer(_must(routes.post)({"path": "/x", "body": "x"}))
    # Every worker has the route under the id the main process chose.
    assert all(set(link.routes()) == {added["id"], "health"} for link in links)
    with pytest.raises(ViewRefused) as refused:
        _answer(_must(routes.post)({"id": added["id"], "path": "/y", "body": "y"}))
    assert refused.value.status == 409
    with pytest.raises(ViewRefused) as refused:
        _answer(_must(routes.remove)("health"))
    assert refused.value.status == 403
    assert _answer(_must(routes.remove)("nothing")) is None
    # Refused or unknown here: asked of no worker.
    assert all(link.asked == [("routes", "post", "")] for link in links)
    assert _answer(_must(routes.remove)(added["id"])) == {"removed": added["id"]}
    assert all(set(link.routes()) == {"health"} for link in links)


def test_a_kept_route_is_listed_once_with_its_matches_summed(tmp_path: Path) -> None:
    pool, links = _pool(tmp_path)
    routes = pool.handlers.views["routes"]
    _answer(_must(routes.post)({"id": "x", "path": "/x", "body": "x"}))
    for link, count in zip(links, (3, 4), strict=True):
        link.matched("x", count)
    listed = _answer(routes.list({}))["routes"]
    assert [(r["id"], r["matched"], r["source"]) for r in listed] == [
        ("x", 7, "api"),
        ("health", 0, "map"),
    ]


def test_a_booting_worker_takes_the_writes_it_missed_in_order(tmp_path: Path) -> None:
    pool, links = _pool(tmp_path)
    booting = links.pop()
    pool.slots[1].link = None
    missed: list[_Write] = []
    pool._booting.append(missed)
    routes = pool.handlers.views["routes"]
    _answer(_must(routes.post)({"id": "a", "path": "/o", "body": "a"}))
    _answer(_must(routes.post)({"id": "b", "path": "/o", "body": "b"}))
    _answer(_must(routes.remove)("a"))
    assert booting.asked == [] and len(missed) == 3
    _answer(pool._catch_up(cast(_Link, booting), missed))
    assert booting.asked == [
        ("routes", "post", ""),
        ("routes", "post", ""),
        ("routes", "remove", "a"),
    ]
    assert list(booting.routes()) == list(links[0].routes()) == ["b", "health"]


def test_a_pool_pickles_its_spec_once_and_what_it_keeps_at_each_boot(tmp_path: Path) -> None:
    # A big map pickles for a third of a second: a worker replaced in a crash
    # loop must not hold the reactor that long each time.
    pool, _ = _pool(tmp_path)
    assert pool.handlers.keep is not None
    pool.handlers.keep()  # as the pool's start does
    spec, carried = pool._boot_arguments()
    assert pickle.loads(spec).service == pool.config
    _answer(_must(pool.handlers.views["routes"].post)({"id": "x", "path": "/x", "body": "x"}))
    again, carried_again = pool._boot_arguments()
    assert again is spec
    assert (
        "x" not in str(pickle.loads(carried)) and "x" in pickle.loads(carried_again)["http.routes"]
    )


# --- the journal, read or not, across the channel ----------------------------------


class _SpawningReactor(MemoryReactorClock):
    """Starts each worker as a channel to a StringTransport, which stays booting."""

    def __init__(self) -> None:
        super().__init__()
        self.channels: list[StringTransport] = []

    def spawnProcess(self, protocol: Any, *args: Any, **kwargs: Any) -> StringTransport:
        channel = StringTransport()
        channel.pid = 300 + len(self.channels)  # type: ignore[attr-defined]
        self.channels.append(channel)
        protocol.makeConnection(channel)
        return channel


def _commands(channel: StringTransport) -> list[tuple[bytes, bytes | None]]:
    """The commands written on C{channel}: each one's name and C{active} argument."""
    boxes = amp.parseString(channel.value())
    return [(box[b"_command"], box.get(b"active")) for box in boxes]


def test_a_pool_tells_its_workers_when_its_journal_is_read_or_no_longer(
    tmp_path: Path,
) -> None:
    config = _parse(
        tmp_path,
        """
        services:
          web: {type: http, workers: 2, listen: ["tcp:0"], routes: [{path: /, body: ok}]}
        """,
    )
    reactor = _SpawningReactor()
    journal = Journal(reactor, active=False)
    web = config.services["web"]
    pool = WorkerPool(web, reactor, tmp_path, journal, {}, tmp_path, {}, 1.0, config.log, {})
    pool.startService()
    # Told after their boot (the workers here are still booting), in order.
    journal.active = True
    journal.active = True
    journal.active = False
    for channel in reactor.channels:
        assert _commands(channel) == [
            (_Boot.commandName, None),
            (_JournalActive.commandName, b"True"),
            (_JournalActive.commandName, b"False"),
        ]


def test_a_worker_forwards_its_events_only_while_the_main_journal_is_read() -> None:
    worker = _Worker(MemoryReactorClock())
    channel = StringTransport()
    worker.makeConnection(channel)
    told = amp.AmpBox(_command=_JournalActive.commandName, active=b"True")
    worker.dataReceived(told.serialize())
    worker.journal.emit("web", "http.request", path="/read")
    worker.dataReceived(
        amp.AmpBox(_command=_JournalActive.commandName, active=b"False").serialize()
    )
    worker.journal.emit("web", "http.request", path="/unread")
    assert [name for name, _ in _commands(channel)] == [_Emit.commandName]
    assert b"/read" in channel.value() and b"/unread" not in channel.value()
