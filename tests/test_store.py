"""Owned weights: `sovctl pull`, `verify`, `models`, `rm` and `mirror serve`, end to end.

Real model files from ../shared/models; the Hub protocol against a real HTTP server on
127.0.0.1 (sovctl's own mirror, tests/hubserver.py) with the real huggingface_hub client.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import tomli_w
from tests.conftest import CHAT_MODEL, EMBED_MODEL, TINY_MODEL
from tests.hubserver import (
    COMMIT,
    KNOWN_SHA256,
    REPO,
    AlteredBytes,
    Counting,
    DropsMidFile,
    Slow,
    catalog,
    closed_port,
    serve,
    sha256_of,
)

from sovctl.errors import ExitCode
from sovctl.store.mirror import MirrorFile

TINY_SHA = KNOWN_SHA256[TINY_MODEL.name]
CHAT_SHA = KNOWN_SHA256[CHAT_MODEL.name]
EMBED_SHA = KNOWN_SHA256[EMBED_MODEL.name]
TINY_HF = f"hf://{REPO}/{TINY_MODEL.name}"
SOVCTL = [sys.executable, "-m", "sovctl"]
Cli = Callable[..., Any]  # the `cli` fixture: CliRunner on the real app


# -- helpers --------------------------------------------------------------------------------


def lock_models(home: Path) -> dict[str, Any]:
    with (home / "sovctl.lock").open("rb") as f:
        doc = tomllib.load(f)
    assert doc["version"] == 1
    return doc.get("models", {})


def blobs(home: Path) -> list[Path]:
    d = home / "store" / "blobs"
    return sorted(d.iterdir()) if d.is_dir() else []


def partials(home: Path) -> list[Path]:
    d = home / "store" / "partial"
    return sorted(d.glob("*.part")) if d.is_dir() else []


def doc_of(result: Any) -> dict[str, Any]:
    """stdout must be exactly one JSON document."""
    doc = json.loads(result.stdout)
    assert doc["schema"] == "sovctl/v1"
    return doc


def assert_error(result: Any, code: ExitCode, *needles: str) -> str:
    """A clear one-line error on stderr, the named exit code, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    err = result.stderr.strip()
    assert err.startswith("error: "), err
    assert "\n" not in err, err
    assert "Traceback" not in result.stderr + result.stdout
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def assert_nothing_stored(home: Path) -> None:
    assert blobs(home) == []
    assert partials(home) == []
    assert not (home / "sovctl.lock").exists() or lock_models(home) == {}


def sub_env(home: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "SOVCTL_HOME": str(home), **extra}


def _proc_io(field: str) -> int:
    """This process's I/O counter `field` from /proc/self/io: "rchar" counts bytes got from
    read(2) and friends, "wchar" bytes given to write(2), on files (not sockets, not mmap)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/io")


def _bytes_read_from_files() -> int:
    return _proc_io("rchar")


# -- local import ---------------------------------------------------------------------------


def test_import_local_path_pins_sha256_size_and_source(cli: Cli, sovctl_home: Path) -> None:
    r = cli("--json", "pull", str(TINY_MODEL))
    assert r.exit_code == 0, r.stderr
    doc = doc_of(r)
    assert doc["ok"] and doc["command"] == "pull" and doc["error"] is None
    assert doc["data"]["action"] == "imported"
    assert doc["data"]["name"] == "stories260K"

    entry = lock_models(sovctl_home)["stories260K"]
    assert entry["sha256"] == TINY_SHA
    assert entry["size"] == TINY_MODEL.stat().st_size
    assert entry["source"] == "file"
    assert entry["digest_from"] == "computed"
    assert entry["path"] == str(TINY_MODEL.resolve())
    assert "commit" not in entry  # a file on a disk has no commit to pin
    assert entry["pulled_at"].endswith("Z") and entry["verified_at"]
    blob = sovctl_home / "store" / "blobs" / f"sha256-{TINY_SHA}"
    assert blobs(sovctl_home) == [blob]
    assert blob.read_bytes() == TINY_MODEL.read_bytes()
    assert stat.S_IMODE(blob.stat().st_mode) == 0o444
    assert partials(sovctl_home) == []


def test_import_reads_the_source_once_and_writes_it_once(cli: Cli, sovctl_home: Path) -> None:
    assert cli("pull", str(TINY_MODEL)).exit_code == 0  # every module the pull needs is loaded
    size = CHAT_MODEL.stat().st_size  # ~94 MiB: many rounds of the copy's ring of buffers
    read, written = _proc_io("rchar"), _proc_io("wchar")
    r = cli("--json", "pull", str(CHAT_MODEL), "--name", "smol")
    read, written = _proc_io("rchar") - read, _proc_io("wchar") - written
    assert r.exit_code == 0, r.stderr
    assert lock_models(sovctl_home)["smol"]["sha256"] == CHAT_SHA  # the published digest
    # Besides the one pass over the data, the blob's header is read back for its facts: its
    # metadata and tensor table, here ~2 MiB (a 49k-token vocabulary), from the page cache.
    assert size <= read < size + 3 * 1024 * 1024, read / size
    assert size <= written < size + 256 * 1024, written / size
    assert cli("verify", "smol").exit_code == 0


def test_import_file_url_and_two_names_share_one_blob(cli: Cli, sovctl_home: Path,
                                                      tiny_copy: Path) -> None:
    r1 = cli("pull", f"file://{TINY_MODEL}", "--name", "tiny-a")
    assert r1.exit_code == 0, r1.stderr
    assert "imported tiny-a" in r1.stdout
    r2 = cli("--json", "pull", str(tiny_copy), "--name", "tiny-b")
    assert r2.exit_code == 0, r2.stderr
    assert doc_of(r2)["data"]["action"] == "imported"
    models = lock_models(sovctl_home)
    assert models["tiny-a"]["sha256"] == models["tiny-b"]["sha256"] == TINY_SHA
    assert models["tiny-a"]["ref"] == str(TINY_MODEL.resolve())  # the lock pins the real path
    assert len(blobs(sovctl_home)) == 1


def test_import_with_sha256_flag(cli: Cli, sovctl_home: Path) -> None:
    r = cli("pull", str(TINY_MODEL), "--sha256", "SHA256:" + TINY_SHA.upper())
    assert r.exit_code == 0, r.stderr
    assert lock_models(sovctl_home)["stories260K"]["digest_from"] == "flag"

    wrong = "0" * 64
    r = cli("pull", str(EMBED_MODEL), "--sha256", wrong)
    assert_error(r, ExitCode.INTEGRITY, wrong, EMBED_SHA)
    assert set(lock_models(sovctl_home)) == {"stories260K"}
    assert len(blobs(sovctl_home)) == 1 and partials(sovctl_home) == []


def test_not_gguf_and_truncated_gguf_are_refused(
    cli: Cli, sovctl_home: Path, tmp_path: Path
) -> None:
    text = tmp_path / "notes.gguf"
    text.write_text("these are not weights\n" * 100)
    assert_error(cli("pull", str(text)), ExitCode.INTEGRITY, "not a GGUF file", "GGUF")
    assert_nothing_stored(sovctl_home)

    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(TINY_MODEL.read_bytes()[:1000])  # the magic is right, the rest is cut
    assert_error(cli("pull", str(truncated)), ExitCode.INTEGRITY, "not a valid GGUF file",
                 "truncated")
    assert_nothing_stored(sovctl_home)

    tiny = tmp_path / "tiny.gguf"
    tiny.write_bytes(b"GG")
    assert_error(cli("pull", str(tiny)), ExitCode.INTEGRITY, "not a GGUF file")
    assert_nothing_stored(sovctl_home)


@pytest.mark.parametrize("bad", ["../x", "/abs", "a b", "..", ".hidden", "x/y", "a" * 129])
def test_bad_names_are_refused(cli: Cli, sovctl_home: Path, bad: str) -> None:
    r = cli("pull", str(TINY_MODEL), "--name", bad)
    assert_error(r, ExitCode.USAGE, "invalid model name")
    assert not sovctl_home.exists()  # nothing written at all


@pytest.mark.parametrize(
    ("ref", "code", "needle"),
    [
        ("hf://just-an-org", ExitCode.USAGE, "bad hub reference"),
        (f"hf://{REPO}/weights.bin", ExitCode.USAGE, "bad hub reference"),
        (f"hf://{REPO}/../secret.gguf", ExitCode.USAGE, "bad hub reference"),
        ("ftp://example.org/x.gguf", ExitCode.USAGE, "unsupported scheme"),
        ("no-such-file.gguf", ExitCode.NOT_FOUND, "no such file"),
        ("something weird", ExitCode.USAGE, "cannot understand REF"),
    ],
)
def test_bad_refs(cli: Cli, sovctl_home: Path, ref: str, code: ExitCode, needle: str) -> None:
    assert_error(cli("pull", ref), code, needle)
    assert not sovctl_home.exists()


def test_bad_sha256_flag(cli: Cli, sovctl_home: Path) -> None:
    for bad in ("abc", TINY_SHA + "\n", TINY_SHA + "0"):
        assert_error(cli("pull", str(TINY_MODEL), "--sha256", bad), ExitCode.USAGE,
                     "not a sha256 hex digest")
    assert not sovctl_home.exists()


def test_lock_with_a_bad_sha256_is_refused(cli: Cli, sovctl_home: Path) -> None:
    """The lock and `--sha256` share one rule: 64 hex digits, and nothing after them."""
    assert cli("pull", str(TINY_MODEL), "--name", "tiny").exit_code == 0
    path = sovctl_home / "sovctl.lock"
    doc = tomllib.loads(path.read_text())
    for bad in (TINY_SHA + "\n", TINY_SHA.upper(), TINY_SHA[:-1]):
        doc["models"]["tiny"]["sha256"] = bad
        path.write_text(tomli_w.dumps(doc))
        assert_error(cli("verify"), ExitCode.CONFIG, "entry 'tiny' has a bad sha256")


def test_name_already_pinning_other_bytes(cli: Cli, sovctl_home: Path) -> None:
    assert cli("pull", str(TINY_MODEL), "--name", "m").exit_code == 0
    r = cli("pull", str(EMBED_MODEL), "--name", "m")
    assert_error(r, ExitCode.USAGE, "already pins")
    assert lock_models(sovctl_home)["m"]["sha256"] == TINY_SHA
    assert len(blobs(sovctl_home)) == 1


def test_reimport_restores_a_lost_blob(cli: Cli, sovctl_home: Path) -> None:
    assert cli("pull", str(TINY_MODEL)).exit_code == 0
    blob = blobs(sovctl_home)[0]
    blob.unlink()
    r = cli("--json", "pull", str(TINY_MODEL))
    assert r.exit_code == 0, r.stderr
    assert doc_of(r)["data"]["action"] == "imported"
    assert blob.exists()
    assert cli("verify").exit_code == 0


# -- pull from a hub ------------------------------------------------------------------------


def test_pull_hf_file_pins_the_commit(cli: Cli, sovctl_home: Path) -> None:
    with serve(handler=Counting) as hub:
        r = cli("--json", "pull", "--endpoint", hub.url, TINY_HF, "--revision", "main")
    assert r.exit_code == 0, r.stderr
    data = doc_of(r)["data"]
    assert data["action"] == "downloaded"
    assert data["transferred"] == TINY_MODEL.stat().st_size
    entry = lock_models(sovctl_home)["stories260K"]
    assert entry == {
        "sha256": TINY_SHA,
        "size": TINY_MODEL.stat().st_size,
        "source": "hf",
        "ref": TINY_HF,
        "pulled_at": entry["pulled_at"],
        "verified_at": entry["verified_at"],
        "digest_from": "hub",
        "repo": REPO,
        "path": TINY_MODEL.name,
        "endpoint": hub.url,
        "revision": "main",
        "commit": COMMIT,
    }
    assert hub.bodies == [(TINY_MODEL.name, 0)]  # one download, from the first byte
    assert len(blobs(sovctl_home)) == 1 and partials(sovctl_home) == []


def test_pull_at_a_commit(cli: Cli, sovctl_home: Path) -> None:
    with serve() as hub:
        r = cli("pull", "--endpoint", hub.url, "--revision", COMMIT, TINY_HF, "--name", "t")
    assert r.exit_code == 0, r.stderr
    assert f"@{COMMIT[:12]}" in r.stdout
    entry = lock_models(sovctl_home)["t"]
    assert entry["revision"] == entry["commit"] == COMMIT


def test_pulling_a_pinned_name_again_needs_no_network(cli: Cli, sovctl_home: Path) -> None:
    with serve() as hub:
        r = cli("pull", "--endpoint", hub.url, TINY_HF)
        assert r.exit_code == 0, r.stderr
    # The server is gone: a pinned name with its blob present needs nothing from it.
    for extra in ([], ["--revision", COMMIT], ["--sha256", TINY_SHA]):
        r = cli("--json", "pull", "--endpoint", hub.url, TINY_HF, *extra)
        assert r.exit_code == 0, r.stderr
        assert doc_of(r)["data"]["action"] == "already-pinned"
    r = cli("pull", "--endpoint", hub.url, TINY_HF)
    assert "already pinned" in r.stdout
    # ...but an expected digest that disagrees with the pin is still an error.
    assert_error(cli("pull", "--endpoint", hub.url, TINY_HF, "--sha256", "1" * 64),
                 ExitCode.INTEGRITY, "1" * 64, TINY_SHA)


def test_pull_quant_shorthand(cli: Cli, sovctl_home: Path) -> None:
    with serve() as hub:
        r = cli("--json", "pull", "--endpoint", hub.url, f"{REPO}:q4_1")
        assert r.exit_code == 0, r.stderr
        data = doc_of(r)["data"]
        assert data["name"] == "SmolLM2-135M-Instruct.Q4_1"
        assert data["entry"]["path"] == CHAT_MODEL.name
        assert data["entry"]["sha256"] == CHAT_SHA
        assert data["entry"]["commit"] == COMMIT

        r = cli("pull", "--endpoint", hub.url, f"{REPO}:LM")
        err = assert_error(r, ExitCode.USAGE, "2 .gguf files", CHAT_MODEL.name, EMBED_MODEL.name)
        assert TINY_MODEL.name not in err

        r = cli("pull", "--endpoint", hub.url, f"{REPO}:Q8_0")
        assert_error(r, ExitCode.NOT_FOUND, "no .gguf file", "'Q8_0'", CHAT_MODEL.name,
                     EMBED_MODEL.name, TINY_MODEL.name)
    assert set(lock_models(sovctl_home)) == {"SmolLM2-135M-Instruct.Q4_1"}


def test_pull_unknown_repo_revision_file(cli: Cli, sovctl_home: Path) -> None:
    with serve() as hub:
        assert_error(cli("pull", "--endpoint", hub.url, "hf://sovtest/nope/x.gguf"),
                     ExitCode.NOT_FOUND, "repository sovtest/nope not found")
        assert_error(cli("pull", "--endpoint", hub.url, "--revision", "v9", TINY_HF),
                     ExitCode.NOT_FOUND, "revision 'v9' not found")
        assert_error(cli("pull", "--endpoint", hub.url, f"hf://{REPO}/missing.gguf"),
                     ExitCode.NOT_FOUND, "missing.gguf is not in", TINY_MODEL.name)
    assert_nothing_stored(sovctl_home)


def test_sha256_flag_disagreeing_with_the_hub_is_refused(cli: Cli, sovctl_home: Path) -> None:
    wrong = "ab" * 32
    with serve(handler=Counting) as hub:
        r = cli("pull", "--endpoint", hub.url, TINY_HF, "--sha256", wrong)
        assert_error(r, ExitCode.INTEGRITY, wrong, TINY_SHA, "nothing was downloaded")
        assert hub.bodies == []
        r = cli("pull", "--endpoint", hub.url, TINY_HF, "--sha256", TINY_SHA)
        assert r.exit_code == 0, r.stderr
    assert lock_models(sovctl_home)["stories260K"]["digest_from"] == "hub+flag"


def test_altered_bytes_are_refused(cli: Cli, sovctl_home: Path) -> None:
    with serve(handler=AlteredBytes) as hub:
        r = cli("--json", "pull", "--endpoint", hub.url, TINY_HF)
    assert r.exit_code == ExitCode.INTEGRITY
    doc = doc_of(r)
    assert doc["ok"] is False and doc["data"] is None
    assert doc["error"]["exit_name"] == "INTEGRITY"
    message = doc["error"]["message"]
    assert "sha256 mismatch" in message and TINY_SHA in message
    got = message.split("got ", 1)[1][:64]
    assert len(got) == 64 and got != TINY_SHA
    assert "Traceback" not in r.stderr
    assert_nothing_stored(sovctl_home)


def test_dropped_connection_resumes_and_verifies(cli: Cli, sovctl_home: Path) -> None:
    size = TINY_MODEL.stat().st_size
    with serve(handler=DropsMidFile) as bad:
        r = cli("pull", "--endpoint", bad.url, TINY_HF)
    assert_error(r, ExitCode.NETWORK, "interrupted", "again")
    assert blobs(sovctl_home) == []
    assert not (sovctl_home / "sovctl.lock").exists()
    [part] = partials(sovctl_home)
    assert part.stat().st_size == size // 2

    with serve(handler=Counting) as good:
        r = cli("--json", "pull", "--endpoint", good.url, TINY_HF)
    assert r.exit_code == 0, r.stderr
    data = doc_of(r)["data"]
    assert data["action"] == "resumed"
    assert data["resumed_from"] == size // 2 > 0
    assert data["transferred"] == size - size // 2
    assert good.bodies == [(TINY_MODEL.name, size // 2)]  # a Range request for the rest
    assert data["entry"]["sha256"] == TINY_SHA
    assert (sovctl_home / "store" / "blobs" / f"sha256-{TINY_SHA}").read_bytes() == \
        TINY_MODEL.read_bytes()
    assert partials(sovctl_home) == []
    assert cli("verify").exit_code == 0


def test_resume_still_verifies_the_bytes_already_on_disk(cli: Cli, sovctl_home: Path) -> None:
    with serve(handler=DropsMidFile) as bad:
        assert cli("pull", "--endpoint", bad.url, TINY_HF).exit_code == ExitCode.NETWORK
    [part] = partials(sovctl_home)
    data = bytearray(part.read_bytes())
    data[100_000] ^= 0x01  # damage a byte that arrived before the drop
    part.write_bytes(bytes(data))
    with serve() as good:
        r = cli("pull", "--endpoint", good.url, TINY_HF)
        assert_error(r, ExitCode.INTEGRITY, "sha256 mismatch", TINY_SHA)
        assert_nothing_stored(sovctl_home)
        # The damaged partial is gone, so the next pull starts over and succeeds.
        r = cli("--json", "pull", "--endpoint", good.url, TINY_HF)
    assert r.exit_code == 0, r.stderr
    assert doc_of(r)["data"]["action"] == "downloaded"


def test_a_killed_pull_resumes(cli: Cli, sovctl_home: Path) -> None:
    size = TINY_MODEL.stat().st_size
    with serve(handler=Slow) as slow:
        proc = subprocess.Popen([*SOVCTL, "pull", "--endpoint", slow.url, TINY_HF],
                                env=sub_env(sovctl_home), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while not any(p.stat().st_size > 256 * 1024 for p in partials(sovctl_home)):
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.02)
        finally:
            proc.kill()
            proc.wait(timeout=10)
    assert blobs(sovctl_home) == [] and not (sovctl_home / "sovctl.lock").exists()
    with serve() as good:
        r = cli("--json", "pull", "--endpoint", good.url, TINY_HF)
    assert r.exit_code == 0, r.stderr  # the dead process's file lock went with it
    data = doc_of(r)["data"]
    assert data["action"] == "resumed" and 256 * 1024 < data["resumed_from"] < size
    assert data["entry"]["sha256"] == TINY_SHA
    assert cli("verify").exit_code == 0


def test_offline_says_so_and_lists_the_store(cli: Cli, sovctl_home: Path) -> None:
    assert cli("pull", str(TINY_MODEL), "--name", "tiny-local").exit_code == 0
    endpoint = f"http://127.0.0.1:{closed_port()}"
    r = cli("pull", "--endpoint", endpoint, TINY_HF, "--name", "other")
    assert_error(r, ExitCode.NETWORK, "offline", endpoint, "tiny-local")
    r = cli("pull", f"{endpoint}/w.gguf", "--sha256", EMBED_SHA, "--name", "other")
    assert_error(r, ExitCode.NETWORK, "offline", "tiny-local")
    assert set(lock_models(sovctl_home)) == {"tiny-local"}


def test_url_needs_sha256_or_trust_on_first_use(cli: Cli, sovctl_home: Path) -> None:
    with serve() as hub:
        url = hub.resolve_url(TINY_MODEL.name)
        r = cli("pull", url)
        assert_error(r, ExitCode.INTEGRITY, "without an expected sha256", "--sha256",
                     "--trust-on-first-use")
        assert_nothing_stored(sovctl_home)

        r = cli("pull", url, "--trust-on-first-use", "--name", "tofu")
        assert r.exit_code == 0, r.stderr
        assert "trusted on first use" in r.stdout

        r = cli("--json", "pull", hub.resolve_url(EMBED_MODEL.name), "--sha256", EMBED_SHA)
        assert r.exit_code == 0, r.stderr
        assert doc_of(r)["data"]["action"] == "downloaded"

        wrong = "12" * 32
        r = cli("pull", hub.resolve_url(CHAT_MODEL.name), "--sha256", wrong, "--name", "x")
        assert_error(r, ExitCode.INTEGRITY, "sha256 mismatch", wrong, CHAT_SHA)

        # A URL whose expected digest is already in the store needs no download.
        r = cli("--json", "pull", f"{hub.url}/elsewhere.gguf", "--sha256", TINY_SHA,
                "--name", "again")
        assert r.exit_code == 0, r.stderr
        assert doc_of(r)["data"]["action"] == "linked"
    models = lock_models(sovctl_home)
    assert models["tofu"]["digest_from"] == "trust-on-first-use"
    assert models["tofu"]["source"] == "url" and models["tofu"]["url"] == url
    assert models["tofu"]["sha256"] == TINY_SHA
    assert models["all-MiniLM-L6-v2-f16"]["digest_from"] == "flag"
    assert set(models) == {"tofu", "all-MiniLM-L6-v2-f16", "again"}
    assert models["again"]["size"] == TINY_MODEL.stat().st_size
    assert cli("verify").exit_code == 0
    assert len(blobs(sovctl_home)) == 2 and partials(sovctl_home) == []


def test_hf_endpoint_environment_is_honoured(cli: Cli, sovctl_home: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    dead = f"http://127.0.0.1:{closed_port()}"
    with serve() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        r = cli("--json", "pull", TINY_HF)
        assert r.exit_code == 0, r.stderr
        assert doc_of(r)["data"]["entry"]["endpoint"] == hub.url
        # SOVCTL_HUB__ENDPOINT outranks HF_ENDPOINT, and --endpoint outranks both.
        monkeypatch.setenv("SOVCTL_HUB__ENDPOINT", dead)
        assert_error(cli("pull", TINY_HF, "--name", "b"), ExitCode.NETWORK, dead)
        r = cli("pull", TINY_HF, "--name", "b", "--endpoint", hub.url)
        assert r.exit_code == 0, r.stderr


def test_endpoint_must_be_http(cli: Cli, sovctl_home: Path) -> None:
    assert_error(cli("pull", "--endpoint", "127.0.0.1:8089", TINY_HF), ExitCode.USAGE,
                 "not an http:// or https:// URL")


def test_concurrent_pulls_of_the_same_file(sovctl_home: Path) -> None:
    with serve(handler=Slow) as hub:
        cmd = [*SOVCTL, "--json", "pull", "--endpoint", hub.url, TINY_HF]
        procs = [subprocess.Popen(cmd, env=sub_env(sovctl_home), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outs = [p.communicate(timeout=60) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
        assert "Traceback" not in err
    actions = sorted(json.loads(out)["data"]["action"] for out, _ in outs)
    assert actions in (["downloaded", "linked"], ["already-pinned", "downloaded"])
    assert hub.bodies == [(TINY_MODEL.name, 0)]  # the bytes crossed the network once
    assert blobs(sovctl_home) == [sovctl_home / "store" / "blobs" / f"sha256-{TINY_SHA}"]
    assert partials(sovctl_home) == []
    assert lock_models(sovctl_home)["stories260K"]["sha256"] == TINY_SHA
    r = subprocess.run([*SOVCTL, "verify"], env=sub_env(sovctl_home), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_concurrent_pulls_of_different_files_under_one_name(sovctl_home: Path,
                                                            tmp_path: Path) -> None:
    variant = tmp_path / TINY_MODEL.name  # the tiny model with one weight changed: other bytes
    data = bytearray(TINY_MODEL.read_bytes())
    data[-1000] ^= 0x01
    variant.write_bytes(bytes(data))
    other_repo = "sovtest/other-models"
    cat = catalog((TINY_MODEL,))
    cat.files.append(MirrorFile(other_repo, "main", COMMIT, variant.name, sha256_of(variant),
                                variant.stat().st_size, variant, "2024-01-01T00:00:00Z"))
    with serve(cat, handler=Slow) as hub:
        procs = [subprocess.Popen([*SOVCTL, "--json", "pull", "--endpoint", hub.url, ref],
                                  env=sub_env(sovctl_home), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
                 for ref in (TINY_HF, f"hf://{other_repo}/{variant.name}")]
        outs = [p.communicate(timeout=60) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, ExitCode.USAGE], outs
    loser = next(json.loads(out) for (out, _), p in zip(outs, procs, strict=True)
                 if p.returncode)
    assert "pin" in loser["error"]["message"] and "Traceback" not in "".join(e for _, e in outs)
    [(name, entry)] = lock_models(sovctl_home).items()
    assert name == "stories260K"
    # The loser's bytes did not stay behind as an orphan blob.
    assert blobs(sovctl_home) == [sovctl_home / "store" / "blobs" / f"sha256-{entry['sha256']}"]
    assert partials(sovctl_home) == []


# -- verify ---------------------------------------------------------------------------------


def _set_verified_at(home: Path, value: str) -> None:
    path = home / "sovctl.lock"
    doc = tomllib.loads(path.read_text())
    for entry in doc["models"].values():
        entry["verified_at"] = value
    path.write_text(tomli_w.dumps(doc))


def test_verify_ok_records_verified_at(cli: Cli, sovctl_home: Path, tiny_copy: Path) -> None:
    assert cli("pull", str(TINY_MODEL), "--name", "a").exit_code == 0
    assert cli("pull", str(tiny_copy), "--name", "b").exit_code == 0
    _set_verified_at(sovctl_home, "2000-01-01T00:00:00Z")
    r = cli("verify", "a")
    assert r.exit_code == 0, r.stderr
    assert "ok" in r.stdout and "a" in r.stdout
    models = lock_models(sovctl_home)
    assert models["a"]["verified_at"] > "2000-01-01T00:00:00Z"
    assert models["b"]["verified_at"] == "2000-01-01T00:00:00Z"  # not asked for

    r = cli("--json", "verify")
    assert r.exit_code == 0
    items = doc_of(r)["data"]["items"]
    assert [(i["name"], i["status"], i["actual"]) for i in items] == [
        ("a", "ok", TINY_SHA), ("b", "ok", TINY_SHA)]


def test_verify_finds_a_corrupted_and_a_missing_blob(cli: Cli, sovctl_home: Path) -> None:
    assert cli("pull", str(TINY_MODEL), "--name", "tiny").exit_code == 0
    assert cli("pull", str(EMBED_MODEL), "--name", "minilm").exit_code == 0
    _set_verified_at(sovctl_home, "2000-01-01T00:00:00Z")
    blob = sovctl_home / "store" / "blobs" / f"sha256-{TINY_SHA}"
    blob.chmod(0o644)
    with blob.open("r+b") as f:
        f.seek(12345)
        byte = f.read(1)
        f.seek(12345)
        f.write(bytes([byte[0] ^ 0xFF]))

    r = cli("verify")
    assert_error(r, ExitCode.FAILURE, "1 of 2 failed verification", "tiny")
    assert "mismatch" in r.stdout
    models = lock_models(sovctl_home)
    assert models["tiny"]["verified_at"] == "2000-01-01T00:00:00Z"  # only ok ones are stamped
    assert models["minilm"]["verified_at"] > "2000-01-01T00:00:00Z"
    r = cli("--json", "verify", "tiny")
    assert r.exit_code == ExitCode.FAILURE
    doc = doc_of(r)  # one document: the per-name results and the error together
    assert doc["ok"] is False and doc["error"]["exit_name"] == "FAILURE"
    [item] = doc["data"]["items"]
    assert item["status"] == "mismatch" and item["expected"] == TINY_SHA
    assert item["actual"] != TINY_SHA and len(item["actual"]) == 64

    (sovctl_home / "store" / "blobs" / f"sha256-{EMBED_SHA}").unlink()
    r = cli("--json", "verify")
    assert r.exit_code == ExitCode.FAILURE
    statuses = {i["name"]: i["status"] for i in doc_of(r)["data"]["items"]}
    assert statuses == {"tiny": "mismatch", "minilm": "missing"}
    assert lock_models(sovctl_home)["tiny"]["verified_at"] == "2000-01-01T00:00:00Z"


def test_verify_and_the_start_check_share_one_rule(cli: Cli, sovctl_home: Path) -> None:
    """`verify` is the full form of the check `serve` runs before it starts: a mismatch found
    by either drops the blob's stamp, so a fast check can never vouch for it again."""
    assert cli("pull", str(TINY_MODEL), "--name", "tiny").exit_code == 0
    stamp = sovctl_home / "store" / "stamps" / f"sha256-{TINY_SHA}.json"
    assert stamp.is_file()
    blob = sovctl_home / "store" / "blobs" / f"sha256-{TINY_SHA}"
    blob.chmod(0o644)
    with blob.open("r+b") as f:
        f.truncate(TINY_MODEL.stat().st_size - 1)
    r = cli("--json", "verify")
    assert r.exit_code == ExitCode.FAILURE
    [item] = doc_of(r)["data"]["items"]
    assert item["status"] == "mismatch" and item["size"] == TINY_MODEL.stat().st_size - 1
    assert item["actual"] == hashlib.sha256(TINY_MODEL.read_bytes()[:-1]).hexdigest()
    assert not stamp.exists()


def test_verify_in_a_real_process_imports_nothing_heavy(cli: Cli, sovctl_home: Path) -> None:
    assert cli("pull", str(TINY_MODEL), "--name", "tiny").exit_code == 0
    code = ("import sys, runpy; sys.argv = ['sovctl', 'verify', 'tiny']\n"
            "try:\n    runpy.run_module('sovctl', run_name='__main__')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "heavy = [m for m in ('huggingface_hub', 'gguf', 'llama_cpp', 'numpy', 'httpx',"
            " 'concurrent.futures') if m in sys.modules]\n"
            "print('HEAVY', heavy)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60, env=sub_env(sovctl_home))
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout and "tiny" in r.stdout
    assert "HEAVY []" in r.stdout


def test_verify_unknown_name_and_empty_store(cli: Cli, sovctl_home: Path) -> None:
    r = cli("verify")
    assert r.exit_code == 0 and "nothing to verify" in r.stdout
    assert_error(cli("verify", "ghost"), ExitCode.NOT_FOUND, "no model named 'ghost'")


# -- models and rm --------------------------------------------------------------------------


def test_models_lists_gguf_facts(cli: Cli, sovctl_home: Path) -> None:
    assert cli("pull", str(CHAT_MODEL), "--name", "smol").exit_code == 0
    assert cli("pull", str(EMBED_MODEL), "--name", "minilm").exit_code == 0
    r = cli("models")
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:4] == ["NAME", "SIZE", "SHA256", "REVISION"]
    smol = next(line for line in lines if line.startswith("smol"))
    assert "llama" in smol and "Q4_1" in smol and CHAT_SHA[:7] in smol
    minilm = next(line for line in lines if line.startswith("minilm"))
    assert "bert" in minilm and "F16" in minilm

    rows = {row["entry"]["name"]: row for row in doc_of(cli("--json", "models"))["data"]}
    smol_facts, minilm_facts = rows["smol"]["facts"], rows["minilm"]["facts"]
    assert smol_facts["architecture"] == "llama"
    assert smol_facts["chat_template"] is True and smol_facts["embedding"] is False
    assert smol_facts["quantization"] == "Q4_1"
    assert 130e6 < smol_facts["parameters"] < 140e6
    assert smol_facts["context_length"] == 8192
    assert minilm_facts["architecture"] == "bert"
    assert minilm_facts["embedding"] is True and minilm_facts["chat_template"] is False
    assert rows["smol"]["entry"]["sha256"] == CHAT_SHA and rows["smol"]["present"] is True

    # The facts survive losing their cache: they are read again from the header.
    (sovctl_home / "store" / "facts" / f"sha256-{EMBED_SHA}.json").unlink()
    rows = {row["entry"]["name"]: row for row in doc_of(cli("--json", "models"))["data"]}
    assert rows["minilm"]["facts"] == minilm_facts


def test_models_empty_and_missing_blob(cli: Cli, sovctl_home: Path) -> None:
    r = cli("models")
    assert r.exit_code == 0 and "no models yet" in r.stdout
    assert doc_of(cli("--json", "models"))["data"] == []
    assert cli("pull", str(TINY_MODEL), "--name", "tiny").exit_code == 0
    (sovctl_home / "store" / "blobs" / f"sha256-{TINY_SHA}").unlink()
    [row] = doc_of(cli("--json", "models"))["data"]
    assert row["present"] is False and row["facts"] is None
    assert "MISSING" in cli("models").stdout


def test_rm_keeps_a_shared_blob_and_removes_the_last(cli: Cli, sovctl_home: Path) -> None:
    assert cli("pull", str(TINY_MODEL), "--name", "a").exit_code == 0
    assert cli("pull", str(TINY_MODEL), "--name", "b").exit_code == 0
    r = cli("--json", "rm", "a")
    assert r.exit_code == 0, r.stderr
    data = doc_of(r)["data"]
    assert data["blob_removed"] is False and data["still_used_by"] == ["b"]
    assert len(blobs(sovctl_home)) == 1 and set(lock_models(sovctl_home)) == {"b"}

    r = cli("rm", "b")
    assert r.exit_code == 0 and "its blob" in r.stdout
    assert blobs(sovctl_home) == [] and lock_models(sovctl_home) == {}
    assert list((sovctl_home / "store" / "facts").iterdir()) == []
    assert_error(cli("rm", "b"), ExitCode.NOT_FOUND, "no model named 'b'")


# -- mirror serve ---------------------------------------------------------------------------


class MirrorProcess:
    """`sovctl --json mirror serve` as a real process; the URL comes from its JSON document."""

    def __init__(self, home: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [*SOVCTL, "--json", "mirror", "serve", "--port", "0", *args],
            env=sub_env(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None
        lines = []
        for line in self.proc.stdout:
            lines.append(line)
            if line.rstrip() == "}":
                break
        if not lines:
            self.proc.wait(timeout=10)
            raise AssertionError(self.proc.stderr.read() if self.proc.stderr else "no output")
        self.doc = json.loads("".join(lines))
        port = self.doc["data"]["url"].rsplit(":", 1)[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


def test_mirror_serves_what_the_box_pinned(cli: Cli, sovctl_home: Path, tmp_path: Path) -> None:
    from huggingface_hub import HfApi, hf_hub_download

    with serve() as hub:
        r = cli("pull", "--endpoint", hub.url, TINY_HF)
        assert r.exit_code == 0, r.stderr
        r = cli("pull", "--endpoint", hub.url, TINY_HF, "--name", "same-file-again")
        assert r.exit_code == 0, r.stderr
    assert cli("pull", str(EMBED_MODEL)).exit_code == 0  # a local import: not mirrored

    mirror = MirrorProcess(sovctl_home)
    try:
        assert mirror.doc["ok"] and mirror.doc["command"] == "mirror serve"
        assert mirror.doc["data"]["repos"] == [REPO]
        assert mirror.doc["data"]["files"] == 1
        assert mirror.doc["data"]["token_required"] is False

        # Another machine of the operator: sovctl with --endpoint...
        other = tmp_path / "other-home"
        read_before = _bytes_read_from_files()
        r = cli("--home", str(other), "--json", "pull", "--endpoint", mirror.url, TINY_HF)
        assert r.exit_code == 0, r.stderr
        # One pass: the bytes are hashed as they arrive from the socket (which /proc/self/io
        # does not count), never read back from the disk for a second hashing pass. What
        # is read from files is small and fixed (httpx loads its CA bundle, ~0.2 MB).
        assert _bytes_read_from_files() - read_before < TINY_MODEL.stat().st_size // 2
        entry = doc_of(r)["data"]["entry"]
        assert (entry["commit"], entry["sha256"], entry["digest_from"]) == \
            (COMMIT, TINY_SHA, "hub")
        assert lock_models(other)["stories260K"]["commit"] == COMMIT

        # ...and plain huggingface_hub, which sees the same commit and sha256.
        info = HfApi(endpoint=mirror.url).model_info(REPO, files_metadata=True)
        assert info.sha == COMMIT
        [sibling] = info.siblings or []
        assert sibling.rfilename == TINY_MODEL.name
        assert sibling.lfs is not None and sibling.lfs.sha256 == TINY_SHA
        path = Path(hf_hub_download(REPO, TINY_MODEL.name, endpoint=mirror.url,
                                    cache_dir=tmp_path / "hf-cache"))
        assert path.parent.name == COMMIT
        assert path.read_bytes() == TINY_MODEL.read_bytes()

        # Only what the lock names is reachable.
        with httpx.Client(base_url=mirror.url) as client:
            assert client.get(f"/{REPO}/resolve/main/{EMBED_MODEL.name}").status_code == 404
            assert client.get("/api/models/sovtest/other").status_code == 404
            assert client.get(f"/{REPO}/resolve/main/../../sovctl.lock").status_code == 404
            ranged = client.get(f"/{REPO}/resolve/{COMMIT}/{TINY_MODEL.name}",
                                headers={"Range": "bytes=4-"})
            assert ranged.status_code == 206 and ranged.content == TINY_MODEL.read_bytes()[4:]
    finally:
        assert mirror.stop() == 0


def test_a_replica_pulls_another_boxs_lock_from_its_mirror(cli: Cli, sovctl_home: Path,
                                                            tmp_path: Path) -> None:
    with serve() as hub:
        assert cli("pull", "--endpoint", hub.url, TINY_HF).exit_code == 0
    assert cli("pull", str(EMBED_MODEL), "--name", "minilm").exit_code == 0  # not mirrorable
    head_lock = sovctl_home / "sovctl.lock"
    replica = tmp_path / "replica"

    assert_error(cli("--home", str(replica), "pull", TINY_HF, "--lock", str(head_lock)),
                 ExitCode.USAGE, "REF cannot be given with it")
    mirror = MirrorProcess(sovctl_home)
    try:
        r = cli("--home", str(replica), "--json", "pull", "--lock", str(head_lock),
                "--endpoint", mirror.url)
        doc = doc_of(r)
        # The Hub pin arrives, verified against the head's sha256; the file the head imported
        # from its own disk is named, with what to do, and the exit code says it is missing.
        assert r.exit_code == ExitCode.FAILURE, r.stderr
        assert "1 of 2 pins" in doc["error"]["message"]
        [skipped] = doc["data"]["skipped"]
        assert skipped[0] == "minilm" and f"--sha256 {EMBED_SHA}" in skipped[1]
        mine, theirs = lock_models(replica), lock_models(sovctl_home)
        assert set(mine) == {"stories260K"}
        for key in ("sha256", "size", "commit", "repo", "path", "ref"):
            assert mine["stories260K"][key] == theirs["stories260K"][key], key
        assert cli("--home", str(replica), "verify").exit_code == 0

        # A lock that pins other bytes than the mirror serves: refused, nothing stored.
        forged = tmp_path / "forged.lock"
        forged.write_text(head_lock.read_text().replace(TINY_SHA, "0" * 64))
        other = tmp_path / "other"
        r = cli("--home", str(other), "pull", "--lock", str(forged), "--endpoint", mirror.url)
        assert_error(r, ExitCode.INTEGRITY, "0" * 12)
        assert_nothing_stored(other)
    finally:
        assert mirror.stop() == 0


def test_mirror_on_a_network_address_requires_its_token(
    cli: Cli, sovctl_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import hf_hub_download

    with serve() as hub:
        assert cli("pull", "--endpoint", hub.url, TINY_HF).exit_code == 0
    mirror = MirrorProcess(sovctl_home, "--host", "0.0.0.0")
    try:
        assert mirror.doc["data"]["token_required"] is True
        key_file = sovctl_home / "secrets" / "mirror_token"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        key = key_file.read_text().strip()
        # Its own token: the gateway's API key is not made for it, nor would open it.
        assert not (sovctl_home / "secrets" / "api_key").exists()

        with httpx.Client(base_url=mirror.url) as client:
            r = client.get(f"/api/models/{REPO}")
            assert r.status_code == 401
            r = client.get(f"/api/models/{REPO}", headers={"Authorization": "Bearer wrong"})
            assert r.status_code == 401
            r = client.get(f"/api/models/{REPO}", headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200 and r.json()["sha"] == COMMIT

        other = tmp_path / "other-home"
        r = cli("--home", str(other), "pull", "--endpoint", mirror.url, TINY_HF)
        assert_error(r, ExitCode.NETWORK, "401", "SOVCTL_MIRROR_TOKEN")
        assert_nothing_stored(other)
        path = hf_hub_download(REPO, TINY_MODEL.name, endpoint=mirror.url, token=key,
                               cache_dir=tmp_path / "hf-cache")
        assert Path(path).read_bytes() == TINY_MODEL.read_bytes()

        # HF_TOKEN, the Hub's, goes to the Hub alone: never to a mirror, even one it opens.
        monkeypatch.setenv("HF_TOKEN", key)
        r = cli("--home", str(other), "pull", "--endpoint", mirror.url, TINY_HF)
        assert_error(r, ExitCode.NETWORK, "401", "SOVCTL_MIRROR_TOKEN")
        monkeypatch.delenv("HF_TOKEN")
        monkeypatch.setenv("SOVCTL_MIRROR_TOKEN", key)
        # The mirror's token goes to a mirror endpoint only, never to a plain URL...
        url = f"{mirror.url}/{REPO}/resolve/main/{TINY_MODEL.name}"
        r = cli("--home", str(other), "pull", url, "--sha256", TINY_SHA)
        assert_error(r, ExitCode.NETWORK, "401")
        # ...where it opens the mirror.
        r = cli("--home", str(other), "--json", "pull", "--endpoint", mirror.url, TINY_HF)
        assert r.exit_code == 0, r.stderr
        assert doc_of(r)["data"]["entry"]["commit"] == COMMIT
    finally:
        mirror.stop()


def test_mirror_port_in_use(cli: Cli, sovctl_home: Path) -> None:
    with serve() as hub:
        port = hub.url.rsplit(":", 1)[1]
        r = cli("mirror", "serve", "--port", port)
    assert_error(r, ExitCode.RUNTIME, "cannot bind", port)


# -- malformed lock and config --------------------------------------------------------------


def test_malformed_lock_is_a_config_error_and_left_untouched(cli: Cli, sovctl_home: Path) -> None:
    sovctl_home.mkdir(parents=True)
    lock = sovctl_home / "sovctl.lock"
    for text, needle in [
        ("version = 1\n[models.x\n", "malformed"),
        ("version = 7\n", "version 7"),
        ('version = 1\n[models.x]\nsha256 = "abc"\n', "incomplete"),
        ('version = 1\nmodels = "nope"\n', "must be a table"),
        ('version = 1\n[models.x]\nsha256 = 1\nsize = 1\nsource = "file"\nref = "r"\n'
         'pulled_at = "t"\ndigest_from = "computed"\n', "sha256 must be a str"),
    ]:
        lock.write_text(text)
        for args in (["models"], ["verify"], ["rm", "x"], ["pull", str(TINY_MODEL)]):
            r = cli(*args)
            assert_error(r, ExitCode.CONFIG, "lock file", needle, "untouched")
        assert lock.read_text() == text
        assert blobs(sovctl_home) == []


def test_malformed_config_is_a_config_error_and_left_untouched(cli: Cli, sovctl_home: Path) -> None:
    sovctl_home.mkdir(parents=True)
    config = sovctl_home / "sovctl.toml"
    for text, needle in [
        ("[hub\nendpoint = 1\n", "not valid TOML"),
        ("[hub]\nendpoint = 1\n", "hub.endpoint must be a str"),
        ("[nonsense]\nx = 1\n", "unknown section [nonsense]"),
        ("[serve]\nprot = 1\n", "unknown setting serve.prot"),
        ('profile = "no-such-profile"\n', "profile 'no-such-profile' not found"),
    ]:
        config.write_text(text)
        r = cli("pull", str(TINY_MODEL))
        assert_error(r, ExitCode.CONFIG, needle)
        assert config.read_text() == text
        assert_nothing_stored(sovctl_home)
        r = cli("--json", "pull", str(TINY_MODEL))
        assert doc_of(r)["error"]["exit_name"] == "CONFIG"


def test_config_file_endpoint_is_used(cli: Cli, sovctl_home: Path) -> None:
    sovctl_home.mkdir(parents=True)
    with serve() as hub:
        (sovctl_home / "sovctl.toml").write_text(f'[hub]\nendpoint = "{hub.url}"\n')
        r = cli("--json", "pull", TINY_HF)
    assert r.exit_code == 0, r.stderr
    assert doc_of(r)["data"]["entry"]["endpoint"] == hub.url


# -- the command line as a whole ------------------------------------------------------------


def test_help_and_version(cli: Cli) -> None:
    r = cli("--help")
    assert r.exit_code == 0
    for command in ("pull", "verify", "models", "rm", "mirror"):
        assert command in r.stdout
    for command in ("pull", "verify", "models", "rm", "mirror", "mirror serve"):
        r = cli(*command.split(), "--help")
        assert r.exit_code == 0 and "Usage:" in r.stdout, command
    assert "--trust-on-first-use" in cli("pull", "--help").stdout
    assert cli("--version").stdout.strip() == "sovctl 0.1.0"


def test_help_in_a_real_process_imports_nothing_heavy(tmp_path: Path) -> None:
    code = ("import sys, runpy; sys.argv = ['sovctl', '--help']\n"
            "try:\n    runpy.run_module('sovctl', run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code == 0, e.code\n"
            "heavy = [m for m in ('huggingface_hub', 'gguf', 'llama_cpp', 'numpy', 'httpx')"
            " if m in sys.modules]\n"
            "print('HEAVY', heavy)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60, env=sub_env(tmp_path / "h"))
    assert r.returncode == 0, r.stderr
    assert "Usage: sovctl" in r.stdout
    assert "HEAVY []" in r.stdout


def test_json_usage_errors_are_one_document(cli: Cli) -> None:
    r = cli("--json", "rm")  # NAME missing
    assert r.exit_code == ExitCode.USAGE
    doc = doc_of(r)
    assert doc["ok"] is False and doc["error"]["exit_name"] == "USAGE"
    assert "Missing argument" in doc["error"]["message"]
    r = cli("--json", "pull")  # neither REF nor --lock
    assert r.exit_code == ExitCode.USAGE
    assert "give a REF, or --lock FILE" in doc_of(r)["error"]["message"]
    r = cli("pull", "--json", "--no-such-option", "x")
    assert r.exit_code == ExitCode.USAGE
    assert doc_of(r)["error"]["exit_name"] == "USAGE"
    r = cli("--json", "no-such-command")
    assert r.exit_code == ExitCode.USAGE
    assert doc_of(r)["ok"] is False


def test_json_flag_after_the_command(cli: Cli, sovctl_home: Path) -> None:
    r = cli("pull", str(TINY_MODEL), "--json")
    assert r.exit_code == 0
    assert doc_of(r)["data"]["entry"]["sha256"] == TINY_SHA
    r = cli("rm", "ghost", "--json")
    assert r.exit_code == ExitCode.NOT_FOUND
    doc = doc_of(r)
    assert doc["command"] == "rm" and doc["error"]["exit_name"] == "NOT_FOUND"
    assert doc["error"]["hint"]


def test_debug_shows_the_traceback(sovctl_home: Path) -> None:
    r = subprocess.run([*SOVCTL, "rm", "ghost"], capture_output=True, text=True, timeout=60,
                       env=sub_env(sovctl_home))
    assert r.returncode == ExitCode.NOT_FOUND and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: no model named 'ghost'")
    r = subprocess.run([*SOVCTL, "rm", "ghost"], capture_output=True, text=True, timeout=60,
                       env=sub_env(sovctl_home, SOVCTL_DEBUG="1"))
    assert r.returncode == ExitCode.NOT_FOUND and "Traceback" in r.stderr
