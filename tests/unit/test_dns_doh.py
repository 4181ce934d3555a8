"""
DNS over HTTPS without sockets: the lean HTTP/1.1 reader on a string transport
(pipelining, bodies, bad heads) and HTTP/2 through hyper-h2's own client.
"""

from __future__ import annotations

import base64
import struct
from pathlib import Path

import dns.message
import h2.config
import h2.connection
import h2.events
import h2.settings
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from netd.services.dns.doh import DoHFactory
from tests.unit.test_dns import big_server, server

WWW = dns.message.make_query("www.netd.test", "A", id=0).to_wire()
GET = b"GET /dns-query?dns=%s HTTP/1.1\r\nhost: x\r\n\r\n" % base64.urlsafe_b64encode(WWW).rstrip(
    b"="
)


class H2Transport(StringTransport):
    negotiatedProtocol = b"h2"


def connect(
    tmp_path: Path, transport: StringTransport | None = None, big: bool = False
) -> tuple[Protocol, StringTransport, Clock]:
    clock = Clock()
    dns_server = big_server(tmp_path) if big else server(tmp_path, clock=clock)
    factory = DoHFactory(dns_server, timeout=30)
    protocol = factory.buildProtocol(None)
    transport = transport or StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5000))
    protocol.makeConnection(transport)
    return protocol, transport, clock


def responses(raw: bytes) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """The HTTP/1.1 responses in C{raw}, each status, headers and body."""
    found = []
    while raw:
        head, _, raw = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        fields = dict(line.split(b": ", 1) for line in lines[1:])
        length = int(fields[b"content-length"])
        found.append((int(lines[0].split(b" ")[1]), fields, raw[:length]))
        raw = raw[length:]
    return found


def test_pipelined_gets_are_answered_in_order_with_max_age(tmp_path: Path) -> None:
    protocol, transport, _ = connect(tmp_path)
    other = dns.message.make_query("nobody.netd.test", "A", id=0).to_wire()
    post = (
        b"POST /dns-query HTTP/1.1\r\ncontent-type: application/dns-message\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(other), other)
    )
    # Split mid-head and mid-body: the reader waits for the rest.
    data = GET + post + GET
    for start in range(0, len(data), 7):
        protocol.dataReceived(data[start : start + 7])
    answers = responses(transport.value())
    assert [status for status, _, _ in answers] == [200, 200, 200]
    first = dns.message.from_wire(answers[0][2])
    assert first.answer and answers[0][1][b"cache-control"] == b"max-age=60"
    assert dns.message.from_wire(answers[1][2]).rcode() == dns.rcode.NXDOMAIN
    assert answers[2][2] == answers[0][2]
    assert not transport.disconnecting


def test_a_body_too_large_is_read_and_dropped_then_413_and_serving_on(tmp_path: Path) -> None:
    protocol, transport, _ = connect(tmp_path)
    big = (
        b"POST /dns-query HTTP/1.1\r\ncontent-type: application/dns-message\r\n"
        b"content-length: 70000\r\n\r\n" + b"\x00" * 70000
    )
    protocol.dataReceived(big + GET)
    answers = responses(transport.value())
    assert [status for status, _, _ in answers] == [413, 200]
    assert not transport.disconnecting


def test_bad_requests_get_their_status(tmp_path: Path) -> None:
    cases = [
        (b"PUT /dns-query HTTP/1.1\r\n\r\n", 405, False),
        (b"GET /other HTTP/1.1\r\n\r\n", 404, False),
        (b"GET /dns-query?dns=%%%25 HTTP/1.1\r\n\r\n", 400, False),
        (b"GET /dns-query?dns=AAAA&dns=AAAA HTTP/1.1\r\n\r\n", 400, False),
        (b"POST /dns-query HTTP/1.1\r\ncontent-type: text/plain\r\n\r\n", 415, False),
        (b"POST /dns-query HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n", 411, True),
        (b"GARBAGE\r\n\r\n", 400, True),
        (b"GET /dns-query HTTP/1.1\r\nno colon\r\n\r\n", 400, True),
        (b"GET /dns-query HTTP/1.1\r\ncontent-length: -1\r\n\r\n", 400, True),
        (b"GET /dns-query HTTP/1.1\r\nx: " + b"a" * 20000, 431, True),
    ]
    for request, status, closes in cases:
        protocol, transport, _ = connect(tmp_path)
        protocol.dataReceived(request)
        assert responses(transport.value())[0][0] == status, request
        assert transport.disconnecting is closes, request


def test_http_1_0_and_connection_close_close_after_the_answer(tmp_path: Path) -> None:
    for request in (GET.replace(b"HTTP/1.1", b"HTTP/1.0"), GET[:-2] + b"connection: close\r\n\r\n"):
        protocol, transport, _ = connect(tmp_path)
        protocol.dataReceived(request + GET)
        answers = responses(transport.value())
        assert len(answers) == 1 and answers[0][1][b"connection"] == b"close"
        assert transport.disconnecting


def test_an_idle_connection_is_closed_after_the_timeout(tmp_path: Path) -> None:
    protocol, transport, clock = connect(tmp_path)
    protocol.dataReceived(GET[:10])
    clock.advance(29)
    assert not transport.disconnecting and not transport.disconnected
    clock.advance(2)
    assert transport.disconnecting or transport.disconnected


def test_http2_streams_are_answered_and_bad_ones_refused(tmp_path: Path) -> None:
    protocol, transport, _ = connect(tmp_path, H2Transport())
    client = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding=None))
    client.initiate_connection()
    path = b"/dns-query?dns=" + base64.urlsafe_b64encode(WWW).rstrip(b"=")
    for stream_id, target in ((1, path), (3, b"/dns-query?dns=%%%25"), (5, path)):
        client.send_headers(
            stream_id,
            [
                (b":method", b"GET"),
                (b":scheme", b"https"),
                (b":authority", b"x"),
                (b":path", target),
            ],
            end_stream=True,
        )
    protocol.dataReceived(client.data_to_send())
    statuses: dict[int, bytes] = {}
    bodies: dict[int, bytes] = {}
    for event in client.receive_data(transport.value()):
        if isinstance(event, h2.events.ResponseReceived):
            statuses[event.stream_id] = dict(event.headers)[b":status"]
        elif isinstance(event, h2.events.DataReceived):
            bodies[event.stream_id] = bodies.get(event.stream_id, b"") + event.data
    assert statuses == {1: b"200", 3: b"400", 5: b"200"}
    assert dns.message.from_wire(bodies[5]).answer
    # Garbage instead of frames ends the connection, with a GOAWAY.
    transport.clear()
    protocol.dataReceived(b"\x00" * 64)
    assert transport.disconnecting
    assert any(
        isinstance(event, h2.events.ConnectionTerminated)
        for event in client.receive_data(transport.value())
    )


def h2_exchange(
    protocol: Protocol, transport: StringTransport, client: h2.connection.H2Connection
) -> list[h2.events.Event]:
    """Pump both ways until neither side has anything to send; the client's events."""
    happened: list[h2.events.Event] = []
    for _ in range(100):
        outgoing = client.data_to_send()
        if outgoing:
            protocol.dataReceived(outgoing)
        incoming = transport.value()
        transport.clear()
        if incoming:
            happened.extend(client.receive_data(incoming))
        if not outgoing and not incoming:
            return happened
    raise AssertionError("the exchange did not settle")


def test_http2_posts_beyond_the_window_and_over_the_limit(tmp_path: Path) -> None:
    protocol, transport, _ = connect(tmp_path, H2Transport())
    client = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding=None))
    client.initiate_connection()
    h2_exchange(protocol, transport, client)
    request = [
        (b":method", b"POST"),
        (b":scheme", b"https"),
        (b":authority", b"x"),
        (b":path", b"/dns-query"),
        (b"content-type", b"application/dns-message"),
    ]
    # 70,000 bytes take more than the first 65,535-byte window: netd must give it back.
    bodies = {1: WWW, 3: b"\x00" * 70000}
    for stream_id in bodies:
        client.send_headers(stream_id, request)
    statuses: dict[int, bytes] = {}
    answers: dict[int, bytes] = {}
    for _ in range(50):
        for stream_id, rest in list(bodies.items()):
            room = min(client.local_flow_control_window(stream_id), client.max_outbound_frame_size)
            if room:
                client.send_data(stream_id, rest[:room], end_stream=len(rest) <= room)
                bodies[stream_id] = rest[room:]
                if len(rest) <= room:
                    del bodies[stream_id]
        for event in h2_exchange(protocol, transport, client):
            if isinstance(event, h2.events.ResponseReceived):
                statuses[event.stream_id] = dict(event.headers)[b":status"]
            elif isinstance(event, h2.events.DataReceived):
                answers[event.stream_id] = answers.get(event.stream_id, b"") + event.data
        if not bodies:
            break
    assert statuses == {1: b"200", 3: b"413"}
    assert dns.message.from_wire(answers[1]).answer
    assert not transport.disconnecting


def test_http2_answers_wait_for_the_client_window(tmp_path: Path) -> None:
    protocol, transport, _ = connect(tmp_path, H2Transport(), big=True)
    client = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding=None))
    client.initiate_connection()
    client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 500})
    h2_exchange(protocol, transport, client)
    query = dns.message.make_query("many.netd.test", "TXT", id=0).to_wire()
    path = b"/dns-query?dns=" + base64.urlsafe_b64encode(query).rstrip(b"=")
    client.send_headers(
        1,
        [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"x"), (b":path", path)],
        end_stream=True,
    )
    answer = b""
    ended = False
    for _ in range(20):
        for event in h2_exchange(protocol, transport, client):
            if isinstance(event, h2.events.DataReceived):
                assert len(event.data) <= 500
                answer += event.data
                client.acknowledge_received_data(event.flow_controlled_length, 1)
            ended = ended or isinstance(event, h2.events.StreamEnded)
        if ended:
            break
    assert ended and len(answer) > 2000
    assert len(dns.message.from_wire(answer).answer[0]) == 30


def test_bad_http2_framing_and_hpack_end_the_connection_with_its_error(tmp_path: Path) -> None:
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    cases = {
        # HEADERS on stream 1 whose block indexes entry 0 (none): COMPRESSION_ERROR.
        b"\x00\x00\x01\x01\x05\x00\x00\x00\x01\x80": 9,
        # A header list referring past the dynamic table.
        b"\x00\x00\x01\x01\x05\x00\x00\x00\x01\xff": 9,
        # A frame longer than the 16 KiB netd allows: FRAME_SIZE_ERROR.
        b"\x00\x50\x00\x00\x00\x00\x00\x00\x01": 6,
        # Stream 2 is the server's to open: PROTOCOL_ERROR.
        b"\x00\x00\x01\x01\x05\x00\x00\x00\x02\x82": 1,
        # A PING of 4 bytes.
        b"\x00\x00\x04\x06\x00\x00\x00\x00\x00abcd": 6,
    }
    for frame, code in cases.items():
        protocol, transport, _ = connect(tmp_path, H2Transport())
        protocol.dataReceived(preface + frame)
        assert transport.disconnecting, frame
        client = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding=None))
        client.initiate_connection()
        client.data_to_send()
        ended = [
            event
            for event in client.receive_data(transport.value())
            if isinstance(event, h2.events.ConnectionTerminated)
        ]
        assert ended and ended[0].error_code == code, frame


def test_hpack_literals_indexed_into_the_dynamic_table_are_found_again(tmp_path: Path) -> None:
    protocol, transport, _ = connect(tmp_path, H2Transport())
    path = b"/dns-query?dns=" + base64.urlsafe_b64encode(WWW).rstrip(b"=")
    # :method GET, :scheme https, then user-agent (static 58, a prefix byte with
    # 0x20 set) and :path as literals added to the dynamic table.
    first = b"\x82\x87\x7a\x04curl\x44" + bytes([len(path)]) + path
    # The same request again from the table: :path is entry 62, user-agent 63.
    again = b"\x82\x87\xbf\xbe"
    frames = b"".join(
        struct.pack(">HBBBI", 0, len(block), 1, 0x5, stream_id) + block
        for stream_id, block in ((1, first), (3, again))
    )
    protocol.dataReceived(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frames)
    sent, statuses = transport.value(), {}
    while sent:
        high, low, kind, _, stream_id = struct.unpack_from(">HBBBI", sent)
        payload, sent = sent[9 : 9 + (high << 8 | low)], sent[9 + (high << 8 | low) :]
        if kind == 1:
            statuses[stream_id] = payload[:1]
    # 0x88 is ":status: 200" from HPACK's static table.
    assert statuses == {1: b"\x88", 3: b"\x88"}
