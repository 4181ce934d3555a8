"""
C{workers: N}: worker processes answer on the sockets the main process bound;
one that dies is replaced; reload and SIGTERM reach each; the admin API sums them.
"""

from __future__ import annotations

import http.client
import json
import os
import pwd
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from netd.testing import AdminError, NetdProcess, twistd_command
from tests.integration.test_dns_live_workers import every_worker_answers
from tests.integration.test_graceful import upstream
from tests.integration.test_privileges import low_port, workdir
from tests.integration.test_systemd import (
    connect_when_listening,
    echo_over_both,
    free_port,
    needs_socket_activate,
    socket_activated,
)
from tests.signals import wait_until

__all__ = ["upstream", "workdir"]  # fixtures shared with test_graceful and test_privileges

_ATTEMPTS = 200  # connections tried before giving up on seeing every worker answer
_BURST = 8


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
    """Whether C{pid} runs (a zombie, exited and not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def test_workers_answer_on_one_port_and_counters_sum(tmp_path: Path) -> None:
    with NetdProcess.start(_map(), tmp_path) as netd:
        workers = _started(netd, "web", 2)
        assert len(workers) == 2 and netd.process.pid not in workers
        web = netd.address("web")
        # In bursts of concurrent requests: the kernel wakes one waiting worker
        # per connection, and a sequential client may only ever meet the first.
        made = 0
        deadline = time.monotonic() + 30
        with ThreadPoolExecutor(_BURST) as pool:
            while made < _ATTEMPTS and time.monotonic() < deadline:
                assert list(pool.map(lambda _: _get(web), range(_BURST))) == ["one"] * _BURST
                made += _BURST
                if _worker_pids(netd, "web", "http.request") == workers:
                    break
        assert _worker_pids(netd, "web", "http.request") == workers

        # The dns workers start on their own; until both have, one answers everything.
        dns_workers = _started(netd, "dns", 2)
        asked = every_worker_answers(netd, dns_workers, "www.netd.test", ["127.0.0.7"])

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


def test_sigterm_lets_a_workers_exchange_in_progress_finish(
    upstream: tuple[int, threading.Event, threading.Event], tmp_path: Path
) -> None:
    port, arrived, release = upstream
    slow = {"path": "/slow", "proxy": f"http://127.0.0.1:{port}/slow", "timeout": 10}
    netd = NetdProcess.start(
        {
            "shutdown_grace": 10,
            "services": {
                "web": {
                    "type": "http",
                    "workers": 2,
                    "listen": ["tcp:0:interface=127.0.0.1"],
                    "routes": [slow],
                }
            },
        },
        tmp_path,
    )
    host, web_port = netd.address("web")
    client = http.client.HTTPConnection(host, web_port, timeout=15)
    client.request("GET", "/slow")
    assert arrived.wait(10), "the request never reached the upstream"
    netd.signal(signal.SIGTERM)
    # Every worker, and the main process, let go of the listening socket.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, web_port), timeout=1).close()
        except (ConnectionRefusedError, ConnectionResetError):
            break
        except TimeoutError:
            continue  # queued in a backlog nobody accepts from any more
    else:
        pytest.fail("netd still accepts connections after SIGTERM")
    release.set()
    response = client.getresponse()
    assert (response.status, response.read()) == (200, b"worth the wait")
    assert netd.stop() == 0


def test_workers_of_a_main_process_gone_finish_and_exit(tmp_path: Path) -> None:
    netd = NetdProcess.start(_map(), tmp_path)
    workers = _started(netd, "web", 2) | _started(netd, "dns", 2)
    netd.process.kill()
    netd.process.wait()
    for pid in workers:
        wait_until(lambda pid=pid: not _alive(pid), f"worker {pid} gone")
    netd.stop()


def test_workers_restore_the_listeners_of_a_service_moved_back(tmp_path: Path) -> None:
    with NetdProcess.start(_map(workers=2), tmp_path) as netd:
        web = netd.address("web")
        _started(netd, "web", 2)
        netd.reload(_map(workers=0))
        assert netd.address("web") == web
        assert _get(web) == "one"
        assert netd.admin("GET", "/api/services/web").get("workers") is None


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue  # gone meanwhile
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry.name))
    return found


PRIVILEGED = """
state_dir: state
shutdown_grace: 2
tls:
  lab: {{self_signed: [localhost, 127.0.0.1]}}
services:
  echo:
    type: echo
    workers: 2
    listen:
      - "tcp:{port}:interface=127.0.0.1"
      - "udp:{port}:interface=127.0.0.1"
      - {{endpoint: "ssl:0:interface=127.0.0.1", tls: lab}}
"""


def _anyone_can_run(program: str) -> bool:
    """Whether a user of no group of the file can run it (nobody starting a worker)."""
    path = Path(program).resolve()
    return bool(path.stat().st_mode & stat.S_IXOTH) and all(
        folder.stat().st_mode & stat.S_IXOTH for folder in path.parents
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="binding below 1024 needs root")
@pytest.mark.skipif(
    not _anyone_can_run(sys.executable), reason="nobody may not run this Python (under /root?)"
)
def test_workers_serve_a_privileged_port_as_the_user_twistd_becomes(workdir: Path) -> None:
    port = low_port()
    (workdir / "netd.yaml").write_text(PRIVILEGED.format(port=port))
    command = [
        *twistd_command(),
        *("--nodaemon", "--pidfile=", "--uid", "nobody", "--gid", "nogroup"),
        *("netd", "-c", "netd.yaml", "--ports-file", "ports.json"),
    ]
    log = workdir / "netd.log"
    with log.open("wb") as output:
        process = subprocess.Popen(command, cwd=workdir, stdout=output, stderr=subprocess.STDOUT)
    try:
        wait_until((workdir / "ports.json").exists, "ports file", process=process, log=log)
        workers = _children(process.pid)
        assert len(workers) == 2
        nobody = str(pwd.getpwnam("nobody").pw_uid)
        for pid in workers:
            status = Path(f"/proc/{pid}/status").read_text()
            [uid] = [line.split()[1:] for line in status.splitlines() if line.startswith("Uid:")]
            assert uid == [nobody] * 4
        with socket.create_connection(("127.0.0.1", port), timeout=5) as tcp:
            tcp.sendall(b"low port")
            assert tcp.recv(100) == b"low port"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.settimeout(5)
            udp.sendto(b"low udp", ("127.0.0.1", port))
            assert udp.recvfrom(100) == (b"low udp", ("127.0.0.1", port))
        ports = json.loads((workdir / "ports.json").read_text())
        [tls_port] = [e["port"] for e in ports["services"]["echo"]["listeners"] if e["tls"]]
        context = ssl.create_default_context(cafile=str(workdir / "state/tls/lab-ca.pem"))
        raw = socket.create_connection(("127.0.0.1", tls_port), timeout=5)
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"secret")
            assert tls.recv(100) == b"secret"
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    assert process.returncode == 0, log.read_text()


ACTIVATED_WORKERS = """
shutdown_grace: 2
services:
  echo:
    type: echo
    workers: 2
    listen: ["systemd:domain=INET:name=echo", "systemd-udp:domain=INET:name=echo"]
    idle_timeout: {idle}
"""


@needs_socket_activate
def test_workers_serve_systemd_sockets_across_a_reload(tmp_path: Path) -> None:
    port = free_port()
    workdir = tmp_path / "run"
    process = socket_activated(workdir, ACTIVATED_WORKERS.format(idle=60), port)
    log = workdir / "netd.log"
    try:
        first = connect_when_listening(process, port)
        echo_over_both(port, first)  # the first connection waited in systemd's socket
        wait_until((workdir / "ports.json").exists, "ports file", process=process, log=log)
        assert len(_children(process.pid)) == 2
        (workdir / "netd.yaml").write_text(ACTIVATED_WORKERS.format(idle=30))
        process.send_signal(signal.SIGHUP)
        wait_until(lambda: "restarted ['echo']" in log.read_text(), "reload", process=process)
        echo_over_both(port)
        wait_until(
            lambda: log.read_text().count("stopped, exited with status 0") == 2, "old workers"
        )
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    assert process.returncode == 0, log.read_text()


def test_a_failed_reload_gives_the_workers_their_listener_back(tmp_path: Path) -> None:
    port, taken = free_port(), socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    web = _map()["services"]["web"]
    with (
        taken,
        NetdProcess.start(
            {"services": {"web": {**web, "listen": [f"tcp:{port}:interface=127.0.0.1"]}}}, tmp_path
        ) as netd,
    ):
        old = _started(netd, "web", 2)
        # Another string for the same port cannot take the socket over: the old
        # listener lets go first, then the taken port fails the whole reload.
        listen = [f"tcp:{port}", f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1"]
        with pytest.raises(AdminError) as refused:
            netd.reload({"services": {"web": {**web, "listen": listen}}})
        assert "Address already in use" in refused.value.body
        assert _get(("127.0.0.1", port)) == "one"
        for pid in old:
            netd.wait_for("web", "worker.stopped", worker=pid)
        assert len(_started(netd, "web", 4) - old) == 2


def test_a_reload_that_adds_an_admin_api_journals_what_running_workers_do(
    tmp_path: Path,
) -> None:
    web = _map()["services"]["web"]
    with NetdProcess.start({"services": {"web": web}}, tmp_path, admin=False) as started:
        ports = tmp_path / "ports.json"
        assert "admin" not in json.loads(ports.read_text())
        admin = {"listen": ["tcp:0:interface=127.0.0.1"]}
        # JSON is YAML; the service is unchanged, so its workers keep running.
        started.workdir.joinpath("netd.yaml").write_text(
            json.dumps({"services": {"web": web}, "admin": admin})
        )
        started.signal(signal.SIGHUP)
        wait_until(lambda: "admin" in json.loads(ports.read_text()), "the admin API")
        netd = NetdProcess.attach(tmp_path)
        [reload] = netd.events("netd", "reload")
        assert reload["unchanged"] == ["web"]
        assert _get(started.address("web")) == "one"
        request = netd.wait_for("web", "http.request", path="/body")
        assert request["worker"] != started.process.pid
