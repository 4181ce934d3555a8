"""
The C{ftp} service kind: anonymous and user FTP with FTPS, on twisted.protocols.ftp.

    files:
      type: ftp
      listen: ["tcp:2121"]        # an ssl: listener is implicit FTPS
      root: ftp                   # the anonymous root
      anonymous: read             # none | read | write
      users: {alice: {password: "...", home: ftp/alice, write: true}}
      passive_ports: "30000-30099"
      passive_host: 127.0.0.1     # announced in PASV replies
      tls: lab                    # offers AUTH TLS and PROT P
      require_tls: false
      umask: "022"                # new files and folders, and the most SITE CHMOD grants
      namespace_from: [login]     # USER user@t42: user, in the folder t42/ of its root

The protocol lives in L{netd.services.ftp.session}, accounts, confined shells
and the fast transfer paths in L{netd.services.ftp.files}.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any

import attrs
from twisted.cred.portal import Portal

from netd import passwords
from netd.config import ListenerConfig, ServiceConfig, TLSProfiles
from netd.kinds import AdminView, BuildContext, Handlers, ServiceKind
from netd.namespaces import login_source
from netd.records import Record
from netd.rules import Vocabulary, exact, glob, reply_line
from netd.schema import Section, Value
from netd.services.ftp.files import Accounts, Realm, User
from netd.services.ftp.session import FTPServer, SessionFactory, SessionLimits

__all__ = ["FTP", "Options", "User", "build", "parse"]

_ANONYMOUS = ("none", "read", "write")
_USER_NAME = re.compile(r"[^\s:]{1,64}\Z")
_PORTS = re.compile(r"(\d+)-(\d+)\Z")
_OCTAL = re.compile(r"(?:0o)?([0-7]{1,4})\Z")


@attrs.frozen(repr=False)
class Options(Record):
    root: Path | None = None
    anonymous: str = "none"
    users: tuple[User, ...] = ()
    passive_ports: tuple[int, int] | None = None
    passive_host: str | None = None
    tls: str | None = None
    require_tls: bool = False
    umask: int = 0o022
    limits: SessionLimits = attrs.field(factory=SessionLimits)


def parse(section: Section, profiles: TLSProfiles) -> Options:
    anonymous = section.choice("anonymous", _ANONYMOUS, "none")
    root_value = section.get("root")
    root = None
    if root_value is not None:
        root = _directory(root_value)
    elif anonymous != "none":
        section.value.error(f"anonymous: {anonymous} needs a 'root' directory")
    no_users: tuple[User, ...] = ()
    users = section.read("users", _users, no_users)
    if anonymous == "none" and not users and section.value.is_mapping:
        section.value.error("nobody can log in: set 'anonymous' to read or write, or add 'users'")
    tls = section.read("tls", profiles.reference, None)
    require_tls = section.flag("require_tls", False)
    if require_tls and tls is None and section.value.is_mapping and not section.has("tls"):
        section.value.error("require_tls needs a 'tls' profile for AUTH TLS")
    renamed = section.get("max_per_client")
    if renamed is not None:
        renamed.error("renamed: use max_connections_per_client (a key of every service)")
    defaults = SessionLimits()
    limits = SessionLimits(
        max_line=defaults.max_line,
        login_delay=section.number("login_delay", defaults.login_delay, minimum=0),
        max_login_failures=section.integer(
            "max_login_failures", defaults.max_login_failures, minimum=1, maximum=1000
        ),
        data_timeout=section.number("data_timeout", defaults.data_timeout, minimum=0.1),
        line_timeout=section.number("line_timeout", defaults.line_timeout, minimum=0.1),
    )
    return Options(
        root=root,
        anonymous=anonymous,
        users=users,
        passive_ports=section.read("passive_ports", _port_range, None),
        passive_host=section.read("passive_host", _ipv4, None),
        tls=tls,
        require_tls=require_tls,
        umask=section.read("umask", _umask, 0o022),
        limits=limits,
    )


def _directory(value: Value) -> Path:
    path = value.as_path()
    if value.is_scalar and not path.is_dir():
        value.error(f"not a directory: {path}")
    return path


def _users(value: Value) -> tuple[User, ...]:
    users = []
    for name, entry in value.items():
        if not _USER_NAME.match(name) or name == "anonymous":
            entry.error("user names are 1-64 characters, no spaces or ':', not 'anonymous'")
            continue
        section = entry.section()
        home_value = section.require("home")
        home = _directory(home_value) if home_value is not None else Path()
        password = section.optional_str("password")
        password_hash = section.optional_str("password_hash")
        if (password is None) == (password_hash is None) and entry.is_mapping:
            entry.error("give 'password' or 'password_hash' (one of them)")
        problem = passwords.hash_problem(password_hash) if password_hash is not None else None
        if problem is not None:
            hashed = section.get("password_hash")
            assert hashed is not None
            hashed.error(problem)
        if password is not None and passwords.is_hash(password):
            # netd.passwords reads a password starting with '$' as a hash, which
            # would never match as clear text.
            clear = section.get("password")
            assert clear is not None
            clear.error("starts with '$' as a hash does: give a hash as 'password_hash'")
        write = section.flag("write", False)
        section.finish()
        users.append(User(name, home, write, password, password_hash))
    return tuple(users)


def _umask(value: Value) -> int:
    # The text as written: YAML would read an unquoted 022 as the number 18.
    text = value.as_str()
    match = _OCTAL.match(text)
    if match is None or int(match.group(1), 8) > 0o777:
        if value.is_scalar:
            value.error(f"expected an octal umask like '022', got {text!r}")
        return 0o022
    return int(match.group(1), 8)


def _port_range(value: Value) -> tuple[int, int] | None:
    text = value.as_str()
    match = _PORTS.match(text.replace(" ", ""))
    if not value.is_scalar:
        return None
    if match is None:
        value.error(f"expected a port range like '30000-30099', got {text!r}")
        return None
    low, high = int(match.group(1)), int(match.group(2))
    if not 1024 <= low <= high <= 65535:
        value.error("passive ports are between 1024 and 65535, low-high")
        return None
    return low, high


def _ipv4(value: Value) -> str | None:
    text = value.as_str()
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        if value.is_scalar:
            value.error(f"PASV announces an IPv4 address, got {text!r}")
        return None


def build(service: ServiceConfig, context: BuildContext) -> Handlers:
    options: Options = service.options
    users = {user.name: user for user in options.users}
    run_in_thread = context.in_thread
    portal = Portal(
        Realm(options.root, options.anonymous == "write", users, run_in_thread, options.umask),
        [Accounts(users, options.anonymous != "none", run_in_thread)],
    )
    server = FTPServer(
        reactor=context.reactor,
        portal=portal,
        stats=context.stats,
        emit=context.emit,
        run_in_thread=run_in_thread,
        limits=options.limits,
        anonymous=options.anonymous != "none",
        passive_ports=options.passive_ports,
        passive_host=options.passive_host,
        tls=context.tls.get(options.tls) if options.tls else None,
        require_tls=options.require_tls,
        rules=context.rules,
        namespaces=context.namespaces,
        accounts=frozenset({SessionFactory.userAnonymous, *users}),
        writable_roots=_writable_roots(options),
    )

    def stream(listener: ListenerConfig) -> Any:
        data_tls = None
        if listener.tls:
            # Data connections of implicit FTPS use the listener's own profile,
            # or the service's when the endpoint carries its key material itself.
            profile = listener.tls_profile or options.tls
            data_tls = context.tls.get(profile) if profile else None
        return server.factory(data_tls, listener.tls)

    return Handlers(
        stream=stream,
        busy_reply=b"421 Too many connections, try again later.\r\n",
        per_client_reply=b"421 Too many connections from your address.\r\n",
        views={"sessions": AdminView(list=server.list_sessions, forget=server.forget)},
    )


def _writable_roots(options: Options) -> tuple[Path, ...]:
    """The roots clients may write to: a namespace's folders there hold what they sent."""
    roots = [user.home for user in options.users if user.write]
    if options.anonymous == "write" and options.root is not None:
        roots.append(options.root)
    return tuple(roots)


# A command's rules: its verb and its argument as sent (a path, mostly).
RULES = Vocabulary(
    match={"command": exact(), "path": glob(case_sensitive=True)},
    acts={"reply": reply_line("12345")},
    generic=("delay", "throttle", "reset", "close", "stall"),
)

FTP: ServiceKind[Options] = ServiceKind(
    "ftp",
    parse,
    build,
    per_client_default=10,
    rules=RULES,
    # namespace_from: the login USER user@t42.
    namespaces={"login": login_source},
)
