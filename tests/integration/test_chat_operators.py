"""
Channel operators in the real daemon: modes, kicks, invitations and bans as the
C{irc} library and Twisted's IRCClient see them, and as line users read them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, protocol
from twisted.internet import reactor as global_reactor
from twisted.internet.threads import deferToThread
from twisted.words.protocols.irc import IRCClient

from netd.testing import NetdProcess
from tests.integration.test_chat import Bots, Raw, line_user, port


@pytest.fixture(scope="module")
def netd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetdProcess]:
    config = """
state_dir: state
admin: {listen: ["tcp:0:interface=127.0.0.1"]}
services:
  chat:
    type: chat
    listen: ["tcp:0:interface=127.0.0.1", {endpoint: "tcp:0:interface=127.0.0.1", protocol: line}]
    rooms: [lobby]
    flood: {messages: 100, per_seconds: 1}
"""
    process = NetdProcess.start(config, tmp_path_factory.mktemp("netd"))
    yield process
    process.stop()


def test_an_operator_runs_a_channel_with_the_irc_library(netd: NetdProcess) -> None:
    bots = Bots(netd)
    alice = bots.connect("alice")
    bob = bots.connect("bob")
    alice.join("#ops")
    names = bots.wait("alice", "namreply")
    assert names.arguments[2] == "@alice"  # the first joiner is operator
    bob.join("#ops")
    bots.wait("bob", "endofnames")
    carol = line_user(netd, "carol", "ops")
    bob.topic("#ops", "bob's topic")
    bots.wait("bob", "chanoprivsneeded")
    alice.mode("#ops", "+v bob")
    mode = bots.wait("bob", "mode")
    assert (mode.source.nick, mode.arguments) == ("alice", ["+v", "bob"])
    assert carol.expect("alice set #ops") == "* alice set #ops: bob has a voice"
    alice.who("#ops")
    flags = {}
    for _ in range(3):
        reply = bots.wait("alice", "whoreply")
        flags[reply.arguments[4]] = reply.arguments[5]
    assert flags == {"alice": "H@", "bob": "H+", "carol": "H"}
    alice.mode("#ops", "+b carol")
    bots.wait("alice", "mode", "carol!*@*")
    carol.send("can you hear me?")
    assert "cannot talk in #ops" in carol.expect("cannot talk")
    alice.kick("#ops", "carol", "banned")
    assert carol.expect("kicked") == "* alice kicked carol from #ops (banned)"
    kick = bots.wait("bob", "kick")
    assert kick.arguments == ["carol", "banned"]
    carol.send("/join ops")
    assert carol.expect("cannot join") == "* cannot join #ops: you are banned"
    alice.mode("#ops", "-b+ik carol!*@* sesame")
    bots.wait("bob", "mode", "sesame")
    dave = bots.connect("dave")
    dave.join("#ops")
    bots.wait("dave", "inviteonlychan")
    alice.invite("dave", "#ops")
    invite = bots.wait("dave", "invite")
    assert (invite.source.nick, invite.arguments) == ("alice", ["#ops"])
    dave.join("#ops", "wrong")
    bots.wait("dave", "badchannelkey")
    dave.join("#ops", "sesame")
    bots.wait("dave", "endofnames")
    room = netd.admin("GET", "/api/services/chat/rooms/ops")
    assert (room["operators"], room["voiced"], room["modes"]) == (["alice"], ["bob"], "+intk *")
    assert [e["target"] for e in netd.events("chat", "chat.kick")] == ["carol"]
    for bot in (alice, bob, dave):
        bot.disconnect()
    carol.close()


class _Member(IRCClient):
    """Twisted's IRCClient in a channel someone else runs: records what is done to it."""

    nickname = "twisted"

    def signedOn(self) -> None:
        self.join("#run")

    def joined(self, channel: str) -> None:
        self.factory.happened["joined"].callback(channel)

    def modeChanged(
        self, user: str, channel: str, set: bool, modes: str, args: tuple[Any, ...]
    ) -> None:
        self.factory.happened["mode"].callback((user.split("!")[0], set, modes, args))

    def kickedFrom(self, channel: str, kicker: str, message: str) -> None:
        self.factory.happened["kicked"].callback((channel, kicker, message))

    def irc_ERR_CHANOPRIVSNEEDED(self, prefix: str, params: list[str]) -> None:
        self.factory.happened["refused"].callback(params[1])


@pytest_twisted.inlineCallbacks
def test_twisted_ircclient_is_given_a_voice_refused_a_topic_and_kicked(
    netd: NetdProcess,
) -> Any:
    owner = yield deferToThread(Raw, netd, "irc")
    owner.send("NICK owner", "USER owner 0 * :Owner", "JOIN #run")
    yield deferToThread(owner.expect, " 366 ")
    factory = protocol.ClientFactory.forProtocol(_Member)
    factory.happened = {name: defer.Deferred() for name in ("joined", "mode", "refused", "kicked")}
    connector = global_reactor.connectTCP("127.0.0.1", port(netd, "irc"), factory)
    try:
        yield factory.happened["joined"]
        owner.send("MODE #run +v twisted")
        assert (yield factory.happened["mode"]) == ("owner", True, "v", ("twisted",))
        connector.transport.write(b"TOPIC #run :a topic of my own\r\n")
        assert (yield factory.happened["refused"]) == "#run"
        owner.send("KICK #run twisted :out")
        assert (yield factory.happened["kicked"]) == ("#run", "owner", "out")
        owner.send("NAMES #run")
        names = yield deferToThread(owner.expect, " 353 ")
        assert names.endswith(" = #run :@owner")
    finally:
        connector.disconnect()
        owner.close()
