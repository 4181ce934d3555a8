"""
Record and replay without sockets: what L{Recorder} writes for an exchange is
read back through C{routes_from}, and a request gets the answer recorded for
exactly that request (WireMock's recorder writes C{urlEqualTo}).
"""

from __future__ import annotations

import gc
import re
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, globalLogPublisher

from netd import schema
from netd.services.http.app import App, Headers
from netd.services.http.record import Recorder, Recorders
from netd.services.http.wire import HTTPConnection, Limits, factory_for
from tests.fakes.exchanges import FakeExchange
from tests.unit.test_config import LAUGHS
from tests.unit.test_http_stubs import WEB, app_of, ask


def record(recorder: Recorder, target: str, answer: bytes, headers: Headers | None = None) -> None:
    """An exchange the proxy relayed, as the recorder is handed it once answered."""
    exchange = FakeExchange("GET", target)
    exchange.path = target.partition("?")[0]
    recorder.write(exchange, 200, headers or [(b"Content-Type", b"text/plain")], answer)


def replay(tmp_path: Path) -> App:
    return app_of(WEB.parse(tmp_path, "    routes_from: [rec.yaml]\n"))


def pending_read_back() -> tuple[Any, Callable[[], Any], Deferred[Any]]:
    """
    An C{in_thread} that runs nothing, the read-back it was given (run when the
    test says, as a slow thread's would) and the Deferred it answered with.
    """
    work: list[tuple[Any, ...]] = []
    reading: Deferred[Any] = Deferred()

    def in_thread(function: Any, *args: Any) -> Deferred[Any]:
        work.append((function, *args))
        return reading

    def read_now() -> Any:
        function, *args = work[0]
        return function(*args)

    return in_thread, read_now, reading


def test_a_recorded_path_matches_only_itself(tmp_path: Path) -> None:
    recorder = Recorder(str(tmp_path / "rec.yaml"), secrets=False, serving=Recorders())
    for path in ("/api/dir/", "/api/dir/x", "/", "/api/*", "/api/a"):
        record(recorder, path, path.encode())
    app = replay(tmp_path)
    for path in ("/api/dir/", "/api/dir/x", "/", "/api/*", "/api/a"):
        assert ask(app, path).data == path.encode()
    assert ask(app, "/api/dir/y").status == 404


def test_a_recorded_query_matches_only_itself(tmp_path: Path) -> None:
    recorder = Recorder(str(tmp_path / "rec.yaml"), secrets=False, serving=Recorders())
    targets = ("/items", "/items?page=2", "/rep?a=2", "/rep?a=1&a=2", "/rep?a=2&b=")
    for target in targets:
        record(recorder, target, target.encode())
    app = replay(tmp_path)
    for target in targets:
        assert ask(app, target).data == target.encode()
    missed = ask(app, "/items?page=3")
    assert missed.status == 404
    assert 'query: expected exactly nothing, got "page=3"' in missed.data.decode()
    assert ask(app, "/rep?a=2&a=1").status == 404  # the values' order is the query's


def test_recording_goes_on_after_a_restart(tmp_path: Path) -> None:
    path = str(tmp_path / "rec.yaml")
    first = Recorder(path, secrets=False, serving=Recorders())
    record(first, "/a", b"\xff first")  # not UTF-8: a body file
    record(first, "/b", b"b")
    again = Recorder(path, secrets=False, serving=Recorders())  # the daemon restarted
    record(again, "/a", b"\xff changed")  # recorded before: not again
    record(again, "/c", b"\xff third")
    routes = yaml.safe_load((tmp_path / "rec.yaml").read_text())
    assert [r["path"] for r in routes] == ["/a", "/b", "/c"]
    assert routes[0]["body_file"] != routes[2]["body_file"]
    app = replay(tmp_path)
    assert ask(app, "/a").data == b"\xff first"
    assert ask(app, "/c").data == b"\xff third"


@pytest.mark.timeout(10)
def test_an_alias_bomb_in_a_recording_is_not_read_back(tmp_path: Path) -> None:
    """Bounded as the map is: what each recorded request matches was walked for its key."""
    path = tmp_path / "rec.yaml"
    path.write_text(f"- {{path: /a, method: GET, match: {LAUGHS}}}\n")
    started = time.monotonic()
    recorder = Recorder(str(path), secrets=False, serving=Recorders())
    assert time.monotonic() - started < 2
    record(recorder, "/b", b"b")  # recording goes on, from nothing known
    assert [r["path"] for r in yaml.safe_load(path.read_text())] == ["/a", "/b"]


@pytest.fixture
def composed(monkeypatch: pytest.MonkeyPatch) -> list[yaml.Node]:
    """The nodes the bounded composer composes while the test runs."""
    nodes: list[yaml.Node] = []
    compose_node = schema._Bounded.compose_node

    def counted(self: schema._Bounded, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        node = compose_node(self, parent, index)
        assert node is not None
        nodes.append(node)
        return node

    monkeypatch.setattr(schema._Bounded, "compose_node", counted)
    return nodes


def test_a_recording_without_aliases_is_read_back_by_libyaml_alone(
    tmp_path: Path, composed: list[yaml.Node]
) -> None:
    """A recording grows without end: the bounded composer takes 30% more CPU on it."""
    path = str(tmp_path / "rec.yaml")
    first = Recorder(path, secrets=False, serving=Recorders())
    for target in ("/api/*", "/a?q=*"):
        record(first, target, b"2*3", [(b"Vary", b"*")])
    again = Recorder(path, secrets=False, serving=Recorders())
    record(again, "/a?q=*", b"changed")  # recorded before: not again
    assert len(yaml.safe_load((tmp_path / "rec.yaml").read_text())) == 2
    assert composed == []


@pytest.mark.parametrize(
    ("text", "bounded"),
    [
        ("- {path: /api/*, body: 2*3, headers: {Vary: '*'}}\n", False),
        # Where an alias may begin, though none does.
        ("- {path: /a, body: 2 * 3}\n", True),
        ("- &a {path: /a}\n- *a\n", True),
        ("[&a 1,*a]\n", True),
        ("[&a 1, {*a : 2}]\n", True),
        ('[&a 1, {"b":*a}]\n', True),
        ("[&a 1, {?*a}]\n", True),
        ("[&a 1,\t*a]\n", True),
    ],
)
def test_recordings_are_bounded_where_an_alias_may_begin(
    text: str, bounded: bool, composed: list[yaml.Node]
) -> None:
    assert schema.load_large(text) == yaml.load(text, Loader=yaml.CSafeLoader)
    assert bool(composed) == bounded


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("- {path: /a\n", "while parsing"),
        ("path: /a\n", "not a YAML list of routes"),
        (f"- {{path: /a, method: GET, match: {LAUGHS}}}\n", "aliases repeat"),
    ],
)
def test_a_recording_not_read_back_is_said(tmp_path: Path, text: str, reason: str) -> None:
    """Recording goes on from nothing known, so requests it holds may be written again."""
    path = tmp_path / "rec.yaml"
    path.write_text(text)
    said: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(said.append)
    try:
        Recorder(str(path), secrets=False, serving=Recorders())
        Recorder(str(tmp_path / "new.yaml"), secrets=False, serving=Recorders())  # no file yet
    finally:
        globalLogPublisher.removeObserver(said.append)
    (warning,) = [e for e in said if e.get("log_namespace") == "netd.http"]
    assert warning["log_level"] == LogLevel.warn and warning["file"] == str(path)
    assert reason in warning["reason"]


@pytest.mark.slow
def test_a_recording_past_a_million_nodes_is_read_back(tmp_path: Path) -> None:
    """Only what aliases repeat is bounded: a recording grows without end."""
    path = tmp_path / "rec.yaml"
    route = "- {{path: /{}, method: GET, match: {{query_equals: {{}}}}, status: 200, body: x}}\n"
    path.write_text("".join(route.format(n) for n in range(80_000)))  # 13 nodes each
    record(Recorder(str(path), secrets=False, serving=Recorders()), "/0", b"again")
    assert len(yaml.safe_load(path.read_text())) == 80_000  # /0 was known: not written again


def test_a_recording_is_read_back_in_a_thread_and_what_ends_meanwhile_waits(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "rec.yaml")
    record(
        Recorder(path, secrets=False, serving=Recorders()), "/a", b"\xff first"
    )  # body file 1.bin
    in_thread, read_now, reading = pending_read_back()
    again = Recorder(path, secrets=False, serving=Recorders(), in_thread=in_thread)
    record(again, "/a", b"\xff changed")  # before the read-back: it waits
    record(again, "/b", b"\xff second")
    assert len(yaml.safe_load((tmp_path / "rec.yaml").read_text())) == 1
    reading.callback(read_now())  # as the thread's answer comes back
    routes = yaml.safe_load((tmp_path / "rec.yaml").read_text())
    assert [r["path"] for r in routes] == ["/a", "/b"]  # /a was known: not written again
    assert routes[1]["body_file"].endswith("/2.bin")


def test_a_body_file_is_never_written_over(tmp_path: Path) -> None:
    """A service still draining after a reload may take the next number first."""
    path = str(tmp_path / "rec.yaml")
    draining, serving = (
        Recorder(path, secrets=False, serving=Recorders()),
        Recorder(path, secrets=False, serving=Recorders()),
    )
    record(draining, "/old", b"\xff old")
    record(serving, "/new", b"\xff new")
    app = replay(tmp_path)
    assert ask(app, "/old").data == b"\xff old"
    assert ask(app, "/new").data == b"\xff new"


def test_repeated_headers_are_recorded_and_replayed_as_they_came(tmp_path: Path) -> None:
    """Set-Cookie lines are never joined (RFC 6265 3): an Expires date has a comma."""
    cookies = [b"a=1; Expires=Wed, 21 Oct 2015 07:28:00 GMT", b"b=2; Path=/"]
    recorder = Recorder(str(tmp_path / "rec.yaml"), secrets=True, serving=Recorders())
    record(recorder, "/cookies", b"ok", [(b"Set-Cookie", cookie) for cookie in cookies])
    transport = StringTransport()
    connection = HTTPConnection(factory_for(replay(tmp_path), Limits(), tls=False, http2=False))
    connection.makeConnection(transport)
    connection.dataReceived(b"GET /cookies HTTP/1.1\r\nHost: x\r\n\r\n")
    assert re.findall(rb"\r\nSet-Cookie: ([^\r]*)", transport.value()) == cookies


def test_a_draining_service_records_through_its_replacement(tmp_path: Path) -> None:
    """The old service finishes an exchange after the new one read the file back."""
    path = str(tmp_path / "rec.yaml")
    serving = Recorders()
    old = Recorder(path, secrets=False, serving=serving)
    old.start()
    record(old, "/before", b"before")
    in_thread, read_now, reading = pending_read_back()
    new = Recorder(path, secrets=False, serving=serving, in_thread=in_thread)
    found = read_now()  # the file as the reload's thread reads it
    new.start()
    record(old, "/late", b"one")  # a draining connection's exchange ends
    reading.callback(found)
    record(new, "/late", b"two")  # the same request, on the new service
    record(new, "/before", b"again")
    old.stop()
    new.stop()
    routes = yaml.safe_load((tmp_path / "rec.yaml").read_text())
    assert [(r["path"], r["body"]) for r in routes] == [("/before", "before"), ("/late", "one")]


def test_a_replacement_stopped_while_the_old_one_drains_hands_the_file_back(tmp_path: Path) -> None:
    path = str(tmp_path / "rec.yaml")
    serving = Recorders()
    old = Recorder(path, secrets=False, serving=serving)
    old.start()
    in_thread, read_now, reading = pending_read_back()
    new = Recorder(path, secrets=False, serving=serving, in_thread=in_thread)
    new.start()
    record(old, "/meanwhile", b"one")  # waits for the new one's read-back
    new.stop()  # its service left the map while the old one still drains
    assert [r["path"] for r in yaml.safe_load((tmp_path / "rec.yaml").read_text())] == [
        "/meanwhile"
    ]
    reading.callback(read_now())
    record(old, "/meanwhile", b"two")
    record(old, "/after", b"after")
    old.stop()
    routes = yaml.safe_load((tmp_path / "rec.yaml").read_text())
    assert [(r["path"], r["body"]) for r in routes] == [("/meanwhile", "one"), ("/after", "after")]


def test_an_exchange_is_masked_as_the_route_that_relayed_it_says(tmp_path: Path) -> None:
    """A reload that turns record_secrets on does not unmask what the old map relayed."""
    path = str(tmp_path / "rec.yaml")
    serving = Recorders()
    cookie = [(b"Set-Cookie", b"session=secret")]
    old = Recorder(path, secrets=False, serving=serving)
    old.start()
    new = Recorder(path, secrets=True, serving=serving)
    new.start()
    record(old, "/old", b"old", cookie)
    record(new, "/new", b"new", cookie)
    new.stop()
    old.stop()
    routes = yaml.safe_load((tmp_path / "rec.yaml").read_text())
    assert [r["headers"]["Set-Cookie"] for r in routes] == ["(masked by netd)", "session=secret"]


def test_replaced_recorders_are_not_kept_alive(tmp_path: Path) -> None:
    path = str(tmp_path / "rec.yaml")
    serving = Recorders()
    gone: list[weakref.ref[Recorder]] = []
    previous: Recorder | None = None
    for n in range(20):  # reloads, each old service stopping after the new one starts
        recorder = Recorder(path, secrets=False, serving=serving)
        recorder.start()
        record(recorder, f"/{n}", b"x")
        if previous is not None:
            previous.stop()
        gone.append(weakref.ref(recorder))
        previous = recorder
    assert previous is not None
    previous.stop()
    del recorder, previous
    gc.collect()
    assert [ref for ref in gone if ref() is not None] == []
    assert len(yaml.safe_load((tmp_path / "rec.yaml").read_text())) == 20
