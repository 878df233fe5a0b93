"""Counters and histograms for /metrics, in Prometheus text format."""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from sovctl.apikey import OTHER_APP
from sovctl.runtime.documents import ProcessState, Status

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# Apps /metrics names one by one; the rest are summed as "other". The apps a request can be
# booked under are already bounded (configured, keyed, or "default"), but a thousand keys
# would still make a thousand series of each app metric for whatever scrapes them.
MAX_APP_LABELS = 100


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    inner = ",".join(f'{k}="{v.replace(chr(92), "/").replace(chr(34), chr(39))}"'
                     for k, v in pairs)
    return "{" + inner + "}" if inner else ""


class Histogram:
    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, value)] += 1
        self.sum += value
        self.n += 1


class Metrics:
    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], int] = defaultdict(int)
        self.tokens: dict[tuple[str, str], int] = defaultdict(int)
        self.latency: dict[tuple[str, str], Histogram] = defaultdict(Histogram)
        self.ttft: dict[str, Histogram] = defaultdict(Histogram)
        # Requests and connections turned away before any work, by reason: kept here and out
        # of the ledger, which must not grow at the will of a client without the key.
        self.refused: dict[str, int] = defaultdict(int)
        self.app_requests: dict[tuple[str, str], int] = defaultdict(int)  # (app, code)
        self.app_tokens: dict[tuple[str, str], int] = defaultdict(int)  # (app, direction)
        self._apps: set[str] = set()

    def request(self, model: str, endpoint: str, code: int, seconds: float) -> None:
        self.requests[(model, endpoint, str(code))] += 1
        self.latency[(model, endpoint)].observe(seconds)

    def refuse(self, reason: str) -> None:
        self.refused[reason] += 1

    def count_tokens(self, model: str, prompt: int, completion: int) -> None:
        self.tokens[(model, "in")] += prompt
        self.tokens[(model, "out")] += completion

    def _app(self, app: str) -> str:
        if app not in self._apps:
            if len(self._apps) >= MAX_APP_LABELS:
                return OTHER_APP
            self._apps.add(app)
        return app

    def app_request(self, app: str, code: int, prompt: int = 0, completion: int = 0) -> None:
        """A request of `app` answered with `code`, and the tokens it used."""
        label = self._app(app)
        self.app_requests[(label, str(code))] += 1
        if prompt or completion:
            self.app_tokens[(label, "in")] += prompt
            self.app_tokens[(label, "out")] += completion

    def render(self, runtimes: list[ProcessState], waiting: dict[str, int]) -> str:
        out = [
            "# HELP sovctl_requests_total Requests answered by the gateway.",
            "# TYPE sovctl_requests_total counter",
        ]
        for (model, ep, code), n in sorted(self.requests.items()):
            labels = _labels([("model", model), ("endpoint", ep), ("code", code)])
            out.append(f"sovctl_requests_total{labels} {n}")
        out += ["# HELP sovctl_gateway_refused_total Requests refused before any work (auth: "
                "no key; host, origin: the browser guard; connections: over max_connections) "
                "and connections closed (header_timeout, headers_too_large).",
                "# TYPE sovctl_gateway_refused_total counter"]
        for reason, n in sorted(self.refused.items()):
            out.append(f"sovctl_gateway_refused_total{_labels([('reason', reason)])} {n}")
        out += ["# HELP sovctl_tokens_total Tokens in (prompt) and out (completion).",
                "# TYPE sovctl_tokens_total counter"]
        for (model, direction), n in sorted(self.tokens.items()):
            labels = _labels([("model", model), ("direction", direction)])
            out.append(f"sovctl_tokens_total{labels} {n}")
        out += ["# HELP sovctl_app_requests_total Requests answered by the gateway, by app (its "
                "key's name, X-Sovctl-App on loopback, or default; beyond "
                f"{MAX_APP_LABELS} apps, other).",
                "# TYPE sovctl_app_requests_total counter"]
        for (app, code), n in sorted(self.app_requests.items()):
            out.append(f"sovctl_app_requests_total{_labels([('app', app), ('code', code)])} {n}")
        out += ["# HELP sovctl_app_tokens_total Tokens in (prompt) and out (completion), by app.",
                "# TYPE sovctl_app_tokens_total counter"]
        for (app, direction), n in sorted(self.app_tokens.items()):
            labels = _labels([("app", app), ("direction", direction)])
            out.append(f"sovctl_app_tokens_total{labels} {n}")
        out += self._histograms("sovctl_request_duration_seconds",
                                "End-to-end request latency at the gateway.",
                                {(("model", m), ("endpoint", e)): h
                                 for (m, e), h in self.latency.items()})
        out += self._histograms("sovctl_time_to_first_token_seconds",
                                "Time to the first streamed chunk.",
                                {(("model", m),): h for m, h in self.ttft.items()})
        out += ["# HELP sovctl_runtime_restarts_total Restarts of each supervised process.",
                "# TYPE sovctl_runtime_restarts_total counter"]
        for r in runtimes:
            out.append(f"sovctl_runtime_restarts_total{_labels([('process', r.name)])} "
                       f"{r.restarts}")
        out += ["# HELP sovctl_runtime_up 1 when the process answers its health check.",
                "# TYPE sovctl_runtime_up gauge"]
        for r in runtimes:
            up = 1 if r.status == Status.UP else 0
            out.append(f"sovctl_runtime_up{_labels([('process', r.name)])} {up}")
        models = [r for r in runtimes if r.load_state]
        for name, kind, help_, value in (
                ("loads_total", "counter", "Starts of the model's runtime that came up.",
                 lambda r: r.loads),
                ("load_seconds_total", "counter", "Seconds from each start to healthy, summed.",
                 lambda r: r.load_seconds),
                ("unloads_total", "counter", "Unloads: idle past idle_unload, or evicted.",
                 lambda r: r.unloads),
                ("evictions_total", "counter", "Unloads to make room for another model.",
                 lambda r: r.evictions),
                ("loaded", "gauge", "1 while the model's runtime is in memory (loading, "
                 "loaded or idle).", lambda r: int(r.load_state != "unloaded")),
                ("memory_estimated_bytes", "gauge", "RAM the plan's estimate admits the "
                 "runtime by.", lambda r: r.memory_estimated),
                ("memory_held_bytes", "gauge", "RAM the runtime holds now (resident set), "
                 "measured.", lambda r: r.memory_held or 0)):
            out += [f"# HELP sovctl_model_{name} {help_}", f"# TYPE sovctl_model_{name} {kind}"]
            out += [f"sovctl_model_{name}{_labels([('model', r.model)])} {value(r)}"
                    for r in models]
        out += ["# HELP sovctl_queue_waiting Requests waiting for their runtime.",
                "# TYPE sovctl_queue_waiting gauge"]
        for model, n in sorted(waiting.items()):
            out.append(f"sovctl_queue_waiting{_labels([('model', model)])} {n}")
        return "\n".join(out) + "\n"

    @staticmethod
    def _histograms(name: str, help_: str, series: dict[Any, Histogram]) -> list[str]:
        out = [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
        for labels, h in sorted(series.items()):
            cumulative = 0
            for bound, c in zip([*BUCKETS, float("inf")], h.counts, strict=True):
                cumulative += c
                le = "+Inf" if bound == float("inf") else repr(float(bound))
                out.append(f"{name}_bucket{_labels([*labels, ('le', le)])} {cumulative}")
            out.append(f"{name}_sum{_labels(labels)} {h.sum}")
            out.append(f"{name}_count{_labels(labels)} {h.n}")
        return out
