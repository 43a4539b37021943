// greenroute's page: the ladder, one prompt under a budget, its route and cost, and a chart
// of recent requests. Plain browser JavaScript; talks only to this server's public API.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const KEY_STORE = "greenroute.apiKey"; // sessionStorage: this tab only
  const REFRESH_MS = 5000;
  // Okabe-Ito: told apart with the common colour-vision deficiencies
  const PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00",
    "#000000", "#F0E442"];

  let apiKey = sessionStorage.getItem(KEY_STORE) || "";
  let waitingForKey = false;
  let running = null; // AbortController of the request in flight
  let variantNames = []; // ladder order: fixes each variant's colour
  let chart = null;
  let chartSeries = "";

  class AuthError extends Error {}

  const colour = (name) => {
    const i = variantNames.indexOf(name);
    return PALETTE[(i < 0 ? variantNames.length : i) % PALETTE.length];
  };
  const status = (text) => { $("status").textContent = text; };
  const num = (x, digits = 4) => (x === null || x === undefined || !Number.isFinite(x)
    ? "–" : Number(x.toPrecision(digits)).toString());
  const fixed = (x, d) => (x === null || x === undefined ? "–" : x.toFixed(d));

  function headers(extra = {}) {
    const h = { ...extra };
    if (apiKey) h.Authorization = `Bearer ${apiKey}`;
    return h;
  }

  async function errorText(resp) {
    try {
      const body = await resp.json();
      if (body && body.error) return `${body.error.message} (${body.error.type})`;
    } catch (_) { /* not JSON */ }
    return `HTTP ${resp.status}`;
  }

  // fetch with the key; a 401 opens the key form
  async function api(path, options = {}) {
    const resp = await fetch(path, { ...options, headers: headers(options.headers) });
    if (resp.status === 401) {
      const message = await errorText(resp);
      askForKey(apiKey ? `The server refused this key: ${message}` : "");
      throw new AuthError(message);
    }
    return resp;
  }

  function askForKey(message) {
    waitingForKey = true;
    $("key-section").hidden = false;
    $("key-error").textContent = message;
    status("This server needs an API key: enter it above.");
    if (document.activeElement !== $("api-key")) $("api-key").focus();
  }

  function cell(row, text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    row.appendChild(td);
    return td;
  }

  function variantCell(row, name) {
    const th = document.createElement("th");
    th.scope = "row";
    const dot = document.createElement("span");
    dot.className = "swatch";
    dot.style.background = colour(name);
    dot.setAttribute("aria-hidden", "true");
    th.append(dot, name);
    row.appendChild(th);
  }

  // -- the ladder ------------------------------------------------------------------------------
  async function loadLadder() {
    const resp = await api("/v1/variants");
    if (resp.status === 503) {
      $("ladder-meta").textContent = "The ladder is still loading…";
      return false;
    }
    if (!resp.ok) throw new Error(await errorText(resp));
    renderLadder(await resp.json());
    return true;
  }

  function renderLadder(body) {
    variantNames = body.data.map((v) => v.name);
    const m = body.energy_meter;
    $("ladder-meta").textContent = `Energy meter: ${m.description}. ` +
      `Device power now ${fixed(body.power_watts, 1)} W` +
      `${body.power_capped ? ", over its cap" : ""}. Tokens/s and J/token are the router's ` +
      "live decode estimates.";
    const tbody = $("ladder").tBodies[0];
    tbody.replaceChildren();
    for (const v of body.data) {
      const row = tbody.insertRow();
      row.dataset.variant = v.name;
      variantCell(row, v.name);
      cell(row, v.precision || "–");
      cell(row, v.parameters ? v.parameters.toLocaleString("en") : "–", "num");
      cell(row, fixed(v.quality, 3), "num");
      cell(row, v.task_score === null || v.task_score === undefined ? "–"
        : fixed(v.task_score, 2), "num");
      const c = v.cost;
      const tps = c && c.decode_ms_per_token > 0 ? 1000 / c.decode_ms_per_token : null;
      const jpt = c ? (c.decode_ms_per_token / 1000) * c.watts : null;
      cell(row, tps === null ? "–" : num(tps, 3), "num");
      cell(row, jpt === null ? "–" : num(jpt, 3), "num");
      cell(row, v.loaded ? `loaded (${v.runtime})` : `not loaded: ${v.error || "?"}`);
    }
    const select = $("variant");
    const chosen = select.value;
    select.replaceChildren(new Option("auto (routed)", "auto"));
    for (const v of body.data) {
      if (v.loaded) select.add(new Option(`${v.name} (quality ${fixed(v.quality, 3)})`, v.name));
    }
    select.value = [...select.options].some((o) => o.value === chosen) ? chosen : "auto";
  }

  // -- recent requests chart ----------------------------------------------------------------------
  async function loadRecent() {
    const resp = await api("/v1/requests/recent");
    if (!resp.ok) throw new Error(await errorText(resp));
    const body = await resp.json();
    renderChart(body.data);
    return body.data;
  }

  function renderChart(entries) {
    const box = $("chart");
    if (!entries.length || typeof uPlot === "undefined") return;
    const names = [...new Set([...variantNames, ...entries.map((e) => e.variant)])]
      .filter((n) => entries.some((e) => e.variant === n));
    const xs = entries.map((e) => e.finished_at);
    const data = [xs, ...names.map((n) => entries.map((e) => (e.variant === n
      ? e.energy.joules : null)))];
    const last = entries[entries.length - 1];
    const summary = `${entries.length} recent request${entries.length === 1 ? "" : "s"}; ` +
      `the latest used ${num(last.energy.joules)} J on ${last.variant}.`;
    $("chart-summary").textContent = summary;
    box.setAttribute("aria-label", `Chart of joules per request over time. ${summary}`);
    const key = names.join(",");
    if (chart && key === chartSeries) {
      chart.setData(data);
      return;
    }
    if (chart) chart.destroy();
    chartSeries = key;
    const opts = {
      width: Math.max(box.clientWidth, 200),
      height: 260,
      scales: {
        // at least a minute wide (for a lone point uPlot would otherwise span years)
        x: { time: true, range: (_u, lo, hi) => {
          const pad = Math.max(0, 60 - (hi - lo)) / 2;
          return [lo - pad, hi + pad];
        } },
        y: { range: (_u, _lo, hi) => [0, hi > 0 ? hi * 1.15 : 1] },
      },
      axes: [{}, { label: "joules per request", size: 70 }],
      series: [{ label: "time" }, ...names.map((n) => ({
        label: n,
        stroke: colour(n),
        fill: colour(n),
        width: 0,
        paths: () => null,
        points: { show: true, size: 8, fill: colour(n), stroke: colour(n) },
        value: (_u, v) => (v === null ? "–" : `${num(v)} J`),
      }))],
    };
    chart = new uPlot(opts, data, box);
  }

  new ResizeObserver(() => {
    if (chart) chart.setSize({ width: Math.max($("chart").clientWidth, 200), height: 260 });
  }).observe($("chart"));

  async function refresh() {
    if (waitingForKey || document.hidden) return;
    try {
      if (await loadLadder()) {
        await loadRecent();
        if (!running) status("");
      }
    } catch (err) {
      if (!(err instanceof AuthError)) status(`Could not reach the server: ${err.message}`);
    }
  }

  // -- one prompt ---------------------------------------------------------------------------------
  function readNumber(id) {
    const input = $(id);
    if (input.value.trim() === "") return undefined;
    const label = input.labels[0].textContent.trim().split("\n")[0];
    if (!input.checkValidity()) throw new RangeError(`${label}: ${input.validationMessage}`);
    return Number(input.value);
  }

  function requestFor(mode) {
    const prompt = $("prompt").value;
    if (!prompt.trim()) throw new RangeError("Write a prompt first.");
    const tokens = readNumber("max-tokens");
    const temperature = readNumber("temperature");
    const seed = readNumber("seed");
    const latency = readNumber("latency");
    const quality = readNumber("min-quality");
    const joules = readNumber("max-joules");
    const variant = $("variant").value;
    if (mode === "completion") {
      const budget = { latency_ms: latency, min_quality: quality, max_joules: joules };
      return ["/v1/generate", {
        prompt, max_new_tokens: tokens, temperature, seed, stream: true, variant, budget,
      }];
    }
    return ["/v1/chat/completions", {
      model: variant, messages: [{ role: "user", content: prompt }], max_tokens: tokens,
      temperature, seed, stream: true, latency_budget_ms: latency, min_quality: quality,
      max_joules: joules,
    }];
  }

  // Server-Sent Events: yields each event's `data` (one JSON document or "[DONE]")
  async function* sseData(resp) {
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).trimStart()).join("\n");
        if (data) yield data;
      }
    }
  }

  function setAnswerState(state) {
    const answer = $("answer");
    answer.dataset.state = state;
    answer.setAttribute("aria-busy", state === "streaming" ? "true" : "false");
  }

  function appendToken(text) {
    const answer = $("answer");
    answer.append(text);
    answer.dataset.events = String(Number(answer.dataset.events) + 1);
    answer.scrollTop = answer.scrollHeight;
  }

  async function send(event) {
    event.preventDefault();
    if (running) return;
    $("form-error").textContent = "";
    const mode = new FormData($("prompt-form")).get("mode");
    let path;
    let body;
    try {
      [path, body] = requestFor(mode);
    } catch (err) {
      $("form-error").textContent = err.message;
      return;
    }
    const answer = $("answer");
    answer.replaceChildren();
    answer.dataset.events = "0";
    $("result").hidden = true;
    setAnswerState("streaming");
    $("answer-meta").textContent = "Routing…";
    running = new AbortController();
    $("send").disabled = true;
    $("stop").disabled = false;
    let record = null;
    let id = null;
    let usage = null;
    let served = null;
    try {
      const resp = await api(path, {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body), signal: running.signal,
      });
      if (!resp.ok) throw new Error(await errorText(resp));
      served = resp.headers.get("X-Greenroute-Variant");
      $("answer-meta").textContent = `Streaming from ${served}…`;
      for await (const data of sseData(resp)) {
        if (data === "[DONE]") break;
        const msg = JSON.parse(data);
        if (msg.error) throw new Error(`${msg.error.message} (${msg.error.type})`);
        if (mode === "completion") {
          if (msg.type === "token" && msg.text) appendToken(msg.text);
          if (msg.type === "done") record = msg;
        } else {
          id = id || msg.id.replace(/^chatcmpl-/, "");
          const delta = msg.choices[0].delta.content;
          if (delta) appendToken(delta);
          if (msg.usage) usage = msg.usage;
        }
      }
      if (mode === "chat" && id) {
        // the chat answer carries usage and energy only: the route comes from the recent list
        const entries = await loadRecent();
        record = entries.find((e) => e.id === id) || fromUsage(id, served, usage);
      }
      if (!record) throw new Error("the answer ended without its cost");
      setAnswerState("done");
      showResult(record);
    } catch (err) {
      setAnswerState("failed");
      if (err.name === "AbortError") {
        $("answer-meta").textContent = "Stopped.";
      } else if (!(err instanceof AuthError)) {
        $("answer-meta").textContent = "Failed.";
        $("form-error").textContent = err.message;
      }
    } finally {
      running = null;
      $("send").disabled = false;
      $("stop").disabled = true;
    }
    refresh();
  }

  // a chat answer no longer in the recent list (a busy server): its cost without the route
  function fromUsage(id, variant, u) {
    if (!u) return null;
    return {
      id, variant, latency_ms: null, route: null,
      usage: { prompt_tokens: u.prompt_tokens, completion_tokens: u.completion_tokens },
      energy: {
        joules: u.energy_joules, avg_watts: u.avg_watts, source: u.energy_source, device: "",
        estimated: u.energy_estimated, gco2e: u.gco2e,
        joules_per_token: u.completion_tokens ? u.energy_joules / u.completion_tokens : null,
        note: "The route is no longer in this server's list of recent requests.",
      },
    };
  }

  function setNumber(id, value, digits) {
    const el = $(id);
    el.textContent = num(value, digits);
    el.dataset.value = value === null || value === undefined ? "" : String(value);
  }

  function showResult(r) {
    const e = r.energy;
    $("r-variant").textContent = r.variant;
    $("r-variant").dataset.value = r.variant;
    const reason = r.route ? r.route.reason.replaceAll("_", " ") : "–";
    $("r-reason").textContent = reason;
    setNumber("r-joules", e.joules);
    setNumber("r-watts", e.avg_watts, 3);
    setNumber("r-jpt", e.joules_per_token);
    const estimated = e.estimated && e.source !== "estimate" ? " (estimated)" : "";
    $("r-source").textContent = `${e.source}${estimated}${e.device ? ` on ${e.device}` : ""}`;
    $("r-gco2e-row").hidden = e.gco2e === null || e.gco2e === undefined;
    setNumber("r-gco2e", e.gco2e);
    setNumber("r-latency", r.latency_ms, 4);
    $("r-tokens").textContent = `${r.usage.prompt_tokens} prompt, ` +
      `${r.usage.completion_tokens} generated`;
    $("r-id").textContent = r.id;
    $("r-note").textContent = e.note || "";
    const tbody = $("route").tBodies[0];
    tbody.replaceChildren();
    for (const c of r.route ? r.route.candidates : []) {
      const row = tbody.insertRow();
      row.dataset.variant = c.variant;
      if (c.variant === r.variant) row.className = "chosen";
      else if (!c.eligible) row.className = "ineligible";
      variantCell(row, c.variant);
      cell(row, fixed(c.quality, 3), "num");
      cell(row, num(c.predicted_latency_ms), "num");
      cell(row, num(c.predicted_joules), "num");
      cell(row, c.eligible ? "yes" : `no: ${c.why.replaceAll("_", " ")}`, "why");
    }
    $("result").hidden = false;
    const summary = `Served by ${r.variant} (${reason}): ` +
      `${num(e.joules)} J at ${num(e.avg_watts, 3)} W.`;
    $("answer-meta").textContent = summary;
    status(`Done. ${summary}`);
  }

  // -- wiring -----------------------------------------------------------------------------------
  $("prompt-form").addEventListener("submit", send);
  $("prompt").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) {
      ev.preventDefault();
      $("prompt-form").requestSubmit();
    }
  });
  document.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape" && running) running.abort();
  });
  $("stop").addEventListener("click", () => running && running.abort());
  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    apiKey = $("api-key").value.trim();
    sessionStorage.setItem(KEY_STORE, apiKey);
    waitingForKey = false;
    $("key-section").hidden = true;
    $("key-error").textContent = "";
    status("Checking the key…");
    refresh();
  });
  document.addEventListener("visibilitychange", refresh);
  refresh();
  setInterval(refresh, REFRESH_MS);
})();
