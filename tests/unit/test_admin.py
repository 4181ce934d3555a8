"""
The admin API without sockets: its resource with twisted.web's DummyRequest (a
client hanging up), its channel on a StringTransport and a Clock (deadlines,
HEAD answers).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogEvent, formatEvent
from twisted.python.failure import Failure
from twisted.web.test.requesthelper import DummyRequest

from netd.admin import AdminResource, _AdminChannel, _AdminSite
from netd.config import AdminConfig, ConfigErrors, parse_config
from netd.events import Journal, ServiceStats
from netd.kinds import AdminView, ViewRefused
from netd.runtime import ReloadResult
from netd.schema import ConfigError, Position


class FakeDaemon:
    def __init__(self) -> None:
        self.ready = True
        self.reactor = Clock()
        self.journal = Journal(self.reactor)
        self.services_by_name: dict[str, Any] = {}
        self.reloads: list[Deferred[ReloadResult]] = []

    def reload(self) -> Deferred[ReloadResult]:
        self.reloads.append(Deferred())
        return self.reloads[-1]

    def describe(self) -> dict[str, Any]:
        return {}


def request(path: bytes, method: bytes = b"GET") -> DummyRequest:
    dummy = DummyRequest(path.lstrip(b"/").split(b"/"))
    dummy.method = method
    return dummy


def test_a_reload_goes_on_when_its_client_hangs_up() -> None:
    daemon = FakeDaemon()
    resource = AdminResource(daemon, None, dict)  # type: ignore[arg-type]
    hung_up = request(b"/api/reload", b"POST")
    resource.render(hung_up)
    hung_up.processingFailed(Failure(ConnectionDone()))
    [reload] = daemon.reloads
    cancelled: list[bool] = []
    reload.addErrback(lambda failure: cancelled.append(True))
    reload.callback(ReloadResult(restarted=("web",)))
    assert not cancelled and hung_up.written == []  # finished the reload, told nobody

    answered = request(b"/api/reload", b"POST")
    resource.render(answered)
    daemon.reloads[-1].callback(ReloadResult(errors=("bad",)))
    assert answered.responseCode == 400
    assert json.loads(b"".join(answered.written)) == {"errors": ["bad"]}


def test_a_long_poll_is_dropped_when_its_client_hangs_up() -> None:
    daemon = FakeDaemon()
    resource = AdminResource(daemon, None, dict)  # type: ignore[arg-type]
    waiting = request(b"/api/events")
    waiting.addArg(b"wait", b"30")
    resource.render(waiting)
    waiting.processingFailed(Failure(ConnectionDone()))
    daemon.journal.emit("echo", "connection.opened")
    assert waiting.written == []
    # The waiter is gone, so the next matching event wakes only new clients.
    assert daemon.journal._waiters == []


# The channel: deadlines and HEAD, on a Clock.

HEADER_TIMEOUT = 2.0
BODY_TIMEOUT = 3.0
IDLE_TIMEOUT = 20.0


class Client:
    """One connection to an admin site: what it sent, what came back, and when."""

    def __init__(
        self,
        max_body: int = 64 * 1024,
        transport: StringTransport | None = None,
        token: str | None = None,
    ) -> None:
        self.clock = Clock()
        self.daemon = FakeDaemon()
        self.daemon.reactor = self.clock
        self.daemon.journal = Journal(self.clock)
        self.stats = ServiceStats()
        config = AdminConfig(
            listen=(),
            token=None,
            position=Position("netd.yaml", 1, 1),
            header_timeout=HEADER_TIMEOUT,
            body_timeout=BODY_TIMEOUT,
            idle_timeout=IDLE_TIMEOUT,
            max_body=max_body,
        )
        resource = AdminResource(self.daemon, token, self.stats.snapshot)  # type: ignore[arg-type]
        site = _AdminSite(resource, config, self.clock, self.stats, self.daemon.journal)
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        assert isinstance(channel, _AdminChannel)
        self.channel = channel
        self.resource = resource
        self.transport = transport or StringTransport(
            peerAddress=IPv4Address("TCP", "127.0.0.1", 40000)
        )
        channel.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    def trickle(self, data: bytes, every: float) -> None:
        """One byte every C{every} seconds, as long as the connection stays open."""
        for byte in data:
            if self.transport.disconnecting:
                return
            self.send(bytes([byte]))
            self.clock.advance(every)

    def answer(self) -> bytes:
        value: bytes = self.transport.value()
        self.transport.clear()
        return value

    def timeouts(self) -> list[dict[str, Any]]:
        return [e.as_json() for e in self.daemon.journal.select(types=["request.timeout"])]


def status_line(answer: bytes) -> bytes:
    return answer.split(b"\r\n", 1)[0]


def headers_and_body(answer: bytes) -> tuple[dict[bytes, bytes], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    fields = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:])
    return {k.lower(): v for k, v in fields.items()}, body


def test_a_head_trickled_one_byte_at_a_time_is_cut_at_the_header_deadline() -> None:
    client = Client()
    # Twisted's own idle timeout would never fire: each byte comes well within it.
    client.trickle(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"a" * 100, every=0.5)
    assert client.transport.disconnecting
    assert client.clock.seconds() == pytest.approx(HEADER_TIMEOUT, abs=0.5)
    answer = client.answer()
    assert status_line(answer) == b"HTTP/1.1 408 Request Timeout"
    headers, body = headers_and_body(answer)
    assert headers[b"connection"] == b"close"
    assert json.loads(body) == {"error": "request head not complete within 2 s"}
    assert client.stats.counters == {"head_timeouts": 1}
    [event] = client.timeouts()
    assert (event["service"], event["stage"], event["client"]) == (
        "admin",
        "head",
        "127.0.0.1:40000",
    )


def test_a_new_connection_that_sends_nothing_is_closed_at_the_header_deadline() -> None:
    client = Client()
    client.clock.advance(HEADER_TIMEOUT - 0.1)
    assert not client.transport.disconnecting
    client.clock.advance(0.1)
    assert client.transport.disconnecting
    assert client.answer() == b""  # no request, nothing to answer
    assert client.timeouts() == []


def test_a_body_trickled_one_byte_at_a_time_is_cut_at_the_body_deadline() -> None:
    client = Client()
    client.send(b"POST /api/reload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n")
    started = client.clock.seconds()
    client.trickle(b"x" * 100, every=0.5)
    assert client.clock.seconds() - started == pytest.approx(BODY_TIMEOUT, abs=0.5)
    answer = client.answer()
    assert status_line(answer) == b"HTTP/1.1 408 Request Timeout"
    assert json.loads(headers_and_body(answer)[1]) == {
        "error": "request body not complete within 3 s"
    }
    assert client.daemon.reloads == []  # never dispatched
    assert [e["stage"] for e in client.timeouts()] == ["body"]


def test_a_body_over_max_body_is_refused_before_it_is_read() -> None:
    client = Client(max_body=10)
    client.send(b"POST /api/reload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 11\r\n\r\n")
    answer = client.answer()
    assert status_line(answer) == b"HTTP/1.1 413 Payload Too Large"
    assert json.loads(headers_and_body(answer)[1]) == {"error": "request body over 10 bytes"}
    assert client.transport.disconnecting
    client.send(b"x" * 11)
    assert client.answer() == b"" and client.daemon.reloads == []


def test_a_kept_alive_connection_gets_the_idle_timeout_then_a_fresh_header_deadline() -> None:
    client = Client()
    client.send(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert status_line(client.answer()) == b"HTTP/1.1 200 OK"
    client.clock.advance(IDLE_TIMEOUT - 1)  # far past the header deadline: idle, not slow
    assert not client.transport.disconnecting
    client.send(b"G")  # the next request's first byte starts its deadline
    client.clock.advance(HEADER_TIMEOUT)
    assert client.transport.disconnecting
    assert status_line(client.answer()) == b"HTTP/1.1 408 Request Timeout"


def test_an_idle_kept_alive_connection_is_closed_quietly() -> None:
    client = Client()
    client.send(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
    client.answer()
    client.clock.advance(IDLE_TIMEOUT)
    assert client.transport.disconnecting
    assert client.answer() == b"" and client.timeouts() == []


def test_a_long_poll_outlives_every_deadline() -> None:
    client = Client()
    client.send(b"GET /api/events?wait=100&type=wake HTTP/1.1\r\nHost: localhost\r\n\r\n")
    client.clock.advance(IDLE_TIMEOUT + HEADER_TIMEOUT + BODY_TIMEOUT)
    assert not client.transport.disconnecting and client.answer() == b""
    client.daemon.journal.emit("echo", "wake")
    headers, body = headers_and_body(client.answer())
    assert json.loads(body)["events"][0]["type"] == "wake"
    assert headers[b"content-length"] == b"%d" % len(body)


def test_pipelined_requests_are_all_answered() -> None:
    client = Client()
    client.send(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n" * 3)
    assert client.answer().count(b"HTTP/1.1 200 OK") == 3
    assert not client.transport.disconnecting


def test_a_client_that_never_reads_the_error_is_aborted() -> None:
    client = Client()
    client.send(b"GET /hea")
    client.clock.advance(HEADER_TIMEOUT)
    assert client.transport.disconnecting and not client.transport.disconnected
    # StringTransport never finishes closing: like a peer that does not read.
    client.clock.advance(client.channel.abortTimeout)
    assert client.transport.disconnected  # aborted


@pytest.mark.parametrize(
    "path", [b"/healthz", b"/metrics", b"/api/services", b"/api/events", b"/api/nothing"]
)
def test_head_gets_the_headers_of_get_and_no_body(path: bytes, logged: list[LogEvent]) -> None:
    client = Client()
    client.send(b"GET %s HTTP/1.1\r\nHost: localhost\r\n\r\n" % path)
    got = client.answer()
    get_headers, get_body = headers_and_body(got)
    client.send(b"HEAD %s HTTP/1.1\r\nHost: localhost\r\n\r\n" % path)
    head = client.answer()
    head_headers, head_body = headers_and_body(head)
    assert status_line(head) == status_line(got)
    assert head_body == b""
    assert get_body and head_headers[b"content-length"] == b"%d" % len(get_body)
    assert head_headers[b"content-type"] == get_headers[b"content-type"]
    assert not [e for e in logged if "HEAD" in (formatEvent(e) or "")]


def test_head_gets_no_body_with_an_error_it_ends_on() -> None:
    client = Client(max_body=1)
    client.send(b"HEAD /healthz HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\n")
    headers, body = headers_and_body(client.answer())
    assert body == b"" and headers[b"content-length"] != b"0"


# The admin section's limits in the map.

SERVICES = 'services: {echo: {type: echo, listen: ["tcp:0"]}}\n'


def admin_map(tmp_path: Path, keys: str) -> AdminConfig:
    text = f'admin:\n  listen: ["tcp:0:interface=127.0.0.1"]\n{keys}{SERVICES}'
    admin = parse_config(text, tmp_path / "netd.yaml").admin
    assert admin is not None
    return admin


def test_admin_limits_have_defaults_and_can_be_set(tmp_path: Path) -> None:
    default = admin_map(tmp_path, "")
    assert (default.max_connections, default.header_timeout, default.body_timeout) == (64, 10, 30)
    assert (default.idle_timeout, default.max_body) == (60, 65536)
    keys = (
        "  max_connections: 5\n  header_timeout: 0.5\n  body_timeout: 2\n"
        "  idle_timeout: 7\n  max_body: 0\n"
    )
    assert attrs.astuple(admin_map(tmp_path, keys))[3:8] == (5, 0.5, 2.0, 7.0, 0)


def test_admin_limits_are_checked_with_their_positions(tmp_path: Path) -> None:
    keys = (
        "  max_connections: 0\n  header_timeout: never\n  body_timeout: .nan\n"
        "  idle_timeout: 0\n  max_body: -1\n  max_clients: 3\n"
    )
    with pytest.raises(ConfigErrors) as raised:
        admin_map(tmp_path, keys)
    assert [str(e).split(":", 1)[1] for e in raised.value.errors] == [
        "3:20: admin.max_connections: must be at least 1, got 0",
        "4:19: admin.header_timeout: expected a number, got a string",
        "5:17: admin.body_timeout: must be a finite number, got .nan",
        "6:17: admin.idle_timeout: must be at least 0.1, got 0",
        "7:13: admin.max_body: must be at least 0, got -1",
        "8:3: admin.max_clients: unknown key",
    ]


@attrs.define
class _Records:
    """A writable view, as a kind would declare one."""

    held: dict[str, Any] = attrs.field(factory=dict)

    def put(self, key: str, body: Any) -> Any:
        if not isinstance(body, dict):
            raise ViewRefused(422, "a record is an object")
        self.held[key] = body
        return body

    def post(self, body: Any) -> Any:
        if body.get("ttl") == -1:
            raise ConfigErrors([ConfigError(Position("<api>", 1, 1), "rules[0].ttl", "negative")])
        self.held[body["name"]] = body
        return body

    def remove(self, key: str) -> Any:
        return self.held.pop(key, None)

    def view(self) -> AdminView:
        return AdminView(
            list=lambda query: self.held,
            item=self.held.get,
            post=self.post,
            put=self.put,
            remove=self.remove,
        )


def _service_with(view: AdminView) -> FakeDaemon:
    daemon = FakeDaemon()
    daemon.services_by_name["dns"] = attrs.make_class("S", ["handlers"])(
        attrs.make_class("H", ["views"])({"records": view})
    )
    return daemon


def _write(resource: AdminResource, path: bytes, method: bytes, body: Any) -> DummyRequest:
    dummy = request(path, method)
    dummy.content = io.BytesIO(body if isinstance(body, bytes) else json.dumps(body).encode())
    resource.render(dummy)
    return dummy


def test_a_view_takes_writes_with_keys_of_many_segments() -> None:
    records = _Records()
    resource = AdminResource(_service_with(records.view()), None, dict)  # type: ignore[arg-type]
    put = _write(resource, b"/api/services/dns/records/www.lab.test/A", b"PUT", {"ttl": 5})
    assert put.responseCode == 200 and records.held == {"www.lab.test/A": {"ttl": 5}}
    posted = _write(resource, b"/api/services/dns/records", b"POST", {"name": "x"})
    assert posted.responseCode == 201 and "x" in records.held
    gone = _write(resource, b"/api/services/dns/records/www.lab.test/A", b"DELETE", b"")
    assert gone.responseCode == 200 and "www.lab.test/A" not in records.held
    again = _write(resource, b"/api/services/dns/records/www.lab.test/A", b"DELETE", b"")
    assert again.responseCode == 404


def test_a_refused_write_answers_its_status_and_each_error_at_its_path() -> None:
    records = _Records()
    resource = AdminResource(_service_with(records.view()), None, dict)  # type: ignore[arg-type]
    refused = _write(resource, b"/api/services/dns/records/a", b"PUT", [1])
    assert refused.responseCode == 422
    assert json.loads(b"".join(refused.written)) == {"error": "a record is an object"}
    bad = _write(resource, b"/api/services/dns/records", b"POST", {"name": "y", "ttl": -1})
    assert bad.responseCode == 400
    assert json.loads(b"".join(bad.written))["errors"] == [
        {"path": "rules[0].ttl", "message": "negative"}
    ]
    not_json = _write(resource, b"/api/services/dns/records", b"POST", b"{nope")
    assert not_json.responseCode == 400
    assert records.held == {}


def test_a_read_only_view_refuses_writes_with_the_methods_it_allows() -> None:
    view = AdminView(list=lambda query: [], item=lambda key: None)
    resource = AdminResource(_service_with(view), None, dict)  # type: ignore[arg-type]
    put = _write(resource, b"/api/services/dns/records/a", b"PUT", {})
    assert put.responseCode == 405 and put.responseHeaders.getRawHeaders(b"allow") == [b"GET, HEAD"]
    posted = _write(resource, b"/api/services/dns/records", b"POST", {})
    assert posted.responseCode == 405


def test_a_view_acts_on_one_entry_with_post() -> None:
    acted: list[tuple[str, Any]] = []

    def act(key: str, body: Any) -> Any:
        if key.endswith("/refuse"):
            raise ViewRefused(400, "no")
        acted.append((key, body))
        return None if key.startswith("gone/") else {"done": key}

    view = AdminView(list=lambda query: [], act=act)
    resource = AdminResource(_service_with(view), None, dict)  # type: ignore[arg-type]
    done = _write(resource, b"/api/services/dns/records/m1/release", b"POST", {"to": ["a"]})
    assert done.responseCode == 200 and acted == [("m1/release", {"to": ["a"]})]
    assert json.loads(b"".join(done.written)) == {"done": "m1/release"}
    assert _write(resource, b"/api/services/dns/records/gone/x", b"POST", {}).responseCode == 404
    assert _write(resource, b"/api/services/dns/records/m1/refuse", b"POST", {}).responseCode == 400
    got = _write(resource, b"/api/services/dns/records/m1", b"GET", b"")
    assert got.responseCode == 405 and got.responseHeaders.getRawHeaders(b"allow") == [b"POST"]
