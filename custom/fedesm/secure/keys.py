"""Pairwise secrets the server cannot sit in the middle of: X25519 agreement on public keys that each
site signs with the private key of its provisioned startup kit.

The server relays the sites' public keys; a server that swapped one for its own would hold both ends of
that pair's secret and could strip its masks. So each public key travels with the site's kit
certificate and an RSA-PSS signature over (purpose, context, site name, key) by the kit's private key,
and every site checks, before agreeing a secret, that the certificate is issued by the project's root CA
(the ``rootCA.pem`` in its own kit), names the site it claims to be, is valid now, and signed this key
for this context (a key from another round or job is refused too). The key pairs are fresh every round.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.x509.oid import NameOID

from fedesm.errors import FedesmError

# The names NVFLARE provisioning gives a site's kit files (startup/ of each client kit).
KIT_KEY, KIT_CERT, ROOT_CA = "client.key", "client.crt", "rootCA.pem"
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)


@dataclass(frozen=True)
class SignedKey:
    """A site's round public key as it travels through the server: raw X25519 bytes, the signature by the
    site's kit key and the site's kit certificate (PEM)."""

    site: str
    context: bytes
    public: bytes
    signature: bytes
    certificate: bytes


def _signed_bytes(site: str, context: bytes, public: bytes) -> bytes:
    return b"fedesm-secagg-key\x00" + context + b"\x00" + site.encode() + b"\x00" + public


def new_key_pair() -> tuple[X25519PrivateKey, bytes]:
    """A fresh X25519 key pair for one round: the private key and the raw public bytes."""
    private = X25519PrivateKey.generate()
    return private, private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def sign_public_key(site: str, context: bytes, public: bytes, startup: str | Path) -> SignedKey:
    """The site's public key signed with its kit's private key (``startup/client.key``)."""
    startup = Path(startup)
    try:
        kit_key = serialization.load_pem_private_key((startup / KIT_KEY).read_bytes(), password=None)
        cert = (startup / KIT_CERT).read_bytes()
    except (OSError, ValueError) as e:
        raise FedesmError(f"secure aggregation: site {site!r} cannot read its kit key and certificate in "
                          f"{startup} ({type(e).__name__}: {e})") from None
    if not isinstance(kit_key, rsa.RSAPrivateKey):
        raise FedesmError(f"secure aggregation: {startup / KIT_KEY} is not an RSA key (NVFLARE kits hold RSA)")
    return SignedKey(site, bytes(context), bytes(public), kit_key.sign(_signed_bytes(site, context, public), _PSS,
                                                                       hashes.SHA256()), cert)


def load_root(startup: str | Path) -> x509.Certificate:
    """The project's root certificate from a kit (``startup/rootCA.pem``)."""
    path = Path(startup) / ROOT_CA
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as e:
        raise FedesmError(f"secure aggregation: cannot read the project's root certificate {path} "
                          f"({type(e).__name__}: {e})") from None


def verify_public_key(signed: SignedKey, expected_site: str, context: bytes, root: x509.Certificate,
                      now: datetime.datetime | None = None) -> X25519PublicKey:
    """The peer's X25519 public key once its certificate and signature check out; FedesmError naming the
    site otherwise (a swapped key, a certificate from another project or of another participant)."""
    who = f"secure aggregation: the public key for site {expected_site!r}"
    if signed.site != expected_site:
        raise FedesmError(f"{who} arrived labelled {signed.site!r}; refused")
    if signed.context != context:
        raise FedesmError(f"{who} was signed for {signed.context!r}, not this round ({context!r}); refused")
    try:
        cert = x509.load_pem_x509_certificate(signed.certificate)
        cert.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature) as e:
        raise FedesmError(f"{who} comes with a certificate the project's root CA did not issue "
                          f"({type(e).__name__}); refused") from None
    names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if names != [expected_site]:
        raise FedesmError(f"{who} is signed by the kit of {names}, not {expected_site!r}; refused")
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
        raise FedesmError(f"{who} comes with a certificate that is not valid now; refused")
    kit_public = cert.public_key()
    if not isinstance(kit_public, rsa.RSAPublicKey):
        raise FedesmError(f"{who} comes with a non-RSA certificate; refused")
    try:
        kit_public.verify(signed.signature, _signed_bytes(signed.site, signed.context, signed.public), _PSS,
                          hashes.SHA256())
    except InvalidSignature:
        raise FedesmError(f"{who} is not signed by {expected_site!r}'s kit key (a swapped key?); refused") from None
    try:
        return X25519PublicKey.from_public_bytes(signed.public)
    except ValueError:
        raise FedesmError(f"{who} is not a 32-byte X25519 key; refused") from None


def shared_secrets(own: X25519PrivateKey, peers: Mapping[str, SignedKey], context: bytes,
                   root: x509.Certificate) -> dict[str, bytes]:
    """The secret shared with each peer (X25519), every peer's key verified first."""
    return {site: own.exchange(verify_public_key(signed, site, context, root)) for site, signed in peers.items()}
