"""
A command line trickled a byte at a time (slowloris) moves bytes, so no idle
timer cuts it: ftp's line_timeout does, with a 421.  Whole lines, however slow the
pause between them, pipelined lines whose reads end mid-line, and a transfer
still running are not cut by it.
"""

from __future__ import annotations

import ftplib
import socket
import time
from pathlib import Path

from tests.conftest import StartNetd

LINE_TIMEOUT = 1.0


def test_a_trickled_line_is_cut_whole_lines_are_not(start_netd: StartNetd, tmp_path: Path) -> None:
    (tmp_path / "pub").mkdir()
    (tmp_path / "pub" / "big.bin").write_bytes(b"x" * (8 << 20))
    netd = start_netd(
        f"""
services:
  files:
    type: ftp
    listen: ["tcp:0:interface=127.0.0.1"]
    root: {tmp_path / "pub"}
    anonymous: read
    line_timeout: {LINE_TIMEOUT}
"""
    )
    host, port = netd.address("files")
    with socket.create_connection((host, port), timeout=10) as sock:
        assert sock.recv(1024).startswith(b"220")
        started = time.monotonic()
        received = b""
        for byte in b"NOOP":  # never ends its line
            sock.sendall(bytes([byte]))
            time.sleep(LINE_TIMEOUT / 4)  # the trickle under test
        while chunk := sock.recv(1024):
            received += chunk
        cut_after = time.monotonic() - started
    assert received.startswith(b"421 Command line not complete in time")
    assert LINE_TIMEOUT <= cut_after < LINE_TIMEOUT + 3
    netd.wait_for("files", "connection.closed")

    # Pipelined commands whose sends each end mid-line, for longer than
    # line_timeout: every line is whole in time, so none is cut.
    with socket.create_connection((host, port), timeout=10) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"220")
        sock.sendall(b"NO")
        sends = int(LINE_TIMEOUT * 2.5 / 0.2)
        for _ in range(sends):
            time.sleep(0.2)
            sock.sendall(b"OP\r\nNO")
        sock.sendall(b"OP\r\nQUIT\r\n")
        replies = [line[:3] for line in reader]
    assert replies == [b"200"] * (sends + 1) + [b"221"]

    client = ftplib.FTP()
    client.connect(host, port, timeout=10)
    client.login()
    time.sleep(LINE_TIMEOUT * 1.5)  # a quiet pause between whole commands is no slow line
    assert client.voidcmd("NOOP").startswith("200")
    # A transfer outlasting line_timeout while the client reads slowly: not cut.
    with client.transfercmd("RETR big.bin") as data:
        got, reads = 0, 0
        while chunk := data.recv(1 << 20):
            got, reads = got + len(chunk), reads + 1
            if reads <= 3:
                time.sleep(LINE_TIMEOUT / 2)
    assert got == 8 << 20 and client.voidresp().startswith("226")
    client.quit()
