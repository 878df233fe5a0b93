"""The pure parts of bench on plain data: costs, statistics, the roofline, comparing history
records, the named rows behind CSV and Markdown, and the host's CPU name.

Expected figures are worked out by hand (in the comments), not by the code's own formulas.
"""

from __future__ import annotations

import dataclasses
import json
import platform
from pathlib import Path
from typing import Any

import pytest

from sovctl.bench import costs, history, stats
from sovctl.config import CostSettings
from sovctl.errors import ConfigError, NotFoundError, UsageError
from sovctl.home import Home

# -- costs ---------------------------------------------------------------------------------------

# 1 year x 31,557,600 s x 0.5 utilisation = 15,778,800 busy seconds, so a price of 15,778.8
# costs 0.001 per busy second.
CFG = CostSettings(currency="EUR", electricity_per_kwh=0.30, hardware_price=15778.8,
                       hardware_lifetime_years=1.0, hardware_utilisation=0.5,
                       cloud_price_per_mtok=8.0, cloud_input_price_per_mtok=2.0)


def test_costs_of_a_generation_phase() -> None:
    c = costs.derive(tokens_per_s=100.0, joules_per_token=0.36, estimated=False, cfg=CFG,
                     prompt=False)
    assert c.tokens_per_s == 100.0 and c.joules_per_token == 0.36
    assert c.tokens_per_joule == pytest.approx(2.77778, rel=1e-5)  # 1 / 0.36
    assert c.wh_per_mtok == pytest.approx(100.0)  # 0.36 J x 1e6 = 360 kJ = 100 Wh
    assert c.electricity_per_mtok == pytest.approx(0.03)  # 0.1 kWh x 0.30
    # 0.001 per second at 100 tokens/s: 0.00001 per token, 10 per million.
    assert c.hardware_per_mtok == pytest.approx(10.0)
    assert c.local_per_mtok == pytest.approx(10.03)
    assert c.cloud_per_mtok == 8.0 and c.currency == "EUR" and c.estimated is False


def test_costs_of_a_prompt_phase_use_the_input_price() -> None:
    c = costs.derive(tokens_per_s=50.0, joules_per_token=1.8, estimated=True, cfg=CFG,
                     prompt=True)
    assert c.wh_per_mtok == pytest.approx(500.0)  # 1.8 MJ = 500 Wh
    assert c.electricity_per_mtok == pytest.approx(0.15)  # 0.5 kWh x 0.30
    assert c.hardware_per_mtok == pytest.approx(20.0)  # 0.001 / 50 x 1e6
    assert c.local_per_mtok == pytest.approx(20.15)
    assert c.cloud_per_mtok == 2.0 and c.estimated is True


def test_costs_without_hardware_price_throughput_or_energy() -> None:
    free = dataclasses.replace(CFG, hardware_price=0.0)
    c = costs.derive(tokens_per_s=100.0, joules_per_token=0.36, estimated=False, cfg=free,
                     prompt=False)
    assert c.hardware_per_mtok == 0.0 and c.local_per_mtok == pytest.approx(0.03)
    stalled = costs.derive(tokens_per_s=0.0, joules_per_token=0.0, estimated=False, cfg=CFG,
                           prompt=False)
    assert stalled.hardware_per_mtok == 0.0 and stalled.tokens_per_joule == 0.0


def test_cost_config_from_settings(tmp_path: Path) -> None:
    from sovctl import config

    home = Home(tmp_path)
    defaults = config.load(home, environ={}).cost
    assert defaults == CostSettings(
        currency="USD", electricity_per_kwh=0.15, hardware_price=0.0,
        hardware_lifetime_years=3.0, hardware_utilisation=0.5, cloud_price_per_mtok=10.0,
        cloud_input_price_per_mtok=2.5)
    for key, value, needle in (("cost.hardware_lifetime_years", 0.0, "more than 0"),
                               ("cost.hardware_utilisation", 1.5, "(0, 1]"),
                               ("cost.hardware_utilisation", 0.0, "(0, 1]"),
                               ("cost.electricity_per_kwh", -0.1, "must not be negative")):
        with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("]", r"\]")):
            config.load(home, flags={key: value}, environ={})


# -- statistics ----------------------------------------------------------------------------------


def test_mean_and_sample_standard_deviation() -> None:
    xs = [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]
    assert stats.mean(xs) == 5.0
    # squared deviations 9+1+1+1+0+0+4+16 = 32; 32 / 7 = 4.5714; sqrt = 2.13809
    assert stats.stdev(xs) == pytest.approx(2.13809, rel=1e-5)
    assert stats.mean([]) == 0.0 and stats.stdev([3.0]) == 0.0 and stats.stdev([]) == 0.0


def test_percentile_interpolates_as_numpy_does() -> None:
    assert stats.percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    five = [50.0, 10.0, 40.0, 20.0, 30.0]  # unsorted on purpose
    assert stats.percentile(five, 95) == pytest.approx(48.0)  # position 3.8: 40 + 0.8 x 10
    assert stats.percentile(five, 99) == pytest.approx(49.6)  # position 3.96
    assert stats.percentile(five, 0) == 10.0 and stats.percentile(five, 100) == 50.0
    assert stats.percentile([7.0], 99) == 7.0 and stats.percentile([], 50) == 0.0


def test_summarise() -> None:
    s = stats.summarise([0.4, 0.1, 0.3, 0.2])
    assert s is not None
    assert (s.n, s.max) == (4, 0.4)
    assert s.mean == pytest.approx(0.25) and s.median == pytest.approx(0.25)
    assert s.p95 == pytest.approx(0.385)  # position 2.85: 0.3 + 0.85 x 0.1
    assert s.p99 == pytest.approx(0.397)  # position 2.97
    assert stats.summarise([]) is None


# -- roofline ------------------------------------------------------------------------------------


def test_roofline_fraction_and_bound() -> None:
    from sovctl.bench import roofline

    peak = roofline.Bandwidth(100e9, roofline.SOURCE_CONFIG, "bench.memory_bandwidth_gbs")
    r = roofline.roofline(model_bytes=1_000_000_000, tokens_per_s=20.0, peak=peak)
    assert r.achieved_bytes_per_s == pytest.approx(20e9)  # 1 GB read per token, 20 per second
    assert r.fraction == pytest.approx(0.2)  # 20 of 100 GB/s
    assert r.bound_tokens_per_s == pytest.approx(100.0)  # 100 GB/s over 1 GB per token
    assert r.peak_source == "config"


# -- history records and compare -----------------------------------------------------------------


def record(run_id: str, tg: tuple[float, float], pp: tuple[float, float] = (1000.0, 10.0), *,
           threads: int = 1, reps: int = 5, sha: str = "aa" * 32, llama: str = "0.3.36",
           started_at: str = "2025-03-01T10:00:00Z") -> dict[str, Any]:
    """A history record with the fields compare and history read, tokens/s as (mean, sd)."""
    settings = {"n_prompt": 32, "n_gen": 16, "reps": reps, "threads": threads,
                "n_gpu_layers": 0, "batch": 2048, "ubatch": 512, "flash_attn": False,
                "repack": True}

    def phase(test: str, mean_sd: tuple[float, float], jpt: float) -> dict[str, Any]:
        return {"test": test, "tps_mean": mean_sd[0], "tps_sd": mean_sd[1],
                "costs": {"joules_per_token": jpt}}

    return {
        "schema": history.RECORD_SCHEMA, "id": run_id, "started_at": started_at,
        "fingerprint": {"cpu_model": "Test CPU", "llama": {"llama_cpp_python": llama}},
        "fingerprint_digest": f"fp-{llama}",
        "results": [{"model": {"name": "tiny", "sha256": sha}, "settings": settings,
                     "pp": phase("pp32", pp, 0.01), "tg": phase("tg16", tg, 0.05)}],
    }


def verdicts(cmp: history.Comparison) -> dict[str, tuple[str, float, float]]:
    return {c.test: (c.verdict, c.threshold, c.delta_pct) for c in cmp.changes}


def test_compare_verdicts_against_the_spread() -> None:
    a = record("a", tg=(1000.0, 10.0))
    cases = {
        # threshold 2 x (10 + 10) = 40 tokens/s (more than 1% of 1000)
        "faster": (record("b", tg=(1500.0, 10.0)), ("faster", 40.0, 50.0)),
        "small": (record("c", tg=(1030.0, 10.0)), ("within spread", 40.0, 3.0)),
        "slower": (record("d", tg=(500.0, 10.0)), ("slower", 40.0, -50.0)),
        # bands of +-600 and +-20: threshold 2 x (300 + 10) = 620 > 500
        "noisy": (record("e", tg=(500.0, 300.0)), ("within spread", 620.0, -50.0)),
    }
    for name, (run, expected) in cases.items():
        got = verdicts(history.compare([a, run], run["id"], "a"))
        assert got["tg16"] == pytest.approx(expected), name
        assert got["pp32"] == ("within spread", 40.0, 0.0), name


def test_compare_needs_one_percent_when_runs_show_no_spread() -> None:
    a = record("a", tg=(1000.0, 0.0), pp=(1000.0, 0.0))
    # sd 0 on both sides: the threshold is 1% of the earlier mean, 10 tokens/s
    assert verdicts(history.compare([a, record("b", tg=(1005.0, 0.0), pp=(1000.0, 0.0))]))[
        "tg16"] == pytest.approx(("within spread", 10.0, 0.5))
    assert verdicts(history.compare([a, record("c", tg=(1020.0, 0.0), pp=(1000.0, 0.0))]))[
        "tg16"] == pytest.approx(("faster", 10.0, 2.0))


def test_compare_default_baseline_environment_and_rows() -> None:
    first = record("20250301T100000Z-aaaa", tg=(100.0, 1.0), llama="0.3.35")
    other = record("20250301T110000Z-bbbb", tg=(100.0, 1.0), threads=2)
    latest = record("20250301T120000Z-cccc", tg=(90.0, 1.0), reps=3,
                    started_at="2025-03-01T12:00:00Z")
    runs = [first, other, latest]
    cmp = history.compare(runs)
    # The latest run against the last earlier run with the same model and settings; a different
    # number of repetitions still compares.
    assert (cmp.run, cmp.against) == (latest["id"], first["id"])
    assert cmp.run_started_at == "2025-03-01T12:00:00Z" and cmp.unmatched == ()
    assert cmp.environment == (history.EnvChange("llama.llama_cpp_python", "0.3.35", "0.3.36"),)
    assert cmp.slower == (cmp.changes[1],) and cmp.changes[1].verdict == "slower"

    row = cmp.rows()[1]
    assert [f.name for f in dataclasses.fields(row)] == [
        "run", "against", "model", "test", "settings", "tokens_per_s", "sd",
        "against_tokens_per_s", "against_sd", "delta_pct", "threshold", "verdict",
        "joules_per_token", "against_joules_per_token"]
    assert dataclasses.astuple(row) == pytest.approx((
        latest["id"], first["id"], "tiny", "tg16", "t=1 ngl=0 b=2048 ub=512", 90.0, 1.0, 100.0,
        1.0, -10.0, 4.0, "slower", 0.05, 0.05))

    unrelated = history.compare(runs, "-1", "20250301T11")
    assert unrelated.changes == () and unrelated.rows() == ()
    assert unrelated.unmatched == ("tiny t=1 ngl=0 b=2048 ub=512",)


def test_compare_and_find_errors() -> None:
    a, b = record("20250301-aa", tg=(1.0, 0.0)), record("20250301-ab", tg=(1.0, 0.0))
    with pytest.raises(NotFoundError, match="no benchmark runs"):
        history.compare([])
    with pytest.raises(NotFoundError, match="same model and settings"):
        history.compare([a, record("x", tg=(1.0, 0.0), sha="bb" * 32)])
    with pytest.raises(UsageError, match="compared with itself"):
        history.compare([a, b], "-1", "-1")
    with pytest.raises(UsageError, match="matches 2 runs"):
        history.find([a, b], "20250301-a")
    with pytest.raises(NotFoundError, match="only 2 recorded runs"):
        history.find([a, b], "-3")
    with pytest.raises(NotFoundError, match="no recorded run 'z'"):
        history.find([a, b], "z")
    assert history.find([a, b], "20250301-ab") is b and history.find([a, b], "-2") is a


def test_settings_label() -> None:
    s = {"threads": 4, "n_gpu_layers": -1, "batch": 512, "ubatch": 256, "flash_attn": True,
         "repack": False}
    assert history.settings_label(s) == "t=4 ngl=-1 b=512 ub=256 fa no-repack"


def test_history_file_round_trip_and_damage(tmp_path: Path) -> None:
    home = Home(tmp_path)
    assert history.load(home) == [] and history.summaries([]) == []
    for rec in (record("a", tg=(1.0, 0.0)), record("b", tg=(1.0, 0.0), llama="0.4.0")):
        history.append(home, rec)
    runs = history.load(home)
    assert [r["id"] for r in runs] == ["a", "b"]
    (s,) = history.summaries(runs[1:])
    assert s == history.RunSummary(id="b", started_at="2025-03-01T10:00:00Z", models=("tiny",),
                                   results=1, fingerprint="fp-0.4.0")
    assert s.row() == history.SummaryRow(id="b", started_at="2025-03-01T10:00:00Z",
                                         models="tiny", results=1, environment="fp-0.4.0")

    path = history.history_path(home)
    with path.open("a") as f:
        f.write("\n" + json.dumps({"schema": "other/1"}) + "\n")
    with pytest.raises(ConfigError, match="line 4 is not a sovctl bench record"):
        history.load(home)
    path.write_text(path.read_text().replace('{"schema": "other/1"}', "{not json"))
    with pytest.raises(ConfigError, match="line 4 is not valid JSON"):
        history.load(home)


# -- named rows ----------------------------------------------------------------------------------


def _gpu(index: int, util: float | None, power: float | None, temp: float | None,
         throttle: tuple[str, ...]) -> Any:
    from sovctl.bench.telemetry import GpuPhase

    return GpuPhase(index=index, util_mean_pct=util, util_max_pct=util,
                    memory_used_max_bytes=None, power_mean_w=power, power_max_w=power,
                    energy_j=None, energy_method="unavailable", sm_clock_mean_mhz=None,
                    mem_clock_mean_mhz=None, temperature_max_c=temp, throttle_reasons=throttle)


def test_phase_rows_name_every_figure_and_combine_gpus() -> None:
    from sovctl.bench import micro, roofline, runner
    from sovctl.bench.telemetry import PhaseTelemetry

    settings = micro.MicroSettings(n_prompt=32, n_gen=16, reps=2, threads=4, n_gpu_layers=-1,
                                   batch=2048, ubatch=512, flash_attn=True, repack=False)
    gpus = (_gpu(0, 90.0, 250.0, 60.0, ("sw_power_cap",)),
            _gpu(1, 70.0, 150.0, 72.0, ("hw_slowdown", "sw_power_cap")),
            _gpu(2, None, None, None, ()))
    tel = PhaseTelemetry(source="nvml", seconds=2.0, samples=21, process_cpu_pct=99.0,
                         system_cpu_pct=30.0, rss_max_bytes=1 << 30, gpus=gpus, energy_j=800.0,
                         energy_method="nvml-energy-counter", energy_estimated=False,
                         energy_scope="gpu")

    def phase(test: str, tokens: int, prompt: bool) -> runner.PhaseResult:
        return runner.PhaseResult(
            test=test, tokens=tokens, reps=2, tps_mean=100.0, tps_sd=1.5,
            samples_tps=(98.5, 101.5), telemetry=tel,
            costs=costs.derive(100.0, 0.36, False, CFG, prompt))

    pp_phase, tg_phase = phase("pp32", 32, True), phase("tg16", 16, False)
    model = runner.ModelInfo(name="tiny", sha256="ab" * 32, file_bytes=1_100_000_000,
                             weights_bytes=1_000_000_000, parameters=1_500_000_000, layers=24,
                             description="llama 1B Q4_1", architecture="llama",
                             quantization="Q4_1")
    peak = roofline.Bandwidth(100e9, roofline.SOURCE_CONFIG, "bench.memory_bandwidth_gbs")
    result = runner.Result(model=model, settings=settings, on_gpu=True, pp=pp_phase,
                           tg=tg_phase, roofline=roofline.roofline(1_000_000_000, 100.0, peak))
    pp, tg = (runner.PhaseRow.of("run-1", result, p) for p in (pp_phase, tg_phase))

    assert dataclasses.asdict(tg) == {
        "run_id": "run-1", "model": "tiny", "sha256": "ab" * 32,
        "weights_bytes": 1_000_000_000, "parameters": 1_500_000_000, "backend": "GPU",
        "threads": 4, "n_gpu_layers": -1, "batch": 2048, "ubatch": 512, "flash_attn": True,
        "repack": False, "test": "tg16", "tokens": 16, "reps": 2, "tokens_per_s": 100.0,
        "tokens_per_s_sd": 1.5, "joules_per_token": 0.36,
        "tokens_per_joule": pytest.approx(2.77778, rel=1e-5),
        "wh_per_mtok": pytest.approx(100.0), "electricity_per_mtok": pytest.approx(0.03),
        "hardware_per_mtok": pytest.approx(10.0), "local_per_mtok": pytest.approx(10.03),
        "cloud_per_mtok": 8.0, "currency": "EUR", "energy_estimated": False,
        "energy_method": "nvml-energy-counter", "energy_scope": "gpu",
        "process_cpu_pct": 99.0, "rss_max_bytes": 1 << 30,
        # GPU 2 reported nothing: mean of 90 and 70, sum of 250 and 150, the hotter 72
        "gpu_util_mean_pct": 80.0, "gpu_power_mean_w": 400.0, "gpu_temp_max_c": 72.0,
        "throttle_reasons": "hw_slowdown;sw_power_cap",
        "roofline_fraction": pytest.approx(1.0),  # 1 GB x 100/s = 100 GB/s of 100
        "peak_bandwidth_gbs": pytest.approx(100.0), "peak_bandwidth_source": "config",
    }
    # The roofline is about generation: the pp row leaves it empty.
    assert (pp.test, pp.cloud_per_mtok, pp.roofline_fraction, pp.peak_bandwidth_gbs,
            pp.peak_bandwidth_source) == ("pp32", 2.0, None, None, None)

    cpu_phase = dataclasses.replace(tg_phase, telemetry=dataclasses.replace(tel, gpus=()))
    cpu_only = dataclasses.replace(result, on_gpu=False, pp=None, tg=cpu_phase)
    row = runner.PhaseRow.of("run-2", cpu_only, cpu_phase)
    assert (row.backend, row.gpu_util_mean_pct, row.gpu_power_mean_w, row.gpu_temp_max_c,
            row.throttle_reasons) == ("CPU", None, None, None, "")


def test_level_rows_in_milliseconds() -> None:
    from sovctl.bench import load

    ttft = stats.Summary(n=4, mean=0.1, median=0.09, p95=0.2, p99=0.25, max=0.3)
    lv = load.LevelResult(
        concurrency=4, requests=8, completed=7, errors=1, error_samples=("HTTP 500: boom",),
        wall_s=2.0, requests_per_s=3.5, output_tokens=700, output_tokens_per_s=350.0,
        prompt_tokens_reported=None, tokens_counted_from="usage", ttft=ttft, itl=None,
        e2e=ttft)
    row = load.LevelRow.of("http://h/v1", "m", lv)
    assert dataclasses.asdict(row) == pytest.approx({
        "url": "http://h/v1", "model": "m", "concurrency": 4, "requests": 8, "completed": 7,
        "errors": 1, "wall_s": 2.0, "requests_per_s": 3.5, "output_tokens": 700,
        "output_tokens_per_s": 350.0, "tokens_counted_from": "usage",
        "ttft_mean_ms": 100.0, "ttft_median_ms": 90.0, "ttft_p95_ms": 200.0,
        "ttft_p99_ms": 250.0, "itl_mean_ms": None, "itl_median_ms": None, "itl_p95_ms": None,
        "itl_p99_ms": None, "e2e_mean_ms": 100.0, "e2e_median_ms": 90.0, "e2e_p95_ms": 200.0,
        "e2e_p99_ms": 250.0})


# -- the CSV and Markdown writers ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Row:
    name: str
    ratio: float | None
    ok: bool
    count: int


def test_csv_and_markdown_from_named_rows(capsys: pytest.CaptureFixture[str]) -> None:
    from sovctl.cli import _output

    rows = [_Row("a|b", 1 / 3, True, 3), _Row('say "hi", then', None, False, 0)]
    _output.write_rows("csv", _Row, rows)
    assert capsys.readouterr().out == (
        "name,ratio,ok,count\n"
        "a|b,0.333333,true,3\n"
        '"say ""hi"", then",,false,0\n')
    _output.write_rows("md", _Row, rows)
    assert capsys.readouterr().out == (
        "| name | ratio | ok | count |\n"
        "|---|---|---|---|\n"
        "| a\\|b | 0.333333 | true | 3 |\n"
        '| say "hi", then |  | false | 0 |\n')
    _output.write_rows("csv", _Row, [])
    assert capsys.readouterr().out == "name,ratio,ok,count\n"
    with pytest.raises(ValueError, match="not 'table'"):
        _output.write_rows("table", _Row, rows)


def test_output_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    from sovctl.cli import _common, _output

    monkeypatch.setattr(_common.STATE, "json", False)
    assert [_output.choose(f) for f in ("table", "csv", "md")] == ["table", "csv", "md"]
    assert _common.STATE.json is False
    assert _output.choose("json") == "json" and _common.STATE.json is True
    with pytest.raises(UsageError, match="-o/--output must be one of table, json, csv, md"):
        _output.choose("xml")


# -- the host ------------------------------------------------------------------------------------


def test_cpu_model_from_cpuinfo(tmp_path: Path) -> None:
    from sovctl.hostinfo import cpu_model

    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\n"
                   "model name\t: Intel(R) Xeon(R) Platinum 8488C\nflags\t\t: fpu\n\n"
                   "processor\t: 1\nmodel name\t: Intel(R) Xeon(R) Platinum 8488C\n")
    assert cpu_model(x86) == "Intel(R) Xeon(R) Platinum 8488C"
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nBogoMIPS\t: 50.00\nCPU implementer\t: 0x41\n")
    fallback = platform.processor() or platform.machine()
    assert fallback and cpu_model(arm) == fallback
    assert cpu_model(tmp_path / "missing") == fallback


def test_bench_and_audit_name_the_same_cpu() -> None:
    from sovctl.audit.report import host_fingerprint
    from sovctl.bench import fingerprint
    from sovctl.hostinfo import cpu_model

    name = cpu_model()
    assert name and host_fingerprint()["cpu"] == name
    assert fingerprint.collect(None).cpu_model == name
