"""
twistd --uid/--gid: netd binds ports below 1024 as root, then runs as nobody.

Under systemd the unit runs netd as its own user from the start (User=netd with
CAP_NET_BIND_SERVICE, or sockets from a socket unit); this is the other way,
for hosts without systemd.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from netd.testing import twistd_command
from tests.signals import wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="binding below 1024 needs root")

CONFIG = """
state_dir: state
shutdown_grace: 2
tls:
  lab: {{self_signed: [localhost, 127.0.0.1]}}
services:
  echo:
    type: echo
    listen:
      - "tcp:{port}:interface=127.0.0.1"
      - "udp:{port}:interface=127.0.0.1"
      - {{endpoint: "ssl:0:interface=127.0.0.1", tls: lab}}
"""


def low_port() -> int:
    """A port below 1024 free on 127.0.0.1 for both TCP and UDP."""
    for port in range(1023, 600, -1):
        with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            try:
                tcp.bind(("127.0.0.1", port))
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port below 1024")


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A folder nobody may write (for the ports file): pytest's tmp_path is root's alone."""
    try:
        nobody, nogroup = pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid
    except KeyError:
        pytest.skip("no user nobody or group nogroup")
    path = Path(tempfile.mkdtemp(prefix="netd-privileges-"))
    os.chown(path, nobody, nogroup)
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def start_as_nobody(workdir: Path, port: int) -> subprocess.Popen[bytes]:
    """twistd --uid nobody on CONFIG, returned once the ports file says it is ready."""
    (workdir / "netd.yaml").write_text(CONFIG.format(port=port))
    command = [
        *twistd_command(),
        *("--nodaemon", "--pidfile=", "--uid", "nobody", "--gid", "nogroup"),
        *("netd", "-c", "netd.yaml", "--ports-file", "ports.json"),
    ]
    with (workdir / "netd.log").open("wb") as log:
        process = subprocess.Popen(command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
    wait_until(
        (workdir / "ports.json").exists, "ports file", process=process, log=workdir / "netd.log"
    )
    return process


@pytest.fixture
def netd(workdir: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = low_port()
    process = start_as_nobody(workdir, port)
    yield process, port
    if process.poll() is None:
        process.kill()
        process.wait()


def test_binds_as_root_then_serves_as_nobody(
    netd: tuple[subprocess.Popen[bytes], int], workdir: Path
) -> None:
    process, port = netd
    status = Path(f"/proc/{process.pid}/status").read_text()
    [uid] = [line.split()[1:] for line in status.splitlines() if line.startswith("Uid:")]
    [gid] = [line.split()[1:] for line in status.splitlines() if line.startswith("Gid:")]
    assert uid == [str(pwd.getpwnam("nobody").pw_uid)] * 4  # real, effective, saved, fs
    assert gid == [str(grp.getgrnam("nogroup").gr_gid)] * 4

    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"low port")
        assert sock.recv(100) == b"low port"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(5)
        udp.sendto(b"low udp", ("127.0.0.1", port))
        assert udp.recvfrom(100) == (b"low udp", ("127.0.0.1", port))

    # The certificates were generated as root before the drop and are in memory.
    ports = json.loads((workdir / "ports.json").read_text())
    [tls_port] = [e["port"] for e in ports["services"]["echo"]["listeners"] if e["tls"]]
    context = ssl.create_default_context(cafile=str(workdir / "state/tls/lab-ca.pem"))
    raw = socket.create_connection(("127.0.0.1", tls_port), timeout=5)
    with context.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(b"secret")
        assert tls.recv(100) == b"secret"

    process.send_signal(signal.SIGTERM)
    assert process.wait(15) == 0
    assert not (workdir / "ports.json").exists()  # removed as nobody, in nobody's folder


def test_reload_after_the_drop(netd: tuple[subprocess.Popen[bytes], int], workdir: Path) -> None:
    process, _ = netd
    process.send_signal(signal.SIGHUP)
    log = workdir / "netd.log"
    wait_until(
        lambda: "reloaded" in log.read_text() or "reload refused" in log.read_text(), "reload"
    )
    text = log.read_text()
    assert "reload refused" not in text, text


def test_handing_over_state_never_follows_links(workdir: Path) -> None:
    """The service user owns state_dir: a link it plants must not get root's file chowned."""
    victim = workdir / "victim"
    victim.write_text("root's")
    os.chown(victim, 0, 0)
    state = workdir / "state"
    state.mkdir()
    (state / "planted").symlink_to(victim)
    process = start_as_nobody(workdir, 0)
    try:
        assert (victim.stat().st_uid, victim.stat().st_gid) == (0, 0)
        assert (state / "planted").lstat().st_uid == pwd.getpwnam("nobody").pw_uid
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(15)
