"""From bare hardware to a running stack: doctor, profiles, init, plan, up.

Hardware detection is real (this machine: CPU only). The one stand-in is NVML: there is no
NVIDIA GPU here, so the GPU path runs against a fake `pynvml` module; `test_nvml_real_gpu`
runs the real one wherever a GPU is present. Sizing reads the real test models, from disk and
from a local Hub (tests/hubserver.py) by range requests; `up` starts a real stack.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import sys
import tomllib
import types
from pathlib import Path

import openai
import psutil
import pytest
from tests.conftest import CHAT_MODEL, EMBED_MODEL, MMPROJ, TINY_MODEL
from tests.helpers import pid_alive, run, run_json
from tests.hubserver import COMMIT, REPO, Counting, DropsMidFile, serve

from sovctl import config, sizing
from sovctl.errors import ConfigError, ExitCode
from sovctl.home import Home
from sovctl.provision import facts as facts_mod
from sovctl.provision import profiles
from sovctl.provision.facts import detect
from sovctl.store import header
from sovctl.units import parse_size

GiB = 1 << 30
MiB = 1 << 20
SHIPPED = ("cpu-small", "cpu-large", "gpu-8g", "gpu-12g", "gpu-16g", "gpu-24g", "gpu-48g",
           "gpu-80g")


def doc_of(r) -> dict:
    return json.loads(r.stdout)


# -- profiles and the [pull] / [hardware] sections -----------------------------------------------
def test_shipped_profiles_are_complete_and_pin_nothing_unchecked(sovctl_home: Path) -> None:
    home = Home(sovctl_home)
    assert set(SHIPPED) <= set(config.shipped_profiles())
    for name in SHIPPED:
        s = config.load(home, profile=name, environ={}, config_file=False)
        assert s.hardware.accelerator in ("cpu", "cuda") and s.hardware.summary
        roles = sorted(str(m.role) for m in s.models.values())
        assert roles == ["chat", "embedding"], name
        assert set(s.pulls) == {m.model for m in s.models.values()}, name
        for p in s.pulls.values():
            assert p.ref.startswith("hf://") and p.ref.endswith(".gguf")
            # `pull` pins the commit and the Hub's sha256 on first use: no hash written here
            # that nobody computed from the file.
            assert p.sha256 is None and p.revision == "main"
        assert s.serve.runtime == "llama-server"
        gpu = s.hardware.accelerator == "cuda"
        assert (s.serve.n_gpu_layers == -1) is gpu
        for key in ("n_ctx", "parallel", "n_threads"):
            assert s.source(f"serve.{key}") == "profile"
        for key in ("electricity_per_kwh", "hardware_price", "hardware_lifetime_years",
                    "cloud_price_per_mtok"):
            assert s.source(f"cost.{key}") == "profile"
    # The top-level folder people know is the packaged one.
    assert {p.name for p in (Path(__file__).parents[1] / "profiles").glob("*.toml")} >= {
        f"{n}.toml" for n in SHIPPED}


@pytest.mark.parametrize(("text", "message"), [
    ('[pull.x]\nrevision = "main"\n', "[pull.x] has no ref"),
    ('[pull.x]\nref = "a.gguf"\nfoo = "b"\n', "unknown setting pull.x.foo"),
    ('[pull.x]\nref = "a.gguf"\nsha256 = "abc"\n', "not a sha256"),
    ('[pull."../x"]\nref = "a.gguf"\n', "invalid model name"),
    ('[pull.x]\nref = 3\n', "must be a non-empty string"),
    ('[hardware]\nsummary = "mine"\n', "belongs in a profile"),
])
def test_pull_and_hardware_sections_are_validated(sovctl_home: Path, text: str,
                                                  message: str) -> None:
    home = Home(sovctl_home)
    home.ensure()
    home.config_path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        config.load(home, environ={})


def test_pull_section_layers_like_the_rest(sovctl_home: Path) -> None:
    home = Home(sovctl_home)
    home.ensure()
    home.config_path.write_text('profile = "cpu-small"\n'
                                '[pull."qwen2.5-1.5b-instruct-q4_k_m"]\nrevision = "v1"\n'
                                '[pull.mine]\nref = "/models/mine.gguf"\n')
    s = config.load(home, environ={})
    assert s.pulls["qwen2.5-1.5b-instruct-q4_k_m"].revision == "v1"  # config over profile
    assert s.pulls["qwen2.5-1.5b-instruct-q4_k_m"].ref.startswith("hf://bartowski/")
    assert s.pulls["mine"] == config.PullSettings(ref="/models/mine.gguf")


# -- doctor: real detection on this machine --------------------------------------------------------
def test_doctor_detects_this_machine(cli, sovctl_home: Path) -> None:
    from sovctl.hostinfo import cpu_model, physical_cores

    r = cli("--json", "doctor")
    assert r.exit_code == 0, r.stdout + r.stderr
    data = doc_of(r)["data"]
    f = data["facts"]
    assert f["cpu_model"] == cpu_model() and f["physical_cores"] == physical_cores()
    assert f["ram_total"] == psutil.virtual_memory().total
    assert 0 < f["ram_available"] <= f["ram_total"]
    assert f["disk_free"] > 0 and Path(f["disk_path"]).exists()
    assert f["python"] == ".".join(map(str, sys.version_info[:3]))
    assert f["llama"]["llama_cpp_python"] == "0.3.36"
    checks = {c["name"]: c for c in data["checks"]}
    assert checks["python"]["status"] == "ok"
    assert checks["llama-cpp-python"]["status"] == "ok"
    assert {"gpu", "ram", "disk", "namespaces", "port 8088", "lock", "config"} <= set(checks)
    assert checks["namespaces"]["status"] in ("ok", "warn")  # needed by the audit only
    if checks["namespaces"]["status"] == "warn":
        assert checks["namespaces"]["fix"]
    # No NVIDIA GPU on this machine: the CPU path, reported as information, not a problem.
    if not f["gpus"]:
        assert checks["gpu"]["status"] == "info" and "CPU profiles" in checks["gpu"]["detail"]
    assert data["profile"] in config.shipped_profiles()
    human = cli("doctor")
    assert human.exit_code == 0 and "profile for this machine" in human.stdout


def test_doctor_fails_only_for_what_is_needed(cli, sovctl_home: Path, models: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # Namespaces refused: a warning (only the audit needs them), still exit 0.
    monkeypatch.setenv("SOVCTL_AUDIT_DENY_NAMESPACES", "1")
    r = cli("--json", "doctor")
    monkeypatch.delenv("SOVCTL_AUDIT_DENY_NAMESPACES")
    checks = {c["name"]: c for c in doc_of(r)["data"]["checks"]}
    assert r.exit_code == 0 and checks["namespaces"]["status"] == "warn"
    assert "SOVCTL_AUDIT_DENY_NAMESPACES" in checks["namespaces"]["fix"]

    # The configured port held by someone else, and a blob that no longer matches the lock.
    assert cli("pull", str(TINY_MODEL), "--name", "tiny").exit_code == 0
    [blob] = (sovctl_home / "store" / "blobs").iterdir()
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        (sovctl_home / "sovctl.toml").write_text(f"[serve]\nport = {port}\n")
        r = cli("--json", "doctor")
    doc = doc_of(r)
    assert r.exit_code == ExitCode.FAILURE and doc["ok"] is False
    checks = {c["name"]: c for c in doc["data"]["checks"]}
    assert checks[f"port {port}"]["status"] == "fail"
    assert "already in use" in checks[f"port {port}"]["detail"]
    assert checks["lock"]["status"] == "fail" and "tiny mismatch" in checks["lock"]["detail"]
    assert "sovctl verify" in checks["lock"]["fix"]
    assert doc["error"]["exit_name"] == "FAILURE" and "lock" in doc["error"]["message"]


# -- the NVML path, with a stand-in ---------------------------------------------------------------
def fake_pynvml(gpus: list[tuple[str, int, int]]) -> types.ModuleType:
    """A stand-in for nvidia-ml-py, the one fake in this file: there is no NVIDIA GPU here.
    `gpus`: (name, total bytes, free bytes) per GPU."""
    nv = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    class NVMLError_NotSupported(NVMLError):
        pass

    def mem(h: int) -> types.SimpleNamespace:
        _, total, free = gpus[h]
        return types.SimpleNamespace(total=total, free=free, used=total - free)

    for k, v in {
        "NVMLError": NVMLError, "NVMLError_NotSupported": NVMLError_NotSupported,
        "NVML_CLOCK_MEM": 2, "nvmlInit": lambda: None, "nvmlShutdown": lambda: None,
        "nvmlDeviceGetCount": lambda: len(gpus), "nvmlDeviceGetHandleByIndex": lambda i: i,
        "nvmlDeviceGetIndex": lambda h: h, "nvmlDeviceGetName": lambda h: gpus[h][0],
        "nvmlDeviceGetUUID": lambda h: f"GPU-{h:08d}",
        "nvmlSystemGetDriverVersion": lambda: "550.54.15",
        "nvmlSystemGetCudaDriverVersion": lambda: 12040, "nvmlDeviceGetMemoryInfo": mem,
        "nvmlDeviceGetPowerManagementLimit": lambda h: 450_000,
        "nvmlDeviceGetMemoryBusWidth": lambda h: 384, "nvmlDeviceGetMaxClockInfo": lambda h, k:
        10501,
    }.items():
        setattr(nv, k, v)
    return nv


RTX4090 = ("NVIDIA GeForce RTX 4090", 24564 * MiB, 23000 * MiB)


def test_nvml_stand_in_gpu_facts_doctor_and_profile_choice(
        monkeypatch: pytest.MonkeyPatch, cli, sovctl_home: Path) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([RTX4090]))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    home = Home(sovctl_home)
    f = detect(home)
    assert f.nvml and f.driver_version == "550.54.15" and f.cuda_version == "12.4"
    assert f.gpus == (facts_mod.Gpu(0, RTX4090[0], RTX4090[1], RTX4090[2]),)
    # This machine's llama.cpp build is CPU-only (and there is no real GPU): the GPU is seen,
    # but nothing can be offloaded to it, and doctor says how to fix that.
    assert f.llama.gpu_offload is False and f.usable_gpus == ()
    r = cli("--json", "doctor")
    gpu = {c["name"]: c for c in doc_of(r)["data"]["checks"]}["gpu"]
    assert gpu["status"] == "warn" and "RTX 4090" in gpu["detail"] and "24.0 GiB" in gpu["detail"]
    assert "cannot offload" in gpu["detail"] and "CUDA" in gpu["fix"]
    fits = {x.profile.name: x for x in profiles.assess_all(home, f)}
    assert not fits["gpu-24g"].fits
    assert any("cannot offload" in why for why in fits["gpu-24g"].reasons)
    assert profiles.choose(home, f).profile.accelerator == "cpu"
    assert planning_budget(f).vram_bytes == 0

    # The same facts from a CUDA build (given as data: the choice is a pure function of them).
    cuda = dataclasses.replace(f, llama=dataclasses.replace(f.llama, gpu_offload=True))
    chosen = profiles.choose(home, cuda)
    assert chosen.profile.name == "gpu-24g"
    assert any("RTX 4090" in why and "24.0 GiB" in why for why in chosen.reasons)
    assert planning_budget(cuda).vram_bytes == RTX4090[2]  # free, not total
    for name, total, expect in (("NVIDIA GeForce RTX 4060", 8188 * MiB, "gpu-8g"),
                                ("NVIDIA RTX A4000", 16376 * MiB, "gpu-16g"),
                                ("NVIDIA H100 80GB HBM3", 81559 * MiB, "gpu-80g"),
                                ("NVIDIA GeForce GTX 1650", 4096 * MiB, None)):
        g = (facts_mod.Gpu(0, name, total, total),)
        f2 = dataclasses.replace(cuda, gpus=g, ram_total=128 * GiB)
        best = profiles.choose(home, f2).profile
        assert (best.name if best.accelerator == "cuda" else None) == expect, name


def planning_budget(f: facts_mod.HostFacts) -> sizing.Budget:
    from sovctl.provision.planning import budget

    return budget(f)


@pytest.mark.skipif(
    __import__("sovctl.bench.telemetry", fromlist=["open_nvml"]).open_nvml() is None,
    reason="no NVIDIA GPU with a driver here (the stand-in test covers the NVML path)")
def test_nvml_real_gpu(cli) -> None:
    """On a machine with an NVIDIA GPU: the real NVML, through the same code."""
    r = cli("--json", "doctor")
    data = doc_of(r)["data"]
    assert data["facts"]["nvml"] is True and data["facts"]["driver_version"]
    for g in data["facts"]["gpus"]:
        assert g["name"] and 0 < g["memory_free"] <= g["memory_total"]
    gpu = {c["name"]: c for c in data["checks"]}["gpu"]
    assert gpu["status"] in ("ok", "warn")
    assert (gpu["status"] == "ok") is data["facts"]["llama"]["gpu_offload"]


# -- the GGUF header and the sizing ---------------------------------------------------------------
@pytest.mark.usefixtures("models")
@pytest.mark.parametrize("path", [CHAT_MODEL, EMBED_MODEL, TINY_MODEL], ids=lambda p: p.name)
def test_header_agrees_with_the_gguf_package(path: Path) -> None:
    from gguf import GGUFReader

    h = header.read_local(path)
    reader = GGUFReader(path)
    assert [(t.name, int(t.n_bytes), int(t.n_elements)) for t in reader.tensors] == [
        (t.name, t.n_bytes, t.n_elements) for t in h.tensors]
    for key, field in reader.fields.items():
        if key.startswith(("GGUF.", "tokenizer.")):
            continue
        value = field.contents()
        assert h.get(key) == (... if isinstance(value, list) else pytest.approx(value)), key


@pytest.mark.usefixtures("models")
def test_header_refuses_what_is_not_gguf(tmp_path: Path) -> None:
    from sovctl.errors import IntegrityError

    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 100)
    with pytest.raises(IntegrityError, match="not a valid GGUF file"):
        header.read_local(bad)
    short = tmp_path / "short.gguf"
    short.write_bytes(CHAT_MODEL.read_bytes()[:100_000])
    with pytest.raises(IntegrityError, match="not a valid GGUF file"):
        header.read_local(short)


@pytest.mark.usefixtures("models")
def test_kv_cache_and_weights_from_metadata() -> None:
    s = sizing.shape_of(header.read_local(CHAT_MODEL))
    # SmolLM2-135M: 30 layers, 3 KV heads of 64 dims: 2 x 30 x 3 x 64 x 2 bytes per token;
    # llama.cpp reports the same 180 MiB KV buffer for 8192 cells.
    assert s.n_layer == 30 and s.kv_bytes_per_token == 2 * 30 * 3 * 64 * 2
    assert s.kv_bytes_per_token * 8192 == 180 * MiB
    assert s.input_bytes + sum(s.layer_bytes) + s.output_bytes == s.weights_bytes
    assert s.tied_bytes > 0  # SmolLM2 ties its output head to the token embeddings
    e = sizing.shape_of(header.read_local(EMBED_MODEL))
    assert e.embedding and e.kv_bytes_per_token == 0 and e.context_length == 512


def test_kv_cache_per_layer_when_the_metadata_has_an_array(tmp_path: Path) -> None:
    """A hybrid model lists head_count_kv per layer (0 for its recurrent layers): each layer's
    KV width then comes from its K and V projections. A synthetic file, written by gguf."""
    import gguf
    import numpy as np

    path = tmp_path / "hybrid.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(3)
    w.add_embedding_length(64)
    w.add_head_count(4)
    w.add_head_count_kv([2, 0, 2])
    w.add_context_length(256)
    w.add_tensor("token_embd.weight", np.zeros((100, 64), dtype=np.float32))
    for i in (0, 2):
        for kind in ("k", "v"):
            w.add_tensor(f"blk.{i}.attn_{kind}.weight", np.zeros((32, 64), dtype=np.float16))
    w.add_tensor("blk.1.ssm_in.weight", np.zeros((128, 64), dtype=np.float16))
    w.add_tensor("output.weight", np.zeros((100, 64), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    s = sizing.shape_of(header.read_local(path))
    # 2 heads x 16 dims for K and for V, 2 bytes each; nothing for the recurrent layer
    assert s.kv_layer_bytes == (2 * 2 * 16 * 2, 0, 2 * 2 * 16 * 2)
    assert s.n_vocab == 100 and s.n_layer == 3 and s.tied_bytes == 0
    assert s.layer_bytes == (2 * 32 * 64 * 2, 128 * 64 * 2, 2 * 32 * 64 * 2)


@pytest.mark.parametrize(("text", "size"), [
    ("100MB", 100_000_000), ("512MiB", 512 * MiB), ("8G", 8 * GiB), ("1.5GiB", int(1.5 * GiB)),
    ("0", 0), ("4096", 4096)])
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_bad_size_is_a_usage_error(cli) -> None:
    r = cli("plan", str(TINY_MODEL), "--ram", "lots")
    assert r.exit_code == ExitCode.USAGE and "as a size" in r.stderr


@pytest.mark.usefixtures("models")
def test_plan_partial_offload_and_refusal_with_the_real_models(cli) -> None:
    # Room for everything on a (hypothetical) GPU: every layer goes there.
    r = cli("--json", "plan", str(CHAT_MODEL), "--vram", "8GiB", "--ram", "8GiB")
    assert r.exit_code == 0, r.stderr
    full = doc_of(r)["data"]["fit"]
    assert full["fits"] and full["n_gpu_layers"] == -1 and full["offloaded_layers"] == 31
    need = full["footprint"]
    gpu_total = (need["weights_vram"] + need["kv_vram"] + need["compute_vram"]
                 + need["overhead_vram"])
    # Half of what the layers need beyond the fixed CUDA overhead: a partial offload.
    vram = int((need["overhead_vram"] + (gpu_total - need["overhead_vram"]) / 2) / 0.9)
    r = cli("--json", "plan", str(CHAT_MODEL), "--vram", str(vram), "--ram", "8GiB")
    part = doc_of(r)["data"]["fit"]
    assert r.exit_code == 0 and part["fits"]
    assert 0 < part["n_gpu_layers"] < 31 and part["parallel"] == full["parallel"]
    assert any("partial offload" in n for n in part["notes"])
    assert part["footprint"]["weights_ram"] > 0 and part["footprint"]["weights_vram"] > 0
    human = cli("plan", str(CHAT_MODEL), "--vram", str(vram), "--ram", "8GiB")
    assert f"n_gpu_layers = {part['n_gpu_layers']}" in human.stdout

    # Too little RAM for more slots: fewer slots, same context, said so.
    r = cli("--json", "plan", str(CHAT_MODEL), "--ram", "400MiB", "--vram", "0",
            "--ctx", "2048", "--parallel", "4")
    fewer = doc_of(r)["data"]["fit"]
    assert r.exit_code == 0 and fewer["parallel"] < 4 and fewer["n_ctx"] == 2048
    assert fewer["n_gpu_layers"] == 0

    # Too little for even one slot on the CPU: refused, exit 1, with the numbers.
    r = cli("--json", "plan", str(CHAT_MODEL), "--ram", "100MB", "--vram", "0")
    doc = doc_of(r)
    assert r.exit_code == ExitCode.FAILURE and doc["ok"] is False
    assert doc["data"]["fit"]["fits"] is False
    msg = doc["error"]["message"]
    assert "does not fit" in msg and "MiB of RAM" in msg and "usable" in msg
    assert doc["error"]["type"] == "DoesNotFit"
    r = cli("plan", str(EMBED_MODEL), "--ram", "50MiB")
    assert r.exit_code == ExitCode.FAILURE and "does not fit" in r.stderr
    r = cli("plan", str(MMPROJ))
    assert r.exit_code == ExitCode.USAGE and "multimodal projector" in r.stderr


def test_plan_reads_only_the_header_from_the_hub(cli, models: Path) -> None:
    size = CHAT_MODEL.stat().st_size
    local = doc_of(cli("--json", "plan", str(CHAT_MODEL), "--ram", "8GiB"))["data"]
    with serve(handler=Counting) as hub:
        r = cli("--json", "plan", f"hf://{REPO}/{CHAT_MODEL.name}", "--endpoint", hub.url,
                "--ram", "8GiB")
        bodies = list(hub.bodies)
    assert r.exit_code == 0, r.stderr
    data = doc_of(r)["data"]
    t = data["target"]
    assert t["origin"] == "hub" and t["commit"] == COMMIT and t["file_size"] == size
    # Range requests from the first byte on, a few MiB in all, never the whole file.
    assert [start for _, start in bodies] == [0, 1 << 20][: len(bodies)]
    assert t["requests"] == len(bodies) and t["fetched_bytes"] < size // 10
    assert data["fit"]["shape"]["layer_bytes"] == local["fit"]["shape"]["layer_bytes"]
    assert data["fit"]["footprint"] == local["fit"]["footprint"]


def test_plan_a_name_before_and_after_it_is_pulled(cli, sovctl_home: Path, models: Path) -> None:
    (sovctl_home / "sovctl.toml").parent.mkdir(parents=True, exist_ok=True)
    with serve(handler=Counting) as hub:
        (sovctl_home / "sovctl.toml").write_text(
            f'[hub]\nendpoint = "{hub.url}"\n'
            f'[pull.smol]\nref = "hf://{REPO}/{CHAT_MODEL.name}"\n'
            '[models.smol]\nrole = "chat"\nn_ctx = 1024\nparallel = 3\n')
        before = cli("--json", "plan", "smol", "--ram", "8GiB")
        assert before.exit_code == 0, before.stderr
        assert doc_of(before)["data"]["target"]["origin"] == "pull"
        assert cli("pull", f"hf://{REPO}/{CHAT_MODEL.name}", "--name", "smol",
                   "--endpoint", hub.url).exit_code == 0
    after = doc_of(cli("--json", "plan", "smol", "--ram", "8GiB"))["data"]  # no Hub needed
    assert after["target"]["origin"] == "store"
    assert (after["fit"]["n_ctx"], after["fit"]["parallel"]) == (1024, 3)  # from [models.smol]
    assert after["fit"]["footprint"] == doc_of(before)["data"]["fit"]["footprint"]


# -- init ------------------------------------------------------------------------------------------
def test_init_auto_writes_the_best_fit_and_refuses_to_overwrite(cli, sovctl_home: Path) -> None:
    home = Home(sovctl_home)
    expected = profiles.choose(home, detect(home)).profile.name
    r = cli("--json", "init")
    assert r.exit_code == 0, r.stderr
    data = doc_of(r)["data"]
    assert data["profile"] == expected and data["auto"] is True and data["fits"] is True
    assert data["reasons"] and {m["role"] for m in data["models"]} == {"chat", "embedding"}
    text = home.config_path.read_text()
    assert tomllib.loads(text) == {"profile": expected}
    assert all(reason in text for reason in data["reasons"])  # why, in the file itself
    assert config.load(home, environ={}).profile == expected

    before = (home.config_path.read_bytes(), home.config_path.stat().st_mtime_ns)
    r = cli("init", "--profile", "gpu-80g")
    assert r.exit_code == ExitCode.USAGE and "already exists" in r.stderr
    assert "--force" in r.stderr
    assert (home.config_path.read_bytes(), home.config_path.stat().st_mtime_ns) == before

    r = cli("--json", "init", "--profile", "gpu-80g", "--force")
    data = doc_of(r)["data"]
    assert r.exit_code == 0 and data["profile"] == "gpu-80g" and data["auto"] is False
    assert Path(data["backup"]).read_bytes() == before[0]
    assert tomllib.loads(home.config_path.read_text()) == {"profile": "gpu-80g"}
    if not detect(home).usable_gpus:
        assert data["fits"] is False  # written as asked, with the reasons it does not fit
        assert "does not fit" in cli("init", "--profile", "gpu-80g", "--force").stdout

    r = cli("init", "--profile", "no-such", "--force")
    assert r.exit_code == ExitCode.NOT_FOUND and "gpu-24g" in r.stderr
    assert tomllib.loads(home.config_path.read_text())["profile"] == "gpu-80g"


def test_profiles_lists_every_profile_with_why(cli, sovctl_home: Path) -> None:
    own = sovctl_home / "profiles"
    own.mkdir(parents=True)
    (own / "mine.toml").write_text('[serve]\nn_ctx = 1024\n')
    r = cli("--json", "profiles")
    assert r.exit_code == 0, r.stderr
    rows = {x["profile"]["name"]: x for x in doc_of(r)["data"]}
    assert set(SHIPPED) | {"mine"} <= set(rows)
    assert sum(x["chosen"] for x in rows.values()) == 1
    assert rows["mine"]["fits"] is False and "no machine class" in rows["mine"]["reasons"][0]
    assert rows["mine"]["profile"]["shipped"] is False and rows["gpu-8g"]["profile"]["shipped"]
    for x in rows.values():
        assert x["reasons"]
    human = cli("profiles").stdout
    assert "gpu-48g" in human and "(chosen by init)" in human


# -- up, end to end ------------------------------------------------------------------------------
def local_profile(home: Path, port: int, smol_ref: str) -> None:
    (home / "profiles").mkdir(parents=True, exist_ok=True)
    (home / "profiles" / "local-test.toml").write_text(f"""
[hardware]
summary = "test machine: the shared models"
accelerator = "cpu"
min_ram_gb = 1

[serve]
runtime = "llama-server"
port = {port}
n_ctx = 1024
parallel = 2
n_threads = 1
health_interval = 0.5

[pull.smol]
ref = "{smol_ref}"

[pull.minilm]
ref = "{EMBED_MODEL}"

[models.smol]
role = "chat"

[models.minilm]
role = "embedding"
""")


@pytest.mark.slow
def test_up_end_to_end_resumes_and_is_idempotent(sovctl_home: Path, models: Path) -> None:
    from sovctl.runtime.ports import free_port

    port = free_port()
    hub_ref = f"hf://{REPO}/{CHAT_MODEL.name}"
    local_profile(sovctl_home, port, hub_ref)
    # Interrupted halfway: the Hub drops the connection mid-file.
    with serve(handler=DropsMidFile) as bad:
        first = run(sovctl_home, "up", "--profile", "local-test",
                    env={"SOVCTL_HUB__ENDPOINT": bad.url})
    assert first.returncode == ExitCode.NETWORK, first.stderr
    assert tomllib.loads((sovctl_home / "sovctl.toml").read_text()) == {
        "profile": "local-test"}
    assert not (sovctl_home / "run" / "state.json").exists()

    try:
        # The next run continues: the config is kept, the download resumes, the stack starts.
        with serve(handler=Counting) as hub:
            doc = run_json(sovctl_home, "up", env={"SOVCTL_HUB__ENDPOINT": hub.url})
            bodies = list(hub.bodies)
        assert doc["_rc"] == 0, doc["_stderr"]
        data = doc["data"]
        assert data["initialised"] is None and data["profile"] == "local-test"
        actions = {p["name"]: p["action"] for p in data["pulled"]}
        assert actions["smol"] == "resumed"
        assert [start for _, start in bodies] == [CHAT_MODEL.stat().st_size // 2]
        assert {f["model"]: f["fits"] for f in data["fits"]} == {"smol": True, "minilm": True}
        assert data["url"] == f"http://127.0.0.1:{port}/v1"
        assert data["api_key_required"] is False and data["api_key_file"] is None
        assert f"127.0.0.1:{port}/v1/chat/completions" in data["examples"]["curl"]
        assert '"model": "smol"' in data["examples"]["curl"]
        assert 'model="minilm"' in data["examples"]["python"]

        client = openai.OpenAI(base_url=data["url"], api_key="unused", max_retries=0,
                               timeout=120)
        reply = client.chat.completions.create(model="smol", temperature=0, max_tokens=12,
                                               messages=[{"role": "user", "content": "Hi"}])
        assert reply.choices[0].message.content
        assert len(client.embeddings.create(model="minilm", input="x").data[0].embedding) == 384

        # Run twice: reported as already up, nothing restarted.
        pids = {p["name"]: p["pid"] for p in data["processes"]}
        again = run(sovctl_home, "up")
        assert again.returncode == 0, again.stderr
        assert "already up" in again.stdout and "curl -s" in again.stdout
        st = run_json(sovctl_home, "status")
        assert {p["name"]: p["pid"] for p in st["data"]["processes"]} == pids
    finally:
        state = sovctl_home / "run" / "state.json"
        pids_left = []
        if state.exists():
            st_doc = json.loads(state.read_text())
            pids_left = [st_doc["supervisor_pid"], *(p["pid"] for p in st_doc["processes"]
                                                     if p["pid"])]
        run(sovctl_home, "stop")
        assert not [p for p in pids_left if pid_alive(p)]


@pytest.mark.usefixtures("models")
def test_up_refuses_a_model_that_does_not_fit_before_starting(sovctl_home: Path) -> None:
    from sovctl.runtime.ports import free_port

    local_profile(sovctl_home, free_port(), str(CHAT_MODEL))
    r = run(sovctl_home, "up", "--profile", "local-test", "--ram", "200MiB")
    assert r.returncode == ExitCode.FAILURE, r.stderr
    assert "smol does not fit" in r.stderr and "usable" in r.stderr
    assert not (sovctl_home / "run" / "state.json").exists()
    # Pulled and pinned all the same: the next run needs no download.
    lock = tomllib.loads((sovctl_home / "sovctl.lock").read_text())
    assert set(lock["models"]) == {"smol", "minilm"}
