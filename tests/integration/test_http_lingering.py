"""
A request netd refuses while its client is still sending the body (413 over
C{max_body}) reaches a client that writes its whole body before reading: netd
reads and drops the rest of the body after its answer (nginx's lingering close)
instead of closing a socket with unread bytes, which sends the client a reset
that takes the unread 413 with it.
"""

from __future__ import annotations

import http.client
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from netd.testing import NetdProcess
from tests.maps import lab_map
from tests.signals import client_address, wait_closed

CURL = shutil.which("curl")
BODY = b"x" * (8 << 20)  # far more than the kernel's buffers hold: still being sent at the 413
TRIES = 5  # a reset loses the answer only when it overtakes it: timing-dependent


@pytest.fixture(scope="module")
def netd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetdProcess]:
    config = lab_map(
        """
  small:
    type: http
    access_log: false
    listen: ["tcp:0:interface=127.0.0.1", {endpoint: "ssl:0:interface=127.0.0.1", tls: lab}]
    http2: false
    routes:
      - {path: /upload, method: POST, status: 201, body: "stored\\n"}
    limits:
      max_body: 1000
""",
        shutdown_grace=2,
    )
    process = NetdProcess.start(config, tmp_path_factory.mktemp("netd"))
    yield process
    process.stop()


def test_requests_uploading_past_max_body_gets_its_413(netd: NetdProcess) -> None:
    url = netd.url("small", tls=False, path="/upload")
    for _ in range(TRIES):
        # requests sends the whole body before it reads a byte (urllib3 2 then
        # reads the answer even after a reset while sending; http.client does not).
        response = requests.post(url, data=BODY, timeout=10)
        assert response.status_code == 413
        assert response.text == "413 Content Too Large\n"
    assert requests.post(url, data=b"small", timeout=5).status_code == 201  # still serving


def test_http_client_uploading_past_max_body_gets_its_413(netd: NetdProcess) -> None:
    for _ in range(TRIES):
        connection = http.client.HTTPConnection(*netd.address("small", tls=False), timeout=10)
        connection.request("POST", "/upload", body=BODY)
        response = connection.getresponse()
        assert (response.status, response.read()) == (413, b"413 Content Too Large\n")
        connection.close()


def test_the_rest_of_a_refused_body_is_read_and_dropped(netd: NetdProcess) -> None:
    request = b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(BODY)
    with socket.create_connection(netd.address("small", tls=False), timeout=10) as client:
        client.sendall(request + BODY)  # a reset cut this short before
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
        where = client_address(client)
    assert answer.startswith(b"HTTP/1.1 413 ")
    # Closed once the client closed, all of its body read.
    assert wait_closed(netd, "small", where)["bytes_in"] == len(request) + len(BODY)


def test_over_tls_the_refusal_ends_with_close_notify(netd: NetdProcess) -> None:
    trust = ssl.create_default_context(cafile=str(netd.ca_file("lab")))
    with socket.create_connection(netd.address("small", tls=True), timeout=5) as raw:
        # A FIN without close_notify (TCP's half-close under TLS) raises SSLEOFError.
        client = trust.wrap_socket(raw, server_hostname="localhost", suppress_ragged_eofs=False)
        client.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n")
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413 ")


def test_over_tls_too(netd: NetdProcess) -> None:
    trust = ssl.create_default_context(cafile=str(netd.ca_file("lab")))
    for _ in range(TRIES):
        connection = http.client.HTTPSConnection(
            *netd.address("small", tls=True), timeout=10, context=trust
        )
        connection.request("POST", "/upload", body=BODY)
        response = connection.getresponse()
        assert (response.status, response.read()) == (413, b"413 Content Too Large\n")
        connection.close()


@pytest.mark.skipif(CURL is None, reason="curl is not installed (apt-get install curl)")
def test_curl_uploading_a_file_past_max_body_gets_its_413(
    netd: NetdProcess, tmp_path: Path
) -> None:
    upload = tmp_path / "big.bin"
    upload.write_bytes(BODY)
    url = netd.url("small", tls=False, path="/upload")
    for _ in range(TRIES):
        # Without Expect: 100-continue (curl would wait for the 413 and send
        # nothing), curl uploads the file, reading the answer as it goes.
        done = subprocess.run(
            [
                CURL,
                "-sS",
                "-H",
                "Expect:",
                "--data-binary",
                f"@{upload}",
                "-w",
                "%{http_code}",
                "-o",
                "/dev/null",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert (done.stdout, done.stderr) == ("413", "")


def test_a_client_that_sends_nothing_more_sees_the_end_at_once(netd: NetdProcess) -> None:
    with socket.create_connection(netd.address("small", tls=False), timeout=5) as client:
        client.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n")
        started = time.monotonic()
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
        assert time.monotonic() - started < 1  # EOF with the answer, not after a linger bound
    assert answer.startswith(b"HTTP/1.1 413 ") and answer.endswith(b"413 Content Too Large\n")
