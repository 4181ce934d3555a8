"""
netd's pytest plugin, registered through the C{pytest11} entry point.

    def test_signup_mail(netd):
        server = netd({"services": {"mail": {"type": "smtp", ...}}})
        ...
        assert server.messages("mail", to="bob@example.test")

C{netd} starts daemons for one test, C{netd_session} for the whole run; both
stop what they started.  C{netd_ns} gives each test a namespace of its own
(L{netd.namespaces}) on one daemon shared by the run (by each xdist worker),
its map C{netd_ns_config}'s; the namespace is reset after the test.

When a test fails, the logs of the daemons it used are added to its report;
C{--netd-keep-logs DIR} also copies them there, and the C{netd_logs} marker
adds them even when the test passes.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from itertools import count
from pathlib import Path
from typing import Any

import pytest

from netd.testing import Namespace, NetdProcess

__all__ = [
    "NAMESPACED_MAP",
    "NetdFactory",
    "daemons_for",
    "namespace_for",
    "netd",
    "netd_ns",
    "netd_ns_config",
    "netd_ns_server",
    "netd_session",
]

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


_LOOPBACK = "tcp:0:interface=127.0.0.1"

# netd_ns's map unless a suite gives its own (the fixture netd_ns_config): mail,
# HTTP and DNS, each telling namespaces apart by what netd.testing.Namespace
# puts in the traffic (a plus tag, a header, a label) or by a suffix.
NAMESPACED_MAP: Mapping[str, Any] = {
    "services": {
        "mail": {
            "type": "smtp",
            "listen": [_LOOPBACK],
            "relay": {"allow_from": ["127.0.0.0/8"]},
            "delivery": {"mode": "capture"},
            "namespace_from": ["plus_tag", {"suffix": "mail.test"}, "auth_user"],
        },
        "api": {
            "type": "http",
            "listen": [_LOOPBACK],
            "record": 10000,
            "namespace_from": ["header", {"suffix": "api.test"}],
        },
        "dns": {
            "type": "dns",
            "listen": ["udp:0:interface=127.0.0.1", _LOOPBACK],
            "query_log": True,
            "records": {"*.lab.test": {"A": ["127.0.0.1"]}},
            "namespace_from": [{"suffix": "lab.test"}],
        },
    }
}


def namespace_for(nodeid: str) -> str:
    """
    A namespace key for a test: its name, made a DNS label, and a digest of its
    whole id, so two tests of one name in two files differ.
    """
    name = nodeid.rpartition("::")[2].lower()
    readable = re.sub(r"[^a-z0-9]+", "-", name).strip("-")[:40] or "t"
    return f"{readable}-{hashlib.sha256(nodeid.encode()).hexdigest()[:8]}"


@pytest.fixture(scope="session")
def netd_ns_config() -> Mapping[str, Any]:
    """The map of netd_ns's shared daemon: override it in a conftest.py for your own."""
    return NAMESPACED_MAP


@pytest.fixture(scope="session")
def netd_ns_server(netd_session: NetdFactory, netd_ns_config: Mapping[str, Any]) -> NetdProcess:
    """The daemon every netd_ns of this run (or xdist worker) shares."""
    return netd_session(netd_ns_config)


@pytest.fixture
def netd_ns(request: pytest.FixtureRequest, netd_ns_server: NetdProcess) -> Iterator[Namespace]:
    """This test's namespace of the shared daemon, fresh, and reset after the test."""
    namespace = netd_ns_server.namespace(namespace_for(request.node.nodeid))
    namespace.reset()  # a rerun of the test in the same session starts clean too
    yield namespace
    namespace.reset()


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
