"""The proxy kind's relay and toxics over fake transports and a fake clock."""

from __future__ import annotations

import ipaddress
import random
import socket
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet import tcp
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger

from netd.config import parse_config
from netd.events import Journal, ServiceStats
from netd.kinds import BuildContext
from netd.schema import ConfigErrors
from netd.services.proxy.relay import (
    HIGH_WATER,
    READ_SIZE,
    ClientSide,
    Relay,
    UpstreamSide,
    send_now,
    tune,
)
from netd.services.proxy.state import Proxy
from netd.services.proxy.toxics import Toxic, ToxicError, ToxicState, read_toxic

PEER = IPv4Address("TCP", "192.0.2.7", 40000)


class _Pipe:
    """A proxy whose upstream connections are StringTransports, opened at once."""

    def __init__(self, tmp_path: Path, *toxics: Toxic) -> None:
        self.clock = Clock()
        self.journal = Journal(self.clock)
        self.stats = ServiceStats()
        context = BuildContext(
            reactor=self.clock,
            name="px",
            state_dir=tmp_path,
            journal=self.journal,
            stats=self.stats,
            log=Logger(),
            tls={},
        )
        self.proxy = Proxy(context, ("127.0.0.1", 1), None, toxics, connect=self._connect)
        self.upstreams: list[StringTransport] = []

    def _connect(self, side: UpstreamSide) -> Deferred[object]:
        transport = StringTransport()
        self.upstreams.append(transport)
        side.makeConnection(transport)
        return Deferred()

    def open(self) -> tuple[ClientSide, StringTransport, StringTransport]:
        client = ClientSide(self.proxy)
        transport = StringTransport(peerAddress=PEER)
        client.makeConnection(transport)
        return client, transport, self.upstreams[-1]

    def relay(self, client: ClientSide) -> Relay:
        assert client.relay is not None
        return client.relay


def test_bytes_pass_straight_through_without_toxics(tmp_path: Path) -> None:
    pipe = _Pipe(tmp_path)
    client, to_client, to_upstream = pipe.open()
    assert to_client.producerState == "producing"  # resumed once the upstream was there
    client.dataReceived(b"ping")
    assert to_upstream.value() == b"ping"
    pipe.relay(client).upstream.dataReceived(b"pong")  # type: ignore[union-attr]
    assert to_client.value() == b"pong"


def test_a_slow_reader_pauses_the_other_side_and_the_queue_stays_bounded(
    tmp_path: Path,
) -> None:
    pipe = _Pipe(tmp_path)
    client, to_client, to_upstream = pipe.open()
    relay = pipe.relay(client)
    # The upstream's transport buffer is full: it pauses its producer, the up direction.
    assert to_upstream.producer is relay.up
    relay.up.pauseProducing()
    assert to_client.producerState == "paused"
    # Bytes already read keep arriving for a while: queued, not written.
    for _ in range(3):
        client.dataReceived(b"q" * (HIGH_WATER // 2))
    assert to_upstream.value() == b""
    assert relay.up.queued == 3 * (HIGH_WATER // 2)
    relay.up.resumeProducing()
    assert len(to_upstream.value()) == 3 * (HIGH_WATER // 2)
    assert to_client.producerState == "producing"


def test_latency_holds_each_chunk_and_keeps_order(tmp_path: Path) -> None:
    pipe = _Pipe(tmp_path, Toxic("slow", "latency", "upstream", attributes={"latency": 100}))
    client, _, to_upstream = pipe.open()
    client.dataReceived(b"one ")
    pipe.clock.advance(0.05)
    client.dataReceived(b"two")
    pipe.clock.advance(0.0499)
    assert to_upstream.value() == b""
    pipe.clock.advance(0.0002)
    assert to_upstream.value() == b"one "
    pipe.clock.advance(0.05)
    assert to_upstream.value() == b"one two"
    fired = pipe.journal.select(types=["toxic.fired"])
    assert [e.fields["toxic"] for e in fired] == ["slow"]
    assert pipe.stats.counters["toxics_fired"] == 1


def test_bandwidth_paces_bytes_at_the_rate(tmp_path: Path) -> None:
    pipe = _Pipe(tmp_path, Toxic("bw", "bandwidth", "upstream", attributes={"rate": 10}))
    client, _, to_upstream = pipe.open()
    client.dataReceived(b"x" * 5000)  # 10 KB/s: half a second
    pipe.clock.advance(0.49)
    assert 4000 <= len(to_upstream.value()) < 5000
    pipe.clock.advance(0.02)
    assert len(to_upstream.value()) == 5000


def test_limit_data_passes_exactly_n_bytes_then_closes(tmp_path: Path) -> None:
    pipe = _Pipe(tmp_path, Toxic("cap", "limit_data", "upstream", attributes={"bytes": 10}))
    client, to_client, to_upstream = pipe.open()
    client.dataReceived(b"123456")
    client.dataReceived(b"789abcdef")
    client.dataReceived(b"more")
    assert to_upstream.value() == b"123456789a"
    assert to_client.disconnecting and to_upstream.disconnecting


def test_slow_close_delays_the_fin(tmp_path: Path) -> None:
    pipe = _Pipe(tmp_path, Toxic("sc", "slow_close", "upstream", attributes={"delay": 500}))
    client, _, to_upstream = pipe.open()
    client.dataReceived(b"last words")
    client.readConnectionLost()
    assert to_upstream.value() == b"last words"
    relay = pipe.relay(client)
    pipe.clock.advance(0.4)
    assert not relay.up.finished
    pipe.clock.advance(0.2)
    assert relay.up.finished
    # StringTransport cannot half-close (as TLS): the close waits for the other way's FIN.
    assert not to_upstream.disconnecting
    relay.upstream.readConnectionLost()  # type: ignore[union-attr]
    assert to_upstream.disconnecting and to_upstream.producer is None


def test_timeout_swallows_bytes_and_closes_after_the_quiet_period(tmp_path: Path) -> None:
    pipe = _Pipe(tmp_path, Toxic("t", "timeout", "downstream", attributes={"timeout": 1000}))
    client, to_client, _ = pipe.open()
    pipe.clock.advance(0.6)
    pipe.relay(client).upstream.dataReceived(b"swallowed")  # type: ignore[union-attr]
    pipe.clock.advance(0.6)  # the clock restarted with the chunk
    assert to_client.value() == b"" and not to_client.disconnecting
    pipe.clock.advance(0.5)
    assert to_client.disconnecting


def _closed_after(pipe: _Pipe, transport: StringTransport, seconds: float) -> bool:
    """Whether C{transport} stays open for C{seconds} less 10 ms, and is closed 10 ms later."""
    pipe.clock.advance(seconds - 0.01)
    still_open = not transport.disconnecting
    pipe.clock.advance(0.02)
    return still_open and transport.disconnecting


def test_a_timeout_added_to_an_idle_connection_closes_it_with_no_bytes(
    tmp_path: Path,
) -> None:
    pipe = _Pipe(tmp_path)
    _, to_client, _ = pipe.open()
    pipe.proxy.toxics.add(Toxic("t", "timeout", attributes={"timeout": 500}))
    assert _closed_after(pipe, to_client, 0.5)


def test_an_updated_timeout_starts_over_with_its_new_value(tmp_path: Path) -> None:
    pipe = _Pipe(tmp_path, Toxic("t", "timeout", attributes={"timeout": 1000}))
    _, to_client, _ = pipe.open()
    pipe.clock.advance(0.3)
    pipe.proxy.toxics.update(Toxic("t", "timeout", attributes={"timeout": 0}))
    pipe.clock.advance(5)
    assert not to_client.disconnecting  # 0: held for ever
    pipe.proxy.toxics.update(Toxic("t", "timeout", attributes={"timeout": 200}))
    assert _closed_after(pipe, to_client, 0.2)


def test_disabling_cuts_open_relays_and_refuses_new_ones(tmp_path: Path) -> None:
    pipe = _Pipe(tmp_path)
    _, to_client, _ = pipe.open()
    pipe.proxy.set_enabled(False)
    assert to_client.disconnecting
    newcomer = ClientSide(pipe.proxy)
    transport = StringTransport(peerAddress=PEER)
    newcomer.makeConnection(transport)
    assert transport.disconnecting and newcomer.relay is None
    assert len(pipe.upstreams) == 1


def test_toxics_added_later_act_on_open_connections(tmp_path: Path) -> None:
    pipe = _Pipe(tmp_path)
    client, _, to_upstream = pipe.open()
    pipe.proxy.toxics.add(Toxic("cap", "limit_data", "upstream", attributes={"bytes": 2}))
    client.dataReceived(b"abc")
    assert to_upstream.value() == b"ab"
    pipe.proxy.toxics.remove("cap")


def test_nth_times_client_and_toxicity_decide_per_connection() -> None:
    here, elsewhere = "10.1.2.3", "192.0.2.1"
    nth = ToxicState(Toxic("n", "latency", nth=2))
    assert [nth.decide(here) for _ in range(3)] == [False, True, False]
    times = ToxicState(Toxic("t", "latency", times=2))
    assert [times.decide(here) for _ in range(3)] == [True, True, False]
    cidr = ToxicState(Toxic("c", "latency", client=(ipaddress.ip_network("10.0.0.0/8"),)))
    assert cidr.decide(here) and not cidr.decide(elsewhere)
    assert not cidr.decide(None)  # a UNIX socket's client is in no network
    never = ToxicState(Toxic("z", "latency", toxicity=0.0))
    assert not any(never.decide(here) for _ in range(20))
    assert never.fired == 0 and never.seen == 20


def test_toxicity_draws_from_the_toxics_seed_as_a_rules_probability_does() -> None:
    first, again = (ToxicState(Toxic("p", "latency", toxicity=0.5, seed=7)) for _ in range(2))
    decisions = [first.decide("10.1.2.3") for _ in range(40)]
    assert decisions == [again.decide("10.1.2.3") for _ in range(40)]
    expected = random.Random(7)
    assert decisions == [expected.random() < 0.5 for _ in range(40)]
    assert 0 < first.fired < 40 and first.seen == 40


def test_an_update_keeps_a_toxics_counts(tmp_path: Path) -> None:
    pipe = _Pipe(tmp_path)
    state = pipe.proxy.toxics.add(Toxic("t", "latency", times=2))
    pipe.open()
    pipe.proxy.toxics.update(Toxic("t", "latency", times=1, attributes={"latency": 5}))
    assert state.fired == 1 and state.rule.spec.times == 1
    pipe.open()
    assert state.fired == 1  # times=1 is spent


def test_toxic_fired_has_the_fields_of_rule_fired(tmp_path: Path) -> None:
    pipe = _Pipe(tmp_path, Toxic("slow", "latency", "upstream", attributes={"latency": 10}))
    pipe.open()
    (event,) = pipe.journal.select(types=["toxic.fired"])
    assert {
        key: event.fields[key] for key in ("rule", "source", "fired", "client", "matched", "acts")
    } == {
        "rule": "slow",
        "source": "map",
        "fired": 1,
        "client": "192.0.2.7",
        "matched": {},
        "acts": ["latency"],
    }


def test_a_toxic_waits_for_its_scenario_state_and_moves_it(tmp_path: Path) -> None:
    pipe = _Pipe(
        tmp_path,
        Toxic("breaks", "latency", scenario="db", next_state="broken", times=1),
        Toxic(
            "while-broken",
            "limit_data",
            "upstream",
            attributes={"bytes": 1},
            scenario="db",
            state="x",
        ),
    )
    scenarios = pipe.proxy.scenarios
    pipe.open()
    assert scenarios.state("db") == "broken"
    (event,) = pipe.journal.select(types=["toxic.fired"])
    assert event.fields["scenario"] == "db" and event.fields["state"] == "broken"
    client, _, to_upstream = pipe.open()
    client.dataReceived(b"ab")
    assert to_upstream.value() == b"ab"  # "while-broken" waits for state x
    scenarios.set("db", "x")
    client, _, to_upstream = pipe.open()
    client.dataReceived(b"ab")
    assert to_upstream.value() == b"a"


def test_a_state_without_a_scenario_is_refused() -> None:
    with pytest.raises(ToxicError) as refused:
        read_toxic({"type": "latency", "state": "up"})
    assert refused.value.path == "scenario"
    with pytest.raises(ToxicError) as refused:
        read_toxic({"type": "latency", "scenario": "no spaces"})
    assert refused.value.path == "scenario"


def test_a_bad_seed_is_refused() -> None:
    with pytest.raises(ToxicError) as refused:
        read_toxic({"type": "latency", "seed": "x"})
    assert refused.value.path == "seed"


def test_toxic_json_takes_toxiproxys_defaults() -> None:
    toxic = read_toxic({"type": "latency", "attributes": {"latency": 5}})
    assert toxic.as_json() == {
        "name": "latency_downstream",
        "type": "latency",
        "stream": "downstream",
        "toxicity": 1.0,
        "attributes": {"latency": 5, "jitter": 0},
    }


def test_an_update_keeps_the_toxics_name_and_stream_whatever_the_body_says(
    tmp_path: Path,
) -> None:
    pipe = _Pipe(
        tmp_path,
        Toxic("A", "latency", attributes={"latency": 10}),
        Toxic("B", "bandwidth", attributes={"rate": 10}),
    )
    toxics = pipe.proxy.toxics
    for body in (
        {"name": "B", "attributes": {"latency": 50}},
        {"name": "C", "stream": "upstream", "attributes": {"latency": 50}},
    ):
        a = toxics.get("A")
        assert a is not None
        toxics.update(read_toxic(body, base=a.toxic))
    assert [(s.toxic.name, s.toxic.type, s.toxic.stream) for s in toxics] == [
        ("A", "latency", "downstream"),
        ("B", "bandwidth", "downstream"),
    ]
    b = toxics.get("B")
    assert b is not None and b.toxic.attributes == {"rate": 10}


def test_null_attributes_are_none_given() -> None:
    # What Toxiproxy's Go client sends: AddToxic(name, type, "", 1, nil).
    toxic = read_toxic({"type": "latency", "attributes": None})
    assert toxic.attributes == {"latency": 0, "jitter": 0}
    updated = read_toxic({"toxicity": 0.5, "attributes": None}, base=toxic)
    assert updated.toxicity == 0.5 and updated.attributes == toxic.attributes


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        ({"type": "lag"}, "type"),
        ({"type": "latency", "stream": "sideways"}, "stream"),
        ({"type": "latency", "attributes": {"latncy": 5}}, "attributes.latncy"),
        ({"type": "latency", "attributes": {"latency": "5"}}, "attributes.latency"),
        ({"type": "latency", "attributes": {"latency": -1}}, "attributes.latency"),
        ({"type": "latency", "toxicity": 2}, "toxicity"),
        ({"type": "latency", "client": "not-a-net"}, "client[0]"),
        ({"type": "latency", "nth": -1}, "nth"),
        ({"type": "latency", "colour": "red"}, "colour"),
    ],
)
def test_bad_toxics_are_refused_at_their_key(raw: dict[str, object], path: str) -> None:
    with pytest.raises(ToxicError) as refused:
        read_toxic(raw)
    assert refused.value.path == path


def test_map_errors_name_the_toxic_and_the_key(tmp_path: Path) -> None:
    text = textwrap.dedent(
        """
        services:
          px:
            type: proxy
            listen: ["tcp:0"]
            upstream: 127.0.0.1:6379
            toxics:
              - {type: latency, attributes: {latency: 10}}
              - {type: bandwidth, attributes: {rate: fast}}
        """
    )
    with pytest.raises(ConfigErrors) as refused:
        parse_config(text, tmp_path / "netd.yaml")
    [error] = refused.value.errors
    assert error.path == "services.px.toxics[1].attributes.rate"
    assert error.position.line == 9


def test_an_upstream_needs_its_port(tmp_path: Path) -> None:
    text = "services: {px: {type: proxy, listen: ['tcp:0'], upstream: db.lab.test}}"
    with pytest.raises(ConfigErrors) as refused:
        parse_config(text, tmp_path / "netd.yaml")
    assert "HOST:PORT" in str(refused.value)


def test_slicer_cuts_chunks_into_spaced_small_writes(tmp_path: Path) -> None:
    toxic = Toxic(
        "cut",
        "slicer",
        "upstream",
        attributes={"average_size": 10, "size_variation": 0, "delay": 1000},
    )
    pipe = _Pipe(tmp_path, toxic)
    client, _, to_upstream = pipe.open()
    writes: list[bytes] = []
    to_upstream.write = writes.append  # type: ignore[method-assign]
    client.dataReceived(bytes(range(80)))
    pipe.clock.advance(1.0)
    assert b"".join(writes) == bytes(range(80))
    assert len(writes) == 8 and all(len(w) == 10 for w in writes)


def test_a_udp_listener_needs_a_numeric_upstream(tmp_path: Path) -> None:
    from netd.services import load_kind

    text = "services: {px: {type: proxy, listen: ['udp:0'], upstream: 'db.lab.test:53'}}"
    service = parse_config(text, tmp_path / "netd.yaml").services["px"]
    context = _Pipe(tmp_path).proxy.context
    with pytest.raises(ValueError, match="IP address"):
        load_kind("proxy").build(service, context)


def test_a_client_that_half_closes_then_goes_closes_the_upstream(tmp_path: Path) -> None:
    pipe = _Pipe(tmp_path)
    client, _, to_upstream = pipe.open()
    client.dataReceived(b"request")
    client.readConnectionLost()
    client.connectionLost()
    assert to_upstream.value() == b"request" and to_upstream.disconnecting


@pytest.fixture
def tcp_pair() -> Iterator[tuple[tcp.Connection, socket.socket]]:
    """A Twisted TCP connection (on a fake reactor) and the loopback socket at its other end."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        near = socket.create_connection(listener.getsockname())
        far, _ = listener.accept()
    connection = tcp.Connection(near, Protocol(), reactor=MemoryReactorClock())
    connection.connected = True
    try:
        yield connection, far
    finally:
        near.close()
        far.close()


def test_tune_reads_larger_chunks_without_nagle(
    tcp_pair: tuple[tcp.Connection, socket.socket],
) -> None:
    connection, _ = tcp_pair
    tune(connection)
    assert connection.bufferSize == READ_SIZE > 65536
    assert connection.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_send_now_leaves_at_once_unless_bytes_are_queued_ahead(
    tcp_pair: tuple[tcp.Connection, socket.socket],
) -> None:
    connection, far = tcp_pair
    far.settimeout(5)
    send_now(connection, b"first")
    # On the wire with no reactor turn: Twisted's write alone would only have buffered it.
    assert far.recv(100) == b"first"
    connection.write(b"queued ")  # buffered, for the reactor's next turn
    send_now(connection, b"second")
    far.setblocking(False)
    with pytest.raises(BlockingIOError):
        far.recv(100)  # "second" waits behind "queued ", not ahead of it
    connection.doWrite()
    far.setblocking(True)
    assert far.recv(100) == b"queued second"
