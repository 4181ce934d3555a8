"""
HTTP/2 connections and keepalive_timeout.  One timed out while its client reads
nothing: over TLS its transport stays until it can flush (abortTimeout), and
an answer due meanwhile must go nowhere, not into h2's closed state machine.
One whose answer is slower than keepalive_timeout keeps it, and times out once
idle after it; one its client goes away from is closed once answered.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import h2.errors
import h2.events
import pytest
from hyperframe.frame import GoAwayFrame

from netd.testing import NetdProcess
from tests.integration.test_http_review import H2Client
from tests.maps import lab_map
from tests.signals import client_address, wait_until

BIG = 96 << 20


@pytest.fixture(scope="module")
def netd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetdProcess]:
    base = tmp_path_factory.mktemp("h2-timeout")
    www = base / "www"
    www.mkdir()
    with (www / "big.bin").open("wb") as big:
        big.truncate(BIG)  # sparse: costs nothing on disk
    config = lab_map(
        f"""
  web:
    type: http
    listen: [{{endpoint: "ssl:0:interface=127.0.0.1", tls: lab}}]
    root: {www}
    routes:
      - {{path: /late, body: "late\\n", delay: 2}}
    limits: {{keepalive_timeout: 0.5}}
"""
    )
    with NetdProcess.start(config, base / "netd") as process:
        yield process


def sent(netd: NetdProcess) -> int:
    counters: dict[str, int] = netd.services()["web"]["counters"]
    return counters["bytes_out"]


def test_h2_an_answer_due_after_a_timeout_to_a_client_not_reading_is_dropped(
    netd: NetdProcess,
) -> None:
    client = H2Client(netd, window=2**31 - 1, rcvbuf=4096)
    client.request(1, "GET", "/big.bin")
    # Nothing read: netd writes until the kernel takes no more and its own
    # transport holds the rest, which is what keeps the connection after its
    # GOAWAY.

    def stalled() -> bool:
        now = sent(netd)
        time.sleep(0.2)  # how long its count stands still
        return now > 1 << 20 and sent(netd) == now

    wait_until(stalled, "netd's writes held back by the client")
    client.conn.reset_stream(1, h2.errors.ErrorCodes.CANCEL)
    # A body that never comes: the connection is timed out (0.5 s) before the
    # route's answer is due (2 s).
    client.request(3, "POST", "/late", end=False, **{"content-length": "10"})
    # Another connection's answer with the same delay, asked after: once it
    # is in, the first answer was due too.
    probe = H2Client(netd)
    assert probe.get(1, "/late") == (200, b"late\n")
    probe.close()
    address = client_address(client.sock)
    closed = netd.events("web", "connection.closed")
    assert [event for event in closed if event.get("client") == address] == []  # still there
    client.close()
    assert "Unhandled" not in netd.output and "Traceback" not in netd.output


def test_h2_after_an_answer_slower_than_keepalive_the_connection_times_out_on_keepalive(
    netd: NetdProcess,
) -> None:
    client = H2Client(netd)
    assert client.get(1, "/late") == (200, b"late\n")  # 2 s, past keepalive_timeout
    # Idle from then on: netd's GOAWAY after keepalive_timeout (0.5 s), not
    # the core's idle sweep minutes later.
    (goaway,) = [
        e for e in client.events(timeout=3) if isinstance(e, h2.events.ConnectionTerminated)
    ]
    assert goaway.error_code == h2.errors.ErrorCodes.NO_ERROR
    # Then TLS's close_notify and the end, not abortTimeout's cut 15 s later.
    client.sock.settimeout(3)
    while client.sock.recv(65536):
        pass
    client.close()


def test_h2_a_client_going_away_gets_its_answer_then_a_clean_close(netd: NetdProcess) -> None:
    client = H2Client(netd)
    client.request(1, "GET", "/late")
    # Around the client's h2, which would read no answer after its GOAWAY.
    client.sock.sendall(GoAwayFrame(0, last_stream_id=0).serialize())
    events: list[h2.events.Event] = []
    while data := client.sock.recv(65536):  # to netd's close_notify, not abortTimeout's cut
        events += client.conn.receive_data(data)
    body = b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived))
    assert [e.stream_id for e in events if isinstance(e, h2.events.StreamEnded)] == [1]
    assert body == b"late\n"
    (goaway,) = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert (goaway.error_code, goaway.last_stream_id) == (h2.errors.ErrorCodes.NO_ERROR, 1)
    client.close()
