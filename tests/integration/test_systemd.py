"""
The real daemon under systemd's protocols: sd_notify to a socket the test reads,
sockets handed over by systemd-socket-activate, and the shipped units verified.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from netd.testing import StartFailed, twistd_command
from tests.conftest import StartNetd
from tests.signals import wait_until

ROOT = Path(__file__).parents[2]

TWO_SERVICES = """
state_dir: state
shutdown_grace: 2
services:
  echo:
    type: echo
    listen: ["tcp:0:interface=127.0.0.1", "udp:0:interface=127.0.0.1"]
  daytime:
    type: daytime
    listen: ["tcp:0:interface=127.0.0.1"]
"""


class Manager:
    """The service manager's end of NOTIFY_SOCKET: a datagram socket the test reads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(str(path))
        self.socket.settimeout(10)

    def next(self) -> dict[str, str]:
        """The next notification, as its NAME=VALUE fields."""
        message = self.socket.recv(4096).decode()
        return dict(line.split("=", 1) for line in message.split("\n"))

    def next_without_watchdog(self) -> dict[str, str]:
        while (message := self.next()) == {"WATCHDOG": "1"}:
            pass
        return message


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[Manager]:
    manager = Manager(tmp_path / "notify")
    yield manager
    manager.socket.close()


def test_ready_reload_watchdog_stopping(start_netd: StartNetd, manager: Manager) -> None:
    netd = start_netd(
        TWO_SERVICES, env={"NOTIFY_SOCKET": str(manager.path), "WATCHDOG_USEC": "200000"}
    )
    assert manager.next() == {"READY": "1", "STATUS": "2 services, 3 listeners"}
    # One ping at once, then every 100 ms for as long as the reactor turns.
    started = time.monotonic()
    for _ in range(4):
        assert manager.next() == {"WATCHDOG": "1"}
    assert time.monotonic() - started < 5

    netd.signal(signal.SIGHUP)
    reloading = manager.next_without_watchdog()
    assert reloading.pop("RELOADING") == "1"
    usec = int(reloading.pop("MONOTONIC_USEC"))
    assert 0 < time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000 - usec < 10_000_000
    assert reloading == {"STATUS": f"reloading {netd.log_path.parent / 'netd.yaml'}"}
    assert manager.next_without_watchdog() == {"READY": "1", "STATUS": "2 services, 3 listeners"}

    assert netd.stop() == 0
    assert manager.next_without_watchdog() == {
        "STOPPING": "1",
        "STATUS": "stopping, up to 2s for open exchanges",
    }


def test_abstract_notify_socket_and_no_watchdog_by_default(start_netd: StartNetd) -> None:
    name = f"netd-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(10)
        netd = start_netd(TWO_SERVICES, env={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"READY=1\nSTATUS=2 services, 3 listeners"
        assert netd.stop() == 0
        assert sock.recv(4096).startswith(b"STOPPING=1\n")


def test_unreachable_notify_socket_is_logged_not_fatal(
    start_netd: StartNetd, tmp_path: Path
) -> None:
    netd = start_netd(TWO_SERVICES, env={"NOTIFY_SOCKET": str(tmp_path / "nobody")})
    with socket.create_connection(netd.address("echo"), timeout=5) as sock:
        sock.sendall(b"up")
        assert sock.recv(2) == b"up"
    assert netd.stop() == 0
    assert netd.output.count("cannot notify systemd") == 1


# Socket activation with systemd-socket-activate.

needs_socket_activate = pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None,
    reason="systemd-socket-activate is missing (Debian: apt-get install systemd)",
)


def free_port() -> int:
    """A loopback port free for both TCP and UDP just now."""
    while True:
        with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            tcp.bind(("127.0.0.1", 0))
            port: int = tcp.getsockname()[1]
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def socket_activated(
    workdir: Path, config: str, port: int, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """
    netd under systemd-socket-activate, handed a TCP and a UDP socket both named
    echo, as one socket unit with ListenStream= and ListenDatagram= would.

    systemd-socket-activate makes one kind of socket per run, so a second one,
    which passes the first one's socket on, adds the datagram socket.
    """
    workdir.mkdir()
    (workdir / "netd.yaml").write_text(config)
    address = f"127.0.0.1:{port}"
    # systemd-socket-activate passes on only PATH, HOME, TERM and the like, plus -E.
    passed = {**{k: os.environ[k] for k in ("PYTHONPATH",) if k in os.environ}, **(env or {})}
    command = [
        *("systemd-socket-activate", "-l", address, "--fdname=echo", "--"),
        *("systemd-socket-activate", "--datagram", "-l", address, "--fdname=echo"),
        *(f"--setenv={name}={value}" for name, value in passed.items()),
        "--",
        *twistd_command(),
        *("--nodaemon", "--pidfile=", "netd", "-c", "netd.yaml", "--ports-file", "ports.json"),
    ]
    with (workdir / "netd.log").open("wb") as log:
        return subprocess.Popen(command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT)


def connect_when_listening(process: subprocess.Popen[bytes], port: int) -> socket.socket:
    """Connect once systemd-socket-activate listens; the connection starts netd."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=10)
        except ConnectionRefusedError:
            assert process.poll() is None, "systemd-socket-activate exited"
            assert time.monotonic() < deadline, "systemd-socket-activate never listened"
            time.sleep(0.01)


def echo_over_both(port: int, connection: socket.socket | None = None) -> None:
    with connection or socket.create_connection(("127.0.0.1", port), timeout=10) as tcp:
        tcp.sendall(b"over tcp")
        assert tcp.recv(100) == b"over tcp"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(10)
        udp.sendto(b"over udp", ("127.0.0.1", port))
        assert udp.recvfrom(100) == (b"over udp", ("127.0.0.1", port))


ACTIVATED = """
shutdown_grace: 2
services:
  echo:
    type: echo
    listen: ["systemd:domain=INET:name=echo", "systemd-udp:domain=INET:name=echo"]
    idle_timeout: {idle}
"""


@needs_socket_activate
def test_socket_activation_tcp_and_udp_survives_reload(tmp_path: Path, manager: Manager) -> None:
    port = free_port()
    workdir = tmp_path / "run"
    process = socket_activated(
        workdir, ACTIVATED.format(idle=60), port, {"NOTIFY_SOCKET": str(manager.path)}
    )
    try:
        first = connect_when_listening(process, port)
        echo_over_both(port, first)  # the first connection waited in systemd's socket
        assert manager.next()["READY"] == "1"
        ports = json.loads((workdir / "ports.json").read_text())
        assert ports["pid"] == process.pid  # exec'd in place: LISTEN_PID is netd's
        assert ports["services"]["echo"]["listeners"] == [
            {
                "endpoint": "systemd:domain=INET:name=echo",
                "transport": "tcp",
                "host": "127.0.0.1",
                "port": port,
                "tls": False,
            },
            {
                "endpoint": "systemd-udp:domain=INET:name=echo",
                "transport": "udp",
                "host": "127.0.0.1",
                "port": port,
                "tls": False,
            },
        ]

        # A changed service restarts and adopts the same sockets again.
        (workdir / "netd.yaml").write_text(ACTIVATED.format(idle=30))
        process.send_signal(signal.SIGHUP)
        assert manager.next()["RELOADING"] == "1"
        assert manager.next()["READY"] == "1"
        echo_over_both(port)
        assert "restarted ['echo']" in (workdir / "netd.log").read_text()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(15)
    assert process.returncode == 0, (workdir / "netd.log").read_text()


@needs_socket_activate
def test_socket_activation_names_a_missing_socket(tmp_path: Path) -> None:
    config = """
services:
  dns:
    type: echo
    listen: ["systemd-udp:domain=INET:name=dns"]
"""
    port = free_port()
    process = socket_activated(tmp_path / "run", config, port)
    try:
        connect_when_listening(process, port).close()
        process.wait(15)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = (tmp_path / "run" / "netd.log").read_text()
    assert process.returncode == 1, output
    assert (
        "service dns: cannot listen on systemd-udp:domain=INET:name=dns: systemd passed no "
        "datagram INET socket named 'dns' (passed: echo (stream INET), echo (datagram INET))"
    ) in output
    assert "Traceback" not in output


def test_systemd_endpoints_outside_systemd_fail_clearly(start_netd: StartNetd) -> None:
    with pytest.raises(StartFailed) as failed:
        start_netd(
            'services:\n  echo:\n    type: echo\n    listen: ["systemd:domain=INET:name=echo"]\n'
        )
    assert failed.value.returncode == 1
    assert "systemd passed no stream INET socket named 'echo' (passed: none)" in (
        failed.value.output
    )


# The shipped units.


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is missing")
def test_units_verify(tmp_path: Path) -> None:
    """
    systemd-analyze verify checks that ExecStart= exists, and /usr/bin/twistd
    does not here: the copy verified runs this environment's twistd instead.
    """
    units = sorted(u for u in (ROOT / "systemd").iterdir() if u.suffix in (".service", ".socket"))
    assert {unit.name for unit in units} >= {"netd.service", "netd.socket"}
    [twistd] = twistd_command()
    for unit in units:
        text = unit.read_text()
        if unit.suffix == ".service":
            assert "ExecStart=/usr/bin/twistd --nodaemon --pidfile= netd " in text
            text = text.replace("ExecStart=/usr/bin/twistd ", f"ExecStart={twistd} ")
        (tmp_path / unit.name).write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", *(str(tmp_path / unit.name) for unit in units)],
        capture_output=True,
        text=True,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "notice"},
    )
    assert result.returncode == 0, result.stderr
    assert not [line for line in result.stderr.splitlines() if "netd" in line], result.stderr


def test_example_matches_the_socket_units() -> None:
    """The example adopts what the shipped socket units pass, and validates."""
    example = ROOT / "config/examples/systemd.yaml"
    text = example.read_text()
    for unit in (ROOT / "systemd").glob("*.socket"):
        lines = unit.read_text().splitlines()
        [name] = [line.split("=", 1)[1] for line in lines if line.startswith("FileDescriptorName=")]
        if any(line.startswith("ListenStream=127.0.0.1:") for line in lines):
            assert f'"systemd:domain=INET:name={name}"' in text
        if any(line.startswith("ListenDatagram=127.0.0.1:") for line in lines):
            assert f'"systemd-udp:domain=INET:name={name}"' in text
    assert "state_dir: /var/lib/netd" in text
    assert "StateDirectory=netd" in (ROOT / "systemd/netd.service").read_text()
    check = subprocess.run(
        [sys.executable, "-m", "netd.cli", "check", str(example)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr


@needs_socket_activate
def test_tls_on_an_inherited_socket(tmp_path: Path) -> None:
    """A systemd: stream socket with a TLS profile: TLS is put on top of the adopted socket."""
    config = """
state_dir: state
tls:
  lab: {self_signed: [localhost]}
services:
  echo:
    type: echo
    listen:
      - {endpoint: "systemd:domain=INET:name=echo", tls: lab}
      - "systemd-udp:domain=INET:name=echo"
"""
    port = free_port()
    workdir = tmp_path / "run"
    process = socket_activated(workdir, config, port)
    try:
        first = connect_when_listening(process, port)
        # netd creates the CA while starting; the first connection waits for it.
        wait_until((workdir / "ports.json").exists, "ports file", process=process)
        context = ssl.create_default_context(cafile=str(workdir / "state/tls/lab-ca.pem"))
        with context.wrap_socket(first, server_hostname="localhost") as tls:
            tls.sendall(b"sealed")
            assert tls.recv(100) == b"sealed"
        listeners = json.loads((workdir / "ports.json").read_text())["services"]["echo"]
        assert listeners["listeners"][0]["tls"] is True
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(15)
    assert process.returncode == 0, (workdir / "netd.log").read_text()


@needs_socket_activate
def test_socket_activation_without_names_is_read_by_index(tmp_path: Path) -> None:
    """A launcher that names no socket (no --fdname): sd_listen_fds(3) needs no names."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "netd.yaml").write_text(
        'services:\n  echo:\n    type: echo\n    listen: ["systemd:domain=INET:index=0"]\n'
    )
    port = free_port()
    passed = {k: os.environ[k] for k in ("PYTHONPATH",) if k in os.environ}
    command = [
        *("systemd-socket-activate", "-l", f"127.0.0.1:{port}"),
        *(f"--setenv={name}={value}" for name, value in passed.items()),
        "--",
        *twistd_command(),
        *("--nodaemon", "--pidfile=", "netd", "-c", "netd.yaml", "--ports-file", "ports.json"),
    ]
    with (workdir / "netd.log").open("wb") as log:
        process = subprocess.Popen(command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
    try:
        with connect_when_listening(process, port) as first:
            first.sendall(b"unnamed")
            assert first.recv(100) == b"unnamed", (workdir / "netd.log").read_text()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(15)
    assert process.returncode == 0, (workdir / "netd.log").read_text()
