"""
netd's pytest plugin, registered through the C{pytest11} entry point.

    def test_signup_mail(netd):
        server = netd({"services": {"mail": {"type": "smtp", ...}}})
        ...
        assert server.messages("mail", to="bob@example.test")

C{netd} starts daemons for one test, C{netd_session} for the whole run; both
stop what they started.  When a test fails, the logs of the daemons it used
are added to its report; C{--netd-keep-logs DIR} also copies them there, and
the C{netd_logs} marker adds them even when the test passes.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from itertools import count
from pathlib import Path
from typing import Any

import pytest

from netd.testing import NetdProcess

__all__ = ["NetdFactory", "daemons_for", "netd", "netd_session"]

NetdFactory = Callable[..., NetdProcess]

_STARTED = pytest.StashKey[list[NetdProcess]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("netd").addoption(
        "--netd-keep-logs",
        metavar="DIR",
        default=None,
        help="copy the logs of the netd daemons a failed test used into DIR",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "netd_logs: add the logs of this test's netd daemons to its report"
    )


@contextmanager
def daemons_for(
    owner: pytest.Item | pytest.Session, workdirs: Callable[[], Path]
) -> Iterator[NetdFactory]:
    """
    A factory of daemons that live as long as the C{with} block, and whose
    logs go into the reports of C{owner} (a test, or every test of a session).
    For a fixture of one's own under another name.
    """
    started = owner.stash.setdefault(_STARTED, [])

    def start(
        config: str | Path | Mapping[str, Any], workdir: Path | None = None, **kwargs: Any
    ) -> NetdProcess:
        daemon = NetdProcess.start(config, workdir or workdirs(), **kwargs)
        started.append(daemon)
        return daemon

    try:
        yield start
    finally:
        # Every daemon is stopped even if stopping one fails.
        with ExitStack() as stopping:
            for daemon in started:
                stopping.callback(daemon.stop)


@pytest.fixture
def netd(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NetdFactory]:
    """Start netd daemons for this test: C{netd(config, **NetdProcess.start options)}."""
    counter = count()
    with daemons_for(request.node, lambda: tmp_path / f"netd{next(counter)}") as start:
        yield start


@pytest.fixture(scope="session")
def netd_session(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[NetdFactory]:
    """Start netd daemons shared by every test of the run."""
    with daemons_for(request.session, lambda: tmp_path_factory.mktemp("netd")) as start:
        yield start


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report: pytest.TestReport = yield  # type: ignore[assignment]
    daemons = [*item.stash.get(_STARTED, []), *item.session.stash.get(_STARTED, [])]
    wanted = report.failed or item.get_closest_marker("netd_logs") is not None
    if daemons and wanted and report.when == "call":
        for number, daemon in enumerate(daemons):
            report.sections.append((f"netd log {number} ({daemon.log_path})", daemon.output))
        keep = item.config.getoption("--netd-keep-logs")
        if keep and report.failed:
            _keep_logs(Path(keep), item.nodeid, daemons)
    return report  # type: ignore[return-value]


def _keep_logs(into: Path, nodeid: str, daemons: list[NetdProcess]) -> None:
    into.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid).strip("_")
    for number, daemon in enumerate(daemons):
        if daemon.log_path.exists():
            shutil.copyfile(daemon.log_path, into / f"{stem}-netd{number}.log")
