"""
A TLS profile from PEM files with min_version and client_ca, served by the real
daemon and met by Python's ssl module as the client.
"""

from __future__ import annotations

import smtplib
import socket
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from netd.testing import NetdProcess
from netd.tls import ensure_self_signed
from tests.certificates import client_certificate
from tests.conftest import StartNetd


def test_pem_profile_with_client_certificates_and_tls13(
    start_netd: StartNetd, tmp_path: Path
) -> None:
    server, server_ca = ensure_self_signed(tmp_path / "server", "site", ["localhost"])
    ensure_self_signed(tmp_path / "clients", "clients", ["clients.test"])
    client_cert, client_key = client_certificate(tmp_path / "clients", "clients", tmp_path)
    netd = start_netd(
        f"""
tls:
  files:
    cert: {server.chain}
    key: {server.key}
    min_version: "1.3"
    client_ca: {tmp_path / "clients" / "clients-ca.pem"}
services:
  echo:
    type: echo
    listen: [{{endpoint: "ssl:0:interface=127.0.0.1", tls: files}}]
"""
    )
    address = netd.address("echo", tls=True)

    def client(certificate: bool = True, tls12_only: bool = False) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(server_ca))
        if certificate:
            context.load_cert_chain(client_cert, client_key)
        if tls12_only:
            context.maximum_version = ssl.TLSVersion.TLSv1_2
        return context

    with client().wrap_socket(
        socket.create_connection(address, timeout=5), server_hostname="localhost"
    ) as tls:
        assert tls.version() == "TLSv1.3"
        tls.sendall(b"mutual")
        assert tls.recv(100) == b"mutual"

    with (
        pytest.raises(ssl.SSLError),
        client(tls12_only=True).wrap_socket(
            socket.create_connection(address, timeout=5), server_hostname="localhost"
        ),
    ):
        pass

    # TLS 1.3 asks for the client certificate after the handshake: the refusal
    # shows on the first read, as an alert or a closed connection.
    with (
        client(certificate=False).wrap_socket(
            socket.create_connection(address, timeout=5), server_hostname="localhost"
        ) as anonymous,
        pytest.raises((ssl.SSLError, ConnectionResetError)),
    ):
        anonymous.sendall(b"who am I")
        if not anonymous.recv(100):
            raise ConnectionResetError("closed without an answer")
    assert netd.process.poll() is None


def _starttls_names(address: tuple[str, int], ca_file: Path) -> list[str]:
    context = ssl.create_default_context(cafile=str(ca_file))
    with smtplib.SMTP(*address, timeout=10) as client:
        client.starttls(context=context)
        der = client.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
    names = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    return names.value.get_values_for_type(x509.DNSName)


def test_reload_applies_a_changed_profile_used_only_for_starttls(tmp_path: Path) -> None:
    def mail_map(names: list[str]) -> dict[str, object]:
        return {
            "tls": {"mailtls": {"self_signed": [*names, "127.0.0.1"]}},
            "services": {
                "mail": {
                    "type": "smtp",
                    "listen": ["tcp:0:interface=127.0.0.1"],
                    "tls": "mailtls",
                    "delivery": {"mode": "capture"},
                }
            },
        }

    with NetdProcess.start(mail_map(["localhost"]), tmp_path) as netd:
        assert _starttls_names(netd.address("mail"), netd.ca_file("mailtls")) == ["localhost"]
        result = netd.reload(mail_map(["localhost", "mail.changed.test"]))
        assert result["restarted"] == ["mail"]
        names = _starttls_names(netd.address("mail"), netd.ca_file("mailtls"))
        assert names == ["localhost", "mail.changed.test"]


def _served_certificate(address: tuple[str, int]) -> bytes:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with context.wrap_socket(socket.create_connection(address, timeout=5)) as tls:
        served = tls.getpeercert(binary_form=True)
    assert served is not None
    return served


def _leaf(chain: Path) -> bytes:
    return x509.load_pem_x509_certificates(chain.read_bytes())[0].public_bytes(Encoding.DER)


def test_a_reload_serves_a_certificate_renewed_in_place(
    start_netd: StartNetd, tmp_path: Path
) -> None:
    first, _ = ensure_self_signed(tmp_path / "first", "site", ["localhost"])
    renewed, _ = ensure_self_signed(tmp_path / "renewed", "site", ["localhost"])
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(first.chain.read_bytes())
    key.write_bytes(first.key.read_bytes())
    netd = start_netd(
        f"""
tls:
  files: {{cert: {cert}, key: {key}}}
services:
  echo:
    type: echo
    listen: [{{endpoint: "ssl:0:interface=127.0.0.1", tls: files}}]
"""
    )
    address = netd.address("echo", tls=True)
    before = _served_certificate(address)
    assert before == _leaf(first.chain)
    # Same file names, new contents: as certbot and acme.sh renew.
    cert.write_bytes(renewed.chain.read_bytes())
    key.write_bytes(renewed.key.read_bytes())
    assert netd.reload()["restarted"] == ["echo"]
    assert _served_certificate(address) == _leaf(renewed.chain)
    assert netd.reload()["unchanged"] == ["echo"]  # nothing renewed since


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_a_session_is_resumed(start_netd: StartNetd, version: ssl.TLSVersion) -> None:
    """
    Session tickets, as nginx gives them: a client's next connection skips the
    full handshake, and an FTPS data connection can resume its control
    connection's session, as curl does.
    """
    netd = start_netd(
        """
tls:
  lab: {self_signed: [localhost]}
services:
  echo:
    type: echo
    listen: [{endpoint: "ssl:0:interface=127.0.0.1", tls: lab}]
"""
    )
    context = ssl.create_default_context(cafile=str(netd.ca_file("lab")))
    context.maximum_version = version
    address = netd.address("echo", tls=True)
    with context.wrap_socket(
        socket.create_connection(address), server_hostname="localhost"
    ) as first:
        first.sendall(b"x")
        assert first.recv(10) == b"x"  # TLS 1.3's tickets come after the handshake
        session = first.session
    with context.wrap_socket(
        socket.create_connection(address), server_hostname="localhost", session=session
    ) as again:
        again.sendall(b"y")
        assert again.recv(10) == b"y"
        assert again.session_reused
