"""
The smtp kind fed by senders nobody here wrote, as they feed Mailpit or
GreenMail: msmtp (as sendmail -t, and its --serverinfo), s-nail, aiosmtplib
and a private Postfix relaying to netd.  Over STARTTLS with the lab CA and
implicit TLS, AUTH PLAIN and LOGIN, 8-bit and SMTPUTF8 mail, dots and a
998-octet line, Bcc and several recipients; each message checked through the
admin API (envelope, the octets sent, netd's Received line), and Postfix's
answer to a 4xx (it retries) and a 5xx (it bounces) from a rule.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netd.testing import NetdProcess
from tests.clients import tool
from tests.maps import mail_map

LONG_LINE = "x" * 998  # 1000 octets with its CRLF: max_line_length's default


@pytest.fixture(scope="module")
def netd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetdProcess]:
    base = tmp_path_factory.mktemp("smtp-clients")
    with NetdProcess.start(mail_map(base / "state"), base) as process:
        yield process


def captured(netd: NetdProcess, to: str) -> tuple[dict[str, Any], bytes]:
    """The one message held for C{to}: its listing and its octets."""
    [listed] = netd.messages("mail", to=to)
    return listed, netd.message("mail", listed["id"])


def received(listed: dict[str, Any], helo: str, protocol: str, to: str | None = None) -> str:
    """netd's Received line for C{listed}, its date left as a pattern."""
    for_ = "" if to is None else f"\r\n\tfor <{re.escape(to)}>"
    return (
        rf"Received: from {re.escape(helo)} \(\[127\.0\.0\.1\]\)\r\n"
        rf"\tby mx\.netd\.test \(netd\) with {protocol} id {listed['id']}{for_};\r\n"
        r"\t\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d [-+]0000\r\n"
    )


def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode()


def msmtp(
    netd: NetdProcess, *args: str, tls: bool = False, stdin: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    host, port = netd.address("mail", tls=tls)
    return subprocess.run(
        [
            *(tool("msmtp"), f"--host={host}", f"--port={port}", "--domain=client.test"),
            *("--tls=on", f"--tls-starttls={'off' if tls else 'on'}"),
            f"--tls-trust-file={netd.ca_file('lab')}",
            *args,
        ],
        input=stdin,
        capture_output=True,
        timeout=15,
        check=False,
    )


def test_msmtp_as_sendmail_t_over_starttls_with_auth_plain(netd: NetdProcess) -> None:
    headers = (
        "Date: Mon, 02 Mar 2026 10:00:00 +0000\n"
        "Message-ID: <msmtp-1@client.test>\n"
        "From: Ops <ops@client.test>\n"
        "To: ann@netd.test, abe@elsewhere.test\n"
        "Cc: amy@netd.test\n"
    )
    body = f"Subject: deploy done\n\nline one\n.\n..two\n.x\n{LONG_LINE}\nlast\n"
    done = msmtp(
        netd,
        *("--auth=plain", "--user=bob", "--passwordeval=echo secret"),
        *("--from=ops@client.test", "--read-recipients"),
        stdin=(headers + "Bcc: al@netd.test\n" + body).encode(),
    )
    assert done.returncode == 0, done.stderr
    listed, raw = captured(netd, "al@netd.test")
    assert listed["from"] == "ops@client.test" and listed["user"] == "bob"
    assert listed["to"] == ["ann@netd.test", "abe@elsewhere.test", "amy@netd.test", "al@netd.test"]
    # Bcc is the envelope's, not the header's; the dots come back as written.
    assert re.fullmatch(
        received(listed, "client.test", "ESMTPSA").encode() + re.escape(crlf(headers + body)), raw
    )


def test_msmtp_serverinfo_and_implicit_tls_with_auth_login(netd: NetdProcess) -> None:
    plain = msmtp(netd, "--serverinfo", "--tls=off")
    assert plain.returncode == 0, plain.stderr
    assert b"STARTTLS:" in plain.stdout and b"AUTH:" not in plain.stdout
    implicit = msmtp(netd, "--serverinfo", tls=True)
    assert implicit.returncode == 0, implicit.stderr
    # RFC 3207 4.2: no STARTTLS once TLS is up, the implicit one too.
    assert b"STARTTLS:" not in implicit.stdout
    assert re.search(rb"AUTH:\s+Supported authentication methods:\s+PLAIN LOGIN", implicit.stdout)
    text = (
        "From: bob@client.test\nTo: bea@netd.test\nSubject: Grüße aus Köln\n"
        "MIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n"
        "Content-Transfer-Encoding: 8bit\nDate: Mon, 02 Mar 2026 10:00:00 +0000\n"
        "Message-ID: <msmtp-2@client.test>\n\nGrüße, Jürgen\n"
    )
    login = ("--auth=login", "--user=carol", "--passwordeval=echo plain")
    done = msmtp(netd, *login, "--from=bob@client.test", "-t", tls=True, stdin=text.encode())
    assert done.returncode == 0, done.stderr
    listed, raw = captured(netd, "bea@netd.test")
    assert listed["user"] == "carol" and listed["subject"] == "Grüße aus Köln"
    # msmtp says no BODY=8BITMIME, and the message is kept as it came.
    assert not listed["8bitmime"]
    expected = received(listed, "client.test", "ESMTPSA", "bea@netd.test")
    assert re.fullmatch(expected.encode() + re.escape(crlf(text)), raw)
    # msmtp 1.8 sends no SMTPUTF8 with a UTF-8 address: netd says why it refuses.
    utf8 = msmtp(netd, *login, "--from=bob@client.test", "jürgen@netd.test", tls=True)
    assert utf8.returncode != 0 and b"553 5.6.7" in utf8.stderr


def s_nail(netd: NetdProcess, tmp_path: Path, url: str, *args: str) -> None:
    """s-nail sending through C{url} (no .rc files), the CA trusted, the body on stdin."""
    done = subprocess.run(
        [
            *(tool("s-nail"), "-:/", "-#", "-S", "v15-compat", "-S", "sendwait"),
            *("-S", f"mta={url}", "-S", f"tls-ca-file={netd.ca_file('lab')}"),
            *("-S", "hostname=client.test", "-S", "from=Ops <ops@client.test>"),
            *args,
        ],
        input="Hallo Jürgen\n.\nend\n".encode(),
        capture_output=True,
        env={"HOME": str(tmp_path), "LC_ALL": "C.UTF-8", "PATH": "/usr/bin:/bin"},
        timeout=15,
        check=False,
    )
    # s-nail says "message not sent" and keeps it in dead.letter, yet exits 0.
    assert done.returncode == 0 and not (tmp_path / "dead.letter").exists(), done.stderr


@pytest.mark.parametrize(
    ("scheme", "tls", "auth", "user", "to"),
    [("smtp", False, "plain", "bob:secret", "cy"), ("smtps", True, "login", "carol:plain", "cal")],
)
def test_s_nail_with_cc_bcc_and_quoted_printable(
    netd: NetdProcess, tmp_path: Path, scheme: str, tls: bool, auth: str, user: str, to: str
) -> None:
    # s-nail checks a certificate's DNS names only: it asks for localhost.
    port = netd.address("mail", tls=tls)[1]
    starttls = () if tls else ("-S", "smtp-use-starttls")
    s_nail(
        netd,
        tmp_path,
        f"{scheme}://{user}@localhost:{port}",
        *(*starttls, "-S", f"smtp-auth={auth}", "-s", "Grüße"),
        *("-c", f"{to}.cc@netd.test", "-b", f"{to}.bcc@netd.test", f"{to}@netd.test"),
    )
    listed, raw = captured(netd, f"{to}.bcc@netd.test")
    assert listed["to"] == [f"{to}@netd.test", f"{to}.cc@netd.test", f"{to}.bcc@netd.test"]
    assert listed["subject"] == "Grüße" and listed["user"] == user.split(":")[0]
    assert re.match(received(listed, "client.test", "ESMTPSA").encode(), raw)
    assert b"\r\nBcc:" not in raw and f"\r\nCc: {to}.cc@netd.test\r\n".encode() in raw
    assert raw.endswith(b"\r\n\r\nHallo J=C3=BCrgen\r\n=2E\r\nend\r\n")


def test_aiosmtplib_smtputf8_over_tls_and_starttls(netd: NetdProcess) -> None:
    aiosmtplib = pytest.importorskip("aiosmtplib")
    import asyncio

    context = ssl.create_default_context(cafile=str(netd.ca_file("lab")))
    host, plain = netd.address("mail")
    implicit = netd.address("mail", tls=True)[1]
    utf8 = crlf("From: bob@client.test\nTo: jürgen@netd.test\nSubject: Grüße\n\n.\n..\nok\n")
    dotted = crlf(f"Subject: two\n\n.\n{LONG_LINE}\n.end\n")

    client = {"local_hostname": "client.test"}

    async def send() -> dict[str, Any]:
        async with aiosmtplib.SMTP(
            hostname=host, port=implicit, use_tls=True, tls_context=context, **client
        ) as tls:
            await tls.ehlo()
            extensions = dict(tls.esmtp_extensions)
            await tls.login("bob", "secret")
            await tls.sendmail(
                "bob@client.test", ["jürgen@netd.test"], utf8, mail_options=["SMTPUTF8"]
            )
        async with aiosmtplib.SMTP(
            hostname=host, port=plain, start_tls=True, tls_context=context, **client
        ) as starttls:
            await starttls.login("carol", "plain")
            await starttls.sendmail("bob@client.test", ["dee@netd.test", "dan@netd.test"], dotted)
        return extensions

    extensions = asyncio.run(send())
    assert "starttls" not in extensions and extensions["auth"] == "PLAIN LOGIN"
    listed, raw = captured(netd, "jürgen@netd.test")
    assert listed["smtputf8"] and listed["to"] == ["jürgen@netd.test"]
    expected = received(listed, "client.test", "UTF8SMTPSA", "jürgen@netd.test")
    assert re.fullmatch(expected.encode() + re.escape(utf8), raw)
    listed, raw = captured(netd, "dan@netd.test")
    assert listed["to"] == ["dee@netd.test", "dan@netd.test"] and listed["user"] == "carol"
    assert re.fullmatch(
        received(listed, "client.test", "ESMTPSA").encode() + re.escape(dotted), raw
    )


# Postfix relaying to netd ------------------------------------------------

# No smtpd: this Postfix listens nowhere, it only picks up, queues and sends.
POSTFIX_SERVICES = """\
pickup    unix  n - n 60    1 pickup
cleanup   unix  n - n -     0 cleanup
qmgr      unix  n - n 300   1 qmgr
tlsmgr    unix  - - n 1000? 1 tlsmgr
rewrite   unix  - - n -     - trivial-rewrite
bounce    unix  - - n -     0 bounce
defer     unix  - - n -     0 bounce
trace     unix  - - n -     0 bounce
verify    unix  - - n -     1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n -     - proxymap
smtp      unix  - - n -     - smtp
relay     unix  - - n -     - smtp
showq     unix  n - n -     - showq
error     unix  - - n -     - error
retry     unix  - - n -     - error
discard   unix  - - n -     - discard
anvil     unix  - - n -     1 anvil
scache    unix  - - n -     1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


@pytest.fixture(scope="module")
def postfix(netd: NetdProcess) -> Iterator[Path]:
    """
    A Postfix of its own (config, queue and log in one folder) relaying all
    mail to netd's plain listener: STARTTLS verified against the lab CA for
    localhost, AUTH PLAIN as bob.  Its folder is returned.
    """
    command = tool("postfix")
    if os.geteuid() != 0:
        pytest.skip("Postfix's master runs as root")
    # Not under pytest's 0700 folders: Postfix's own processes run as the postfix user.
    home = Path(tempfile.mkdtemp(prefix="netd-postfix-"))
    home.chmod(0o755)
    (home / "queue").mkdir()
    (home / "data").mkdir()
    shutil.chown(home / "data", "postfix")
    shutil.copy(netd.ca_file("lab"), home / "ca.pem")
    port = netd.address("mail")[1]
    (home / "master.cf").write_text(POSTFIX_SERVICES)
    (home / "main.cf").write_text(
        f"""\
compatibility_level = 3.6
queue_directory = {home}/queue
data_directory = {home}/data
maillog_file = {home}/maillog
maillog_file_prefixes = {home}
inet_interfaces = loopback-only
inet_protocols = ipv4
myhostname = relay.client.test
myorigin = client.test
mydestination =
alias_maps =
alias_database =
relayhost = [localhost]:{port}
smtp_host_lookup = native
smtp_tls_security_level = secure
smtp_tls_secure_cert_match = nexthop
smtp_tls_CAfile = {home}/ca.pem
smtp_sasl_auth_enable = yes
smtp_sasl_security_options = noanonymous
smtp_sasl_password_maps = static:bob:secret
"""
    )
    subprocess.run([command, "-c", str(home), "start"], check=True, timeout=30)
    try:
        yield home
    finally:
        subprocess.run([command, "-c", str(home), "stop"], check=False, timeout=30)
        shutil.rmtree(home, ignore_errors=True)


def postfix_sendmail(home: Path, *args: str, text: str) -> None:
    # Postfix's sendmail: the package takes the name over from any other MTA.
    subprocess.run(
        [tool("sendmail"), "-C", str(home), *args], input=text.encode(), check=True, timeout=15
    )


def test_postfix_relays_bcc_8bit_and_several_recipients(netd: NetdProcess, postfix: Path) -> None:
    headers = (
        "From: Jürgen <ops@client.test>\nTo: pat@netd.test, pia@elsewhere.test\n"
        "Subject: Grüße\nMIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n"
        "Content-Transfer-Encoding: 8bit\nDate: Mon, 02 Mar 2026 10:00:00 +0000\n"
        "Message-ID: <postfix-1@client.test>\n"
    )
    body = f"\nGrüße\n.\n..\n{LONG_LINE}\nend\n"
    postfix_sendmail(
        postfix, "-t", "-i", "-f", "ops@client.test", text=headers + "Bcc: pip@netd.test\n" + body
    )
    netd.wait_for_message("mail", "pip@netd.test", timeout=20)
    listed, raw = captured(netd, "pip@netd.test")
    assert sorted(listed["to"]) == ["pat@netd.test", "pia@elsewhere.test", "pip@netd.test"]
    assert listed["from"] == "ops@client.test" and listed["user"] == "bob"
    # Postfix asks for 8BITMIME and, for the UTF-8 header, SMTPUTF8.
    assert listed["8bitmime"] and listed["smtputf8"]
    netd_line = received(listed, "relay.client.test", "UTF8SMTPSA")
    postfix_line = r"Received: by relay\.client\.test \(Postfix, from userid 0\)\r\n\t[^\r]+\r\n"
    assert re.fullmatch((netd_line + postfix_line).encode() + re.escape(crlf(headers + body)), raw)


def postfix_queue(home: Path) -> str:
    done = subprocess.run(
        [tool("postqueue"), "-c", str(home), "-j"], capture_output=True, check=True, timeout=15
    )
    return done.stdout.decode()


def test_postfix_retries_a_4xx_and_bounces_a_5xx(netd: NetdProcess, postfix: Path) -> None:
    for rcpt, reply in (
        ("later@netd.test", "451 4.3.0 try later"),
        ("gone@netd.test", "550 5.1.1 no such user"),
    ):
        rule = {"match": {"stage": "rcpt", "rcpt": rcpt}, "reply": reply, "times": 1}
        netd.admin("POST", "/api/services/mail/rules", json.dumps(rule).encode())
    postfix_sendmail(
        postfix, "-i", "-f", "ops@client.test", "later@netd.test", text="Subject: a\n\na\n"
    )
    postfix_sendmail(
        postfix, "-i", "-f", "ops@client.test", "gone@netd.test", text="Subject: b\n\nb\n"
    )
    # The 5xx: Postfix's report comes back to the sender, through netd too.
    netd.wait_for_message("mail", "ops@client.test", timeout=20)
    [report] = netd.messages("mail", to="ops@client.test")
    assert report["from"] == "" and report["subject"] == "Undelivered Mail Returned to Sender"
    text = netd.message("mail", report["id"])
    assert b"<gone@netd.test>: host localhost[127.0.0.1] said: 550 5.1.1 no such user" in text
    # The 4xx: the message waits in Postfix's queue with netd's reply ...
    deadline = time.monotonic() + 20
    while "451 4.3.0 try later" not in (queued := postfix_queue(postfix)):
        assert time.monotonic() < deadline, queued
        time.sleep(0.1)  # Postfix writes its deferral after netd has answered
    assert netd.messages("mail", to="later@netd.test") == []
    # ... and goes once flushed, the rule being spent.
    subprocess.run([tool("postqueue"), "-c", str(postfix), "-f"], check=True, timeout=15)
    netd.wait_for_message("mail", "later@netd.test", timeout=20)
    assert postfix_queue(postfix) == ""
