"""The pytest plugin as another project sees it: pytest runs on a throwaway suite."""

from __future__ import annotations

import pytest

ECHO_TEST = """
import socket

ECHO = {"services": {"echo": {"type": "echo", "listen": ["tcp:0:interface=127.0.0.1"]}}}


def test_echo_answers(netd):
    server = netd(ECHO)
    with socket.create_connection(server.address("echo"), timeout=5) as sock:
        sock.sendall(b"ping")
        assert sock.recv(4) == b"ping"


def test_echo_is_shared(netd_session):
    first = netd_session(ECHO)
    assert first.address("echo")[1] > 0


def test_that_fails(netd):
    server = netd(ECHO)
    assert server.address("echo") == ("nowhere", 1)
"""


def test_fixtures_start_and_stop_daemons_and_failures_carry_their_logs(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_app=ECHO_TEST)
    kept = pytester.path / "kept"
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--netd-keep-logs={kept}")
    result.assert_outcomes(passed=2, failed=1)
    # The failing test's report shows netd's own log, readiness line and all.
    result.stdout.fnmatch_lines(["*netd log 0*", "*echo*listening on tcp 127.0.0.1:*"])
    [log] = kept.glob("*test_that_fails-netd0.log")
    assert "listening on tcp 127.0.0.1:" in log.read_text()
    assert not list(kept.glob("*test_echo_answers*"))


def test_the_marker_shows_logs_of_a_passing_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_marked="""
import pytest

@pytest.mark.netd_logs
def test_passes(netd):
    netd("services: {}\\n")
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rP", "--strict-markers")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*netd log 0*"])


def test_the_plugin_is_registered_by_its_entry_point(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--fixtures", "-p", "no:cacheprovider")
    # pytest lists session fixtures first: one line at a time, in any order.
    for fixture in ("*netd -- *pytest_plugin.py*", "*netd_session* -- *", "*netd_ns -- *"):
        result.stdout.fnmatch_lines([fixture])
