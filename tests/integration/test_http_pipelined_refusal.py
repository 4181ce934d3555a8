"""
A bad request pipelined behind good ones: RFC 9112 9.3.2, responses go in
request order, so each request before it is answered, then the 400, then the
close (as nginx does), even when one of them is answered late.
"""

from __future__ import annotations

import re

import pytest

from netd.testing import NetdProcess
from tests.clients import raw_http
from tests.conftest import StartNetd

SLOW = b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"
FAST = b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n"
BROKEN = b"BROKEN REQUEST\r\n\r\n"

MAP = """
services:
  web:
    type: http
    listen: ["tcp:0:interface=127.0.0.1"]
    routes:
      - {path: /slow, delay: 0.3, body: "slow\\n"}
      - {path: /fast, body: "fast\\n"}
"""


@pytest.fixture
def netd(start_netd: StartNetd) -> NetdProcess:
    return start_netd(MAP)


@pytest.mark.parametrize(
    ("requests", "bodies"),
    [
        (SLOW + BROKEN, [b"slow"]),
        (SLOW + FAST + BROKEN, [b"slow", b"fast"]),
        (FAST + SLOW + BROKEN, [b"fast", b"slow"]),
    ],
    ids=["slow", "slow-fast", "fast-slow"],
)
def test_a_bad_request_is_answered_after_the_requests_before_it(
    netd: NetdProcess, requests: bytes, bodies: list[bytes]
) -> None:
    answer = raw_http(netd, requests)
    assert re.findall(rb"HTTP/1\.1 (\d+) ", answer) == [b"200"] * len(bodies) + [b"400"]
    assert re.findall(rb"\r\n\r\n([^\n]*)\n", answer) == [*bodies, b"400 Bad Request"]
    assert answer.count(b"Connection: close") == 1 and answer.endswith(b"400 Bad Request\n")
