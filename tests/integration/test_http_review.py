"""
The http kind in the real daemon against the defects of two reviews: proxy framing, a
client leaving mid-proxy, chunked trailers, path normalisation, HTTP/2 back-pressure;
then RFC 9110/9112 details (a template of a body that is not JSON, HTTP/1.0 framing and
expectations, HEAD and 304 lengths, an empty file's range, If-Match, repeated
X-Forwarded-For, Host values, the scheme's case) with httpx, HTTP/2 too, and raw sockets.
"""

from __future__ import annotations

import email.utils
import http.client
import select
import socket
import ssl
import time
from collections.abc import Iterator

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import httpx
import pytest

from netd.testing import NetdProcess
from tests.clients import raw_http
from tests.conftest import unused_port
from tests.signals import client_address, status_kib, wait_closed

BIG = 96 << 20


@pytest.fixture(scope="module")
def hanging() -> Iterator[int]:
    """An upstream that takes connections (in the kernel's backlog) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        port: int = sock.getsockname()[1]
        yield port


@pytest.fixture(scope="module")
def netd(tmp_path_factory: pytest.TempPathFactory, hanging: int) -> Iterator[NetdProcess]:
    base = tmp_path_factory.mktemp("review")
    www = base / "www"
    (www / "my dir").mkdir(parents=True)
    (www / "my dir" / "index.html").write_text("<p>spaced</p>\n")
    (www / "sub").mkdir()
    (www / "secret.txt").write_text("the secret\n")
    (www / "hello.txt").write_text("hello\n")
    (www / "empty.txt").write_text("")
    with (www / "big.bin").open("wb") as big:
        big.truncate(BIG)  # sparse: costs nothing on disk
    up = unused_port()
    config = f"""
state_dir: state
shutdown_grace: 1
tls:
  lab: {{self_signed: [localhost, 127.0.0.1]}}
services:
  up:
    type: http
    listen: ["tcp:{up}:interface=127.0.0.1"]
    access_log: false
    routes:
      - {{path: /echo, body: "upstream ok\\n"}}
      - {{path: /xff, template: true, body: "{{{{request.headers.x-forwarded-for}}}}"}}
      - {{path: /xfh, template: true, body: "{{{{request.headers.x-forwarded-host}}}}"}}
  web:
    type: http
    listen: ["tcp:0:interface=127.0.0.1", {{endpoint: "ssl:0:interface=127.0.0.1", tls: lab}}]
    root: {www}
    routes:
      - {{path: /secret.txt, status: 403, body: "forbidden\\n"}}
      - {{path: /whole, template: true, json: {{all: "{{{{request.json}}}}"}}}}
      - {{path: /old/, redirect: /, status: 301}}
      - {{path: /up/, proxy: "http://127.0.0.1:{up}/"}}
      - {{path: /hang/, proxy: "http://127.0.0.1:{hanging}/", timeout: 30}}
    limits: {{max_header_bytes: 4096, max_body: 100000, body_timeout: 30}}
"""
    process = NetdProcess.start(config, base / "netd")
    yield process
    process.stop()


def request(
    netd: NetdProcess, method: str, path: str, body: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection(*netd.address("web"), timeout=5)
    connection.request(method, path, body=body)
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, data


def assert_serving(netd: NetdProcess) -> None:
    assert request(netd, "GET", "/hello.txt")[::2] == (200, b"hello\n")
    assert netd.process.poll() is None
    assert "Unhandled error" not in netd.output and "Traceback" not in netd.output


# -- 1. the proxy frames its own request -------------------------------------------------


@pytest.mark.parametrize("method", ["POST", "PUT"])
def test_proxied_body_with_a_length_reaches_a_strict_upstream(
    netd: NetdProcess, method: str
) -> None:
    # The upstream is netd itself: llhttp answers 400 to a repeated Content-Length.
    status, _, body = request(netd, method, "/up/echo", b"x" * 1000)
    assert (status, body) == (200, b"upstream ok\n")
    assert request(netd, method, "/up/echo", b"")[::2] == (200, b"upstream ok\n")
    assert_serving(netd)


# -- 2. a client that leaves while the proxy waits ----------------------------------------


def test_client_leaving_a_proxied_request_is_quiet(netd: NetdProcess) -> None:
    for _ in range(3):
        with socket.create_connection(netd.address("web"), timeout=5) as sock:
            sock.sendall(b"GET /hang/x HTTP/1.1\r\nHost: a\r\n\r\n")
            # Time for the proxy to start waiting on the upstream: the upstream
            # never accepts, so nothing shows when it has.
            time.sleep(0.2)
    # netd does not read a client whose request is in the proxy, so it gives no
    # sign of seeing the close (no connection.closed until the proxy times out):
    # this is time for whatever the close sets off to go wrong.
    time.sleep(0.3)
    assert_serving(netd)


# -- 4. one normalised path for routes, the proxy, redirects and the root -------------------


def head_of(netd: NetdProcess, target: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    answer = raw_http(netd, b"GET " + target + b" HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    fields = dict(line.split(b": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in fields.items()}, body


@pytest.mark.parametrize(
    "target",
    [b"/secret.txt", b"/%73ecret.txt", b"//secret.txt", b"/sub/../secret.txt", b"/%2fsecret.txt"],
)
def test_a_route_cannot_be_bypassed_by_spelling(netd: NetdProcess, target: bytes) -> None:
    status, _, body = head_of(netd, target)
    assert status in (400, 403, 404) and b"the secret" not in body, (target, status, body)


def test_redirects_are_encoded_once_and_stay_on_this_host(netd: NetdProcess) -> None:
    status, fields, _ = head_of(netd, b"/my%20dir")
    assert status == 301 and fields[b"location"] == b"/my%20dir/"
    assert head_of(netd, b"/my%20dir?a=1")[1][b"location"] == b"/my%20dir/?a=1"
    assert head_of(netd, b"/my%20dir/")[2] == b"<p>spaced</p>\n"
    assert head_of(netd, b"//sub")[1][b"location"] == b"/sub/"
    status, fields, _ = head_of(netd, b"/old//evil.example/x?q")
    assert status == 301 and fields[b"location"] == b"/evil.example/x?q"
    assert head_of(netd, b"/old/a%20b")[1][b"location"] == b"/a%20b"


def test_the_proxy_forwards_the_normalised_path(netd: NetdProcess) -> None:
    for target in ("/up/echo", "/up//echo", "/up/%65cho", "//up/echo"):
        assert request(netd, "GET", target)[::2] == (200, b"upstream ok\n"), target
    assert request(netd, "GET", "/up/echo/../echo")[0] == 400


# -- 3. trailer fields count against max_header_bytes --------------------------------------


def test_an_endless_trailer_is_cut(netd: NetdProcess) -> None:
    with socket.create_connection(netd.address("web"), timeout=5) as sock:
        sock.sendall(
            b"POST /hang/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\nX-Trailer: "
        )
        started = time.monotonic()
        sent = 0
        answer = b""
        while not answer:  # netd reads on, dropping what comes after its answer
            # Before: llhttp took it all in (hundreds of MB) until body_timeout.
            assert sent < 16 << 20 and time.monotonic() - started < 3
            if select.select([sock], [], [], 0)[0]:
                answer = sock.recv(1000)
            else:
                sent += sock.send(b"a" * 65536)
        assert answer.startswith(b"HTTP/1.1 431 ")
    assert_serving(netd)


# -- HTTP/2: early 413, streams reset mid-proxy, back-pressure ------------------------------


class H2Client:
    """A bare h2 client over TLS: frames in, events out."""

    def __init__(self, netd: NetdProcess, window: int = 65535, rcvbuf: int = 0) -> None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.set_alpn_protocols(["h2"])
        raw = socket.socket()
        if rcvbuf:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect
        raw.settimeout(5)
        raw.connect(netd.address("web", tls=True))
        self.sock = context.wrap_socket(raw, server_hostname="localhost")
        assert self.sock.selected_alpn_protocol() == "h2"
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        if window > 65535:
            self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
            self.conn.increment_flow_control_window(window - 65535)
        self.flush()

    def flush(self) -> None:
        self.sock.sendall(self.conn.data_to_send())

    def request(self, stream: int, method: str, path: str, end: bool = True, **extra: str) -> None:
        headers = [(":method", method), (":path", path), (":scheme", "https")]
        headers += [(":authority", "localhost"), *extra.items()]
        self.conn.send_headers(stream, headers, end_stream=end)
        self.flush()

    def events(self, timeout: float = 5.0) -> list[h2.events.Event]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(65536)
        assert data, "netd closed the connection"
        events = self.conn.receive_data(data)
        self.flush()
        return events

    def status_of(self, stream: int) -> int:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for event in self.events():
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream:
                    return int(dict(event.headers)[b":status"])
        raise AssertionError(f"no answer on stream {stream}")

    def get(self, stream: int, path: str) -> tuple[int, bytes]:
        self.request(stream, "GET", path)
        status, body = 0, b""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for event in self.events():
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream:
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived) and event.stream_id == stream:
                    body += event.data
                    self.conn.acknowledge_received_data(event.flow_controlled_length, stream)
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream:
                    self.flush()
                    return status, body
        raise AssertionError(f"no answer on stream {stream}")

    def close(self) -> None:
        self.sock.close()


def test_h2_body_over_max_body_is_refused_as_it_crosses(netd: NetdProcess) -> None:
    client = H2Client(netd)
    # An upstream that reads the body and never answers: the body, streamed to
    # it, crosses the limit before any answer.
    client.request(1, "POST", "/hang/echo", end=False)
    sent, status, reset = 0, 0, None
    deadline = time.monotonic() + 5
    while (not status or reset is None) and time.monotonic() < deadline:
        room = min(client.conn.local_flow_control_window(1), 16384)
        if not status and room:
            client.conn.send_data(1, b"x" * room)
            client.flush()
            sent += room
        try:
            events = client.events(timeout=0.02 if room and not status else 1)
        except TimeoutError:
            continue
        for event in events:
            if isinstance(event, h2.events.ResponseReceived):
                status = int(dict(event.headers)[b":status"])
            elif isinstance(event, h2.events.StreamReset):
                reset = event.error_code
    # max_body is 100000: answered within a window or so of it, not at the body's end.
    assert status == 413 and reset == h2.errors.ErrorCodes.NO_ERROR and sent < 400_000
    client.request(3, "POST", "/up/echo", end=False, **{"content-length": str(10**9)})
    assert client.status_of(3) == 413
    assert client.get(5, "/hello.txt") == (200, b"hello\n")  # the connection carries on
    client.close()
    assert_serving(netd)


def test_h2_streams_reset_mid_answer_are_quiet(netd: NetdProcess) -> None:
    client = H2Client(netd)
    client.request(1, "GET", "/hang/x")  # the proxy waits on the upstream
    client.request(3, "GET", "/big.bin")  # a producer streams the file
    while not any(isinstance(e, h2.events.DataReceived) for e in client.events()):
        pass
    for stream in (1, 3):
        client.conn.reset_stream(stream, h2.errors.ErrorCodes.CANCEL)
    client.flush()
    assert client.get(5, "/hello.txt") == (200, b"hello\n")
    address = client_address(client.sock)
    client.close()
    wait_closed(netd, "web", address)
    assert_serving(netd)


def test_h2_download_to_a_client_that_does_not_read_keeps_memory_flat(
    netd: NetdProcess,
) -> None:
    before = status_kib(netd)
    # The whole file fits the window the client grants; only TCP holds it back.
    client = H2Client(netd, window=2**31 - 1, rcvbuf=4096)
    client.request(1, "GET", "/big.bin")
    grown = 0
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        time.sleep(0.1)  # sampling netd's memory while the download is held back
        grown = max(grown, status_kib(netd) - before)
    client.close()
    assert grown < 48 * 1024, f"netd grew by {grown} KiB for a {BIG >> 20} MiB download"
    assert_serving(netd)


# -- RFC 9110 and 9112 details (the second review) ----------------------------------


def h2_client(netd: NetdProcess) -> httpx.Client:
    trust = ssl.create_default_context(cafile=str(netd.ca_file("lab")))
    return httpx.Client(http2=True, verify=trust, timeout=10)


def exchange(netd: NetdProcess, data: bytes) -> bytes:
    """Bytes sent on one connection, and all that came back until netd closed it."""
    host, port = netd.address("web")
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(data)
        return b"".join(iter(lambda: sock.recv(65536), b""))


def test_a_template_of_a_body_that_is_not_json(netd: NetdProcess) -> None:
    # The whole JSON value as a template, the body empty or not JSON: the value is
    # missing, not a crash that answered 400 (HTTP/1.1) or dropped every stream (HTTP/2).
    url = netd.url("web", path="/whole")
    for body in (b"", b"nope"):
        answer = httpx.post(url, content=body, timeout=10)
        assert answer.status_code == 200 and answer.json() == {"all": ""}  # as any missing name
    with h2_client(netd) as client:
        answer = client.post(netd.url("web", tls=True, path="/whole"), content=b"nope")
        assert (answer.http_version, answer.status_code) == ("HTTP/2", 200)
        assert client.get(netd.url("web", tls=True, path="/hello.txt")).text == "hello\n"
    assert_serving(netd)


def test_http_1_0_with_transfer_encoding_closes_after_it(netd: NetdProcess) -> None:
    # RFC 9112 6.1: its framing is faulty; answered, then the connection closes,
    # and what came after it on the connection is not read as a request.
    said = exchange(
        netd,
        b"POST /whole HTTP/1.0\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\n{}\r\n0\r\n\r\nGET /hello.txt HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    )
    assert said.count(b"HTTP/1.1 ") == 1 and b"Connection: close" in said


def test_http_1_0_hears_no_100_continue(netd: NetdProcess) -> None:
    # RFC 9110 10.1.1: the expectation is ignored; 15.2: no 1xx to an HTTP/1.0 client.
    said = exchange(
        netd,
        b"POST /whole HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n{}",
    )
    assert said.startswith(b"HTTP/1.1 200 ") and b" 100 " not in said


def test_head_and_304_lengths(netd: NetdProcess) -> None:
    # RFC 9110 8.6, 9.3.2: a proxied HEAD has the length GET would have; a 304 over
    # HTTP/2 carries none (it was content-length: 0).
    head = httpx.head(netd.url("web", path="/up/echo"), timeout=10)
    assert head.status_code == 200 and head.headers["content-length"] == "12"
    with h2_client(netd) as client:
        url = netd.url("web", tls=True, path="/hello.txt")
        etag = client.get(url).headers["etag"]
        cached = client.get(url, headers={"if-none-match": etag})
        assert cached.status_code == 304 and "content-length" not in cached.headers


def test_an_empty_file_has_no_range_to_give(netd: NetdProcess) -> None:
    # RFC 9110 14.1.1: "bytes=-5" of nothing is unsatisfiable (it was 206 "bytes 0--1/0").
    answer = httpx.get(netd.url("web", path="/empty.txt"), headers={"range": "bytes=-5"})
    assert answer.status_code == 416 and answer.headers["content-range"] == "bytes */0"


def test_a_name_too_long_for_the_file_system_is_not_found(netd: NetdProcess) -> None:
    # ENAMETOOLONG from stat(2) is no such file (a 404, as nginx), not netd's fault.
    assert httpx.get(netd.url("web", path="/" + "n" * 300), timeout=10).status_code == 404
    assert_serving(netd)


def test_if_match_and_if_unmodified_since(netd: NetdProcess) -> None:
    # RFC 9110 13.1.1, 13.1.4: evaluated by an origin server, 412 when they fail.
    url = netd.url("web", path="/hello.txt")
    etag = httpx.get(url).headers["etag"]
    assert httpx.get(url, headers={"if-match": etag}).status_code == 200
    failed = httpx.get(url, headers={"if-match": '"zz"'})
    assert (failed.status_code, failed.reason_phrase) == (412, "Precondition Failed")
    assert httpx.get(url, headers={"if-match": f"W/{etag}"}).status_code == 412  # weak: no match
    old = email.utils.formatdate(946684800, usegmt=True)  # 2000
    assert httpx.get(url, headers={"if-unmodified-since": old}).status_code == 412


def test_repeated_x_forwarded_for_lines_are_one_list(netd: NetdProcess) -> None:
    # RFC 9110 5.3: each line kept, then the client netd saw.
    said = exchange(
        netd,
        b"GET /up/xff HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 1.2.3.4\r\n"
        b"X-Forwarded-For: 5.6.7.8\r\nConnection: close\r\n\r\n",
    )
    assert said.endswith(b"1.2.3.4, 5.6.7.8, 127.0.0.1")


def test_host_values_and_the_scheme_s_case(netd: NetdProcess) -> None:
    # RFC 9112 3.2: an invalid Host value is a 400; RFC 9110 4.2.3: the scheme is
    # case-insensitive in an absolute-form target.
    bad = exchange(netd, b"GET /hello.txt HTTP/1.1\r\nHost: a b/c\r\n\r\n")
    assert bad.startswith(b"HTTP/1.1 400 ")
    for host in (
        b"localhost",
        b"127.0.0.1:80",
        b"[::1]:8080",
        b"[fe80::1%25eth0]",
        b"b\xc3\xbccher.de",
    ):
        good = exchange(
            netd, b"GET /hello.txt HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % host
        )
        assert good.startswith(b"HTTP/1.1 200 "), host
    # RFC 9112 3.2.2: an absolute-form target's authority, not Host, is the request's.
    proxied = exchange(
        netd,
        b"GET http://target.test:81/up/xfh HTTP/1.1\r\nHost: other\r\nConnection: close\r\n\r\n",
    )
    assert proxied.startswith(b"HTTP/1.1 200 ") and proxied.endswith(b"\r\n\r\ntarget.test:81")
    upper = exchange(
        netd, b"GET HTTP://x/hello.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert upper.startswith(b"HTTP/1.1 200 ") and upper.endswith(b"hello\n")
