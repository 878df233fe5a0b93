"""`sovctl sign`: sign a pinned model's files with the operator's key, and record the signer.

The private key is read from the path the operator gives, by model-signing, and goes nowhere
else: it must lie outside the home, and sovctl keeps only its public key's id (in the lock)
and the signatures (beside the blobs).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from sovctl.errors import IntegrityError, UsageError
from sovctl.home import Home
from sovctl.store import signatures
from sovctl.store.blobs import BlobStore
from sovctl.store.lock import Lock


@dataclass(frozen=True)
class SignedFile:
    label: str  # NAME, or NAME/mmproj for its projector
    sha256: str
    signature: str  # where the signature is kept


@dataclass(frozen=True)
class SignResult:
    name: str
    signer: str  # the key id the lock now records
    key: str  # the private key's path, as given (read, never copied)
    trusted_as: str  # the key's name in this box's [trust] keys; "" when it holds no such key
    files: tuple[SignedFile, ...]
    replaced: str = ""  # the key id of the signer before, when another key had signed it


def sign(home: Home, name: str, key_path: Path, *, password: str | None,
         trust: Mapping[str, str]) -> SignResult:
    """Sign each file NAME pins (its weights, its projector) with the key at `key_path`."""
    key_path = key_path.expanduser().absolute()
    if key_path.resolve().is_relative_to(home.root.resolve()):
        raise UsageError(f"the signing key {key_path} is inside the home {home.root}",
                         hint="keep the private key outside the home (whoever can read the "
                         "home, its backups or a bundle made from it would hold it); move it "
                         "and give its new path with --key")
    trusted = signatures.trusted(trust)  # a broken [trust] entry is said before any signing
    key = signatures.signing_key(key_path, password)
    entry = Lock.load(home).get(name)
    store = BlobStore(home)
    pins = [(entry.name, entry.sha256, entry.size)]
    if entry.mmproj is not None:
        pins.append((f"{entry.name}/mmproj", entry.mmproj.sha256, entry.mmproj.size))
    made = []
    for label, sha256, size in pins:
        if not store.has(sha256, size):
            raise IntegrityError(f"{label}: its blob sha256 {sha256[:12]} is missing or of the "
                                 "wrong size; nothing was signed",
                                 hint=f"run 'sovctl verify {name}', then pull it again")
        made.append((label, sha256, signatures.sign_blob(store.path(sha256), sha256, key)))
    with Lock.editing(home) as lock:
        current = lock.entries.get(name)
        if current is None or current.blobs != entry.blobs:
            raise UsageError(f"{name} was removed or re-pinned by another sovctl while it was "
                             "being signed; nothing was recorded",
                             hint=f"run 'sovctl sign {name}' again")
        files = tuple(SignedFile(label, sha256, str(signatures.store(home, sha256, key.key_id,
                                                                      data)))
                      for label, sha256, data in made)
        previous = current.signer
        lock.entries[name] = replace(current, signer=key.key_id)
        if previous and previous != key.key_id:
            # The former signer's signatures go, unless another name still names that signer
            # for the same bytes.
            for sha256 in current.blobs:
                if not any(e.signer == previous and sha256 in e.blobs
                           for e in lock.entries.values()):
                    signatures.remove(home, sha256, previous)
    return SignResult(name, key.key_id, str(key_path),
                      trusted[key.key_id].name if key.key_id in trusted else "", files,
                      previous if previous != key.key_id else "")
