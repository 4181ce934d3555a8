"""Tests for netd.tls: self-signed profiles and real TLS handshakes over loopback."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import select
import socket
import ssl
import stat
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import attrs
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet.ssl import CertificateOptions

from netd.tls import KeyPair, TLSError, ensure_self_signed, server_options
from tests.certificates import client_certificate

TIMEOUT = 5.0
NAMES = ["localhost", "127.0.0.1", "::1"]

T = TypeVar("T")


# --- helpers -----------------------------------------------------------------


def _san(pem_path: Path) -> x509.SubjectAlternativeName:
    cert = x509.load_pem_x509_certificates(pem_path.read_bytes())[0]
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _client_context(
    ca: Path,
    *,
    check_hostname: bool = True,
    maximum: ssl.TLSVersion | None = None,
    cert: tuple[Path, Path] | None = None,
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(ca))  # trust only this CA, not the system store
    ctx.check_hostname = check_hostname
    # Newer Pythons verify strictly by default; the generated certs must pass that too.
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    if maximum is not None:
        ctx.maximum_version = maximum
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    return ctx


@attrs.define
class Handshake:
    peer_der: bytes | None = None
    version: str | None = None
    client_error: BaseException | None = None
    server_error: BaseException | None = None
    client_cert: x509.Certificate | None = None  # what the server saw

    @property
    def peer_san(self) -> x509.SubjectAlternativeName:
        assert self.peer_der is not None, self.client_error
        cert = x509.load_der_x509_certificate(self.peer_der)
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def _pump(sock: socket.socket, op: Callable[[], T], deadline: float) -> T:
    # The server socket is non-blocking so that every wait has a deadline.
    while True:
        try:
            return op()
        except SSL.WantReadError:
            readable, writable = [sock], []
        except SSL.WantWriteError:
            readable, writable = [], [sock]
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("TLS server timed out")
        select.select(readable, writable, [], remaining)


def _serve_one(context: SSL.Context, listener: socket.socket, result: Handshake) -> None:
    deadline = time.monotonic() + TIMEOUT
    try:
        sock, _ = listener.accept()
    except OSError as exc:
        result.server_error = exc
        return
    with sock:
        sock.setblocking(False)
        conn = SSL.Connection(context, sock)
        conn.set_accept_state()
        try:
            _pump(sock, conn.do_handshake, deadline)
            peer = conn.get_peer_certificate()
            result.client_cert = None if peer is None else peer.to_cryptography()
            _pump(sock, lambda: conn.sendall(b"x"), deadline)
            # Wait for the client to hang up, so our close cannot turn into an
            # RST that discards the byte before the client has read it.
            with contextlib.suppress(SSL.Error):
                while _pump(sock, lambda: conn.recv(1024), deadline):
                    pass
        except (SSL.Error, OSError) as exc:
            result.server_error = exc


def _handshake(
    options: CertificateOptions, client: ssl.SSLContext, server_hostname: str
) -> Handshake:
    result = Handshake()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT)
        server = threading.Thread(
            target=_serve_one, args=(options.getContext(), listener, result), daemon=True
        )
        server.start()
        try:
            with (
                socket.create_connection(listener.getsockname(), timeout=TIMEOUT) as raw,
                client.wrap_socket(raw, server_hostname=server_hostname) as conn,
            ):
                result.peer_der = conn.getpeercert(binary_form=True)
                result.version = conn.version()
                # TLS 1.3 servers reject client certificates after the client's
                # handshake has finished, so only a read proves acceptance.
                if conn.recv(1) != b"x":
                    raise ConnectionError("server closed the connection")
        except OSError as exc:
            result.client_error = exc
        server.join(TIMEOUT)
    assert not server.is_alive(), "server thread hung"
    return result


@pytest.fixture
def server(tmp_path: Path) -> tuple[KeyPair, Path]:
    return ensure_self_signed(tmp_path / "tls", "web", NAMES)


# --- ensure_self_signed --------------------------------------------------------


def test_files_and_certificate_contents(tmp_path: Path) -> None:
    directory = tmp_path / "state" / "tls"
    keypair, ca = ensure_self_signed(directory, "web", NAMES)

    assert keypair == KeyPair(chain=directory / "web.pem", key=directory / "web.key")
    assert ca == directory / "web-ca.pem"
    assert json.loads((directory / "web.names").read_text()) == NAMES

    chain = x509.load_pem_x509_certificates(keypair.chain.read_bytes())
    ca_cert = x509.load_pem_x509_certificates(ca.read_bytes())[0]
    assert len(chain) == 2
    assert chain[1] == ca_cert
    chain[0].verify_directly_issued_by(ca_cert)
    assert chain[0].subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "localhost"
    assert ca_cert.subject.rfc4514_string() == "CN=netd web CA"
    assert ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).critical

    san = _san(keypair.chain)
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    lifetime = chain[0].not_valid_after_utc - chain[0].not_valid_before_utc
    assert lifetime == timedelta(days=825, hours=1)


def test_wildcard_name_is_a_dns_name(tmp_path: Path) -> None:
    keypair, _ = ensure_self_signed(tmp_path, "wild", ["*.netd.test"])
    assert _san(keypair.chain).get_values_for_type(x509.DNSName) == ["*.netd.test"]


def test_modes(tmp_path: Path) -> None:
    directory = tmp_path / "tls"
    keypair, _ = ensure_self_signed(directory, "web", NAMES)
    assert _mode(directory) == 0o700
    assert _mode(keypair.key) == 0o600
    assert _mode(directory / "web-ca.key") == 0o600
    assert not [p.name for p in directory.iterdir() if p.name.startswith(".")]


def test_ca_and_leaf_reused_when_names_reordered(tmp_path: Path) -> None:
    keypair, ca = ensure_self_signed(tmp_path, "web", NAMES)
    files = [ca, tmp_path / "web-ca.key", keypair.chain, keypair.key]
    before = [p.read_bytes() for p in files]

    again, ca_again = ensure_self_signed(tmp_path, "web", list(reversed(NAMES)))

    assert (again, ca_again) == (keypair, ca)
    assert [p.read_bytes() for p in files] == before


def test_leaf_regenerated_but_ca_kept_when_names_change(tmp_path: Path) -> None:
    keypair, ca = ensure_self_signed(tmp_path, "web", NAMES)
    ca_bytes, ca_key_bytes = ca.read_bytes(), (tmp_path / "web-ca.key").read_bytes()
    leaf_bytes, key_bytes = keypair.chain.read_bytes(), keypair.key.read_bytes()

    ensure_self_signed(tmp_path, "web", ["localhost", "netd.test"])

    assert ca.read_bytes() == ca_bytes
    assert (tmp_path / "web-ca.key").read_bytes() == ca_key_bytes
    assert keypair.chain.read_bytes() != leaf_bytes
    assert keypair.key.read_bytes() != key_bytes
    assert _san(keypair.chain).get_values_for_type(x509.DNSName) == ["localhost", "netd.test"]
    ca_cert = x509.load_pem_x509_certificates(ca_bytes)[0]
    x509.load_pem_x509_certificates(keypair.chain.read_bytes())[0].verify_directly_issued_by(
        ca_cert
    )


def test_expiring_leaf_renewed_then_expiring_ca_renewed(tmp_path: Path) -> None:
    keypair, ca = ensure_self_signed(tmp_path, "web", NAMES)
    ca_bytes, leaf_bytes = ca.read_bytes(), keypair.chain.read_bytes()
    start = datetime.now(UTC)

    ensure_self_signed(tmp_path, "web", NAMES, now=lambda: start + timedelta(days=800))
    assert ca.read_bytes() == ca_bytes
    assert keypair.chain.read_bytes() != leaf_bytes

    ensure_self_signed(tmp_path, "web", NAMES, now=lambda: start + timedelta(days=3640))
    new_ca = x509.load_pem_x509_certificates(ca.read_bytes())[0]
    assert ca.read_bytes() != ca_bytes
    # The leaf must follow the new CA even though its own lifetime was fine.
    x509.load_pem_x509_certificates(keypair.chain.read_bytes())[0].verify_directly_issued_by(new_ca)


def test_leaf_from_foreign_ca_regenerated(tmp_path: Path) -> None:
    keypair, _ = ensure_self_signed(tmp_path / "a", "web", NAMES)
    other, _ = ensure_self_signed(tmp_path / "b", "web", NAMES)
    keypair.chain.write_bytes(other.chain.read_bytes())
    keypair.key.write_bytes(other.key.read_bytes())

    ensure_self_signed(tmp_path / "a", "web", NAMES)

    assert keypair.chain.read_bytes() != other.chain.read_bytes()


def test_corrupt_ca_is_an_error_not_replaced(tmp_path: Path) -> None:
    _, ca = ensure_self_signed(tmp_path, "web", NAMES)
    ca.write_bytes(b"not a certificate\n")
    with pytest.raises(TLSError, match="no PEM certificate found") as info:
        ensure_self_signed(tmp_path, "web", NAMES)
    assert str(ca) in str(info.value)
    assert ca.read_bytes() == b"not a certificate\n"


@pytest.mark.parametrize("profile", ["", "../x", ".hidden", "a/b"])
def test_bad_profile_name(tmp_path: Path, profile: str) -> None:
    with pytest.raises(ValueError):
        ensure_self_signed(tmp_path, profile, NAMES)


# --- server_options: handshakes ------------------------------------------------


def test_handshake_by_name_and_by_ip(server: tuple[KeyPair, Path]) -> None:
    keypair, ca = server
    options = server_options(keypair)

    by_name = _handshake(options, _client_context(ca), "localhost")
    assert by_name.client_error is None and by_name.server_error is None
    by_ip = _handshake(options, _client_context(ca), "127.0.0.1")
    assert by_ip.client_error is None and by_ip.server_error is None


def test_untrusted_ca_fails(tmp_path: Path, server: tuple[KeyPair, Path]) -> None:
    keypair, _ = server
    _, other_ca = ensure_self_signed(tmp_path / "other", "web", NAMES)
    result = _handshake(server_options(keypair), _client_context(other_ca), "localhost")
    assert isinstance(result.client_error, ssl.SSLCertVerificationError)


def test_min_version_13(server: tuple[KeyPair, Path]) -> None:
    keypair, ca = server
    options = server_options(keypair, min_version="1.3")

    modern = _handshake(options, _client_context(ca), "localhost")
    assert modern.client_error is None
    assert modern.version == "TLSv1.3"

    old = _handshake(options, _client_context(ca, maximum=ssl.TLSVersion.TLSv1_2), "localhost")
    assert isinstance(old.client_error, ssl.SSLError)
    assert old.server_error is not None


def test_min_version_12_accepts_12(server: tuple[KeyPair, Path]) -> None:
    keypair, ca = server
    client = _client_context(ca, maximum=ssl.TLSVersion.TLSv1_2)
    result = _handshake(server_options(keypair), client, "localhost")
    assert result.client_error is None
    assert result.version == "TLSv1.2"


@pytest.mark.parametrize("version", ["1.1", "1.0", "TLSv1.3", ""])
def test_bad_min_version(server: tuple[KeyPair, Path], version: str) -> None:
    with pytest.raises(ValueError):
        server_options(server[0], min_version=version)


def test_sni_exact_name(tmp_path: Path, server: tuple[KeyPair, Path]) -> None:
    keypair, ca = server
    other, other_ca = ensure_self_signed(tmp_path / "other", "other", ["other.test"])
    options = server_options(keypair, sni={"other.test": other})

    chosen = _handshake(options, _client_context(other_ca), "other.test")
    assert chosen.client_error is None
    assert chosen.peer_san.get_values_for_type(x509.DNSName) == ["other.test"]

    default = _handshake(options, _client_context(ca), "localhost")
    assert default.client_error is None
    assert default.peer_san.get_values_for_type(x509.DNSName) == ["localhost"]

    # No SNI is sent for IP addresses, which must also get the default.
    by_ip = _handshake(options, _client_context(ca), "127.0.0.1")
    assert by_ip.client_error is None


def test_sni_wildcard_matches_one_label(tmp_path: Path, server: tuple[KeyPair, Path]) -> None:
    keypair, ca = server
    wild, wild_ca = ensure_self_signed(tmp_path / "wild", "wild", ["*.wild.test"])
    options = server_options(keypair, sni={"*.wild.test": wild})

    one_label = _handshake(options, _client_context(wild_ca), "a.wild.test")
    assert one_label.client_error is None
    assert one_label.peer_san.get_values_for_type(x509.DNSName) == ["*.wild.test"]

    for name in ("a.b.wild.test", "wild.test"):
        result = _handshake(options, _client_context(ca, check_hostname=False), name)
        assert result.client_error is None, name
        assert result.peer_san.get_values_for_type(x509.DNSName) == ["localhost"], name


def test_sni_bad_pattern(tmp_path: Path, server: tuple[KeyPair, Path]) -> None:
    with pytest.raises(ValueError):
        server_options(server[0], sni={"a.*.test": server[0]})


def test_client_ca_required_and_verified(tmp_path: Path, server: tuple[KeyPair, Path]) -> None:
    keypair, ca = server
    clients_dir = tmp_path / "clients"
    _, client_ca = ensure_self_signed(clients_dir, "clients", ["clients"])
    good = client_certificate(clients_dir, "clients", tmp_path / "good", "client-1")
    rogue_dir = tmp_path / "rogue"
    ensure_self_signed(rogue_dir, "rogue", ["rogue"])
    rogue = client_certificate(rogue_dir, "rogue", tmp_path / "bad")
    options = server_options(keypair, client_ca=client_ca)

    anonymous = _handshake(options, _client_context(ca), "localhost")
    assert anonymous.client_error is not None
    assert anonymous.server_error is not None

    untrusted = _handshake(options, _client_context(ca, cert=rogue), "localhost")
    assert untrusted.client_error is not None
    assert untrusted.server_error is not None

    accepted = _handshake(options, _client_context(ca, cert=good), "localhost")
    assert accepted.client_error is None and accepted.server_error is None
    assert accepted.client_cert is not None
    assert accepted.client_cert.subject.rfc4514_string() == "CN=client-1"


def test_client_ca_names_are_sent_in_the_certificate_request(
    tmp_path: Path, server: tuple[KeyPair, Path]
) -> None:
    keypair, _ = server
    _, client_ca = ensure_self_signed(tmp_path / "clients", "clients", ["clients"])
    for options in (
        server_options(keypair, client_ca=client_ca),
        server_options(keypair, client_ca=client_ca, sni={"other.test": keypair}),
    ):
        connection = SSL.Connection(options.getContext(), None)
        names = [n.commonName for n in connection.get_client_ca_list()]
        assert names == ["netd clients CA"]
    plain = SSL.Connection(server_options(keypair).getContext(), None)
    assert plain.get_client_ca_list() == []


def test_client_ca_applies_to_sni_certificates(
    tmp_path: Path, server: tuple[KeyPair, Path]
) -> None:
    keypair, _ = server
    other, other_ca = ensure_self_signed(tmp_path / "other", "other", ["other.test"])
    clients_dir = tmp_path / "clients"
    _, client_ca = ensure_self_signed(clients_dir, "clients", ["clients"])
    good = client_certificate(clients_dir, "clients", tmp_path / "good")
    options = server_options(keypair, client_ca=client_ca, sni={"other.test": other})

    anonymous = _handshake(options, _client_context(other_ca), "other.test")
    assert anonymous.client_error is not None

    accepted = _handshake(options, _client_context(other_ca, cert=good), "other.test")
    assert accepted.client_error is None and accepted.server_error is None
    assert accepted.peer_san.get_values_for_type(x509.DNSName) == ["other.test"]


# --- server_options: file errors -------------------------------------------------


def test_missing_certificate(tmp_path: Path, server: tuple[KeyPair, Path]) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(TLSError) as info:
        server_options(KeyPair(chain=missing, key=server[0].key))
    assert str(info.value) == f"cannot read certificate {missing}: No such file or directory"


def test_missing_key_and_client_ca(tmp_path: Path, server: tuple[KeyPair, Path]) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(TLSError) as info:
        server_options(KeyPair(chain=server[0].chain, key=missing))
    assert str(info.value) == f"cannot read private key {missing}: No such file or directory"
    with pytest.raises(TLSError) as info:
        server_options(server[0], client_ca=missing)
    assert str(info.value) == f"cannot read CA certificate {missing}: No such file or directory"


def test_missing_sni_keypair(tmp_path: Path, server: tuple[KeyPair, Path]) -> None:
    missing = KeyPair(chain=tmp_path / "x.pem", key=tmp_path / "x.key")
    with pytest.raises(TLSError) as info:
        server_options(server[0], sni={"x.test": missing})
    assert str(info.value) == f"cannot read certificate {missing.chain}: No such file or directory"


def test_not_pem(tmp_path: Path, server: tuple[KeyPair, Path]) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x00\x01 this is not PEM\n")
    with pytest.raises(TLSError) as info:
        server_options(KeyPair(chain=junk, key=server[0].key))
    assert str(info.value) == f"cannot read certificate {junk}: no PEM certificate found"
    with pytest.raises(TLSError) as info:
        server_options(KeyPair(chain=server[0].chain, key=junk))
    assert str(info.value) == f"cannot read private key {junk}: not a PEM private key"


def test_key_does_not_match(tmp_path: Path, server: tuple[KeyPair, Path]) -> None:
    other, _ = ensure_self_signed(tmp_path / "other", "other", ["other.test"])
    with pytest.raises(TLSError, match="does not match") as info:
        server_options(KeyPair(chain=server[0].chain, key=other.key))
    assert str(other.key) in str(info.value)
    assert "\n" not in str(info.value)


def test_unreadable_file(
    tmp_path: Path, server: tuple[KeyPair, Path], request: pytest.FixtureRequest
) -> None:
    if os.geteuid() == 0:
        pytest.skip("root can read mode-000 files")
    locked = tmp_path / "locked.pem"
    locked.write_bytes(server[0].chain.read_bytes())
    locked.chmod(0)
    request.addfinalizer(lambda: locked.chmod(0o600))
    with pytest.raises(TLSError, match="Permission denied"):
        server_options(KeyPair(chain=locked, key=server[0].key))
