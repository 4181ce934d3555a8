"""
Log output: text or one JSON object a line, filtered by level.
"""

from __future__ import annotations

import sys
from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    jsonFileLogObserver,
    textFileLogObserver,
)
from twisted.python.logfile import LogFile

from netd.config import LogConfig

__all__ = ["fatal", "install_for_twistd", "observer"]

_LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
}


def observer(config: LogConfig, output: IO[str]) -> ILogObserver:
    if config.format == "json":
        # One object a line: the default record separator (\x1e) breaks line-based tools.
        sink = jsonFileLogObserver(output, recordSeparator="")
    else:
        sink = textFileLogObserver(output)
    return FilteringLogObserver(
        sink, [LogLevelFilterPredicate(defaultLogLevel=_LEVELS[config.level])]
    )


def install_for_twistd(application: Any, config: LogConfig, twistd_options: Any) -> None:
    """
    Offer our observer to twistd through the application's ILogObserver component.

    twistd consults the component only when no --logger was given.  Plain text at
    level info is twistd's own default, so then twistd keeps its observer (and its
    log file handling) untouched.
    """
    if config == LogConfig() or not hasattr(application, "setComponent"):
        return
    options = twistd_options or {}
    logfile = options.get("logfile") or ("-" if options.get("nodaemon", True) else "twistd.log")
    output: IO[str] = sys.stdout if logfile == "-" else LogFile.fromFullPath(logfile)
    application.setComponent(ILogObserver, observer(config, output))


def fatal(message: str) -> None:
    """Report a failure that stops netd before or outside its logging."""
    sys.stderr.write(message.rstrip("\n") + "\n")
    sys.stderr.flush()
