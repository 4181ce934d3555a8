"""
A rule's throttle and byte budget on connections whose replies come from a
producer (an IMAP FETCH, an HTTP/2 connection, an ftp transfer, a static
file, a proxied answer), seen by real clients: the bytes arrive whole and
at the rate, the connection serves its next request after the throttled
one, and a client that stops reading under C{close: N} holds netd's memory
flat while others are served.
"""

from __future__ import annotations

import ftplib
import imaplib
import io
import random
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from netd.testing import NetdProcess
from tests.clients import deliver
from tests.maps import lab_map
from tests.signals import status_kib

USER = "reader@netd.test"
PASSWORD = "producer-secret"
MESSAGE_SIZE = 4 << 20
FILE_SIZE = 2 << 20
RATE = 2_000_000
# A budget no reply here reaches: close: N that never closes, only watches.
BUDGET = 1 << 30


def _bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


BODY = _bytes(FILE_SIZE, 1)
# Lines of 78 bytes with their CRLF, as SMTP carries them.
TEXT = b"".join(_bytes(38, line).hex().encode() + b"\r\n" for line in range(MESSAGE_SIZE // 78))
MESSAGE = b"From: shop@client.test\r\nSubject: big\r\n\r\n" + TEXT


class _Endless(BaseHTTPRequestHandler):
    """An upstream whose answer is larger than any test reads: 1 GiB of zeros."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(1 << 30))
        self.end_headers()
        chunk = bytes(1 << 16)
        try:
            for _ in range((1 << 30) // len(chunk)):
                self.wfile.write(chunk)
        except OSError:
            pass  # netd went away: the test is over

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def upstream() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Endless)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def producers_map(root: Path, state: Path, upstream: int) -> str:
    return lab_map(
        f"""
  mail:
    type: smtp
    listen: ["tcp:0:interface=127.0.0.1"]
    hostname: mx.netd.test
    max_message_size: {8 << 20}
    relay: {{allow_from: [], domains: [netd.test]}}
    imap: {{listen: ["tcp:0:interface=127.0.0.1"]}}
    mailboxes: {{allow_insecure_auth: true, users: {{"{USER}": {{password: "{PASSWORD}"}}}}}}
  web:
    type: http
    listen:
      - "tcp:0:interface=127.0.0.1"
      - {{endpoint: "ssl:0:interface=127.0.0.1", tls: lab}}
    root: {root}
    access_log: false
    routes:
      - {{path: /up/, proxy: "http://127.0.0.1:{upstream}/"}}
  files:
    type: ftp
    listen: ["tcp:0:interface=127.0.0.1"]
    root: {root}
    anonymous: read
""",
        state,
    )


@pytest.fixture(scope="module")
def netd(tmp_path_factory: pytest.TempPathFactory, upstream: int) -> Iterator[NetdProcess]:
    base = tmp_path_factory.mktemp("producers")
    root = base / "site"
    root.mkdir()
    (root / "big.bin").write_bytes(BODY)
    with (root / "huge.bin").open("wb") as huge:
        huge.truncate(256 << 20)
    with NetdProcess.start(producers_map(root, base / "state", upstream), base / "netd") as process:
        yield process


@pytest.fixture(scope="module")
def stored(netd: NetdProcess) -> bytes:
    """The 4 MiB message in the mailbox, as IMAP serves it (with netd's Received: line)."""
    return netd.message("mail", deliver(netd, USER, MESSAGE))


def imap(netd: NetdProcess) -> imaplib.IMAP4:
    host, port = netd.address("mail", protocol="imap")
    client = imaplib.IMAP4(host, port, timeout=20)
    client.login(USER, PASSWORD)
    client.select("INBOX")
    return client


def fetch_body(client: imaplib.IMAP4) -> bytes:
    status, data = client.fetch("1", "(BODY.PEEK[])")
    assert status == "OK", data
    _, value = data[0]  # type: ignore[misc]
    assert isinstance(value, bytes)
    return value


def within_rate(seconds: float, size: int) -> bool:
    return 0.8 * size / RATE <= seconds <= 1.5 * size / RATE


def test_a_throttle_at_connect_paces_an_imap_fetch_and_the_next_fetch_works(
    netd: NetdProcess, stored: bytes
) -> None:
    with netd.rule("mail", throttle=RATE) as throttle:
        client = imap(netd)
        throttle.wait_fired()
        begun = time.monotonic()
        assert fetch_body(client) == stored
        assert within_rate(time.monotonic() - begun, len(stored)), time.monotonic() - begun
        # The next FETCH registers its own producer with the throttle.
        status, data = client.fetch("1", "(RFC822.SIZE)")
        assert (status, data) == ("OK", [f"1 (RFC822.SIZE {len(stored)})".encode()])
        client.logout()
    assert "Traceback" not in netd.output


def h2_client(netd: NetdProcess) -> httpx.Client:
    trust = ssl.create_default_context(cafile=str(netd.ca_file("lab")))
    return httpx.Client(http2=True, verify=trust, timeout=20)


def test_a_throttle_takes_an_h2_connection_over_and_hands_it_back(netd: NetdProcess) -> None:
    url = netd.url("web", tls=True, path="/big.bin")
    with h2_client(netd) as client:
        # The connection is open, its producer registered, before the rule comes.
        assert client.head(url).http_version == "HTTP/2"
        with netd.rule("web", match={"path": "/big.bin"}, throttle=RATE) as throttle:
            for count in (1, 2):
                begun = time.monotonic()
                answer = client.get(url)
                took = time.monotonic() - begun
                assert answer.http_version == "HTTP/2"
                assert answer.content == BODY
                assert within_rate(took, FILE_SIZE), (count, took)
            assert throttle.fired == 2
        # Handed back: unthrottled again, on the same connection.
        begun = time.monotonic()
        assert client.get(url).content == BODY
        assert time.monotonic() - begun < 0.5 * FILE_SIZE / RATE
    assert "Traceback" not in netd.output


def read_answer(reader: io.BufferedReader) -> bytes:
    """One HTTP/1.1 answer with a Content-Length: its body."""
    length = None
    while (line := reader.readline()) != b"\r\n":
        assert line, "closed before the end of the head"
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    assert length is not None
    return reader.read(length)


def test_a_throttle_on_a_reply_pipelined_behind_a_cut_one_paces_it(netd: NetdProcess) -> None:
    """
    The shaper of the first reply, done as its file ends, leaves in place the
    one the next reply's rule installs in that turn (it used to undo it).
    """
    with (
        netd.rule("web", match={"path": "/big.bin", "header": {"X-Slow": "1"}}, throttle=RATE),
        netd.rule("web", match={"path": "/big.bin"}, close=BUDGET),
        socket.create_connection(netd.address("web"), timeout=20) as sock,
        sock.makefile("rb") as reader,
    ):
        sock.sendall(
            b"GET /big.bin HTTP/1.1\r\nHost: a\r\n\r\n"
            b"GET /big.bin HTTP/1.1\r\nHost: a\r\nX-Slow: 1\r\n\r\n"
        )
        assert read_answer(reader) == BODY
        begun = time.monotonic()
        assert read_answer(reader) == BODY
        took = time.monotonic() - begun
    # Its pacing may start while the client still reads the first answer.
    assert 0.6 * FILE_SIZE / RATE <= took <= 1.5 * FILE_SIZE / RATE, took


def test_a_reply_pipelined_behind_a_throttled_one_is_not_paced(netd: NetdProcess) -> None:
    """
    The throttled reply, written whole at once, is over while its bytes still
    wait for the rate: the file after it waited behind them at that rate too.
    """
    slow = 200_000
    paced = "p" * (slow // 5)
    with (
        netd.rule("web", match={"path": "/paced"}, reply={"body": paced}, throttle=slow),
        socket.create_connection(netd.address("web"), timeout=20) as sock,
        sock.makefile("rb") as reader,
    ):
        sock.sendall(
            b"GET /paced HTTP/1.1\r\nHost: a\r\n\r\nGET /big.bin HTTP/1.1\r\nHost: a\r\n\r\n"
        )
        assert read_answer(reader) == paced.encode()
        begun = time.monotonic()
        assert read_answer(reader) == BODY
        took = time.monotonic() - begun
    assert took < 0.1 * FILE_SIZE / slow, took  # 1 s, where the rate took 10


def test_a_throttle_pauses_an_h2_connection_whose_client_does_not_read(
    netd: NetdProcess,
) -> None:
    url = netd.url("web", tls=True, path="/huge.bin")
    with h2_client(netd) as client:
        assert client.head(url).http_version == "HTTP/2"
        # httpx opens a window of 16 MiB on each stream: HTTP/2's flow control
        # lets netd send that much before the client reads any of it.
        with netd.rule("web", match={"path": "/huge.bin"}, throttle=RATE):
            before = status_kib(netd)
            with client.stream("GET", url) as answer:
                assert answer.status_code == 200
                assert grows_by(netd, before, 1.5) < 4 << 10
                # Others are served meanwhile (httpx does not reset the stream
                # it leaves, so this connection would still carry huge.bin).
                with h2_client(netd) as other:
                    assert other.get(netd.url("web", tls=True, path="/big.bin")).content == BODY
    assert "Traceback" not in netd.output


def test_a_throttled_retr_then_another_on_the_same_session(netd: NetdProcess) -> None:
    ftp = ftplib.FTP()
    ftp.connect(*netd.address("files"), timeout=20)
    ftp.login()
    with netd.rule("files", match={"command": "RETR"}, throttle=RATE):
        for count in (1, 2):
            got = io.BytesIO()
            begun = time.monotonic()
            ftp.retrbinary("RETR big.bin", got.write)
            took = time.monotonic() - begun
            assert got.getvalue() == BODY
            assert within_rate(took, FILE_SIZE), (count, took)
    ftp.quit()
    assert "Traceback" not in netd.output


def stalled_reader(address: tuple[str, int]) -> socket.socket:
    """A connection whose receive buffer is small, and that the test never reads past a point."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(address)
    return sock


def grows_by(netd: NetdProcess, before: int, seconds: float) -> int:
    """The most netd's resident memory grew past C{before} (KiB) while C{seconds} pass."""
    most = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        most = max(most, status_kib(netd) - before)
        time.sleep(0.05)
    return most


def test_close_n_holds_an_imap_fetch_the_client_does_not_read(
    netd: NetdProcess, stored: bytes
) -> None:
    # Message 2, after the big one: small, so that what one FETCH of it
    # holds is little, and many FETCHes of it show what piles up.
    small = b"Subject: small\r\n\r\n" + TEXT[: 256 << 10]
    deliver(netd, USER, small)
    with netd.rule("mail", close=BUDGET) as budget:
        sock = stalled_reader(netd.address("mail", protocol="imap"))
        reader = sock.makefile("rb")
        budget.wait_fired()
        assert reader.readline().startswith(b"* OK")
        sock.sendall(f"a LOGIN {USER} {PASSWORD}\r\nb SELECT INBOX\r\n".encode())
        replies = iter(reader.readline, b"")  # ends if netd closes; a timeout if it is silent
        assert any(line.startswith(b"b OK") for line in replies)
        before = status_kib(netd)
        # 128 FETCHes of 256 KiB, pipelined, none read: 32 MiB if none waited.
        sock.sendall(b"".join(b"f%d FETCH 2 BODY.PEEK[]\r\n" % n for n in range(128)))
        assert grows_by(netd, before, 2) < 4 << 10
        # Others are served meanwhile.
        other = imap(netd)
        assert other.noop()[0] == "OK"
        other.logout()
        reader.close()
        sock.close()
    assert "Traceback" not in netd.output


@pytest.mark.parametrize(
    "path",
    [
        "/huge.bin",  # a file, read as the transport asks for more
        "/up/huge",  # a proxied answer, streamed as the upstream sends it
    ],
)
def test_close_n_holds_a_download_the_client_does_not_read(netd: NetdProcess, path: str) -> None:
    with netd.rule("web", match={"path": path}, close=BUDGET) as budget:
        sock = stalled_reader(netd.address("web"))
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        budget.wait_fired()
        before = status_kib(netd)
        assert grows_by(netd, before, 2) < 4 << 10
        # Others are served meanwhile.
        assert httpx.get(netd.url("web", path="/big.bin"), timeout=10).content == BODY
        sock.close()
    assert "Traceback" not in netd.output
