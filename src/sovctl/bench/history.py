"""The benchmark history: one JSON line per run under the home, and comparing two runs.

A change counts as real only when it lies beyond the runs' own spread: each phase's mean
+- 2 standard deviations of its repetitions forms a band, and a change is flagged when the two
bands do not overlap (|delta| > 2 x (sd_run + sd_against)) and it exceeds 1% of the earlier
mean, so runs whose repetitions happened to agree exactly are not flagged for noise.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sovctl.bench.fingerprint import flatten
from sovctl.errors import ConfigError, NotFoundError, UsageError
from sovctl.home import Home

RECORD_SCHEMA = "sovctl-bench/1"
SPREAD_SIGMAS = 2.0
MIN_RELATIVE_CHANGE = 0.01


def history_path(home: Home) -> Path:
    return home.root / "bench" / "history.jsonl"


def append(home: Home, record: Mapping[str, Any]) -> Path:
    """Add one run as one line; a single O_APPEND write, so concurrent runs never interleave."""
    path = history_path(home)
    home.ensure(path.parent)
    line = (json.dumps(record, separators=(",", ":"), sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def load(home: Home) -> list[dict[str, Any]]:
    """Every recorded run, oldest first."""
    path = history_path(home)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    runs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} line {n} is not valid JSON: {e.msg}",
                              hint="delete or repair that line; the others are intact") from e
        if not isinstance(rec, dict) or rec.get("schema") != RECORD_SCHEMA:
            raise ConfigError(f"{path} line {n} is not a sovctl bench record",
                              hint="delete or repair that line")
        runs.append(rec)
    return runs


def find(runs: list[dict[str, Any]], ref: str) -> dict[str, Any]:
    """A run by id, unique id prefix, or position: -1 is the latest, -2 the one before."""
    if not runs:
        raise NotFoundError("no benchmark runs recorded yet", hint="run 'sovctl bench NAME'")
    if ref.lstrip("-").isdigit() and ref.startswith("-"):
        i = int(ref)
        if -len(runs) <= i <= -1:
            return runs[i]
        raise NotFoundError(f"there are only {len(runs)} recorded runs, no {ref}")
    hits = [r for r in runs if r["id"].startswith(ref)]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise NotFoundError(f"no recorded run {ref!r}",
                            hint="list them with 'sovctl bench history'")
    raise UsageError(f"{ref!r} matches {len(hits)} runs", hint="give more of the run id")


def result_key(result: Mapping[str, Any]) -> str:
    """Same model bytes and the same settings (repetitions aside) make results comparable."""
    settings = {k: v for k, v in result["settings"].items() if k != "reps"}
    return json.dumps([result["model"]["sha256"], settings], sort_keys=True)


@dataclass(frozen=True)
class PhaseChange:
    model: str
    test: str
    settings: Mapping[str, Any]
    mean: float
    sd: float
    against_mean: float
    against_sd: float
    delta_pct: float
    threshold: float  # tokens/s a change must exceed to count
    verdict: str  # "faster" | "slower" | "within spread"
    joules_per_token: float | None
    against_joules_per_token: float | None


@dataclass(frozen=True)
class EnvChange:
    key: str
    against: Any
    run: Any


@dataclass(frozen=True)
class Comparison:
    run: str
    against: str
    run_started_at: str
    against_started_at: str
    changes: tuple[PhaseChange, ...]
    unmatched: tuple[str, ...]  # results in the run with no counterpart in the other
    environment: tuple[EnvChange, ...]

    @property
    def slower(self) -> tuple[PhaseChange, ...]:
        return tuple(c for c in self.changes if c.verdict == "slower")

    def rows(self) -> tuple[ChangeRow, ...]:
        """The comparison flattened for CSV and Markdown: one row per phase compared."""
        return tuple(
            ChangeRow(
                run=self.run, against=self.against, model=x.model, test=x.test,
                settings=settings_label(x.settings), tokens_per_s=x.mean, sd=x.sd,
                against_tokens_per_s=x.against_mean, against_sd=x.against_sd,
                delta_pct=x.delta_pct, threshold=x.threshold, verdict=x.verdict,
                joules_per_token=x.joules_per_token,
                against_joules_per_token=x.against_joules_per_token,
            )
            for x in self.changes
        )


@dataclass(frozen=True)
class ChangeRow:
    """One PhaseChange, flat; the field names are the CSV columns."""

    run: str
    against: str
    model: str
    test: str
    settings: str
    tokens_per_s: float
    sd: float
    against_tokens_per_s: float
    against_sd: float
    delta_pct: float
    threshold: float
    verdict: str
    joules_per_token: float | None
    against_joules_per_token: float | None


def _verdict(m: float, sd: float, m0: float, sd0: float) -> tuple[str, float]:
    threshold = max(SPREAD_SIGMAS * (sd + sd0), MIN_RELATIVE_CHANGE * m0)
    if abs(m - m0) <= threshold:
        return "within spread", threshold
    return ("faster" if m > m0 else "slower"), threshold


def compare(runs: list[dict[str, Any]], ref: str | None = None,
            against: str | None = None) -> Comparison:
    run = find(runs, ref or "-1")
    keys = {result_key(r) for r in run["results"]}
    if against is not None:
        base = find(runs, against)
    else:
        earlier = runs[: runs.index(run)]
        matches = [r for r in earlier if keys & {result_key(x) for x in r["results"]}]
        if not matches:
            raise NotFoundError(
                f"no run before {run['id']} has the same model and settings",
                hint="run the same 'sovctl bench' again, or name a run with --against",
            )
        base = matches[-1]
    if base["id"] == run["id"]:
        raise UsageError("a run compared with itself shows nothing", hint="name another run")
    by_key = {result_key(r): r for r in base["results"]}
    changes: list[PhaseChange] = []
    unmatched: list[str] = []
    for r in run["results"]:
        b = by_key.get(result_key(r))
        label = f"{r['model']['name']} {settings_label(r['settings'])}"
        if b is None:
            unmatched.append(label)
            continue
        for phase in ("pp", "tg"):
            now, old = r.get(phase), b.get(phase)
            if not now or not old:
                continue
            verdict, threshold = _verdict(now["tps_mean"], now["tps_sd"],
                                          old["tps_mean"], old["tps_sd"])
            changes.append(PhaseChange(
                model=r["model"]["name"],
                test=now["test"],
                settings={k: v for k, v in r["settings"].items() if k != "reps"},
                mean=now["tps_mean"],
                sd=now["tps_sd"],
                against_mean=old["tps_mean"],
                against_sd=old["tps_sd"],
                delta_pct=100.0 * (now["tps_mean"] - old["tps_mean"]) / old["tps_mean"],
                threshold=threshold,
                verdict=verdict,
                joules_per_token=now["costs"]["joules_per_token"],
                against_joules_per_token=old["costs"]["joules_per_token"],
            ))
    env_now, env_old = flatten(run["fingerprint"]), flatten(base["fingerprint"])
    env = tuple(
        EnvChange(key=k, against=env_old.get(k), run=env_now.get(k))
        for k in sorted(set(env_now) | set(env_old))
        if env_now.get(k) != env_old.get(k)
    )
    return Comparison(
        run=run["id"], against=base["id"], run_started_at=run["started_at"],
        against_started_at=base["started_at"], changes=tuple(changes),
        unmatched=tuple(unmatched), environment=env,
    )


def settings_label(s: Mapping[str, Any]) -> str:
    """The settings that tell results apart, as one short line: t=4 ngl=0 b=2048 ub=512."""
    return (f"t={s['threads']} ngl={s['n_gpu_layers']} b={s['batch']} ub={s['ubatch']}"
            f"{' fa' if s['flash_attn'] else ''}{'' if s['repack'] else ' no-repack'}")


@dataclass(frozen=True)
class RunSummary:
    id: str
    started_at: str
    models: tuple[str, ...]
    results: int
    fingerprint: str

    def row(self) -> SummaryRow:
        return SummaryRow(id=self.id, started_at=self.started_at, models=" ".join(self.models),
                          results=self.results, environment=self.fingerprint)


@dataclass(frozen=True)
class SummaryRow:
    """One RunSummary, flat; the field names are the CSV columns."""

    id: str
    started_at: str
    models: str  # space-separated
    results: int
    environment: str  # the fingerprint digest


def summaries(runs: list[dict[str, Any]]) -> list[RunSummary]:
    return [
        RunSummary(
            id=r["id"], started_at=r["started_at"],
            models=tuple(dict.fromkeys(x["model"]["name"] for x in r["results"])),
            results=len(r["results"]), fingerprint=r.get("fingerprint_digest", ""),
        )
        for r in runs
    ]
