"""
DNS over HTTPS on HTTP/2 against raw frames over TLS: the abuses RFC 9113's
security considerations name (CONTINUATION without end, answers never read,
streams opened and reset at once) cost the daemon a bounded amount, end that
connection or its streams, and the daemon serves on.
"""

from __future__ import annotations

import base64
import contextlib
import socket
import ssl
import struct
import time
from collections.abc import Iterator

import dns.message
import httpx2
import pytest

from netd.testing import NetdProcess
from tests.conftest import StartNetd

pytestmark = pytest.mark.integration

LOCAL = "127.0.0.1"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, CONTINUATION = 0, 1, 3, 4, 6, 7, 9
END_STREAM, END_HEADERS = 0x1, 0x4
CANCEL, REFUSED_STREAM, ENHANCE_YOUR_CALM = 8, 7, 11


@pytest.fixture
def silent() -> Iterator[socket.socket]:
    """An upstream that takes queries and never answers."""
    upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    upstream.bind((LOCAL, 0))
    yield upstream
    upstream.close()


@pytest.fixture
def netd(start_netd: StartNetd, silent: socket.socket) -> NetdProcess:
    return start_netd(
        f"""
tls:
  lab: {{self_signed: [localhost, 127.0.0.1]}}
services:
  dns:
    type: dns
    listen: ["udp:0:interface=127.0.0.1"]
    doh: [{{endpoint: "ssl:0:interface=127.0.0.1", tls: lab}}]
    records:
      www.doh.test: {{A: [127.0.0.1]}}
    forward: {{upstreams: ["{LOCAL}:{silent.getsockname()[1]}"], timeout: 20}}
"""
    )


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return struct.pack(">HBBBI", len(payload) >> 8, len(payload) & 0xFF, kind, flags, stream_id) + (
        payload
    )


def connect(netd: NetdProcess, receive_buffer: int | None = None) -> ssl.SSLSocket:
    port = next(e["port"] for e in netd.listeners("dns") if e["transport"] == "tcp")
    context = ssl.create_default_context(cafile=netd.ca_file("lab"))
    context.set_alpn_protocols(["h2"])
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer is not None:
        # Set before connecting, so the window TCP offers stays small.
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    raw.settimeout(20)
    raw.connect((LOCAL, port))
    tls = context.wrap_socket(raw, server_hostname="localhost")
    assert tls.selected_alpn_protocol() == "h2"
    tls.sendall(PREFACE + frame(SETTINGS, 0, 0))
    return tls


def read_frames(sock: ssl.SSLSocket, until: int) -> list[tuple[int, int, int, bytes]]:
    """Frames the server sends, up to one of type C{until} or the connection's end."""
    buffer = b""
    found: list[tuple[int, int, int, bytes]] = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        while len(buffer) >= 9:
            high, low, kind, flags, stream_id = struct.unpack_from(">HBBBI", buffer)
            size = high << 8 | low
            if len(buffer) < 9 + size:
                break
            found.append((kind, flags, stream_id, buffer[9 : 9 + size]))
            buffer = buffer[9 + size :]
            if kind == until:
                return found
        try:
            data = sock.recv(65536)
        except (ConnectionError, ssl.SSLError):
            return found
        if not data:
            return found
        buffer += data
    raise AssertionError(f"no frame of type {until} in 20 s: {found}")


def request(path: bytes) -> bytes:
    """A GET's header block as HPACK literals: method and scheme indexed, the path not."""
    return b"\x82\x87\x04" + bytes([len(path)]) + path


def query_path(name: str) -> bytes:
    wire = dns.message.make_query(name, "A", id=0).to_wire()
    return b"/dns-query?dns=" + base64.urlsafe_b64encode(wire).rstrip(b"=")


def assert_serving(netd: NetdProcess) -> None:
    port = next(e["port"] for e in netd.listeners("dns") if e["transport"] == "tcp")
    verify = ssl.create_default_context(cafile=netd.ca_file("lab"))
    with httpx2.Client(verify=verify, http2=True, timeout=10) as http:
        answer = http.get(f"https://{LOCAL}:{port}{query_path('www.doh.test').decode()}")
    assert answer.http_version == "HTTP/2" and answer.status_code == 200
    assert dns.message.from_wire(answer.content).answer


def test_continuation_frames_without_end_are_cut_with_enhance_your_calm(
    netd: NetdProcess,
) -> None:
    with connect(netd) as sock:
        flood = frame(HEADERS, 0, 1, b"\x82") + frame(CONTINUATION, 0, 1, b"\x00" * 16384) * 64
        # Cut while still sending, maybe: the GOAWAY is read below all the same.
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            sock.sendall(flood)
        frames = read_frames(sock, GOAWAY)
    codes = [int.from_bytes(p[4:8], "big") for kind, _, _, p in frames if kind == GOAWAY]
    assert codes == [ENHANCE_YOUR_CALM]
    assert_serving(netd)


def test_a_client_that_never_reads_its_answers_is_cut(netd: NetdProcess) -> None:
    pings = frame(PING, 0, 0, b"12345678") * 2000
    cut = False
    with connect(netd, receive_buffer=4096) as sock:
        # Each PING is answered; unread, the answers pile up in the daemon until
        # it cuts the connection (at 1 MiB past what the kernel buffers).
        for _ in range(1000):  # 34 MB at most
            try:
                sock.sendall(pings)
            except (ConnectionError, ssl.SSLError, TimeoutError):
                cut = True
                break
    assert cut
    assert_serving(netd)


def test_streams_opened_and_reset_at_once_queue_at_most_100_upstream_queries(
    netd: NetdProcess, silent: socket.socket
) -> None:
    with connect(netd) as sock:
        burst = b"".join(
            frame(HEADERS, END_HEADERS | END_STREAM, stream_id, request(query_path(f"q{n}.far")))
            + frame(RST_STREAM, 0, stream_id, CANCEL.to_bytes(4, "big"))
            for n, stream_id in enumerate(range(1, 400, 2))
        )
        sock.sendall(burst + frame(PING, 0, 0, b"the end."))
        frames = read_frames(sock, PING)
    refused = [sid for kind, _, sid, p in frames if kind == RST_STREAM and p == b"\0\0\0\7"]
    assert len(refused) == 100 and min(refused) == 201
    # The answers of the first 100 are owed until the upstream answers: their
    # queries went out, and nothing past them.
    silent.settimeout(1)
    asked = 0
    try:
        for _ in range(300):
            silent.recv(512)
            asked += 1
    except TimeoutError:
        pass
    assert asked == 100
    assert_serving(netd)
