"""TLS key material: self-signed profiles and Twisted server policies from PEM files.

Everything here runs at start-up or reload, so file I/O is synchronous.  The one
exception is L{Minter}, which signs a leaf (in memory, no I/O) during a handshake.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import re
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeAlias

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from OpenSSL.crypto import X509, PKey
from twisted.internet.ssl import CertificateOptions, TLSVersion

from netd.compat.tls import protosFromProtocol
from netd.records import Record

__all__ = ["KeyPair", "Minter", "TLSError", "ensure_self_signed", "minter", "server_options"]

_CA_LIFETIME = timedelta(days=3650)
# 825 days is the longest lifetime Apple platforms accept for a server certificate.
_LEAF_LIFETIME = timedelta(days=825)
_RENEW_BEFORE = timedelta(days=30)
_BACKDATE = timedelta(hours=1)
_CN_MAX = 64  # ub-common-name; cryptography refuses longer values

# What both OpenSSL (via pyOpenSSL) and X.509 signing can use; cryptography's own
# issuer-key union also admits post-quantum keys pyOpenSSL cannot load.
_SigningKey: TypeAlias = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)
_SIGNING_KEYS = (
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)

_PROFILE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SERVER_NAME_RE = re.compile(
    r"([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?"
)
# Minted leaves kept per profile; the least recently asked for goes first.
MINTED_CACHE = 1024
_MIN_VERSIONS = {"1.2": TLSVersion.TLSv1_2, "1.3": TLSVersion.TLSv1_3}


class TLSError(Exception):
    """A profile's files are missing, unreadable or do not match.

    ``str()`` is a one-line message naming the offending file.
    """


@attrs.frozen(repr=False)
class KeyPair(Record):
    """PEM files for one identity."""

    chain: Path  # leaf certificate first, then chain certificates
    key: Path


def _utc_now() -> datetime:
    """The wall clock in UTC: what certificates are dated and checked against."""
    return datetime.now(UTC)


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TLSError(f"cannot read {what} {path}: {_reason(exc)}") from exc


def _parse_certificates(data: bytes, path: Path, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise TLSError(f"cannot read {what} {path}: no PEM certificate found")
    return certs


def _parse_key(data: bytes, path: Path) -> _SigningKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:
        raise TLSError(f"cannot read private key {path}: encrypted keys are not supported") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise TLSError(f"cannot read private key {path}: not a PEM private key") from exc
    if not isinstance(key, _SIGNING_KEYS):
        raise TLSError(f"cannot use private key {path}: unsupported key type")
    return key


def _load_certificates(path: Path, what: str) -> list[x509.Certificate]:
    return _parse_certificates(_read(path, what), path, what)


def _load_key(path: Path) -> _SigningKey:
    return _parse_key(_read(path, "private key"), path)


def _matches(cert: x509.Certificate, key: _SigningKey) -> bool:
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return cert.public_key().public_bytes(der, spki) == key.public_key().public_bytes(der, spki)


def _signature_hash(key: _SigningKey) -> hashes.SHA256 | None:
    # EdDSA has its hash built in; cryptography insists on None for it.
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        return None
    return hashes.SHA256()


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    # mkstemp creates the file 0o600 from the start, so a key is never briefly
    # world-readable, and os.replace means readers never see a half-written file.
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise TLSError(f"cannot write {path}: {_reason(exc)}") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise TLSError(f"cannot write {path}: {_reason(exc)}") from exc


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _make_ca(profile: str, now: datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"netd {profile} CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _make_leaf(
    names: Sequence[str],
    ca_cert: x509.Certificate,
    ca_key: _SigningKey,
    profile: str,
    now: datetime,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    # Clients match on the SAN; the CN is only a label for humans reading the cert.
    cn = names[0] if len(names[0]) <= _CN_MAX else f"netd {profile}"
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _LEAF_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, _signature_hash(ca_key))
    )
    return cert, key


def _usable_ca(
    cert_path: Path, key_path: Path, now: datetime
) -> tuple[x509.Certificate, _SigningKey] | None:
    if not (cert_path.exists() and key_path.exists()):
        return None
    # Parse errors are raised, not papered over: clients may already trust this
    # CA, so silently replacing a file we cannot read would break them.
    cert = _load_certificates(cert_path, "CA certificate")[0]
    key = _load_key(key_path)
    if not _matches(cert, key):
        # Only an interrupted regeneration leaves this; the pair is unusable either way.
        return None
    if cert.not_valid_after_utc - now <= _RENEW_BEFORE:
        return None
    return cert, key


def _leaf_reusable(
    paths: tuple[Path, Path, Path], names: Sequence[str], ca_cert: x509.Certificate, now: datetime
) -> bool:
    chain_path, key_path, names_path = paths
    if not all(p.exists() for p in paths):
        return False
    recorded = _read(names_path, "names file")
    chain_pem = _read(chain_path, "certificate")
    key_pem = _read(key_path, "private key")
    try:
        wanted = json.loads(recorded)
    except ValueError:
        return False
    if not (isinstance(wanted, list) and all(isinstance(n, str) for n in wanted)):
        return False
    if set(wanted) != set(names):
        return False
    # Unreadable files were raised above; unparseable ones are just regenerated
    # because the leaf, unlike the CA, is disposable.
    try:
        leaf = _parse_certificates(chain_pem, chain_path, "certificate")[0]
        key = _parse_key(key_pem, key_path)
    except TLSError:
        return False
    if not _matches(leaf, key) or leaf.not_valid_after_utc - now <= _RENEW_BEFORE:
        return False
    try:
        leaf.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def ensure_self_signed(
    directory: Path,
    profile: str,
    names: Sequence[str],
    now: Callable[[], datetime] = _utc_now,
) -> tuple[KeyPair, Path]:
    """Create (or reuse) a CA and a leaf for `names` in `directory`.

    `now` is the clock certificates are dated and checked for renewal against.
    Returns the leaf key pair and the path of the CA certificate.
    """
    if not _PROFILE_RE.fullmatch(profile):
        raise ValueError(f"invalid TLS profile name {profile!r}")
    if isinstance(names, str) or not names or not all(names):
        raise ValueError("names must be a non-empty sequence of non-empty host names")

    try:
        if not directory.is_dir():
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            # mkdir's mode is filtered through the umask; the spec is exact.
            directory.chmod(0o700)
    except OSError as exc:
        raise TLSError(f"cannot create directory {directory}: {_reason(exc)}") from exc

    ca_path = directory / f"{profile}-ca.pem"
    ca_key_path = directory / f"{profile}-ca.key"
    keypair = KeyPair(chain=directory / f"{profile}.pem", key=directory / f"{profile}.key")
    names_path = directory / f"{profile}.names"
    when = now()

    ca = _usable_ca(ca_path, ca_key_path, when)
    if ca is None:
        new_cert, new_key = _make_ca(profile, when)
        _write_atomic(ca_key_path, _key_pem(new_key), 0o600)
        _write_atomic(ca_path, _cert_pem(new_cert), 0o644)
        ca = new_cert, new_key
    ca_cert, ca_key = ca

    if not _leaf_reusable((keypair.chain, keypair.key, names_path), names, ca_cert, when):
        leaf, leaf_key = _make_leaf(names, ca_cert, ca_key, profile, when)
        _write_atomic(keypair.key, _key_pem(leaf_key), 0o600)
        _write_atomic(keypair.chain, _cert_pem(leaf) + _cert_pem(ca_cert), 0o644)
        # Written last: it is what marks the leaf as complete on the next start.
        _write_atomic(names_path, json.dumps(list(names)).encode() + b"\n", 0o644)
    return keypair, ca_path


def _load_keypair(keypair: KeyPair) -> tuple[X509, list[X509], PKey]:
    certs = _load_certificates(keypair.chain, "certificate")
    key = _load_key(keypair.key)
    if not _matches(certs[0], key):
        raise TLSError(f"private key {keypair.key} does not match certificate {keypair.chain}")
    pkey = PKey.from_cryptography_key(key)
    return X509.from_cryptography(certs[0]), [X509.from_cryptography(c) for c in certs[1:]], pkey


def _sni_pattern(name: str) -> str:
    pattern = name.lower().rstrip(".")
    if "*" in pattern and not (
        pattern.startswith("*.") and "*" not in pattern[2:] and len(pattern) > 2
    ):
        raise ValueError(f"invalid SNI name {name!r}: only a leading '*.' wildcard is allowed")
    if not pattern:
        raise ValueError("empty SNI name")
    return pattern


def _sni_selector(
    exact: dict[str, SSL.Context],
    wildcard: dict[str, SSL.Context],
    mint: Minter | None = None,
) -> Callable[[bytes | None], SSL.Context | None]:
    def select(server_name: bytes | None) -> SSL.Context | None:
        # Twisted answers an exception here by calling abortConnection() on the
        # connection's app data, which only exists under the reactor, so this
        # must never raise; None keeps the default certificate.
        if server_name is None:
            return None
        try:
            name = server_name.decode("ascii").lower().rstrip(".")
        except UnicodeDecodeError:
            return None
        if name in exact:
            return exact[name]
        label, _, parent = name.partition(".")
        found = wildcard.get(parent) if label and parent else None
        if found is None and mint is not None:
            return mint.context_for(name)
        return found

    return select


class Minter:
    """
    Leaves for any server name a client asks for, signed by a C{self_signed}
    profile's CA (C{mint: true}): whoever trusts that one CA trusts every name.

    Each leaf is made in memory during the handshake that first asks for its
    name (an EC P-256 key and a signature: about a millisecond) and cached,
    at most L{MINTED_CACHE} of them.  Names the profile's own leaf carries are
    left to it.
    """

    def __init__(
        self,
        ca_cert: x509.Certificate,
        ca_key: _SigningKey,
        profile: str,
        covered: Sequence[str],
        size: int = MINTED_CACHE,
        now: Callable[[], datetime] = _utc_now,
    ) -> None:
        self.ca_cert = ca_cert
        self.ca_key = ca_key
        self.profile = profile
        self.covered = {name.lower().rstrip(".") for name in covered}
        self.size = size
        self.now = now
        self.build: Callable[[X509, list[X509], PKey], SSL.Context] | None = None
        self.contexts: OrderedDict[str, SSL.Context] = OrderedDict()

    def _covered(self, name: str) -> bool:
        parent = name.partition(".")[2]
        return name in self.covered or (bool(parent) and f"*.{parent}" in self.covered)

    def context_for(self, name: str) -> SSL.Context | None:
        """The context for C{name} (lower case), minted if new; L{None}: the default leaf."""
        if self.build is None or self._covered(name) or not _mintable(name):
            return None
        context = self.contexts.get(name)
        if context is not None:
            self.contexts.move_to_end(name)
            return context
        leaf, key = _make_leaf([name], self.ca_cert, self.ca_key, self.profile, self.now())
        context = self.build(
            X509.from_cryptography(leaf),
            [X509.from_cryptography(self.ca_cert)],
            PKey.from_cryptography_key(key),
        )
        self.contexts[name] = context
        if len(self.contexts) > self.size:
            self.contexts.popitem(last=False)
        return context


def _mintable(name: str) -> bool:
    """A DNS name a certificate may carry (SNI never names an address)."""
    return len(name) <= 253 and _SERVER_NAME_RE.fullmatch(name) is not None


def minter(directory: Path, profile: str, names: Sequence[str]) -> Minter:
    """The L{Minter} of a self-signed profile, with the CA L{ensure_self_signed} made."""
    ca = _usable_ca(directory / f"{profile}-ca.pem", directory / f"{profile}-ca.key", _utc_now())
    if ca is None:
        raise TLSError(f"profile {profile}: no usable CA in {directory} to mint leaves with")
    return Minter(ca[0], ca[1], profile, names)


class _ServerOptions(CertificateOptions):
    """
    CertificateOptions whose ALPN selection lets a handshake go on without ALPN.

    Twisted's callback answers b"" when the client's protocols and the
    listener's have nothing in common (always, for a service that negotiates
    nothing, such as echo): OpenSSL then aborts the handshake with an internal
    error, so curl or any HTTP/2-capable client could not talk TLS to it.
    """

    # What a client certificate must be issued by (mutual TLS): their names go
    # in the CertificateRequest (RFC 8446 4.2.4, RFC 5246 7.4.4), as nginx's
    # ssl_client_certificate sends them, so a client holding several
    # certificates (a browser, a system store) offers the right one.
    client_ca_names: Sequence[x509.Certificate] = ()

    def _makeContext(self, skipCiphers: bool = False) -> SSL.Context:
        context: SSL.Context = super()._makeContext(skipCiphers)
        for ca in self.client_ca_names:
            context.add_client_ca(ca)
        static = tuple(self._acceptableProtocols or ())

        def select(connection: SSL.Connection, offered: list[bytes]) -> Any:
            ours = protosFromProtocol(connection.get_app_data(), static)
            return next((p for p in ours if p in offered), SSL.NO_OVERLAPPING_PROTOCOLS)

        context.set_alpn_select_callback(select)
        return context


def material(keypair: KeyPair, sni: Mapping[str, KeyPair], client_ca: Path | None) -> str:
    """
    A digest of the PEM files a profile is built from: a reload compares it,
    so a certificate renewed in place (certbot, acme.sh) is served after the
    reload, as nginx's reload re-reads its files.
    """
    paths = [keypair.chain, keypair.key]
    for pair in sni.values():
        paths += [pair.chain, pair.key]
    if client_ca is not None:
        paths.append(client_ca)
    digest = hashlib.sha256()
    for path in paths:
        try:
            digest.update(path.read_bytes())
        except OSError:
            digest.update(b"\0unreadable")  # loading it says why, naming what it is
    return digest.hexdigest()


def server_options(
    keypair: KeyPair,
    *,
    min_version: str = "1.2",
    client_ca: Path | None = None,
    sni: Mapping[str, KeyPair] | None = None,
    mint: Minter | None = None,
) -> CertificateOptions:
    """Build a Twisted server TLS policy from PEM files.

    `sni` maps exact names or ``*.domain`` (one label) to alternative key pairs;
    `mint` answers every other name with a leaf of its own.
    """
    if min_version not in _MIN_VERSIONS:
        raise ValueError(f"min_version must be '1.2' or '1.3', not {min_version!r}")
    client_cas = [] if client_ca is None else _load_certificates(client_ca, "CA certificate")
    ca_certs = None if client_ca is None else [X509.from_cryptography(c) for c in client_cas]

    def build(
        pair: KeyPair, select: Callable[[bytes | None], SSL.Context | None] | None = None
    ) -> CertificateOptions:
        return build_loaded(*_load_keypair(pair), select)

    def build_loaded(
        cert: X509,
        chain: list[X509],
        key: PKey,
        select: Callable[[bytes | None], SSL.Context | None] | None = None,
    ) -> CertificateOptions:
        options = _ServerOptions(
            privateKey=key,
            certificate=cert,
            extraCertChain=chain,
            raiseMinimumTo=_MIN_VERSIONS[min_version],
            verify=ca_certs is not None,
            caCerts=ca_certs,
            requireCertificate=True,
            contextForServerName=select,
            # Resumption by stateless tickets (RFC 8446 4.6.1, RFC 5077), as nginx
            # by default: no server-side cache to bound, and the two TLS 1.3
            # tickets OpenSSL sends anyway can be redeemed; an FTPS data
            # connection resumes its control connection's session (curl does).
            enableSessionTickets=True,
        )
        options.client_ca_names = client_cas
        return options

    if mint is not None:
        mint.build = lambda cert, chain, key: build_loaded(cert, chain, key).getContext()
    if not sni and mint is None:
        return build(keypair)

    # OpenSSL's SSL_set_SSL_CTX swaps in the certificate, chain and trust store
    # of the new context but keeps verify mode and protocol options from the
    # first one, so every per-name context must carry the same policy.
    contexts: dict[KeyPair, SSL.Context] = {}
    exact: dict[str, SSL.Context] = {}
    wildcard: dict[str, SSL.Context] = {}
    for name, pair in (sni or {}).items():
        if pair not in contexts:
            contexts[pair] = build(pair).getContext()
        pattern = _sni_pattern(name)
        if pattern.startswith("*."):
            wildcard[pattern[2:]] = contexts[pair]
        else:
            exact[pattern] = contexts[pair]
    return build(keypair, _sni_selector(exact, wildcard, mint))
