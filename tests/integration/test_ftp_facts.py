"""
What today's FTP clients reach for, in the real daemon: MLSD/MLST (ftplib's mlsd(),
lftp, curl), MFMT, HELP, SITE CHMOD, and listings that run off the reactor thread
and are cut when they stall.
"""

from __future__ import annotations

import ftplib
import io
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from netd.testing import NetdProcess
from tests.clients import command, control, hang_up, passive_port
from tests.maps import files_service, lab_map

CURL = shutil.which("curl")
LFTP = shutil.which("lftp")
MANY = 100_000
WIDE = 20_000
WARM = 32 << 20


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("ftpfacts")
    pub = base / "pub"
    (pub / "docs").mkdir(parents=True)
    (pub / "hello.txt").write_bytes(b"hello, world\n")
    (pub / "docs" / "readme.txt").write_text("read me\n")
    # A listing of several MiB (more than the sockets between hold), in a
    # fraction of the time 100,000 short names take to create.
    wide = pub / "wide"
    wide.mkdir()
    for number in range(WIDE):
        os.close(os.open(wide / f"{number:06d}{'w' * 240}", os.O_CREAT | os.O_WRONLY, 0o644))
    (base / "alice").mkdir()
    (base / "alice" / "mine.txt").write_text("alice's\n")
    return base


@pytest.fixture(scope="module")
def netd(tmp_path_factory: pytest.TempPathFactory, site: Path) -> Iterator[NetdProcess]:
    config = lab_map(
        files_service(site, umask='"027"', data_timeout="2", max_connections_per_client="8")
    )
    process = NetdProcess.start(config, tmp_path_factory.mktemp("netd"))
    yield process
    process.stop()


def connect(netd: NetdProcess, user: str = "anonymous") -> ftplib.FTP:
    client = ftplib.FTP()
    client.connect(*netd.address("files"), timeout=10)
    if user == "alice":
        client.login("alice", "wonderland")
    else:
        client.login(user)
    return client


def test_ftplib_mlsd_and_mlst_give_facts_and_perm_per_user(netd: NetdProcess, site: Path) -> None:
    anonymous = connect(netd)
    features = anonymous.sendcmd("FEAT")
    assert " MLST type*;size*;modify*;perm*;unique*;" in features
    assert " MFMT" in features and " TVFS" in features
    entries = dict(anonymous.mlsd("/"))
    assert entries["."]["type"] == "cdir" and entries["."]["perm"] == "el"
    hello = entries["hello.txt"]
    assert (hello["type"], hello["size"], hello["perm"]) == ("file", "13", "r")
    info = (site / "pub" / "hello.txt").stat()
    assert hello["modify"] == time.strftime("%Y%m%d%H%M%S", time.gmtime(info.st_mtime))
    assert hello["unique"] == f"{info.st_dev:x}g{info.st_ino:x}"
    assert (entries["docs"]["type"], entries["docs"]["perm"]) == ("dir", "el")
    assert "size" not in entries["docs"]
    reply = anonymous.sendcmd("MLST docs/readme.txt")
    assert reply.splitlines()[1].startswith(" type=file;size=8;")
    assert reply.splitlines()[1].endswith("; /docs/readme.txt")
    # OPTS MLST chooses the facts from now on.
    assert anonymous.sendcmd("OPTS MLST size;type;") == "200 MLST OPTS type;size;"
    assert dict(anonymous.mlsd("/docs"))["readme.txt"] == {"type": "file", "size": "8"}
    with pytest.raises(ftplib.error_perm, match=r"^501"):
        list(anonymous.mlsd("/hello.txt"))  # MLSD of a file
    with pytest.raises(ftplib.error_perm, match=r"^550"):
        anonymous.sendcmd("MLST /nothing")
    anonymous.quit()

    alice = connect(netd, "alice")
    mine = dict(alice.mlsd())
    assert mine["mine.txt"]["perm"] == "adfrw"
    assert mine["."]["perm"] == "celmp"  # the home itself cannot be removed or renamed
    alice.quit()


def test_mfmt_and_site_chmod_within_the_umask(netd: NetdProcess, site: Path) -> None:
    target = site / "alice" / "stamped.txt"
    target.write_text("x")
    target.chmod(0o600)
    alice = connect(netd, "alice")
    assert alice.sendcmd("MFMT 20200102030405 stamped.txt") == (
        "213 Modify=20200102030405; stamped.txt"
    )
    assert target.stat().st_mtime == 1577934245
    assert dict(alice.mlsd())["stamped.txt"]["modify"] == "20200102030405"
    # umask 027: the group's write bit and every bit for others are not granted.
    assert alice.sendcmd("SITE CHMOD 777 stamped.txt") == "200 Mode of stamped.txt set to 0750."
    assert target.stat().st_mode & 0o7777 == 0o750
    for bad, code in [
        ("SITE CHMOD 4755 stamped.txt", "550"),  # setuid
        ("SITE CHMOD 8 stamped.txt", "501"),
        ("SITE CHMOD 644", "501"),
        ("SITE CHMOD 644 ../../etc/passwd", "550"),
        ("SITE EXEC ls", "504"),
        ("MFMT 2020 stamped.txt", "501"),
        ("MFMT 20201399000000 stamped.txt", "501"),
        ("MFMT 20200102030405 missing.txt", "550"),
    ]:
        with pytest.raises(ftplib.error_perm, match=rf"^{code}"):
            alice.sendcmd(bad)
    alice.storbinary("STOR new.txt", io.BytesIO(b"new"))
    assert (site / "alice" / "new.txt").stat().st_mode & 0o777 == 0o640
    alice.mkd("folder")
    assert (site / "alice" / "folder").stat().st_mode & 0o777 == 0o750
    assert alice.sendcmd("NOOP").startswith("200")
    alice.quit()

    anonymous = connect(netd)
    for refused in ("SITE CHMOD 644 hello.txt", "MFMT 20200102030405 hello.txt"):
        with pytest.raises(ftplib.error_perm, match=r"^550"):
            anonymous.sendcmd(refused)
    assert (site / "pub" / "hello.txt").read_bytes() == b"hello, world\n"
    anonymous.quit()


def test_help_before_and_after_login(netd: NetdProcess) -> None:
    client = ftplib.FTP()
    client.connect(*netd.address("files"), timeout=10)
    listed = client.sendcmd("HELP")
    assert listed.startswith("214-") and listed.endswith("214 Help OK.")
    for name in ("MLSD", "MLST", "MFMT", "SITE", "RETR", "EPSV"):
        assert name in listed
    assert client.sendcmd("HELP SITE").startswith("214 SITE CHMOD")
    assert client.sendcmd("HELP mlsd") == "214 MLSD is a command of this server."
    assert client.sendcmd("HELP XYZZY") == "214 XYZZY is not a command of this server."
    client.quit()


@pytest.mark.skipif(LFTP is None, reason="lftp is not installed")
def test_lftp_lists_with_mlsd(netd: NetdProcess, tmp_path: Path) -> None:
    assert LFTP is not None
    host, port = netd.address("files")
    listed = subprocess.run(
        [
            LFTP,
            "-d",
            "-p",
            str(port),
            "-e",
            "set net:max-retries 1; set net:timeout 5; set ftp:ssl-allow no; cls -l /; bye",
            host,
        ],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert listed.returncode == 0, listed.stderr
    assert b"---> MLSD" in listed.stderr  # lftp chose MLSD from FEAT
    assert b"hello.txt" in listed.stdout and b"docs/" in listed.stdout


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
def test_curl_with_ftp_ssl_lists_and_fetches(netd: NetdProcess) -> None:
    assert CURL is not None
    host, port = netd.address("files")
    ca = str(netd.log_path.parent / "state/tls/lab-ca.pem")
    base = ["-sS", "--max-time", "15", "--ftp-ssl", "--cacert", ca]
    listed = subprocess.run(
        [CURL, *base, "-X", "MLSD", f"ftp://{host}:{port}/docs/"],
        capture_output=True,
        check=False,
    )
    assert listed.returncode == 0, listed.stderr
    assert b"type=file;size=8;" in listed.stdout and b" readme.txt" in listed.stdout
    since = netd.admin("GET", "/api/events?since=0")["last_id"]
    fetched = subprocess.run(
        [CURL, *base, f"ftp://alice:wonderland@{host}:{port}/mine.txt"],
        capture_output=True,
        check=False,
    )
    assert fetched.stdout == b"alice's\n", fetched.stderr
    login = netd.events("files", "ftp.login", since, wait=5)[0]
    assert (login["user"], login["tls"]) == ("alice", True)  # --ftp-ssl did AUTH TLS


def test_a_listing_that_stalls_is_cut_after_data_timeout(netd: NetdProcess) -> None:
    sock, reader = control(netd, "files")
    command(sock, reader, b"USER anonymous")
    assert command(sock, reader, b"PASS guest@").startswith(b"230")
    data = socket.socket()
    data.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    data.connect(("127.0.0.1", passive_port(command(sock, reader, b"PASV"))))
    started = time.monotonic()
    assert command(sock, reader, b"MLSD /wide").startswith(b"125")
    assert reader.readline().startswith(b"426")  # never read: cut, not kept forever
    assert time.monotonic() - started < 15
    data.close()
    assert command(sock, reader, b"NOOP").startswith(b"200")
    hang_up(sock, reader)


def _download_rate(netd: NetdProcess, seconds: float, during: threading.Event | None) -> float:
    """MiB/s of RETRs of warm.bin one after another, for C{seconds} or while C{during} is unset."""
    client = connect(netd)
    client.voidcmd("TYPE I")
    received = 0
    started = time.monotonic()
    deadline = started + seconds
    while time.monotonic() < deadline and not (during is not None and during.is_set()):
        with client.transfercmd("RETR warm.bin") as data:
            while chunk := data.recv(1 << 20):
                received += len(chunk)
        client.voidresp()
    elapsed = time.monotonic() - started
    client.quit()
    return received / elapsed / (1 << 20)


@pytest.fixture
def many(site: Path) -> Path:
    """100,000 files (about 10 s to create), and a file to download while they are listed."""
    pub = site / "pub"
    # Downloaded again and again while the big folder is listed: real bytes, so
    # that every download reads the page cache (a sparse file's first reads fill it).
    (pub / "warm.bin").write_bytes(bytes(range(256)) * (WARM // 256))
    many = pub / "many"
    many.mkdir()
    for number in range(MANY):
        os.close(os.open(many / f"f{number:06d}", os.O_CREAT | os.O_WRONLY, 0o644))
    return many


@pytest.mark.slow
@pytest.mark.skipif(CURL is None, reason="curl is not installed")
def test_a_folder_of_100000_files_is_listed_while_a_download_streams(
    netd: NetdProcess, many: Path, tmp_path: Path
) -> None:
    # About 10 s: the listings take 1.5-3 s here, downloads are read meanwhile
    # (0.6-0.8x of their rate alone, on this shared machine). Built on the reactor
    # thread, the listings held them to 0.04x.
    # curl lists, so that no Python thread of this process competes with the reader.
    assert CURL is not None
    host, port = netd.address("files")
    unloaded = _download_rate(netd, 1.5, None)
    listed = threading.Event()
    outputs = [tmp_path / "mlsd", tmp_path / "nlst", tmp_path / "list"]

    def list_many() -> None:
        try:
            for output, how in zip(outputs, (["-X", "MLSD"], ["--list-only"], []), strict=True):
                url = f"ftp://{host}:{port}/many/"
                command = [CURL, "-sS", "--max-time", "30", "-o", str(output), *how, url]
                subprocess.run(command, check=True)
        finally:
            listed.set()

    lister = threading.Thread(target=list_many)
    lister.start()
    loaded = _download_rate(netd, 30, listed)
    lister.join(30)
    assert listed.is_set()
    # Before and after: the machine's own load drifts while the listings run.
    after = _download_rate(netd, 1.5, None)
    unloaded = (unloaded + after) / 2
    counts = [len(output.read_bytes().splitlines()) for output in outputs]
    assert counts == [MANY + 1, MANY, MANY]  # MLSD has a line for "." too
    assert loaded > 0.5 * unloaded, (loaded, unloaded)


def test_tls_data_listing_with_mlsd(netd: NetdProcess) -> None:
    context = ssl.create_default_context(cafile=str(netd.log_path.parent / "state/tls/lab-ca.pem"))
    client = ftplib.FTP_TLS(context=context)
    client.connect(*netd.address("files"), timeout=10)
    client.login("alice", "wonderland")
    client.prot_p()
    assert "mine.txt" in dict(client.mlsd())
    client.quit()
