"""
Namespaces on ftp and chat in the real daemon: ftplib logging in as
C{user@t42}, IRC clients in C{#t42-*} rooms, each namespace seeing its own.
"""

from __future__ import annotations

import ftplib
import io
from pathlib import Path

import pytest

from netd.testing import NetdProcess
from tests.conftest import StartNetd
from tests.integration.test_chat import Raw


@pytest.fixture
def files(start_netd: StartNetd, tmp_path: Path) -> NetdProcess:
    (tmp_path / "alice").mkdir()
    (tmp_path / "pub").mkdir()
    return start_netd(
        f"""
services:
  files:
    type: ftp
    listen: ["tcp:0:interface=127.0.0.1"]
    root: {tmp_path / "pub"}
    anonymous: read
    users: {{alice: {{password: wonderland, home: {tmp_path / "alice"}, write: true}}}}
    login_delay: 0
    namespace_from: [login, client]
"""
    )


def ftp_login(netd: NetdProcess, user: str, password: str = "wonderland") -> ftplib.FTP:
    client = ftplib.FTP()
    client.connect(*netd.address("files"), timeout=10)
    client.login(user, password)
    return client


def test_each_ftp_namespace_has_its_own_folder_and_sessions(
    files: NetdProcess, tmp_path: Path
) -> None:
    red, blue = files.namespace("red"), files.namespace("blue")
    with ftp_login(files, "alice@red") as alice_red, ftp_login(files, "alice@blue") as alice_blue:
        alice_red.storbinary("STOR report.txt", io.BytesIO(b"red's\n"))
        assert alice_red.nlst() == ["report.txt"]
        assert alice_blue.nlst() == []
        with pytest.raises(ftplib.error_perm, match=r"^550"):
            alice_blue.retrbinary("RETR report.txt", lambda data: None)
        # Each namespace's sessions view lists its own session only.
        [red_session] = red.sessions("files")
        assert (red_session["user"], red_session["namespace"]) == ("alice", "red")
        assert [s["namespace"] for s in blue.sessions("files")] == ["blue"]
        assert len(files.sessions("files")) == 2
        # Anonymous in a namespace reads that namespace's folder of its root.
        with ftp_login(files, "anonymous@red", "guest@") as guest:
            assert guest.nlst() == []
    assert (tmp_path / "alice" / "red" / "report.txt").read_bytes() == b"red's\n"
    red_transfers = red.events("files", "ftp.transfer")
    assert sorted(t["direction"] for t in red_transfers) == ["listing", "listing", "upload"]
    assert {t["namespace"] for t in red_transfers} == {"red"}
    assert [t["direction"] for t in blue.events("files", "ftp.transfer")] == ["listing"]
    assert {e["namespace"] for e in red.events("files", "ftp.login")} == {"red"}
    # Forgetting red removes red's folder of the writable home, and its events.
    answer = red.reset()
    assert answer["services"]["files"]["sessions"] == {"folders": 1}
    assert sorted(p.name for p in (tmp_path / "alice").iterdir()) == ["blue"]
    assert red.events("files") == [] and blue.events("files", "ftp.login")


def test_a_login_naming_no_namespace_is_refused_and_ftp_serves_on(
    files: NetdProcess, tmp_path: Path
) -> None:
    for login in ("alice@", "alice@BAD KEY!", "@t42"):
        client = ftplib.FTP()
        client.connect(*files.address("files"), timeout=10)
        with client, pytest.raises(ftplib.error_perm, match=r"^530 Not a namespace"):
            client.login(login, "wonderland")
    with ftp_login(files, "alice") as alice:
        # No namespace: the whole home, which holds no folder made by the refusals.
        assert alice.nlst() == []
    assert files.view("files", "sessions") == []


@pytest.fixture
def chat(start_netd: StartNetd) -> NetdProcess:
    return start_netd(
        """
services:
  chat:
    type: chat
    listen: ["tcp:0:interface=127.0.0.1"]
    namespace_from: [channel_prefix, login, client]
"""
    )


def irc_user(netd: NetdProcess, nick: str, user: str = "user") -> Raw:
    client = Raw(netd, "irc")
    client.send(f"NICK {nick}", f"USER {user} 0 * :Someone")
    client.expect(" 001 ")
    return client


def test_each_chat_namespace_sees_its_rooms_sessions_and_events(chat: NetdProcess) -> None:
    t42, t43 = chat.namespace("t42"), chat.namespace("t43")
    ann, bob = irc_user(chat, "ann"), irc_user(chat, "bob@t43")
    try:
        ann.send("JOIN #t42-a", "PRIVMSG #t42-a :hello from t42")
        bob.send("JOIN #lobby", "PRIVMSG #lobby :hello from t43")
        said = t42.wait_for("chat", "chat.message")
        assert (said["room"], said["text"], said["namespace"]) == ("t42-a", "hello from t42", "t42")
        assert t43.wait_for("chat", "chat.message")["text"] == "hello from t43"
        assert [e["text"] for e in t42.events("chat", "chat.message")] == ["hello from t42"]
        assert [e["nick"] for e in t43.events("chat", "chat.login")] == ["bob"]
        [joined] = t42.wait_for_count("chat", "chat.join", 1)
        assert (joined["nick"], joined["room"]) == ("ann", "t42-a")
        assert [s["nick"] for s in t42.sessions("chat")] == ["ann"]
        assert [s["nick"] for s in t43.sessions("chat")] == ["bob"]
        assert [r["room"] for r in t42.view("chat", "rooms")] == ["t42-a"]
        # Forgetting t42: its rooms' history and events go, t43's stay.
        assert t42.reset()["services"]["chat"]["rooms"] == {"rooms": 1}
        assert t42.view("chat", "rooms")[0]["history"] == 0
        assert t42.events("chat") == [] and t43.events("chat", "chat.message")
    finally:
        ann.close()
        bob.close()


def test_a_chat_login_naming_no_namespace_is_refused_and_chat_serves_on(
    chat: NetdProcess,
) -> None:
    carol = Raw(chat, "irc")
    try:
        carol.send("NICK carol@", "NICK carol@BAD!")
        assert carol.expect(" 432 ").endswith("carol@ :Erroneous nickname")
        assert carol.expect(" 432 ").endswith("carol@BAD! :Erroneous nickname")
        carol.send("NICK carol", "USER carol@ 0 * :Carol")
        assert " 468 * carol@ :Not a namespace" in carol.expect(" 468 ")
        carol.send("USER carol 0 * :Carol", "JOIN #t9-x")
        carol.expect(" 001 carol ")
        assert chat.namespace("t9").wait_for("chat", "chat.join")["nick"] == "carol"
    finally:
        carol.close()


def test_the_scenarios_of_one_namespace(chat: NetdProcess) -> None:
    t42 = chat.namespace("t42")
    t42.scenario("signup", "mailed")
    chat.namespace("t43").scenario("signup", "started")
    chat.scenario("global", "on")
    assert t42.scenarios() == {"signup": "mailed"}
    assert chat.scenarios(namespace="t43") == {"signup@t43": "started"}
    assert len(chat.scenarios()) == 3
