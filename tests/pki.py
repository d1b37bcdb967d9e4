"""A throw-away test PKI made with `cryptography` (no openssl CLI): a CA, broker and client certificates, CRLs.

Keys are EC P-256 (fast to generate, accepted by Mosquitto/OpenSSL and Python's ssl). The broker
certificate names ``127.0.0.1`` and ``localhost`` in its subjectAltName, so a client that checks the
host name accepts it on loopback. Client certificates carry the identity in their CN (what
Mosquitto's ``use_identity_as_username`` reads); a CN may contain ``/`` (``fleet/device``), file
names replace it with ``_``. Private keys are written 0600, certificates 0644, like on a device.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CertificateAuthority", "Issued"]

_KEY_MODE = 0o600
_CERT_MODE = 0o644


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key as PEM files."""

    common_name: str
    cert: Path
    key: Path
    serial: int


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _write(path: Path, data: bytes, mode: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)  # O_CREAT's mode is masked by the umask and ignored for an existing file
    return path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return _write(path, pem, _KEY_MODE)


def _stem(common_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", common_name) or "cert"


class CertificateAuthority:
    """A self-signed CA kept in ``directory`` (``<stem>.crt``/``<stem>.key``) that issues certificates there."""

    def __init__(self, directory: str | Path, name: str = "edgefleet test CA", *, days: int = 30) -> None:
        self.directory = Path(directory)
        self.name = name
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        ski = x509.SubjectKeyIdentifier.from_public_key(self._key.public_key())
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(self._subject)
            .issuer_name(self._subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(cert_sign=True), critical=True)
            .add_extension(ski, critical=False)
            .sign(self._key, hashes.SHA256())
        )
        stem = _stem(name)
        self.cert = _write(self.directory / f"{stem}.crt", self._pem(self.certificate), _CERT_MODE)
        self.key = _write_key(self.directory / f"{stem}.key", self._key)

    @staticmethod
    def _pem(cert: x509.Certificate) -> bytes:
        return cert.public_bytes(serialization.Encoding.PEM)

    def server(self, hosts: Sequence[str] = ("127.0.0.1", "localhost"), *, name: str = "server") -> Issued:
        """A TLS server certificate whose subjectAltName lists ``hosts`` (IP addresses or DNS names)."""
        alt: list[x509.GeneralName] = []
        for host in hosts:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                alt.append(x509.DNSName(host))
        return self._issue(name, ExtendedKeyUsageOID.SERVER_AUTH, [x509.SubjectAlternativeName(alt)], stem=name)

    def client(self, common_name: str, *, stem: str | None = None, expired: bool = False) -> Issued:
        """A TLS client certificate for ``common_name`` (with ``expired``, one that ended yesterday)."""
        return self._issue(common_name, ExtendedKeyUsageOID.CLIENT_AUTH, [], stem=stem, expired=expired)

    def _issue(
        self,
        common_name: str,
        usage: x509.ObjectIdentifier,
        extra: list[x509.ExtensionType],
        *,
        stem: str | None = None,
        expired: bool = False,
    ) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        start, end = (now - dt.timedelta(days=2), now - dt.timedelta(days=1)) if expired else (now, now)
        serial = x509.random_serial_number()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self._subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(start - dt.timedelta(minutes=5))
            .not_valid_after(end + dt.timedelta(days=1 if expired else 30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
        )
        for ext in extra:
            builder = builder.add_extension(ext, critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        name = stem or _stem(common_name)
        cert_path = _write(self.directory / f"{name}.crt", self._pem(cert), _CERT_MODE)
        return Issued(common_name, cert_path, _write_key(self.directory / f"{name}.key", key), serial)

    def crl(self, revoked: Sequence[Issued] = (), *, path: str | Path | None = None, expired: bool = False) -> Path:
        """A PEM CRL of this CA revoking ``revoked`` (empty: revokes nothing), written to ``path``.

        With ``expired`` its nextUpdate is yesterday: what a broker holds when nobody renewed the CRL.
        """
        now = _now()
        last, following = (now - dt.timedelta(days=10), now - dt.timedelta(days=1)) if expired else (now, now)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self._subject)
            .last_update(last - dt.timedelta(minutes=5))
            .next_update(following + dt.timedelta(days=0 if expired else 7))
            .add_extension(x509.CRLNumber(int(now.timestamp())), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
        )
        for issued in revoked:
            entry = x509.RevokedCertificateBuilder().serial_number(issued.serial).revocation_date(now).build()
            builder = builder.add_revoked_certificate(entry)
        crl = builder.sign(self._key, hashes.SHA256())
        target = Path(path) if path is not None else self.directory / f"{_stem(self.name)}.crl"
        return _write(target, crl.public_bytes(serialization.Encoding.PEM), _CERT_MODE)


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )
