"""
The http kind in the real daemon, driven by curl, urllib and raw sockets, with a
local upstream for the proxy.
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from netd.testing import NetdProcess
from tests.clients import raw_http
from tests.conftest import unused_port
from tests.fakes.upstreams import QuietHandler, serving_http
from tests.maps import lab_map
from tests.signals import status_kib, wait_until

CURL = shutil.which("curl")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed (apt-get install curl)")
SECRET = b"top secret outside the root\n"


class _Upstream(QuietHandler):
    """Echoes what it got as JSON; /slow answers after a while."""

    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        if self.path.startswith("/slow"):
            time.sleep(3)  # a slow upstream: what the proxy's timeout is tested against
        length = int(self.headers.get("Content-Length") or 0)
        if self.headers.get("Transfer-Encoding") == "chunked":
            body = b""
            while size := int(self.rfile.readline().strip(), 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
        else:
            body = self.rfile.read(length)
        reply = json.dumps(
            {
                "method": self.command,
                "path": self.path,
                "headers": dict(self.headers.items()),
                "body": body.decode(),
            }
        ).encode()
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Upstream", "yes")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    do_GET = do_POST = do_PUT = _answer


@pytest.fixture(scope="module")
def upstream() -> Iterator[int]:
    with serving_http(_Upstream) as port:
        yield port


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("site")
    www = base / "www"
    (www / "docs").mkdir(parents=True)
    (www / "files").mkdir()
    (www / "hello.txt").write_bytes(b"hello, world\n")
    (www / "page.html").write_text("<p>hi</p>\n")
    (www / "data.json").write_text("{}\n")
    (www / "docs" / "index.html").write_text("<h1>docs</h1>\n")
    (www / "files" / "a b.txt").write_text("spaced\n")
    (www / "digits.bin").write_bytes(bytes(range(256)) * 1024)  # 256 KiB: streamed
    (base / "secret.txt").write_bytes(SECRET)
    (www / "escape").symlink_to(base / "secret.txt")
    (www / "escape_dir").symlink_to(base)
    (base / "canned.json").write_text('{"canned": true}\n')
    return base


@pytest.fixture(scope="module")
def netd(
    tmp_path_factory: pytest.TempPathFactory, site: Path, upstream: int
) -> Iterator[NetdProcess]:
    config = lab_map(
        f"""
  web:
    type: http
    listen:
      - "tcp:0:interface=127.0.0.1"
      - {{endpoint: "ssl:0:interface=127.0.0.1", tls: lab}}
    root: {site / "www"}
    listing: false
    record: 50
    record_body: 16
    routes:
      - {{path: /health, body: "ok\\n", headers: {{X-Check: "1"}}}}
      - {{path: /canned, status: 202, body_file: {site / "canned.json"},
          headers: {{Content-Type: application/json}}}}
      - {{path: /old/, redirect: /new/, status: 301}}
      - {{path: /api/, proxy: "http://127.0.0.1:{upstream}/v1/"}}
      - {{path: /slow, proxy: "http://127.0.0.1:{upstream}/slow", timeout: 0.5}}
      - {{path: /dead, proxy: "http://127.0.0.1:{unused_port()}/"}}
    limits:
      max_request_line: 1024
      max_header_bytes: 4096
      max_headers: 30
      max_body: 100000
      header_timeout: 0.5
      keepalive_requests: 5
  plain:
    type: http
    listen: [{{endpoint: "ssl:0:interface=127.0.0.1", tls: lab}}]
    root: {site / "www"}
    listing: true
    http2: false
    access_log: false
""",
        shutdown_grace=2,
    )
    process = NetdProcess.start(config, tmp_path_factory.mktemp("netd"))
    yield process
    process.stop()


def url(netd: NetdProcess, path: str, service: str = "web", tls: bool = False) -> str:
    host, port = netd.address(service, tls=tls)
    return f"{'https' if tls else 'http'}://{host}:{port}{path}"


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def get(
    netd: NetdProcess, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection(*netd.address("web"), timeout=5)
    connection.request("GET", path, headers=headers or {})
    response = connection.getresponse()
    body = response.read()
    connection.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, body


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    assert CURL is not None
    return subprocess.run(
        [CURL, "-sS", "--max-time", "10", *args],
        capture_output=True,
        text=True,
        errors="replace",
        check=False,
    )


def assert_serving(netd: NetdProcess) -> None:
    with urllib.request.urlopen(url(netd, "/hello.txt"), timeout=5) as response:
        assert response.read() == b"hello, world\n"
    assert netd.process.poll() is None


# -- static files ---------------------------------------------------------------------


def test_static_files_types_index_and_head(netd: NetdProcess) -> None:
    with urllib.request.urlopen(url(netd, "/hello.txt"), timeout=5) as response:
        assert response.read() == b"hello, world\n"
        assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
        assert response.headers["ETag"].startswith('"')
        assert response.headers["Accept-Ranges"] == "bytes"
    assert get(netd, "/page.html")[1]["content-type"] == "text/html; charset=utf-8"
    assert get(netd, "/data.json")[1]["content-type"].startswith("application/json")
    assert get(netd, "/docs/")[2] == b"<h1>docs</h1>\n"
    status, headers, _ = get(netd, "/docs")
    assert status == 301 and headers["location"] == "/docs/"
    assert get(netd, "/files/a%20b.txt")[2] == b"spaced\n"
    assert get(netd, "/files/")[0] == 403  # listing: false
    assert get(netd, "/missing")[0] == 404
    # A file named as a directory is not served (nginx: 404), nor a directory's index.
    assert get(netd, "/hello.txt/")[0] == 404
    assert get(netd, "/docs/index.html/")[0] == 404
    assert get(netd, "/docs//")[2] == b"<h1>docs</h1>\n"
    assert get(netd, "/digits.bin")[2] == bytes(range(256)) * 1024

    connection = http.client.HTTPConnection(*netd.address("web"), timeout=5)
    connection.request("HEAD", "/digits.bin")
    response = connection.getresponse()
    assert response.status == 200 and response.read() == b""
    assert response.headers["Content-Length"] == str(256 * 1024)
    connection.request("DELETE", "/hello.txt")
    response = connection.getresponse()
    response.read()
    assert response.status == 405 and response.headers["Allow"] == "GET, HEAD"


@needs_curl
def test_listing_over_tls_without_h2(netd: NetdProcess) -> None:
    ca = str(netd.log_path.parent / "state/tls/lab-ca.pem")
    listing = curl("--cacert", ca, "--http2", "-i", url(netd, "/files/", "plain", tls=True))
    assert listing.stdout.startswith("HTTP/1.1 200"), listing.stdout + listing.stderr
    assert 'href="a%20b.txt"' in listing.stdout


@needs_curl
def test_ranges_with_curl(netd: NetdProcess) -> None:
    target = url(netd, "/digits.bin")
    single = curl("-i", "-r", "10-19", target)
    assert "HTTP/1.1 206" in single.stdout
    assert "Content-Range: bytes 10-19/262144" in single.stdout
    suffix = subprocess.run([CURL or "", "-s", "-r", "-4", target], capture_output=True, check=True)
    assert suffix.stdout == bytes([252, 253, 254, 255])
    multi = subprocess.run(
        [CURL or "", "-s", "-i", "-r", "0-1,256-257", target], capture_output=True, check=True
    )
    assert b"multipart/byteranges; boundary=" in multi.stdout
    assert b"Content-Range: bytes 0-1/262144\r\n\r\n\x00\x01" in multi.stdout
    assert b"Content-Range: bytes 256-257/262144\r\n\r\n\x00\x01" in multi.stdout
    beyond = curl("-i", "-r", "300000-", target)
    assert "HTTP/1.1 416" in beyond.stdout and "Content-Range: bytes */262144" in beyond.stdout


@needs_curl
def test_conditional_requests_with_curl(netd: NetdProcess) -> None:
    target = url(netd, "/hello.txt")
    first = curl("-i", target)
    etag = next(
        line.split(": ", 1)[1] for line in first.stdout.splitlines() if line.startswith("ETag")
    )
    again = curl("-i", "-H", f"If-None-Match: {etag}", target)
    assert again.stdout.startswith("HTTP/1.1 304") and "hello" not in again.stdout
    other = curl("-i", "-H", 'If-None-Match: "nope"', target)
    assert other.stdout.startswith("HTTP/1.1 200")
    since = curl("-i", "-z", "Sun, 01 Jan 2090 00:00:00 GMT", target)
    assert since.stdout.startswith("HTTP/1.1 304")
    older = curl("-i", "-z", "Sun, 01 Jan 2000 00:00:00 GMT", target)
    assert older.stdout.startswith("HTTP/1.1 200")


TRICKS = [
    b"/../secret.txt",
    b"/../../../../etc/passwd",
    b"/%2e%2e/secret.txt",
    b"/%2E%2E/secret.txt",
    b"/.%2e/secret.txt",
    b"/%2e./secret.txt",
    b"/docs/../../secret.txt",
    b"/docs/%2e%2e/%2e%2e/secret.txt",
    b"/..%2fsecret.txt",
    b"/..%2Fsecret.txt",
    b"/%2e%2e%2fsecret.txt",
    b"/..\\secret.txt",
    b"/..%5csecret.txt",
    b"/%5c..%5csecret.txt",
    b"/docs/..%5c..%5csecret.txt",
    b"/hello.txt%00.html",
    b"/%00/../secret.txt",
    b"/escape",
    b"/escape_dir/secret.txt",
    b"/%2fetc%2fpasswd",
    b"/escape/",
    b"/%252e%252e/secret.txt",
    b"//../secret.txt",
    b"/./../secret.txt",
    b"/docs/./../../secret.txt",
    b"http://localhost/../secret.txt",
    b"/%c0%ae%c0%ae/secret.txt",
    b"/..;/secret.txt",
    b"/....//secret.txt",
]


def test_traversal_battery(netd: NetdProcess) -> None:
    assert len(TRICKS) >= 20
    for trick in TRICKS:
        answer = raw_http(
            netd, b"GET " + trick + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert status_of(answer) in (400, 403, 404), (trick, answer[:200])
        assert SECRET not in answer and b"root:" not in answer, trick
    assert_serving(netd)


# -- routes and the proxy ------------------------------------------------------------------


def test_canned_routes_and_redirects(netd: NetdProcess) -> None:
    status, headers, body = get(netd, "/health")
    assert (status, body, headers["x-check"]) == (200, b"ok\n", "1")
    status, headers, body = get(netd, "/canned")
    assert (status, headers["content-type"], body) == (
        202,
        "application/json",
        b'{"canned": true}\n',
    )
    status, headers, _ = get(netd, "/old/page?x=1")
    assert status == 301 and headers["location"] == "/new/page?x=1"


def test_proxy_streams_and_forwards(netd: NetdProcess) -> None:
    connection = http.client.HTTPConnection(*netd.address("web"), timeout=5)
    chunks = (b"part-%d;" % i for i in range(50))
    connection.request(
        "POST", "/api/items?q=1", body=chunks, headers={"X-Forwarded-For": "10.0.0.9"}
    )
    response = connection.getresponse()
    echoed = json.loads(response.read())
    assert response.status == 201 and response.headers["X-Upstream"] == "yes"
    assert echoed["method"] == "POST" and echoed["path"] == "/v1/items?q=1"
    assert echoed["body"] == "".join(f"part-{i};" for i in range(50))
    assert echoed["headers"]["X-Forwarded-For"] == "10.0.0.9, 127.0.0.1"
    assert echoed["headers"]["X-Forwarded-Proto"] == "http"
    assert "Connection" not in echoed["headers"] or echoed["headers"]["Connection"] != "keep-alive"
    # Same connection, next request: keep-alive survives a proxied exchange.
    connection.request("GET", "/api/again")
    again = connection.getresponse()
    assert json.loads(again.read())["path"] == "/v1/again"
    connection.close()


def test_proxy_failures_are_502_and_504(netd: NetdProcess) -> None:
    assert get(netd, "/dead")[0] == 502
    started = time.monotonic()
    assert get(netd, "/slow")[0] == 504
    assert time.monotonic() - started < 2.5
    assert_serving(netd)


@needs_curl
def test_proxy_over_tls_says_https(netd: NetdProcess) -> None:
    ca = str(netd.log_path.parent / "state/tls/lab-ca.pem")
    result = curl("--cacert", ca, "--http2", url(netd, "/api/x", tls=True))
    assert json.loads(result.stdout)["headers"]["X-Forwarded-Proto"] == "https"


# -- HTTP/2 -----------------------------------------------------------------------------


@needs_curl
def test_http2_over_alpn_and_fallback(netd: NetdProcess) -> None:
    ca = str(netd.log_path.parent / "state/tls/lab-ca.pem")
    h2 = curl("--cacert", ca, "--http2", "-i", url(netd, "/hello.txt", tls=True))
    assert h2.stdout.startswith("HTTP/2 200") and h2.stdout.endswith("hello, world\n")
    ranged = curl("--cacert", ca, "--http2", "-i", "-r", "0-4", url(netd, "/hello.txt", tls=True))
    assert ranged.stdout.startswith("HTTP/2 206") and ranged.stdout.endswith("hello")
    big = subprocess.run(
        [CURL or "", "-s", "--cacert", ca, "--http2", url(netd, "/digits.bin", tls=True)],
        capture_output=True,
        check=True,
    )
    assert big.stdout == bytes(range(256)) * 1024
    h1 = curl("--cacert", ca, "--http1.1", "-i", url(netd, "/hello.txt", tls=True))
    assert h1.stdout.startswith("HTTP/1.1 200")
    context = ssl.create_default_context(cafile=ca)
    context.set_alpn_protocols(["h2", "http/1.1"])
    with context.wrap_socket(
        socket.create_connection(netd.address("plain", tls=True), timeout=5),
        server_hostname="localhost",
    ) as tls:
        assert tls.selected_alpn_protocol() in (None, "http/1.1")  # http2: false


# -- recording and logging ----------------------------------------------------------------


def test_access_log_in_combined_format(netd: NetdProcess) -> None:
    get(netd, "/hello.txt", {"User-Agent": "probe/1", "Referer": "http://r/"})
    line = '"GET /hello.txt HTTP/1.1" 200 13 "http://r/" "probe/1"'
    wait_until(lambda: line in netd.output, "access log line", timeout=5)
    assert "127.0.0.1 - - [" in netd.output


def test_recorded_requests_through_the_admin_api(netd: NetdProcess) -> None:
    netd.admin("DELETE", "/api/services/web/requests")
    connection = http.client.HTTPConnection(*netd.address("web"), timeout=5)
    connection.request("POST", "/api/rec", body=b"0123456789" * 5, headers={"X-Tag": "rec"})
    connection.getresponse().read()
    connection.close()
    assert get(netd, "/missing")[0] == 404
    records = netd.admin("GET", "/api/services/web/requests")
    assert isinstance(records, list) and len(records) == 2
    posted, missing = records
    assert posted["method"] == "POST" and posted["path"] == "/api/rec"
    assert posted["status"] == 201 and posted["client"] == "127.0.0.1"
    assert ["X-Tag", "rec"] in posted["headers"]
    assert posted["body"] == "0123456789012345"  # record_body: 16
    assert posted["body_size"] == 50 and posted["body_truncated"] is True
    assert missing["status"] == 404 and isinstance(missing["time"], float)
    assert netd.admin("DELETE", "/api/services/web/requests") == {"cleared": 2}
    assert netd.admin("GET", "/api/services/web/requests") == []


# -- limits and bad input ----------------------------------------------------------------------


def test_limits(netd: NetdProcess) -> None:
    long_url = b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    assert status_of(raw_http(netd, long_url)) == 414
    big_header = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 8000 + b"\r\n\r\n"
    assert status_of(raw_http(netd, big_header)) == 431
    endless_header = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 200_000
    assert status_of(raw_http(netd, endless_header)) == 431
    many = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(40))
    assert status_of(raw_http(netd, many + b"\r\n")) == 431
    body = b"POST /api/x HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\n\r\n"
    assert status_of(raw_http(netd, body)) == 413
    chunked = b"POST /api/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunked += b"10000\r\n" + b"z" * 0x10000 + b"\r\n" + b"10000\r\n" + b"z" * 0x10000 + b"\r\n"
    assert status_of(raw_http(netd, chunked)) == 413
    assert status_of(raw_http(netd, b"GET / HTTP/1.1\r\n\r\n")) == 400  # no Host
    assert status_of(raw_http(netd, b"GET / HTTP/2.0\r\nHost: x\r\n\r\n")) == 505
    assert_serving(netd)


def test_keepalive_cap_and_pipelining(netd: NetdProcess) -> None:
    request = b"GET /hello.txt HTTP/1.1\r\nHost: x\r\n\r\n"
    answer = raw_http(netd, request * 7)  # pipelined; the cap is 5 a connection
    assert answer.count(b"HTTP/1.1 200 OK") == 5
    assert answer.count(b"hello, world\n") == 5
    assert answer.rstrip(b"\n").endswith(b"hello, world")
    assert b"Connection: close" in answer.split(b"HTTP/1.1 200 OK")[-1]


def test_slow_client_gets_408(netd: NetdProcess) -> None:
    with socket.create_connection(netd.address("web"), timeout=5) as sock:
        sock.sendall(b"GET /hello.txt HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        started = time.monotonic()
        answer = sock.recv(1000)
        assert status_of(answer) == 408 and time.monotonic() - started < 3
        assert sock.recv(1000) == b""
    with socket.create_connection(netd.address("web"), timeout=5) as idle:
        assert idle.recv(100) == b""  # the header timeout closes an idle connection too
    assert_serving(netd)


SMUGGLING = {
    "content-length and chunked": b"POST /api/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    "duplicate content-length": b"POST /api/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
    b"Content-Length: 5\r\n\r\nhello",
    "differing content-length": b"POST /api/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
    b"Content-Length: 50\r\n\r\nhello",
    "content-length list": b"POST /api/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\nhello",
    "obsolete line folding": b"GET / HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n b\r\n\r\n",
    "folded transfer-encoding": b"POST / HTTP/1.1\r\nHost: x\r\n"
    b"Transfer-Encoding:\r\n chunked\r\n\r\n",
    "bare LF in headers": b"GET / HTTP/1.1\r\nHost: x\nX-A: b\r\n\r\n",
    "bare CR in headers": b"GET / HTTP/1.1\r\nHost: x\rX-A: b\r\n\r\n",
    "bare CR in a value": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: b\rc\r\n\r\n",
    "LF-only request": b"GET / HTTP/1.1\nHost: x\n\n",
    "space before colon": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n",
    "chunked not last": b"POST / HTTP/1.1\r\nHost: x\r\n"
    b"Transfer-Encoding: chunked, identity\r\n\r\n",
    "garbage request line": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n",
    "no version": b"GET /\r\nHost: x\r\n\r\n",
    "NUL in a header": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    "bad chunk size": b"POST /api/x HTTP/1.1\r\nHost: x\r\n"
    b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",
    "two hosts": b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
}


@pytest.mark.parametrize("case", sorted(SMUGGLING))
def test_smuggling_and_garbage_get_400_and_close(netd: NetdProcess, case: str) -> None:
    answer = raw_http(netd, SMUGGLING[case])
    assert status_of(answer) == 400, answer[:300]
    assert answer.count(b"HTTP/1.1") == 1 and b"Connection: close" in answer
    assert_serving(netd)


def test_unsupported_transfer_coding_is_501(netd: NetdProcess) -> None:
    answer = raw_http(
        netd, b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"
    )
    assert status_of(answer) == 501
    assert_serving(netd)


def test_client_that_stops_reading(netd: NetdProcess) -> None:
    stuck = socket.create_connection(netd.address("web"), timeout=5)
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.sendall(b"GET /digits.bin HTTP/1.1\r\nHost: x\r\n\r\n" * 5)
    hello = raw_http(netd, b"GET /hello.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert hello.endswith(b"hello, world\n")
    stuck.close()
    assert_serving(netd)


def test_big_file_streams_with_flat_memory(tmp_path: Path) -> None:
    """A 1 GiB (sparse) file through sendfile: the daemon's memory does not grow with it."""
    www = tmp_path / "www"
    www.mkdir()
    with (www / "huge.bin").open("wb") as huge:
        huge.truncate(1 << 30)
    config = f"""
services:
  big:
    type: http
    listen: ["tcp:0:interface=127.0.0.1"]
    root: {www}
    access_log: false
"""
    with NetdProcess.start(config, tmp_path / "netd") as netd:
        before = status_kib(netd, "VmHWM")
        connection = http.client.HTTPConnection(*netd.address("big"), timeout=20)
        connection.request("GET", "/huge.bin")
        response = connection.getresponse()
        total = 0
        while chunk := response.read(1 << 20):
            total += len(chunk)
        assert total == 1 << 30
        assert status_kib(netd, "VmHWM") - before < 32 * 1024
