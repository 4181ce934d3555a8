"""
A self-signed profile with C{mint: true} answers any server name with a leaf
from its CA, which the admin API serves; real clients verify both.
"""

from __future__ import annotations

import socket
import ssl

import pytest

from netd.testing import AdminError, NetdProcess
from tests.conftest import StartNetd


@pytest.fixture
def netd(start_netd: StartNetd) -> NetdProcess:
    return start_netd(
        """
tls:
  lab: {self_signed: [localhost], mint: true}
  plain: {self_signed: [localhost]}
services:
  echo:
    type: echo
    listen: [{endpoint: "ssl:0:interface=127.0.0.1", tls: lab}]
"""
    )


def _echo_as(netd: NetdProcess, context: ssl.SSLContext, name: str) -> dict[str, object]:
    with (
        socket.create_connection(netd.address("echo", tls=True), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=name) as sock,
    ):
        sock.sendall(b"hello")
        assert sock.recv(100) == b"hello"
        certificate: dict[str, object] = sock.getpeercert()  # type: ignore[assignment]
        return certificate


def test_any_name_gets_a_leaf_the_served_ca_verifies(netd: NetdProcess) -> None:
    pem = netd.admin("GET", "/api/tls/lab/ca.pem")
    assert pem == netd.ca_file("lab").read_bytes()
    context = ssl.create_default_context(cadata=pem.decode())
    for name in ("shop.example.test", "api.internal.lab", "shop.example.test", "localhost"):
        alt_names = _echo_as(netd, context, name)["subjectAltName"]
        assert ("DNS", name) in alt_names  # type: ignore[operator]
    # A profile without mint serves its own names only.
    with pytest.raises(AdminError) as missing:
        netd.admin("GET", "/api/tls/nope/ca.pem")
    assert missing.value.status == 404
    assert netd.admin("GET", "/api/tls/plain/ca.pem").startswith(b"-----BEGIN CERTIFICATE-----")


def test_a_name_that_is_no_dns_name_gets_the_default_leaf(netd: NetdProcess) -> None:
    context = ssl.create_default_context(cadata=netd.admin("GET", "/api/tls/lab/ca.pem").decode())
    context.check_hostname = False
    alt_names = _echo_as(netd, context, "bad_name-.")["subjectAltName"]
    assert alt_names == (("DNS", "localhost"),)
