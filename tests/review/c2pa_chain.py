"""A throwaway ES256 certificate chain for C2PA signing tests: a root CA and a signer whose
certificate has what the C2PA trust rules ask of one (digitalSignature key usage, an
extended key usage, subject and authority key identifiers). Readers report it untrusted, as
they should for a chain nobody trusts."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SIGNER_NAME = "pixelmill test signer"


@dataclass(frozen=True)
class Chain:
    cert_path: Path
    key_path: Path


def _usage(*, sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=not sign,
        crl_sign=not sign,
        encipher_only=False,
        decipher_only=False,
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pixelmill tests"),
        ]
    )


def make_chain(folder: Path) -> Chain:
    """Writes chain.pem (signer first, then the root) and signer.key into ``folder``."""
    now = datetime.datetime.now(datetime.UTC)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root_name = _name("pixelmill test root")
    root = (
        x509.CertificateBuilder()
        .subject_name(root_name)
        .issuer_name(root_name)
        .public_key(root_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_usage(sign=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), False)
        .sign(root_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    signer = (
        x509.CertificateBuilder()
        .subject_name(_name(SIGNER_NAME))
        .issuer_name(root_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(sign=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), False
        )
        .sign(root_key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    chain = Chain(folder / "chain.pem", folder / "signer.key")
    chain.cert_path.write_bytes(
        signer.public_bytes(serialization.Encoding.PEM)
        + root.public_bytes(serialization.Encoding.PEM)
    )
    chain.key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return chain


def actions_of(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The actions of a manifest as c2pa.Reader reports it (review.channels.marking.read_c2pa)."""
    actions = next(a for a in manifest["assertions"] if a["label"].startswith("c2pa.actions"))
    found: list[dict[str, Any]] = actions["data"]["actions"]
    return found


def untrusted(manifest: dict[str, Any]) -> bool:
    """Whether the reader's only complaint is that the signer is on no trust list, as for
    this module's chains."""
    failures = manifest["validation_results"]["activeManifest"]["failure"]
    return [failure["code"] for failure in failures] == ["signingCredential.untrusted"]
