"""Tests for netd.endpoints: endpoint strings, checked offline and listened on a MemoryReactor."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import (
    IOpenSSLServerConnectionCreator,
    IProtocol,
    IProtocolFactory,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor, MemoryReactorClock, StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from netd import endpoints
from netd.connections import SendsNowFactory

BASE = Path("/srv/netd")


@implementer(IOpenSSLServerConnectionCreator)
class FakeCreator:
    """Stands in for a TLS profile; records the connections it was asked for."""

    def __init__(self) -> None:
        self.asked: list[object] = []

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        self.asked.append(tlsProtocol)
        return SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)


def _accept_with(listening: IProtocolFactory, creator: FakeCreator) -> IProtocol:
    """Accept one connection on a recorded factory; TLS asks the creator at once."""
    protocol = listening.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
    assert protocol is not None
    protocol.makeConnection(StringTransport())
    assert creator.asked == [protocol]
    return protocol


def _tls_under(listening: IProtocolFactory) -> TLSMemoryBIOFactory:
    """A TLS listener's TLS factory, under the layer that sends what TLS writes at once."""
    assert isinstance(listening, SendsNowFactory)
    tls = listening.wrappedFactory
    assert isinstance(tls, TLSMemoryBIOFactory)
    return tls


def _factory() -> Factory:
    return Factory.forProtocol(Protocol)


def _write_server_pem(path: Path) -> None:
    """A self-signed certificate and its key in one PEM file, as C{ssl:privateKey=} takes."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        + cert.public_bytes(serialization.Encoding.PEM)
    )


# --- normalize ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("description", "expected"),
    [
        ("unix:run/echo.sock", "unix:/srv/netd/run/echo.sock"),
        ("unix:address=run/echo.sock:mode=600", "unix:address=/srv/netd/run/echo.sock:mode=600"),
        (
            "ssl:443:privateKey=key.pem:certKey=/etc/cert.pem",
            "ssl:443:privateKey=/srv/netd/key.pem:certKey=/etc/cert.pem",
        ),
        (
            "ssl:443:privateKey=k.pem:extraCertChain=chain.pem",
            "ssl:443:privateKey=/srv/netd/k.pem:extraCertChain=/srv/netd/chain.pem",
        ),
        ("unix:a\\:b.sock", "unix:/srv/netd/a\\:b.sock"),
    ],
)
def test_normalize_makes_paths_absolute(description: str, expected: str) -> None:
    assert endpoints.normalize(description, BASE) == expected


@pytest.mark.parametrize(
    "description",
    ["unix:/run/echo.sock", "ssl:443:privateKey=/etc/key.pem", "tcp:0", "ssl:443", "udp:7"],
)
def test_normalize_leaves_the_rest_alone(description: str) -> None:
    assert endpoints.normalize(description, BASE) == description


@pytest.mark.parametrize("folder", ["/srv/a:b", "/srv/x=y", "/srv/back\\slash"])
def test_normalize_escapes_what_endpoint_syntax_would_split(folder: str) -> None:
    """Whatever the folder is called, Twisted parses back exactly the joined path."""
    normalized = endpoints.normalize("unix:run/echo.sock", Path(folder))
    reactor = MemoryReactor()
    endpoints.server_endpoint(reactor, normalized, BASE).listen(_factory())
    assert reactor.unixServers[0][0] == f"{folder}/run/echo.sock"


# --- looking inside descriptions ---------------------------------------------------


@pytest.mark.parametrize(
    ("description", "key"),
    [
        ("tcp:8080", "tcp:*:8080"),
        ("tcp:port=8080", "tcp:*:8080"),
        ("ssl:8080", "tcp:*:8080"),
        ("tcp6:8080", "tcp:*:8080"),
        ("tcp:8080:interface=127.0.0.1", "tcp:127.0.0.1:8080"),
        ("udp:8080", "udp:*:8080"),
        ("udp:8080:interface=127.0.0.1", "udp:127.0.0.1:8080"),
        ("tcp:0", None),
        ("tcp:port=0", None),
        ("udp:0", None),
        ("ssl:0:interface=127.0.0.1", None),
        ("unix:/run/a.sock", "unix:/run/a.sock"),
        ("unix:address=/run/a.sock", "unix:/run/a.sock"),
    ],
)
def test_identity(description: str, key: str | None) -> None:
    assert endpoints.identity(description) == key


def test_identity_of_systemd_sockets() -> None:
    by_name = endpoints.identity("systemd:domain=INET:name=web")
    assert by_name is not None
    assert by_name == endpoints.identity("systemd:domain=INET6:name=web")
    assert by_name != endpoints.identity("systemd:domain=INET:name=other")
    assert by_name != endpoints.identity("systemd:domain=INET:index=0")
    assert endpoints.identity("systemd:domain=INET:index=0") == endpoints.identity(
        "systemd:domain=INET:index=0"
    )


@pytest.mark.parametrize(
    ("description", "loopback"),
    [
        ("tcp:80:interface=127.0.0.1", True),
        ("tcp:80:interface=127.1.2.3", True),
        ("tcp6:80:interface=\\:\\:1", True),
        ("ssl:443:interface=127.0.0.1", True),
        ("udp:53:interface=127.0.0.1", True),
        ("unix:/run/netd/admin.sock", True),
        ("tcp:80", False),
        ("tcp:80:interface=0.0.0.0", False),
        ("tcp6:80:interface=\\:\\:", False),
        ("tcp:80:interface=192.168.1.1", False),
        ("tcp:80:interface=localhost", False),
        ("systemd:domain=INET:index=0", False),
    ],
)
def test_is_loopback(description: str, loopback: bool) -> None:
    assert endpoints.is_loopback(description) is loopback


@pytest.mark.parametrize(
    ("description", "own", "wants"),
    [
        ("ssl:443", False, True),
        ("ssl:port=443:interface=127.0.0.1", False, True),
        ("SSL:443", False, True),
        ("ssl:443:privateKey=key.pem", True, False),
        ("tcp:443", False, False),
        ("udp:53", False, False),
        ("systemd:domain=INET:index=0", False, False),
    ],
)
def test_has_own_tls_and_wants_profile(description: str, own: bool, wants: bool) -> None:
    assert endpoints.has_own_tls(description) is own
    assert endpoints.wants_profile(description) is wants


@pytest.mark.parametrize(
    ("description", "datagram"), [("udp:53", True), ("UDP:53", True), ("tcp:53", False)]
)
def test_is_datagram(description: str, datagram: bool) -> None:
    assert endpoints.is_datagram(description) is datagram


@pytest.mark.parametrize(
    ("description", "parsed"),
    [
        ("udp:7", (7, "")),
        ("udp:0", (0, "")),
        ("udp:65535", (65535, "")),
        ("udp:7:interface=127.0.0.1", (7, "127.0.0.1")),
        ("udp:7:interface=\\:\\:1", (7, "::1")),
    ],
)
def test_parse_udp(description: str, parsed: tuple[int, str]) -> None:
    assert endpoints.parse_udp(description) == parsed


@pytest.mark.parametrize(
    ("description", "message"),
    [
        ("udp:65536", "port 65536 is out of range"),
        ("udp:-1", "port -1 is out of range"),
        ("udp:seven", "invalid literal for int"),
        ("udp:7:8", "expected udp:PORT"),
        ("udp:port=7", "expected udp:PORT"),
        ("tcp:7", "expected udp:PORT"),
        ("udp:7:colour=red", "unknown udp: option colour"),
        ("udp:7:interface=example.com", "does not appear to be an IPv4 or IPv6 address"),
    ],
)
def test_parse_udp_rejects(description: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        endpoints.parse_udp(description)


# --- check -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "description",
    [
        "tcp:0",
        "tcp:8080:interface=127.0.0.1:backlog=5",
        "tcp6:0:interface=\\:\\:1",
        "unix:run/echo.sock",
        "udp:0:interface=127.0.0.1",
        "ssl:0",
        "ssl:port=0:interface=127.0.0.1:backlog=10",
        "systemd:domain=INET:index=0",
        "systemd:domain=UNIX:name=echo",
    ],
)
def test_check_accepts(description: str) -> None:
    assert endpoints.check(description, BASE) is None


@pytest.mark.parametrize(
    ("description", "message"),
    [
        ("", "bad endpoint '': Unknown endpoint type: ''"),
        ("tcp", "bad endpoint 'tcp': unexpected or missing arguments"),
        ("tcp:0:backlog=x", "bad endpoint 'tcp:0:backlog=x': invalid literal for int()"),
        ("ssl:abc", "bad endpoint 'ssl:abc': invalid literal for int()"),
        (
            "ssl:0:sslmethod=TLSv1_METHOD",
            "bad endpoint 'ssl:0:sslmethod=TLSv1_METHOD': "
            "option sslmethod cannot be combined with a profile",
        ),
        ("systemd:domain=INET:index=x", "bad endpoint 'systemd:domain=INET:index=x': invalid"),
    ],
)
def test_check_rejects(description: str, message: str) -> None:
    problem = endpoints.check(description, BASE)
    assert problem is not None
    assert problem.startswith(message), problem


def test_check_loads_key_material_relative_to_the_map(tmp_path: Path) -> None:
    _write_server_pem(tmp_path / "server.pem")
    assert endpoints.check("ssl:0:privateKey=server.pem", tmp_path) is None
    problem = endpoints.check("ssl:0:privateKey=server.pem", tmp_path / "elsewhere")
    assert problem is not None
    assert "No such file or directory" in problem
    assert str(tmp_path / "elsewhere" / "server.pem") in problem


# --- server_endpoint ---------------------------------------------------------------


def test_server_endpoint_plain_tcp() -> None:
    reactor = MemoryReactor()
    factory = _factory()
    endpoints.server_endpoint(reactor, "tcp:7007:interface=127.0.0.1", BASE).listen(factory)
    assert reactor.tcpServers == [(7007, factory, 50, "127.0.0.1")]
    assert reactor.sslServers == []


def test_server_endpoint_ssl_with_profile_wraps_plain_tcp() -> None:
    reactor = MemoryReactorClock()
    factory = _factory()
    creator = FakeCreator()
    endpoint = endpoints.server_endpoint(
        reactor, "ssl:7443:interface=127.0.0.1:backlog=7", BASE, creator
    )
    endpoint.listen(factory)
    ((port, listening, backlog, interface),) = reactor.tcpServers
    assert (port, backlog, interface) == (7443, 7, "127.0.0.1")
    tls = _tls_under(listening)
    assert tls.wrappedFactory is factory
    _accept_with(tls, creator)
    assert reactor.sslServers == []  # TLS by memory BIO, not the reactor's own listenSSL


def test_server_endpoint_ssl_with_profile_on_ipv6() -> None:
    reactor = MemoryReactorClock()
    creator = FakeCreator()
    endpoints.server_endpoint(reactor, "ssl:port=0:interface=\\:\\:1", BASE, creator).listen(
        _factory()
    )
    ((port, listening, _, interface),) = reactor.tcpServers
    assert (port, interface) == (0, "::1")
    _accept_with(_tls_under(listening), creator)


def test_server_endpoint_profile_on_another_stream_endpoint() -> None:
    reactor = MemoryReactorClock()
    factory = _factory()
    creator = FakeCreator()
    endpoints.server_endpoint(reactor, "unix:run/tls.sock", BASE, creator).listen(factory)
    ((address, listening, *_),) = reactor.unixServers
    assert address == "/srv/netd/run/tls.sock"
    tls = _tls_under(listening)
    assert tls.wrappedFactory is factory
    _accept_with(tls, creator)


def test_server_endpoint_unix_path_relative_to_the_map() -> None:
    reactor = MemoryReactor()
    factory = _factory()
    endpoints.server_endpoint(reactor, "unix:run/echo.sock", BASE).listen(factory)
    ((address, listening, *_),) = reactor.unixServers
    assert address == "/srv/netd/run/echo.sock"
    assert listening is factory


def test_server_endpoint_ssl_with_own_key(tmp_path: Path) -> None:
    _write_server_pem(tmp_path / "server.pem")
    reactor = MemoryReactor()
    factory = _factory()
    endpoints.server_endpoint(reactor, "ssl:7443:privateKey=server.pem", tmp_path).listen(factory)
    ((port, listening, _, _, _),) = reactor.sslServers
    assert (port, listening) == (7443, factory)
    assert reactor.tcpServers == []
