"""
Reloads under load: HTTP clients (a new connection per request) and an SMTP
client keep going while the map is reloaded again and again with the http and
smtp services changed, and an echo connection of an unchanged service does
round trips throughout.  Counted: failed requests, SMTP sessions that failed,
mail answered 250 and then missing, echo round trips that failed.
"""

from __future__ import annotations

import smtplib
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from netd.testing import NetdProcess

from ._harness import (
    LOCAL,
    Budget,
    Daemon,
    Row,
    Sampler,
    connect,
    free_port,
    read_until_closed,
)

FAMILY = "reload under load"
MAX_PER_CLIENT = 50_000  # every load loop is bounded in count as well as by the reloads


def _config(base: Path, generation: int, ports: dict[str, int]) -> dict[str, Any]:
    # Fixed ports, as in production: a restarted service binds the same one again.
    tcp = f"tcp:0:interface={LOCAL}"
    return {
        "state_dir": str(base / "state"),
        "shutdown_grace": 2,
        "services": {
            "echo": {"type": "echo", "listen": [tcp]},
            "web": {
                "type": "http",
                "listen": [f"tcp:{ports['web']}:interface={LOCAL}"],
                "routes": [{"path": "/health", "body": f"ok {generation}\n"}],
            },
            "mail": {
                "type": "smtp",
                "listen": [f"tcp:{ports['mail']}:interface={LOCAL}"],
                "hostname": "mx.netd.test",
                "max_recipients": 50 + generation % 2,
                "max_connections_per_client": 1000,
                "relay": {"allow_from": [], "domains": ["netd.test"]},
                "delivery": {"mode": "capture"},
            },
        },
    }


class Load:
    """Client threads that run until told to stop, tallying what went wrong."""

    def __init__(self, netd: NetdProcess) -> None:
        self.netd = netd
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.tally: Counter[str] = Counter()
        self.answered: list[str] = []
        self.threads = [
            threading.Thread(target=self._http, daemon=True),
            threading.Thread(target=self._http, daemon=True),
            threading.Thread(target=self._smtp, daemon=True),
            threading.Thread(target=self._echo, daemon=True),
        ]

    def _count(self, key: str) -> None:
        with self.lock:
            self.tally[key] += 1

    def _loop(self, step: Callable[[int], str | None], kind: str) -> None:
        for number in range(MAX_PER_CLIENT):
            if self.stop.is_set():
                return
            self._count(f"{kind} tried")
            failure = step(number)
            if failure is not None:
                self._count(f"{kind} {failure}")
                # A client backs off a little; a tight retry loop would count one
                # refused moment many times over.
                time.sleep(0.01)

    def _http(self) -> None:
        def step(number: int) -> str | None:
            address = self.netd.address("web")
            try:
                with connect(address) as sock:
                    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    reply = read_until_closed(sock, 5)
            except ConnectionRefusedError:
                return "refused"
            except OSError:
                return "reset"
            return None if reply.startswith(b"HTTP/1.1 200") else "no answer"

        self._loop(step, "http")

    def _smtp(self) -> None:
        thread = threading.get_ident()

        def step(number: int) -> str | None:
            subject = f"reload {thread} {number}"
            host, port = self.netd.address("mail")
            try:
                with smtplib.SMTP(host, port, local_hostname="client.test", timeout=10) as client:
                    client.sendmail(
                        "a@client.test", ["reload@netd.test"], f"Subject: {subject}\r\n\r\nx\r\n"
                    )
                    with self.lock:
                        self.answered.append(subject)  # a 250 was read
            except (OSError, smtplib.SMTPException):
                return "failed"
            return None

        self._loop(step, "smtp")

    def _echo(self) -> None:
        with connect(self.netd.address("echo")) as sock:

            def step(number: int) -> str | None:
                try:
                    sock.sendall(b"ping %d\n" % number)
                    got = b""
                    while not got.endswith(b"\n"):
                        chunk = sock.recv(64)
                        if not chunk:
                            return "closed"
                        got += chunk
                except OSError:
                    return "reset"
                time.sleep(0.005)
                return None if got == b"ping %d\n" % number else "wrong"

            self._loop(step, "echo")

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)


def _failures(tally: Counter[str], kind: str) -> tuple[int, str]:
    parts = {key.split(" ", 1)[1]: n for key, n in tally.items() if key.startswith(kind + " ")}
    tried = parts.pop("tried", 0)
    failed = sum(parts.values())
    detail = ", ".join(f"{what} {n}" for what, n in sorted(parts.items()))
    return tried, f"failed {failed}/{tried}" + (f" ({detail})" if detail else "")


def run(base: Path, budget: Budget) -> list[Row]:
    reloads = budget.count(20, 4)
    pause = budget.seconds(0.5, 0.3)
    reload_failures = 0
    ports = {name: free_port() for name in ("web", "mail")}
    with NetdProcess.start(_config(base, 0, ports), base) as netd:
        daemon = Daemon(netd)
        sampler = Sampler(daemon)
        with Load(netd) as load:
            time.sleep(pause)  # load running before the first reload
            for generation in range(1, reloads + 1):
                try:
                    changes = netd.reload(_config(base, generation, ports))
                    if sorted(changes["restarted"]) != ["mail", "web"]:
                        reload_failures += 1
                except Exception:
                    reload_failures += 1
                time.sleep(pause)
        with load.lock:
            answered = list(load.answered)
            tally = Counter(load.tally)
        stored = Counter(str(m["subject"]) for m in netd.messages("mail"))
        lost = sum(1 for subject in answered if stored[subject] == 0)
        duplicated = sum(1 for subject in answered if stored[subject] > 1)
        rows = []
        http_tried, http_result = _failures(tally, "http")
        rows.append(Row(FAMILY, "http, changed each reload", http_tried, http_result))
        smtp_tried, smtp_result = _failures(tally, "smtp")
        smtp_result += f"; 250 then lost {lost}, duplicated {duplicated}"
        rows.append(Row(FAMILY, "smtp, changed each reload", smtp_tried, smtp_result))
        echo_tried, echo_result = _failures(tally, "echo")
        rows.append(Row(FAMILY, "echo connection, unchanged", echo_tried, echo_result))
        for row in rows:
            mail_lost = row.case.startswith("smtp") and (lost or duplicated)
            if mail_lost or not row.result.startswith("failed 0/"):
                row.verdict = "DEFECT"
        summary = Row(FAMILY, "the reloads", reloads, f"failed {reload_failures}")
        rows.append(sampler.finish(summary))
        if reload_failures:
            summary.verdict = "DEFECT"
    return rows
