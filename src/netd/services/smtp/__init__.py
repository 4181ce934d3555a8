"""
The C{smtp} service kind: an ESMTP relay that never loses a message it
answered C{250} for and never relays for strangers.

    mail:
      type: smtp
      listen: ["tcp:2525", {endpoint: "ssl:4650", tls: lab}]
      hostname: mx.netd.test
      tls: lab
      relay: {allow_from: [127.0.0.0/8], domains: [netd.test]}
      delivery: {mode: capture}

Optional C{imap:} and C{pop3:} sections, each with a C{listen:} list of its
own, serve captured mail to mail clients (L{netd.services.smtp.imap},
L{netd.services.smtp.pop3}) with the logins of C{mailboxes:}
(L{netd.services.smtp.mailbox}).

Sessions are L{netd.services.smtp.server.Session} (twisted.mail's ESMTP);
messages go to a spool in C{state_dir} (L{netd.services.smtp.spool}) and are
either kept for the admin API (capture) or sent on by
L{netd.services.smtp.relay.Courier} to a smarthost or to the recipients'
exchangers (L{netd.services.smtp.mx}).
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from twisted.application.service import IService, MultiService
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ServerFactory
from zope.interface import implementer

from netd import passwords
from netd.config import ListenerConfig, ServiceConfig, TLSProfiles
from netd.kinds import AdminView, BuildContext, Handlers, RunInThread, ServiceKind
from netd.namespaces import Derive, SourceReader, suffix_source
from netd.namespaces import key as namespace_key
from netd.records import Record
from netd.rules import Vocabulary, exact, glob, reply_line
from netd.schema import LOOPBACK, Network, Section, Value
from netd.services.smtp.extract import DEFAULT_CODES
from netd.services.smtp.mailbox import (
    EVERY_NAMESPACE,
    NAMESPACE_LOGIN,
    Access,
    AnyAddressChecker,
    Mailboxes,
    MailboxOptions,
    MailRealm,
    login_namespace,
    login_password,
    uid_validity,
)
from netd.services.smtp.mx import MxOptions, mx_sender, resolver_for
from netd.services.smtp.relay import Courier, Releaser, SmarthostOptions, smarthost_sender
from netd.services.smtp.server import Limits, Receiver, SessionFactory, busy_reply
from netd.services.smtp.spool import Spool, writers_for
from netd.services.smtp.store import MailStore

__all__ = [
    "SMTP",
    "AuthOptions",
    "Capture",
    "DeliveryOptions",
    "MailboxOptions",
    "Options",
    "RelayOptions",
    "SmarthostOptions",
]

_MODES = ("capture", "smarthost", "mx")


_NOTHING: tuple[str, ...] = ()
STAGES = ("connect", "helo", "auth", "starttls", "mail", "rcpt", "data", "eom")


@attrs.frozen(repr=False)
class AuthOptions(Record):
    """
    @ivar users: user name to password: in clear, a bcrypt hash (C{$2b$...}) or a
        crypt hash (C{$6$...}).
    """

    users: Mapping[str, str] = attrs.field(factory=dict)
    allow_insecure_auth: bool = False


@attrs.frozen(repr=False)
class RelayOptions(Record):
    allow_from: tuple[Network, ...] = LOOPBACK
    domains: tuple[str, ...] = ()


@attrs.frozen(repr=False)
class Capture(Record):
    """Keep every message for the admin API's C{messages} view; deliver none."""


# Where accepted mail goes, decided once when the map is read: one of these.
Route = Capture | SmarthostOptions | MxOptions


@attrs.frozen(repr=False)
class DeliveryOptions(Record):
    """
    @ivar route: capture, a smarthost, or each recipient domain's MX.
    @ivar retry: seconds between attempts; the last one repeats.
    @ivar max_age: seconds after which a message still not delivered bounces.
    @ivar delay_warning: seconds a message waits before the recipients that
        asked for C{NOTIFY=DELAY} earn the sender a delay report; 0, never.
    """

    route: Route = Capture()
    retry: tuple[float, ...] = (60.0, 300.0, 900.0, 3600.0)
    max_age: float = 432000.0
    delay_warning: float = 14400.0


@attrs.frozen(repr=False)
class Options(Record):
    hostname: str | None = None
    tls: str | None = None
    bare_newlines: str = "normalize"
    limits: Limits = attrs.field(factory=Limits)
    auth: AuthOptions | None = None
    relay: RelayOptions = attrs.field(factory=RelayOptions)
    delivery: DeliveryOptions = attrs.field(factory=DeliveryOptions)
    mailboxes: MailboxOptions | None = None
    imap: bool = False
    codes: str = DEFAULT_CODES


def parse(section: Section, profiles: TLSProfiles) -> Options:
    defaults = Limits()
    tls = section.read("tls", profiles.reference, None)
    readers = [key for key in _LISTENER_SECTIONS if section.read(key, _listener_section, False)]
    mailboxes = section.read("mailboxes", _mailboxes, None)
    delivery = section.read("delivery", _delivery, DeliveryOptions())
    if readers and mailboxes is None:
        section.value.error(
            f"{' and '.join(readers)} need 'mailboxes' (users: or any_password: true)"
        )
    if readers and not isinstance(delivery.route, Capture):
        section.value.error(f"{' and '.join(readers)} read captured mail: delivery mode capture")
    return Options(
        hostname=section.read("hostname", Value.as_hostname, None),
        tls=tls,
        bare_newlines=section.choice("bare_newlines", ("normalize", "reject"), "normalize"),
        limits=Limits(
            max_message_size=section.integer(
                "max_message_size", defaults.max_message_size, minimum=1024, maximum=1 << 31
            ),
            max_recipients=section.integer(
                "max_recipients", defaults.max_recipients, minimum=1, maximum=100_000
            ),
            max_line_length=section.integer(
                "max_line_length", defaults.max_line_length, minimum=80, maximum=1 << 20
            ),
            command_timeout=section.number(
                "command_timeout", defaults.command_timeout, minimum=0.1
            ),
            data_timeout=section.number("data_timeout", defaults.data_timeout, minimum=0.1),
        ),
        auth=section.read("auth", _auth, None),
        relay=section.read("relay", _relay, RelayOptions()),
        delivery=delivery,
        mailboxes=mailboxes if readers else None,
        imap="imap" in readers,
        codes=section.read("codes", _pattern, DEFAULT_CODES),
    )


def _pattern(value: Value) -> str:
    text = value.as_str()
    try:
        compiled = re.compile(text)
    except re.error as e:
        value.error(f"not a regular expression: {e}")
        return DEFAULT_CODES
    if compiled.groups > 1:
        value.error("one group at most: the code")
    return text


_LISTENER_SECTIONS = ("imap", "pop3")


def _listener_section(value: Value) -> bool:
    section = value.section()
    section.get("listen")  # read by the core with the service's listeners
    section.finish()
    return True


def _mailboxes(value: Value) -> MailboxOptions:
    section = value.section()
    users: dict[str, str] = section.read("users", passwords.read_users, {})
    options = MailboxOptions(
        users={login.lower(): password for login, password in users.items()},
        any_password=section.flag("any_password", False),
        allow_insecure_auth=section.flag("allow_insecure_auth", False),
    )
    section.finish()
    for login in options.users:
        namespaced = login.startswith(NAMESPACE_LOGIN) and login != EVERY_NAMESPACE
        if namespaced and login_namespace(login) is None:
            value.error(f"users: {login!r}: a namespace key is [a-z0-9][a-z0-9_-]*")
    if not options.users and not options.any_password:
        value.error("no one can log in: add 'users' or 'any_password: true'")
    return options


def _auth(value: Value) -> AuthOptions:
    section = value.section()
    users_value = section.require("users")
    options = AuthOptions(
        users=passwords.read_users(users_value) if users_value is not None else {},
        allow_insecure_auth=section.flag("allow_insecure_auth", False),
    )
    section.finish()
    return options


def _domain(value: Value) -> str | None:
    text = value.as_str().lower().rstrip(".")
    if value.is_scalar and (not text or "@" in text or text.startswith("[")):
        value.error(f"not a domain: {text!r}")
        return None
    return text


def _read_list(read: Callable[[Value], str | None]) -> Callable[[Value], tuple[str, ...]]:
    return lambda value: tuple(filter(None, value.list_of(read, single=True)))


def _relay(value: Value) -> RelayOptions:
    section = value.section()
    allow_from = section.networks("allow_from", LOOPBACK)
    domains = section.read("domains", _read_list(_domain), _NOTHING)
    section.finish()
    return RelayOptions(allow_from=allow_from, domains=domains)


def _delivery(value: Value) -> DeliveryOptions:
    section = value.section()
    defaults = DeliveryOptions()
    mode = section.choice("mode", _MODES, "capture")
    address_value = section.get("smarthost")
    address = address_value.as_host_port(25) if address_value is not None else None
    tls = section.choice("tls", ("none", "opportunistic", "required"), "opportunistic")
    username = section.optional_str("username")
    password = section.optional_str("password")
    if (username is None) != (password is None):
        value.error("'username' and 'password' go together")
    if username is not None and tls == "none":
        # netd sends no credentials in the clear (_Sender.authenticate): Postfix,
        # with its default smtp_sasl_security_options = noplaintext and no TLS,
        # defers such mail for ever; a map that could never log in is refused.
        value.error(
            "'username' needs tls: opportunistic or required: AUTH credentials never go"
            " over a connection without TLS"
        )
    retry = section.read(
        "retry", lambda v: v.list_of(lambda e: e.as_float(60.0, minimum=0.01)), defaults.retry
    )
    if not retry:
        retry = defaults.retry
    max_age = section.number("max_age", defaults.max_age, minimum=1)
    delay_warning = section.number("delay_warning", defaults.delay_warning, minimum=0)
    timeout = section.number("timeout", 60.0, minimum=0.1)
    port = section.integer("port", 25, minimum=1, maximum=65535)
    ca = section.file_path("ca")
    if ca is not None and not ca.is_file():
        entry = section.get("ca")
        assert entry is not None
        entry.error(f"not a file: {ca}")
    resolver_value = section.get("resolver")
    resolver = resolver_value.as_host_port(53, numeric=True) if resolver_value is not None else None
    section.finish()
    route: Route = Capture()
    if mode == "mx":
        route = MxOptions(port=port, tls=tls, timeout=timeout, resolver=resolver)
    elif mode == "smarthost" and address is not None:
        route = SmarthostOptions(
            host=address[0],
            port=address[1],
            tls=tls,
            username=username,
            password=password,
            timeout=timeout,
            ca=ca,
        )
    elif mode == "smarthost" and address_value is None:
        value.error("mode smarthost needs 'smarthost: HOST:PORT'")
    return DeliveryOptions(route=route, retry=retry, max_age=max_age, delay_warning=delay_warning)


@implementer(ICredentialsChecker)
class _PasswordChecker:
    """Clear passwords compared in constant time; bcrypt hashes checked in a thread."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(
        self,
        users: Mapping[str, str],
        run: RunInThread,
        fold_case: bool = False,
        lookup: Callable[[Mapping[str, str], str], str | None] = Mapping.get,
    ) -> None:
        self.users = users
        self.run = run
        # Mailbox logins are addresses, matched without regard to case.
        self.fold_case = fold_case
        self.lookup = lookup

    def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
        username = credentials.username
        password = credentials.password
        name = username.decode("utf-8", "replace") if isinstance(username, bytes) else username
        if self.fold_case:
            name = name.lower()
        expected = self.lookup(self.users, name)
        if expected is None:
            return self._refuse()
        matched = passwords.check(password, expected, self.run)
        return matched.addCallback(lambda ok: name if ok else self._refuse())

    def _refuse(self) -> Deferred[Any]:
        failed: Deferred[Any] = Deferred()
        failed.errback(UnauthorizedLogin())
        return failed


@implementer(IRealm)
class _Realm:
    """The avatar of an authenticated session is its user name."""

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> tuple[Any, Any, Any]:
        return interfaces[0], avatarId, lambda: None


def build(service: ServiceConfig, context: BuildContext) -> Handlers:
    options: Options = service.options
    run = context.in_thread
    # Not getfqdn(): a reverse lookup would block the reactor during a reload.
    hostname = options.hostname or socket.gethostname()
    spool = Spool(
        context.state_dir / "smtp" / service.name, run, write=writers_for(context.reactor)
    )
    delivery = options.delivery
    background: IService
    route = delivery.route
    send = None
    if isinstance(route, SmarthostOptions):
        send = smarthost_sender(context.reactor, hostname, route)
    elif isinstance(route, MxOptions):
        send = mx_sender(context.reactor, hostname, route, resolver_for(context.reactor, route))
    if send is not None:
        courier = Courier(
            context,
            spool,
            send,
            hostname,
            delivery.retry,
            delivery.max_age,
            delivery.delay_warning,
        )
        store = MailStore(
            spool,
            context,
            hostname,
            deliver=courier.schedule,
            codes=options.codes,
            releaser=Releaser(context.reactor, hostname),
        )
        courier.store = store
        background = MultiService()
        store.setServiceParent(background)
        courier.setServiceParent(background)
    else:
        store = MailStore(
            spool,
            context,
            hostname,
            codes=options.codes,
            releaser=Releaser(context.reactor, hostname),
        )
        background = store
    portal = None
    if options.auth is not None:
        portal = Portal(_Realm(), [_PasswordChecker(options.auth.users, run)])
    receiver = Receiver(
        hostname=hostname,
        limits=options.limits,
        domains=frozenset(options.relay.domains),
        allow_from=options.relay.allow_from,
        accept=store.accept,
        stats=context.stats,
        log=context.log,
        starttls=context.tls[options.tls] if options.tls else None,
        portal=portal,
        allow_insecure_auth=options.auth.allow_insecure_auth if options.auth else False,
        reject_bare_newlines=options.bare_newlines == "reject",
        binarymime=isinstance(delivery.route, Capture),
        rules=context.rules,
        namespaces=context.namespaces,
    )

    access = None
    if options.mailboxes is not None:
        validity = uid_validity(spool.directory, context.reactor.seconds())
        mailboxes = Mailboxes(store, uid_validity=validity)
        checker: ICredentialsChecker = (
            AnyAddressChecker()
            if options.mailboxes.any_password
            else _PasswordChecker(
                options.mailboxes.users, run, fold_case=True, lookup=login_password
            )
        )
        access = Access(
            context=context,
            mailboxes=mailboxes,
            portal=Portal(MailRealm(mailboxes), [checker]),
            starttls=context.tls[options.tls] if options.tls else None,
            allow_insecure_auth=options.mailboxes.allow_insecure_auth,
        )

    def stream(listener: ListenerConfig) -> ServerFactory:
        if listener.protocol == "imap" and access is not None:
            from netd.services.smtp.imap import IMAPFactory

            return IMAPFactory(access, secure=listener.tls)
        if listener.protocol == "pop3" and access is not None:
            from netd.services.smtp.pop3 import POP3Factory

            return POP3Factory(access, secure=listener.tls)
        return SessionFactory(receiver, secure=listener.tls)

    return Handlers(
        stream=stream,
        busy_reply=busy_reply(),
        per_client_reply=b"421 4.7.0 Too many connections from your address\r\n",
        service=background,
        ready=store.can_keep_mail,
        views={
            "messages": AdminView(
                list=store.list,
                item=store.item,
                # Mail queued for relay leaves the spool delivered or bounced, never
                # dropped by an API call: DELETE is for capture mode (405 otherwise).
                clear=store.clear if send is None else None,
                remove=store.remove if send is None else None,
                act=store.act,
                forget=store.forget_namespace if send is None else None,
            )
        },
    )


RULES = Vocabulary(
    match={"stage": exact(*STAGES), "mail": glob(), "rcpt": glob(), "helo": glob()},
    acts={"reply": reply_line()},
    generic=("delay", "throttle", "reset", "close", "stall"),
)


@attrs.frozen(repr=False)
class PlusTag(Record):
    """C{plus_tag}: a recipient's tag, C{bob+t42@example.test} -> C{t42}."""

    def __call__(self, carried: Mapping[str, Any]) -> str | None:
        for recipient in carried.get("recipients", ()):
            local = recipient.rpartition("@")[0]
            if "+" in local:
                found = namespace_key(local.partition("+")[2])
                if found is not None:
                    return found
        return None


@attrs.frozen(repr=False)
class AuthUser(Record):
    """C{auth_user}: the user the session authenticated as."""

    def __call__(self, carried: Mapping[str, Any]) -> str | None:
        return namespace_key(carried.get("user"))


def _bare(source: Callable[[], Derive], name: str) -> SourceReader:
    def read(argument: Value | None) -> Derive | None:
        if argument is not None:
            argument.error(f"'{name}' takes no argument")
            return None
        return source()

    return read


# namespace_from's sources: recipients are addresses, the suffix reads their domains.
NAMESPACES: Mapping[str, SourceReader] = {
    "plus_tag": _bare(PlusTag, "plus_tag"),
    "suffix": suffix_source("domains"),
    "auth_user": _bare(AuthUser, "auth_user"),
}


# An authenticated IMAP session may stay silent this long (Twisted's
# IMAP4Server.POSTAUTH_TIMEOUT): RFC 2177 clients renew IDLE every 29 minutes.
_IMAP_SILENCE = 30 * 60.0


def _longest_silence(options: Options) -> float:
    longest = max(options.limits.command_timeout, options.limits.data_timeout)
    return max(longest, _IMAP_SILENCE) if options.imap else longest


SMTP: ServiceKind[Options] = ServiceKind(
    "smtp",
    parse,
    build,
    longest_silence=_longest_silence,
    per_client_default=20,
    rules=RULES,
    listener_keys=_LISTENER_SECTIONS,
    namespaces=NAMESPACES,
)
