"""
What every probe family shares: the result row and its table, the budget that
bounds a run, the daemon under test seen through /proc and its log, the site
it serves, loopback upstreams it talks to, and small socket helpers.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import dns.message
import dns.rrset
import yaml

from netd.testing import NetdProcess

LOCAL = "127.0.0.1"
ADMIN_TOKEN = "stress-token"
SECRET = b"secret outside every root\n"
BIG_FILE_SIZE = 1 << 20


@dataclass
class Row:
    """One line of the table: what was tried, how often, what came of it."""

    family: str
    case: str
    trials: int
    result: str
    fd_delta: int | None = None
    rss_delta_kib: int | None = None
    tracebacks: int | None = None
    # ok | note (reported, within netd's contract) | DEFECT | ERROR (the probe broke)
    verdict: str = "ok"
    # Descriptors netd keeps open by design after the probe (a proxy pool's idle
    # upstream connections), not counted against it as leaked.
    fd_kept: int = 0


COLUMNS = ("family", "case", "trials", "result", "fd +", "RSS + KiB", "tracebacks", "verdict")


def _cells(row: Row) -> list[str]:
    def optional(value: int | None) -> str:
        return "-" if value is None else str(value)

    return [
        row.family,
        row.case,
        str(row.trials),
        row.result,
        optional(row.fd_delta),
        optional(row.rss_delta_kib),
        optional(row.tracebacks),
        row.verdict,
    ]


def render_table(rows: list[Row]) -> str:
    """A Markdown table (it reads as plain text too, and pastes into the README)."""
    cells = [list(COLUMNS), *(_cells(row) for row in rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]

    def line(values: list[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), rule, *(line(c) for c in cells[1:])])


def rows_as_json(rows: list[Row]) -> str:
    return json.dumps([asdict(row) for row in rows], indent=2)


@dataclass
class Budget:
    """How much one run may do: trial counts and time caps, smaller with --quick."""

    quick: bool
    seed: int

    def count(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def seconds(self, full: float, quick: float) -> float:
        return quick if self.quick else full


class Daemon:
    """A running netd as the probes see it: its pid's /proc entries and its log."""

    def __init__(self, netd: NetdProcess) -> None:
        self.netd = netd
        self._log_seen = 0

    @property
    def pid(self) -> int:
        return self.netd.process.pid

    def alive(self) -> bool:
        return self.netd.process.poll() is None

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise LookupError("no VmRSS")

    def settled_fd_count(self, baseline: int, timeout: float = 5.0) -> int:
        """The fd count once closed connections are let go (or after C{timeout})."""
        deadline = time.monotonic() + timeout
        count = self.fd_count()
        while count > baseline and time.monotonic() < deadline:
            time.sleep(0.05)
            count = self.fd_count()
        return count

    def new_tracebacks(self) -> int:
        """Log records since the last call that are critical or carry a traceback."""
        text = self.netd.output
        fresh, self._log_seen = text[self._log_seen :], len(text)
        return bad_records(fresh)


def bad_records(log: str) -> int:
    """
    How many records of a text log are critical or carry a traceback: a record is
    a line and the indented lines after it, so a critical record with its
    traceback counts once.
    """
    count = 0
    counted = False  # the record being read is counted already
    for line in log.splitlines():
        if line and not line[0].isspace():
            counted = False
        if not counted and ("#critical]" in line or "Traceback (most recent call last)" in line):
            counted = True
            count += 1
    return count


class Sampler:
    """fd, RSS and traceback deltas of a daemon across one probe."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        daemon.new_tracebacks()
        self.fds = daemon.fd_count()
        self.rss = daemon.rss_kib()

    def finish(self, row: Row) -> Row:
        if not self.daemon.alive():
            row.verdict = "DEFECT"
            row.result += "; daemon died"
            return row
        row.fd_delta = self.daemon.settled_fd_count(self.fds) - self.fds
        row.rss_delta_kib = self.daemon.rss_kib() - self.rss
        row.tracebacks = self.daemon.new_tracebacks()
        if row.tracebacks or row.fd_delta - row.fd_kept > 2:
            row.verdict = "DEFECT"
        return row


# -- the site one daemon serves -----------------------------------------------


def make_site(base: Path) -> None:
    """Static files, FTP roots with links out of them, and a secret outside them all."""
    for name in ("www", "ftp/pub", "ftp/alice"):
        (base / name).mkdir(parents=True, exist_ok=True)
    (base / "secret.txt").write_bytes(SECRET)
    (base / "www" / "index.html").write_bytes(b"<p>stress</p>\n")
    (base / "www" / "big.bin").write_bytes(bytes(range(256)) * (BIG_FILE_SIZE // 256))
    (base / "ftp" / "pub" / "hello.txt").write_bytes(b"hello\n")
    for link, target in (("link_out", base / "secret.txt"), ("dir_out", base)):
        path = base / "ftp" / "alice" / link
        if not path.is_symlink():
            path.symlink_to(target)


def full_map(base: Path, http_upstream: int, dns_upstream: int) -> dict[str, Any]:
    """Every kind on loopback port 0, with limits short enough to watch them act."""
    tcp = f"tcp:0:interface={LOCAL}"
    return {
        "state_dir": str(base / "state"),
        "shutdown_grace": 2,
        "tls": {"lab": {"self_signed": ["localhost", LOCAL]}},
        # The same 3 s deadlines as the services below, so that the slow-client
        # probes see every kind cut within their 10 s.
        "admin": {
            "listen": [tcp],
            "token": ADMIN_TOKEN,
            "header_timeout": 3,
            "body_timeout": 3,
        },
        "services": {
            "echo": {"type": "echo", "listen": [tcp], "idle_timeout": 20},
            "chargen": {"type": "chargen", "listen": [tcp], "idle_timeout": 20},
            "daytime": {"type": "daytime", "listen": [tcp]},
            "chat": {
                "type": "chat",
                "listen": [tcp, {"endpoint": tcp, "protocol": "line"}],
                "rooms": ["lobby"],
                "flood": {"messages": 1000, "per_seconds": 1},
                "idle_timeout": 20,
            },
            "web": {
                "type": "http",
                "listen": [tcp, {"endpoint": f"ssl:0:interface={LOCAL}", "tls": "lab"}],
                "root": str(base / "www"),
                "routes": [
                    {"path": "/health", "body": "ok\n", "headers": {"Content-Type": "text/plain"}},
                    {"path": "/proxy/", "proxy": f"http://{LOCAL}:{http_upstream}/", "timeout": 5},
                ],
                "limits": {"header_timeout": 3, "body_timeout": 3, "keepalive_timeout": 5},
                "idle_timeout": 20,
            },
            "files": {
                "type": "ftp",
                "listen": [tcp],
                "root": str(base / "ftp" / "pub"),
                "anonymous": "read",
                "users": {
                    "alice": {
                        "password": "wonder",
                        "home": str(base / "ftp" / "alice"),
                        "write": True,
                    }
                },
                "login_delay": 0,
                "max_connections_per_client": 1000,
                "data_timeout": 2,
                "line_timeout": 3,
                "idle_timeout": 5,
            },
            "mail": {
                "type": "smtp",
                "listen": [tcp],
                "hostname": "mx.netd.test",
                "max_connections_per_client": 1000,
                "command_timeout": 3,
                "data_timeout": 3,
                "relay": {"allow_from": [], "domains": ["netd.test"]},
                "delivery": {"mode": "capture"},
            },
            "dns": {
                "type": "dns",
                "listen": [f"udp:0:interface={LOCAL}", tcp],
                # DNS over HTTPS on its own HTTP/1.1 reader and HTTP/2 framing.
                "doh": [{"endpoint": f"ssl:0:interface={LOCAL}", "tls": "lab"}],
                "records": {"www.netd.test": {"A": ["127.0.0.1"]}},
                "forward": [f"{LOCAL}:{dns_upstream}"],
                "idle_timeout": 5,
            },
        },
    }


# -- loopback upstreams --------------------------------------------------------


class HttpUpstream:
    """The proxy route's upstream: answers every GET with the path it was asked."""

    def __init__(self) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                body = b"upstream " + self.path.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # clients that reset (the fuzz does) are no news here

        self.server = Server((LOCAL, 0), Handler)
        self.server.daemon_threads = True
        self.port: int = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


Forger = Callable[[dns.message.Message, bytes], list[tuple[bytes, bool]]]


class DnsUpstream:
    """
    The forwarder's upstream on UDP: C{*.fwd.test} is A 10.0.0.7.  A C{forger}
    may send other datagrams first, each from the right port or from another
    one (the C{bool}), as an off-path attacker would.
    """

    TRUE_ADDRESS = "10.0.0.7"

    def __init__(self) -> None:
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind((LOCAL, 0))
        self.port: int = self.udp.getsockname()[1]
        self.other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.other.bind((LOCAL, 0))
        self.forger: Forger | None = None
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.udp.recvfrom(65535)
            except OSError:
                return
            with contextlib.suppress(Exception):
                query = dns.message.from_wire(data)
                reply = dns.message.make_response(query)
                name = query.question[0].name
                reply.answer = [dns.rrset.from_text(name, 300, "IN", "A", self.TRUE_ADDRESS)]
                wire = reply.to_wire()
                forger = self.forger
                for forged, from_other_port in forger(query, wire) if forger else []:
                    (self.other if from_other_port else self.udp).sendto(forged, peer)
                self.udp.sendto(wire, peer)

    def close(self) -> None:
        self.udp.close()
        self.other.close()


# -- the daemon with everything ------------------------------------------------


@contextlib.contextmanager
def full_daemon(base: Path) -> Iterator[tuple[Daemon, HttpUpstream, DnsUpstream]]:
    make_site(base)
    http_upstream = HttpUpstream()
    dns_upstream = DnsUpstream()
    try:
        netd = NetdProcess.start(full_map(base, http_upstream.port, dns_upstream.port), base)
        with netd:
            yield Daemon(netd), http_upstream, dns_upstream
    finally:
        http_upstream.close()
        dns_upstream.close()


def map_text(config: dict[str, Any]) -> str:
    return yaml.safe_dump(config, sort_keys=False)


# -- small clients -------------------------------------------------------------


def free_port() -> int:
    """A loopback TCP port free just now, for a map that needs a fixed one."""
    with socket.socket() as sock:
        sock.bind((LOCAL, 0))
        port: int = sock.getsockname()[1]
    return port


def connect(address: tuple[str, int], timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(address, timeout=timeout)


def read_until_closed(sock: socket.socket, timeout: float, limit: int = 4 << 20) -> bytes:
    """Everything the peer sends until it closes, C{timeout} passes or C{limit} bytes."""
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, OSError):
            break
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def smtp_reply(stream: Any) -> bytes:
    """The last line of one (possibly multi-line) SMTP or FTP reply."""
    line: bytes = stream.readline()
    while line[3:4] == b"-":
        line = stream.readline()
    return line


def http_get(address: tuple[str, int], path: str, timeout: float = 5.0) -> int:
    """The status of one GET on a fresh connection, 0 if none came."""
    with connect(address, timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        head = read_until_closed(sock, timeout, limit=256)
    try:
        return int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return 0


def tls_client_context(alpn: list[str] | None = None) -> ssl.SSLContext:
    """Loopback TLS to the lab profile; the probes test netd, not its certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


def serving(daemon: Daemon, kind: str) -> bool:
    """Whether one valid exchange with the service of C{kind} works now."""
    netd = daemon.netd
    try:
        return _CHECKS[kind](netd)
    except Exception:  # whatever broke the exchange (a reset, a bad frame), it did not work
        return False


def _check_echo(netd: NetdProcess) -> bool:
    with connect(netd.address("echo")) as sock:
        sock.sendall(b"ping\n")
        return sock.recv(16) == b"ping\n"


def _check_line(address: tuple[str, int], send: bytes, expect: bytes) -> bool:
    with connect(address) as sock:
        stream = sock.makefile("rb")
        if send:
            sock.sendall(send)
        for _ in range(40):
            line = stream.readline()
            if not line:
                return False
            if expect in line:
                return True
    return False


def _check_smtp(netd: NetdProcess) -> bool:
    with connect(netd.address("mail")) as sock:
        stream = sock.makefile("rb")
        ok = smtp_reply(stream).startswith(b"220")
        sock.sendall(b"NOOP\r\n")
        return ok and smtp_reply(stream).startswith(b"250")


def _check_ftp(netd: NetdProcess) -> bool:
    with connect(netd.address("files")) as sock:
        stream = sock.makefile("rb")
        ok = smtp_reply(stream).startswith(b"220")
        sock.sendall(b"NOOP\r\n")
        return ok and smtp_reply(stream).startswith(b"200")


def _check_dns(netd: NetdProcess, transport: str) -> bool:
    import dns.query

    query = dns.message.make_query("www.netd.test", "A")
    host, port = netd.address("dns", transport)
    ask = dns.query.udp if transport == "udp" else dns.query.tcp
    answer = ask(query, host, port=port, timeout=3)
    return bool(answer.answer) and answer.answer[0][0].address == "127.0.0.1"


def _check_h2(netd: NetdProcess, service: str = "web", path: str = "/health") -> bool:
    import h2.connection
    import h2.events

    host, port = netd.address(service, tls=True)
    with (
        connect((host, port)) as raw,
        tls_client_context(["h2"]).wrap_socket(raw, server_hostname="localhost") as sock,
    ):
        connection = h2.connection.H2Connection()
        connection.initiate_connection()
        connection.send_headers(
            1,
            [(":method", "GET"), (":path", path), (":scheme", "https"), (":authority", "x")],
            end_stream=True,
        )
        sock.sendall(connection.data_to_send())
        for _ in range(20):
            data = sock.recv(65536)
            if not data:
                return False
            for event in connection.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    return dict(event.headers).get(b":status") == b"200"
            sock.sendall(connection.data_to_send())
    return False


def _check_admin(netd: NetdProcess) -> bool:
    return "web" in netd.services()


_CHECKS: dict[str, Callable[[NetdProcess], bool]] = {
    "echo": _check_echo,
    "http": lambda netd: http_get(netd.address("web"), "/health") == 200,
    "h2": _check_h2,
    "doh": lambda netd: _check_h2(netd, "dns", "/dns-query?dns=" + doh_parameter("www.netd.test")),
    "smtp": _check_smtp,
    "ftp": _check_ftp,
    "dns-udp": lambda netd: _check_dns(netd, "udp"),
    "dns-tcp": lambda netd: _check_dns(netd, "tcp"),
    "irc": lambda netd: _check_line(
        netd.address("chat"), b"NICK alive\r\nUSER a 0 * :a\r\n", b" 001 "
    ),
    "line": lambda netd: _check_line(line_chat_address(netd), b"/rooms\r\n", b"lobby"),
    "admin": _check_admin,
}


def doh_parameter(name: str) -> str:
    """RFC 8484's C{dns} parameter asking C{name} A: base64url, no padding, ID 0."""
    wire = dns.message.make_query(name, "A", id=0).to_wire()
    return base64.urlsafe_b64encode(wire).rstrip(b"=").decode()


def admin_address(netd: NetdProcess) -> tuple[str, int]:
    entry = netd.ports["admin"]["listeners"][0]
    return entry["host"], entry["port"]


def line_chat_address(netd: NetdProcess) -> tuple[str, int]:
    entry = netd.listeners("chat")[1]
    return entry["host"], entry["port"]
