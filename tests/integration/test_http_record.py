"""
Record and replay: a proxy route records what a real upstream (a second netd)
answers; with that upstream stopped, a netd replaying the recording gives the
same statuses and byte-identical bodies; a reload in the middle of recording
writes each request once.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml

from netd.testing import NetdProcess
from tests.conftest import StartNetd

ITEMS = [f"/api/items?n={n}" for n in range(5)]


def origin(start_netd: StartNetd, routes: str) -> NetdProcess:
    """The upstream: a second netd whose service origin answers C{routes} (YAML items)."""
    return start_netd(
        """
services:
  origin:
    type: http
    listen: ["tcp:0:interface=127.0.0.1"]
    routes:
"""
        + routes
    )


def recording_map(upstream: NetdProcess, recording: Path, secrets: bool = False) -> str:
    """A map relaying /api/ to the upstream's origin service, recording to C{recording}."""
    proxy = upstream.url("origin", path="/")
    flag = "true" if secrets else "false"
    return f"""
services:
  web:
    type: http
    listen: ["tcp:0:interface=127.0.0.1"]
    record: 10
    routes:
      - {{path: /api/, proxy: "{proxy}", record_to: {recording}, record_secrets: {flag}}}
"""


def recording_proxy(start_netd: StartNetd, upstream: NetdProcess, recording: Path) -> NetdProcess:
    return start_netd(recording_map(upstream, recording))


def replaying(start_netd: StartNetd, recording: Path) -> NetdProcess:
    """A netd answering from C{recording} alone."""
    return start_netd(
        f"""
services:
  web:
    type: http
    listen: ["tcp:0:interface=127.0.0.1"]
    routes_from: [{recording}]
"""
    )


def test_recorded_answers_replay_byte_for_byte(start_netd: StartNetd, tmp_path: Path) -> None:
    binary = os.urandom(3000) + b"\xff\xfe"  # not UTF-8
    big = ("line of text\n" * 10_000).encode()  # over the inline size
    (tmp_path / "binary.bin").write_bytes(binary)
    (tmp_path / "big.txt").write_bytes(big)
    upstream = origin(
        start_netd,
        f"""
      - path: /users
        method: GET
        match: {{query: {{page: "2"}}}}
        json: {{users: [ann, "b\\u00e9a"], page: 2}}
      - {{path: /users, method: GET, json: {{users: [], page: 1}}}}
      - path: /orders
        method: POST
        template: true
        status: 201
        headers:
          Set-Cookie: "session=secret-value; HttpOnly"
          X-Order: "{{{{request.json.sku}}}}"
        json: {{sku: "{{{{request.json.sku}}}}"}}
      - {{path: /binary, body_file: {tmp_path / "binary.bin"}}}
      - {{path: /big, body_file: {tmp_path / "big.txt"}}}
      - {{path: /teapot, status: 418, body: "short and stout\\r\\n"}}
""",
    )
    recording = tmp_path / "recorded.yaml"
    recorder = recording_proxy(start_netd, upstream, recording)
    asked = [
        ("GET", "/api/users?page=2", None),
        ("GET", "/api/users", None),
        ("POST", "/api/orders", b'{"sku": "A-1"}'),
        ("POST", "/api/orders", b'{"sku": "B-2"}'),
        ("GET", "/api/binary", None),
        ("GET", "/api/big", None),
        ("GET", "/api/teapot", None),
        ("GET", "/api/users?page=2", None),  # again: recorded once
    ]

    def answers(base: str) -> list[tuple[int, bytes, httpx.Headers]]:
        with httpx.Client(base_url=base, timeout=10) as client:
            return [
                (r.status_code, r.content, r.headers)
                for r in (client.request(m, path, content=body) for m, path, body in asked)
            ]

    live = answers(recorder.url("web"))
    assert [status for status, _, _ in live] == [200, 200, 201, 201, 200, 200, 418, 200]
    assert live[4][1] == binary and live[5][1] == big
    upstream.stop()
    recorder.stop()

    routes = yaml.safe_load(recording.read_text())
    assert len(routes) == 7
    assert routes[0]["match"] == {"query_equals": {"page": "2"}}
    assert routes[2]["match"] == {"query_equals": {}, "body": {"equals": '{"sku": "A-1"}'}}
    assert routes[2]["headers"]["Set-Cookie"] == "(masked by netd)"
    assert "secret-value" not in recording.read_text()
    assert routes[4]["body_file"] == "recorded.yaml.bodies/5.bin"

    replay = replaying(start_netd, recording)
    replayed = answers(replay.url("web"))
    for (status, body, headers), (again, body_again, headers_again) in zip(
        live, replayed, strict=True
    ):
        assert (again, body_again) == (status, body)
        assert headers_again.get("content-type") == headers.get("content-type")
    assert replayed[3][2]["x-order"] == "B-2"
    assert replayed[2][2]["set-cookie"] == "(masked by netd)"
    with httpx.Client(base_url=replay.url("web"), timeout=10) as client:
        missed = client.post("/api/orders", content=b'{"sku": "C-3"}')
    assert missed.status_code == 404 and "closest route" in missed.text


def test_exchanges_waiting_for_the_read_back_are_written_at_a_stop(
    start_netd: StartNetd, tmp_path: Path
) -> None:
    upstream = origin(start_netd, "      - {path: /items, json: {ok: true}}\n")
    recording = tmp_path / "recorded.yaml"
    # Seconds of YAML to read back: the exchange below ends, and netd stops, meanwhile.
    recorded = {"path": "/items", "method": "GET", "status": 200, "body": "old"}
    recording.write_text(
        "".join(
            yaml.safe_dump([{**recorded, "match": {"query_equals": {"n": str(n)}}}])
            for n in range(8_000)
        )
    )
    recorder = recording_proxy(start_netd, upstream, recording)
    answer = httpx.get(recorder.url("web", path="/api/items?new=1"), timeout=10)
    assert answer.status_code == 200
    assert recorder.stop(timeout=60) == 0

    routes = yaml.load(recording.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert len(routes) == 8_001
    assert routes[-1]["match"] == {"query_equals": {"new": "1"}}


def test_a_reload_records_each_exchange_once(start_netd: StartNetd, tmp_path: Path) -> None:
    upstream = origin(
        start_netd,
        """
      - path: /upload
        method: POST
        match: {body: {contains: "end"}}
        headers: {Set-Cookie: "session=secret-value"}
        body: "uploaded\\n"
      - {path: /items, template: true, body: "item {{request.query.n}}\\n"}
""",
    )
    recording = tmp_path / "recorded.yaml"
    recorder = start_netd(recording_map(upstream, recording))

    # An upload the old service relays until after the reload: its body ends
    # only when the test releases it, and the upstream answers the whole body.
    release = threading.Event()
    uploaded: list[httpx.Response] = []

    def body() -> Iterator[bytes]:
        yield b"start-"
        release.wait(30)
        yield b"end"

    def upload() -> None:
        url = recorder.url("web", path="/api/upload")
        uploaded.append(httpx.post(url, content=body(), timeout=30))

    uploader = threading.Thread(target=upload)
    uploader.start()
    upstream.wait_for("origin", "connection.opened")  # the old service relays it

    reloaded = threading.Event()
    during: list[httpx.Response] = []

    def ask_items() -> None:
        # One new connection a request, so each meets whichever service accepts then.
        rounds_after = 0
        while rounds_after < 2:
            rounds_after += reloaded.is_set()
            during.extend(httpx.get(recorder.url("web", path=item), timeout=10) for item in ITEMS)

    asker = threading.Thread(target=ask_items)
    asker.start()
    try:
        assert recorder.reload(recording_map(upstream, recording, secrets=True))["restarted"] == [
            "web"
        ]
    finally:
        reloaded.set()
        release.set()
        asker.join(30)
        uploader.join(30)
    assert [r.status_code for r in uploaded] == [200]
    assert during and {r.status_code for r in during} == {200}

    # The same requests on the new service, now that the old one has recorded the upload.
    with httpx.Client(base_url=recorder.url("web"), timeout=10) as client:
        assert client.post("/api/upload", content=b"start-end").text == "uploaded\n"
        assert [client.get(item).status_code for item in ITEMS] == [200] * len(ITEMS)
    assert recorder.stop(timeout=60) == 0

    routes: list[dict[str, Any]] = yaml.safe_load(recording.read_text())
    requests = [json.dumps([r["method"], r["path"], r["match"]], sort_keys=True) for r in routes]
    assert len(requests) == len(set(requests)), requests
    assert sorted(r["path"] for r in routes) == ["/api/items"] * len(ITEMS) + ["/api/upload"]
    # Relayed by the old service, whose route masked Set-Cookie.
    assert [r["headers"]["Set-Cookie"] for r in routes if r["path"] == "/api/upload"] == [
        "(masked by netd)"
    ]

    replay = replaying(start_netd, recording)
    with httpx.Client(base_url=replay.url("web"), timeout=10) as client:
        assert client.post("/api/upload", content=b"start-end").text == "uploaded\n"
        for n, item in enumerate(ITEMS):
            assert client.get(item).text == f"item {n}\n"
