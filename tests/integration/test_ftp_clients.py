"""
The ftp kind driven by FTP clients nobody here wrote, from Debian: curl (every
way it reaches a file: EPSV, PASV, EPRT, PORT, its three CWD methods, ranges,
resume both ways, NLST, SIZE/MDTM, quoted commands, explicit and implicit
FTPS), wget (a mirror of a tree parsed from netd's LIST, over FTP and FTPS) and
NcFTP (MLSD/MLST, MDTM, recursive get and put).  Names with spaces and UTF-8,
an old file listed with its year, bytes compared exactly.
"""

from __future__ import annotations

import calendar
import email.utils
import os
import re
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import BinaryIO

import pytest

from netd.testing import NetdProcess
from tests.clients import passive_port, tool
from tests.maps import files_service, lab_map
from tests.signals import wait_until

DATA = bytes(range(256)) * 1200 + b"\r\n\n\r\x00 end"  # no TYPE A could leave it whole
TREE = {
    "hello.txt": b"hello, world\n",
    "data.bin": DATA,
    "old.txt": b"from a leap day\n",
    "docs/with space.txt": b"spaced\n",
    "docs/\u00fcn\u00efc\u00f6d\u00e9 \u2713.txt": "utf-8 \u2713\n".encode(),
    "docs/sub dir/deep.txt": b"deep\n",
    "docs/sub dir/empty": b"",
}
LEAP_DAY = calendar.timegm((2020, 2, 29, 13, 45, 0))


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("ftpclients")
    for name, content in TREE.items():
        path = base / "pub" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    os.utime(base / "pub" / "old.txt", (LEAP_DAY, LEAP_DAY))
    (base / "alice").mkdir()
    (base / "alice" / "mine.bin").write_bytes(DATA)
    return base


@pytest.fixture(scope="module")
def netd(tmp_path_factory: pytest.TempPathFactory, site: Path) -> Iterator[NetdProcess]:
    config = lab_map(files_service(site, login_delay="0.1", max_connections_per_client="8"))
    with NetdProcess.start(config, tmp_path_factory.mktemp("netd")) as process:
        yield process


def run(*command: str, cwd: Path, ok: bool = True) -> subprocess.CompletedProcess[bytes]:
    """C{command} with C{cwd} as its home too (NcFTP and wget keep files there)."""
    done = subprocess.run(
        command,
        capture_output=True,
        cwd=cwd,
        env={**os.environ, "HOME": str(cwd)},
        timeout=20,
        check=False,
    )
    if ok:
        assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done


def ca_file(netd: NetdProcess) -> str:
    return str(netd.log_path.parent / "state/tls/lab-ca.pem")


def url(netd: NetdProcess, path: str, user: str = "", scheme: str = "ftp") -> str:
    host, port = netd.address("files", tls=scheme == "ftps-implicit")
    return f"{scheme.removesuffix('-implicit')}://{user}{host}:{port}{path}"


def curl(tmp_path: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess[bytes]:
    return run(tool("curl"), "-sS", "--max-time", "15", *args, cwd=tmp_path, ok=ok)


def files_under(top: Path) -> dict[str, bytes]:
    """Every file under C{top} and its bytes, but wget's listing files."""
    return {
        path.relative_to(top).as_posix(): path.read_bytes()
        for path in top.rglob("*")
        if path.is_file() and path.name != ".listing"
    }


# -- curl ---------------------------------------------------------------------------------


def test_curl_reaches_files_every_way_it_can(netd: NetdProcess, tmp_path: Path) -> None:
    for way in ([], ["--disable-epsv"], ["-P", "-"], ["-P", "-", "--disable-eprt"]):
        assert curl(tmp_path, *way, url(netd, "/data.bin")).stdout == DATA, way
    deep = url(netd, "/docs/sub%20dir/deep.txt")
    for method in ("multicwd", "singlecwd", "nocwd"):
        assert curl(tmp_path, "--ftp-method", method, deep).stdout == b"deep\n", method
    assert curl(tmp_path, "-r", "1000-1099", url(netd, "/data.bin")).stdout == DATA[1000:1100]
    assert curl(tmp_path, "-r", "-10", url(netd, "/data.bin")).stdout == DATA[-10:]
    unicode = url(netd, "/docs/%C3%BCn%C3%AFc%C3%B6d%C3%A9%20%E2%9C%93.txt")
    assert curl(tmp_path, unicode).stdout == "utf-8 \u2713\n".encode()

    partial = tmp_path / "partial.bin"
    partial.write_bytes(DATA[:12345])
    curl(tmp_path, "-C", "-", "-o", str(partial), url(netd, "/data.bin"))
    assert partial.read_bytes() == DATA

    modified = email.utils.formatdate(LEAP_DAY, usegmt=True)
    head = curl(tmp_path, "-I", url(netd, "/old.txt")).stdout
    assert head == (
        f"Last-Modified: {modified}\r\nContent-Length: 16\r\nAccept-ranges: bytes\r\n".encode()
    )


def test_curl_lists_names_with_spaces_utf8_and_the_years_of_old_files(
    netd: NetdProcess, tmp_path: Path
) -> None:
    names = curl(tmp_path, "--list-only", url(netd, "/docs/")).stdout.decode().splitlines()
    assert sorted(names) == ["sub dir", "with space.txt", "\u00fcn\u00efc\u00f6d\u00e9 \u2713.txt"]
    listing = curl(tmp_path, url(netd, "/")).stdout.decode().splitlines()
    parsed = {
        match["name"]: (match["kind"], int(match["size"]), match["when"])
        for match in (
            re.fullmatch(
                r"(?P<kind>[-d])[-rwx]{9} +\d+ \S+ +\S+ +(?P<size>\d+) "
                r"(?P<when>\w{3} [ \d]\d (?: \d{4}|\d\d:\d\d)) (?P<name>.+)",
                line,
            )
            for line in listing
        )
        if match is not None
    }
    assert len(parsed) == len(listing) == 4
    assert parsed["data.bin"][:2] == ("-", len(DATA))
    assert parsed["docs"][0] == "d"
    assert parsed["old.txt"] == ("-", 16, "Feb 29  2020")


def test_curl_uploads_resumes_creates_folders_and_quotes_commands(
    netd: NetdProcess, site: Path, tmp_path: Path
) -> None:
    alice = "alice:wonderland@"
    upload = tmp_path / "up.bin"
    upload.write_bytes(DATA)
    curl(tmp_path, "-T", str(upload), url(netd, "/up.bin", alice))
    assert (site / "alice" / "up.bin").read_bytes() == DATA

    (site / "alice" / "half.bin").write_bytes(DATA[:5000])
    curl(tmp_path, "-C", "-", "-T", str(upload), url(netd, "/half.bin", alice))  # SIZE, APPE
    assert (site / "alice" / "half.bin").read_bytes() == DATA
    curl(tmp_path, "-a", "-T", str(upload), url(netd, "/half.bin", alice))
    assert (site / "alice" / "half.bin").read_bytes() == DATA * 2

    for method in ("multicwd", "singlecwd"):
        target = f"/{method} new/%C3%BC/f.bin".replace(" ", "%20")
        curl(
            tmp_path,
            "--ftp-method",
            method,
            "--ftp-create-dirs",
            "-T",
            str(upload),
            url(netd, target, alice),
        )
        assert (site / "alice" / f"{method} new" / "\u00fc" / "f.bin").read_bytes() == DATA

    # curl MKDs only along its CWDs: with nocwd the STOR names a missing folder.
    refused = curl(
        tmp_path,
        "--ftp-method",
        "nocwd",
        "--ftp-create-dirs",
        "-T",
        str(upload),
        url(netd, "/a/b.bin", alice),
        ok=False,
    )
    assert refused.returncode == 25
    assert b"550" in refused.stderr

    quoted = curl(
        tmp_path,
        "--list-only",
        "-Q",
        "MKD made",
        "-Q",
        "RNFR up.bin",
        "-Q",
        "RNTO made/moved.bin",
        "-Q",
        "-DELE half.bin",
        url(netd, "/", alice),
    )
    assert b"made" in quoted.stdout.splitlines()
    assert b"half.bin" in quoted.stdout.splitlines()  # listed before the post-quote DELE
    assert (site / "alice" / "made" / "moved.bin").read_bytes() == DATA
    assert not (site / "alice" / "half.bin").exists()


def test_curl_over_explicit_and_implicit_ftps(
    netd: NetdProcess, site: Path, tmp_path: Path
) -> None:
    ca = ca_file(netd)
    upload = tmp_path / "tls.bin"
    upload.write_bytes(DATA)
    curl(
        tmp_path,
        "--ssl-reqd",
        "--cacert",
        ca,
        "-T",
        str(upload),
        url(netd, "/tls.bin", "alice:wonderland@"),
    )
    assert (site / "alice" / "tls.bin").read_bytes() == DATA
    for tls in (
        ["--ssl-reqd", "--cacert", ca, url(netd, "/data.bin")],
        ["--cacert", ca, url(netd, "/data.bin", scheme="ftps-implicit")],
    ):
        assert curl(tmp_path, *tls).stdout == DATA
    listed = curl(tmp_path, "--ssl-reqd", "--cacert", ca, "--list-only", url(netd, "/docs/"))
    assert len(listed.stdout.splitlines()) == 3


# -- wget ---------------------------------------------------------------------------------


def wget(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return run(tool("wget"), "--no-config", "--no-hsts", "-q", "--tries=1", *args, cwd=tmp_path)


def test_wget_mirrors_the_tree_from_netds_listings(netd: NetdProcess, tmp_path: Path) -> None:
    wget(tmp_path, "--mirror", "-nH", "-P", "mirror", url(netd, "/"))
    assert files_under(tmp_path / "mirror") == TREE
    leap_day = time.localtime(os.stat(tmp_path / "mirror" / "old.txt").st_mtime)
    assert leap_day[:5] == (2020, 2, 29, 0, 0)  # a listing's old date has no time
    wget(
        tmp_path,
        "--user",
        "alice",
        "--password",
        "wonderland",
        "-c",
        "-O",
        "c.bin",
        url(netd, "/mine.bin"),
    )
    assert (tmp_path / "c.bin").read_bytes() == DATA


def test_wget_mirrors_over_explicit_and_implicit_ftps(netd: NetdProcess, tmp_path: Path) -> None:
    """
    wget closes its data connections without a close_notify of its own: netd
    answered every download and listing 426, and wget retried each (review).
    """
    ca = f"--ca-certificate={ca_file(netd)}"
    wget(tmp_path, ca, "--mirror", "-nH", "-P", "mirror", url(netd, "/docs/", scheme="ftps"))
    docs = {name: content for name, content in TREE.items() if name.startswith("docs/")}
    assert files_under(tmp_path / "mirror") == docs
    wget(
        tmp_path,
        ca,
        "--ftps-implicit",
        "-O",
        "data.bin",
        url(netd, "/data.bin", scheme="ftps-implicit"),
    )
    assert (tmp_path / "data.bin").read_bytes() == DATA


@contextmanager
def prot_p_control(
    netd: NetdProcess, context: ssl.SSLContext
) -> Iterator[tuple[Callable[[str], bytes], BinaryIO]]:
    """
    A raw control connection over explicit TLS, logged in anonymously, with
    PROT P and TYPE I: what asks a command its reply, and the replies.
    """
    raw = socket.create_connection(netd.address("files"), timeout=10)
    assert raw.recv(1024).startswith(b"220")
    raw.sendall(b"AUTH TLS\r\n")
    assert raw.recv(1024).startswith(b"234")
    with context.wrap_socket(raw, server_hostname="127.0.0.1") as control:
        replies = control.makefile("rb")

        def ask(line: str) -> bytes:
            control.sendall(line.encode() + b"\r\n")
            return replies.readline()

        for line in ("USER anonymous", "PASS guest@", "PBSZ 0", "PROT P", "TYPE I"):
            assert ask(line)[:1] in (b"2", b"3")
        yield ask, replies


@pytest.mark.parametrize("throttle", [None, 2_000_000], ids=["unpaced", "throttled"])
def test_a_tls_download_whose_client_closes_without_close_notify_is_complete(
    netd: NetdProcess, throttle: int | None
) -> None:
    """
    A client that reads a download to netd's close_notify and closes its TCP
    connection without answering it got all of the file (226); one that
    closes halfway is still 426.  A rule's throttle changes neither.
    """
    context = ssl.create_default_context(cafile=ca_file(netd))
    rule = netd.rule("files", match={"command": "RETR"}, throttle=throttle) if throttle else None
    with rule or nullcontext(), prot_p_control(netd, context) as (ask, replies):
        for wanted, last in ((len(DATA) + 1, b"226"), (1000, b"426")):  # + 1: to its end
            port = passive_port(ask("PASV"))
            data = socket.create_connection(("127.0.0.1", port), timeout=10)
            assert ask("RETR data.bin")[:3] in (b"125", b"150")
            secured = context.wrap_socket(data, server_hostname="127.0.0.1")
            received = b""
            while len(received) < wanted and (chunk := secured.recv(65536)):
                received += chunk
            secured.close()  # no close_notify: SSLSocket.close does not send one
            assert replies.readline()[:3] == last
            assert received[: len(DATA)] == DATA[: len(received)]


def test_a_tls_download_whose_client_gives_up_with_a_fin_is_not_complete(
    netd: NetdProcess,
) -> None:
    """
    A client that reads part of a download and sends its FIN, without a
    close_notify, while the rest and netd's close_notify wait in netd's
    kernel queue did not get the file: 426, not 226.
    """
    context = ssl.create_default_context(cafile=ca_file(netd))
    with prot_p_control(netd, context) as (ask, replies):
        data = socket.socket()
        data.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the rest stays in netd's
        data.settimeout(10)
        data.connect(("127.0.0.1", passive_port(ask("PASV"))))
        assert ask("RETR data.bin")[:3] in (b"125", b"150")
        secured = context.wrap_socket(data, server_hostname="127.0.0.1")
        received = b""
        while len(received) < 20000:
            received += secured.recv(20000 - len(received))

        def all_written() -> bool:
            transfers = [session["transfer"] for session in netd.sessions("files")]
            return any(transfer and transfer["bytes"] == len(DATA) for transfer in transfers)

        wait_until(all_written, "the whole file written")
        secured.shutdown(socket.SHUT_WR)  # a FIN; SSLSocket.shutdown sends no close_notify
        assert replies.readline()[:3] == b"426"
        data.close()


# -- NcFTP --------------------------------------------------------------------------------


def test_ncftp_gets_and_puts_trees_with_their_times(
    netd: NetdProcess, site: Path, tmp_path: Path
) -> None:
    host, port = netd.address("files")
    server = ("-P", str(port), host)
    # -T: no "RETR docs.tar" first (a wu-ftpd conversion netd does not offer).
    run(tool("ncftpget"), "-T", "-R", *server, "got", "/docs", cwd=tmp_path)
    docs = {name: content for name, content in TREE.items() if name.startswith("docs/")}
    assert files_under(tmp_path / "got") == docs
    for name in docs:  # set from MLST's modify fact, to the second
        served = int((site / "pub" / name).stat().st_mtime)
        assert (tmp_path / "got" / name).stat().st_mtime == served, name
    run(tool("ncftpget"), "-E", *server, ".", "/data.bin", cwd=tmp_path)  # active: PORT
    assert (tmp_path / "data.bin").read_bytes() == DATA

    listed = run(tool("ncftpls"), "-1", "-P", str(port), f"ftp://{host}/docs/", cwd=tmp_path)
    assert sorted(listed.stdout.decode().splitlines()) == [
        "sub dir",
        "with space.txt",
        "\u00fcn\u00efc\u00f6d\u00e9 \u2713.txt",
    ]

    put = tmp_path / "put"
    (put / "a b" / "\u00e7").mkdir(parents=True)
    (put / "a b" / "\u00e7" / "f \u2713.bin").write_bytes(DATA)
    (put / "top.txt").write_bytes(b"top\n")
    alice = ("-u", "alice", "-p", "wonderland")
    run(tool("ncftpput"), *alice, "-m", "-R", *server, "/in box", "put", cwd=tmp_path)
    assert files_under(site / "alice" / "in box") == {
        f"put/{name}": content for name, content in files_under(put).items()
    }
