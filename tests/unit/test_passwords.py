"""Password checks shared by every kind with users: bcrypt, crypt(3) and clear text."""

from __future__ import annotations

from collections.abc import Callable

import bcrypt
import crypt_r
import pytest
from twisted.internet.defer import Deferred, succeed

from netd import passwords
from tests.unit.test_schema_readers import read

SHA512 = crypt_r.crypt("s3cret", "$6$saltsalt")
SHA256 = crypt_r.crypt("s3cret", "$5$rounds=5000$saltsalt")
MD5 = crypt_r.crypt("s3cret", "$1$saltsalt")
BCRYPT = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()


@pytest.mark.parametrize(
    "stored",
    [SHA512, SHA256, MD5, BCRYPT, "s3cret"],
    ids=["sha512-crypt", "sha256-crypt", "md5-crypt", "bcrypt", "clear"],
)
def test_the_right_password_and_only_it(stored: str) -> None:
    assert passwords.verify(b"s3cret", stored)
    assert not passwords.verify(b"s3cret!", stored)
    assert not passwords.verify(b"", stored)
    # Bytes that are not UTF-8 are a wrong password, never an error.
    assert not passwords.verify(b"s3cret\xff", stored)


def test_usable_hashes_and_why_others_are_not() -> None:
    for stored in (SHA512, SHA256, MD5, BCRYPT):
        assert passwords.is_hash(stored) and passwords.hash_problem(stored) is None
    assert passwords.hash_problem(BCRYPT[:-1]) == "a bcrypt hash has 60 characters"
    assert passwords.hash_problem("$9$x$y") == (
        "not a bcrypt ($2b$...) or crypt(3) ($6$..., $5$..., $1$...) hash"
    )
    assert not passwords.is_hash("plain")


def test_a_malformed_bcrypt_hash_matches_nothing() -> None:
    assert not passwords.verify(b"s3cret", "$2b$" + "x" * 56)


def test_a_hash_is_checked_in_a_thread_and_a_clear_password_at_once() -> None:
    hopped: list[object] = []

    def in_thread(work: Callable[..., bool], *args: object) -> Deferred[bool]:
        hopped.append(work)
        return succeed(work(*args))

    checked = [passwords.check(b"s3cret", stored, in_thread) for stored in ("s3cret", BCRYPT)]
    assert [d.result for d in checked] == [True, True]
    assert hopped == [passwords.verify]
    assert passwords.check(b"nope", BCRYPT, in_thread).result is False


def test_users_maps_keep_good_accounts_and_name_each_bad_one() -> None:
    text = (
        "{alice: {password: s3cret}, bob: {password: ''}, carol: {password: '$2b$short'},"
        " 'd d': {password: x}, eve: {}, frank: {password: x, home: /}}"
    )
    users, errors = read(
        text, lambda v: passwords.read_users(v, lambda name: "no spaces" if " " in name else None)
    )
    assert users == {"alice": "s3cret", "frank": "x"}  # the map as a whole is refused
    assert errors == [
        "x.bob.password: a password cannot be empty",
        "x.carol.password: a bcrypt hash has 60 characters",
        "x.d d: no spaces",
        "x.eve: missing required key 'password'",
        "x.frank.home: unknown key",
    ]
