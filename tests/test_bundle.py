"""`sovctl bundle create`, `bundle import` and a bundle's install script.

Real throughout: bundles of the real test models from a real store, with the wheels of this
very environment (packed from its installed files, the llama.cpp wheel from scripts/setup's
wheelhouse when it holds the installed build, sovctl built from this checkout), pip installing
them into fresh virtual environments with no index, and the round trip inside a network
namespace with only loopback (iproute2, as root, as CI runs): install, serve, an answer, then
`audit blackout` passing, all from the installed environment.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import pytest
from tests.conftest import CHAT_MODEL, EMBED_MODEL, MMPROJ, TINY_MODEL
from tests.helpers import run, run_json

from sovctl.ops import wheels

pytestmark = pytest.mark.usefixtures("models")

CONFIG = '[models.smol]\nrole = "chat"\nparallel = 1\nn_ctx = 512\nn_threads = 1\n'
PROFILE = '# the operator\'s own profile, carried as it is\n[serve]\nparallel = 1\n'


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home as an operator has it: two models (one with its projector), sovctl.toml, one
    profile of their own."""
    home = tmp_path_factory.mktemp("source") / "home"
    run(home, "pull", str(TINY_MODEL), "--name", "tiny", check=True)
    run(home, "pull", str(CHAT_MODEL), "--name", "smol", "--mmproj", str(MMPROJ), check=True)
    (home / "sovctl.toml").write_text(CONFIG)
    (home / "profiles").mkdir()
    (home / "profiles" / "mine.toml").write_text(PROFILE)
    return home


@pytest.fixture(scope="module")
def bundle(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "stack"
    doc = run_json(source, "bundle", "create", str(out), timeout=600)
    assert doc["_rc"] == 0, doc["_stderr"]
    return out


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())  # type: ignore[no-any-return]


@contextmanager
def flipped(path: Path, offset: int) -> Iterator[None]:
    """One byte of `path` changed, put back afterwards."""
    mode = path.stat().st_mode
    path.chmod(mode | stat.S_IWUSR)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(data)
    try:
        yield
    finally:
        data[offset] ^= 0x01
        path.write_bytes(data)
        path.chmod(mode)


def test_the_bundle_holds_every_file_with_its_hash(bundle: Path, source: Path) -> None:
    doc = manifest(bundle)
    assert doc["schema"] == "sovctl.bundle/1"
    listed = {f["path"]: f for f in doc["files"]}
    on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
    assert on_disk == set(listed) | {"manifest.json"}  # nothing unlisted, nothing missing
    for path, f in listed.items():
        assert sha256(bundle / path) == f["sha256"] and (bundle / path).stat().st_size == f["size"]

    # The models: their blobs (the projector too), the lock pinning them, the settings as they are.
    want = {sha256(p) for p in (TINY_MODEL, CHAT_MODEL, MMPROJ)}
    assert {p.removeprefix("blobs/sha256-") for p in listed if p.startswith("blobs/")} == want
    assert {m["name"] for m in doc["models"]} == {"tiny", "smol"}
    assert (bundle / "home" / "sovctl.lock").read_text() == (source / "sovctl.lock").read_text()
    assert (bundle / "home" / "sovctl.toml").read_text() == CONFIG
    assert (bundle / "home" / "profiles" / "mine.toml").read_text() == PROFILE
    assert not [p for p in listed if "secrets" in p or "ledger" in p or p.startswith("run/")]

    # The wheels: sovctl and every distribution it runs on, at the installed versions, each
    # pinned by its hash for pip.
    packages = {p["name"]: p for p in doc["packages"]}
    for dist in wheels.requirements_closure():
        assert packages[dist.name]["version"] == dist.version
        assert packages[dist.name]["wheel"] in listed
    assert packages["sovctl"]["how"] == "build"  # this checkout is installed editable
    reqs = (bundle / "requirements.txt").read_text().splitlines()
    assert len(reqs) == len(packages)
    for line in reqs:
        name, _, rest = line.partition("==")
        assert rest.split(" --hash=sha256:")[1] == listed[packages[name]["wheel"]]["sha256"]
    assert os.access(bundle / "install", os.X_OK)

    # The bill of materials of exactly this stack, its digest in the manifest.
    bom = json.loads((bundle / "bom.cdx.json").read_text())
    assert sha256(bundle / "bom.cdx.json") == doc["bom"]["sha256"]
    assert bom["bomFormat"] == "CycloneDX"
    models = {c["name"]: c for c in bom["components"]
              if c["type"] == "machine-learning-model"}
    assert set(models) == {"tiny", "smol"}
    assert models["tiny"]["hashes"][0]["content"] == sha256(TINY_MODEL)


def _rows(z: zipfile.ZipFile) -> dict[str, str]:
    [record] = [n for n in z.namelist() if n.endswith(".dist-info/RECORD")]
    return {r[0]: r[1] for r in csv.reader(io.StringIO(z.read(record).decode())) if r[1]}


def test_a_repacked_wheel_is_the_installed_files(tmp_path: Path) -> None:
    """llama-cpp-python packed from its installed files: every file of its RECORD, bytes and
    hashes, executables still executable; the same files as the wheel it was installed from."""
    dist = metadata.distribution("llama_cpp_python")
    site = Path(str(dist.locate_file("")))
    pkg = wheels.Package(dist.metadata["Name"], dist.version, "repack", str(site), 0)
    path, digest, size = wheels.repack(pkg, tmp_path)
    assert digest == sha256(path) and size == path.stat().st_size
    with zipfile.ZipFile(path) as z:
        rows = _rows(z)
        for name, want in rows.items():
            got = base64.urlsafe_b64encode(hashlib.sha256(z.read(name)).digest()).rstrip(b"=")
            assert want == "sha256=" + got.decode(), name
        server = z.getinfo("llama_cpp/bin/llama-server")
        assert (server.external_attr >> 16) & 0o111, "llama-server lost its exec bit"
    installed = {r[0]: r[1] for r in csv.reader(io.StringIO(dist.read_text("RECORD") or ""))
                 if r[1] and not r[0].startswith("../")
                 and r[0].rpartition("/")[2] not in ("INSTALLER", "REQUESTED", "direct_url.json")}
    assert rows == installed
    for house in wheels.wheelhouses():
        for original in house.glob(f"llama_cpp_python-{dist.version}-*.whl"):
            with zipfile.ZipFile(original) as z:
                if _rows(z) == rows:
                    return  # the installed build: packed again, the same files
    # No wheelhouse here holds the installed build (it was built elsewhere): nothing to compare.


def test_a_damaged_bundle_installs_nothing(bundle: Path, tmp_path: Path) -> None:
    doc = manifest(bundle)
    tiny_blob = f"blobs/sha256-{sha256(TINY_MODEL)}"
    sovctl_wheel = next(p["wheel"] for p in doc["packages"] if p["name"] == "sovctl")
    home, venv = tmp_path / "home", tmp_path / "venv"
    env = {**os.environ, "SOVCTL_HOME": str(home)}
    for damaged in (tiny_blob, sovctl_wheel):
        size = (bundle / damaged).stat().st_size
        with flipped(bundle / damaged, size // 2):
            r = subprocess.run(["bash", str(bundle / "install"), "--venv", str(venv)],
                               env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 5, r.stderr
        assert f"damaged bundle file {damaged}: sha256" in r.stderr
        assert len([line for line in r.stderr.splitlines() if "damaged bundle file" in line]) == 1
        assert "nothing was installed" in r.stderr
        assert not venv.exists() and not home.exists()

    # `bundle import` on its own hashes each blob as it copies it: the same damage is refused,
    # and nothing stays behind in the store.
    with flipped(bundle / tiny_blob, 1000):
        r = run(home, "bundle", "import", str(bundle))
    assert r.returncode == 5, r.stderr
    assert tiny_blob in r.stderr and "nothing was imported" in r.stderr
    lock = home / "sovctl.lock"
    assert not lock.exists() or "[models." not in lock.read_text()
    assert not list((home / "store" / "blobs").glob("*"))  # smol's, copied first, went again
    assert not (home / "sovctl.toml").exists()


def test_import_refuses_what_the_home_holds_otherwise(bundle: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    run(home, "pull", str(EMBED_MODEL), "--name", "tiny", check=True)  # another file, same name
    (home / "sovctl.toml").write_text("[serve]\nport = 9000\n")
    before = (home / "sovctl.lock").read_text()
    doc = run_json(home, "bundle", "import", str(bundle))
    assert doc["_rc"] == 2 and doc["error"]["exit_name"] == "USAGE"
    message = doc["error"]["message"]
    assert "model tiny pins sha256" in message and "sovctl.toml differs" in message
    assert "--force" in doc["error"]["hint"]
    assert (home / "sovctl.lock").read_text() == before  # nothing written
    assert not (home / "profiles").exists()
    assert len(list((home / "store" / "blobs").iterdir())) == 1

    doc = run_json(home, "bundle", "import", str(bundle), "--force")
    assert doc["_rc"] == 0, doc["_stderr"]
    actions = {m["name"]: m["action"] for m in doc["data"]["models"]}
    assert actions == {"tiny": "replaced", "smol": "copied"}
    assert {f["path"]: f["action"] for f in doc["data"]["files"]} == {
        "sovctl.toml": "replaced", "profiles/mine.toml": "written"}
    # The replaced pin's blob went with it: no other name pins it.
    blobs = {p.name for p in (home / "store" / "blobs").iterdir()}
    assert blobs == {f"sha256-{sha256(p)}" for p in (TINY_MODEL, CHAT_MODEL, MMPROJ)}
    verify = run_json(home, "verify")
    assert verify["_rc"] == 0 and {i["name"] for i in verify["data"]["items"]} == {
        "tiny", "smol", "smol/mmproj"}

    # Again: everything is already there, nothing is copied or rewritten.
    doc = run_json(home, "bundle", "import", str(bundle))
    assert doc["_rc"] == 0, doc["_stderr"]
    assert {m["action"] for m in doc["data"]["models"]} == {"present"}
    assert {f["action"] for f in doc["data"]["files"]} == {"same"}
    assert doc["data"]["copied"] == 0


def test_create_refuses_before_writing(source: Path, tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "file").write_text("x")
    r = run(source, "bundle", "create", str(taken))
    assert r.returncode == 2 and "is not an empty directory" in r.stderr
    assert [p.name for p in taken.iterdir()] == ["file"]

    doc = run_json(source, "bundle", "create", str(tmp_path / "b"), "--models", "nope")
    assert doc["_rc"] == 4 and "no model named 'nope'" in doc["error"]["message"]

    # A store blob that no longer matches the lock: no bundle, not even a partial one.
    home = tmp_path / "home"
    run(home, "pull", str(TINY_MODEL), "--name", "tiny", check=True)
    [blob] = (home / "store" / "blobs").iterdir()
    with flipped(blob, 4096):
        r = run(home, "bundle", "create", str(tmp_path / "b"))
    assert r.returncode == 5, r.stderr
    assert "the store fails verification" in r.stderr and "model tiny is mismatch" in r.stderr
    assert not (tmp_path / "b").exists() and not (tmp_path / "b.partial").exists()


def test_dry_run_and_a_bundle_of_one_model(source: Path, bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "one"
    doc = run_json(source, "bundle", "create", str(out), "--models", "tiny", "--dry-run")
    assert doc["_rc"] == 0 and doc["data"]["written"] is False
    plan = doc["data"]["plan"]
    assert plan["models"] == ["tiny"] and plan["size_is"] == "estimated"
    blobs = [f for f in plan["files"] if f["path"].startswith("blobs/")]
    assert blobs == [{"path": f"blobs/sha256-{sha256(TINY_MODEL)}",
                      "size": TINY_MODEL.stat().st_size, "size_is": "exact",
                      "what": "model tiny"}]
    assert plan["size"] == sum(f["size"] for f in plan["files"])
    assert not out.exists()

    # The first bundle's wheels, offered as originals: each holds exactly the installed files
    # of its distribution (sovctl's is taken as built), so every one is carried as it is.
    start = time.perf_counter()
    doc = run_json(source, "bundle", "create", str(out), "--models", "tiny",
                   "--wheels", str(bundle / "wheels"))
    assert doc["_rc"] == 0, doc["_stderr"]
    print(f"bundle of tiny, every wheel as built: {time.perf_counter() - start:.1f} s")
    m = manifest(out)
    assert [x["name"] for x in m["models"]] == ["tiny"]
    assert {p["how"] for p in m["packages"]} == {"wheel"}
    assert {f["path"] for f in m["files"] if f["path"].startswith("wheels/")} == {
        f["path"] for f in manifest(bundle)["files"] if f["path"].startswith("wheels/")}
    assert [p for p in m["files"] if p["path"].startswith("blobs/")] == [
        {"path": f"blobs/sha256-{sha256(TINY_MODEL)}", "sha256": sha256(TINY_MODEL),
         "size": TINY_MODEL.stat().st_size}]
    assert "smol" not in (out / "home" / "sovctl.lock").read_text()
    bom = json.loads((out / "bom.cdx.json").read_text())
    assert [c["name"] for c in bom["components"] if c["type"] == "machine-learning-model"] == [
        "tiny"]


def test_a_signed_model_arrives_with_its_signature(bundle: Path, tmp_path: Path) -> None:
    """The signatures of the bundled blobs and the trusted public key kept under the home go
    with the bundle, so the other machine's `verify` checks the signature too; a trusted key
    kept elsewhere is named as not carried."""
    home, keys = tmp_path / "home", tmp_path / "keys"
    keys.mkdir()
    run(home, "pull", str(TINY_MODEL), "--name", "tiny", check=True)
    (home / "keys").mkdir()
    for private, public in (("ops.key", home / "keys" / "ops.pub"),
                            ("other.key", keys / "elsewhere.pub")):
        subprocess.run(["openssl", "ecparam", "-genkey", "-name", "prime256v1", "-noout",
                        "-out", str(keys / private)], check=True, capture_output=True)
        subprocess.run(["openssl", "ec", "-in", str(keys / private), "-pubout", "-out",
                        str(public)], check=True, capture_output=True)
    (home / "sovctl.toml").write_text(
        f'[trust]\nkeys = {{ ops = "keys/ops.pub", other = "{keys / "elsewhere.pub"}" }}\n')
    run(home, "sign", "tiny", "--key", str(keys / "ops.key"), check=True)

    out = tmp_path / "signed"
    doc = run_json(home, "bundle", "create", str(out), "--wheels", str(bundle / "wheels"))
    assert doc["_rc"] == 0, doc["_stderr"]
    assert doc["data"]["plan"]["notes"] == [
        f"trusted key other ({keys / 'elsewhere.pub'}) is kept outside the home, so it is not "
        "carried: put it at the same path on the other machine"]
    listed = {f["path"] for f in manifest(out)["files"]}
    assert "home/keys/ops.pub" in listed
    assert [p for p in listed if p.startswith("home/store/signatures/sha256-")]

    other = tmp_path / "other"
    doc = run_json(other, "bundle", "import", str(out))
    assert doc["_rc"] == 0, doc["_stderr"]
    verify = run_json(other, "verify")
    assert verify["_rc"] == 0, verify["_stderr"]
    [item] = verify["data"]["items"]
    assert item["signature"] == "ok" and item["signer_name"] == "ops"


# -- the round trip, with no network --------------------------------------------------------


def _namespace_tools() -> None:
    missing = [t for t in ("ip", "strace") if shutil.which(t) is None]
    if os.geteuid() == 0 and not missing:
        return
    why = (f"the offline round trip needs root and {', '.join(missing) or 'iproute2, strace'}"
           " (CI runs as root; .ci/run installs iproute2 and strace)")
    if os.environ.get("CI"):
        pytest.fail(why, pytrace=False)
    pytest.skip(why)


@pytest.mark.slow
def test_round_trip_in_a_namespace_with_only_loopback(bundle: Path, tmp_path: Path) -> None:
    """Bundle made on this host; inside a network namespace whose only interface is loopback:
    install it into a fresh venv, serve the carried sovctl.toml's model from the installed
    sovctl, get an answer, and pass the blackout audit."""
    _namespace_tools()
    ns = f"sovbundle{os.getpid()}"
    home, venv = tmp_path / "home", tmp_path / "venv"
    env = {**os.environ, "SOVCTL_HOME": str(home)}

    def inside(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", ns, *args], env=env, capture_output=True,
                              text=True, timeout=timeout)

    subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        links = subprocess.run(["ip", "-n", ns, "-o", "link"], capture_output=True, text=True,
                               check=True).stdout
        assert [line.split(":")[1].strip() for line in links.splitlines()] == ["lo"]
        size = sum(f["size"] for f in manifest(bundle)["files"])

        start = time.perf_counter()
        r = inside("bash", str(bundle / "install"), "--venv", str(venv), timeout=900)
        seconds = time.perf_counter() - start
        assert r.returncode == 0, r.stdout + r.stderr
        print(f"offline install of a {size / 2**20:.0f} MiB bundle "
              f"({len(manifest(bundle)['packages'])} wheels): {seconds:.1f} s (measured)")

        # The environment's own sovctl, not this checkout's.
        where = inside(str(venv / "bin" / "python"), "-c",
                       "import sovctl, llama_cpp; print(sovctl.__file__, llama_cpp.__file__)")
        assert where.returncode == 0 and where.stdout.count(str(venv)) == 2, where.stdout
        assert (home / "profiles" / "mine.toml").read_text() == PROFILE

        sovctl = str(venv / "bin" / "sovctl")
        served = inside(sovctl, "serve", "--detach")  # smol, from the carried sovctl.toml
        assert served.returncode == 0, served.stderr
        try:
            ask = ("import json, urllib.request; r = urllib.request.Request("
                   "'http://127.0.0.1:8088/v1/chat/completions', data=json.dumps({'model': "
                   "'smol', 'temperature': 0, 'max_tokens': 16, 'messages': [{'role': 'user', "
                   "'content': 'What is the capital of France? Answer in one word.'}]})"
                   ".encode(), headers={'content-type': 'application/json'}); print(json.load("
                   "urllib.request.urlopen(r, timeout=120))['choices'][0]['message']['content'])")
            answer = inside(str(venv / "bin" / "python"), "-c", ask, timeout=180)
            assert answer.returncode == 0, answer.stderr
            assert "Paris" in answer.stdout
        finally:
            stopped = inside(sovctl, "stop")
            assert stopped.returncode == 0, stopped.stderr

        audit = inside(sovctl, "--json", "audit", "blackout", "--chat", "tiny", timeout=600)
        doc = json.loads(audit.stdout)
        assert audit.returncode == 0 and doc["ok"], audit.stderr + json.dumps(doc["data"])
        assert [c["passed"] for c in doc["data"]["checks"]] == [True] * 8
    finally:
        inside(str(venv / "bin" / "sovctl"), "stop")
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
