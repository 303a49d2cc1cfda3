"""A local CA in the state dir: issue and revoke certificates, keep a CRL.

Files under `<state_dir>/pki/` (the folder is 0700, keys 0600):
  ca.key, ca.crt            the authority (ECDSA P-256, 10 years)
  server.key, server.crt    the daemon's TLS certificate (renewed when names change)
  issued.json               every certificate issued: serial, identity, expiry
  revoked.json, crl.pem     revoked serials, and the signed CRL for outside verifiers
  admin/                    an admin certificate for the daemon's owner (local CLI use)
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from stockade.atomic import write_atomically
from stockade.pki import SERVER_NAME
from stockade.pki.identity import TRUST_DOMAIN, Identity
from stockade.state_seal import StateSeal

CA_DAYS = 3650
LEAF_DAYS = 365
SERVER_IDENTITY = f"spiffe://{TRUST_DOMAIN}/daemon"
ADMIN_NAME = "local-owner"


class PkiError(Exception):
    """The authority cannot do what was asked; the message says why."""


@dataclass(frozen=True)
class IssuedCertificate:
    identity: str
    serial: int
    key_pem: bytes
    cert_pem: bytes
    ca_pem: bytes
    not_after: dt.datetime


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_private(path: Path, data: bytes) -> None:
    """Write a file that only the owner may read, atomically, never through a link."""
    write_atomically(path, data)


def _write_public(path: Path, data: bytes) -> None:
    """A certificate or CRL: readable by all, written the same safe way."""
    write_atomically(path, data, mode=0o644)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class CertificateAuthority:
    def __init__(
        self,
        directory: Path,
        key: ec.EllipticCurvePrivateKey,
        cert: x509.Certificate,
        seal: StateSeal,
    ):
        self.directory = directory
        self._key = key
        self._seal = seal
        self.certificate = cert
        self.ca_pem = cert.public_bytes(serialization.Encoding.PEM)
        # A CA swapped for one the writer of the state folder made would let it mint any
        # identity: its certificate is pinned in the audit trail.
        seal.pin("ca", cert.fingerprint(hashes.SHA256()).hex())
        issued = self._load_json("issued.json", {})
        revoked = self._load_json("revoked.json", [])
        try:
            if not isinstance(issued, dict) or not isinstance(revoked, list):
                raise TypeError
            self._issued: dict[str, dict[str, str]] = issued
            self.revoked: set[int] = {int(serial) for serial in revoked}
        except (TypeError, ValueError):
            raise PkiError(
                f"{directory}: issued.json or revoked.json has the wrong shape"
            ) from None

    # -- creation --------------------------------------------------------------------

    @classmethod
    def load_or_create(cls, directory: Path, seal: StateSeal) -> CertificateAuthority:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        key_path, cert_path = directory / "ca.key", directory / "ca.crt"
        if key_path.exists() and cert_path.exists():
            if key_path.stat().st_mode & 0o077:
                raise PkiError(f"{key_path} is readable by others; chmod 600 it")
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise PkiError(f"{key_path} is not an EC key")
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            authority = cls(directory, key, cert, seal)
            authority._write_crl()  # from the sealed revocations, whatever crl.pem holds now
            return authority
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Stockade local CA")])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
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
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        _write_private(key_path, _key_pem(key))
        _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        authority = cls(directory, key, cert, seal)
        authority._write_crl()
        return authority

    # -- issuing ---------------------------------------------------------------------

    def _leaf(
        self,
        uri: str,
        common_name: str,
        usage: x509.ObjectIdentifier,
        dns_names: list[str] | None = None,
        ips: list[str] | None = None,
    ) -> IssuedCertificate:
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri)]
        names += [x509.DNSName(n) for n in dns_names or []]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips or []]
        now = _now()
        not_after = now + dt.timedelta(days=LEAF_DAYS)
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), False
            )
            .sign(self._key, hashes.SHA256())
        )
        self._issued[str(serial)] = {"identity": uri, "not_after": not_after.isoformat()}
        self._save_json("issued.json", self._issued)
        return IssuedCertificate(
            identity=uri,
            serial=serial,
            key_pem=_key_pem(key),
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
            ca_pem=self.ca_pem,
            not_after=not_after,
        )

    def issue_client(self, identity: Identity) -> IssuedCertificate:
        return self._leaf(identity.uri, identity.name, ExtendedKeyUsageOID.CLIENT_AUTH)

    def ensure_server_certificate(self, dns_names: list[str], ips: list[str]) -> tuple[Path, Path]:
        """The daemon's certificate for these names; reissued when the names change."""
        key_path, cert_path = self.directory / "server.key", self.directory / "server.crt"
        wanted = sorted({SERVER_NAME, "localhost", *dns_names}), sorted({"127.0.0.1", *ips})
        if key_path.exists() and cert_path.exists():
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            have = (
                sorted(san.get_values_for_type(x509.DNSName)),
                sorted(str(ip) for ip in san.get_values_for_type(x509.IPAddress)),
            )
            fresh = cert.not_valid_after_utc - _now() > dt.timedelta(days=30)
            if have == wanted and fresh and cert.issuer == self.certificate.subject:
                return key_path, cert_path
        issued = self._leaf(
            SERVER_IDENTITY, SERVER_NAME, ExtendedKeyUsageOID.SERVER_AUTH, wanted[0], wanted[1]
        )
        _write_private(key_path, issued.key_pem)
        _write_public(cert_path, issued.cert_pem)
        return key_path, cert_path

    def ensure_owner_admin(self) -> Path:
        """An admin certificate for the daemon's owner, so the local CLI works out of the box."""
        folder = self.directory / "admin"
        folder.mkdir(mode=0o700, exist_ok=True)
        if not (folder / "client.crt").exists() or not (folder / "client.key").exists():
            write_credentials(folder, self.issue_client(Identity.make("admin", ADMIN_NAME)))
        return folder

    # -- revocation ------------------------------------------------------------------

    def revoke(self, serial: int) -> str:
        """Revoke a certificate this CA issued; returns its identity."""
        entry = self._issued.get(str(serial))
        if entry is None:
            raise PkiError(f"no certificate with serial {serial} was issued by this daemon")
        self.revoked.add(serial)
        self._save_json("revoked.json", sorted(str(s) for s in self.revoked))
        self._write_crl()
        return entry["identity"]

    def serials_of(self, identity_uri: str) -> list[int]:
        return [int(s) for s, e in self._issued.items() if e["identity"] == identity_uri]

    def issued(self) -> list[tuple[int, str, str, bool]]:
        """(serial, identity, not_after, revoked) for every certificate issued."""
        return [
            (int(serial), entry["identity"], entry["not_after"], int(serial) in self.revoked)
            for serial, entry in self._issued.items()
        ]

    def _write_crl(self) -> None:
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.certificate.subject)
            .last_update(now)
            .next_update(now + dt.timedelta(days=7))
        )
        for serial in sorted(self.revoked):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
            )
        crl = builder.sign(self._key, hashes.SHA256())
        _write_public(self.directory / "crl.pem", crl.public_bytes(serialization.Encoding.PEM))

    # -- files -----------------------------------------------------------------------

    # Sealed and anchored (`state_seal.py`): a writer of the state folder cannot take a
    # revocation back, nor hide a certificate from `cert revoke --identity`.
    def _load_json(self, name: str, empty: object) -> object:
        path = self.directory / name
        try:
            loaded: object = self._seal.load(path, f"pki/{name}")
        except OSError as exc:
            raise PkiError(f"cannot read {path}: {exc}") from None
        return empty if loaded is None else loaded

    def _save_json(self, name: str, data: object) -> None:
        self._seal.save(self.directory / name, f"pki/{name}", data)


def write_credentials(folder: Path, issued: IssuedCertificate) -> None:
    """client.key (0600), client.crt and ca.crt: where `stockade connect` looks."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write_private(folder / "client.key", issued.key_pem)
    _write_public(folder / "client.crt", issued.cert_pem)
    _write_public(folder / "ca.crt", issued.ca_pem)
