"""
Log output: text or one JSON object a line, filtered by level.
"""

from __future__ import annotations

import re
import sys
from typing import IO, TYPE_CHECKING, Any

from twisted.logger import (
    ILogObserver,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    eventAsJSON,
    formatEvent,
    formatTime,
)
from twisted.python.logfile import LogFile
from zope.interface import implementer

from netd.config import LogConfig

if TYPE_CHECKING:
    from netd.runtime import Daemon

__all__ = ["BufferedObserver", "LogOutput", "fatal", "install_for_twistd"]

_LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
}


@implementer(ILogObserver)
class BufferedObserver:
    """
    Text or JSON lines, written in batches.

    twistd's observers format a timestamp and flush the file for every event:
    with an access log that was a third of the HTTP service's CPU.  Here the
    timestamp is formatted once a second and lines are flushed after at most
    C{delay} seconds; warnings, the daemon's own lifecycle lines (readiness,
    reload) and everything after shutdown are written at once.
    """

    def __init__(
        self, output: IO[str], json_lines: bool, clock: Any = None, delay: float = 0.2
    ) -> None:
        self.output = output
        self.json_lines = json_lines
        self.clock = clock
        self.delay = delay
        self._pending: list[str] = []
        self._flush_call: Any = None
        self._second = -1
        self._stamp = ""

    def __call__(self, event: LogEvent) -> None:
        line = eventAsJSON(event) + "\n" if self.json_lines else self._text(event)
        if line is None:
            return
        self._pending.append(line)
        if (
            self.clock is None
            or event.get("log_level") in _AT_ONCE
            or event.get("log_namespace") == "netd"  # readiness, reload: rare, awaited
        ):
            self.flush()
        elif self._flush_call is None:
            self._flush_call = self.clock.callLater(self.delay, self.flush)

    def _text(self, event: LogEvent) -> str | None:
        text = _format(event)
        failure = event.get("log_failure")
        if failure is not None:
            text = f"{text}\n{failure.getTraceback()}"
        if not text:
            return None
        when = event.get("log_time") or 0.0
        if int(when) != self._second:
            self._second = int(when)
            self._stamp = formatTime(when)
        level = event.get("log_level")
        system = event.get("log_system") or (
            f"{event.get('log_namespace', '-')}#{level.name if level else '-'}"
        )
        text = text.replace("\n", "\n\t")
        return f"{self._stamp} [{system}] {text}\n"

    def unbuffer(self) -> None:
        """Write everything from now on at once: the reactor that flushes is gone."""
        self.clock = None
        self.flush()

    def flush(self) -> None:
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        if self._pending:
            lines, self._pending = self._pending, []
            self.output.write("".join(lines))
            self.output.flush()


# A set, not >= LogLevel.warn: each comparison of constants is a Python call.
_AT_ONCE = frozenset(level for level in LogLevel.iterconstants() if level >= LogLevel.warn)


@implementer(ILogObserver)
class _LevelFilter:
    """
    FilteringLogObserver over one LogLevelFilterPredicate, with the verdict kept
    for each namespace and level until the levels change (L{changed}): its
    chain of predicates and its walk up a namespace's dots, for every event,
    cost as much as writing the line.
    """

    def __init__(self, sink: ILogObserver, levels: LogLevelFilterPredicate) -> None:
        self.sink = sink
        self.levels = levels
        self._verdicts: dict[tuple[object, object], bool] = {}

    def __call__(self, event: LogEvent) -> None:
        key = event.get("log_namespace"), event.get("log_level")
        verdict = self._verdicts.get(key)
        if verdict is None:
            if len(self._verdicts) >= _VERDICTS:
                self._verdicts.clear()
            # The predicate reads nothing of an event but these two.
            verdict = self._verdicts[key] = self.levels(event) != PredicateResult.no
        if verdict:
            if "log_trace" in event:
                event["log_trace"].append((self, self.sink))
            self.sink(event)

    def changed(self) -> None:
        self._verdicts.clear()


# Namespaces are a service's or a module's: a few dozen, with five levels each.
_VERDICTS = 1024

_WHOLE_FIELD = re.compile(r"\{(\w+)\}\Z")
_whole_field_of: dict[str, str | None] = {}


def _format(event: LogEvent) -> str:
    """formatEvent, minus the format parsing for a message that is one field ("{access}")."""
    format = event.get("log_format")
    if isinstance(format, str):
        field = _whole_field_of.get(format, "")
        if field == "":
            match = _WHOLE_FIELD.match(format)
            field = _whole_field_of[format] = match.group(1) if match else None
        if field is not None and field in event:
            return str(event[field])
    return formatEvent(event)


class LogOutput:
    """
    netd's observer as installed, whose format and level follow the map: a
    reload that changes C{log:} applies it (a lifecycle observer of the daemon).
    """

    def __init__(self, sink: BufferedObserver, config: LogConfig) -> None:
        self.sink = sink
        self.levels = LogLevelFilterPredicate(defaultLogLevel=_LEVELS[config.level])
        self.observer = _LevelFilter(sink, self.levels)

    def apply(self, config: LogConfig) -> None:
        self.sink.json_lines = config.format == "json"
        self.levels.setLogLevelForNamespace("", _LEVELS[config.level])
        self.observer.changed()

    def ready(self, daemon: Daemon) -> None:
        pass

    def reloading(self, daemon: Daemon) -> None:
        pass

    def reloaded(self, daemon: Daemon) -> None:
        self.apply(daemon.config.log)

    def stopping(self, daemon: Daemon) -> None:
        pass


def install_for_twistd(
    application: Any, config: LogConfig, twistd_options: Any, clock: Any
) -> LogOutput | None:
    """
    Offer our observer to twistd through the application's ILogObserver component.

    twistd consults the component only when no --logger was given; its
    --logfile (or twistd.log when daemonized) is kept as the destination.
    """
    if not hasattr(application, "setComponent"):
        return None
    options = twistd_options or {}
    logfile = options.get("logfile") or ("-" if options.get("nodaemon", True) else "twistd.log")
    # No rotation by size (Twisted's LogFile rotates every megabyte, renaming
    # every older file each time: with an access log, thousands of renames a
    # rotation): the file rotates on SIGUSR1, as logrotate drives nginx's.
    output: IO[str] = (
        sys.stdout if logfile == "-" else LogFile.fromFullPath(logfile, rotateLength=None)
    )
    installed = LogOutput(BufferedObserver(output, config.format == "json", clock), config)
    application.setComponent(ILogObserver, installed.observer)
    return installed


def fatal(message: str) -> None:
    """Report a failure that stops netd before or outside its logging."""
    sys.stderr.write(message.rstrip("\n") + "\n")
    sys.stderr.flush()
