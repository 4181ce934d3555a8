"""
ftp rules in the real daemon, seen by ftplib: a reply to a chosen command and
path, a delayed command, a stalled greeting the client times out on.
"""

from __future__ import annotations

import ftplib
import io
import time
from pathlib import Path

import pytest

from netd.testing import NetdProcess
from tests.conftest import StartNetd


def ftp_map(root: Path) -> str:
    return f"""
services:
  files:
    type: ftp
    listen: ["tcp:0:interface=127.0.0.1"]
    root: {root}
    anonymous: read
    rules:
      - {{match: {{command: RETR, path: "*.csv"}}, reply: "550 not today", times: 1}}
      - {{match: {{command: LIST}}, delay: 1}}
"""


def client(netd: NetdProcess, timeout: float = 10) -> ftplib.FTP:
    ftp = ftplib.FTP()
    ftp.connect(*netd.address("files"), timeout=timeout)
    ftp.login()
    return ftp


def started(start_netd: StartNetd, tmp_path: Path) -> NetdProcess:
    root = tmp_path / "pub"
    root.mkdir()
    (root / "report.csv").write_bytes(b"a,b\n")
    return start_netd(ftp_map(root))


def test_reply_to_a_command_and_path_once(start_netd: StartNetd, tmp_path: Path) -> None:
    netd = started(start_netd, tmp_path)
    ftp = client(netd)
    with pytest.raises(ftplib.error_perm, match="550 not today"):
        ftp.retrbinary("RETR report.csv", io.BytesIO().write)
    got = io.BytesIO()
    ftp.retrbinary("RETR report.csv", got.write)
    assert got.getvalue() == b"a,b\n"
    ftp.quit()
    event = netd.wait_for("files", "rule.fired", rule="m1")
    assert event["matched"] == {"command": "RETR", "path": "report.csv"}


def test_delayed_list(start_netd: StartNetd, tmp_path: Path) -> None:
    netd = started(start_netd, tmp_path)
    ftp = client(netd)
    begun = time.monotonic()
    assert ftp.nlst() == ["report.csv"]  # NLST: no rule
    assert time.monotonic() - begun < 0.9
    lines: list[str] = []
    begun = time.monotonic()
    ftp.retrlines("LIST", lines.append)
    assert time.monotonic() - begun >= 0.9
    assert "report.csv" in lines[0]
    ftp.quit()


def test_ftplib_times_out_on_a_stall(start_netd: StartNetd, tmp_path: Path) -> None:
    netd = started(start_netd, tmp_path)
    with netd.rule("files", stall=True) as stall:
        with pytest.raises(TimeoutError):
            ftplib.FTP().connect(*netd.address("files"), timeout=1)
        assert stall.fired == 1
    ftp = client(netd)  # the rule is gone: greeted again
    assert "netd" in ftp.getwelcome()
    ftp.quit()


@pytest.fixture
def logged_in(start_netd: StartNetd, tmp_path: Path) -> tuple[NetdProcess, ftplib.FTP]:
    netd = started(start_netd, tmp_path)
    return netd, client(netd, timeout=3)


def test_a_reply_of_a_bare_code_is_sent_as_a_reply_line(
    logged_in: tuple[NetdProcess, ftplib.FTP],
) -> None:
    netd, ftp = logged_in
    with netd.rule("files", match={"command": "PWD"}, reply="257"):
        assert ftp.sendcmd("PWD") == "257 "  # RFC 959 4.2: the code, a space, no text
    assert ftp.sendcmd("PWD") == '257 "/"'
    ftp.quit()


def test_a_reply_of_421_closes_the_control_connection(
    logged_in: tuple[NetdProcess, ftplib.FTP],
) -> None:
    netd, ftp = logged_in
    with netd.rule("files", match={"command": "NOOP"}, reply="421 going down"):
        # PWD, pipelined after it, is not run.
        ftp.sock.sendall(b"NOOP\r\nPWD\r\n")
        assert ftp.file.readline() == "421 going down\n"
        assert ftp.file.readline() == ""


def test_throttle_and_close_n_act_on_a_downloads_data(
    logged_in: tuple[NetdProcess, ftplib.FTP], tmp_path: Path
) -> None:
    netd, ftp = logged_in
    (tmp_path / "pub" / "data.bin").write_bytes(bytes(range(256)) * 120)  # 30720 bytes
    with netd.rule("files", match={"command": "RETR"}, throttle=20000):
        got = io.BytesIO()
        begun = time.monotonic()
        ftp.retrbinary("RETR data.bin", got.write)
        assert time.monotonic() - begun >= 1.2
        assert got.getvalue() == bytes(range(256)) * 120
    with netd.rule("files", match={"command": "RETR"}, close=1000):
        got = io.BytesIO()
        with pytest.raises(ftplib.error_temp, match="426"):
            ftp.retrbinary("RETR data.bin", got.write)
        assert got.getvalue() == bytes(range(256)) * 3 + bytes(range(232))
    with netd.rule("files", match={"command": "NLST"}, close=3):
        names: list[str] = []
        with pytest.raises(ftplib.error_temp, match="426"):
            ftp.retrlines("NLST", names.append)
        assert names == ["dat"]
    assert ftp.nlst() == ["data.bin", "report.csv"]
    ftp.quit()


def rss(netd: NetdProcess) -> int:
    """netd's resident memory, in bytes."""
    status = Path(f"/proc/{netd.process.pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def test_a_throttled_download_the_client_does_not_read_holds_no_memory_and_stalls(
    start_netd: StartNetd, tmp_path: Path
) -> None:
    root = tmp_path / "pub"
    root.mkdir()
    with (root / "big.bin").open("wb") as big:
        big.truncate(256 << 20)
    netd = start_netd(ftp_map(root).replace("    rules:", "    data_timeout: 4\n    rules:"))
    ftp = client(netd)
    with netd.rule("files", match={"command": "RETR"}, throttle=8_000_000):
        data = ftp.transfercmd("RETR big.bin")  # and never read
        before = rss(netd)
        time.sleep(3)  # 24 MB at the rate, more than the sockets' buffers hold
        assert rss(netd) - before < 6 << 20
        # The client's wait, not the throttle's: data_timeout cuts the transfer.
        with pytest.raises(ftplib.error_temp, match="426"):
            ftp.getresp()
        data.close()
    ftp.quit()
