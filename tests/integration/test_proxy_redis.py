"""
The proxy kind as Toxiproxy's users run it: between a real Redis server and
Redis's own clients (Debian's redis-cli and redis-benchmark), with each toxic
added through Toxiproxy's API by Toxiproxy's Python client, and the outcome
read from the client: its bytes, its errors, its timings.  Last, redis-cli over
TLS to a proxy that terminates it, in front of redis-server's own TLS port.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from toxiproxy import Toxiproxy
from toxiproxy.proxy import Proxy

from netd.testing import NetdProcess
from tests.clients import toxiproxy_client
from tests.conftest import fixed_port
from tests.maps import lab_map
from tests.signals import wait_until

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None or shutil.which("redis-cli") is None,
    reason="redis is not installed (apt-get install redis-server redis-tools)",
)

LOCAL = "127.0.0.1"


class Redis:
    """A private redis-server on a port of its own, nothing saved to disk."""

    def __init__(self, workdir: Path, port: int) -> None:
        self.workdir = workdir
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.workdir / f"redis-{time.monotonic_ns()}.log"
        self.process = subprocess.Popen(
            [
                *("redis-server", "--port", str(self.port), "--bind", LOCAL),
                *("--save", "", "--appendonly", "no", "--daemonize", "no"),
                *("--dir", str(self.workdir), "--logfile", str(log)),
            ]
        )
        wait_until(
            lambda: log.exists() and "Ready to accept connections" in log.read_text(),
            "redis-server ready",
        )

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Redis]:
    server = Redis(tmp_path_factory.mktemp("redis"), fixed_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def netd(tmp_path_factory: pytest.TempPathFactory, redis: Redis) -> Iterator[NetdProcess]:
    process = NetdProcess.start(
        f"""
services:
  redis:
    type: proxy
    listen: ["tcp:0:interface={LOCAL}"]
    upstream: {LOCAL}:{redis.port}
""",
        tmp_path_factory.mktemp("netd"),
    )
    yield process
    process.stop()


@pytest.fixture
def toxiproxy(netd: NetdProcess) -> Iterator[Toxiproxy]:
    """Toxiproxy's client on netd's admin listener; its /reset after each test."""
    with toxiproxy_client(netd) as server:
        yield server
        server.reset()


@pytest.fixture
def proxy(toxiproxy: Toxiproxy) -> Proxy:
    found: Proxy = toxiproxy.get_proxy("redis")
    return found


def cli(
    port: int, *arguments: str, stdin: bytes | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["redis-cli", "-h", LOCAL, "-p", str(port), *arguments],
        input=stdin,
        capture_output=True,
        timeout=timeout,
    )


def timed_cli(port: int, *arguments: str) -> tuple[subprocess.CompletedProcess[bytes], float]:
    started = time.monotonic()
    done = cli(port, *arguments)
    return done, time.monotonic() - started


def proxy_port(netd: NetdProcess) -> int:
    return netd.address("redis")[1]


def stored(port: int, key: str, size: int) -> bytes:
    """A value of C{size} bytes with every byte value in it, SET as C{key} through C{port}."""
    value = os.urandom(size)
    assert cli(port, "-x", "SET", key, stdin=value).stdout == b"OK\n"
    return value


def test_commands_and_a_10_mb_value_pass_byte_exact(netd: NetdProcess, redis: Redis) -> None:
    port = proxy_port(netd)
    assert cli(port, "SET", "greeting", "hello proxy").stdout == b"OK\n"
    assert cli(redis.port, "GET", "greeting").stdout == b"hello proxy\n"
    value = stored(port, "big", 10_000_000)
    assert cli(port, "GET", "big").stdout == value + b"\n"
    assert cli(redis.port, "STRLEN", "big").stdout == b"10000000\n"


@pytest.mark.skipif(shutil.which("redis-benchmark") is None, reason="redis-benchmark missing")
def test_redis_benchmark_runs_without_an_error(netd: NetdProcess) -> None:
    done = subprocess.run(
        [
            *("redis-benchmark", "-h", LOCAL, "-p", str(proxy_port(netd))),
            *(
                "-n",
                "2000",
                "-c",
                "20",
                "-P",
                "4",
                "-q",
                "-t",
                "ping,set,get,incr,lpush,lrange_100",
            ),
        ],
        capture_output=True,
        timeout=60,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    tests = [
        line.split(":")[0] for line in done.stdout.splitlines() if "requests per second" in line
    ]
    assert tests == [
        *("PING_INLINE", "PING_MBULK", "SET", "GET", "INCR", "LPUSH"),
        *("LPUSH (needed to benchmark LRANGE)", "LRANGE_100 (first 100 elements)"),
    ], done.stdout
    assert "rror" not in done.stdout + done.stderr


def latencies(port: int) -> tuple[float, float, int]:
    """redis-cli --latency for about a second: min and max (ms), and how many PINGs."""
    done = cli(port, "--latency", "--raw", "-i", "1")
    low, high, _, count = done.stdout.split()
    return float(low), float(high), int(count)


def test_latency_and_its_jitter_show_in_redis_cli_latency(netd: NetdProcess, proxy: Proxy) -> None:
    port = proxy_port(netd)
    assert latencies(port)[1] < 100
    proxy.add_toxic(type="latency", attributes={"latency": 200})
    low, high, count = latencies(port)
    assert 195 <= low <= high < 400 and count >= 2, (low, high, count)
    proxy.destroy_toxic("latency_downstream")

    proxy.add_toxic(type="latency", stream="upstream", attributes={"latency": 150, "jitter": 100})
    low, high, count = latencies(port)
    assert 45 <= low <= high < 450 and count >= 2, (low, high, count)


def test_bandwidth_paces_a_1_mb_reply(netd: NetdProcess, proxy: Proxy) -> None:
    port = proxy_port(netd)
    value = stored(port, "paced", 1_000_000)
    proxy.add_toxic(type="bandwidth", attributes={"rate": 1000})  # KB/s: a second for 1 MB
    done, elapsed = timed_cli(port, "GET", "paced")
    assert done.stdout == value + b"\n"
    assert 0.85 <= elapsed < 3, elapsed


def test_slow_close_holds_the_close_after_quit(
    netd: NetdProcess, proxy: Proxy, redis: Redis
) -> None:
    proxy.add_toxic(type="slow_close", attributes={"delay": 800})
    with socket.create_connection(netd.address("redis"), timeout=10) as sock:
        sock.sendall(b"QUIT\r\n")
        started = time.monotonic()
        assert sock.recv(100) == b"+OK\r\n"
        assert sock.recv(100) == b""
        elapsed = time.monotonic() - started
    assert 0.75 <= elapsed < 3, elapsed


def test_timeout_holds_the_client_then_closes(netd: NetdProcess, proxy: Proxy) -> None:
    proxy.add_toxic(type="timeout", attributes={"timeout": 800})
    done, elapsed = timed_cli(proxy_port(netd), "PING")
    assert done.stdout == b"" and b"Server closed the connection" in done.stderr, done
    assert 0.75 <= elapsed < 3, elapsed


def test_reset_peer_resets_the_client(netd: NetdProcess, proxy: Proxy) -> None:
    proxy.add_toxic(type="reset_peer", attributes={"timeout": 300})
    done, elapsed = timed_cli(proxy_port(netd), "PING")
    assert done.stdout == b"" and b"Connection reset by peer" in done.stderr, done
    assert 0.25 <= elapsed < 3, elapsed


def test_sliced_replies_arrive_whole(netd: NetdProcess, proxy: Proxy) -> None:
    port = proxy_port(netd)
    value = stored(port, "sliced", 3000)
    proxy.add_toxic(
        type="slicer", attributes={"average_size": 10, "size_variation": 5, "delay": 1000}
    )
    done, elapsed = timed_cli(port, "GET", "sliced")
    assert done.stdout == value + b"\n"
    assert elapsed >= 0.2, elapsed  # over 256 pieces, a millisecond apart
    assert cli(port, "--no-raw", "LRANGE", "none", "0", "-1").stdout == b"(empty array)\n"


def test_limit_data_closes_after_its_bytes(netd: NetdProcess, proxy: Proxy) -> None:
    port = proxy_port(netd)
    stored(port, "limited", 5000)
    proxy.add_toxic(type="limit_data", attributes={"bytes": 1000})
    assert cli(port, "PING").stdout == b"PONG\n"  # 7 bytes: under the limit
    done = cli(port, "GET", "limited")
    assert done.stdout == b"" and b"Server closed the connection" in done.stderr, done
    with socket.create_connection(netd.address("redis"), timeout=10) as sock:
        sock.sendall(b"GET limited\r\n")
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert len(received) == 1000 and received.startswith(b"$5000\r\n")


def test_a_disabled_proxy_refuses_redis_cli_until_enabled(netd: NetdProcess, proxy: Proxy) -> None:
    port = proxy_port(netd)
    proxy.disable()
    netd.wait_for("redis", "proxy.disabled")
    done = cli(port, "PING")
    assert done.stdout == b"" and b"Connection refused" in done.stderr, done
    proxy.enable()
    netd.wait_for("redis", "proxy.enabled")
    assert cli(port, "PING").stdout == b"PONG\n"


def test_the_upstream_down_is_a_clean_error_and_its_return_is_seen(
    netd: NetdProcess, toxiproxy: Toxiproxy, tmp_path: Path
) -> None:
    down = Redis(tmp_path, fixed_port())
    down.start()
    made = toxiproxy.create(upstream=f"{LOCAL}:{down.port}", name="flaky")
    port = int(made.listen.rpartition(":")[2])
    try:
        assert cli(port, "PING").stdout == b"PONG\n"
        down.stop()
        done = cli(port, "PING")
        assert done.stdout == b"" and b"Server closed the connection" in done.stderr, done
        netd.wait_for("flaky", "proxy.upstream_failed")
        down.start()
        assert cli(port, "PING").stdout == b"PONG\n"
    finally:
        made.destroy()
        down.stop()


def test_redis_cli_over_tls_through_a_proxy_that_terminates_and_originates_it(
    tmp_path: Path,
) -> None:
    tls_port = fixed_port()
    state = tmp_path / "state"
    ca = state / "tls" / "lab-ca.pem"
    served = lab_map(
        f"""
  secure:
    type: proxy
    listen: [{{endpoint: "ssl:0:interface={LOCAL}", tls: lab}}]
    upstream: {LOCAL}:{tls_port}
""",
        state,
    )
    (tmp_path / "netd").mkdir()
    netd = NetdProcess.start(served, tmp_path / "netd")
    log = tmp_path / "redis.log"
    server = subprocess.Popen(
        [
            *("redis-server", "--port", "0", "--tls-port", str(tls_port), "--bind", LOCAL),
            *("--tls-cert-file", str(state / "tls" / "lab.pem")),
            *("--tls-key-file", str(state / "tls" / "lab.key"), "--tls-auth-clients", "no"),
            *("--save", "", "--appendonly", "no", "--dir", str(tmp_path), "--logfile", str(log)),
        ]
    )
    try:
        # upstream_tls names the CA netd minted at its start: only a reload can name it.
        upstream_tls = f"    upstream_tls: {{server_name: localhost, ca: {ca}}}\n"
        assert netd.reload(served + upstream_tls)["restarted"] == ["secure"]
        wait_until(
            lambda: log.exists() and "Ready to accept connections" in log.read_text(),
            "redis-server ready",
        )
        port = netd.address("secure", tls=True)[1]
        tls = ("--tls", "--cacert", str(ca))
        assert cli(port, *tls, "PING").stdout == b"PONG\n"
        value = os.urandom(5_000_000)
        assert cli(port, *tls, "-x", "SET", "k", stdin=value).stdout == b"OK\n"
        assert cli(port, *tls, "GET", "k").stdout == value + b"\n"
        assert cli(port, *tls, "QUIT").stdout == b"OK\n"
    finally:
        server.terminate()
        server.wait(10)
        netd.stop()
