"""
Toxics: Toxiproxy's faults, with its names, attributes and defaults, plus netd's
conditions on which connections (or datagrams) they act.

A toxic is a scenario rule (L{netd.rules}) applied to bytes: C{client}, C{nth},
C{times} and C{toxicity} (the rule's C{probability}, drawn from a generator
seeded with C{seed}) make its L{netd.rules.RuleSpec}, and whether it acts on a
connection (a datagram) is decided by L{netd.rules.admits}, counted as a rule's.
Its C{type} and C{attributes} are its one act, carried out by the relay
(L{netd.services.proxy.relay}).  Each decision to act is a C{toxic.fired} event
with the fields of C{rule.fired}.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import attrs
from twisted.internet.interfaces import IAddress

from netd.records import Record
from netd.rules import Rule, RuleSpec, Scenarios, admits, is_name
from netd.schema import Network

__all__ = [
    "DATAGRAM_TYPES",
    "STREAM_TYPES",
    "Toxic",
    "ToxicError",
    "ToxicSet",
    "ToxicState",
    "read_toxic",
]

# Each type's attributes and their defaults (Toxiproxy's, all 0), in its units:
# milliseconds, KB/s (1000 bytes), bytes, microseconds for the slicer's delay.
STREAM_TYPES: Mapping[str, Mapping[str, float]] = {
    "latency": {"latency": 0, "jitter": 0},
    "bandwidth": {"rate": 0},
    "slow_close": {"delay": 0},
    "timeout": {"timeout": 0},
    "reset_peer": {"timeout": 0},
    "slicer": {"average_size": 0, "size_variation": 0, "delay": 0},
    "limit_data": {"bytes": 0},
}
# netd's own, for udp: listeners: each decided per datagram.
DATAGRAM_TYPES: Mapping[str, Mapping[str, float]] = {
    "drop": {},
    "delay": {"delay": 0, "jitter": 0},
    "duplicate": {"copies": 1},
}
_TYPES = {**STREAM_TYPES, **DATAGRAM_TYPES}
_STREAMS = ("upstream", "downstream")
_KEYS = frozenset(
    {
        *("name", "type", "stream", "toxicity", "attributes", "client", "nth", "times"),
        *("seed", "scenario", "state", "next_state", "fired"),
    }
)


class ToxicError(ValueError):
    """A toxic that cannot be: C{path} is the offending key ("" for the whole toxic)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message


@attrs.frozen(repr=False)
class Toxic(Record):
    """
    One toxic as configured.

    @ivar stream: C{upstream} acts on bytes from the client to the upstream,
        C{downstream} on bytes back (Toxiproxy's default).
    @ivar toxicity: the probability that it acts on a connection (a datagram).
    @ivar client: act only on clients in these networks; empty, on every client.
    @ivar nth: act only on the Nth matching connection (datagram); 0, on each.
    @ivar times: act at most this many times; 0, without limit.
    @ivar seed: seeds the generator C{toxicity} draws from, as a rule's C{seed}.
    @ivar scenario: with C{state}, act only while that scenario is in it; with
        C{next_state}, move it there on acting (the rules' scenarios).
    """

    name: str
    type: str
    stream: str = "downstream"
    toxicity: float = 1.0
    attributes: Mapping[str, float] = attrs.field(factory=dict)
    client: tuple[Network, ...] = ()
    nth: int = 0
    times: int = 0
    seed: int = 0
    scenario: str | None = None
    state: str | None = None
    next_state: str | None = None

    @property
    def datagram(self) -> bool:
        return self.type in DATAGRAM_TYPES

    def __getitem__(self, attribute: str) -> float:
        """An attribute's value, its type's default if not given."""
        found = self.attributes.get(attribute)
        return _TYPES[self.type][attribute] if found is None else found

    def as_json(self) -> dict[str, Any]:
        """Toxiproxy's shape, with netd's conditions only where set."""
        shape: dict[str, Any] = {
            "name": self.name,
            "type": self.type,
            "stream": self.stream,
            "toxicity": self.toxicity,
            "attributes": dict(self.attributes),
        }
        if self.client:
            shape["client"] = [str(network) for network in self.client]
        if self.nth:
            shape["nth"] = self.nth
        if self.times:
            shape["times"] = self.times
        if self.seed:
            shape["seed"] = self.seed
        for key in ("scenario", "state", "next_state"):
            if getattr(self, key) is not None:
                shape[key] = getattr(self, key)
        return shape

    def rule_spec(self) -> RuleSpec:
        """The scenario rule this toxic is: its conditions, and its type as its one act."""
        return RuleSpec(
            match=(),
            client=self.client,
            acts={self.type: dict(self.attributes)},
            described=self.as_json(),
            id=self.name,
            times=self.times or None,
            nth=self.nth or None,
            probability=self.toxicity if self.toxicity < 1 else None,
            seed=self.seed,
            scenario=self.scenario,
            state=self.state,
            next_state=self.next_state,
        )


def _number(raw: Any, path: str, minimum: float = 0) -> float:
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise ToxicError(path, f"expected a number, got {raw!r}")
    if not raw >= minimum or raw == float("inf"):
        raise ToxicError(path, f"must be a finite number of at least {minimum:g}, got {raw!r}")
    return raw


def _count(raw: Any, path: str) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
        raise ToxicError(path, f"expected a whole number of at least 0, got {raw!r}")
    return raw


def _networks(raw: Any, path: str) -> tuple[Network, ...]:
    entries = raw if isinstance(raw, list) else [raw]
    networks = []
    for index, entry in enumerate(entries):
        try:
            networks.append(ipaddress.ip_network(str(entry), strict=False))
        except ValueError:
            raise ToxicError(f"{path}[{index}]", f"not an address or network: {entry!r}") from None
    return tuple(networks)


def read_toxic(raw: Any, default_stream: str = "downstream", base: Toxic | None = None) -> Toxic:
    """
    A toxic from its JSON (the API's body, or a map entry as plain data), with
    Toxiproxy's defaults: stream C{downstream}, toxicity 1, name C{TYPE_STREAM};
    C{base}, when given, supplies every field C{raw} leaves out (an update),
    and its name and stream whatever C{raw} says, as Toxiproxy's update reads
    neither.  Raises L{ToxicError} naming the first wrong key.
    """
    if not isinstance(raw, dict):
        raise ToxicError("", "a toxic is a JSON object")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise ToxicError(unknown[0], "unknown key")
    kind = raw.get("type", base.type if base else None)
    if kind not in _TYPES:
        raise ToxicError("type", f"must be one of {', '.join(_TYPES)}, got {kind!r}")
    if base is not None and kind != base.type:
        raise ToxicError("type", "a toxic's type cannot change")
    if base is not None:
        name, stream = base.name, base.stream
    else:
        stream = raw.get("stream", default_stream)
        if stream not in _STREAMS:
            raise ToxicError("stream", "stream was invalid, can be either upstream or downstream")
        name = raw.get("name") or f"{kind}_{stream}"
        if not isinstance(name, str):
            raise ToxicError("name", f"expected a string, got {name!r}")
    toxicity = _number(raw.get("toxicity", base.toxicity if base else 1.0), "toxicity")
    if toxicity > 1:
        raise ToxicError("toxicity", f"a probability from 0 to 1, got {toxicity!r}")
    given = raw.get("attributes")
    if given is None:
        given = {}  # Toxiproxy's Go client sends null for no attributes
    if not isinstance(given, dict):
        raise ToxicError("attributes", "expected a JSON object")
    defaults = _TYPES[kind]
    extra = sorted(set(given) - set(defaults))
    if extra:
        raise ToxicError(f"attributes.{extra[0]}", f"{kind} has no such attribute")
    attributes = {**defaults, **(base.attributes if base else {})}
    for key, value in given.items():
        attributes[key] = _number(value, f"attributes.{key}")
    client = (
        _networks(raw["client"], "client") if "client" in raw else (base.client if base else ())
    )
    return Toxic(
        name=name,
        type=kind,
        stream=stream,
        toxicity=toxicity,
        attributes=attributes,
        client=client,
        nth=_count(raw.get("nth", base.nth if base else 0), "nth"),
        times=_count(raw.get("times", base.times if base else 0), "times"),
        seed=_seed(raw.get("seed", base.seed if base else 0)),
        **_scenario(raw, base),
    )


def _scenario(raw: dict[str, Any], base: Toxic | None) -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for key in ("scenario", "state", "next_state"):
        value = raw.get(key, getattr(base, key) if base else None)
        if value is not None and (not isinstance(value, str) or not is_name(value)):
            raise ToxicError(key, f"not a name: {value!r} (letters, digits, '_', '.', ':', '-')")
        found[key] = value
    if found["scenario"] is None and (found["state"] or found["next_state"]):
        raise ToxicError("scenario", "'state' and 'next_state' need a 'scenario'")
    return found


def _seed(raw: Any) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise ToxicError("seed", f"expected a whole number, got {raw!r}")
    return raw


class ToxicState:
    """
    A toxic in use: its configuration (replaced by an update) and the rule
    that decides and counts for it.
    """

    def __init__(self, toxic: Toxic, source: str = "api") -> None:
        self.toxic = toxic
        self.rule = Rule.of(toxic.rule_spec(), toxic.name, source)

    @property
    def seen(self) -> int:
        """Connections (datagrams) that met its client condition: what C{nth} counts."""
        return self.rule.seen

    @property
    def fired(self) -> int:
        """How often it acted: what C{times} limits, and what the API reports."""
        return self.rule.fired

    def replace(self, toxic: Toxic) -> None:
        """An update: the new configuration, with the counts so far."""
        rule = Rule.of(toxic.rule_spec(), toxic.name, self.rule.source)
        rule.seen, rule.fired = self.rule.seen, self.rule.fired
        if (
            rule.chance is not None
            and self.rule.chance is not None
            and toxic.seed == self.toxic.seed
        ):
            rule.chance = self.rule.chance  # the same draws go on
        self.toxic, self.rule = toxic, rule

    def decide(self, client: str | IAddress | None, scenarios: Scenarios | None = None) -> bool:
        """
        Whether it acts on one more connection (datagram) from C{client}, with
        its scenario in C{state} (in C{scenarios}, the daemon's).
        """
        if not admits(self.rule, client, scenarios):
            return False
        self.rule.fired += 1
        return True

    def as_json(self) -> dict[str, Any]:
        return {**self.toxic.as_json(), "fired": self.fired}


@attrs.define(eq=False, repr=False)
class ToxicSet(Record):
    """A proxy's toxics, in the order they act, by name."""

    _states: dict[str, ToxicState] = attrs.field(factory=dict)
    # Bumped on every change: a connection re-reads its toxics when it moved.
    version: int = 0
    # Called after every change (the proxy's open connections follow at once).
    watchers: list[Callable[[], None]] = attrs.field(factory=list, repr=False)

    def __iter__(self) -> Iterator[ToxicState]:
        return iter(list(self._states.values()))

    def __len__(self) -> int:
        return len(self._states)

    def get(self, name: str) -> ToxicState | None:
        return self._states.get(name)

    def add(self, toxic: Toxic, source: str = "api") -> ToxicState:
        """C{toxic} after the others; C{source} as a rule's: C{map} or C{api}."""
        if toxic.name in self._states:
            raise KeyError(toxic.name)
        state = self._states[toxic.name] = ToxicState(toxic, source)
        self._changed()
        return state

    def adopt(self, older: ToxicSet) -> list[str]:
        """
        Take the API's toxics of the proxy this one replaces (a reload rebuilt
        it), with their counts, after the map's.  Returns the names left out:
        the map has a toxic so named now (the map's edit wins).
        """
        left_out = []
        for state in older:
            name = state.toxic.name
            if state.rule.source != "api":
                continue
            if name in self._states:
                left_out.append(name)
            else:
                self._states[name] = state
        self._changed()
        return left_out

    def update(self, toxic: Toxic) -> ToxicState:
        state = self._states[toxic.name]
        state.replace(toxic)
        self._changed()
        return state

    def remove(self, name: str) -> bool:
        found = self._states.pop(name, None) is not None
        self._changed()
        return found

    def clear(self) -> None:
        self._states.clear()
        self._changed()

    def _changed(self) -> None:
        self.version += 1
        for watcher in self.watchers:
            watcher()
