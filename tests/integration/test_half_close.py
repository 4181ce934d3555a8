"""
A client that sends its last request and then half-closes (C{shutdown(SHUT_WR)},
as C{printf ... | nc -q 2} does) still gets every reply it is owed, then the
connection closes.  Before, Twisted closed at the FIN and dropped what was
buffered: an SMTP client never saw the 250 for a spooled message and sent it again.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.rdatatype
import pytest

from netd.testing import NetdProcess
from tests.conftest import StartNetd
from tests.fakes.upstreams import QuietHandler, serving_http

_BIG = bytes(range(256)) * 4096  # 1 MiB


class _Upstream(QuietHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.answer(200, b"from upstream\n")


@pytest.fixture(scope="module")
def upstream_port() -> Iterator[int]:
    with serving_http(_Upstream) as port:
        yield port


@pytest.fixture
def netd(start_netd: StartNetd, tmp_path: Path, upstream_port: int) -> NetdProcess:
    www = tmp_path / "www"
    www.mkdir()
    (www / "big.bin").write_bytes(_BIG)
    return start_netd(
        f"""
services:
  echo: {{type: echo, listen: ["tcp:0:interface=127.0.0.1"]}}
  chargen: {{type: chargen, listen: ["tcp:0:interface=127.0.0.1"]}}
  daytime: {{type: daytime, listen: ["tcp:0:interface=127.0.0.1"]}}
  web:
    type: http
    listen: ["tcp:0:interface=127.0.0.1"]
    root: {www}
    routes:
      - {{path: /up, proxy: "http://127.0.0.1:{upstream_port}/up"}}
  dns:
    type: dns
    listen: ["tcp:0:interface=127.0.0.1"]
    records: {{www.netd.test: {{A: [127.0.0.9]}}}}
  mail:
    type: smtp
    listen: ["tcp:0:interface=127.0.0.1"]
    hostname: mx.netd.test
    relay: {{allow_from: [127.0.0.0/8], domains: [netd.test]}}
    delivery: {{mode: capture}}
  files:
    type: ftp
    listen: ["tcp:0:interface=127.0.0.1"]
    root: {www}
    users: {{alice: {{password: pw, home: .}}}}
    login_delay: 0.2
  chat:
    type: chat
    listen:
      - "tcp:0:interface=127.0.0.1"
      - {{endpoint: "tcp:0:interface=127.0.0.1", protocol: line}}
    server_name: chat.netd.test
    rooms: [lobby]
"""
    )


def _send_then_half_close(address: tuple[str, int], request: bytes, limit: int = 0) -> bytes:
    """Send C{request}, shut the write side, read to EOF (or C{limit} bytes)."""
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        received = bytearray()
        while not limit or len(received) < limit:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        return bytes(received)


def test_echo_answers_all_it_was_sent(netd: NetdProcess) -> None:
    assert _send_then_half_close(netd.address("echo"), b"hi\n") == b"hi\n"
    assert _send_then_half_close(netd.address("echo"), _BIG) == _BIG


def test_chargen_keeps_streaming_to_a_reader(netd: NetdProcess) -> None:
    assert len(_send_then_half_close(netd.address("chargen"), b"x", limit=10_000)) >= 10_000


def test_daytime_answers(netd: NetdProcess) -> None:
    assert _send_then_half_close(netd.address("daytime"), b"").endswith(b"\r\n")


def test_http_static_file_and_proxy_route(netd: NetdProcess) -> None:
    reply = _send_then_half_close(netd.address("web"), b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and body == _BIG
    reply = _send_then_half_close(netd.address("web"), b"GET /up HTTP/1.1\r\nHost: x\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"from upstream\n")


def test_http_answers_pipelined_requests_in_order(netd: NetdProcess) -> None:
    one = b"GET /up HTTP/1.1\r\nHost: x\r\n\r\n"
    reply = _send_then_half_close(netd.address("web"), one * 3)
    assert reply.count(b"HTTP/1.1 200") == 3


def test_dns_over_tcp(netd: NetdProcess) -> None:
    query = dns.message.make_query("www.netd.test", "A").to_wire()
    reply = _send_then_half_close(netd.address("dns"), len(query).to_bytes(2, "big") + query)
    answer = dns.message.from_wire(reply[2:])
    assert [rr.to_text() for rr in answer.answer[0]] == ["127.0.0.9"]


def test_smtp_answers_the_message_it_spooled_once(netd: NetdProcess) -> None:
    session = (
        b"EHLO client.test\r\nMAIL FROM:<a@client.test>\r\nRCPT TO:<b@netd.test>\r\nDATA\r\n"
        b"Subject: half\r\n\r\nbody\r\n.\r\nQUIT\r\n"
    )
    reply = _send_then_half_close(netd.address("mail"), session)
    codes = [line[:3] for line in reply.split(b"\r\n") if line[3:4] == b" "]
    assert codes == [b"220", b"250", b"250", b"250", b"354", b"250", b"221"]
    assert len(netd.messages("mail")) == 1


def test_ftp_answers_a_delayed_login_and_what_follows(netd: NetdProcess) -> None:
    session = b"USER alice\r\nPASS wrong\r\nUSER alice\r\nPASS pw\r\nPWD\r\nQUIT\r\n"
    reply = _send_then_half_close(netd.address("files"), session)
    codes = [line[:3] for line in reply.split(b"\r\n") if line[3:4] == b" "]
    assert codes[-3:] == [b"230", b"257", b"221"], reply


def test_irc_registration_and_line_chat(netd: NetdProcess) -> None:
    irc = netd.address("chat")
    reply = _send_then_half_close(irc, b"NICK alice\r\nUSER alice 0 * :Alice\r\n")
    assert b" 001 alice " in reply and b" 004 alice " in reply
    line = netd.listeners("chat")[1]
    reply = _send_then_half_close((line["host"], line["port"]), b"bob\n/rooms\n")
    assert b"lobby" in reply


def test_admin_api(netd: NetdProcess) -> None:
    admin = netd.ports["admin"]["listeners"][0]
    reply = _send_then_half_close(
        (admin["host"], admin["port"]), b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"
    )
    assert reply.startswith(b"HTTP/1.1 200")


def test_admin_api_answers_a_long_poll_at_once(netd: NetdProcess) -> None:
    # A client that half-closed waits for its answer, not for events to come:
    # the poll is answered now, and its connection does not hold a slot for 30 s.
    admin = netd.ports["admin"]["listeners"][0]
    started = time.monotonic()
    reply = _send_then_half_close(
        (admin["host"], admin["port"]),
        b"GET /api/events?since=1000000&wait=30 HTTP/1.1\r\nHost: localhost\r\n\r\n",
    )
    assert reply.startswith(b"HTTP/1.1 200") and b'"events": []' in reply
    assert time.monotonic() - started < 10


def test_admin_api_closes_at_once_on_a_request_cut_short(netd: NetdProcess) -> None:
    admin = netd.ports["admin"]["listeners"][0]
    started = time.monotonic()
    reply = _send_then_half_close((admin["host"], admin["port"]), b"GET /healthz HTTP/1.1\r\nHo")
    assert reply == b"" and time.monotonic() - started < 5  # not after header_timeout
