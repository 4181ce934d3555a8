"""netd.testing as another project's test suite uses it: a handle on a real daemon."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import textwrap
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import yaml

from netd import testing
from netd.testing import AdminError, NetdProcess, StartFailed, start_asyncio, start_deferred
from tests.signals import wait_until

WEB: dict[str, Any] = {
    "tls": {"lab": {"self_signed": ["localhost", "127.0.0.1"]}},
    "services": {
        "web": {
            "type": "http",
            "listen": [
                "tcp:0:interface=127.0.0.1",
                {"endpoint": "ssl:0:interface=127.0.0.1", "tls": "lab"},
            ],
            "routes": [{"path": "/hello", "body": "hi\n"}],
            "record": 10,
        }
    },
}


def fetch(url: str, **kwargs: Any) -> bytes:
    with urllib.request.urlopen(url, timeout=10, **kwargs) as answer:
        body: bytes = answer.read()
    return body


def test_started_from_a_mapping_with_nothing_to_clean_up() -> None:
    with NetdProcess.start(WEB) as netd:
        workdir = netd.workdir
        assert netd.url("web", tls=False, path="/hello").startswith("http://127.0.0.1:")
        assert fetch(netd.url("web", tls=False, path="/hello")) == b"hi\n"
        context = ssl.create_default_context(cafile=str(netd.ca_file("lab")))
        assert fetch(netd.url("web", tls=True, path="/hello"), context=context) == b"hi\n"
        assert netd.url("web", tls=True).startswith("https://127.0.0.1:")
        assert [r["path"] for r in netd.requests("web")] == ["/hello", "/hello"]
        netd.reset("web")
        assert netd.requests("web") == []
    # The temporary working directory went with the daemon.
    assert not workdir.exists()


def test_wait_for_an_event_that_comes_later() -> None:
    with NetdProcess.start(WEB) as netd:
        url = netd.url("web", tls=False, path="/later")

        def request_later() -> None:
            with pytest.raises(urllib.error.HTTPError):
                fetch(url)

        timer = threading.Timer(0.2, request_later)
        timer.start()
        try:
            event = netd.wait_for("web", "http.request", timeout=10, path="/later")
        finally:
            timer.join()
        assert event["status"] == 404
        with pytest.raises(TimeoutError):
            netd.wait_for("web", "http.request", timeout=0.3, path="/never")


def test_reload_applies_a_new_map_and_keeps_the_admin_port(tmp_path: Path) -> None:
    with NetdProcess.start(WEB, tmp_path) as netd:
        admin_port = netd.ports["admin"]["listeners"][0]["port"]
        grown = {**WEB, "services": {**WEB["services"], "echo": {"type": "echo"}}}
        grown["services"]["echo"]["listen"] = ["tcp:0:interface=127.0.0.1"]
        answer = netd.reload(grown)
        assert answer["started"] == ["echo"]
        assert netd.address("echo")[1] > 0
        assert netd.ports["admin"]["listeners"][0]["port"] == admin_port
        with pytest.raises(AdminError) as refused:
            netd.reload("services: {web: {type: nosuch}}\n")
        assert refused.value.status == 400 and "nosuch" in refused.value.body
        assert fetch(netd.url("web", tls=False, path="/hello")) == b"hi\n"


def test_a_bad_map_fails_with_netds_own_words(tmp_path: Path) -> None:
    with pytest.raises(StartFailed) as failed:
        NetdProcess.start("services:\n  web: {type: http, listen: [nonsense]}\n", tmp_path)
    assert "netd.yaml:2:" in failed.value.output
    assert failed.value.returncode == 1


def test_a_map_given_as_a_file_is_never_rewritten(tmp_path: Path) -> None:
    config = tmp_path / "mine.yaml"
    config.write_text("services:\n  echo: {type: echo, listen: ['tcp:0:interface=127.0.0.1']}\n")
    with NetdProcess.start(config, tmp_path / "run") as netd:
        with pytest.raises(LookupError):
            netd.reload("services: {}\n")
        assert "admin" not in netd.ports  # the caller's map named none
    assert "admin" not in config.read_text()


def test_asyncio_variant() -> None:
    async def scenario() -> list[Any]:
        async with await start_asyncio(WEB) as netd:
            url = netd.url("web", tls=False, path="/hello")
            await asyncio.to_thread(fetch, url)
            requests: list[Any] = await netd.requests("web")
            return requests

    assert [r["path"] for r in asyncio.run(scenario())] == ["/hello"]


@pytest_twisted.ensureDeferred
async def test_deferred_variant() -> None:
    import treq

    netd = await start_deferred(WEB)
    try:
        answer = await treq.get(netd.url("web", tls=False, path="/hello"))
        assert await answer.content() == b"hi\n"
        event = await netd.wait_for("web", "http.request", timeout=10)
        assert event["path"] == "/hello"
    finally:
        assert await netd.stop() == 0


def test_json_and_indented_maps_get_their_admin_listener(tmp_path: Path) -> None:
    """Text a YAML block key cannot follow (JSON, an indented map) is written out again."""
    indented = textwrap.indent(yaml.safe_dump(WEB), "    ")
    for number, text in enumerate([json.dumps(WEB), indented]):
        with NetdProcess.start(text, tmp_path / str(number)) as netd:
            assert netd.services()["web"]["state"] == "running"


def test_a_map_that_is_not_yaml_fails_with_netds_message(tmp_path: Path) -> None:
    with pytest.raises(StartFailed) as failed:
        NetdProcess.start("services: [unclosed\n", tmp_path)
    assert "netd.yaml:" in failed.value.output


def test_reload_that_rebuilds_the_admin_api_follows_it(tmp_path: Path) -> None:
    plain = {"services": {"echo": {"type": "echo", "listen": ["tcp:0:interface=127.0.0.1"]}}}
    with NetdProcess.start(plain, tmp_path) as netd:
        before = netd.ports["admin"]["listeners"][0]["port"]
        # A changed TLS profile rebuilds the admin server, which takes over the
        # old one's socket: port 0 stays the port it was.
        netd.reload({**plain, "tls": {"lab": {"self_signed": ["localhost"]}}})
        assert netd.services()["echo"]["state"] == "running"
        assert netd.ports["admin"]["listeners"][0]["port"] == before


def test_an_asyncio_start_given_up_on_leaves_no_daemon(tmp_path: Path) -> None:
    async def give_up() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(start_asyncio(WEB, workdir=tmp_path), 0.05)

    asyncio.run(give_up())  # returns once the starting thread is done
    wait_until(lambda: not netd_children(), "the given-up daemon's exit")


def test_a_start_that_fails_once_the_daemon_runs_leaves_no_daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreadable(path: Path) -> None:
        raise ValueError("this process cannot read the map back")

    monkeypatch.setattr(testing, "load_config", unreadable)
    with pytest.raises(ValueError, match="read the map back"):
        NetdProcess.start(WEB, workdir=tmp_path)
    assert netd_children() == []  # killed and reaped before the error reached the caller


def netd_children() -> list[int]:
    """Running (not zombie) twistd netd processes started by this test process."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        state, parent = stat.rsplit(")", 1)[1].split()[:2]
        if int(parent) == os.getpid() and state != "Z" and b"netd" in command:
            found.append(int(entry.name))
    return found


def test_the_plugin_factory_takes_a_workdir(netd: Any, tmp_path: Path) -> None:
    daemon = netd(WEB, workdir=tmp_path / "mine")
    assert daemon.workdir == tmp_path / "mine"
