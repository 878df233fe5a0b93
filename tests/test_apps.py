"""A key per app: `sovctl keys`, each app's limits ([apps.NAME]) and its attribution, through a
real stack: `sovctl serve` with the tiny model on llama-server, clients using the `openai` and
`anthropic` SDKs and httpx.

The stack listens beyond loopback, so its gateway requires a key; a second one on loopback
takes requests without one and attributes them by X-Sovctl-App. No paid provider can be
reached from here, so the frontier routes go to a stand-in for one on 127.0.0.1
(tests.test_frontier_money.StandIn: model "gpt-test" answers at once with 10 prompt and 5
generated tokens; "gated" waits until the test opens its gate).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import sqlite3
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from tests.conftest import TINY_MODEL
from tests.helpers import run, run_json, wait_for
from tests.test_frontier_money import StandIn, serve_in_thread
from tests.test_serve import FAST_SUPERVISION, Stack, free_port, stop_stack

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("models")]

STANDIN_KEY = "standin-Kp3vW8q1"
PRICE = 1000.0  # per million tokens: a stand-in answer (15 tokens) costs 0.015
TOML = """
[providers.paid]
base_url = "{url}"
api_key_env = "STANDIN_KEY"
max_tokens = 4
[providers.paid.models.gpt-test]
input_per_mtok = {price}
output_per_mtok = {price}
[providers.paid.models.gated]
input_per_mtok = 1.0
output_per_mtok = 1.0

[providers.elsewhere]
base_url = "{url}"
api_key_env = "STANDIN_KEY"
models = {{ gpt-test = {{ input_per_mtok = 1.0, output_per_mtok = 1.0 }} }}

[apps.capped]
requests_per_minute = 2

[apps.single]
max_concurrent = 1

[apps.thrifty]
tokens_per_day = 20

[apps.paidonly]
providers = ["paid"]
frontier_daily_cap = 0.02
"""
ENV = {**FAST_SUPERVISION, "STANDIN_KEY": STANDIN_KEY}


def ask(base: str, key: str, **extra: Any) -> httpx.Response:
    """A short completion of the tiny model, as app `key`."""
    headers = {"authorization": f"Bearer {key}", **extra.pop("headers", {})}
    return httpx.post(base + "/v1/completions", headers=headers, timeout=60, json={
        "model": "tiny", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0,
        **extra})


def new_key(home: Path, name: str) -> str:
    doc = run_json(home, "keys", "add", name)
    assert doc["_rc"] == 0, doc["_stderr"]
    return str(doc["data"]["key"])


def ledger_rows(home: Path) -> list[dict[str, Any]]:
    with sqlite3.connect(home / "ledger" / "ledger.sqlite3") as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM requests ORDER BY time")]


def serve(home: Path, *args: str) -> Stack:
    port = free_port()
    proc = run(home, "serve", "--chat", "tiny", "--port", str(port), "-d", *args, env=ENV)
    assert proc.returncode == 0, proc.stderr
    return Stack(home, port, ENV)


@pytest.fixture(scope="module")
def standin() -> Iterator[StandIn]:
    server = StandIn()
    serve_in_thread(server)
    yield server
    server.gate.set()
    server.shutdown()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, standin: StandIn
          ) -> Iterator[dict[str, Any]]:
    """The stack beyond loopback, its [apps] configured, and keys made before it started."""
    home = tmp_path_factory.mktemp("apps") / "home"
    run(home, "pull", str(TINY_MODEL), "--name", "tiny", check=True)
    (home / "sovctl.toml").write_text(TOML.format(
        url=f"http://127.0.0.1:{standin.server_address[1]}/v1", price=PRICE))
    keys = {name: new_key(home, name) for name in ("capped", "single", "thrifty", "paidonly",
                                                   "free")}
    s = serve(home, "--host", "0.0.0.0")
    keys["default"] = (home / "secrets" / "api_key").read_text().strip()
    running = {"stack": s, "home": home, "base": s.base, "keys": keys}
    yield running
    stop_stack(running["stack"])  # a test may have started it again


def test_a_key_added_works_at_once_and_revoked_is_refused_at_once(stack: dict[str, Any]
                                                                  ) -> None:
    home, base = stack["home"], stack["base"]
    key = new_key(home, "alpha")  # while the gateway runs
    assert key.startswith("sk-sov-app-")
    client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=60)
    assert client.completions.create(model="tiny", prompt="Once", max_tokens=4).choices
    # Every surface takes it: Anthropic's clients send it as x-api-key.
    r = httpx.post(base + "/v1/messages/count_tokens", headers={"x-api-key": key}, json={})
    assert r.status_code != 401
    assert httpx.get(base + "/v1/models", headers={"authorization": f"Bearer {key}"}
                     ).status_code == 200
    listed = run_json(home, "keys", "list")["data"]["apps"]
    assert {"alpha", "capped", "default"} <= {a["app"] for a in listed}
    alpha = next(a for a in listed if a["app"] == "alpha")
    assert alpha["has_key"] and alpha["hint"].endswith(key[-4:]) and alpha["limits"] is None

    revoked = run_json(home, "keys", "revoke", "alpha")
    assert revoked["_rc"] == 0 and revoked["data"]["app"] == "alpha"
    # The very next request, no restart.
    with pytest.raises(openai.AuthenticationError):
        client.completions.create(model="tiny", prompt="Once", max_tokens=4)
    r = httpx.post(base + "/v1/messages", headers={"x-api-key": key}, json={})
    assert r.status_code == 401 and r.json()["type"] == "error"
    assert ask(base, stack["keys"]["default"]).status_code == 200  # the main key still works
    again = run(home, "keys", "revoke", "alpha")
    assert again.returncode == 4 and again.stderr.count("\n") == 1
    assert "has no key" in again.stderr


def test_a_key_rotated_is_replaced_at_once(stack: dict[str, Any]) -> None:
    home, base = stack["home"], stack["base"]
    old = new_key(home, "beta")
    assert ask(base, old).status_code == 200
    doc = run_json(home, "keys", "rotate", "beta")
    new = doc["data"]["key"]
    assert doc["_rc"] == 0 and new != old and doc["data"]["rotated_at"]
    assert ask(base, old).status_code == 401
    assert ask(base, new).status_code == 200


def test_one_app_throttled_while_another_is_served(stack: dict[str, Any]) -> None:
    base, keys = stack["base"], stack["keys"]
    assert [ask(base, keys["capped"]).status_code for _ in range(2)] == [200, 200]
    refused = ask(base, keys["capped"])
    assert refused.status_code == 429
    err = refused.json()["error"]
    assert err["code"] == "app_requests_per_minute" and err["type"] == "rate_limit_exceeded"
    assert "'capped'" in err["message"] and "requests_per_minute = 2" in err["message"]
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    # Another app, and the default one, are untouched.
    assert ask(base, keys["free"]).status_code == 200
    assert ask(base, keys["default"]).status_code == 200
    # In Anthropic's own error shape on Messages, through the SDK.
    client = anthropic.Anthropic(base_url=base, api_key=keys["capped"], max_retries=0)
    with pytest.raises(anthropic.RateLimitError) as limited:
        client.messages.create(model="tiny", max_tokens=4,
                               messages=[{"role": "user", "content": "hi"}])
    body = limited.value.response.json()
    assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error"
    assert "requests_per_minute" in body["error"]["message"]
    assert limited.value.response.headers["retry-after"]
    # A key required, X-Sovctl-App cannot make the request another app's.
    assert ask(base, keys["capped"], headers={"x-sovctl-app": "free"}).status_code == 429


def test_max_concurrent(stack: dict[str, Any], standin: StandIn) -> None:
    base, keys = stack["base"], stack["keys"]
    standin.gate.clear()

    def gated(key: str) -> httpx.Response:
        return httpx.post(base + "/v1/chat/completions", timeout=60,
                          headers={"authorization": f"Bearer {key}"},
                          json={"model": "frontier/paid/gated",
                                "messages": [{"role": "user", "content": "hi"}]})

    def waiting() -> int:
        return len([r for r in standin.received if r["body"]["model"] == "gated"])

    before = waiting()
    with cf.ThreadPoolExecutor(1) as pool:
        first = pool.submit(gated, keys["single"])
        wait_for(lambda: waiting() == before + 1, 20, what="the first request at the provider")
        second = ask(base, keys["single"])  # a local request counts as much
        assert second.status_code == 429
        assert second.json()["error"]["code"] == "app_max_concurrent"
        assert second.headers["retry-after"] == "1"
        assert ask(base, keys["free"]).status_code == 200
        standin.gate.set()
        assert first.result().status_code == 200
    assert ask(base, keys["single"]).status_code == 200  # free again


def test_providers_allowed_and_frontier_daily_cap(stack: dict[str, Any]) -> None:
    base, keys = stack["base"], stack["keys"]

    def routed(key: str, provider: str) -> httpx.Response:
        return httpx.post(base + "/v1/chat/completions", timeout=30,
                          headers={"authorization": f"Bearer {key}"},
                          json={"model": f"frontier/{provider}/gpt-test",
                                "messages": [{"role": "user", "content": "hi"}]})

    refused = routed(keys["paidonly"], "elsewhere")
    assert refused.status_code == 403
    err = refused.json()["error"]
    assert err["code"] == "app_provider_not_allowed" and "'paidonly'" in err["message"]
    assert "elsewhere" in err["message"] and "paid" in err["message"]
    assert routed(keys["free"], "elsewhere").status_code == 200  # other apps may
    # Each may cost 11 prompt tokens (estimated) + 4 generated (max_tokens) = 0.015, which
    # fits the app's 0.02 a day once: 0.015 spent, the next is refused until midnight UTC.
    assert routed(keys["paidonly"], "paid").status_code == 200
    capped = routed(keys["paidonly"], "paid")
    assert capped.status_code == 429
    assert capped.json()["error"]["code"] == "app_frontier_daily_cap"
    assert "frontier_daily_cap = 0.02" in capped.json()["error"]["message"]
    assert 0 < int(capped.headers["retry-after"]) <= 86_401
    assert routed(keys["free"], "paid").status_code == 200  # the provider is not capped


def test_attribution_in_the_ledger_metrics_and_cost(stack: dict[str, Any]) -> None:
    home, base, keys = stack["home"], stack["base"], stack["keys"]
    assert ask(base, keys["free"]).status_code == 200

    def apps_seen() -> set[str]:
        return {r["app"] for r in ledger_rows(home)}

    wait_for(lambda: {"free", "capped", "default"} <= apps_seen(), 10, what="the records")
    rows = ledger_rows(home)
    capped = [r for r in rows if r["app"] == "capped"]
    assert {r["status"] for r in capped} >= {200, 429}
    assert all(r["tokens_in"] > 0 for r in capped if r["status"] == 200)

    doc = run_json(home, "ledger", "--by", "app", "--json")
    assert doc["_rc"] == 0 and doc["data"]["by"] == "app"
    by_app = {row["key"]: row for row in doc["data"]["rows"]}
    assert by_app["capped"]["requests"] == len(capped)
    assert by_app["free"]["tokens_in"]["value"] > 0
    text = run(home, "ledger", "--by", "app").stdout
    assert "capped" in text and "by app" in text

    metrics = httpx.get(base + "/metrics", headers={"authorization": f"Bearer {keys['free']}"})
    assert 'sovctl_app_requests_total{app="capped",code="429"}' in metrics.text
    assert 'sovctl_app_tokens_total{app="free",direction="in"}' in metrics.text

    cost = run_json(home, "cost", "--app", "paidonly", "--json")
    assert cost["_rc"] == 0, cost["_stderr"]
    app = cost["data"]["app"]
    assert app["name"] == "paidonly" and app["requests"] >= 3
    # What it spent on the meter it spent either way; the stand-in's price, measured usage.
    assert app["routed_spend"] == {"value": pytest.approx(0.015), "source": "measured",
                                   "basis": app["routed_spend"]["basis"]}
    assert app["here"]["value"] == pytest.approx(0.015)
    local = run_json(home, "cost", "--app", "capped", "--json")["data"]["app"]
    # Its local tokens at the reference cloud price (built-in defaults here), nothing spent.
    assert local["at_meter"]["value"] > 0 and local["at_meter"]["source"] == "defaulted"
    assert local["routed_spend"]["value"] == 0
    assert "app capped" in run(home, "cost", "--app", "capped").stdout
    unknown = run(home, "cost", "--app", "nobody")
    assert unknown.returncode == 4 and "no app 'nobody'" in unknown.stderr


def test_tokens_per_day_counted_from_the_ledger_after_a_restart(stack: dict[str, Any]) -> None:
    home, keys = stack["home"], stack["keys"]
    first = ask(stack["base"], keys["thrifty"], max_tokens=16)
    assert first.status_code == 200 and first.json()["usage"]["total_tokens"] > 20
    refused = ask(stack["base"], keys["thrifty"])
    assert refused.status_code == 429
    err = refused.json()["error"]
    assert err["code"] == "app_tokens_per_day" and "tokens_per_day = 20" in err["message"]
    assert "'thrifty'" in err["message"]
    assert 0 < int(refused.headers["retry-after"]) <= 86_401
    assert ask(stack["base"], keys["free"]).status_code == 200
    # A new gateway counts the day from the ledger.
    stop_stack(stack["stack"])
    s = serve(home, "--host", "0.0.0.0")
    stack["stack"], stack["base"] = s, s.base
    assert ask(s.base, keys["thrifty"]).status_code == 429
    assert ask(s.base, keys["free"]).status_code == 200


def test_hashes_only_on_disk(stack: dict[str, Any]) -> None:
    home, keys = stack["home"], stack["keys"]
    app_keys = [k for name, k in keys.items() if name != "default"]
    secrets_dir = home / "secrets"
    assert stat.S_IMODE(secrets_dir.stat().st_mode) == 0o700
    for f in secrets_dir.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    kept = json.loads((secrets_dir / "app_keys.json").read_text())["keys"]
    assert set(kept) >= {"capped", "free"} and len(kept["free"]["sha256"]) == 64
    for f in home.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            for k in app_keys:
                assert k.encode() not in data, f"an app's key in {f}"


def test_loopback_attribution_by_header(tmp_path: Path) -> None:
    home = tmp_path / "home"
    run(home, "pull", str(TINY_MODEL), "--name", "tiny", check=True)
    (home / "sovctl.toml").write_text("[apps.named]\n")
    keyed = new_key(home, "keyed")
    s = serve(home)
    try:
        assert not (home / "secrets" / "api_key").exists()  # loopback: no key needed
        r = httpx.post(s.base + "/v1/completions", headers={"x-sovctl-app": "named"},
                       json={"model": "tiny", "prompt": "Once", "max_tokens": 4})
        assert r.status_code == 200
        # An app's key names its app on loopback too; an unknown name, or a key the gateway
        # does not know (an SDK's placeholder), counts as the default app.
        assert ask(s.base, keyed).status_code == 200
        assert ask(s.base, "unused", headers={"x-sovctl-app": "made-up"}).status_code == 200
        assert ask(s.base, "unused", headers={"x-sovctl-app": "keyed"}).status_code == 200
        wait_for(lambda: len(ledger_rows(home)) == 4, 10, what="four records")
        assert [r["app"] for r in ledger_rows(home)] == ["named", "keyed", "default", "keyed"]
    finally:
        stop_stack(s)


def test_a_ledger_of_schema_2_is_migrated(tmp_path: Path) -> None:
    home = tmp_path / "home"
    path = home / "ledger" / "ledger.sqlite3"
    path.parent.mkdir(parents=True)
    now = time.time()
    with sqlite3.connect(path) as conn:  # as the previous version wrote it
        conn.executescript(
            "CREATE TABLE requests (time REAL NOT NULL, route TEXT NOT NULL, model TEXT NOT "
            "NULL, endpoint TEXT NOT NULL, status INTEGER NOT NULL, tokens_in INTEGER NOT NULL,"
            " tokens_out INTEGER NOT NULL, latency_s REAL NOT NULL, cost REAL, tokens_source "
            "TEXT NOT NULL DEFAULT 'measured', cost_source TEXT);"
            "CREATE TABLE daily (day TEXT NOT NULL, route TEXT NOT NULL, model TEXT NOT NULL, "
            "tokens_source TEXT NOT NULL, cost_source TEXT NOT NULL, requests INTEGER NOT NULL,"
            " tokens_in INTEGER NOT NULL, tokens_out INTEGER NOT NULL, cost REAL NOT NULL, "
            "PRIMARY KEY (day, route, model, tokens_source, cost_source));"
            "PRAGMA user_version=2;")
        conn.execute("INSERT INTO requests VALUES (?, 'local', 'tiny', '/v1/completions', 200, "
                     "10, 5, 0.1, NULL, 'measured', NULL)", (now - 60,))
        conn.execute("INSERT INTO daily VALUES (date(?, 'unixepoch'), 'local', 'tiny', "
                     "'measured', '', 3, 30, 15, 0)", (now - 2 * 86400,))
    doc = run_json(home, "ledger", "--by", "app", "--since", "7d")
    assert doc["_rc"] == 0, doc["_stderr"]
    [row] = doc["data"]["rows"]
    assert row["key"] == "default" and row["requests"] == 4
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 3
        assert conn.execute("SELECT app FROM daily").fetchall() == [("default",)]


def test_bad_app_settings_and_names(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "sovctl.toml").write_text('[apps.bot]\nproviders = ["nowhere"]\n')
    bad = run(home, "keys", "list")
    assert bad.returncode == 3 and "apps.bot.providers names 'nowhere'" in bad.stderr
    (home / "sovctl.toml").write_text("[apps.bot]\nrequests_per_minute = 0\n")
    assert "must be at least 1" in run(home, "keys", "list").stderr
    (home / "sovctl.toml").write_text("[apps.other]\n")
    assert run(home, "keys", "list").returncode == 3
    (home / "sovctl.toml").write_text("")
    for name in ("default", "other", "no spaces", "_under"):
        r = run(home, "keys", "add", name)
        assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr
    assert run(home, "keys", "revoke", "default").returncode == 2
    assert run(home, "keys", "rotate", "default").returncode == 4  # no gateway key yet
    assert not (home / "secrets" / "app_keys.json").exists()
