"""
The service tree twistd starts for netd: the map read and checked, the daemon
built under a root service that turns start-up failures into one message and
exit status 1, twistd's daemonizing parent told when netd serves, and the
cyclic collector paused while the map's kinds are imported.

L{netd.tap.makeService} imports this module once twistd asks for the service,
so that reading the command line loads nothing of the daemon.
"""

from __future__ import annotations

import atexit
import gc
import os
import pwd
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.application.service import IService, MultiService
from twisted.python.logfile import LogFile

from netd import logs, systemd
from netd.config import ConfigErrors, load_config
from netd.runtime import Daemon, StartupError

if TYPE_CHECKING:
    from netd.tap import Options

__all__ = ["make_service"]


class _Root(MultiService):
    """Turns start-up failures into one clear message and exit status 1."""

    def __init__(self, daemon: Daemon, reactor: Any, twistd_options: Any) -> None:
        super().__init__()
        self.daemon = daemon
        self.reactor = reactor
        self.twistd_options = twistd_options
        self.log_output: logs.LogOutput | None = None
        daemon.setServiceParent(self)

    def setServiceParent(self, parent: Any) -> None:
        super().setServiceParent(parent)
        output = logs.install_for_twistd(
            parent, self.daemon.config.log, self.twistd_options, self.reactor
        )
        self.log_output = output
        if output is not None:
            self.daemon.observers.append(output)
            self.reactor.addSystemEventTrigger("after", "shutdown", output.sink.unbuffer)

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except StartupError as e:
            logs.fatal(str(e))
            if not (self.twistd_options or {}).get("nodaemon", True):
                # Daemonized, the waiting parent only hears of an exception that
                # twistd writes to its status pipe; an exit leaves it waiting forever.
                raise
            raise SystemExit(1) from None
        self._hand_over_state()

    def stopService(self) -> Any:
        stopped = super().stopService()
        if self.daemon.start_failure is not None:
            # A start that fails once the reactor runs (a bind that completes
            # late) stops the reactor, and twistd then returns normally: its
            # console script would exit 0 and systemd's Restart=on-failure
            # would not see a failure.  atexit runs this first (last in, first
            # out), once twistd has removed its pid file and closed its log.
            atexit.register(_exit_status_one)
        return stopped

    def _hand_over_state(self) -> None:
        """
        Give state_dir to the user twistd is about to become (--uid/--gid).

        Certificates and spools are made as root during start-up; without this
        the daemon could not read or renew them after the drop (on reload, say).
        """
        options = self.twistd_options or {}
        uid, gid = options.get("uid"), options.get("gid")
        if os.getuid() != 0 or uid is None:
            return
        if gid is None:
            gid = pwd.getpwuid(uid).pw_gid
        state_dir = self.daemon.config.state_dir
        # Never follow a link: the service user owns this tree and could point
        # one at /etc/shadow for root to hand over on the next start.
        for directory, subdirectories, files in os.walk(state_dir):
            os.chown(directory, uid, gid, follow_symlinks=False)
            for name in [*subdirectories, *files]:
                os.chown(os.path.join(directory, name), uid, gid, follow_symlinks=False)

    def startService(self) -> None:
        # First in line, before the daemon announces readiness on the same hook.
        self.reactor.callWhenRunning(self._take_signals)
        status_pipe = (self.twistd_options or {}).pop("statusPipe", None)
        if status_pipe is not None:
            # twistd tells its waiting parent "started" before the reactor runs,
            # which is before the ports file exists; we say it once it does.
            self.daemon.observers.append(_ParentNotice(status_pipe))
        super().startService()

    def _take_signals(self) -> None:
        # twistd re-raises SIGTERM on itself after shutdown, so the exit status
        # would say "killed"; an orderly stop on SIGTERM is a success (exit 0).
        def stop(signum: int, frame: Any) -> None:
            self.reactor.callFromThread(self.reactor.stop)

        def reload(signum: int, frame: Any) -> None:
            self.reactor.callFromThread(self.daemon.reload)

        def reopen_log(signum: int, frame: Any) -> None:
            self.reactor.callFromThread(self._rotate_log)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGHUP, reload)
        # twistd rotates its own log file on SIGUSR1; ours replaces its observer.
        signal.signal(signal.SIGUSR1, reopen_log)

    def _rotate_log(self) -> None:
        """
        SIGUSR1: when logrotate has moved the file away, open a new one by its
        name (writing on would go to the moved file); otherwise move it to
        FILE.1 (older ones to .2, .3, ...) and start a new one, as twistd does.
        """
        if self.log_output is None:
            return
        sink = self.log_output.sink
        if isinstance(sink.output, LogFile):
            sink.flush()
            if os.path.exists(sink.output.path):
                sink.output.rotate()
            else:
                sink.output.reopen()


def _exit_status_one() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


class _ParentNotice:
    """
    Answers the parent a daemonizing twistd left waiting, in twistd's own
    status-pipe language: C{0} for serving, C{1 reason} for not.
    """

    def __init__(self, pipe: int) -> None:
        self.pipe: int | None = pipe

    def _say(self, status: bytes) -> None:
        if self.pipe is not None:
            pipe, self.pipe = self.pipe, None
            try:
                os.write(pipe, status)
            except OSError:
                pass  # the parent is gone (killed): nobody left to tell
            finally:
                os.close(pipe)

    def ready(self, daemon: Daemon) -> None:
        self._say(b"0")

    def reloading(self, daemon: Daemon) -> None:
        pass

    def reloaded(self, daemon: Daemon) -> None:
        pass

    def stopping(self, daemon: Daemon) -> None:
        self._say(b"1 netd stopped before it was ready; see the log")


class _CollectorPause:
    """
    Keeps Python's cyclic garbage collector off from reading the map until the
    daemon is ready or stopping.  Start-up imports every kind the map names and
    builds hundreds of classes; each collection of the young generation then
    walks all of them again, about a tenth of the time to ready for the
    showcase map.  What start-up leaves as cyclic garbage is collected once, at
    ready, before the first client is served, by a full collection (about 30 ms
    for the showcase's 70,000 objects).  A collection of the young generations
    alone took 12 ms there, but it left Python's count of objects awaiting a
    full collection high, and the collector ran one (25 ms) in the first second
    and a half of serving instead.
    """

    def __init__(self) -> None:
        gc.disable()

    def ready(self, daemon: Daemon) -> None:
        self._resume()

    def reloading(self, daemon: Daemon) -> None:
        pass

    def reloaded(self, daemon: Daemon) -> None:
        pass

    def stopping(self, daemon: Daemon) -> None:
        self._resume()

    def _resume(self) -> None:
        if not gc.isenabled():
            gc.collect()
            gc.enable()


def make_service(options: Options) -> IService:
    from twisted.internet import reactor

    collector = _CollectorPause()
    try:
        config = load_config(options["config"])
    except ConfigErrors as e:
        logs.fatal(str(e))
        raise SystemExit(1) from None
    ports_file = Path(options["ports-file"]).absolute() if options["ports-file"] else None
    if ports_file is not None and not os.access(ports_file.parent, os.W_OK | os.X_OK):
        # Found out only once ready, this would leave a daemon that never says so.
        logs.fatal(f"--ports-file {ports_file}: cannot write in {ports_file.parent}")
        raise SystemExit(1)
    daemon = Daemon(config, reactor, ports_file=ports_file)
    daemon.observers.append(systemd.Notifier.from_environment(os.environ, reactor))
    daemon.observers.append(collector)
    return _Root(daemon, reactor, getattr(options, "parent", None))
