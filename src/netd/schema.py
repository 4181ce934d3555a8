"""
Reading the YAML service map with positions.

The map is composed into PyYAML nodes (which carry line and column), then read
through L{Value} and L{Section}.  Readers never raise on bad input: they record a
L{ConfigError} in the shared L{Problems} and return a placeholder, so one pass
reports every error in the file at once.
"""

from __future__ import annotations

import functools
import ipaddress
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import attrs
import yaml
from twisted.internet.interfaces import IAddress
from yaml.composer import Composer
from yaml.constructor import ConstructorError, SafeConstructor

from netd.records import Record

__all__ = [
    "LOOPBACK",
    "ConfigError",
    "ConfigErrors",
    "Network",
    "Position",
    "Problems",
    "Section",
    "Value",
    "client_address",
    "compose",
    "in_networks",
    "load",
    "load_large",
]

T = TypeVar("T")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
LOOPBACK: tuple[Network, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)
# RFC 1123 host names (letters, digits, '-'; '_' as real zones have it), dot-ended or not.
_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\Z")

_STR = "tag:yaml.org,2002:str"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_BOOL = "tag:yaml.org,2002:bool"
_NULL = "tag:yaml.org,2002:null"


@attrs.frozen(repr=False)
class Position(Record):
    file: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"

    @classmethod
    def in_text(cls, file: str, text: str, index: int) -> Position:
        """Where the character at C{index} of the map's C{text} is."""
        line_start = text.rfind("\n", 0, index) + 1
        return cls(file, text.count("\n", 0, index) + 1, index - line_start + 1)


@attrs.frozen(repr=False)
class ConfigError(Record):
    position: Position
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"{self.position}: {where}{self.message}"


class ConfigErrors(Exception):
    """Every problem found in one service map, in file order."""

    def __init__(self, errors: list[ConfigError]) -> None:
        self.errors = sorted(errors, key=lambda e: (e.position.line, e.position.column))
        super().__init__("\n".join(str(e) for e in self.errors))


class Problems:
    """Collects errors while a map is read."""

    def __init__(self) -> None:
        self.errors: list[ConfigError] = []

    def add(self, position: Position, path: str, message: str) -> None:
        self.errors.append(ConfigError(position, path, message))

    def raise_if_any(self) -> None:
        if self.errors:
            raise ConfigErrors(self.errors)


_MERGE = "tag:yaml.org,2002:merge"

# Far deeper than any map: a route's JSON body starts six levels down.  The
# bound keeps every reader that walks a value (PyYAML's constructor, the http
# kind's templates) far from Python's recursion limit, whatever the thread.
_DEEPEST = 100
# Nodes a file's aliases may repeat.  A written map repeats a few; nine lines of
# nine aliases each ("billion laughs") repeat 9**9, which the readers that walk
# the expanded values would never finish.  What is written is not counted: it is
# no more than the text already read, and a recording grows without end (20,000
# exchanges are 700,000 nodes).
_LARGEST = 1_000_000


class _Refused(Exception):
    """Valid YAML that netd will not read, and where it is."""

    def __init__(self, where: yaml.Event | yaml.Node, message: str) -> None:
        super().__init__(message)
        mark = where.start_mark
        assert mark is not None  # the parser marks every event
        self.line, self.column = mark.line + 1, mark.column + 1


class _Bounded(Composer):
    """
    A composer that bounds what a file stands for (L{_DEEPEST}, L{_LARGEST}),
    counting each alias as the nodes it repeats, and applies YAML 1.1 merge
    keys (C{<<: *base}) to the composed nodes, whose readers would otherwise
    see a key named C{<<}.  The loader it is mixed into parses.
    """

    peek_event: Callable[[], yaml.Event]

    def __init__(self) -> None:
        Composer.__init__(self)
        self._depth = 0
        self._repeated = 0
        # Each complete node's expanded size and height.
        self._extents: dict[yaml.Node, tuple[int, int]] = {}

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event = self.peek_event()
        if not isinstance(event, yaml.AliasEvent):
            self._bound(event, 1)
            self._depth += 1
            node = super().compose_node(parent, index)
            self._depth -= 1
            assert node is not None  # only a document's end composes to nothing
            children = [self._extents[child] for child in _children(node)]
            self._extents[node] = (
                1 + sum(size for size, _ in children),
                1 + max((height for _, height in children), default=0),
            )
            return node
        node = super().compose_node(parent, index)
        assert node is not None
        extent = self._extents.get(node)
        if extent is None:
            raise _Refused(event, f"alias {event.anchor!r} is inside the node it names")
        size, height = extent
        self._repeated += size
        if self._repeated > _LARGEST:
            raise _Refused(event, f"aliases repeat more than {_LARGEST:,} nodes")
        self._bound(event, height)
        return node

    def _bound(self, event: yaml.Event, height: int) -> None:
        if self._depth + height > _DEEPEST:
            raise _Refused(event, f"nested too deeply (more than {_DEEPEST} levels)")

    def compose_mapping_node(self, anchor: Any) -> yaml.MappingNode:
        node = super().compose_mapping_node(anchor)
        merges = [key for key, _ in node.value if key.tag == _MERGE]
        if len(merges) > 1:
            # A mapping's keys are unique (YAML 1.1 3.2.1.1): which '<<' wins would be a guess.
            raise _Refused(merges[1], "duplicate key '<<': merge several as '<<: [*a, *b]'")
        if merges:
            node.value = _merged(node)
        return node


class _MapComposer(_Bounded, yaml.SafeLoader):
    """The map's: PyYAML's own parser, whose errors the map reports with their positions."""

    def __init__(self, stream: str) -> None:
        yaml.SafeLoader.__init__(self, stream)
        _Bounded.__init__(self)


if yaml.__with_libyaml__:

    class _FileLoader(_Bounded, yaml.CSafeLoader):
        """
        libyaml's parser under the bound: five times faster on a file that
        grows without end (a recording of 20,000 exchanges is 8 MB).
        """

        def __init__(self, stream: str) -> None:
            yaml.CSafeLoader.__init__(self, stream)
            _Bounded.__init__(self)


# Where a '*' may begin an alias.  The scanner reads one only where a token may
# begin: at the start, after whitespace (line breaks included) or a BOM, or
# right after an indicator that needs no space after it in flow context ('[',
# '{', ',', ':', '?').  Anywhere else a '*' is inside a plain scalar or a tag,
# or the parser refuses what follows a token with no separator ('"a"*x',
# '[a]*x', '&a*x').  Inside quotes or comments a match is wrong but harmless:
# the file is only read the slower, bounded way.
_MAY_ALIAS = re.compile(r"(?:\A|[\s\ufeff\[{,:?])\*")


def load(text: str) -> Any:
    """
    The value of YAML C{text} as PyYAML's safe loader reads it, bounded as the
    map is: for a file netd reads while it runs (an OpenAPI description).

    @raise yaml.YAMLError: C{text} is not YAML, or it is past a bound (where, and which).
    """
    return _load(_MapComposer(text))


def load_large(text: str) -> Any:
    """
    The value of YAML C{text} as libyaml reads it, for a large file netd wrote
    itself (a recording read back): with no alias in it, nothing can expand and
    libyaml's own loader reads it; with one, it is bounded as the map is.

    @raise yaml.YAMLError: C{text} is not YAML, or it is past a bound (where, and which).
    """
    if not yaml.__with_libyaml__:
        return load(text)
    # Most recordings hold no '*' at all: looking for one is 500 times faster than the pattern.
    if "*" not in text or _MAY_ALIAS.search(text) is None:
        return yaml.load(text, Loader=yaml.CSafeLoader)
    return _load(_FileLoader(text))


def _load(loader: _MapComposer | _FileLoader) -> Any:
    try:
        return loader.get_single_data()
    except _Refused as e:
        raise yaml.YAMLError(f"line {e.line}, column {e.column}: {e}") from None
    finally:
        loader.dispose()


def _children(node: yaml.Node) -> Iterator[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        yield from node.value
    elif isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            yield key
            yield value


def _merged(node: yaml.MappingNode) -> list[tuple[yaml.Node, yaml.Node]]:
    """
    The pairs of C{node} with its C{<<} replaced by the pairs of the mapping, or
    list of mappings, it names, as PyYAML builds its dict from them: the merged
    pairs first, then C{node}'s own; a key stays where it first appears, an
    earlier merged mapping wins over a later one (YAML 1.1) and C{node} over
    both.  Keys are the same when their values are (C{404} is not C{'404'},
    C{0x1f} is C{31}).  Those mappings, composed before C{node}, are merged already.
    """
    merged: list[tuple[yaml.Node, yaml.Node]] = []
    own: list[tuple[yaml.Node, yaml.Node]] = []
    for key, value in node.value:
        if key.tag != _MERGE:
            own.append((key, value))
            continue
        for source in value.value if isinstance(value, yaml.SequenceNode) else [value]:
            if not isinstance(source, yaml.MappingNode):
                raise _Refused(source, "'<<' merges a mapping or a list of mappings")
            merged.extend(source.value)
    constructor = SafeConstructor()
    slots: dict[object, list[tuple[yaml.Node, yaml.Node]]] = {}
    for key, value in merged:
        slots.setdefault(_identity(constructor, key), [(key, value)])
    overridable = set(slots)
    for key, value in own:
        identity = _identity(constructor, key)
        if identity in overridable:
            overridable.remove(identity)
            slots[identity] = []
        # A key the mapping sets twice stays twice, for its reader to report.
        slots.setdefault(identity, []).append((key, value))
    return [pair for pairs in slots.values() for pair in pairs]


def _identity(constructor: SafeConstructor, key: yaml.Node) -> object:
    """What C{key} is as a key of PyYAML's dict, or the node itself when it is none."""
    if isinstance(key, yaml.ScalarNode):
        try:
            return constructor.construct_object(key)
        except (ConstructorError, ValueError):
            pass
    return key


def compose(text: str, file: str, problems: Problems) -> yaml.Node | None:
    try:
        node = yaml.compose(text, Loader=_MapComposer)
    except _Refused as e:
        problems.add(Position(file, e.line, e.column), "", str(e))
        return None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problems.add(Position(file, line, column), "", f"not valid YAML: {e.problem}")
        return None
    except yaml.reader.ReaderError as e:
        problems.add(
            Position.in_text(file, text, e.position),
            "",
            f"not valid YAML: unacceptable character #x{e.character:04x}: {e.reason}",
        )
        return None
    except yaml.YAMLError as e:
        problems.add(Position(file, 1, 1), "", f"not valid YAML: {e}")
        return None
    return node


def client_address(
    client: str | IAddress | None,
) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """
    A client's IP address as every address check of the service map compares
    it (C{allow_from}, C{recursion_from}, FTP's anti-bounce), or None for a
    client without one (a UNIX socket).

    A dual-stack listener (interface C{::}) sees an IPv4 client
    as C{::ffff:a.b.c.d}; that is read as a.b.c.d, so IPv4 networks match it.
    A zone index (C{fe80::1%eth0}) is dropped.
    """
    host = client if isinstance(client, str) else getattr(client, "host", None)
    if not isinstance(host, str):
        return None
    return _host_address(host)


# Every check of a message or query asks again for the same few clients.
@functools.lru_cache(maxsize=4096)
def _host_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def in_networks(client: str | IAddress | None, networks: tuple[Network, ...]) -> bool:
    """Whether C{client} (as L{client_address} reads it) is in one of C{networks}."""
    address = client_address(client)
    return address is not None and any(address in network for network in networks)


def _scalar(node: yaml.ScalarNode) -> Any:
    """The node's value, or None when its explicit tag does not fit (C{!!int abc})."""
    # A constructor of its own each time: one keeps every node it built (and,
    # through the node's marks, the text of its file), so a shared one grew
    # by every map each reload read, and maps are read in threads too.
    try:
        return SafeConstructor().construct_object(node, deep=True)
    except (ConstructorError, ValueError, KeyError):
        return None


@attrs.frozen(repr=False)
class Value(Record):
    """One node of the map, with its dotted path for messages."""

    node: yaml.Node
    path: str
    file: str
    base_dir: Path
    problems: Problems

    @property
    def position(self) -> Position:
        mark = self.node.start_mark
        return Position(self.file, mark.line + 1, mark.column + 1)

    def error(self, message: str) -> None:
        self.problems.add(self.position, self.path, message)

    def child(self, node: yaml.Node, suffix: str) -> Value:
        if suffix.startswith("["):
            path = f"{self.path}{suffix}"
        else:
            path = f"{self.path}.{suffix}" if self.path else suffix
        return attrs.evolve(self, node=node, path=path)

    @property
    def is_null(self) -> bool:
        return isinstance(self.node, yaml.ScalarNode) and self.node.tag == _NULL

    @property
    def is_mapping(self) -> bool:
        return isinstance(self.node, yaml.MappingNode)

    @property
    def is_sequence(self) -> bool:
        return isinstance(self.node, yaml.SequenceNode)

    @property
    def is_scalar(self) -> bool:
        return isinstance(self.node, yaml.ScalarNode) and not self.is_null

    def _kind(self) -> str:
        if self.is_mapping:
            return "a mapping"
        if self.is_sequence:
            return "a list"
        if self.is_null:
            return "empty"
        return {
            _INT: "a number",
            _FLOAT: "a number",
            _BOOL: "a boolean",
        }.get(self.node.tag, "a string")

    def _expect(self, what: str) -> None:
        self.error(f"expected {what}, got {self._kind()}")

    def as_str(self, default: str = "") -> str:
        if isinstance(self.node, yaml.ScalarNode) and self.node.tag in (_STR, _INT, _FLOAT):
            # Ports and addresses are written unquoted; "2121" and 2121 mean the same.
            return str(self.node.value)
        self._expect("a string")
        return default

    def as_int(
        self, default: int = 0, minimum: int | None = None, maximum: int | None = None
    ) -> int:
        if not (isinstance(self.node, yaml.ScalarNode) and self.node.tag == _INT):
            self._expect("an integer")
            return default
        number = _scalar(self.node)
        if not isinstance(number, int):
            self.error(f"not an integer: {self.node.value!r}")
            return default
        if minimum is not None and number < minimum:
            self.error(f"must be at least {minimum}, got {number}")
            return default
        if maximum is not None and number > maximum:
            self.error(f"must be at most {maximum}, got {number}")
            return default
        return number

    def as_float(self, default: float = 0.0, minimum: float | None = None) -> float:
        if not (isinstance(self.node, yaml.ScalarNode) and self.node.tag in (_INT, _FLOAT)):
            self._expect("a number")
            return default
        value = _scalar(self.node)
        if not isinstance(value, (int, float)):
            self.error(f"not a number: {self.node.value!r}")
            return default
        if not math.isfinite(value):
            # NaN passes every comparison with a minimum; infinity is no timeout.
            self.error(f"must be a finite number, got {self.node.value}")
            return default
        number = float(value)
        if minimum is not None and number < minimum:
            self.error(f"must be at least {minimum}, got {number:g}")
            return default
        return number

    def as_bool(self, default: bool = False) -> bool:
        if not (isinstance(self.node, yaml.ScalarNode) and self.node.tag == _BOOL):
            self._expect("true or false")
            return default
        flag = _scalar(self.node)
        if not isinstance(flag, bool):
            self.error(f"not true or false: {self.node.value!r}")
            return default
        return flag

    def as_choice(self, choices: tuple[str, ...], default: str) -> str:
        text = self.as_str(default)
        if text not in choices:
            if self.is_scalar:
                self.error(f"must be one of {', '.join(choices)}, got {text!r}")
            return default
        return text

    def as_network(self) -> Network | None:
        """An address or a network in CIDR form (host bits allowed: C{10.1.2.3/8})."""
        text = self.as_str()
        if not self.is_scalar:
            return None
        try:
            return ipaddress.ip_network(text, strict=False)
        except ValueError:
            self.error(f"not an address or network: {text!r}")
            return None

    def as_hostname(self) -> str | None:
        """A host name (RFC 1123), without its final dot."""
        text = self.as_str()
        name = text.rstrip(".")
        if not self.is_scalar:
            return None
        if not name or len(name) > 253 or not all(map(_LABEL.match, name.split("."))):
            self.error(f"not a host name: {text!r}")
            return None
        return name

    def as_host_port(self, default_port: int, numeric: bool = False) -> tuple[str, int] | None:
        """
        C{HOST[:PORT]}: a name or an IPv4 address, or an IPv6 address bare or as
        C{[v6]:PORT}; C{numeric} allows addresses only.
        """
        text = self.as_str()
        if not self.is_scalar:
            return None
        host, port = text, str(default_port)
        if text.startswith("["):
            host, _, rest = text[1:].partition("]")
            if rest:
                port = rest[1:] if rest[:1] == ":" else ""
        elif text.count(":") == 1:
            host, _, port = text.partition(":")
        try:
            address = str(ipaddress.ip_address(host))
        except ValueError:
            address = ""  # a name, then
        name_ok = not numeric and all(map(_LABEL.match, host.rstrip(".").split(".")))
        if not ((address or name_ok) and port.isdigit() and 0 < int(port) < 65536):
            shape = "IP" if numeric else "HOST"
            self.error(
                f"not {shape}[:PORT]: {text!r} (as in 127.0.0.1:{default_port} or "
                f"[::1]:{default_port})"
            )
            return None
        host = address or host.rstrip(".")
        return host, int(port)

    def as_path(self) -> Path:
        return self.base_dir / self.as_str()

    def items(self) -> Iterator[tuple[str, Value]]:
        """Key/value pairs of a mapping; reports non-string and duplicate keys."""
        if not isinstance(self.node, yaml.MappingNode):
            self._expect("a mapping")
            return
        seen: set[str] = set()
        for key_node, value_node in self.node.value:
            key_value = attrs.evolve(self, node=key_node)
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _NULL:
                key_value.error("mapping keys must be strings")
                continue
            key = str(key_node.value)
            if key in seen:
                attrs.evolve(key_value, path=self.child(key_node, key).path).error("duplicate key")
                continue
            seen.add(key)
            yield key, self.child(value_node, key)

    def elements(self, single: bool = False) -> list[Value]:
        """The items of a list; with C{single}, a lone scalar counts as a one-item list."""
        if isinstance(self.node, yaml.SequenceNode):
            return [self.child(n, f"[{i}]") for i, n in enumerate(self.node.value)]
        if single and not self.is_null and not self.is_sequence:
            return [self]
        self._expect("a list")
        return []

    def list_of(self, read: Callable[[Value], T], single: bool = False) -> tuple[T, ...]:
        return tuple(read(element) for element in self.elements(single))

    def section(self) -> Section:
        return Section(self)


class Section:
    """A mapping read key by key; keys never asked for are reported as unknown."""

    def __init__(self, value: Value) -> None:
        self.value = value
        self._entries: dict[str, Value] = dict(value.items()) if not value.is_null else {}
        self._used: set[str] = set()

    @property
    def position(self) -> Position:
        return self.value.position

    @property
    def path(self) -> str:
        return self.value.path

    def get(self, key: str) -> Value | None:
        self._used.add(key)
        entry = self._entries.get(key)
        if entry is None or entry.is_null:
            return None
        return entry

    def has(self, key: str) -> bool:
        return self.get(key) is not None

    def pass_over_extensions(self) -> None:
        """
        Keys that begin with C{x-} are the map writer's, not netd's (as Compose
        files' extension fields): a place for blocks that anchors share.
        """
        self._used.update(key for key in self._entries if key.startswith("x-"))

    def read(self, key: str, read: Callable[[Value], T], default: T) -> T:
        entry = self.get(key)
        return default if entry is None else read(entry)

    def text(self, key: str, default: str = "") -> str:
        return self.read(key, lambda v: v.as_str(default), default)

    def optional_str(self, key: str) -> str | None:
        return self.read(key, lambda v: v.as_str(), None)

    def integer(
        self, key: str, default: int, minimum: int | None = None, maximum: int | None = None
    ) -> int:
        return self.read(key, lambda v: v.as_int(default, minimum, maximum), default)

    def number(self, key: str, default: float, minimum: float | None = None) -> float:
        return self.read(key, lambda v: v.as_float(default, minimum), default)

    def flag(self, key: str, default: bool) -> bool:
        return self.read(key, lambda v: v.as_bool(default), default)

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        return self.read(key, lambda v: v.as_choice(choices, default), default)

    def file_path(self, key: str) -> Path | None:
        return self.read(key, lambda v: v.as_path(), None)

    def networks(self, key: str, default: tuple[Network, ...]) -> tuple[Network, ...]:
        """A list of addresses and networks (a single one may stand alone)."""

        def read(value: Value) -> tuple[Network, ...]:
            return tuple(n for n in value.list_of(Value.as_network, single=True) if n is not None)

        return self.read(key, read, default)

    def strings(self, key: str) -> tuple[str, ...]:
        return self.read(key, lambda v: v.list_of(lambda e: e.as_str(), single=True), ())

    def require(self, key: str) -> Value | None:
        entry = self.get(key)
        # Not a mapping at all is already reported; its keys are not missing too.
        if entry is None and (self.value.is_mapping or self.value.is_null):
            self.value.error(f"missing required key {key!r}")
        return entry

    def finish(self, known: str = "") -> None:
        """Report every key that no reader asked for (naming the C{known} ones, if given)."""
        message = f"unknown key (known: {known})" if known else "unknown key"
        for key, entry in self._entries.items():
            if key not in self._used:
                key_node = next(k for k, v in self.value.node.value if v is entry.node)
                attrs.evolve(entry, node=key_node).error(message)
