"""Signed weights: `sovctl sign`, the signature checks of `verify`, and a replica's `pull --lock`
from `mirror serve` that takes only what a trusted key signed.

Real ECDSA key pairs made here with `cryptography`, real model-signing signatures over the
shared test models, a real `sovctl mirror serve` process on 127.0.0.1 and a second home pulling
from it. Signing and verifying run once inside a network namespace with no interface but
loopback, to prove they need no Sigstore, Rekor or TUF service.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import MMPROJ, TINY_MODEL
from tests.hubserver import COMMIT, REPO, catalog, serve, sha256_of
from tests.test_store import MirrorProcess, assert_error, assert_nothing_stored, doc_of

from sovctl.errors import ExitCode

pytestmark = pytest.mark.usefixtures("models")
Cli = Callable[..., Any]
TINY_SHA = sha256_of(TINY_MODEL)
MMPROJ_SHA = sha256_of(MMPROJ)
TINY_HF = f"hf://{REPO}/{TINY_MODEL.name}"
MMPROJ_HF = f"hf://{REPO}/{MMPROJ.name}"


# -- helpers --------------------------------------------------------------------------------


def keypair(where: Path, name: str, curve: str = "secp256r1",
            password: bytes | None = None) -> tuple[Path, Path]:
    """A real EC key pair, PEM: (private key, public key), outside any sovctl home."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    where.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(getattr(ec, curve.upper())())
    encryption = (serialization.BestAvailableEncryption(password) if password
                  else serialization.NoEncryption())
    private, public = where / f"{name}.key", where / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8, encryption))
    private.chmod(0o600)
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def key_id(public: Path) -> str:
    """What model-signing writes as the key's hint: the sha256 of the PEM public key."""
    import hashlib

    return hashlib.sha256(public.read_bytes()).hexdigest()


def trust(home: Path, **keys: Path) -> None:
    home.mkdir(parents=True, exist_ok=True)
    table = ", ".join(f'{n} = "{p}"' for n, p in keys.items())
    (home / "sovctl.toml").write_text(f"[trust]\nkeys = {{{table}}}\n")


def lock_of(home: Path) -> dict[str, Any]:
    return tomllib.loads((home / "sovctl.lock").read_text())


def signature_files(home: Path) -> list[Path]:
    d = home / "store" / "signatures"
    return sorted(d.iterdir()) if d.is_dir() else []


def flip_byte(path: Path, offset: int) -> None:
    path.chmod(0o644)
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, tuple[Path, Path]]:
    return {name: keypair(tmp_path / "keys", name) for name in ("ops", "other")}


# -- sign and verify ------------------------------------------------------------------------


def test_sign_then_verify_with_a_trusted_key(cli: Cli, sovctl_home: Path,
                                             keys: dict[str, tuple[Path, Path]]) -> None:
    private, public = keys["ops"]
    r = cli("pull", str(TINY_MODEL), "--name", "tiny", "--mmproj", str(MMPROJ))
    assert r.exit_code == 0, r.stderr
    assert lock_of(sovctl_home)["version"] == 2  # a projector, no signer yet

    r = cli("--json", "sign", "tiny", "--key", str(private))
    assert r.exit_code == 0, r.stderr
    data = doc_of(r)["data"]
    assert data["signer"] == key_id(public) and data["trusted_as"] == ""
    assert [(f["label"], f["sha256"]) for f in data["files"]] == [
        ("tiny", TINY_SHA), ("tiny/mmproj", MMPROJ_SHA)]
    lock = lock_of(sovctl_home)
    assert lock["version"] == 3 and lock["models"]["tiny"]["signer"] == key_id(public)
    sigs = signature_files(sovctl_home)
    assert [p.name for p in sigs] == sorted(
        f"sha256-{sha}.{key_id(public)}.sig" for sha in (TINY_SHA, MMPROJ_SHA))
    for sig in sigs:
        assert stat.S_IMODE(sig.stat().st_mode) == 0o644
        bundle = json.loads(sig.read_text())  # model-signing's Sigstore bundle, key-based
        assert bundle["verificationMaterial"]["publicKey"]["hint"] == key_id(public)
        assert bundle["verificationMaterial"]["tlogEntries"] == []  # no transparency log
    # The private key went nowhere: no file of the home holds it.
    secret = private.read_bytes()
    assert not [p for p in sovctl_home.rglob("*") if p.is_file() and secret in p.read_bytes()]

    # Not trusted here yet: verify refuses to call the model good.
    r = cli("verify")
    assert_error(r, ExitCode.INTEGRITY, "[trust] keys does not hold", key_id(public)[:16])
    assert "untrusted" in r.stdout

    trust(sovctl_home, ops=public)
    r = cli("--json", "verify")
    assert r.exit_code == 0, r.stderr
    items = doc_of(r)["data"]["items"]
    assert [(i["name"], i["status"], i["signature"], i["signer_name"]) for i in items] == [
        ("tiny", "ok", "ok", "ops"), ("tiny/mmproj", "ok", "ok", "ops")]
    r = cli("verify", "tiny")
    assert r.exit_code == 0 and "signed by key ops" in r.stdout

    # The signature is model-signing's own: its verifier accepts it for the blob's bytes.
    import model_signing

    blob = sovctl_home / "store" / "blobs" / f"sha256-{TINY_SHA}"
    model_signing.verifying.Config().use_elliptic_key_verifier(public_key=public).verify(
        blob, sigs[[p.name.startswith(f"sha256-{TINY_SHA}") for p in sigs].index(True)])


def test_a_flipped_byte_fails_verify_with_exit_5_naming_the_file(
        cli: Cli, sovctl_home: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    private, public = keys["ops"]
    trust(sovctl_home, ops=public)
    assert cli("pull", str(TINY_MODEL), "--name", "tiny").exit_code == 0
    assert cli("sign", "tiny", "--key", str(private)).exit_code == 0
    blob = sovctl_home / "store" / "blobs" / f"sha256-{TINY_SHA}"
    flip_byte(blob, 4096)

    r = cli("verify")
    err = assert_error(r, ExitCode.INTEGRITY, "1 signature check(s) failed", str(blob),
                       f"not the sha256 {TINY_SHA} that key ops signed")
    assert "signature bad" in r.stdout
    r = cli("--json", "verify")
    doc = doc_of(r)
    assert r.exit_code == ExitCode.INTEGRITY and doc["error"]["exit_name"] == "INTEGRITY"
    [item] = doc["data"]["items"]
    assert (item["status"], item["signature"]) == ("mismatch", "bad")
    assert str(blob) in item["reason"] and err


def test_a_wrong_key_fails_verify_with_exit_5(cli: Cli, sovctl_home: Path,
                                              keys: dict[str, tuple[Path, Path]]) -> None:
    (ops_key, ops_pub), (other_key, other_pub) = keys["ops"], keys["other"]
    assert cli("pull", str(TINY_MODEL), "--name", "tiny").exit_code == 0
    assert cli("sign", "tiny", "--key", str(ops_key)).exit_code == 0

    # Only another key is trusted: the signer is not one this box accepts.
    trust(sovctl_home, other=other_pub)
    assert_error(cli("verify"), ExitCode.INTEGRITY, "[trust] keys does not hold")

    # The signature file swapped for one made with another key, under the trusted signer's
    # name: it does not verify with the key the lock names.
    trust(sovctl_home, ops=ops_pub)
    sig = sovctl_home / "store" / "signatures" / f"sha256-{TINY_SHA}.{key_id(ops_pub)}.sig"
    forged_home = sovctl_home.parent / "forger"
    assert cli("--home", str(forged_home), "pull", str(TINY_MODEL), "--name", "tiny"
               ).exit_code == 0
    assert cli("--home", str(forged_home), "sign", "tiny", "--key", str(other_key)
               ).exit_code == 0
    forged = forged_home / "store" / "signatures" / \
        f"sha256-{TINY_SHA}.{key_id(other_pub)}.sig"
    shutil.copyfile(forged, sig)
    r = cli("verify")
    assert_error(r, ExitCode.INTEGRITY, "the signature does not verify with this key",
                 "Key mismatch")

    # A signature file gone: said, exit 5.
    sig.unlink()
    assert_error(cli("verify"), ExitCode.INTEGRITY, "no signature by key ops")


def test_resigning_with_another_key_replaces_the_signer(
        cli: Cli, sovctl_home: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    (ops_key, ops_pub), (other_key, other_pub) = keys["ops"], keys["other"]
    trust(sovctl_home, ops=ops_pub, other=other_pub)
    assert cli("pull", str(TINY_MODEL), "--name", "tiny").exit_code == 0
    assert cli("sign", "tiny", "--key", str(ops_key)).exit_code == 0
    r = cli("--json", "sign", "tiny", "--key", str(other_key))
    assert r.exit_code == 0, r.stderr
    data = doc_of(r)["data"]
    assert (data["trusted_as"], data["replaced"]) == ("other", key_id(ops_pub))
    assert lock_of(sovctl_home)["models"]["tiny"]["signer"] == key_id(other_pub)
    assert [p.name for p in signature_files(sovctl_home)] == [
        f"sha256-{TINY_SHA}.{key_id(other_pub)}.sig"]
    assert cli("verify").exit_code == 0

    # rm takes the signatures with the blob, and the lock back to the oldest version.
    assert cli("pull", str(MMPROJ.parent / "all-MiniLM-L6-v2-f16.gguf"), "--name", "minilm"
               ).exit_code == 0
    assert cli("rm", "tiny").exit_code == 0
    assert signature_files(sovctl_home) == []
    assert lock_of(sovctl_home)["version"] == 1


def test_sign_refusals(cli: Cli, sovctl_home: Path, tmp_path: Path,
                       keys: dict[str, tuple[Path, Path]],
                       monkeypatch: pytest.MonkeyPatch) -> None:
    private, public = keys["ops"]
    assert_error(cli("sign", "ghost", "--key", str(private)), ExitCode.NOT_FOUND,
                 "no model named 'ghost'")
    assert cli("pull", str(TINY_MODEL), "--name", "tiny").exit_code == 0
    assert_error(cli("sign", "tiny", "--key", str(tmp_path / "nope.key")), ExitCode.USAGE,
                 "cannot read the signing key")
    assert_error(cli("sign", "tiny", "--key", str(public)), ExitCode.USAGE,
                 "is not a PEM private key")
    # A key inside the home is refused before it is read: the home is backed up and bundled.
    inside = sovctl_home / "signing.key"
    shutil.copyfile(private, inside)
    assert_error(cli("sign", "tiny", "--key", str(inside)), ExitCode.USAGE,
                 "is inside the home", "outside the home")
    inside.unlink()

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    for label, key in (("rsa", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
                       ("ed25519", ed25519.Ed25519PrivateKey.generate())):
        p = tmp_path / f"{label}.key"
        p.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
        assert_error(cli("sign", "tiny", "--key", str(p)), ExitCode.USAGE,
                     "is not an ECDSA key on P-256, P-384 or P-521")

    # A passphrase-protected P-384 key: refused without its passphrase, used with it.
    locked, locked_pub = keypair(tmp_path / "keys", "locked", "secp384r1", b"s3cret")
    assert_error(cli("sign", "tiny", "--key", str(locked)), ExitCode.USAGE, "is encrypted",
                 "SOVCTL_SIGNING_PASSWORD")
    monkeypatch.setenv("SOVCTL_SIGNING_PASSWORD", "wrong")
    assert_error(cli("sign", "tiny", "--key", str(locked)), ExitCode.USAGE,
                 "cannot be read with the passphrase in SOVCTL_SIGNING_PASSWORD")
    monkeypatch.setenv("SOVCTL_SIGNING_PASSWORD", "s3cret")
    r = cli("sign", "tiny", "--key", str(locked))
    assert r.exit_code == 0, r.stderr
    assert lock_of(sovctl_home)["models"]["tiny"]["signer"] == key_id(locked_pub)
    assert "this box does not trust the key" in r.stdout
    # Nothing of a refused signing was left: only the passphrase key's signature exists.
    assert [p.name for p in signature_files(sovctl_home)] == [
        f"sha256-{TINY_SHA}.{key_id(locked_pub)}.sig"]

    # A trust list naming a private key, or a missing file, is a config error.
    trust(sovctl_home, ops=private)
    assert_error(cli("verify"), ExitCode.CONFIG, "trust.keys.ops", "not a PEM public key")
    trust(sovctl_home, ops=tmp_path / "missing.pub")
    assert_error(cli("verify"), ExitCode.CONFIG, "trust.keys.ops", "cannot read")
    for text, needle in (('[trust]\nkeys = "ops.pub"\n', "trust.keys must be a table"),
                         ('[trust]\nkey = {ops = "ops.pub"}\n', "[trust] takes one key, keys"),
                         ('[trust]\nkeys = {ops = ""}\n', "trust.keys.ops must name")):
        (sovctl_home / "sovctl.toml").write_text(text)
        assert_error(cli("sign", "tiny", "--key", str(private)), ExitCode.CONFIG, needle)


def test_old_locks_read_and_a_bad_signer_is_refused(cli: Cli, sovctl_home: Path) -> None:
    assert cli("pull", str(TINY_MODEL), "--name", "tiny").exit_code == 0
    lock = sovctl_home / "sovctl.lock"
    assert lock_of(sovctl_home)["version"] == 1  # an unsigned store keeps the oldest format
    text = lock.read_text()
    lock.write_text(text.replace("version = 1", "version = 2"))
    assert cli("verify").exit_code == 0  # a version-2 lock (projectors) still reads
    lock.write_text(text.replace("version = 1", "version = 3")
                    + 'signer = "not-a-key-id"\n')
    assert_error(cli("verify"), ExitCode.CONFIG, "bad signer")
    assert "not-a-key-id" in lock.read_text()  # left untouched


def test_signing_and_verifying_need_no_network(sovctl_home: Path, tmp_path: Path,
                                              keys: dict[str, tuple[Path, Path]]) -> None:
    """model-signing also speaks to Sigstore (Fulcio, Rekor, TUF); the key-based path must not:
    `sign` and `verify` run in a network namespace whose only interface is loopback, down."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "--net", "true"], capture_output=True, check=False).returncode != 0:
        if os.environ.get("CI"):
            pytest.fail("unshare --net is not permitted: CI runs as root, where it is")
        pytest.skip("network namespaces are not permitted here (CI runs as root)")
    private, public = keys["ops"]
    trust(sovctl_home, ops=public)
    env = {**os.environ, "SOVCTL_HOME": str(sovctl_home)}
    offline = ["unshare", "--net", sys.executable, "-m", "sovctl"]
    for args in (["pull", str(TINY_MODEL), "--name", "tiny"],
                 ["sign", "tiny", "--key", str(private)], ["--json", "verify"]):
        r = subprocess.run([*offline, *args], env=env, capture_output=True, text=True,
                           timeout=120, check=False)
        assert r.returncode == 0, (args, r.stderr)
    assert json.loads(r.stdout)["data"]["items"][0]["signature"] == "ok"


# -- a replica pulling from a mirror --------------------------------------------------------


def test_a_replica_takes_only_what_a_trusted_key_signed(
        cli: Cli, sovctl_home: Path, tmp_path: Path,
        keys: dict[str, tuple[Path, Path]]) -> None:
    (ops_key, ops_pub), (_, other_pub) = keys["ops"], keys["other"]
    with serve(catalog((TINY_MODEL, MMPROJ))) as hub:
        r = cli("pull", "--endpoint", hub.url, TINY_HF, "--name", "tiny", "--mmproj", MMPROJ_HF)
        assert r.exit_code == 0, r.stderr
    head_lock = sovctl_home / "sovctl.lock"
    replica = tmp_path / "replica"

    def pull_replica(endpoint: str, lock: Path = head_lock) -> Any:
        return cli("--home", str(replica), "pull", "--lock", str(lock), "--endpoint", endpoint)

    # Unsigned: a replica that trusts a key refuses it before fetching a byte.
    trust(replica, ops=ops_pub)
    mirror = MirrorProcess(sovctl_home)
    try:
        assert mirror.doc["data"]["signatures"] == 0
        assert_error(pull_replica(mirror.url), ExitCode.INTEGRITY, "tiny is not signed",
                     "nothing was stored")
        assert_nothing_stored(replica)
    finally:
        assert mirror.stop() == 0

    assert cli("sign", "tiny", "--key", str(ops_key)).exit_code == 0
    mirror = MirrorProcess(sovctl_home)
    try:
        assert mirror.doc["data"]["signatures"] == 2  # the weights' and the projector's
        # Signed, but by a key this replica does not trust.
        trust(replica, other=other_pub)
        assert_error(pull_replica(mirror.url), ExitCode.INTEGRITY,
                     f"signed by key {key_id(ops_pub)[:16]}", "does not hold")
        assert_nothing_stored(replica)

        # A lock whose signer line was struck out is unsigned to a replica with [trust] keys.
        trust(replica, ops=ops_pub)
        stripped = tmp_path / "stripped.lock"
        stripped.write_text("\n".join(line for line in head_lock.read_text().splitlines()
                                      if not line.startswith("signer")))
        assert_error(pull_replica(mirror.url, stripped), ExitCode.INTEGRITY, "is not signed")
        assert_nothing_stored(replica)

        # The mirror serving a signature that was tampered with: refused, nothing stored.
        sig = sovctl_home / "store" / "signatures" / \
            f"sha256-{MMPROJ_SHA}.{key_id(ops_pub)}.sig"
        good = sig.read_bytes()
        bundle = json.loads(good)
        sigval = bundle["dsseEnvelope"]["signatures"][0]["sig"]
        bundle["dsseEnvelope"]["signatures"][0]["sig"] = sigval[:10] + (
            "A" if sigval[10] != "A" else "B") + sigval[11:]
        sig.write_text(json.dumps(bundle))
        assert_error(pull_replica(mirror.url), ExitCode.INTEGRITY, "tiny/mmproj",
                     "the signature does not verify")
        assert_nothing_stored(replica)
        # A signature of other bytes, in its place: it verifies, but vouches for another file.
        tiny_sig = sig.with_name(f"sha256-{TINY_SHA}.{key_id(ops_pub)}.sig")
        sig.write_bytes(tiny_sig.read_bytes())
        assert_error(pull_replica(mirror.url), ExitCode.INTEGRITY,
                     f"vouches for sha256 {TINY_SHA}, not the pinned {MMPROJ_SHA}")
        assert_nothing_stored(replica)
        sig.write_bytes(good)

        # Correctly signed by a trusted key: accepted, signatures kept, signer recorded.
        r = cli("--home", str(replica), "--json", "pull", "--lock", str(head_lock),
                "--endpoint", mirror.url)
        assert r.exit_code == 0, r.stderr
        assert doc_of(r)["data"]["signed"] == [["tiny", "ops"]]
        entry = lock_of(replica)["models"]["tiny"]
        assert (entry["sha256"], entry["commit"], entry["signer"]) == (
            TINY_SHA, COMMIT, key_id(ops_pub))
        assert entry["mmproj"]["sha256"] == MMPROJ_SHA
        assert [p.read_bytes() for p in signature_files(replica)] == [
            p.read_bytes() for p in signature_files(sovctl_home)]
        r = cli("--home", str(replica), "verify")
        assert r.exit_code == 0, r.stderr
        assert r.stdout.count("signed by key ops") == 2

        # A replica with no [trust] keys pulls as before, and says it checked nothing.
        plain = tmp_path / "plain"
        r = cli("--home", str(plain), "pull", "--lock", str(head_lock), "--endpoint",
                mirror.url)
        assert r.exit_code == 0, r.stderr
        assert "signatures not checked" in r.stdout
        assert "signer" not in lock_of(plain)["models"]["tiny"]
    finally:
        assert mirror.stop() == 0
