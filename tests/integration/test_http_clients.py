"""
The http kind driven by HTTP clients nobody here wrote, from Debian: nghttp2's
strict HTTP/2 client C{nghttp} (its frames read back) and its load tool
C{h2load} (HTTP/2 multiplexed, and HTTP/1.1 pipelined), C{wget} (resuming with
a range, If-Modified-Since, mirroring a listing) and C{aria2c} (one file in
ranges over several connections).  Static files, canned and stub routes and a
proxy route, over plain TCP and over TLS with h2 through ALPN.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from netd.testing import NetdProcess
from tests.fakes.upstreams import QuietHandler, serving_http
from tests.integration.test_mail_clients import tool
from tests.maps import lab_map

# Over four default flow-control windows and several of TLS's 256 KiB reads.
BIG = random.Random(7).randbytes(5_000_000)
# Past the last second: the files have a Last-Modified to validate with.
STAMP = 1_700_000_000


class _Echo(QuietHandler):
    """The proxy's upstream: what it got, as JSON."""

    protocol_version = "HTTP/1.1"

    def _echo(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        got = {"method": self.command, "path": self.path, "body": body.decode()}
        self.answer(200, json.dumps(got).encode())

    do_GET = do_POST = _echo


@pytest.fixture(scope="module")
def netd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetdProcess]:
    base = tmp_path_factory.mktemp("clients")
    www = base / "www"
    (www / "dir" / "sub").mkdir(parents=True)
    (www / "big.bin").write_bytes(BIG)
    (www / "hello.txt").write_bytes(b"hello, world\n")
    (www / "dir" / "a.txt").write_bytes(b"a\n")
    (www / "dir" / "sub" / "index.html").write_bytes(b"<p>sub</p>\n")
    for path in www.rglob("*"):
        os.utime(path, (STAMP, STAMP))
    with serving_http(_Echo) as upstream:
        config = lab_map(
            f"""
  slow:
    type: http
    listen: [{{endpoint: "ssl:0:interface=127.0.0.1", tls: lab}}]
    routes:
      - {{path: /late, body: "late\\n", delay: 1.5}}
    limits: {{keepalive_timeout: 0.5}}
  web:
    type: http
    listen: ["tcp:0:interface=127.0.0.1", {{endpoint: "ssl:0:interface=127.0.0.1", tls: lab}}]
    root: {www}
    listing: true
    record: 200
    routes:
      - {{path: /health, body: "ok\\n"}}
      - {{path: /echo, method: [POST], template: true, body: "{{{{request.body}}}}"}}
      - {{path: /api/, proxy: "http://127.0.0.1:{upstream}/v1/"}}
"""
        )
        with NetdProcess.start(config, base / "netd") as process:
            yield process


def url(netd: NetdProcess, path: str, tls: bool, service: str = "web") -> str:
    port = netd.address(service, tls=tls)[1]
    # localhost: the name the lab certificate is for, which wget and aria2c check.
    return f"{'https' if tls else 'http'}://localhost:{port}{path}"


def run(*command: str, cwd: Path | None = None) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=30, cwd=cwd, check=False)
    assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-2000:])
    return done.stdout + done.stderr


def nghttp(*args: str) -> bytes:
    done = subprocess.run([tool("nghttp"), *args], capture_output=True, timeout=30, check=True)
    return done.stdout


def received_frames(verbose: bytes) -> list[str]:
    """The kinds of frame C{nghttp -v} says it received, in order."""
    return re.findall(r"recv (\w+) frame", verbose.decode("latin-1"))


def test_nghttp_reads_a_big_file_through_small_windows(netd: NetdProcess) -> None:
    big = url(netd, "/big.bin", tls=True)
    # 64 KiB windows (2**16) for the stream and the connection: netd waits
    # for each WINDOW_UPDATE.
    assert nghttp("--window-bits=16", "--connection-window-bits=16", big) == BIG
    verbose = nghttp("-nv", "--window-bits=16", "--connection-window-bits=16", big)
    frames = received_frames(verbose)
    assert frames[:2] == ["SETTINGS", "SETTINGS"]  # netd's, then its ACK of the client's
    assert b"SETTINGS_ENABLE_PUSH(0x02):0" in verbose
    assert set(frames[2:]) == {"HEADERS", "DATA"}  # no push, no reset, no GOAWAY
    assert b"recv (stream_id=13) :status: 200" in verbose
    assert b"recv (stream_id=13) content-length: 5000000" in verbose


def test_nghttp_multiplexes_files_routes_the_proxy_and_uploads(netd: NetdProcess) -> None:
    paths = ["/hello.txt", "/health", "/api/x?q=1", "/dir/"]
    stats = nghttp("-n", "--stat", "-m", "10", *(url(netd, path, tls=True) for path in paths))
    answered = re.findall(rb"^\s*\d+\s+\+\S+\s+\+\S+\s+\S+\s+(\d+)\s+\S+\s+(\S+)$", stats, re.M)
    assert sorted(answered) == sorted((b"200", path.encode()) for path in paths * 10)
    # Over the stream's first window: netd opens it as the body is taken.
    upload = b"".join(b"line %d\n" % n for n in range(40_000))
    (netd.workdir / "upload.txt").write_bytes(upload)
    data = ("-d", str(netd.workdir / "upload.txt"))
    assert nghttp(*data, url(netd, "/echo", tls=True)) == upload
    proxied = json.loads(nghttp(*data, url(netd, "/api/up", tls=True)))
    assert proxied == {"method": "POST", "path": "/v1/up", "body": upload.decode()}


def test_nghttp_waits_for_an_answer_slower_than_keepalive(netd: NetdProcess) -> None:
    # keepalive_timeout is for an idle connection: one whose stream waits for
    # its answer (here a route's delay) is not idle, as over HTTP/1.1.
    verbose = nghttp("-v", url(netd, "/late", tls=True, service="slow"))
    assert b"recv (stream_id=13) :status: 200" in verbose
    assert verbose.endswith(b"late\n") or b"\nlate\n" in verbose
    assert "GOAWAY" not in received_frames(verbose)


def h2load(*args: str) -> tuple[str, str]:
    """C{h2load} run to its end: its requests line and its status codes line."""
    out = run(tool("h2load"), *args)
    requests = re.search(r"^requests: .*$", out, re.M)
    codes = re.search(r"^status codes: .*$", out, re.M)
    assert requests is not None and codes is not None, out
    return requests.group(), codes.group()


@pytest.mark.parametrize(
    ("path", "requests", "streams"),
    # The proxy's upstream, http.server, has a backlog of 5: a few at a time.
    [("/hello.txt", 2000, 10), ("/health", 2000, 10), ("/api/x", 200, 2)],
)
def test_h2load_multiplexed_and_pipelined(
    netd: NetdProcess, path: str, requests: int, streams: int
) -> None:
    counts = ("-n", str(requests), "-c", "2" if streams < 10 else "10", "-m", str(streams))
    done = (
        f"requests: {requests} total, {requests} started, {requests} done,"
        f" {requests} succeeded, 0 failed, 0 errored, 0 timeout",
        f"status codes: {requests} 2xx, 0 3xx, 0 4xx, 0 5xx",
    )
    assert h2load(*counts, url(netd, path, tls=True)) == done
    # HTTP/1.1, each connection with its requests pipelined.
    assert h2load("--h1", *counts, url(netd, path, tls=False)) == done


def wget(*args: str, cwd: Path) -> str:
    return run(tool("wget"), "--no-verbose", "--server-response", *args, cwd=cwd)


def test_wget_resumes_with_a_range_and_asks_if_modified_since(
    netd: NetdProcess, tmp_path: Path
) -> None:
    big = url(netd, "/big.bin", tls=False)
    (tmp_path / "big.bin").write_bytes(BIG[:1_000_000])
    log = wget("--continue", big, cwd=tmp_path)
    assert "HTTP/1.1 206 Partial Content" in log
    assert "Content-Range: bytes 1000000-4999999/5000000" in log
    assert (tmp_path / "big.bin").read_bytes() == BIG
    # --timestamping set the file's time from Last-Modified...
    wget("--timestamping", big, cwd=tmp_path)
    assert (tmp_path / "big.bin").stat().st_mtime == STAMP
    # ...and asks with it (If-Modified-Since): nothing more comes.
    log = wget("--timestamping", big, cwd=tmp_path)
    assert "HTTP/1.1 304 Not Modified" in log
    assert (tmp_path / "big.bin").read_bytes() == BIG


def test_wget_mirrors_a_listing_over_tls(netd: NetdProcess, tmp_path: Path) -> None:
    ca = f"--ca-certificate={netd.ca_file('lab')}"
    wget(
        "--mirror",
        "--no-parent",
        "--no-host-directories",
        ca,
        url(netd, "/dir/", tls=True),
        cwd=tmp_path,
    )
    got = {
        str(path.relative_to(tmp_path)): path.read_bytes()
        for path in tmp_path.rglob("*")
        if path.is_file()
    }
    assert set(got) == {"dir/index.html", "dir/a.txt", "dir/sub/index.html"}
    assert got["dir/a.txt"] == b"a\n" and got["dir/sub/index.html"] == b"<p>sub</p>\n"
    assert b'<a href="a.txt">a.txt</a>' in got["dir/index.html"]


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
def test_aria2c_joins_ranges_from_several_connections(
    netd: NetdProcess, tmp_path: Path, tls: bool
) -> None:
    run(
        *(tool("aria2c"), "--quiet", "--max-connection-per-server=4", "--split=4"),
        *("--min-split-size=1M", f"--ca-certificate={netd.ca_file('lab')}"),
        *("--dir", str(tmp_path), "--out", "big.bin", url(netd, "/big.bin", tls=tls)),
    )
    assert (tmp_path / "big.bin").read_bytes() == BIG
    ranges = [
        dict(record["headers"]).get("Range")
        for record in netd.requests("web")
        if record["path"] == "/big.bin"
        and record["status"] == 206
        and dict(record["headers"]).get("User-Agent", "").startswith("aria2/")
        and record["protocol"] == "HTTP/1.1"
    ]
    assert len(ranges) >= 2, ranges  # the file came in pieces
