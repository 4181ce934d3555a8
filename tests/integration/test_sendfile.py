"""
Files through netd.sendfile in the real daemon, on the transports the http kind's
own tests do not stream big files over: a UNIX socket, HTTP/1.1 over TLS, and
multipart byte ranges on plain TCP (sendfile, a range at a time).
"""

from __future__ import annotations

import http.client
import os
import re
import socket
import ssl
from collections.abc import Iterator

import pytest

from netd.testing import NetdProcess

CONTENT = os.urandom(3 << 20)


@pytest.fixture(scope="module")
def netd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetdProcess]:
    base = tmp_path_factory.mktemp("sendfile")
    www = base / "www"
    www.mkdir()
    (www / "big.bin").write_bytes(CONTENT)
    config = f"""
state_dir: state
tls:
  lab: {{self_signed: [localhost, 127.0.0.1]}}
services:
  web:
    type: http
    listen:
      - "tcp:0:interface=127.0.0.1"
      - "unix:{base}/web.sock"
      - {{endpoint: "ssl:0:interface=127.0.0.1", tls: lab}}
    root: {www}
    http2: false
    access_log: false
"""
    with NetdProcess.start(config, base / "netd") as running:
        yield running


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=10)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(self.path)


def _get(connection: http.client.HTTPConnection, **headers: str) -> tuple[int, bytes]:
    connection.request("GET", "/big.bin", headers=headers)
    response = connection.getresponse()
    return response.status, response.read()


def test_a_big_file_over_a_unix_socket(netd: NetdProcess) -> None:
    # TCP_CORK is refused on a UNIX socket: the file is sent uncorked.
    connection = _UnixConnection(netd.listener("web", "unix")["path"])
    assert _get(connection) == (200, CONTENT)
    assert _get(connection, Range="bytes=1000-1999999") == (206, CONTENT[1000:2000000])
    connection.close()


def test_a_big_file_over_tls_http1(netd: NetdProcess) -> None:
    context = ssl.create_default_context(cafile=str(netd.ca_file("lab")))
    host, port = netd.address("web", tls=True)
    connection = http.client.HTTPSConnection(host, port, context=context, timeout=10)
    assert _get(connection) == (200, CONTENT)
    assert _get(connection, Range="bytes=-70000") == (206, CONTENT[-70000:])
    connection.close()


def test_multipart_ranges_each_sent_in_turn(netd: NetdProcess) -> None:
    connection = http.client.HTTPConnection(*netd.address("web"), timeout=10)
    status, body = _get(connection, Range="bytes=10-1500000,2000000-2999999,-5")
    assert status == 206
    parts = re.split(rb"\r\n--[A-Z2-7]+(?:--)?\r\n", b"\r\n" + body)
    contents = [part.split(b"\r\n\r\n", 1)[1] for part in parts if part]
    assert contents == [CONTENT[10:1500001], CONTENT[2000000:3000000], CONTENT[-5:]]
    # The connection is still good for the next request.
    assert _get(connection, Range="bytes=0-9") == (206, CONTENT[:10])
    connection.close()
