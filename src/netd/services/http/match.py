"""
What a route asks of a request beyond its path: the method, query parameters,
headers, cookies and the body (text, a JSON subset, JSONPath queries, form fields).

    - path: /users/*
      method: [GET, HEAD]
      priority: 1
      match:
        query: {page: "2", debug: {absent: true}}
        query_equals: {page: "2", tag: [a, b]}   # the whole query: these and no others
        headers: {Accept: {contains: json}}
        cookies: {session: {regex: "^[a-f0-9]{8}$"}}
        body: {json: {user: {name: alice}}, jsonpath: "$.items[?@.qty > 1]"}

A route's conditions are read once from the map into L{Conditions}; each request
is looked at through one L{Request}, which parses only what some route asks for.
Every check can say why it failed, so an unmatched request names the closest
route and what differed ("did you mean").

JSONPath is RFC 9535 through python-jsonpath: the standard's syntax (what
WireMock users write, minus Jayway's extensions), typed, no dependencies, and
queries compiled once when the map is read.
"""

from __future__ import annotations

import functools
import json
import math
import operator
import re
import urllib.parse
from collections.abc import Callable
from typing import Any

import attrs
from yaml.constructor import ConstructorError, SafeConstructor

from netd.records import Record
from netd.schema import Value

__all__ = [
    "NOT_JSON",
    "WAIT",
    "Body",
    "Conditions",
    "Request",
    "Text",
    "path_pattern",
    "plain",
    "query_values",
    "read_conditions",
    "read_regex",
]

# The verdict of a route whose conditions hold so far but whose body has not all come in.
WAIT = "wait"
# Characters that make a route path a glob (fnmatch) rather than an exact path.
_GLOB = "*?["
# What a request body that is not JSON reads as: no JSON value equals it.
NOT_JSON = object()


class Request:
    """
    One request as routes and templates read it: parsed on first use, so a
    route that asks only for a header costs one header lookup.

    @ivar body: the whole body once it has come in (L{None} before).
    """

    # One is made for every request a conditional route or a stub looks at.
    __slots__ = (
        "_cookies",
        "_form",
        "_json",
        "_json_read",
        "_query",
        "body",
        "exchange",
        "method",
        "path",
    )

    def __init__(self, exchange: Any, path: str, body: bytes | None = None) -> None:
        self.exchange = exchange
        self.method: str = exchange.method
        self.path = path
        if body is None:
            # A request that says it has no body needs no waiting for one, nor
            # one that came in whole before it was handled.
            body = b"" if exchange.body.expected == 0 else exchange.body.whole()
        self.body = body
        self._query: dict[str, list[str]] | None = None
        self._cookies: dict[str, str] | None = None
        self._json: Any = None
        self._json_read = False
        self._form: dict[str, list[str]] | None = None

    @property
    def query(self) -> dict[str, list[str]]:
        if self._query is None:
            self._query = query_values(self.exchange.target)
        return self._query

    def header(self, name: str) -> str | None:
        value = self.exchange.header(header_key(name))
        return _header_text(value) if value is not None else None

    def header_holds(self, key: bytes, wanted: Text) -> bool:
        """
        Whether header C{key} (its name in lower case, as bytes: L{header_key})
        is as C{wanted} says: its lines joined (RFC 9110 5.3), or any one of
        them, as WireMock matches a header sent twice.
        """
        value = self.exchange.header(key)
        if wanted.check(_header_text(value) if value is not None else None):
            return True
        lines = self.exchange.header_lines(key)
        return len(lines) > 1 and any(wanted.check(_header_text(line)) for line in lines)

    @property
    def cookies(self) -> dict[str, str]:
        if self._cookies is None:
            # RFC 6265 5.4 as browsers send it; http.cookies refuses what they accept.
            # Cookie lines are joined by "; " (RFC 9113 8.2.3), never by a comma.
            lines = self.exchange.header_lines(b"cookie")
            found: dict[str, str] = {}
            for piece in "; ".join(map(_header_text, lines)).split(";"):
                name, equals, value = piece.partition("=")
                name = name.strip()
                if name and equals and name not in found:
                    found[name] = value.strip().strip('"')
            self._cookies = found
        return self._cookies

    @property
    def text(self) -> str:
        return (self.body or b"").decode("utf-8", "replace")

    @property
    def json(self) -> Any:
        """The body as JSON, or a marker no JSON value equals when it is not JSON."""
        if not self._json_read:
            self._json_read = True
            self._json = _json_of(self.body or b"")
        return self._json

    @property
    def form(self) -> dict[str, list[str]]:
        if self._form is None:
            self._form = urllib.parse.parse_qs(self.text, keep_blank_values=True)
        return self._form


def header_key(name: str) -> bytes:
    """A header's name as an exchange looks it up."""
    return name.lower().encode("latin-1", "replace")


def _header_text(value: bytes) -> str:
    """
    A header value as text: UTF-8, as clients send non-ASCII values today, or
    else Latin-1 (RFC 9110 5.5's obs-text), which reads any bytes.
    """
    try:
        return value.decode()
    except UnicodeDecodeError:
        return value.decode("latin-1")


def query_values(target: str) -> dict[str, list[str]]:
    """Each parameter of a request target's query with all its values, in order."""
    if target.startswith("/"):
        raw = target.partition("?")[2]
    else:
        raw = urllib.parse.urlsplit(target).query  # absolute form
    return urllib.parse.parse_qs(raw, keep_blank_values=True)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # RFC 8259 6: no NaN or Infinity


def _finite(text: str) -> float:
    number = float(text)
    if math.isinf(number):  # 1e400: no float holds it, and infinity is not JSON
        raise ValueError(f"{text} is out of range")
    return number


_raw_decode = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite).raw_decode


def _json_of(body: bytes) -> Any:
    """
    C{json.loads(body)}, or L{NOT_JSON}: UTF-8 (RFC 8259 8.1) straight to the
    decoder, a microsecond less a request than C{json.loads} finds it (which
    first guesses the encoding and then scans for whitespace by regex); it
    has the last word on whatever that path refuses (a BOM, UTF-16).
    """
    try:
        text = body.decode().strip(" \t\n\r")
        value, end = _raw_decode(text)
        if end == len(text):
            return value
    except RecursionError:
        return NOT_JSON
    except ValueError:
        pass
    try:
        return json.loads(body, parse_constant=_no_constant, parse_float=_finite)
    except (ValueError, RecursionError):
        return NOT_JSON


@attrs.frozen(repr=False)
class Text(Record):
    """A matcher of one text value (a header, a parameter, a cookie, a body)."""

    equals: str | None = None
    contains: str | None = None
    regex: re.Pattern[str] | None = None
    absent: bool = False

    def check(self, value: str | None) -> bool:
        if value is None:
            return self.absent
        if self.absent:
            return False
        return (
            (self.equals is None or value == self.equals)
            and (self.contains is None or self.contains in value)
            and (self.regex is None or self.regex.search(value) is not None)
        )

    def describe(self) -> str:
        if self.absent:
            return "absent"
        wanted = []
        if self.equals is not None:
            wanted.append(json.dumps(self.equals))
        if self.contains is not None:
            wanted.append(f"containing {json.dumps(self.contains)}")
        if self.regex is not None:
            wanted.append(f"matching /{self.regex.pattern}/")
        return " and ".join(wanted) or "present"


@attrs.frozen(repr=False)
class Body(Record):
    """Conditions on the body; all of them hold for a match."""

    text: Text | None = None
    json: Any = None
    has_json: bool = False
    jsonpaths: tuple[tuple[str, Any, Text | None], ...] = ()
    form: tuple[tuple[str, Text], ...] = ()
    # C{json_subset(json, ...)}, worked out once: it is asked for every request.
    json_holds: Callable[[Any], bool] = attrs.field(init=False, eq=False)

    @json_holds.default
    def _json_holds(self) -> Callable[[Any], bool]:
        return subset_test(self.json)

    def holds(self, request: Request) -> bool:
        """L{mismatches} finds none; the common conditions asked without saying why."""
        if self.text is not None and not self.text.check(request.text):
            return False
        if self.has_json and not self.json_holds(request.json):
            return False
        return not (self.jsonpaths or self.form) or not self.mismatches(request)

    def mismatches(self, request: Request) -> list[str]:
        found = []
        if self.text is not None and not self.text.check(request.text):
            found.append(f"body: expected {self.text.describe()}, got {_shown(request.text)}")
        if self.has_json and not self.json_holds(request.json):
            actual = "not JSON" if request.json is NOT_JSON else _shown(request.text)
            found.append(f"body: expected JSON with {json.dumps(self.json)}, got {actual}")
        for source, query, wanted in self.jsonpaths:
            document = request.json
            values = [] if document is NOT_JSON else query.findall(document)
            if wanted is None:
                if not values:
                    found.append(f"body: nothing at {source}")
            elif not any(wanted.check(_as_text(v)) for v in values):
                got = _shown(_as_text(values[0])) if values else "nothing"
                found.append(f"body {source}: expected {wanted.describe()}, got {got}")
        for name, wanted in self.form:
            values = request.form.get(name)
            if not _any_value(wanted, values):
                found.append(f"form field {name}: expected {wanted.describe()}, got {_got(values)}")
        return found


@attrs.frozen(repr=False)
class Conditions(Record):
    """What a route asks of a request besides its path."""

    methods: frozenset[str] | None = None
    query: tuple[tuple[str, Text], ...] = ()
    # The whole query, every parameter with all its values (what a recording asks).
    query_equals: dict[str, list[str]] | None = None
    headers: tuple[tuple[str, Text], ...] = ()
    cookies: tuple[tuple[str, Text], ...] = ()
    body: Body | None = None
    # The headers' names as exchanges look them up, worked out once, not per request.
    keyed_headers: tuple[tuple[bytes, Text], ...] = attrs.field(init=False, eq=False)

    @keyed_headers.default
    def _keyed_headers(self) -> tuple[tuple[bytes, Text], ...]:
        return tuple((header_key(name), wanted) for name, wanted in self.headers)

    @property
    def size(self) -> int:
        """How many things this asks: of two near misses, the one that got more right is closer."""
        body = self.body
        in_body = (
            0
            if body is None
            else (body.text is not None) + body.has_json + len(body.jsonpaths) + len(body.form)
        )
        return (
            (self.methods is not None)
            + len(self.query)
            + (self.query_equals is not None)
            + len(self.headers)
            + len(self.cookies)
            + in_body
        )

    def verdict(self, request: Request) -> bool | str:
        """True or False, or L{WAIT} when only the body, not yet read, can tell."""
        if self.methods is not None and request.method not in self.methods:
            return False
        for name, wanted in self.query:
            if not _any_value(wanted, request.query.get(name)):
                return False
        if self.query_equals is not None and request.query != self.query_equals:
            return False
        for key, wanted in self.keyed_headers:
            if not request.header_holds(key, wanted):
                return False
        for name, wanted in self.cookies:
            if not wanted.check(request.cookies.get(name)):
                return False
        if self.body is None:
            return True
        if request.body is None:
            return WAIT
        return self.body.holds(request)

    def body_holds(self, request: Request) -> bool:
        """The body's conditions, once the others held (L{verdict} said L{WAIT})."""
        return self.body is None or self.body.holds(request)

    def mismatches(self, request: Request) -> list[str]:
        """Each condition the request fails, said for a person (the body's if it was read)."""
        found = []
        if self.methods is not None and request.method not in self.methods:
            found.append(
                f"method: expected {' or '.join(sorted(self.methods))}, got {request.method}"
            )
        for name, wanted in self.query:
            values = request.query.get(name)
            if not _any_value(wanted, values):
                found.append(f"query {name}: expected {wanted.describe()}, got {_got(values)}")
        if self.query_equals is not None and request.query != self.query_equals:
            expected = _got(urllib.parse.urlencode(self.query_equals, doseq=True) or None)
            got = _got(urllib.parse.urlencode(request.query, doseq=True) or None)
            found.append(f"query: expected exactly {expected}, got {got}")
        for (name, wanted), (key, _) in zip(self.headers, self.keyed_headers, strict=True):
            value = request.header(name)
            if not request.header_holds(key, wanted):
                found.append(f"header {name}: expected {wanted.describe()}, got {_got(value)}")
        for name, wanted in self.cookies:
            value = request.cookies.get(name)
            if not wanted.check(value):
                found.append(f"cookie {name}: expected {wanted.describe()}, got {_got(value)}")
        if self.body is not None and request.body is not None:
            found.extend(self.body.mismatches(request))
        return found


def json_subset(expected: Any, actual: Any) -> bool:
    """
    Whether C{actual} holds C{expected}: objects may have more members, arrays
    are compared element by element (same length), other values are equal
    (C{true} is not C{1}).
    """
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return False
        # A loop, not all() over a generator: this runs for every request a route asks.
        for key, value in expected.items():
            if key not in actual or not json_subset(value, actual[key]):
                return False
        return True
    if isinstance(expected, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(expected)
            and all(json_subset(e, a) for e, a in zip(expected, actual, strict=True))
        )
    if isinstance(expected, bool) or isinstance(actual, bool):
        return expected is actual
    return bool(expected == actual) and actual is not NOT_JSON


def subset_test(expected: Any) -> Callable[[Any], bool]:
    """
    C{json_subset(expected, actual)} as a function of C{actual} alone, its
    objects' members and its strings worked out once: a route's JSON subset
    is tested against every request it sees.
    """
    if isinstance(expected, dict):
        members = tuple((key, subset_test(value)) for key, value in expected.items())

        def holds(actual: Any) -> bool:
            if not isinstance(actual, dict):
                return False
            for key, member in members:
                if key not in actual or not member(actual[key]):
                    return False
            return True

        return holds
    if isinstance(expected, str):
        # Only an equal string equals a string: no bool, no number, not NOT_JSON.
        return functools.partial(operator.eq, expected)
    return functools.partial(json_subset, expected)


def _any_value(wanted: Text, values: list[str] | None) -> bool:
    if not values:
        return wanted.check(None)
    return any(wanted.check(v) for v in values)


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _shown(text: str) -> str:
    return json.dumps(text if len(text) <= 80 else text[:80] + "...")


def _got(value: str | list[str] | None) -> str:
    if value is None or value == []:
        return "nothing"
    if isinstance(value, list):
        return ", ".join(_shown(v) for v in value)
    return _shown(value)


# -- reading the map ---------------------------------------------------------------


def path_pattern(value: Value, path: str) -> re.Pattern[str] | None:
    """
    The pattern of a route path that is not a plain path: C{{regex: ...}}, or a
    glob (C{*} within a segment, C{**} across them, C{?}, C{[...]}); None for
    an exact path or a prefix (ending in C{/}), as routes always had.
    """
    if value.is_mapping:
        section = value.section()
        regex = section.require("regex")
        section.finish()
        return read_regex(regex) if regex is not None else None
    if not any(c in path for c in _GLOB):
        return None
    return re.compile(_glob_regex(path))


def _glob_regex(glob: str) -> str:
    """A route glob as a regex: C{*} and C{?} within one segment, C{**} across them."""
    out = []
    i = 0
    while i < len(glob):
        c = glob[i]
        if glob.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and "]" in glob[i + 2 :]:
            end = glob.index("]", i + 2)
            inside = glob[i + 1 : end]
            negated = inside.startswith("!")
            body = re.escape(inside[1:] if negated else inside).replace("\\-", "-")
            out.append(f"[{'^/' if negated else ''}{body}]")
            i = end + 1
            continue
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def read_regex(value: Value) -> re.Pattern[str] | None:
    text = value.as_str()
    try:
        return re.compile(text)
    except re.error as e:
        value.error(f"not a regular expression: {e}")
        return None


def read_text(value: Value) -> Text:
    """A text matcher: a plain value (equals) or C{{equals|contains|regex|absent}}."""
    if not value.is_mapping:
        return Text(equals=value.as_str())
    section = value.section()
    regex = section.get("regex")
    text = Text(
        equals=section.optional_str("equals"),
        contains=section.optional_str("contains"),
        regex=read_regex(regex) if regex is not None else None,
        absent=section.flag("absent", False),
    )
    section.finish()
    if text.absent and (text.equals, text.contains, text.regex) != (None, None, None):
        value.error("absent stands alone")
    return text


def _named(value: Value) -> tuple[tuple[str, Text], ...]:
    return tuple((name, read_text(entry)) for name, entry in value.items())


def _query_equals(value: Value) -> dict[str, list[str]]:
    """C{{NAME: VALUE or [VALUE, ...]}}: the parameters, each with all its values in order."""
    return {
        name: [e.as_str() for e in entry.elements()] if entry.is_sequence else [entry.as_str()]
        for name, entry in value.items()
    }


def plain(value: Value) -> Any:
    """A node of the map as the plain data it stands for (for JSON)."""
    try:
        return SafeConstructor().construct_object(value.node, deep=True)
    except (ConstructorError, ValueError, TypeError) as e:
        value.error(f"not plain data: {e}")
        return None


def _body(value: Value) -> Body:
    section = value.section()
    text = Text(
        equals=section.optional_str("equals"),
        contains=section.optional_str("contains"),
        regex=section.read("regex", read_regex, None),
    )
    json_value = section.get("json")
    no_paths: tuple[tuple[str, Any, Text | None] | None, ...] = ()
    jsonpaths = section.read("jsonpath", lambda v: v.list_of(_jsonpath, single=True), no_paths)
    no_fields: tuple[tuple[str, Text], ...] = ()
    form = section.read("form", _named, no_fields)
    section.finish()
    return Body(
        text=text if (text.equals, text.contains, text.regex) != (None, None, None) else None,
        json=plain(json_value) if json_value is not None else None,
        has_json=json_value is not None,
        jsonpaths=tuple(j for j in jsonpaths if j is not None),
        form=form,
    )


def _jsonpath(value: Value) -> tuple[str, Any, Text | None] | None:
    wanted: Text | None = None
    if value.is_mapping:
        section = value.section()
        path_value = section.require("path")
        source = path_value.as_str() if path_value is not None else ""
        wanted = Text(
            equals=section.optional_str("equals"),
            contains=section.optional_str("contains"),
            regex=section.read("regex", read_regex, None),
        )
        section.finish()
        if path_value is None:
            return None
        value = path_value
    else:
        source = value.as_str()
    # Imported for a map that uses it: a tenth of a second of start-up otherwise.
    import jsonpath

    try:
        query = jsonpath.compile(source)
    except jsonpath.JSONPathError as e:
        value.error(f"not a JSONPath query: {e}")
        return None
    return source, query, wanted


def read_conditions(method: Value | None, match: Value | None) -> Conditions | None:
    """A route's C{method} and C{match} keys; None when it has neither."""
    if method is None and match is None:
        return None
    methods = None
    if method is not None:
        names = method.list_of(lambda v: v.as_str().upper(), single=True)
        for name in names:
            if not name.isalpha():
                method.error(f"not a method: {name!r}")
        methods = frozenset(names)
    if match is None:
        return Conditions(methods=methods)
    section = match.section()
    none: tuple[tuple[str, Text], ...] = ()
    conditions = Conditions(
        methods=methods,
        query=section.read("query", _named, none),
        query_equals=section.read("query_equals", _query_equals, None),
        headers=section.read("headers", _named, none),
        cookies=section.read("cookies", _named, none),
        body=section.read("body", _body, None),
    )
    section.finish()
    return conditions
