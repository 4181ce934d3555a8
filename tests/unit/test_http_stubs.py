"""
Stub routes without sockets: matching on the whole request, priorities, the
closest route named when none matches, templated and sequenced answers, and
routes added at run time, through L{App} and a fake exchange.
"""

from __future__ import annotations

import gc
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger

from netd import schema
from netd.events import Journal, ServiceStats
from netd.kinds import ViewRefused
from netd.schema import ConfigErrors
from netd.services.http import Options, _route
from netd.services.http.app import App, BodyStream
from netd.services.http.match import NOT_JSON, json_subset, subset_test
from netd.services.http.stubs import RoutesView
from netd.services.http.template import Template, TemplateError
from netd.services.http.wire import HTTPConnection, Limits, factory_for
from tests.fakes.exchanges import FakeExchange
from tests.maps import ServiceMap
from tests.unit.test_config import LAUGHS, MERGES_AS_PYYAML

WEB = ServiceMap("http", "web", Options)


def app_for(tmp_path: Path, routes: str, clock: Clock | None = None) -> App:
    return app_of(WEB.parse(tmp_path, "    routes:\n" + routes), clock)


def app_of(options: Options, clock: Clock | None = None) -> App:
    clock = clock or Clock()
    if not clock.seconds():
        clock.advance(1_700_000_000)
    journal = Journal(clock)
    return App(
        clock=clock,
        routes=options.routes,
        files=None,
        record=10,
        record_body=100,
        access_log=False,
        log=Logger(namespace="netd.test"),
        stats=ServiceStats(),
        emit=lambda type, **fields: journal.emit("web", type, **fields),
        proxy=None,
    )


def ask(
    app: App,
    target: str,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    arrives_later: bool = False,
) -> FakeExchange:
    """One request; its body comes in after the head when C{arrives_later}."""
    exchange = FakeExchange(
        method,
        target,
        [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
    )
    exchange.body = BodyStream(len(body or b""), 100, app.reads_bodies)
    if body is not None and not arrives_later:
        exchange.body.feed(body)
    if not arrives_later:
        exchange.body.end()
    app.handle(exchange)
    if arrives_later:
        assert exchange.status == 0  # waiting on the body
        exchange.body.feed(body or b"")
        exchange.body.end()
    app.completed(exchange)
    return exchange


MATCHING = """\
      - {id: exact, path: /users, method: GET, body: "list"}
      - {id: glob, path: "/users/*/orders", body: "orders"}
      - {id: deep, path: "/files/**", body: "file"}
      - id: regex
        path: {regex: "/items/(?P<id>[0-9]+)"}
        body: "item"
      - id: query
        path: /search
        match: {query: {q: {contains: netd}, page: "2", debug: {absent: true}}}
        body: "found"
      - id: headers
        path: /h
        match: {headers: {X-Api-Key: {regex: "^k-[0-9]+$"}, Accept: {contains: json}}}
        body: "header"
      - id: cookies
        path: /c
        match: {cookies: {session: abc}}
        body: "cookie"
      - id: json
        path: /orders
        method: POST
        match: {body: {json: {customer: {name: alice}, items: [{sku: A}]}}}
        status: 201
        body: "json"
      - id: jsonpath
        path: /orders
        method: POST
        match: {body: {jsonpath: [{path: "$.customer.name", equals: bob}, "$.items[?@.qty > 5]"]}}
        body: "bulk"
      - id: form
        path: /login
        method: POST
        match: {body: {form: {user: alice, password: {regex: "."}}}}
        body: "welcome"
      - id: text
        path: /text
        match: {body: {contains: hello, regex: "world$"}}
        body: "text"
      - {id: low, path: /p, body: "low"}
      - {id: high, path: /p, priority: 1, body: "high"}
"""


def test_the_request_picks_its_route(tmp_path: Path) -> None:
    app = app_for(tmp_path, MATCHING)

    def body(target: str, **kwargs: Any) -> bytes:
        exchange = ask(app, target, **kwargs)
        assert exchange.status in (200, 201), (target, exchange.data)
        return exchange.data

    assert body("/users") == b"list"
    assert ask(app, "/users", "DELETE").status == 404
    assert body("/users/7/orders") == b"orders"
    assert ask(app, "/users/7/8/orders").status == 404  # '*' stays in its segment
    assert body("/files/a/b/c.txt") == b"file"
    assert body("/items/42") == b"item" and ask(app, "/items/42x").status == 404
    assert body("/search?q=about+netd&page=2") == b"found"
    assert ask(app, "/search?q=netd&page=2&debug=1").status == 404
    assert body("/h", headers={"X-Api-Key": "k-12", "Accept": "application/json"}) == b"header"
    assert ask(app, "/h", headers={"X-Api-Key": "k-x", "Accept": "application/json"}).status == 404
    assert body("/c", headers={"Cookie": "a=1; session=abc"}) == b"cookie"
    order = {"customer": {"name": "alice", "id": 3}, "items": [{"sku": "A", "qty": 1}]}
    assert body("/orders", method="POST", body=json.dumps(order).encode()) == b"json"
    bulk = {"customer": {"name": "bob"}, "items": [{"sku": "B", "qty": 9}]}
    assert body("/orders", method="POST", body=json.dumps(bulk).encode()) == b"bulk"
    two_items = {"customer": {"name": "alice"}, "items": [{"sku": "A"}, {"sku": "A"}]}
    assert ask(app, "/orders", "POST", json.dumps(two_items).encode()).status == 404
    assert ask(app, "/orders", "POST", b"{not json").status == 404
    assert body("/login", method="POST", body=b"user=alice&password=x") == b"welcome"
    assert body("/text", body=b"hello world") == b"text"
    assert body("/p") == b"high"


def test_a_body_that_arrives_after_the_head_is_waited_for(tmp_path: Path) -> None:
    app = app_for(tmp_path, MATCHING)
    order = {"customer": {"name": "alice"}, "items": [{"sku": "A"}]}
    exchange = ask(app, "/orders", "POST", json.dumps(order).encode(), arrives_later=True)
    assert (exchange.status, exchange.data) == (201, b"json")
    # The record keeps the body as it came.
    assert app.list_requests({})[-1]["body"] == json.dumps(order)


@pytest.mark.parametrize("arrives_later", [False, True])
def test_a_route_after_one_that_read_the_body_gets_it_whole(
    tmp_path: Path, arrives_later: bool
) -> None:
    """The body a route's match read is held again for the proxy route that takes the request."""
    app = app_for(
        tmp_path,
        """\
      - {id: vip, path: /orders, match: {body: {json: {tier: gold}}}, body: "vip"}
      - {id: upstream, path: /orders, proxy: "http://127.0.0.1:9/"}
""",
    )
    taken: list[bytes] = []

    def proxy(exchange: Any, route: Any, rest: str) -> None:
        exchange.body.take(taken.append, lambda: exchange.respond(200, [], b"".join(taken)))

    app.proxy = proxy
    order = b'{"tier": "silver", "items": [1, 2]}'
    exchange = ask(app, "/orders", "POST", order, arrives_later=arrives_later)
    assert (exchange.route, exchange.data) == ("upstream", order)
    assert ask(app, "/orders", "POST", b'{"tier": "gold"}', arrives_later=arrives_later).data == (
        b"vip"
    )


def test_a_body_in_the_same_read_as_its_head_is_matched_in_one_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A request of known length whose body came with its head is handled once
    the body is in: its route matches at once, without waiting for the body
    (a stub's common case, and a second pass through the routes saved).
    """
    app = app_for(tmp_path, MATCHING)
    waits: list[int] = []
    after_body = app._after_body
    monkeypatch.setattr(app, "_after_body", lambda *args: (waits.append(1), after_body(*args))[1])
    wire = HTTPConnection(factory_for(app, Limits(), tls=False, http2=False))
    transport = StringTransport()
    wire.makeConnection(transport)
    order = json.dumps({"customer": {"name": "alice"}, "items": [{"sku": "A"}]}).encode()
    head = b"POST /orders HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(order)
    wire.dataReceived(head + order)
    assert transport.value().startswith(b"HTTP/1.1 201 ") and waits == []
    transport.clear()
    # Its body split across reads: handled at the end of the first read, it waits.
    wire.dataReceived(head + order[:5])
    assert transport.value() == b"" and waits == [1]
    wire.dataReceived(order[5:])
    assert transport.value().startswith(b"HTTP/1.1 201 ")


def test_a_route_that_does_not_read_the_body_answers_before_it_is_in(tmp_path: Path) -> None:
    """Holding a request back until its body is in lasts one read at most."""
    app = app_for(tmp_path, MATCHING + "      - {id: upload, path: /upload, body: thanks}\n")
    wire = HTTPConnection(factory_for(app, Limits(), tls=False, http2=False))
    transport = StringTransport()
    wire.makeConnection(transport)
    wire.dataReceived(b"PUT /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nabc")
    assert transport.value().endswith(b"\r\n\r\nthanks")


def test_a_request_whose_body_is_matched_leaves_no_cycle(tmp_path: Path) -> None:
    """
    Objects of a request are freed when it is answered, by reference counting:
    garbage in cycles would make every request pay for collections of the young
    generation (the body-matching path once left 23 objects a request).
    """
    app = app_for(tmp_path, MATCHING)
    wire = HTTPConnection(factory_for(app, Limits(), tls=False, http2=False))
    transport = StringTransport()
    wire.makeConnection(transport)
    order = json.dumps({"customer": {"name": "alice"}, "items": [{"sku": "A"}]}).encode()
    request = b"POST /orders HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (
        len(order),
        order,
    )
    wire.dataReceived(request)  # caches and the first request's lasting state
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(5):
            wire.dataReceived(request)
            # The same body again, after the head: the wait for it is a second path.
            wire.dataReceived(request[: -len(order)])
            wire.dataReceived(order)
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert transport.value().count(b"HTTP/1.1 201 ") == 11
    assert left == []


def test_an_unmatched_request_names_the_closest_route(tmp_path: Path) -> None:
    app = app_for(tmp_path, MATCHING)
    missed = ask(app, "/search?q=netd&page=3")
    assert missed.status == 404
    text = missed.data.decode()
    assert "no route matched GET /search" in text
    assert "closest route: query (/search)" in text
    assert 'query page: expected "2", got "3"' in text
    [record] = app.list_requests({"unmatched": "true"})
    assert record["unmatched"] and record["route"] is None
    assert record["near_miss"] == {
        "route": "query",
        "path": "/search",
        "mismatches": ['query page: expected "2", got "3"'],
    }
    wrong_body = ask(app, "/orders", "POST", b'{"customer": {"name": "carol"}, "items": []}')
    assert "closest route: json" in wrong_body.data.decode()
    assert "body: expected JSON with" in wrong_body.data.decode()
    typo = ask(app, "/userz")
    assert "closest route: exact (/users)" in typo.data.decode()
    assert "path: expected /users, got /userz" in typo.data.decode()
    assert [r["route"] for r in app.list_requests({})] == [None, None, None]
    ask(app, "/users")
    assert app.list_requests({})[-1]["route"] == "exact"
    assert len(app.list_requests({"unmatched": "1"})) == 3


def test_header_and_cookie_values_are_utf8_or_else_latin1(tmp_path: Path) -> None:
    app = app_for(
        tmp_path,
        "      - path: /utf\n"
        "        match: {headers: {X-Name: café}, cookies: {who: zoë}}\n"
        "        template: true\n"
        "        body: '{{request.headers.X-Name}} {{request.cookies.who}}'\n",
    )
    utf8 = ask(app, "/utf", headers={"X-Name": "café", "Cookie": "who=zoë"})
    assert utf8.data == "café zoë".encode()
    latin1 = FakeExchange("GET", "/utf", [(b"x-name", b"caf\xe9"), (b"cookie", b"who=zo\xeb")])
    app.handle(latin1)
    assert latin1.data == "café zoë".encode()


def test_a_header_sent_twice_matches_on_either_line_and_cookie_lines_join(
    tmp_path: Path,
) -> None:
    app = app_for(tmp_path, MATCHING)
    twice = FakeExchange(
        "GET",
        "/h",
        [(b"x-api-key", b"k-1"), (b"x-api-key", b"other"), (b"accept", b"application/json")],
    )
    app.handle(twice)
    assert twice.data == b"header"  # as WireMock: one line of the two is enough
    cookies = FakeExchange("GET", "/c", [(b"cookie", b"a=1"), (b"cookie", b"session=abc")])
    app.handle(cookies)
    assert cookies.data == b"cookie"  # "a=1; session=abc", not "a=1, session=abc"
    neither = FakeExchange("GET", "/h", [(b"x-api-key", b"k-1"), (b"accept", b"text/html")])
    app.handle(neither)
    assert neither.status == 404


def test_the_closest_route_is_the_one_with_the_closest_path(tmp_path: Path) -> None:
    app = app_for(
        tmp_path,
        "      - {id: orders, path: /orders, method: POST,"
        " match: {headers: {Content-Type: {contains: json}}}, body: o}\n"
        "      - {id: seq, path: /seq, body: s}\n",
    )
    assert "closest route: orders (/orders)" in ask(app, "/order").data.decode()
    assert "closest route: seq (/seq)" in ask(app, "/seqs").data.decode()


def test_map_errors_name_their_key(tmp_path: Path) -> None:
    found = "\n".join(
        WEB.errors(
            tmp_path,
            "    routes:\n"
            "      - {path: {regex: '(unclosed'}, body: x}\n"
            "      - {path: /a, match: {query: {q: {absent: true, equals: x}}}, body: x}\n"
            "      - {path: /b, match: {body: {jsonpath: '$[?'}}, body: x}\n"
            "      - {path: /c, match: {colour: red}, body: x}\n"
            "      - {path: /d, template: true, body: '{{open(\"/etc/passwd\")}}'}\n"
            "      - {path: /e, responses: [], body: x}\n"
            "      - {id: same, path: /f, body: x}\n"
            "      - {id: same, path: /g, body: x}\n"
            "      - {path: /h, json: {a: 1}, body: x}\n",
        )
    )
    assert "routes[0].path.regex: not a regular expression" in found
    assert "routes[1].match.query.q: absent stands alone" in found
    assert "routes[2].match.body.jsonpath: not a JSONPath query" in found
    assert "routes[3].match.colour: unknown key" in found
    assert "routes[4].body: not a template" in found
    assert "routes[5]: give responses or one answer" in found
    assert "routes[7]: another route has the id 'same'" in found
    assert "routes[8]: give one of body, body_file and json" in found


def test_a_header_given_as_a_list_is_sent_once_for_each_value(tmp_path: Path) -> None:
    app = app_for(
        tmp_path,
        "      - {path: /canned, body: x, headers: {Set-Cookie: [a=1, b=2], X-One: y}}\n"
        "      - path: /stub\n"
        "        template: true\n"
        "        headers: {Set-Cookie: ['m={{request.method}}', 'n=1; Expires=Wed, 21 Oct 2015']}\n"
        "        body: x\n",
    )
    transport = StringTransport()
    connection = HTTPConnection(factory_for(app, Limits(), tls=False, http2=False))
    connection.makeConnection(transport)
    connection.dataReceived(b"GET /canned HTTP/1.1\r\nHost: x\r\n\r\n")
    assert re.findall(rb"\r\nSet-Cookie: ([^\r]*)", transport.value()) == [b"a=1", b"b=2"]
    assert b"\r\nX-One: y\r\n" in transport.value()
    transport.clear()
    connection.dataReceived(b"GET /stub HTTP/1.1\r\nHost: x\r\n\r\n")
    cookies = re.findall(rb"\r\nSet-Cookie: ([^\r]*)", transport.value())
    assert cookies == [b"m=GET", b"n=1; Expires=Wed, 21 Oct 2015"]
    found = "\n".join(
        WEB.errors(tmp_path, "    routes: [{path: /a, body: x, headers: {X: [ok, {no: 1}]}}]\n")
    )
    assert "routes[0].headers.X[1]: expected a string" in found


TEMPLATES = """\
      - id: echo
        path: {regex: "/users/(?P<user>[a-z]+)/(?P<n>[0-9]+)"}
        template: true
        headers: {X-User: "{{request.path.user}}", X-Agent: "{{request.headers.User-Agent}}"}
        body: "{{request.method}} {{request.path.0}} n={{request.path.n}}\\
          \\ q={{request.query.q | 'none'}} c={{counter}}"
      - id: json
        path: /orders
        template: true
        status: 201
        json:
          id: "{{uuid}}"
          name: "{{request.json.name}}"
          first: "{{request.json.items.0}}"
          count: "{{counter}}"
          at: "{{now}}"
          epoch: "{{now.epoch}}"
          said: "you said {{request.json.name}}"
          session: "{{request.cookies.session}}"
      - id: literal
        path: /literal
        json: {text: "{{request.method}}"}
      - id: sequence
        path: /flaky
        responses:
          - {status: 503, body: "try again"}
          - {status: 503, body: "try again"}
          - {status: 200, json: {ok: true}}
      - id: slow
        path: /slow
        delay: 2.5
        body: "late"
"""


def test_answers_are_built_from_the_request(tmp_path: Path) -> None:
    app = app_for(tmp_path, TEMPLATES)
    first = ask(app, "/users/ann/7?q=x", headers={"User-Agent": "curl/8"})
    assert first.data == b"GET users n=7 q=x c=1"
    assert first.response_headers[b"X-User"] == b"ann"
    assert first.response_headers[b"X-Agent"] == b"curl/8"
    assert ask(app, "/users/bob/8").data == b"GET users n=8 q=none c=2"
    order = {"name": "alice", "items": [{"sku": "A"}]}
    made = ask(app, "/orders", "POST", json.dumps(order).encode(), {"Cookie": "session=s1"})
    assert made.status == 201
    assert made.response_headers[b"Content-Type"] == b"application/json"
    document = json.loads(made.data)
    assert len(document["id"]) == 36 and document["name"] == "alice"
    assert document["first"] == {"sku": "A"} and document["count"] == 1
    assert document["at"] == "2023-11-14T22:13:20Z" and document["epoch"] == 1_700_000_000
    assert document["said"] == "you said alice" and document["session"] == "s1"
    assert json.loads(ask(app, "/literal").data) == {"text": "{{request.method}}"}


def test_hostile_requests_render_as_text(tmp_path: Path) -> None:
    """What the request holds is inserted once, as data: never read as a template or JSON."""
    app = app_for(tmp_path, TEMPLATES)
    hostile = '{{request.headers.Authorization}}", "admin": true, "x": "\u2028'
    made = ask(
        app,
        "/orders",
        "POST",
        json.dumps({"name": hostile}).encode(),
        {"Authorization": "Bearer secret"},
    )
    document = json.loads(made.data)
    assert document["name"] == hostile and "admin" not in document
    assert b"secret" not in made.data
    # A header value cannot end the header and start another.
    split = ask(app, "/users/ann/1", headers={"User-Agent": "a\r\nSet-Cookie: x=1"})
    assert split.response_headers[b"X-Agent"] == b"aSet-Cookie: x=1"
    assert b"Set-Cookie" not in split.response_headers


@pytest.mark.parametrize(
    "source",
    [
        "{{__import__('os').system('id')}}",
        "{{request.__class__}}",
        "{{request.exchange.connection}}",
        "{{ ''.join }}",
        "{{open('/etc/passwd').read()}}",
        "{{config}}",
        "{{request.headers}}",
        "{{request.query.a.b}}",
        "{% include '/etc/passwd' %}{{",
        "{{request.method | default}}",
        "{{request.method}} {{",
        "{{{request.method}}}",
        "{{file:/etc/passwd}}",
        "{{ request.body | 'x' | 'y' }}",
    ],
)
def test_hostile_templates_are_refused_when_read(source: str) -> None:
    with pytest.raises(TemplateError):
        Template(source)


def test_braces_outside_a_place_are_text(tmp_path: Path) -> None:
    """As in Handlebars: a stray }} is text (nested JSON ends so), \\{{ the text {{."""
    app = app_for(
        tmp_path,
        "      - path: /nested\n"
        "        template: true\n"
        """        body: '{"user": {"name": "{{request.query.name}}"}}'\n"""
        "      - path: /escaped\n"
        "        template: true\n"
        "        json: {text: '\\{{request.method}} is {{request.method}}'}\n",
    )
    assert json.loads(ask(app, "/nested?name=ann").data) == {"user": {"name": "ann"}}
    assert json.loads(ask(app, "/escaped").data) == {"text": "{{request.method}} is GET"}


@pytest.mark.parametrize(
    ("body", "answer"),
    [
        (r"a \{{ b", "a {{ b"),
        (r"a \{{ b }}", "a {{ b }}"),
        (r"\{{ {{request.method}}", "{{ GET"),
        (r"\{{{request.method}}}", "{{{request.method}}}"),
        (r"\\{{request.method}}", "\\GET"),
        (r"\\\{{request.method}}", "\\\\GET"),
        (r"a\b {{request.method}}", "a\\b GET"),
    ],
)
def test_backslash_escapes_as_in_handlebars(tmp_path: Path, body: str, answer: str) -> None:
    """\\{{ is the text {{ with or without a }} after it; \\\\{{ a backslash before a place."""
    app = app_for(tmp_path, f"      - {{path: /t, template: true, body: '{body}'}}\n")
    assert ask(app, "/t").data.decode() == answer


def test_json_in_and_out_is_json_only(tmp_path: Path) -> None:
    """RFC 8259 has no NaN or Infinity: a request holding them is not JSON, nor is a map's."""
    app = app_for(
        tmp_path,
        "      - {path: /echo, template: true, json: {v: '{{request.json.v}}'}}\n"
        "      - {path: /any, match: {body: {jsonpath: $.v}}, body: matched}\n",
    )

    def strict(data: bytes) -> Any:
        return json.loads(data, parse_constant=lambda name: pytest.fail(f"{name} in {data!r}"))

    for body in (b'{"v": 1e400}', b'{"v": -1e400}', b'{"v": NaN}', b'{"v": Infinity}'):
        assert strict(ask(app, "/echo", "POST", body).data) == {"v": ""}
        assert ask(app, "/any", "POST", body).status == 404
    assert strict(ask(app, "/echo", "POST", b'{"v": 1e300}').data) == {"v": 1e300}
    found = "\n".join(
        WEB.errors(
            tmp_path,
            "    routes: [{path: /a, json: {v: .nan}}, {path: /b, json: {v: 2020-01-01}}]\n",
        )
    )
    assert "routes[0].json: not a template: not JSON" in found
    assert "routes[1].json: not a template: not JSON" in found


def test_a_sequence_then_its_last_answer_repeats(tmp_path: Path) -> None:
    app = app_for(tmp_path, TEMPLATES)
    answers = [ask(app, "/flaky") for _ in range(5)]
    assert [a.status for a in answers] == [503, 503, 200, 200, 200]
    assert answers[0].data == b"try again" and json.loads(answers[4].data) == {"ok": True}


def test_a_delay_holds_the_answer_and_goes_with_the_client(tmp_path: Path) -> None:
    clock = Clock()
    clock.advance(1_700_000_000)
    app = app_for(tmp_path, TEMPLATES, clock)
    exchange = ask(app, "/slow")
    assert exchange.status == 0
    clock.advance(2.4)
    assert exchange.status == 0
    clock.advance(0.2)
    assert (exchange.status, exchange.data) == (200, b"late")
    gone = ask(app, "/slow")
    assert gone.proxy_cancel is not None
    gone.proxy_cancel()  # what the wire does when the client leaves
    clock.advance(5)
    assert gone.status == 0 and not clock.getDelayedCalls()


def test_routes_added_at_run_time(tmp_path: Path) -> None:
    app = app_for(tmp_path, MATCHING)
    view = RoutesView(app, _route)
    added = view.post(
        {"id": "mine", "path": "/users", "method": "GET", "template": True, "body": "{{counter}}"}
    )
    assert added["id"] == "mine" and added["source"] == "api"
    assert ask(app, "/users").data == b"1"  # before the map's route of the same priority
    listed = view.list({})["routes"]
    assert listed[0]["id"] == "high" and listed[1]["id"] == "mine"
    assert listed[1]["matched"] == 1
    generated = view.post({"path": "/new", "json": {"a": 1}})
    assert ask(app, "/new").data == b'{"a": 1}'
    assert view.remove(generated["id"]) == {"removed": generated["id"]}
    assert ask(app, "/new").status == 404
    assert view.remove("mine") == {"removed": "mine"}
    assert ask(app, "/users").data == b"list"
    assert view.remove("nothing") is None
    with pytest.raises(ViewRefused) as in_map:
        view.remove("exact")
    assert in_map.value.status == 403
    with pytest.raises(ViewRefused) as twice:
        view.post({"id": "exact", "path": "/x", "body": "x"})
    assert twice.value.status == 409
    for refused in (
        {"path": "/f", "body_file": "/etc/passwd"},
        {"path": "/f", "responses": [{"body_file": "/etc/passwd"}]},
        {"path": "/p", "proxy": "http://127.0.0.1:1/"},
        ["not", "a", "route"],
    ):
        with pytest.raises(ViewRefused):
            view.post(refused)
    with pytest.raises(ConfigErrors) as bad:
        view.post({"path": "nope", "colour": "red", "template": True, "body": "{{evil()}}"})
    paths = {e.path for e in bad.value.errors}
    assert paths == {"route.path", "route.colour", "route.body"}
    with pytest.raises(ConfigErrors) as not_a_list:
        view.post({"path": "/r", "responses": 5})
    assert [str(e).partition(": ")[2] for e in not_a_list.value.errors] == [
        "route.responses: expected a list, got a number"
    ]
    assert ask(app, "/users").data == b"list"  # a refused route changes nothing


def test_run_time_routes_are_carried_to_the_next_build(tmp_path: Path) -> None:
    carried: dict[str, Any] = {}
    old = app_for(tmp_path, MATCHING)
    view = RoutesView(old, _route)
    assert view.restore(carried) == []  # a first build: nothing to carry
    view.post({"id": "seq", "path": "/seq", "responses": [{"body": "one"}, {"body": "two"}]})
    view.post({"id": "mine", "path": "/mine", "body": "api"})  # the next map takes this id
    view.post({"id": "last", "path": "/last", "body": "last"})
    view.remove("last")
    assert ask(old, "/seq").data == b"one"
    view.publish(carried)
    new = app_for(tmp_path, MATCHING + '      - {id: mine, path: /mine, body: "map"}\n')
    restored = RoutesView(new, _route)
    assert restored.restore(carried) == ["mine"]  # the map's route of that id wins
    assert ask(new, "/mine").data == b"map"
    assert [r["id"] for r in restored.list({})["routes"] if r["source"] == "api"] == ["seq"]
    assert ask(new, "/seq").data == b"two"  # the sequence goes on where it was
    assert ask(new, "/last").status == 404
    restored.publish(carried)
    assert restored.remove("seq") == {"removed": "seq"}
    third = RoutesView(app_for(tmp_path, MATCHING), _route)
    third.restore(carried)  # removed after it was handed on: not carried again
    assert all(r["source"] == "map" for r in third.list({})["routes"])


def test_websocket_scripts_are_checked_when_read(tmp_path: Path) -> None:
    found = "\n".join(
        WEB.errors(
            tmp_path,
            "    routes:\n"
            "      - {path: /a, websocket: {replies: [{text: x, close: 1005}]}}\n"
            "      - {path: /b, websocket: {on_open: [{json: 1, base64: AA==}]}}\n"
            "      - {path: /c, websocket: {on_open: [{base64: '%%%'}]}}\n"
            "      - {path: /d, websocket: {echo: true}, body: x}\n"
            "      - {path: /e, websocket: {replies: [{regex: '(', send: x}]}}\n",
        )
    )
    assert "routes[0].websocket.replies[0].close: 1005 is not a close code" in found
    assert "routes[1].websocket.on_open[0]: a message is text, {json: ...} or {base64" in found
    assert "routes[2].websocket.on_open[0]: not base64" in found
    assert "routes[3]: a route is one of" in found
    assert "routes[4].websocket.replies[0].regex: not a regular expression" in found


def test_recording_and_replay_keys_are_checked_when_read(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("- {path: nope, body: x}\n")
    (tmp_path / "empty.yaml").write_text("")
    found = "\n".join(
        WEB.errors(
            tmp_path,
            "    routes_from: [missing.yaml, bad.yaml, empty.yaml]\n"
            "    routes:\n"
            "      - {path: /a, body: x, record_to: a.yaml}\n"
            "      - {path: /b/, proxy: 'http://127.0.0.1:9/', record_to: no/such/dir.yaml}\n",
        )
    )
    assert "services.web.routes_from[0]: cannot read" in found
    assert "bad.yaml:1:10: [0].path: a route path starts with /" in found
    assert "routes[0].record_to: only a proxy route records" in found
    assert "routes[1].record_to: not a directory" in found
    (tmp_path / "good.yaml").write_text("- {path: /r, status: 204}\n")
    options = WEB.parse(tmp_path, "    routes_from: good.yaml\n    routes: [{path: /m, body: m}]\n")
    assert [r.id for r in options.routes] == ["routes[0]", "good.yaml[0]"]


def test_openapi_files_are_checked_when_read(tmp_path: Path) -> None:
    (tmp_path / "not-openapi.yaml").write_text("hello: world\n")
    (tmp_path / "broken.yaml").write_text(
        "openapi: 3.0.0\ninfo: {title: x, version: '1'}\npaths: {/a: {get: {responses: 7}}}\n"
    )
    for name, message in (
        ("missing.yaml", "cannot read"),
        ("not-openapi.yaml", "not an OpenAPI description"),
        ("broken.yaml", "broken.yaml:"),
    ):
        found = "\n".join(WEB.errors(tmp_path, f"    openapi: {name}\n"))
        assert "services.web.openapi: " in found and message in found


SPEC = (
    "openapi: 3.0.0\ninfo: {{title: x, version: '1'}}\n"
    "x-pet: &pet {{name: rex, id: 0}}\npaths:\n  /a:\n    get:\n      responses:\n"
    "        '200':\n          description: {description}\n"
    "          content: {{application/json: {{example: {{id: 7, <<: *pet}}}}}}\n"
)


@pytest.mark.parametrize("text", MERGES_AS_PYYAML)
def test_merge_keys_in_files_read_as_pyyaml_reads_them(text: str) -> None:
    assert repr(schema.load(text)) == repr(yaml.safe_load(text))


def test_an_openapi_example_merged_is_answered_in_pyyaml_order(tmp_path: Path) -> None:
    (tmp_path / "spec.yaml").write_text(SPEC.format(description="x"))
    answer = ask(app_of(WEB.parse(tmp_path, "    openapi: spec.yaml\n")), "/a")
    assert list(json.loads(answer.data).items()) == [("name", "rex"), ("id", 7)]


def test_openapi_files_are_read_by_pyyaml_s_own_parser(tmp_path: Path) -> None:
    """As before the bound: libyaml's parser refused JSON's escape of U+1F600 (two surrogates)."""
    (tmp_path / "spec.yaml").write_text(SPEC.format(description='"\\ud83d\\ude00"'))
    options = WEB.parse(tmp_path, "    openapi: spec.yaml\n")
    assert ask(app_of(options), "/a").status == 200


@pytest.mark.parametrize(
    ("description", "found"),
    [
        # A tab cannot stand before a value: libyaml's parser let it.
        ("\tx", "found character '\\t' that cannot start any token"),
        # The line in error, with a caret under where.
        (
            "{x",
            "column 18:\n              content: {application/json: {example: { ... \n"
            + " " * 21
            + "^",
        ),
    ],
)
def test_errors_in_openapi_files_are_pyyaml_s(tmp_path: Path, description: str, found: str) -> None:
    (tmp_path / "spec.yaml").write_text(SPEC.format(description=description))
    assert found in "\n".join(WEB.errors(tmp_path, "    openapi: spec.yaml\n"))


@pytest.mark.timeout(10)
def test_alias_bombs_in_files_read_are_refused_at_once(tmp_path: Path) -> None:
    """Bounded as the map is: the spec's example would be walked for its answer's body."""
    (tmp_path / "spec.yaml").write_text(
        "openapi: 3.0.0\ninfo: {title: x, version: '1'}\npaths:\n"
        "  /a:\n    get:\n      responses:\n        '200':\n          description: x\n"
        f"          content: {{application/json: {{example: {LAUGHS}}}}}\n"
    )
    (tmp_path / "rec.yaml").write_text(f"- {{path: /a, json: {LAUGHS}}}\n")
    for section in ("    openapi: spec.yaml\n", "    routes_from: rec.yaml\n"):
        started = time.monotonic()
        found = "\n".join(WEB.errors(tmp_path, section))
        assert time.monotonic() - started < 2
        assert "aliases repeat more than 1,000,000 nodes" in found


def unique(items: dict[str, Any], count: int = 3) -> dict[str, Any]:
    return {"type": "array", "minItems": count, "uniqueItems": True, "items": items}


def test_bodies_built_to_fit_a_schema() -> None:
    from netd.services.http.openapi import minimal

    spec = {
        "components": {
            "schemas": {
                "Pet": {
                    "type": "object",
                    "required": ["id", "born", "tags", "kind"],
                    "properties": {
                        "id": {"type": "integer", "exclusiveMinimum": 0},
                        "born": {"type": "string", "format": "date"},
                        "tags": {"type": "array", "minItems": 1, "items": {"type": "string"}},
                        "kind": {"enum": ["cat", "dog"]},
                        "optional": {"type": "string"},
                    },
                },
                "Loop": {
                    "type": "object",
                    "required": ["next"],
                    "properties": {"next": {"$ref": "#/components/schemas/Loop"}},
                },
            }
        }
    }
    assert minimal(spec, {"$ref": "#/components/schemas/Pet"}) == {
        "id": 1,
        "born": "1970-01-01",
        "tags": [""],
        "kind": "cat",
    }
    assert (
        minimal(spec, {"allOf": [{"$ref": "#/components/schemas/Pet"}, {"type": "object"}]})["id"]
        == 1
    )
    assert minimal(spec, {"type": ["null", "number"], "minimum": 2.5}) == 2.5
    looped = minimal(spec, {"$ref": "#/components/schemas/Loop"})  # bounded, not endless
    assert isinstance(looped, dict)


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "integer", "minimum": 1, "multipleOf": 5},
        {"type": "integer", "exclusiveMinimum": 10, "multipleOf": 4},
        {"type": "number", "minimum": 0.6, "multipleOf": 0.25},
        {"type": "array", "minItems": 3, "uniqueItems": True, "items": {"type": "string"}},
        {"type": "array", "minItems": 2, "uniqueItems": True, "items": {"type": "integer"}},
        {"type": "array", "minItems": 2, "uniqueItems": True, "items": {"enum": ["a", "b"]}},
        {"type": "array", "minItems": 2, "uniqueItems": True, "items": {"type": "boolean"}},
        {"type": "string", "format": "email", "maxLength": 6},
        {"type": "number", "minimum": 0.3, "multipleOf": 0.1},
        {"type": "number", "minimum": 0.7, "multipleOf": 0.1},
        {"type": "number", "exclusiveMinimum": 1.1, "multipleOf": 0.01},
        {"type": "integer", "minimum": 1, "multipleOf": 0.3},
        {"type": "number", "minimum": 2, "exclusiveMinimum": 0.5},
        {"type": "integer", "exclusiveMaximum": -5},
        unique({"type": "object"}),
        unique({"type": "array"}),
        unique({"type": "array", "minItems": 2, "uniqueItems": True, "items": {"type": "integer"}}),
        unique({"type": "string", "minLength": 1, "maxLength": 1}, 12),
        unique({"type": "integer", "maximum": 1}),
        unique({"type": "integer", "exclusiveMaximum": -5}),
        unique({"type": "number", "minimum": 0.1, "multipleOf": 0.1}, 8),
        unique({"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.25}, 5),
        unique(
            {
                "type": "object",
                "required": ["on"],
                "properties": {"on": {"type": "boolean"}, "n": {"enum": [1, 2]}},
                "additionalProperties": False,
            },
            4,
        ),
        unique({"allOf": [{"type": "object", "required": ["a"]}, {"maxProperties": 1}]}),
        unique({}),
    ],
)
def test_bodies_built_to_fit_a_schema_keep_its_counts_and_steps(schema: dict[str, Any]) -> None:
    import jsonschema

    from netd.services.http.openapi import minimal

    jsonschema.Draft202012Validator(schema).validate(minimal({}, schema))


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
        {"type": "string", "pattern": "^[a-z]+$", "minLength": 5, "maxLength": 6},
        {"type": "string", "format": "date", "pattern": "^20[0-9]{2}-"},
        {"type": "string", "pattern": r"^(cat|dog)s?\.\d+$"},
        unique({"type": "string", "pattern": "^[a-f]$"}, 4),
        {
            "type": "object",
            "required": ["sku"],
            "properties": {"sku": {"type": "string", "pattern": "^SKU-[0-9]{6}$"}},
        },
    ],
)
def test_bodies_built_to_fit_a_schema_match_its_patterns(schema: dict[str, Any]) -> None:
    import jsonschema

    from netd.services.http.openapi import minimal

    built = minimal({}, schema)
    jsonschema.Draft202012Validator(schema).validate(built)
    assert minimal({}, schema) == built  # the same body on every read of the file


def test_a_patterned_string_takes_the_schemas_own_value_first() -> None:
    from netd.services.http.openapi import minimal

    patterned = {"type": "string", "pattern": "^[a-z]+$"}
    assert minimal({}, {**patterned, "examples": ["rex"]}) == "rex"
    assert minimal({}, {**patterned, "default": "tom"}) == "tom"
    assert minimal({}, {**patterned, "enum": ["kit", "cub"]}) == "kit"


@pytest.mark.parametrize(
    "schema",
    [
        unique({"type": "integer", "minimum": 0, "maximum": 1}),
        unique({"type": "number", "minimum": 0, "exclusiveMaximum": 0.5, "multipleOf": 0.25}),
        unique({"type": "boolean"}),
        unique({"enum": ["a", "b"]}),
        unique({"type": "string", "maxLength": 0}, 2),
        unique({"type": "object", "additionalProperties": False}, 2),
        unique({"type": "null"}, 2),
        {"type": "integer", "minimum": 5, "maximum": 1},
    ],
)
def test_a_schema_no_body_fits_is_said_when_read(tmp_path: Path, schema: dict[str, Any]) -> None:
    from netd.services.http.openapi import OpenAPIError, minimal

    with pytest.raises(OpenAPIError, match="no body fits the schema"):
        minimal({}, schema)
    media = {"application/json": {"schema": schema}}
    (tmp_path / "api.json").write_text(
        json.dumps(
            {
                "openapi": "3.1.0",
                "info": {"title": "x", "version": "1"},
                "paths": {
                    "/a": {"get": {"responses": {"200": {"description": "", "content": media}}}}
                },
            }
        )
    )
    found = "\n".join(WEB.errors(tmp_path, "    openapi: api.json\n"))
    assert "GET /a: no body fits the schema" in found


@pytest.mark.parametrize(
    ("glob", "matched", "missed"),
    [
        ("/a/*/b", "/a/x/b", "/a/x/y/b"),
        ("/f/**", "/f/a/b/c", "/g/a"),
        ("/v?", "/v1", "/v/"),
        ("/x/[a-c]1", "/x/b1", "/x/d1"),
        ("/x/[!a]", "/x/b", "/x/a"),
        ("/a.b*", "/a.bz", "/axbz"),
    ],
)
def test_globs_keep_to_their_segments(tmp_path: Path, glob: str, matched: str, missed: str) -> None:
    app = app_for(tmp_path, f"      - {{path: '{glob}', body: hit}}\n")
    assert ask(app, matched).data == b"hit"
    assert ask(app, missed).status == 404


def test_bodies_matched_on_the_wire_pipelined_and_chunked(tmp_path: Path) -> None:
    """A body that arrives before its request is dispatched (pipelined) is still matched."""
    from twisted.internet.testing import StringTransport

    from netd.services.http.wire import HTTPConnection, Limits, factory_for

    app = app_for(tmp_path, MATCHING)
    transport = StringTransport()
    connection = HTTPConnection(factory_for(app, Limits(), tls=False, http2=False))
    connection.makeConnection(transport)
    alice = b'{"customer": {"name": "alice"}, "items": [{"sku": "A"}]}'
    bob = b'{"customer": {"name": "bob"}, "items": [{"qty": 9}]}'
    connection.dataReceived(
        b"POST /orders HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(alice), alice)
        + b"POST /orders HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(bob), bob)
        + b"POST /orders HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n%s\r\n" % (len(alice[:10]), alice[:10])
    )
    connection.dataReceived(b"%x\r\n%s\r\n0\r\n\r\n" % (len(alice[10:]), alice[10:]))
    out = transport.value()
    assert re.findall(rb"HTTP/1\.1 (\d+) ", out) == [b"201", b"200", b"201"]
    assert out.count(b"\r\n\r\njson") == 2 and b"\r\n\r\nbulk" in out


def test_hostile_bodies_do_not_break_matching(tmp_path: Path) -> None:
    app = app_for(tmp_path, MATCHING)
    for body in (b"[" * 100_000, b"\xff\xfe\x00", b'{"customer": ' * 5000, b"user=%ZZ&password"):
        assert ask(app, "/orders", "POST", body).status == 404
        assert ask(app, "/login", "POST", body).status == 404
    assert ask(app, "/users").data == b"list"  # still answering


@pytest.mark.parametrize(
    ("encoded", "matched"),
    [
        (lambda text: text.encode(), True),
        (lambda text: b" \r\n\t" + text.encode() + b"\n ", True),
        (lambda text: text.encode("utf-8-sig"), True),  # a BOM, as json.loads takes it
        (lambda text: text.encode("utf-16"), True),
        (lambda text: text.encode("utf-32-le"), True),
        (lambda text: text.encode() + b" {}", False),  # extra data
        (lambda text: text.encode()[:-1], False),
    ],
)
def test_json_bodies_are_read_as_json_loads_reads_them(
    tmp_path: Path, encoded: Any, matched: bool
) -> None:
    app = app_for(tmp_path, MATCHING)
    order = json.dumps({"customer": {"name": "alice"}, "items": [{"sku": "A"}]})
    exchange = ask(app, "/orders", "POST", encoded(order))
    assert exchange.status == (201 if matched else 404)


SUBSETS = [
    {"customer": {"name": "alice"}},
    {"n": 1},
    {"flag": True},
    {"none": None},
    {"items": [{"sku": "A"}]},
    "alice",
    1,
    1.0,
    True,
    False,
    None,
    [],
    {},
]
DOCUMENTS = [
    {"customer": {"name": "alice", "tier": "gold"}},
    {"customer": {"name": "bob"}},
    {"customer": "alice"},
    {"n": 1},
    {"n": 1.0},
    {"n": True},
    {"flag": True},
    {"flag": 1},
    {"none": None},
    {"items": [{"sku": "A", "qty": 2}]},
    {"items": [{"sku": "A"}, {"sku": "B"}]},
    "alice",
    1,
    True,
    0,
    False,
    None,
    [],
    {},
    NOT_JSON,
]


@pytest.mark.parametrize("expected", SUBSETS)
def test_a_json_subset_worked_out_once_judges_as_json_subset(expected: Any) -> None:
    holds = subset_test(expected)
    for document in DOCUMENTS:
        assert holds(document) is json_subset(expected, document), document
