// The operator's page: asks the gateway for data.json every few seconds and draws it.
// Every text goes in through textContent and every chart is SVG built node by node: nothing
// the data holds (a model's or an app's name) is ever read as markup.
(function () {
  "use strict";

  const POLL_MS = 3000;
  const KEY = "sovctl.key";  // sessionStorage: this tab only, gone when it closes
  const SVG = "http://www.w3.org/2000/svg";
  let timer = null;

  // -- building nodes ------------------------------------------------------------------------
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== null && v !== undefined && v !== false) node.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children) node.append(c instanceof Node ? c : String(c));
    return node;
  }

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    for (const c of children) node.append(c instanceof Node ? c : String(c));
    return node;
  }

  function table(columns, rows) {
    const head = el("tr", {}, ...columns.map(([name, num]) => el("th", { class: num ? "num" : null }, name)));
    const body = rows.map((cells) => {
      const tr = el("tr", { class: cells.rowClass || null });
      cells.forEach((cell, i) => {
        const td = el("td", { class: columns[i][1] ? "num" : null });
        td.append(cell instanceof Node ? cell : String(cell));
        tr.append(td);
      });
      return tr;
    });
    return el("table", {}, el("thead", {}, head), el("tbody", {}, ...body));
  }

  function badge(text) {
    return el("span", { class: "badge " + String(text).replace(/[^a-z-]/g, "-") }, text);
  }

  function fill(id, ...nodes) {
    document.querySelector("#" + id + " .body").replaceChildren(...nodes);
  }

  function note(text) {
    return el("p", { class: "note" }, text);
  }

  // -- figures, marked as the CLI marks them ---------------------------------------------------
  function mark(fig, text) {
    const source = fig && fig.source;
    return (source === "estimated" ? "~" : "") + text + (source === "defaulted" ? "*" : "");
  }

  function tokens(n) {
    n = Number(n) || 0;
    for (const [size, unit] of [[1e9, "G"], [1e6, "M"], [1e3, "k"]]) {
      if (Math.abs(n) >= size) return (n / size).toPrecision(3).replace(/\.?0+$/, "") + unit;
    }
    return String(Math.round(n));
  }

  function money(v, currency) {
    const n = Number(v) || 0;
    if (n === 0) return "0" + (currency ? " " + currency : "");
    const digits = Math.abs(n) >= 100 ? 0 : Math.abs(n) >= 1 ? 2 : 4;
    return n.toLocaleString("en", { minimumFractionDigits: digits, maximumFractionDigits: digits })
      + (currency ? " " + currency : "");
  }

  function pct(v) {
    return v === null || v === undefined ? "-" : (v * 100).toFixed(1) + "%";
  }

  function duration(s) {
    s = Math.floor(s);
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min";
    if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
    return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
  }

  // -- the sections ------------------------------------------------------------------------------
  function processes(d) {
    if (!d.stack) {
      fill("processes", note("no stack state: the supervisor has not written run/state.json"));
      return;
    }
    const rows = [];
    for (const p of d.processes) {
      rows.push([p.name, p.kind, p.model || "-", p.runtime || "-", badge(p.status),
        p.pid === null ? "-" : p.pid, p.port || "-",
        p.status === "up" ? duration(p.uptime_s) : "-", p.restarts, p.last_exit || ""]);
      for (const w of p.workers) {
        const row = ["worker " + w.endpoint, "worker", "-", "-", badge(w.status), "-", "-", "-", "-",
          w.reason || (w.holds ? "holds " + tokens(w.holds) + "B" : "")];
        row.rowClass = "worker";
        rows.push(row);
      }
    }
    fill("processes",
      table([["NAME"], ["KIND"], ["MODEL"], ["RUNTIME"], ["STATUS"], ["PID", 1], ["PORT", 1],
        ["UP FOR", 1], ["RESTARTS", 1], ["LAST EXIT"]], rows),
      note("supervisor " + d.stack.supervisor_pid + " since "
        + new Date(d.stack.started_at * 1000).toLocaleString()
        + (d.stack.stopping ? " · stopping" : "")));
  }

  function models(d) {
    const rows = d.models.map((m) => [m.model, m.role, badge(m.status),
      m.slots === null ? "-" : m.slots, m.waiting, m.requests, m.errors,
      tokens(m.tokens_in), tokens(m.tokens_out),
      m.tokens_per_s === null ? "-" : m.tokens_per_s.toFixed(1)]);
    fill("models",
      table([["MODEL"], ["ROLE"], ["STATUS"], ["SLOTS", 1], ["QUEUED", 1], ["REQUESTS", 1],
        ["ERRORS", 1], ["TOKENS IN", 1], ["TOKENS OUT", 1], ["TOKENS/S", 1]], rows),
      note("since the gateway started; tokens/s generated, over the last minute"));
  }

  function share(d) {
    const s = d.share;
    if (!s) {
      fill("share", note("no ledger"));
      return;
    }
    const W = 600, H = 180, L = 36, B = 20, T = 8;
    const n = s.days.length;
    const bw = (W - L) / Math.max(n, 1);
    const y = (v) => T + (1 - v) * (H - T - B);
    const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img",
      "aria-label": "local share of tokens by day" });
    for (const v of [0, 0.5, 1]) {
      chart.append(svg("line", { class: "axis", x1: L, x2: W, y1: y(v), y2: y(v) }));
      chart.append(svg("text", { x: L - 4, y: y(v) + 4, "text-anchor": "end" }, pct(v).replace(".0", "")));
    }
    s.days.forEach((day, i) => {
      const x = L + i * bw + 1, w = Math.max(bw - 2, 1);
      const v = day.share.value;
      const title = svg("title", {}, day.day + ": " + (v === null ? "no tokens"
        : mark(day.share, pct(v)) + " local, " + tokens(day.local_tokens.value) + " local / "
          + tokens(day.routed_tokens.value) + " routed tokens"));
      if (v === null) {
        chart.append(svg("rect", { class: "empty", x, y: y(0) - 2, width: w, height: 2 }, title));
        return;
      }
      chart.append(svg("rect", { class: "routed", x, y: y(1), width: w, height: y(v) - y(1) }));
      chart.append(svg("rect", { class: "local", x, y: y(v), width: w, height: y(0) - y(v) }, title));
    });
    chart.append(svg("line", { class: "target", x1: L, x2: W, y1: y(s.target), y2: y(s.target) }));
    chart.append(svg("text", { x: W - 2, y: y(s.target) - 3, "text-anchor": "end" },
      pct(s.target).replace(".0", "") + " / " + pct(1 - s.target).replace(".0", "")));
    if (n) {
      chart.append(svg("text", { x: L, y: H - 4 }, s.days[0].day));
      chart.append(svg("text", { x: W, y: H - 4, "text-anchor": "end" }, s.days[n - 1].day));
    }
    const overall = s.overall.value;
    fill("share",
      el("p", {}, el("span", { class: "figure" }, overall === null ? "-" : mark(s.overall, pct(overall))),
        " of tokens served here over the last " + d.window_days + " days "
        + (overall === null ? "" : overall >= s.target ? "(at or above the line)" : "(below the line)")),
      chart,
      el("p", { class: "legend" }, el("span", { class: "local" }, "■ local"),
        el("span", { class: "routed" }, "■ routed out"), el("span", {}, "- - the 95/5 line")));
  }

  function curve(d) {
    const c = d.curve;
    if (!c) {
      fill("curve", note("no cost figures (see the notes below)"));
      return;
    }
    const W = 600, H = 220, L = 64, B = 22, T = 10, R = 8;
    const last = c.months[c.months.length - 1];
    const top = Math.max(...c.owning, ...c.metered, 1e-9);
    const x = (m) => L + (m / last) * (W - L - R);
    const y = (v) => T + (1 - v / top) * (H - T - B);
    const line = (values) => values.map((v, i) => (i ? "L" : "M") + x(c.months[i]).toFixed(1)
      + " " + y(v).toFixed(1)).join(" ");
    const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img",
      "aria-label": "cumulative cost of owning against the meter" });
    for (const v of [0, top / 2, top]) {
      chart.append(svg("line", { class: "axis", x1: L, x2: W - R, y1: y(v), y2: y(v) }));
      chart.append(svg("text", { x: L - 4, y: y(v) + 4, "text-anchor": "end" }, money(v)));
    }
    const step = last > 48 ? 12 : last > 24 ? 6 : 3;
    for (let m = 0; m <= last; m += step) {
      chart.append(svg("text", { x: x(m), y: H - 6, "text-anchor": "middle" }, m));
    }
    chart.append(svg("path", { class: "metered", d: line(c.metered) },
      svg("title", {}, "the meter: " + mark({ source: c.metered_source }, money(c.metered[c.metered.length - 1], c.currency)) + " by month " + last)));
    chart.append(svg("path", { class: "owning", d: line(c.owning) },
      svg("title", {}, "owning: " + mark({ source: c.owning_source }, money(c.owning[c.owning.length - 1], c.currency)) + " by month " + last)));
    const even = c.break_even.value;
    if (even !== null && even <= last) {
      // Where the lines cross: the meter's bill at that month.
      const perMonth = c.metered.length > 1 ? c.metered[1] : 0;
      const at = perMonth * even;
      chart.append(svg("line", { class: "even", x1: x(even), x2: x(even), y1: T, y2: H - B }));
      chart.append(svg("circle", { class: "even", cx: x(even), cy: y(at), r: 4 }));
      chart.append(svg("text", { x: x(even) + 4, y: T + 10 },
        "break-even " + mark(c.break_even, even.toFixed(1)) + " months"));
    }
    const evenText = even === null ? "never at this volume"
      : even > last ? "after " + mark(c.break_even, even.toFixed(1)) + " months, beyond the chart"
        : "at " + mark(c.break_even, even.toFixed(1)) + " months";
    fill("curve",
      el("p", {}, "at ", el("span", { class: "figure" }, mark(c.daily_tokens, tokens(c.daily_tokens.value))),
        " tokens a day, owning breaks even " + evenText),
      chart,
      el("p", { class: "legend" }, el("span", { class: "owning" }, "— owning (hardware, then electricity)"),
        el("span", { class: "metered" }, "— the meter"), el("span", {}, "months →")),
      note(c.verdict));
  }

  function providers(d) {
    if (!d.providers.length) {
      fill("providers", note("no frontier provider: every request is served here"));
      return;
    }
    const W = 600, rowH = 26, L = 130;
    const chart = svg("svg", { viewBox: `0 0 ${W} ${d.providers.length * rowH + 4}`, role: "img",
      "aria-label": "spend per provider today against its cap" });
    // One scale for all: a cap is the grey bar behind its provider's spend.
    const whole = Math.max(...d.providers.map((p) => p.cap || (p.spent.value || 0) + p.reserved), 1e-9);
    const scale = (v) => Math.min(v / whole, 1) * (W - L - 4);
    d.providers.forEach((p, i) => {
      const y0 = i * rowH + 4, spent = p.spent.value || 0;
      chart.append(svg("text", { x: 0, y: y0 + 14 }, p.name));
      if (p.cap) chart.append(svg("rect", { class: "cap", x: L, y: y0, width: scale(p.cap), height: 18 }));
      chart.append(svg("rect", { class: "spent", x: L, y: y0, width: scale(spent), height: 18 }));
      chart.append(svg("rect", { class: "reserved", x: L + scale(spent), y: y0,
        width: Math.max(scale(spent + p.reserved) - scale(spent), 0), height: 18 }));
    });
    const rows = d.providers.map((p) => [p.name, mark(p.spent, money(p.spent.value, d.currency)),
      p.cap === null ? "no cap" : money(p.cap, d.currency),
      p.cap === null ? "-" : pct((p.spent.value || 0) / p.cap),
      money(p.reserved, d.currency), p.in_flight + (p.max_concurrent ? " / " + p.max_concurrent : "")]);
    fill("providers", chart,
      table([["PROVIDER"], ["SPENT", 1], ["CAP", 1], ["OF CAP", 1], ["RESERVED", 1], ["IN FLIGHT", 1]], rows),
      note("today (UTC); reserved: the worst case of the requests in flight"));
  }

  function apps(d) {
    if (!d.apps.length) {
      fill("apps", note("no request in the last " + d.window_days + " days"));
      return;
    }
    const rows = d.apps.map((a) => [a.name, a.requests,
      mark(a.local_tokens, tokens(a.local_tokens.value)), mark(a.routed_tokens, tokens(a.routed_tokens.value)),
      mark(a.at_meter, money(a.at_meter.value, d.currency)), mark(a.here, money(a.here.value, d.currency)),
      mark(a.saved, money(a.saved.value, d.currency))]);
    const unpriced = d.apps.some((a) => a.unpriced_tokens.value);
    fill("apps",
      table([["APP"], ["REQUESTS", 1], ["LOCAL TOKENS", 1], ["ROUTED", 1], ["ON THE METER", 1],
        ["HERE", 1], ["SAVED", 1]], rows),
      note("the last " + d.window_days + " days; on the meter: local tokens at the [cost] cloud prices"
        + " plus frontier spend" + (unpriced ? "; some local tokens are of models never benched, "
          + "not priced here (run 'sovctl bench MODEL')" : "")));
  }

  function audit(d) {
    const a = d.audit;
    if (!a) {
      fill("audit", note("no audit yet: run 'sovctl audit blackout'"));
      return;
    }
    const rows = a.checks.map((c) => [c.id, c.name, badge(c.passed ? "pass" : "fail")]);
    fill("audit",
      el("p", {}, badge(a.passed ? "pass" : "fail"), " " + a.kind + ", finished "
        + new Date(a.finished_at).toLocaleString() + " (" + a.file + ")"),
      table([["#", 1], ["CHECK"], ["RESULT"]], rows));
  }

  function render(d) {
    document.getElementById("where").textContent = d.stack ? d.stack.url : "";
    for (const draw of [processes, models, share, curve, providers, apps, audit]) {
      try {
        draw(d);
      } catch (e) {
        // One section that cannot be drawn leaves the others standing.
        fill(draw.name, note("not shown: " + e.message));
      }
    }
    const notes = d.notes.length ? " · " + d.notes.join(" · ") : "";
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString()
      + " in " + d.elapsed_ms.toFixed(1) + " ms" + notes;
  }

  // -- the key, and the polling ------------------------------------------------------------------
  function state(text, bad) {
    const s = document.getElementById("state");
    s.textContent = text;
    s.classList.toggle("bad", Boolean(bad));
  }

  function askKey(why) {
    document.getElementById("key").hidden = false;
    document.getElementById("main").hidden = true;
    if (why) document.getElementById("key-why").textContent = why;
    state("the data needs the API key", true);
    document.getElementById("key-input").focus();
  }

  function useKey() {
    const input = document.getElementById("key-input");
    const key = input.value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY, key);
    input.value = "";
    document.getElementById("key").hidden = true;
    document.getElementById("main").hidden = false;
    poll();
  }

  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(poll, POLL_MS);
  }

  async function poll() {
    const key = sessionStorage.getItem(KEY);
    let r;
    try {
      r = await fetch("data.json", {
        headers: key ? { Authorization: "Bearer " + key } : {},
        cache: "no-store", credentials: "omit", redirect: "error",
      });
    } catch (e) {
      state("the gateway does not answer (" + e.message + "); trying again", true);
      schedule();
      return;
    }
    if (r.status === 401) {
      sessionStorage.removeItem(KEY);
      askKey(key ? "That key was refused: the page takes the gateway's own key "
        + "(HOME/secrets/api_key), not an app's." : "");
      return;  // no polling until a key is given
    }
    if (!r.ok) {
      let message = "HTTP " + r.status;
      try { message = (await r.json()).error.message; } catch (e) { /* not JSON */ }
      state(message, true);
      schedule();
      return;
    }
    render(await r.json());
    state("live, every " + POLL_MS / 1000 + " s");
    schedule();
  }

  document.addEventListener("DOMContentLoaded", () => {
    document.getElementById("key-use").addEventListener("click", useKey);
    document.getElementById("key-input").addEventListener("keydown", (e) => {
      if (e.key === "Enter") useKey();
    });
    poll();
  });
})();
