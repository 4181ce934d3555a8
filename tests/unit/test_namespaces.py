"""netd.namespaces: namespace_from read from the map, each kind's sources, scoped rules."""

from __future__ import annotations

import json
import pickle
import textwrap
from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock

from netd.admin import AdminResource, _in_namespace
from netd.config import ConfigErrors, parse_config
from netd.events import Journal
from netd.kinds import AdminView
from netd.namespaces import Namespacing, below_suffix, key
from netd.pytest_plugin import namespace_for
from netd.rules import RuleSet, Scenarios, Vocabulary, glob
from netd.services.smtp.namespace import derive_namespace
from tests.unit.test_admin import Client, FakeDaemon, request
from tests.unit.test_eventstream import frames, open_stream


def namespacing(tmp_path: Path, kind: str, sources: str, extra: str = "") -> Namespacing:
    text = f"""
    services:
      svc:
        type: {kind}
        listen: ["tcp:0"]
        namespace_from: {sources}
        {extra}
    """
    config = parse_config(textwrap.dedent(text), tmp_path / "netd.yaml")
    return config.services["svc"].namespace_from


def errors(tmp_path: Path, kind: str, sources: str) -> list[tuple[str, str]]:
    with pytest.raises(ConfigErrors) as refused:
        namespacing(tmp_path, kind, sources)
    return [(e.path, e.message) for e in refused.value.errors]


def test_keys_are_lower_case_dns_labels() -> None:
    assert key("T42") == "t42"
    assert key("test_x-1") == "test_x-1"
    assert key("") is None
    assert key(None) is None
    assert key("-lead") is None
    assert key("a/b") is None
    assert key("x" * 64) is None
    assert key("x" * 63) == "x" * 63


def test_below_suffix_takes_the_label_just_under_it() -> None:
    assert below_suffix("www.t42.lab.test.", "lab.test") == "t42"
    assert below_suffix("T42.LAB.TEST", "lab.test") == "t42"
    assert below_suffix("lab.test", "lab.test") is None
    assert below_suffix("t42.notlab.test", "lab.test") is None
    assert below_suffix("t42xlab.test", "lab.test") is None


def test_smtp_sources_in_their_order(tmp_path: Path) -> None:
    ns = namespacing(tmp_path, "smtp", "[plus_tag, {suffix: mail.test}, auth_user, client]")
    assert derive_namespace(ns, ["bob+t42@example.com"], None, "127.0.0.1") == "t42"
    assert derive_namespace(ns, ["bob@T7.mail.test"], None, "127.0.0.1") == "t7"
    assert derive_namespace(ns, ["bob@x.t8.mail.test"], None, "127.0.0.1") == "t8"
    assert derive_namespace(ns, ["bob@example.com"], "Tester", "127.0.0.1") == "tester"
    assert derive_namespace(ns, ["bob@example.com"], None, "127.0.0.42") == "42"
    assert derive_namespace(ns, ["bob@example.com"], None, "127.0.0.1") is None
    # The first source that yields wins, whatever recipient yields it.
    both = ["ann@t1.mail.test", "bob+t2@example.com"]
    assert derive_namespace(ns, both, "user", "127.0.0.9") == "t2"
    # A tag that is not a key yields nothing; the next source is asked.
    assert derive_namespace(ns, ["bob+no/key@example.com"], "u1", "127.0.0.1") == "u1"


def test_no_namespace_from_derives_nothing(tmp_path: Path) -> None:
    config = parse_config('services: {m: {type: smtp, listen: ["tcp:0"]}}', tmp_path / "n.yaml")
    ns = config.services["m"].namespace_from
    assert not ns.enabled
    assert derive_namespace(ns, ["bob+t42@example.com"], None, "127.0.0.42") is None


def test_http_sources(tmp_path: Path) -> None:
    ns = namespacing(tmp_path, "http", "[header, {header: X-Test-Id}, {suffix: api.test}]")
    headers = {"x-netd-namespace": "T42", "x-test-id": "other"}
    assert ns.derive(header=headers.get, host="h", client="127.0.0.1") == "t42"
    assert ns.derive(header={"x-test-id": "t9"}.get, host="h") == "t9"
    assert ns.derive(header={}.get, host="t5.api.test") == "t5"
    assert ns.derive(header={}.get, host="api.test") is None


def test_dns_and_the_client_source(tmp_path: Path) -> None:
    ns = namespacing(tmp_path, "dns", "[{suffix: lab.test.}, client]")
    assert ns.derive(name="www.t42.lab.test.", client="127.0.0.1") == "t42"
    assert ns.derive(name="www.example.", client="127.0.0.42") == "42"
    assert ns.derive(name="x.", client=IPv4Address("TCP", "127.0.0.43", 1)) == "43"
    assert ns.derive(name="x.", client="::ffff:127.0.0.44") == "44"
    for other in ("127.0.0.1", "127.0.1.42", "10.0.0.42", "::1", None):
        assert ns.derive(name="x.", client=other) is None


def test_sources_pickle_for_workers(tmp_path: Path) -> None:
    for kind, sources in [
        ("smtp", "[plus_tag, {suffix: mail.test}, auth_user, client]"),
        ("http", "[header, {suffix: api.test}]"),
    ]:
        ns = namespacing(tmp_path, kind, sources)
        copy = pickle.loads(pickle.dumps(ns))
        assert copy == ns and copy.sources == ns.sources
    http = pickle.loads(pickle.dumps(namespacing(tmp_path, "http", "[header]")))
    assert http.derive(header={"x-netd-namespace": "t1"}.get) == "t1"


def test_equal_when_read_from_the_same_text(tmp_path: Path) -> None:
    one = namespacing(tmp_path, "dns", "[{suffix: lab.test}]")
    assert one == namespacing(tmp_path, "dns", "[{suffix: lab.test}]")
    assert one != namespacing(tmp_path, "dns", "[{suffix: lab2.test}]")


def test_namespace_from_errors(tmp_path: Path) -> None:
    where = "services.svc.namespace_from"
    assert errors(tmp_path, "dns", "[plus_tag]") == [
        (f"{where}[0]", "unknown namespace source 'plus_tag' (one of suffix, client)")
    ]
    assert errors(tmp_path, "smtp", "[{client: x}, {suffix: ''}, {a: 1, b: 2}]") == [
        (f"{where}[0].client", "'client' takes no argument"),
        (f"{where}[1].suffix", "not a domain suffix: ''"),
        (f"{where}[2]", "one source per entry (plus_tag, suffix, auth_user, client)"),
    ]
    assert errors(tmp_path, "dns", "[suffix]") == [
        (f"{where}[0]", "'suffix' needs its argument: {suffix: lab.test}")
    ]
    assert errors(tmp_path, "http", "[{header: 'bad header'}]") == [
        (f"{where}[0].header", "not a header name: 'bad header'")
    ]
    assert errors(tmp_path, "echo", "[client, suffix]") == [
        (f"{where}[1]", "unknown namespace source 'suffix' (one of client)")
    ]


WORDS = Vocabulary(match={"name": glob()}, acts={"reply": lambda value: value.as_str()})


def scoped_rules(*bodies: dict[str, Any]) -> tuple[RuleSet, Journal]:
    clock = Clock()
    journal = Journal(clock)
    rules = RuleSet("svc", WORDS, clock, journal)
    for body in bodies:
        rules.post(body)
    return rules, journal


def test_a_scoped_rule_fires_only_on_its_namespace() -> None:
    rules, journal = scoped_rules({"namespace": "T42", "match": {"name": "*"}, "reply": "451"})
    assert rules.check("127.0.0.1", None, name="x") is None
    assert rules.check("127.0.0.1", "t7", name="x") is None
    fired = rules.check("127.0.0.1", "t42", name="x")
    assert fired is not None and fired.rule.fired == 1
    [event] = journal.select(types=["rule.fired"], namespace="t42")
    assert event.fields["namespace"] == "t42"


def test_a_scoped_rule_without_a_match_acts_on_events_not_connections() -> None:
    rules, _ = scoped_rules({"namespace": "t42", "reply": "451"})
    assert rules.connect_rules == ()
    assert rules.at_connect("127.0.0.1") is None
    assert rules.check("127.0.0.1", "t42", name="anything") is not None
    assert rules.check("127.0.0.1", "t43", name="anything") is None


def test_a_scoped_rule_reads_and_moves_its_namespace_copy_of_a_scenario() -> None:
    scenarios = Scenarios({"signup": "started"})
    clock = Clock()
    rules = RuleSet("svc", WORDS, clock, Journal(clock), scenarios)
    step = {"scenario": "signup", "state": "started", "next_state": "created", "reply": "201"}
    rules.post({"namespace": "a", **step})
    rules.post({"match": {"name": "*"}, **step})
    assert rules.check("127.0.0.1", "a", name="x").rule.id == "r1"  # type: ignore[union-attr]
    assert scenarios.describe() == {"signup": "started", "signup@a": "created"}
    assert rules.check("127.0.0.1", "a", name="x").rule.id == "r2"  # type: ignore[union-attr]
    assert scenarios.describe() == {"signup": "created", "signup@a": "created"}
    assert scenarios.forget("a") == 1
    assert scenarios.describe() == {"signup": "created"}


def test_forgetting_a_namespace_takes_its_rules_only() -> None:
    rules, _ = scoped_rules(
        {"namespace": "a", "reply": "1"},
        {"namespace": "b", "reply": "2"},
        {"match": {"name": "x"}, "reply": "3"},
    )
    assert rules.forget("a") == {"removed": 1}
    assert [r.spec.namespace for r in rules.rules] == ["b", None]
    assert rules.forget("a") == {"removed": 0}


def test_a_connections_only_kind_refuses_a_scoped_rule(tmp_path: Path) -> None:
    text = """
    services:
      echo:
        type: echo
        listen: ["tcp:0"]
        rules: [{namespace: t1, reset: true}]
    """
    with pytest.raises(ConfigErrors) as refused:
        parse_config(textwrap.dedent(text), tmp_path / "netd.yaml")
    assert [(e.path, e.message) for e in refused.value.errors] == [
        (
            "services.echo.rules[0]",
            "'namespace' scopes a rule to a kind's events: this kind's rules act on connections",
        )
    ]


def test_a_rule_namespace_must_be_a_key() -> None:
    rules, _ = scoped_rules()
    with pytest.raises(ConfigErrors) as refused:
        rules.post({"namespace": "no/key", "reply": "451"})
    assert [(e.path, e.message) for e in refused.value.errors] == [
        ("namespace", "not a namespace: 'no/key' (letters, digits, '_', '-')")
    ]


def test_the_journal_selects_and_forgets_by_namespace() -> None:
    clock = Clock()
    journal = Journal(clock)
    journal.emit("s", "e", namespace="a")
    journal.emit("s", "e", namespace="b")
    journal.emit("s", "e")
    assert [e.id for e in journal.select(namespace="a")] == [1]
    waiting = journal.wait(5, since=3, namespace="b")
    journal.emit("s", "e", namespace="a")
    assert not waiting.called
    journal.emit("s", "e", namespace="b")
    assert [e.id for e in waiting.result] == [5]
    assert journal.forget("b") == 2
    assert [e.id for e in journal.select()] == [1, 3, 4]
    assert journal.forget("b") == 0


def test_the_core_filters_a_view_list_by_namespace() -> None:
    entries = [{"namespace": "a", "n": 1}, {"n": 2}, {"namespace": "b", "n": 3}]
    assert _in_namespace(entries, "a") == [{"namespace": "a", "n": 1}]
    wrapped = {"rules": entries, "total": 3}
    assert _in_namespace(wrapped, "b") == {"rules": [entries[2]], "total": 3}
    assert _in_namespace("text", "a") == "text"


def test_a_test_id_makes_a_namespace_key() -> None:
    one = namespace_for("tests/test_a.py::test_Signup[bob@x-1]")
    assert one.startswith("test-signup-bob-x-1-")
    assert key(one) == one
    assert one != namespace_for("tests/test_b.py::test_Signup[bob@x-1]")
    assert key(namespace_for("t.py::" + "x" * 200)) is not None


def _admin_with(views: dict[str, AdminView]) -> tuple[AdminResource, FakeDaemon]:
    daemon = FakeDaemon()
    daemon.scenarios = Scenarios()  # type: ignore[attr-defined]
    daemon.services_by_name["svc"] = attrs.make_class("S", ["handlers"])(
        attrs.make_class("H", ["views"])(views)
    )
    return AdminResource(daemon, None, dict), daemon  # type: ignore[arg-type]


def _get(resource: AdminResource, path: bytes, method: bytes = b"GET") -> tuple[int, Any]:
    target, _, query = path.partition(b"?")
    dummy = request(target, method)
    for pair in filter(None, query.split(b"&")):
        name, _, value = pair.partition(b"=")
        dummy.addArg(name, value)
    # An answer given at once is returned; one given later is written.
    answer = resource.render(dummy)
    body = answer if isinstance(answer, bytes) else b"".join(dummy.written)
    return dummy.responseCode or 200, json.loads(body)


def test_the_admin_api_forgets_a_namespace_in_every_view_and_the_journal() -> None:
    held = [{"namespace": "a", "n": 1}, {"namespace": "b", "n": 2}, {"n": 3}]

    def forget(namespace: str) -> dict[str, int]:
        held[:] = [e for e in held if e.get("namespace") != namespace]
        return {"cleared": 1}

    views = {
        "items": AdminView(list=lambda query: {"items": list(held)}, forget=forget),
        "plain": AdminView(list=lambda query: list(held)),
    }
    resource, daemon = _admin_with(views)
    daemon.journal.emit("svc", "e", namespace="a")
    daemon.journal.emit("svc", "e", namespace="b")
    assert _get(resource, b"/api/services/svc/items?namespace=b") == (
        200,
        {"items": [{"namespace": "b", "n": 2}]},
    )
    assert _get(resource, b"/api/services/svc/plain?namespace=a")[1] == [held[0]]
    status, events = _get(resource, b"/api/events?namespace=b")
    assert [e["id"] for e in events["events"]] == [2]
    daemon.scenarios.set("signup@a", "created")  # type: ignore[attr-defined]
    daemon.scenarios.set("signup", "created")  # type: ignore[attr-defined]
    assert _get(resource, b"/api/namespaces/A", b"DELETE") == (
        200,
        {
            "namespace": "a",
            "events": 1,
            "scenarios": 1,
            "services": {"svc": {"items": {"cleared": 1}}},
        },
    )
    assert daemon.scenarios.describe() == {"signup": "created"}  # type: ignore[attr-defined]
    assert [e.get("namespace") for e in held] == ["b", None]
    assert [e.id for e in daemon.journal.select()] == [2]
    status, refused = _get(resource, b"/api/namespaces/no%20key", b"DELETE")
    assert status == 400 and "not a namespace" in refused["error"]
    assert _get(resource, b"/api/namespaces/a", b"GET")[0] == 405


def test_the_event_stream_filters_by_namespace() -> None:
    client = Client()
    journal = client.daemon.journal
    answer = open_stream(client, b"/api/events/stream?namespace=a&since=0")
    assert frames(answer) == []
    journal.emit("svc", "e", namespace="a")
    journal.emit("svc", "e", namespace="b")
    journal.emit("svc", "e")
    client.clock.advance(0)
    assert [e["id"] for e in frames(client.answer())] == [1]
