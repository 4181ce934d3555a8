"""
Live record changes without sockets: the changes over the map, serials, what a
reload carries over, the persist file's writer on a fake thread.
"""

from __future__ import annotations

import base64
import functools
import json
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dns.flags as dns_flags
import dns.message as dns_message
import dns.name as dns_name
import dns.rcode as dns_rcode
import dns.rdataclass as dns_rdataclass
import dns.rdatatype as dns_rdatatype
import dns.rrset as dns_rrset
import dns.tsigkeyring as dns_tsigkeyring
import dns.update as dns_update
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.names import dns

from netd.config import parse_config
from netd.events import Journal, ServiceStats
from netd.kinds import BuildContext, ViewRefused
from netd.schema import ConfigErrors
from netd.services.dns.data import CAA, parse_master_file, parse_rdata
from netd.services.dns.doh import max_age
from netd.services.dns.forward import Forwarder, Forwarders, Upstream, UpstreamFailed
from netd.services.dns.live import (
    Records,
    RecordSet,
    RecordsService,
    Saver,
    rdata_text,
    records_view,
)
from netd.services.dns.local import LocalData
from netd.services.dns.record import Recorder, read_recorded
from netd.services.dns.server import Server
from netd.services.dns.wire import name_to_wire
from tests.unit.test_dns import (
    CLIENT,
    DNS,
    UPSTREAMS,
    _FakeReactor,
    ask,
    key,
    make_wire,
    server,
    texts,
    upstream_reply,
)

SOA = parse_rdata(dns.SOA, "ns.z.test hostmaster.z.test 7 3600 600 86400 30", None)
WWW = name_to_wire("www.z.test")
ZONE = name_to_wire("z.test")
MAP = [
    (ZONE, dns.SOA, 60, SOA),
    (WWW, dns.A, 60, bytes([10, 0, 0, 1])),
]


def a(*addresses: str, ttl: int = 60) -> RecordSet:
    return ttl, tuple(parse_rdata(dns.A, address, None) for address in addresses)


def serial(records: Records) -> int:
    found = records.get(ZONE, dns.SOA)
    assert found is not None
    return int.from_bytes(found[1][0][-20:-16], "big")


def make(
    configured: list[tuple[bytes, int, int, bytes]] = MAP,
    carried: dict[str, Any] | None = None,
    saver: Saver | None = None,
    negative_ttl: int = 30,
) -> tuple[Records, list[dict[str, Any]], list[LocalData]]:
    events: list[dict[str, Any]] = []
    built: list[LocalData] = []

    def emit(type: str, **fields: Any) -> None:
        events.append({"type": type, **fields})

    records = Records(
        configured, negative_ttl, {} if carried is None else carried, built.append, emit, saver
    )
    return records, events, built


def test_a_change_is_answered_and_bumps_the_serial_once() -> None:
    records, events, built = make()
    done = records.commit([((WWW, dns.A), a("10.0.0.2", "10.0.0.3"))], "admin")
    assert [key for key, _ in done] == [(WWW, dns.A), (ZONE, dns.SOA)]
    assert built == [records.local]
    answer = records.local.answer(WWW, dns.A)
    assert answer is not None and answer.an == 2
    assert serial(records) == 8
    assert [(e["action"], e["rtype"]) for e in events] == [("set", "A"), ("set", "SOA")]
    assert events[0]["values"] == ["10.0.0.2", "10.0.0.3"]


def test_a_change_to_what_is_already_there_changes_nothing() -> None:
    records, events, built = make()
    assert records.commit([((WWW, dns.A), a("10.0.0.1"))], "admin") == []
    assert (events, built, serial(records)) == ([], [], 7)


def test_setting_the_soa_itself_is_not_bumped_again() -> None:
    records, _, _ = make()
    new_soa = parse_rdata(dns.SOA, "ns.z.test hostmaster.z.test 100 3600 600 86400 30", None)
    records.commit([((ZONE, dns.SOA), (60, (new_soa,)))], "admin")
    assert serial(records) == 100


def test_soa_serials_are_unsigned_32_bit_and_wrap_past_zero() -> None:
    # RFC 1035 3.3.13 and RFC 1982: the serial is a 32-bit count, not a time.
    records, _, _ = make()
    view = records_view(records, 60)
    assert view.put is not None
    high = "ns.z.test. hostmaster.z.test. 3000000000 1h 10m 1d 30"
    assert view.put("z.test/SOA", {"values": [high]})["values"] == [
        "ns.z.test. hostmaster.z.test. 3000000000 3600 600 86400 30"
    ]
    zone, _ = parse_master_file("@ 60 SOA ns h 4294967295 2 3 4 5\n", ZONE, 60)
    assert zone[0][3][-20:-16] == b"\xff\xff\xff\xff"
    for serial_text in ("4294967296", "1h"):
        with pytest.raises(ValueError, match="not a 32-bit number"):
            parse_rdata(dns.SOA, f"ns h {serial_text} 2 3 4 5", ZONE)
    # A change bumps 2^32-1 to 1, never 0, as BIND's increment does.
    records.commit([((ZONE, dns.SOA), (60, (zone[0][3],)))], "admin")
    records.commit([((WWW, dns.A), a("10.0.0.2"))], "admin")
    assert serial(records) == 1


def test_a_new_name_outside_every_zone_is_a_zone_of_its_own() -> None:
    records, _, _ = make()
    other = name_to_wire("host.other.test")
    records.commit([((other, dns.A), a("10.9.0.1"))], "update")
    assert records.local.zone_of(other) == other
    # Its made-up SOA is bumped like any other: 1 becomes 2.
    soa = records.get(other, dns.SOA)
    assert soa is not None and int.from_bytes(soa[1][0][-20:-16], "big") == 2


def test_removing_the_last_name_of_a_made_up_zone_does_not_fail() -> None:
    records, _, _ = make([(WWW, dns.A, 60, bytes([10, 0, 0, 1]))])
    done = records.commit([((WWW, dns.A), None)], "admin")
    assert done[0] == ((WWW, dns.A), None)
    assert records.get(WWW, dns.A) is None


def test_deleting_a_made_up_zones_last_records_forwards_its_names_again() -> None:
    solo = name_to_wire("solo.test")
    records, events, _ = make([*MAP, (solo, dns.A, 60, bytes([192, 0, 2, 1]))])
    view = records_view(records, 60)
    assert view.put is not None and view.remove is not None
    view.put("svc.example.test/A", {"values": ["192.0.2.7"]})
    view.remove("svc.example.test")
    other = name_to_wire("svc.example.test")
    assert records.local.zone_of(other) is None and records.live.changes == {}
    assert view.remove("svc.example.test/SOA") is None  # 404: there is no zone there now
    assert events[-1] == {
        "type": "record",
        "action": "remove",
        "source": "admin",
        "name": "svc.example.test",
        "rtype": "SOA",
    }
    # A map's name too: without its records it is no zone, as if the map had not named it.
    view.put("solo.test/A", {"values": ["192.0.2.2"]})
    view.remove("solo.test")
    assert records.local.zone_of(solo) is None
    # A zone whose SOA someone wrote keeps it, and a made-up one keeps it while names remain.
    view.remove("www.z.test")
    assert records.local.zone_of(WWW) == ZONE
    view.put("own.test/SOA", {"values": ["ns.own.test. h.own.test. 5 1 2 3 4"]})
    view.put("own.test/A", {"values": ["192.0.2.3"]})
    view.remove("own.test/A")
    assert records.local.zone_of(name_to_wire("own.test")) == name_to_wire("own.test")
    view.put("apex.test/A", {"values": ["192.0.2.4"]})
    view.put("www.apex.test/A", {"values": ["192.0.2.5"]})
    view.remove("apex.test")
    assert records.local.zone_of(name_to_wire("www.apex.test")) == name_to_wire("apex.test")


def test_a_reload_carries_changes_and_the_map_wins_where_it_changed() -> None:
    carried: dict[str, Any] = {}
    old, _, _ = make(carried=carried)
    RecordsService(old).startService()
    new_name = name_to_wire("new.z.test")
    old.commit([((WWW, dns.A), a("10.0.0.5")), ((new_name, dns.A), a("10.0.0.6"))], "admin")
    assert serial(old) == 8
    # The new map changed www and the SOA's TTL, not new.z.test.
    new_map = [
        (ZONE, dns.SOA, 120, SOA),
        (WWW, dns.A, 60, bytes([10, 0, 0, 7])),
    ]
    new, _, _ = make(new_map, carried)
    assert new.get(WWW, dns.A) == a("10.0.0.7")
    assert new.get(new_name, dns.A) == a("10.0.0.6")
    soa = new.get(ZONE, dns.SOA)
    assert soa is not None and soa[0] == 120 and serial(new) == 8


def test_a_replacement_not_yet_started_does_not_publish() -> None:
    carried: dict[str, Any] = {}
    old, _, _ = make(carried=carried)
    RecordsService(old).startService()
    make(carried=carried)  # built for a reload that then failed to bind
    old.commit([((WWW, dns.A), a("10.0.0.5"))], "admin")
    again, _, _ = make(carried=carried)
    assert again.get(WWW, dns.A) == a("10.0.0.5")


def test_revert_goes_back_to_the_map() -> None:
    records, events, _ = make()
    records.commit([((WWW, dns.A), None)], "admin")
    assert records.revert() == 2
    assert records.get(WWW, dns.A) == a("10.0.0.1") and serial(records) == 7
    assert events[-1] == {"type": "record", "action": "revert", "source": "admin", "count": 2}


class FakeThread:
    """Runs nothing until told: each call's work and its Deferred, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[[], None], Deferred[None]]] = []

    def __call__(self, work: Callable[[], None]) -> Deferred[None]:
        done: Deferred[None] = Deferred()
        self.calls.append((work, done))
        return done

    def finish(self) -> None:
        work, done = self.calls.pop(0)
        work()
        done.callback(None)


def test_saver_writes_one_at_a_time_and_only_the_newest(tmp_path: Path) -> None:
    thread = FakeThread()
    path = tmp_path / "live.json"
    saver = Saver(path, thread, Logger())
    records, _, _ = make(saver=saver)
    service = RecordsService(records)
    service.startService()
    records.commit([((WWW, dns.A), a("10.0.0.2"))], "admin")
    records.commit([((WWW, dns.A), a("10.0.0.3"))], "admin")
    records.commit([((WWW, dns.A), a("10.0.0.4"))], "admin")
    assert len(thread.calls) == 1
    stopped = service.stopService()
    assert isinstance(stopped, Deferred)
    thread.finish()
    assert len(thread.calls) == 1  # the newest of the two waiting, once
    assert not stopped.called
    thread.finish()
    assert stopped.called
    changes = json.loads(path.read_text())["changes"]
    assert [(c["name"], c["type"]) for c in changes] == [("www.z.test", "A"), ("z.test", "SOA")]
    assert changes[0]["values"] == ["10.0.0.4"]
    # A new start reads the file back.
    again, _, _ = make(saver=Saver(path, thread, Logger()))
    assert again.get(WWW, dns.A) == a("10.0.0.4") and serial(again) == 10


def test_a_persisted_made_up_zone_goes_with_its_last_records_under_another_negative_ttl(
    tmp_path: Path,
) -> None:
    thread = FakeThread()
    path = tmp_path / "live.json"
    records, _, _ = make(saver=Saver(path, thread, Logger()), negative_ttl=300)
    other = name_to_wire("x.sub.other.test")
    records.commit([((other, dns.A), a("192.0.2.9"))], "admin")
    thread.finish()
    # Restarted with another cache.negative_ttl: the persisted SOA's MINIMUM is the old one.
    again, _, _ = make(saver=Saver(path, thread, Logger()), negative_ttl=120)
    soa = again.get(other, dns.SOA)
    assert soa is not None and soa[1][0][-4:] == (300).to_bytes(4, "big")
    view = records_view(again, 60)
    assert view.remove is not None
    view.remove("x.sub.other.test/A")
    assert not again.local.is_local(other)  # forwarded again, not NODATA for good
    assert view.remove("x.sub.other.test/SOA") is None


def test_the_view_refuses_bad_writes_with_paths() -> None:
    records, _, _ = make()
    view = records_view(records, 60)
    assert view.put is not None and view.remove is not None and view.post is not None
    with pytest.raises(ConfigErrors) as refused:
        view.put("www.z.test/A", {"values": ["10.0.0.1", "x"], "ttl": "long"})
    assert [e.path for e in refused.value.errors] == ["ttl", "values[1]"]
    with pytest.raises(ConfigErrors):
        view.post({"type": "A", "values": ["10.0.0.1"]})
    with pytest.raises(ViewRefused) as soa:
        view.remove("z.test/SOA")
    assert soa.value.status == 409
    with pytest.raises(ViewRefused) as deep:
        view.put("www.z.test/A/more", {"values": ["10.0.0.1"]})
    assert deep.value.status == 404
    assert view.remove("nothing.z.test") is None
    assert serial(records) == 7
    # RFC 1034 3.6.2: a name with a CNAME has no other data, either way round.
    view.put("alias.z.test/CNAME", {"values": ["www.z.test"]})
    for path, values in (("alias.z.test/A", ["10.0.0.1"]), ("www.z.test/CNAME", ["z.test"])):
        with pytest.raises(ViewRefused) as clash:
            view.put(path, {"values": values})
        assert clash.value.status == 409
    with pytest.raises(ViewRefused):
        view.post({"name": "alias.z.test", "type": "TXT", "values": ["x"]})
    assert view.put("alias.z.test/CNAME", {"values": ["z.test"]})["values"] == ["z.test."]


# -- RFC 2136 UPDATE through the server, on a fake clock ----------------------------

SECRET = base64.b64encode(b"k" * 32).decode()
KEYRING = dns_tsigkeyring.from_text({"ci-key": ("hmac-sha256", SECRET)})
UPDATABLE = f"""\
    records:
      www.dyn.test: {{A: [10.0.0.1]}}
    update:
      keys: {{ci-key: {{secret: "{SECRET}"}}}}
      allow: [dyn.test, empty.test]
"""


def update_server(tmp_path: Path, clock: Clock, section: str = UPDATABLE) -> Server:
    context = BuildContext(
        reactor=clock,
        name="dns",
        state_dir=tmp_path,
        journal=Journal(clock),
        stats=ServiceStats(),
        log=Logger(),
        tls={},
    )
    return Server(DNS.parse(tmp_path, section), context)


def send_update(server: Server, message: dns_message.Message) -> dns_message.Message:
    answer = server.handle(message.to_wire(), ("127.0.0.1", 5000), True)
    assert isinstance(answer, bytes)
    return dns_message.from_wire(answer, keyring=False)


def adding(zone: str = "dyn.test.", **kwargs: Any) -> dns_update.UpdateMessage:
    message = dns_update.UpdateMessage(zone, **kwargs)
    message.add(f"new.{zone}", 60, "A", "10.0.0.2")
    return message


def test_a_signed_update_is_checked_against_netds_clock(tmp_path: Path) -> None:
    clock = Clock()  # 1970: every signature made now is hours out
    server = update_server(tmp_path, clock)
    late = send_update(server, adding(keyring=KEYRING, keyname="ci-key"))
    assert (late.rcode(), late.tsig_error) == (dns_rcode.NOTAUTH, dns_rcode.BADTIME)
    assert server.records.get(name_to_wire("new.dyn.test"), dns.A) is None
    clock.advance(time.time())
    done = send_update(server, adding(keyring=KEYRING, keyname="ci-key"))
    assert (done.rcode(), done.tsig_error) == (dns_rcode.NOERROR, 0)
    assert server.records.get(name_to_wire("new.dyn.test"), dns.A) == a("10.0.0.2")
    assert server.stats.snapshot()["update_rcode_NOTAUTH"] == 1


def signed_reply(server: Server, query: dns_message.Message, udp: bool) -> dns_message.Message:
    query.use_tsig(KEYRING, keyname="ci-key")
    answer = server.handle(query.to_wire(), CLIENT, udp)
    assert isinstance(answer, bytes)
    if udp:
        assert len(answer) <= (query.payload if query.edns == 0 else 512)
    # Read with the key: a MAC that does not verify raises.
    return dns_message.from_wire(answer, keyring=KEYRING, request_mac=query.mac)


def test_a_signed_answer_its_tsig_takes_past_the_payload_is_truncated_signed(
    tmp_path: Path,
) -> None:
    clock = Clock()
    clock.advance(time.time())
    values = ", ".join(f"'{c * 215}'" for c in "xy")
    section = UPDATABLE.replace(
        "    update:", f"      mid.dyn.test: {{TXT: [{values}]}}\n    update:"
    )
    server = update_server(tmp_path, clock, section)
    # Unsigned, the answer fits 512 bytes; the TSIG record takes it past them.
    assert not ask(server, "mid.dyn.test", "TXT").flags & dns_flags.TC
    for query in (
        dns_message.make_query("mid.dyn.test", "TXT"),
        dns_message.make_query("mid.dyn.test", "TXT", use_edns=0, payload=512),
    ):
        reply = signed_reply(server, query, udp=True)
        # RFC 8945 5.3: the question alone, TC, NOERROR, and signed.
        assert reply.had_tsig and reply.flags & dns_flags.TC and reply.rcode() == dns_rcode.NOERROR
        assert (reply.answer, reply.authority, reply.additional) == ([], [], [])
        assert reply.edns == query.edns
    roomy = dns_message.make_query("mid.dyn.test", "TXT", use_edns=0, payload=1232)
    reply = signed_reply(server, roomy, udp=True)
    assert reply.had_tsig and not reply.flags & dns_flags.TC and len(reply.answer[0]) == 2
    over_tcp = signed_reply(server, dns_message.make_query("mid.dyn.test", "TXT"), udp=False)
    assert over_tcp.had_tsig and len(over_tcp.answer[0]) == 2


def test_answers_dnspython_makes_advertise_the_services_udp_payload(tmp_path: Path) -> None:
    clock = Clock()
    clock.advance(time.time())
    server = update_server(tmp_path, clock)
    update = adding(keyring=KEYRING, keyname="ci-key")
    update.use_edns(0)
    assert send_update(server, update).payload == 1232
    query = dns_message.make_query("www.dyn.test", "A", use_edns=0)
    query.use_tsig(dns_tsigkeyring.from_text({"other-key": SECRET}), keyname="other-key")
    refused = server.handle(query.to_wire(), CLIENT, True)
    assert isinstance(refused, bytes)
    assert dns_message.from_wire(refused, keyring=False).payload == 1232


def test_an_allowed_zone_with_no_records_exists_and_takes_updates(tmp_path: Path) -> None:
    clock = Clock()
    clock.advance(time.time())
    server = update_server(tmp_path, clock)
    assert server.records.local.is_local(name_to_wire("nothing.empty.test"))
    done = send_update(server, adding("empty.test.", keyring=KEYRING, keyname="ci-key"))
    assert done.rcode() == dns_rcode.NOERROR
    assert server.records.get(name_to_wire("new.empty.test"), dns.A) == a("10.0.0.2")


def test_updates_the_prescan_refuses_as_formerr(tmp_path: Path) -> None:
    # RFC 2136 3.1.1: the zone section's type is SOA; 3.4.1.3: deleting one RR names a
    # real type.  Nothing is applied.
    clock = Clock()
    clock.advance(time.time())
    server = update_server(tmp_path, clock)
    wrong_zone_type = adding(keyring=KEYRING, keyname="ci-key")
    wrong_zone_type.zone[0].rdtype = dns_rdatatype.A
    assert send_update(server, wrong_zone_type).rcode() == dns_rcode.FORMERR
    delete_any = dns_update.UpdateMessage("dyn.test.", keyring=KEYRING, keyname="ci-key")
    delete_any.add("www.dyn.test.", 60, "A", "10.0.0.2")
    delete_any.update.append(
        dns_rrset.RRset(
            dns_name.from_text("www.dyn.test."),
            dns_rdataclass.NONE,
            dns_rdatatype.ANY,
            deleting=dns_rdataclass.NONE,
        )
    )
    assert send_update(server, delete_any).rcode() == dns_rcode.FORMERR
    assert server.records.get(name_to_wire("new.dyn.test"), dns.A) is None
    assert server.records.get(name_to_wire("www.dyn.test"), dns.A) == a("10.0.0.1")


def test_a_service_without_update_keys_refuses_every_update(tmp_path: Path) -> None:
    context = BuildContext(
        reactor=Clock(),
        name="dns",
        state_dir=tmp_path,
        journal=Journal(Clock()),
        stats=ServiceStats(),
        log=Logger(),
        tls={},
    )
    server = Server(DNS.parse(tmp_path, "    records: {www.dyn.test: {A: [10.0.0.1]}}\n"), context)
    message = adding(keyring=KEYRING, keyname="ci-key")
    assert send_update(server, message).rcode() == dns_rcode.REFUSED
    assert server.stats.counters["update_rcode_REFUSED"] == 1


def test_unsigned_and_malformed_updates(tmp_path: Path) -> None:
    server = update_server(tmp_path, Clock())
    assert send_update(server, adding()).rcode() == dns_rcode.REFUSED
    garbage = bytes([0, 1, 0x28, 0]) + b"\x00\x01" + b"\x00" * 6 + b"\x03dyn"
    answer = server.handle(garbage, ("127.0.0.1", 5000), True)
    assert isinstance(answer, bytes) and answer[3] & 0xF == dns_rcode.FORMERR
    assert server.records.get(name_to_wire("new.dyn.test"), dns.A) is None


def test_answers_to_an_update_with_do_copy_it(tmp_path: Path) -> None:
    # RFC 3225 3: the DO bit of the query goes into the answer's OPT.
    clock = Clock()
    clock.advance(time.time())
    server = update_server(tmp_path, clock)
    unsigned = adding()
    unsigned.use_edns(0, dns_flags.DO)
    refused = send_update(server, unsigned)
    assert refused.rcode() == dns_rcode.REFUSED and refused.ednsflags & dns_flags.DO
    signed = adding(keyring=KEYRING, keyname="ci-key")
    signed.use_edns(0, dns_flags.DO)
    applied = send_update(server, signed)
    assert applied.rcode() == dns_rcode.NOERROR and applied.ednsflags & dns_flags.DO
    plain = adding()
    plain.use_edns(0)
    assert not send_update(server, plain).ednsflags & dns_flags.DO


def test_update_options_are_checked(tmp_path: Path) -> None:
    found = DNS.errors(
        tmp_path,
        "    update:\n"
        "      keys: {k: {algorithm: hmac-md4, secret: 'not base64!'}}\n"
        "      allow: ['bad..zone']\n",
    )
    assert [e.split(": ", 1)[1] for e in found] == [
        "services.dns.update.keys.k.algorithm: must be one of hmac-sha1, hmac-sha224,"
        " hmac-sha256, hmac-sha384, hmac-sha512, got 'hmac-md4'",
        "services.dns.update.keys.k.secret: not base64 (tsig-keygen and ddns-confgen print one)",
        "services.dns.update.allow[0]: not a zone name: 'bad..zone'",
    ]
    assert DNS.errors(tmp_path, "    update: {allow: [a.test]}\n")[0].endswith(
        "services.dns.update: update needs at least one key under keys: (unsigned updates are"
        " refused)"
    )


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=300), counts=st.tuples(*[st.integers(0, 3)] * 4))
def test_random_updates_get_an_answer_or_silence(body: bytes, counts: tuple[int, ...]) -> None:
    server = unsigned_update_server()
    data = struct.pack(">HHHHHH", 7, 0x2800, *counts) + body
    answer = server.handle(data, ("127.0.0.1", 5000), True)
    assert answer is None or answer[:2] == b"\x00\x07"
    assert server.records.get(WWW_DYN, dns.A) == a("10.0.0.1")


WWW_DYN = name_to_wire("www.dyn.test")


@functools.cache
def unsigned_update_server() -> Server:
    """One server for every example: none of them may change anything."""
    return update_server(Path("."), Clock())


def test_max_age_is_the_smallest_ttl_of_answer_and_authority() -> None:
    reply = dns_message.make_response(dns_message.make_query("www.z.test", "A"))
    reply.answer.append(dns_rrset.from_text("www.z.test.", 300, "IN", "A", "10.0.0.1"))
    reply.answer.append(dns_rrset.from_text("www.z.test.", 90, "IN", "A", "10.0.0.2"))
    reply.additional.append(dns_rrset.from_text("ns.z.test.", 5, "IN", "A", "10.0.0.3"))
    assert max_age(reply.to_wire()) == 90
    negative = dns_message.make_response(dns_message.make_query("no.z.test", "A"))
    negative.authority.append(
        dns_rrset.from_text("z.test.", 30, "IN", "SOA", "ns.z.test. h.z.test. 1 2 3 4 30")
    )
    assert max_age(negative.to_wire()) == 30
    # RFC 8484 5.1: a negative answer is kept no longer than its SOA's MINIMUM.
    negative.authority[0].ttl = 3600
    assert max_age(negative.to_wire()) == 30
    soa = dns_message.make_response(dns_message.make_query("z.test", "SOA"))
    soa.answer.append(
        dns_rrset.from_text("z.test.", 3600, "IN", "SOA", "ns.z.test. h.z.test. 1 2 3 4 30")
    )
    assert max_age(soa.to_wire()) == 3600  # the SOA asked for is an answer like any other
    assert max_age(dns_message.make_query("x.test", "A").to_wire()) == 0
    assert max_age(b"\x00\x01\x81\x80\x00\x01\x00\x05\x00\x00\x00\x00\x01") == 0  # cut short


def test_doh_listeners_are_stream_listeners_of_their_own_list(tmp_path: Path) -> None:
    found = DNS.errors(tmp_path, '    doh: ["udp:0"]\n')
    assert found[0].endswith(
        "services.dns.doh[0]: this service kind has no datagram (udp:) listener"
    )
    config = parse_config(
        "services:\n  dns:\n    type: dns\n    listen: ['udp:0']\n"
        "    doh: ['tcp:0:interface=127.0.0.1']\n",
        tmp_path / "netd.yaml",
    )
    assert [(lst.endpoint, lst.protocol) for lst in config.services["dns"].listen] == [
        ("udp:0", None),
        ("tcp:0:interface=127.0.0.1", "doh"),
    ]


# -- forwarding: attempts, zones, DoT options ------------------------------------


def test_attempts_go_round_the_upstreams_again() -> None:
    reactor = _FakeReactor()
    stats = ServiceStats()
    fwd = Forwarder(
        reactor, UPSTREAMS, stats, timeout=0.5, socket_factory=reactor.socket, attempts=2
    )
    result = fwd.resolve(key("a.example"))
    for _ in range(3):
        reactor.advance(0.5)
    assert [sock.peer for sock in reactor.sockets] == [u_peer(u) for u in UPSTREAMS * 2]
    reactor.advance(0.5)
    result.addErrback(lambda f: f.trap(UpstreamFailed))
    assert stats.counters["upstream_failures"] == 4


def u_peer(upstream: Upstream) -> tuple[str, int]:
    return (upstream.host, upstream.port)


def test_forward_zones_route_by_the_longest_suffix() -> None:
    asked: list[tuple[str, bytes]] = []

    class Recording(Forwarder):
        def __init__(self, label: str) -> None:
            self.label = label

        def resolve(self, question: bytes) -> Deferred[bytes]:
            asked.append((self.label, question))
            return Deferred()

    router = Forwarders(
        Recording("default"),
        {name_to_wire("corp.test"): Recording("corp"), name_to_wire("a.corp.test"): Recording("a")},
    )
    for name in ("x.a.corp.test", "b.corp.test", "corp.test", "example.com"):
        router.resolve(key(name))
    assert [label for label, _ in asked] == ["a", "corp", "corp", "default"]
    failed = Forwarders(None, {}).resolve(key("example.com"))
    assert failed.called
    failed.addErrback(lambda f: f.trap(UpstreamFailed))


def test_a_forward_zone_under_a_local_zone_is_forwarded(tmp_path: Path) -> None:
    # The longest suffix wins between local zones and forward_zones, as dnsmasq and CoreDNS.
    srv = server(
        tmp_path,
        "    records:\n"
        "      corp.test: {A: [192.0.2.10]}\n"
        "      lab.dev.corp.test: {SOA: ['ns.lab hostmaster.lab 1 2 3 4 5'], A: [192.0.2.11]}\n"
        "    forward_zones: {dev.corp.test: ['127.0.0.1:9']}\n",
    )
    assert srv.forwarder is not None
    asked: list[bytes] = []
    upstream: Deferred[bytes] = Deferred()

    def resolve(question: bytes) -> Deferred[bytes]:
        asked.append(question)
        return upstream

    srv.forwarder.zones[name_to_wire("dev.corp.test")].resolve = resolve  # type: ignore[method-assign]
    waiting = srv.handle(make_wire("www.dev.corp.test"), CLIENT, True)
    assert isinstance(waiting, Deferred) and asked == [key("www.dev.corp.test")]
    upstream.callback(upstream_reply(asked[0], ["www.dev.corp.test. 60 IN A 10.0.0.1"]))
    assert [str(r) for r in dns_message.from_wire(waiting.result).answer] == [
        "www.dev.corp.test. 60 IN A 10.0.0.1"
    ]
    # The local zone itself, and a local zone below the forwarded suffix, stay local.
    assert texts(ask(srv, "corp.test")) == ["corp.test. 60 IN A 192.0.2.10"]
    assert texts(ask(srv, "lab.dev.corp.test")) == ["lab.dev.corp.test. 60 IN A 192.0.2.11"]
    assert ask(srv, "other.corp.test").rcode() == dns_rcode.NXDOMAIN
    assert len(asked) == 1


def test_forward_options(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(b"not a certificate")
    parsed = DNS.parse(
        tmp_path,
        "    forward:\n"
        "      upstreams: ['127.0.0.1', 'tls://[::1]', {address: 'tls://10.0.0.1:8853',"
        " server_name: dns.test}]\n"
        "      timeout: 0.5\n"
        "      attempts: 3\n"
        "    forward_zones: {corp.test: ['10.1.1.1:5353']}\n",
    )
    assert parsed.forward == (
        Upstream("127.0.0.1", 53),
        Upstream("::1", 853, tls=True),
        Upstream("10.0.0.1", 8853, tls=True, server_name="dns.test"),
    )
    assert (parsed.forward_timeout, parsed.forward_attempts) == (0.5, 3)
    assert parsed.forward_zones == ((name_to_wire("corp.test"), (Upstream("10.1.1.1", 5353),)),)
    assert str(parsed.forward[1]) == "tls://[::1]:853"
    found = DNS.errors(
        tmp_path,
        f"    forward: [{{address: '10.0.0.1', server_name: x.test}},"
        f" {{address: 'tls://10.0.0.2', ca: {ca}}}, 'tls://name.test']\n",
    )
    assert [e.split(": ", 1)[1].split(":")[0] for e in found] == [
        "services.dns.forward[0]",
        "services.dns.forward[1].ca",
        "services.dns.forward[2]",
    ]


def test_the_recorder_keeps_served_types_once_with_their_latest_ttl(tmp_path: Path) -> None:
    thread = FakeThread()
    recorder = Recorder(tmp_path / "rec.zone", thread, Logger(), "dns", {}, {}, 30)
    reply = dns_message.make_response(dns_message.make_query("www.example.test", "A"))
    reply.answer.append(dns_rrset.from_text("WWW.example.test.", 300, "IN", "A", "10.0.0.1"))
    reply.answer.append(dns_rrset.from_text("www.example.test.", 300, "IN", "HINFO", "a b"))
    recorder.add(reply.to_wire())
    recorder.add(reply.to_wire())  # nothing new: no second write
    assert len(thread.calls) == 1
    reply.answer[0].ttl = 60
    recorder.add(reply.to_wire())
    recorder.add(b"\x00\x01garbage")
    thread.finish()
    thread.finish()
    assert (tmp_path / "rec.zone").read_text().splitlines()[1:] == [
        "www.example.test. 60 IN A 10.0.0.1"
    ]
    records, _ = parse_master_file((tmp_path / "rec.zone").read_text(), name_to_wire("rec"), 60)
    assert records == [(name_to_wire("www.example.test"), dns.A, 60, bytes([10, 0, 0, 1]))]


def recorded_reply(name: str, address: str) -> bytes:
    reply = dns_message.make_response(dns_message.make_query(name, "A"))
    reply.answer.append(dns_rrset.from_text(name, 300, "IN", "A", address))
    wire: bytes = reply.to_wire()
    return wire


def test_a_reload_and_a_restart_add_to_what_was_recorded(tmp_path: Path) -> None:
    path = tmp_path / "rec.zone"
    carried: dict[str, Any] = {}
    thread = FakeThread()
    first = Recorder(path, thread, Logger(), "dns", carried, {}, 30)
    first.startService()
    first.add(recorded_reply("one.rec.test.", "10.0.0.1"))
    # A reload: the next service takes the records in memory, newer than the file.
    second = Recorder(path, thread, Logger(), "dns", carried, {}, 30)
    second.startService()
    second.add(recorded_reply("two.rec.test.", "10.0.0.2"))
    thread.finish()
    thread.finish()
    lines = ["one.rec.test. 300 IN A 10.0.0.1", "two.rec.test. 300 IN A 10.0.0.2"]
    assert path.read_text().splitlines()[1:] == lines
    # A restart: the map's reading of record_to is what the recorder starts from.
    section = f"    forward: ['127.0.0.1:9']\n    record_to: {path}\n"
    restarted = Recorder(
        path, thread, Logger(), "dns", {}, DNS.parse(tmp_path, section).recorded, 30
    )
    restarted.add(recorded_reply("three.rec.test.", "10.0.0.3"))
    thread.finish()
    assert path.read_text().splitlines()[1:] == [
        lines[0],
        "three.rec.test. 300 IN A 10.0.0.3",
        lines[1],
    ]
    # Recorded to another file, nothing is carried over into it.
    other = Recorder(tmp_path / "other.zone", thread, Logger(), "dns", carried, {}, 30)
    assert other.records == {}
    path.write_text("www.rec.test. A 10.0.0.1\n")
    assert DNS.errors(tmp_path, section)[0].endswith(
        f"services.dns.record_to: {path} line 1: not OWNER TTL IN TYPE DATA, as netd records"
    )


def test_a_recorded_ns_answer_replays_as_an_answer_not_a_delegation(tmp_path: Path) -> None:
    path = tmp_path / "recorded.zone"
    thread = FakeThread()
    recorder = Recorder(path, thread, Logger(), "dns", {}, {}, 30)
    recorder.add(recorded_reply("rec.test.", "10.0.0.1"))
    ns = dns_message.make_response(dns_message.make_query("sub.rec.test", "NS"))
    ns.answer.append(dns_rrset.from_text("sub.rec.test.", 300, "IN", "NS", "ns1.sub.rec.test."))
    recorder.add(ns.to_wire())
    recorder.add(recorded_reply("www.sub.rec.test.", "10.0.0.2"))
    while thread.calls:
        thread.finish()
    replay = server(tmp_path, f"    zone_files: [{path}]\n")
    www = ask(replay, "www.sub.rec.test")
    assert texts(www) == ["www.sub.rec.test. 300 IN A 10.0.0.2"] and www.flags & dns_flags.AA
    assert texts(ask(replay, "sub.rec.test", "NS")) == ["sub.rec.test. 300 IN NS ns1.sub.rec.test."]
    # The made-up SOA is the file's, not a record: read back, it is not kept as recorded.
    assert ("sub.rec.test.", "SOA") not in {key[:2] for key in read_recorded(path.read_text())}


# -- the additional section ------------------------------------------------------------

TARGETS = """\
    records:
      lab.test:
        MX: ["10 mx.lab.test", "20 mx.elsewhere.test", "30 mx.lab.test"]
        NS: [ns.lab.test]
      mx.lab.test: {A: [10.0.0.25], AAAA: ["::25"], TXT: [not an address]}
      ns.lab.test: {A: [10.0.0.53]}
      _sip._udp.lab.test: {SRV: ["0 5 5060 sip.lab.test"]}
      sip.lab.test: {AAAA: ["::5060"]}
      many.lab.test: {MX: [SETS]}
"""


def test_mx_ns_and_srv_targets_held_locally_come_with_their_addresses(tmp_path: Path) -> None:
    many = ", ".join(f"'{i} host{i}.lab.test'" for i in range(8))
    section = TARGETS.replace("SETS", many)
    for i in range(8):
        section += f"      host{i}.lab.test: {{A: [10.1.0.{i}]}}\n"
    clock = Clock()
    context = BuildContext(
        reactor=clock,
        name="dns",
        state_dir=tmp_path,
        journal=Journal(clock),
        stats=ServiceStats(),
        log=Logger(),
        tls={},
    )
    srv = Server(DNS.parse(tmp_path, section), context)

    def additional(name: str, rdtype: str) -> list[str]:
        answer = srv.handle(dns_message.make_query(name, rdtype).to_wire(), CLIENT, True)
        assert isinstance(answer, bytes)
        reply = dns_message.from_wire(answer)
        assert reply.answer and not reply.flags & 0x0200  # never truncated for them
        # dnspython merges a record sent twice into one: count them on the wire.
        assert struct.unpack_from(">H", answer, 10)[0] == sum(map(len, reply.additional))
        return sorted(str(rrset) for rrset in reply.additional)

    # Once each, though two MX records name mx.lab.test (RFC 2181 5).
    assert additional("lab.test", "MX") == [
        "mx.lab.test. 60 IN A 10.0.0.25",
        "mx.lab.test. 60 IN AAAA ::25",
    ]
    assert additional("lab.test", "NS") == ["ns.lab.test. 60 IN A 10.0.0.53"]
    assert additional("_sip._udp.lab.test", "SRV") == ["sip.lab.test. 60 IN AAAA ::5060"]
    assert additional("lab.test", "SOA") == []
    # Eight targets' addresses would take the answer past 512 bytes: left out.
    assert additional("many.lab.test", "MX") == []


@pytest.mark.parametrize(
    ("rtype", "text"),
    [
        (dns.TXT, '"caf\\195\\169" "a \\"quote\\"" "back\\\\slash" "\\000\\255"'),
        (CAA, '0 issue "ca.example; policy=\\195\\169"'),
    ],
)
def test_record_text_reads_back_as_the_same_octets(rtype: int, text: str) -> None:
    # What the admin API, the persist file and record_to write (dnspython's escapes) is
    # read back as the same record: \DDD is an octet (RFC 1035 5.1), not three digits.
    rdata = parse_rdata(rtype, text, None)
    assert parse_rdata(rtype, rdata_text(rtype, rdata), None) == rdata
    assert "é".encode() in rdata
