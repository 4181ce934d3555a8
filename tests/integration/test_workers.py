"""
C{workers: N}: worker processes answer on the sockets the main process bound;
one that dies is replaced; reload and SIGTERM reach each; the admin API sums them.
"""

from __future__ import annotations

import http.client
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import dns.rdatatype

from netd.testing import NetdProcess
from tests.signals import wait_until

_ATTEMPTS = 200  # connections tried before giving up on seeing every worker answer


def _map(body: str = "one", workers: int = 2) -> dict[str, Any]:
    return {
        "services": {
            "web": {
                "type": "http",
                "workers": workers,
                "listen": ["tcp:0:interface=127.0.0.1"],
                "routes": [{"path": "/body", "status": 200, "body": body}],
                "access_log": False,
            },
            "dns": {
                "type": "dns",
                "workers": workers,
                "listen": ["udp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.1"],
                "records": {"www.netd.test": {"A": ["127.0.0.7"]}},
                "query_log": True,
            },
        }
    }


def _get(address: tuple[str, int], path: str = "/body") -> str:
    client = http.client.HTTPConnection(*address, timeout=10)
    try:
        client.request("GET", path)
        return client.getresponse().read().decode()
    finally:
        client.close()


def _worker_pids(netd: NetdProcess, service: str, type: str, since: int = 0) -> set[int]:
    return {e["worker"] for e in netd.events(service, type, since) if "worker" in e}


def _started(netd: NetdProcess, service: str, count: int, since: int = 0) -> set[int]:
    events = netd.wait_for_count(service, "worker.started", count)
    return {e["worker"] for e in events if e["id"] > since}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_workers_answer_on_one_port_and_counters_sum(tmp_path: Path) -> None:
    with NetdProcess.start(_map(), tmp_path) as netd:
        workers = _started(netd, "web", 2)
        assert len(workers) == 2 and netd.process.pid not in workers
        web = netd.address("web")
        made = 0
        deadline = time.monotonic() + 30
        while made < _ATTEMPTS and time.monotonic() < deadline:
            assert _get(web) == "one"
            made += 1
            if made % 10 == 0 and _worker_pids(netd, "web", "http.request") == workers:
                break
        assert _worker_pids(netd, "web", "http.request") == workers

        dns_address = netd.address("dns", "udp")
        asked = 0
        while asked < _ATTEMPTS and time.monotonic() < deadline:
            query = dns.message.make_query("www.netd.test", dns.rdatatype.A)
            answer = dns.query.udp(query, dns_address[0], port=dns_address[1], timeout=5)
            assert answer.answer[0][0].address == "127.0.0.7"
            asked += 1
            if asked % 10 == 0 and len(_worker_pids(netd, "dns", "query")) == 2:
                break
        assert len(_worker_pids(netd, "dns", "query")) == 2

        # Each worker reports its counters a moment after they change.
        def described() -> dict[str, Any]:
            found: dict[str, Any] = netd.admin("GET", "/api/services/web")
            return found

        wait_until(
            lambda: described()["counters"].get("requests") == made, f"{made} requests counted"
        )
        workers_seen = described()["workers"]
        per_worker = {w["pid"]: w["counters"]["requests"] for w in workers_seen}
        assert set(per_worker) == workers
        assert sum(per_worker.values()) == made and all(per_worker.values())
        metrics = netd.admin("GET", "/metrics").decode()
        assert f'netd_requests_total{{service="web",type="http"}} {float(made)}' in metrics
        queries = netd.queries("dns")
        assert len(queries) == asked  # the view asks every worker and joins their logs


def test_a_killed_worker_is_replaced_and_nothing_else_is_refused(tmp_path: Path) -> None:
    with NetdProcess.start(_map(), tmp_path) as netd:
        first = _started(netd, "web", 2)
        web = netd.address("web")
        answers: list[str] = []
        failures: list[BaseException] = []
        done = threading.Event()

        def load() -> None:
            deadline = time.monotonic() + 60
            while not done.is_set() and time.monotonic() < deadline:
                try:
                    answers.append(_get(web))
                except Exception as e:
                    failures.append(e)

        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        try:
            wait_until(lambda: len(answers) >= 5, "requests answered before the kill")
            victim = min(first)
            os.kill(victim, signal.SIGKILL)
            exited = netd.wait_for("web", "worker.exited", worker=victim)
            assert exited["reason"] == "killed by signal 9"
            wait_until(
                lambda: netd.events("web", "worker.started", since=exited["id"]),
                "a worker in the killed one's place",
            )
            replacement = netd.events("web", "worker.started", since=exited["id"])[0]
            counted = len(answers)
            wait_until(lambda: len(answers) >= counted + 20, "requests after the replacement")
        finally:
            done.set()
            loader.join(30)
        # One sequential client: the killed worker held at most its one connection.
        assert len(failures) <= 1, failures
        assert not any(isinstance(f, ConnectionRefusedError) for f in failures)
        assert replacement["worker"] not in first and _alive(replacement["worker"])
        assert not _alive(victim)


def test_reload_restarts_every_worker_of_a_changed_service(tmp_path: Path) -> None:
    with NetdProcess.start(_map("one"), tmp_path) as netd:
        old = _started(netd, "web", 2)
        last = netd.events()[-1]["id"]
        result = netd.reload(_map("two"))
        assert result["restarted"] == ["web"] and "dns" in result["unchanged"]
        # The reload answers once the old workers stopped accepting.
        assert all(_get(netd.address("web")) == "two" for _ in range(20))
        for pid in old:
            stopped = netd.wait_for("web", "worker.stopped", worker=pid)
            assert stopped["reason"] == "exited with status 0"
        new = {e["worker"] for e in netd.events("web", "worker.started", since=last)}
        assert len(new) == 2 and not new & old


def test_sigterm_stops_every_worker_gracefully(tmp_path: Path) -> None:
    netd = NetdProcess.start(_map(), tmp_path)
    web_workers = _started(netd, "web", 2)
    dns_workers = _started(netd, "dns", 2)
    assert _get(netd.address("web")) == "one"
    assert netd.stop() == 0
    for pid in web_workers | dns_workers:
        assert not _alive(pid)
        assert f"worker {pid} stopped, exited with status 0" in netd.output


def test_workers_restore_the_listeners_of_a_service_moved_back(tmp_path: Path) -> None:
    with NetdProcess.start(_map(workers=2), tmp_path) as netd:
        web = netd.address("web")
        _started(netd, "web", 2)
        netd.reload(_map(workers=0))
        assert netd.address("web") == web
        assert _get(web) == "one"
        assert netd.admin("GET", "/api/services/web").get("workers") is None
