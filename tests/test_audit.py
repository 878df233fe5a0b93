"""`sovctl audit blackout` / `audit baseline`: the real stack in a real network namespace.

CI runs as root, so `unshare(CLONE_NEWNET)` works; the refusal path is exercised both with the
documented test switch and for real (a capability-less root in a user namespace whose
user.max_user_namespaces is 0).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import EMBED_MODEL, TINY_MODEL
from tests.helpers import SOVCTL, pid_alive, run, run_json

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("models")]

AUDIT = ("audit", "blackout", "--chat", "tiny", "--embedding", "minilm")
NAMES = ("isolation", "weights", "stack starts", "service", "behaviour", "no egress",
         "configuration")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stack_home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    run(home, "pull", str(TINY_MODEL), "--name", "tiny", check=True)
    run(home, "pull", str(EMBED_MODEL), "--name", "minilm", check=True)
    return home


def by_id(doc: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {c["id"]: c for c in doc["data"]["checks"]}


def assert_nothing_left(home: Path) -> None:
    state = home / "audit" / "blackout" / "run" / "state.json"
    if state.exists():
        st = json.loads(state.read_text())
        pids = [st["supervisor_pid"]] + [p["pid"] for p in st["processes"] if p["pid"]]
        assert not [p for p in pids if pid_alive(p)], "audit stack left processes behind"


def test_passing_audit(tmp_path: Path) -> None:
    home = stack_home(tmp_path)
    doc = run_json(home, *AUDIT)
    assert doc["_rc"] == 0 and doc["ok"], doc["_stderr"] + json.dumps(doc["data"], indent=1)
    data = doc["data"]
    checks = by_id(doc)
    assert sorted(checks) == list(range(1, 8))
    assert [checks[i]["name"] for i in range(1, 8)] == list(NAMES)
    assert all(c["passed"] for c in checks.values())
    assert data["passed"] is True

    iso = data["isolation"]
    assert iso["mode"] == "netns" and iso["weaker_mode"] is False
    assert iso["netns"] != iso["outer_netns"]
    assert checks[1]["details"]["interfaces"] == ["lo"]
    for target in ("1.1.1.1:443", "8.8.8.8:53", "huggingface.co"):
        assert target in checks[1]["evidence"]
    assert "full re-hash" in checks[2]["evidence"]
    assert "GET /ready 200" in checks[3]["evidence"]
    for part in ("tiny chat 200", "tiny chat_stream 200", "tiny completion 200",
                 "minilm embeddings 200", "/v1/models 200"):
        assert part in checks[4]["evidence"]
    assert "identical" in checks[5]["evidence"]
    assert "recorded just now" in checks[5]["evidence"]
    assert data["baseline"]["recorded_now"] == ["tiny", "minilm"]
    assert "0 attempts" in checks[6]["evidence"] and checks[6]["details"]["attempts"] == []
    assert "every route local" in checks[7]["evidence"]
    assert "HF_HUB_OFFLINE=1" in checks[7]["evidence"]

    # Baselines are keyed by the model file's sha256.
    for name, path in (("tiny", TINY_MODEL), ("minilm", EMBED_MODEL)):
        assert (home / "audit" / "baselines" / name / f"sha256-{sha256(path)}.json").is_file()

    # The report on disk is the same document.
    report = Path(data["path"])
    assert report.parent == home / "reports"
    assert re.fullmatch(r"blackout-\d{8}T\d{6}Z(-\d+)?\.json", report.name)
    saved = json.loads(report.read_text())
    assert saved["schema"] == "sovctl.audit.report/v1"
    assert saved["versions"]["sovctl"] and saved["versions"]["llama-cpp-python"]
    assert saved["host"]["fingerprint"] and saved["host"]["kernel"]
    assert {m["name"]: m["sha256"] for m in saved["models"]} == {
        "tiny": sha256(TINY_MODEL), "minilm": sha256(EMBED_MODEL)}
    assert [c["passed"] for c in saved["checks"]] == [True] * 7
    assert saved["timings"]["total"] > 0
    assert_nothing_left(home)

    # Again, for people, with the models taken from sovctl.toml: the baseline is reused.
    (home / "sovctl.toml").write_text(
        '[models.tiny]\nrole = "chat"\n\n[models.minilm]\nrole = "embedding"\n')
    r = run(home, "audit", "blackout")
    assert r.returncode == 0, r.stderr
    for col in ("CHECK", "RESULT", "EVIDENCE", "TIME", *NAMES):
        assert col in r.stdout
    assert r.stdout.count("PASS") >= 7 and "FAIL" not in r.stdout
    assert "7/7 checks passed" in r.stdout
    assert "recorded just now" not in r.stdout
    assert len(list((home / "reports").glob("blackout-*.json"))) == 2
    assert_nothing_left(home)


def test_tampered_blob_fails_weights(tmp_path: Path) -> None:
    home = stack_home(tmp_path)
    blob = home / "store" / "blobs" / f"sha256-{sha256(TINY_MODEL)}"
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[-100] ^= 0xFF
    blob.write_bytes(bytes(data))

    r = run(home, *AUDIT)
    assert r.returncode == 1, r.stderr
    row = next(line for line in r.stdout.splitlines() if " weights " in line)
    assert "FAIL" in row
    assert "check 2 (weights)" in r.stderr and "Traceback" not in r.stderr
    report = json.loads(max((home / "reports").glob("blackout-*.json")).read_text())
    checks = {c["id"]: c for c in report["checks"]}
    assert checks[2]["passed"] is False
    assert checks[2]["evidence"].startswith("tiny: blob does not match the lock")
    assert checks[2]["details"]["models"][0]["status"] == "mismatch"
    # Nothing is started from tampered weights, and no baseline is recorded from them.
    assert all(checks[i]["passed"] is False and checks[i]["evidence"].startswith("not run")
               for i in (3, 4, 5, 6))
    assert checks[1]["passed"] and checks[7]["passed"]
    assert not (home / "audit" / "baselines").exists()


def test_egress_attempt_fails_check_6(tmp_path: Path) -> None:
    home = stack_home(tmp_path)
    doc = run_json(home, *AUDIT, "--egress-probe", "203.0.113.7:443")
    assert doc["_rc"] == 1 and not doc["ok"]
    assert doc["error"]["type"] == "CheckFailed"
    assert "check 6 (no egress)" in doc["error"]["message"]
    checks = by_id(doc)
    assert [i for i, c in checks.items() if not c["passed"]] == [6]
    attempts = checks[6]["details"]["attempts"]
    assert {a["component"] for a in attempts} == {"tiny", "minilm", "gateway"}
    assert all(a["event"] == "socket.connect" and a["target"] == "203.0.113.7:443"
               for a in attempts)
    for component in ("tiny", "minilm", "gateway"):
        assert f"{component} socket.connect 203.0.113.7:443" in checks[6]["evidence"]
    assert doc["data"]["extra"]["egress_probe"] == "203.0.113.7:443"
    assert_nothing_left(home)


def _different_weights(tmp_path: Path) -> Path:
    """stories260K with its output norm negated: a valid GGUF whose answers differ."""
    import gguf

    dest = tmp_path / "stories-negated.gguf"
    shutil.copyfile(TINY_MODEL, dest)
    reader = gguf.GGUFReader(dest, "r+")
    tensor = next(t for t in reader.tensors if t.name == "output_norm.weight")
    tensor.data[:] = -tensor.data
    reader.data.flush()
    del reader
    return dest


def test_changed_model_file_fails_check_5(tmp_path: Path) -> None:
    home = stack_home(tmp_path)
    doc = run_json(home, "audit", "baseline", "--chat", "tiny", "--embedding", "minilm")
    assert doc["_rc"] == 0 and doc["ok"], doc["_stderr"]
    assert [m["name"] for m in doc["data"]["models"]] == ["tiny", "minilm"]
    old = sha256(TINY_MODEL)
    assert doc["data"]["files"][0].endswith(f"tiny/sha256-{old}.json")

    run(home, "rm", "tiny", check=True)
    other = _different_weights(tmp_path)
    run(home, "pull", str(other), "--name", "tiny", check=True)
    new = sha256(other)
    assert new != old

    doc = run_json(home, *AUDIT)
    assert doc["_rc"] == 1 and not doc["ok"]
    checks = by_id(doc)
    assert [i for i, c in checks.items() if not c["passed"]] == [5]
    evidence = checks[5]["evidence"]
    assert "tiny: model file changed since its baseline" in evidence
    assert f"{old[:12]}" in evidence and f"{new[:12]}" in evidence
    assert "tiny/chat: text differs" in evidence and "tiny/completion: text differs" in evidence
    assert "minilm: embeddings max |Δ|" in evidence  # the unchanged model still matches
    assert doc["data"]["baseline"]["recorded_now"] == []  # a change is never re-baselined

    # Re-recording on purpose accepts the new file.
    run(home, "audit", "baseline", "--chat", "tiny", "--embedding", "minilm", check=True)
    assert (home / "audit" / "baselines" / "tiny" / f"sha256-{new}.json").is_file()
    doc = run_json(home, *AUDIT)
    assert doc["_rc"] == 0, json.dumps(doc["data"]["checks"], indent=1)


def test_passing_audit_as_ordinary_user(tmp_path: Path) -> None:
    """The `unshare -rn` way in: a uid other than 0, no capabilities at all."""
    home = stack_home(tmp_path)
    r = subprocess.run(["unshare", "--user", "--map-user=1000", "--map-group=1000",
                        "setpriv", "--bounding-set=-all", "--inh-caps=-all",
                        *SOVCTL, "--json", *AUDIT],
                       env={**os.environ, "SOVCTL_HOME": str(home)},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr + r.stdout
    doc = json.loads(r.stdout)
    assert doc["data"]["isolation"]["mode"] == "userns+netns"
    assert doc["data"]["host"]["user"] == "1000"
    assert all(c["passed"] for c in doc["data"]["checks"])
    assert_nothing_left(home)


def test_refused_namespaces_by_test_switch(tmp_path: Path) -> None:
    home = stack_home(tmp_path)
    r = run(home, *AUDIT, env={"SOVCTL_AUDIT_DENY_NAMESPACES": "1"})
    assert r.returncode == 8
    assert "cannot create the blackout's network namespace" in r.stderr
    assert "SOVCTL_AUDIT_DENY_NAMESPACES" in r.stderr and "Traceback" not in r.stderr
    doc = run_json(home, *AUDIT, env={"SOVCTL_AUDIT_DENY_NAMESPACES": "1"})
    assert doc["_rc"] == 8 and doc["error"]["exit_name"] == "ISOLATION"
    assert "never reports a blackout pass" in doc["error"]["hint"]
    assert not (home / "reports").exists()  # nothing ran, nothing is filed
    assert not (home / "audit").exists()


def test_refused_namespaces_for_real(tmp_path: Path) -> None:
    """Root without capabilities, where user namespaces are disabled: the unprivileged
    container case. Its own user namespace gets user.max_user_namespaces = 0, then every
    capability is dropped before sovctl starts."""
    home = stack_home(tmp_path)
    script = ('echo 0 > /proc/sys/user/max_user_namespaces && '
              'exec setpriv --bounding-set=-all --inh-caps=-all "$@"')
    r = subprocess.run(["unshare", "--user", "--map-root-user", "sh", "-c", script, "sh",
                        *SOVCTL, *AUDIT],
                       env={**os.environ, "SOVCTL_HOME": str(home)},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 8, r.stderr
    err = " ".join(r.stderr.split())
    assert "cannot create the blackout's network namespace" in err
    assert "without CAP_SYS_ADMIN" in err
    assert "user.max_user_namespaces = 0" in err
    assert "sysctl -w user.max_user_namespaces=" in err
    assert "Traceback" not in r.stderr
    assert not (home / "reports").exists()
