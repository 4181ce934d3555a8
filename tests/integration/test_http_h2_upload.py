"""
Uploads over HTTP/2 to a proxy route stream to the upstream as they arrive, paced by
it, and are refused past C{max_body} as they cross it.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator

import h2.config
import h2.connection
import h2.errors
import h2.events
import httpx
import pytest

from netd.testing import NetdProcess
from tests.signals import status_kib

UPLOAD = 50 << 20
CHUNK = 256 << 10


class SlowUpstream:
    """
    An HTTP/1.1 upstream that reads request bodies at about 16 MiB/s, noting
    how much the client had sent when its first MiB came in, then answers with
    the byte count.  A chunked body is read until the connection closes (and
    never answered): L{cut} counts the connections closed mid-body.
    """

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port: int = self.sock.getsockname()[1]
        self.client_sent = 0  # what the test's client has produced so far
        self.sent_at_first_mib: int | None = None
        self.received = 0
        self.cut = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(20)
            head = b""
            while b"\r\n\r\n" not in head:
                data = conn.recv(65536)
                if not data:
                    return
                head += data
            head, _, body = head.partition(b"\r\n\r\n")
            fields = dict(line.split(b":", 1) for line in head.split(b"\r\n")[1:] if b":" in line)
            length = int(fields.get(b"Content-Length", b"%d" % (1 << 40)))
            got = len(body)
            deadline = time.monotonic() + 60
            while got < length and time.monotonic() < deadline:
                try:
                    data = conn.recv(min(64 << 10, length - got))
                except ConnectionResetError:
                    data = b""  # an aborted connection (Twisted's abortConnection)
                if not data:
                    self.cut += 1
                    return
                got += len(data)
                self.received = got
                if got >= 1 << 20 and self.sent_at_first_mib is None:
                    self.sent_at_first_mib = self.client_sent
                time.sleep(0.004)  # a slow reader: 64 KiB per 4 ms at best
            answer = b"%d\n" % got
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def upstream() -> Iterator[SlowUpstream]:
    slow = SlowUpstream()
    yield slow
    slow.close()


@pytest.fixture(scope="module")
def netd(tmp_path_factory: pytest.TempPathFactory, upstream: SlowUpstream) -> Iterator[NetdProcess]:
    base = tmp_path_factory.mktemp("h2upload")
    config = f"""
state_dir: state
tls:
  lab: {{self_signed: [localhost, 127.0.0.1]}}
services:
  web:
    type: http
    listen: [{{endpoint: "ssl:0:interface=127.0.0.1", tls: lab}}]
    access_log: false
    record: 10
    routes:
      - {{path: /up/, proxy: "http://127.0.0.1:{upstream.port}/"}}
      - {{path: /hello, body: "hello\\n"}}
    limits: {{max_body: {64 << 20}}}
  small:
    type: http
    listen: [{{endpoint: "ssl:0:interface=127.0.0.1", tls: lab}}]
    access_log: false
    routes:
      - {{path: /up/, proxy: "http://127.0.0.1:{upstream.port}/"}}
      - {{path: /hello, body: "hello\\n"}}
    limits: {{max_body: {1 << 20}}}
"""
    process = NetdProcess.start(config, base / "netd")
    yield process
    process.stop()


def _trust(netd: NetdProcess) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(netd.ca_file("lab")))


def test_h2_upload_streams_to_a_slow_upstream_with_flat_memory(
    netd: NetdProcess, upstream: SlowUpstream
) -> None:
    before = status_kib(netd)

    def body() -> Iterator[bytes]:
        chunk = b"u" * CHUNK
        for _ in range(UPLOAD // CHUNK):
            upstream.client_sent += CHUNK
            yield chunk

    with httpx.Client(http2=True, verify=_trust(netd), timeout=60) as client:
        answer = client.post(
            netd.url("web", tls=True, path="/up/store"),
            content=body(),
            headers={"content-length": str(UPLOAD)},
        )
        # The same connection carries on: its window was all given back.
        hello = client.get(netd.url("web", tls=True, path="/hello"))
    assert hello.text == "hello\n"
    assert answer.http_version == "HTTP/2"
    assert (answer.status_code, answer.text) == (200, f"{UPLOAD}\n")
    # Streamed: the upstream had its first MiB while the client was far from
    # done (buffered, it would have had nothing before all 50 MiB were in).
    assert upstream.sent_at_first_mib is not None
    assert upstream.sent_at_first_mib < UPLOAD // 2, upstream.sent_at_first_mib
    grown = status_kib(netd, "VmHWM") - before
    assert grown < 24 * 1024, f"netd grew by {grown} KiB for a {UPLOAD >> 20} MiB upload"
    # Journalled and recorded as over HTTP/1.1: its size, its first bytes.
    (record,) = [r for r in netd.view("web", "requests") if r["method"] == "POST"]
    assert (record["protocol"], record["status"], record["body_size"]) == ("HTTP/2", 200, UPLOAD)
    assert record["body"].startswith("uuuu")


def test_h2_upload_over_max_body_is_refused_mid_stream(
    netd: NetdProcess, upstream: SlowUpstream
) -> None:
    # A bare h2 client: httpx sends a whole body before it reads an early answer.
    context = _trust(netd)
    context.set_alpn_protocols(["h2"])
    raw = socket.create_connection(netd.address("small", tls=True), timeout=10)
    sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    request = [(":method", "POST"), (":scheme", "https"), (":authority", "localhost")]
    # No Content-Length: the body is streamed to the upstream until it crosses 1 MiB.
    client.send_headers(1, [*request, (":path", "/up/store")])
    sock.sendall(client.data_to_send())
    cut_before = upstream.cut
    status, reset, sent = 0, None, 0
    deadline = time.monotonic() + 20
    while (not status or reset is None) and time.monotonic() < deadline:
        room = min(client.local_flow_control_window(1), 16384) if reset is None else 0
        if room and sent < 8 << 20:
            client.send_data(1, b"z" * room)
            sock.sendall(client.data_to_send())
            sent += room
        sock.settimeout(0.02 if room else 2)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        assert data, "netd closed the connection"
        for event in client.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                status = int(dict(event.headers)[b":status"])
            elif isinstance(event, h2.events.StreamReset):
                reset = event.error_code
        sock.sendall(client.data_to_send())
    assert (status, reset) == (413, h2.errors.ErrorCodes.NO_ERROR)
    assert 1 << 20 < sent < 4 << 20  # refused as the limit was crossed, not at the end
    # The upstream had the body streamed to it, and is cut off mid-way.
    while upstream.cut == cut_before and time.monotonic() < deadline:
        time.sleep(0.05)  # polling the upstream thread's counter, not netd
    assert upstream.cut == cut_before + 1
    sock.close()
    with httpx.Client(http2=True, verify=_trust(netd), timeout=10) as http:
        hello = http.get(netd.url("small", tls=True, path="/hello"))
    assert (hello.http_version, hello.text) == ("HTTP/2", "hello\n")
