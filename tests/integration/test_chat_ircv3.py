"""
IRCv3 in the real daemon: capability negotiation and SASL as irssi and WeeChat
send them (their lines recorded below), tags, echoes and history batches seen
through the C{irc} library and raw sockets.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator

import bcrypt
import pytest

from netd.testing import NetdProcess
from tests.integration.test_chat import Bots, Raw

TIME_TAG = re.compile(r"@time=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z[; ]")


@pytest.fixture(scope="module")
def netd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetdProcess]:
    hashed = bcrypt.hashpw(b"weechat-pw", bcrypt.gensalt(4)).decode()
    config = f"""
state_dir: state
admin: {{listen: ["tcp:0:interface=127.0.0.1"]}}
services:
  chat:
    type: chat
    listen: ["tcp:0:interface=127.0.0.1", {{endpoint: "tcp:0:interface=127.0.0.1", protocol: line}}]
    rooms: [lobby]
    history: 5
    flood: {{messages: 100, per_seconds: 1}}
    users:
      irssi: {{password: irssi-pw}}
      wee: {{password: "{hashed}"}}
"""
    process = NetdProcess.start(config, tmp_path_factory.mktemp("netd"))
    yield process
    process.stop()


def plain(account: str, password: str) -> str:
    return base64.b64encode(f"{account}\0{account}\0{password}".encode()).decode()


def test_weechat_negotiates_caps_and_logs_in_with_a_hashed_password(netd: NetdProcess) -> None:
    client = Raw(netd, "irc")
    # WeeChat 4 on connect, then its REQ of what it supports among what is offered.
    client.send("CAP LS 302", "NICK wee", "USER weechat 0 * :WeeChat 4.1.1")
    offered = client.expect(" CAP * LS ")
    assert offered.endswith(
        ":away-notify batch echo-message message-tags multi-prefix sasl=PLAIN server-time"
    )
    client.send(
        "CAP REQ :away-notify batch echo-message message-tags multi-prefix server-time sasl"
    )
    assert client.expect(" ACK ").endswith(
        "CAP * ACK :away-notify batch echo-message message-tags multi-prefix server-time sasl"
    )
    client.send("AUTHENTICATE PLAIN")
    client.expect("AUTHENTICATE +")
    client.send(f"AUTHENTICATE {plain('wee', 'weechat-pw')}")
    logged_in = client.expect(" 900 ")
    assert logged_in.endswith(" wee!weechat@127.0.0.1 wee :You are now logged in as wee")
    assert TIME_TAG.match(logged_in)
    client.expect(" 903 ")
    client.send("CAP END")
    assert TIME_TAG.match(client.expect(" 001 wee "))
    assert netd.events("chat", "chat.sasl")[-1]["account"] == "wee"
    client.close()


def test_irssi_with_a_wrong_then_a_right_password(netd: NetdProcess) -> None:
    client = Raw(netd, "irc")
    # irssi 1.4 with SASL PLAIN set up for the network.
    client.send("CAP LS 302", "NICK irssi", "USER irssi irssi 127.0.0.1 :Irssi User")
    client.expect(" CAP * LS ")
    client.send("CAP REQ :multi-prefix away-notify server-time sasl")
    client.expect(" ACK ")
    client.send("AUTHENTICATE PLAIN")
    client.expect("AUTHENTICATE +")
    client.send(f"AUTHENTICATE {plain('irssi', 'guess')}")
    client.expect(" 904 ")
    client.send("AUTHENTICATE PLAIN")
    client.expect("AUTHENTICATE +")
    client.send(f"AUTHENTICATE {plain('irssi', 'irssi-pw')}")
    client.expect(" 903 ")
    client.send("CAP END")
    client.expect(" 001 irssi ")
    client.send("JOIN #lobby")
    client.expect(" 366 ")
    client.close()


def test_tags_echo_and_history_batch_with_the_irc_library(netd: NetdProcess) -> None:
    bots = Bots(netd)
    modern = bots.connect("modern")
    old = bots.connect("old")
    modern.cap("REQ", "server-time", "message-tags", "echo-message")
    bots.wait("modern", "cap")
    for bot in (modern, old):
        bot.join("#tags")
        bots.wait(bot.get_nickname(), "endofnames")
    old.privmsg("#tags", "from the old client")
    event = bots.wait("modern", "pubmsg", "from the old client")
    assert event.tags is not None and [t["key"] for t in event.tags] == ["time"]
    modern.send_raw("@+example.org/flag=1 PRIVMSG #tags :tagged")
    echoed = bots.wait("modern", "pubmsg", "tagged")  # echo-message: its own line back
    assert echoed.source.nick == "modern"
    assert {t["key"]: t["value"] for t in echoed.tags} == {
        "time": echoed.tags[0]["value"],
        "+example.org/flag": "1",
    }
    received = bots.wait("old", "pubmsg", "tagged")
    assert not received.tags  # the old client asked for no tags
    for n in range(3):
        old.privmsg("#tags", f"history {n}")
    bots.wait("modern", "pubmsg", "history 2")
    late = Raw(netd, "irc")
    late.send("CAP LS 302", "NICK late", "USER late 0 * :Late")
    late.expect(" LS ")
    late.send("CAP REQ :batch server-time", "CAP END", "JOIN #tags")
    start = late.expect("BATCH +")
    batch = start.split("BATCH +")[1].split()[0]
    assert start.endswith(" chathistory #tags")
    replayed = [late.expect(f"batch={batch}") for _ in range(5)]
    assert [line.rsplit(":", 1)[1] for line in replayed] == [
        "from the old client",
        "tagged",
        "history 0",
        "history 1",
        "history 2",
    ]
    assert all(TIME_TAG.match(line) for line in replayed)
    assert late.expect("BATCH -").endswith(f"BATCH -{batch}")
    late.close()
    for bot in (modern, old):
        bot.disconnect()
