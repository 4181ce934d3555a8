"""
Client mistakes against the real ftp service: each gets the protocol's reply and a
log line, never a traceback, and the daemon goes on serving.  Failed logins are slowed
down and limited whatever the password's checker or bytes.
"""

from __future__ import annotations

import contextlib
import ftplib
import io
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import pytest

from netd.testing import NetdProcess
from tests.clients import command, control, hang_up, lftp_as
from tests.signals import wait_until

CURL = shutil.which("curl")
LFTP = shutil.which("lftp")
LOGIN_DELAY = 0.2
MAX_FAILURES = 3
LONG_NAME = "n" * 300


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("ftp-errors")
    alice = base / "alice"
    (alice / "full").mkdir(parents=True)
    (alice / "full" / "inside.txt").write_text("inside\n")
    (alice / "sub").mkdir()
    (alice / "a.txt").write_text("the file\n")
    return base


@pytest.fixture(scope="module")
def netd(tmp_path_factory: pytest.TempPathFactory, site: Path) -> Iterator[NetdProcess]:
    bob_hash = bcrypt.hashpw(b"builder", bcrypt.gensalt(4)).decode()
    config = f"""
services:
  files:
    type: ftp
    listen: ["tcp:0:interface=127.0.0.1"]
    users:
      alice: {{password: wonderland, home: {site / "alice"}, write: true}}
      bob: {{password_hash: "{bob_hash}", home: {site / "alice"}}}
    login_delay: {LOGIN_DELAY}
    max_login_failures: {MAX_FAILURES}
"""
    process = NetdProcess.start(config, tmp_path_factory.mktemp("netd"))
    yield process
    process.stop()


def login(netd: NetdProcess) -> ftplib.FTP:
    """A good login, which also makes the daemon forget this address's failures."""
    client = ftplib.FTP()
    client.connect(*netd.address("files"), timeout=10)
    client.login("alice", "wonderland")
    return client


def assert_serving_and_no_traceback(netd: NetdProcess) -> None:
    client = login(netd)
    listing: list[str] = []
    client.retrlines("LIST", listing.append)
    assert any(line.endswith(" a.txt") for line in listing)
    data = io.BytesIO()
    client.retrbinary("RETR a.txt", data.write)
    assert data.getvalue() == b"the file\n"
    client.quit()
    assert netd.process.poll() is None
    # Warnings and worse reach the log at once (infos within 0.2 s).
    output = netd.output
    assert "Traceback" not in output
    assert "#critical]" not in output
    assert "internal server error" not in output


def test_filesystem_mistakes_get_their_reply_and_a_log_line(netd: NetdProcess, site: Path) -> None:
    sock, reader = control(netd)
    command(sock, reader, b"USER alice")
    assert command(sock, reader, b"PASS wonderland").startswith(b"230")
    assert command(sock, reader, b"PASS again").startswith(b"503")
    assert command(sock, reader, b"RMD full") == (
        b"550 Requested action not taken: full: Directory not empty\r\n"
    )
    assert command(sock, reader, b"RNFR sub").startswith(b"350")
    assert command(sock, reader, b"RNTO sub/inner").startswith(b"550")
    assert command(sock, reader, b"RNFR sub").startswith(b"350")
    assert command(sock, reader, b"RNTO sub/./inner/../inner").startswith(b"550")
    for verb in (b"MKD", b"CWD", b"SIZE", b"DELE", b"RMD"):
        assert command(sock, reader, verb + b" " + LONG_NAME.encode()).startswith(b"553"), verb
    # Refused at RNFR itself, as the name is looked up there (RFC 959 5.4).
    assert command(sock, reader, b"RNFR " + LONG_NAME.encode()).startswith(b"553")
    assert command(sock, reader, b"RNTO short").startswith(b"503")
    assert command(sock, reader, b"NOOP").startswith(b"200")  # not left waiting for RNTO
    assert command(sock, reader, b"RNFR a.txt").startswith(b"350")
    assert command(sock, reader, b"RNTO " + LONG_NAME.encode()).startswith(b"553")
    hang_up(sock, reader)
    assert (site / "alice" / "full" / "inside.txt").exists()
    assert (site / "alice" / "sub").is_dir() and not (site / "alice" / "sub" / "inner").exists()
    client = login(netd)
    with pytest.raises(ftplib.error_perm, match=r"^553"):
        client.storbinary(f"STOR {LONG_NAME}", io.BytesIO(b"never stored"))
    client.quit()
    # Info lines are flushed in batches: each shows up in the log a little later.
    for line in (
        "RMD refused: '550 Requested action not taken: full: Directory not empty'",
        "PASS refused: '503 ",
    ):
        wait_until(lambda line=line: line in netd.output, f"log line {line!r}", timeout=5)
    assert_serving_and_no_traceback(netd)


def test_a_file_named_with_a_trailing_slash_is_not_a_directory(
    netd: NetdProcess, site: Path
) -> None:
    client = login(netd)
    for path in ("a.txt/", "/a.txt/", "a.txt/.", "a.txt/..", "a.txt//"):
        with pytest.raises(ftplib.error_perm, match=r"^550 .*Not a directory"):
            client.retrbinary(f"RETR {path}", lambda data: pytest.fail("served a file"))
    for verb in ("CWD", "SIZE", "MDTM", "DELE", "RNFR", "LIST", "NLST"):
        with pytest.raises(ftplib.error_perm, match=r"^550"):
            client.sendcmd(f"{verb} a.txt/")
    assert client.pwd() == "/"
    with pytest.raises(ftplib.error_perm, match=r"^550"):
        client.storbinary("STOR new/", io.BytesIO(b"not a file"))
    with pytest.raises(ftplib.error_perm, match=r"^550"):
        client.storbinary("STOR a.txt/", io.BytesIO(b"not over the file"))
    client.sendcmd("RNFR a.txt")
    with pytest.raises(ftplib.error_perm, match=r"^550"):
        client.sendcmd("RNTO b.txt/")  # rename(2) says ENOTDIR
    assert not (site / "alice" / "new").exists()
    assert not (site / "alice" / "b.txt").exists()
    assert (site / "alice" / "a.txt").read_text() == "the file\n"
    # What a trailing slash rightly means still works: directories.
    assert client.size("a.txt") == 9
    assert client.cwd("sub/").startswith("250")
    assert client.pwd() == "/sub"
    assert client.cwd("../full/./").startswith("250")
    assert client.nlst("/full/") == ["inside.txt"]
    client.mkd("/made/")
    assert (site / "alice" / "made").is_dir()
    client.rmd("/made/")
    client.quit()
    assert_serving_and_no_traceback(netd)


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
def test_curl_does_not_get_a_file_through_a_directory_url(netd: NetdProcess) -> None:
    assert CURL is not None
    host, port = netd.address("files")
    base = f"ftp://alice:wonderland@{host}:{port}"
    listed = subprocess.run(
        [CURL, "-sS", "--max-time", "15", f"{base}/a.txt/"], capture_output=True, check=False
    )
    assert listed.returncode != 0
    assert b"the file" not in listed.stdout
    fetched = subprocess.run(
        [CURL, "-sS", "--max-time", "15", f"{base}/a.txt"], capture_output=True, check=False
    )
    assert fetched.returncode == 0 and fetched.stdout == b"the file\n"
    assert_serving_and_no_traceback(netd)


@pytest.mark.skipif(LFTP is None, reason="lftp is not installed")
def test_lftp_shows_the_reasons(netd: NetdProcess, tmp_path: Path) -> None:
    done = lftp_as(
        "alice,wonderland",
        netd.address("files"),
        f"set net:max-retries 1; set net:timeout 5; rmdir full; mkdir {LONG_NAME}; get a.txt/; bye",
        tmp_path,
    )
    said = done.stderr.decode(errors="replace")
    assert "Directory not empty" in said
    assert "553" in said
    assert "Not a directory" in said
    assert not list(tmp_path.iterdir())
    assert_serving_and_no_traceback(netd)


@pytest.mark.parametrize(
    ("user", "password"),
    [(b"alice", b"wrong"), (b"alice", b"\xff\xfe"), (b"bob", b"wrong"), (b"bob", b"\xff\xfe")],
    ids=["clear-text", "clear-text-not-utf8", "bcrypt", "bcrypt-not-utf8"],
)
def test_wrong_passwords_are_delayed_and_cut_for_every_checker(
    netd: NetdProcess, user: bytes, password: bytes
) -> None:
    login(netd).quit()  # this address starts with no recent failure
    journal = netd.events("files")
    since = journal[-1]["id"] if journal else 0
    sock, reader = control(netd)
    started = time.monotonic()
    # Pipelined, as a guesser would: 300 tries, of which the daemon hears 3.
    with contextlib.suppress(OSError):  # cut while sending: what counts is what was answered
        sock.sendall((b"USER " + user + b"\r\nPASS " + password + b"\r\n") * 300)
    replies = [line[:3] for line in iter(reader.readline, b"")]
    elapsed = time.monotonic() - started
    hang_up(sock, reader)
    assert replies == [b"331", b"530", b"331", b"530", b"331", b"421"]
    # The first failure waits login_delay, each further one from the address twice the last.
    assert elapsed >= LOGIN_DELAY * (1 + 2 + 4)
    failures = netd.events("files", "ftp.login_failed", since)
    assert [e["user"] for e in failures] == [user.decode()] * MAX_FAILURES
    assert_serving_and_no_traceback(netd)


def test_pass_without_user_after_a_failure_is_a_sequence_error(netd: NetdProcess) -> None:
    login(netd).quit()
    sock, reader = control(netd)
    assert command(sock, reader, b"USER alice").startswith(b"331")
    assert command(sock, reader, b"PASS \xff").startswith(b"530")
    for _ in range(5):
        assert command(sock, reader, b"PASS \xff").startswith(b"503")
    assert command(sock, reader, b"USER alice").startswith(b"331")
    assert command(sock, reader, b"PASS wonderland").startswith(b"230")
    hang_up(sock, reader)
    assert_serving_and_no_traceback(netd)


def test_a_name_with_a_line_break_cannot_forge_a_reply(netd: NetdProcess) -> None:
    # RFC 959 4.2: a reply line ends at its CRLF; the client's LF echoed in a reply
    # made "250 fake" read as the answer to the next command.
    sock, reader = control(netd)
    assert command(sock, reader, b"USER alice").startswith(b"331")
    assert command(sock, reader, b"PASS wonderland").startswith(b"230")
    assert command(sock, reader, b"SIZE nosuch\n250 fake").startswith(b"550 nosuch?250 fake")
    assert command(sock, reader, b"NOOP\n").startswith(b"502 ")
    assert command(sock, reader, b"NOOP") == b"200 Command OK\r\n"  # nothing left over
    hang_up(sock, reader)


def test_rfc_959_replies_a_review_found_wrong(netd: NetdProcess, site: Path) -> None:
    client = login(netd)
    # Appendix II: a quote in a 257 reply's name is doubled, so clients read it whole.
    assert client.mkd('q"x') == 'q"x'
    client.cwd('q"x')
    assert client.pwd() == '/q"x'
    client.cwd("/")
    # TYPE A N and L 8 (RFC 959 5.1, RFC 1123 4.1.2.2) are TYPE A and I.
    assert client.sendcmd("TYPE A N").startswith("200") and client.sendcmd("TYPE L 8")[:3] == "200"
    # RFC 3659 4: SIZE is what RETR would send: refused in TYPE A (as pyftpdlib), 550 for
    # a directory.
    client.voidcmd("TYPE A")
    with pytest.raises(ftplib.error_perm, match="550 SIZE not allowed in TYPE A"):
        client.size("a.txt")
    client.voidcmd("TYPE I")
    assert client.size("a.txt") == 9
    with pytest.raises(ftplib.error_perm, match="550 SIZE of a directory"):
        client.size("sub")
    # RFC 3659 5: REST is for the transfer right after it, not one after a listing.
    client.sendcmd("REST 2")
    client.nlst()
    found = io.BytesIO()
    client.retrbinary("RETR a.txt", found.write)
    assert found.getvalue() == b"the file\n"
    # RFC 959 5.4: RNFR of a name that is not there is 550 at once (it was 350, then 550
    # at RNTO); one that is there is 350 and the rename goes on.
    with pytest.raises(ftplib.error_perm, match=r"^550"):
        client.sendcmd("RNFR no-such.txt")
    client.rename("a.txt", "b.txt")
    client.rename("b.txt", "a.txt")
    # RFC 959 4.2: an argument missing is a 501, not a 500.
    with pytest.raises(ftplib.error_perm, match=r"^501"):
        client.sendcmd("RNFR")
    client.quit()


def test_type_a_keeps_a_crlf_split_between_two_reads(netd: NetdProcess, site: Path) -> None:
    # RFC 959 3.1.1.1: a CRLF that fell across netd's 256 KiB reads went out as CR CR LF.
    text = b"x" * (256 * 1024 - 1) + b"\r\n" + b"y" * 10 + b"\n"
    (site / "alice" / "split.txt").write_bytes(text)
    client = login(netd)
    client.voidcmd("TYPE A")
    with client.transfercmd("RETR split.txt") as data:
        sent = b"".join(iter(lambda: data.recv(65536), b""))
    client.voidresp()
    assert sent == text.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    client.quit()
