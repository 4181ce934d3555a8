"""
Captured mail read by mail clients nobody here wrote, from Debian: curl's
IMAP and POP3, fetchmail and GNU Mailutils' movemail, over plain listeners
upgraded with STARTTLS/STLS and over implicit TLS.  Each fetches a mailbox
holding a multipart message with an attachment and an RFC 2047 subject and
an SMTPUTF8 message with 8-bit headers, gets the octets the admin API gives,
leaves the flags the client expects, and deletes what the admin API then no
longer lists.
"""

from __future__ import annotations

import mailbox
import re
import subprocess
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from netd.testing import NetdProcess
from tests.clients import smtp, tool
from tests.integration.test_mailboxes import MAILBOXES, PASSWORD
from tests.maps import mail_map


@pytest.fixture(scope="module")
def netd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetdProcess]:
    base = tmp_path_factory.mktemp("clients")
    with NetdProcess.start(mail_map(base / "state", **MAILBOXES), base) as process:
        yield process


def fill(netd: NetdProcess, user: str) -> list[bytes]:
    """
    Mail C{user} the two messages every client reads, the one smtplib builds
    with an attachment and an SMTPUTF8 one; what the admin API holds of them.
    """
    to = f"{user}@netd.test"
    mail = EmailMessage()
    mail["From"] = "Shop <shop@client.test>"
    mail["To"] = to
    mail["Subject"] = "Rechnung für Jürgen ✓ café"
    mail.set_content("Grüße,\nhier ist die Rechnung.\n.a line with a dot\n")
    mail.add_alternative("<p>Grüße</p>", subtype="html")
    mail.add_attachment(
        bytes(range(256)) * 20, maintype="application", subtype="pdf", filename="rechnung.pdf"
    )
    raw = (
        f"From: Jürgen <shop@client.test>\r\nTo: {to}\r\nSubject: Grüße aus Köln\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\nGrüße!\r\n.\r\n..two dots\r\nFrom the start\r\n"
    ).encode()
    with smtp(netd) as client:
        client.send_message(mail)
        client.sendmail("shop@client.test", [to], raw, mail_options=["SMTPUTF8"])
    sent = held(netd, user)
    assert len(sent) == 2
    return sent


def held(netd: NetdProcess, user: str) -> list[bytes]:
    """C{user}'s messages, oldest first, as the admin API gives them."""
    listed = netd.messages("mail", to=f"{user}@netd.test")
    return [netd.message("mail", message["id"]) for message in listed]


def curl(netd: NetdProcess, user: str, url: str, *args: str) -> bytes:
    done = subprocess.run(
        [
            *(tool("curl"), "--silent", "--show-error", "--max-time", "10"),
            *("--cacert", str(netd.ca_file("lab")), "--user", f"{user}@netd.test:{PASSWORD}"),
            *args,
            url,
        ],
        capture_output=True,
        check=True,
        timeout=15,
    )
    return done.stdout


def url(netd: NetdProcess, scheme: str, protocol: str, tls: bool, path: str) -> str:
    host, port = netd.address("mail", tls=tls, protocol=protocol)
    return f"{scheme}://{host}:{port}/{path}"


def test_curl_imap_fetches_flags_and_expunges(netd: NetdProcess) -> None:
    sent = fill(netd, "ann")
    plain = url(netd, "imap", "imap", False, "INBOX")
    implicit = url(netd, "imaps", "imap", True, "INBOX")
    flags = curl(netd, "ann", plain, "--ssl-reqd", "--request", "UID FETCH 1:* (FLAGS)")
    uids = re.findall(rb"UID (\d+)", flags)
    assert len(uids) == 2 and flags.count(b"FLAGS ()") == 2
    for uid, raw in zip(uids, sent, strict=True):
        assert curl(netd, "ann", f"{implicit};UID={uid.decode()}") == raw
    # curl fetches BODY[], which sets \Seen.
    flags = curl(netd, "ann", implicit, "--request", "FETCH 1:* (FLAGS)")
    assert flags.count(b"\\Seen") == 2
    # Each command its own connection: the flag outlives the session that set it.
    curl(netd, "ann", plain, "--ssl-reqd", "--request", "STORE 1 +FLAGS \\Deleted")
    expunged = curl(netd, "ann", plain, "--ssl-reqd", "--request", "EXPUNGE")
    assert expunged.splitlines() == [b"* 1 EXPUNGE"]
    assert held(netd, "ann") == sent[1:]


def test_curl_pop3_lists_retrieves_and_deletes(netd: NetdProcess) -> None:
    sent = fill(netd, "ben")
    listed = curl(netd, "ben", url(netd, "pop3", "pop3", False, ""), "--ssl-reqd")
    assert listed.split() == [b"1", b"%d" % len(sent[0]), b"2", b"%d" % len(sent[1])]
    implicit = url(netd, "pop3s", "pop3", True, "")
    assert [curl(netd, "ben", f"{implicit}{n}") for n in (1, 2)] == sent
    curl(netd, "ben", f"{implicit}1", "--request", "DELE", "--head")
    assert held(netd, "ben") == sent[1:]


def fetchmail(
    netd: NetdProcess, tmp_path: Path, user: str, protocol: str, tls: bool, keep: str
) -> list[bytes]:
    """
    fetchmail run once on C{user}'s mailbox, C{keep} its options on keeping
    mail; each message as its MDA got it.  Its own C{Received:} line is left
    out (C{invisible}) and the line ends it was given kept (C{no stripcr}).
    """
    host, port = netd.address("mail", tls=tls, protocol=protocol)
    got = tmp_path / f"got-{protocol}-{tls}-{keep.replace(' ', '-')}"
    got.mkdir()
    deliver = tmp_path / "deliver"
    # One file a message, numbered in the order fetchmail hands them over.
    deliver.write_text(f'#!/bin/sh\ncat > "{got}/$(ls "{got}" | wc -l)"\n')
    deliver.chmod(0o755)
    rc = tmp_path / "fetchmailrc"
    rc.write_text(
        "set no syslog\nset no bouncemail\nset invisible\n"
        f"poll {host} service {port} protocol {protocol} auth password\n"
        f'  user "{user}@netd.test" there with password "{PASSWORD}" is root here\n'
        f"  {'ssl' if tls else 'sslproto tls1.2+'} sslcertck sslcommonname localhost"
        f' sslcertfile "{netd.ca_file("lab")}"\n'
        f'  {keep} no rewrite no stripcr mda "{deliver}"\n'
    )
    rc.chmod(0o600)
    done = subprocess.run(
        [tool("fetchmail"), "--fetchmailrc", str(rc), "--nosyslog", "--verbose"],
        capture_output=True,
        env={"HOME": str(tmp_path), "FETCHMAILHOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
        timeout=30,
    )
    # 0: mail fetched; 1: there was none.
    assert done.returncode in (0, 1), done.stdout + done.stderr
    return [(got / str(n)).read_bytes() for n in range(len(list(got.iterdir())))]


FETCHMAIL_USERS = {("pop3", True): "cy", ("pop3", False): "dee", ("imap", True): "eve"}


@pytest.mark.parametrize(
    ("protocol", "tls"), [("pop3", True), ("pop3", False), ("imap", True), ("imap", False)]
)
def test_fetchmail_keeps_then_flushes(
    netd: NetdProcess, tmp_path: Path, protocol: str, tls: bool
) -> None:
    user = FETCHMAIL_USERS.get((protocol, tls), "fay")
    sent = fill(netd, user)
    assert fetchmail(netd, tmp_path, user, protocol, tls, "keep fetchall") == sent
    if protocol == "imap":
        # fetchmail marks what it kept \Seen, and reads only unseen mail next time.
        flags = curl(
            netd,
            user,
            url(netd, "imap", "imap", False, "INBOX"),
            "--ssl-reqd",
            "--request",
            "FETCH 1:* (FLAGS)",
        )
        assert flags.count(b"\\Seen") == 2
        assert fetchmail(netd, tmp_path, user, protocol, tls, "keep") == []
    assert held(netd, user) == sent
    assert fetchmail(netd, tmp_path, user, protocol, tls, "nokeep fetchall") == sent
    assert held(netd, user) == []


def movemail(netd: NetdProcess, source: str, mbox: Path, *args: str) -> list[bytes]:
    """Mailutils' movemail from C{source} into C{mbox}; each message as it came."""
    done = subprocess.run(
        [tool("movemail"), "--no-config", *args, source, str(mbox)],
        capture_output=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    messages = []
    box = mailbox.mbox(mbox)
    for key in box.iterkeys():
        text = box.get_bytes(key)
        # Its own headers (mbox status, IMAP UIDs) come first; the mbox quotes "From ".
        text = re.sub(rb"^(X-IMAPbase|X-UID|Status): [^\n]*\n", b"", text, flags=re.M)
        messages.append(text.replace(b"\n>From ", b"\nFrom ").replace(b"\n", b"\r\n"))
    return messages


@pytest.mark.parametrize(("scheme", "protocol"), [("imap", "imap"), ("pop", "pop3")])
def test_movemail_copies_then_moves(
    netd: NetdProcess, tmp_path: Path, scheme: str, protocol: str
) -> None:
    user = {"imap": "gus", "pop3": "hal"}[protocol]
    sent = fill(netd, user)
    host, port = netd.address("mail", protocol=protocol)
    # STARTTLS/STLS as the listener asks; Mailutils 3.15 checks no certificate.
    source = f"{scheme}://{user}%40netd.test:{PASSWORD}@{host}:{port}"
    assert movemail(netd, source, tmp_path / "copied", "--preserve") == sent
    assert held(netd, user) == sent
    assert movemail(netd, source, tmp_path / "moved") == sent
    assert held(netd, user) == []
