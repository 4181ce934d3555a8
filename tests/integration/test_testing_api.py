"""netd.testing as another project's test suite uses it: a handle on a real daemon."""

from __future__ import annotations

import asyncio
import ssl
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from netd.testing import AdminError, NetdProcess, StartFailed, start_asyncio, start_deferred

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
