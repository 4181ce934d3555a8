"""
The http kind without sockets: its map section, its answers, and its HTTP/1.1
connection driven through StringTransport and a Clock.
"""

from __future__ import annotations

import gc
import os
import re
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
from hyperframe.frame import GoAwayFrame
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IProtocolNegotiationFactory,
    ISSLTransport,
    IStreamClientEndpoint,
)
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger, LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web._newclient import Request
from twisted.web.client import HTTPConnectionPool
from twisted.web.http_headers import Headers as TwistedHeaders
from zope.interface import implementer

from netd.config import parse_config
from netd.connections import ConnectionSet, TrackedConnection, TrackingFactory
from netd.events import Journal, ServiceStats
from netd.runtime import RunningService
from netd.services.http import Options
from netd.services.http.app import (
    HELD_MAX,
    App,
    BodyStream,
    Exchange,
    Route,
    StaticOptions,
    _path_of,
)
from netd.services.http.proxy import Proxy
from netd.services.http.static import StaticFiles
from netd.services.http.wire import (
    LINGERING_TIME,
    LINGERING_TIMEOUT,
    HTTPConnection,
    Limits,
    factory_for,
)
from tests.fakes.exchanges import FakeExchange
from tests.fakes.reactors import ListeningReactor
from tests.fakes.transports import HalfClosingStringTransport
from tests.maps import ServiceMap
from tests.unit.test_http_stubs import app_for

WEB = ServiceMap("http", "web", Options)
parse = WEB.parse
errors = WEB.errors


def test_parse_defaults_and_values(tmp_path: Path) -> None:
    (tmp_path / "www").mkdir()
    (tmp_path / "body.txt").write_text("canned")
    options = parse(
        tmp_path,
        "    root: www\n"
        "    record: 5\n"
        "    http2: false\n"
        "    routes:\n"
        "      - {path: /a, body_file: body.txt, status: 201, headers: {X-A: b}}\n"
        "      - {path: /old/, redirect: /new/}\n"
        "      - {path: /api/, proxy: 'http://127.0.0.1:9/', timeout: 2}\n"
        "    limits: {max_body: 10, keepalive_requests: 3}\n",
    )
    assert options.root == tmp_path / "www" and options.record == 5 and not options.http2
    canned, redirect, proxy = options.routes
    assert canned.body_file == str(tmp_path / "body.txt") and canned.status == 201
    assert canned.headers == (("X-A", "b"),) and not canned.prefix
    assert redirect.status == 302 and redirect.prefix
    assert proxy.proxy == "http://127.0.0.1:9/" and proxy.timeout == 2
    assert options.limits == Limits(max_body=10, keepalive_requests=3)
    assert parse(tmp_path, "") == Options()


def test_parse_reports_every_error_with_its_position(tmp_path: Path) -> None:
    found = errors(
        tmp_path,
        "    root: nowhere\n"
        "    routes:\n"
        "      - {path: nope, body: x}\n"
        "      - {path: /r, redirect: /x, status: 200}\n"
        "      - {path: /p, proxy: 'ftp://x/'}\n"
        "      - {path: /b, body: x, body_file: missing.txt}\n"
        "      - {path: /m, body: x, proxy: 'http://x/'}\n"
        "      - {path: /h, body: x, headers: {'Bad Name': x}}\n"
        "      - {path: /l, body: x, headers: {Content-Length: abc, Transfer-Encoding: gzip}}\n"
        "    limits: {max_headers: 0, colour: red}\n",
    )
    joined = "\n".join(found)
    assert "netd.yaml:5:11: services.web.root: not a directory" in joined
    assert "services.web.routes[0].path: a route path starts with /" in joined
    assert "services.web.routes[1].status: a redirect status is one of" in joined
    assert "services.web.routes[2].proxy: not an http:// or https:// URL" in joined
    assert "services.web.routes[3].body_file: not a file" in joined
    assert "services.web.routes[3]: give body or body_file, not both" in joined
    assert "services.web.routes[4]: a route is one of" in joined
    assert "services.web.routes[5].headers.Bad Name: not a valid header" in joined
    assert "routes[6].headers.Content-Length: set by netd from the body" in joined
    assert "routes[6].headers.Transfer-Encoding: set by netd from the body" in joined
    assert "services.web.limits.max_headers: must be at least 1" in joined
    assert "services.web.limits.colour: unknown key" in joined


@pytest.fixture
def root(tmp_path: Path) -> Path:
    www = tmp_path / "www"
    (www / "dir").mkdir(parents=True)
    (www / "open").mkdir()
    (www / "open" / "x.txt").write_text("x")
    (www / "a.txt").write_bytes(b"0123456789")
    (www / "big.bin").write_bytes(bytes(range(256)) * 1024)
    (tmp_path / "secret").write_text("secret")
    (www / "out").symlink_to(tmp_path / "secret")
    return www


def make_app(root: Path | None, routes: tuple[Route, ...] = (), record: int = 10) -> App:
    clock = Clock()
    clock.advance(1_700_000_000)
    journal = Journal(clock)
    return App(
        clock=clock,
        routes=routes,
        files=StaticFiles(StaticOptions(str(root), listing=False), clock) if root else None,
        record=record,
        record_body=100,
        access_log=True,
        log=Logger(namespace="netd.test"),
        stats=ServiceStats(),
        emit=lambda type, **fields: journal.emit("web", type, **fields),
        proxy=None,
    )


def answer(app: App, target: str, method: str = "GET", **headers: str) -> FakeExchange:
    exchange = FakeExchange(
        method, target, [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
    )
    app.handle(exchange)
    if exchange.producer is not None:
        while exchange.producer is not None:
            exchange.producer.resumeProducing()
    return exchange


@pytest.mark.parametrize(
    "target",
    [
        "/../secret",
        "/%2e%2e/secret",
        "/%2E%2e/secret",
        "/.%2e/secret",
        "/dir/../../secret",
        "/..%2fsecret",
        "/..\\secret",
        "/..%5csecret",
        "/a.txt%00",
        "/%00",
        "/out",
        "/./a.txt",
        "/dir/%2e/../a.txt",
        "http://host/../secret",
        "/%c0%ae%c0%ae/secret",
        "*",
        "/%ff",
    ],
)
def test_no_path_leaves_the_root(root: Path, target: str) -> None:
    exchange = answer(make_app(root), target)
    assert exchange.status in (400, 403, 404) and b"secret" not in exchange.data


def _clock_at(app: App, path: Path, seconds: float) -> None:
    """Move C{app}'s clock to C{seconds} after C{path}'s last change (its ctime)."""
    clock: Clock = app.clock
    step = path.stat().st_ctime_ns / 1e9 + seconds - clock.seconds()
    assert step >= 0, "the clock only moves on"
    clock.advance(step)


def test_static_answers(root: Path) -> None:
    app = make_app(root)
    _clock_at(app, root / "big.bin", 2)  # the files' dates validate once their second is over
    whole = answer(app, "/a.txt")
    assert (whole.status, whole.data) == (200, b"0123456789")
    etag = whole.response_headers[b"ETag"]
    modified = whole.response_headers[b"Last-Modified"].decode()
    assert answer(app, "/a.txt", if_none_match=etag.decode()).status == 304
    assert answer(app, "/a.txt", if_none_match=f'"x", W/{etag.decode()}').status == 304
    assert answer(app, "/a.txt", if_modified_since=modified).status == 304
    # If-None-Match wins over If-Modified-Since (RFC 9110 13.2.2).
    assert answer(app, "/a.txt", if_none_match='"x"', if_modified_since=modified).status == 200
    assert answer(app, "/a.txt", range="bytes=2-4").data == b"234"
    assert answer(app, "/a.txt", range="bytes=-3").data == b"789"
    assert answer(app, "/a.txt", range="bytes=8-100").data == b"89"
    assert answer(app, "/a.txt", range="bytes=20-").status == 416
    assert answer(app, "/a.txt", range="bytes=5-2").status == 200  # invalid: ignored
    assert answer(app, "/a.txt", range="lines=1-2").status == 200
    stale = answer(app, "/a.txt", range="bytes=0-1", if_range='"old"')
    assert (stale.status, stale.data) == (200, b"0123456789")
    assert answer(app, "/a.txt", range="bytes=0-1", if_range=etag.decode()).status == 206
    many = ",".join(f"{i}-{i}" for i in range(20))
    assert answer(app, "/a.txt", range=f"bytes={many}").status == 200
    multi = answer(app, "/a.txt", range="bytes=0-0,9-9")
    assert multi.status == 206 and b"Content-Range: bytes 9-9/10\r\n\r\n9" in multi.data
    assert answer(app, "/dir").response_headers[b"Location"] == b"/dir/"
    assert answer(app, "/dir/").status == 403
    assert answer(app, "/a.txt", "POST").status == 405
    head = answer(app, "/a.txt", "HEAD")
    assert head.data == b"" and head.response_headers[b"Content-Length"] == b"10"
    big = answer(app, "/big.bin")  # larger than one read: through the producer
    assert big.data == bytes(range(256)) * 1024 and big.finished
    ranged = answer(app, "/big.bin", range="bytes=1000-200000,-10")
    assert ranged.data.endswith(b"--\r\n") and bytes(range(246, 256)) in ranged.data


def _streaming(app: App, target: str) -> tuple[FakeExchange, int]:
    """A GET of a file too big for memory, started: the exchange and the file's descriptor."""
    exchange = FakeExchange("GET", target)
    app.handle(exchange)
    assert exchange.producer is not None
    return exchange, exchange.producer.fd


def _closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def test_a_file_cut_short_under_its_response_aborts_it(root: Path) -> None:
    exchange, fd = _streaming(make_app(root), "/big.bin")
    os.truncate(root / "big.bin", 1000)
    while exchange.producer is not None:
        exchange.producer.resumeProducing()
    assert exchange.aborted and not exchange.finished
    assert exchange.data == bytes(range(256)) * 3 + bytes(range(232))
    assert _closed(fd)


def test_a_client_gone_mid_file_closes_it_without_more(root: Path) -> None:
    exchange, fd = _streaming(make_app(root), "/big.bin")
    exchange.producer.stopProducing()
    assert _closed(fd)
    assert not exchange.aborted and not exchange.finished and exchange.data == b""


def test_a_file_with_a_trailing_slash_is_not_served(root: Path) -> None:
    app = make_app(root)
    (root / "dir" / "index.html").write_text("<p>index</p>")
    for target in ("/a.txt/", "/a.txt//", "/dir/index.html/", "/a.txt/?x=1"):
        for method in ("GET", "HEAD"):
            exchange = answer(app, target, method)
            assert exchange.status == 404 and b"0123" not in exchange.data, target
    assert answer(app, "/a.txt").data == b"0123456789"
    assert answer(app, "/dir/").data == b"<p>index</p>"  # a directory's slash still serves it


def test_an_edited_small_file_is_served_fresh(root: Path) -> None:
    app = make_app(root)
    assert answer(app, "/a.txt").data == b"0123456789"
    assert answer(app, "/a.txt").data == b"0123456789"  # from memory now
    (root / "a.txt").write_bytes(b"9876543210")  # same size, new mtime
    os.utime(root / "a.txt", ns=(1, 2_000_000_000))
    assert answer(app, "/a.txt").data == b"9876543210"
    (root / "a.txt").unlink()
    assert answer(app, "/a.txt").status == 404


def _file_clock_past(path: Path) -> None:
    """Wait until a change made now shows in C{path}'s ctime (the files' clock ticks coarsely)."""
    probe = path.with_name(path.name + ".probe")
    while True:
        probe.touch()
        if probe.stat().st_ctime_ns > path.stat().st_ctime_ns:
            probe.unlink()
            return


def test_a_rewrite_in_place_with_its_mtime_restored_is_served_fresh(root: Path) -> None:
    app = make_app(root)
    path = root / "a.txt"
    before = path.stat()
    _clock_at(app, path, 2)
    first = answer(app, "/a.txt")
    assert first.data == b"0123456789" == answer(app, "/a.txt").data  # kept
    _file_clock_past(path)
    path.write_bytes(b"9876543210")  # same inode, same size: cp -p, rsync -t --inplace
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    _clock_at(app, path, 2)
    assert answer(app, "/a.txt").data == b"9876543210"  # not the kept bytes
    fresh = answer(app, "/a.txt", if_none_match=first.response_headers[b"ETag"].decode())
    assert (fresh.status, fresh.data) == (200, b"9876543210")
    assert fresh.response_headers[b"ETag"] != first.response_headers[b"ETag"]
    assert fresh.response_headers[b"Last-Modified"] == first.response_headers[b"Last-Modified"]


def test_a_file_changed_within_the_last_second_is_read_again_each_time(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rewrite within the files' timestamp tick leaves the stat as it was: not kept yet."""
    app = make_app(root)
    _clock_at(app, root / "a.txt", 0.5)
    assert answer(app, "/a.txt").data == b"0123456789"
    monkeypatch.setattr(os, "stat", _stat_as_it_was(os.stat, root / "a.txt"))
    with (root / "a.txt").open("r+b") as same_tick:  # as if the stat could not tell
        same_tick.write(b"9876543210")
    assert answer(app, "/a.txt").data == b"9876543210"
    _clock_at(app, root / "a.txt", 1.5)  # the stat as it was, which the server sees
    assert answer(app, "/a.txt").data == b"9876543210"  # kept now
    (root / "a.txt").write_bytes(b"0000000000")
    assert answer(app, "/a.txt").data == b"9876543210"  # the kept bytes: its stat is as it was


def test_a_rewrite_within_the_files_tick_is_never_answered_304(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    The stat stays as it was, so a tag from it would match the old bytes too:
    a file changed within the last second is tagged by its content, or not at all.
    """
    app = make_app(root)
    _clock_at(app, root / "a.txt", 0.5)
    first = answer(app, "/a.txt")
    monkeypatch.setattr(os, "stat", _stat_as_it_was(os.stat, root / "a.txt"))
    with (root / "a.txt").open("r+b") as same_tick:
        same_tick.write(b"9876543210")
    etag = first.response_headers[b"ETag"].decode()
    for method in ("GET", "HEAD"):
        assert answer(app, "/a.txt", method, if_none_match=etag).status == 200
    assert answer(app, "/a.txt", if_match=etag).status == 412
    assert answer(app, "/a.txt", range="bytes=0-1", if_range=etag).data == b"9876543210"
    fresh = answer(app, "/a.txt").response_headers[b"ETag"].decode()
    assert answer(app, "/a.txt", if_none_match=fresh).status == 304
    assert b"ETag" not in answer(app, "/big.bin", "HEAD").response_headers  # not read for a tag
    _clock_at(app, root / "big.bin", 1.5)
    assert b"ETag" in answer(app, "/big.bin", "HEAD").response_headers


def _rewritten_in_its_second(path: Path, content: bytes) -> None:
    """Write C{content} to C{path}, its mtime left in the second it had (a same-second edit)."""
    second = path.stat().st_mtime_ns // 1_000_000_000 * 1_000_000_000
    path.write_bytes(content)
    os.utime(path, ns=(second, second + 500_000_000))


def _as_curl_z(app: App, target: str, first: FakeExchange) -> bytes:
    """What a client revalidating by date alone (C{curl -z}) shows after C{first}."""
    held = first.response_headers.get(b"Last-Modified")
    dated = {} if held is None else {"if_modified_since": held.decode()}
    again = answer(app, target, **dated)
    return first.data if again.status == 304 else again.data


def _resumed(app: App, target: str, part: FakeExchange) -> bytes:
    """
    The whole file as a client resuming after C{part} joins it: the rest with
    If-Range and a validator it holds, or the whole file again without one.
    """
    held = part.response_headers.get(b"ETag") or part.response_headers.get(b"Last-Modified")
    if held is None:
        return answer(app, target).data
    rest = answer(app, target, range=f"bytes={len(part.data)}-", if_range=held.decode())
    return part.data + rest.data if rest.status == 206 else rest.data


def test_a_date_handed_out_within_the_files_last_second_validates_nothing_later(
    root: Path,
) -> None:
    """
    A file fetched within its last second and rewritten in that same second:
    a date from that fetch would be taken as strong once the second is over,
    and validate the new bytes (RFC 9110 8.8.2.2), so none is handed out then.
    """
    app = make_app(root)
    small, big = root / "a.txt", root / "big.bin"
    os.utime(small, ns=(0, 1_700_000_000_100_000_000))
    os.utime(big, ns=(0, 1_700_000_000_100_000_000))
    _clock_at(app, big, 0.1)
    first = answer(app, "/a.txt")
    part = answer(app, "/big.bin", range="bytes=0-99999")
    assert (part.status, len(part.data)) == (206, 100000)
    _rewritten_in_its_second(small, b"B" * 10)
    _rewritten_in_its_second(big, b"B" * len(bytes(range(256)) * 1024))
    _clock_at(app, big, 2.2)
    assert _as_curl_z(app, "/a.txt", first) == b"B" * 10
    assert _resumed(app, "/big.bin", part) == big.read_bytes()
    # Settled: its date is handed out, and validates.
    settled = answer(app, "/a.txt")
    held = settled.response_headers[b"Last-Modified"]
    assert held == b"Tue, 14 Nov 2023 22:13:20 GMT"
    assert answer(app, "/a.txt", if_modified_since=held.decode()).status == 304
    ranged = answer(app, "/a.txt", range="bytes=0-1", if_range=held.decode())
    assert (ranged.status, ranged.data) == (206, b"BB")


def test_a_future_mtime_is_never_a_date_a_client_holds(root: Path) -> None:
    """
    RFC 9110 8.8.2.1: no Last-Modified later than the response's Date.  Held
    by a client, a date a day ahead validated the file that replaced it.
    """
    app = make_app(root)
    path = root / "a.txt"
    _clock_at(app, path, 2)
    ahead = int(app.clock.seconds()) + 86400
    os.utime(path, (ahead, ahead))
    _clock_at(app, path, 2)
    first = answer(app, "/a.txt")
    assert b"Last-Modified" not in first.response_headers and b"ETag" in first.response_headers
    path.write_bytes(b"G" * 10)  # replaced: its mtime is now
    _clock_at(app, path, 2)
    assert _as_curl_z(app, "/a.txt", first) == b"G" * 10


def _stat_as_it_was(real_stat: Any, path: Path) -> Any:
    first = real_stat(path)

    def stat(target: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        return first if os.fspath(target) == str(path) else real_stat(target, *args, **kwargs)

    return stat


def test_a_file_is_looked_at_once_while_its_stat_stays_the_same(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_app(root)
    assert isinstance(app.files, StaticFiles)
    guess = app.files.types.guess_type
    guessed: list[str] = []

    def counted(url: str, strict: bool = True) -> tuple[str | None, str | None]:
        guessed.append(url)
        return guess(url, strict)

    monkeypatch.setattr(app.files.types, "guess_type", counted)
    _clock_at(app, root / "a.txt", 2)  # its changes settled: tagged by its stat
    head = answer(app, "/a.txt", "HEAD")
    whole = answer(app, "/a.txt")
    assert whole.data == b"0123456789" and len(guessed) == 1
    for name in (b"ETag", b"Last-Modified", b"Content-Type"):
        assert whole.response_headers[name] == head.response_headers[name]
    os.utime(root / "a.txt", ns=(1, 2_000_000_000))  # touched: new validators, found at once
    _clock_at(app, root / "a.txt", 2)
    touched = answer(app, "/a.txt", range="bytes=1-2")
    assert (touched.status, touched.data) == (206, b"12") and len(guessed) == 2
    assert touched.response_headers[b"Last-Modified"] == b"Thu, 01 Jan 1970 00:00:02 GMT"
    assert touched.response_headers[b"ETag"] != head.response_headers[b"ETag"]
    assert touched.response_headers[b"Content-Type"] == b"text/plain; charset=utf-8"


def test_listing(root: Path) -> None:
    app = make_app(root)
    app.files = StaticFiles(StaticOptions(str(root), listing=True), app.clock)
    listing = answer(app, "/open/")
    assert listing.status == 200 and b'<a href="x.txt">x.txt</a>' in listing.data


def test_routes(tmp_path: Path) -> None:
    routes = (
        Route("/health", prefix=False, body=b"ok", headers=(("X-A", "1"),)),
        Route("/old/", prefix=True, redirect="/new/", status=308),
    )
    app = make_app(None, routes)
    health = answer(app, "/health?x", "POST")
    assert (health.status, health.data, health.response_headers[b"X-A"]) == (200, b"ok", b"1")
    moved = answer(app, "/old/a/b?c=d")
    assert moved.status == 308 and moved.response_headers[b"Location"] == b"/new/a/b?c=d"
    assert answer(app, "/elsewhere").status == 404


def test_a_record_and_its_event_carry_the_time_to_the_response_finished(root: Path) -> None:
    app = make_app(root)
    events: list[tuple[str, dict[str, Any]]] = []
    app.emit = lambda type, **fields: events.append((type, fields))
    exchange = answer(app, "/a.txt")
    assert isinstance(app.clock, Clock)
    app.clock.advance(0.0375)  # the response's last byte leaves 37.5 ms after its head came
    app.completed(exchange)
    [record] = app.list_requests({})
    assert record["duration_ms"] == 37.5
    [(kind, fields)] = events
    assert kind == "http.request" and fields["duration_ms"] == 37.5


def test_records_and_the_access_log(root: Path) -> None:
    app = make_app(root, record=2)
    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        for path in ("/a.txt", "/missing", "/dir/"):
            app.completed(answer(app, path, user_agent="ua/1"))
    finally:
        globalLogPublisher.removeObserver(seen.append)
    records = app.list_requests({})
    assert [r["path"] for r in records] == ["/missing", "/dir/"]
    assert records[0]["status"] == 404 and records[0]["client"] == "192.0.2.1"
    assert ["user-agent", "ua/1"] in records[0]["headers"]
    assert app.clear_requests() == {"cleared": 2} and app.list_requests({}) == []
    access = [e for e in seen if e.get("log_namespace") == "netd.test"]
    assert access[0]["log_level"] == LogLevel.info and access[0]["status"] == 200
    assert access[0]["access"] == (
        '192.0.2.1 - - [14/Nov/2023:22:13:20 +0000] "GET /a.txt HTTP/1.1" 200 10 "-" "ua/1"'
    )
    assert app.stats.counters["requests"] == 3


def test_the_access_log_event_is_log_info_s_handed_to_its_observer(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_app(root)
    seen: list[dict[str, Any]] = []
    app.log = Logger(namespace="netd.web", observer=seen.append)
    emitted: list[object] = []
    emit = Logger.emit
    monkeypatch.setattr(Logger, "emit", lambda *a, **k: emitted.append(a) or emit(*a, **k))
    app.completed(answer(app, "/a.txt", referer='http://r/"q"', user_agent="ua\\1"))
    assert emitted == []  # the dearest step of log.info, skipped
    (event,) = seen
    assert formatEvent(event) == (
        '192.0.2.1 - - [14/Nov/2023:22:13:20 +0000] "GET /a.txt HTTP/1.1" 200 10 '
        '"http://r/\\"q\\"" "ua\\\\1"'
    )
    fields = {k: v for k, v in event.items() if not k.startswith("log_")}
    reference: list[dict[str, Any]] = []
    app.log.observer = reference.append
    monkeypatch.undo()
    app.log.info("{access}", **fields)
    (made,) = reference
    assert list(event) == list(made)  # the same fields in the same order: the same JSON line
    assert {k: v for k, v in event.items() if k != "log_time"} == {
        k: v for k, v in made.items() if k != "log_time"
    }


class Wire:
    """One HTTP/1.1 connection over a StringTransport."""

    def __init__(self, app: App, limits: Limits) -> None:
        self.transport = HalfClosingStringTransport()
        self.protocol = HTTPConnection(factory_for(app, limits, tls=False, http2=True))
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> bytes:
        self.protocol.dataReceived(data)
        return self.take()

    def take(self) -> bytes:
        value: bytes = self.transport.value()
        self.transport.clear()
        return value

    @property
    def closed(self) -> bool:
        """Whether netd's side ended: closed, or half-closed after a refusal."""
        return bool(self.transport.disconnecting or self.transport.write_closed)


@pytest.fixture
def wire(root: Path) -> Iterator[Wire]:
    limits = Limits(
        max_request_line=100, max_header_bytes=300, max_headers=5, max_body=50, header_timeout=1
    )
    yield Wire(make_app(root), limits)


def test_pipelined_keepalive_in_order(wire: Wire) -> None:
    out = wire.send(
        b"GET /a.txt HTTP/1.1\r\nHost: x\r\n\r\nGET /missing HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /a.txt HTTP/1.0\r\n\r\n"
    )
    statuses = re.findall(rb"HTTP/1\.1 (\d+) ", out)
    assert statuses == [b"200", b"404", b"200"]
    assert out.endswith(b"Connection: close\r\n\r\n0123456789") and wire.closed


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /" + b"a" * 200 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"y" * 400 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X: y\r\n" * 6 + b"\r\n", 431),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 51\r\n\r\n", 413),
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
            400,
        ),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\nX: a\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\rX: a\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
        (b"GET / HTTP/1.1\r\nHost: x\r\nExpect: magic\r\n\r\n", 417),
        (b"\x00\xff garbage\r\n\r\n", 400),
    ],
)
def test_bad_input_gets_its_status_and_close(wire: Wire, request_bytes: bytes, status: int) -> None:
    out = wire.send(request_bytes)
    assert out.startswith(b"HTTP/1.1 %d " % status) and wire.closed
    assert wire.send(b"GET /a.txt HTTP/1.1\r\nHost: x\r\n\r\n") == b""  # nothing more is read


def test_chunked_body_over_the_limit(wire: Wire) -> None:
    out = wire.send(
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + b"20\r\n" + b"z" * 32
    )
    assert out.startswith(b"HTTP/1.1 405")  # answered at the head; the body still arrives
    out = wire.send(b"\r\n20\r\n" + b"z" * 32 + b"\r\n")
    assert out == b"" and wire.closed  # 64 > 50 bytes: cut


_BROKEN = b"BROKEN REQUEST\r\n\r\n"
_SLOW = b"GET /api/slow HTTP/1.1\r\nHost: x\r\n\r\n"
_FAST = b"GET /a.txt HTTP/1.1\r\nHost: x\r\n\r\n"
_BAD_CHUNK = b"POST /api/up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"


@pytest.mark.parametrize(
    ("pipelined", "statuses"),
    [
        (_SLOW + _BROKEN, [b"200", b"400"]),
        (_SLOW + _FAST + _BROKEN, [b"200", b"200", b"400"]),
        (_FAST + _SLOW + _BROKEN, [b"200", b"200", b"400"]),
        # A bad chunk in a queued request's own body: the requests before it still answered.
        (_SLOW + _BAD_CHUNK, [b"200", b"400"]),
    ],
    ids=["slow", "slow-fast", "fast-slow", "slow-bad-chunk"],
)
def test_a_later_request_s_refusal_follows_the_answers_before_it(
    root: Path, pipelined: bytes, statuses: list[bytes]
) -> None:
    app, proxied = _waiting_proxy(root)
    wire = Wire(app, Limits())
    out = wire.send(pipelined)
    assert not wire.closed and b" 400 " not in out
    proxied[0].respond(200, [], b"slow\n")
    out += wire.take()
    assert re.findall(rb"HTTP/1\.1 (\d+) ", out) == statuses
    assert b"slow\n" in out and out.endswith(b"400 Bad Request\n") and wire.closed
    assert out.count(b"Connection: close") == 1  # the refusal's alone
    assert wire.send(_FAST) == b""  # nothing more is read


def test_a_bad_body_unanswered_gets_the_error_as_its_answer(root: Path) -> None:
    app, proxied = _waiting_proxy(root)
    wire = Wire(app, Limits())
    out = wire.send(_BAD_CHUNK)
    assert out.startswith(b"HTTP/1.1 400 ") and wire.closed
    assert proxied[0].done  # the proxy's answer, if it comes, goes nowhere


@implementer(ISSLTransport)
class TLSTransport(HalfClosingStringTransport):
    """
    TLS as netd's wrapper sees it: a half-close asked of it would reach the
    TCP connection under it (ProtocolWrapper forwards what it lacks), a FIN
    without close_notify, recorded here as C{write_closed}.
    """


def _refused(root: Path, transport: StringTransport) -> tuple[TrackedConnection, Clock]:
    """
    An HTTP/1.1 connection inside the core's wrapper, as a listener makes it,
    just answered 413 while its body still comes; and its clock.
    """
    app = make_app(root)
    connections = ConnectionSet(app.clock, "web", ServiceStats(), Journal(app.clock), 10, 600)
    http = factory_for(app, Limits(max_body=50), tls=False, http2=False)
    connection = TrackingFactory(http, connections).buildProtocol(None)
    assert isinstance(connection, TrackedConnection)
    connection.makeConnection(transport)
    connection.dataReceived(
        b"POST /a.txt HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + b"a" * 100
    )
    assert transport.value().startswith(b"HTTP/1.1 413 ")
    transport.clear()
    return connection, app.clock


_MORE = b"b" * 1000 + b"GET /a.txt HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize("tls", [False, True])
def test_a_refusal_ends_netd_s_side_then_drops_what_comes_until_the_client_is_quiet(
    root: Path, tls: bool
) -> None:
    transport = TLSTransport() if tls else HalfClosingStringTransport()
    connection, clock = _refused(root, transport)
    # Our FIN after the response (over TLS, TLS's own close: close_notify, then
    # it reads on until the client's); the client's body is still read, so
    # that closing does not reset the client before it reads its 413.
    assert (transport.write_closed, transport.disconnecting) == (not tls, tls)
    for _ in range(3):
        clock.advance(LINGERING_TIMEOUT - 0.5)
        connection.dataReceived(_MORE)
        assert transport.value() == b"" and not transport.disconnected  # dropped, unparsed
    assert transport.disconnecting == tls
    clock.advance(LINGERING_TIMEOUT)
    # Closed; TLS's close, waiting for the client's close_notify, is cut.
    assert transport.disconnecting and transport.disconnected == tls


def test_lingering_ends_after_its_time_in_all(root: Path) -> None:
    transport = HalfClosingStringTransport()
    connection, clock = _refused(root, transport)
    while clock.seconds() < 1_700_000_000 + LINGERING_TIME - 1:
        clock.advance(1)
        connection.dataReceived(_MORE)
    assert not transport.disconnecting
    clock.advance(1)
    assert transport.disconnecting


def test_the_client_s_end_ends_lingering_and_a_stop_cuts_it_at_its_grace(root: Path) -> None:
    transport = HalfClosingStringTransport()
    connection, _ = _refused(root, transport)
    connection.readConnectionLost()  # the client's FIN, once it read its answer
    assert transport.disconnecting
    transport = HalfClosingStringTransport()
    connection, clock = _refused(root, transport)
    connection.factory.connections.drain(2)
    assert not transport.disconnecting  # nothing to finish: its bounds still end it...
    clock.advance(2)
    assert transport.disconnected  # ...or the stop's grace


def test_slow_head_times_out_with_408(wire: Wire) -> None:
    clock = wire.protocol.clock
    assert wire.send(b"GET /a.txt HTTP/1.1\r\nHo") == b""
    clock.advance(0.9)
    assert wire.send(b"st: x\r\n") == b"" and not wire.closed
    clock.advance(0.2)
    assert wire.take().startswith(b"HTTP/1.1 408 ") and wire.closed


def test_a_stalled_body_times_out_at_its_own_timeout_shorter_than_the_heads(root: Path) -> None:
    app, _ = _waiting_proxy(root)
    wire = Wire(app, Limits(header_timeout=5, body_timeout=3))
    clock = wire.protocol.clock
    head = b"POST /api/x HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
    assert wire.send(head + b"0123456789") == b""
    clock.advance(2.9)
    assert wire.take() == b"" and not wire.closed
    clock.advance(0.1)
    assert wire.take().startswith(b"HTTP/1.1 408 ") and wire.closed


def test_a_head_after_a_long_idle_times_out_at_header_timeout(wire: Wire) -> None:
    clock = wire.protocol.clock
    assert wire.send(b"GET /a.txt HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 200")
    clock.advance(Limits().keepalive_timeout - 5)  # idle, within keepalive_timeout
    assert wire.send(b"GET /a.txt HTTP/1.1\r\nHo") == b""
    clock.advance(1)  # header_timeout
    assert wire.take().startswith(b"HTTP/1.1 408 ") and wire.closed


def test_idle_keepalive_connection_closes(wire: Wire) -> None:
    assert wire.send(b"GET /a.txt HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 200")
    wire.protocol.clock.advance(Limits().keepalive_timeout + 1)
    assert wire.closed and wire.take() == b""


def test_keepalive_request_cap(root: Path) -> None:
    capped = Wire(make_app(root), Limits(keepalive_requests=2))
    out = capped.send(b"GET /a.txt HTTP/1.1\r\nHost: x\r\n\r\n" * 3)
    assert out.count(b"HTTP/1.1 200 OK") == 2 and capped.closed


def test_a_body_still_coming_after_its_answer_is_recorded_at_its_end(root: Path) -> None:
    app = make_app(root)  # record_body: 100
    events: list[str] = []
    app.emit = lambda type, **fields: events.append(type)
    wire = Wire(app, Limits())
    assert wire.send(b"GET /a.txt HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 200 ")
    assert [r["body_size"] for r in app.list_requests({})] == [0]  # no body: recorded at once
    head = b"POST /missing HTTP/1.1\r\nHost: x\r\nContent-Length: 150\r\n\r\n"
    assert wire.send(head + b"a" * 50).startswith(b"HTTP/1.1 405 ")  # answered from its head
    assert len(app.list_requests({})) == 1 and events == ["http.request"]
    wire.send(b"b" * 100)
    posted = app.list_requests({})[-1]
    assert posted["body"] == "a" * 50 + "b" * 50  # up to record_body
    assert (posted["body_size"], posted["body_truncated"]) == (150, True)
    assert "body_cut" not in posted and events == ["http.request"] * 2
    wire.send(head + b"c" * 10)
    wire.protocol.connectionLost(Failure(ConnectionDone()))  # the client leaves mid-body
    cut = app.list_requests({})[-1]
    assert (cut["body"], cut["body_size"], cut["body_cut"]) == ("c" * 10, 10, True)


def test_a_last_request_s_body_is_read_to_its_end_before_the_close(root: Path) -> None:
    app = make_app(root)
    wire = Wire(app, Limits(body_timeout=5))
    head = b"POST /missing HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 150\r\n\r\n"
    answered = wire.send(head + b"a" * 50)
    assert answered.startswith(b"HTTP/1.1 405 ") and b"Connection: close" in answered
    assert not wire.closed and not app.list_requests({})
    wire.send(b"b" * 100 + b"GET /a.txt HTTP/1.1\r\nHost: x\r\n\r\n")
    assert wire.closed and wire.take() == b""  # nothing answered after the last response
    [record] = app.list_requests({})
    assert (record["body_size"], record["body"]) == (150, "a" * 50 + "b" * 50)
    # A body that stops coming: closed after body_timeout, recorded as far as it came.
    stalled = Wire(app, Limits(header_timeout=1, body_timeout=5))
    stalled.send(head + b"c" * 10)
    stalled.protocol.clock.advance(5)
    assert stalled.closed and stalled.take() == b""  # no 408 after its answer


def test_a_stop_reads_an_answered_request_s_body_to_its_end_before_the_close(
    root: Path,
) -> None:
    app = make_app(root)
    wire = Wire(app, Limits(body_timeout=5))
    answered = wire.send(
        b"POST /a.txt HTTP/1.1\r\nHost: x\r\nContent-Length: 150\r\n\r\n" + b"a" * 50
    )
    assert answered.startswith(b"HTTP/1.1 405 ") and b"keep-alive" in answered
    wire.protocol.close_gracefully()
    assert not wire.closed  # the client still sending would be reset before reading its answer
    wire.send(b"b" * 100 + b"GET /a.txt HTTP/1.1\r\nHost: x\r\n\r\n")
    assert wire.closed and wire.take() == b""  # nothing answered after the stop
    [record] = app.list_requests({})
    assert record["body_size"] == 150


def test_a_stop_reads_the_body_of_a_request_not_yet_answered_to_its_end(
    tmp_path: Path,
) -> None:
    """A route that answers on the whole body (a proxy relaying it, a body match)."""
    app = app_for(tmp_path, '      - {path: /up, match: {body: {contains: end}}, body: "whole"}\n')
    wire = Wire(app, Limits(body_timeout=5))
    chunked = b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert wire.send(chunked + b"6\r\nstart-\r\n") == b""
    wire.protocol.close_gracefully()
    answered = wire.send(b"3\r\nend\r\n0\r\n\r\nGET /up HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answered.startswith(b"HTTP/1.1 200 ") and answered.endswith(b"\r\n\r\nwhole")
    assert b"Connection: close" in answered and wire.closed  # nothing answered after it


def test_tls_listeners_name_their_alpn_protocols(root: Path) -> None:
    app = make_app(root)
    with_h2 = factory_for(app, Limits(), tls=True, http2=True)
    without = factory_for(app, Limits(), tls=True, http2=False)
    plain = factory_for(app, Limits(), tls=False, http2=True)
    assert IProtocolNegotiationFactory.providedBy(with_h2)
    assert with_h2.acceptableProtocols() == [b"h2", b"http/1.1"]  # type: ignore[attr-defined]
    assert without.acceptableProtocols() == [b"http/1.1"]  # type: ignore[attr-defined]
    assert not IProtocolNegotiationFactory.providedBy(plain)


def test_nothing_is_answered_or_dispatched_after_the_client_leaves(root: Path) -> None:
    proxied: list[Exchange] = []
    cancelled: list[Exchange] = []

    def proxy(exchange: Exchange, route: Route, rest: str) -> None:
        proxied.append(exchange)
        exchange.proxy_cancel = lambda: cancelled.append(exchange)

    app = make_app(root, (Route("/api/", prefix=True, proxy="http://127.0.0.1:9/"),))
    app.proxy = proxy
    wire = Wire(app, Limits())
    pipelined = b"GET /api/a HTTP/1.1\r\nHost: x\r\n\r\nGET /api/b HTTP/1.1\r\nHost: x\r\n\r\n"
    assert wire.send(pipelined) == b"" and len(proxied) == 1
    wire.protocol.connectionLost()
    assert cancelled == proxied and getattr(proxied[0], "done", False)
    # What the proxy's failure path does after the cancel: nothing goes out, and
    # the queued request is not dispatched to a client that left.
    app.error(proxied[0], 502)
    proxied[0].finish()
    assert wire.take() == b"" and len(proxied) == 1


@pytest.mark.parametrize(
    ("target", "path"),
    [
        ("/a/b", "/a/b"),
        ("/a%20b/", "/a b/"),
        ("//a///b//", "/a/b/"),
        ("/%73ecret?x=%2f", "/secret"),
        ("http://h//a?q", "/a"),
        ("/%25", "/%"),
        ("/.well-known/x", "/.well-known/x"),
        ("/caf%C3%A9", "/café"),
        ("/a%2fb", None),
        ("/a%5Cb", None),
        ("/a/../b", None),
        ("/a/%2e/b", None),
        ("/a%00", None),
        ("*", None),
    ],
)
def test_one_normalised_path(target: str, path: str | None) -> None:
    assert _path_of(target) == path


def test_routes_and_redirects_see_the_normalised_path(root: Path) -> None:
    routes = (
        Route("/a.txt", prefix=False, status=403, body=b"no"),
        Route("/old/", prefix=True, redirect="/", status=301),
    )
    app = make_app(root, routes)
    for target in ("/a.txt", "/%61.txt", "//a.txt", "/dir/..%2fa.txt"):
        assert answer(app, target).status in (400, 403), target
    assert answer(app, "/old//evil.example/x?q").response_headers[b"Location"] == (
        b"/evil.example/x?q"
    )
    assert answer(app, "/old/a%20b").response_headers[b"Location"] == b"/a%20b"
    (root / "my dir").mkdir()
    assert answer(app, "/my%20dir").response_headers[b"Location"] == b"/my%20dir/"
    assert answer(app, "//dir").response_headers[b"Location"] == b"/dir/"


def test_chunked_trailers_are_bounded_and_kept_out_of_the_headers(root: Path) -> None:
    proxied: list[Exchange] = []

    def proxy(exchange: Exchange, route: Route, rest: str) -> None:
        proxied.append(exchange)  # and never answers

    app = make_app(root, (Route("/api/", prefix=True, proxy="http://127.0.0.1:9/"),))
    app.proxy = proxy
    limits = Limits(max_header_bytes=300)
    head = b"POST /api/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    fine = Wire(app, limits)
    assert fine.send(head + b"3\r\nabc\r\n0\r\nX-Trailer: t\r\n\r\n") == b""
    assert proxied[0].body.ended and proxied[0].headers[-1] == (b"Transfer-Encoding", b"chunked")
    endless = Wire(app, limits)
    assert endless.send(head + b"3\r\nabc\r\n0\r\nX-Trailer: ") == b""
    out = b"".join(endless.send(b"a" * 200) for _ in range(3))
    assert out.startswith(b"HTTP/1.1 431 ") and endless.closed
    extension = Wire(app, limits)
    extension.send(head + b"3;")
    out = b"".join(extension.send(b"e" * 200) for _ in range(3))
    assert out.startswith(b"HTTP/1.1 431 ") and extension.closed


class H2Wire:
    """An HTTP/2 connection (as if ALPN chose h2) over a StringTransport, and its client."""

    def __init__(self, app: App, limits: Limits) -> None:
        self.clock: Clock = app.clock
        self.transport = StringTransport()
        self.transport.negotiatedProtocol = b"h2"  # type: ignore[attr-defined]
        self.protocol = HTTPConnection(factory_for(app, limits, tls=True, http2=True))
        self.protocol.makeConnection(self.transport)
        self.client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.client.initiate_connection()
        self.events: list[h2.events.Event] = []

    def send(self) -> None:
        self.protocol.dataReceived(self.client.data_to_send())
        for _ in range(20):  # twisted's sending loop runs from callLater(0)
            self.clock.advance(0)
        self.events += self.client.receive_data(self.transport.value())
        self.transport.clear()

    def statuses(self) -> dict[int, bytes]:
        return {
            e.stream_id: dict(e.headers)[b":status"]
            for e in self.events
            if isinstance(e, h2.events.ResponseReceived)
        }


def _waiting_proxy(root: Path) -> tuple[App, list[Exchange]]:
    """An app whose C{/api/} proxy takes each exchange and never answers."""
    proxied: list[Exchange] = []
    app = make_app(root, (Route("/api/", prefix=True, proxy="http://127.0.0.1:9/"),))

    def proxy(exchange: Exchange, route: Route, rest: str) -> None:
        exchange.body.want()  # as the proxy's upload does
        proxied.append(exchange)

    app.proxy = proxy
    return app, proxied


_H2_POST = [(":method", "POST"), (":path", "/api/x"), (":scheme", "https"), (":authority", "x")]


def test_h2_body_over_the_limit_is_refused_at_once(root: Path) -> None:
    app, _ = _waiting_proxy(root)
    wire = H2Wire(app, Limits(max_body=10))
    request = list(_H2_POST)
    # The whole body and END_STREAM in one read: refused at the crossing DATA.
    wire.client.send_headers(1, request)
    wire.client.send_data(1, b"x" * 20, end_stream=True)
    wire.send()
    assert wire.statuses() == {1: b"413"}
    # Declared too large: refused at the headers; the body already on its way
    # (same read) is dropped, and given back to the connection's window.
    wire.client.send_headers(3, [*request, ("content-length", "60000")])
    for _ in range(4):
        wire.client.send_data(3, b"y" * 15000)
    wire.send()
    assert wire.statuses()[3] == b"413"
    resets = [e for e in wire.events if isinstance(e, h2.events.StreamReset)]
    assert [e.stream_id for e in resets] == [3] and resets[0].error_code == 0
    assert wire.client.outbound_flow_control_window > 30000  # kept, it would be 5515
    wire.client.send_headers(5, [*request[:1], (":path", "/a.txt"), *request[2:]], end_stream=True)
    wire.send()
    assert wire.statuses()[5] == b"405"  # POST on the root: the connection carries on


def test_h2_offers_extended_connect_only_without_proxy_routes(root: Path) -> None:
    for app, offered in ((make_app(root), 1), (_waiting_proxy(root)[0], 0)):
        wire = H2Wire(app, Limits())
        wire.send()
        assert wire.client.remote_settings.enable_connect_protocol == offered


def test_a_body_waiting_for_its_taker_pauses_the_client_past_a_bound() -> None:
    body = BodyStream(None, 0)
    calls: list[str] = []
    body.pause = lambda: calls.append("pause")
    body.resume = lambda: calls.append("resume")
    body.want()  # an upstream still connecting
    chunk = b"x" * (64 * 1024)
    for _ in range(HELD_MAX // len(chunk)):
        body.feed(chunk)
    assert calls == []
    body.feed(chunk)
    body.feed(chunk)  # what was in flight still lands, once paused
    assert calls == ["pause"]
    taken = bytearray()
    body.take(taken.extend, lambda: None)
    assert (len(taken), calls) == (HELD_MAX + 2 * len(chunk), ["pause", "resume"])


def _send(wire: H2Wire, byte: bytes, frames: int, end: bool = False) -> None:
    for index in range(frames):
        wire.client.send_data(1, byte * 10000, end_stream=end and index == frames - 1)
    wire.send()


def test_h2_body_streams_to_its_taker_at_its_pace(root: Path) -> None:
    app, proxied = _waiting_proxy(root)
    wire = H2Wire(app, Limits(max_body=1 << 20))
    wire.client.send_headers(1, [*_H2_POST, ("content-length", "100000")])
    _send(wire, b"a", 1)
    # Handed over at its headers, with what came of its body so far.
    (exchange,) = proxied
    received = bytearray()
    exchange.body.take(received.extend, lambda: received.extend(b"<end>"))
    assert (exchange.body.expected, bytes(received)) == (100000, b"a" * 10000)
    _send(wire, b"b", 3)
    # Taken as it came: the window is given back (h2 does it by halves).
    assert wire.client.local_flow_control_window(1) == 65535
    exchange.body.pause()  # the upstream is slow: the window stays used
    _send(wire, b"c", 4)
    assert len(received) == 40000
    assert wire.client.local_flow_control_window(1) == 65535 - 40000
    exchange.body.resume()
    wire.send()
    assert len(received) == 80000
    assert wire.client.local_flow_control_window(1) == 65535
    _send(wire, b"d", 2, end=True)
    assert bytes(received) == b"a" * 10000 + b"b" * 30000 + b"c" * 40000 + b"d" * 20000 + b"<end>"


def _answered_before_its_body(root: Path) -> tuple[App, H2Wire]:
    """Half of a 100,000-byte body in, 40,000 of it held while paused, then the answer."""
    app, proxied = _waiting_proxy(root)
    wire = H2Wire(app, Limits(max_body=1 << 20, body_timeout=5))
    wire.client.send_headers(1, [*_H2_POST, ("content-length", "100000")])
    _send(wire, b"a", 1)
    (exchange,) = proxied
    exchange.body.pause()
    _send(wire, b"b", 4)
    assert wire.client.outbound_flow_control_window == 65535 - 50000
    exchange.respond(200, [], b"early\n")  # an upstream that answers at once
    wire.send()
    assert wire.statuses() == {1: b"200"}
    assert app.records == deque()  # its body still comes: recorded at its end
    return app, wire


def _resets(wire: H2Wire) -> list[tuple[int, int]]:
    return [
        (e.stream_id, e.error_code) for e in wire.events if isinstance(e, h2.events.StreamReset)
    ]


def test_h2_answer_before_the_body_reads_the_rest_for_the_record(root: Path) -> None:
    app, wire = _answered_before_its_body(root)
    _send(wire, b"c", 5, end=True)
    assert _resets(wire) == []
    (record,) = app.records
    assert (record["status"], record["body_size"], record["protocol"]) == (200, 100000, "HTTP/2")
    assert record["body"] == "a" * 100 and "body_cut" not in record  # record_body: 100
    draining = wire.protocol.h2._drain  # type: ignore[union-attr]
    assert not [call for call in wire.clock.getDelayedCalls() if call.func == draining]


def test_h2_answer_before_a_body_that_stops_resets_the_stream_in_time(root: Path) -> None:
    app, wire = _answered_before_its_body(root)
    wire.clock.advance(4)
    _send(wire, b"c", 1)  # more of it within body_timeout (5 s): it waits another
    wire.clock.advance(1)
    wire.clock.advance(4)
    assert _resets(wire) == [] and not app.records
    wire.clock.advance(1)
    wire.send()
    assert _resets(wire) == [(1, 0)]  # NO_ERROR: stop sending
    (record,) = app.records
    assert (record["body_size"], record["body_cut"]) == (60000, True)


@pytest.mark.parametrize(("complete", "code"), [(True, 0), (False, 8)], ids=["whole", "started"])
def test_h2_a_body_crossing_the_limit_after_its_answer_resets_by_how_far_the_answer_got(
    root: Path, complete: bool, code: int
) -> None:
    app, proxied = _waiting_proxy(root)
    wire = H2Wire(app, Limits(max_body=25000, body_timeout=5))
    wire.client.send_headers(1, _H2_POST)  # no Content-Length: refused only as it crosses
    _send(wire, b"a", 1)
    (exchange,) = proxied
    if complete:
        exchange.respond(200, [], b"early\n")
    else:
        exchange.start(200, [], None)
        exchange.write(b"early\n")
    _send(wire, b"b", 2)
    # RFC 9113 8.1: after a complete response, the client is asked to stop
    # sending without error (NO_ERROR), and keeps its response; during one, CANCEL.
    assert wire.statuses() == {1: b"200"} and _resets(wire) == [(1, code)]


def _timed_out(wire: H2Wire) -> None:
    """Past keepalive_timeout: GOAWAY sent, and the transport, like TLS to a
    client that reads nothing, not gone yet (StringTransport never goes)."""
    wire.clock.advance(5)
    assert wire.transport.disconnecting
    events = wire.client.receive_data(wire.transport.value())
    assert isinstance(events[-1], h2.events.ConnectionTerminated)
    wire.transport.clear()


def test_h2_an_answer_owed_when_the_connection_times_out_is_not_written(root: Path) -> None:
    app, proxied = _waiting_proxy(root)
    wire = H2Wire(app, Limits(keepalive_timeout=5))
    # Its body stalls: the connection times out while the proxy works on it.
    wire.client.send_headers(1, [*_H2_POST, ("content-length", "100")])
    wire.client.send_data(1, b"x" * 10)
    wire.send()
    (exchange,) = proxied
    cancelled: list[bool] = []
    exchange.proxy_cancel = lambda: cancelled.append(True)
    _timed_out(wire)
    # What the proxy then answers (its 502 after the cancel) goes nowhere:
    # h2's state machine, closed by the GOAWAY, raised ProtocolError here.
    exchange.respond(502, [], b"502 Bad Gateway\n")
    wire.clock.advance(0)
    assert wire.transport.value() == b""
    assert cancelled == [True] and exchange.done  # its upstream let go at the timeout


def test_h2_an_answer_queued_when_the_connection_times_out_is_dropped(root: Path) -> None:
    app, proxied = _waiting_proxy(root)
    wire = H2Wire(app, Limits(keepalive_timeout=5))
    wire.client.send_headers(1, _H2_POST, end_stream=True)
    wire.send()
    (exchange,) = proxied
    h2_connection = wire.protocol.h2
    assert h2_connection is not None
    h2_connection.pauseProducing()  # the client reads nothing: TCP backs up
    exchange.respond(200, [], b"late\n")  # answered whole, queued behind the transport
    _timed_out(wire)
    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        # The transport drains: the sending loop raised ProtocolError for the
        # queued DATA, an "Unhandled error in Deferred".
        h2_connection.resumeProducing()
        wire.clock.advance(0)
        gc.collect()
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert [repr(event["log_failure"].value) for event in seen if "log_failure" in event] == []
    assert b"late" not in wire.transport.value()


@implementer(IStreamClientEndpoint)
class _FakeUpstream:
    """An endpoint whose every connection is a StringTransport."""

    def __init__(self) -> None:
        self.transports: list[StringTransport] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.transports.append(transport)
        return succeed(protocol)


def _upstream_connection(pool: HTTPConnectionPool, upstream: _FakeUpstream) -> Any:
    connections: list[Any] = []
    pool.getConnection("upstream", upstream).addCallback(connections.append)
    return connections[0]


def _proxied_once(pool: HTTPConnectionPool, upstream: _FakeUpstream, answer: bytes) -> Any:
    """One request over a connection from the pool, answered with C{answer}."""
    connection = _upstream_connection(pool, upstream)
    request = Request(b"GET", b"/", TwistedHeaders({b"host": [b"upstream"]}), None, True)
    responses: list[Any] = []
    connection.request(request).addCallback(responses.append)
    connection.dataReceived(answer)
    assert responses[0].code in (200, 204)
    return connection


@pytest.mark.parametrize(
    ("answer", "reused"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", True),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", False),
        (b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 2\r\n\r\nok", True),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", False),
        (b"HTTP/1.1 200 OK\r\nConnection: Close\r\nContent-Length: 2\r\n\r\nok", False),
        (b"HTTP/1.1 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 2\r\n\r\nok", False),
        (
            b"HTTP/1.1 200 OK\r\nConnection: x\r\nConnection: CLOSE\r\nContent-Length: 0\r\n\r\n",
            False,
        ),
        (b"HTTP/1.1 204 No Content\r\n\r\n", True),
        (b"HTTP/1.0 204 No Content\r\n\r\n", False),
    ],
)
def test_the_proxy_pools_an_upstream_connection_only_if_the_upstream_keeps_it(
    answer: bytes, reused: bool
) -> None:
    """RFC 9112 9.3: HTTP/1.0 persists with keep-alive only; any version ends on close."""
    pool = Proxy(Clock(), ServiceStats(), Logger()).pool
    upstream = _FakeUpstream()
    first = _proxied_once(pool, upstream, answer)
    assert upstream.transports[0].disconnecting is not reused
    assert (_upstream_connection(pool, upstream) is first) is reused
    assert len(upstream.transports) == (1 if reused else 2)


def test_a_pooled_upstream_connection_closed_while_idle_is_not_used_again() -> None:
    """The keep-alive timeout race: the pool skips a connection lost while it waited."""
    pool = Proxy(Clock(), ServiceStats(), Logger()).pool
    upstream = _FakeUpstream()
    first = _proxied_once(pool, upstream, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    first.connectionLost(Failure(ConnectionDone()))
    second = _upstream_connection(pool, upstream)
    assert second is not first and second.state == "QUIESCENT"
    assert len(upstream.transports) == 2


def test_requests_build_no_event_while_nobody_can_read_the_journal(tmp_path: Path) -> None:
    reactor = ListeningReactor()
    config = parse_config(
        "services: {web: {type: http, listen: 'tcp:0', routes: [{path: /, body: ok}]}}\n",
        tmp_path / "netd.yaml",
    )
    journal = Journal(reactor, active=False)  # no admin API, no events in the log
    RunningService(config.services["web"], reactor, tmp_path, journal, {}, tmp_path).listen()
    _, factory, _, _ = reactor.tcpServers[0]
    connection = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
    transport = StringTransport()
    connection.makeConnection(transport)

    connection.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 200 ")
    assert journal.select(types=["http.request"]) == []

    journal.active = True  # a reload that adds the admin API
    connection.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    (event,) = journal.select(types=["http.request"])
    assert (event.fields["path"], event.fields["status"]) == ("/", 200)


def test_h2_a_connection_waiting_for_an_answer_times_out_on_keepalive_after_it(
    root: Path,
) -> None:
    app, proxied = _waiting_proxy(root)
    wire = H2Wire(app, Limits(keepalive_timeout=5))
    wire.client.send_headers(1, _H2_POST, end_stream=True)
    wire.send()
    (exchange,) = proxied
    wire.clock.advance(12)  # its answer is owed: not idle
    assert not wire.transport.disconnecting
    exchange.respond(200, [], b"late\n")
    wire.send()
    assert wire.statuses() == {1: b"200"}
    # Idle from its answer on: keepalive_timeout, not the core's idle sweep.
    wire.clock.advance(4.9)
    assert not wire.transport.disconnecting
    wire.clock.advance(0.1)
    assert wire.transport.disconnecting


def test_h2_a_client_going_away_gets_its_answers_then_the_connection_closes(root: Path) -> None:
    app, proxied = _waiting_proxy(root)
    wire = H2Wire(app, Limits(keepalive_timeout=5))
    wire.client.send_headers(1, _H2_POST, end_stream=True)
    wire.client.send_headers(3, _H2_POST, end_stream=True)
    wire.send()
    # RFC 9113 6.8: its last stream ID, 0, is about streams netd would open.
    # (Sent around the client's h2, which could then read no answer.)
    wire.protocol.dataReceived(GoAwayFrame(0, last_stream_id=0).serialize())
    first, second = proxied
    first.respond(200, [], b"one\n")
    wire.send()
    assert wire.statuses() == {1: b"200"} and not wire.transport.disconnecting
    wire.clock.advance(6)  # its other answer is owed: keepalive_timeout waits
    second.respond(200, [], b"two\n")
    wire.send()
    assert wire.statuses() == {1: b"200", 3: b"200"}
    assert wire.transport.disconnecting and wire.transport.producer is None
    data = [(e.stream_id, e.data) for e in wire.events if isinstance(e, h2.events.DataReceived)]
    assert [chunk for chunk in data if chunk[1]] == [(1, b"one\n"), (3, b"two\n")]
    (goaway,) = [e for e in wire.events if isinstance(e, h2.events.ConnectionTerminated)]
    assert (goaway.error_code, goaway.last_stream_id) == (0, 3)
