"""An open WebSocket tunnel at shutdown: closed at once, not after the whole grace."""

from __future__ import annotations

import time

from websockets.sync.client import connect

from tests.conftest import StartNetd
from tests.fakes.upstreams import WebSocketUpstream


def test_shutdown_with_an_open_tunnel_does_not_wait_the_whole_grace(
    start_netd: StartNetd,
) -> None:
    upstream = WebSocketUpstream()
    try:
        netd = start_netd(
            f"""
shutdown_grace: 8
services:
  web:
    type: http
    listen: ["tcp:0:interface=127.0.0.1"]
    routes:
      - {{path: /ws/, proxy: "http://127.0.0.1:{upstream.port}/"}}
"""
        )
        host, port = netd.address("web")
        with connect(f"ws://{host}:{port}/ws/", open_timeout=10) as ws:
            ws.send("x")
            assert ws.recv(timeout=10) == "x"
            started = time.monotonic()
            netd.stop()
            took = time.monotonic() - started
        assert took < 4, f"stop took {took:.1f}s: close_gracefully is a no-op on a tunnel"
    finally:
        upstream.stop()
