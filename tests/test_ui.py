"""The operator's page at /ui, its data, and the terminal's charts.

- The running totals the page reads (`dashboard.Tally`) answer what `store.groups` answers, as
  records arrive, as the writer folds the oldest away, and when the file is replaced.
- The curve: owning and the meter cross at `sovctl cost`'s months to break even.
- `sovctl cost --chart` and `sovctl ledger --chart`, for people and with --json.
- Access: the page itself holds no figure; its data takes the gateway's own key where the
  gateway requires one (an app's key does not open it), and nothing without it.
- The page in a real browser (Debian's chromium, driven by Playwright, no browser downloaded):
  it loads nothing from another origin, under its Content-Security-Policy; on a real stack
  (stories260K on llama-server) it shows the processes, the counts of real requests in the
  models' table and the ledger's apps, the curve as an SVG path, and the last audit; behind the
  key it asks for the key and shows the data once given it, never putting it in a URL.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.conftest import TINY_MODEL
from tests.helpers import run, run_json, wait_for
from tests.test_gateway_guard import serving
from tests.test_serve import start_stack, stop_stack

from sovctl.apikey import ensure_api_key
from sovctl.config import load
from sovctl.gateway.ui import CSP, DATA_PATH
from sovctl.home import Home
from sovctl.ledger import cost, dashboard, store
from sovctl.runtime.documents import Limits, RoutesTable

DAY = 86400.0
CHROMIUM = "/usr/bin/chromium"


# -- the running totals --------------------------------------------------------------------------

def records(rng: random.Random, n: int, start: float, end: float) -> list[store.Row]:
    rows: list[store.Row] = []
    for _ in range(n):
        route = rng.choice(["local", "local", "local", "openai", store.UNROUTED])
        est = rng.random() < 0.2
        source = store.ESTIMATED if est else store.MEASURED
        priced = route != store.UNROUTED and rng.random() < 0.8
        rows.append((rng.uniform(start, end), route, rng.choice(["a", "b"]), "/v1/x", 200,
                     rng.randint(0, 50), rng.randint(0, 50), 0.1,
                     rng.random() / 100 if priced else None, source,
                     source if priced else None, rng.choice(["default", "bot", "crawler"])))
    return rows


def write(path: Path, rows: list[store.Row], max_rows: int = 1_000_000) -> None:
    writer = store.Writer(path, max_rows=max_rows)
    for r in rows:
        writer.put(r)
    writer.close(timeout=60)


def same(a: list[store.Group], b: list[store.Group]) -> None:
    """Equal groups; costs to the rounding of summing them in another order."""
    key = [(g.day, g.route, g.model, g.app, g.tokens_source, g.cost_source, g.requests,
            g.tokens_in, g.tokens_out) for g in a]
    assert key == [(g.day, g.route, g.model, g.app, g.tokens_source, g.cost_source, g.requests,
                    g.tokens_in, g.tokens_out) for g in b]
    assert [g.cost for g in a] == pytest.approx([g.cost for g in b], rel=1e-9, abs=1e-12)


def test_the_tally_answers_what_the_file_does(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    rng = random.Random(7)
    now = time.time()
    # Forty days: ten of them before the window, which the tally never reads.
    write(path, records(rng, 3000, now - 40 * DAY, now))
    tally = dashboard.Tally(path)
    since = dashboard.window_start(now)
    start = dt.datetime.combine(since, dt.time(), dt.UTC).timestamp()

    def check() -> None:
        t = time.time()
        same(tally.groups(path, start, t), store.groups(path, start, t))

    check()
    # New records, some started long ago (a stream that ran for days ends now).
    write(path, records(rng, 500, now - 35 * DAY, time.time()))
    check()
    # The size bound folds the oldest, inside the window, into daily totals: nothing counts
    # twice, nothing is lost. Records folded before the tally read them count once too.
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT count(*) FROM requests").fetchone()[0]
    write(path, records(rng, 200, time.time() - 60, time.time()), max_rows=rows - 1200)
    with sqlite3.connect(path) as db:
        folded = db.execute("SELECT count(*) FROM daily WHERE day >= ?",
                            (since.isoformat(),)).fetchone()[0]
    assert folded, "the fold did not reach into the window"
    check()
    write(path, records(rng, 300, time.time() - 60, time.time()), max_rows=rows - 2000)
    check()
    # Another file in its place (the old one moved aside): summed afresh.
    path.rename(tmp_path / "old.sqlite3")
    write(path, records(rng, 50, time.time() - 3 * DAY, time.time()))
    check()
    path.unlink()
    assert tally.groups(path, start, time.time()) == []
    with pytest.raises(ValueError, match="holds the days from"):
        tally.groups(path, start - DAY, time.time())


def test_the_curve_crosses_at_the_break_even(sovctl_home: Path) -> None:
    settings = load(Home(sovctl_home))
    a = cost.answer(Home(sovctl_home), settings, {
        "hardware_price": 2000, "daily_tokens": 3e6, "watts": 300, "tokens_per_s": 40,
        "cloud_per_mtok": 10.0})
    c = dashboard.curve(a)
    even = a.result["months_to_break_even"].value
    assert even is not None and c.break_even.value == even
    m = int(even)
    # Before it the meter has cost less; after it, owning has.
    assert c.metered[m] < c.owning[m] and c.metered[m + 1] > c.owning[m + 1]
    frac = (c.owning[m] - c.metered[m]) / ((c.metered[m + 1] - c.metered[m])
                                          - (c.owning[m + 1] - c.owning[m]))
    assert m + frac == pytest.approx(even)
    assert c.owning[0] == 2000 and c.metered[0] == 0
    assert c.months[-1] == 36  # the hardware's lifetime (the default 3 years)
    # Owning rests on the tariff and the lifetime too, built-in defaults here; the meter's
    # line on the flags alone.
    assert c.owning_source == "defaulted"
    assert c.metered_source == "flag"


# -- the terminal ------------------------------------------------------------------------------

def test_cost_chart(sovctl_home: Path) -> None:
    flags = ("--hardware-price", "2000", "--daily-tokens", "3e6", "--watts", "300",
             "--tokens-per-s", "40", "--cloud-price", "10")
    out = run(sovctl_home, "cost", "--chart", *flags, check=True).stdout
    assert "cumulative cost in USD, month by month" in out
    assert "●" in out and "○" in out and "┆" in out
    doc = run_json(sovctl_home, "cost", "--chart", *flags)
    assert doc["ok"], doc
    data = doc["data"]
    even = data["result"]["months_to_break_even"]["value"]
    # The tariff is a built-in default here: the figure resting on it says so ('*').
    assert f"break-even at {even:.1f}* months" in out
    curve = data["curve"]
    assert curve["break_even"] == {"value": even, "source": "defaulted"}
    assert curve["months"][0] == 0 and len(curve["owning"]) == len(curve["months"])
    # The answer itself is as without --chart.
    plain = run_json(sovctl_home, "cost", *flags)["data"]
    assert {k: v for k, v in data.items() if k != "curve"} == plain


def test_ledger_chart(sovctl_home: Path) -> None:
    now = time.time()
    path = store.ledger_path(Home(sovctl_home))
    today = dt.datetime.fromtimestamp(now, dt.UTC).date()
    midnight = dt.datetime.combine(today, dt.time(), dt.UTC).timestamp()
    rows: list[store.Row] = [
        # Yesterday: 99% local. Today: 90% local, part of it estimated.
        (midnight - DAY / 2, "local", "m", "/v1/chat/completions", 200, 90, 9, 0.1, None,
         store.MEASURED, None, "default"),
        (midnight - DAY / 2, "openai", "frontier/openai/x", "/v1/chat/completions", 200, 1, 0,
         0.1, 0.01, store.MEASURED, store.MEASURED, "default"),
        (min(midnight + 1, now - 1), "local", "m", "/v1/chat/completions", 200, 80, 10, 0.1,
         None, store.ESTIMATED, None, "default"),
        (min(midnight + 1, now - 1), "openai", "frontier/openai/x", "/v1/chat/completions",
         200, 5, 5, 0.1, 0.01, store.MEASURED, store.MEASURED, "default"),
    ]
    write(path, rows)
    out = run(sovctl_home, "ledger", "--chart", "--since", "3d", check=True).stdout
    lines = {line.split()[0]: line for line in out.splitlines() if line[:4].isdigit()
             and "│" in line}
    yesterday = (today - dt.timedelta(1)).isoformat()
    assert lines[yesterday].endswith(" 99.0%"), lines
    assert lines[today.isoformat()].endswith(" ~90.0%"), lines  # estimated tokens: marked
    assert "no tokens" in lines[(today - dt.timedelta(2)).isoformat()]
    doc = run_json(sovctl_home, "ledger", "--chart", "--since", "3d")
    chart = doc["data"]["chart"]
    assert chart["target"] == 0.95
    shares = {d["day"]: d["share"] for d in chart["days"]}
    assert shares[yesterday] == {"value": 0.99, "source": "measured"}
    assert shares[today.isoformat()]["value"] == pytest.approx(0.9)
    assert shares[today.isoformat()]["source"] == "estimated"


# -- the gateway behind its key ------------------------------------------------------------------

@pytest.fixture
def keyed(sovctl_home: Path) -> Iterator[dict[str, str]]:
    """A gateway that requires its key, as it runs beyond loopback or behind a tunnel, with an
    app's key made by `sovctl keys add`; its home holds a ledger."""
    home = Home(sovctl_home)
    key = ensure_api_key(home)[0]  # what serve makes when the key is required
    app_key = run_json(sovctl_home, "keys", "add", "bot")["data"]["key"]
    write(store.ledger_path(home), records(random.Random(1), 50, time.time() - 3 * DAY,
                                           time.time()))
    table = RoutesTable("127.0.0.1", 0, True, str(home.secrets / "api_key"),
                        Limits(4, 10.0, 1 << 20), str(home.run / "state.json"), routes=(),
                        ledger=str(store.ledger_path(home)),
                        app_keys_file=str(home.secrets / "app_keys.json"), home=str(home.root))
    with serving(table) as base:
        yield {"base": base, "key": key, "app_key": app_key}


def test_behind_the_key_the_data_needs_the_operators_key(keyed: dict[str, str]) -> None:
    base = keyed["base"]
    with httpx.Client(base_url=base, timeout=60) as c:
        # A client beyond loopback: any Host, as the key is the guard.
        beyond = {"Host": "box.example.org:8088"}
        page = c.get("/ui/", headers=beyond)
        assert page.status_code == 200
        assert page.headers["content-security-policy"] == CSP
        assert page.headers["x-content-type-options"] == "nosniff"
        assert page.headers["referrer-policy"] == "no-referrer"
        assert "data.json" not in page.text  # the shell holds no figure: app.js asks for them
        for headers in (beyond, {**beyond, "Authorization": "Bearer wrong"},
                        {**beyond, "Authorization": f"Bearer {keyed['app_key']}"},
                        {**beyond, "x-api-key": keyed["key"]}):
            r = c.get(DATA_PATH, headers=headers)
            assert r.status_code == 401, (headers, r.text)
            assert r.json()["error"]["code"] == "invalid_api_key"
            assert r.headers["content-security-policy"] == CSP
            assert "processes" not in r.text
        r = c.get(DATA_PATH, headers={**beyond, "Authorization": f"Bearer {keyed['key']}"})
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["schema"] == "sovctl.ui/1"
        assert sum(a["requests"] for a in doc["apps"]) == 50
        assert r.headers["cache-control"] == "no-store"
        # The other API paths take an app's key as before: the page's data alone does not.
        assert c.get("/v1/models", headers={
            "Authorization": f"Bearer {keyed['app_key']}"}).status_code == 200


def test_the_page_follows_its_paths() -> None:
    """Assets under /ui/; /ui sends to /ui/ by a relative address (a prefix holds)."""
    table = RoutesTable("127.0.0.1", 0, False, "", Limits(4, 10.0, 1 << 20), "/nonexistent",
                        routes=())
    with serving(table) as base, httpx.Client(base_url=base, timeout=30) as c:
        r = c.get("/ui")
        assert r.status_code == 308 and r.headers["location"] == "ui/"
        for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
            r = c.get(f"/ui/{name}")
            assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
            assert r.headers["content-security-policy"] == CSP
        assert c.get("/ui/other.js").status_code == 404
        # Without a key, the guard of every path: a rebound name, or another site's page.
        for headers in ({"Host": "rebind.evil.example"}, {"Origin": "https://evil.example"}):
            for path in ("/ui/", DATA_PATH):
                assert c.get(path, headers=headers).status_code == 403, (path, headers)
        assert c.post(DATA_PATH).status_code == 405
        doc = c.get(DATA_PATH).json()
        # No home in the table (made by hand): the processes, models, and a note why no more.
        assert doc["stack"] is None and doc["processes"] == [] and doc["share"] is None
        assert "no home" in doc["notes"][0]


# -- a real browser ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or not Path(CHROMIUM).exists():
        missing = "playwright (pip install -e '.[dev]')" if sync_playwright is None \
            else f"chromium at {CHROMIUM} (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(f"{missing} is missing: CI installs it", pytrace=False)
        pytest.skip(f"{missing} is not installed")
    with sync_playwright() as p:
        # Debian's own chromium; Playwright downloads nothing. No name resolves but loopback.
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--disable-background-networking", "--disable-component-update"])
        yield browser
        browser.close()


class Visit:
    """A page opened in its own context, every request and console message it made kept."""

    def __init__(self, browser: Any, url: str) -> None:
        self.context = browser.new_context()
        self.page = self.context.new_page()
        self.requests: list[str] = []
        self.console: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        self.response = self.page.goto(url)

    def text(self, selector: str) -> str:
        return str(self.page.inner_text(selector))

    def close(self) -> None:
        self.context.close()


def same_origin(visit: Visit, base: str) -> None:
    assert visit.requests, "the page made no request"
    strangers = [u for u in visit.requests if not u.startswith(base + "/")]
    assert not strangers, strangers
    assert not [m for m in visit.console if "Content Security Policy" in m], visit.console


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, models: Path) -> Iterator[Any]:
    home = tmp_path_factory.mktemp("ui")
    # A box that pays for itself within the chart at the volume of a few requests a day.
    (home / "sovctl.toml").write_text("[cost]\nhardware_price = 0.05\n"
                                      "cloud_price_per_mtok = 100.0\n"
                                      "cloud_input_price_per_mtok = 100.0\n")
    s = start_stack(home, "--chat", "tiny", models=((TINY_MODEL, "tiny"),))
    wait_for(lambda: httpx.get(s.base + "/ready", timeout=10).status_code == 200, timeout=120,
             what="the stack to be ready")
    yield s
    stop_stack(s)


@pytest.mark.slow
def test_the_page_on_a_running_stack(stack: Any, chromium: Any) -> None:
    # Real requests first: the page counts them from the gateway and from the ledger.
    for word in ("Once", "upon", "a"):
        r = httpx.post(stack.base + "/v1/chat/completions", timeout=120, json={
            "model": "tiny", "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": word}]})
        assert r.status_code == 200, r.text
    # The last audit: a report as the audit files it.
    from sovctl.audit.checks import CheckResult
    from sovctl.audit.report import AuditReport
    from sovctl.audit.report import write as file_report

    when = dt.datetime.now(dt.UTC)
    file_report(Home(stack.home), AuditReport(
        kind="blackout", started_at=when.isoformat(), finished_at=when.isoformat(),
        passed=False, isolation={}, models=(), baseline={}, timings={}, host={}, versions={},
        checks=(CheckResult(1, "isolation", True, "no route out", 0.1),
                CheckResult(6, "egress", False, "a connect to 192.0.2.1:443", 0.1))), when)

    visit = Visit(chromium, stack.base + "/ui")
    try:
        assert visit.response.status == 200
        assert visit.response.headers["content-security-policy"] == CSP
        page = visit.page
        page.wait_for_selector("#processes td:text-is('gateway')", timeout=30_000)
        processes = visit.text("#processes")
        assert "tiny" in processes and "llama-server" in processes and "up" in processes
        # The gateway's counts: three requests to tiny.
        page.wait_for_function(
            """() => [...document.querySelectorAll('#models tbody tr')].some(
                 tr => tr.cells[0].textContent === 'tiny' && tr.cells[5].textContent === '3')""",
            timeout=30_000)
        # The ledger's: three requests of the app "default", all served here.
        page.wait_for_function(
            """() => [...document.querySelectorAll('#apps tbody tr')].some(
                 tr => tr.cells[0].textContent === 'default' && tr.cells[1].textContent === '3')""",
            timeout=30_000)
        assert "100.0%" in visit.text("#share")
        assert page.locator("#share svg rect.local").count() >= 1
        # The curve: two lines, and the break-even marked where they cross.
        assert page.locator("#curve svg path.owning").count() == 1
        d = page.locator("#curve svg path.metered").get_attribute("d")
        assert d is not None and d.startswith("M") and d.count("L") >= 12
        assert "break-even" in visit.text("#curve")
        audit = visit.text("#audit")
        assert "blackout" in audit and "egress" in audit and "fail" in audit
        assert "no frontier provider" in visit.text("#providers")
        # It updates by itself: the next poll, with no reload.
        before = visit.text("#updated")
        page.wait_for_function(f"() => document.querySelector('#updated').textContent "
                               f"!== {json.dumps(before)}", timeout=15_000)
        same_origin(visit, stack.base)
        assert any(u.endswith(DATA_PATH) for u in visit.requests)
    finally:
        visit.close()


def test_the_page_asks_for_the_key(keyed: dict[str, str], chromium: Any) -> None:
    visit = Visit(chromium, keyed["base"] + "/ui/")
    try:
        page = visit.page
        page.wait_for_selector("#key-input", state="visible", timeout=15_000)
        assert page.locator("#main").is_hidden()
        # An app's key is no operator's: refused, and asked for again.
        page.fill("#key-input", keyed["app_key"])
        page.click("#key-use")
        page.wait_for_function("() => document.querySelector('#key-why').textContent"
                               ".includes('refused')", timeout=15_000)
        page.fill("#key-input", keyed["key"])
        page.press("#key-input", "Enter")
        page.wait_for_selector("#apps td:text-is('default')", timeout=15_000)
        assert page.locator("#key").is_hidden()
        # Kept for the tab, never in an address.
        assert page.evaluate("sessionStorage.getItem('sovctl.key')") == keyed["key"]
        assert not [u for u in visit.requests if keyed["key"] in u]
        same_origin(visit, keyed["base"])
    finally:
        visit.close()


def test_the_assets_ship_in_the_package() -> None:
    from importlib import resources

    page = resources.files("sovctl.gateway") / "page"
    html = (page / "index.html").read_text()
    assert 'src="app.js"' in html and 'href="style.css"' in html
    # Nothing from elsewhere: no absolute address in any asset.
    for name in ("index.html", "app.js", "style.css"):
        text = (page / name).read_text()
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")
        assert "https://" not in text and "//cdn" not in text, name
