"""
The admin listener's limits against the real daemon: its connection cap, the
deadlines for a request's head and body, and HEAD answers; with raw sockets,
urllib and curl.
"""

from __future__ import annotations

import contextlib
import json
import select
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack

import pytest
from prometheus_client.parser import text_string_to_metric_families

from netd.testing import NetdProcess
from tests.conftest import StartNetd
from tests.signals import status_kib, wait_until

TOKEN = "limits-token"
CURL = shutil.which("curl")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed (apt-get install curl)")


def config(**admin: object) -> str:
    keys = "".join(f"  {key}: {value}\n" for key, value in admin.items())
    return (
        'admin:\n  listen: ["tcp:0:interface=127.0.0.1"]\n'
        + keys
        + 'services:\n  echo: {type: echo, listen: ["tcp:0:interface=127.0.0.1"]}\n'
    )


def admin_address(netd: NetdProcess) -> tuple[str, int]:
    entry = netd.ports["admin"]["listeners"][0]
    return entry["host"], entry["port"]


def admin_url(netd: NetdProcess, path: str) -> str:
    host, port = admin_address(netd)
    return f"http://{host}:{port}{path}"


def read_to_end(sock: socket.socket) -> bytes:
    """Everything the daemon sends until it closes (the socket's timeout bounds the wait)."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def get(netd: NetdProcess, path: str, token: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(admin_url(netd, path))
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=10) as answer:
        return answer.status, answer.read()


def echo_once(netd: NetdProcess) -> bytes:
    with socket.create_connection(netd.address("echo"), timeout=5) as sock:
        sock.sendall(b"still here")
        return sock.recv(100)


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    assert CURL is not None
    return subprocess.run([CURL, "-s", "--max-time", "10", *args], capture_output=True, timeout=20)


@pytest.fixture
def sockets() -> Iterator[ExitStack]:
    with ExitStack() as stack:
        yield stack


def refused_answer(sock: socket.socket) -> dict[str, str]:
    """The busy answer a connection past the cap gets at once, unasked."""
    answer = read_to_end(sock)
    assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), answer
    assert json.loads(answer.partition(b"\r\n\r\n")[2]) == {"error": "too many admin connections"}
    return head_fields(answer)


def test_idle_connections_give_way_to_new_clients_past_the_cap(
    start_netd: StartNetd, sockets: ExitStack
) -> None:
    netd = start_netd(config(header_timeout=3))  # and the default cap: 64
    address = admin_address(netd)
    started = time.monotonic()
    held = [sockets.enter_context(socket.create_connection(address, timeout=10)) for _ in range(64)]
    # A real client past the cap takes the place of the oldest idle connection,
    # at once: 64 connections that say nothing do not lock the API for 3 s.
    assert get(netd, "/healthz") == (200, b"ok\n")
    assert time.monotonic() - started < 3
    with pytest.raises(ConnectionResetError):
        read_to_end(held[0])
    assert echo_once(netd) == b"still here"
    # 36 more: each is let in, an older idle one cut.
    for _ in range(36):
        sockets.enter_context(socket.create_connection(address, timeout=10))
    assert get(netd, "/healthz") == (200, b"ok\n")
    evicted = netd.events(service="admin", type="connection.evicted")
    # One for each past the cap: the first get, 35 or 36 of the 36 (as the
    # get's own connection was gone or not yet), the second get.
    assert 37 <= len(evicted) <= 38 and evicted[0]["client"].startswith("127.0.0.1:")
    assert netd.events(service="admin", type="connection.refused") == []
    # Its own connections' comings and goings stay out of the journal read through it.
    assert netd.events(service="admin", type="connection.opened,connection.closed") == []
    samples = {
        (sample.name, sample.labels.get("service"), sample.labels.get("type")): sample.value
        for family in text_string_to_metric_families(get(netd, "/metrics")[1].decode())
        for sample in family.samples
    }
    assert samples[("netd_silent_evicted_total", "admin", "admin")] >= len(evicted)
    assert samples[("netd_connections_refused_total", "admin", "admin")] == 0


@needs_curl
def test_busy_connections_keep_their_places_while_the_cap_turns_others_away(
    start_netd: StartNetd, sockets: ExitStack
) -> None:
    netd = start_netd(config(max_connections=11, header_timeout=2))
    address = admin_address(netd)

    def streaming() -> socket.socket:
        """An open event stream, its answer's head read: netd has read the request."""
        sock = sockets.enter_context(socket.create_connection(address, timeout=10))
        sock.sendall(b"GET /api/events/stream HTTP/1.1\r\nHost: localhost\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(4096)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n"), head
        return sock

    busy = [streaming() for _ in range(10)]
    silent = sockets.enter_context(socket.create_connection(address, timeout=10))
    # The silent one gives its place to the next; the busy ones keep theirs.
    busy.append(streaming())
    # Cut to make room (a reset), or closed at its 2 s header deadline first
    # when a loaded machine was slower than that between the two connects.
    with contextlib.suppress(ConnectionResetError):
        assert read_to_end(silent) == b""
    # All busy: the next is turned away.
    refused = curl("-o", "-", "-w", " %{http_code}", admin_url(netd, "/healthz"))
    assert refused.stdout == b'{"error": "too many admin connections"}\n 503', refused
    # One leaves: the next gets in (once netd has seen it go).
    busy.pop().close()
    wait_until(
        lambda: (
            curl("-o", "-", "-w", " %{http_code}", admin_url(netd, "/healthz")).stdout
            == b"ok\n 200"
        ),
        "a place freed",
    )


def dribble(sock: socket.socket, data: bytes, every: float) -> None:
    """One byte every C{every} seconds until the daemon answers (or C{data} runs out)."""
    for byte in data:
        readable, _, _ = select.select([sock], [], [], every)
        if readable:
            return
        sock.sendall(bytes([byte]))


def test_a_slow_request_head_is_cut_at_the_header_deadline(start_netd: StartNetd) -> None:
    netd = start_netd(config(header_timeout=1))
    with socket.create_connection(admin_address(netd), timeout=10) as sock:
        started = time.monotonic()
        # Endless header: 50 s of bytes at this pace, each within any idle timeout.
        dribble(sock, b"GET /healthz HTTP/1.1\r\nX-Slow: " + b"a" * 200, every=0.25)
        answer = read_to_end(sock)
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer
    assert 0.9 <= elapsed < 5
    event = netd.wait_for("admin", "request.timeout", timeout=5)
    assert event["stage"] == "head" and event["client"].startswith("127.0.0.1:")
    assert get(netd, "/healthz") == (200, b"ok\n")
    metrics = get(netd, "/metrics")[1].decode()
    assert 'netd_head_timeouts_total{service="admin",type="admin"} 1.0' in metrics


def test_a_slow_request_body_is_cut_at_the_body_deadline(start_netd: StartNetd) -> None:
    netd = start_netd(config(body_timeout=1))
    with socket.create_connection(admin_address(netd), timeout=10) as sock:
        sock.sendall(b"POST /api/reload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 200\r\n\r\n")
        started = time.monotonic()
        dribble(sock, b"x" * 200, every=0.25)
        answer = read_to_end(sock)
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer
    assert json.loads(answer.partition(b"\r\n\r\n")[2]) == {
        "error": "request body not complete within 1 s"
    }
    assert 0.9 <= elapsed < 5
    assert netd.wait_for("admin", "request.timeout", timeout=5)["stage"] == "body"
    assert netd.events(service="netd", type="reload") == []  # never dispatched
    assert get(netd, "/healthz") == (200, b"ok\n")


def head_fields(answer: bytes) -> dict[str, str]:
    head = answer.partition(b"\r\n\r\n")[0].decode("latin-1")
    return {
        name.lower(): value
        for name, _, value in (line.partition(": ") for line in head.split("\r\n")[1:])
    }


ROUTES = ["/healthz", "/metrics", "/api/services", "/api/services/echo", "/api/events", "/nope"]


def test_head_answers_carry_get_headers_and_no_body(start_netd: StartNetd) -> None:
    netd = start_netd(config(token=TOKEN))
    for path in ROUTES:
        with socket.create_connection(admin_address(netd), timeout=10) as sock:
            # HEAD then GET on one connection: the GET's status line must follow the
            # HEAD's blank line at once, with no body bytes between.
            auth = f"Authorization: Bearer {TOKEN}\r\n".encode()
            sock.sendall(
                b"HEAD %s HTTP/1.1\r\nHost: localhost\r\n%s\r\n" % (path.encode(), auth)
                + b"GET %s HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n%s\r\n"
                % (path.encode(), auth)
            )
            answers = read_to_end(sock)
        head, _, got = answers.partition(b"\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 "), (path, answers)
        head_status, get_status = head.split(b"\r\n")[0], got.split(b"\r\n")[0]
        assert head_status == get_status, path
        get_body = got.partition(b"\r\n\r\n")[2]
        fields = head_fields(head + b"\r\n\r\n")
        assert fields["content-length"] == str(len(get_body)), path
        assert fields["content-type"] == head_fields(got)["content-type"], path
    log = netd.output
    assert "Warning: HEAD request" not in log and "fake a HEAD" not in log


@needs_curl
def test_curl_head_with_and_without_the_token(start_netd: StartNetd) -> None:
    netd = start_netd(config(token=TOKEN))
    healthz = curl("-I", admin_url(netd, "/healthz"))
    assert healthz.stdout.startswith(b"HTTP/1.1 200 OK\r\n")
    assert head_fields(healthz.stdout)["content-length"] == "3"
    # Without the token: the 401's headers, challenge and all, and still no body.
    denied = curl("-I", admin_url(netd, "/api/services"))
    assert denied.stdout.startswith(b"HTTP/1.1 401 Unauthorized\r\n")
    assert head_fields(denied.stdout)["www-authenticate"].startswith("Bearer")
    allowed = curl("-I", "-H", f"Authorization: Bearer {TOKEN}", admin_url(netd, "/metrics"))
    assert allowed.stdout.startswith(b"HTTP/1.1 200 OK\r\n")
    length = int(head_fields(allowed.stdout)["content-length"])
    assert length > 0 and allowed.stdout.endswith(b"\r\n\r\n")


@needs_curl
def test_over_tls_the_admin_api_speaks_http1_and_keeps_its_limits(start_netd: StartNetd) -> None:
    netd = start_netd(
        "tls:\n  lab: {self_signed: [127.0.0.1]}\n"
        'admin:\n  listen: [{endpoint: "ssl:0:interface=127.0.0.1", tls: lab}]\n'
        f"  token: {TOKEN}\n  header_timeout: 1\n"
        'services:\n  echo: {type: echo, listen: ["tcp:0:interface=127.0.0.1"]}\n'
    )
    host, port = admin_address(netd)
    url = f"https://{host}:{port}/healthz"
    # curl offers h2 first; the admin API picks HTTP/1.1, whose deadlines it keeps.
    answered = curl("--http2", "--cacert", str(netd.ca_file("lab")), "-I", url)
    assert answered.stdout.startswith(b"HTTP/1.1 200 OK\r\n"), answered
    assert head_fields(answered.stdout)["content-length"] == "3"
    context = ssl.create_default_context(cafile=str(netd.ca_file("lab")))
    raw = socket.create_connection((host, port), timeout=10)
    with raw, context.wrap_socket(raw, server_hostname=host) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
        answer = read_to_end(sock)
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer
    assert 0.9 <= time.monotonic() - started < 5


def test_a_client_that_pipelines_and_never_reads_is_cut(start_netd: StartNetd) -> None:
    netd = start_netd(config())
    before = status_kib(netd)
    request = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n" * 64
    sent = 0
    cut = False
    deadline = time.monotonic() + 20
    with socket.create_connection(admin_address(netd), timeout=5) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        while time.monotonic() < deadline and sent < 64 << 20:
            try:
                sent += sock.send(request)
            except (ConnectionResetError, BrokenPipeError):
                cut = True
                break
            except TimeoutError:
                continue  # netd stopped reading for now: keep pushing until it cuts
    assert cut, f"still connected after {sent} bytes of requests whose answers were never read"
    assert status_kib(netd) - before < 60_000
    assert get(netd, "/healthz")[0] == 200
