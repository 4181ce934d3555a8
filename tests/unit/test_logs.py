"""The buffered log observer: batching, lifecycle lines at once, text and JSON shapes."""

from __future__ import annotations

import io
import json

import pytest
from constantly import NamedConstant
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, LogPublisher
from twisted.python.failure import Failure

from netd.config import LogConfig
from netd.logs import BufferedObserver, LogOutput


def publish(sink: BufferedObserver, namespace: str, level: str = "info") -> Logger:
    publisher = LogPublisher(LogOutput(sink, LogConfig(level=level)).observer)
    return Logger(namespace=namespace, observer=publisher)


def test_service_lines_wait_for_the_batch_then_flush() -> None:
    output, clock = io.StringIO(), Clock()
    log = publish(BufferedObserver(output, json_lines=False, clock=clock, delay=0.2), "netd.web")
    for number in range(3):
        log.info("request {number}", number=number)
    assert output.getvalue() == ""
    clock.advance(0.2)
    lines = output.getvalue().splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == [
        f"[netd.web#info] request {n}" for n in range(3)
    ]
    assert not clock.getDelayedCalls()


def test_lifecycle_and_warnings_are_written_at_once() -> None:
    output, clock = io.StringIO(), Clock()
    sink = BufferedObserver(output, json_lines=False, clock=clock)
    publish(sink, "netd.web").info("buffered")
    publish(sink, "netd").info("service echo (echo) listening on tcp 127.0.0.1:7")
    assert "buffered" in output.getvalue() and "listening" in output.getvalue()
    publish(sink, "netd.web").warn("disk full")
    assert "[netd.web#warn] disk full" in output.getvalue()
    assert not clock.getDelayedCalls()


def test_level_filter_and_unbuffer_after_shutdown() -> None:
    output, clock = io.StringIO(), Clock()
    sink = BufferedObserver(output, json_lines=False, clock=clock)
    log = publish(sink, "netd.web", level="warn")
    log.info("dropped")
    log.error("kept")
    assert "dropped" not in output.getvalue() and "kept" in output.getvalue()
    sink.unbuffer()
    publish(sink, "netd.web").info("after the reactor")
    assert "after the reactor" in output.getvalue()


def test_failures_carry_their_traceback_indented() -> None:
    output = io.StringIO()
    log = publish(BufferedObserver(output, json_lines=False), "netd.web")
    try:
        raise ZeroDivisionError("no requests per zero seconds")
    except ZeroDivisionError:
        log.failure("request failed", Failure())
    text = output.getvalue()
    assert "request failed\n\tTraceback" in text and "ZeroDivisionError" in text


def test_json_lines_are_one_object_each() -> None:
    output, clock = io.StringIO(), Clock()
    log = publish(BufferedObserver(output, json_lines=True, clock=clock), "netd.web")
    log.info("{access}", access="GET /", status=200)
    log.info("{access}", access="GET /x", status=404)
    clock.advance(1)
    records = [json.loads(line) for line in output.getvalue().splitlines()]
    assert [(r["access"], r["status"]) for r in records] == [("GET /", 200), ("GET /x", 404)]
    assert records[0]["log_level"] == {
        "name": "info",
        "__class_uuid__": records[0]["log_level"]["__class_uuid__"],
    }
    assert LogLevel.levelWithName(records[1]["log_level"]["name"]) is LogLevel.info


def test_one_field_messages_and_ordinary_formats_read_the_same() -> None:
    output = io.StringIO()
    log = publish(BufferedObserver(output, json_lines=False), "netd.web")
    log.info("{access}", access='127.0.0.1 - - "GET / HTTP/1.1" 200 5')
    log.info("{count} requests from {client!r}", count=3, client="a")
    log.info("{missing}")
    lines = [line.split("] ", 1)[1] for line in output.getvalue().splitlines()]
    assert lines[0] == '127.0.0.1 - - "GET / HTTP/1.1" 200 5'
    assert lines[1] == "3 requests from 'a'"
    assert lines[2].startswith("Unable to format event")


def test_a_reloaded_log_section_changes_format_and_level_in_place() -> None:
    output = io.StringIO()
    installed = LogOutput(BufferedObserver(output, json_lines=False), LogConfig(level="info"))
    log = Logger(namespace="netd.web", observer=LogPublisher(installed.observer))
    log.info("as text")
    installed.apply(LogConfig(format="json", level="warn"))
    log.info("now filtered out")
    log.warn("as json")
    first, second = output.getvalue().splitlines()
    assert first.endswith("[netd.web#info] as text")
    assert json.loads(second)["log_format"] == "as json"


def test_levels_are_decided_once_a_namespace_and_level_until_a_reload_changes_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    output = io.StringIO()
    installed = LogOutput(BufferedObserver(output, json_lines=False), LogConfig(level="info"))
    asked: list[str] = []
    decide = installed.levels.logLevelForNamespace

    def counted(namespace: str) -> NamedConstant:
        asked.append(namespace)
        return decide(namespace)

    monkeypatch.setattr(installed.levels, "logLevelForNamespace", counted)
    log = Logger(namespace="netd.web", observer=LogPublisher(installed.observer))
    for number in range(3):
        log.info("request {number}", number=number)
        log.debug("detail {number}", number=number)
    assert asked == ["netd.web", "netd.web"]  # info, then debug: each once
    installed.apply(LogConfig(level="warn"))
    log.info("quiet now")
    log.warn("still heard")
    text = output.getvalue()
    assert "request 2" in text and "detail" not in text
    assert "quiet now" not in text and "still heard" in text
