"""
DNS over HTTPS upstreams that answer wrongly (another content type, a body
over 65535 bytes, an answer to another question, an HTTP error) count as
failed: the next upstream answers, and netd goes on serving.
"""

from __future__ import annotations

import ssl
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import dns.message
import dns.query
import dns.rrset
import pytest

from netd.tls import ensure_self_signed
from tests.conftest import StartNetd
from tests.fakes.upstreams import QuietHandler
from tests.integration.test_dns_forward_tls import start_resolver

pytestmark = pytest.mark.integration

LOCAL = "127.0.0.1"


class _DoH(QuietHandler):
    asked: Counter[str]

    def do_POST(self) -> None:
        self.asked[self.path] += 1
        query = dns.message.from_wire(self.rfile.read(int(self.headers["Content-Length"])))
        reply = dns.message.make_response(query)
        reply.answer = [dns.rrset.from_text(query.question[0].name, 60, "IN", "A", "10.7.0.1")]
        body, media = reply.to_wire(), "application/dns-message"
        if self.path == "/wrong-type":
            media = "text/plain"
        elif self.path == "/huge":
            body = body + b"\0" * 70_000
        elif self.path == "/other-question":
            other = dns.message.make_query("other.test", "A", id=query.id)
            body = dns.message.make_response(other).to_wire()
        elif self.path == "/error":
            self.answer(500, b"broken")
            return
        self.send_response(200)
        self.send_header("Content-Type", media)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def bad_doh(tmp_path: Path) -> Iterator[tuple[int, Path, Counter[str]]]:
    keys, ca = ensure_self_signed(tmp_path / "tls", "bad", ["doh.bad.test"])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(keys.chain, keys.key)
    asked: Counter[str] = Counter()
    server = ThreadingHTTPServer((LOCAL, 0), type("DoH", (_DoH,), {"asked": asked}))
    server.socket = context.wrap_socket(server.socket, server_side=True)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], ca, asked
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_wrong_answers_from_doh_upstreams_count_as_failures(
    start_netd: StartNetd, bad_doh: tuple[int, Path, Counter[str]]
) -> None:
    port, ca, asked = bad_doh
    paths = ["/wrong-type", "/huge", "/other-question", "/error", "/dns-query"]
    upstreams = "\n".join(
        f'    - {{address: "https://127.0.0.1:{port}{path}", ca: {ca}, server_name: doh.bad.test}}'
        for path in paths
    )
    resolver = start_resolver(
        start_netd,
        f"""
cache: {{size: 0}}
forward:
  upstreams:
{upstreams}
  timeout: 5
""",
    )
    for name in ("www.bad.test", "again.bad.test"):
        query = dns.message.make_query(name, "A")
        reply = dns.query.udp(query, LOCAL, port=resolver.address("resolver", "udp")[1], timeout=30)
        assert [str(r) for r in reply.answer] == [f"{name}. 60 IN A 10.7.0.1"]
    # The second question starts with the upstream that answered the first.
    assert asked == {**{path: 1 for path in paths}, "/dns-query": 2}
    counters = resolver.services()["resolver"]["counters"]
    assert counters["upstream_failures"] == 4 and counters["upstream_queries"] == 6
    resolver.stop()
    assert "Unhandled" not in resolver.output and "Traceback" not in resolver.output
