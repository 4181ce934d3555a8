"""
The smtp kind's message store: what the spool holds, indexed in memory for the
admin API, and the hand-over from a session to the spool and on to delivery.
"""

from __future__ import annotations

import email.errors
import email.header
import email.parser
import email.policy
import functools
import re
from collections.abc import Callable, Iterable, Mapping
from email.utils import formatdate
from pathlib import Path
from typing import Any, Protocol

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from netd.kinds import BuildContext, Holders, ViewRefused
from netd.listeners import StartupError
from netd.services.smtp import extract, mime
from netd.services.smtp.address import PathRefused, parse_path
from netd.services.smtp.namespace import derive_namespace
from netd.services.smtp.relay import Outcome, Releaser, error_reply
from netd.services.smtp.server import Transaction
from netd.services.smtp.spool import HEAD_BYTES, Envelope, Spool, new_id

__all__ = ["MailStore", "MailWatcher", "received_header"]


class MailWatcher(Protocol):
    """Told of every message the store gains or loses (the IMAP and POP3 mailboxes)."""

    def added(self, envelope: Envelope) -> None: ...
    def removed(self, envelopes: Iterable[Envelope]) -> None: ...


def _head(data: bytes) -> bytes:
    end = data.find(b"\r\n\r\n", 0, HEAD_BYTES)
    return data[: end + 2] if end >= 0 else data[:HEAD_BYTES]


def _client_literal(client: str) -> str:
    if not client:
        return "unix socket"
    return f"[IPv6:{client}]" if ":" in client else f"[{client}]"


def received_header(hostname: str, transaction: Transaction, id: str, now: float) -> bytes:
    """RFC 5321 4.4 trace line; "for" only with one recipient, so Bcc stays private."""
    text = (
        f"Received: from {transaction.helo or 'unknown'} ({_client_literal(transaction.client)})"
        f"\r\n\tby {hostname} (netd) with {transaction.protocol} id {id}"
    )
    if len(transaction.recipients) == 1:
        text += f"\r\n\tfor <{transaction.recipients[0]}>"
    return f"{text};\r\n\t{_date(int(now))}\r\n".encode()


@functools.lru_cache(maxsize=4)
def _date(second: int) -> str:
    # Messages arrive many a second; the RFC 5322 date changes once a second.
    return formatdate(second)


def _headers(head: bytes) -> list[list[str]]:
    parsed = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(head)
    return [[name, _text(value)] for name, value in parsed.raw_items()]


def _text(value: str) -> str:
    """8-bit (UTF-8) header text, which the parser kept as surrogates, as text."""
    if value.isascii():
        return value
    return value.encode("ascii", "surrogateescape").decode("utf-8", "replace")


# A line end that folds a header: unfolding drops it, keeping the white space (RFC 5322 2.2.3).
_FOLD = re.compile(r"\r?\n(?=[ \t])")


def _readable(value: str) -> str:
    """A header's text as it reads: unfolded, its RFC 2047 encoded words decoded."""
    text = _FOLD.sub("", value)
    if "=?" not in text:
        return text
    try:
        words = email.header.decode_header(text)
        readable = [(chunk, mime.mail_charset(cs) if cs else cs) for chunk, cs in words]
        return str(email.header.make_header(readable))
    except (LookupError, UnicodeError, email.errors.HeaderParseError):
        return text  # an unknown charset, a broken encoded word: as it came


# The key of the daemon's table (BuildContext.shared) of the store that serves
# each spool folder now.  During a reload the old service still takes mail on
# its open connections while the new one serves: what the old one spools is
# handed to the new one's index and delivery.
_SERVING = "smtp.store.serving"


class MailStore(Service):
    """
    Every message in the spool, in arrival order.

    @ivar deliver: called with each newly accepted or recovered envelope (and the
        message, when it is at hand) when a delivery mode sends mail on; None
        keeps messages (capture).
    @ivar codes: the regular expression one-time codes match (C{.../ID/codes}).
    @ivar releaser: sends a message on for C{POST .../ID/release}.
    """

    def __init__(
        self,
        spool: Spool,
        context: BuildContext,
        hostname: str,
        deliver: Callable[[Envelope, bytes | None], None] | None = None,
        codes: str = extract.DEFAULT_CODES,
        releaser: Releaser | None = None,
    ) -> None:
        self.spool = spool
        self.releaser = releaser
        self.codes = codes
        self.context = context
        self.serving: Holders[Path, MailStore] = context.shared(_SERVING, Holders)
        self.hostname = hostname
        self.deliver = deliver
        self.messages: dict[str, Envelope] = {}
        self.heads: dict[str, bytes] = {}
        self.summaries: dict[str, dict[str, Any]] = {}
        # Each message's namespace (netd.namespaces), derived from its envelope.
        self.namespaces: dict[str, str] = {}
        self.ready: Deferred[None] = Deferred()
        self.watchers: list[MailWatcher] = []
        self._recovered = False

    def startService(self) -> None:
        super().startService()
        self.serving.take(self.spool.directory, self)
        self.spool.recover().addCallbacks(self._recovered_from_disk, self._recovery_failed)

    def stopService(self) -> None:
        super().stopService()
        self.serving.leave(self.spool.directory, self)

    def _serving(self) -> MailStore:
        serving = self.serving.holder(self.spool.directory)
        return self if serving is None else serving

    def _recovered_from_disk(self, found: list[tuple[Envelope, bytes]]) -> None:
        for envelope, start in found:
            if envelope.id in self.messages:
                continue  # handed over by the service this one replaced
            self._add(envelope, _head(start))
            if self.deliver is not None:
                self.deliver(envelope, None)
        if found:
            self.context.emit("spool.recovered", messages=len(found))
        self._recovered = True
        self.ready.callback(None)

    def _recovery_failed(self, failure: Any) -> None:
        self.context.log.failure("reading the spool failed", failure)
        self._recovered = True
        self.ready.callback(None)

    def can_keep_mail(self) -> Deferred[None]:
        """
        Fails if the spool's folder could not be made or cannot be read (a
        file where it should be, no permission): a service that cannot keep
        mail must not answer 220 (L{Handlers.ready}).  Starts and makes
        nothing (recovery makes the folder as the service starts), so a reload
        asks it of a replacement while the service it replaces still serves,
        and one undone after leaves nothing behind.
        """

        def refused(failure: Failure) -> None:
            raise StartupError(
                f"services.{self.context.name}: cannot read its spool "
                f"{self.spool.directory}: {failure.getErrorMessage()}"
            )

        return self.spool.check().addErrback(refused)

    def _when_ready(self) -> Deferred[None]:
        if self._recovered:
            return succeed(None)
        waiting: Deferred[None] = Deferred()

        def wake(result: None) -> None:
            waiting.callback(None)

        self.ready.addCallback(wake)
        return waiting

    def _add(self, envelope: Envelope, head: bytes) -> None:
        self.messages[envelope.id] = envelope
        self.heads[envelope.id] = head
        namespace = derive_namespace(
            self.context.namespaces, envelope.recipients, envelope.user, envelope.client
        )
        if namespace is not None:
            self.namespaces[envelope.id] = namespace
        self.context.stats.gauge("smtp_spool_messages", len(self.messages))
        for watcher in self.watchers:
            watcher.added(envelope)

    def accept(self, transaction: Transaction) -> Deferred[str]:
        """Spool a message; the Deferred fires with its id once it is on disk."""
        now = self.context.reactor.seconds()
        id = new_id(now)
        data = received_header(self.hostname, transaction, id, now) + transaction.data
        envelope = Envelope(
            id=id,
            sender=str(transaction.sender) if transaction.sender is not None else "",
            recipients=tuple(str(r) for r in transaction.recipients),
            received=now,
            size=len(data),
            client=transaction.client,
            helo=transaction.helo,
            user=transaction.user,
            utf8=transaction.utf8,
            ret=transaction.ret,
            envid=transaction.envid,
            dsn=dict(transaction.dsn),
            binary=transaction.binary,
            eight_bit=transaction.eight_bit,
        )
        stored = self._store(envelope, data)

        def spooled(_: None) -> str:
            owner = self._serving()
            owner._add(envelope, _head(data))
            self.context.stats.count("smtp_messages_accepted")
            self.context.emit(
                "message.accepted",
                message_id=id,
                sender=envelope.sender,
                recipients=list(envelope.recipients),
                size=envelope.size,
                client=envelope.client,
                user=envelope.user,
                **_namespaced(owner.namespaces.get(id)),
            )
            if owner.deliver is not None:
                owner.deliver(envelope, data)
            return id

        return stored.addCallback(spooled)

    def add_own(self, envelope: Envelope, data: bytes) -> Deferred[None]:
        """
        Spool a message netd wrote itself (a bounce) and send it on, through
        the store serving the spool now: an old courier's report during a
        reload is the new one's to send.
        """

        def spooled(_: None) -> None:
            owner = self._serving()
            owner._add(envelope, _head(data))
            if owner.deliver is not None:
                owner.deliver(envelope, data)

        return self._store(envelope, data).addCallback(spooled)

    def _store(self, envelope: Envelope, data: bytes) -> Deferred[None]:
        """
        The spool's store, once recovery has read the spool: recovery creates
        its folder, and a message written while it lists the folder would be
        found there too and added twice (an IMAP mailbox would list it twice,
        under two UIDs; the courier delivers an id once).
        """
        if self._recovered:
            return self.spool.store(envelope, data)
        return self._when_ready().addCallback(lambda _: self.spool.store(envelope, data))

    def forget(self, ids: list[str]) -> Deferred[None]:
        """
        Remove messages from the index and the disk; during a reload, from the
        index of the store serving the spool now too (an old IMAP session's
        EXPUNGE, an old courier's delivery).
        """
        for store in dict.fromkeys((self, self._serving())):
            store._drop(ids)
        return self.spool.remove(ids)

    def replace(self, envelope: Envelope) -> None:
        """
        A queued message's envelope once some of its recipients are done with:
        the admin list shows those still to deliver, as the spool keeps them.
        """
        for store in dict.fromkeys((self, self._serving())):
            if envelope.id in store.messages:
                store.messages[envelope.id] = envelope

    def _drop(self, ids: list[str]) -> None:
        gone = [envelope for id in ids if (envelope := self.messages.pop(id, None)) is not None]
        self.context.stats.gauge("smtp_spool_messages", len(self.messages))
        if gone:
            # Before the headers go: an IMAP session keeps them for the messages
            # it still numbers until it says EXPUNGE.
            for watcher in self.watchers:
                watcher.removed(gone)
        for id in ids:
            self.heads.pop(id, None)
            self.summaries.pop(id, None)
            self.namespaces.pop(id, None)

    def read(self, id: str) -> Deferred[bytes | None]:
        """A message as spooled, read in a thread; None once it is gone."""
        if id not in self.messages:
            return succeed(None)
        return self.spool.read(id)

    def read_many(self, ids: list[str]) -> Deferred[list[bytes | None]]:
        """Messages as spooled, in one thread call; None for each one gone."""
        present = [id for id in ids if id in self.messages]
        if len(present) == len(ids):
            return self.spool.read_many(present)  # in the order asked, none gone

        def placed(found: list[bytes | None]) -> list[bytes | None]:
            by_id = dict(zip(present, found, strict=True))
            return [by_id.get(id) for id in ids]

        return self.spool.read_many(present).addCallback(placed)

    # Admin views ---------------------------------------------------------

    def list(self, query: Mapping[str, str]) -> Deferred[dict[str, Any]]:
        """
        C{GET .../messages}: envelopes and headers, oldest first (C{order=newest}:
        newest first).  C{to} is one recipient; C{from}, C{subject} and C{q} (the
        envelope and every header) match parts of the headers as they read
        (unfolded, encoded words decoded), ignoring case; C{text} searches
        those headers, the text of the text and HTML parts and the parts' file
        names (L{extract.text}), decoded in a thread.  C{offset} and C{limit} page through the
        matches; C{total} counts them all.
        """
        try:
            offset = max(int(query.get("offset", "0")), 0)
            limit = int(query["limit"]) if "limit" in query else None
        except ValueError:
            raise ViewRefused(400, "offset and limit must be integers") from None
        to = query.get("to", "").lower()
        sender = query.get("from", "").lower()
        subject = query.get("subject", "").lower()
        anywhere = query.get("q", "").lower()
        text = query.get("text", "").lower()
        namespace = query.get("namespace")

        def matching(_: None) -> list[str]:
            found = []
            for id, envelope in self.messages.items():
                if namespace is not None and self.namespaces.get(id) != namespace:
                    continue
                if to and to not in (r.lower() for r in envelope.recipients):
                    continue
                if sender or subject or anywhere:  # parsed headers needed: kept once parsed
                    summary = self._summary(id)
                    if sender and sender not in summary["from_text"]:
                        continue
                    if subject and subject not in (summary["subject"] or "").lower():
                        continue
                    if anywhere and anywhere not in summary["text"]:
                        continue
                found.append(id)
            if query.get("order") == "newest":
                found.reverse()
            return found

        def page(ids: list[str]) -> dict[str, Any]:
            chosen = ids[offset : None if limit is None else offset + max(limit, 0)]
            messages = []
            for id in chosen:
                envelope = self.messages.get(id)
                if envelope is not None:  # not removed while the text search ran
                    summary = self._summary(id)
                    messages.append(
                        {
                            **envelope.as_json(),
                            **_namespaced(self.namespaces.get(id)),
                            "subject": summary["subject"],
                            "headers": summary["headers"],
                        }
                    )
            return {"messages": messages, "total": len(ids)}

        def containing(ids: list[str]) -> Deferred[list[str]]:
            # The headers are parsed already; only the others' parts are read and decoded.
            by_header = {id for id in ids if text in self._summary(id)["text"]}
            searched = self.spool.containing([id for id in ids if id not in by_header], text)

            def merged(by_body: list[str]) -> list[str]:
                matched = by_header.union(by_body)
                return [id for id in ids if id in matched]

            return searched.addCallback(merged)

        found = self._when_ready().addCallback(matching)
        if text:
            found.addCallback(containing)
        return found.addCallback(page)

    def _summary(self, id: str) -> dict[str, Any]:
        """
        A message's parsed headers (as they came) and its subject and search
        texts (as they read), kept once asked for.
        """
        summary = self.summaries.get(id)
        if summary is None:
            envelope = self.messages[id]
            headers = _headers(self.heads.get(id, b""))
            readable = [(name, _readable(value)) for name, value in headers]
            named = {n.lower(): v for n, v in reversed(readable)}
            everything = [envelope.sender, *envelope.recipients, *(v for _, v in readable)]
            summary = self.summaries[id] = {
                "headers": headers,
                "subject": named.get("subject"),
                "from_text": f"{envelope.sender}\n{named.get('from', '')}".lower(),
                "text": "\n".join(everything).lower(),
            }
        return summary

    def item(self, key: str) -> Deferred[Any]:
        """
        C{GET .../messages/ID}: the raw message as spooled (Received: first);
        C{.../ID/links} and C{.../ID/codes}: what its text and HTML parts hold.
        """
        id, _, what = key.partition("/")
        if what not in ("", "links", "codes"):
            return succeed(None)
        if id not in self.messages:
            return self._when_ready().addCallback(
                lambda _: self._answer(id, what) if id in self.messages else None
            )
        return self._answer(id, what)

    def _answer(self, id: str, what: str) -> Deferred[Any]:
        raw = self.spool.read(id)
        if what == "links":
            return raw.addCallback(self._in_thread, lambda m: {"links": extract.links(m)})
        if what == "codes":
            pattern = self.codes
            return raw.addCallback(self._in_thread, lambda m: {"codes": extract.codes(m, pattern)})
        return raw

    def _in_thread(self, raw: bytes | None, work: Callable[[bytes], Any]) -> Deferred[Any] | None:
        # Parsing megabytes of HTML is no work for the reactor thread.
        return self.spool.run(lambda: work(raw)) if raw is not None else None

    def act(self, key: str, body: Any) -> Deferred[Any] | None:
        """
        C{POST .../messages/ID/release} with C{{"to": [...], "smarthost":
        "host:port"}}: send the message on, as it is held, to C{to} through that
        smarthost; each recipient's reply, or 502 if it was not reached.  The
        message stays.  One that came as BINARYMIME goes by DATA made 7-bit
        (L{mime.seven_bit}), or not at all (422) if it cannot be.
        """
        id, _, what = key.partition("/")
        if what != "release" or self.releaser is None:
            return None
        releaser = self.releaser
        recipients, host, port = _release_request(body, self.hostname)
        smarthost = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

        def read(_: None) -> Deferred[Any] | None:
            if id not in self.messages:
                return None
            return self.spool.read(id).addCallback(send)

        def send(data: bytes | None) -> Deferred[Any] | None:
            envelope = self.messages.get(id)
            if data is None or envelope is None:
                return None  # deleted meanwhile
            released = attrs.evolve(
                envelope,
                recipients=recipients,
                utf8=envelope.utf8 or not all(r.isascii() for r in recipients),
                ret=None,
                envid=None,
                dsn={},
            )
            # A next hop takes it by DATA, which carries lines, not binary
            # (RFC 3030 3): its binary parts go in base64, in a thread.
            octets = (
                self.spool.run(lambda: mime.seven_bit(data)) if envelope.binary else succeed(data)
            )
            return octets.addCallbacks(relay, not_convertible, callbackArgs=(released,))

        def relay(octets: bytes, released: Envelope) -> Deferred[Any]:
            return releaser.send(host, port, released, octets).addCallbacks(answer, unreached)

        def not_convertible(failure: Failure) -> None:
            failure.trap(mime.NotConvertible)
            raise ViewRefused(
                422, f"it came as BINARYMIME and cannot be made 7-bit: {failure.getErrorMessage()}"
            )

        def answer(outcome: Outcome) -> dict[str, Any]:
            replies = {r: outcome.get(r, (451, "4.4.0 No reply")) for r in recipients}
            self.context.stats.count("smtp_messages_released")
            self.context.emit(
                "message.released",
                message_id=id,
                smarthost=smarthost,
                recipients=list(recipients),
                replies=[f"{code} {text}" for code, text in replies.values()],
            )
            return {
                "id": id,
                "smarthost": smarthost,
                "released": sum(code // 100 == 2 for code, _ in replies.values()),
                "to": {r: {"code": code, "reply": text} for r, (code, text) in replies.items()},
            }

        def unreached(failure: Failure) -> None:
            raise ViewRefused(502, f"{smarthost}: {error_reply(failure)}")

        return self._when_ready().addCallback(read)

    def remove(self, id: str) -> Deferred[dict[str, int] | None]:
        """C{DELETE .../messages/ID}: drop one message; None (404) if there is none."""

        def drop(_: None) -> Deferred[dict[str, int] | None] | None:
            if id not in self.messages:
                return None
            return self.forget([id]).addCallback(lambda _: {"deleted": 1})

        return self._when_ready().addCallback(drop)

    def forget_namespace(self, namespace: str) -> Deferred[dict[str, int]]:
        """C{DELETE /api/namespaces/NS}: drop the messages of one namespace."""

        def drop(_: None) -> Deferred[dict[str, int]]:
            ids = [id for id, found in self.namespaces.items() if found == namespace]
            return self.forget(ids).addCallback(lambda _: {"deleted": len(ids)})

        return self._when_ready().addCallback(drop)

    def clear(self) -> Deferred[dict[str, int]]:
        """C{DELETE .../messages}: drop every message."""

        def drop(_: None) -> Deferred[dict[str, int]]:
            ids = list(self.messages)
            return self.forget(ids).addCallback(lambda _: {"deleted": len(ids)})

        return self._when_ready().addCallback(drop)


_SMARTHOST = re.compile(
    r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9.-]+)):(?P<port>\d{1,5})\Z"
)
_RELEASE_RECIPIENTS = 100


def _release_request(body: Any, hostname: str) -> tuple[tuple[str, ...], str, int]:
    """A release's recipients and smarthost; L{ViewRefused} (400) says what is wrong."""
    if not isinstance(body, dict) or set(body) - {"to", "smarthost"}:
        raise ViewRefused(400, 'give {"to": ["ADDRESS", ...], "smarthost": "HOST:PORT"}')
    to = body.get("to")
    if isinstance(to, str):
        to = [to]
    if not isinstance(to, list) or not to or not all(isinstance(r, str) for r in to):
        raise ViewRefused(400, "to: one or more addresses")
    if len(to) > _RELEASE_RECIPIENTS:
        raise ViewRefused(400, f"to: at most {_RELEASE_RECIPIENTS} addresses")
    recipients = []
    for address in to:
        try:
            mailbox = parse_path(address.encode(), True, hostname, utf8=True)
        except PathRefused as e:
            raise ViewRefused(400, f"to: {address!r}: {e.text}") from None
        recipients.append(str(mailbox))
    smarthost = body.get("smarthost")
    found = _SMARTHOST.match(smarthost) if isinstance(smarthost, str) else None
    if found is None or not 0 < int(found.group("port")) < 65536:
        raise ViewRefused(400, "smarthost: HOST:PORT, as in 127.0.0.1:25 or [::1]:25")
    host = found.group("v6") or found.group("host")
    return tuple(dict.fromkeys(recipients)), host, int(found.group("port"))


def _namespaced(namespace: str | None) -> dict[str, str]:
    return {} if namespace is None else {"namespace": namespace}
