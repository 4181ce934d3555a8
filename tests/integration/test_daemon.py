"""
The real daemon, started as `twistd -n netd`, driven by real clients.
"""

from __future__ import annotations

import contextlib
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

import httpx
import pytest

from netd.testing import NetdProcess, StartFailed, twistd_command
from tests.conftest import StartNetd
from tests.signals import wait_until

SIMPLE = """
state_dir: state
shutdown_grace: 3
tls:
  lab: {self_signed: [localhost, 127.0.0.1]}
services:
  echo:
    type: echo
    listen:
      - "tcp:0:interface=127.0.0.1"
      - "udp:0:interface=127.0.0.1"
      - {endpoint: "ssl:0:interface=127.0.0.1", tls: lab}
      - "unix:echo.sock"
  discard:
    type: discard
    listen: ["tcp:0:interface=127.0.0.1", "udp:0:interface=127.0.0.1"]
  chargen:
    type: chargen
    listen: ["tcp:0:interface=127.0.0.1", "udp:0:interface=127.0.0.1"]
  daytime:
    type: daytime
    listen: ["tcp:0:interface=127.0.0.1", "udp:0:interface=127.0.0.1"]
  qotd:
    type: qotd
    listen: ["tcp:0:interface=127.0.0.1", "udp:0:interface=127.0.0.1"]
    quotes: ["only one quote"]
"""


def connect(address: tuple[str, int]) -> socket.socket:
    return socket.create_connection(address, timeout=5)


def receive_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def receive_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"closed after {len(data)} of {size} bytes"
        data += chunk
    return data


def udp_exchange(address: tuple[str, int], payload: bytes) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.sendto(payload, address)
        data, source = sock.recvfrom(65536)
        assert source == address
        return data


@pytest.fixture
def netd(start_netd: StartNetd) -> NetdProcess:
    return start_netd(SIMPLE)


def test_ports_file_reports_real_ports(netd: NetdProcess) -> None:
    echo = netd.ports["services"]["echo"]
    assert echo["type"] == "echo"
    tcp, udp, tls, unix = echo["listeners"]
    assert tcp == {
        "endpoint": "tcp:0:interface=127.0.0.1",
        "transport": "tcp",
        "host": "127.0.0.1",
        "port": tcp["port"],
        "tls": False,
    }
    assert tcp["port"] > 0 and udp["port"] > 0 and tls["port"] > 0
    assert udp["transport"] == "udp" and tls["tls"] is True
    assert unix["transport"] == "unix" and unix["path"].endswith("echo.sock")
    assert netd.ports["pid"] == netd.process.pid
    for entry in (tcp, udp, tls):
        line = f"service echo (echo) listening on {entry['transport']} 127.0.0.1:{entry['port']}"
        assert line in netd.output


def test_echo_tcp_udp_tls_unix(netd: NetdProcess) -> None:
    with connect(netd.address("echo")) as sock:
        sock.sendall(b"hello\r\n")
        assert receive_exactly(sock, 7) == b"hello\r\n"
    assert udp_exchange(netd.address("echo", "udp"), b"datagram") == b"datagram"

    context = ssl.create_default_context(cafile=str(netd.log_path.parent / "state/tls/lab-ca.pem"))
    # An HTTP/2-capable client offers ALPN; echo negotiates nothing and must still answer.
    context.set_alpn_protocols(["h2", "http/1.1"])
    for server_name in ("localhost", "127.0.0.1"):
        with context.wrap_socket(
            connect(netd.address("echo", tls=True)), server_hostname=server_name
        ) as tls:
            tls.sendall(b"secret")
            assert receive_exactly(tls, 6) == b"secret"

    with socket.socket(socket.AF_UNIX) as unix:
        unix.settimeout(5)
        unix.connect(netd.listener("echo", "unix")["path"])
        unix.sendall(b"local")
        assert receive_exactly(unix, 5) == b"local"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl (Debian openssl)")
def test_openssl_s_client_verifies_the_generated_ca(netd: NetdProcess) -> None:
    host, port = netd.address("echo", tls=True)
    ca = netd.log_path.parent / "state/tls/lab-ca.pem"
    for check, name in (("-verify_hostname", "localhost"), ("-verify_ip", "127.0.0.1")):
        result = subprocess.run(
            [
                "openssl",
                "s_client",
                "-connect",
                f"{host}:{port}",
                "-CAfile",
                str(ca),
                check,
                name,
                "-verify_return_error",
                "-servername",
                "localhost",
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=20,
        )
        assert result.returncode == 0, result.stderr
        assert b"Verify return code: 0 (ok)" in result.stdout


def test_discard_chargen_daytime_qotd(netd: NetdProcess) -> None:
    with connect(netd.address("discard")) as sock:
        sock.sendall(b"x" * 100_000)
        sock.shutdown(socket.SHUT_WR)
        assert receive_all(sock) == b""
    assert_no_reply(netd.address("discard", "udp"))

    with connect(netd.address("chargen")) as sock:
        lines = receive_exactly(sock, 74 * 200).split(b"\r\n")[:-1]
    assert all(len(line) == 72 for line in lines)
    assert lines[0] == bytes(range(32, 104)) and lines[1] == bytes(range(33, 105))
    assert lines[95] == lines[0]
    datagram = udp_exchange(netd.address("chargen", "udp"), b"")
    assert 0 < len(datagram) <= 512

    with connect(netd.address("daytime")) as sock:
        daytime = receive_all(sock)
    assert daytime.endswith(b"-UTC\r\n") and str(time.gmtime().tm_year).encode() in daytime
    assert udp_exchange(netd.address("daytime", "udp"), b"?").endswith(b"-UTC\r\n")

    with connect(netd.address("qotd")) as sock:
        assert receive_all(sock) == b"only one quote\r\n"
    assert udp_exchange(netd.address("qotd", "udp"), b"") == b"only one quote\r\n"


def assert_no_reply(address: tuple[str, int]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.3)
        sock.sendto(b"nothing comes back", address)
        with pytest.raises(TimeoutError):
            sock.recvfrom(100)


def test_bad_input_leaves_every_listener_serving(netd: NetdProcess) -> None:
    """Garbage, a 1 MiB line and half-open connections on every TCP listener."""
    half_open = []
    for service in ("echo", "discard", "chargen", "daytime", "qotd"):
        address = netd.address(service)
        with connect(address) as sock:
            sock.sendall(bytes(range(256)) * 16 + b"\xff\xfe\x00\r\n")
        # One-shot services close before reading it all: that is fine.
        with connect(address) as sock, contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(b"A" * (1 << 20) + b"\r\n")
        sock = connect(address)
        sock.shutdown(socket.SHUT_WR)
        half_open.append(sock)
        udp_address = netd.address(service, "udp")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.sendto(b"\x00" * 60000, udp_address)
    # A client that sends and never reads: the echo stops reading instead of buffering.
    stuffed = connect(netd.address("echo"))
    stuffed.setblocking(False)
    sent = 0
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            sent += stuffed.send(b"z" * 65536)
        except BlockingIOError:
            break
    assert sent < 64 << 20, "netd kept reading from a client that never reads"

    with connect(netd.address("echo")) as sock:
        sock.sendall(b"still here")
        assert receive_exactly(sock, 10) == b"still here"
    assert udp_exchange(netd.address("echo", "udp"), b"ok") == b"ok"
    for sock in [*half_open, stuffed]:
        sock.close()
    assert netd.process.poll() is None


def test_sigterm_exits_zero_and_removes_ports_file(start_netd: StartNetd) -> None:
    netd = start_netd(SIMPLE)
    ports_file = netd.log_path.parent / "ports.json"
    open_connection = connect(netd.address("echo"))
    # Accepted, not only queued: a connection still in the listen backlog when
    # the listener closes is reset by the kernel, whatever netd does.
    open_connection.sendall(b"x")
    assert receive_exactly(open_connection, 1) == b"x"
    assert netd.stop() == 0
    assert not ports_file.exists()
    assert receive_all(open_connection) == b""  # closed by netd, not left hanging
    assert "netd stopped" in netd.output
    with pytest.raises(ConnectionRefusedError):
        connect(netd.address("echo"))


@pytest.fixture
def taken() -> Iterator[int]:
    """A loopback TCP port another socket listens on for the test."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_bind_failure_stops_everything(start_netd: StartNetd, taken: int) -> None:
    port = taken
    config = f"""
services:
  first:
    type: echo
    listen: ["tcp:0:interface=127.0.0.1", "udp:0:interface=127.0.0.1"]
  second:
    type: echo
    listen: ["tcp:{port}:interface=127.0.0.1"]
"""
    with pytest.raises(StartFailed) as failed:
        start_netd(config)
    assert failed.value.returncode == 1
    output = failed.value.output
    assert f"service second: cannot listen on tcp:{port}:interface=127.0.0.1" in output
    assert "Address already in use" in output
    assert "Traceback" not in output


def test_a_services_later_listener_that_cannot_bind_stops_everything(
    start_netd: StartNetd, taken: int
) -> None:
    port = taken
    # UDP binds the number TCP cannot: the bound listener is let go (on the
    # reactor's next turn), and then the start fails, once the reactor runs.
    config = f"""
services:
  both:
    type: echo
    listen: ["udp:{port}:interface=127.0.0.1", "tcp:{port}:interface=127.0.0.1"]
"""
    with pytest.raises(StartFailed) as failed:
        start_netd(config)
    assert f"service both: cannot listen on tcp:{port}:interface=127.0.0.1" in failed.value.output
    assert failed.value.returncode == 1


def test_config_errors_all_at_once_without_traceback(start_netd: StartNetd) -> None:
    config = """
services:
  web:
    type: echo
    listen: ["tcp:notaport"]
    colour: blue
  mail:
    type: nosuch
    listen: ["tcp:0"]
"""
    with pytest.raises(StartFailed) as failed:
        start_netd(config)
    output = failed.value.output
    assert "netd.yaml:5:14: services.web.listen[0]: bad endpoint 'tcp:notaport'" in output
    assert "netd.yaml:6:5: services.web.colour: unknown key" in output
    assert "netd.yaml:8:11: services.mail.type: unknown service type 'nosuch'" in output
    assert "Traceback" not in output
    assert failed.value.returncode == 1


def test_json_log_format(start_netd: StartNetd) -> None:
    netd = start_netd("log: {format: json, events: true}\n" + SIMPLE)
    with connect(netd.address("qotd")) as sock:
        receive_all(sock)
    netd.stop()
    records = [json.loads(line) for line in netd.output.splitlines() if line.strip()]
    assert any(
        r.get("what") == "service echo (echo)" and r.get("log_namespace") == "netd" for r in records
    )


def test_max_connections_and_idle_timeout(start_netd: StartNetd) -> None:
    netd = start_netd(
        """
services:
  echo:
    type: echo
    listen: ["tcp:0:interface=127.0.0.1"]
    max_connections: 2
    idle_timeout: 0.4
"""
    )
    address = netd.address("echo")
    first, second = connect(address), connect(address)
    for sock in (first, second):
        sock.sendall(b"x")
        assert receive_exactly(sock, 1) == b"x"
    with connect(address) as third:
        assert receive_all(third) == b""  # refused: closed at once
    # Both idle: closed within idle_timeout (+ one sweep), freeing their slots.
    started = time.monotonic()
    assert receive_all(first) == b"" and receive_all(second) == b""
    assert time.monotonic() - started < 3
    with connect(address) as fourth:
        fourth.sendall(b"y")
        assert receive_exactly(fourth, 1) == b"y"


def test_netd_check_prints_plan_and_fails_on_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(SIMPLE)
    netd = [sys.executable, "-m", "netd.cli"]
    result = subprocess.run([*netd, "check", str(good)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "echo (echo)" in result.stdout and "ssl:0:interface=127.0.0.1 [tls=lab]" in result.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("services:\n  x:\n    type: echo\n")
    result = subprocess.run([*netd, "check", str(bad)], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip() == f"{bad}:3:5: services.x: missing required key 'listen'"


def test_netd_run_foreground(tmp_path: Path) -> None:
    config = tmp_path / "netd.yaml"
    config.write_text(SIMPLE)
    ports = tmp_path / "ports.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "netd.cli", "run", str(config), "--ports-file", str(ports)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(ports.exists, "ports file", process=process)
        echo = json.loads(ports.read_text())["services"]["echo"]["listeners"][0]
        with connect((echo["host"], echo["port"])) as sock:
            sock.sendall(b"run")
            assert receive_exactly(sock, 3) == b"run"
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=15)
    assert process.returncode == 0
    assert b"service echo (echo) listening on tcp 127.0.0.1:" in output


def test_startup_under_one_second(tmp_path: Path) -> None:
    config = Path(__file__).parents[2] / "config" / "netd.yaml"
    netd = NetdProcess.start(_on_port_zero(config, tmp_path), tmp_path / "run")
    # The CPU the daemon spent until ready, not the wall time: on a machine whose
    # two cores other tests share, the wall time says how busy they were.
    fields = Path(f"/proc/{netd.process.pid}/stat").read_text().rpartition(")")[2].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    netd.stop()
    # 0.74 s on the quiet 2-core machine; contention for its caches inflates CPU time too.
    assert cpu < 1.5, cpu


def _on_port_zero(config: Path, tmp_path: Path) -> str:
    import re

    text = config.read_text()
    text = re.sub(r"(tcp|udp|ssl):\d+", r"\1:0", text)
    text = text.replace("root: www", f"root: {config.parent / 'www'}")
    return text.replace("state_dir: ../state", f"state_dir: {tmp_path / 'state'}")


def test_twistd_lists_the_plugin() -> None:
    result = subprocess.run([*twistd_command(), "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert any(line.split()[:1] == ["netd"] for line in result.stdout.splitlines())


def test_a_service_that_cannot_start_is_named_without_traceback(start_netd: StartNetd) -> None:
    unreadable = "/proc/self/mem"  # a file, but reading it from the start fails (EIO)
    config = f"""
services:
  echo:
    type: echo
    listen: ["tcp:0:interface=127.0.0.1"]
  web:
    type: http
    listen: ["tcp:0:interface=127.0.0.1"]
    routes:
      - {{path: /x, body_file: {unreadable}}}
"""
    with pytest.raises(StartFailed) as failed:
        start_netd(config)
    assert failed.value.returncode == 1
    assert "services.web: cannot start: Input/output error" in failed.value.output
    assert "Traceback" not in failed.value.output


def test_unwritable_ports_file_folder_fails_at_once(tmp_path: Path) -> None:
    config = tmp_path / "netd.yaml"
    config.write_text(SIMPLE)
    result = subprocess.run(
        [
            *twistd_command(),
            *("-n", "--pidfile=", "netd", "-c", str(config)),
            *("--ports-file", str(tmp_path / "no" / "such" / "ports.json")),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "--ports-file" in result.stderr and "cannot write" in result.stderr


def test_daemonized_twistd_reports_start_and_failure(tmp_path: Path) -> None:
    """Without -n the parent waits for the child's word: 0 when serving, the error if not."""
    config = tmp_path / "netd.yaml"
    config.write_text(SIMPLE)
    command = [*twistd_command(), "--pidfile=netd.pid", "--logfile=netd.log", "netd"]
    started = subprocess.run(
        [*command, "-c", str(config), "--ports-file", "ports.json"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert started.returncode == 0, started.stderr
    ports = json.loads((tmp_path / "ports.json").read_text())
    pid = int((tmp_path / "netd.pid").read_text())
    try:
        echo = ports["services"]["echo"]["listeners"][0]
        with connect((echo["host"], echo["port"])) as sock:
            sock.sendall(b"daemon")
            assert receive_exactly(sock, 6) == b"daemon"
    finally:
        os.kill(pid, signal.SIGTERM)

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    config.write_text(
        "services:\n  e: {type: echo, listen: "
        f'["tcp:{taken.getsockname()[1]}:interface=127.0.0.1"]}}\n'
    )
    failed = subprocess.run(
        [*command, "-c", str(config)], capture_output=True, text=True, timeout=30, cwd=tmp_path
    )
    taken.close()
    assert failed.returncode == 1
    # twistd relays the first 100 bytes of the error; the log has all of it.
    assert "An error has occurred: b'netd.listeners.StartupError: " in failed.stderr
    assert "service e: cannot listen on" in (tmp_path / "netd.log").read_text()


def _logging_to(tmp_path: Path, config: str, logged: Path) -> subprocess.Popen[bytes]:
    """twistd netd on C{config}, logging to the file C{logged}; ready when this returns."""
    (tmp_path / "netd.yaml").write_text(config)
    process = subprocess.Popen(
        [
            *twistd_command(),
            "-n",
            "--pidfile=",
            f"--logfile={logged}",
            "netd",
            "-c",
            str(tmp_path / "netd.yaml"),
            "--ports-file",
            str(tmp_path / "ports.json"),
        ],
        cwd=tmp_path,
    )
    wait_until((tmp_path / "ports.json").exists, "ports file", process=process)
    return process


def test_sigusr1_rotates_the_log_file(tmp_path: Path) -> None:
    logged = tmp_path / "rotated.log"
    process = _logging_to(tmp_path, SIMPLE, logged)
    try:
        process.send_signal(signal.SIGUSR1)
        wait_until((tmp_path / "rotated.log.1").exists, "log rotated on SIGUSR1", timeout=10)
        assert "listening on" in (tmp_path / "rotated.log.1").read_text()
        # As logrotate does it: the file moved away, then SIGUSR1 to open a new one.
        logged.rename(tmp_path / "moved.log")
        process.send_signal(signal.SIGUSR1)
        wait_until(logged.exists, "log reopened on SIGUSR1", timeout=10)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
    assert "netd stopped" in logged.read_text()
    assert "netd stopped" not in (tmp_path / "moved.log").read_text()
    assert not (tmp_path / "rotated.log.2").exists()


def test_the_log_file_does_not_rotate_by_size(tmp_path: Path) -> None:
    """Twisted's LogFile would start another file every megabyte; netd's waits for SIGUSR1."""
    config = (
        "services:\n  web:\n    type: http\n    listen: ['tcp:0:interface=127.0.0.1']\n"
        "    access_log: true\n    routes: [{path: /, body: hi}]\n"
    )
    logged = tmp_path / "netd.log"
    process = _logging_to(tmp_path, config, logged)
    try:
        port = json.loads((tmp_path / "ports.json").read_text())["services"]["web"]["listeners"]
        url = f"http://127.0.0.1:{port[0]['port']}/?{'x' * 4000}"
        with httpx.Client(timeout=10) as client:
            for _ in range(400):  # 400 access lines of 4 KB: 1.6 MB
                assert client.get(url).status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
    assert logged.stat().st_size > 1_500_000
    assert not (tmp_path / "netd.log.1").exists()


def test_reload_applies_a_changed_log_section(start_netd: StartNetd) -> None:
    echo_only = "services:\n  echo: {type: echo, listen: ['tcp:0:interface=127.0.0.1']}\n"
    netd = start_netd(echo_only)
    netd.reload("log: {format: json, events: true}\n" + echo_only)
    with socket.create_connection(netd.address("echo"), timeout=5) as sock:
        sock.sendall(b"x")
        assert sock.recv(1) == b"x"
    netd.wait_for("echo", "connection.closed", timeout=10)
    netd.reload("log: {format: text, level: error}\n" + echo_only)
    netd.stop()
    lines = netd.output.splitlines()
    as_json = [json.loads(line) for line in lines if line.startswith("{")]
    assert any(event.get("event_type") == "connection.closed" for event in as_json), lines
    # After the second reload nothing under error is written: no "netd stopping" line.
    assert "netd stopping" not in netd.output


def test_an_smtp_spool_that_cannot_be_made_stops_start_up(
    start_netd: StartNetd, tmp_path: Path
) -> None:
    """It would answer 220 and then keep no mail: refused at start, as a busy port is."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "smtp").write_text("a file where the spools' folder goes")
    config = f"""
state_dir: {state}
services:
  mail:
    type: smtp
    listen: ["tcp:0:interface=127.0.0.1"]
"""
    with pytest.raises(StartFailed) as failed:
        start_netd(config)
    assert failed.value.returncode == 1
    assert "services.mail: cannot read its spool" in failed.value.output
    assert "Not a directory" in failed.value.output
