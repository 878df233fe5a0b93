"""Signed weights: signatures made with OpenSSF's model-signing, with elliptic-curve keys only,
fully offline (no Sigstore, no certificate authority, no transparency log), one per blob and
key, kept beside the blobs.

A signature is model-signing's Sigstore bundle over a manifest of one file: the blob's sha256,
so it vouches for exactly the bytes the lock pins, under any name or path. It lives at
`store/signatures/sha256-BLOB.KEYID.sig`, where KEYID is the key id model-signing writes into
every signature (its `verificationMaterial.publicKey.hint`): the sha256 of the public key in
PEM (SubjectPublicKeyInfo). The lock's `signer` names that key id; which keys this box
accepts is the operator's `[trust] keys`, never something the store or a mirror hands over.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sovctl.errors import ConfigError, IntegrityError, UsageError
from sovctl.home import Home

# The curves model-signing signs with (those of Sigstore's specs).
CURVES = ("secp256r1", "secp384r1", "secp521r1")
# A signature is a small JSON document; a mirror answering more is not sending one.
MAX_SIGNATURE_BYTES = 1 << 20
KEY_HINT = ("an ECDSA key on P-256, P-384 or P-521, e.g. openssl ecparam -genkey -name "
            "prime256v1 -noout -out signing.key; openssl ec -in signing.key -pubout -out "
            "signing.pub")


def directory(home: Home) -> Path:
    return home.root / "store" / "signatures"


def path_name(sha256: str, key_id: str) -> str:
    """A signature's file name: in the store, and in a mirror's URL of it."""
    return f"sha256-{sha256}.{key_id}.sig"


def path(home: Home, sha256: str, key_id: str) -> Path:
    return directory(home) / path_name(sha256, key_id)


def of_blob(home: Home, sha256: str) -> list[Path]:
    """Every signature of a blob, by any key."""
    d = directory(home)
    return sorted(d.glob(f"sha256-{sha256}.*.sig")) if d.is_dir() else []


def key_id(public_key: Any) -> str:
    """model-signing's id of a public key: the sha256 of its PEM SubjectPublicKeyInfo."""
    from cryptography.hazmat.primitives import serialization

    pem = public_key.public_bytes(serialization.Encoding.PEM,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(pem).hexdigest()


def _curve_check(key: Any, where: Path, error: type[UsageError | ConfigError]) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in CURVES:
        kind = key.curve.name if isinstance(key, ec.EllipticCurvePublicKey) else \
            type(key).__name__.removeprefix("_").removesuffix("PublicKey") or "?"
        raise error(f"{where} is not an ECDSA key on P-256, P-384 or P-521 (it is {kind}); "
                    "model-signing signs with those alone", hint=KEY_HINT)


@dataclass(frozen=True)
class SigningKey:
    """A private key to sign with, as the operator gave it: read from its path when signing,
    never copied anywhere."""

    path: Path
    password: bytes | None
    key_id: str
    public_pem: bytes


def signing_key(key_path: Path, password: str | None) -> SigningKey:
    """The key at `key_path`, checked to be one model-signing can sign with."""
    from cryptography.hazmat.primitives import serialization

    try:
        data = key_path.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read the signing key {key_path}: {e.strerror}",
                         hint="give the path of a PEM private key with --key") from None
    secret = password.encode() if password is not None else None
    try:
        key = serialization.load_pem_private_key(data, secret)
    except TypeError:
        raise UsageError(f"the signing key {key_path} is encrypted",
                         hint="set SOVCTL_SIGNING_PASSWORD to its passphrase") from None
    except ValueError as e:
        if secret is not None:
            raise UsageError(f"the signing key {key_path} cannot be read with the passphrase "
                             "in SOVCTL_SIGNING_PASSWORD, or is no PEM private key",
                             hint="check the passphrase") from None
        raise UsageError(f"{key_path} is not a PEM private key sovctl can read ({e})",
                         hint=KEY_HINT) from None
    public = key.public_key()
    _curve_check(public, key_path, UsageError)
    return SigningKey(key_path, secret, key_id(public), _public_pem(public))


@dataclass(frozen=True)
class TrustedKey:
    name: str  # its name in [trust] keys
    path: Path
    key_id: str


def trusted(keys: Mapping[str, str]) -> dict[str, TrustedKey]:
    """The keys of `[trust] keys`, by key id. A key that cannot be read is a config error: a
    box must never quietly trust fewer keys than its operator wrote down."""
    from cryptography.hazmat.primitives import serialization

    found = {}
    for name, text in sorted(keys.items()):
        p = Path(text)
        hint = f"fix trust.keys.{name} in sovctl.toml: the PEM public key of a signer"
        try:
            key = serialization.load_pem_public_key(p.read_bytes())
        except OSError as e:
            raise ConfigError(f"trust.keys.{name}: cannot read {p}: {e.strerror}",
                              hint=hint) from None
        except ValueError:
            raise ConfigError(f"trust.keys.{name}: {p} is not a PEM public key "
                              "(a private key does not belong in the trust list)",
                              hint=hint) from None
        _curve_check(key, p, ConfigError)
        kid = key_id(key)
        found[kid] = TrustedKey(name, p, kid)
    return found


def describe(kid: str, keys: Mapping[str, TrustedKey]) -> str:
    """A key as the operator knows it: its name in [trust] keys, and a short id."""
    name = keys[kid].name if kid in keys else ""
    return f"key {name} ({kid[:16]})" if name else f"key {kid[:16]}"


def sign_blob(blob: Path, sha256: str, key: SigningKey) -> bytes:
    """model-signing's signature of one blob, checked before it is kept: it must vouch for
    exactly `sha256` (the library hashes the bytes itself, once)."""
    import model_signing

    with tempfile.TemporaryDirectory(prefix="sovctl-sign-") as tmp:
        out = Path(tmp) / "blob.sig"
        # model-signing declares the password a str but hands it to cryptography, which
        # takes bytes only.
        model_signing.signing.Config().use_elliptic_key_signer(
            private_key=key.path, password=key.password).sign(blob, out)  # type: ignore[arg-type]
        data = out.read_bytes()
    signed = signed_digest(data, key.public_pem, label=blob.name)
    if signed != sha256:
        raise IntegrityError(f"{blob} hashed to {signed} while signing it, not the pinned "
                             f"{sha256}; no signature was kept",
                             hint="run 'sovctl verify': the blob changed under its pin")
    return data


def _public_pem(public_key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(public_key.public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo))


def signed_digest(signature: bytes, public_pem: bytes, *, label: str) -> str:
    """The sha256 a signature vouches for, once it verifies with the public key; an
    IntegrityError saying why it does not.

    model-signing's public `verifying.Config.verify` hashes the model file again to compare
    manifests; here the signed manifest itself is read through the same key verifier it uses,
    so `pull` can check a signature before downloading the file and `verify` hashes each blob
    once (its digest is compared with the pin, the pin with the signed digest)."""
    from model_signing._signing import sign_ec_key, sign_sigstore_pb

    if len(signature) > MAX_SIGNATURE_BYTES:
        raise IntegrityError(f"{label}: the signature is {len(signature)} bytes, not a "
                             "model-signing bundle")
    with tempfile.TemporaryDirectory(prefix="sovctl-verify-") as tmp:
        sig_file, key_file = Path(tmp) / "blob.sig", Path(tmp) / "key.pub"
        sig_file.write_bytes(signature)
        key_file.write_bytes(public_pem)
        try:
            # The verifier prints a warning on stdout for an old signature format; stdout is
            # the --json document's.
            with contextlib.redirect_stdout(io.StringIO()):
                manifest = sign_ec_key.Verifier(key_file).verify(
                    sign_sigstore_pb.Signature.read(sig_file))
        except Exception as e:
            # Whatever the library raises (a bad signature, another key, a malformed bundle),
            # the signature does not vouch for anything: refused, with the library's reason.
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise IntegrityError(f"{label}: the signature does not verify with this key "
                                 f"({reason})") from None
    files = list(manifest.resource_descriptors())
    if len(files) != 1 or files[0].identifier != "." or files[0].digest.algorithm != "sha256":
        raise IntegrityError(f"{label}: the signature is not of one file's sha256 (it lists "
                             f"{', '.join(f.identifier for f in files) or 'nothing'})",
                             hint="sign each model with 'sovctl sign NAME --key KEY'")
    return str(files[0].digest.digest_hex)


def check(signature: bytes, sha256: str, key: TrustedKey, *, label: str) -> None:
    """That `signature`, by `key`, vouches for exactly `sha256`; else an IntegrityError."""
    signed = signed_digest(signature, key.path.read_bytes(), label=label)
    if signed != sha256:
        raise IntegrityError(f"{label}: the signature by key {key.name} vouches for sha256 "
                             f"{signed}, not the pinned {sha256}")


def store(home: Home, sha256: str, kid: str, signature: bytes) -> Path:
    """Keep a checked signature beside the blobs (atomically, readable: it is no secret)."""
    from sovctl.fsutil import atomic_write

    dest = path(home, sha256, kid)
    atomic_write(dest, signature, mode=0o644)
    return dest


def remove(home: Home, sha256: str, kid: str | None = None) -> None:
    """Drop a blob's signature by one key, or by every key when `kid` is None."""
    for p in ([path(home, sha256, kid)] if kid else of_blob(home, sha256)):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
