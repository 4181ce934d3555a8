"""
Records set through the admin API on a dns service with C{workers}: the main
process keeps them, so a worker that replaces a dead one and the workers of a
rebuilt service answer from them as the others do, and going back to the map
reaches every worker, those started later included.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import dns.rdatatype
import pytest

from netd.testing import NetdProcess
from tests.integration.test_http_routes_workers import replace_one, workers_started

RECORDS = "/api/services/dns/records"
# Queries tried before giving up on seeing every worker answer, and how many at once.
_ATTEMPTS = 400
_BURST = 8


def _map(ttl: int = 60) -> dict[str, Any]:
    return {
        "services": {
            "dns": {
                "type": "dns",
                "workers": 2,
                "listen": ["udp:0:interface=127.0.0.1"],
                "ttl": ttl,
                "records": {
                    "live.test": {"SOA": ["ns.live.test hostmaster.live.test 1 3600 600 86400 30"]},
                    "www.live.test": {"A": ["10.0.0.1"]},
                },
                "query_log": True,
            }
        }
    }


@pytest.fixture
def netd(tmp_path: Path) -> Any:
    with NetdProcess.start(_map(), tmp_path) as process:
        process.wait_for_count("dns", "worker.started", 2)
        yield process


def every_worker_answers(
    netd: NetdProcess, workers: set[int], name: str, expected: list[str]
) -> int:
    """
    Ask C{name} in bursts of concurrent queries (the kernel gives each datagram
    to a waiting worker: a sequential client may only ever meet one) until each
    of C{workers} has answered it, bounded in count and time; every answer is
    C{expected} (its addresses; [] for none).  Returns how many were asked.
    """
    mark = netd.events()[-1]["id"]
    host, port = netd.address("dns", "udp")
    query = dns.message.make_query(name, dns.rdatatype.A)

    def ask(_: int) -> list[str]:
        reply = dns.query.udp(query, host, port=port, timeout=5)
        return sorted(rr.to_text() for rrset in reply.answer for rr in rrset)

    seen: set[int] = set()
    deadline = time.monotonic() + 60
    asked = 0
    with ThreadPoolExecutor(_BURST) as pool:
        while asked < _ATTEMPTS and time.monotonic() < deadline:
            assert list(pool.map(ask, range(_BURST))) == [expected] * _BURST
            asked += _BURST
            # Each worker journals its queries a moment after it answers them.
            events = netd.events("dns", "query", mark)
            seen = {e["worker"] for e in events if e["name"] == name + "."}
            if seen >= workers:
                break
    assert seen >= workers, f"workers {workers - seen} never answered {name} in {asked} queries"
    return asked


def _send(netd: NetdProcess, method: str, path: str, body: object = None) -> Any:
    return netd.admin(method, RECORDS + path, None if body is None else json.dumps(body).encode())


def test_a_replaced_worker_and_a_rebuilt_service_answer_from_live_records(
    netd: NetdProcess,
) -> None:
    _send(netd, "PUT", "/new.live.test/A", {"values": ["10.0.0.9"]})
    _send(netd, "PUT", "/www.live.test/A", {"values": ["10.0.0.2"]})
    workers = workers_started(netd, "dns", 2, 0)
    every_worker_answers(netd, workers, "new.live.test", ["10.0.0.9"])
    # Journaled once, by the main process: each worker's copy of the write is
    # quiet. Every worker's queries since are in the journal, so its events
    # about the write, sent before them on the same channel, would be too.
    journaled = [e for e in netd.events("dns", "record") if e["name"] == "new.live.test"]
    assert [e.get("worker") for e in journaled] == [None]

    workers = replace_one(netd, "dns", workers)
    every_worker_answers(netd, workers, "new.live.test", ["10.0.0.9"])
    every_worker_answers(netd, workers, "www.live.test", ["10.0.0.2"])
    # The view lists what the main process holds: each set once.
    listed = [s for s in _send(netd, "GET", "") if s["live"]]
    assert [(s["name"], s["values"]) for s in listed if s["type"] == "A"] == [
        ("new.live.test", ["10.0.0.9"]),
        ("www.live.test", ["10.0.0.2"]),
    ]

    last = netd.events()[-1]["id"]
    assert netd.reload(_map(ttl=30))["restarted"] == ["dns"]
    workers = workers_started(netd, "dns", 2, last)
    every_worker_answers(netd, workers, "new.live.test", ["10.0.0.9"])

    # Back to the map: every worker, and one started after, answers from it.
    assert _send(netd, "DELETE", "")["reverted"] >= 2
    every_worker_answers(netd, workers, "www.live.test", ["10.0.0.1"])
    workers = replace_one(netd, "dns", workers)
    every_worker_answers(netd, workers, "www.live.test", ["10.0.0.1"])
    every_worker_answers(netd, workers, "new.live.test", [])
