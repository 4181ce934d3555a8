"""
Passwords kept in the service map: bcrypt (C{$2b$...}), crypt(3) as in
/etc/shadow (C{$1$}, C{$5$}, C{$6$}), or clear text, for every kind with users.

crypt(3) comes from Python's C{crypt} module, which 3.13 removed, or from
C{crypt-r}, the same module kept as a package (a dependency from 3.13 on).
"""

from __future__ import annotations

import hmac
import re
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred, succeed

if TYPE_CHECKING:
    from netd.kinds import RunInThread
    from netd.schema import Value

__all__ = ["check", "hash_problem", "is_hash", "read_users", "verify"]

_BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")
_CRYPT = re.compile(r"\$(1|5|6)\$(rounds=\d+\$)?[./A-Za-z0-9]{1,16}\$[./A-Za-z0-9]+\Z")


def is_hash(stored: str) -> bool:
    return stored.startswith("$")


def hash_problem(stored: str) -> str | None:
    """Why C{stored} is no hash netd can check, or L{None} if it is one."""
    if stored.startswith(_BCRYPT_PREFIXES):
        return None if len(stored) == 60 else "a bcrypt hash has 60 characters"
    if _CRYPT.match(stored):
        return None if _crypt() is not None else "crypt(3) hashes need the crypt-r package"
    return "not a bcrypt ($2b$...) or crypt(3) ($6$..., $5$..., $1$...) hash"


def verify(password: bytes, stored: str) -> bool:
    """
    Whether C{password} (as the client sent it) matches C{stored}, in constant
    time.  A hash costs a bcrypt round or a crypt(3) call: run it in a thread.
    """
    if not is_hash(stored):
        return hmac.compare_digest(password, stored.encode())
    if stored.startswith(_BCRYPT_PREFIXES):
        import bcrypt

        try:
            return bcrypt.checkpw(password, stored.encode())
        except ValueError:
            return False
    crypt = _crypt()
    if crypt is None:
        return False
    try:
        text = password.decode()
    except UnicodeDecodeError:
        return False  # crypt(3) hashes are made from text, and the module takes only text
    return hmac.compare_digest(crypt(text, stored) or "", stored)


def check(password: bytes, stored: str, run_in_thread: RunInThread) -> Deferred[bool]:
    """
    L{verify}, with a hash checked in a thread: a bcrypt round costs a fifth of
    a second on purpose, which the reactor thread must not wait out.
    """
    if not is_hash(stored):
        return succeed(verify(password, stored))
    checked: Deferred[bool] = run_in_thread(verify, password, stored)
    return checked


def read_users(
    value: Value, name_problem: Callable[[str], str | None] = lambda name: None
) -> dict[str, str]:
    """
    A map's C{users}, C{NAME: {password: ...}}: each password in clear (not
    empty) or a hash L{verify} can check.  A name C{name_problem} has one for is
    an error, as is a bad password; the users read well are returned.
    """
    users: dict[str, str] = {}
    for name, entry in value.items():
        problem = name_problem(name)
        if problem is not None:
            entry.error(problem)
            continue
        user = entry.section()
        password_value = user.require("password")
        user.finish()
        if password_value is None:
            continue
        password = password_value.as_str()
        problem = hash_problem(password) if is_hash(password) else None
        if problem is not None:
            password_value.error(problem)
        elif not password:
            password_value.error("a password cannot be empty")
        else:
            users[name] = password
    return users


def _crypt() -> Callable[[str, str], str | None] | None:
    try:
        import crypt_r as module
    except ImportError:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                import crypt as module
            except ImportError:
                return None
    crypt: Callable[[str, str], str | None] = module.crypt
    return crypt
