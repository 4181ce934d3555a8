"""
The smtp kind's MIME reading (L{netd.services.smtp.mime}) as a release uses
it: a BINARYMIME message made 7-bit for a next hop reached by DATA.
"""

from __future__ import annotations

import base64
import email
import email.policy
import re

import pytest

from netd.services.smtp.mime import NotConvertible, seven_bit
from netd.services.smtp.spool import Envelope

BINARY = b"\x00\x01\r\xff\n" + b"x" * 2000 + b"\r\n\x00"
MIXED = (
    b"Received: from c.test\r\nSubject: bin\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: multipart/mixed; boundary=zz\r\nContent-Transfer-Encoding: binary\r\n\r\n"
    b"preamble\r\n"
    b"--zz\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nGr\xc3\xbc\xc3\x9fe\r\n"
    b"--zz\r\nContent-Type: application/octet-stream\r\ncontent-transfer-encoding:\r\n binary\r\n"
    b"\r\n" + BINARY + b"\r\n"
    b"--zz\r\nContent-Type: text/plain\r\n\r\nseven bit, as it was\r\n--zz--\r\nepilogue\r\n"
)


def _is_seven_bit_lines(data: bytes) -> bool:
    return re.search(rb"[\x00\x80-\xff]|\r(?!\n)|(?<!\r)\n|[^\r\n]{999}", data) is None


def test_binary_parts_go_in_base64_and_the_rest_as_it_came() -> None:
    converted = seven_bit(MIXED)
    assert _is_seven_bit_lines(converted)
    parsed = email.message_from_bytes(converted, policy=email.policy.default)
    assert parsed["content-transfer-encoding"] == "7bit"
    text, binary, seven = parsed.iter_parts()  # type: ignore[attr-defined]
    assert text.get_content() == "Grüße"  # the CRLF before a delimiter is its own
    assert binary.get_all("content-transfer-encoding") == ["base64"]
    assert binary.get_payload(decode=True) == BINARY
    assert seven.get_content() == "seven bit, as it was"
    # Headers, preamble, delimiters, the 7-bit part and the epilogue untouched.
    assert converted.startswith(MIXED[: MIXED.index(b"Content-Transfer-Encoding: binary")])
    assert converted.endswith(
        MIXED[MIXED.index(b"--zz\r\nContent-Type: text/plain\r\n\r\nseven") :]
    )


def test_a_single_binary_body_gets_base64_and_mime_version() -> None:
    converted = seven_bit(b"Subject: x\r\n\r\n" + BINARY)
    head, _, body = converted.partition(b"\r\n\r\n")
    assert head == b"Subject: x\r\nContent-Transfer-Encoding: base64\r\nMIME-Version: 1.0"
    assert body.endswith(b"\r\n") and _is_seven_bit_lines(converted)
    assert base64.b64decode(body) == BINARY


def test_seven_bit_messages_and_base64_parts_stay_or_are_rewrapped() -> None:
    plain = b"Subject: x\r\nContent-Transfer-Encoding: 7bit\r\n\r\nlines\r\n"
    assert seven_bit(plain) == plain
    labelled = b"Subject: x\r\nContent-Transfer-Encoding: binary\r\n\r\nlines\r\n"
    assert seven_bit(labelled) == plain
    one_line = b"Subject: x\r\nContent-Transfer-Encoding: base64\r\n\r\n" + base64.b64encode(BINARY)
    converted = seven_bit(one_line)
    assert _is_seven_bit_lines(converted)
    assert base64.b64decode(converted.partition(b"\r\n\r\n")[2]) == BINARY


@pytest.mark.parametrize(
    "message",
    [
        b"Subject: x\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n\x00=41\n",
        # Parts past the limits (100 multiparts deep) are not read: binary there stays binary.
        b"".join(
            b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (n, n)
            for n in range(101)
        )
        + b"\r\n\x00\n",
        b"Content-Type: multipart/mixed; boundary=none\r\n\r\nno delimiters \x00\n",
        b"Subject: bare\nLF in the header\r\n\r\nbody\r\n",
    ],
)
def test_what_cannot_be_made_lines_is_refused(message: bytes) -> None:
    with pytest.raises(NotConvertible):
        seven_bit(message)


def test_an_envelope_keeps_that_it_came_as_binarymime() -> None:
    envelope = Envelope(
        id="m", sender="", recipients=("a@b.test",), received=1.0, size=3, binary=True
    )
    data = envelope.as_json()
    assert data["binarymime"] is True and Envelope.from_json(data) == envelope
    del data["binarymime"]  # spooled before netd kept it
    assert Envelope.from_json(data).binary is False


def test_lines_of_998_octets_stay_and_longer_ones_go_in_base64() -> None:
    fits = b"Subject: x\r\n\r\n" + (b"a" * 998 + b"\r\n") * 3 + b"b" * 998
    assert seven_bit(fits) == fits
    for longer in (b"a" * 999 + b"\r\n", b"a\r\n" + b"b" * 999):
        converted = seven_bit(b"Subject: x\r\n\r\n" + longer)
        assert b"Content-Transfer-Encoding: base64\r\n" in converted
        assert base64.b64decode(converted.partition(b"\r\n\r\n")[2]) == longer
