"""
smtp rules in the real daemon, seen by smtplib: an answer at a chosen stage,
a number of times; delays; a greeting refused; a reset.
"""

from __future__ import annotations

import json
import smtplib
import ssl
import time
from typing import Any

import pytest

from netd.testing import NetdProcess
from tests.conftest import StartNetd

MAIL_MAP = """
services:
  mail:
    type: smtp
    listen: ["tcp:0:interface=127.0.0.1"]
    hostname: mx.netd.test
    relay: {domains: [flaky.test, netd.test]}
    rules:
      - {match: {stage: rcpt, rcpt: "*@flaky.test"}, reply: "451 4.3.0 try later", times: 2}
"""


def client(netd: NetdProcess) -> smtplib.SMTP:
    host, port = netd.address("mail")
    return smtplib.SMTP(host, port, timeout=10)


def add_rule(netd: NetdProcess, rule: dict[str, Any]) -> dict[str, Any]:
    answer: dict[str, Any] = netd.admin(
        "POST", "/api/services/mail/rules", json.dumps(rule).encode()
    )
    return answer


def test_451_on_the_first_two_rcpts_then_250(start_netd: StartNetd) -> None:
    netd = start_netd(MAIL_MAP)
    with client(netd) as smtp:
        smtp.ehlo("client.test")
        smtp.mail("alice@client.test")
        assert smtp.rcpt("bob@netd.test")[0] == 250  # another domain: not matched
        assert smtp.rcpt("bob@flaky.test") == (451, b"4.3.0 try later")
        assert smtp.rcpt("carol@flaky.test") == (451, b"4.3.0 try later")
        assert smtp.rcpt("dave@flaky.test")[0] == 250
        smtp.data(b"Subject: hi\r\n\r\nhello\r\n")
    [message] = netd.messages("mail")
    assert sorted(message["to"]) == ["bob@netd.test", "dave@flaky.test"]
    fired = netd.wait_for_count("mail", "rule.fired", 2)
    assert [e["matched"]["rcpt"] for e in fired] == ["bob@flaky.test", "carol@flaky.test"]
    assert fired[0]["matched"]["stage"] == "rcpt"
    [rule] = netd.view("mail", "rules")
    assert rule["fired"] == 2 and rule["spent"]


def test_eom_reply_keeps_the_message_out(start_netd: StartNetd) -> None:
    netd = start_netd(MAIL_MAP)
    add_rule(netd, {"match": {"stage": "eom", "mail": "spam@*"}, "reply": "554 5.7.1 no spam"})
    with client(netd) as smtp:
        with pytest.raises(smtplib.SMTPDataError) as refused:
            smtp.sendmail("spam@client.test", ["bob@netd.test"], b"Subject: x\r\n\r\nx\r\n")
        assert refused.value.smtp_code == 554
        smtp.sendmail("ham@client.test", ["bob@netd.test"], b"Subject: x\r\n\r\nx\r\n")
    assert [m["from"] for m in netd.messages("mail")] == ["ham@client.test"]


def test_delay_at_data_then_normal_service(start_netd: StartNetd) -> None:
    netd = start_netd(MAIL_MAP)
    added = add_rule(netd, {"match": {"stage": "data"}, "delay": 1})
    with client(netd) as smtp:
        smtp.ehlo("client.test")
        smtp.mail("alice@client.test")
        smtp.rcpt("bob@netd.test")
        started = time.monotonic()
        assert smtp.docmd("DATA")[0] == 354
        assert time.monotonic() - started >= 0.9
        smtp.send(b"Subject: slow\r\n\r\nslow\r\n.\r\n")
        assert smtp.getreply()[0] == 250
    netd.admin("DELETE", f"/api/services/mail/rules/{added['id']}")
    with client(netd) as smtp:
        smtp.ehlo("client.test")
        smtp.mail("alice@client.test")
        smtp.rcpt("bob@netd.test")
        started = time.monotonic()
        assert smtp.docmd("DATA")[0] == 354
        assert time.monotonic() - started < 0.9
        smtp.send(b"Subject: quick\r\n\r\nquick\r\n.\r\n")  # so QUIT is not message text
        assert smtp.getreply()[0] == 250


def test_greeting_refused_and_reset_at_mail(start_netd: StartNetd) -> None:
    netd = start_netd(MAIL_MAP)
    add_rule(netd, {"match": {"stage": "connect"}, "reply": "421 4.3.2 go away", "times": 1})
    add_rule(netd, {"match": {"stage": "mail", "mail": "*@reset.test"}, "reset": True})
    with pytest.raises(smtplib.SMTPConnectError) as refused:
        client(netd)
    assert refused.value.smtp_code == 421
    with client(netd) as smtp, pytest.raises(smtplib.SMTPServerDisconnected):
        smtp.ehlo("client.test")
        smtp.mail("x@reset.test")
    with client(netd) as smtp:
        smtp.ehlo("client.test")
        assert smtp.mail("x@fine.test")[0] == 250


def test_bad_reply_refused_with_its_path(start_netd: StartNetd) -> None:
    netd = start_netd(MAIL_MAP)
    from netd.testing import AdminError

    with pytest.raises(AdminError) as refused:
        add_rule(netd, {"match": {"stage": "rcpt"}, "reply": "ok then"})
    assert [e["path"] for e in json.loads(refused.value.body)["errors"]] == ["reply"]
    with client(netd) as smtp:
        assert smtp.ehlo("client.test")[0] == 250


def test_netd_testing_rule_and_scenario(start_netd: StartNetd) -> None:
    netd = start_netd(MAIL_MAP)
    netd.admin("DELETE", "/api/services/mail/rules")
    with netd.rule(
        "mail", match={"stage": "rcpt", "rcpt": "*@later.test"}, reply="451 4.3.0 later", times=2
    ) as rule:
        with client(netd) as smtp:
            smtp.ehlo("client.test")
            smtp.mail("alice@client.test")
            codes = [smtp.rcpt("bob@later.test")[0] for _ in range(3)]
        assert codes == [451, 451, 250]  # spent: the usual answer (loopback may relay)
        assert rule.fired == 2
        assert [e["matched"]["rcpt"] for e in rule.wait_fired(2)] == ["bob@later.test"] * 2
    assert netd.view("mail", "rules") == []
    assert netd.scenario("signup") == "started"
    assert netd.scenario("signup", "created") == "created"
    assert netd.scenarios() == {"signup": "created"}
    netd.reset_scenarios()
    assert netd.scenarios() == {}


def test_a_throttled_session_still_starts_tls(start_netd: StartNetd) -> None:
    """STARTTLS's 220 waited behind the rate and followed the handshake: both sides waited."""
    netd = start_netd(
        """
tls:
  lab: {self_signed: [localhost, 127.0.0.1]}
services:
  mail:
    type: smtp
    listen: ["tcp:0:interface=127.0.0.1"]
    hostname: mx.netd.test
    tls: lab
    relay: {domains: [netd.test]}
    rules:
      - {match: {stage: helo}, throttle: 2000}
"""
    )
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with client(netd) as session:
        session.ehlo("client.test")
        session.starttls(context=context)
        session.ehlo("client.test")
        assert session.sendmail("a@client.test", ["b@netd.test"], b"Subject: hi\r\n\r\nx\r\n") == {}
    assert [m["subject"] for m in netd.messages("mail")] == ["hi"]
