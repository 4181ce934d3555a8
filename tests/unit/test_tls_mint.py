"""netd.tls.Minter: leaves per server name, cached and bounded, and where it declines."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from OpenSSL import SSL
from OpenSSL.crypto import X509, PKey

from netd.config import parse_config
from netd.schema import ConfigErrors
from netd.tls import ensure_self_signed, minter


def test_minted_leaves_are_cached_bounded_and_signed_by_the_ca(tmp_path: Path) -> None:
    ensure_self_signed(tmp_path, "lab", ["localhost", "*.netd.test"])
    mint = minter(tmp_path, "lab", ["localhost", "*.netd.test"])
    mint.size = 2
    made: list[x509.Certificate] = []

    def build(cert: X509, chain: list[X509], key: PKey) -> SSL.Context:
        made.append(cert.to_cryptography())
        return SSL.Context(SSL.TLS_SERVER_METHOD)

    mint.build = build
    first = mint.context_for("a.example")
    assert mint.context_for("a.example") is first and len(made) == 1
    made[0].verify_directly_issued_by(mint.ca_cert)
    names = made[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["a.example"]
    mint.context_for("b.example")
    mint.context_for("c.example")
    assert list(mint.contexts) == ["b.example", "c.example"]
    # Names the profile's own leaf carries, and what no certificate may name, are declined.
    assert mint.context_for("localhost") is None
    assert mint.context_for("www.netd.test") is None
    assert mint.context_for("-bad-.example") is None
    assert mint.context_for("x" * 300) is None


def test_mint_needs_a_self_signed_profile(tmp_path: Path) -> None:
    text = "tls: {p: {cert: c.pem, key: k.pem, mint: true}}\nservices: {}\n"
    with pytest.raises(ConfigErrors, match="'mint' needs 'self_signed'"):
        parse_config(text, tmp_path / "netd.yaml")
