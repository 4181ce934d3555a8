"""
What a client sent is in the requests view whatever answered it: a request's
body is recorded (up to C{record_body}, its true size always) when no route read
it too, over HTTP/1.1 and HTTP/2, chunked or not, and a body cut short is
recorded as far as it came.
"""

from __future__ import annotations

import shutil
import signal
import socket
import ssl
import subprocess
import urllib.request
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from netd.testing import NetdProcess
from tests.conftest import StartNetd
from tests.fakes.upstreams import QuietHandler, serving_http
from tests.maps import lab_map
from tests.signals import wait_until

CURL = shutil.which("curl")
RECORD_BODY = 1024


class _Upstream(QuietHandler):
    """Reads the body it is sent, then answers with its size."""

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.answer(200, b"%d\n" % len(body))


@pytest.fixture(scope="module")
def netd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetdProcess]:
    base = tmp_path_factory.mktemp("bodies")
    (base / "www").mkdir()
    (base / "www" / "hello.txt").write_text("hello\n")
    with serving_http(_Upstream) as upstream:
        config = lab_map(
            f"""
  web:
    type: http
    record: 100
    record_body: {RECORD_BODY}
    access_log: false
    listen: ["tcp:0:interface=127.0.0.1", {{endpoint: "ssl:0:interface=127.0.0.1", tls: lab}}]
    routes:
      - {{path: /health, body: "ok\\n"}}
      - {{path: /stub, method: POST, status: 201, json: {{created: true}}}}
      - {{path: /up/, proxy: "http://127.0.0.1:{upstream}/"}}
    rules:
      - {{match: {{path: /teapot}}, reply: {{status: 418, body: "short\\n"}}}}
  files:
    type: http
    listen: ["tcp:0:interface=127.0.0.1"]
    access_log: false
    record: 100
    record_body: {RECORD_BODY}
    root: {base / "www"}
"""
        )
        process = NetdProcess.start(config, base / "netd")
        yield process
        process.stop()


def recorded(netd: NetdProcess, path: str, service: str = "web") -> dict[str, Any]:
    """The record of the request to C{path}, once netd has journalled it."""
    netd.wait_for(service, "http.request", path=path)
    (record,) = [r for r in netd.requests(service) if r["path"] == path]
    assert isinstance(record, dict)
    return record


@pytest.mark.parametrize(
    ("service", "path", "status"),
    [
        ("web", "/health?canned", 200),
        ("web", "/stub?stub", 201),
        ("web", "/nowhere?unmatched", 404),
        ("web", "/up/x?proxied", 200),
        ("web", "/teapot?rule", 418),
        ("files", "/hello.txt?static", 405),
    ],
)
def test_a_posted_body_is_recorded_whatever_answers(
    netd: NetdProcess, service: str, path: str, status: int
) -> None:
    with httpx.Client(timeout=10) as client:
        answer = client.post(netd.url(service, tls=False, path=path), content=b"0123456789")
    assert answer.status_code == status
    record = recorded(netd, path, service)
    assert (record["status"], record["body"], record["body_size"]) == (status, "0123456789", 10)
    assert record["body_truncated"] is False and "body_cut" not in record


@pytest.mark.skipif(CURL is None, reason="curl is not installed (apt-get install curl)")
def test_curl_data_to_a_canned_route_is_recorded(netd: NetdProcess) -> None:
    assert CURL is not None
    url = netd.url("web", tls=False, path="/health?curl")
    subprocess.run([CURL, "-sS", "-o", "/dev/null", "-d", "hello-body", url], check=True)
    record = recorded(netd, "/health?curl")
    assert (record["method"], record["body"], record["body_size"]) == ("POST", "hello-body", 10)


def test_a_large_body_on_a_closing_connection_is_recorded_whole(netd: NetdProcess) -> None:
    body = b"z" * 300_000  # many reads: the connection closes only after the last
    url = netd.url("web", tls=False, path="/health?closing")
    with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=10) as answer:
        assert (answer.headers["Connection"], answer.read()) == ("close", b"ok\n")
    record = recorded(netd, "/health?closing")
    assert (record["body_size"], record["body_truncated"]) == (300_000, True)
    assert "body_cut" not in record


def test_a_body_over_record_body_is_kept_up_to_it_with_its_true_size(netd: NetdProcess) -> None:
    body = b"0123456789" * 300
    with httpx.Client(timeout=10) as client:
        assert client.put(netd.url("web", tls=False, path="/nowhere?big"), content=body).is_error
    record = recorded(netd, "/nowhere?big")
    assert record["body"] == body[:RECORD_BODY].decode()
    assert (record["body_size"], record["body_truncated"]) == (3000, True)


def test_a_chunked_upload_is_recorded(netd: NetdProcess) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"first,"
        yield b"second"

    with httpx.Client(timeout=10) as client:
        answer = client.post(netd.url("web", tls=False, path="/health?chunked"), content=chunks())
    assert answer.request.headers["transfer-encoding"] == "chunked"
    record = recorded(netd, "/health?chunked")
    assert (record["body"], record["body_size"]) == ("first,second", 12)


def test_an_http2_body_is_recorded(netd: NetdProcess) -> None:
    trust = ssl.create_default_context(cafile=str(netd.ca_file("lab")))
    with httpx.Client(http2=True, verify=trust, timeout=10) as client:
        canned = client.post(netd.url("web", tls=True, path="/health?h2"), content=b"over h2")
        missing = client.post(netd.url("web", tls=True, path="/nowhere?h2"), content=b"x" * 3000)
    assert (canned.http_version, canned.status_code, missing.status_code) == ("HTTP/2", 200, 404)
    record = recorded(netd, "/health?h2")
    assert (record["protocol"], record["body"], record["body_size"]) == ("HTTP/2", "over h2", 7)
    big = recorded(netd, "/nowhere?h2")
    assert (big["body"], big["body_size"]) == ("x" * RECORD_BODY, 3000)


def test_a_get_is_recorded_as_before(netd: NetdProcess) -> None:
    with httpx.Client(timeout=10) as client:
        assert client.get(netd.url("web", tls=False, path="/health?get")).text == "ok\n"
    record = recorded(netd, "/health?get")
    assert (record["method"], record["body"], record["body_size"]) == ("GET", "", 0)
    assert record["body_truncated"] is False and "body_cut" not in record


def test_a_body_cut_short_is_recorded_as_far_as_it_came(netd: NetdProcess) -> None:
    with socket.create_connection(netd.address("web"), timeout=10) as sock:
        sock.sendall(
            b"POST /health?cut HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly part"
        )
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")  # answered from its head
    record = recorded(netd, "/health?cut")
    assert (record["body"], record["body_size"], record["body_cut"]) == ("only part", 9, True)


def test_a_stop_lets_an_answered_upload_finish_before_closing(start_netd: StartNetd) -> None:
    netd = start_netd(
        lab_map(
            """
  web:
    type: http
    listen: ["tcp:0:interface=127.0.0.1"]
    routes: [{path: /upload, body: "took it\\n"}]
""",
            shutdown_grace=8,
        )
    )
    size, piece = 8_000_000, b"b" * 10_000
    with socket.create_connection(netd.address("web"), timeout=10) as sock:
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
        sock.recv(1, socket.MSG_PEEK)  # answered, the body not sent yet
        netd.process.send_signal(signal.SIGTERM)
        wait_until(lambda: "netd stopping" in netd.output, "the stop")
        # A client that reads its answer once its upload is sent: netd closing
        # first would reset it (EPIPE here) before it reads that answer.
        for _ in range(size // len(piece)):
            sock.sendall(piece)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"\r\n\r\ntook it\n")
    # Already stopping: another SIGTERM could reach it after twistd let go of
    # its handlers, on its way out, and end it by that signal.
    assert netd.process.wait(timeout=15) == 0
