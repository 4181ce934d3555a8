"""
The ftp kind in the real daemon, driven by Python's ftplib, curl and lftp, plus raw
sockets for what no client would send: traversal, FTP bounce, data theft, overlong
commands and clients that vanish mid-transfer.
"""

from __future__ import annotations

import contextlib
import ftplib
import io
import os
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest

from netd.testing import NetdProcess
from tests.batteries import FTP_TRAVERSAL_READS, FTP_TRAVERSAL_WRITES
from tests.clients import IPV6, command, control, hang_up, lftp_as, passive_port
from tests.conftest import StartNetd
from tests.maps import files_service, lab_map
from tests.signals import wait_until

CURL = shutil.which("curl")
LFTP = shutil.which("lftp")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed (apt-get install curl)")
needs_lftp = pytest.mark.skipif(LFTP is None, reason="lftp is not installed (apt-get install lftp)")
SECRET = b"top secret outside the root\n"
BIG = bytes(range(256)) * 4096 * 3  # 3 MiB
PASSIVE_LOW = 20000 + os.getpid() % 20000


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("ftp")
    pub = base / "pub"
    (pub / "docs").mkdir(parents=True)
    (pub / "hello.txt").write_bytes(b"hello, world\n")
    (pub / "docs" / "readme.txt").write_text("read me\n")
    (pub / "big.bin").write_bytes(BIG)
    with (pub / "huge.bin").open("wb") as huge:
        huge.truncate(64 << 20)  # sparse: more than loopback buffers hold
    (base / "secret.txt").write_bytes(SECRET)
    (pub / "escape").symlink_to(base / "secret.txt")
    (pub / "escape_dir").symlink_to(base)
    for name in ("alice", "bob", "drop", "vault"):
        (base / name).mkdir()
    (base / "bob" / "bob.txt").write_text("bob's\n")
    return base


@pytest.fixture(scope="module")
def netd(tmp_path_factory: pytest.TempPathFactory, site: Path) -> Iterator[NetdProcess]:
    bob_hash = bcrypt.hashpw(b"builder", bcrypt.gensalt(4)).decode()
    ipv6 = '\n      - "tcp6:0:interface=\\\\:\\\\:1"' if IPV6 else ""
    config = lab_map(
        files_service(
            site,
            listen=ipv6,
            users=f'\n      bob: {{password_hash: "{bob_hash}", home: {site / "bob"}}}',
            passive_ports=f'"{PASSIVE_LOW}-{PASSIVE_LOW + 49}"',
            passive_host="127.0.0.1",
            login_delay="0.3",
            max_login_failures="2",
            data_timeout="1",
            max_connections_per_client="6",
        )
        + f"""
  drop:
    type: ftp
    listen: ["tcp:0:interface=127.0.0.1"]
    root: {site / "drop"}
    anonymous: write
    max_connections: 2
  vault:
    type: ftp
    listen: ["tcp:0:interface=127.0.0.1"]
    users: {{carol: {{password: secret, home: {site / "vault"}, write: true}}}}
    tls: lab
    require_tls: true
"""
    )
    process = NetdProcess.start(config, tmp_path_factory.mktemp("netd"))
    yield process
    process.stop()


def ca_file(netd: NetdProcess) -> str:
    return str(netd.log_path.parent / "state/tls/lab-ca.pem")


def connect(netd: NetdProcess, service: str = "files", user: str | None = None) -> ftplib.FTP:
    client = ftplib.FTP()
    client.connect(*netd.address(service), timeout=5)
    if user == "alice":
        client.login("alice", "wonderland")
    elif user is not None:
        client.login(user)
    return client


def tls_connect(netd: NetdProcess, service: str = "files") -> ftplib.FTP_TLS:
    context = ssl.create_default_context(cafile=ca_file(netd))
    client = ftplib.FTP_TLS(context=context)
    client.connect(*netd.address(service), timeout=5)
    return client


def retrieve(client: ftplib.FTP, path: str, rest: int | None = None) -> bytes:
    data = io.BytesIO()
    client.retrbinary(f"RETR {path}", data.write, rest=rest)
    return data.getvalue()


def events(netd: NetdProcess, type: str, since: int = 0) -> list[dict[str, Any]]:
    return netd.events("files", type, since, wait=5)


def last_event_id(netd: NetdProcess) -> int:
    last: int = netd.admin("GET", "/api/events?since=0")["last_id"]
    return last


def wait_for_no_sessions(netd: NetdProcess, service: str) -> None:
    """Connections earlier tests closed may not have reached the server yet."""
    wait_until(lambda: not netd.sessions(service), "end of every session", timeout=5)


def assert_serving(netd: NetdProcess, service: str = "files") -> None:
    client = connect(netd, service, "anonymous" if service != "vault" else None)
    if service == "files":
        assert retrieve(client, "hello.txt") == b"hello, world\n"
    else:
        client.voidcmd("NOOP")
    client.quit()
    assert netd.process.poll() is None


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    assert CURL is not None
    return subprocess.run(
        [CURL, "-sS", "--max-time", "15", *args], capture_output=True, check=False
    )


def url(netd: NetdProcess, path: str, user: str = "", tls: bool = False) -> str:
    host, port = netd.address("files", tls=tls)
    return f"{'ftps' if tls else 'ftp'}://{user}{host}:{port}{path}"


def login_raw(sock: socket.socket, reader: Any, user: bytes = b"anonymous") -> None:
    command(sock, reader, b"USER " + user)
    password = b"wonderland" if user == b"alice" else b"guest@"
    assert command(sock, reader, b"PASS " + password).startswith(b"230")


def reset(sock: socket.socket, reader: Any = None) -> None:
    """Close with a TCP reset, as a crashed client's kernel does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    hang_up(sock, reader)


# -- ftplib -----------------------------------------------------------------------------


def test_anonymous_read_with_ftplib(netd: NetdProcess) -> None:
    client = connect(netd, user="anonymous")
    assert client.pwd() == "/"
    assert sorted(client.nlst()) == ["big.bin", "docs", "hello.txt", "huge.bin"]  # no links out
    lines: list[str] = []
    client.dir(lines.append)
    assert any(line.startswith("d") and line.endswith(" docs") for line in lines)
    assert retrieve(client, "big.bin") == BIG
    assert client.size("big.bin") == len(BIG)
    assert re.fullmatch(r"213 \d{14}", client.sendcmd("MDTM hello.txt"))
    client.cwd("docs")
    assert client.pwd() == "/docs"
    assert retrieve(client, "readme.txt") == b"read me\n"
    client.sendcmd("CDUP")
    assert client.pwd() == "/"
    assert client.sendcmd("SYST").startswith("215")
    assert client.sendcmd("TYPE A").startswith("200")
    assert client.sendcmd("TYPE I").startswith("200")
    for refused in ("STOR x.txt", "APPE hello.txt"):
        with pytest.raises(ftplib.error_perm, match=r"^550"):
            client.storbinary(refused, io.BytesIO(b"no"))
    for write in ("MKD new", "DELE hello.txt", "RMD docs"):
        with pytest.raises(ftplib.error_perm, match=r"^550"):
            client.sendcmd(write)
    client.quit()


def test_user_writes_resumes_and_renames_with_ftplib(netd: NetdProcess, site: Path) -> None:
    client = connect(netd, user="alice")
    client.storbinary("STOR up.bin", io.BytesIO(BIG))
    assert (site / "alice" / "up.bin").read_bytes() == BIG
    assert retrieve(client, "up.bin", rest=1000) == BIG[1000:]
    client.storbinary("APPE up.bin", io.BytesIO(b"tail"))
    assert (site / "alice" / "up.bin").read_bytes() == BIG + b"tail"
    client.storbinary("STOR up.bin", io.BytesIO(b"0123456789"))
    client.storbinary("STOR up.bin", io.BytesIO(b"abc"), rest=4)
    assert (site / "alice" / "up.bin").read_bytes() == b"0123abc"
    assert client.mkd("dir") == "dir"
    client.rename("up.bin", "dir/moved.bin")
    assert client.nlst("dir") == ["moved.bin"]
    client.delete("dir/moved.bin")
    client.rmd("dir")
    assert client.nlst() == []
    client.set_pasv(False)  # PORT: the server connects back
    client.storbinary("STOR active.txt", io.BytesIO(b"active\n"))
    assert retrieve(client, "active.txt") == b"active\n"
    client.delete("active.txt")
    client.quit()


@pytest.mark.skipif(not IPV6, reason="no IPv6 loopback")
def test_ipv6_clients_use_epsv_and_eprt(netd: NetdProcess, site: Path) -> None:
    port = next(e["port"] for e in netd.listeners("files") if e["host"] == "::1")
    client = ftplib.FTP()
    client.connect("::1", port, timeout=5)
    client.login("alice", "wonderland")
    with pytest.raises(ftplib.error_perm, match=r"^502"):
        client.sendcmd("PASV")  # PASV cannot name an IPv6 address
    client.storlines("STOR text.txt", io.BytesIO(b"one\r\ntwo\r\n"))  # EPSV, TYPE A
    assert (site / "alice" / "text.txt").read_bytes() == b"one\ntwo\n"
    client.set_pasv(False)  # EPRT |2|::1|...|
    lines: list[str] = []
    client.retrlines("RETR text.txt", lines.append)
    assert lines == ["one", "two"]
    client.delete("text.txt")
    client.quit()


def test_bcrypt_user_reads_but_cannot_write(netd: NetdProcess) -> None:
    client = connect(netd)
    client.login("bob", "builder")
    assert retrieve(client, "bob.txt") == b"bob's\n"
    with pytest.raises(ftplib.error_perm, match=r"^550"):
        client.storbinary("STOR x", io.BytesIO(b"x"))
    client.quit()


def test_failed_logins_are_delayed_counted_and_end_the_session(netd: NetdProcess) -> None:
    since = last_event_id(netd)
    client = connect(netd)
    started = time.monotonic()
    with pytest.raises(ftplib.error_perm, match=r"^530"):
        client.login("alice", "wrong")
    assert time.monotonic() - started >= 0.3
    with pytest.raises((ftplib.error_temp, EOFError), match=r"421|"):
        client.login("nobody", "wrong")  # the second failure closes the connection
    failures = events(netd, "ftp.login_failed", since)
    assert {event["user"] for event in failures} >= {"alice"}
    assert "login_failures" in netd.admin("GET", "/metrics").decode()
    assert_serving(netd)


# -- FTPS -------------------------------------------------------------------------------


def test_explicit_ftps_with_ftplib_prot_p(netd: NetdProcess, site: Path) -> None:
    client = tls_connect(netd)
    client.login("alice", "wonderland")
    # RFC 4217 9, RFC 2228: PROT only after PBSZ (which ftplib's prot_p sends first).
    with pytest.raises(ftplib.error_perm, match=r"^503"):
        client.sendcmd("PROT P")
    client.prot_p()
    client.storbinary("STOR secure.bin", io.BytesIO(BIG))
    assert retrieve(client, "secure.bin") == BIG
    assert "secure.bin" in client.nlst()
    client.set_pasv(False)  # PORT: the server connects, and is still the TLS server
    assert retrieve(client, "secure.bin") == BIG
    client.delete("secure.bin")
    client.quit()


def test_require_tls_refuses_login_and_clear_data(netd: NetdProcess) -> None:
    sock, reader = control(netd, "vault")
    assert command(sock, reader, b"USER carol").startswith(b"530")
    hang_up(sock, reader)
    client = tls_connect(netd, "vault")
    client.login("carol", "secret")
    assert client.sendcmd("PBSZ 0").startswith("200")
    with pytest.raises(ftplib.error_perm, match=r"^534"):
        client.sendcmd("PROT C")
    client.prot_p()
    client.storbinary("STOR v.txt", io.BytesIO(b"vault\n"))
    assert retrieve(client, "v.txt") == b"vault\n"
    client.quit()


def test_commands_pipelined_after_auth_tls_are_dropped(netd: NetdProcess) -> None:
    sock = socket.create_connection(netd.address("files"), timeout=5)
    reader = sock.makefile("rb")
    reader.readline()
    sock.sendall(b"AUTH TLS\r\nUSER anonymous\r\n")
    assert reader.readline().startswith(b"234")
    context = ssl.create_default_context(cafile=ca_file(netd))
    secure = context.wrap_socket(sock, server_hostname="localhost")
    secure_reader = secure.makefile("rb")
    secure.sendall(b"PASS guest\r\n")
    # The plaintext USER was dropped, so PASS comes out of sequence.
    assert secure_reader.readline().startswith(b"503")
    hang_up(secure, secure_reader)
    reader.close()


@needs_curl
def test_curl_plain_explicit_and_implicit_ftps(netd: NetdProcess, tmp_path: Path) -> None:
    listing = curl(url(netd, "/"))
    assert b"hello.txt" in listing.stdout and b"escape" not in listing.stdout
    for variant in ((), ("--disable-epsv",), ("-P", "127.0.0.1"), ("-P", "-", "--disable-eprt")):
        fetched = curl(*variant, url(netd, "/big.bin"))
        assert fetched.stdout == BIG, (variant, fetched.stderr)
    source = tmp_path / "source.bin"
    source.write_bytes(BIG)
    ca = ca_file(netd)
    uploaded = curl(
        "--ssl-reqd", "--cacert", ca, "-T", str(source), url(netd, "/c.bin", "alice:wonderland@")
    )
    assert uploaded.returncode == 0, uploaded.stderr
    secure = curl("--ssl-reqd", "--cacert", ca, url(netd, "/c.bin", "alice:wonderland@"))
    assert secure.stdout == BIG, secure.stderr
    implicit = curl("--cacert", ca, url(netd, "/c.bin", "alice:wonderland@", tls=True))
    assert implicit.stdout == BIG, implicit.stderr
    resumed = curl("-C", "1000", url(netd, "/big.bin"))
    assert resumed.stdout == BIG[1000:]
    assert curl("-Q", "DELE c.bin", url(netd, "/", "alice:wonderland@")).returncode == 0


@needs_lftp
def test_lftp_puts_over_prot_p_with_tls13_store_the_whole_file(
    netd: NetdProcess, tmp_path: Path, site: Path
) -> None:
    """
    lftp reads one record of its data connection and closes: the TLS 1.3
    session tickets left unread made its kernel reset the connection and drop
    the file's end (426, nothing stored), unless netd holds them back.
    """
    payload = os.urandom(3_000_000)
    (tmp_path / "up.bin").write_bytes(payload)
    puts = "; ".join(f"put up.bin -o u{i}.bin" for i in range(6))
    result = lftp_as(
        "alice,wonderland",
        netd.address("files"),
        f"set net:max-retries 1; set net:timeout 10; set ssl:ca-file {ca_file(netd)};"
        f" set ftp:ssl-force yes; set ftp:ssl-protect-data yes; {puts}; bye",
        tmp_path,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    for i in range(6):
        assert (site / "alice" / f"u{i}.bin").read_bytes() == payload
        (site / "alice" / f"u{i}.bin").unlink()


def test_an_upload_whose_tls_handshake_came_before_stor_stores_the_whole_file(
    netd: NetdProcess, site: Path
) -> None:
    """
    As lftp, the client reads nothing of its data connection and closes after
    its close_notify; here it finished the TLS handshake before sending STOR,
    so the session tickets must be held back then too (426 otherwise).
    """
    context = ssl.create_default_context(cafile=ca_file(netd))
    client = tls_connect(netd)
    client.login("alice", "wonderland")
    client.prot_p()
    data = socket.create_connection(client.makepasv())
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            data.sendall(outgoing.read())
            incoming.write(data.recv(65536))
    data.sendall(outgoing.read())  # the client's Finished
    client.voidcmd("NOOP")  # one turn of netd's reactor: the handshake is through
    assert client.sendcmd("STOR early.bin").startswith("125")
    payload = os.urandom(3_000_000)
    for start in range(0, len(payload), 65536):
        tls.write(payload[start : start + 65536])
        data.sendall(outgoing.read())
    with pytest.raises(ssl.SSLWantReadError):
        tls.unwrap()  # the close_notify; netd's is never read
    data.sendall(outgoing.read())
    data.close()
    assert client.voidresp().startswith("226")
    assert (site / "alice" / "early.bin").read_bytes() == payload
    client.delete("early.bin")
    client.quit()


@needs_lftp
def test_lftp_plain_and_tls(netd: NetdProcess, tmp_path: Path, site: Path) -> None:
    assert LFTP is not None
    host, port = netd.address("files")
    (tmp_path / "l.txt").write_text("from lftp\n")
    settings = f"set net:max-retries 1; set net:timeout 5; set ssl:ca-file {ca_file(netd)};"
    plain = subprocess.run(
        [
            LFTP,
            "-p",
            str(port),
            "-e",
            f"{settings} set ftp:ssl-allow no; ls; get hello.txt; bye",
            host,
        ],
        capture_output=True,
        cwd=tmp_path,
        timeout=30,
        check=False,
    )
    assert b"hello.txt" in plain.stdout, plain.stderr
    assert (tmp_path / "hello.txt").read_bytes() == b"hello, world\n"
    secure = lftp_as(
        "alice,wonderland",
        (host, port),
        f"{settings} set ftp:ssl-force yes; set ftp:ssl-protect-data yes;"
        " put l.txt; cls; rm l.txt; bye",
        tmp_path,
    )
    assert secure.returncode == 0 and b"l.txt" in secure.stdout, secure.stderr
    assert not (site / "alice" / "l.txt").exists()
    implicit_host, implicit_port = netd.address("files", tls=True)
    mirrored = subprocess.run(
        [
            LFTP,
            "-e",
            f"{settings} mirror /docs {tmp_path / 'mirror'}; bye",
            f"ftps://anonymous:guest@{implicit_host}:{implicit_port}",
        ],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert mirrored.returncode == 0, mirrored.stderr
    assert (tmp_path / "mirror" / "readme.txt").read_text() == "read me\n"


# -- safety -------------------------------------------------------------------------------


def test_no_path_leaves_the_root(netd: NetdProcess, site: Path) -> None:
    sock, reader = control(netd)
    login_raw(sock, reader, b"alice")
    (site / "alice" / "link_out").symlink_to(site / "secret.txt")
    (site / "alice" / "dir_out").symlink_to(site)
    for line in FTP_TRAVERSAL_READS:
        assert command(sock, reader, line)[:1] == b"5", line
    for line in FTP_TRAVERSAL_WRITES:
        assert command(sock, reader, line)[:1] == b"5", line
    # Refused at RNFR already (the name is looked up there), and so at RNTO too.
    assert command(sock, reader, b"RNFR dir_out/secret.txt")[:1] == b"5"
    assert command(sock, reader, b"RNTO stolen.txt")[:1] == b"5"
    assert command(sock, reader, b"RNFR link_out")[:1] == b"5"
    assert command(sock, reader, b"RNTO ../moved.txt")[:1] == b"5"
    for line in (
        b"STOR ../planted.txt",
        b"STOR dir_out/planted.txt",
        b"STOR link_out",
        b"RETR link_out",
    ):
        assert command(sock, reader, b"PASV").startswith(b"227")
        assert command(sock, reader, line)[:1] == b"5", line
    hang_up(sock, reader)
    assert (site / "secret.txt").read_bytes() == SECRET
    assert not (site / "made").exists() and not (site / "planted.txt").exists()
    assert sorted(os.listdir(site)) == ["alice", "bob", "drop", "pub", "secret.txt", "vault"]
    (site / "alice" / "link_out").unlink()
    (site / "alice" / "dir_out").unlink()
    assert_serving(netd)


def test_port_and_eprt_to_another_address_are_refused(netd: NetdProcess) -> None:
    since = last_event_id(netd)
    sock, reader = control(netd)
    login_raw(sock, reader)
    for line in (
        b"PORT 127,0,0,2,4,1",  # another host
        b"PORT 127,0,0,1,0,25",  # a privileged port of the client itself
        b"EPRT |1|127.0.0.2|1025|",
        b"EPRT |2|::1|1025|",
        b"PORT 10,0,0,1,4,1",
    ):
        assert command(sock, reader, line).startswith(b"504"), line
    assert command(sock, reader, b"PORT 1,2,3").startswith(b"501")
    assert command(sock, reader, b"EPRT garbage").startswith(b"501")
    hang_up(sock, reader)
    assert len(events(netd, "ftp.bounce_refused", since)) >= 5
    assert_serving(netd)


def test_passive_port_accepts_only_the_control_client(netd: NetdProcess) -> None:
    since = last_event_id(netd)
    sock, reader = control(netd)
    login_raw(sock, reader)
    port = passive_port(command(sock, reader, b"PASV"))
    assert PASSIVE_LOW <= port <= PASSIVE_LOW + 49
    thief = socket.socket()
    thief.bind(("127.0.0.2", 0))
    thief.settimeout(5)
    thief.connect(("127.0.0.1", port))
    assert thief.recv(100) == b""  # closed at once
    thief.close()
    assert events(netd, "ftp.data_refused", since)
    data = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(b"RETR hello.txt\r\n")
    assert reader.readline().startswith(b"125")
    assert data.makefile("rb").read() == b"hello, world\n"
    assert reader.readline().startswith(b"226")
    hang_up(sock, reader)


def test_epsv_and_epsv_all(netd: NetdProcess) -> None:
    sock, reader = control(netd)
    login_raw(sock, reader)
    reply = command(sock, reader, b"EPSV")
    match = re.search(rb"\(\|\|\|(\d+)\|\)", reply)
    assert match is not None, reply
    data = socket.create_connection(("127.0.0.1", int(match.group(1))), timeout=5)
    sock.sendall(b"NLST\r\n")
    assert reader.readline().startswith(b"125")
    assert b"hello.txt" in data.makefile("rb").read()
    assert reader.readline().startswith(b"226")
    assert command(sock, reader, b"EPSV ALL").startswith(b"200")
    assert command(sock, reader, b"PASV").startswith(b"503")
    hang_up(sock, reader)


def test_interrupted_uploads_never_appear_under_their_name(netd: NetdProcess, site: Path) -> None:
    (site / "alice" / "keep.bin").write_bytes(b"old content")
    # The data connection is reset halfway: 426, the old file stays.
    sock, reader = control(netd)
    login_raw(sock, reader, b"alice")
    data = socket.create_connection(("127.0.0.1", passive_port(command(sock, reader, b"PASV"))))
    assert command(sock, reader, b"STOR keep.bin").startswith(b"125")
    data.sendall(BIG[: len(BIG) // 2])
    reset(data)
    assert reader.readline().startswith(b"426")
    assert (site / "alice" / "keep.bin").read_bytes() == b"old content"
    # The client vanishes: control connection first, then the data stream ends.
    data = socket.create_connection(("127.0.0.1", passive_port(command(sock, reader, b"PASV"))))
    assert command(sock, reader, b"STOR new.bin").startswith(b"125")
    data.sendall(BIG[: len(BIG) // 2])
    hang_up(sock, reader)
    wait_for_no_sessions(netd, "files")  # the control connection's end arrives first
    data.close()
    client = connect(netd, user="alice")
    wait_until(
        lambda: not [n for n in os.listdir(site / "alice") if n.startswith(".~netd")],
        "the partial upload's removal",
        timeout=5,
    )
    assert sorted(os.listdir(site / "alice")) == ["keep.bin"]
    assert client.nlst() == ["keep.bin"]
    client.delete("keep.bin")
    client.quit()


def test_a_rules_throttle_and_close_n_act_on_an_uploads_data(netd: NetdProcess, site: Path) -> None:
    payload = os.urandom(300 << 10)
    client = connect(netd, user="alice")
    with netd.rule("files", match={"command": "STOR"}, throttle=100_000) as throttle:
        begun = time.monotonic()
        client.storbinary("STOR paced.bin", io.BytesIO(payload))
        took = time.monotonic() - begun
        assert throttle.fired == 1
    assert 2.5 <= took < 10, took  # 307200 bytes read at 100000 bytes/s
    assert (site / "alice" / "paced.bin").read_bytes() == payload
    with (
        netd.rule("files", match={"command": "APPE"}, close=1000),
        pytest.raises(ftplib.error_temp, match=r"^426"),
    ):
        client.storbinary("APPE paced.bin", io.BytesIO(payload[:30000]))
    with (
        netd.rule("files", match={"command": "STOR"}, close=1000),
        pytest.raises(ftplib.error_temp, match=r"^426"),
    ):
        client.storbinary("STOR cut.bin", io.BytesIO(payload[:30000]))
    # An upload cut is an aborted one: the target keeps what it had, or is not made.
    wait_until(
        lambda: not [n for n in os.listdir(site / "alice") if n.startswith(".~netd")],
        "the partial uploads' removal",
        timeout=5,
    )
    assert sorted(os.listdir(site / "alice")) == ["paced.bin"]
    assert (site / "alice" / "paced.bin").read_bytes() == payload
    sizes = [
        event["bytes"]
        for event in netd.events("files", "ftp.transfer")
        if event["path"] in ("/paced.bin", "/cut.bin")
    ]
    assert sizes[-3:] == [len(payload), 1000, 1000]
    client.delete("paced.bin")
    client.quit()


def test_close_n_counts_what_an_upload_sent_before_its_command(
    netd: NetdProcess, site: Path
) -> None:
    client = connect(netd, user="alice")
    client.voidcmd("TYPE I")
    data = socket.create_connection(ftplib.parse227(client.sendcmd("PASV")))
    data.sendall(os.urandom(30000))
    client.voidcmd("NOOP")  # one turn of netd's reactor: the bytes are read, held
    with netd.rule("files", match={"command": "STOR", "path": "cut*"}, close=1000):
        assert client.sendcmd("STOR cut_early.bin").startswith("125")
        with contextlib.suppress(OSError):  # netd may have cut it already
            data.shutdown(socket.SHUT_WR)  # the end of the file
        with pytest.raises(ftplib.error_temp, match=r"^426"):
            client.voidresp()
    data.close()
    wait_until(
        lambda: not [n for n in os.listdir(site / "alice") if n.startswith(".~netd")],
        "the partial upload's removal",
        timeout=5,
    )
    assert not (site / "alice" / "cut_early.bin").exists()
    client.quit()


@needs_curl
def test_a_rules_throttle_paces_uploads_over_prot_p(
    netd: NetdProcess, tmp_path: Path, site: Path
) -> None:
    """A read of TLS brought 64 KiB of the file at once, unpaced (then 226)."""
    payload = os.urandom(64000)
    (tmp_path / "up.bin").write_bytes(payload)
    client = tls_connect(netd)
    client.login("alice", "wonderland")
    client.prot_p()
    with netd.rule("files", match={"command": "STOR"}, throttle=20_000) as throttle:
        begun = time.monotonic()
        client.storbinary("STOR paced_tls.bin", io.BytesIO(payload))
        by_ftplib = time.monotonic() - begun
        begun = time.monotonic()
        uploaded = curl(
            "--ssl-reqd",
            "--cacert",
            ca_file(netd),
            "-T",
            str(tmp_path / "up.bin"),
            url(netd, "/paced_curl.bin", "alice:wonderland@"),
        )
        by_curl = time.monotonic() - begun
        assert throttle.fired == 2
    assert uploaded.returncode == 0, uploaded.stderr
    # 64000 bytes at 20000 bytes/s
    assert 2.5 <= by_ftplib < 10, by_ftplib
    assert 2.5 <= by_curl < 10, by_curl
    for name in ("paced_tls.bin", "paced_curl.bin"):
        assert (site / "alice" / name).read_bytes() == payload
        client.delete(name)
    client.quit()


def test_a_rules_throttle_paces_downloads_over_prot_p(netd: NetdProcess, site: Path) -> None:
    """
    ftplib's TLS handshake on the data connection came after RETR, behind the
    throttle: it timed out (netd read nothing while the throttle's queue was
    full), and once read, the session tickets held for the first bytes were
    lost (a bad record MAC).
    """
    payload = os.urandom(100_000)  # more than the throttle queues before reading pauses
    (site / "alice" / "paced_down.bin").write_bytes(payload)
    client = tls_connect(netd)
    client.login("alice", "wonderland")
    client.prot_p()
    with netd.rule("files", match={"command": "RETR"}, throttle=40_000) as throttle:
        begun = time.monotonic()
        assert retrieve(client, "paced_down.bin") == payload
        assert 2 <= time.monotonic() - begun < 10  # 2.5 s at the rate
        assert throttle.fired == 1
    client.delete("paced_down.bin")
    client.quit()


def test_a_throttles_pause_longer_than_data_timeout_is_not_a_stall(
    netd: NetdProcess, site: Path
) -> None:
    """Each pause below is longer than data_timeout (1 s): they were cut with 426."""
    client = connect(netd, user="alice")
    client.voidcmd("TYPE I")
    early = os.urandom(60000)
    data = socket.create_connection(ftplib.parse227(client.sendcmd("PASV")))
    data.sendall(early)  # before its command: read at once, then 3 s at the rate
    with netd.rule("files", match={"command": "STOR"}, throttle=20_000):
        begun = time.monotonic()
        assert client.sendcmd("STOR early.bin").startswith("125")
        data.shutdown(socket.SHUT_WR)
        assert client.voidresp().startswith("226")
        assert 2.5 <= time.monotonic() - begun < 10
    data.close()
    assert (site / "alice" / "early.bin").read_bytes() == early
    (site / "alice" / "slow.bin").write_bytes(early)
    with netd.rule("files", match={"command": "RETR"}, throttle=20_000):
        begun = time.monotonic()
        assert retrieve(client, "slow.bin") == early  # one write of 60000 bytes
        assert 2.5 <= time.monotonic() - begun < 10
    client.quit()
    client = tls_connect(netd)
    client.login("alice", "wonderland")
    client.prot_p()
    payload = os.urandom(20000)
    with netd.rule("files", match={"command": "STOR"}, throttle=5000):
        begun = time.monotonic()
        # A TLS record of 16 KiB is read whole: 3.3 s at the rate.
        client.storbinary("STOR paced_record.bin", io.BytesIO(payload), blocksize=16384)
        assert 3.5 <= time.monotonic() - begun < 10
    assert (site / "alice" / "paced_record.bin").read_bytes() == payload
    for name in ("early.bin", "slow.bin", "paced_record.bin"):
        client.delete(name)
    client.quit()


def test_a_client_silent_after_a_throttles_pause_is_cut_after_data_timeout(
    netd: NetdProcess, site: Path
) -> None:
    sock, reader = control(netd)
    login_raw(sock, reader, b"alice")
    data = socket.create_connection(("127.0.0.1", passive_port(command(sock, reader, b"PASV"))))
    data.sendall(os.urandom(30000))  # 1.5 s at the rate, then nothing with the connection open
    with netd.rule("files", match={"command": "STOR"}, throttle=20_000):
        begun = time.monotonic()
        assert command(sock, reader, b"STOR silent.bin").startswith(b"125")
        assert reader.readline().startswith(b"426")
        assert 1.5 <= time.monotonic() - begun < 10
    data.close()
    assert not (site / "alice" / "silent.bin").exists()
    hang_up(sock, reader)
    assert_serving(netd)


def test_client_vanishing_mid_download(netd: NetdProcess) -> None:
    sock, reader = control(netd)
    login_raw(sock, reader)
    data = socket.create_connection(("127.0.0.1", passive_port(command(sock, reader, b"PASV"))))
    data.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    assert command(sock, reader, b"RETR big.bin").startswith(b"125")
    assert data.recv(1000)
    reset(data)
    assert reader.readline()[:3] in (b"426", b"226")
    reset(sock, reader)
    assert_serving(netd)


def test_a_client_that_stops_reading_is_cut_after_data_timeout(netd: NetdProcess) -> None:
    sock, reader = control(netd)
    login_raw(sock, reader)
    data = socket.socket()
    data.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    data.connect(("127.0.0.1", passive_port(command(sock, reader, b"PASV"))))
    assert command(sock, reader, b"RETR huge.bin").startswith(b"125")
    started = time.monotonic()
    assert reader.readline().startswith(b"426")  # nothing read: the transfer stalls
    assert time.monotonic() - started < 10
    data.close()
    assert command(sock, reader, b"NOOP").startswith(b"200")
    hang_up(sock, reader)
    assert_serving(netd)


def test_data_connection_that_never_comes(netd: NetdProcess) -> None:
    sock, reader = control(netd)
    login_raw(sock, reader)
    command(sock, reader, b"PASV")
    started = time.monotonic()
    assert command(sock, reader, b"RETR hello.txt").startswith(b"425")
    assert time.monotonic() - started < 10
    assert command(sock, reader, b"NOOP").startswith(b"200")
    assert command(sock, reader, b"RETR hello.txt").startswith(b"503")  # no PASV any more
    hang_up(sock, reader)
    assert_serving(netd)


def test_bad_commands(netd: NetdProcess) -> None:
    sock, reader = control(netd)
    assert command(sock, reader, b"LIST").startswith(b"530")  # not logged in
    assert command(sock, reader, b"PASS x").startswith(b"503")
    login_raw(sock, reader)
    assert command(sock, reader, b"XYZZY plugh").startswith(b"502")
    assert command(sock, reader, b"").startswith(b"502")
    assert command(sock, reader, b"REST -5").startswith(b"501")
    assert command(sock, reader, b"TYPE Q").startswith(b"504")
    assert command(sock, reader, b"RNTO x").startswith(b"503")
    assert command(sock, reader, b"NOOP").startswith(b"200")
    sock.sendall(b"NOOP " + b"x" * 5000 + b"\r\n")
    assert reader.readline().startswith(b"500")
    assert reader.readline() == b""  # closed
    hang_up(sock, reader)
    assert_serving(netd)


def test_per_client_and_total_connection_limits(netd: NetdProcess) -> None:
    wait_for_no_sessions(netd, "files")
    wait_for_no_sessions(netd, "drop")
    held = [connect(netd) for _ in range(6)]  # max_connections_per_client: 6
    with pytest.raises(ftplib.error_temp, match=r"^421 Too many connections from your address"):
        connect(netd)
    refused = netd.wait_for("files", "connection.refused", reason="max_connections_per_client")
    assert refused["client"].startswith("127.0.0.1:")
    # The ones let in are served as ever.
    held[0].login()
    assert retrieve(held[0], "hello.txt") == b"hello, world\n"
    # One leaves: once netd has seen it go, its slot is the next client's.
    host, port = held[0].sock.getsockname()[:2]
    held.pop(0).quit()
    netd.wait_for("files", "connection.closed", client=f"{host}:{port}")
    held.append(connect(netd, user="anonymous"))
    assert retrieve(held[-1], "hello.txt") == b"hello, world\n"
    for client in held:
        client.close()
    drop = [control(netd, "drop") for _ in range(2)]
    sock = socket.create_connection(netd.address("drop"), timeout=5)
    assert sock.makefile("rb").readline().startswith(b"421")
    sock.close()
    for held_sock, held_reader in drop:
        hang_up(held_sock, held_reader)
    assert_serving(netd)


def test_anonymous_write_service(netd: NetdProcess, site: Path) -> None:
    client = connect(netd, "drop", "anonymous")
    client.storbinary("STOR dropped.txt", io.BytesIO(b"dropped\n"))
    client.quit()
    assert (site / "drop" / "dropped.txt").read_bytes() == b"dropped\n"


def test_sessions_view_transfer_events_and_metrics(netd: NetdProcess) -> None:
    since = last_event_id(netd)
    client = connect(netd, user="alice")
    client.cwd("/")
    sessions = netd.sessions("files")
    mine = [s for s in sessions if s["user"] == "alice"]
    assert mine and mine[0]["cwd"] == "/" and mine[0]["tls"] is False
    client.storbinary("STOR m.bin", io.BytesIO(b"m" * 1000))
    assert retrieve(client, "m.bin") == b"m" * 1000
    client.delete("m.bin")
    client.quit()
    transfers = events(netd, "ftp.transfer", since)
    while len(transfers) < 2:
        transfers += events(netd, "ftp.transfer", transfers[-1]["id"])
    assert [(t["direction"], t["bytes"], t["ok"]) for t in transfers[:2]] == [
        ("upload", 1000, True),
        ("download", 1000, True),
    ]
    metrics = netd.admin("GET", "/metrics").decode()
    assert "download_bytes" in metrics and "upload_bytes" in metrics


def test_abor_cuts_a_download_short(netd: NetdProcess) -> None:
    client = connect(netd, user="anonymous")
    data = client.transfercmd("RETR huge.bin")
    assert data.recv(1000)
    reply = client.abort()  # ABOR as urgent data, after Telnet IP and Synch
    assert reply[:3] in ("426", "226"), reply
    while reply.startswith("426"):
        reply = client.getline()
    data.close()
    assert client.voidcmd("NOOP").startswith("200")
    client.quit()
    assert (
        "aborts" in netd.admin("GET", "/metrics").decode()
    )  # cut at ABOR, not by the stall timeout
    assert_serving(netd)


def test_abor_ends_a_download_still_waiting_for_its_data_connection(netd: NetdProcess) -> None:
    client = connect(netd, user="anonymous")
    client.sendcmd("PASV")  # the data connection is never made
    client.putcmd("RETR huge.bin")
    reply = client.abort()  # the RETR's own answer comes first
    assert reply.startswith("426"), reply  # not data_timeout's 425
    assert client.getline().startswith("226")  # then ABOR's
    assert client.voidcmd("NOOP").startswith("200")
    client.quit()
    assert_serving(netd)


def netd_to_stop(start_netd: StartNetd, keys: str) -> NetdProcess:
    """netd with a 20 s shutdown_grace and the ftp service files, with C{keys}, on loopback."""
    return start_netd(
        lab_map(
            "  files:\n"
            "    type: ftp\n"
            '    listen: ["tcp:0:interface=127.0.0.1"]\n'
            + textwrap.indent(textwrap.dedent(keys).strip(), "    ")
            + "\n",
            shutdown_grace=20,
        )
    )


def test_a_stop_lets_transfers_finish_then_closes_their_sessions(
    start_netd: StartNetd, site: Path, tmp_path: Path
) -> None:
    """Not held open to the stop's grace and then reset: the reply, then 421 and the end."""
    (site / "alice" / "down.bin").write_bytes(b"d" * 40_000)
    netd = netd_to_stop(
        start_netd,
        f"""
    users: {{alice: {{password: wonderland, home: {site / "alice"}, write: true}}}}
    rules:
      - {{match: {{command: STOR}}, throttle: 20000}}
      - {{match: {{command: RETR}}, throttle: 20000}}
""",
    )
    client = connect(netd, user="alice")
    storing = threading.Thread(
        target=client.storbinary, args=("STOR stopping.bin", io.BytesIO(b"s" * 40_000))
    )
    storing.start()
    # lftp reads the 226 and then the data connection's end: a 421 in the same
    # read made it take the download for failed (exit 1).
    getting: list[subprocess.CompletedProcess[bytes]] = []
    lftp = threading.Thread(
        target=lambda: getting.append(
            lftp_as("alice,wonderland", netd.address("files"), "get down.bin; bye", tmp_path)
        )
    )
    lftp.start()
    wait_until(
        lambda: (
            any(n.startswith(".~netd") for n in os.listdir(site / "alice"))
            and (tmp_path / "down.bin").exists()
        ),
        "both transfers' start",
    )
    begun = time.monotonic()
    netd.process.send_signal(signal.SIGTERM)
    storing.join(timeout=15)
    lftp.join(timeout=15)
    # RFC 959 4.2.1's words for a server going away, not an idle timeout's.
    with pytest.raises(ftplib.error_temp, match=r"^421 Service not available, closing"):
        client.getresp()
    assert client.file.readline() == ""  # closed
    assert netd.process.wait(timeout=15) == 0
    assert time.monotonic() - begun < 10  # the transfers' 2 s, not the 20 s grace
    assert (site / "alice" / "stopping.bin").read_bytes() == b"s" * 40_000
    [got] = getting
    assert got.returncode == 0, got.stderr
    assert (tmp_path / "down.bin").read_bytes() == b"d" * 40_000
    for name in ("stopping.bin", "down.bin"):
        (site / "alice" / name).unlink()


def lftp_stopped_during_get(
    start_netd: StartNetd, tmp_path: Path, size: int, rate: int, then: str
) -> tuple[NetdProcess, bytes, Callable[[], subprocess.CompletedProcess[bytes]], float]:
    """
    netd serving C{size} random bytes as big.bin, sent SIGTERM once lftp's
    get of it (at C{rate} bytes/s, then C{then}) has begun: netd, the file,
    lftp's outcome (once it is done) and when the stop began.
    """
    root = tmp_path / "root"
    root.mkdir()
    whole = os.urandom(size)
    (root / "big.bin").write_bytes(whole)
    netd = netd_to_stop(start_netd, f"root: {root}\nanonymous: read")
    getting: list[subprocess.CompletedProcess[bytes]] = []
    script = f"set net:limit-rate {rate}; set net:max-retries 1; get big.bin; {then}"
    lftp = threading.Thread(
        target=lambda: getting.append(
            lftp_as("anonymous,guest@", netd.address("files"), script, tmp_path)
        )
    )
    lftp.start()
    wait_until(lambda: (tmp_path / "big.bin").exists(), "the download's start")
    begun = time.monotonic()
    netd.process.send_signal(signal.SIGTERM)

    def outcome() -> subprocess.CompletedProcess[bytes]:
        lftp.join(timeout=30)
        [got] = getting
        return got

    return netd, whole, outcome, begun


@needs_lftp
def test_a_stop_leaves_a_slow_reader_its_whole_download(
    start_netd: StartNetd, tmp_path: Path
) -> None:
    """
    netd's 226 comes when the file's last byte is in the kernel; a client
    reading at 1 MB/s still has megabytes in the socket buffers then, and a
    421 read before them made lftp drop the data connection (exit 1, the
    file cut short), however long after the 226 it came.
    """
    netd, whole, lftp, begun = lftp_stopped_during_get(
        start_netd, tmp_path, 8 << 20, 1_000_000, "bye"
    )
    got = lftp()
    assert got.returncode == 0, got.stderr
    assert (tmp_path / "big.bin").read_bytes() == whole
    assert netd.process.wait(timeout=30) == 0
    assert time.monotonic() - begun < 15  # not by the 20 s grace


@needs_lftp
def test_a_stop_says_421_once_a_client_staying_connected_has_read_its_download(
    start_netd: StartNetd, tmp_path: Path
) -> None:
    """
    lftp's shell stays connected and silent after a get: the stop waited
    for its next command, its idle_timeout or the 20 s grace (then a reset,
    no 421).  netd's FIN after the last byte has lftp close the data
    connection once it has read it all, and the 421 comes then.  The file is
    larger than loopback's socket buffers hold: the stop comes during the
    download, not after its 226.
    """
    netd, whole, lftp, begun = lftp_stopped_during_get(
        start_netd, tmp_path, 16 << 20, 8_000_000, "sleep 10; bye"
    )
    assert netd.process.wait(timeout=30) == 0
    assert time.monotonic() - begun < 5  # the download's 2 s, not lftp's sleep nor the grace
    got = lftp()
    assert (tmp_path / "big.bin").read_bytes() == whole
    assert got.returncode == 0, got.stderr
    assert b"get:" not in got.stderr, got.stderr


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "prot_p"])
def test_a_download_running_at_a_stop_is_followed_by_421_without_another_command(
    start_netd: StartNetd, tmp_path: Path, tls: bool
) -> None:
    size = 64 << 20
    with (tmp_path / "huge.bin").open("wb") as huge:
        huge.truncate(size)  # sparse: more than loopback buffers hold
    netd = netd_to_stop(start_netd, f"root: {tmp_path}\nanonymous: read\ntls: lab")
    client = tls_connect(netd) if tls else connect(netd)
    client.login()
    if isinstance(client, ftplib.FTP_TLS):
        client.prot_p()
    client.voidcmd("TYPE I")
    data = client.transfercmd("RETR huge.bin")
    got = len(data.recv(65536))
    begun = time.monotonic()
    netd.process.send_signal(signal.SIGTERM)
    # The port closes, then its sessions are asked to close: the download still runs.
    port = netd.address("files")[1]
    wait_until(lambda: f"(TCP Port {port} Closed)" in netd.output, "the port's close")
    while chunk := data.recv(1 << 20):
        assert not chunk.strip(b"\0")
        got += len(chunk)
    if isinstance(data, ssl.SSLSocket):
        data.unwrap()
    data.close()
    assert client.voidresp().startswith("226")
    with pytest.raises(ftplib.error_temp, match=r"^421 Service not available, closing"):
        client.getresp()
    assert client.file.readline() == ""  # closed
    client.close()  # (over TLS netd waits for it after its close_notify)
    assert netd.process.wait(timeout=15) == 0
    assert time.monotonic() - begun < 5  # not the 20 s grace
    assert got == size


def test_a_client_that_reads_slowly_but_steadily_is_not_cut(netd: NetdProcess) -> None:
    """data_timeout is the client's silence: what it takes from the kernel's queue counts."""
    client = connect(netd, user="anonymous")
    client.voidcmd("TYPE I")
    data = client.transfercmd("RETR huge.bin")
    got = 0
    ends = time.monotonic() + 4  # four data_timeouts, the kernel's buffers full throughout
    while time.monotonic() < ends:
        chunk = data.recv(32768)
        assert chunk, f"cut after {got} bytes"
        got += len(chunk)
        time.sleep(0.2)  # the reader's pace: about 160 KB/s
    data.close()
    with contextlib.suppress(ftplib.error_temp):  # 426: the client left mid-transfer
        client.voidresp()
    client.quit()
