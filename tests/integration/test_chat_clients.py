"""
The chat kind driven by IRC clients nobody here wrote, from Debian: suckless'
ii (commands into its FIFOs, what it shows read from its files), sic (stdin
and stdout) and WeeChat headless (its FIFO plugin in, its logs out).  They
register (NICK/USER, PASS, CAP LS 302 with SASL PLAIN over TLS), take
another nick on a collision, share a room, set its topic, parse NAMES, WHO
and WHOIS, talk in UTF-8 in rooms and in private, split a long message to
fit 512 bytes, answer netd's pings, part and quit with a reason.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from netd.testing import NetdProcess
from tests.integration.test_chat import Raw
from tests.integration.test_mail_clients import tool
from tests.maps import lab_map
from tests.signals import wait_until


@pytest.fixture(scope="module")
def netd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetdProcess]:
    # strict: PASS, and a ping a second that must be answered within one.
    services = """
  chat:
    type: chat
    listen: ["tcp:0:interface=127.0.0.1", {endpoint: "ssl:0:interface=127.0.0.1", tls: lab}]
    server_name: chat.netd.test
    motd: "welcome, clients"
    history: 0
    users: {wee: {password: wee-pw}}
    flood: {messages: 100, per_seconds: 1}
  strict: {type: chat, listen: ["tcp:0:interface=127.0.0.1"], password: s3cret,
           ping_interval: 1, ping_timeout: 1}
"""
    with NetdProcess.start(lab_map(services), tmp_path_factory.mktemp("netd")) as process:
        yield process


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class Fifos:
    """
    The FIFOs a client reads commands from, each held open for writing while
    the client runs: ii reopens a FIFO whose writer closed, and a line written
    by the next writer before it did was lost with the old one.
    """

    def __init__(self) -> None:
        self.open: dict[Path, int] = {}

    def write(self, fifo: Path, line: str) -> None:
        if fifo not in self.open:
            wait_until(fifo.exists, f"the FIFO {fifo}")
            self.open[fifo] = os.open(fifo, os.O_WRONLY)
        os.write(self.open[fifo], line.encode() + b"\n")

    def close(self) -> None:
        for fd in self.open.values():
            os.close(fd)


class Ii:
    """One ii: a directory per server, room and private talk, each with C{in} and C{out}."""

    def __init__(
        self, netd: NetdProcess, base: Path, nick: str, name: str = "", service: str = "chat"
    ) -> None:
        host, port = netd.address(service)
        home = base / (name or nick)
        self.server = home / host
        self.fifos = Fifos()
        command = [tool("ii"), "-s", host, "-p", str(port), "-i", str(home), "-n", nick]
        self.process = subprocess.Popen(
            [*command, "-f", f"{nick.title()} ✓"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def send(self, line: str, where: str = "") -> None:
        """C{line} typed into the server's window, or a room's or a private talk's."""
        self.fifos.write(self.server / where / "in", line)

    def shown(self, where: str = "") -> list[str]:
        """What ii shows in a window, without the time of each line."""
        out = self.server / where / "out"
        text = out.read_text() if out.exists() else ""
        return [line.partition(" ")[2] for line in text.splitlines()]

    def expect(self, line: str, where: str = "") -> None:
        wait_until(lambda: line in self.shown(where), f"{line!r} in ii's {where or 'server'}")

    def stop(self) -> None:
        stop(self.process)
        self.fifos.close()


class WeeChat:
    """WeeChat headless: commands through its FIFO plugin, what it shows in its logs."""

    def __init__(self, home: Path, *setup: str) -> None:
        home.mkdir()
        # Only what the test needs, and WeeChat's pacing of its own lines off.
        (home / "weechat.conf").write_text('[plugin]\nautoload = "irc,logger,fifo"\n')
        self.home = home
        self.fifos = Fifos()
        commands = [
            "/set logger.file.flush_delay 0",
            f"/set fifo.file.path {home / 'fifo'}",
            "/set irc.server_default.anti_flood_prio_high 0",
            "/set irc.server_default.anti_flood_prio_low 0",
            "/set irc.server_default.username wee",
            "/set irc.server_default.realname WeeChat ✓",
            *setup,
        ]
        self.process = subprocess.Popen(
            [tool("weechat-headless"), "--dir", str(home), "--run-command", ";".join(commands)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def send(self, buffer: str, line: str) -> None:
        """C{line} typed into a buffer (C{irc.server.netd}, C{irc.netd.#room})."""
        self.fifos.write(self.home / "fifo", f"{buffer} *{line}")

    def shown(self, buffer: str) -> list[str]:
        """A buffer's lines as its log holds them, prefix TAB message, without the time."""
        log = self.home / "logs" / f"{buffer}.weechatlog"
        text = log.read_text() if log.exists() else ""
        return [line.partition("\t")[2] for line in text.splitlines()]

    def expect(self, buffer: str, line: str) -> None:
        wait_until(lambda: line in self.shown(buffer), f"{line!r} in WeeChat's {buffer}")

    def stop(self) -> None:
        stop(self.process)
        self.fifos.close()


Client = TypeVar("Client", Ii, WeeChat)


@pytest.fixture
def keep() -> Iterator[Callable[[Client], Client]]:
    """Stops each client it is given at the end of the test."""
    started: list[Ii | WeeChat] = []

    def started_client(client: Client) -> Client:
        started.append(client)
        return client

    yield started_client
    for client in started:
        client.stop()


def test_ii_users_share_a_room(
    netd: NetdProcess, tmp_path: Path, keep: Callable[[Client], Client]
) -> None:
    alice = keep(Ii(netd, tmp_path, "alice"))
    alice.expect("Welcome to the netd IRC network alice!alice@127.0.0.1")
    alice.expect("- welcome, clients")
    alice.send("/j #ii-room")
    netd.wait_for("chat", "chat.join", nick="alice", room="ii-room")
    bob = keep(Ii(netd, tmp_path, "bob"))
    bob.send("/j #ii-room")
    alice.expect("-!- bob(bob@127.0.0.1) has joined #ii-room", "#ii-room")
    bob.send("grüße ✓ wörld", "#ii-room")
    alice.expect("<bob> grüße ✓ wörld", "#ii-room")
    alice.send("/t topic ✓ of the day", "#ii-room")
    bob.expect('-!- alice changed topic to "topic ✓ of the day"', "#ii-room")
    bob.send("/names #ii-room")
    bob.expect("= #ii-room @alice bob")
    bob.send("/WHO #ii-room")
    bob.expect("#ii-room alice 127.0.0.1 chat.netd.test alice H@ 0 Alice ✓")
    bob.expect("#ii-room bob 127.0.0.1 chat.netd.test bob H 0 Bob ✓")
    alice.send("/j bob psst ✓")
    bob.expect("<alice> psst ✓", "alice")
    bob.send("/l", "#ii-room")
    alice.expect("-!- bob(bob@127.0.0.1) has left #ii-room", "#ii-room")
    bob.send("/j #ii-room")
    joined = "-!- bob(bob@127.0.0.1) has joined #ii-room"
    wait_until(lambda: alice.shown("#ii-room").count(joined) == 2, "bob back in #ii-room")
    alice.send("/q gone fishing ✓")
    bob.expect('-!- alice(alice@127.0.0.1) has quit "Quit: gone fishing ✓"')
    assert alice.process.wait(timeout=5) == 0


def test_ii_takes_another_nick_after_a_collision(
    netd: NetdProcess, tmp_path: Path, keep: Callable[[Client], Client]
) -> None:
    first = keep(Ii(netd, tmp_path, "carol"))
    first.expect("End of MOTD command")
    second = keep(Ii(netd, tmp_path, "carol", name="second"))
    second.expect("carol Nickname is already in use")
    second.send("/n carol_")
    second.expect("Welcome to the netd IRC network carol_!carol@127.0.0.1")
    assert sorted(s["nick"] for s in netd.sessions("chat") if "carol" in s["nick"]) == [
        "carol",
        "carol_",
    ]


def test_sic_with_the_password_answers_netds_pings(netd: NetdProcess) -> None:
    host, port = netd.address("strict")
    sic = subprocess.Popen(
        [tool("sic"), "-h", host, "-p", str(port), "-n", "dave", "-k", "s3cret"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert sic.stdin is not None and sic.stdout is not None
    try:
        netd.wait_for("strict", "chat.login", nick="dave")
        # A client that never answers, registered after sic: by the time
        # netd drops it, sic has been pinged as long, and has answered.
        silent = Raw(netd, "irc", "strict")
        silent.send("PASS s3cret", "NICK mute", "USER mute 0 * :Mute")
        silent.expect(" 001 mute ")
        dropped = netd.wait_for("strict", "chat.quit", nick="mute")
        assert dropped["reason"] == "Ping timeout: 2 seconds"
        silent.close()
        # One line at a time: sic selects on its input, then reads one line
        # through stdio, and a second line read into stdio's buffer with it
        # waits for more input.
        sic.stdin.write(b":j #sic-room\n")
        sic.stdin.flush()
        netd.wait_for("strict", "chat.join", nick="dave", room="sic-room")
        sic.stdin.write("hello from sic ✓\n".encode())
        sic.stdin.flush()
        said = netd.wait_for("strict", "chat.message", nick="dave")
        assert (said["room"], said["text"]) == ("sic-room", "hello from sic ✓")
        assert [e["nick"] for e in netd.events("strict", "chat.quit")] == ["mute"]
    finally:
        sic.stdin.close()  # sic quits at the end of its input
        shown = sic.stdout.read().decode()
        stop(sic)

    assert "001 (dave): Welcome to the netd IRC network dave!dave@127.0.0.1" in shown
    assert "<dave> hello from sic ✓" in shown


def test_weechat_logs_in_with_sasl_over_tls(
    netd: NetdProcess, tmp_path: Path, keep: Callable[[Client], Client]
) -> None:
    erin = keep(Ii(netd, tmp_path, "erin"))
    erin.send("/j #wee-room")
    netd.wait_for("chat", "chat.join", nick="erin", room="wee-room")
    host, port = netd.address("chat", tls=True)
    wee = keep(
        WeeChat(
            tmp_path / "weechat",
            f"/set weechat.network.gnutls_ca_user {netd.ca_file('lab')}",
            f"/server add netd {host}/{port} -ssl -autojoin=#wee-room",
            "/set irc.server.netd.nicks wee",
            "/set irc.server.netd.sasl_username wee",
            "/set irc.server.netd.sasl_password wee-pw",
            "/connect netd",
        )
    )
    server = "irc.server.netd"
    wee.expect(server, "--\tgnutls: peer's certificate is trusted")
    wee.expect(
        server,
        "--\tirc: client capability, server supports: "
        "away-notify batch echo-message message-tags multi-prefix sasl=PLAIN server-time",
    )
    wee.expect(server, "--\tYou are now logged in as wee (wee!wee@127.0.0.1)")
    wee.expect(server, "--\tSASL authentication successful")
    room = "irc.netd.#wee-room"
    wee.expect(room, "--\tChannel #wee-room: 2 nicks (1 op, 0 voices, 1 normal)")
    erin.expect("-!- wee(wee@127.0.0.1) has joined #wee-room", "#wee-room")
    erin.send("grüße ✓", "#wee-room")
    wee.expect(room, "@erin\tgrüße ✓")
    wee.send(server, "/whois erin")
    wee.expect(server, "--\t[erin] (erin@127.0.0.1): Erin ✓")
    wee.expect(server, "--\t[erin] @#wee-room")
    wee.send(server, "/who #wee-room")
    wee.expect(server, "--\t[#wee-room] wee (wee@127.0.0.1) H 0 (WeeChat ✓)")
    # WeeChat splits what does not fit 512 bytes with its prefix, at spaces.
    long = " ".join(f"{n:04d}é✓" for n in range(150))
    wee.send(room, long)

    def pieces() -> list[str]:
        return [line.removeprefix("<wee> ") for line in erin.shown("#wee-room") if "é✓" in line]

    wait_until(lambda: pieces() and pieces()[-1].endswith(" 0149é✓"), "the last piece")
    pieces = pieces()
    assert len(pieces) > 1 and " ".join(pieces) == long
    wee.send(server, "/quit bye ✓")
    erin.expect('-!- wee(wee@127.0.0.1) has quit "Quit: bye ✓"')
    assert wee.process.wait(timeout=5) == 0
    # WeeChat's errors and what it could not parse (005 among them) say =!=.
    assert [line for line in wee.shown(server) if line.startswith("=!=")] == []


def test_weechat_takes_its_next_nick_while_negotiating(
    netd: NetdProcess, tmp_path: Path, keep: Callable[[Client], Client]
) -> None:
    frank = keep(Ii(netd, tmp_path, "frank"))
    frank.expect("End of MOTD command")
    host, port = netd.address("chat")
    wee = keep(
        WeeChat(
            tmp_path / "weechat",
            f"/server add netd {host}/{port}",
            "/set irc.server.netd.nicks frank,frank_w",
            "/connect netd",
        )
    )
    server = "irc.server.netd"
    wee.expect(server, '--\tirc: nickname "frank" is already in use, trying nickname "frank_w"')
    wee.expect(server, "--\tWelcome to the netd IRC network frank_w!wee@127.0.0.1")
    wee.expect(server, "--\tEnd of MOTD command")
    assert [line for line in wee.shown(server) if line.startswith("=!=")] == []
