"""
Counters and the event journal: what every service reports about its traffic.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from netd.records import Record

__all__ = ["Event", "Journal", "ServiceStats"]


@attrs.define(repr=False)
class ServiceStats(Record):
    """Running totals for one service; kinds add their own under C{counters} and C{gauges}."""

    connections_total: int = 0
    connections_active: int = 0
    connections_refused: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    errors: int = 0
    counters: dict[str, int] = attrs.field(factory=dict)
    gauges: dict[str, float] = attrs.field(factory=dict)

    def count(self, name: str, amount: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + amount

    def gauge(self, name: str, value: float) -> None:
        """A level rather than a total (a queue's length, say)."""
        self.gauges[name] = value

    def snapshot(self) -> dict[str, int]:
        return {
            "connections_total": self.connections_total,
            "connections_active": self.connections_active,
            "connections_refused": self.connections_refused,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "errors": self.errors,
            **self.counters,
        }


@attrs.frozen(repr=False)
class Event(Record):
    id: int
    time: float
    service: str
    type: str
    fields: Mapping[str, Any]

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "time": self.time,
            "service": self.service,
            "type": self.type,
            **self.fields,
        }


@attrs.define(repr=False)
class _Waiter(Record):
    matches: Callable[[Event], bool]
    deferred: Deferred[list[Event]]
    timer: IDelayedCall | None = None


class Journal:
    """
    A bounded, in-memory record of events from every service.

    Event ids increase by one, so C{since=ID} pages through the journal and a
    client can tell when it has fallen behind the oldest kept event.
    """

    def __init__(self, clock: IReactorTime, size: int = 10000, active: bool = True) -> None:
        self._clock = clock
        # Whether anything can read the journal (an admin API, the log).  High-rate
        # emitters (a connection's open and close) skip their events otherwise.
        self._active = active
        self._activity_watchers: list[Callable[[bool], None]] = []
        self._events: deque[Event] = deque(maxlen=size)
        self._ids = itertools.count(1)
        self._waiters: list[_Waiter] = []
        self._listeners: list[Callable[[Event], None]] = []

    @property
    def active(self) -> bool:
        return self._active

    @active.setter
    def active(self, active: bool) -> None:
        if active == self._active:
            return
        self._active = active
        for watcher in list(self._activity_watchers):
            watcher(active)

    def watch_activity(self, watcher: Callable[[bool], None]) -> None:
        """Tell C{watcher} each time L{active} changes (emitters in other processes)."""
        self._activity_watchers.append(watcher)

    def unwatch_activity(self, watcher: Callable[[bool], None]) -> None:
        self._activity_watchers.remove(watcher)

    # Copied on write, not changed in place: a listener may unsubscribe (an
    # event stream it cuts) while emit goes through the list.
    def subscribe(self, listener: Callable[[Event], None]) -> None:
        self._listeners = [*self._listeners, listener]
        self.active = True

    def unsubscribe(self, listener: Callable[[Event], None]) -> None:
        listeners = list(self._listeners)
        listeners.remove(listener)
        self._listeners = listeners

    def emit(self, service: str, type: str, **fields: Any) -> Event:
        event = Event(next(self._ids), self._clock.seconds(), service, type, fields)
        self._events.append(event)
        for listener in self._listeners:
            listener(event)
        if self._waiters:
            self._wake(event)
        return event

    def _wake(self, event: Event) -> None:
        for waiter in [w for w in self._waiters if w.matches(event)]:
            self._waiters.remove(waiter)
            if waiter.timer is not None and waiter.timer.active():
                waiter.timer.cancel()
            waiter.deferred.callback([event])

    def select(
        self,
        since: int = 0,
        service: str | None = None,
        types: Iterable[str] = (),
        namespace: str | None = None,
    ) -> list[Event]:
        matches = _matcher(since, service, types, namespace)
        return [e for e in self._events if matches(e)]

    def wait(
        self,
        timeout: float,
        since: int = 0,
        service: str | None = None,
        types: Iterable[str] = (),
        namespace: str | None = None,
    ) -> Deferred[list[Event]]:
        """Fire with the matching events, waiting up to C{timeout} seconds for the first."""
        types = tuple(types)  # read twice below: a generator would be empty the second time
        found = self.select(since, service, types, namespace)
        if found or timeout <= 0:
            return succeed(found)
        waiter = _Waiter(_matcher(since, service, types, namespace), Deferred(self._cancel))

        def expire() -> None:
            self._waiters.remove(waiter)
            waiter.deferred.callback([])

        waiter.timer = self._clock.callLater(timeout, expire)
        self._waiters.append(waiter)
        return waiter.deferred

    def end_wait(self, deferred: Deferred[list[Event]]) -> None:
        """Answer a waiting L{wait} now, with nothing: its client will not wait longer."""
        for waiter in list(self._waiters):
            if waiter.deferred is deferred:
                self._cancel(deferred)
                deferred.callback([])

    def _cancel(self, deferred: Deferred[list[Event]]) -> None:
        for waiter in list(self._waiters):
            if waiter.deferred is deferred:
                self._waiters.remove(waiter)
                if waiter.timer is not None and waiter.timer.active():
                    waiter.timer.cancel()

    def forget(self, namespace: str) -> int:
        """Drop the events of one namespace; how many went."""
        kept = [e for e in self._events if e.fields.get("namespace") != namespace]
        forgotten = len(self._events) - len(kept)
        if forgotten:
            self._events = deque(kept, maxlen=self._events.maxlen)
        return forgotten

    @property
    def last_id(self) -> int:
        return self._events[-1].id if self._events else 0


def _matcher(
    since: int, service: str | None, types: Iterable[str], namespace: str | None = None
) -> Callable[[Event], bool]:
    wanted = frozenset(types)

    def matches(event: Event) -> bool:
        return (
            event.id > since
            and (service is None or event.service == service)
            and (not wanted or event.type in wanted)
            and (namespace is None or event.fields.get("namespace") == namespace)
        )

    return matches
