"""
IMAP reading: the same messages fetched by imaplib from netd's smtp kind and
from Dovecot, same client, same run.

    python bench/imap_bench.py [--rounds 3] [--messages 1000] [--size 4096]

netd captures the messages over SMTP (its spool, fsync'd) and serves them on
a plain IMAP listener (`mailboxes: {any_password: true}`); Dovecot
(`dovecot-imapd`, started here with its own configuration in a temporary
folder, on loopback) serves the same messages from a Maildir written before it
starts.  Both are warmed up with one full pass (Dovecot builds its index, netd
nothing), then each round, in a rotated order, measures two cases for each
server on one fresh imaplib connection:

  bulk     one `FETCH 1:* (BODY.PEEK[])`: every message in one answer
  each     `FETCH n (BODY.PEEK[])` for n = 1..N: a round trip per message

and checks every body it gets against what was sent.  Servers run on CPU 1
and the client on CPU 0 when taskset exists.  Prints medians of the
messages a second, netd's ratio to Dovecot within each round, and the
servers' CPU seconds per 1,000 messages.
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import hashlib
import imaplib
import json
import os
import pwd
import shutil
import smtplib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from email.message import EmailMessage
from functools import partial
from pathlib import Path

import _bench
from _bench import VENV_BIN, cpu_seconds, free_port

USER = "bench@netd.test"
PASSWORD = "bench"
CASES = ("bulk", "each")


def message(number: int, size: int) -> bytes:
    mail = EmailMessage()
    mail["From"] = "sender@client.test"
    mail["To"] = USER
    mail["Subject"] = f"bench message {number}"
    mail["Message-ID"] = f"<bench.{number}@client.test>"
    line = f"message {number:06d} " + "x" * 60 + "\n"
    mail.set_content(line * max(1, size // len(line)))
    return bytes(mail).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def body_key(raw: bytes) -> str:
    """What identifies a message's content, whatever trace lines a server added."""
    body = raw.split(b"\r\n\r\n", 1)[1]
    return hashlib.sha256(body).hexdigest()


class Netd(_bench.Server):
    name = "netd"

    def __init__(self, work: Path) -> None:
        super().__init__(work)
        self.smtp_port = free_port()

    def command(self) -> list[str]:
        (self.work / "netd.yaml").write_text(
            f"state_dir: {self.work / 'state'}\n"
            "services:\n"
            "  mail:\n"
            "    type: smtp\n"
            f"    listen: ['tcp:{self.smtp_port}:interface=127.0.0.1']\n"
            "    hostname: bench.netd.test\n"
            "    relay: {domains: [netd.test]}\n"
            f"    imap: {{listen: ['tcp:{self.port}:interface=127.0.0.1']}}\n"
            "    mailboxes: {any_password: true}\n"
        )
        return [str(VENV_BIN / "twistd"), "-n", "--pidfile=", "netd", "-c", "netd.yaml"]

    def load(self, messages: list[bytes]) -> None:
        with smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=60) as client:
            for raw in messages:
                client.sendmail("sender@client.test", [USER], raw)


class Dovecot(_bench.Server):
    name = "dovecot"

    def command(self) -> list[str]:
        me = pwd.getpwuid(os.getuid()).pw_name
        # Dovecot refuses root for its login and mail processes: as root, its
        # own users and nobody's mail.
        login, internal = ("dovenull", "dovecot") if os.getuid() == 0 else (me, me)
        group = grp.getgrgid(pwd.getpwnam(internal).pw_gid).gr_name
        mail = pwd.getpwnam(_mail_user())
        home = self.work / "home"
        (self.work / "run").mkdir(exist_ok=True)
        (self.work / "dovecot.conf").write_text(
            f"""
base_dir = {self.work / "run"}
state_dir = {self.work / "state"}
log_path = {self.work / "dovecot.log"}
listen = 127.0.0.1
protocols = imap
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
mail_location = maildir:{home}/%u/Maildir
default_login_user = {login}
default_internal_user = {internal}
default_internal_group = {group}
passdb {{
  driver = static
  args = password={PASSWORD}
}}
userdb {{
  driver = static
  args = uid={mail.pw_uid} gid={mail.pw_gid} home={home}/%u
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service anvil {{
  chroot =
}}
service imap-login {{
  chroot =
}}
"""
        )
        (self.work / "state").mkdir(exist_ok=True)
        return [shutil.which("dovecot") or "dovecot", "-F", "-c", str(self.work / "dovecot.conf")]

    def load(self, messages: list[bytes]) -> None:
        maildir = self.work / "home" / USER / "Maildir"
        for folder in ("cur", "new", "tmp"):
            (maildir / folder).mkdir(parents=True, exist_ok=True)
        for number, raw in enumerate(messages, 1):
            (maildir / "cur" / f"{1700000000 + number}.M{number}P1.bench:2,").write_bytes(
                raw.replace(b"\r\n", b"\n")  # Maildir files have LF lines
            )
        mail = pwd.getpwnam(_mail_user())
        for path in [self.work / "home", *(self.work / "home").rglob("*")]:
            os.chown(path, mail.pw_uid, mail.pw_gid)


def _mail_user() -> str:
    return "nobody" if os.getuid() == 0 else pwd.getpwuid(os.getuid()).pw_name


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its live descendants (Dovecot's imap processes)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    family = {pid}
    grew = True
    while grew:
        grown = family | {child for child, parent in parents.items() if parent in family}
        grew, family = grown != family, grown
    total = 0.0
    for member in family:
        with contextlib.suppress(OSError):  # gone meanwhile
            total += cpu_seconds(member)
    return total


def fetch_bulk(port: int, expected: list[str], cpu: Callable[[], float]) -> tuple[float, float]:
    client = imaplib.IMAP4("127.0.0.1", port, timeout=120)
    client.login(USER, PASSWORD)
    client.select("INBOX", readonly=True)
    before = cpu()
    started = time.perf_counter()
    status, data = client.fetch(f"1:{len(expected)}", "(BODY.PEEK[])")
    elapsed = time.perf_counter() - started
    used = cpu() - before
    assert status == "OK", (status, data)
    got = [body_key(part[1]) for part in data if isinstance(part, tuple)]
    client.logout()
    check(got, expected)
    return elapsed, used


def fetch_each(port: int, expected: list[str], cpu: Callable[[], float]) -> tuple[float, float]:
    client = imaplib.IMAP4("127.0.0.1", port, timeout=120)
    client.login(USER, PASSWORD)
    client.select("INBOX", readonly=True)
    got = []
    before = cpu()
    started = time.perf_counter()
    for number in range(1, len(expected) + 1):
        status, data = client.fetch(str(number), "(BODY.PEEK[])")
        assert status == "OK", (status, data)
        part = data[0]
        assert isinstance(part, tuple)
        got.append(body_key(part[1]))
    elapsed = time.perf_counter() - started
    used = cpu() - before
    client.logout()
    check(got, expected)
    return elapsed, used


def check(got: list[str], expected: list[str]) -> None:
    if got != expected:
        raise SystemExit(f"wrong messages: {len(got)} fetched, {len(expected)} expected")


def run(args: argparse.Namespace) -> dict[str, object]:
    if shutil.which("dovecot") is None:
        raise SystemExit("needs Dovecot: apt-get install dovecot-imapd")
    messages = [message(n, args.size) for n in range(1, args.messages + 1)]
    # Dovecot stores LF lines and serves CRLF: compare bodies in CRLF form.
    expected = [body_key(raw) for raw in messages]
    fetchers: dict[str, Callable[[int, list[str], Callable[[], float]], tuple[float, float]]] = {
        "bulk": fetch_bulk,
        "each": fetch_each,
    }
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="imap-bench-") as scratch:
        os.chmod(scratch, 0o755)  # Dovecot's login user reaches its sockets in there
        servers: list[_bench.Server] = []
        try:
            for kind in (Netd, Dovecot):
                work = Path(scratch) / kind.name
                work.mkdir()
                server = kind(work)
                if isinstance(server, Dovecot):
                    server.load(messages)
                # Stopped below even if it never comes up (wait_for exits).
                servers.append(server)
                server.start()
            for server in servers:
                if isinstance(server, Netd):
                    server.load(messages)
                # Warm up: Dovecot builds its index here.
                fetch_bulk(server.port, expected, lambda: 0.0)
            for round in range(args.rounds):
                order = servers[round % 2 :] + servers[: round % 2]
                for case in CASES:
                    for server in order:
                        seconds, cpu = fetchers[case](
                            server.port, expected, partial(tree_cpu, server.pid)
                        )
                        rows.append(
                            {
                                "round": round,
                                "case": case,
                                "server": server.name,
                                "seconds": seconds,
                                "rate": len(expected) / seconds,
                                "cpu_per_1000": cpu * 1000 / len(expected),
                            }
                        )
                        print(
                            f"round {round} {case:4} {server.name:7} "
                            f"{len(expected) / seconds:8.0f} msgs/s",
                            file=sys.stderr,
                        )
        finally:
            for server in servers:
                if server.process is not None:
                    server.stop()
    return {"messages": args.messages, "size": args.size, "rows": rows}


def report(result: dict[str, object]) -> str:
    rows = result["rows"]
    assert isinstance(rows, list)
    lines = [
        f"{result['messages']} messages of ~{result['size']} bytes",
        "| case | netd msgs/s | Dovecot msgs/s | netd / Dovecot (per round) | CPU s per 1,000 "
        "(netd / Dovecot) |",
        "|---|---|---|---|---|",
    ]
    for case in CASES:

        def of(server: str, key: str, case: str = case) -> list[float]:
            return [r[key] for r in rows if r["case"] == case and r["server"] == server]

        ratios = [n / d for n, d in zip(of("netd", "rate"), of("dovecot", "rate"), strict=True)]
        lines.append(
            f"| {case} | {statistics.median(of('netd', 'rate')):.0f} "
            f"| {statistics.median(of('dovecot', 'rate')):.0f} "
            f"| {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) "
            f"| {statistics.median(of('netd', 'cpu_per_1000')):.2f} / "
            f"{statistics.median(of('dovecot', 'cpu_per_1000')):.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, choices=range(1, 21), metavar="N")
    parser.add_argument(
        "--messages", type=int, default=1000, choices=range(1, 100_001), metavar="N"
    )
    parser.add_argument(
        "--size", type=int, default=4096, choices=range(100, 1_000_001), metavar="BYTES"
    )
    parser.add_argument("--json", type=Path, help="also write the raw rows here")
    args = parser.parse_args()
    result = run(args)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    print(report(result))


if __name__ == "__main__":
    main()
