"""Tests for netd.events: service counters and the event journal with its long poll."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from netd.events import Event, Journal, ServiceStats


def result_of(deferred: Deferred[Any]) -> list[Any]:
    """What C{deferred} fired with so far: [] if it has not, [result] if it has."""
    results: list[Any] = []
    deferred.addBoth(results.append)
    return results


def filled(clock: Clock) -> Journal:
    journal = Journal(clock)
    journal.emit("echo", "connection.opened", client="127.0.0.1:1")  # 1
    clock.advance(1)
    journal.emit("mail", "message.received", size=10)  # 2
    journal.emit("echo", "connection.closed", client="127.0.0.1:1")  # 3
    journal.emit("web", "request", path="/")  # 4
    return journal


def ids(events: list[Event]) -> list[int]:
    return [e.id for e in events]


# --- ServiceStats ------------------------------------------------------------------


def test_stats_snapshot_includes_kind_counters() -> None:
    stats = ServiceStats()
    stats.connections_total = 3
    stats.bytes_in = 10
    stats.count("datagrams_in")
    stats.count("datagrams_in", 4)
    assert stats.snapshot() == {
        "connections_total": 3,
        "connections_active": 0,
        "connections_refused": 0,
        "bytes_in": 10,
        "bytes_out": 0,
        "errors": 0,
        "datagrams_in": 5,
    }


# --- emit and select ---------------------------------------------------------------


def test_emit_numbers_and_times_events() -> None:
    clock = Clock()
    clock.advance(1000)
    journal = Journal(clock)
    assert journal.last_id == 0
    first = journal.emit("echo", "connection.opened", client="127.0.0.1:1", connection=7)
    clock.advance(2.5)
    second = journal.emit("echo", "connection.closed")
    assert (first.id, second.id) == (1, 2)
    assert (first.time, second.time) == (1000, 1002.5)
    assert journal.last_id == 2
    assert first.as_json() == {
        "id": 1,
        "time": 1000,
        "service": "echo",
        "type": "connection.opened",
        "client": "127.0.0.1:1",
        "connection": 7,
    }


def test_subscribers_see_every_event() -> None:
    journal = Journal(Clock())
    seen: list[Event] = []
    journal.subscribe(seen.append)
    journal.emit("echo", "a")
    journal.emit("web", "b")
    assert [(e.service, e.type) for e in seen] == [("echo", "a"), ("web", "b")]


def test_a_subscriber_leaving_during_an_event_does_not_hide_it_from_the_next() -> None:
    journal = Journal(Clock())
    seen: list[str] = []

    def once(event: Event) -> None:
        journal.unsubscribe(once)  # an event stream cut as it writes

    journal.subscribe(once)
    journal.subscribe(lambda event: seen.append(event.type))
    journal.emit("echo", "first")
    journal.emit("echo", "second")
    assert seen == ["first", "second"]


def test_select_filters() -> None:
    journal = filled(Clock())
    assert ids(journal.select()) == [1, 2, 3, 4]
    assert ids(journal.select(since=2)) == [3, 4]
    assert ids(journal.select(since=4)) == []
    assert ids(journal.select(service="echo")) == [1, 3]
    assert ids(journal.select(service="nosuch")) == []
    assert ids(journal.select(types=["request", "connection.closed"])) == [3, 4]
    assert ids(journal.select(since=1, service="echo", types=["connection.opened"])) == []
    assert ids(journal.select(since=1, service="echo", types=["connection.closed"])) == [3]


def test_select_with_types_from_a_generator() -> None:
    journal = filled(Clock())
    types: Iterator[str] = (t for t in ["request"])
    assert ids(journal.select(types=types)) == [4]


def test_journal_is_bounded_and_ids_keep_counting() -> None:
    journal = Journal(Clock(), size=3)
    for n in range(5):
        journal.emit("echo", "tick", n=n)
    assert ids(journal.select()) == [3, 4, 5]
    assert [e.fields["n"] for e in journal.select()] == [2, 3, 4]
    assert journal.last_id == 5
    assert ids(journal.select(since=1)) == [3, 4, 5]


# --- wait --------------------------------------------------------------------------


def test_wait_is_immediate_when_matches_exist() -> None:
    clock = Clock()
    journal = filled(clock)
    fired = result_of(journal.wait(30, since=1, service="echo"))
    assert [ids(r) for r in fired] == [[3]]
    assert clock.getDelayedCalls() == []


def test_wait_with_no_timeout_answers_at_once() -> None:
    clock = Clock()
    journal = filled(clock)
    assert result_of(journal.wait(0, since=4)) == [[]]
    assert clock.getDelayedCalls() == []


def test_wait_fires_on_a_later_matching_event() -> None:
    clock = Clock()
    journal = filled(clock)
    waiting = journal.wait(30, since=4, service="mail", types=["message.received"])
    fired = result_of(waiting)
    journal.emit("echo", "message.received")  # wrong service
    journal.emit("mail", "message.bounced")  # wrong type
    clock.advance(10)
    assert fired == []
    event = journal.emit("mail", "message.received", size=99)
    assert fired == [[event]]
    assert clock.getDelayedCalls() == []  # its timeout is cancelled
    clock.advance(30)
    assert fired == [[event]]


def test_wait_with_types_from_a_generator() -> None:
    clock = Clock()
    journal = filled(clock)
    fired = result_of(journal.wait(30, since=4, types=(t for t in ["request"])))
    journal.emit("web", "other")
    assert fired == []
    event = journal.emit("web", "request")
    assert fired == [[event]]


def test_wait_times_out_with_nothing() -> None:
    clock = Clock()
    journal = filled(clock)
    fired = result_of(journal.wait(30, since=4))
    clock.advance(29.9)
    assert fired == []
    clock.advance(0.1)
    assert fired == [[]]
    # The waiter is gone: a later event does not fire it twice.
    journal.emit("echo", "late")
    assert fired == [[]]


def test_several_waiters() -> None:
    clock = Clock()
    journal = filled(clock)
    echo = result_of(journal.wait(30, since=4, service="echo"))
    web = result_of(journal.wait(30, since=4, service="web"))
    anything = result_of(journal.wait(30, since=4))
    event = journal.emit("echo", "tick")
    assert echo == [[event]]
    assert anything == [[event]]
    assert web == []
    clock.advance(30)
    assert web == [[]]


def test_cancel_removes_the_waiter() -> None:
    clock = Clock()
    journal = filled(clock)
    waiting = journal.wait(30, since=4)
    fired = result_of(waiting)
    waiting.cancel()
    assert len(fired) == 1
    assert isinstance(fired[0], Failure)
    fired[0].trap(CancelledError)
    assert clock.getDelayedCalls() == []
    journal.emit("echo", "after")  # nobody left to wake
    clock.advance(60)
    assert len(fired) == 1


@pytest.mark.parametrize("timeout", [-1, 0])
def test_wait_without_time_returns_what_there_is(timeout: float) -> None:
    journal = filled(Clock())
    assert [ids(r) for r in result_of(journal.wait(timeout, since=3))] == [[4]]


def test_a_wait_ended_early_answers_nothing_and_forgets_its_timer() -> None:
    clock = Clock()
    journal = Journal(clock)
    waited = journal.wait(30, service="a")
    results: list[Any] = []
    waited.addBoth(results.append)
    journal.end_wait(waited)
    assert results == [[]] and clock.getDelayedCalls() == []
    journal.emit("a", "later")  # no waiter left to answer twice
    journal.end_wait(waited)
    assert results == [[]]
