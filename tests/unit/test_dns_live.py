"""
Live record changes without sockets: the changes over the map, serials, what a
reload carries over, the persist file's writer on a fake thread.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.names import dns

from netd.kinds import ViewRefused
from netd.schema import ConfigErrors
from netd.services.dns.data import parse_rdata
from netd.services.dns.live import Records, RecordSet, RecordsService, Saver, records_view
from netd.services.dns.local import LocalData
from netd.services.dns.wire import name_to_wire

SOA = parse_rdata(dns.SOA, "ns.z.test hostmaster.z.test 7 3600 600 86400 30", None)
WWW = name_to_wire("www.z.test")
ZONE = name_to_wire("z.test")
MAP = [
    (ZONE, dns.SOA, 60, SOA),
    (WWW, dns.A, 60, bytes([10, 0, 0, 1])),
]


def a(*addresses: str, ttl: int = 60) -> RecordSet:
    return ttl, tuple(parse_rdata(dns.A, address, None) for address in addresses)


def serial(records: Records) -> int:
    found = records.get(ZONE, dns.SOA)
    assert found is not None
    return int.from_bytes(found[1][0][-20:-16], "big")


def make(
    configured: list[tuple[bytes, int, int, bytes]] = MAP,
    carried: dict[str, Any] | None = None,
    saver: Saver | None = None,
) -> tuple[Records, list[dict[str, Any]], list[LocalData]]:
    events: list[dict[str, Any]] = []
    built: list[LocalData] = []

    def emit(type: str, **fields: Any) -> None:
        events.append({"type": type, **fields})

    records = Records(configured, 30, {} if carried is None else carried, built.append, emit, saver)
    return records, events, built


def test_a_change_is_answered_and_bumps_the_serial_once() -> None:
    records, events, built = make()
    done = records.commit([((WWW, dns.A), a("10.0.0.2", "10.0.0.3"))], "admin")
    assert [key for key, _ in done] == [(WWW, dns.A), (ZONE, dns.SOA)]
    assert built == [records.local]
    answer = records.local.answer(WWW, dns.A)
    assert answer is not None and answer.an == 2
    assert serial(records) == 8
    assert [(e["action"], e["rtype"]) for e in events] == [("set", "A"), ("set", "SOA")]
    assert events[0]["values"] == ["10.0.0.2", "10.0.0.3"]


def test_a_change_to_what_is_already_there_changes_nothing() -> None:
    records, events, built = make()
    assert records.commit([((WWW, dns.A), a("10.0.0.1"))], "admin") == []
    assert (events, built, serial(records)) == ([], [], 7)


def test_setting_the_soa_itself_is_not_bumped_again() -> None:
    records, _, _ = make()
    new_soa = parse_rdata(dns.SOA, "ns.z.test hostmaster.z.test 100 3600 600 86400 30", None)
    records.commit([((ZONE, dns.SOA), (60, (new_soa,)))], "admin")
    assert serial(records) == 100


def test_a_new_name_outside_every_zone_is_a_zone_of_its_own() -> None:
    records, _, _ = make()
    other = name_to_wire("host.other.test")
    records.commit([((other, dns.A), a("10.9.0.1"))], "update")
    assert records.local.zone_of(other) == other
    # Its made-up SOA is bumped like any other: 1 becomes 2.
    soa = records.get(other, dns.SOA)
    assert soa is not None and int.from_bytes(soa[1][0][-20:-16], "big") == 2


def test_removing_the_last_name_of_a_made_up_zone_does_not_fail() -> None:
    records, _, _ = make([(WWW, dns.A, 60, bytes([10, 0, 0, 1]))])
    done = records.commit([((WWW, dns.A), None)], "admin")
    assert done[0] == ((WWW, dns.A), None)
    assert records.get(WWW, dns.A) is None


def test_a_reload_carries_changes_and_the_map_wins_where_it_changed() -> None:
    carried: dict[str, Any] = {}
    old, _, _ = make(carried=carried)
    RecordsService(old).startService()
    new_name = name_to_wire("new.z.test")
    old.commit([((WWW, dns.A), a("10.0.0.5")), ((new_name, dns.A), a("10.0.0.6"))], "admin")
    assert serial(old) == 8
    # The new map changed www and the SOA's TTL, not new.z.test.
    new_map = [
        (ZONE, dns.SOA, 120, SOA),
        (WWW, dns.A, 60, bytes([10, 0, 0, 7])),
    ]
    new, _, _ = make(new_map, carried)
    assert new.get(WWW, dns.A) == a("10.0.0.7")
    assert new.get(new_name, dns.A) == a("10.0.0.6")
    soa = new.get(ZONE, dns.SOA)
    assert soa is not None and soa[0] == 120 and serial(new) == 8


def test_a_replacement_not_yet_started_does_not_publish() -> None:
    carried: dict[str, Any] = {}
    old, _, _ = make(carried=carried)
    RecordsService(old).startService()
    make(carried=carried)  # built for a reload that then failed to bind
    old.commit([((WWW, dns.A), a("10.0.0.5"))], "admin")
    again, _, _ = make(carried=carried)
    assert again.get(WWW, dns.A) == a("10.0.0.5")


def test_revert_goes_back_to_the_map() -> None:
    records, events, _ = make()
    records.commit([((WWW, dns.A), None)], "admin")
    assert records.revert() == 2
    assert records.get(WWW, dns.A) == a("10.0.0.1") and serial(records) == 7
    assert events[-1] == {"type": "record", "action": "revert", "source": "admin", "count": 2}


class FakeThread:
    """Runs nothing until told: each call's work and its Deferred, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[[], None], Deferred[None]]] = []

    def __call__(self, work: Callable[[], None]) -> Deferred[None]:
        done: Deferred[None] = Deferred()
        self.calls.append((work, done))
        return done

    def finish(self) -> None:
        work, done = self.calls.pop(0)
        work()
        done.callback(None)


def test_saver_writes_one_at_a_time_and_only_the_newest(tmp_path: Path) -> None:
    thread = FakeThread()
    path = tmp_path / "live.json"
    saver = Saver(path, thread, Logger())
    records, _, _ = make(saver=saver)
    service = RecordsService(records)
    service.startService()
    records.commit([((WWW, dns.A), a("10.0.0.2"))], "admin")
    records.commit([((WWW, dns.A), a("10.0.0.3"))], "admin")
    records.commit([((WWW, dns.A), a("10.0.0.4"))], "admin")
    assert len(thread.calls) == 1
    stopped = service.stopService()
    assert isinstance(stopped, Deferred)
    thread.finish()
    assert len(thread.calls) == 1  # the newest of the two waiting, once
    assert not stopped.called
    thread.finish()
    assert stopped.called
    changes = json.loads(path.read_text())["changes"]
    assert [(c["name"], c["type"]) for c in changes] == [("www.z.test", "A"), ("z.test", "SOA")]
    assert changes[0]["values"] == ["10.0.0.4"]
    # A new start reads the file back.
    again, _, _ = make(saver=Saver(path, thread, Logger()))
    assert again.get(WWW, dns.A) == a("10.0.0.4") and serial(again) == 10


def test_the_view_refuses_bad_writes_with_paths() -> None:
    records, _, _ = make()
    view = records_view(records, 60)
    assert view.put is not None and view.remove is not None and view.post is not None
    with pytest.raises(ConfigErrors) as refused:
        view.put("www.z.test/A", {"values": ["10.0.0.1", "x"], "ttl": "long"})
    assert [e.path for e in refused.value.errors] == ["ttl", "values[1]"]
    with pytest.raises(ConfigErrors):
        view.post({"type": "A", "values": ["10.0.0.1"]})
    with pytest.raises(ViewRefused) as soa:
        view.remove("z.test/SOA")
    assert soa.value.status == 409
    with pytest.raises(ViewRefused) as deep:
        view.put("www.z.test/A/more", {"values": ["10.0.0.1"]})
    assert deep.value.status == 404
    assert view.remove("nothing.z.test") is None
    assert serial(records) == 7
