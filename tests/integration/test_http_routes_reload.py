"""
Routes added through the admin API outlive reloads, as WireMock's run-time stubs
outlive everything but a reset: an unrelated edit keeps them, an edit of the
service's own routes rebuilds it with them on top, and a map route that takes one's
id wins over it.
"""

from __future__ import annotations

import json
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from netd.testing import AdminError, NetdProcess


def _map(web_routes: str, other_body: str = "one") -> str:
    return f"""
state_dir: state
services:
  web:
    type: http
    listen: ["tcp:0:interface=127.0.0.1"]
    access_log: false
    routes:
{web_routes}
  other:
    type: http
    listen: ["tcp:0:interface=127.0.0.1"]
    access_log: false
    routes:
      - {{path: /, body: "{other_body}\\n"}}
"""


_BASE = '      - {path: /health, body: "ok\\n"}'


@pytest.fixture
def netd(tmp_path: Path) -> Iterator[NetdProcess]:
    process = NetdProcess.start(_map(_BASE), tmp_path / "netd")
    yield process
    process.stop()


def _get(netd: NetdProcess, path: str) -> httpx.Response:
    return httpx.get(netd.url("web", path=path), timeout=10)


def _post_route(netd: NetdProcess, **route: object) -> None:
    netd.admin("POST", "/api/services/web/routes", json.dumps(route).encode())


def test_run_time_routes_outlive_reloads(netd: NetdProcess) -> None:
    _post_route(netd, id="flaky", path="/flaky", responses=[{"status": 503}, {"body": "up\n"}])
    _post_route(netd, id="hello", path="/hello", json={"hi": 1})
    assert _get(netd, "/flaky").status_code == 503

    # An edit of another service: web is not rebuilt, its routes are as they were.
    assert netd.reload(_map(_BASE, other_body="two"))["restarted"] == ["other"]
    assert _get(netd, "/hello").json() == {"hi": 1}

    # An edit of web's own routes rebuilds it: the run-time routes come along,
    # the sequence where it was.
    edited = _BASE + '\n      - {path: /new, body: "new\\n"}'
    assert netd.reload(_map(edited, other_body="two"))["restarted"] == ["web"]
    assert _get(netd, "/new").text == "new\n"
    assert _get(netd, "/hello").json() == {"hi": 1}
    assert (_get(netd, "/flaky").status_code, _get(netd, "/flaky").text) == (200, "up\n")
    listed = {r["id"]: r for r in netd.view("web", "routes")}
    assert listed["hello"]["source"] == "api" and listed["flaky"]["matched"] == 3

    # SIGHUP re-reads the same map: nothing restarts, nothing is lost.
    netd.signal(signal.SIGHUP)
    assert netd.wait_for_count("netd", "reload", 3)[-1]["restarted"] == []
    assert _get(netd, "/hello").json() == {"hi": 1}

    # Removed at run time: gone, and a later rebuild does not bring it back.
    netd.admin("DELETE", "/api/services/web/routes/hello")
    assert netd.reload(_map(_BASE, other_body="two"))["restarted"] == ["web"]
    assert _get(netd, "/hello").status_code == 404
    assert _get(netd, "/flaky").text == "up\n"


def test_a_map_route_that_takes_a_run_time_id_wins(netd: NetdProcess) -> None:
    _post_route(netd, id="users", path="/users", body="from the api\n")
    taken = _BASE + '\n      - {id: users, path: /users, body: "from the map\\n"}'
    assert netd.reload(_map(taken))["restarted"] == ["web"]
    assert _get(netd, "/users").text == "from the map\n"
    assert [r["source"] for r in netd.view("web", "routes") if r["id"] == "users"] == ["map"]
    with pytest.raises(AdminError) as refused:
        netd.admin("DELETE", "/api/services/web/routes/users")
    assert refused.value.status == 403  # it is the map's now


def test_routes_added_after_an_undone_reload_outlive_the_next(netd: NetdProcess) -> None:
    """The undone reload's build never started: it publishes no routes of its own."""
    _post_route(netd, id="before", path="/before", body="before\n")
    edited = _BASE + '\n      - {path: /new, body: "new\\n"}'
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = f'"tcp:{holder.getsockname()[1]}:interface=127.0.0.1"'
        first, _, last = _map(edited).rpartition('"tcp:0:interface=127.0.0.1"')
        with pytest.raises(AdminError) as refused:
            netd.reload(first + busy + last)
    assert refused.value.status == 400
    _post_route(netd, id="after", path="/after", body="after\n")
    assert netd.reload(_map(edited, other_body="two"))["restarted"] == ["web", "other"]
    assert [_get(netd, path).text for path in ("/before", "/after", "/new")] == [
        "before\n",
        "after\n",
        "new\n",
    ]
