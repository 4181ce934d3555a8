"""
The http kind's writes held to the end of a reactor turn (ServiceKind.batch_writes),
with real clients: many keep-alive connections at once, small responses held and
large files sent by sendfile(2) on the same connections, and pipelined requests
whose responses must still come in order and whole, over TLS too (what TLS writes
is sent at once when nothing waits ahead: connections.SendsNow).
"""

from __future__ import annotations

import concurrent.futures
import os
import socket
import ssl
import time
from collections.abc import Iterator

import httpx
import pytest

from netd.testing import NetdProcess
from tests.maps import lab_map

SMALL = {f"/small{i}.txt": f"small file {i}\n".encode() * (i + 1) for i in range(5)}
BIG = os.urandom(3 << 20)  # over the static kind's in-memory limit: sent by sendfile(2)
MID = os.urandom(70_000)  # sent by sendfile(2) too, in one call once its turn comes


@pytest.fixture(scope="module")
def netd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetdProcess]:
    www = tmp_path_factory.mktemp("www")
    for path, body in SMALL.items():
        (www / path.lstrip("/")).write_bytes(body)
    (www / "big.bin").write_bytes(BIG)
    (www / "mid.bin").write_bytes(MID)
    config = lab_map(
        f"""
  web:
    type: http
    listen: ["tcp:0:interface=127.0.0.1", {{endpoint: "ssl:0:interface=127.0.0.1", tls: lab}}]
    root: {www}
    routes:
      - {{path: /canned, body: "canned\\n"}}
"""
    )
    process = NetdProcess.start(config, tmp_path_factory.mktemp("netd"))
    yield process
    process.stop()


def _client_session(base: str, number: int) -> list[str]:
    """One keep-alive client's requests, mixed; returns what came back wrong."""
    wrong: list[str] = []
    with httpx.Client(base_url=base, timeout=20) as client:
        for i in range(24):
            kind = (number + i) % 4
            if kind == 0:
                path = f"/small{(number + i) % 5}.txt"
                response = client.get(path)
                if response.status_code != 200 or response.content != SMALL[path]:
                    wrong.append(f"{path}: {response.status_code} {response.content[:40]!r}")
            elif kind == 1:
                response = client.get("/big.bin")
                if response.status_code != 200 or response.content != BIG:
                    wrong.append(f"/big.bin: {response.status_code}, {len(response.content)} B")
            elif kind == 2:
                response = client.head("/big.bin")
                if response.headers.get("content-length") != str(len(BIG)) or response.content:
                    wrong.append(f"HEAD /big.bin: {response.headers}")
            else:
                response = client.get("/canned")
                if response.content != b"canned\n":
                    wrong.append(f"/canned: {response.content!r}")
    return wrong


def test_many_keepalive_clients_get_whole_responses(netd: NetdProcess) -> None:
    host, port = netd.address("web")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        found = list(pool.map(lambda n: _client_session(f"http://{host}:{port}", n), range(8)))
    assert [wrong for wrong in found if wrong] == []


def _read_response(sock: socket.socket, buffered: bytearray) -> tuple[bytes, bytes]:
    """One response's head and body (by Content-Length) from C{sock}."""
    while b"\r\n\r\n" not in buffered:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a whole head: {bytes(buffered[:200])!r}"
        buffered += chunk
    end = buffered.index(b"\r\n\r\n") + 4
    head = bytes(buffered[:end])
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(buffered) < end + length:
        chunk = sock.recv(1 << 20)
        assert chunk, "closed before a whole body"
        buffered += chunk
    body = bytes(buffered[end : end + length])
    del buffered[: end + length]
    return head, body


# Paths asked in one pipelined write, and the bodies they must come back with, in order.
PIPELINED = {
    "/small1.txt": SMALL["/small1.txt"],
    "/big.bin": BIG,
    "/small2.txt": SMALL["/small2.txt"],
    "/canned": b"canned\n",
    "/small0.txt": SMALL["/small0.txt"],
}


def _pipelined_bodies(sock: socket.socket, stall: float = 0.0) -> list[bytes]:
    """Every path of L{PIPELINED} asked in one write; the bodies, once each head said 200."""
    sock.sendall(b"".join(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for path in PIPELINED))
    time.sleep(stall)  # not for readiness: the reader stalls on purpose
    buffered = bytearray()
    responses = [_read_response(sock, buffered) for _ in PIPELINED]
    assert all(head.startswith(b"HTTP/1.1 200 ") for head, _ in responses)
    return [body for _, body in responses]


def test_pipelined_responses_keep_their_order_around_a_file_sent_by_sendfile(
    netd: NetdProcess,
) -> None:
    # Sent in one write, read by netd in one turn: the first response is held
    # for the turn's end, the second's head is held and its body goes by
    # sendfile(2), the third waits for the second; each must come whole, in order.
    with socket.create_connection(netd.address("web"), timeout=20) as sock:
        assert _pipelined_bodies(sock) == list(PIPELINED.values())


@pytest.mark.parametrize("stall", [0.0, 1.0])
def test_pipelined_responses_over_tls_come_whole_whether_read_at_once_or_late(
    netd: NetdProcess, stall: float
) -> None:
    # Over TLS the file is read and encrypted, not sent by sendfile(2); a client
    # that stops reading fills the socket, and the rest must queue behind it.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    plain = socket.create_connection(netd.address("web", tls=True), timeout=20)
    with context.wrap_socket(plain, server_hostname="localhost") as sock:
        assert _pipelined_bodies(sock, stall) == list(PIPELINED.values())


def test_hundreds_of_requests_queued_behind_a_file_are_all_answered_in_order(
    netd: NetdProcess,
) -> None:
    # They queue while the big file fills the stalled client's socket; once it is
    # out, each of the rest is answered at once (a small file from memory, a canned
    # route, a file in one sendfile) and ends before the next is dispatched: the
    # next must not be dispatched from one level deeper each time, or a few hundred
    # of them overflow Python's stack and the connection stalls unanswered.
    rotation = [("/mid.bin", MID), ("/small3.txt", SMALL["/small3.txt"]), ("/canned", b"canned\n")]
    asked = [("/big.bin", BIG)] + [rotation[i % 3] for i in range(300)]
    with socket.create_connection(netd.address("web"), timeout=20) as sock:
        sock.sendall(
            b"".join(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for path, _ in asked)
        )
        time.sleep(1.0)  # not for readiness: the reader stalls on purpose
        buffered = bytearray()
        bodies = [_read_response(sock, buffered)[1] for _ in asked]
    assert [len(body) for body in bodies] == [len(body) for _, body in asked]
    assert bodies == [body for _, body in asked]
