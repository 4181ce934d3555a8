"""
Records changed while netd runs: the admin API's C{records} view, seen by
dnspython on the next query, kept over reloads and written to C{persist: FILE}.
"""

from __future__ import annotations

import json
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from netd.testing import AdminError, NetdProcess
from tests.conftest import StartNetd
from tests.integration.test_dns import shared_port

LOCAL = "127.0.0.1"
RECORDS = "/api/services/dns/records"


def live_map(port: int, extra: str = "", ttl: int = 60) -> str:
    return f"""
services:
  dns:
    type: dns
    listen: ["udp:{port}:interface=127.0.0.1", "tcp:{port}:interface=127.0.0.1"]
    ttl: {ttl}
    records:
      live.test: {{SOA: ["ns.live.test hostmaster.live.test 1 3600 600 86400 30"]}}
      www.live.test: {{A: [10.0.0.1]}}
      mail.live.test: {{A: [10.0.0.2], MX: ["10 mail.live.test"]}}
{extra}"""


def ask(netd: NetdProcess, name: str, rdtype: str = "A") -> dns.message.Message:
    query = dns.message.make_query(name, rdtype)
    return dns.query.udp(query, LOCAL, port=netd.address("dns", "udp")[1], timeout=5)


def addresses(netd: NetdProcess, name: str, rdtype: str = "A") -> list[str]:
    return sorted(rr.to_text() for rrset in ask(netd, name, rdtype).answer for rr in rrset)


def serial(netd: NetdProcess, zone: str = "live.test") -> int:
    (rrset,) = ask(netd, zone, "SOA").answer
    value: int = rrset[0].serial
    return value


def send(netd: NetdProcess, method: str, path: str, body: object = None) -> object:
    raw = None if body is None else json.dumps(body).encode()
    return netd.admin(method, RECORDS + path, raw)


@pytest.fixture
def live(start_netd: StartNetd) -> NetdProcess:
    return start_netd(live_map(shared_port()))


def test_a_put_record_is_answered_at_once(live: NetdProcess) -> None:
    before = serial(live)
    answer = send(live, "PUT", "/new.live.test/A", {"values": ["10.0.0.9", "10.0.0.8"], "ttl": 30})
    assert answer == {
        "name": "new.live.test",
        "type": "A",
        "ttl": 30,
        "values": ["10.0.0.9", "10.0.0.8"],
    }
    reply = ask(live, "new.live.test")
    assert reply.rcode() == dns.rcode.NOERROR and reply.answer[0].ttl == 30
    assert addresses(live, "new.live.test") == ["10.0.0.8", "10.0.0.9"]
    assert serial(live) == before + 1
    event = live.wait_for("dns", "record", name="new.live.test")
    assert event["action"] == "set" and event["source"] == "admin"


def test_put_replaces_a_set_and_delete_removes_it(live: NetdProcess) -> None:
    assert addresses(live, "www.live.test") == ["10.0.0.1"]
    send(live, "PUT", "/www.live.test", {"type": "A", "values": "10.0.0.7"})
    assert addresses(live, "www.live.test") == ["10.0.0.7"]
    assert send(live, "GET", "/www.live.test/A") == {
        "name": "www.live.test",
        "type": "A",
        "ttl": 60,
        "values": ["10.0.0.7"],
    }
    removed = send(live, "DELETE", "/www.live.test/A")
    assert removed == {"removed": [send_shape("www.live.test", "A", ["10.0.0.7"])]}
    assert ask(live, "www.live.test").rcode() == dns.rcode.NXDOMAIN
    with pytest.raises(AdminError) as missing:
        send(live, "DELETE", "/www.live.test/A")
    assert missing.value.status == 404


def send_shape(name: str, rtype: str, values: list[str], ttl: int = 60) -> dict[str, object]:
    return {"name": name, "type": rtype, "ttl": ttl, "values": values}


def test_post_adds_values_and_delete_of_a_name_removes_all_its_sets(live: NetdProcess) -> None:
    added = send(live, "POST", "", {"name": "mail.live.test", "type": "A", "values": ["10.0.0.3"]})
    assert added == send_shape("mail.live.test", "A", ["10.0.0.2", "10.0.0.3"])
    assert addresses(live, "mail.live.test") == ["10.0.0.2", "10.0.0.3"]
    listed = send(live, "GET", "?name=mail.live.test")
    assert isinstance(listed, list)
    assert [(e["type"], e["live"]) for e in listed] == [("A", True), ("MX", False)]
    send(live, "DELETE", "/mail.live.test")
    assert ask(live, "mail.live.test", "MX").rcode() == dns.rcode.NXDOMAIN
    # The zone's apex keeps its SOA whatever is removed.
    assert serial(live) > 1


def test_delete_of_the_view_goes_back_to_the_map(live: NetdProcess) -> None:
    send(live, "PUT", "/www.live.test/A", {"values": ["10.0.0.7"]})
    send(live, "PUT", "/txt.live.test/TXT", {"values": ["hello world"]})
    assert addresses(live, "txt.live.test", "TXT") == ['"hello world"']
    assert live.admin("DELETE", RECORDS) == {"reverted": 3}  # the two sets and the SOA
    assert addresses(live, "www.live.test") == ["10.0.0.1"]
    assert ask(live, "txt.live.test", "TXT").rcode() == dns.rcode.NXDOMAIN


def test_bad_writes_are_refused_with_the_path_of_each_error(live: NetdProcess) -> None:
    with pytest.raises(AdminError) as refused:
        send(live, "PUT", "/www.live.test/A", {"values": ["10.0.0.7", "not-an-ip"], "ttl": -1})
    assert refused.value.status == 400
    errors = json.loads(refused.value.body)["errors"]
    assert [e["path"] for e in errors] == ["ttl", "values[1]"]
    for path, body in [
        ("/www.live.test/A", {"values": []}),
        ("/www.live.test/A", ["10.0.0.1"]),
        ("/www.live.test", {"values": ["10.0.0.1"]}),
        ("/www.live.test/A", {"type": "AAAA", "values": ["::1"]}),
        ("/bad..name/A", {"values": ["10.0.0.1"]}),
    ]:
        with pytest.raises(AdminError) as refused:
            send(live, "PUT", path, body)
        assert refused.value.status == 400, (path, body)
    with pytest.raises(AdminError) as refused:
        send(live, "DELETE", "/live.test/SOA")
    assert refused.value.status == 409
    with pytest.raises(AdminError) as refused:
        send(live, "GET", "/www.live.test/BOGUS")
    assert refused.value.status == 404
    # Nothing refused changed anything, and the daemon answers as before.
    assert addresses(live, "www.live.test") == ["10.0.0.1"]
    assert serial(live) == 1


def test_live_changes_survive_a_reload_of_other_keys(start_netd: StartNetd) -> None:
    port = shared_port()
    netd = start_netd(live_map(port))
    send(netd, "PUT", "/new.live.test/A", {"values": ["10.0.0.9"]})
    send(netd, "PUT", "/mail.live.test/A", {"values": ["10.0.0.5"]})
    # A changed ttl rebuilds the service; the map's own mail record changes too.
    changed = live_map(port, ttl=90).replace("[10.0.0.2]", "[10.0.0.6]")
    assert netd.reload(changed)["restarted"] == ["dns"]
    assert addresses(netd, "new.live.test") == ["10.0.0.9"]
    # The map's new word on a set changed live wins over the live change.
    assert addresses(netd, "mail.live.test") == ["10.0.0.6"]
    # The SOA's TTL is the map's new one, its serial never goes back.
    (soa,) = ask(netd, "live.test", "SOA").answer
    assert (soa.ttl, soa[0].serial) == (90, 3)


def test_persist_writes_changes_back_and_a_restart_reads_them(
    start_netd: StartNetd, tmp_path: Path
) -> None:
    persist = tmp_path / "live.json"
    port = shared_port()
    config = live_map(port, f"    persist: {persist}\n")
    netd = start_netd(config)
    send(netd, "PUT", "/new.live.test/AAAA", {"values": ["::9"]})
    send(netd, "DELETE", "/www.live.test/A")
    netd.stop()  # stopping waits for the last write
    saved = json.loads(persist.read_text())
    assert [(c["name"], c["type"], c["values"]) for c in saved["changes"]] == [
        ("live.test", "SOA", saved["changes"][0]["values"]),
        ("new.live.test", "AAAA", ["::9"]),
        ("www.live.test", "A", None),
    ]
    again = start_netd(config)
    assert addresses(again, "new.live.test", "AAAA") == ["::9"]
    assert ask(again, "www.live.test").rcode() == dns.rcode.NXDOMAIN
    assert serial(again) == 3


def test_a_broken_persist_file_stops_the_start(start_netd: StartNetd, tmp_path: Path) -> None:
    persist = tmp_path / "live.json"
    persist.write_text('{"changes": [{"name": "x.live.test"}]}')
    with pytest.raises(Exception, match="not live record changes"):
        start_netd(live_map(shared_port(), f"    persist: {persist}\n"))
