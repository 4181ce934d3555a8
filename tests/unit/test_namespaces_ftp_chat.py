"""Namespaces on ftp and chat (netd.namespaces): logins, channel prefixes, folders, views."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger

from netd.config import parse_config
from netd.events import Journal, ServiceStats
from netd.kinds import BuildContext
from netd.namespaces import LoginTag, LoopbackClient, Namespacing, split_login
from netd.rules import RuleSet
from netd.services.chat import CHAT
from netd.services.chat.hub import ChannelPrefix
from netd.services.ftp import RULES as FTP_RULES
from netd.services.ftp.files import remove_namespace_folders
from tests.unit.test_chat import Chat, Client, irc_user, sasl
from tests.unit.test_ftp import Harness, send
from tests.unit.test_namespaces import errors, namespacing

LOGIN_THEN_CLIENT = Namespacing(("login", "client"), (LoginTag(), LoopbackClient()))


def test_split_login() -> None:
    assert split_login("user@t42") == ("user", "t42")
    assert split_login("User@T42") == ("User", "t42")
    assert split_login("bob@example.com@t7") == ("bob@example.com", "t7")
    assert split_login("user") == ("user", None)
    for bad in ("user@", "@t42", "user@BAD KEY!", "user@a.b", "user@" + "x" * 70):
        assert split_login(bad) is None, bad
    assert LoginTag()({"login": "user@t42"}) == "t42"
    assert LoginTag()({"login": "user@"}) is None
    assert LoginTag()({"login": None}) is None


def test_the_sources_of_ftp_and_chat_in_the_map(tmp_path: Path) -> None:
    ftp_root = "root: .\n        anonymous: read"
    assert namespacing(tmp_path, "ftp", "[login, client]", ftp_root).reads_logins
    assert not namespacing(tmp_path, "chat", "[channel_prefix, client]").reads_logins
    where = "services.svc.namespace_from"
    assert errors(
        tmp_path, "chat", "[{login: x}, channel_prefix, {channel_prefix: 1}, suffix]"
    ) == [
        (f"{where}[0].login", "'login' takes no argument"),
        (f"{where}[2].channel_prefix", "'channel_prefix' takes no argument"),
        (f"{where}[3]", "unknown namespace source 'suffix' (one of channel_prefix, login, client)"),
    ]
    assert errors(tmp_path, "ftp", "[channel_prefix]")[1:] == [
        (f"{where}[0]", "unknown namespace source 'channel_prefix' (one of login, client)")
    ]


# -- ftp ---------------------------------------------------------------------------------


def namespaced(root: Path, **options: Any) -> Harness:
    return Harness(
        root, namespaces=LOGIN_THEN_CLIENT, accounts=frozenset({"alice", "anonymous"}), **options
    )


def test_a_login_user_at_namespace_is_the_user_in_the_namespace_folder(tmp_path: Path) -> None:
    harness = namespaced(tmp_path)
    session, transport = harness.connect()
    assert send(session, transport, b"USER alice@T42", b"PASS wonderland") == [
        b"331 Password required for alice.",
        b"230 User logged in, proceed",
    ]
    assert (tmp_path / "t42").is_dir()
    assert session.shell.real_root == os.path.realpath(tmp_path / "t42")
    assert session.user == "alice" and session.describe()["namespace"] == "t42"
    [(kind, login)] = harness.events
    assert kind == "ftp.login" and login["user"] == "alice" and login["namespace"] == "t42"
    # Anonymous in a namespace, in the same folder of the anonymous root.
    guest, guest_transport = harness.connect()
    assert send(guest, guest_transport, b"USER anonymous@t42", b"PASS a@b")[-1].startswith(b"230")
    assert guest.shell.real_root == os.path.realpath(tmp_path / "t42")
    # No tag: the whole root, no namespace; a client on 127.0.0.9 has the namespace 9.
    plain, plain_transport = harness.connect()
    send(plain, plain_transport, b"USER alice", b"PASS wonderland")
    assert plain.shell.real_root == os.path.realpath(tmp_path)
    assert "namespace" not in plain.describe()
    local, local_transport = harness.connect("127.0.0.9")
    assert local.describe()["namespace"] == "9"
    send(local, local_transport, b"USER alice", b"PASS wonderland")
    assert local.shell.real_root == os.path.realpath(tmp_path / "9")


@pytest.mark.parametrize("login", [b"alice@", b"alice@BAD KEY!", b"@t42", b"alice@a.b"])
def test_an_ftp_login_naming_no_namespace_is_refused(tmp_path: Path, login: bytes) -> None:
    harness = namespaced(tmp_path)
    session, transport = harness.connect()
    [refused] = send(session, transport, b"USER " + login)
    assert refused.startswith(b"530 Not a namespace")
    assert send(session, transport, b"PASS wonderland")[0].startswith(b"503")
    assert send(session, transport, b"USER alice", b"PASS wonderland")[-1].startswith(b"230")
    assert harness.stats.counters["bad_namespaces"] == 1
    assert os.listdir(tmp_path) == []


def test_an_account_named_with_an_at_is_that_account(tmp_path: Path) -> None:
    harness = namespaced(tmp_path)
    harness.server.accounts = frozenset({"alice@example.com"})
    assert harness.server.read_login("alice@example.com") == ("alice@example.com", None)
    assert harness.server.read_login("alice@example.com@t3") == (
        "alice@example.com",
        "alice@example.com@t3",
    )
    # Without the login source, a login is an account name as it stands.
    harness.server.namespaces = Namespacing(("client",), (LoopbackClient(),))
    assert harness.server.read_login("alice@t3") == ("alice@t3", None)


def test_a_namespace_folder_that_is_a_link_is_refused(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "t42").symlink_to(outside)
    harness = namespaced(root)
    session, transport = harness.connect()
    assert send(session, transport, b"USER alice@t42", b"PASS wonderland")[-1] == (
        b"530 Login incorrect: the namespace's folder cannot be opened."
    )
    assert session.state == session.UNAUTH and session.namespace is None
    assert send(session, transport, b"USER alice", b"PASS wonderland")[-1].startswith(b"230")


def test_forgetting_a_namespace_removes_its_folders_in_writable_roots(tmp_path: Path) -> None:
    writable, read_only = tmp_path / "w", tmp_path / "r"
    for root in (writable, read_only):
        (root / "t42" / "sub").mkdir(parents=True)
        (root / "t42" / "sub" / "f").write_text("x")
        (root / "t43").mkdir()
    # A root named twice (two users sharing a home) is emptied once.
    harness = namespaced(tmp_path, writable_roots=(writable, writable))
    found: list[Any] = []
    harness.server.forget("t42").addCallback(found.append)
    assert found == [{"folders": 1}]
    assert sorted(os.listdir(writable)) == ["t43"]
    assert sorted(os.listdir(read_only)) == ["t42", "t43"]
    (writable / "t44").symlink_to(read_only)
    assert remove_namespace_folders([writable], "t44") == 0
    assert (read_only / "t42").is_dir()


def test_a_scoped_rule_fires_on_its_namespace_sessions_only(tmp_path: Path) -> None:
    rules = RuleSet("files", FTP_RULES, Clock(), Journal(Clock()))
    rules.post({"namespace": "t42", "match": {"command": "MKD"}, "reply": "550 ruled"})
    harness = namespaced(tmp_path, rules=rules)
    tagged, tagged_transport = harness.connect()
    send(tagged, tagged_transport, b"USER alice@t42", b"PASS wonderland")
    assert send(tagged, tagged_transport, b"MKD made") == [b"550 ruled"]
    other, other_transport = harness.connect()
    send(other, other_transport, b"USER alice@t43", b"PASS wonderland")
    assert send(other, other_transport, b"MKD made")[0].startswith(b"257")
    assert (tmp_path / "t43" / "made").is_dir() and not (tmp_path / "t42" / "made").exists()


# -- chat --------------------------------------------------------------------------------


def test_channel_prefix() -> None:
    prefix = ChannelPrefix()
    assert prefix({"channel": "#t42-room"}) == "t42"
    assert prefix({"channel": "T7-a-b"}) == "t7"
    for name in ("#lobby", "#-x", "#a.b-x", "#" + "x" * 70 + "-y", None):
        assert prefix({"channel": name}) is None, name
    assert prefix({"channel": ["lobby", "t1-a", "t2-b"]}) == "t1"


def namespaced_chat(
    tmp_path: Path, sources: str = "[channel_prefix, login]", *rules: dict[str, Any]
) -> Chat:
    text = (
        "services:\n  chat:\n    type: chat\n    listen: ['tcp:0']\n"
        f"    users: {{alice: {{password: wonderland}}}}\n    namespace_from: {sources}\n"
    )
    config = parse_config(text, tmp_path / "netd.yaml").services["chat"]
    clock = MemoryReactorClock()
    stats = ServiceStats()
    journal = Journal(clock)
    rule_set = RuleSet("chat", CHAT.rules, clock, journal)
    for rule in rules:
        rule_set.post(rule)
    context = BuildContext(
        reactor=clock,
        name="chat",
        state_dir=tmp_path,
        journal=journal,
        stats=stats,
        log=Logger(),
        tls={},
        rules=rule_set,
        namespaces=config.namespace_from,
    )
    return Chat(CHAT.build(config, context), clock, stats, journal)


def namespaces_of(chat: Chat, type: str) -> list[object]:
    return [event.get("namespace") for event in chat.events(type)]


def test_a_room_prefix_stamps_what_happens_in_the_room(tmp_path: Path) -> None:
    chat = namespaced_chat(tmp_path)
    ann = irc_user(chat, "ann")
    ann.send("JOIN #t42-a,#lobby", "PRIVMSG #t42-a :hi", "PRIVMSG #lobby :hello", "PRIVMSG ann :me")
    assert namespaces_of(chat, "chat.join") == ["t42", None]
    assert namespaces_of(chat, "chat.message") == ["t42", None, "t42"]
    # The session: the first of its rooms (by name) that has a namespace.
    [session] = chat.handlers.views["sessions"].list({})
    assert session["namespace"] == "t42"
    rooms = {r["room"]: r.get("namespace") for r in chat.handlers.views["rooms"].list({})}
    assert rooms == {"lobby": None, "t42-a": "t42"}
    ann.send("QUIT")
    assert namespaces_of(chat, "chat.quit") == ["t42"]


def test_a_chat_login_names_the_namespace(tmp_path: Path) -> None:
    chat = namespaced_chat(tmp_path)
    bob = chat.connect("irc")
    bob.send("NICK Bob@T7", "USER bob 0 * :Bob")
    assert bob.read()[0].startswith(":chat.netd.test 001 Bob :Welcome")
    carol = chat.connect("irc")
    carol.send("NICK carol", "USER carol@t8 0 * :Carol")
    assert carol.read()[0].startswith(":chat.netd.test 001 carol :Welcome to the netd IRC network")
    alice = chat.connect("irc")
    alice.send("CAP REQ :sasl", "NICK alice", "USER alice 0 * :Alice")
    alice.read()
    assert sasl(alice, b"\0alice@t9\0wonderland")[-1].endswith(":SASL authentication successful")
    alice.send("CAP END")
    dan = chat.connect("line")
    dan.send("/nick dan@t10")
    assert "* you are dan" in dan.read()
    assert namespaces_of(chat, "chat.login") == ["t7", "t8", "t9", "t10"]
    assert [e["account"] for e in chat.events("chat.sasl")] == ["alice"]
    # A room's prefix comes first in this service's namespace_from.
    carol.send("JOIN #t1-x", "PRIVMSG #t1-x :hi", "JOIN #other", "PRIVMSG #other :hi")
    assert namespaces_of(chat, "chat.message") == ["t1", "t8"]
    listed = {s["nick"]: s["namespace"] for s in chat.handlers.views["sessions"].list({})}
    assert listed == {"Bob": "t7", "carol": "t1", "alice": "t9", "dan": "t10"}


def test_a_chat_login_naming_no_namespace_is_refused(tmp_path: Path) -> None:
    chat = namespaced_chat(tmp_path)
    bob = chat.connect("irc")
    bob.send("NICK bob@", "NICK bob@a.b")
    assert bob.read() == [
        ":chat.netd.test 432 * bob@ :Erroneous nickname",
        ":chat.netd.test 432 * bob@a.b :Erroneous nickname",
    ]
    bob.send("NICK bob", "USER bob@ 0 * :Bob")
    assert bob.read() == [
        ":chat.netd.test 468 * bob@ :Not a namespace after '@' (letters, digits, '_', '-'):"
        " USER name@NAMESPACE"
    ]
    bob.send("USER bob 0 * :Bob")  # registration goes on, in no namespace
    assert bob.read()[0].startswith(":chat.netd.test 001 bob ")
    alice = chat.connect("irc")
    alice.send("CAP REQ :sasl")
    alice.read()
    assert sasl(alice, b"\0alice@\0wonderland") == [
        ":chat.netd.test 904 * :SASL authentication failed"
    ]
    dan = chat.connect("line")
    dan.send("/nick dan@BAD!")
    assert dan.read()[-1].startswith("* dan@BAD! is not a valid nick")
    assert namespaces_of(chat, "chat.login") == [None]


def test_without_the_login_source_an_at_is_no_login(tmp_path: Path) -> None:
    chat = namespaced_chat(tmp_path, "[channel_prefix]")
    bob = chat.connect("irc")
    bob.send("NICK bob@t7")
    assert bob.read() == [":chat.netd.test 432 * bob@t7 :Erroneous nickname"]


def test_forgetting_a_namespace_clears_its_rooms_history(tmp_path: Path) -> None:
    chat = namespaced_chat(tmp_path)
    ann: Client = irc_user(chat, "ann")
    ann.send("JOIN #t42-a,#t43-a,#lobby", *(f"PRIVMSG {r} :x" for r in ("#t42-a", "#t43-a")))
    rooms = chat.handlers.views["rooms"]
    assert rooms.forget is not None and rooms.forget("t42") == {"rooms": 1}
    history = {r["room"]: r["history"] for r in rooms.list({})}
    assert history == {"lobby": 0, "t42-a": 0, "t43-a": 1}


def test_a_scoped_chat_rule_fires_in_its_namespace_only(tmp_path: Path) -> None:
    ruled = {"namespace": "t42", "match": {"command": "JOIN"}, "numeric": "474 Banned (+b)"}
    chat = namespaced_chat(tmp_path, "[channel_prefix, login]", ruled)
    ann = irc_user(chat, "ann")
    ann.send("JOIN #t42-a")
    assert ann.read() == [":chat.netd.test 474 ann #t42-a :Banned (+b)"]
    ann.send("JOIN #t43-a")
    assert ann.read()[0].startswith(":ann!ann@192.0.2.7 JOIN")
    [fired] = chat.events("rule.fired")
    assert fired["namespace"] == "t42"
