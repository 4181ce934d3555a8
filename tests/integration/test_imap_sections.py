"""
What IMAP and POP3 clients read of captured mail, byte for byte: FETCH's body
sections (partial, header fields, a message inside a message, a header longer
than the store's index keeps), SEARCH's sets, commands pipelined behind
SEARCH and EXPUNGE, a message removed under an open session, and POP3's TOP
and DELE; with imaplib, poplib and, for pipelining, a raw socket.
"""

from __future__ import annotations

import imaplib
import poplib
import socket
from collections.abc import Iterator

import pytest

from netd.testing import NetdProcess
from tests.clients import deliver
from tests.maps import mail_map

PASSWORD = "sections-secret"
USERS = ("ann", "ben", "cy", "dee", "eve", "fay", "gus")
MAILBOXES = {
    "imap": '{listen: ["tcp:0:interface=127.0.0.1"]}',
    "pop3": '{listen: ["tcp:0:interface=127.0.0.1"]}',
    "mailboxes": "{allow_insecure_auth: true, users: {"
    + ", ".join(f'"{user}@netd.test": {{password: "{PASSWORD}"}}' for user in USERS)
    + "}}",
}


@pytest.fixture(scope="module")
def netd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetdProcess]:
    base = tmp_path_factory.mktemp("sections")
    # Room for messages past the store index's 64 KiB of header.
    text = mail_map(base / "state", **MAILBOXES).replace(
        "max_message_size: 65536", "max_message_size: 1048576"
    )
    with NetdProcess.start(text, base) as process:
        yield process


def imap(netd: NetdProcess, user: str) -> imaplib.IMAP4:
    host, port = netd.address("mail", protocol="imap")
    client = imaplib.IMAP4(host, port, timeout=10)
    client.login(f"{user}@netd.test", PASSWORD)
    client.select("INBOX")
    return client


def fetched(client: imaplib.IMAP4, number: str, item: str) -> tuple[bytes, bytes]:
    """The label and the literal of a one-item FETCH."""
    status, data = client.fetch(number, f"({item})")
    assert status == "OK", data
    label, value = data[0]  # type: ignore[misc]
    assert isinstance(label, bytes) and isinstance(value, bytes)
    return label, value


HEADER = (
    b"Received: from relay.test\r\n\tby mx.test; Thu, 3 Dec 2026 10:00:00 +0000\r\n"
    b"Received: from origin.test\r\n\tby relay.test; Thu, 3 Dec 2026 09:59:59 +0000\r\n"
    b"From: Shop <shop@client.test>\r\n"
    b"X-Dup: first\r\n"
    b"Message-ID: <one@client.test>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"X-Dup: second\r\n"
    b"Subject: sections\r\n"
)
BODY = b"line one\r\n" + b"0123456789" * 30 + b"\r\nlast line\r\n"


def test_header_text_and_partial_sections_are_the_message_s_own_bytes(netd: NetdProcess) -> None:
    message_id = deliver(netd, "ann@netd.test", HEADER + b"\r\n" + BODY)
    stored = netd.message("mail", message_id)
    client = imap(netd, "ann")
    _, whole = fetched(client, "1", "BODY.PEEK[]")
    _, header = fetched(client, "1", "BODY.PEEK[HEADER]")
    _, text = fetched(client, "1", "BODY.PEEK[TEXT]")
    assert whole == stored and header + text == whole
    assert header.endswith(HEADER + b"\r\n")  # after netd's Received line
    _, rfc822_header = fetched(client, "1", "RFC822.HEADER")
    assert rfc822_header == header
    # Repeated fields all there, in order, names as they came (RFC 3501 6.4.5).
    label, fields = fetched(client, "1", "BODY.PEEK[HEADER.FIELDS (x-dup message-id)]")
    assert label.endswith(b"BODY[HEADER.FIELDS (X-Dup Message-Id)] {62}")
    assert fields == b"X-Dup: first\r\nMessage-ID: <one@client.test>\r\nX-Dup: second\r\n\r\n"
    _, others = fetched(client, "1", "BODY.PEEK[HEADER.FIELDS.NOT (Received X-Dup)]")
    assert others == (
        b"From: Shop <shop@client.test>\r\nMessage-ID: <one@client.test>\r\n"
        b"MIME-Version: 1.0\r\nSubject: sections\r\n\r\n"
    )
    # Partial fetches: those octets, labelled by their origin alone.
    label, start = fetched(client, "1", "BODY.PEEK[]<0.10>")
    assert label.endswith(b"BODY[]<0> {10}") and start == whole[:10]
    label, middle = fetched(client, "1", "BODY.PEEK[TEXT]<5.20>")
    assert label.endswith(b"BODY[TEXT]<5> {20}") and middle == text[5:25]
    label, beyond = fetched(client, "1", "BODY.PEEK[]<100000.5>")
    assert label.endswith(b"BODY[]<100000> {0}") and beyond == b""
    # None of those set \Seen; a partial BODY[] does.
    assert client.search(None, "UNSEEN") == ("OK", [b"1"])
    fetched(client, "1", "BODY[]<0.1>")
    assert client.search(None, "SEEN") == ("OK", [b"1"])
    client.logout()


def test_a_header_longer_than_the_index_keeps_is_read_whole(netd: NetdProcess) -> None:
    padding = b"".join(b"X-Pad-%04d: %s\r\n" % (n, b"p" * 70) for n in range(1000))  # 83 KB
    raw = b"From: shop@client.test\r\n" + padding + b"Subject: after the padding\r\n\r\nbody\r\n"
    deliver(netd, "ben@netd.test", raw)
    client = imap(netd, "ben")
    _, subject = fetched(client, "1", "BODY.PEEK[HEADER.FIELDS (SUBJECT)]")
    assert subject == b"Subject: after the padding\r\n\r\n"
    _, header = fetched(client, "1", "BODY.PEEK[HEADER]")
    assert header.endswith(b"Subject: after the padding\r\n\r\n") and len(header) > 83_000
    status, data = client.fetch("1", "(ENVELOPE)")
    assert status == "OK" and b'"after the padding"' in data[0]  # type: ignore[operator]
    assert client.search(None, "SUBJECT", '"after the padding"') == ("OK", [b"1"])
    client.logout()


def test_header_and_text_of_a_message_inside_a_message(netd: NetdProcess) -> None:
    raw = (
        b"From: shop@client.test\r\nSubject: forward\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="outer"\r\n\r\n'
        b"--outer\r\nContent-Type: text/plain\r\n\r\nSee below.\r\n"
        b"--outer\r\nContent-Type: message/rfc822\r\n\r\n"
        b"From: inner@client.test\r\nSubject: inner\r\n\r\ninner body\r\n"
        b"--outer--\r\n"
    )
    deliver(netd, "cy@netd.test", raw)
    client = imap(netd, "cy")
    assert fetched(client, "1", "BODY.PEEK[2.HEADER]") == (
        b"1 (BODY[2.HEADER] {43}",
        b"From: inner@client.test\r\nSubject: inner\r\n\r\n",
    )
    assert fetched(client, "1", "BODY.PEEK[2.TEXT]")[1] == b"inner body"
    assert fetched(client, "1", "BODY.PEEK[2.MIME]")[1] == b"Content-Type: message/rfc822\r\n\r\n"
    client.logout()


def test_search_star_and_commands_pipelined_behind_search_and_expunge(
    netd: NetdProcess,
) -> None:
    for n in range(1, 6):
        deliver(netd, "dee@netd.test", b"Subject: note %d\r\n\r\nbody %d\r\n" % (n, n))
    client = imap(netd, "dee")
    assert client.search(None, "*") == ("OK", [b"5"])
    assert client.search(None, "2,*") == ("OK", [b"2 5"])
    assert client.search(None, "100:*") == ("OK", [b"5"])
    _, [uids] = client.uid("SEARCH", "ALL")  # type: ignore[misc]
    uid_list = uids.split()
    assert client.uid("SEARCH", "UID", "100000:*") == ("OK", [uid_list[-1]])
    client.store("1", "+FLAGS", "(\\Deleted)")
    client.logout()
    # SEARCH reads the bodies, EXPUNGE the disk: what follows each waits for its answer.
    host, port = netd.address("mail", protocol="imap")
    with socket.create_connection((host, port), timeout=10) as sock:
        reader = sock.makefile("rb")
        reader.readline()
        sock.sendall(
            f"a LOGIN dee@netd.test {PASSWORD}\r\nb SELECT INBOX\r\n".encode()
            + b'c UID SEARCH TEXT "body 3"\r\nd EXPUNGE\r\ne FETCH 2 (UID)\r\nf LOGOUT\r\n'
        )
        said = b"".join(iter(reader.readline, b""))
    lines = said.split(b"\r\n")
    assert lines.index(b"* SEARCH " + uid_list[2]) < lines.index(b"* 1 EXPUNGE")
    assert lines.index(b"d OK EXPUNGE completed") < lines.index(b"* 2 FETCH (UID %s)" % uid_list[2])


def test_a_message_removed_under_an_open_session(netd: NetdProcess) -> None:
    deliver(netd, "eve@netd.test", b"Subject: stays\r\n\r\nkept\r\n")
    dropped = deliver(netd, "eve@netd.test", b"Subject: goes\r\n\r\nremoved\r\n")
    client = imap(netd, "eve")
    client.store("2", "+FLAGS", "(\\Flagged)")
    netd.admin("DELETE", f"/api/services/mail/messages/{dropped}")
    assert client.search(None, "FLAGGED") == ("OK", [b"2"])  # the flags it left with
    # FETCH may not announce the EXPUNGE (RFC 3501 7.4.1): message 2 keeps its number,
    # its header is still known, its text is not: no answer for it, and NO (RFC 5530).
    assert fetched(client, "2", "BODY.PEEK[HEADER.FIELDS (SUBJECT)]")[1] == (
        b"Subject: goes\r\n\r\n"
    )
    status, data = client.fetch("1:2", "(BODY.PEEK[])")
    assert status == "NO" and b"[EXPUNGEISSUED]" in data[-1]  # type: ignore[operator]
    # imaplib keeps the answers that came before a NO: message 1's alone.
    answered = [item for item in client.untagged_responses.pop("FETCH") if isinstance(item, tuple)]
    assert [label.split()[0] for label, _ in answered] == [b"1"]
    assert answered[0][1].endswith(b"Subject: stays\r\n\r\nkept\r\n")
    assert client.noop()[0] == "OK"
    assert client.untagged_responses.get("EXPUNGE") == [b"2"]
    assert fetched(client, "1", "BODY.PEEK[TEXT]")[1] == b"kept\r\n"
    client.logout()


def test_pop3_top_and_dele_as_rfc_1939_has_them(netd: NetdProcess) -> None:
    # The blank line after the header falls across Twisted's 16 KiB reads of the
    # message (with its lines ended in LF, as netd's maildrop hands it over).
    probe = netd.message("mail", deliver(netd, "fay@netd.test", b"Subject: probe\r\n\r\n.\r\n"))
    received = len(probe.split(b"Subject: probe")[0].replace(b"\r\n", b"\n"))
    fields = b"".join(b"X-Pad-%04d: %s\n" % (n, b"p" * 70) for n in range(194))
    head = b"Subject: top\n" + fields
    head += b"X-Fill: " + b"f" * (16383 - received - len(head) - 8) + b"\n"
    head = head.replace(b"\n", b"\r\n")
    body = b"first\r\nsecond\r\n\r\nafter a blank line\r\n" + b"L" * 900 + b"\r\nend\r\n"
    stored = netd.message("mail", deliver(netd, "fay@netd.test", head + b"\r\n" + body))
    # Its two LFs either side of 16 KiB:
    assert stored.replace(b"\r\n", b"\n").index(b"\n\n") == 16383
    host, port = netd.address("mail", protocol="pop3")
    client = poplib.POP3(host, port, timeout=10)
    client.user("fay@netd.test")
    client.pass_(PASSWORD)
    client.dele(1)  # the probe
    _, top_zero, _ = client.top(2, 0)
    assert top_zero == [*stored.split(b"\r\n\r\n")[0].split(b"\r\n"), b""]
    _, top_five, _ = client.top(2, 5)
    assert top_five[-5:] == [b"first", b"second", b"", b"after a blank line", b"L" * 900]
    assert client.dele(2).startswith(b"+OK")
    with pytest.raises(poplib.error_proto, match="no such message"):
        client.dele(2)
    with pytest.raises(poplib.error_proto):
        client.retr(2)
    client.rset()
    _, lines, _ = client.retr(2)
    assert lines[-1] == b"end"
    client.quit()


def test_select_codes_and_envelope_addresses(netd: NetdProcess) -> None:
    deliver(
        netd, "gus@netd.test", b"From: root\r\nTo: undisclosed-recipients:;\r\nSubject: a\r\n\r\n."
    )
    deliver(
        netd,
        "gus@netd.test",
        b'From: "Shop, Ltd" <"a@b"@client.test>\r\nReply-To: help@client.test\r\n'
        b"To: Team: ann@netd.test, =?utf-8?q?B=C3=A9a?= <bea@netd.test>;, gus@netd.test\r\n"
        b"Subject: b\r\n\r\n.",
    )
    client = imap(netd, "gus")
    # RFC 3501 6.3.1: SELECT's required OK codes, UNSEEN the first message without \Seen.
    assert client.untagged_responses["UNSEEN"] == [b"1"]
    assert client.untagged_responses["PERMANENTFLAGS"] == [
        b"(\\Seen \\Answered \\Flagged \\Deleted \\Draft \\*)"
    ]
    [uid_next] = client.untagged_responses["UIDNEXT"]
    _, [uids] = client.uid("SEARCH", "ALL")  # type: ignore[misc]
    assert int(uid_next) > max(map(int, uids.split()))
    _, data = client.fetch("1:2", "(ENVELOPE)")
    # An address without a domain has Dovecot's MISSING_DOMAIN; an empty group its markers.
    assert data[0] == (
        b'1 (ENVELOPE (NIL "a" ((NIL NIL "root" "MISSING_DOMAIN")) '
        b'((NIL NIL "root" "MISSING_DOMAIN")) ((NIL NIL "root" "MISSING_DOMAIN")) '
        b'((NIL NIL "undisclosed-recipients" NIL) (NIL NIL NIL NIL)) NIL NIL NIL NIL))'
    )
    # Four items an address; Sender is From; a group opened and closed around its members.
    assert data[1] == (
        b'2 (ENVELOPE (NIL "b" (("Shop, Ltd" NIL "a@b" "client.test")) '
        b'(("Shop, Ltd" NIL "a@b" "client.test")) ((NIL NIL "help" "client.test")) '
        b'((NIL NIL "Team" NIL) (NIL NIL "ann" "netd.test") '
        b'("=?utf-8?q?B=C3=A9a?=" NIL "bea" "netd.test") (NIL NIL NIL NIL) '
        b'(NIL NIL "gus" "netd.test")) NIL NIL NIL NIL))'
    )
    client.logout()


def test_a_part_is_its_stored_octets(netd: NetdProcess) -> None:
    # What a signature over a part covers (RFC 1847): its header and body as sent.
    signed = (
        b"Content-Type: text/plain;\r\n\tcharset=us-ascii\r\n"
        b"content-transfer-encoding:7bit\r\n\r\n"
        b"From the shop:  \r\n\ttabbed line\r\n=2E not decoded\r\n"
    )
    raw = (
        b"From: shop@client.test\r\nSubject: signed\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/signed; boundary="s"; protocol="application/pgp-signature"\r\n'
        b"\r\n--s\r\n" + signed + b"--s\r\nContent-Type: application/pgp-signature\r\n\r\n"
        b"-----BEGIN PGP SIGNATURE-----\r\n--s--\r\n"
    )
    deliver(netd, "ann@netd.test", raw)
    client = imap(netd, "ann")
    _, [number] = client.search(None, "SUBJECT", "signed")  # type: ignore[misc]
    header, _, body = signed.partition(b"\r\n\r\n")
    assert fetched(client, number.decode(), "BODY.PEEK[1.MIME]")[1] == header + b"\r\n\r\n"
    # The CRLF before the next delimiter belongs to the delimiter (RFC 2046 5.1.1).
    assert fetched(client, number.decode(), "BODY.PEEK[1]")[1] == body.removesuffix(b"\r\n")
    client.logout()
