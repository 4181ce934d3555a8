"""
Namespaces on ftp and chat in the real daemon: ftplib logging in as
C{user@t42}, IRC clients in C{#t42-*} rooms, each namespace seeing its own.
"""

from __future__ import annotations

import ftplib
import io
from pathlib import Path

import pytest

from netd.testing import NetdProcess
from tests.conftest import StartNetd


@pytest.fixture
def files(start_netd: StartNetd, tmp_path: Path) -> NetdProcess:
    (tmp_path / "alice").mkdir()
    (tmp_path / "pub").mkdir()
    return start_netd(
        f"""
services:
  files:
    type: ftp
    listen: ["tcp:0:interface=127.0.0.1"]
    root: {tmp_path / "pub"}
    anonymous: read
    users: {{alice: {{password: wonderland, home: {tmp_path / "alice"}, write: true}}}}
    login_delay: 0
    namespace_from: [login, client]
"""
    )


def ftp_login(netd: NetdProcess, user: str, password: str = "wonderland") -> ftplib.FTP:
    client = ftplib.FTP()
    client.connect(*netd.address("files"), timeout=10)
    client.login(user, password)
    return client


def test_each_ftp_namespace_has_its_own_folder_and_sessions(
    files: NetdProcess, tmp_path: Path
) -> None:
    red, blue = files.namespace("red"), files.namespace("blue")
    with ftp_login(files, "alice@red") as alice_red, ftp_login(files, "alice@blue") as alice_blue:
        alice_red.storbinary("STOR report.txt", io.BytesIO(b"red's\n"))
        assert alice_red.nlst() == ["report.txt"]
        assert alice_blue.nlst() == []
        with pytest.raises(ftplib.error_perm, match=r"^550"):
            alice_blue.retrbinary("RETR report.txt", lambda data: None)
        # Each namespace's sessions view lists its own session only.
        [red_session] = red.sessions("files")
        assert (red_session["user"], red_session["namespace"]) == ("alice", "red")
        assert [s["namespace"] for s in blue.sessions("files")] == ["blue"]
        assert len(files.sessions("files")) == 2
        # Anonymous in a namespace reads that namespace's folder of its root.
        with ftp_login(files, "anonymous@red", "guest@") as guest:
            assert guest.nlst() == []
    assert (tmp_path / "alice" / "red" / "report.txt").read_bytes() == b"red's\n"
    red_transfers = red.events("files", "ftp.transfer")
    assert sorted(t["direction"] for t in red_transfers) == ["listing", "listing", "upload"]
    assert {t["namespace"] for t in red_transfers} == {"red"}
    assert [t["direction"] for t in blue.events("files", "ftp.transfer")] == ["listing"]
    assert {e["namespace"] for e in red.events("files", "ftp.login")} == {"red"}
    # Forgetting red removes red's folder of the writable home, and its events.
    answer = red.reset()
    assert answer["services"]["files"]["sessions"] == {"folders": 1}
    assert sorted(p.name for p in (tmp_path / "alice").iterdir()) == ["blue"]
    assert red.events("files") == [] and blue.events("files", "ftp.login")


def test_a_login_naming_no_namespace_is_refused_and_ftp_serves_on(
    files: NetdProcess, tmp_path: Path
) -> None:
    for login in ("alice@", "alice@BAD KEY!", "@t42"):
        client = ftplib.FTP()
        client.connect(*files.address("files"), timeout=10)
        with client, pytest.raises(ftplib.error_perm, match=r"^530 Not a namespace"):
            client.login(login, "wonderland")
    with ftp_login(files, "alice") as alice:
        # No namespace: the whole home, which holds no folder made by the refusals.
        assert alice.nlst() == []
    assert files.view("files", "sessions") == []
