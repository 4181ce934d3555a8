"""
The smtp kind's IMAP and POP3 sessions over its store, driven with string
transports and a clock; the map keys that turn them on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.mail.imap4 import IllegalClientResponse

from netd.config import ConfigErrors, parse_config
from netd.events import Journal, ServiceStats
from netd.kinds import BuildContext
from netd.namespaces import NO_NAMESPACES, Namespacing
from netd.services.smtp import PlusTag, extract, mime
from netd.services.smtp import imap as imap_module
from netd.services.smtp.address import Mailbox
from netd.services.smtp.imap import IMAPSession
from netd.services.smtp.mailbox import (
    KEPT_STRUCTURE_OCTETS,
    MAX_WAITING_COMMANDS,
    Access,
    AnyAddressChecker,
    Mailboxes,
    MailRealm,
    body_structure,
    compile_search,
    header_section,
    section_entity,
    uid_validity,
)
from netd.services.smtp.pop3 import POP3Session, top_of
from netd.services.smtp.server import Transaction
from netd.services.smtp.spool import Spool
from netd.services.smtp.store import MailStore
from tests.fakes.transports import TLSStringTransport

STARTTLS = object()


def result_of(deferred: Deferred[Any]) -> Any:
    found: list[Any] = []
    deferred.addBoth(found.append)
    (result,) = found
    return result


class Lab:
    """A store with mailboxes, on a clock, with sessions on fake transports."""

    def __init__(
        self,
        tmp_path: Path,
        allow_insecure_auth: bool = True,
        namespaces: Namespacing = NO_NAMESPACES,
        tables: dict[str, Any] | None = None,
    ) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.journal = Journal(self.clock)
        context = BuildContext(
            reactor=self.clock,
            name="mail",
            state_dir=tmp_path,
            journal=self.journal,
            stats=ServiceStats(),
            log=Logger(),
            tls={},
            namespaces=namespaces,
            tables={} if tables is None else tables,
        )
        self.store = MailStore(Spool(tmp_path / "spool", maybeDeferred), context, "mx.netd.test")
        self.store.startService()
        self.mailboxes = Mailboxes(self.store, uid_validity=42)
        self.access = Access(
            context=context,
            mailboxes=self.mailboxes,
            portal=Portal(MailRealm(self.mailboxes), [AnyAddressChecker()]),
            starttls=STARTTLS,  # type: ignore[arg-type]
            allow_insecure_auth=allow_insecure_auth,
        )

    def deliver(self, *to: str, subject: str = "s", body: str = "body") -> str:
        transaction = Transaction(
            sender=Mailbox("shop", "client.test"),
            recipients=tuple(Mailbox(*r.split("@")) for r in to),
            data=f"Subject: {subject}\r\nTo: {to[0]}\r\n\r\n{body}\r\n".encode(),
            helo="c.test",
            client="127.0.0.1",
            user=None,
            protocol="ESMTP",
        )
        id: str = result_of(self.store.accept(transaction))
        return id

    def accept_raw(self, data: bytes, sender: Mailbox | None = None, utf8: bool = False) -> str:
        """Store C{data} as it is for ann@netd.test; its id."""
        transaction = Transaction(
            sender=sender,
            recipients=(Mailbox("ann", "netd.test"),),
            data=data,
            helo="c.test",
            client="127.0.0.1",
            user=None,
            protocol="UTF8SMTP" if utf8 else "ESMTP",
            utf8=utf8,
        )
        id: str = result_of(self.store.accept(transaction))
        return id

    def ann_selected(self) -> tuple[IMAPSession, TLSStringTransport]:
        """An IMAP session logged in as ann@netd.test with INBOX selected, its greeting read."""
        session, transport = self.imap()
        session.dataReceived(b"a LOGIN ann@netd.test x\r\nb SELECT INBOX\r\n")
        said(transport)
        return session, transport

    def imap(
        self, secure: bool = False, transport: TLSStringTransport | None = None
    ) -> tuple[IMAPSession, TLSStringTransport]:
        session = IMAPSession(self.access, secure)
        transport = transport or TLSStringTransport()
        session.makeConnection(transport)
        return session, transport

    def pop3(self, secure: bool = False) -> tuple[POP3Session, TLSStringTransport]:
        session = POP3Session(self.access, secure)
        transport = TLSStringTransport()
        session.makeConnection(transport)
        return session, transport


class SlowReader(TLSStringTransport):
    """A client that reads slowly: every write fills the socket's buffer."""

    writes = 0

    def write(self, data: bytes) -> None:
        super().write(data)
        self.writes += 1
        if self.producer is not None and self.streaming:
            self.producer.pauseProducing()


def pump(lab: Lab, transport: TLSStringTransport) -> None:
    """Run a FETCH through: its turns on the clock, its literals pulled as a socket would."""
    for _ in range(10):
        lab.clock.advance(0)
        while transport.producer is not None:
            transport.producer.resumeProducing()


def said(transport: TLSStringTransport) -> list[bytes]:
    lines = transport.value().split(b"\r\n")
    transport.clear()
    return [line for line in lines if line]


def test_the_store_reads_many_messages_in_the_order_asked(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    ids = [lab.deliver("ann@netd.test", body=f"number {n}") for n in range(3)]
    asked = [ids[2], ids[0], ids[1]]

    def bodies() -> list[bytes | None]:
        read = result_of(lab.store.read_many(asked))
        return [None if raw is None else raw.rsplit(b"\r\n\r\n", 1)[1] for raw in read]

    assert bodies() == [b"number 2\r\n", b"number 0\r\n", b"number 1\r\n"]
    # One that left the store meanwhile stands as None in its place.
    result_of(lab.store.remove(ids[0]))
    assert bodies() == [b"number 2\r\n", None, b"number 1\r\n"]


def test_imap_select_fetch_and_expunge_reach_the_store(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    kept = lab.deliver("ann@netd.test", subject="one")
    gone = lab.deliver("ann@netd.test", subject="two")
    lab.deliver("ben@netd.test")
    session, transport = lab.imap()
    said(transport)
    session.dataReceived(b"a LOGIN ann@netd.test anything\r\na SELECT INBOX\r\n")
    lines = said(transport)
    assert b"* 2 EXISTS" in lines and lines[-1] == b"a OK [READ-WRITE] SELECT successful"
    session.dataReceived(b"b FETCH 1:* (UID FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])\r\n")
    lab.clock.advance(0)
    lab.clock.advance(0)
    reply = transport.value()
    assert (
        b"* 1 FETCH (UID 1 FLAGS () BODY[HEADER.FIELDS (Subject)] {16}\r\nSubject: one\r\n\r\n)"
        in reply
    )
    assert b"* 2 FETCH (UID 2 FLAGS ()" in reply and reply.endswith(b"b OK FETCH completed\r\n")
    transport.clear()
    session.dataReceived(b"c STORE 2 +FLAGS (\\Deleted)\r\nd EXPUNGE\r\n")
    assert said(transport)[-2:] == [b"* 2 EXPUNGE", b"d OK EXPUNGE completed"]
    assert list(lab.store.messages) != [kept, gone] and gone not in lab.store.messages


def test_imap_idle_hears_of_new_and_removed_mail(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    first = lab.deliver("ann@netd.test")
    session, transport = lab.imap()
    session.dataReceived(b"a LOGIN ann@netd.test x\r\nb SELECT INBOX\r\nc IDLE\r\n")
    assert said(transport)[-1] == b"+"
    lab.deliver("ann@netd.test")
    lab.deliver("ben@netd.test")  # not ann's
    assert said(transport) == [b"* 2 EXISTS"]
    result_of(lab.store.remove(first))
    assert said(transport) == [b"* 1 EXPUNGE"]
    session.dataReceived(b"DONE\r\n")
    assert said(transport) == [b"c OK IDLE terminated"]


def test_imap_says_expunge_at_a_command_that_allows_it(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    first = lab.deliver("ann@netd.test", subject="one")
    lab.deliver("ann@netd.test", subject="two")
    session, transport = lab.imap()
    session.dataReceived(b"a LOGIN ann@netd.test x\r\nb SELECT INBOX\r\n")
    said(transport)
    result_of(lab.store.remove(first))
    assert said(transport) == []  # no command in progress
    session.dataReceived(b"c FETCH 2 (UID BODY.PEEK[HEADER.FIELDS (SUBJECT)])\r\n")
    lab.clock.advance(0)
    lab.clock.advance(0)
    # Still numbered as the client knows them: 2 is "two", and no EXPUNGE with a FETCH.
    assert said(transport) == [
        b"* 2 FETCH (UID 2 BODY[HEADER.FIELDS (Subject)] {16}",
        b"Subject: two",
        b")",
        b"c OK FETCH completed",
    ]
    session.dataReceived(b"d NOOP\r\n")
    assert said(transport) == [b"* 1 EXPUNGE", b"d OK NOOP No operation performed"]
    session.dataReceived(b"e FETCH 1 (UID)\r\n")
    lab.clock.advance(0)
    assert said(transport) == [b"* 1 FETCH (UID 2)", b"e OK FETCH completed"]


def test_imap_starttls_drops_what_came_with_it(tmp_path: Path) -> None:
    lab = Lab(tmp_path, allow_insecure_auth=False)
    session, transport = lab.imap()
    assert b"LOGINDISABLED" in said(transport)[0]
    session.dataReceived(b"a LOGIN ann@netd.test x\r\n")
    assert said(transport) == [b"a BAD LOGIN is disabled before STARTTLS"]
    session.dataReceived(b"b STARTTLS\r\nc LOGIN ann@netd.test x\r\n")
    assert said(transport) == [b"b OK Begin TLS negotiation now"]
    assert transport.started_tls == [STARTTLS]
    session.dataReceived(b"d LOGIN ann@netd.test x\r\n")
    assert said(transport) == [b"d OK LOGIN succeeded"]


@pytest.mark.parametrize(
    ("command", "answer"),
    [
        (b"a LOGIN", b"a BAD Illegal syntax: Missing argument"),
        (
            b"a LOGIN {4097}",
            b"a BAD Illegal syntax: Literal too long! I accept at most 4096 octets",
        ),
        (b"a APPEND INBOX {3}", b"a BAD Unsupported command"),
        (b"a SEARCH (FROM x", b"a BAD Illegal syntax: bad SEARCH keys: "),
        (b"a SEARCH FROM", b"a BAD Illegal syntax: a search key lacks its argument"),
        (b"a FETCH 1 (FLAGS", b"a BAD Illegal syntax: bad FETCH items: Whitespace expected"),
        (b"a FETCH 1:1000000 FLAGS", b"a OK FETCH completed"),
        (b"a FETCH 0 FLAGS", b"a BAD Illegal syntax: Bad message number 0"),
        (b"a FETCH 1", b"a BAD Illegal syntax: FETCH needs items"),
        (b"a UID FETCH 1:* ", b"a BAD Illegal syntax: FETCH needs items"),
        (b"a FETCH 1 ()", b"a BAD Illegal syntax: "),
        (b"a FETCH 99999999999999999999 FLAGS", b"a OK FETCH completed"),
        (b"a STORE 1 FLAGS \\Seen", b"a NO STORE on a read-only mailbox (EXAMINE)"),
    ],
)
def test_imap_bad_input_gets_bad_and_the_session_goes_on(
    tmp_path: Path, command: bytes, answer: bytes
) -> None:
    lab = Lab(tmp_path)
    lab.deliver("ann@netd.test")
    session, transport = lab.imap()
    if not command.startswith(b"a LOGIN"):
        session.dataReceived(b"x LOGIN ann@netd.test x\r\ny EXAMINE INBOX\r\n")
    said(transport)
    session.dataReceived(command + b"\r\n")
    lab.clock.advance(0)
    lab.clock.advance(0)
    assert said(transport)[-1].startswith(answer)
    session.dataReceived(b"z NOOP\r\n")
    assert said(transport)[-1] == b"z OK NOOP No operation performed"


def test_imap_overlong_line_says_bye(tmp_path: Path) -> None:
    session, transport = Lab(tmp_path).imap()
    said(transport)
    session.dataReceived(b"a " + b"x" * 20000)
    assert said(transport) == [b"* BYE Line too long"] and transport.disconnecting


def test_search_keys_compile_once_and_refuse_unknown_ones() -> None:
    headers = compile_search([b"FROM", b"x", [b"OR", b"SEEN", b"UNSEEN"]], 3, 7)
    assert not headers.needs_text and headers.needs_head
    text = compile_search([b"NOT", b"TEXT", b"code"], 3, 7)
    assert text.needs_text and not text.needs_head
    for bad in ([b"SINCE", b"yesterday"], [b"NOSUCHKEY"], [b"LARGER", b"big"], []):
        with pytest.raises(IllegalClientResponse):
            compile_search(bad, 3, 7)


@pytest.mark.parametrize(
    ("keys", "numbers"),
    [
        ([b"*"], [6]),
        ([b"2,*"], [2, 6]),
        ([b"5:*"], [5, 6]),
        ([b"100:*"], [6]),
        ([b"*:4"], [4, 5, 6]),
        ([b"UID", b"*"], [6]),
        ([b"UID", b"60:*"], [6]),
        ([b"UID", b"15:25"], [2]),
    ],
)
def test_search_star_is_the_last_number_in_use(keys: list[bytes], numbers: list[int]) -> None:
    # RFC 3501 9: "*" is the largest number in use; "n:*" is "*:n" when n is larger.
    search = compile_search(keys, 6, 60)
    messages = {seq: _uid_only(seq * 10) for seq in range(1, 7)}
    assert [seq for seq, m in messages.items() if search.test(seq, m)] == numbers


def _uid_only(uid: int) -> Any:
    class WithUID:
        def getUID(self) -> int:
            return uid

    return WithUID()


def test_pop3_refuses_before_login_then_serves_and_deletes_at_quit(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    first = lab.deliver("ann@netd.test", body=".dot")
    second = lab.deliver("ann@netd.test")
    session, transport = lab.pop3()
    assert said(transport) == [b"+OK netd POP3 ready"]
    for command in (b"STAT", b"RETR 1", b"DELE 1", b"BOGUS"):
        session.dataReceived(command + b"\r\n")
        assert said(transport)[0].startswith(b"-ERR not authenticated yet")
    session.dataReceived(b"USER ann@netd.test\r\nPASS x\r\nSTAT\r\n")
    lab.clock.advance(0)
    size = lab.store.messages[first].size + lab.store.messages[second].size
    assert said(transport)[-1] == b"+OK 2 %d" % size
    session.dataReceived(b"RETR 1\r\n")
    while transport.producer is not None:  # a real transport pulls as it writes
        transport.producer.resumeProducing()
    assert b"\r\n..dot\r\n.\r\n" in transport.value()
    transport.clear()
    session.dataReceived(b"DELE 1\r\nDELE 9\r\nDELE x\r\n")
    assert [line[:4] for line in said(transport)] == [b"+OK ", b"-ERR", b"-ERR"]
    assert first in lab.store.messages
    session.dataReceived(b"QUIT\r\n")
    assert list(lab.store.messages) == [second]


def test_logins_are_counted_and_journaled(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    session, transport = lab.pop3()
    session.dataReceived(b"USER nobody\r\nPASS x\r\nUSER Ann@netd.test\r\nPASS x\r\n")
    assert said(transport)[-1] == b"+OK Authentication succeeded"
    imap, imap_transport = lab.imap()
    imap.dataReceived(b"a LOGIN all x\r\n")
    events = [(e.type, dict(e.fields)) for e in lab.journal.select(0, "mail", ())]
    assert events == [
        ("mailbox.login_failed", {"protocol": "pop3", "client": "192.168.1.1", "user": "nobody"}),
        (
            "mailbox.login",
            {"protocol": "pop3", "client": "192.168.1.1", "user": "ann@netd.test", "tls": False},
        ),
        (
            "mailbox.login",
            {"protocol": "imap", "client": "192.168.1.1", "user": "all", "tls": False},
        ),
    ]
    snapshot = lab.access.context.stats.snapshot()
    assert snapshot["smtp_mailbox_logins"] == 2 and snapshot["smtp_mailbox_login_failures"] == 1
    imap.close_gracefully()
    assert said(imap_transport)[-1] == b"* BYE netd closes this session"
    assert imap_transport.disconnecting


def test_a_namespace_login_reads_its_namespace_live_and_removes_from_the_store(
    tmp_path: Path,
) -> None:
    lab = Lab(tmp_path, namespaces=Namespacing(("plus_tag",), (PlusTag(),)))
    mine = lab.deliver("bob+t1@x.test", subject="for t1")
    theirs = lab.deliver("bob+t2@x.test", subject="for t2")
    lab.deliver("bob@x.test", subject="no namespace")
    session, transport = lab.imap()
    session.dataReceived(b"a LOGIN ns/T1 x\r\nb SELECT INBOX\r\n")
    assert b"* 1 EXISTS" in said(transport)
    session.dataReceived(b"c IDLE\r\n")
    said(transport)
    also_theirs = lab.deliver("bob+t2@x.test")
    later = lab.deliver("ann+t1@y.test")
    assert said(transport) == [b"* 2 EXISTS"]
    session.dataReceived(b"DONE\r\nd STORE 1 +FLAGS (\\Deleted)\r\ne EXPUNGE\r\n")
    assert said(transport)[-2:] == [b"* 1 EXPUNGE", b"e OK EXPUNGE completed"]
    assert mine not in lab.store.messages and theirs in lab.store.messages
    assert session.mbox.ids == [later]
    pop3, pop3_transport = lab.pop3()
    pop3.dataReceived(b"USER ns/t2\r\nPASS x\r\nUIDL\r\n")
    assert said(pop3_transport)[-3:] == [
        b"1 " + theirs.encode(),
        b"2 " + also_theirs.encode(),
        b".",
    ]
    [login] = [
        e
        for e in lab.journal.select(0, "mail", ("mailbox.login",))
        if e.fields["protocol"] == "pop3"
    ]
    assert login.fields["namespace"] == "t2"


@pytest.mark.parametrize("login", [b"ns/t1", b"ns/", b"ns/a.b"])
def test_a_namespace_login_needs_namespaces_and_a_key(tmp_path: Path, login: bytes) -> None:
    lab = Lab(tmp_path)
    lab.deliver("bob+t1@x.test")
    session, transport = lab.pop3()
    session.dataReceived(b"USER " + login + b"\r\nPASS x\r\n")
    assert said(transport)[-1].startswith(b"-ERR")


def test_an_old_store_forgets_in_the_serving_one_too(tmp_path: Path) -> None:
    old = Lab(tmp_path)
    id = old.deliver("ann@netd.test")
    # A reload's replacement, in the same daemon: it serves the spool now.
    new = Lab(tmp_path, tables=old.store.context.tables)
    assert id in new.store.messages and id in new.mailboxes.uids
    result_of(old.store.forget([id]))
    assert id not in new.store.messages and id not in new.mailboxes.uids


def test_imap_makes_the_service_wait_for_idle_clients(tmp_path: Path) -> None:
    plain = _service(tmp_path, "")
    pop3 = _service(
        tmp_path, "    pop3: {listen: ['tcp:0']}\n    mailboxes: {any_password: true}\n"
    )
    imap = _service(
        tmp_path, "    imap: {listen: ['tcp:0']}\n    mailboxes: {any_password: true}\n"
    )
    assert plain.idle_timeout == pop3.idle_timeout == 600
    assert imap.idle_timeout == 1800


def test_pop3_stls_drops_what_came_with_it_and_guards_login(tmp_path: Path) -> None:
    lab = Lab(tmp_path, allow_insecure_auth=False)
    session, transport = lab.pop3()
    said(transport)
    session.dataReceived(b"CAPA\r\n")
    assert said(transport) == [
        b"+OK I can do the following:",
        b"TOP",
        b"UIDL",
        b"RESP-CODES",
        b"IMPLEMENTATION netd",
        b"STLS",
        b".",
    ]
    session.dataReceived(b"USER ann@netd.test\r\n")
    assert said(transport) == [b"-ERR [AUTH] STLS first"]
    session.dataReceived(b"STLS\r\nUSER mallory@netd.test\r\n")
    assert said(transport) == [b"+OK Begin TLS negotiation"]
    assert transport.started_tls == [STARTTLS]
    session.dataReceived(b"STLS\r\n")
    assert said(transport) == [b"-ERR TLS already active"]


def test_pop3_overlong_line_is_refused(tmp_path: Path) -> None:
    session, transport = Lab(tmp_path).pop3()
    said(transport)
    session.dataReceived(b"USER " + b"a" * 2000 + b"\r\nUSER ann@netd.test\r\n")
    assert said(transport) == [b"-ERR line too long", b"+OK USER accepted, send PASS"]
    session.dataReceived(b"x" * 2000)
    assert said(transport) == [b"-ERR line too long"] and transport.disconnecting


def _service(tmp_path: Path, extra: str) -> Any:
    text = (
        "tls: {lab: {self_signed: [localhost]}}\n"
        "services:\n  mail:\n    type: smtp\n    listen: ['tcp:0']\n" + extra
    )
    return parse_config(text, tmp_path / "netd.yaml").services["mail"]


def test_imap_and_pop3_sections_add_tagged_listeners(tmp_path: Path) -> None:
    service = _service(
        tmp_path,
        "    imap: {listen: ['tcp:1143', {endpoint: 'ssl:1993', tls: lab}]}\n"
        "    pop3: {listen: 'tcp:1110'}\n"
        "    mailboxes: {users: {Ann@netd.test: {password: pw}}}\n",
    )
    assert [(lst.endpoint, lst.protocol, lst.tls) for lst in service.listen] == [
        ("tcp:0", None, False),
        ("tcp:1143", "imap", False),
        ("ssl:1993", "imap", True),
        ("tcp:1110", "pop3", False),
    ]
    assert service.options.mailboxes.users == {"ann@netd.test": "pw"}
    assert service.tls_profiles == {"lab"}


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        ("    imap: {listen: ['tcp:1143']}\n", "imap need 'mailboxes'"),
        (
            "    pop3: {listen: ['tcp:1110']}\n    mailboxes: {any_password: true}\n"
            "    delivery: {mode: mx}\n",
            "pop3 read captured mail: delivery mode capture",
        ),
        ("    imap: {port: 1}\n    mailboxes: {any_password: true}\n", "missing required key"),
        (
            "    imap: {listen: ['tcp:0'], x: 1}\n    mailboxes: {any_password: true}\n",
            "unknown key",
        ),
        ("    imap: {listen: ['udp:0']}\n    mailboxes: {any_password: true}\n", "datagram"),
        ("    imap: {listen: ['tcp:0']}\n    mailboxes: {}\n", "no one can log in"),
        (
            "    imap: {listen: ['tcp:0']}\n    mailboxes: {users: {ns/T.1: {password: p}}}\n",
            "'ns/t.1': a namespace key is",
        ),
    ],
)
def test_mailbox_map_errors(tmp_path: Path, extra: str, error: str) -> None:
    with pytest.raises(ConfigErrors) as raised:
        _service(tmp_path, extra)
    assert any(error in str(e) for e in raised.value.errors), raised.value.errors


def _mail(text: str, html: str | None = None, attachment: str | None = None) -> bytes:
    mail = EmailMessage()
    mail["Subject"] = "Sign in"
    mail.set_content(text)
    if html is not None:
        mail.add_alternative(html, subtype="html")
    if attachment is not None:
        mail.add_attachment(attachment, filename="notes.txt")
    return bytes(mail)


def test_links_come_from_text_and_html_in_order_each_once() -> None:
    raw = _mail(
        "Open https://app.test/a?x=1&y=2. Or (https://app.test/b), not ftp://app.test/c",
        '<a href="https://app.test/a?x=1&amp;y=2">a</a><a href="mailto:x@y">m</a>'
        '<area href="https://app.test/map"><script>"https://app.test/hidden"</script>',
        attachment="https://app.test/attached",
    )
    assert extract.links(raw) == [
        "https://app.test/a?x=1&y=2",
        "https://app.test/b",
        "https://app.test/map",
    ]


def test_codes_stand_alone_outside_links_or_match_the_configured_pattern() -> None:
    raw = _mail(
        "Code 482913. Order #12, 2026-12-03 10:30:45, v1.2345, 12345678901, "
        "https://app.test/c?code=99887766",
        "<p>Your PIN:<b>4321</b></p><style>.a{width:5555px}</style>",
    )
    assert extract.codes(raw) == ["482913", "4321"]
    assert extract.codes(raw, r"PIN:\s*(\d+)") == ["4321"]
    assert extract.codes(_mail("no digits here")) == []


@pytest.mark.parametrize(
    ("text", "found"),
    [
        (
            "Requested on December 5, 2024 at 10:30. Your code is 839201. (c) 2024 Acme Inc.",
            ["839201"],
        ),
        ("Sent 5 Dec 2024, code 4821", ["4821"]),
        ("Sent Dec. 5th, 2024 / Sept 2024 / May 2024: 4821", ["4821"]),
        ("\u00a9 2023 Acme; Copyright 2024. Code 5678", ["5678"]),
        ("Call 555 1234 or +1 555 123 4567 about code 4821", ["4821"]),
        ("You may 1234 in 2024", ["1234", "2024"]),  # no month name, no date
        ("You may 2048 times", ["2048"]),  # "may", the verb, is no month's name
        ("sent 5 dec 2024 or may 5, 2024: 4821", ["2024", "4821"]),
        ("Your code is 482913 10 minutes", ["482913"]),
        ("Code 482913 5 tries left", ["482913"]),
        ("Your verification code: 739201 2 attempts remaining", ["739201"]),
        ("Backup codes: 1234 5678 9012", ["1234", "5678", "9012"]),
        ("Your code is 4829. 5 minutes left", ["4829"]),
        ("Order 55512 34 items", ["55512"]),
        ("Call (030) 1234 5678 or +49 30 1234 5678, code 4821", ["4821"]),
    ],
)
def test_a_date_s_year_a_copyright_and_a_phone_number_are_no_codes(
    text: str, found: list[str]
) -> None:
    assert extract.codes(_mail(text)) == found


@pytest.mark.parametrize(
    ("raw", "read"),
    [
        (b"Subject: s\r\n\r\nLe caf\xc3\xa9 est pr\xc3\xaat\r\n", "le café est prêt"),
        (
            b"Content-Type: text/plain\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
            b"Viele Gr\xc3\xbc\xc3\x9fe\r\n",
            "viele grüße",
        ),
        (b"Content-Type: text/plain; charset=us-ascii\r\n\r\nna\xc3\xafve\r\n", "naïve"),
        (b"Subject: s\r\n\r\nUn d\xe9j\xe0-vu\r\n", "un déjà-vu"),  # no UTF-8: Latin-1
        (b"Content-Type: text/plain; charset=iso-8859-1\r\n\r\nd\xe9j\xe0\r\n", "déjà"),
    ],
)
def test_text_without_a_charset_reads_as_utf_8_else_latin_1(raw: bytes, read: str) -> None:
    assert read in extract.text(raw).lower()


@pytest.mark.parametrize("charset", ["punycode", "idna", "unicode_escape"])
def test_a_python_codec_that_is_no_mail_charset_reads_as_utf_8(charset: str) -> None:
    """punycode and idna decode in quadratic time: a MiB part took minutes a search."""
    raw = b"Content-Type: text/plain; charset=%s\r\n\r\ncaf\xc3\xa9-\\u0041\r\n" % charset.encode()
    assert extract.text(raw).startswith("café-\\u0041")


def test_text_holds_the_parts_file_names_decoded() -> None:
    raw = (
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
        b"--b\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
        b"--b\r\nContent-Type: application/pdf; name=report.pdf\r\n"
        b"Content-Disposition: attachment; filename=report.pdf\r\n\r\nJVBERi0=\r\n"
        b"--b\r\nContent-Type: application/pdf\r\n"
        b"Content-Disposition: attachment; filename*=utf-8''r%C3%A9sum%C3%A9.pdf\r\n\r\nx\r\n"
        b'--b\r\nContent-Type: text/plain; name="=?utf-8?q?caf=C3=A9_menu.txt?="\r\n'
        b"Content-Disposition: attachment\r\n\r\nnot searched\r\n--b--\r\n"
    )
    assert extract.text(raw).split("\n")[1:] == ["report.pdf", "résumé.pdf", "café menu.txt"]
    assert "not searched" not in extract.text(raw)
    assert extract.links(raw) == extract.codes(raw) == []


def test_text_reads_no_more_parts_than_mime_reads() -> None:
    # The email package's parser took 6.5 s on a MiB of multiparts nested
    # deep, on every search; mime.read reads a bounded number of parts.
    raw = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + (
        b"--b\r\n\r\nword\r\n" * (2 * mime.MAX_PARTS)
    )
    assert extract.text(raw).count("word") < mime.MAX_PARTS


def test_codes_key_is_a_regular_expression(tmp_path: Path) -> None:
    assert _service(tmp_path, "    codes: 'PIN (\\d+)'\n").options.codes == "PIN (\\d+)"
    for bad, error in (("'('", "not a regular expression"), ("'(a)(b)'", "one group at most")):
        with pytest.raises(ConfigErrors) as raised:
            _service(tmp_path, f"    codes: {bad}\n")
        assert error in str(raised.value.errors[0])


def test_store_answers_links_and_codes_of_a_message(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    id = lab.deliver("ann@netd.test", body="Code 1234 at https://app.test/x")
    assert result_of(lab.store.item(f"{id}/links")) == {"links": ["https://app.test/x"]}
    assert result_of(lab.store.item(f"{id}/codes")) == {"codes": ["1234"]}
    assert result_of(lab.store.item(f"{id}/other")) is None
    assert result_of(lab.store.item("missing/links")) is None
    assert result_of(lab.store.remove(id)) == {"deleted": 1}
    assert result_of(lab.store.remove(id)) is None


def test_imap_list_status_and_search_body_against_text(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    lab.deliver("ann@netd.test", subject="hello", body="world")
    session, transport = lab.imap()
    session.dataReceived(b"a LOGIN ann@netd.test x\r\n")
    said(transport)
    for command, listed in (
        (b'LIST "" "*"', [b'* LIST (\\HasNoChildren) "/" "INBOX"']),
        (b'LIST "" "in%"', [b'* LIST (\\HasNoChildren) "/" "INBOX"']),
        (b'LIST "" ""', [b'* LIST (\\Noselect) "/" ""']),
        (b'LIST "" "Other*"', []),
    ):
        session.dataReceived(b"l " + command + b"\r\n")
        assert said(transport)[:-1] == listed, command
    for _ in range(3):
        session.dataReceived(b"s STATUS INBOX (MESSAGES UNSEEN UIDNEXT)\r\n")
        assert said(transport)[0] == b"* STATUS INBOX (MESSAGES 1 UNSEEN 1 UIDNEXT 2)"
    assert lab.mailboxes.inboxes == []  # STATUS views do not follow the store
    session.dataReceived(b"x SELECT INBOX\r\n")
    said(transport)
    assert len(lab.mailboxes.inboxes) == 1
    for keys, found in ((b"TEXT hello", b"* SEARCH 1"), (b"BODY hello", b"* SEARCH ")):
        session.dataReceived(b"f SEARCH " + keys + b"\r\n")
        assert said(transport)[0] in (found, found.rstrip()), keys
    session.dataReceived(b"c CLOSE\r\n")
    assert lab.mailboxes.inboxes == []


def test_pop3_deleted_messages_leave_stat_and_list(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    for _ in range(2):
        lab.deliver("ann@netd.test")
    session, transport = lab.pop3()
    session.dataReceived(b"USER ann@netd.test\r\nPASS x\r\nDELE 1\r\n")
    said(transport)
    session.dataReceived(b"STAT\r\n")
    lab.clock.advance(0)
    size = lab.store.messages[list(lab.store.messages)[1]].size
    assert said(transport) == [b"+OK 1 %d" % size]
    session.dataReceived(b"LIST\r\nLIST 1\r\nLIST 2\r\nUIDL 1\r\nLIST x\r\n")
    assert said(transport) == [
        b"+OK 1 messages",
        b"2 %d" % size,
        b".",
        b"-ERR no such message",
        b"+OK 2 %d" % size,
        b"-ERR no such message",
        b"-ERR no such message",
    ]
    session.dataReceived(b"UIDL\r\nRETR 1\r\n")
    assert said(transport) == [
        b"+OK 1 messages",
        b"2 " + list(lab.store.messages)[1].encode(),
        b".",
        b"-ERR message deleted",
    ]


def test_eight_bit_headers_go_out_seven_bit_and_are_searched_decoded(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    data = "Subject: Grüße =?utf-8?q?caf=C3=A9?=\r\nFrom: Jörg <j@x.test>\r\n\r\nHällo\r\n"
    lab.accept_raw(data.encode(), sender=Mailbox("shop", "client.test"))
    [listed] = result_of(lab.store.list({}))["messages"]
    assert listed["subject"] == "Grüße =?utf-8?q?caf=C3=A9?="
    assert ["From", "Jörg <j@x.test>"] in listed["headers"]
    session, transport = lab.ann_selected()
    session.dataReceived(b"c FETCH 1 (ENVELOPE)\r\n")
    lab.clock.advance(0)
    envelope = said(transport)[0]
    assert envelope.startswith(b'* 1 FETCH (ENVELOPE (NIL "=?utf-8?b?')
    assert b'(("=?utf-8?b?SsO2cmc=?=" NIL "j" "x.test"))' in envelope
    assert not transport.disconnecting
    for needle in ("grüße".encode(), b"CAF\xc3\xa9", "jörg".encode()):
        key = b"FROM" if needle.startswith(b"j") else b"SUBJECT"
        session.dataReceived(b"s SEARCH CHARSET UTF-8 " + key + b" " + needle + b"\r\n")
        assert said(transport)[0] == b"* SEARCH 1", needle


def test_search_strings_may_be_literals(tmp_path: Path) -> None:
    """imapclient and Thunderbird send a non-ASCII search string as a literal (RFC 3501 4.3)."""
    lab = Lab(tmp_path)
    lab.accept_raw("Subject: Grüße\r\nFrom: Jörg <j@x.test>\r\n\r\nx\r\n".encode())
    lab.accept_raw(b"Subject: other\r\nFrom: j@x.test\r\n\r\nx\r\n")
    session, transport = lab.ann_selected()
    session.dataReceived(b"s UID SEARCH CHARSET UTF-8 SUBJECT {7}\r\n")
    assert said(transport) == [b"+ Ready for 7 octets of text"]
    # A literal may hold what would end a line, and another may follow it.
    session.dataReceived("Grüße FROM {5}\r\n".encode())
    assert said(transport) == [b"+ Ready for 5 octets of text"]
    session.dataReceived("Jörg NOT SUBJECT {2}\r\n".encode())
    assert said(transport) == [b"+ Ready for 2 octets of text"]
    session.dataReceived(b"}\n\r\nt NOOP\r\n")
    assert said(transport) == [
        b"* SEARCH 1",
        b"s OK SEARCH completed",
        b"t OK NOOP No operation performed",
    ]


def test_the_whole_header_goes_as_stored_without_utf8_accept(tmp_path: Path) -> None:
    """fetchmail joins RFC822.HEADER and BODY[TEXT]: they must make BODY[], 8-bit and all."""
    lab = Lab(tmp_path)
    head = "Subject: Grüße\r\nFrom: Jörg <j@x.test>\r\n\r\n".encode()
    id = lab.accept_raw(head + "Hällo\r\n".encode(), sender=Mailbox("shop", "client.test"))
    received: bytes = result_of(lab.store.read(id))
    session, transport = lab.ann_selected()
    stored = transport.value()
    session.dataReceived(
        b"c FETCH 1 (RFC822.SIZE RFC822.HEADER BODY.PEEK[HEADER]"
        b" BODY.PEEK[HEADER.FIELDS (FROM)])\r\n"
    )
    lab.clock.advance(0)
    answer = transport.value()[len(stored) :]
    whole = received[: received.index(b"\r\n\r\n") + 4]
    assert b"RFC822.SIZE %d " % len(received) in answer
    assert b"RFC822.HEADER {%d}\r\n%s" % (len(whole), whole) in answer
    assert b"BODY[HEADER] {%d}\r\n%s" % (len(whole), whole) in answer
    # A field asked by name is what a client shows: it stays 7-bit.
    assert b"From: =?utf-8?b?SsO2cmc=?= <j@x.test>\r\n\r\n" in answer


def test_a_header_in_a_codec_that_is_no_mail_charset_is_searched_as_utf_8(
    tmp_path: Path,
) -> None:
    """punycode words, joined by the email package, decoded in quadratic time on the reactor."""
    lab = Lab(tmp_path)
    data = b"Subject: =?punycode?q?caf=C3=A9-?= =?punycode?q?menu?=\r\n\r\nx\r\n"
    lab.accept_raw(data, sender=Mailbox("shop", "client.test"))
    [listed] = result_of(lab.store.list({"subject": "café-menu"}))["messages"]
    assert listed["subject"] == "café-menu"
    session, transport = lab.ann_selected()
    session.dataReceived("s SEARCH CHARSET UTF-8 SUBJECT café-menu\r\n".encode())
    assert said(transport)[0] == b"* SEARCH 1"


def test_utf8_accept_sends_headers_as_they_are(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    data = "Subject: Grüße\r\nFrom: Jörg <jörg@bücher.test>\r\n\r\nHällo\r\n".encode()
    lab.accept_raw(data, sender=Mailbox("jörg", "bücher.test"), utf8=True)
    session, transport = lab.imap()
    assert b" ENABLE " in said(transport)[0]
    session.dataReceived(b"a LOGIN ann@netd.test x\r\nb ENABLE\r\n")
    assert said(transport)[-1].startswith(b"b BAD")
    session.dataReceived(b"c ENABLE CONDSTORE utf8=accept\r\nd ENABLE UTF8=ACCEPT\r\n")
    assert said(transport)[-3:] == [
        b"* ENABLED UTF8=ACCEPT",
        b"c OK ENABLE completed",
        b"d OK ENABLE completed",
    ]
    session.dataReceived(b"e SELECT INBOX\r\nf ENABLE UTF8=ACCEPT\r\n")
    assert said(transport)[-1].startswith(b"f BAD")  # only before SELECT (RFC 5161)
    session.dataReceived(b"g FETCH 1 (ENVELOPE BODY.PEEK[HEADER.FIELDS (FROM SUBJECT)])\r\n")
    lab.clock.advance(0)
    answer = transport.value()
    assert '(NIL "Grüße" (("Jörg" NIL "jörg" "bücher.test"))'.encode() in answer
    assert "Subject: Grüße\r\nFrom: Jörg <jörg@bücher.test>\r\n".encode() in answer
    # A session that did not enable it still gets 7-bit ENVELOPEs.
    other, other_transport = lab.imap()
    other.dataReceived(b"a LOGIN ann@netd.test x\r\nb SELECT INBOX\r\nc FETCH 1 (ENVELOPE)\r\n")
    lab.clock.advance(0)
    assert other_transport.value().isascii()


@pytest.mark.parametrize(
    "data",
    [
        b"Subject: single\r\n\r\nbody\r\n",
        b"Content-Type: multipart/mixed; boundary=zz\r\n\r\n--zz\r\n\r\none\r\n--zz--\r\n",
        b"Content-Type: multipart/mixed\r\n\r\nno boundary\r\n",
        b"Content-Type: text\r\nDate: not a date\r\nFrom: <<>>@@\r\n\r\nx\r\n",
    ],
)
def test_a_part_the_message_lacks_is_nil_and_the_session_goes_on(
    tmp_path: Path, data: bytes
) -> None:
    lab = Lab(tmp_path)
    lab.accept_raw(data)
    session, transport = lab.ann_selected()
    session.dataReceived(b"c FETCH 1 (BODY[5] BODY[1.3] ENVELOPE BODYSTRUCTURE)\r\n")
    for _ in range(3):
        lab.clock.advance(0)
    answer = transport.value()
    assert answer.startswith(b"* 1 FETCH (BODY[5] NIL BODY[1.3] NIL ENVELOPE (")
    assert answer.endswith(b"c OK FETCH completed\r\n") and not transport.disconnecting


# Messages and the BODYSTRUCTURE and BODY Dovecot 2.3 answered for each (FETCH n
# (BODYSTRUCTURE BODY)), read from a Maildir.
DOVECOT_STRUCTURES = [
    (
        b"Subject: one\r\n\r\nhello\r\nworld\r\n",
        b'BODYSTRUCTURE ("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 14 2 NIL NIL '
        b'NIL NIL) BODY ("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 14 2)',
    ),
    (
        b"Subject: two\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nline\r\n\r\nlast "
        b"without crlf",
        b'BODYSTRUCTURE ("text" "plain" ("charset" "utf-8") NIL NIL "7bit" 25 2 NIL NIL '
        b'NIL NIL) BODY ("text" "plain" ("charset" "utf-8") NIL NIL "7bit" 25 2)',
    ),
    (
        b"Subject: three\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\nAAAA\r\nBBBB\r\n",
        b'BODYSTRUCTURE ("application" "octet-stream" NIL NIL NIL "base64" 12 NIL NIL NIL '
        b'NIL) BODY ("application" "octet-stream" NIL NIL NIL "base64" 12)',
    ),
    (
        b"Subject: four\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; "
        b"boundary=XX\r\n\r\npre\r\n--XX\r\nContent-Type: text/plain\r\n\r\npart one\r\n"
        b"second\r\n--XX\r\nContent-Type: text/html\r\n\r\n<p>x</p>\r\n--XX--\r\n",
        b'BODYSTRUCTURE (("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 16 1 NIL '
        b'NIL NIL NIL)("text" "html" ("charset" "us-ascii") NIL NIL "7bit" 8 0 NIL NIL NIL '
        b'NIL) "mixed" ("boundary" "XX") NIL NIL NIL) BODY (("text" "plain" ("charset" '
        b'"us-ascii") NIL NIL "7bit" 16 1)("text" "html" ("charset" "us-ascii") NIL NIL '
        b'"7bit" 8 0) "mixed")',
    ),
    (
        b"Subject: five\r\n\r\n",
        b'BODYSTRUCTURE ("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0 NIL NIL '
        b'NIL NIL) BODY ("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0)',
    ),
    (
        b'Subject: six\r\nContent-Type: multipart/mixed; boundary="a b"\r\n'
        b"Content-Language: en, de\r\n\r\n--a b\r\nContent-Type: multipart/alternative; "
        b"boundary=in\r\n\r\n--in\r\n\r\nno header part\r\n--in\r\nContent-Type: "
        b'text/html; charset="UTF-8"\r\nContent-ID: <x@y>\r\nContent-Description: the '
        b"html\r\n\r\n<b>hi</b>\r\n\r\n--in--\r\n--a b\r\nContent-Type: application/pdf; "
        b'name="r.pdf"\r\nContent-Disposition: attachment; filename="r.pdf"; size=3\r\n'
        b"Content-Transfer-Encoding: BASE64\r\nContent-Location: http://x/y\r\n"
        b"Content-MD5: abc\r\n\r\nQUJD\r\n--a b\r\nContent-Type: message/rfc822\r\n\r\n"
        b"From: A <a@b.test>\r\nTo: c@d.test, e@f.test\r\nSubject: inner\r\nDate: Mon, 1 "
        b"Jan 2024 00:00:00 +0000\r\nMessage-ID: <m@x>\r\n\r\ninner body\r\nline 2\r\n--a "
        b"b--\r\nepilogue\r\n",
        b'BODYSTRUCTURE ((("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 14 0 NIL '
        b'NIL NIL NIL)("text" "html" ("charset" "UTF-8") "<x@y>" "the html" "7bit" 11 1 '
        b'NIL NIL NIL NIL) "alternative" ("boundary" "in") NIL NIL NIL)("application" '
        b'"pdf" ("name" "r.pdf") NIL NIL "BASE64" 4 "abc" ("attachment" ("filename" '
        b'"r.pdf" "size" "3")) NIL "http://x/y")("message" "rfc822" NIL NIL NIL "7bit" 137 '
        b'("Mon, 1 Jan 2024 00:00:00 +0000" "inner" (("A" NIL "a" "b.test")) (("A" NIL "a" '
        b'"b.test")) (("A" NIL "a" "b.test")) ((NIL NIL "c" "d.test")(NIL NIL "e" '
        b'"f.test")) NIL NIL NIL "<m@x>") ("text" "plain" ("charset" "us-ascii") NIL NIL '
        b'"7bit" 18 1 NIL NIL NIL NIL) 7 NIL NIL NIL NIL) "mixed" ("boundary" "a b") NIL '
        b'("en" "de") NIL) BODY ((("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 14 '
        b'0)("text" "html" ("charset" "UTF-8") "<x@y>" "the html" "7bit" 11 1) '
        b'"alternative")("application" "pdf" ("name" "r.pdf") NIL NIL "BASE64" '
        b'4)("message" "rfc822" NIL NIL NIL "7bit" 137 ("Mon, 1 Jan 2024 00:00:00 +0000" '
        b'"inner" (("A" NIL "a" "b.test")) (("A" NIL "a" "b.test")) (("A" NIL "a" '
        b'"b.test")) ((NIL NIL "c" "d.test")(NIL NIL "e" "f.test")) NIL NIL NIL "<m@x>") '
        b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 18 1) 7) "mixed")',
    ),
    (
        b"Subject: seven\r\nContent-Type: multipart/mixed; boundary=zz\r\n\r\n--zz\r\n"
        b"Content-Type: text/plain\r\n\r\nunterminated\r\nmore\r\n",
        b'BODYSTRUCTURE (("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 20 2 NIL '
        b'NIL NIL NIL) "mixed" ("boundary" "zz") NIL NIL NIL) BODY (("text" "plain" '
        b'("charset" "us-ascii") NIL NIL "7bit" 20 2) "mixed")',
    ),
    (
        b"Subject: eight\r\nContent-Type: text/plain; format=flowed; charset=iso-8859-1\r\n"
        b"Content-Disposition: inline\r\n\r\na\r\nb\r\n",
        b'BODYSTRUCTURE ("text" "plain" ("format" "flowed" "charset" "iso-8859-1") NIL NIL '
        b'"7bit" 6 2 NIL ("inline" NIL) NIL NIL) BODY ("text" "plain" ("format" "flowed" '
        b'"charset" "iso-8859-1") NIL NIL "7bit" 6 2)',
    ),
]


@pytest.mark.parametrize(("data", "dovecot"), DOVECOT_STRUCTURES)
def test_body_and_bodystructure_are_what_dovecot_answers(
    tmp_path: Path, data: bytes, dovecot: bytes
) -> None:
    lab = Lab(tmp_path)
    lab.accept_raw(data)
    session, transport = lab.ann_selected()
    session.dataReceived(b"c FETCH 1 (BODYSTRUCTURE BODY)\r\n")
    for _ in range(3):
        lab.clock.advance(0)
    # Neither is a body section: no \Seen.
    assert said(transport) == [b"* 1 FETCH (" + dovecot + b")", b"c OK FETCH completed"]


def test_a_message_nested_too_deep_or_wide_is_described_to_a_limit(tmp_path: Path) -> None:
    deep = b"Subject: deep\r\n" + b"".join(
        b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (n, n) for n in range(300)
    )
    wide = b"Content-Type: multipart/mixed; boundary=w\r\n\r\n" + b"--w\r\n\r\nx\r\n" * 20_000
    lab = Lab(tmp_path)
    for data in (deep + b"\r\nx\r\n", wide):
        lab.accept_raw(data)
    session, transport = lab.ann_selected()
    session.dataReceived(b"c FETCH 1:2 BODYSTRUCTURE\r\n")
    for _ in range(3):
        lab.clock.advance(0)
    first, second, done = said(transport)
    # 100 multiparts deep, then the rest as one text part; 10,000 parts listed.
    assert first.count(b'"mixed" ("boundary"') == 100 and b'"b99"' in first
    assert first.count(b'"text" "plain"') == 1
    assert second.count(b'("text" "plain" ("charset" "us-ascii")') == 9_999
    assert done == b"c OK FETCH completed"
    session.dataReceived(b"d NOOP\r\n")
    assert said(transport) == [b"d OK NOOP No operation performed"]


class HeldThreads:
    """A spool's thread runner that holds each job until the test runs it."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Callable[[], Any], Deferred[Any]]] = []

    def __call__(self, work: Callable[[], Any]) -> Deferred[Any]:
        done: Deferred[Any] = Deferred()
        self.jobs.append((work, done))
        return done

    def run(self) -> int:
        """Run the jobs waiting (not those they start); how many there were."""
        jobs, self.jobs = self.jobs, []
        for work, done in jobs:
            done.callback(work())
        return len(jobs)


def test_bodystructure_is_worked_out_in_a_thread_once_per_message(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    id = lab.accept_raw(
        b"Subject: two\r\nContent-Type: multipart/mixed; boundary=z\r\n\r\n"
        b"--z\r\n\r\none\r\n--z\r\nContent-Type: text/html\r\n\r\n<p>two\r\n--z--\r\n"
    )
    reader, transport = lab.ann_selected()
    other, other_transport = lab.ann_selected()
    threads = HeldThreads()
    lab.store.spool.run = threads
    reader.dataReceived(b"c FETCH 1 (BODYSTRUCTURE BODY)\r\n")
    assert threads.run() == 1  # the read
    # Described in a thread: meanwhile the FETCH waits, another session does not.
    assert said(transport) == []
    other.dataReceived(b"d NOOP\r\n")
    assert said(other_transport) == [b"d OK NOOP No operation performed"]
    assert threads.run() == 1
    lab.clock.advance(0)
    answer, done = said(transport)
    assert answer.startswith(b'* 1 FETCH (BODYSTRUCTURE (("text" "plain" ("charset" "us-ascii")')
    assert b' BODY (("text" "plain"' in answer and done == b"c OK FETCH completed"
    # Kept: another session's FETCH reads the message, and describes nothing.
    other.dataReceived(b"e FETCH 1 (BODYSTRUCTURE BODY)\r\n")
    assert threads.run() == 1 and threads.jobs == []
    lab.clock.advance(0)
    assert said(other_transport) == [answer, b"e OK FETCH completed"]
    assert len(lab.mailboxes.structures) == 2
    lab.store.spool.run = maybeDeferred
    result_of(lab.store.remove(id))
    assert lab.mailboxes.structures == {} and lab.mailboxes.structure_octets == 0


def test_kept_structures_are_bounded_oldest_first(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    first, second = lab.deliver("ann@netd.test"), lab.deliver("ann@netd.test")
    half = b"x" * (KEPT_STRUCTURE_OCTETS // 2)
    lab.mailboxes.keep_structure((first, True, False), half)
    lab.mailboxes.keep_structure((second, True, False), half)
    lab.mailboxes.keep_structure((second, False, False), b"y")
    assert list(lab.mailboxes.structures) == [(second, True, False), (second, False, False)]
    assert lab.mailboxes.structure_octets == len(half) + 1
    lab.mailboxes.keep_structure(("gone", True, False), b"z")  # removed while worked out
    assert ("gone", True, False) not in lab.mailboxes.structures


class _CountingOctets(bytes):
    """A message that counts the octets its finds and counts look at."""

    looked_at = 0

    def find(self, sub: Any, start: Any = 0, end: Any = None) -> int:
        found = super().find(sub, start, end)
        stop = len(self) if end is None else end
        self.looked_at += (found + len(sub) if found >= 0 else stop) - start
        return found

    def count(self, sub: Any, start: Any = 0, end: Any = None) -> int:
        self.looked_at += (len(self) if end is None else end) - start
        return super().count(sub, start, end)


def test_a_message_nested_100_deep_is_read_in_one_pass_over_its_octets() -> None:
    # A scan of the body for each level cost 100 scans of a message nested
    # 100 deep: 14 s of the reactor's time for a 10 MB one.
    levels = b"".join(
        b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (n, n) for n in range(100)
    )
    body = (b"y" * 76 + b"\r\n") * 20_000
    message = _CountingOctets(b"Subject: deep\r\n" + levels + b"\r\n" + body)
    structure = body_structure(message, extended=False)
    for _ in range(100):
        structure = structure[0]
    assert structure == [
        "text",
        "plain",
        ["charset", "us-ascii"],
        None,
        None,
        "7bit",
        len(body),
        20_000,
    ]
    # Each octet looked at a few times (its header, its lines), not once a level.
    assert message.looked_at < 3 * len(message)


def test_a_message_of_10000_parts_is_described_in_a_bounded_time() -> None:
    part = b"--w\r\nContent-Type: text/plain; charset=utf-8\r\nContent-ID: <%d@x>\r\n\r\nx\r\n"
    wide = b"Content-Type: multipart/mixed; boundary=w\r\n\r\n" + b"".join(
        part % n for n in range(20_000)
    )
    started = time.perf_counter()
    structure = body_structure(wide, extended=True)
    # Generous, for a loaded machine: under a second alone.
    assert time.perf_counter() - started < 10
    assert len(structure) == 9_999 + 5 and structure[-5] == "mixed"
    assert structure[9_998][3] == "<9998@x>"


def test_each_build_of_a_spools_mailboxes_has_a_larger_uid_validity(tmp_path: Path) -> None:
    first = uid_validity(tmp_path / "a", 1_800_000_000.5)
    assert first == 1_800_000_000
    assert uid_validity(tmp_path / "a", 1_800_000_000.9) == first + 1  # a reload, same second
    assert uid_validity(tmp_path / "b", 1_800_000_000.9) == first
    assert uid_validity(tmp_path / "a", 1_900_000_000) == 1_900_000_000


def test_three_failed_logins_end_the_session(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    imap, imap_transport = lab.imap()
    pop3, pop3_transport = lab.pop3()
    said(imap_transport)
    said(pop3_transport)
    for attempt in (1, 2, 3):
        imap.dataReceived(b"a%d LOGIN nobody x\r\n" % attempt)
        pop3.dataReceived(b"USER nobody\r\nPASS x\r\n")
        lab.clock.advance(0)
        lines = said(imap_transport)
        assert lines[0] == b"a%d NO LOGIN failed" % attempt
        assert (b"* BYE Too many failed logins" in lines) == (attempt == 3)
        assert said(pop3_transport)[-1] == b"-ERR Authentication failed"
        assert imap_transport.disconnecting == pop3_transport.disconnecting == (attempt == 3)


def test_fetching_a_body_sets_seen_and_says_so_once(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    lab.deliver("ann@netd.test", body="text")
    session, transport = lab.imap()
    session.dataReceived(b"a LOGIN ann@netd.test x\r\nb EXAMINE INBOX\r\n")
    said(transport)
    session.dataReceived(b"c FETCH 1 (BODY[TEXT])\r\n")  # read-only: nothing set
    pump(lab, transport)
    assert said(transport)[-1] == b"c OK FETCH completed"
    assert lab.mailboxes.flags[next(iter(lab.store.messages))] == set()
    session.dataReceived(b"d SELECT INBOX\r\n")
    said(transport)
    for tag in (b"e", b"f"):
        session.dataReceived(tag + b" FETCH 1 (BODY[TEXT])\r\n")
        pump(lab, transport)
        answer = transport.value()
        transport.clear()
        assert answer.endswith(tag + b" OK FETCH completed\r\n")
        assert (b" FLAGS (\\Seen))\r\n" in answer) == (tag == b"e")


def test_pop3_stuffs_a_dot_at_the_start_of_a_message_or_of_a_chunk(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    lab.deliver("ann@netd.test")
    session, _ = lab.pop3()
    session.dataReceived(b"USER ann@netd.test\r\nPASS x\r\n")
    # Twisted's file sender hands RETR's message over in 16 KiB chunks, lines
    # ending in LF, through transformChunk; a line may start a chunk.
    session.dataReceived(b"RETR 1\r\n")
    chunks = [b".first\nmid", b"dle\n", b".line\n.\n", b"", b"..two\n"]
    sent = b"".join(session.transformChunk(chunk) for chunk in chunks)
    assert sent == b"..first\r\nmiddle\r\n..line\r\n..\r\n...two\r\n"
    session.do_TOP(b"1", b"0")  # a new answer starts at a line's start
    assert session.transformChunk(b".x") == b"..x"


def test_commands_piling_up_behind_an_answer_stop_the_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(imap_module, "FETCH_BATCH", 1)
    lab = Lab(tmp_path)
    lab.deliver("ann@netd.test", body="x" * 50_000)
    lab.deliver("ann@netd.test", body="y" * 50_000)
    imap, imap_transport = lab.imap(transport=SlowReader())
    imap.dataReceived(b"a LOGIN ann@netd.test x\r\nb SELECT INBOX\r\nc FETCH 1:2 (BODY[])\r\n")
    lab.clock.advance(0)  # the first message is out; the second waits for the socket
    pop3, pop3_transport = lab.pop3()
    pop3.dataReceived(b"USER ann@netd.test\r\nPASS x\r\nRETR 1\r\n")
    for session, transport, command in (
        (imap, imap_transport, b"n NOOP\r\n"),
        (pop3, pop3_transport, b"NOOP\r\n"),
    ):
        session.dataReceived(b"BOGUS\r\n" + command * (MAX_WAITING_COMMANDS - 2))
        assert transport.producerState == "producing"
        session.dataReceived(command)
        assert transport.producerState == "paused"
        pump(lab, transport)
        assert transport.producerState == "producing"
        # Every command queued is answered, the bad one too.
        assert transport.value().count(b"OK") >= MAX_WAITING_COMMANDS - 1
        assert b"BAD" in transport.value() or b"-ERR" in transport.value()


def test_a_fetch_of_many_reads_a_batch_at_a_time_and_waits_while_the_client_lags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(imap_module, "FETCH_BATCH", 2)
    lab = Lab(tmp_path)
    for number in range(5):
        lab.deliver("ann@netd.test", body=f"message {number}")
    reads: list[list[str]] = []
    read_many = lab.store.read_many

    def counted(ids: list[str]) -> Any:
        reads.append(ids)
        return read_many(ids)

    monkeypatch.setattr(lab.store, "read_many", counted)
    session, transport = lab.imap(transport=SlowReader())
    session.dataReceived(b"a LOGIN ann@netd.test x\r\nb SELECT INBOX\r\n")
    transport.clear()
    transport.writes = 0
    session.dataReceived(b"c FETCH 1:* (BODY.PEEK[])\r\n")
    lab.clock.advance(0)
    # One batch read and written, in one write; then the full socket stops it.
    assert [len(ids) for ids in reads] == [2]
    assert transport.writes == 1
    assert transport.value().count(b" FETCH (") == 2
    pump(lab, transport)
    assert [len(ids) for ids in reads] == [2, 2, 1]
    answer = transport.value()
    assert [answer.count(b"message %d" % n) for n in range(5)] == [1] * 5
    # A write a batch; the last batch and the tagged OK went out in one write.
    assert transport.writes == 3
    assert answer.endswith(b"message 4\r\n)\r\nc OK FETCH completed\r\n")
    session.dataReceived(b"d NOOP\r\n")
    assert transport.value().endswith(b"d OK NOOP No operation performed\r\n")


def test_a_client_fetching_one_message_after_another_has_the_next_ones_read_ahead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(imap_module, "FETCH_BATCH", 3)
    lab = Lab(tmp_path)
    ids = [lab.deliver("ann@netd.test", body=f"message {number}") for number in range(1, 7)]
    reads: list[list[str]] = []
    read_many = lab.store.read_many

    def counted(wanted: list[str]) -> Any:
        reads.append(wanted)
        return read_many(wanted)

    monkeypatch.setattr(lab.store, "read_many", counted)
    session, transport = lab.imap()
    session.dataReceived(b"a LOGIN ann@netd.test x\r\nb SELECT INBOX\r\n")
    for number in (1, 2, 3, 5, 4):
        transport.clear()
        session.dataReceived(b"f FETCH %d (BODY.PEEK[])\r\n" % number)
        pump(lab, transport)
        assert b"message %d" % number in transport.value()
    # 2, after 1, read 3 and 4 with it; 5 came out of order, so 4 was dropped
    # and is read on its own.
    assert reads == [[ids[0]], ids[1:4], [ids[4]], [ids[3]]]
    session.dataReceived(b"f FETCH 5 (BODY.PEEK[])\r\n")
    pump(lab, transport)
    assert reads[-1] == [ids[4], ids[5]]
    assert list(session.mbox.read_ahead) == [ids[5]]
    result_of(lab.store.remove(ids[5]))  # read ahead, then deleted: not kept for it
    assert session.mbox.read_ahead == {}


def test_a_fetch_names_messages_by_ranges_clamped_to_the_mailbox(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    for number in range(5):
        lab.deliver("ann@netd.test", body=f"message {number}")
    session, transport = lab.imap()
    session.dataReceived(b"a LOGIN ann@netd.test x\r\nb SELECT INBOX\r\n")
    for ranges, numbers in (
        (b"4:2,5", [2, 3, 4, 5]),
        (b"9:*", [5]),
        (b"1,1:2", [1, 2]),
        (b"1:1000000", [1, 2, 3, 4, 5]),
    ):
        transport.clear()
        session.dataReceived(b"c FETCH " + ranges + b" (FLAGS)\r\n")
        pump(lab, transport)
        lines = said(transport)
        assert lines[-1] == b"c OK FETCH completed"
        assert [int(line.split()[1]) for line in lines[:-1]] == numbers


def test_a_fetch_of_many_index_only_batches_answers_them_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Batches from the index alone are written in a loop, not a recursion per batch.
    monkeypatch.setattr(imap_module, "FETCH_BATCH", 1)
    lab = Lab(tmp_path)
    for _ in range(1500):
        lab.deliver("ann@netd.test")
    session, transport = lab.imap()
    session.dataReceived(b"a LOGIN ann@netd.test x\r\nb SELECT INBOX\r\n")
    transport.clear()
    session.dataReceived(b"c FETCH 1:* (FLAGS)\r\nd NOOP\r\n")
    pump(lab, transport)
    lines = said(transport)
    assert len(lines) == 1502
    assert lines[-2:] == [b"c OK FETCH completed", b"d OK NOOP No operation performed"]


def test_a_uid_fetch_names_messages_by_uid_ranges(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    for number in range(5):
        lab.deliver("ann@netd.test", body=f"message {number}")
    session, transport = lab.imap()
    session.dataReceived(b"a LOGIN ann@netd.test x\r\nb SELECT INBOX\r\n")
    session.dataReceived(b"c STORE 2 +FLAGS (\\Deleted)\r\nd EXPUNGE\r\n")
    pump(lab, transport)
    for ranges, uids in (
        (b"1:3", [1, 3]),
        (b"2", []),
        (b"4:2,5", [3, 4, 5]),
        (b"9:*", [5]),
        (b"1:4294967295", [1, 3, 4, 5]),
    ):
        transport.clear()
        session.dataReceived(b"e UID FETCH " + ranges + b" (FLAGS)\r\n")
        pump(lab, transport)
        lines = said(transport)
        assert lines[-1] == b"e OK FETCH completed"
        assert [int(line.split(b"UID ")[1].split(b")")[0]) for line in lines[:-1]] == uids


@pytest.mark.parametrize(
    ("lines", "top"),
    [
        (0, b"A: 1\nB: 2\n\n"),
        (1, b"A: 1\nB: 2\n\n" + b"L" * 40_000 + b"\n"),
        (2, b"A: 1\nB: 2\n\n" + b"L" * 40_000 + b"\n\n"),
        (9, b"A: 1\nB: 2\n\n" + b"L" * 40_000 + b"\n\nend\n"),
    ],
)
def test_pop3_top_is_the_header_and_so_many_body_lines(lines: int, top: bytes) -> None:
    # RFC 1939 7: a line of any length counts as one, a blank one too.
    message = b"A: 1\nB: 2\n\n" + b"L" * 40_000 + b"\n\nend\n"
    assert top_of(message, lines) == top
    assert top_of(b"A: 1\nno blank line\n", 3) == b"A: 1\nno blank line\n"


NESTED = (
    b'Content-Type: multipart/mixed; boundary="o"\r\n\r\n'
    b"--o\r\n\r\none\r\n"
    b'--o\r\nContent-Type: multipart/alternative; boundary="i"\r\n\r\n'
    b"--i\r\n\r\nalt one\r\n--i\r\n\r\nalt two\r\n--i--\r\n"
    b"--o\r\nContent-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\ninner body\r\n"
    b"--o--\r\n"
)


@pytest.mark.parametrize(
    ("numbers", "body"),
    [
        ((0,), b"one"),
        ((1, 0), b"alt one"),
        ((1, 1), b"alt two"),
        ((2,), b"Subject: inner\r\n\r\ninner body"),  # a message/rfc822 part's body: the message
        ((2, 0), b"inner body"),  # part 1 of a single-part message: its body
        ((3,), None),
        ((2, 1), None),
    ],
)
def test_section_numbers_name_entities(numbers: tuple[int, ...], body: bytes | None) -> None:
    found = section_entity(mime.read(NESTED), numbers)
    assert (None if found is None else NESTED[found.body_start : found.end]) == body


def test_header_fields_end_at_crlf_only() -> None:
    # A binary (BDAT) message's header may hold a bare LF: text of its line, not a field's
    # end; a line that starts with whitespace is a folded line, kept as it came.
    block = b"From: a@b\r\nBare: x\ny\r\nX-Odd:\r\n\tthree\r\nTo: c@d\r\n\r\n"
    assert header_section(block, [b"BARE"], False, True) == b"Bare: x\ny\r\n\r\n"
    assert header_section(block, [b"X-ODD", b"TO"], False, True) == (
        b"X-Odd:\r\n\tthree\r\nTo: c@d\r\n\r\n"
    )
    odd = b" leading: ws\r\nFrom: x\r\n\r\n"
    assert header_section(odd, [b"FROM"], False, True) == b"From: x\r\n\r\n"
    assert header_section(odd, [b"FROM"], True, True) == b" leading: ws\r\n\r\n"


def test_a_search_that_fails_is_answered_and_lets_the_next_commands_run(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    lab.deliver("ann@netd.test", subject="one")
    session, transport = lab.imap()
    session.dataReceived(b"a LOGIN ann@netd.test anything\r\nb SELECT INBOX\r\n")
    said(transport)

    def broken(query: Any, uid: bool) -> Any:
        raise RuntimeError("a fault of the mailbox's")

    session.mbox.search = broken  # this session's mailbox object only
    session.dataReceived(b"c SEARCH ALL\r\nd NOOP\r\n")
    lines = said(transport)
    assert lines[0] == b"c NO SEARCH failed" and lines[-1].startswith(b"d OK")
    assert session.blocked is None
