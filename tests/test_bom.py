"""`sovctl bom`: the bill of materials, CycloneDX JSON, end to end through the CLI.

Every document is checked against the CycloneDX 1.6 JSON schema with the strict validator
cyclonedx-python-lib ships (its schemas are bundled: one test validates with no network at all),
and against what it lists: the lock's exact sha256s, the llama.cpp build, and every Python
distribution installed here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import EMBED_MODEL, MMPROJ, TINY_MODEL
from tests.hubserver import COMMIT, KNOWN_SHA256, REPO, catalog, serve, sha256_of
from tests.test_store import assert_error, doc_of

from sovctl import __version__, llamacpp
from sovctl.errors import ExitCode

pytestmark = pytest.mark.usefixtures("models")
Cli = Callable[..., Any]


def validate(text: str) -> None:
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    errors = JsonStrictValidator(SchemaVersion.V1_6).validate_str(text)
    assert errors is None, errors


def walk(components: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for c in components:
        yield c
        yield from walk(c.get("components", []))


def by_ref(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["bom-ref"]: c for c in walk(doc["components"])}


def props(c: dict[str, Any]) -> dict[str, str]:
    return {p["name"].removeprefix("sovctl:"): p["value"] for p in c.get("properties", [])}


def sha256s(c: dict[str, Any]) -> list[str]:
    return [h["content"] for h in c.get("hashes", []) if h["alg"] == "SHA-256"]


def norm(name: str) -> str:
    import re

    return re.sub(r"[-_.]+", "-", name).lower()


def test_bom_validates_and_lists_what_the_lock_pins(cli: Cli, sovctl_home: Path) -> None:
    with serve(catalog((TINY_MODEL, MMPROJ))) as hub:
        r = cli("pull", "--endpoint", hub.url, f"hf://{REPO}/{TINY_MODEL.name}", "--name", "tiny",
                "--mmproj", f"hf://{REPO}/{MMPROJ.name}")
        assert r.exit_code == 0, r.stderr
    assert cli("pull", str(EMBED_MODEL), "--name", "minilm").exit_code == 0

    r = cli("bom")
    assert r.exit_code == 0, r.stderr
    validate(r.stdout)
    doc = json.loads(r.stdout)
    assert (doc["bomFormat"], doc["specVersion"]) == ("CycloneDX", "1.6")
    assert doc["metadata"]["component"]["name"] == "sovctl"
    assert doc["metadata"]["component"]["version"] == __version__
    refs = by_ref(doc)

    # Models: exactly the lock's names and sha256s (the published digests of the test files).
    lock = tomllib.loads((sovctl_home / "sovctl.lock").read_text())["models"]
    models = {c["name"]: c for c in doc["components"]
              if c["type"] == "machine-learning-model"}
    assert set(models) == set(lock) == {"tiny", "minilm"}
    for name, entry in lock.items():
        assert sha256s(models[name]) == [entry["sha256"]]
        assert props(models[name])["size"] == str(entry["size"])
    assert sha256s(models["tiny"]) == [KNOWN_SHA256[TINY_MODEL.name]]
    assert sha256s(models["minilm"]) == [KNOWN_SHA256[EMBED_MODEL.name]]
    tiny, minilm = props(models["tiny"]), props(models["minilm"])
    assert (tiny["repo"], tiny["commit"], tiny["path"]) == (REPO, COMMIT, TINY_MODEL.name)
    assert models["tiny"]["version"] == COMMIT
    assert models["tiny"]["purl"] == f"pkg:huggingface/{REPO}@{COMMIT}"
    assert (tiny["architecture"], minilm["architecture"]) == ("llama", "bert")
    assert minilm["quantization"] == "F16" and minilm["source"] == "file"
    # Licence from the GGUF header where it names one; said unknown where it does not.
    assert models["minilm"]["licenses"] == [{"license": {"id": "Apache-2.0"}}]
    assert "licenses" not in models["tiny"]
    unknown = doc_of(cli("--json", "bom"))["data"]["unknown"]
    assert "tiny: licence (its GGUF header names none)" in unknown
    # The projector, a part of its model.
    projector = refs["model:tiny/mmproj"]
    assert sha256s(projector) == [sha256_of(MMPROJ)] == [lock["tiny"]["mmproj"]["sha256"]]
    assert props(projector)["architecture"] == "clip"

    # The runtime: the build scripts/setup made, the binaries with their own sha256.
    build = llamacpp.build_info()
    assert build is not None, "this checkout's llama.cpp was not built by scripts/setup"
    runtime = refs["runtime:llama.cpp"]
    assert runtime["version"] == build.commit
    assert (props(runtime)["commit"], props(runtime)["build-flags"]) == (build.commit,
                                                                          build.flags)
    server = llamacpp.find_binary("llama-server")
    assert server is not None
    assert sha256s(refs["runtime:llama-server"]) == [sha256_of(server)]
    assert props(refs["runtime:llama-server"])["path"] == str(server)
    wheel = json.loads(metadata.distribution("llama-cpp-python").read_text("direct_url.json")
                       or "{}").get("archive_info", {}).get("hashes", {}).get("sha256")
    if wheel:  # installed from the wheelhouse scripts/setup fills: pip recorded its hash
        assert props(runtime)["wheel-sha256"] == wheel
    else:
        assert any("the hash of the llama-cpp-python wheel" in u for u in unknown)

    # Every Python distribution installed here, with its version and a hash.
    installed: dict[str, metadata.Distribution] = {}
    for d in metadata.distributions():
        installed.setdefault(norm(d.metadata["Name"]), d)  # the first on sys.path is imported
    packages = {c["name"]: c for c in doc["components"] if c["type"] == "library"}
    assert {norm(n) for n in packages} == set(installed) - {"sovctl"}
    for name, c in packages.items():
        assert c["version"] == installed[norm(name)].version, name
        assert c["purl"] == f"pkg:pypi/{norm(name)}@{c['version']}"
        assert len(sha256s(c)) == 1, name
        assert props(c)["hash-of"] in ("wheel", "RECORD")
    typer = installed["typer"]
    record = next(f for f in typer.files or () if f.name == "RECORD")
    assert props(packages[typer.metadata["Name"]])["hash-of"] == "RECORD"
    assert sha256s(packages[typer.metadata["Name"]]) == [
        hashlib.sha256(Path(str(record.locate())).read_bytes()).hexdigest()]

    # The validator is a real one: a malformed hash is caught.
    broken = json.loads(r.stdout)
    broken["components"][0]["hashes"] = [{"alg": "SHA-256", "content": "not hex"}]
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(json.dumps(broken)) is not None


def test_bom_file_is_atomic_0644_and_the_same_stack_gives_the_same_bytes(
        cli: Cli, sovctl_home: Path, tmp_path: Path) -> None:
    assert cli("pull", str(TINY_MODEL), "--name", "tiny").exit_code == 0
    out = tmp_path / "out" / "stack.cdx.json"
    out.parent.mkdir()
    out.write_text("an older BOM")
    out.chmod(0o600)
    before = out.stat().st_ino
    old_umask = os.umask(0o077)
    try:
        r = cli("bom", "-o", str(out))
    finally:
        os.umask(old_umask)
    assert r.exit_code == 0, r.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert out.stat().st_ino != before  # replaced by a rename, never rewritten in place
    assert [p.name for p in out.parent.iterdir()] == ["stack.cdx.json"]  # no temp file left
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    assert f"sha256 {digest}" in r.stdout and "1 model(s)" in r.stdout
    validate(out.read_text())

    # The same stack, the same document, byte for byte: on stdout and under --json.
    assert cli("bom").stdout == out.read_text()
    again = tmp_path / "out" / "again.json"
    r = cli("--json", "bom", "-o", str(again))
    data = doc_of(r)["data"]
    assert (data["path"], data["sha256"], data["bom"]) == (str(again), digest, None)
    assert data["spec"] == "CycloneDX 1.6" and data["models"] == ["tiny"]

    # Another model: another document, with another serial number.
    first = json.loads(out.read_text())
    assert cli("pull", str(MMPROJ.parent / "all-MiniLM-L6-v2-f16.gguf"), "--name", "minilm"
               ).exit_code == 0
    r = cli("--json", "bom")
    data = doc_of(r)["data"]
    assert data["sha256"] != digest and data["models"] == ["minilm", "tiny"]
    assert data["bom"]["serialNumber"] != first["serialNumber"]

    # A directory that does not exist: refused, nothing created.
    assert_error(cli("bom", "-o", str(tmp_path / "nowhere" / "x.json")), ExitCode.USAGE,
                 "is not a directory")
    assert not (tmp_path / "nowhere").exists()


def test_bom_is_made_and_validated_with_no_network(sovctl_home: Path, tmp_path: Path) -> None:
    """The schemas the validator needs are bundled: inside a network namespace with only
    loopback, the BOM is made and checked."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "--net", "true"], capture_output=True, check=False).returncode != 0:
        if os.environ.get("CI"):
            pytest.fail("unshare --net is not permitted: CI runs as root, where it is")
        pytest.skip("network namespaces are not permitted here (CI runs as root)")
    env = {**os.environ, "SOVCTL_HOME": str(sovctl_home)}
    out = tmp_path / "bom.json"
    check = ("import sys\nfrom cyclonedx.schema import SchemaVersion\n"
             "from cyclonedx.validation.json import JsonStrictValidator\n"
             "e = JsonStrictValidator(SchemaVersion.V1_6).validate_str(open(sys.argv[1]).read())\n"
             "print('valid' if e is None else e)\n")
    for args in ([sys.executable, "-m", "sovctl", "pull", str(TINY_MODEL), "--name", "tiny"],
                 [sys.executable, "-m", "sovctl", "bom", "-o", str(out)],
                 [sys.executable, "-c", check, str(out)]):
        r = subprocess.run(["unshare", "--net", *args], env=env, capture_output=True,
                           text=True, timeout=120, check=False)
        assert r.returncode == 0, (args, r.stderr)
    assert r.stdout.strip() == "valid"
