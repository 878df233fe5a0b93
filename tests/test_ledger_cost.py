"""Pure units of exception routing, the ledger and `sovctl cost`: break-even math against
hand-computed cases, the ledger's store and report, stream usage, provider config, the routing
table, the gateway's frontier policy and the audit's separation of routed attempts. No stack,
no network: the one HTTP exchange (the 502 case) targets a closed loopback port."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from sovctl import config
from sovctl.bench import costs
from sovctl.errors import ConfigError, UsageError
from sovctl.gateway.accounting import StreamTally, ask_usage
from sovctl.gateway.frontier import Frontier, redact
from sovctl.home import Home
from sovctl.ledger import cost as ledger_cost
from sovctl.ledger import report as ledger_report
from sovctl.ledger import store
from sovctl.ledger.figures import Amount
from sovctl.prices import Price
from sovctl.runtime.documents import PROVIDER, Limits, Provider, Route, RoutesTable

DAY = 86400.0


# -- break-even, by hand ------------------------------------------------------------------------

def inputs(**over: float) -> costs.BreakEvenInputs:
    base = {"hardware_price": 2000.0, "lifetime_years": 3.0, "watts": 300.0,
            "tokens_per_s": 100.0, "tariff": 0.15, "daily_tokens": 3e6, "cloud_per_mtok": 10.0}
    return costs.BreakEvenInputs(**{**base, **over})


HW_DAY = 2000 / (3 * 365.25)  # 1.825234 a day


def test_break_even_owning_wins() -> None:
    b = costs.break_even(inputs())
    # 300 W / 100 tok/s = 3 J/token = 3 MJ/Mtok = 0.8333 kWh, at 0.15 a kWh.
    assert b.electricity_per_mtok == pytest.approx(0.125)
    assert b.hardware_per_day == pytest.approx(HW_DAY)
    # Each token saves 10 - 0.125 = 9.875 a million once the hardware is paid for.
    assert b.break_even_daily_tokens == pytest.approx(HW_DAY / 9.875 * 1e6)  # 184,834
    assert b.months_to_break_even == pytest.approx(2000 / (3 * 9.875) / (365.25 / 12))
    assert b.local_per_mtok == pytest.approx(0.125 + HW_DAY / 3)
    assert b.local_per_day == pytest.approx(HW_DAY + 3 * 0.125)
    assert b.cloud_per_day == pytest.approx(30.0)
    assert b.capacity_daily_tokens == 8_640_000
    assert b.owning_wins
    v = costs.verdict(inputs(), b, "EUR")
    assert v.startswith("own: at 3M tokens a day") and "2.2 months" in v and "EUR" in v


def test_break_even_small_volume_stays_in_the_cloud() -> None:
    b = costs.break_even(inputs(daily_tokens=100_000))
    assert not b.owning_wins and b.months_to_break_even == pytest.approx(
        2000 / (0.1 * 9.875) / (365.25 / 12))
    v = costs.verdict(inputs(daily_tokens=100_000), b, "USD")
    assert v.startswith("stay in the cloud: at 100k tokens a day owning costs")
    assert "owning wins above 185k tokens a day" in v


def test_break_even_zero_volume_never_divides_by_zero() -> None:
    b = costs.break_even(inputs(daily_tokens=0))
    assert b.local_per_mtok is None and b.months_to_break_even is None
    assert b.cloud_per_day == 0 and b.local_per_day == pytest.approx(HW_DAY)
    assert not b.owning_wins
    assert costs.verdict(inputs(daily_tokens=0), b, "USD").startswith(
        "stay in the cloud: there is no daily volume")
    free = costs.break_even(inputs(hardware_price=0, daily_tokens=0, watts=0))
    assert free.electricity_per_mtok == 0 and free.break_even_daily_tokens == 0


def test_break_even_when_electricity_costs_more_than_the_cloud() -> None:
    i = inputs(cloud_per_mtok=0.1)  # below the 0.125 of electricity
    b = costs.break_even(i)
    assert b.break_even_daily_tokens is None and b.months_to_break_even is None
    assert costs.verdict(i, b, "USD").startswith("stay in the cloud: electricity alone")


def test_break_even_beyond_one_box_and_bursty() -> None:
    slow = inputs(tokens_per_s=1, watts=3, hardware_price=20000)  # 86,400 tokens a day at most
    b = costs.break_even(slow)
    assert b.break_even_daily_tokens is not None and b.break_even_daily_tokens > 86_400
    assert not b.owning_wins
    assert "more than this box makes" in costs.verdict(slow, b, "USD")
    steady = costs.break_even(inputs())
    bursty = costs.verdict(inputs(), steady, "USD", costs.Traffic(active_days=3, days=30))
    assert bursty.startswith("stay in the cloud: the volume is bursty (requests on 3 of 30")
    assert costs.verdict(inputs(), steady, "USD", costs.Traffic(3, 4)).startswith("own")


def test_break_even_refuses_nonsense() -> None:
    with pytest.raises(UsageError):
        costs.break_even(inputs(tokens_per_s=0))
    with pytest.raises(UsageError):
        costs.break_even(inputs(watts=-1))


# -- the latest bench, priced ------------------------------------------------------------------

def bench_record(run_id: str, sha: str, name: str = "tiny", pp: tuple[float, float] = (1000, .1),
                 tg: tuple[float, float] = (100, 1.0)) -> dict[str, Any]:
    def phase(tps: float, jpt: float) -> dict[str, Any]:
        return {"tps_mean": tps, "costs": {"joules_per_token": jpt, "estimated": True}}

    return {"schema": "sovctl-bench/1", "id": run_id, "results": [
        {"model": {"name": name, "sha256": sha}, "pp": phase(*pp), "tg": phase(*tg)}]}


def cost_cfg(**over: float) -> config.CostSettings:
    base: dict[str, Any] = {"currency": "USD", "electricity_per_kwh": 0.15, "hardware_price": 0.0,
                            "hardware_lifetime_years": 3.0, "hardware_utilisation": 0.5,
                            "cloud_price_per_mtok": 10.0, "cloud_input_price_per_mtok": 2.5}
    return config.CostSettings(**{**base, **over})


def test_local_price_from_the_latest_bench_of_that_model() -> None:
    runs = [bench_record("old", "a" * 64, tg=(50, 2.0)), bench_record("new", "a" * 64),
            bench_record("other", "b" * 64, name="big")]
    found = costs.latest_bench(runs, "a" * 64)
    assert found is not None and found.run_id == "new"
    assert costs.latest_bench(runs) is not None and costs.latest_bench(runs).run_id == "other"
    assert costs.latest_bench(runs, "c" * 64) is None
    price = costs.local_price(found, cost_cfg())
    # 1 J/token -> 1e6 J/Mtok = 0.2778 kWh x 0.15; 0.1 J/token for prompt tokens.
    assert price.output_per_mtok == pytest.approx(1e6 / 3.6e6 * 0.15)
    assert price.input_per_mtok == pytest.approx(0.1e6 / 3.6e6 * 0.15)
    assert "bench new of tiny" in price.source and "estimated" in price.source
    hw = costs.local_price(found, cost_cfg(hardware_price=1000.0))
    busy = 3 * costs.SECONDS_PER_YEAR * 0.5
    assert hw.output_per_mtok == pytest.approx(1e6 / 3.6e6 * 0.15 + 1000 / busy / 100 * 1e6)
    assert Price(2.0, 4.0, "x").cost(1000, 500) == pytest.approx((2000 + 2000) / 1e6)


# -- the ledger's store and report ---------------------------------------------------------------

def put_rows(path: Path, rows: list[tuple[Any, ...]], max_rows: int = store.MAX_ROWS) -> None:
    """Writes records as the gateway does; one given without its sources is measured, one
    without its app the default app's."""
    w = store.Writer(path, max_rows)
    for r in rows:
        if len(r) == 9:
            r = (*r, "measured", None if r[8] is None else "measured")
        w.put(r if len(r) == 12 else (*r, store.DEFAULT_APP))
    w.close()


def test_writer_batches_and_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "ledger" / "ledger.sqlite3"
    now = time.time()
    put_rows(path, [
        (now - 10, "local", "tiny", "/v1/chat/completions", 200, 10, 5, 0.1, 0.001),
        (now - 9, "local", "tiny", "/v1/chat/completions", 200, 20, 5, 0.1, None),
        (now - 8, "acme", "frontier/acme/x", "/v1/chat/completions", 200, 10, 5, 0.3, 0.02),
        (now - 7, "acme", "frontier/acme/x", "/v1/chat/completions", 403, 0, 0, 0.0, 0.0),
        (now - 6, "-", "-", "/v1/chat/completions", 401, 0, 0, 0.0, 0.0),
        (now - 500 * DAY, "local", "tiny", "/v1/embeddings", 200, 1, 0, 0.1, 0.0),
    ])
    assert len(store.groups(path, 0, now)) == 5  # the old one among them, until a reopen
    groups = store.groups(path, now - DAY, now)
    # Grouped by route and model, and apart by source: the priced local request and the
    # unpriced one.
    assert {(g.route, g.cost_source, g.requests) for g in groups} == {
        ("local", "measured", 1), ("local", None, 1), ("acme", "measured", 2), ("-", "measured", 1)}
    priced, unpriced = (next(g for g in groups if g.route == "local" and g.priced is p)
                        for p in (True, False))
    assert (priced.tokens_in, priced.tokens_out, priced.cost) == (10, 5, pytest.approx(0.001))
    assert (unpriced.tokens_in, unpriced.tokens_out, unpriced.cost) == (20, 5, 0)
    assert store.spent_since(path, now - 60) == {"acme": pytest.approx(0.02)}
    assert [(r.route, r.status) for r in store.routed(path)] == [("acme", 200), ("acme", 403)]
    # Another writer opening the file drops what is older than the retention.
    put_rows(path, [])
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM requests").fetchone()[0] == 5
    assert store.groups(tmp_path / "none.sqlite3", 0, now) == []


def test_writer_put_never_blocks() -> None:
    w = store.Writer(Path("/proc/no-ledger-here/ledger.sqlite3"))  # cannot be created
    t0 = time.perf_counter()
    for _ in range(10000):
        w.put((0.0, "local", "m", "/v1/embeddings", 200, 1, 0, 0.0, 0.0, "measured", "measured",
               "default"))
    assert time.perf_counter() - t0 < 0.5
    w.close()


def test_a_ledger_of_schema_1_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    with sqlite3.connect(path) as conn:  # as the previous version wrote it
        conn.execute("CREATE TABLE requests (time REAL NOT NULL, route TEXT NOT NULL, model TEXT "
                     "NOT NULL, endpoint TEXT NOT NULL, status INTEGER NOT NULL, tokens_in "
                     "INTEGER NOT NULL, tokens_out INTEGER NOT NULL, latency_s REAL NOT NULL, "
                     "cost REAL)")
        conn.execute("INSERT INTO requests VALUES (?, 'acme', 'frontier/acme/m', "
                     "'/v1/chat/completions', 200, 10, 5, 0.1, 0.02)", (time.time() - 5,))
        conn.execute("PRAGMA user_version=1")
    conn.close()
    # A reader migrates it (as the gateway would); its records count as measured, as they
    # were presented then.
    [group] = store.groups(path, 0, time.time())
    assert (group.tokens_source, group.cost_source, group.cost) == (
        "measured", "measured", pytest.approx(0.02))
    put_rows(path, [(time.time(), "acme", "frontier/acme/m", "/v1/chat/completions", 499, 7, 3,
                     0.1, 0.01, "estimated", "estimated")])
    assert {g.tokens_source for g in store.groups(path, 0, time.time())} == {
        "measured", "estimated"}


def test_text_columns_are_cut(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    put_rows(path, [(time.time(), "r" * 100, "m" * 10_000, "/" + "e" * 1000, 404, 0, 0, 0.0,
                     0.0)])
    with sqlite3.connect(path) as conn:
        route, model, endpoint = conn.execute(
            "SELECT route, model, endpoint FROM requests").fetchone()
    assert (len(route), len(model), len(endpoint)) == (64, 256, 64)


def test_the_oldest_records_fold_into_daily_totals(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    now = time.time()
    served = [(now - 2 * DAY + i, "acme", "frontier/acme/m", "/v1/chat/completions", 200, 10, 5,
               0.1, 0.02) for i in range(30)]
    refused = [(now - DAY + i, "acme", f"frontier/acme/x{i}", "/v1/chat/completions", 403, 0,
                0, 0.0, 0.0) for i in range(30)]
    estimated = [(now - 60 + i, "acme", "frontier/acme/m", "/v1/chat/completions", 499, 14, 3,
                  0.1, 0.01, "estimated", "estimated") for i in range(5)]
    put_rows(path, served + refused + estimated, max_rows=20)
    with sqlite3.connect(path) as conn:
        kept = conn.execute("SELECT count(*) FROM requests").fetchone()[0]
        names = {m for (m,) in conn.execute("SELECT model FROM daily")}
    assert kept == 20
    assert names == {"frontier/acme/m", "-"}  # refused names folded under "-"
    # The totals are those of every record, with their sources.
    groups = store.groups(path, 0, now + 1)
    assert sum(g.requests for g in groups) == 65
    assert sum(g.tokens_in for g in groups if g.tokens_source == "measured") == 300
    assert sum(g.tokens_in for g in groups if g.tokens_source == "estimated") == 70
    assert store.spent_since(path, now - 3 * DAY) == {"acme": pytest.approx(0.65)}
    # Another writer opening the file counts what is there: nothing more to fold.
    put_rows(path, [], max_rows=20)
    assert len(store.groups(path, 0, now + 1)) == len(groups)


def test_redact() -> None:
    assert redact("quoted key-of-ours-123 back", "key-of-ours-123") == "quoted [redacted] back"
    for secret in ("sk-proj-AbC123dEf456", "sk-ant-api03-xyz_ABC-987", "sk-****abcd",
                   "hf_aBcDeFgHiJkLmN", "Bearer abc.def", "bearer xyz",
                   "Zx8Qp2Lm9Rt4Vb6Nc1Kd7Hs3Jf5Gw0Ay"):
        assert redact(f"got {secret}, refused", None) == "got [redacted], refused", secret
    # Long runs that are not random, and short ones, stay.
    for kept in ("model gpt-4o-mini-2024-07-18 not found",
                 "internationalization_and_localization_module", "org-AbCd1234 limit",
                 "ab" * 20 + "12"):
        assert redact(kept, "x") == kept


def test_stream_tally_counts_text_for_an_estimate() -> None:
    t = StreamTally(keep_usage=True, count_text=True)
    t.feed(b'data: {"choices":[{"delta":{"role":"assistant"}}]}\n\n'
           b'data: {"choices":[{"delta":{"content":"Hello"}}]}\n\ndata: {"choi')
    t.feed(b'ces":[{"delta":{"tool_calls":[{"function":{"name":"f","arguments":"{}"}}]}}]}\n\n')
    assert (t.events, t.text_events, t.chars, t.usage) == (3, 2, 8, None)


def test_since_spans_and_dates() -> None:
    now = 1_700_000_000.0
    assert ledger_report.parse_since("7d", now) == now - 7 * DAY
    assert ledger_report.parse_since("24h", now) == now - DAY
    assert ledger_report.parse_since("2w", now) == now - 14 * DAY
    assert ledger_report.parse_since("2023-11-14", now) == 1_699_920_000.0
    with pytest.raises(UsageError):
        ledger_report.parse_since("last tuesday", now)


def settings_for(home: Home, toml: str = "") -> config.Settings:
    home.ensure()
    home.config_path.write_text(toml)
    return config.load(home)


def test_ledger_report_figures(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    settings = settings_for(home, "[cost]\ncloud_price_per_mtok = 8.0\n"
                                  "cloud_input_price_per_mtok = 2.0\n")
    now = time.time()
    put_rows(store.ledger_path(home), [
        (now - 3 * DAY, "local", "tiny", "/v1/chat/completions", 200, 600_000, 200_000, 1, 0.5),
        (now - 60, "local", "mini", "/v1/embeddings", 200, 100_000, 0, 0.1, None),
        (now - 50, "acme", "frontier/acme/x", "/v1/chat/completions", 200, 50_000, 50_000, 2,
         0.75),
        (now - 40, "-", "-", "/v1/chat/completions", 401, 0, 0, 0.0, 0.0),
    ])
    r = ledger_report.report(home, settings, since="7d", by="route", now=now)
    measured = "measured"
    assert r.requests == 4 and r.tokens == Amount(1_000_000, measured)
    assert r.local_tokens == Amount(900_000, measured)
    assert r.routed_tokens == Amount(100_000, measured)
    assert r.local_share == Amount(pytest.approx(0.9), measured)
    assert r.spend == {"acme": Amount(pytest.approx(0.75), measured)}
    assert r.local_cost == Amount(pytest.approx(0.5), measured)
    assert r.local_unpriced_tokens == Amount(100_000, measured)
    # (600k + 100k) prompt tokens at 2.0, 200k generated at 8.0, per million.
    assert r.local_at_cloud_price == Amount(pytest.approx(0.7 * 2.0 + 0.2 * 8.0), "configured")
    assert r.estimated == ledger_report.Estimates(0, 0)
    assert {row.key: row.requests for row in r.rows} == {"-": 1, "acme": 1, "local": 2}
    assert len(r.days) == 8 and sum(d.local_tokens.value or 0 for d in r.days) == 900_000
    by_model = ledger_report.report(home, settings, since="1d", by="model", now=now)
    assert [row.key for row in by_model.rows] == ["-", "frontier/acme/x", "mini"]
    with pytest.raises(UsageError):
        ledger_report.report(home, settings, by="week")


# -- `sovctl cost`'s inputs ----------------------------------------------------------------------

def test_cost_answers_with_defaults_and_no_history(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    a = ledger_cost.answer(home, settings_for(home), {})
    assert a.ledger is None and not a.bursty
    assert set(a.defaults) == {"hardware_price", "lifetime_years", "tariff", "watts",
                               "tokens_per_s", "daily_tokens", "cloud_per_mtok"}
    assert a.inputs["tokens_per_s"] == ledger_cost.Figure(
        ledger_cost.DEFAULT_TOKENS_PER_S, "defaulted", "built-in default; no bench run")
    assert a.inputs["watts"] == ledger_cost.Figure(
        65.0, "defaulted", "bench.cpu_watts (default); no bench run")
    assert a.inputs["daily_tokens"].value == 0
    assert a.result["local_per_mtok"] == ledger_cost.Figure(
        None, "defaulted", "from watts, tokens_per_s, tariff, hardware_price, lifetime_years, "
        "daily_tokens")
    assert {f.source for f in a.result.values()} == {"defaulted"}
    assert a.verdict.startswith("stay in the cloud: there is no daily volume")


def test_cost_from_bench_and_ledger(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    settings = settings_for(home, "[cost]\nhardware_price = 1000.0\nelectricity_per_kwh = 0.15\n")
    hist = home.root / "bench" / "history.jsonl"
    hist.parent.mkdir(parents=True)
    hist.write_text(json.dumps(bench_record("r1", "a" * 64)) + "\n")
    now = time.time()
    # 3M prompt and 1M generated tokens over the last two days.
    put_rows(store.ledger_path(home), [
        (now - DAY, "local", "tiny", "/v1/chat/completions", 200, 2_000_000, 500_000, 1, 0.0),
        (now - 5, "local", "tiny", "/v1/chat/completions", 200, 1_000_000, 500_000, 1, 0.0),
    ])
    a = ledger_cost.answer(home, settings, {}, now=now)
    assert a.ledger is not None and a.ledger.days == 2 and a.ledger.active_days == 2
    assert a.inputs["daily_tokens"].value == pytest.approx(2_000_000)
    assert a.inputs["hardware_price"] == ledger_cost.Figure(1000.0, "configured",
                                                           "cost.hardware_price (config)")
    assert a.inputs["daily_tokens"].source == "measured"
    # Prompt share 0.75: seconds a token 0.75/1000 + 0.25/100, joules 0.75 x 0.1 + 0.25 x 1.
    seconds, joules = 0.75 / 1000 + 0.25 / 100, 0.75 * 0.1 + 0.25 * 1.0
    assert a.inputs["tokens_per_s"].value == pytest.approx(1 / seconds)
    assert a.inputs["watts"].value == pytest.approx(joules / seconds)
    assert a.inputs["cloud_per_mtok"].value == pytest.approx(0.75 * 2.5 + 0.25 * 10.0)
    # The bench's energy was estimated (no power meter): so are the power and what uses it.
    assert a.inputs["watts"].source == "estimated" and a.inputs["tokens_per_s"].source == \
        "measured"
    assert "bench r1 of tiny, energy estimated" in a.inputs["watts"].basis
    assert a.result["electricity_per_mtok"] == ledger_cost.Figure(
        pytest.approx(joules * 1e6 / 3.6e6 * 0.15), "estimated", "from watts, tokens_per_s, tariff")
    # The lifetime is the built-in default: what rests on it says so.
    assert a.result["hardware_per_day"].source == "defaulted"
    flagged = ledger_cost.answer(home, settings, {"daily_tokens": 0.0, "cloud_per_mtok": 1.0},
                                 now=now)
    assert flagged.inputs["daily_tokens"].source == "flag"
    assert flagged.result["cloud_per_mtok"] == ledger_cost.Figure(1.0, "flag",
                                                                  "from cloud_per_mtok")
    assert flagged.result["local_per_mtok"].value is None


# -- stream usage --------------------------------------------------------------------------------

EVENTS = [b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n',
          b'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\n',
          b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}\n\n',
          b"data: [DONE]\n\n"]


@pytest.mark.parametrize("size", [1, 5, 64, 10_000])
@pytest.mark.parametrize("keep", [True, False])
def test_stream_tally_reads_usage_and_holds_it_back(size: int, keep: bool) -> None:
    stream = b"".join(EVENTS)
    t = StreamTally(keep)
    out = b"".join(t.feed(stream[i:i + size]) for i in range(0, len(stream), size)) + t.end()
    assert out == (stream if keep else b"".join(EVENTS[:2] + EVENTS[3:]))
    assert t.usage == (5, 2) and t.events == 3


def test_ask_usage_keeps_the_clients_options() -> None:
    payload: dict[str, Any] = {"stream": True}
    assert ask_usage(payload) is False
    assert payload["stream_options"] == {"include_usage": True}
    payload = {"stream_options": {"include_usage": True, "other": 1}}
    assert ask_usage(payload) is True and payload["stream_options"]["other"] == 1


# -- provider configuration and the routing table ------------------------------------------------

GOOD = ('[providers.acme]\nbase_url = "https://api.acme.example/v1"\n'
        'api_key_env = "ACME_KEY"\n'
        'models = { "gpt-4o-mini" = { input_per_mtok = 2.5, output_per_mtok = 10 } }\n')


def prices(p: config.ProviderSettings) -> dict[str, tuple[float, float]]:
    return {m: (price.input_per_mtok, price.output_per_mtok) for m, price in p.models.items()}


def test_providers_config(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    cfg = settings_for(home, GOOD + "daily_cap = 5\n")
    acme = cfg.providers["acme"]
    assert acme.base_url == "https://api.acme.example/v1"
    assert prices(acme) == {"gpt-4o-mini": (2.5, 10)}
    assert (acme.max_concurrent, acme.max_tokens) == (4, 4096)  # the defaults
    # The same as tables, one a model; a model's name as its provider spells it.
    tables = settings_for(home, GOOD.split("models =")[0] + "max_tokens = 512\n"
                          '[providers.acme.models."meta-llama/Llama-3-70b"]\n'
                          "input_per_mtok = 0.5\noutput_per_mtok = 0.75\n")
    assert prices(tables.providers["acme"]) == {"meta-llama/Llama-3-70b": (0.5, 0.75)}
    assert tables.providers["acme"].max_tokens == 512
    assert settings_for(home, "").providers == {}
    bad = {
        "ending in /v1": GOOD.replace("/v1", "/v2"),
        "http(s)": GOOD.replace("https://", "ftp://"),
        "clear text": GOOD.replace("https://", "http://"),
        "environment variable": GOOD.replace('"ACME_KEY"', '"sk-123 secret"'),
        "not negative": GOOD.replace("2.5", "-1"),
        "lacks api_key_env": GOOD.replace('api_key_env = "ACME_KEY"\n', ""),
        "lacks models": GOOD.split("models =")[0],
        "models is empty": GOOD.split("models =")[0] + "models = {}\n",
        "lacks output_per_mtok": GOOD.replace(", output_per_mtok = 10", ""),
        "printable characters, no spaces": GOOD.replace('"gpt-4o-mini"', '"gpt 4o"'),
        "not a model setting": GOOD.replace("output_per_mtok = 10", "output_per_mtok = 10, x = 1"),
        "not a provider setting": GOOD + 'api_key = "sk-123"\n',
        "not \"local\"": GOOD.replace("providers.acme", "providers.local"),
        "must be at least 1": GOOD + "max_concurrent = 0\n",
        "ledger.max_rows must be at least 1": "[ledger]\nmax_rows = 0\n",
    }
    for why, text in bad.items():
        with pytest.raises(ConfigError, match=re.escape(why)):
            settings_for(home, text)
    # One price for the whole provider (before models had a price each): how to move it.
    with pytest.raises(ConfigError, match="prices are per model now") as old:
        settings_for(home, GOOD + "input_per_mtok = 2.5\n")
    assert '[providers.acme.models."MODEL"]' in (old.value.hint or "")
    # Plain http is for a provider on this machine only.
    assert settings_for(home, GOOD.replace("https://api.acme.example", "http://127.0.0.1:9"))


def provider_route(name: str, url: str, cap: float | None = None) -> Route:
    return Route(model=f"frontier/{name}", role="chat", kind=PROVIDER, process="", upstream=url,
                 runtime="", parallel=0, key_file=None,
                 provider=Provider(name, f"{name.upper()}_KEY", cap,
                                   models={"m": Price(1000.0, 2000.0, "test")},
                                   max_concurrent=4, max_tokens=100))


def test_routes_table_round_trip_holds_no_key(tmp_path: Path) -> None:
    table = RoutesTable("127.0.0.1", 8088, False, "", Limits(4, 10.0, 1000), "state.json",
                        (provider_route("acme", "https://api.acme.example/v1", 5.0),),
                        ledger=str(tmp_path / "l.sqlite3"))
    path = tmp_path / "routes.json"
    table.write(path)
    assert RoutesTable.read(path) == table
    assert "ACME_KEY" in path.read_text() and "sk-" not in path.read_text()


# -- the gateway's frontier policy, without a provider --------------------------------------------

def serve(frontier: Frontier, model: str, headers: list[tuple[bytes, bytes]] | None = None,
          endpoint: str = "/v1/chat/completions", **fields: Any) -> Any:
    async def receive() -> dict[str, Any]:
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        raise AssertionError("a refused request sends nothing itself")

    async def go() -> Any:
        try:
            return await frontier.serve(endpoint, model, {"model": model, "messages": [],
                                                          **fields}, headers or [], receive, send)
        finally:
            await frontier.aclose()

    return asyncio.run(go())


def test_frontier_policy(tmp_path: Path) -> None:
    from sovctl.runtime.ports import free_port

    closed = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens: refused at once
    ledger = tmp_path / "ledger.sqlite3"
    put_rows(ledger, [(time.time() - 5, "capped", "frontier/capped/x", "/v1/chat/completions",
                       200, 1, 1, 1.0, 2.0)])
    routes = [provider_route("acme", closed), provider_route("capped", closed, cap=1.5)]
    env = {"ACME_KEY": "k1", "CAPPED_KEY": "k2"}

    def answer(model: str, env: dict[str, str] = env, **kw: Any) -> Any:
        return serve(Frontier(routes, str(ledger), env), model, **kw)

    private = answer("frontier/acme/m", headers=[(b"x-sovctl-private", b"1")])
    assert private.status == 403 and private.refusal.code == "private_request"
    assert answer("frontier/acme/m", headers=[(b"x-sovctl-private", b"0")]).status == 502
    capped = answer("frontier/capped/m")  # the ledger holds 2.0 of today's 1.5
    assert capped.status == 429 and capped.refusal.code == "daily_cap_reached"
    assert 0 < int(capped.refusal.headers["Retry-After"]) <= 86401
    assert answer("frontier/nobody/m").status == 404
    assert answer("frontier/acme/").status == 400
    assert answer("frontier/acme/m", endpoint="/v1/embeddings").status == 400
    unlisted = answer("frontier/acme/gpt-dearer")
    assert (unlisted.status, unlisted.refusal.code, unlisted.refusal.param) == (
        403, "model_not_allowed", "model")
    assert "allowed: frontier/acme/m " in unlisted.refusal.message
    above = answer("frontier/acme/m", max_tokens=101)
    assert (above.status, above.refusal.param) == (400, "max_tokens")
    nokey = answer("frontier/acme/m", env={})
    assert nokey.status == 503 and "$ACME_KEY" in nokey.refusal.message
    t0 = time.perf_counter()
    down = answer("frontier/acme/m")
    assert down.status == 502 and down.refusal.code == "provider_unreachable"
    assert time.perf_counter() - t0 < 2.0 and "127.0.0.1" in down.refusal.message


# -- the audit: routed attempts apart from egress -------------------------------------------------

def test_routed_attempts_are_listed_apart(tmp_path: Path) -> None:
    import dataclasses

    from sovctl.audit.checks import routed_apart
    from sovctl.runtime.plan import Plan

    ledger = tmp_path / "ledger.sqlite3"
    t = time.time()
    put_rows(ledger, [(t, "acme", "frontier/acme/m", "/v1/chat/completions", 502, 0, 0, 1.0,
                       0.0)])
    plan = dataclasses.replace(
        Plan("127.0.0.1", 1, (), (), "", "", "", "", False), ledger=str(ledger),
        frontier=(provider_route("acme", "https://api.acme.example/v1"),))
    attempts = [
        {"time": t + 0.1, "component": "gateway", "event": "socket.getaddrinfo",
         "target": "api.acme.example", "recorder": "audit hook"},
        {"time": t + 0.2, "component": "gateway", "event": "connect", "target": "127.0.0.53:53",
         "recorder": "strace", "lookup": True},
        {"time": t + 0.3, "component": "gateway", "event": "socket.connect",
         "target": "203.0.113.9:443", "recorder": "audit hook"},
        # Not the provider's: another port, another process, or outside the request's time.
        {"time": t + 0.4, "component": "gateway", "event": "socket.connect",
         "target": "203.0.113.9:8443", "recorder": "audit hook"},
        {"time": t + 0.4, "component": "tiny", "event": "connect", "target": "203.0.113.9:443",
         "recorder": "strace"},
        {"time": t + 30, "component": "gateway", "event": "socket.connect",
         "target": "203.0.113.9:443", "recorder": "audit hook"},
    ]
    routed, rest = routed_apart(plan, attempts)
    assert [a["target"] for a in routed] == ["api.acme.example", "127.0.0.53:53",
                                             "203.0.113.9:443"]
    assert all(a["provider"] == "acme" for a in routed)
    assert [a["target"] for a in rest] == ["203.0.113.9:8443", "203.0.113.9:443",
                                           "203.0.113.9:443"]
    no_providers = dataclasses.replace(plan, frontier=())
    assert routed_apart(no_providers, attempts) == ([], attempts)
