"""`sovctl bench`, `bench compare`, `bench history` and `bench serve`, end to end.

Real llama.cpp runs on the models in ../shared/models (stories260K for nearly everything,
SmolLM2 once), real history files, and `bench serve` against a real OpenAI-compatible
server (llama-cpp-python's) started as a subprocess. The only stand-in is the fake NVML
module in the GPU tests, because there is no NVIDIA GPU on the machines these tests run on.
"""

from __future__ import annotations

import csv
import io
import json
import socket
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.conftest import CHAT_MODEL, EMBED_MODEL, TINY_MODEL
from tests.test_bench_units import record

from sovctl.bench import costs, history
from sovctl.config import CostSettings
from sovctl.errors import ExitCode
from sovctl.home import Home
from sovctl.result import jsonable

FAST = ("-p", "32", "-n", "16", "-r", "2", "-t", "1")


def doc_of(result: Any) -> dict[str, Any]:
    assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr)
    doc = json.loads(result.stdout)
    assert doc["schema"] == "sovctl/v1" and doc["ok"] is True
    return doc  # type: ignore[no-any-return]


def assert_error(result: Any, code: ExitCode, *needles: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    err = result.stderr.strip()
    assert err.startswith("error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)


def history_lines(home: Path) -> list[dict[str, Any]]:
    path = home / "bench" / "history.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def tiny(cli: Any, models: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """stories260K in the store; a fixed roofline peak so most runs skip the memory test."""
    r = cli("pull", str(TINY_MODEL))
    assert r.exit_code == 0, r.stderr
    monkeypatch.setenv("SOVCTL_BENCH__MEMORY_BANDWIDTH_GBS", "20")
    return "stories260K"


# -- the micro-benchmark on the CPU path ------------------------------------------------------


def test_run_json_figures_and_history(cli: Any, tiny: str, sovctl_home: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOVCTL_BENCH__MEMORY_BANDWIDTH_GBS")  # measure the CPU peak for real
    (sovctl_home / "sovctl.toml").write_text(
        "[bench]\ncpu_watts = 100.0\n[cost]\nelectricity_per_kwh = 0.30\n"
        "hardware_price = 3000.0\nhardware_lifetime_years = 3.0\nhardware_utilisation = 0.5\n"
        "cloud_price_per_mtok = 8.0\ncloud_input_price_per_mtok = 2.0\n")
    cfg = CostSettings(currency="USD", electricity_per_kwh=0.30, hardware_price=3000.0,
                       hardware_lifetime_years=3.0, hardware_utilisation=0.5,
                       cloud_price_per_mtok=8.0, cloud_input_price_per_mtok=2.0)
    doc = doc_of(cli("--json", "bench", tiny, *FAST))
    run = doc["data"]
    assert run["kind"] == "micro" and run["schema"] == "sovctl-bench/1"
    (res,) = run["results"]
    assert res["model"]["sha256"] == run["models"][tiny]
    assert res["model"]["weights_bytes"] > 0 and res["model"]["parameters"] > 0
    assert res["settings"] == {"n_prompt": 32, "n_gen": 16, "reps": 2, "threads": 1,
                               "n_gpu_layers": 0, "batch": 2048, "ubatch": 512,
                               "flash_attn": False, "repack": True}
    assert res["on_gpu"] is False
    for key, tokens, cloud in (("pp", 32, 2.0), ("tg", 16, 8.0)):
        p = res[key]
        assert p["test"] == f"{key}{tokens}" and p["reps"] == 2 and len(p["samples_tps"]) == 2
        assert p["tps_mean"] > 0 and p["tps_sd"] >= 0
        tel = p["telemetry"]
        # No NVML here: the CPU path, with the energy estimated from cpu_watts and labelled so.
        assert tel["source"] == "cpu" and tel["gpus"] == []
        assert tel["energy_estimated"] is True and tel["energy_method"] == "estimate-cpu-watts"
        assert tel["energy_j"] == pytest.approx(100.0 * tel["seconds"])
        assert tel["rss_max_bytes"] > 0 and tel["samples"] >= 2
        # The formulas are checked on fixed figures in test_bench_units; here, that the run
        # feeds them its measured throughput, its energy per token processed and sovctl.toml.
        jpt = tel["energy_j"] / (tokens * 2)
        assert p["costs"] == pytest.approx(jsonable(
            costs.derive(p["tps_mean"], jpt, True, cfg, prompt=key == "pp")))
        assert p["costs"]["cloud_per_mtok"] == cloud and p["costs"]["hardware_per_mtok"] > 0
    roof = res["roofline"]
    assert roof["peak_source"] == "measured-memcpy" and roof["peak_bytes_per_s"] > 1e8
    assert roof["model_bytes"] == res["model"]["weights_bytes"]
    assert roof["tokens_per_s"] == res["tg"]["tps_mean"]
    assert run["bandwidth"]["source"] == "measured-memcpy"

    (rec,) = history_lines(sovctl_home)
    assert rec["id"] == run["id"]
    fp = rec["fingerprint"]
    assert fp["cpu_model"] and fp["cpu_cores"] >= 1 and fp["ram_bytes"] > 0
    assert fp["nvml"] is None and fp["sovctl"] == doc["sovctl"]
    assert fp["llama"]["gpu_offload"] is False and "CPU" in fp["llama"]["system_info"]
    assert rec["config"]["bench.cpu_watts"] == {"value": 100.0, "from": "config"}
    assert rec["config"]["cost.currency"] == {"value": "USD", "from": "default"}
    assert rec["results"][0]["model"]["sha256"] == res["model"]["sha256"]


def test_table_output_labels_estimates(cli: Any, tiny: str) -> None:
    r = cli("bench", tiny, *FAST)
    assert r.exit_code == 0, r.stderr
    out = r.stdout
    for needle in ("throughput", "energy", "cost per million tokens (USD)", "telemetry",
                   "pp32", "tg16", "roofline", "* estimated", "bench.cpu_watts", "recorded as"):
        assert needle in out, (needle, out)
    assert "J*" in out and "W*" in out  # every estimated figure carries the mark


def test_csv_md_and_json_outputs_parse_with_a_sweep(cli: Any, tiny: str) -> None:
    args = ("bench", "run", tiny, "-p", "16", "-n", "8", "-r", "2", "-t", "1,2", "-b", "8,2048")
    rows = list(csv.DictReader(io.StringIO(cli(*args, "-o", "csv").stdout)))
    assert len(rows) == 2 * 2 * 2  # threads x batch x {pp, tg}
    assert {(r["threads"], r["batch"], r["test"]) for r in rows} == {
        (t, b, x) for t in ("1", "2") for b in ("8", "2048") for x in ("pp16", "tg8")}
    for r in rows:
        assert float(r["tokens_per_s"]) > 0 and r["energy_estimated"] == "true"
        assert r["backend"] == "CPU" and r["energy_method"] == "estimate-cpu-watts"
    assert all(r["roofline_fraction"] for r in rows if r["test"] == "tg8")

    md = cli(*args, "-o", "md").stdout.strip().splitlines()
    header = [c.strip() for c in md[0].strip("|").split("|")]
    assert header[:3] == ["run_id", "model", "sha256"] and set(md[1]) <= {"|", "-"}
    body = [[c.strip() for c in line.strip("|").split("|")] for line in md[2:]]
    assert len(body) == 8 and all(len(b) == len(header) for b in body)
    assert {b[header.index("test")] for b in body} == {"pp16", "tg8"}

    doc = doc_of(cli(*args, "-o", "json"))
    assert len(doc["data"]["results"]) == 4 and doc["command"] == "bench run"
    assert len(history_lines(Path(doc["data"]["history"]).parents[1])) == 3


def test_compare_and_history(cli: Any, tiny: str, sovctl_home: Path) -> None:
    assert_error(cli("bench", "compare"), ExitCode.NOT_FOUND, "no benchmark runs")
    first = doc_of(cli("--json", "bench", tiny, *FAST))["data"]["id"]
    assert_error(cli("bench", "compare"), ExitCode.NOT_FOUND, "same model and settings")
    other = doc_of(cli("--json", "bench", tiny, "-p", "8", "-n", "4", "-r", "2"))["data"]["id"]
    second = doc_of(cli("--json", "bench", tiny, *FAST))["data"]["id"]

    cmp = doc_of(cli("--json", "bench", "compare"))["data"]
    # The default baseline is the previous run with the same model and settings, not `other`.
    assert (cmp["run"], cmp["against"]) == (second, first)
    assert [c["test"] for c in cmp["changes"]] == ["pp32", "tg16"]
    for c in cmp["changes"]:
        assert c["verdict"] in ("faster", "slower", "within spread")
        assert c["threshold"] >= 2 * (c["sd"] + c["against_sd"]) - 1e-9
        assert c["delta_pct"] == pytest.approx(
            100 * (c["mean"] - c["against_mean"]) / c["against_mean"])
    assert cmp["environment"] == []

    ids = (first, other, second)
    prefix = next(second[:n] for n in range(1, len(second) + 1)
                  if sum(i.startswith(second[:n]) for i in ids) == 1)
    by_prefix = doc_of(cli("--json", "bench", "compare", prefix, "--against", "-3"))
    assert by_prefix["data"]["against"] == first
    unrelated = doc_of(cli("--json", "bench", "compare", "--against", other))["data"]
    assert unrelated["changes"] == [] and len(unrelated["unmatched"]) == 1
    assert_error(cli("bench", "compare", "nope"), ExitCode.NOT_FOUND, "no recorded run")
    assert_error(cli("bench", "compare", second, "--against", second), ExitCode.USAGE)

    r = cli("bench", "compare")
    assert r.exit_code == 0 and "environment: unchanged" in r.stdout
    rows = list(csv.DictReader(io.StringIO(cli("bench", "compare", "-o", "csv").stdout)))
    assert [row["test"] for row in rows] == ["pp32", "tg16"]

    hist = doc_of(cli("--json", "bench", "history"))["data"]
    assert [h["id"] for h in hist] == [first, other, second]
    assert hist[0]["models"] == [tiny] and len({h["fingerprint"] for h in hist}) == 1
    assert "stories260K" in cli("bench", "history").stdout


def test_compare_and_history_on_a_written_history(cli: Any, sovctl_home: Path) -> None:
    """What the commands add to history.compare: the exit status, the formats, the table."""
    for rec in (record("a", tg=(1000.0, 10.0)), record("b", tg=(1500.0, 10.0)),
                record("d", tg=(500.0, 10.0), llama="0.4.0")):
        history.append(Home(sovctl_home), rec)

    r = cli("--json", "bench", "compare", "d", "--against", "a", "--fail-on-slower")
    assert r.exit_code == ExitCode.FAILURE
    doc = json.loads(r.stdout)
    assert doc["ok"] is False and doc["error"]["exit_code"] == ExitCode.FAILURE
    assert [c["verdict"] for c in doc["data"]["changes"]] == ["within spread", "slower"]
    r = cli("bench", "compare", "d", "--against", "a", "--fail-on-slower", "-o", "csv")
    assert r.exit_code == ExitCode.FAILURE and "1 phase(s) slower than run a" in r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout)))  # the rows come before the failure
    assert [(x["test"], x["verdict"], x["delta_pct"]) for x in rows] == [
        ("pp32", "within spread", "0"), ("tg16", "slower", "-50")]
    assert cli("bench", "compare", "b", "--against", "a", "--fail-on-slower").exit_code == 0

    table = cli("bench", "compare", "d", "--against", "a").stdout
    assert "run d (2025-03-01T10:00:00Z) against a" in table and "-50.0%" in table
    assert "llama.llama_cpp_python: '0.3.36' -> '0.4.0'" in table

    md = cli("bench", "history", "-o", "md").stdout.splitlines()
    assert md[:2] == ["| id | started_at | models | results | environment |",
                      "|---|---|---|---|---|"]
    assert md[4] == "| d | 2025-03-01T10:00:00Z | tiny | 1 | fp-0.4.0 |"
    table = cli("bench", "history").stdout
    assert "ENVIRONMENT" in table and "fp-0.4.0" in table

    path = history.history_path(Home(sovctl_home))
    path.write_text(path.read_text() + "{not json\n")
    assert_error(cli("bench", "history"), ExitCode.CONFIG, "line 4")
    path.unlink()
    assert cli("bench", "history").stdout.startswith("no runs yet")
    assert cli("bench", "history", "-o", "csv").stdout == (
        "id,started_at,models,results,environment\n")


def test_default_models_skip_embeddings_and_errors(cli: Any, tiny: str,
                                                   sovctl_home: Path) -> None:
    assert cli("pull", str(EMBED_MODEL)).exit_code == 0
    doc = doc_of(cli("--json", "bench", "-p", "8", "-n", "4", "-r", "1", "-t", "1"))
    assert [r["model"]["name"] for r in doc["data"]["results"]] == [tiny]

    assert_error(cli("bench", "nosuch"), ExitCode.NOT_FOUND, "no model named 'nosuch'")
    assert_error(cli("bench", EMBED_MODEL.stem), ExitCode.USAGE, "embedding model")
    assert_error(cli("bench", tiny, "-t", "two"), ExitCode.USAGE, "-t takes an integer")
    assert_error(cli("bench", tiny, "-p", "0", "-n", "0"), ExitCode.USAGE, "not both 0")
    assert_error(cli("bench", tiny, "-r", "0"), ExitCode.USAGE, "at least 1")
    assert_error(cli("bench", tiny, "-o", "xml"), ExitCode.USAGE, "-o/--output")
    (sovctl_home / "sovctl.toml").write_text("[cost]\nhardware_utilisation = 0.0\n")
    assert_error(cli("bench", tiny), ExitCode.CONFIG, "hardware_utilisation")
    assert len(history_lines(sovctl_home)) == 1  # failed runs record nothing


@pytest.mark.usefixtures("models")
def test_empty_store_and_missing_blob(cli: Any, sovctl_home: Path) -> None:
    assert_error(cli("bench"), ExitCode.NOT_FOUND, "no models in the store")
    assert cli("pull", str(TINY_MODEL)).exit_code == 0
    for blob in (sovctl_home / "store" / "blobs").iterdir():
        blob.chmod(0o644)
        blob.unlink()
    assert_error(cli("bench", "stories260K"), ExitCode.NOT_FOUND, "blob is missing")


def test_only_pp_or_only_tg(cli: Any, tiny: str) -> None:
    pp_only = doc_of(cli("--json", "bench", tiny, "-p", "16", "-n", "0", "-r", "1"))
    (res,) = pp_only["data"]["results"]
    assert res["pp"]["test"] == "pp16" and res["tg"] is None and res["roofline"] is None
    tg_only = doc_of(cli("--json", "bench", tiny, "-p", "0", "-n", "8", "-r", "1"))
    (res,) = tg_only["data"]["results"]
    assert res["pp"] is None and res["tg"]["test"] == "tg8"
    assert res["roofline"]["peak_source"] == "config"


def test_no_nvml_library_is_the_cpu_path() -> None:
    """The real nvidia-ml-py here finds no NVML library: no error, just no GPU session."""
    from sovctl.bench import telemetry

    assert telemetry.open_nvml() is None
    with telemetry.PhaseSampler(None, 0.01, cpu_watts=50.0) as s:
        time.sleep(0.05)
    assert s.result is not None and s.result.source == "cpu" and s.result.samples >= 3
    assert s.result.energy_j == pytest.approx(50.0 * s.result.seconds)
    assert s.result.energy_estimated and s.result.energy_scope == "cpu"


@pytest.mark.slow
@pytest.mark.usefixtures("models")
def test_smollm2_run(cli: Any, sovctl_home: Path) -> None:
    """The chat model once. --no-repack: on hosts whose CPU advertises AMX but whose
    hypervisor does not enable it, llama.cpp's repacked AMX kernels crash the process."""
    assert cli("pull", str(CHAT_MODEL)).exit_code == 0
    doc = doc_of(cli("--json", "bench", CHAT_MODEL.stem, "--no-repack", "-p", "32", "-n", "8",
                     "-r", "1", "-t", "2"))
    (res,) = doc["data"]["results"]
    assert res["model"]["parameters"] > 100_000_000 and res["settings"]["repack"] is False
    assert res["model"]["quantization"] == "Q4_1"
    assert res["pp"]["tps_mean"] > 0 and res["tg"]["tps_mean"] > 0
    assert res["tg"]["tps_mean"] < res["roofline"]["bound_tokens_per_s"] * 1.5


def test_help_does_not_import_heavy_modules() -> None:
    code = ("import sys; from sovctl.cli import app; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('llama_cpp', 'numpy', 'pynvml') or m.startswith('sovctl.bench')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


# -- NVML paths, with a fake NVML ----------------------------------------------------------------


def fake_pynvml(energy_counter: bool = True, gpus: int = 1, power: bool = True
                ) -> types.ModuleType:
    """A stand-in for nvidia-ml-py: there is no NVIDIA GPU here, so this is the one place a
    fake is right. It answers like an H100 SXM drawing 300 W, with a power cap throttle."""
    nv = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    class NVMLError_NotSupported(NVMLError):
        pass

    class NVMLError_NoPermission(NVMLError):
        pass

    t0 = time.monotonic()
    mem = types.SimpleNamespace(total=80 * 2**30, used=3 * 2**30, free=77 * 2**30)
    calls: dict[str, int] = {"init": 0, "shutdown": 0}

    def init() -> None:
        calls["init"] += 1

    def shutdown() -> None:
        calls["shutdown"] += 1

    def energy(h: int) -> int:
        if not energy_counter:
            raise NVMLError_NotSupported()
        return int(5_000_000 + 300_000 * (time.monotonic() - t0))  # mJ at 300 W

    def power_usage(h: int) -> int:
        if not power:
            raise NVMLError_NotSupported()
        return 300_000

    def clock(h: int, kind: int) -> int:
        return {0: 1980, 2: 2619}[kind]

    ns = {
        "NVMLError": NVMLError, "NVMLError_NotSupported": NVMLError_NotSupported,
        "NVMLError_NoPermission": NVMLError_NoPermission,
        "NVML_CLOCK_SM": 0, "NVML_CLOCK_MEM": 2, "NVML_TEMPERATURE_GPU": 0,
        "nvmlInit": init, "nvmlShutdown": shutdown,
        "nvmlDeviceGetCount": lambda: gpus,
        "nvmlDeviceGetHandleByIndex": lambda i: i,
        "nvmlDeviceGetIndex": lambda h: h,
        "nvmlDeviceGetName": lambda h: "NVIDIA H100 80GB HBM3",
        "nvmlDeviceGetUUID": lambda h: f"GPU-0000000{h}",
        "nvmlSystemGetDriverVersion": lambda: "550.54.15",
        "nvmlSystemGetCudaDriverVersion": lambda: 12040,
        "nvmlDeviceGetMemoryInfo": lambda h: mem,
        "nvmlDeviceGetPowerManagementLimit": lambda h: 700_000,
        "nvmlDeviceGetMemoryBusWidth": lambda h: 5120,
        "nvmlDeviceGetMaxClockInfo": clock,
        "nvmlDeviceGetClockInfo": clock,
        "nvmlDeviceGetUtilizationRates": lambda h: types.SimpleNamespace(gpu=97, memory=60),
        "nvmlDeviceGetPowerUsage": power_usage,
        "nvmlDeviceGetTotalEnergyConsumption": energy,
        "nvmlDeviceGetTemperature": lambda h, sensor: 61,
        "nvmlDeviceGetCurrentClocksEventReasons": lambda h: 0x1 | 0x4,
    }
    for k, v in ns.items():
        setattr(nv, k, v)
    nv.calls = calls  # type: ignore[attr-defined]
    return nv


@pytest.mark.parametrize("counter", [True, False], ids=["energy-counter", "integrated-power"])
def test_nvml_sampler_and_fingerprint(monkeypatch: pytest.MonkeyPatch, counter: bool) -> None:
    from sovctl.bench import fingerprint, roofline, telemetry

    nv = fake_pynvml(energy_counter=counter, gpus=2)
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    session = telemetry.open_nvml()
    assert session is not None and [i for i, _ in session.handles] == [1]
    with telemetry.PhaseSampler(session, 0.01, cpu_watts=65.0) as s:
        time.sleep(0.15)
    tel = s.result
    assert tel is not None and tel.source == "nvml" and tel.energy_scope == "gpu"
    assert tel.energy_estimated is False
    assert tel.energy_method == ("nvml-energy-counter" if counter else "nvml-power-integrated")
    assert tel.energy_j == pytest.approx(300.0 * tel.seconds, rel=0.1)
    (g,) = tel.gpus
    assert g.util_mean_pct == 97 and g.memory_used_max_bytes == 3 * 2**30
    assert g.power_max_w == 300.0 and g.temperature_max_c == 61
    assert g.sm_clock_mean_mhz == 1980 and g.mem_clock_mean_mhz == 2619
    assert g.throttle_reasons == ("sw_power_cap",)  # gpu_idle is not a throttle

    fp = fingerprint.collect(session)
    assert fp.nvml is not None and fp.nvml.driver_version == "550.54.15"
    assert fp.nvml.cuda_version == "12.4" and fp.nvml.gpus[0].name == "NVIDIA H100 80GB HBM3"
    bw = roofline.gpu_bandwidth(fp.nvml)
    assert bw is not None and bw.bytes_per_s == pytest.approx(2619e6 * 2 * 5120 / 8)  # 3.35 TB/s
    session.close()
    assert nv.calls == {"init": 1, "shutdown": 1}  # type: ignore[attr-defined]


def test_nvml_without_any_power_reading_falls_back_to_the_estimate(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from sovctl.bench import telemetry

    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(energy_counter=False, power=False))
    session = telemetry.open_nvml()
    assert session is not None
    with telemetry.PhaseSampler(session, 0.01, cpu_watts=40.0) as s:
        time.sleep(0.05)
    tel = s.result
    assert tel is not None and tel.source == "nvml" and tel.gpus[0].util_mean_pct == 97
    assert tel.gpus[0].energy_j is None and tel.gpus[0].energy_method == "unavailable"
    assert tel.energy_estimated and tel.energy_method == "estimate-cpu-watts"
    assert tel.energy_j == pytest.approx(40.0 * tel.seconds)
    session.close()


def test_nvml_error_in_sampler_thread_is_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    from sovctl.bench import telemetry

    nv = fake_pynvml()

    def lost(h: int) -> int:
        raise nv.NVMLError("GPU is lost")  # type: ignore[attr-defined]

    nv.nvmlDeviceGetPowerUsage = lost  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    session = telemetry.open_nvml()
    assert session is not None
    sampler = telemetry.PhaseSampler(session, 0.01, cpu_watts=65.0)
    with pytest.raises(nv.NVMLError, match="GPU is lost"), sampler:  # type: ignore[attr-defined]
        time.sleep(0.03)


def test_bench_with_fake_gpu(cli: Any, tiny: str, sovctl_home: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end on the NVML path: a fake NVML, and llama.cpp's GPU device question answered
    yes (it runs on the CPU regardless; what is checked is which figures sovctl reads and how
    it labels them)."""
    from sovctl.bench import fingerprint

    monkeypatch.delenv("SOVCTL_BENCH__MEMORY_BANDWIDTH_GBS")
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml())
    monkeypatch.setattr(fingerprint, "gpu_offload", lambda: True)
    doc = doc_of(cli("--json", "bench", tiny, "-p", "16", "-n", "8", "-r", "2"))
    (res,) = doc["data"]["results"]
    assert res["settings"]["n_gpu_layers"] == -1 and res["on_gpu"] is True
    for key in ("pp", "tg"):
        tel = res[key]["telemetry"]
        assert tel["source"] == "nvml" and tel["energy_method"] == "nvml-energy-counter"
        assert tel["energy_estimated"] is False and res[key]["costs"]["estimated"] is False
        assert tel["gpus"][0]["throttle_reasons"] == ["sw_power_cap"]
    assert res["roofline"]["peak_source"] == "nvml-clock-x-bus-width"
    fp = doc["data"]["fingerprint"]
    assert fp["llama"]["gpu_offload"] is True and fp["nvml"]["cuda_version"] == "12.4"
    table = cli("bench", tiny, "-p", "16", "-n", "8", "-r", "1").stdout
    assert "GPU %" in table and "sw_power_cap" in table and "* estimated" not in table
    assert "GPU boards only" in table


# -- bench serve against a real OpenAI-compatible server -----------------------------------------

API_KEY = "sk-bench-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(models: Path) -> Iterator[str]:
    """llama-cpp-python's own OpenAI-compatible server on the tiny model, with an API key."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(TINY_MODEL),
         "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "512",
         "--interrupt_requests", "False", "--api_key", API_KEY],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "llama_cpp.server exited"
            try:
                r = httpx.get(f"{url}/models", headers={"Authorization": f"Bearer {API_KEY}"})
                if r.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "llama_cpp.server did not come up"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_bench_serve_levels(cli: Any, server: str) -> None:
    args = ("bench", "serve", "--url", server, "--api-key", API_KEY, "-c", "1,2",
            "--requests", "4", "--prompt-tokens", "16", "--max-tokens", "8")
    doc = doc_of(cli("--json", *args))
    run = doc["data"]
    assert run["kind"] == "serve" and run["model"] == str(TINY_MODEL)
    assert [lv["concurrency"] for lv in run["levels"]] == [1, 2]
    for lv in run["levels"]:
        assert lv["completed"] == 4 and lv["errors"] == 0 and lv["error_samples"] == []
        assert 0 < lv["output_tokens"] <= 4 * 8
        assert lv["output_tokens_per_s"] == pytest.approx(lv["output_tokens"] / lv["wall_s"])
        assert lv["requests_per_s"] == pytest.approx(4 / lv["wall_s"])
        for m in ("ttft", "e2e", "itl"):
            s = lv[m]
            assert 0 < s["median"] <= s["p95"] <= s["p99"] <= s["max"], (m, s)
        assert lv["ttft"]["mean"] < lv["e2e"]["mean"]
        assert lv["tokens_counted_from"] == "chunks"  # this server sends no usage in streams

    rows = list(csv.DictReader(io.StringIO(cli(*args, "--endpoint", "completions",
                                               "-o", "csv").stdout)))
    assert [r["concurrency"] for r in rows] == ["1", "2"]
    assert all(float(r["ttft_p99_ms"]) > 0 and r["errors"] == "0" for r in rows)
    table = cli(*args, "-c", "2").stdout
    assert "TTFT" in table and "ITL" in table and "E2E" in table and "REQ/S" in table


@pytest.mark.slow
def test_bench_serve_errors(cli: Any, server: str) -> None:
    assert_error(cli("bench", "serve", "--url", server, "-c", "1", "--requests", "1"),
                 ExitCode.NETWORK, "refused the API key")
    assert_error(cli("bench", "serve", "--url", f"http://127.0.0.1:{free_port()}/v1"),
                 ExitCode.NETWORK, "cannot reach", "sovctl serve")
    assert_error(cli("bench", "serve", "--url", server, "-c", "0"), ExitCode.USAGE)
    assert_error(cli("bench", "serve", "--url", "ftp://x"), ExitCode.USAGE, "--url")


@pytest.mark.slow
def test_bench_serve_records_the_runtime_behind_a_sovctl_gateway(
        cli: Any, tmp_path: Path, models: Path) -> None:
    from tests.helpers import run

    home = tmp_path / "stack"
    run(home, "pull", str(TINY_MODEL), "--name", "tiny", check=True)
    port = free_port()
    run(home, "serve", "--chat", "tiny", "--port", str(port), "-d", check=True)
    try:
        doc = doc_of(cli("--json", "bench", "serve", "--url", f"http://127.0.0.1:{port}/v1",
                         "-c", "2", "--requests", "2", "--prompt-tokens", "8",
                         "--max-tokens", "4"))
        assert doc["data"]["model"] == "tiny" and doc["data"]["runtime"] == "llama-server"
        assert doc["data"]["levels"][0]["completed"] == 2
    finally:
        run(home, "stop", check=True)
