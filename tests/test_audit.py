"""`sovctl audit blackout` / `audit baseline`: the real stack in a real network namespace.

CI runs as root, so `unshare(CLONE_NEWNET)` works; the refusal path is exercised both with the
documented test switch and for real (a capability-less root in a user namespace whose
user.max_user_namespaces is 0). Egress probes only ever target documentation addresses
(RFC 5737) from inside a network namespace the audit or the test created: nothing can leave.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import CHAT_MODEL, EMBED_MODEL, MMPROJ, TINY_MODEL
from tests.helpers import SOVCTL, pid_alive, run, run_json, wait_for

from sovctl.runtime import egress

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("models")]

AUDIT = ("audit", "blackout", "--chat", "tiny", "--embedding", "minilm")
NAMES = ("isolation", "weights", "stack starts", "service", "behaviour", "no egress",
         "configuration", "exception routes")
PYTHON_RUNTIME = {"SOVCTL_SERVE__RUNTIME": "llama-cpp-python"}


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
    # Under the tracer the program is strace's child: none may outlive the audit either.
    for log in (home / "audit" / "blackout" / "run" / "trace").glob("*.strace"):
        pids = {a["pid"] for a in egress.read_trace(log, log.stem)}
        assert not [p for p in pids if pid_alive(p)], f"{log.stem} left a traced process"


def recorders(check6: dict[str, Any]) -> dict[str, list[str]]:
    return {r["process"]: r["recorders"] for r in check6["details"]["processes"]}


def baseline_engine(home: Path, name: str, model: Path) -> dict[str, str]:
    doc = json.loads((home / "audit" / "baselines" / name
                      / f"sha256-{sha256(model)}.json").read_text())
    return doc["engine"]  # type: ignore[no-any-return]


def test_passing_audit(tmp_path: Path) -> None:
    home = stack_home(tmp_path)
    doc = run_json(home, *AUDIT)
    assert doc["_rc"] == 0 and doc["ok"], doc["_stderr"] + json.dumps(doc["data"], indent=1)
    data = doc["data"]
    checks = by_id(doc)
    assert sorted(checks) == list(range(1, 9))
    assert [checks[i]["name"] for i in range(1, 9)] == list(NAMES)
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
                 "tiny messages 200", "tiny responses 200", "minilm embeddings 200",
                 "/v1/models 200"):
        assert part in checks[4]["evidence"]
    assert "identical" in checks[5]["evidence"]
    assert "recorded just now" in checks[5]["evidence"]
    # stories260K has neither a template with tools nor a projector: said, not sent.
    skipped = ("tiny: tool_call skipped (no tool support in its template), image skipped "
               "(no vision projector: pulled without --mmproj)")
    assert skipped in checks[4]["evidence"] and skipped in checks[5]["evidence"]
    assert "minilm" not in checks[4]["details"]["skipped"]
    assert data["baseline"]["recorded_now"] == ["tiny", "minilm"]
    assert "0 attempts" in checks[6]["evidence"] and checks[6]["details"]["attempts"] == []
    # The native runtimes are watched by the tracer, proven on a native probe first.
    assert recorders(checks[6]) == {"tiny": ["strace"], "minilm": ["strace"],
                                    "gateway": ["strace", "audit hook"]}
    assert "by strace" in checks[6]["evidence"] and "tiny (llama-server)" in checks[6]["evidence"]
    assert "self-test recorded a deliberate connect from native code" in checks[6]["evidence"]
    assert checks[6]["details"]["tracer"]["self_test"]["recorded"][0]["target"] == "192.0.2.1:9"
    assert "every route local" in checks[7]["evidence"]
    assert "HF_HUB_OFFLINE=1" in checks[7]["evidence"]

    # Baselines are keyed by the model file's sha256, and say what served it.
    for name, path in (("tiny", TINY_MODEL), ("minilm", EMBED_MODEL)):
        engine = baseline_engine(home, name, path)
        assert engine["runtime"] == "llama-server" and "commit" in engine["build"]

    # The report on disk is the same document.
    report = Path(data["path"])
    assert report.parent == home / "reports"
    assert re.fullmatch(r"blackout-\d{8}T\d{6}Z(-\d+)?\.json", report.name)
    saved = json.loads(report.read_text())
    assert saved["schema"] == "sovctl.audit.report/v3"
    # The stack's bill of materials, filed beside the report, named by its digest.
    bom = Path(saved["bom"]["path"])
    assert bom.parent == report.parent and saved["bom"]["spec"] == "CycloneDX 1.6"
    assert hashlib.sha256(bom.read_bytes()).hexdigest() == saved["bom"]["sha256"]
    assert saved["versions"]["sovctl"] and saved["versions"]["llama-cpp-python"]
    assert saved["host"]["fingerprint"] and saved["host"]["kernel"]
    assert {m["name"]: m["sha256"] for m in saved["models"]} == {
        "tiny": sha256(TINY_MODEL), "minilm": sha256(EMBED_MODEL)}
    assert [c["passed"] for c in saved["checks"]] == [True] * 8
    assert saved["timings"]["total"] > 0
    assert_nothing_left(home)

    # Again, for people, with the models taken from sovctl.toml: the baseline is reused. Both
    # are loaded on demand under a budget that holds only one of them (tiny 136 MiB, minilm
    # 196 MiB by the estimate): inside the namespace each is loaded by its requests, evicting
    # the other, and still watched and checked.
    (home / "sovctl.toml").write_text(
        '[serve]\nmemory_limit = "300MiB"\n\n[models.tiny]\nrole = "chat"\nload = "on-demand"\n\n'
        '[models.minilm]\nrole = "embedding"\nload = "on-demand"\n')
    r = run(home, "audit", "blackout")
    assert r.returncode == 0, r.stdout + r.stderr
    final = json.loads((home / "audit" / "blackout" / "run" / "state.json").read_text())
    assert sum(p.get("evictions", 0) for p in final["processes"]) >= 1
    for col in ("CHECK", "RESULT", "EVIDENCE", "TIME", *NAMES):
        assert col in r.stdout
    assert r.stdout.count("PASS") >= 8 and "FAIL" not in r.stdout
    assert "8/8 checks passed" in r.stdout
    assert "recorded just now" not in r.stdout
    assert len(list((home / "reports").glob("blackout-*.json"))) == 2
    assert_nothing_left(home)


def test_audit_with_a_tool_call_and_an_image(tmp_path: Path) -> None:
    """SmolLM2 with the chatml-tools template and a projector (random weights: it proves the
    path, not the description) answers the tool call and the image request in the blackout as
    in its baseline."""
    home = tmp_path / "home"
    run(home, "pull", str(CHAT_MODEL), "--name", "smol", "--mmproj", str(MMPROJ), check=True)
    (home / "sovctl.toml").write_text(
        '[models.smol]\nrole = "chat"\nchat_template = "chatml-tools"\n')
    # A real 360M model answering seven requests twice (baseline, blackout) on 2 cores.
    doc = run_json(home, "audit", "blackout", timeout=420)
    assert doc["_rc"] == 0 and doc["ok"], doc["_stderr"] + json.dumps(doc["data"], indent=1)
    checks = by_id(doc)
    assert all(c["passed"] for c in checks.values())
    service = checks[4]["evidence"]
    assert 'smol tool_call 200 (get_weather({"city": ' in service
    assert re.search(r"smol image 200 \(\d+ chars, prompt of \d+ tokens with the image", service)
    assert checks[4]["details"]["skipped"] == {} and "skipped" not in service
    assert "smol: chat, chat_stream, completion, tool_call, image, messages, responses " \
        "identical" in checks[5]["evidence"]
    assert "mmproj" in checks[2]["evidence"]
    recorded = json.loads((home / "audit" / "baselines" / "smol"
                           / f"sha256-{sha256(CHAT_MODEL)}.json").read_text())["answers"]
    assert recorded["tool_call"]["tool_call"]["name"] == "get_weather"
    assert set(recorded["tool_call"]["tool_call"]["arguments"]) == {"city"}
    # The image's tokens are in the prompt: far more than the few words of text.
    assert recorded["image"]["prompt_tokens"] > 20
    assert_nothing_left(home)


def test_audit_with_a_reranker(tmp_path: Path) -> None:
    """A reranker (a tiny random head on MiniLM, see tests/test_rerank.py) gets the fixed rerank
    request in the blackout, and its order and scores match the baseline recorded first."""
    from tests.test_rerank import write_reranker

    home = tmp_path / "home"
    reranker = write_reranker(tmp_path / "tiny-reranker.gguf")
    run(home, "pull", str(TINY_MODEL), "--name", "tiny", check=True)
    run(home, "pull", str(reranker), "--name", "rr", check=True)
    doc = run_json(home, "audit", "blackout", "--chat", "tiny", "--rerank", "rr")
    assert doc["_rc"] == 0 and doc["ok"], doc["_stderr"] + json.dumps(doc["data"], indent=1)
    checks = by_id(doc)
    assert [c["passed"] for c in checks.values()] == [True] * 8
    assert {m["name"]: m["role"] for m in doc["data"]["models"]} == {"tiny": "chat",
                                                                    "rr": "rerank"}
    assert re.search(r"rr rerank 200 \(3 documents scored, best first \[[0-2], [0-2], [0-2]\]",
                     checks[4]["evidence"])
    assert {"model": "rr", "request": "rerank"}.items() <= next(
        a for a in checks[4]["details"]["answers"] if a["model"] == "rr").items()
    assert "not exercised: embeddings" in checks[4]["evidence"]
    assert "rr: rerank order identical, scores max |Δ|" in checks[5]["evidence"]
    assert doc["data"]["baseline"]["recorded_now"] == ["tiny", "rr"]
    recorded = json.loads((home / "audit" / "baselines" / "rr"
                           / f"sha256-{sha256(reranker)}.json").read_text())
    assert recorded["role"] == "rerank" and len(recorded["answers"]["rerank"]["scores"]) == 3
    assert recorders(checks[6]) == {"tiny": ["strace"], "rr": ["strace"],
                                    "gateway": ["strace", "audit hook"]}
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


def test_python_runtime_audit_then_baseline_of_another_runtime(tmp_path: Path) -> None:
    """The fallback runtime passes too (watched by its audit hook and the tracer); switching
    back to llama-server finds baselines of another runtime: reported, recorded again, not
    compared."""
    home = stack_home(tmp_path)
    doc = run_json(home, *AUDIT, env=PYTHON_RUNTIME)
    assert doc["_rc"] == 0 and doc["ok"], doc["_stderr"] + json.dumps(doc["data"], indent=1)
    checks = by_id(doc)
    assert all(c["passed"] for c in checks.values())
    assert recorders(checks[6]) == {n: ["strace", "audit hook"]
                                    for n in ("tiny", "minilm", "gateway")}
    assert "tiny (python" in checks[6]["evidence"]
    assert baseline_engine(home, "tiny", TINY_MODEL)["runtime"] == "llama-cpp-python"
    # llama-cpp-python speaks neither Messages nor Responses: said, not sent.
    assert ("image skipped (no vision projector: pulled without --mmproj), messages skipped "
            "(the llama-cpp-python runtime does not speak /v1/messages), responses skipped "
            "(the llama-cpp-python runtime does not speak /v1/responses)") in checks[4]["evidence"]
    assert_nothing_left(home)

    doc = run_json(home, *AUDIT)
    assert doc["_rc"] == 0 and doc["ok"], doc["_stderr"] + json.dumps(doc["data"], indent=1)
    data, checks = doc["data"], by_id(doc)
    assert data["baseline"]["recorded_now"] == ["tiny", "minilm"]
    assert set(data["baseline"]["replaced"]) == {"tiny", "minilm"}
    assert "another runtime, so it was not compared" in data["baseline"]["note"]
    evidence = checks[5]["evidence"]
    assert "tiny: its baseline was recorded with llama-cpp-python" in evidence
    assert "this stack serves it with llama-server" in evidence and "not compared" in evidence
    assert "tiny: chat, chat_stream, completion, messages, responses identical" in evidence
    for name, path in (("tiny", TINY_MODEL), ("minilm", EMBED_MODEL)):
        assert baseline_engine(home, name, path)["runtime"] == "llama-server"
    assert_nothing_left(home)


@pytest.mark.parametrize("runtime", ["llama-server", "llama-cpp-python"])
def test_egress_attempt_fails_check_6(tmp_path: Path, runtime: str) -> None:
    """Every process makes one connect at start: the native runtimes from native code (bash),
    seen by the tracer alone; the Python processes from Python, seen by both recorders."""
    home = stack_home(tmp_path)
    env = PYTHON_RUNTIME if runtime == "llama-cpp-python" else {}
    doc = run_json(home, *AUDIT, "--egress-probe", "203.0.113.7:443", env=env)
    assert doc["_rc"] == 1 and not doc["ok"]
    assert doc["error"]["type"] == "CheckFailed"
    assert "check 6 (no egress)" in doc["error"]["message"]
    checks = by_id(doc)
    assert [i for i, c in checks.items() if not c["passed"]] == [6]
    attempts = checks[6]["details"]["attempts"]
    assert all(a["target"] == "203.0.113.7:443" for a in attempts)
    seen = {(a["component"], a["recorder"], a["event"]) for a in attempts}
    python = ["gateway"] + (["tiny", "minilm"] if runtime == "llama-cpp-python" else [])
    native = [] if runtime == "llama-cpp-python" else ["tiny", "minilm"]
    assert seen == ({(n, "audit hook", "socket.connect") for n in python}
                    | {(n, "strace", "connect") for n in python + native})
    evidence = checks[6]["evidence"]
    for n in python:
        assert f"{n} socket.connect 203.0.113.7:443 [audit hook]" in evidence
    for n in python + native:
        assert f"{n} connect 203.0.113.7:443 [strace]" in evidence
    assert doc["data"]["extra"]["egress_probe"] == "203.0.113.7:443"
    assert_nothing_left(home)


def test_native_runtime_without_tracer_fails_check_6(tmp_path: Path) -> None:
    """No strace on the machine: llama-server runs unwatched, so there is no 'no egress'."""
    home = stack_home(tmp_path)
    no_strace = str(Path(sys.executable).parent)  # a PATH with python, without strace
    assert shutil.which("strace", path=no_strace) is None
    doc = run_json(home, "audit", "blackout", "--chat", "tiny", env={"PATH": no_strace})
    assert doc["_rc"] == 1, doc["_stderr"]
    checks = by_id(doc)
    assert [i for i, c in checks.items() if not c["passed"]] == [6]
    evidence = checks[6]["evidence"]
    assert "no system call tracer watched tiny (llama-server)" in evidence
    assert "strace is not installed" in evidence and "apt-get install strace" in evidence
    assert checks[6]["details"]["unrecorded"] == ["tiny (llama-server)"]
    assert recorders(checks[6]) == {"tiny": [], "gateway": ["audit hook"]}
    assert_nothing_left(home)


def test_tracer_catches_native_probe(tmp_path: Path) -> None:
    """The egress recorder sees what native code does: a connect from bash and a name lookup by
    glibc's resolver (getent), each a C program, run through the runtime launcher under the
    tracer, in a network namespace this test creates (no route: nothing can leave)."""
    log = tmp_path / "probe.strace"
    probe = ("getent hosts sovctl-probe.example; : <>/dev/tcp/192.0.2.1/80; "
             ": <>/dev/tcp/127.0.0.1/9; : <>/dev/tcp/2001:db8::1/443")
    r = subprocess.run(["unshare", "--net", sys.executable, "-m", "sovctl.runtime.launch",
                        "probe", "--exec", "bash", "-c", probe],
                       env={**os.environ, egress.ENV_TRACE: str(log)},
                       capture_output=True, text=True, timeout=60)
    assert "Network is unreachable" in r.stderr, r.stderr
    attempts = egress.read_trace(log, "probe")
    assert all(a["component"] == "probe" and a["recorder"] == "strace" for a in attempts)
    lookups = [a for a in attempts if a["lookup"]]
    assert lookups and all(a["target"].endswith(":53") for a in lookups)
    connects = [a for a in attempts if not a["lookup"]]
    # Loopback is the stack's own traffic and is not egress; the attempts failed (no route).
    assert {(a["event"], a["target"]) for a in connects} == {("connect", "192.0.2.1:80"),
                                                             ("connect", "[2001:db8::1]:443")}
    assert all(a["result"].startswith("E") for a in connects)


def test_traced_program_dies_with_its_tracer(tmp_path: Path) -> None:
    """strace 6.1 cannot kill its tracees when it dies: the inner launch's parent-death signal
    does, so a SIGKILLed tracer leaves nothing behind."""
    proc = subprocess.Popen([sys.executable, "-m", "sovctl.runtime.launch", "sleeper",
                             "--exec", "sleep", "60"],
                            env={**os.environ, egress.ENV_TRACE: str(tmp_path / "s.strace")},
                            start_new_session=True)
    try:
        import psutil

        tracee = wait_for(lambda: next((c for c in psutil.Process(proc.pid).children()
                                        if c.name() == "sleep"), None), timeout=30,
                          what="the traced sleep")
        assert psutil.Process(proc.pid).name() == "strace"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        wait_for(lambda: not pid_alive(tracee.pid), timeout=10, what="the tracee to die")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def test_trace_parser() -> None:
    """strace's own lines, as it writes them (threads interleaved, calls left unfinished)."""
    lines = [
        '7 1.0 connect(3, {sa_family=AF_INET, sin_port=htons(8080), '
        'sin_addr=inet_addr("127.0.0.1")}, 16) = 0',
        '7 1.1 sendto(3, ""..., 12, 0, NULL, 0) = 12',
        '7 1.2 connect(4, {sa_family=AF_INET, sin_port=htons(53), '
        'sin_addr=inet_addr("127.0.0.53")}, 16) = 0',
        '8 1.3 connect(5, {sa_family=AF_INET6, sin6_port=htons(443), sin6_flowinfo=htonl(0), '
        'inet_pton(AF_INET6, "::ffff:127.0.0.1", &sin6_addr), sin6_scope_id=0}, 28) = 0',
        '8 1.4 sendmsg(6, {msg_name={sa_family=AF_INET6, sin6_port=htons(80), '
        'sin6_flowinfo=htonl(0), inet_pton(AF_INET6, "::ffff:192.0.2.3", &sin6_addr), '
        'sin6_scope_id=0}, msg_namelen=28, msg_iov=[...], msg_iovlen=1, msg_controllen=0, '
        'msg_flags=0}, 0 <unfinished ...>',
        '9 1.5 connect(7, {sa_family=AF_UNIX, sun_path="/var/run/nscd/socket"}, 110) '
        '= -1 ENOENT (No such file or directory)',
        '9 1.6 connect(7, {sa_family=AF_UNIX, sun_path="/var/run/nscd/socket"}, 110 '
        '<unfinished ...>',
        '8 1.7 <... sendmsg resumed>) = -1 ENETUNREACH (Network is unreachable)',
        '9 1.8 <... connect resumed>) = 0',
        '9 1.9 connect(8, {sa_family=AF_UNIX, sun_path="/run/systemd/resolve/io.systemd.Resolve"'
        '}, 42) = -1 ENOENT (No such file or directory)',
        '9 2.0 connect(8, {sa_family=AF_UNIX, sun_path="/tmp/x.sock"}, 13) = 0',
        '9 2.1 sendto(9, ""..., 4, 0, {sa_family=AF_INET, sin_port=htons(123), '
        'sin_addr=inet_addr("203.0.113.9")}, 16) = 4',
        'not a call line',
    ]
    got = [(a["pid"], a["event"], a["target"], a["lookup"], a["result"])
           for a in egress.parse_trace(lines, "x")]
    assert got == [
        (7, "connect", "127.0.0.53:53", True, "ok"),
        (8, "sendmsg", "[::ffff:192.0.2.3]:80", False, "ENETUNREACH"),
        (9, "connect", "/var/run/nscd/socket", True, "ok"),
        (9, "connect", "/run/systemd/resolve/io.systemd.Resolve", True, "ENOENT"),
        (9, "sendto", "203.0.113.9:123", False, "ok"),
    ]


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


def test_a_baseline_from_before_messages_and_responses(tmp_path: Path) -> None:
    """A baseline recorded before the audit sent Messages and Responses requests stays
    readable: those answers are said not compared, the others compared as before."""
    from sovctl.audit import baseline, checks
    from sovctl.home import Home
    from sovctl.runtime.plan import ServedModel

    home = Home(tmp_path / "home")
    model = ServedModel("tiny", "chat", "ab" * 32, 1, "blob")
    sent, _ = baseline.requests_for(model, {"tools": False, "vision": False})
    assert [r for r, _, _ in sent] == ["chat", "chat_stream", "completion", "messages",
                                       "responses"]
    assert [e for _, e, _ in sent][-2:] == ["/v1/messages", "/v1/responses"]
    assert baseline.RESPONSES_BODY["temperature"] == baseline.MESSAGES_BODY["temperature"] == 0
    answers = tuple(baseline.Answer("tiny", r, e, 200, 0.1, text="once", finish_reason="stop")
                    for r, e, _ in sent)
    old = {"model": "tiny", "sha256": model.sha256, "recorded_at": "then", "answers": {
        r: {"text": "once"} for r in ("chat", "chat_stream", "completion")}}
    path = baseline.baseline_path(home, "tiny", model.sha256)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(old))
    found = baseline.find(home, model)
    assert baseline.compare(model, found, answers) == []
    assert baseline.unrecorded(found, answers) == ["messages", "responses"]
    exchange = baseline.Exchange(answers, 200, ("tiny",))
    c5 = checks.behaviour(home, [model], exchange, [], {}, {})
    assert c5.passed, c5.evidence
    assert "tiny: chat, chat_stream, completion identical" in c5.evidence
    assert "tiny: messages, responses not compared: its baseline predates them" in c5.evidence
    assert c5.details["unrecorded"] == {"tiny": ["messages", "responses"]}
    # A changed answer on a recorded surface is still a difference.
    old["answers"]["messages"] = {"text": "twice"}  # type: ignore[index]
    path.write_text(json.dumps(old))
    assert baseline.compare(model, baseline.find(home, model), answers) == [
        "tiny/messages: text differs: baseline 'twice', now 'once'"]
