"""
Stub answers: built from the request, in sequence, late on purpose; the closest
route an unmatched request missed; routes added and removed at run time.

    - path: /users/*
      method: POST
      template: true            # {{...}} in body, json and headers (default: literal)
      status: 201
      headers: {X-Request: "{{request.headers.X-Request-Id}}"}
      json: {id: "{{uuid}}", name: "{{request.json.name}}", n: "{{counter}}"}
      delay: 0.2                # seconds before the answer
    - path: /flaky
      responses: [{status: 503}, {status: 503}, {status: 200, body: ok}]   # the last repeats
"""

from __future__ import annotations

import difflib
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import yaml

from netd.kinds import ViewRefused
from netd.records import Record
from netd.schema import ConfigErrors, Problems, Section, Value, compose
from netd.services.http.match import Request, plain
from netd.services.http.template import JSONTemplate, Scope, Template, TemplateError

__all__ = ["Answer", "RoutesView", "Stub", "Stubs", "near_miss", "read_stub"]

Headers = list[tuple[bytes, bytes]]
# Keys that make a route a stub: any of them and its answer comes from here.
_STUB_KEYS = ("json", "delay", "responses", "template")
_ANSWER_KEYS = ("status", "headers", "body", "body_file", "json", "delay")
_ID = re.compile(r"[A-Za-z0-9_.-]{1,100}\Z")
# Keys of the service's BuildContext.carried: the run-time routes and their counts.
_CARRIED_ROUTES = "http.routes"
_CARRIED_COUNTS = "http.matched"
_JSON_TYPE = (b"Content-Type", b"application/json")
_TEXT_TYPE = (b"Content-Type", b"text/plain; charset=utf-8")


@attrs.frozen(repr=False)
class Answer(Record):
    """One answer of a stub route; templates only where the route says C{template: true}."""

    status: int = 200
    headers: tuple[tuple[str, Template], ...] = ()
    body: Template | None = None
    json: JSONTemplate | None = None
    body_file: str | None = None
    delay: float = 0.0

    # Worked out once: they are asked for every request the route answers.
    reads_body: bool = attrs.field(init=False)
    typed: bool = attrs.field(init=False)

    @reads_body.default
    def _reads_body(self) -> bool:
        return (
            any(value.reads_body for _, value in self.headers)
            or (self.body is not None and self.body.reads_body)
            or (self.json is not None and self.json.reads_body)
        )

    @typed.default
    def _typed(self) -> bool:
        return any(name.lower() == "content-type" for name, _ in self.headers)

    def render(self, scope: Scope, files: dict[str, bytes]) -> tuple[int, Headers, bytes]:
        # Most answers set no header of their own: no comprehension (a call) for none.
        headers = (
            [(name.encode("latin-1"), _header(value.render(scope))) for name, value in self.headers]
            if self.headers
            else []
        )
        if self.json is not None:
            body = self.json.render(scope)
            if not self.typed:
                headers.append(_JSON_TYPE)
        else:
            if self.body_file is not None:
                body = files[self.body_file]
            else:
                body = self.body.render(scope).encode() if self.body is not None else b""
            if not self.typed:
                headers.append(_TEXT_TYPE)
        return self.status, headers, body


def _header(text: str) -> bytes:
    """A rendered header value: what the request put there cannot start another header."""
    return "".join(c for c in text if c not in "\r\n\0").encode("latin-1", "replace")


@attrs.frozen(repr=False)
class Stub(Record):
    """
    A route's answers; C{check}, if given, refuses a request with 400 and its
    reasons (an OpenAPI operation's validation); C{body_read}: it reads the body.
    """

    answers: tuple[Answer, ...]
    check: Callable[[Request], str | None] | None = None
    body_read: bool = False
    # Whether its answers are built from the body: then it waits for all of it.
    reads_body: bool = attrs.field(init=False)

    @reads_body.default
    def _reads_body(self) -> bool:
        return self.body_read or any(answer.reads_body for answer in self.answers)


def read_stub(
    section: Section,
    value: Value,
    read_headers: Callable[[Value], tuple[tuple[str, str], ...]],
) -> Stub | None:
    """A route's stub answer, or None for a plain canned route (read as it always was)."""
    if not any(section.has(key) for key in _STUB_KEYS):
        return None
    templated = section.flag("template", False)
    responses = section.get("responses")
    if responses is None:
        return Stub((_answer(section, value, templated, read_headers),))
    if any(section.has(key) for key in _ANSWER_KEYS):
        value.error("give responses or one answer (status, headers, body, json), not both")
    answers = responses.list_of(
        lambda v: _answer(v.section(), v, templated, read_headers, finish=True)
    )
    if not answers:
        if responses.is_sequence:  # not a list at all is reported already
            responses.error("at least one answer")
        return None
    return Stub(answers)


def _answer(
    section: Section,
    value: Value,
    templated: bool,
    read_headers: Callable[[Value], tuple[tuple[str, str], ...]],
    finish: bool = False,
) -> Answer:
    status = section.integer("status", 200, minimum=100, maximum=599)
    no_headers: tuple[tuple[str, str], ...] = ()
    headers = section.read("headers", read_headers, no_headers)
    body = section.optional_str("body")
    body_file = section.file_path("body_file")
    if body_file is not None and not body_file.is_file():
        entry = section.get("body_file")
        assert entry is not None
        entry.error(f"not a file: {body_file}")
    json_value = section.get("json")
    if sum(x is not None for x in (body, body_file, json_value)) > 1:
        value.error("give one of body, body_file and json")
    delay = section.number("delay", 0.0, minimum=0.0)
    if finish:
        section.finish()

    def template(text: str, where: Value | None) -> Template:
        if not templated:
            return Template.literal(text)
        try:
            return Template(text)
        except TemplateError as e:
            (where or value).error(f"not a template: {e}")
            return Template.literal(text)

    json_template = None
    if json_value is not None:
        document = plain(json_value)
        try:
            json_template = JSONTemplate(document, templated)
        except TemplateError as e:
            json_value.error(f"not a template: {e}")
    return Answer(
        status=status,
        headers=tuple((name, template(text, section.get("headers"))) for name, text in headers),
        body=template(body, section.get("body")) if body is not None else None,
        json=json_template,
        body_file=str(body_file) if body_file is not None else None,
        delay=delay,
    )


class Stubs:
    """A service's stub answers: the one in sequence, built, delayed."""

    def __init__(self, clock: Any, files: dict[str, bytes]) -> None:
        self.clock = clock
        self.files = files

    def answer(
        self,
        exchange: Any,
        route: Any,
        request: Request,
        count: int,
        respond_error: Callable[[Any, int], None],
    ) -> None:
        """Answer the C{count}th request C{route} matched."""
        stub: Stub = route.stub
        if stub.check is not None:
            refused = stub.check(request)
            if refused is not None:
                exchange.respond(400, [_TEXT_TYPE], f"400 Bad Request\n{refused}\n".encode())
                return
        answer = stub.answers[min(count, len(stub.answers)) - 1]
        scope = Scope(request, count, self.clock.seconds(), route.pattern)
        try:
            status, headers, body = answer.render(scope, self.files)
        except TemplateError:
            respond_error(exchange, 500)
            return
        if not answer.delay:
            exchange.respond(status, headers, body)
            return

        def respond() -> None:
            exchange.proxy_cancel = None
            exchange.respond(status, headers, body)

        # The wire calls proxy_cancel when the client goes: the timer goes with it.
        exchange.proxy_cancel = self.clock.callLater(answer.delay, respond).cancel


def describe_path(route: Any) -> str:
    if route.pattern is not None and not route.glob:
        return f"~{route.path}"
    return str(route.path)


def near_miss(routes: tuple[Any, ...], request: Request) -> dict[str, Any] | None:
    """
    The route an unmatched request came closest to, and each way it missed:
    a route whose path matched first, then the most similar path (WireMock
    weighs the URL above all else), then the fewest misses, then the most
    conditions met.
    """
    best: tuple[tuple[bool, float, int, int], Any, list[str]] | None = None
    for route in routes:
        path_ok = route.matches(request.path)
        misses = [] if path_ok else [f"path: expected {describe_path(route)}, got {request.path}"]
        if route.when is not None:
            misses += route.when.mismatches(request)
        if not misses:
            continue
        similar = (
            1.0 if path_ok else difflib.SequenceMatcher(None, route.path, request.path).ratio()
        )
        asked = route.when.size if route.when is not None else 0
        key = (not path_ok, -similar, len(misses), len(misses) - asked)
        if best is None or key < best[0]:
            best = (key, route, misses)
    if best is None:
        return None
    _, route, misses = best
    return {"route": route.id, "path": describe_path(route), "mismatches": misses}


def explain(request: Request, miss: dict[str, Any] | None) -> bytes:
    """The body of a 404 that says what was asked and what came closest."""
    lines = ["404 Not Found", f"no route matched {request.method} {request.path}"]
    if miss is not None:
        lines.append(f"closest route: {miss['route']} ({miss['path']})")
        lines.extend(f"  {m}" for m in miss["mismatches"])
    return ("\n".join(lines) + "\n").encode("utf-8", "replace")


class RoutesView:
    """
    C{/api/services/NAME/routes}: every route in the order they are tried;
    C{POST} adds one (the map's syntax as JSON), C{DELETE .../routes/ID} removes
    one added so.  Routes from the API may not read files or proxy: what the
    map's author allows, not whoever holds the admin token.

    Routes added so outlive a reload that rebuilds the service (WireMock keeps
    its run-time stubs until reset): L{restore} reads the predecessor's from
    the service's C{carried}, L{publish} hands this one's on once it serves.
    With C{workers}, the main process's build holds them (L{keep}) and every
    worker is built from what it holds.
    """

    def __init__(self, app: Any, read_route: Callable[[Value], Any]) -> None:
        self.app = app
        self.read_route = read_route
        self.posted: dict[str, Any] = {}

    def restore(self, carried: dict[str, Any]) -> list[str]:
        """
        Add again the routes the service this one replaces had from the API, in
        the order they came, with their match counts (a C{responses:} sequence
        goes on where it was).  Returns the ids left out: the map has a route of
        that id now, or the route no longer reads (the map's edit wins).
        """
        left_out = []
        counts = carried.get(_CARRIED_COUNTS, {})
        for route_id, body in carried.get(_CARRIED_ROUTES, {}).items():
            if any(r.id == route_id for r in self.app.routes):
                left_out.append(route_id)
                continue
            try:
                self._add(route_id, body)
            except (ConfigErrors, ViewRefused):
                left_out.append(route_id)
                continue
            if route_id in counts:
                self.app.matched[route_id] = counts[route_id]
        return left_out

    def publish(self, carried: dict[str, Any]) -> None:
        """This service serves now: its run-time routes are what a reload carries over."""
        carried[_CARRIED_ROUTES] = self.posted
        carried[_CARRIED_COUNTS] = self.app.matched

    def keep(self, carried: dict[str, Any]) -> None:
        """
        The routes of a service in workers, kept by its main process, which
        counts no match: each worker, and a rebuild, starts counting at 0.
        """
        carried[_CARRIED_ROUTES] = self.posted
        carried[_CARRIED_COUNTS] = {}

    def list(self, query: Any) -> dict[str, Any]:
        return {"routes": [self._describe(r) for r in self.app.routes]}

    def _describe(self, route: Any) -> dict[str, Any]:
        described = {
            "id": route.id,
            "path": describe_path(route),
            "priority": route.priority,
            "source": "api" if route.id in self.posted else "map",
            "matched": self.app.matched.get(route.id, 0),
        }
        if route.id in self.posted:
            described["definition"] = self.posted[route.id]
        return described

    def post(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise ViewRefused(400, "a route is a JSON object, as in the map")
        responses = body.get("responses")
        # Responses that are not a list are the route reader's to refuse, with their path.
        for answer in [body, *(responses if isinstance(responses, list) else [])]:
            if isinstance(answer, dict) and "body_file" in answer:
                raise ViewRefused(400, "body_file is for the map: the admin API reads no files")
        if "proxy" in body:
            raise ViewRefused(400, "proxy routes come from the map")
        route_id = body.get("id")
        if route_id is None:
            route_id = body["id"] = uuid.uuid4().hex[:12]
        if not isinstance(route_id, str) or not _ID.match(route_id):
            raise ViewRefused(400, "an id is 1-100 letters, digits, '_', '.' or '-'")
        if any(r.id == route_id for r in self.app.routes):
            raise ViewRefused(409, f"a route {route_id} exists")
        return self._describe(self._add(route_id, body))

    def _add(self, route_id: str, body: dict[str, Any]) -> Any:
        problems = Problems()
        node = compose(yaml.safe_dump(body), "request body", problems)
        problems.raise_if_any()
        assert node is not None
        route = self.read_route(Value(node, "route", "request body", Path("/"), problems))
        problems.raise_if_any()
        self.posted[route_id] = body
        self.app.add_route(route)
        return route

    def remove(self, key: str) -> dict[str, Any] | None:
        if key not in self.posted:
            if any(r.id == key for r in self.app.routes):
                raise ViewRefused(403, f"route {key} is in the map: edit the map to remove it")
            return None
        del self.posted[key]
        self.app.remove_route(key)
        return {"removed": key}
