"""
Routes added through the admin API to an http service with C{workers}: the main
process keeps them, so a worker that replaces a dead one and the workers of a
rebuilt service answer from them as the others do, and a removal reaches them all.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from netd.testing import AdminError, NetdProcess

# Requests tried before giving up on seeing every worker answer, and how many at once.
_ATTEMPTS = 400
_BURST = 8


def _map(body: str = "one", workers: int = 2) -> dict[str, Any]:
    return {
        "services": {
            "web": {
                "type": "http",
                "workers": workers,
                "listen": ["tcp:0:interface=127.0.0.1"],
                "routes": [{"path": "/body", "body": body}],
                "access_log": False,
            }
        }
    }


@pytest.fixture
def netd(tmp_path: Path) -> Iterator[NetdProcess]:
    with NetdProcess.start(_map(), tmp_path) as process:
        process.wait_for_count("web", "worker.started", 2)
        yield process


def _post(netd: NetdProcess, **route: Any) -> dict[str, Any]:
    added: dict[str, Any] = netd.admin(
        "POST", "/api/services/web/routes", json.dumps(route).encode()
    )
    return added


def workers_started(netd: NetdProcess, service: str, count: int, since: int) -> set[int]:
    """The pids of the C{count} workers of C{service} started after event C{since}."""
    deadline = time.monotonic() + 30
    started: list[dict[str, Any]] = []
    while len(started) < count:
        assert time.monotonic() < deadline, f"{len(started)} of {count} workers started"
        last = started[-1]["id"] if started else since
        started += netd.events(service, "worker.started", last, wait=5)
    return {e["worker"] for e in started[:count]}


def replace_one(netd: NetdProcess, service: str, workers: set[int]) -> set[int]:
    """Kill one of C{workers} (-9); the workers once its replacement serves."""
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    exited = netd.wait_for(service, "worker.exited", worker=victim)
    [replacement] = workers_started(netd, service, 1, exited["id"])
    return (workers - {victim}) | {replacement}


def _every_worker_answers(
    netd: NetdProcess, workers: set[int], path: str, check: Callable[[httpx.Response], None]
) -> int:
    """
    Ask C{path} in bursts of concurrent connections (one worker alone would
    take every connection of a sequential client) until each of C{workers}
    has answered, bounded in count and time; every answer passes C{check}.
    Returns how many were asked.
    """
    mark = netd.events()[-1]["id"]
    url = netd.url("web", path=path)
    deadline = time.monotonic() + 60
    asked = 0
    seen: set[int] = set()
    with ThreadPoolExecutor(_BURST) as pool:
        while asked < _ATTEMPTS and time.monotonic() < deadline:
            for response in pool.map(lambda _: httpx.get(url, timeout=10), range(_BURST)):
                check(response)
            asked += _BURST
            # Each worker journals its requests a moment after it answers them.
            seen = {e["worker"] for e in netd.events("web", "http.request", mark)}
            if seen >= workers:
                break
    assert seen >= workers, f"workers {workers - seen} never answered {asked} requests"
    return asked


def _from_the_routes(response: httpx.Response) -> None:
    assert response.status_code == 200, response.text
    assert response.json() == {"hi": 1}


def _latest_first(response: httpx.Response) -> None:
    # The later of two API routes on one path is tried first: replayed out of
    # order, a worker would answer with the earlier one.
    assert (response.status_code, response.text) == (200, "second\n")


def _not_found(response: httpx.Response) -> None:
    assert response.status_code == 404, response.text


def test_a_replaced_worker_and_a_rebuilt_service_answer_from_run_time_routes(
    netd: NetdProcess,
) -> None:
    hello = _post(netd, path="/hello", json={"hi": 1})  # the main process gives the id
    _post(netd, id="first", path="/order", body="first\n")
    _post(netd, id="second", path="/order", body="second\n")
    workers = workers_started(netd, "web", 2, 0)
    _every_worker_answers(netd, workers, "/hello", _from_the_routes)

    workers = replace_one(netd, "web", workers)
    asked = _every_worker_answers(netd, workers, "/hello", _from_the_routes)
    _every_worker_answers(netd, workers, "/order", _latest_first)

    # One entry a route, its matches summed over the live workers (the killed
    # one's went with it): the replacement started counting at 0.
    def hello_listed() -> dict[str, Any]:
        listed = [r for r in netd.view("web", "routes") if r["id"] == hello["id"]]
        assert len(listed) == 1, listed
        return listed[0]

    assert hello_listed()["source"] == "api"
    assert asked <= hello_listed()["matched"]

    last = netd.events()[-1]["id"]
    assert netd.reload(_map("two"))["restarted"] == ["web"]
    workers = workers_started(netd, "web", 2, last)
    _every_worker_answers(netd, workers, "/hello", _from_the_routes)
    _every_worker_answers(netd, workers, "/order", _latest_first)
    assert httpx.get(netd.url("web", path="/body"), timeout=10).text == "two"

    netd.admin("DELETE", f"/api/services/web/routes/{hello['id']}")
    _every_worker_answers(netd, workers, "/hello", _not_found)
    assert [r["id"] for r in netd.view("web", "routes") if r["source"] == "api"] == [
        "second",
        "first",
    ]


def test_routes_come_along_into_workers_and_out_and_bad_writes_change_nothing(
    tmp_path: Path,
) -> None:
    with NetdProcess.start(_map(workers=0), tmp_path) as netd:
        _post(netd, id="hello", path="/hello", json={"hi": 1})
        assert netd.reload(_map(workers=2))["restarted"] == ["web"]
        workers = workers_started(netd, "web", 2, 0)
        _every_worker_answers(netd, workers, "/hello", _from_the_routes)

        refused_posts: list[tuple[dict[str, Any], int]] = [
            ({"path": "no-slash", "body": "x"}, 400),
            ({"path": "/f", "body_file": "/etc/passwd"}, 400),
            ({"id": "hello", "path": "/other", "body": "x"}, 409),
        ]
        for route, status in refused_posts:
            with pytest.raises(AdminError) as refused:
                _post(netd, **route)
            assert refused.value.status == status, (route, refused.value.body)
        for route_id, status in [("routes[0]", 403), ("nothing", 404)]:
            with pytest.raises(AdminError) as refused:
                netd.admin("DELETE", f"/api/services/web/routes/{route_id}")
            assert refused.value.status == status, (route_id, refused.value.body)
        assert [r["id"] for r in netd.view("web", "routes")] == ["hello", "routes[0]"]
        _every_worker_answers(netd, workers, "/hello", _from_the_routes)

        assert netd.reload(_map(workers=0))["restarted"] == ["web"]
        _from_the_routes(httpx.get(netd.url("web", path="/hello"), timeout=10))
