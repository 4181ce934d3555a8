"""Client certificates signed by the CA netd generates for a TLS profile."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def client_certificate(
    ca_dir: Path, profile: str, into: Path, common_name: str = "test client"
) -> tuple[Path, Path]:
    """
    Sign a clientAuth certificate for C{common_name} with the CA
    C{ensure_self_signed} made for C{profile} in C{ca_dir}; write it and its
    key as C{client.pem} and C{client.key} in C{into} and return their paths.
    """
    ca_cert = x509.load_pem_x509_certificates((ca_dir / f"{profile}-ca.pem").read_bytes())[0]
    ca_key = serialization.load_pem_private_key(
        (ca_dir / f"{profile}-ca.key").read_bytes(), password=None
    )
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    into.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = into / "client.pem", into / "client.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path
