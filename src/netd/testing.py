"""
Run the real netd daemon from a test suite.

This module is public API: test suites of software that talks to netd use it
as much as netd's own tests do.

    >>> with NetdProcess.start(config_text, workdir) as netd:
    ...     host, port = netd.address("mail")

The daemon runs as C{twistd -n netd -c FILE --ports-file PATH} in a
subprocess.  Readiness is the ports file appearing (netd writes it atomically
once every listener is bound), never a sleep.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["NetdProcess", "StartFailed", "twistd_command"]


class StartFailed(Exception):
    """netd exited or did not get ready in time; carries its output."""

    def __init__(self, message: str, output: str, returncode: int | None) -> None:
        super().__init__(f"{message}\n--- netd output ---\n{output}")
        self.output = output
        self.returncode = returncode


def twistd_command() -> list[str]:
    """The twistd of the running interpreter's environment."""
    twistd = Path(sys.executable).parent / "twistd"
    if twistd.exists():
        return [str(twistd)]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


class NetdProcess:
    """One running netd; stop it with L{stop} or by leaving the C{with} block."""

    def __init__(self, process: subprocess.Popen[bytes], ports: dict[str, Any], log: Path) -> None:
        self.process = process
        self.ports = ports
        self.log_path = log

    @classmethod
    def start(
        cls,
        config: str | Path,
        workdir: Path,
        timeout: float = 15.0,
        extra_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> NetdProcess:
        """Start netd on C{config} (YAML text, or a path) and wait until it is ready."""
        workdir.mkdir(parents=True, exist_ok=True)
        if isinstance(config, Path):
            config_path = config
        else:
            config_path = workdir / "netd.yaml"
            config_path.write_text(config, encoding="utf-8")
        ports_file = workdir / "ports.json"
        ports_file.unlink(missing_ok=True)
        log = workdir / "netd.log"
        command = [
            *twistd_command(),
            "--nodaemon",
            "--pidfile=",
            "netd",
            "-c",
            str(config_path),
            "--ports-file",
            str(ports_file),
            *extra_args,
        ]
        with log.open("wb") as output:
            process = subprocess.Popen(
                command,
                cwd=workdir,
                stdout=output,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
            )
        deadline = time.monotonic() + timeout
        while not ports_file.exists():
            if process.poll() is not None:
                raise StartFailed("netd exited during start-up", _read(log), process.returncode)
            if time.monotonic() > deadline:
                process.kill()
                process.wait()
                raise StartFailed(f"netd not ready after {timeout}s", _read(log), None)
            time.sleep(0.01)
        ports = json.loads(ports_file.read_text(encoding="utf-8"))
        return cls(process, ports, log)

    @property
    def output(self) -> str:
        return _read(self.log_path)

    def listeners(self, service: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.ports["services"][service]["listeners"]
        return found

    def listener(
        self, service: str, transport: str = "tcp", tls: bool | None = False
    ) -> dict[str, Any]:
        for entry in self.listeners(service):
            if entry["transport"] == transport and (tls is None or entry["tls"] == tls):
                return entry
        raise LookupError(f"{service} has no {transport} listener with tls={tls}")

    def address(
        self, service: str, transport: str = "tcp", tls: bool | None = False
    ) -> tuple[str, int]:
        entry = self.listener(service, transport, tls)
        return entry["host"], entry["port"]

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then wait; returns the exit status (kills after C{timeout})."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> NetdProcess:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
