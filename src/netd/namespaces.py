"""
Namespaces: one daemon serving many tests at once, each seeing only its own traffic.

A service's C{namespace_from:} lists where its exchanges' namespace key comes
from, tried in order; the first source that yields a key wins:

    namespace_from: [plus_tag, {suffix: mail.test}, auth_user, client]

A kind declares the sources its protocol carries (smtp's C{plus_tag}, http's
C{header}, dns's C{suffix}) as L{SourceReader}s on its
L{netd.kinds.ServiceKind}; C{client} (the client's loopback address
C{127.0.0.N} gives C{N}) is the core's and every kind has it.  The kind hands
L{Namespacing.derive} what an exchange carries, under the names its sources
read (C{recipients}, C{host}, C{name} ...), and stamps the key it gets on its
journal events and view entries as C{namespace}; the admin API filters by it
and forgets a namespace's entries through each view's C{forget}.  This module
imports no kind.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

from netd.records import Record
from netd.schema import Value, client_address

__all__ = [
    "CORE_SOURCES",
    "NO_NAMESPACES",
    "BelowSuffix",
    "Derive",
    "LoginTag",
    "LoopbackClient",
    "Namespacing",
    "SourceReader",
    "below_suffix",
    "in_namespace",
    "key",
    "login_source",
    "read_namespace_from",
    "split_login",
    "suffix_source",
]

# What an exchange carries, by the names the sources read.
Carried = Mapping[str, Any]
Derive = Callable[[Carried], "str | None"]
# Reads a source's argument (None when the source is named bare) into its deriver.
SourceReader = Callable[[Value | None], Derive | None]

_KEY = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}\Z")


def key(text: str | None) -> str | None:
    """C{text} as a namespace key (lower case, a DNS label's letters and C{_}), or L{None}."""
    if not text:
        return None
    folded = text.lower()
    return folded if _KEY.match(folded) else None


def below_suffix(name: str, suffix: str) -> str | None:
    """The label just under C{suffix}: C{www.t42.lab.test} under C{lab.test} is C{t42}."""
    name = name.lower().rstrip(".")
    tail = "." + suffix
    if not name.endswith(tail):
        return None
    return key(name[: -len(tail)].rpartition(".")[2])


@attrs.frozen(repr=False)
class BelowSuffix(Record):
    """
    The label under C{suffix} in what the kind carries as C{carried} (a
    domain or a list of them, a Host, a query name).  A class, not a closure:
    a service in workers is sent to them pickled.
    """

    carried: str
    suffix: str

    def __call__(self, carried: Carried) -> str | None:
        names = carried.get(self.carried)
        for name in [names] if isinstance(names, str) else names or ():
            found = below_suffix(name, self.suffix)
            if found is not None:
                return found
        return None


def suffix_source(carried_name: str) -> SourceReader:
    """C{{suffix: lab.test}}: L{BelowSuffix} of what the kind carries as C{carried_name}."""

    def read(argument: Value | None) -> Derive | None:
        if argument is None:
            return None  # reported by read_namespace_from: the source needs its suffix
        suffix = argument.as_str().lower().strip(".")
        if argument.is_scalar and (not suffix or "/" in suffix or " " in suffix):
            argument.error(f"not a domain suffix: {suffix!r}")
            return None
        return BelowSuffix(carried_name, suffix)

    return read


def split_login(login: str) -> tuple[str, str | None] | None:
    """
    A login C{user@t42} as the account it names and its namespace
    (C{("user", "t42")}); C{("user", None)} without an C{@}; L{None} when the
    text after the last C{@} is no key or nothing comes before it (C{user@},
    C{@t42}, C{user@a b}).
    """
    name, at, tag = login.rpartition("@")
    if not at:
        return login, None
    found = key(tag)
    if not name or found is None:
        return None
    return name, found


@attrs.frozen(repr=False)
class LoginTag(Record):
    """
    C{login}: the namespace a login names after its last C{@} (ftp's USER
    C{user@t42}, chat's C{alice@t42}); the kind carries the login as
    C{login} only once it has read it with L{split_login}.
    """

    def __call__(self, carried: Carried) -> str | None:
        login = carried.get("login")
        if not login:
            return None
        split = split_login(login)
        return split[1] if split is not None else None


def login_source(argument: Value | None) -> Derive | None:
    """C{login}, named bare."""
    if argument is not None:
        argument.error("'login' takes no argument")
        return None
    return LoginTag()


@attrs.frozen(repr=False)
class LoopbackClient(Record):
    """C{client}: a client on 127.0.0.N has the namespace N (not 127.0.0.1, everyone's)."""

    def __call__(self, carried: Carried) -> str | None:
        address = client_address(carried.get("client"))
        if address is None or address.version != 4:
            return None
        packed = address.packed
        if packed[:3] != b"\x7f\x00\x00" or packed[3] in (0, 1, 255):
            return None
        return str(packed[3])


def _client(argument: Value | None) -> Derive | None:
    if argument is not None:
        argument.error("'client' takes no argument")
        return None
    return LoopbackClient()


CORE_SOURCES: Mapping[str, SourceReader] = {"client": _client}
# Sources named bare that need an argument, and what it is.
_NEEDS_ARGUMENT = {"suffix": "{suffix: lab.test}"}


@attrs.frozen(repr=False)
class Namespacing(Record):
    """
    A service's C{namespace_from}: its sources in order.  Equal when read
    from the same text, so a reload tells a changed list from one that moved.
    """

    described: tuple[Any, ...] = ()
    sources: tuple[Derive, ...] = attrs.field(default=(), eq=False)

    @property
    def enabled(self) -> bool:
        return bool(self.sources)

    @property
    def reads_logins(self) -> bool:
        """Whether a login C{user@t42} names a namespace here (the C{login} source)."""
        return any(isinstance(source, LoginTag) for source in self.sources)

    def derive(self, **carried: Any) -> str | None:
        """The first key a source yields from what the exchange carries, or L{None}."""
        for source in self.sources:
            found = source(carried)
            if found is not None:
                return found
        return None


NO_NAMESPACES = Namespacing()


def read_namespace_from(value: Value, kind_sources: Mapping[str, SourceReader]) -> Namespacing:
    """C{namespace_from:}: source names, or one-key mappings C{{source: argument}}."""
    readers = {**kind_sources, **CORE_SOURCES}
    known = ", ".join(readers)
    described: list[Any] = []
    sources: list[Derive] = []
    for element in value.elements(single=True):
        argument: Value | None = None
        if element.is_mapping:
            entries = list(element.items())
            if len(entries) != 1:
                element.error(f"one source per entry ({known})")
                continue
            name, argument = entries[0]
            described.append({name: argument.as_str() if argument.is_scalar else None})
        else:
            name = element.as_str()
            described.append(name)
        reader = readers.get(name)
        if reader is None:
            element.error(f"unknown namespace source {name!r} (one of {known})")
            continue
        if argument is None and name in _NEEDS_ARGUMENT:
            element.error(f"{name!r} needs its argument: {_NEEDS_ARGUMENT[name]}")
            continue
        derive = reader(argument)
        if derive is not None:
            sources.append(derive)
    return Namespacing(tuple(described), tuple(sources))


def in_namespace(entries: Iterable[Any], namespace: str) -> list[Any]:
    """The entries (JSON objects) of one namespace: those whose C{namespace} is it."""
    return [e for e in entries if isinstance(e, dict) and e.get("namespace") == namespace]
