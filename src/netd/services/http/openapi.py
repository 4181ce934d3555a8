"""
Routes from an OpenAPI description: C{openapi: FILE} on an http service.

Each operation (3.0 or 3.1, YAML or JSON) becomes a route for its method and path
template under the first server's path; it answers the operation's first success
response (lowest 2xx, else C{default}) with the spec's example (the media type's
C{example}, its first C{examples} entry, the schema's C{example}) or else a small
body built to fit the schema, its strings drawn by rstr to match their
C{pattern} (a schema no body fits, such as three different integers from 0 to
1, is an error when the file is read); and it refuses, with
400 and the reason, a request the spec does not allow (parameters, body).
openapi-core reads and checks the file and validates requests (C{pip install
'netd[openapi]'}); it is imported only when a map names a file, as it brings
werkzeug and jsonschema along.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import re
import urllib.parse
from collections.abc import Iterable, Iterator
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import Any, TypeGuard

import attrs
import rstr
import yaml
from openapi_core import OpenAPI
from openapi_core.datatypes import RequestParameters
from werkzeug.datastructures import Headers as WerkzeugHeaders
from werkzeug.datastructures import ImmutableMultiDict

from netd import schema
from netd.records import Record
from netd.services.http.match import Request
from netd.services.http.stubs import Answer, Stub
from netd.services.http.template import JSONTemplate, Template, TemplateError

__all__ = ["OpenAPIError", "operations"]

_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
_PARAMETER = re.compile(r"\{([^}/]+)\}")
# Nested $refs followed when a body is built from a schema; deeper is left empty.
_DEPTH = 12
# Numbers in a row that do not fit a schema before its values are taken to have run out.
_TRIES = 1000
# Strings drawn for a pattern: the shortest that fits answers, so a "+" drawn long is passed over.
_DRAWS = 64


class OpenAPIError(ValueError):
    """A file that is not an OpenAPI description openapi-core accepts."""


@attrs.frozen(repr=False)
class Operation(Record):
    """One operation as a route: where it is, and the stub that answers it."""

    method: str
    path: str
    pattern: re.Pattern[str]
    name: str
    stub: Stub
    parameters: int


def operations(path: Path) -> list[Operation]:
    """Every operation of the description in C{path}."""
    try:
        text = path.read_text(encoding="utf-8")
        spec = json.loads(text) if path.suffix == ".json" else schema.load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as e:
        raise OpenAPIError(f"cannot read {path}: {e}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("paths"), dict):
        raise OpenAPIError(f"{path} is not an OpenAPI description (no paths)")
    base = _base_path(spec)
    # Requests reach netd on whatever host it listens: servers are matched on their path.
    checked = dict(spec, servers=[{"url": base or "/"}])
    try:
        api = OpenAPI.from_dict(checked)
        api.check_spec()
    except Exception as e:  # openapi-core's spec errors share no base class
        raise OpenAPIError(f"{path}: {e}") from None
    found = []
    for template, item in spec["paths"].items():
        if not isinstance(item, dict):
            continue
        for method in _METHODS:
            operation = item.get(method)
            if not isinstance(operation, dict):
                continue
            try:
                found.append(_operation(api, spec, base, template, method, operation))
            except (TemplateError, OpenAPIError) as e:  # JSON cannot say it (NaN), no body fits
                raise OpenAPIError(f"{path}: {method.upper()} {template}: {e}") from None
    # A fixed path before a template that would also match it (/pets/mine, /pets/{id}).
    found.sort(key=lambda o: o.parameters)
    return found


def _base_path(spec: dict[str, Any]) -> str:
    servers = spec.get("servers") or [{"url": "/"}]
    url = str(servers[0].get("url", "/")) if isinstance(servers[0], dict) else "/"
    # Server variables: their defaults.
    for name, variable in (servers[0].get("variables") or {}).items():
        url = url.replace("{" + name + "}", str(variable.get("default", "")))
    return urllib.parse.urlsplit(url).path.rstrip("/")


def _operation(
    api: OpenAPI,
    spec: dict[str, Any],
    base: str,
    template: str,
    method: str,
    operation: dict[str, Any],
) -> Operation:
    full = base + template
    pieces = _PARAMETER.split(full)
    regex = "".join(re.escape(piece) if i % 2 == 0 else "[^/]+" for i, piece in enumerate(pieces))
    status, headers, body = _answer(spec, operation)
    answer = Answer(
        status=status,
        headers=tuple((name, Template.literal(value)) for name, value in headers),
        body=Template.literal(body) if isinstance(body, str) else None,
        json=None if isinstance(body, str) else JSONTemplate(body, templated=False),
    )
    validate = _Validator(api)
    stub = Stub(answers=(answer,), check=validate, body_read="requestBody" in operation)
    return Operation(
        method=method.upper(),
        path=full,
        pattern=re.compile(regex),
        name=str(operation.get("operationId") or f"{method.upper()} {full}"),
        stub=stub,
        parameters=len(pieces) // 2,
    )


def _answer(
    spec: dict[str, Any], operation: dict[str, Any]
) -> tuple[int, list[tuple[str, str]], Any]:
    responses = operation.get("responses") or {}
    codes = sorted(str(c) for c in responses if str(c).startswith("2"))
    code = codes[0] if codes else ("default" if "default" in responses else None)
    if code is None:
        return 200, [], ""
    response = _resolve(spec, responses[code if code in responses else int(code)])
    status = int(code) if code.isdigit() else 200
    content = response.get("content") or {}
    if not content:
        return status, [], ""
    media_type = "application/json" if "application/json" in content else next(iter(content))
    media = _resolve(spec, content[media_type]) or {}
    body = _example(spec, media)
    headers = [("Content-Type", media_type)]
    if "json" not in media_type:
        return status, headers, body if isinstance(body, str) else json.dumps(body)
    return status, headers, body


def _example(spec: dict[str, Any], media: dict[str, Any]) -> Any:
    if "example" in media:
        return media["example"]
    examples = media.get("examples")
    if isinstance(examples, dict) and examples:
        first = _resolve(spec, next(iter(examples.values())))
        if "value" in first:
            return first["value"]
    schema = _resolve(spec, media.get("schema") or {})
    if "example" in schema:
        return schema["example"]
    return minimal(spec, schema)


def _resolve(spec: dict[str, Any], node: Any, depth: int = 0) -> Any:
    """A local C{$ref} ("#/components/...") followed to what it names."""
    while isinstance(node, dict) and "$ref" in node and depth < _DEPTH:
        ref = str(node["$ref"])
        if not ref.startswith("#/"):
            return {}
        target: Any = spec
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            target = target.get(part) if isinstance(target, dict) else None
        node = target if target is not None else {}
        depth += 1
    return node if isinstance(node, dict) else {}


def minimal(spec: dict[str, Any], schema: Any, depth: int = 0) -> Any:
    """A small value valid for C{schema}: required members, least lengths, lowest bounds."""
    schema = _resolve(spec, schema)
    if depth > _DEPTH:
        return None
    for key in ("example", "default", "const"):
        if key in schema:
            return schema[key]
    if isinstance(schema.get("examples"), list) and schema["examples"]:
        return schema["examples"][0]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("oneOf", "anyOf"):
        if schema.get(key):
            return minimal(spec, schema[key][0], depth + 1)
    if schema.get("allOf"):
        merged: dict[str, Any] = {}
        for part in schema["allOf"]:
            value = minimal(spec, part, depth + 1)
            if isinstance(value, dict):
                merged.update(value)
        return merged
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or (kind is None and "properties" in schema):
        properties = schema.get("properties") or {}
        return {
            name: minimal(spec, properties.get(name, {}), depth + 1)
            for name in schema.get("required") or []
        }
    if kind == "array":
        count = int(schema.get("minItems", 0))
        item = minimal(spec, schema.get("items", {}), depth + 1)
        if schema.get("uniqueItems") and count > 1:
            items = schema.get("items", {})
            return _take(_variants(spec, items, item, depth + 1), count, _resolve(spec, items))
        return [item] * count
    if kind in ("integer", "number"):
        return _take(_numbers(schema, kind == "integer"), 1, schema)[0]
    if kind == "boolean":
        return False
    if kind == "string":
        return _string(schema)
    return None


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _take(values: Iterable[Any], count: int, schema: Any) -> list[Any]:
    """C{count} different ones of C{values}; an error naming C{schema} if it has fewer."""
    found: list[Any] = []
    for value in values:
        if value not in found:
            found.append(value)
            if len(found) == count:
                return found
    raise OpenAPIError(
        f"no body fits the schema: {count} different values of {json.dumps(schema)} cannot be"
        " made (give the response an example)"
    )


def _variants(spec: dict[str, Any], schema: Any, first: Any, depth: int) -> Iterator[Any]:
    """Values of C{schema}, C{first} first, for C{uniqueItems} to take different ones from."""
    schema = _resolve(spec, schema)
    yield first
    if depth > _DEPTH or "const" in schema:
        return
    if schema.get("enum"):
        yield from schema["enum"]
        return
    for key in ("oneOf", "anyOf"):
        if schema.get(key):
            yield from _variants(spec, schema[key][0], first, depth + 1)
            return
    if schema.get("allOf") and isinstance(first, dict):
        parts = [_resolve(spec, part) for part in schema["allOf"]]
        properties = {k: v for part in parts for k, v in (part.get("properties") or {}).items()}
        required = [name for part in parts for name in part.get("required") or []]
        closed = any(part.get("additionalProperties") is False for part in parts)
        schema = {
            "properties": properties,
            "required": required,
            "additionalProperties": not closed,
        }
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "boolean":
        yield from (False, True)
    elif kind in ("integer", "number", None) and not isinstance(first, dict):
        yield from _numbers(schema, kind == "integer")
    elif kind == "string" and isinstance(first, str):
        yield from _strings(schema, first)
    elif kind == "array" and isinstance(first, list):
        yield from _arrays(spec, schema, len(first), depth)
    elif isinstance(first, dict):
        yield from _objects(spec, schema, first, depth)


def _numbers(schema: dict[str, Any], integer: bool) -> Iterator[int | float]:
    """
    The values of a number schema from its lower bound (or 0) up, then down
    from there where it has none: each a multiple of C{multipleOf} in the
    schema's own decimals, and as jsonschema checks one too (in floats, 0.3 /
    0.1 is not whole).
    """

    def bounds(name: str) -> list[tuple[Decimal, bool]]:
        """A bound and whether it is open: 3.1's exclusiveMinimum: N, 3.0's: true."""
        value, exclusive = schema.get(name), schema.get("exclusive" + name.title())
        found = [(Decimal(str(value)), exclusive is True)] if _is_number(value) else []
        return found + ([(Decimal(str(exclusive)), True)] if _is_number(exclusive) else [])

    low, low_open = max(bounds("minimum"), default=(None, False))
    high, high_open = min(bounds("maximum"), key=lambda b: (b[0], not b[1]), default=(None, False))
    given = schema.get("multipleOf")
    step: int | float | None = given if _is_number(given) and given > 0 else None
    unit = Decimal(str(step)) if step is not None else Decimal(1)
    start = low if low is not None else min(Decimal(0), high if high is not None else Decimal(0))
    if step is not None or integer:
        start = (start / unit).to_integral_value(ROUND_CEILING) * unit

    def fits(value: Decimal) -> bool:
        if low is not None and (value < low or (low_open and value == low)):
            return False
        if high is not None and (value > high or (high_open and value == high)):
            return False
        return value == value.to_integral_value() or not integer

    def run(value: Decimal, direction: Decimal) -> Iterator[int | float]:
        edge = high if direction > 0 else low
        missed = 0
        while missed < _TRIES and (edge is None or (value - edge) * direction <= 0):
            whole = value == value.to_integral_value() and (integer or abs(value) < 2**53)
            number = int(value) if whole else float(value)
            if fits(value) and _multiple(number, step):
                missed = 0
                yield number
            missed += 1
            value += direction

    yield from run(start, unit)
    if low is None:
        yield from run(start - unit, -unit)


def _multiple(value: int | float, step: int | float | None) -> bool:
    """Whether C{value} is a multiple of C{step} by jsonschema's (and ajv's) rule."""
    if step is None:
        return True
    if isinstance(step, float):
        quotient = value / step
        return math.isfinite(quotient) and int(quotient) == quotient
    return value % step == 0


def _strings(schema: dict[str, Any], first: str) -> Iterator[str]:
    """
    C{first} with a hexadecimal count after it, over its end where maxLength
    says; for a pattern, C{first} and then other strings drawn to match it.
    """
    if "pattern" in schema:
        yield first
        yield from _drawn(schema)
        return
    most = schema.get("maxLength")
    for number in itertools.count():
        tag = format(number, "x")
        if not isinstance(most, int) or len(first) + len(tag) <= most:
            yield first + tag
        elif len(tag) <= most:
            yield first[: most - len(tag)] + tag
        else:
            return


def _arrays(spec: dict[str, Any], schema: dict[str, Any], length: int, depth: int) -> Iterator[Any]:
    """Arrays of C{length} different items, each the last one's items shifted by one."""
    most = schema.get("maxItems")
    length = max(length, 1)
    if isinstance(most, int) and most < length:
        return
    items = schema.get("items", {})
    window: list[Any] = []
    for value in _variants(spec, items, minimal(spec, items, depth + 1), depth + 1):
        if value not in window:
            window = [*window, value][-length:]
            if len(window) == length:
                yield window


def _objects(
    spec: dict[str, Any], schema: dict[str, Any], first: dict[str, Any], depth: int
) -> Iterator[Any]:
    """C{first} with one member changed, or one member more where the schema allows it."""
    properties = schema.get("properties") or {}
    most = schema.get("maxProperties")
    room = not isinstance(most, int) or len(first) < most
    for name in [*first, *(p for p in properties if p not in first and room)]:
        member = properties.get(name, {})
        known = first[name] if name in first else minimal(spec, member, depth + 1)
        for value in _variants(spec, member, known, depth + 1):
            yield {**first, name: value}
    extra = schema.get("additionalProperties", True)
    if room and extra is not False:
        value = minimal(spec, extra if isinstance(extra, dict) else {}, depth + 1)
        yield from ({**first, f"x{n}": value} for n in itertools.count() if f"x{n}" not in first)


def _string(schema: dict[str, Any]) -> str:
    formats = {
        "date-time": "1970-01-01T00:00:00Z",
        "date": "1970-01-01",
        "uuid": "00000000-0000-0000-0000-000000000000",
        "email": "user@example.com",
        "uri": "http://example.com/",
        "ipv4": "127.0.0.1",
        "ipv6": "::1",
    }
    text = formats.get(str(schema.get("format")), "")
    least = int(schema.get("minLength", 0))
    text = text if len(text) >= least else text + "x" * (least - len(text))
    # A length is always checked, a format only if the validator asserts formats.
    most = schema.get("maxLength")
    text = text[:most] if isinstance(most, int) else text
    if "pattern" not in schema or _fits(schema, text):
        return text
    # A pattern no draw matches (lookarounds, backreferences) leaves the string that fits the rest.
    return min(itertools.islice(_drawn(schema), _DRAWS), key=len, default=text)


def _drawn(schema: dict[str, Any]) -> Iterator[str]:
    """
    Different strings that match the schema's pattern (as jsonschema's
    re.search does) and fit its lengths, drawn by rstr the same on every read.
    """
    pattern = str(schema["pattern"])
    try:
        re.compile(pattern)
    except re.error:
        return
    draw = rstr.Rstr(random.Random(pattern)).xeger
    seen: set[str] = set()
    missed = 0
    while missed < _TRIES:
        try:
            text = draw(pattern)
        except (LookupError, ValueError):  # what rstr cannot build: (?>...), a bad group
            return
        missed += 1
        if text not in seen and _fits(schema, text):
            seen.add(text)
            missed = 0
            yield text


def _fits(schema: dict[str, Any], text: str) -> bool:
    least, most = schema.get("minLength", 0), schema.get("maxLength")
    if len(text) < least or (isinstance(most, int) and len(text) > most):
        return False
    return re.search(str(schema["pattern"]), text) is not None


class _Validator:
    """What the spec says of one request: None if it allows it, else the reasons."""

    def __init__(self, api: OpenAPI) -> None:
        self.api = api

    def __call__(self, request: Request) -> str | None:
        errors = list(self.api.iter_request_errors(_SpecRequest(request)))
        if not errors:
            return None
        return "\n".join(_reason(e) for e in errors)


def _reason(error: Exception) -> str:
    reasons = [str(error)]
    cause = error.__cause__
    while cause is not None:
        details = getattr(cause, "schema_errors", None)
        if details:
            reasons.extend(f"  {getattr(d, 'message', d)}" for d in details)
        else:
            reasons.append(f"  {cause}")
        cause = cause.__cause__
    return "\n".join(reasons)


class _SpecRequest:
    """A request as openapi-core reads one."""

    host_url = "http://netd"

    def __init__(self, request: Request) -> None:
        exchange = request.exchange
        self.path = request.path
        self.method = request.method.lower()
        self.body = request.body
        self.content_type = (request.header("content-type") or "").lower()
        self.parameters = RequestParameters(
            query=ImmutableMultiDict(
                [(k, v) for k, values in request.query.items() for v in values]
            ),
            header=WerkzeugHeaders(
                [(n.decode("latin-1"), v.decode("latin-1")) for n, v in exchange.headers]
            ),
            cookie=ImmutableMultiDict(list(request.cookies.items())),
        )
