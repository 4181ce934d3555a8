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
import hpack
import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from netd.services.dns.doh import DoHFactory, _HeaderDecoder, _only_dns_parameter
from tests.unit.test_dns import big_server, server

WWW = dns.message.make_query("www.netd.test", "A", id=0).to_wire()
GET = b"GET /dns-query?dns=%s HTTP/1.1\r\nhost: x\r\n\r\n" % base64.urlsafe_b64encode(WWW).rstrip(
    b"="
)


# The client's connection preface: the magic, then its SETTINGS (empty here).
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


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
    preface = PREFACE
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
    protocol.dataReceived(PREFACE + frames)
    sent, statuses = transport.value(), {}
    while sent:
        high, low, kind, _, stream_id = struct.unpack_from(">HBBBI", sent)
        payload, sent = sent[9 : 9 + (high << 8 | low)], sent[9 + (high << 8 | low) :]
        if kind == 1:
            statuses[stream_id] = payload[:1]
    # 0x88 is ":status: 200" from HPACK's static table.
    assert statuses == {1: b"\x88", 3: b"\x88"}


def h2_frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return struct.pack(">HBBBI", len(payload) >> 8, len(payload) & 0xFF, kind, flags, stream_id) + (
        payload
    )


def h2_frames(raw: bytes) -> list[tuple[int, int, int, bytes]]:
    """The frames in C{raw}: type, flags, stream, payload."""
    found = []
    while raw:
        high, low, kind, flags, stream_id = struct.unpack_from(">HBBBI", raw)
        size = high << 8 | low
        found.append((kind, flags, stream_id, raw[9 : 9 + size]))
        raw = raw[9 + size :]
    return found


def go_away_code(transport: StringTransport) -> int | None:
    codes = [
        int.from_bytes(payload[4:8], "big")
        for kind, _, _, payload in h2_frames(transport.value())
        if kind == 7
    ]
    return codes[-1] if codes else None


def resets(transport: StringTransport) -> dict[int, int]:
    return {
        stream_id: int.from_bytes(payload, "big")
        for kind, _, stream_id, payload in h2_frames(transport.value())
        if kind == 3
    }


def request_block(encoder: hpack.Encoder, path: bytes, *extra: tuple[bytes, bytes]) -> bytes:
    block: bytes = encoder.encode(
        [(b":method", b"GET"), (b":scheme", b"https"), (b":path", path), *extra]
    )
    return block


DNS_PATH = b"/dns-query?dns=" + base64.urlsafe_b64encode(WWW).rstrip(b"=")
WINDOW_ZERO = h2_frame(4, 0, 0, struct.pack(">HI", 4, 0))


def test_bad_http2_settings_windows_and_header_blocks_end_the_connection(tmp_path: Path) -> None:
    # Each was read on before, or answered in a way a client could not follow.
    post = hpack.Encoder().encode([(b":method", b"POST"), (b":path", b"/dns-query")])
    cases = {
        "an ACK of SETTINGS with settings in it": (h2_frame(4, 1, 0, b"\x00" * 6), 6),
        "push enabled with 2": (h2_frame(4, 0, 0, struct.pack(">HI", 2, 2)), 1),
        "a window grown by 0": (h2_frame(8, 0, 0, b"\x00" * 4), 1),
        "a RST_STREAM of 3 bytes": (h2_frame(3, 0, 1, b"abc"), 6),
        "a GOAWAY of 4 bytes": (h2_frame(7, 0, 0, b"abcd"), 6),
        "a table size update after a field": (h2_frame(1, 0x5, 1, b"\x82\x20"), 9),
        "CONTINUATION frames without end": (
            h2_frame(1, 0, 1, b"\x82")
            + b"".join(h2_frame(9, 0, 1, b"\x00" * 16384) for _ in range(5)),
            11,
        ),
        "DATA past the window": (
            h2_frame(1, 0x4, 1, post)
            + b"".join(h2_frame(0, 0, 1, b"\x00" * 16384) for _ in range(5)),
            3,
        ),
    }
    for why, (frames, code) in cases.items():
        protocol, transport, _ = connect(tmp_path, H2Transport())
        protocol.dataReceived(PREFACE + frames)
        assert transport.disconnecting, why
        assert go_away_code(transport) == code, why
    # The preface must be followed by the client's SETTINGS.
    protocol, transport, _ = connect(tmp_path, H2Transport())
    protocol.dataReceived(PREFACE[:24] + h2_frame(6, 0, 0, b"\x00" * 8))
    assert transport.disconnecting and go_away_code(transport) == 1


def test_bad_http2_streams_are_reset_and_the_connection_serves_on(tmp_path: Path) -> None:
    protocol, transport, _ = connect(tmp_path, H2Transport())
    encoder = hpack.Encoder()
    request = request_block(encoder, DNS_PATH)
    # With a window of 0 the answers wait, and their streams stay open.
    protocol.dataReceived(
        PREFACE
        + WINDOW_ZERO
        + h2_frame(1, 0x5, 1, request)
        # The same request again on its stream: answered once, the stream reset.
        + h2_frame(1, 0x5, 1, request_block(encoder, DNS_PATH))
        + h2_frame(1, 0x5, 3, request_block(encoder, DNS_PATH))
        # A window grown by 0 on a stream, and a PRIORITY of 4 bytes.
        + h2_frame(8, 0, 3, b"\x00" * 4)
        + h2_frame(1, 0x5, 5, request_block(encoder, DNS_PATH))
        + h2_frame(2, 0, 5, b"\x00" * 4)
    )
    assert resets(transport) == {1: 5, 3: 1, 5: 6}
    assert [stream for kind, _, stream, _ in h2_frames(transport.value()) if kind == 1] == [1, 3, 5]
    transport.clear()
    protocol.dataReceived(
        h2_frame(4, 0, 0, struct.pack(">HI", 4, 65535))
        + h2_frame(1, 0x5, 7, request_block(encoder, DNS_PATH))
    )
    sent = h2_frames(transport.value())
    assert [(kind, stream) for kind, _, stream, _ in sent if kind in (0, 1)] == [(1, 7), (0, 7)]
    assert dns.message.from_wire(sent[-1][3]).answer
    assert not transport.disconnecting


def test_a_header_list_over_16_kib_is_431_and_the_connection_serves_on(tmp_path: Path) -> None:
    protocol, transport, _ = connect(tmp_path, H2Transport())
    encoder = hpack.Encoder()
    big = request_block(encoder, DNS_PATH, (b"x-big", b"7" * 23000))
    assert len(big) > 16384
    protocol.dataReceived(
        PREFACE
        + h2_frame(1, 0x1, 1, big[:16384])
        + h2_frame(9, 0x4, 1, big[16384:])
        # The next request leans on the dynamic table the big one updated.
        + h2_frame(1, 0x5, 3, request_block(encoder, DNS_PATH))
    )
    decoder = hpack.Decoder()
    statuses = {
        stream: dict(decoder.decode(payload, raw=True))[b":status"]
        for kind, _, stream, payload in h2_frames(transport.value())
        if kind == 1
    }
    assert statuses == {1: b"431", 3: b"200"}
    assert not transport.disconnecting


def test_a_client_goaway_waits_for_the_answers_it_is_owed(tmp_path: Path) -> None:
    protocol, transport, _ = connect(tmp_path, H2Transport())
    protocol.dataReceived(
        PREFACE
        + WINDOW_ZERO
        + h2_frame(1, 0x5, 1, request_block(hpack.Encoder(), DNS_PATH))
        + h2_frame(7, 0, 0, b"\x00" * 8)
    )
    assert not transport.disconnecting
    protocol.dataReceived(h2_frame(8, 0, 1, struct.pack(">I", 65535)))
    sent = h2_frames(transport.value())
    assert sent[-1][0] == 0 and dns.message.from_wire(sent[-1][3]).answer
    assert transport.disconnecting


def _get(client: h2.connection.H2Connection, stream_id: int, query: bytes) -> None:
    path = b"/dns-query?dns=" + base64.urlsafe_b64encode(query).rstrip(b"=")
    client.send_headers(
        stream_id,
        [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"x"), (b":path", path)],
        end_stream=True,
    )


def test_http2_a_reply_is_made_once_and_dated_at_each_sending(tmp_path: Path) -> None:
    protocol, transport, clock = connect(tmp_path, H2Transport())
    client = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding=None))
    client.initiate_connection()
    h2_exchange(protocol, transport, client)
    heads: dict[int, dict[bytes, bytes]] = {}
    bodies: dict[int, bytes] = {}
    for stream_id in (1, 3):
        _get(client, stream_id, WWW)
        for event in h2_exchange(protocol, transport, client):
            if isinstance(event, h2.events.ResponseReceived):
                heads[event.stream_id] = dict(event.headers)
            elif isinstance(event, h2.events.DataReceived):
                bodies[event.stream_id] = event.data
        clock.advance(1)
    assert bodies[1] == bodies[3] and dns.message.from_wire(bodies[1]).answer
    assert heads[1][b"date"] != heads[3][b"date"]
    del heads[1][b"date"], heads[3][b"date"]
    assert heads[1] == heads[3]
    assert heads[1][b"content-length"] == b"%d" % len(bodies[1])
    assert list(protocol.doh.replies) == [bodies[1]]  # type: ignore[attr-defined]


def test_http2_answers_in_one_frame_keep_to_the_connection_window(tmp_path: Path) -> None:
    protocol, transport, _ = connect(tmp_path, H2Transport(), big=True)
    client = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding=None))
    client.initiate_connection()
    h2_exchange(protocol, transport, client)
    query = dns.message.make_query("many.netd.test", "TXT", id=0).to_wire()
    # 40 answers of over 2,000 bytes each: more than the connection's 65,535-byte
    # window, though each fits its own stream's window and one frame.
    streams = range(1, 81, 2)
    for stream_id in streams:
        _get(client, stream_id, query)
    answers: dict[int, bytes] = {}
    ended: set[int] = set()
    held_back = False
    for _ in range(40):
        # hyper-h2 raises FlowControlError on DATA beyond the window it gave.
        events = h2_exchange(protocol, transport, client)
        for event in events:
            if isinstance(event, h2.events.DataReceived):
                answers[event.stream_id] = answers.get(event.stream_id, b"") + event.data
                client.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                ended.add(event.stream_id)
        held_back = held_back or 0 < len(ended) < len(streams)
        if len(ended) == len(streams):
            break
    assert held_back and ended == set(streams)
    assert len({answers[s] for s in streams}) == 1
    assert len(dns.message.from_wire(answers[1]).answer[0]) == 30


@pytest.mark.parametrize("huffman", [True, False])
def test_hpack_decoding_agrees_with_hpack_on_long_indexes_and_lengths(huffman: bool) -> None:
    # 110 small fields fill the dynamic table, so sent again they are indexed
    # past 127 (a multi-byte index); a 300-byte value needs a multi-byte length.
    small = [(b"x-%d" % i, b"v") for i in range(110)]
    indexed_past_127 = False
    encoder, theirs, ours = hpack.Encoder(), hpack.Decoder(), _HeaderDecoder()
    for fields in (small, small, [(b"x-long", b"a" * 300)], small):
        block = encoder.encode(fields, huffman=huffman)
        headers, over = ours.decode(block)
        assert not over and headers == fields
        assert headers == [(bytes(n), bytes(v)) for n, v in theirs.decode(block, raw=True)]
        if fields is small and b"\xff" in block:
            indexed_past_127 = True
    assert indexed_past_127


def test_only_the_dns_parameter_is_read_from_a_query_string() -> None:
    assert _only_dns_parameter(b"dns=AAAB-_") == b"AAAB-_"
    assert _only_dns_parameter(b"ct=x&dns=AAAB") == b"AAAB"
    assert _only_dns_parameter(b"d%6Es=AA%41B") == b"AAAB"
    assert _only_dns_parameter(b"dns=AAAB&dns=AAAB") is None
    assert _only_dns_parameter(b"dns") is None
    assert _only_dns_parameter(b"other=1") is None
