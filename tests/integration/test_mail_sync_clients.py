"""
Captured mail kept in step by clients nobody here wrote, stricter about IMAP
than a one-off fetch: isync's mbsync and OfflineIMAP (a Maildir synchronised
with INBOX: first the whole mailbox, then only new mail although UIDNEXT
jumps with other recipients' mail, flags and deletions both ways), getmail6's
POP3 and IMAP retrievers (its record of what it has seen, then deleting) and
the Python libraries imapclient and aioimaplib, each with a parser of its own
(ENVELOPE, BODYSTRUCTURE, INTERNALDATE, a search string sent as a literal,
IDLE).  Every message arrives as the admin API gives it.
"""

from __future__ import annotations

import asyncio
import base64
import email.header
import imaplib
import re
import ssl
import subprocess
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from netd.testing import NetdProcess
from tests.clients import deliver, tool
from tests.integration.test_mail_clients import fill, held
from tests.integration.test_mailboxes import MAILBOXES, PASSWORD
from tests.maps import mail_map

# Each test its own recipient, any of them logs in.
SYNC_MAILBOXES = {
    **MAILBOXES,
    "mailboxes": f'{{users: {{all: {{password: "{PASSWORD}"}}}}, any_password: true}}',
}


@pytest.fixture(scope="module")
def netd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetdProcess]:
    base = tmp_path_factory.mktemp("sync")
    with NetdProcess.start(mail_map(base / "state", **SYNC_MAILBOXES), base) as process:
        yield process


def imap(netd: NetdProcess, user: str) -> imaplib.IMAP4_SSL:
    """imaplib logged in as C{user} over implicit TLS, INBOX selected: the other side's hand."""
    host, port = netd.address("mail", tls=True, protocol="imap")
    context = ssl.create_default_context(cafile=netd.ca_file("lab"))
    client = imaplib.IMAP4_SSL(host, port, ssl_context=context, timeout=10)
    client.login(f"{user}@netd.test", PASSWORD)
    client.select("INBOX")
    return client


def server_flags(netd: NetdProcess, user: str) -> list[bytes]:
    """Each message's flags, oldest first."""
    client = imap(netd, user)
    _, answer = client.fetch("1:*", "(FLAGS)")
    client.logout()
    return re.findall(rb"FLAGS \((.*?)\)", b" ".join(answer))


def maildir(path: Path) -> dict[int, tuple[str, bytes]]:
    """
    A Maildir's messages, new and cur, by the UID the client wrote in the file
    name: each one's Maildir flags and octets as IMAP gave them (LF back to
    CRLF, without mbsync's own X-TUID header).
    """
    found = {}
    for file in path.glob("*/*"):
        number = re.search(r",U=(\d+)", file.name)
        assert number is not None, file
        stored = re.sub(rb"^X-TUID: [^\n]*\n", b"", file.read_bytes(), flags=re.M)
        found[int(number.group(1))] = (
            file.name.rpartition(":2,")[2],
            stored.replace(b"\n", b"\r\n"),
        )
    return dict(sorted(found.items()))


def octets(box: dict[int, tuple[str, bytes]]) -> list[bytes]:
    return [stored for _, stored in box.values()]


def named(path: Path, uid: int) -> Path:
    """The file of the message the client named C{uid} in the Maildir C{path}."""
    [file] = [file for file in path.glob("*/*") if re.search(rf",U={uid}\b", file.name)]
    return file


def flag(path: Path, uid: int, flags: str) -> None:
    """Set the Maildir flags of message C{uid}, as a mail reader does."""
    file = named(path, uid)
    file.rename(path / "cur" / (file.name.partition(":2,")[0] + ":2," + flags))


def delete(netd: NetdProcess, user: str, index: int) -> None:
    """Delete C{user}'s message number C{index} (0-based) through the admin API."""
    listed = netd.messages("mail", to=f"{user}@netd.test")[index]
    assert netd.admin("DELETE", f"/api/services/mail/messages/{listed['id']}") == {"deleted": 1}


def more(netd: NetdProcess, user: str) -> list[bytes]:
    """
    New mail for C{user} after a first sync: one for another recipient first,
    so UIDNEXT moves on past a UID C{user} never sees, then two of its own;
    all of C{user}'s messages, as the admin API gives them.
    """
    deliver(netd, "ivo@netd.test", b"Subject: not yours\r\n\r\nx\r\n")
    for n in (1, 2):
        deliver(netd, f"{user}@netd.test", b"Subject: later %d\r\n\r\n.dot\r\nline %d\r\n" % (n, n))
    return held(netd, user)


def run_clean(command: list[str]) -> None:
    """
    Run a mail client to its end: it succeeds and says no warning or error (a
    UIDVALIDITY or UIDNEXT a sync client dislikes would be one or the other).
    """
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    said = done.stdout + done.stderr
    assert done.returncode == 0, said
    assert not re.search(r"(?i)warning|error", said), said


def mbsync(netd: NetdProcess, tmp_path: Path, user: str) -> None:
    """One run of mbsync between C{user}'s INBOX and tmp_path/INBOX (STARTTLS)."""
    host, port = netd.address("mail", protocol="imap")
    assert host == "127.0.0.1"
    (tmp_path / "INBOX").mkdir(exist_ok=True)
    rc = tmp_path / "mbsyncrc"
    rc.write_text(
        # localhost: the name the lab certificate carries.
        f"IMAPAccount netd\nHost localhost\nPort {port}\nUser {user}@netd.test\n"
        f"Pass {PASSWORD}\nSSLType STARTTLS\nCertificateFile {netd.ca_file('lab')}\n\n"
        "IMAPStore far\nAccount netd\n\n"
        f"MaildirStore near\nPath {tmp_path}/\nInbox {tmp_path}/INBOX\n\n"
        "Channel inbox\nFar :far:INBOX\nNear :near:INBOX\n"
        "Sync All\nCreate Near\nExpunge Both\nSyncState *\n"
    )
    run_clean([tool("mbsync"), "--config", str(rc), "--verbose", "inbox"])


def offlineimap(netd: NetdProcess, tmp_path: Path, user: str) -> None:
    """One run of OfflineIMAP between C{user}'s INBOX and tmp_path/mail/INBOX (implicit TLS)."""
    host, port = netd.address("mail", tls=True, protocol="imap")
    assert host == "127.0.0.1"
    (tmp_path / "meta").mkdir(exist_ok=True)
    rc = tmp_path / "offlineimaprc"
    rc.write_text(
        f"[general]\naccounts = netd\nmetadata = {tmp_path}/meta\nui = basic\n\n"
        "[Account netd]\nlocalrepository = near\nremoterepository = far\n\n"
        f"[Repository near]\ntype = Maildir\nlocalfolders = {tmp_path}/mail\n\n"
        f"[Repository far]\ntype = IMAP\nremotehost = localhost\nremoteport = {port}\n"
        f"remoteuser = {user}@netd.test\nremotepass = {PASSWORD}\nssl = yes\n"
        f"sslcacertfile = {netd.ca_file('lab')}\n"
    )
    run_clean([tool("offlineimap"), "-c", str(rc), "-o", "-u", "basic"])


# Each sync client, and where it keeps INBOX under its tmp_path.
SYNCS = {"mbsync": (mbsync, "INBOX"), "offlineimap": (offlineimap, "mail/INBOX")}


@pytest.mark.parametrize(("client", "user"), [("mbsync", "ida"), ("offlineimap", "jo")])
def test_a_sync_client_pulls_new_mail_only_and_syncs_flags_and_deletions_both_ways(
    netd: NetdProcess, tmp_path: Path, client: str, user: str
) -> None:
    sync, folder = SYNCS[client]
    inbox = tmp_path / folder
    sent = fill(netd, user)
    sync(netd, tmp_path, user)
    first = maildir(inbox)
    assert octets(first) == sent
    sent = more(netd, user)
    sync(netd, tmp_path, user)
    now = maildir(inbox)
    # Nothing pulled twice: the first two are still the same two files.
    assert {uid: now[uid] for uid in first} == first
    assert octets(now) == sent
    one, two, three, _ = now
    flag(inbox, one, "FS")
    other_side = imap(netd, user)
    other_side.store("2", "+FLAGS", "(\\Answered)")
    other_side.logout()
    named(inbox, three).unlink()
    delete(netd, user, 3)
    sync(netd, tmp_path, user)
    assert held(netd, user) == sent[:2]
    assert server_flags(netd, user) == [b"\\Flagged \\Seen", b"\\Answered"]
    assert maildir(inbox) == {one: ("FS", sent[0]), two: ("R", sent[1])}


def getmail(
    netd: NetdProcess, tmp_path: Path, user: str, protocol: str, options: str
) -> list[bytes]:
    """
    One run of getmail6 on C{user}'s mailbox over implicit TLS, with
    C{options}; each message as its MDA got it, less the Return-Path getmail
    puts first.  Its record of what it has seen stays in tmp_path/state.
    """
    host, port = netd.address("mail", tls=True, protocol=protocol)
    assert host == "127.0.0.1"
    got = tmp_path / "got"
    for old in got.glob("*"):
        old.unlink()
    got.mkdir(exist_ok=True)
    # An MDA, not getmail's Maildir, which refuses to deliver as root (CI's user).
    deliver_to = tmp_path / "deliver"
    deliver_to.write_text(f'#!/bin/sh\ncat > "{got}/$(ls "{got}" | wc -l)"\n')
    deliver_to.chmod(0o755)
    (tmp_path / "state").mkdir(exist_ok=True)
    # IMAP's retriever would add a header naming the folder.
    retriever = {
        "pop3": "SimplePOP3SSLRetriever",
        "imap": "SimpleIMAPSSLRetriever\nrecord_mailbox = false",
    }[protocol]
    (tmp_path / "state" / "getmailrc").write_text(
        f"[retriever]\ntype = {retriever}\nserver = localhost\nport = {port}\n"
        f"username = {user}@netd.test\npassword = {PASSWORD}\nca_certs = {netd.ca_file('lab')}\n\n"
        f"[destination]\ntype = MDA_external\npath = {deliver_to}\nallow_root_commands = true\n\n"
        f"[options]\ndelivered_to = false\nreceived = false\n{options}\n"
    )
    run_clean([tool("getmail"), "--getmaildir", str(tmp_path / "state"), "--rcfile", "getmailrc"])
    return [
        re.sub(rb"\AReturn-Path: [^\n]*\n", b"", (got / str(n)).read_bytes()).replace(
            b"\n", b"\r\n"
        )
        for n in range(len(list(got.iterdir())))
    ]


@pytest.mark.parametrize("protocol", ["pop3", "imap"])
def test_getmail_reads_new_mail_once_then_deletes(
    netd: NetdProcess, tmp_path: Path, protocol: str
) -> None:
    user = {"pop3": "kai", "imap": "lu"}[protocol]
    sent = fill(netd, user)
    keep = "delete = false\nread_all = false"
    assert getmail(netd, tmp_path, user, protocol, keep) == sent
    assert getmail(netd, tmp_path, user, protocol, keep) == []
    sent = more(netd, user)
    assert getmail(netd, tmp_path, user, protocol, keep) == sent[2:]
    assert held(netd, user) == sent
    assert getmail(netd, tmp_path, user, protocol, "delete = true\nread_all = true") == sent
    assert held(netd, user) == []


def imapclient_for(netd: NetdProcess, user: str) -> Any:
    """imapclient logged in as C{user} over implicit TLS."""
    imapclient = pytest.importorskip("imapclient")
    host, port = netd.address("mail", tls=True, protocol="imap")
    context = ssl.create_default_context(cafile=netd.ca_file("lab"))
    client = imapclient.IMAPClient(host, port=port, ssl=True, ssl_context=context, timeout=10)
    client.login(f"{user}@netd.test", PASSWORD)
    return client


def test_imapclient_parses_envelope_structure_and_dates_and_searches_with_literals(
    netd: NetdProcess,
) -> None:
    sent = fill(netd, "mo")
    client = imapclient_for(netd, "mo")
    selected = client.select_folder("INBOX")
    assert selected[b"EXISTS"] == 2 and selected[b"UIDVALIDITY"] > 0
    uids = client.search()
    assert selected[b"UIDNEXT"] > uids[-1]
    items = [
        b"ENVELOPE",
        b"BODYSTRUCTURE",
        b"INTERNALDATE",
        b"RFC822.SIZE",
        b"BODY.PEEK[]",
        b"FLAGS",
    ]
    fetched = client.fetch(uids, items)
    attached, utf8 = (fetched[uid] for uid in uids)
    assert [attached[b"BODY[]"], utf8[b"BODY[]"]] == sent
    assert [attached[b"RFC822.SIZE"], utf8[b"RFC822.SIZE"]] == [len(raw) for raw in sent]
    assert attached[b"FLAGS"] == utf8[b"FLAGS"] == ()
    envelope = attached[b"ENVELOPE"]
    assert decoded(envelope.subject) == "Rechnung für Jürgen ✓ café"
    [sender] = envelope.from_
    assert (sender.name, sender.mailbox, sender.host) == (b"Shop", b"shop", b"client.test")
    assert [(to.mailbox, to.host) for to in envelope.to] == [(b"mo", b"netd.test")]
    assert decoded(utf8[b"ENVELOPE"].subject) == "Grüße aus Köln"
    # Received now, in the session's local time.
    assert abs((datetime.now() - attached[b"INTERNALDATE"]).total_seconds()) < 60
    structure = attached[b"BODYSTRUCTURE"]
    assert structure.is_multipart and structure[1] == b"mixed"
    alternative, pdf = structure[0]
    assert [part[:2] for part in alternative[0]] == [(b"text", b"plain"), (b"text", b"html")]
    assert pdf[:2] == (b"application", b"pdf") and pdf[5] == b"base64"
    assert pdf[8] == (b"attachment", (b"filename", b"rechnung.pdf"))
    assert utf8[b"BODYSTRUCTURE"][:6] == (
        b"text",
        b"plain",
        (b"charset", b"utf-8"),
        None,
        None,
        b"8bit",
    )
    [part] = client.fetch(uids[:1], [b"BODY.PEEK[2]"]).values()
    assert base64.b64decode(part[b"BODY[2]"]) == bytes(range(256)) * 20
    # imapclient sends a non-ASCII string as a literal.
    assert client.search(["SUBJECT", "Grüße"], charset="UTF-8") == uids[1:]
    assert client.search(["FROM", "Jürgen", "NOT", "SUBJECT", "Köln"], charset="UTF-8") == []
    client.add_flags(uids[1:], [b"\\Flagged"])
    client.delete_messages(uids[:1])
    client.expunge()
    assert client.get_flags(uids) == {uids[1]: (b"\\Flagged",)}
    client.logout()
    assert held(netd, "mo") == sent[1:]
    # With UTF8=ACCEPT the envelope carries the SMTPUTF8 header as it came.
    client = imapclient_for(netd, "mo")
    assert client.enable("UTF8=ACCEPT") == [b"UTF8=ACCEPT"]
    client.select_folder("INBOX", readonly=True)
    [answer] = client.fetch(uids[1:], [b"ENVELOPE"]).values()
    assert answer[b"ENVELOPE"].subject == "Grüße aus Köln".encode()
    assert answer[b"ENVELOPE"].from_[0].name == "Jürgen".encode()
    client.logout()


def decoded(header: bytes) -> str:
    return str(email.header.make_header(email.header.decode_header(header.decode())))


def test_aioimaplib_fetches_hears_new_mail_in_idle_and_expunges(netd: NetdProcess) -> None:
    aioimaplib = pytest.importorskip("aioimaplib")
    sent = fill(netd, "nia")
    host, port = netd.address("mail", tls=True, protocol="imap")
    context = ssl.create_default_context(cafile=netd.ca_file("lab"))

    async def session() -> None:
        client = aioimaplib.IMAP4_SSL(host=host, port=port, ssl_context=context, timeout=10)
        await client.wait_hello_from_server()
        assert (await client.login("nia@netd.test", PASSWORD)).result == "OK"
        selected = await client.select("INBOX")
        assert selected.result == "OK" and b"2 EXISTS" in selected.lines
        fetched = await client.uid("fetch", "1:*", "(UID FLAGS BODY.PEEK[])")
        assert fetched.result == "OK"
        assert [bytes(line) for line in fetched.lines if isinstance(line, bytearray)] == sent
        heard = await client.idle_start(timeout=10)
        # In IDLE, new mail is told at once.
        await asyncio.to_thread(deliver, netd, "nia@netd.test", b"Subject: now\r\n\r\nx\r\n")
        assert await client.wait_server_push() == [b"3 EXISTS"]
        client.idle_done()
        assert (await asyncio.wait_for(heard, 10)).result == "OK"
        stored = await client.store("1", "+FLAGS", "(\\Deleted)")
        assert stored.result == "OK"
        expunged = await client.expunge()
        assert expunged.result == "OK" and expunged.lines[0] == b"1 EXPUNGE"
        await client.logout()

    asyncio.run(session())
    assert held(netd, "nia")[0] == sent[1]
