"""netd.rules: rules read from the map and the API, matched in order, counted and journaled."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.task import Clock

from netd.config import ConfigErrors, parse_config
from netd.events import Journal
from netd.kinds import ViewRefused
from netd.rules import RuleSet, Scenarios, Vocabulary, exact, fields, glob, parse_api_rule

WORDS = Vocabulary(
    match={"stage": exact("hello", "bye"), "name": glob(), "header": fields()},
    acts={"reply": lambda value: value.as_str()},
)


def rule_set(*bodies: dict[str, object], scenarios: Scenarios | None = None) -> RuleSet:
    clock = Clock()
    rules = RuleSet("svc", WORDS, clock, Journal(clock), scenarios)
    for body in bodies:
        rules.post(body)
    return rules


def fired_ids(rules: RuleSet, events: int, **event: object) -> list[str | None]:
    found = []
    for _ in range(events):
        fired = rules.check("127.0.0.1", **event)
        found.append(fired.rule.id if fired else None)
    return found


def test_first_matching_rule_fires_and_times_spends_it() -> None:
    rules = rule_set(
        {"match": {"name": "*@flaky.test"}, "reply": "451", "times": 2},
        {"match": {"name": "*"}, "reply": "250"},
    )
    assert fired_ids(rules, 3, name="a@FLAKY.test") == ["r1", "r1", "r2"]
    listed = rules.list({})["rules"]
    assert [(r["id"], r["fired"], r["spent"], r["source"]) for r in listed] == [
        ("r1", 2, True, "api"),
        ("r2", 1, False, "api"),
    ]


def test_a_key_the_event_lacks_does_not_match() -> None:
    rules = rule_set({"match": {"stage": "hello", "name": "x*"}, "reply": "r"})
    assert fired_ids(rules, 1, stage="hello") == [None]
    assert fired_ids(rules, 1, stage="bye", name="xy") == [None]
    assert fired_ids(rules, 1, stage="HELLO", name="xy") == ["r1"]


def test_nth_fires_on_the_nth_matching_event_only() -> None:
    rules = rule_set({"match": {"stage": "hello"}, "reply": "r", "nth": 3})
    assert fired_ids(rules, 5, stage="hello") == [None, None, "r1", None, None]


def test_client_networks() -> None:
    rules = rule_set({"match": {"stage": "hello", "client": "10.0.0.0/8"}, "reply": "r"})
    assert rules.check("10.1.2.3", stage="hello") is not None
    assert rules.check("127.0.0.1", stage="hello") is None
    assert rules.check("::ffff:10.0.0.1", stage="hello") is not None


def test_header_fields_match_through_a_lookup() -> None:
    rules = rule_set({"match": {"header": {"X-Fault": "o*"}}, "reply": "r"})
    headers = {"x-fault": "on"}
    assert rules.check("127.0.0.1", header=headers.get) is not None
    assert rules.check("127.0.0.1", header={}.get) is None


def test_probability_is_the_same_every_run_for_a_seed() -> None:
    body = {"match": {"stage": "hello"}, "reply": "r", "probability": 0.5, "seed": 7}
    first = fired_ids(rule_set(body), 40, stage="hello")
    again = fired_ids(rule_set(body), 40, stage="hello")
    assert first == again
    assert 5 < first.count("r1") < 35


def test_scenario_state_gates_and_moves() -> None:
    scenarios = Scenarios({"signup": "started"})
    rules = rule_set(
        {
            "match": {"stage": "hello"},
            "scenario": "signup",
            "state": "started",
            "next_state": "created",
            "reply": "201",
        },
        {"match": {"stage": "hello"}, "scenario": "signup", "state": "created", "reply": "409"},
        scenarios=scenarios,
    )
    assert fired_ids(rules, 3, stage="hello") == ["r1", "r2", "r2"]
    assert scenarios.state("signup") == "created"
    scenarios.reset()
    assert scenarios.state("signup") == "started"
    assert scenarios.state("never-named") == "started"


def test_fired_rules_are_journaled() -> None:
    rules = rule_set({"match": {"name": "a*"}, "reply": "r", "id": "mine"})
    rules.check("127.0.0.1", name="abc", header=lambda name: None)
    event = rules.journal.select(types=["rule.fired"])[0]  # type: ignore[union-attr]
    assert event.service == "svc"
    assert event.fields["rule"] == "mine"
    assert event.fields["matched"] == {"name": "abc"}
    assert event.fields["client"] == "127.0.0.1"


def test_remove_and_clear() -> None:
    rules = rule_set({"match": {"name": "a"}, "reply": "r"}, {"delay": 1})
    assert len(rules.connect_rules) == 1 and len(rules.event_rules) == 1
    assert rules.remove("nope") is None
    assert rules.remove("r1") is not None
    assert rules.event_rules == ()
    assert rules.clear() == {"cleared": 1}
    assert rules.connect_rules == ()


def test_an_id_in_force_is_refused() -> None:
    rules = rule_set({"id": "x", "delay": 1})
    with pytest.raises(ViewRefused) as refused:
        rules.post({"id": "x", "delay": 2})
    assert refused.value.status == 409


@pytest.mark.parametrize(
    ("body", "path", "message"),
    [
        ({"match": {"stage": "later"}, "reply": "x"}, "match.stage", "must be one of hello, bye"),
        ({"match": {"colour": "red"}, "reply": "x"}, "match.colour", "unknown key"),
        ({"match": {"client": "nowhere"}, "delay": 1}, "match.client", "not an address"),
        ({"delay": -1}, "delay", "at least 0"),
        ({"throttle": "fast"}, "throttle", "expected an integer"),
        ({"reset": True, "stall": True}, "", "exclude each other"),
        ({"reply": "451"}, "", "give a match on"),
        ({"delay": 1, "state": "a"}, "", "need a 'scenario'"),
        ({"times": 0, "delay": 1}, "times", "at least 1"),
        ({"probability": 2, "delay": 1}, "probability", "at most 1"),
        ({"match": {"name": "a"}}, "", "a rule needs an act"),
        ([1], "", "a rule is a JSON object"),
    ],
)
def test_api_rules_are_refused_with_the_field_path(body: object, path: str, message: str) -> None:
    with pytest.raises(ConfigErrors) as refused:
        parse_api_rule(body, WORDS)
    assert any(e.path == path and message in e.message for e in refused.value.errors), [
        (e.path, e.message) for e in refused.value.errors
    ]


def test_map_rules_and_scenarios(tmp_path: Path) -> None:
    text = """
scenarios: {signup: started}
services:
  echo:
    type: echo
    listen: ["tcp:0"]
    rules:
      - {delay: 0.5, times: 1}
      - {id: cut, match: {client: 10.0.0.0/8}, reset: true}
"""
    config = parse_config(text, tmp_path / "netd.yaml")
    assert config.scenarios == {"signup": "started"}
    rules = RuleSet(specs=config.services["echo"].rules)
    assert [r.id for r in rules.rules] == ["m1", "cut"]
    assert len(rules.connect_rules) == 2


def test_map_rule_errors_have_positions(tmp_path: Path) -> None:
    text = """services:
  echo:
    type: echo
    listen: ["tcp:0"]
    rules:
      - {match: {stage: data}, delay: 1}
      - {id: a, delay: 1}
      - {id: a, delay: 2}
"""
    with pytest.raises(ConfigErrors) as refused:
        parse_config(text, tmp_path / "netd.yaml")
    errors = [(e.position.line, e.path, e.message) for e in refused.value.errors]
    assert errors == [
        (6, "services.echo.rules[0].match.stage", "unknown key (known: client)"),
        (8, "services.echo.rules[2]", "rule id 'a' is given twice"),
    ]


def test_map_rules_are_replaced_and_api_rules_kept() -> None:
    rules = rule_set({"delay": 1})
    older_map = parse_api_rule({"stall": True}, WORDS)
    rules.replace_map([older_map])
    assert [r.id for r in rules.rules] == ["m1", "r1"]
    successor = RuleSet("svc", WORDS, specs=[parse_api_rule({"reset": True}, WORDS)])
    successor.adopt(rules)
    assert [(r.id, r.spec.acts) for r in successor.rules] == [
        ("m1", {"reset": True}),
        ("r1", {"delay": 1.0}),
    ]
    assert successor.post({"delay": 2})["id"] == "r2"


def test_a_rule_nested_too_deeply_is_refused() -> None:
    nested: list[object] = []
    for _ in range(900):
        nested = [nested]
    with pytest.raises(ConfigErrors, match="nested too deeply"):
        parse_api_rule({"match": {"name": "a"}, "reply": nested}, WORDS)
