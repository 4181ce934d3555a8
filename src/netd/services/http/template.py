"""
Answers built from the request: a small substitution language, nothing more.

    body: "hello {{request.query.name | 'stranger'}}, you are visitor {{counter}}"

A template is text with C{{{REF}}} or C{{{REF | 'default'}}} in it (C{\\{{} for the
text C{{{}, C{\\\\{{} for a backslash before a place; a C{}}} outside a place is
text), where REF is one
of a fixed list of names (L{NAMES}): parts of the request, a counter, the time, a
UUID.  Templates are parsed when the route is read, and a REF outside that list
is an error then, not at request time.  Rendering looks names up in a table of
functions written here: no attribute access, no expression evaluation, no
filters, no file access, so a template cannot read files or run code.  What
the request supplies is inserted as text once and never read as a template
again; in a C{json} answer it is a JSON string (or the JSON value it came as),
so it cannot change the document's structure; in a header its CR, LF and NUL
are dropped.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import attrs

from netd.records import Record
from netd.services.http.match import NOT_JSON, Request

__all__ = ["NAMES", "JSONTemplate", "Scope", "Template", "TemplateError"]

NAMES = (
    "request.method",
    "request.path",
    "request.path.N (a segment, from 0) or request.path.NAME (a named regex group)",
    "request.query.NAME",
    "request.headers.NAME",
    "request.cookies.NAME",
    "request.form.NAME",
    "request.body",
    "request.json[.FIELD or .N ...]",
    "request.client",
    "counter",
    "now",
    "now.epoch",
    "uuid",
)

_MISSING = object()
_OPEN = re.compile(r"(\\*)\{\{")
_REF = re.compile(r"[a-z]+(?:\.[A-Za-z0-9_\-]+)*\Z")
_DEFAULT = re.compile(r"""\s*\|\s*(?:'([^']*)'|"([^"]*)")\s*\Z""")
# Bytes a template may make, whatever the request holds: a JSON field a megabyte
# long inserted a thousand times is refused, not built.
MAX_RENDERED = 1 << 20


class TemplateError(ValueError):
    """A template that is not in the language (said when the route is read)."""


@attrs.define(repr=False)
class Scope(Record):
    """
    What a template may read: the request, the route's counter, the clock.
    (Not frozen: one is made a templated request, and a frozen class's
    initialiser costs three times as much; templates only read it.)
    """

    request: Request
    counter: int
    now: float
    pattern: re.Pattern[str] | None = None


Lookup = Callable[[Scope], Any]


@attrs.frozen(repr=False)
class _Place(Record):
    lookup: Lookup
    default: str | None
    reads_body: bool


def _first(values: list[str] | None) -> Any:
    return values[0] if values else _MISSING


def _segment(index: int) -> Lookup:
    def lookup(scope: Scope) -> Any:
        segments = [s for s in scope.request.path.split("/") if s]
        return segments[index] if index < len(segments) else _MISSING

    return lookup


def _group(name: str) -> Lookup:
    def lookup(scope: Scope) -> Any:
        found = scope.pattern.fullmatch(scope.request.path) if scope.pattern else None
        if found is None or name not in found.re.groupindex:
            return _MISSING
        value = found.group(name)
        return _MISSING if value is None else value

    return lookup


def _json_field(steps: list[str]) -> Lookup:
    def lookup(scope: Scope) -> Any:
        value = scope.request.json
        if value is NOT_JSON:
            return _MISSING  # an empty body, or not JSON: as a field it lacks
        for step in steps:
            if isinstance(value, dict) and step in value:
                value = value[step]
            elif isinstance(value, list) and step.isdigit() and int(step) < len(value):
                value = value[int(step)]
            else:
                return _MISSING
        return value

    return lookup


def _named(read: Callable[[Scope, str], Any], name: str) -> Lookup:
    return lambda scope: read(scope, name)


_FIXED: dict[str, Lookup] = {
    "request.method": lambda s: s.request.method,
    "request.path": lambda s: s.request.path,
    "request.body": lambda s: s.request.text,
    "request.client": lambda s: s.request.exchange.client,
    "request.json": _json_field([]),
    "counter": lambda s: s.counter,
    "now": lambda s: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(s.now)),
    "now.epoch": lambda s: int(s.now),
    "uuid": lambda s: str(uuid.uuid4()),
}

_BY_NAME: dict[str, Callable[[Scope, str], Any]] = {
    "request.query": lambda s, n: _first(s.request.query.get(n)),
    "request.form": lambda s, n: _first(s.request.form.get(n)),
    "request.cookies": lambda s, n: s.request.cookies.get(n, _MISSING),
    "request.headers": lambda s, n: _or_missing(s.request.header(n)),
}


def _or_missing(value: str | None) -> Any:
    return _MISSING if value is None else value


def _lookup(ref: str) -> Lookup:
    fixed = _FIXED.get(ref)
    if fixed is not None:
        return fixed
    parts = ref.split(".")
    head = ".".join(parts[:2])
    if head in _BY_NAME and len(parts) == 3:
        return _named(_BY_NAME[head], parts[2])
    if head == "request.path" and len(parts) == 3:
        return _segment(int(parts[2])) if parts[2].isdigit() else _group(parts[2])
    if head == "request.json":
        return _json_field(parts[2:])
    raise TemplateError(f"unknown name {ref!r} (known: {', '.join(NAMES)})")


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None or isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


class Template:
    """A text with places filled from the request."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.parts: list[str | _Place] = []
        last = 0
        # As in Handlebars: \{{ is the text {{ (and what follows it is text up
        # to the next {{), while \\{{ is a backslash before a place.
        while (found := _OPEN.search(source, last)) is not None:
            backslashes = found.group(1)
            if len(backslashes) == 1:
                self._literal(source[last : found.start()] + "{{")
                last = found.end()
                continue
            self._literal(source[last : found.start()] + backslashes[:-1])
            close = source.find("}}", found.end())
            if close < 0:
                raise TemplateError("an unclosed {{ (\\{{ for the text {{)")
            self.parts.append(_place(source[found.end() : close]))
            last = close + 2
        self._literal(source[last:])

    @classmethod
    def literal(cls, text: str) -> Template:
        """Text as it is, {{ and all (a route without C{template: true})."""
        template = cls("")
        template.source = text
        template.parts = [text] if text else []
        return template

    def _literal(self, text: str) -> None:
        # A }} outside a place is text (nested JSON ends so), as in Handlebars.
        if text and self.parts and isinstance(self.parts[-1], str):
            self.parts[-1] += text
        elif text:
            self.parts.append(text)

    @property
    def constant(self) -> bool:
        return all(isinstance(p, str) for p in self.parts)

    @property
    def reads_body(self) -> bool:
        return any(isinstance(p, _Place) and p.reads_body for p in self.parts)

    @property
    def lone(self) -> _Place | None:
        """The place, if this template is one place alone (and no text)."""
        parts = self.parts
        return parts[0] if len(parts) == 1 and isinstance(parts[0], _Place) else None

    def value(self, scope: Scope) -> Any:
        """A template that is one place alone gives its value as it is (a number stays one)."""
        place = self.lone
        if place is not None:
            found = place.lookup(scope)
            if found is _MISSING:
                return place.default if place.default is not None else ""
            return found
        return self.render(scope)

    def render(self, scope: Scope) -> str:
        pieces = []
        size = 0
        for part in self.parts:
            if isinstance(part, str):
                text = part
            else:
                found = part.lookup(scope)
                text = (part.default or "") if found is _MISSING else _as_text(found)
            size += len(text)
            if size > MAX_RENDERED:
                raise TemplateError(f"renders past {MAX_RENDERED} characters")
            pieces.append(text)
        return "".join(pieces)


def _place(inside: str) -> _Place:
    ref, bar, rest = inside.partition("|")
    ref = ref.strip()
    default = None
    if bar:
        found = _DEFAULT.match(bar + rest)
        if found is None:
            raise TemplateError(f"a default is quoted text: {{{{{inside}}}}}")
        default = found.group(1) if found.group(1) is not None else found.group(2)
    if not _REF.match(ref):
        raise TemplateError(f"not a name: {ref!r} (known: {', '.join(NAMES)})")
    reads_body = ref.startswith(("request.body", "request.json", "request.form"))
    return _Place(_lookup(ref), default, reads_body)


# One encoder for every answer: json.dumps with options builds a new one per call.
_encode = json.JSONEncoder(ensure_ascii=False, allow_nan=False).encode
# What that encoder does with a string (the common filled-in value), without its
# Python-level dispatch: a request's answer is built with caches cold, where
# each Python function it passes through costs more than its work.
_encode_text = json.encoder.encode_basestring


def _joined(pieces: list[str | Template | _Place]) -> list[str | Template | _Place]:
    """Runs of constant text as one piece."""
    joined: list[str | Template | _Place] = []
    for piece in pieces:
        if isinstance(piece, str) and joined and isinstance(joined[-1], str):
            joined[-1] += piece
        else:
            joined.append(piece)
    return joined


class JSONTemplate:
    """A JSON document whose string values (not keys) are templates."""

    def __init__(self, document: Any, templated: bool = True) -> None:
        self.document = self._parse(document) if templated else document
        self.constant = self._constant(self.document)
        self.reads_body = self._reads_body(self.document)
        # Text, and what fills it in: a template, or the lone place of one
        # (asked straight, without the template's call around it).
        self.pieces: list[str | Template | _Place] = []
        try:
            # A document with nothing to fill is encoded once, not per request.
            self.fixed = _encode(document).encode() if self.constant else None
            # Otherwise the document is encoded once around its places: each
            # request encodes only what it fills in (the same text json.dumps gives).
            if not self.constant:
                self._compile(self.document)
                self.pieces = _joined(self.pieces)
        except (TypeError, ValueError) as e:
            # YAML's .nan, .inf and dates: no JSON text stands for them.
            raise TemplateError(f"not JSON: {e}") from None

    def _compile(self, node: Any) -> None:
        pieces = self.pieces
        if isinstance(node, Template):
            pieces.append(node.lone or node)
        elif isinstance(node, dict) and node and not self._constant(node):
            pieces.append("{")
            for index, (key, value) in enumerate(node.items()):
                pieces.append((", " if index else "") + _encode(key) + ": ")
                self._compile(value)
            pieces.append("}")
        elif isinstance(node, list) and node and not self._constant(node):
            pieces.append("[")
            for index, value in enumerate(node):
                if index:
                    pieces.append(", ")
                self._compile(value)
            pieces.append("]")
        else:
            pieces.append(_encode(node))

    def _parse(self, node: Any) -> Any:
        if isinstance(node, str):
            template = Template(node)
            return node if template.constant else template
        if isinstance(node, dict):
            return {str(k): self._parse(v) for k, v in node.items()}
        if isinstance(node, list):
            return [self._parse(v) for v in node]
        return node

    def _reads_body(self, node: Any) -> bool:
        if isinstance(node, Template):
            return node.reads_body
        if isinstance(node, dict):
            return any(self._reads_body(v) for v in node.values())
        if isinstance(node, list):
            return any(self._reads_body(v) for v in node)
        return False

    def _constant(self, node: Any) -> bool:
        if isinstance(node, Template):
            return False
        if isinstance(node, dict):
            return all(self._constant(v) for v in node.values())
        if isinstance(node, list):
            return all(self._constant(v) for v in node)
        return True

    def render(self, scope: Scope) -> bytes:
        if self.fixed is not None:
            return self.fixed
        pieces = []
        for piece in self.pieces:
            if isinstance(piece, str):
                pieces.append(piece)
                continue
            if isinstance(piece, _Place):
                value = piece.lookup(scope)
                if value is _MISSING:
                    value = piece.default if piece.default is not None else ""
            else:
                value = piece.value(scope)
            pieces.append(_encode_text(value) if isinstance(value, str) else _encode(value))
        text = "".join(pieces)
        if len(text) > MAX_RENDERED:
            raise TemplateError(f"renders past {MAX_RENDERED} characters")
        return text.encode()
