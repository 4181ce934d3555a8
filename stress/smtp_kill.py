"""
kill -9 around SMTP accepts: a message is sent and the daemon killed before
the final dot, just after it (a seeded delay, reply unread) or just after the
250; the daemon restarts on the same spool and what was answered 250 must be
there (capture) or reach the smarthost (smarthost) exactly once.
"""

from __future__ import annotations

import email
import random
import socket
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller

from netd.testing import NetdProcess, StartFailed

from ._harness import LOCAL, Budget, Row, connect, smtp_reply

FAMILY = "smtp kill -9"
KILL_POINTS = ("before dot", "after dot", "after 250")


def _config(state: Path, smarthost: int | None) -> dict[str, Any]:
    mail: dict[str, Any] = {
        "type": "smtp",
        "listen": [f"tcp:0:interface={LOCAL}"],
        "hostname": "mx.netd.test",
        "relay": {"allow_from": [], "domains": ["netd.test"]},
        "delivery": {"mode": "capture"},
    }
    if smarthost is not None:
        mail["relay"]["allow_from"] = [f"{LOCAL}/32"]
        mail["delivery"] = {
            "mode": "smarthost",
            "smarthost": f"{LOCAL}:{smarthost}",
            "tls": "none",
            "retry": [0.2],
        }
    return {"state_dir": str(state), "shutdown_grace": 1, "services": {"mail": mail}}


class Sink:
    """aiosmtpd on loopback as the smarthost: counts what arrives, by subject."""

    def __init__(self) -> None:
        with socket.socket() as probe:
            probe.bind((LOCAL, 0))
            self.port: int = probe.getsockname()[1]
        self.received: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.controller = Controller(self, hostname=LOCAL, port=self.port)
        self.controller.start()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        subject = str(email.message_from_bytes(envelope.content)["Subject"])
        with self.lock:
            self.received[subject] += 1
        return "250 OK"

    def stop(self) -> None:
        self.controller.stop()


def _send_and_kill(netd: NetdProcess, rcpt: str, subject: str, point: str, delay: float) -> bool:
    """Whether the client read a 250 for the message before the daemon died."""
    answered = False
    try:
        sock = connect(netd.address("mail"))
    except OSError:
        netd.process.kill()
        netd.process.wait()
        return False
    with sock:
        stream = sock.makefile("rb")
        try:
            smtp_reply(stream)
            sock.sendall(
                f"EHLO client.test\r\nMAIL FROM:<a@client.test>\r\nRCPT TO:<{rcpt}>\r\n"
                "DATA\r\n".encode()
            )
            for _ in range(4):
                smtp_reply(stream)
            sock.sendall(f"Subject: {subject}\r\n\r\nkill trial\r\n".encode())
            if point == "before dot":
                time.sleep(delay)
                netd.process.kill()
            else:
                sock.sendall(b".\r\n")
                if point == "after dot":
                    time.sleep(delay)
                    netd.process.kill()
                sock.settimeout(3)
                answered = smtp_reply(stream).startswith(b"250")
        except OSError:
            pass
        finally:
            netd.process.kill()
            netd.process.wait()
    return answered


def _trials(mode: str, base: Path, budget: Budget) -> Row:
    rng = random.Random(f"{budget.seed}-kill-{mode}")
    trials = budget.count(36, 3)
    sink = Sink() if mode == "smarthost" else None
    config = _config(base / "state", sink.port if sink else None)
    rcpt = "kill@far.test" if sink else "kill@netd.test"
    answered: dict[str, bool] = {}
    case = f"{mode} mode, kill before/after dot/250"
    try:
        for i in range(trials):
            netd = NetdProcess.start(config, base, admin=False)
            subject = f"stress kill {mode} {i}"
            point = KILL_POINTS[i % len(KILL_POINTS)]
            # The 250 follows the dot by the spool's fsync, some 40-50 ms on this
            # machine's disk: delays up to 100 ms fall on both sides of it.
            delay = rng.uniform(0, 0.1)
            answered[subject] = _send_and_kill(netd, rcpt, subject, point, delay)
        with NetdProcess.start(config, base) as last:
            found = _final_count(last, sink)
    except StartFailed as e:
        # What a kill left behind stops the next start: the worst outcome there is.
        said = e.output.strip().splitlines()[-1:] or ["(no output)"]
        return Row(FAMILY, case, len(answered), f"restart failed: {said[0]}", verdict="DEFECT")
    finally:
        if sink is not None:
            sink.stop()
    lost = sum(1 for s, ok in answered.items() if ok and found[s] == 0)
    duplicated = sum(1 for s in answered if found[s] > 1)
    unanswered_kept = sum(1 for s, ok in answered.items() if not ok and found[s] >= 1)
    where = "delivered" if sink else "stored"
    result = (
        f"250 read {sum(answered.values())}/{trials}; lost {lost}, duplicated {duplicated}; "
        f"{where} without a 250 read {unanswered_kept}"
    )
    # A smarthost may see a message twice when the kill falls between its 250 and
    # the spool removal: at-least-once relaying, as every MTA does (RFC 1047).
    defect = bool(lost) or (bool(duplicated) and sink is None)
    return Row(FAMILY, case, trials, result, verdict=_verdict(defect, bool(duplicated)))


def _verdict(defect: bool, noted: bool) -> str:
    if defect:
        return "DEFECT"
    return "note" if noted else "ok"


def _final_count(netd: NetdProcess, sink: Sink | None) -> Counter[str]:
    if sink is None:
        return Counter(str(m["subject"]) for m in netd.messages("mail"))
    deadline = time.monotonic() + 30
    while netd.messages("mail") and time.monotonic() < deadline:
        time.sleep(0.2)
    with sink.lock:
        return Counter(sink.received)


def run(base: Path, budget: Budget) -> list[Row]:
    return [_trials(mode, base / mode, budget) for mode in ("capture", "smarthost")]
