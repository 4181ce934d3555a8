"""
Rules and scenarios: deterministic faults and scripted answers, on every kind.

A rule is an optional C{match}, one or more acts, and conditions on when it
fires (C{times}, C{nth}, C{probability} with a C{seed}, a C{scenario}'s
C{state}).  A service's rules are tried in order on each event its kind reports
(an SMTP command, an HTTP request, a DNS query); the first that matches fires,
is counted, moves its scenario (C{next_state}) and is journaled as
C{rule.fired}.  A rule that matches on nothing a kind reports (no match, or
only C{client}) acts on connections: the core applies it as each one opens,
and to each datagram.

A kind takes part by declaring its L{Vocabulary} (its match keys, each with the
matcher that reads its pattern, and its own acts with their readers) on its
L{netd.kinds.ServiceKind}; the core parses rules against it, from the map and
from the admin API alike, and the kind calls L{RuleSet.check} at its events and
L{Fired.act} with what it does for the rule.  This module imports no kind.

The generic acts (L{GENERIC_ACTS}) are carried out by L{netd.acts}: C{delay}
(seconds before the answer), C{throttle} (bytes/s for the rest of the reply),
C{reset} (RST), C{close} (FIN: C{true} instead of the answer, or a number of
bytes of it first), C{stall} (never answer), C{drop} (a datagram).
"""

from __future__ import annotations

import fnmatch
import itertools
import json
import random
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs
import yaml
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress
from yaml.constructor import SafeConstructor

from netd.events import Journal
from netd.namespaces import key as namespace_key
from netd.records import Record
from netd.schema import (
    Network,
    Position,
    Problems,
    Value,
    client_address,
    in_networks,
)

__all__ = [
    "GENERIC_ACTS",
    "Fired",
    "Predicate",
    "Rule",
    "RuleSet",
    "RuleSpec",
    "Scenarios",
    "Vocabulary",
    "admits",
    "exact",
    "fields",
    "glob",
    "is_name",
    "moved",
    "read_rule",
    "read_rules",
    "read_scenarios",
    "reply_line",
    "scoped_scenario",
]

Predicate = Callable[[Any], bool]
MatchReader = Callable[[Value], Predicate | None]
ActReader = Callable[[Value], Any]

GENERIC_ACTS = ("delay", "throttle", "reset", "close", "stall", "drop")
# Acts that leave nothing else to do: at most one, and never with a kind's answer.
_FINAL_ACTS = ("reset", "stall", "drop")
DEFAULT_STATE = "started"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}\Z")
_CONTROL = (
    "match",
    "namespace",
    "times",
    "nth",
    "probability",
    "seed",
    "scenario",
    "state",
    "next_state",
)


@attrs.frozen(repr=False)
class Vocabulary(Record):
    """
    What a kind's rules may say.

    @ivar match: match keys by name, each with the reader of its pattern
        (L{glob}, L{exact}, L{fields} or the kind's own), which returns the
        predicate that an event's value for that key must pass.
    @ivar acts: the kind's own acts by name, each with the reader of its value
        (SMTP's C{reply} line, HTTP's C{reply} mapping).
    @ivar generic: which of L{GENERIC_ACTS} its events can take (a rule on
        connections, without a match on the kind's keys, takes them all).
    """

    match: Mapping[str, MatchReader] = attrs.field(factory=dict)
    acts: Mapping[str, ActReader] = attrs.field(factory=dict)
    generic: tuple[str, ...] = GENERIC_ACTS


CONNECTIONS_ONLY = Vocabulary()


def _patterns(value: Value) -> list[str]:
    found = []
    for element in value.elements(single=True):
        text = element.as_str()
        if element.is_scalar:
            found.append(text)
    if not found and value.is_sequence:
        value.error("give at least one pattern")
    return found


def is_name(text: str) -> bool:
    """Whether C{text} may name a rule, a scenario or a state."""
    return _NAME.match(text) is not None


def glob(case_sensitive: bool = False) -> MatchReader:
    """
    A shell pattern (C{*}, C{?}, C{[..]}) or a list of them, any one matching;
    case does not matter unless C{case_sensitive}.
    """

    def read(value: Value) -> Predicate | None:
        patterns = _patterns(value)
        if not patterns:
            return None
        flags = 0 if case_sensitive else re.IGNORECASE
        compiled = re.compile("|".join(fnmatch.translate(p) for p in patterns), flags)
        return lambda subject: isinstance(subject, str) and compiled.match(subject) is not None

    return read


def exact(*choices: str, case_sensitive: bool = False) -> MatchReader:
    """One value, or a list of values, equal to the event's; one of C{choices} if given."""

    def read(value: Value) -> Predicate | None:
        wanted = set()
        for element in value.elements(single=True):
            text = element.as_str()
            if not element.is_scalar:
                continue
            key = text if case_sensitive else text.lower()
            if choices and key not in choices:
                element.error(f"must be one of {', '.join(choices)}, got {text!r}")
                continue
            wanted.add(key)
        if not wanted:
            return None
        if case_sensitive:
            return lambda subject: subject in wanted
        return lambda subject: isinstance(subject, str) and subject.lower() in wanted

    return read


def fields(case_sensitive_names: bool = False) -> MatchReader:
    """
    A mapping of field names (HTTP headers, say) to glob patterns, all to
    match; the event's value is a lookup: name -> the field's value or None.
    """

    def read(value: Value) -> Predicate | None:
        wanted: list[tuple[str, Predicate]] = []
        for name, entry in value.items():
            predicate = glob()(entry)
            if predicate is not None:
                wanted.append((name if case_sensitive_names else name.lower(), predicate))
        if not wanted:
            return None

        def matches(lookup: Any) -> bool:
            return callable(lookup) and all(predicate(lookup(n)) for n, predicate in wanted)

        return matches

    return read


def reply_line(first_digits: str = "2345") -> ActReader:
    """
    A reply of a line protocol (SMTP, FTP): C{CODE [text]}, as in C{451 4.3.0
    try later}; read as C{(code, text)}, the text printable ASCII.
    """
    shape = re.compile(rf"([{first_digits}][0-9][0-9])(?: ([\x20-\x7e]{{0,500}}))?\Z")

    def read(value: Value) -> tuple[int, str] | None:
        text = value.as_str()
        if not value.is_scalar:
            return None
        found = shape.match(text)
        if found is None:
            value.error(f"not a reply line 'CODE text' (as in '451 try later'): {text!r}")
            return None
        return int(found.group(1)), found.group(2) or ""

    return read


@attrs.frozen(repr=False)
class RuleSpec(Record):
    """
    One rule as read from the map or the API; immutable.  Its live state (how
    often it fired) is a L{Rule}'s.
    """

    match: tuple[tuple[str, Predicate], ...]
    client: tuple[Network, ...]
    acts: Mapping[str, Any]
    described: Mapping[str, Any]
    id: str | None = None
    times: int | None = None
    nth: int | None = None
    probability: float | None = None
    seed: int = 0
    scenario: str | None = None
    state: str | None = None
    next_state: str | None = None
    # Fires only on events of this namespace (netd.namespaces).
    namespace: str | None = None

    @property
    def on_connections(self) -> bool:
        """Whether it matches on nothing the kind reports: the core applies it."""
        return not self.match and self.namespace is None

    @property
    def scenario_key(self) -> str | None:
        """
        Where its scenario's state is kept: a rule scoped to a namespace reads
        and moves that namespace's own copy, C{NAME@NAMESPACE}.
        """
        if self.scenario is None or self.namespace is None:
            return self.scenario
        return scoped_scenario(self.scenario, self.namespace)


def scoped_scenario(name: str, namespace: str) -> str:
    """A scenario's name in one namespace: C{signup@t42} (a map's names have no C{@})."""
    return f"{name}@{namespace}"


def _described(node: yaml.Node) -> Any:
    return SafeConstructor().construct_object(node, deep=True)


def _read_close(value: Value) -> bool | int:
    if value.node.tag == "tag:yaml.org,2002:bool":
        return value.as_bool()
    return value.as_int(0, minimum=0)


def _read_true(value: Value) -> bool:
    flag = value.as_bool()
    if value.is_scalar and value.node.tag == "tag:yaml.org,2002:bool" and not flag:
        value.error("give true, or leave the key out")
    return flag


_GENERIC_READERS: dict[str, ActReader] = {
    "delay": lambda v: v.as_float(0.0, minimum=0.0),
    "throttle": lambda v: v.as_int(1, minimum=1),
    "reset": _read_true,
    "close": _read_close,
    "stall": _read_true,
    "drop": _read_true,
}


def _name(value: Value) -> str | None:
    text = value.as_str()
    if not value.is_scalar:
        return None
    if not is_name(text):
        value.error(f"not a name: {text!r} (letters, digits, '_', '.', ':', '-')")
        return None
    return text


def read_rule(value: Value, vocabulary: Vocabulary) -> RuleSpec | None:
    """One rule, its errors reported at their paths; L{None} if it has any."""
    reported = len(value.problems.errors)
    section = value.section()
    rule_id = section.read("id", _name, None)
    predicates: list[tuple[str, Predicate]] = []
    client: tuple[Network, ...] = ()
    match_value = section.get("match")
    if match_value is not None:
        match = match_value.section()
        client = match.networks("client", ())
        for key, reader in vocabulary.match.items():
            entry = match.get(key)
            if entry is not None:
                predicate = reader(entry)
                if predicate is not None:
                    predicates.append((key, predicate))
        match.finish(known=", ".join(["client", *vocabulary.match]))
    found: dict[str, Any] = {}
    # A rule on connections may take every generic act; one on the kind's
    # events, those its events can take.
    # A rule scoped to a namespace acts on the kind's events, which carry it.
    on_events = bool(predicates) or section.has("namespace")
    generic = vocabulary.generic if on_events else GENERIC_ACTS
    for name in generic:
        entry = section.get(name)
        if entry is not None:
            found[name] = _GENERIC_READERS[name](entry)
    own: list[str] = []
    for name, reader in vocabulary.acts.items():
        entry = section.get(name)
        if entry is not None:
            found[name] = reader(entry)
            own.append(name)
    times = section.read("times", lambda v: v.as_int(1, minimum=1), None)
    nth = section.read("nth", lambda v: v.as_int(1, minimum=1), None)
    probability_value = section.get("probability")
    probability = None
    if probability_value is not None:
        probability = probability_value.as_float(1.0, minimum=0.0)
        if probability > 1:
            probability_value.error(f"a probability is at most 1, got {probability:g}")
    seed = section.integer("seed", 0)
    namespace = section.read("namespace", _namespace, None)
    scenario = section.read("scenario", _name, None)
    state = section.read("state", _name, None)
    next_state = section.read("next_state", _name, None)
    section.finish(known=", ".join([*_CONTROL, "id", *generic, *vocabulary.acts]))
    if (state is not None or next_state is not None) and scenario is None:
        value.error("'state' and 'next_state' need a 'scenario'")
    acted = [name for name, act in found.items() if act is not False]
    if not acted and next_state is None:
        value.error(
            "a rule needs an act ("
            + ", ".join([*generic, *vocabulary.acts])
            + ") or a 'next_state'"
        )
    final = [name for name in _FINAL_ACTS if found.get(name)]
    if len(final) > 1 or (final and (own or found.get("close") is not None)):
        others = [*final, *own, *(["close"] if "close" in found else [])]
        value.error(f"{', '.join(others)}: these acts exclude each other")
    if namespace is not None and not vocabulary.match:
        value.error(
            "'namespace' scopes a rule to a kind's events: this kind's rules act on connections"
        )
    if own and not on_events and vocabulary.match:
        value.error(
            f"{', '.join(own)} answers an event: give a match on "
            + ", ".join(vocabulary.match)
            + " (a rule without one acts on connections)"
        )
    if len(value.problems.errors) != reported:
        return None
    return RuleSpec(
        match=tuple(predicates),
        client=client,
        acts={name: act for name, act in found.items() if act is not False},
        described=_described(value.node),
        id=rule_id,
        times=times,
        nth=nth,
        probability=probability,
        seed=seed,
        scenario=scenario,
        state=state,
        next_state=next_state,
        namespace=namespace,
    )


def _namespace(value: Value) -> str | None:
    text = value.as_str()
    found = namespace_key(text)
    if value.is_scalar and found is None:
        value.error(f"not a namespace: {text!r} (letters, digits, '_', '-')")
    return found


def read_rules(value: Value, vocabulary: Vocabulary) -> tuple[RuleSpec, ...]:
    """A service's C{rules:} list; ids given twice are reported."""
    specs: list[RuleSpec] = []
    seen: set[str] = set()
    for element in value.elements():
        spec = read_rule(element, vocabulary)
        if spec is None:
            continue
        if spec.id is not None:
            if spec.id in seen:
                element.error(f"rule id {spec.id!r} is given twice")
                continue
            seen.add(spec.id)
        specs.append(spec)
    return tuple(specs)


def read_scenarios(value: Value) -> dict[str, str]:
    """The map's C{scenarios:}: each name with its initial state."""
    initial: dict[str, str] = {}
    for name, entry in value.items():
        if not is_name(name):
            entry.error(f"not a scenario name: {name!r}")
            continue
        state = _name(entry)
        if state is not None:
            initial[name] = state
    return initial


def parse_api_rule(body: Any, vocabulary: Vocabulary) -> RuleSpec:
    """A rule sent to the admin API as JSON; L{ConfigErrors} with each field's path."""
    problems = Problems()
    try:
        node = yaml.compose(json.dumps(body))
        assert node is not None  # JSON text is never empty
        value = Value(node, "", "request body", Path("."), problems)
        if not value.is_mapping:
            value.error("a rule is a JSON object")
            problems.raise_if_any()
        spec = read_rule(value, vocabulary)
    except RecursionError:
        # JSON nested hundreds deep (max_body allows it): no rule is shaped so.
        problems.add(Position("request body", 1, 1), "", "nested too deeply to be a rule")
    problems.raise_if_any()
    assert spec is not None
    return spec


class Scenarios:
    """
    The daemon's named states, shared by every service's rules.

    A scenario the map does not name starts in C{started}.
    """

    def __init__(self, initial: Mapping[str, str] | None = None) -> None:
        self.initial: dict[str, str] = dict(initial or {})
        self.states: dict[str, str] = dict(self.initial)

    def state(self, name: str) -> str:
        return self.states.get(name, DEFAULT_STATE)

    def set(self, name: str, state: str) -> None:
        self.states[name] = state

    def reset(self) -> None:
        """Every scenario back to its state in the map; those the map does not name, forgotten."""
        self.states = dict(self.initial)

    def forget(self, namespace: str) -> int:
        """One namespace's copies of scenarios go (they start again in C{started})."""
        suffix = "@" + namespace
        gone = [name for name in self.states if name.endswith(suffix)]
        for name in gone:
            del self.states[name]
        return len(gone)

    def reconfigure(self, initial: Mapping[str, str]) -> None:
        """A reloaded map: new names start in their state; states already moved are kept."""
        for name, state in initial.items():
            if name not in self.initial:
                self.states[name] = state
        for name in set(self.initial) - set(initial):
            self.states.pop(name, None)
        self.initial = dict(initial)

    def describe(self) -> dict[str, str]:
        return dict(sorted(self.states.items()))


@attrs.define(eq=False, repr=False)
class Rule(Record):
    """A rule in force on one service: its spec and how often it fired."""

    spec: RuleSpec
    id: str
    source: str  # "map" or "api"
    fired: int = 0
    seen: int = 0
    chance: random.Random | None = None

    @classmethod
    def of(cls, spec: RuleSpec, rule_id: str, source: str) -> Rule:
        """A rule put in force: its own seeded generator when it has a C{probability}."""
        chance = random.Random(spec.seed) if spec.probability is not None else None
        return cls(spec=spec, id=rule_id, source=source, chance=chance)

    @property
    def spent(self) -> bool:
        times = self.spec.times
        return (times is not None and self.fired >= times) or (
            self.spec.nth is not None and self.seen >= self.spec.nth
        )

    def describe(self) -> dict[str, Any]:
        return {
            **self.spec.described,
            "id": self.id,
            "source": self.source,
            "fired": self.fired,
            "spent": self.spent,
        }


def admits(rule: Rule, client: str | IAddress | None, scenarios: Scenarios | None = None) -> bool:
    """
    Whether C{rule} may fire now for C{client}: C{times} not spent, its client
    networks and scenario state fit (it is then counted as seen), and its C{nth}
    and C{probability} agree.  The caller counts C{rule.fired} and moves the
    scenario (L{moved}) when it fires.  L{RuleSet} decides so for every kind;
    the proxy's toxics, which keep their own API and acts, decide with it too.
    """
    spec = rule.spec
    if spec.times is not None and rule.fired >= spec.times:
        return False
    if spec.client and not in_networks(client, spec.client):
        return False
    if (
        scenarios is not None
        and spec.scenario_key is not None
        and spec.state is not None
        and scenarios.state(spec.scenario_key) != spec.state
    ):
        return False
    rule.seen += 1
    if spec.nth is not None and rule.seen != spec.nth:
        return False
    chance = rule.chance
    return chance is None or chance.random() < (spec.probability or 0.0)


def moved(rule: Rule, scenarios: Scenarios) -> dict[str, str]:
    """A rule fired: its scenario moves to C{next_state}; what moved, for the journal."""
    spec = rule.spec
    if spec.scenario_key is None or spec.next_state is None:
        return {}
    scenarios.set(spec.scenario_key, spec.next_state)
    return {"scenario": spec.scenario_key, "state": spec.next_state}


@attrs.frozen(repr=False)
class Fired(Record):
    """A rule that fired on one event: its acts, for the kind to carry out."""

    rule: Rule
    clock: Any

    @property
    def acts(self) -> Mapping[str, Any]:
        return self.rule.spec.acts

    def act(
        self,
        transport: Any,
        proceed: Callable[[], None],
        answer: Callable[[], None] | None = None,
    ) -> Deferred[None]:
        """
        Carry out the rule's acts on a connection: see L{netd.acts.perform}.

        @param proceed: what the kind does when the rule leaves the answer to it.
        @param answer: what the kind does for its own acts (its reply), if the
            rule has any.
        """
        # Imported by the first rule that fires: a map without rules never needs it.
        from netd.acts import perform

        return perform(self.acts, self.clock, transport, proceed, answer)


def _shown(value: Any) -> bool:
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


class RuleSet:
    """
    The rules in force on one service, in order: the map's, then the API's.

    A kind reads L{event_rules} (a tuple, empty when there are none: the one
    test its hot path pays) before it calls L{check}.  L{connect_rules} are
    the core's, applied as connections open.
    """

    def __init__(
        self,
        service: str = "",
        vocabulary: Vocabulary = CONNECTIONS_ONLY,
        clock: Any = None,
        journal: Journal | None = None,
        scenarios: Scenarios | None = None,
        specs: Iterable[RuleSpec] = (),
    ) -> None:
        self.service = service
        self.vocabulary = vocabulary
        self.clock = clock
        self.journal = journal
        self.scenarios = scenarios if scenarios is not None else Scenarios()
        self.rules: list[Rule] = []
        self.event_rules: tuple[Rule, ...] = ()
        self.connect_rules: tuple[Rule, ...] = ()
        self.datagram_rules: tuple[Rule, ...] = ()
        self.watchers: list[Callable[[], None]] = []
        self._api_ids = itertools.count(1)
        self.replace_map(specs)

    # -- what is in force ---------------------------------------------------------

    def replace_map(self, specs: Iterable[RuleSpec]) -> None:
        """The map's rules (at start, and on a reload): those of the API stay, after them."""
        mapped = [
            self._rule(spec, spec.id or f"m{index}", "map") for index, spec in enumerate(specs, 1)
        ]
        self.rules = [*mapped, *(r for r in self.rules if r.source == "api")]
        self._changed()

    def adopt(self, older: RuleSet) -> None:
        """Take the API's rules of the service this one replaces (a reload restarted it)."""
        taken = [r for r in older.rules if r.source == "api"]
        self.rules = [*(r for r in self.rules if r.source == "map"), *taken]
        self._api_ids = older._api_ids
        self._changed()

    def _rule(self, spec: RuleSpec, rule_id: str, source: str) -> Rule:
        return Rule.of(spec, rule_id, source)

    def _changed(self) -> None:
        self.event_rules = tuple(r for r in self.rules if not r.spec.on_connections)
        on_connections = [r for r in self.rules if r.spec.on_connections]
        self.connect_rules = tuple(r for r in on_connections if "drop" not in r.spec.acts)
        self.datagram_rules = tuple(r for r in on_connections if "drop" in r.spec.acts)
        for watcher in self.watchers:
            watcher()

    # -- matching -------------------------------------------------------------------

    def check(
        self, client: str | IAddress | None, namespace: str | None = None, **event: Any
    ) -> Fired | None:
        """
        The first rule that fires on this event, counted and journaled, or
        L{None}.  A rule matches when every key it names is in C{event} and
        passes, its namespace (if it has one) is the event's, its client and
        scenario state fit, and its C{nth}, C{probability} and C{times} let it
        fire now.
        """
        for rule in self.event_rules:
            if rule.spec.namespace is not None and rule.spec.namespace != namespace:
                continue
            for key, predicate in rule.spec.match:
                if key not in event or not predicate(event[key]):
                    break
            else:
                if self._admits(rule, client):
                    return self._fire(rule, client, event, namespace)
        return None

    def at_connect(self, client: str | IAddress | None) -> Fired | None:
        """The first connection rule that fires on a new stream connection."""
        return self._first(self.connect_rules, client)

    def on_datagram(self, client: str | IAddress | None) -> Fired | None:
        """The first connection rule that fires on a datagram (a C{drop})."""
        return self._first(self.datagram_rules, client)

    def _first(self, rules: tuple[Rule, ...], client: str | IAddress | None) -> Fired | None:
        for rule in rules:
            if self._admits(rule, client):
                return self._fire(rule, client, {})
        return None

    def _admits(self, rule: Rule, client: str | IAddress | None) -> bool:
        return admits(rule, client, self.scenarios)

    def _fire(
        self,
        rule: Rule,
        client: str | IAddress | None,
        event: Mapping[str, Any],
        namespace: str | None = None,
    ) -> Fired:
        rule.fired += 1
        spec = rule.spec
        scenario = moved(rule, self.scenarios)
        if namespace is not None:
            scenario["namespace"] = namespace
        if self.journal is not None:
            address = client_address(client)
            self.journal.emit(
                self.service,
                "rule.fired",
                rule=rule.id,
                source=rule.source,
                fired=rule.fired,
                client=str(address) if address is not None else "",
                matched={key: value for key, value in event.items() if _shown(value)},
                acts=sorted(spec.acts),
                **scenario,
            )
        return Fired(rule, self.clock)

    # -- the admin view: /api/services/NAME/rules -------------------------------------

    def list(self, query: Mapping[str, str]) -> dict[str, Any]:
        return {"rules": [rule.describe() for rule in self.rules]}

    def item(self, rule_id: str) -> dict[str, Any] | None:
        rule = self._find(rule_id)
        return rule.describe() if rule is not None else None

    def post(self, body: Any) -> dict[str, Any]:
        """Add a rule sent as JSON, after those in force; answered with it and its id."""
        spec = parse_api_rule(body, self.vocabulary)
        rule_id = spec.id
        if rule_id is None:
            rule_id = f"r{next(self._api_ids)}"
            while self._find(rule_id) is not None:
                rule_id = f"r{next(self._api_ids)}"
        elif self._find(rule_id) is not None:
            from netd.kinds import ViewRefused

            raise ViewRefused(409, f"a rule {rule_id!r} is in force already")
        rule = self._rule(spec, rule_id, "api")
        self.rules.append(rule)
        self._changed()
        return rule.describe()

    def remove(self, rule_id: str) -> dict[str, Any] | None:
        rule = self._find(rule_id)
        if rule is None:
            return None
        self.rules.remove(rule)
        self._changed()
        return {"removed": rule.describe()}

    def clear(self) -> dict[str, int]:
        """Every rule goes, the map's too (a reload brings those back)."""
        cleared = len(self.rules)
        self.rules = []
        self._changed()
        return {"cleared": cleared}

    def forget(self, namespace: str) -> dict[str, int]:
        """The rules scoped to one namespace go (C{DELETE /api/namespaces/NS})."""
        kept = [rule for rule in self.rules if rule.spec.namespace != namespace]
        removed = len(self.rules) - len(kept)
        if removed:
            self.rules = kept
            self._changed()
        return {"removed": removed}

    def _find(self, rule_id: str) -> Rule | None:
        return next((rule for rule in self.rules if rule.id == rule_id), None)
