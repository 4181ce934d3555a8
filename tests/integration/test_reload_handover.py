"""
A reload that restarts a changed service hands its bound sockets to the
replacement: clients connecting all through the reload meet no refusal and no
reset, and a port 0 listener keeps its port.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
import time
from pathlib import Path

import dns.message
import dns.query

from netd.testing import NetdProcess
from tests.signals import wait_until

_RELOADS = 12


def _map(generation: int) -> dict[str, object]:
    return {
        "services": {
            "web": {
                "type": "http",
                "listen": ["tcp:0:interface=127.0.0.1"],
                "routes": [{"path": "/gen", "status": 200, "body": f"{generation}"}],
            },
            "dns": {
                "type": "dns",
                "listen": ["udp:0:interface=127.0.0.1"],
                "records": {"gen.test": {"TXT": [f"g{generation}"]}},
            },
            "echo": {
                "type": "echo",
                "listen": ["tcp:0:interface=127.0.0.1"],
                "idle_timeout": 30 + generation,
            },
        }
    }


class _Load(threading.Thread):
    """Requests in a loop until told to stop; remembers every failure."""

    def __init__(self, ask: object) -> None:
        super().__init__(daemon=True)
        self.ask = ask
        self.done = threading.Event()
        self.answers: list[str] = []
        self.failures: list[BaseException] = []

    def run(self) -> None:
        deadline = time.monotonic() + 60
        while not self.done.is_set() and time.monotonic() < deadline:
            try:
                self.answers.append(self.ask())  # type: ignore[operator]
            except Exception as e:
                self.failures.append(e)


def test_reloads_under_load_refuse_and_reset_nothing(tmp_path: Path) -> None:
    with NetdProcess.start(_map(0), tmp_path) as netd:
        web = netd.address("web")
        dns_address = netd.address("dns", "udp")
        echo = netd.address("echo")

        def get() -> str:
            client = http.client.HTTPConnection(*web, timeout=5)
            try:
                client.request("GET", "/gen")
                return client.getresponse().read().decode()
            finally:
                client.close()

        def query() -> str:
            reply = dns.query.udp(
                dns.message.make_query("gen.test", "TXT"),
                dns_address[0],
                port=dns_address[1],
                timeout=2,
            )
            return reply.answer[0][0].to_text()

        def echoed() -> str:
            with socket.create_connection(echo, timeout=5) as sock:
                sock.sendall(b"ping")
                return sock.recv(4).decode()

        loads = [_Load(get), _Load(query), _Load(echoed)]
        for load in loads:
            load.start()
        for generation in range(1, _RELOADS + 1):
            result = netd.reload(_map(generation))
            assert sorted(result["restarted"]) == ["dns", "echo", "web"]
        for load in loads:
            # The answer in flight as the last reload returned may be the old
            # generation's; the one after it began once the reload was done.
            settled = len(load.answers) + 2
            wait_until(lambda load=load, settled=settled: len(load.answers) >= settled, "answers")
            load.done.set()
            load.join()

        assert netd.address("web") == web and netd.address("dns", "udp") == dns_address
        assert netd.address("echo") == echo
        for load in loads:
            assert load.failures == [], (load.ask, len(load.failures), load.failures[:3])
            assert len(load.answers) > _RELOADS
        assert loads[0].answers[-1] == str(_RELOADS)
        assert loads[1].answers[-1] == f'"g{_RELOADS}"'


def test_a_tls_listener_keeps_its_socket_and_takes_the_new_certificate(tmp_path: Path) -> None:
    def tls_map(names: list[str]) -> dict[str, object]:
        return {
            "tls": {"lab": {"self_signed": [*names, "127.0.0.1"]}},
            "services": {
                "echo": {
                    "type": "echo",
                    "listen": [{"endpoint": "ssl:0:interface=127.0.0.1", "tls": "lab"}],
                }
            },
        }

    def names_seen(netd: NetdProcess) -> list[str]:
        context = ssl.create_default_context(cafile=str(netd.ca_file("lab")))
        address = netd.address("echo", tls=True)
        with (
            socket.create_connection(address, timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as sock,
        ):
            sock.sendall(b"ping")
            assert sock.recv(4) == b"ping"
            cert = sock.getpeercert()
        return [value for kind, value in cert["subjectAltName"] if kind == "DNS"]

    with NetdProcess.start(tls_map(["localhost"]), tmp_path) as netd:
        before = netd.address("echo", tls=True)
        assert names_seen(netd) == ["localhost"]
        assert netd.reload(tls_map(["localhost", "new.test"]))["restarted"] == ["echo"]
        assert netd.address("echo", tls=True) == before
        assert names_seen(netd) == ["localhost", "new.test"]
