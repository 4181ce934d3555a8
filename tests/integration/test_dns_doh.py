"""
DNS over HTTPS (RFC 8484) in the real daemon: curl --doh-url, kdig +https and
dnspython's dns.query.https resolve through netd; bad requests are refused
with their HTTP status and the daemon goes on serving.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import ssl
import subprocess
from collections.abc import Iterator

import dns.message
import dns.query
import dns.rcode
import httpx2
import pytest

from netd.testing import NetdProcess
from tests.conftest import StartNetd

CURL = shutil.which("curl")
KDIG = shutil.which("kdig")
H2LOAD = shutil.which("h2load")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed")
needs_kdig = pytest.mark.skipif(
    KDIG is None, reason="kdig is not installed (apt-get install knot-dnsutils)"
)
LOCAL = "127.0.0.1"
H2 = dns.query.HTTPVersion.H2


@pytest.fixture
def netd(start_netd: StartNetd) -> Iterator[NetdProcess]:
    yield start_netd(
        """
tls:
  lab: {self_signed: [localhost, 127.0.0.1]}
services:
  dns:
    type: dns
    listen: ["udp:0:interface=127.0.0.1"]
    doh:
      - {endpoint: "ssl:0:interface=127.0.0.1", tls: lab}
      - "tcp:0:interface=127.0.0.1"
    records:
      www.doh.test: {A: [127.0.0.1], ttl: 120}
      doh.test: {SOA: ["ns.doh.test hostmaster.doh.test 1 3600 600 86400 45"]}
    query_log: true
"""
    )


def doh_url(netd: NetdProcess, tls: bool = True) -> str:
    listener = next(
        entry
        for entry in netd.listeners("dns")
        if entry["transport"] == "tcp" and entry["tls"] == tls
    )
    scheme = "https" if tls else "http"
    return f"{scheme}://{LOCAL}:{listener['port']}/dns-query"


def encoded(name: str, rdtype: str = "A") -> str:
    wire = dns.message.make_query(name, rdtype, id=0).to_wire()
    return base64.urlsafe_b64encode(wire).rstrip(b"=").decode()


def client(netd: NetdProcess, http2: bool = False) -> httpx2.Client:
    verify = ssl.create_default_context(cafile=netd.ca_file("lab"))
    return httpx2.Client(verify=verify, http2=http2, timeout=10)


@needs_curl
def test_curl_resolves_through_doh(netd: NetdProcess) -> None:
    assert CURL is not None
    admin = netd.ports["admin"]["listeners"][0]["port"]
    result = subprocess.run(
        [
            CURL,
            "-sS",
            "--max-time",
            "20",
            "--cacert",
            str(netd.ca_file("lab")),
            "--doh-url",
            doh_url(netd),
            f"http://www.doh.test:{admin}/healthz",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    # www.doh.test is 127.0.0.1 only in netd: curl reached the admin API through DoH.
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@needs_kdig
@pytest.mark.parametrize("method", ["+https", "+https-get"])
def test_kdig_over_https(netd: NetdProcess, method: str) -> None:
    assert KDIG is not None
    port = doh_url(netd).split(":")[2].split("/")[0]
    args = ["+https"] if method == "+https" else ["+https", "+https-get"]
    result = subprocess.run(
        [
            KDIG,
            f"@{LOCAL}",
            "-p",
            port,
            *args,
            f"+tls-ca={netd.ca_file('lab')}",
            "www.doh.test",
            "A",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "status: 200" in result.stdout, result.stdout + result.stderr
    assert "HTTP/2" in result.stdout
    assert "www.doh.test.       \t120\tIN\tA\t127.0.0.1" in result.stdout


def test_dnspython_https_sees_an_admin_change(netd: NetdProcess) -> None:
    port = int(doh_url(netd).split(":")[2].split("/")[0])
    query = dns.message.make_query("new.doh.test", "AAAA")
    verify = ssl.create_default_context(cafile=netd.ca_file("lab"))
    before = dns.query.https(query, LOCAL, port=port, verify=verify, timeout=10, http_version=H2)
    assert before.rcode() == dns.rcode.NXDOMAIN
    body = json.dumps({"values": ["::7"], "ttl": 33}).encode()
    netd.admin("PUT", "/api/services/dns/records/new.doh.test/AAAA", body)
    after = dns.query.https(query, LOCAL, port=port, verify=verify, timeout=10, http_version=H2)
    assert [str(rrset) for rrset in after.answer] == ["new.doh.test. 33 IN AAAA ::7"]
    logged = netd.queries("dns")[-1]
    assert (logged["name"], logged["transport"]) == ("new.doh.test.", "https")


@pytest.mark.parametrize("http2", [False, True])
def test_get_and_post_carry_the_ttl_as_max_age(netd: NetdProcess, http2: bool) -> None:
    with client(netd, http2) as http:
        answer = http.get(doh_url(netd), params={"dns": encoded("www.doh.test")})
        assert answer.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "application/dns-message"
        assert answer.headers["cache-control"] == "max-age=120"
        assert [str(r) for r in dns.message.from_wire(answer.content).answer] == [
            "www.doh.test. 120 IN A 127.0.0.1"
        ]
        negative = http.post(
            doh_url(netd),
            content=dns.message.make_query("nobody.doh.test", "A").to_wire(),
            headers={"content-type": "application/dns-message"},
        )
        assert negative.status_code == 200
        assert dns.message.from_wire(negative.content).rcode() == dns.rcode.NXDOMAIN
        assert negative.headers["cache-control"] == "max-age=45"  # the SOA's minimum


def test_plain_http_listener_answers_too(netd: NetdProcess) -> None:
    answer = httpx2.get(doh_url(netd, tls=False), params={"dns": encoded("www.doh.test")})
    assert answer.status_code == 200
    assert dns.message.from_wire(answer.content).answer


@pytest.mark.parametrize("http2", [False, True])
def test_bad_requests_get_their_status_and_the_daemon_serves_on(
    netd: NetdProcess, http2: bool
) -> None:
    url = doh_url(netd)
    message = "application/dns-message"
    with client(netd, http2) as http:
        assert http.get(url, params={"dns": "%%%not base64"}).status_code == 400
        assert http.get(url, params={"dns": "AAAA"}).status_code == 400  # 3 bytes: no query
        assert http.get(url).status_code == 400
        big = http.post(url, content=b"\x00" * 65536, headers={"content-type": message})
        assert big.status_code == 413
        wrong = http.post(url, content=b"\x00" * 20, headers={"content-type": "text/plain"})
        assert wrong.status_code == 415
        assert http.put(url, content=b"", headers={"content-type": message}).status_code == 405
        assert http.get(url.replace("/dns-query", "/other")).status_code == 404
        fine = http.get(url, params={"dns": encoded("www.doh.test")})
        assert fine.status_code == 200
    counters = netd.services()["dns"]["counters"]
    assert counters["doh_rejected"] >= 7


@pytest.mark.skipif(
    H2LOAD is None, reason="h2load is not installed (apt-get install nghttp2-client)"
)
def test_many_streams_in_flight_on_one_h2_connection_are_all_answered(netd: NetdProcess) -> None:
    # The batching sending loop answers streams together; each answer must still be whole.
    url = f"{doh_url(netd)}?dns={encoded('www.doh.test')}"
    assert H2LOAD is not None
    result = subprocess.run(
        [H2LOAD, "-n", "300", "-c", "1", "-m", "100", url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "300 succeeded, 0 failed, 0 errored" in result.stdout, result.stdout
    assert "status codes: 300 2xx" in result.stdout, result.stdout
    with client(netd, http2=True) as http:
        answer = http.get(doh_url(netd), params={"dns": encoded("www.doh.test")})
    assert answer.status_code == 200
    assert dns.message.from_wire(answer.content).answer[0].to_text().endswith("127.0.0.1")


def test_a_client_pipelining_without_reading_its_answers_is_cut(netd: NetdProcess) -> None:
    port = int(doh_url(netd, tls=False).split(":")[2].split("/")[0])
    get = f"GET /dns-query?dns={encoded('www.doh.test')} HTTP/1.1\r\nhost: x\r\n\r\n".encode()
    cut = False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # A small receive buffer, set before connecting: the answers pile up in netd.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(20)
        sock.connect((LOCAL, port))
        for _ in range(2000):  # 40 MB of answers at most
            try:
                sock.sendall(get * 200)
            except (ConnectionError, TimeoutError):
                cut = True
                break
    assert cut
    with client(netd) as http:
        assert http.get(doh_url(netd), params={"dns": encoded("www.doh.test")}).status_code == 200
