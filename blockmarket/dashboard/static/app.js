// BlockMarket dashboard: live over server-sent events from `blockmarket dashboard` (no libraries, no CDN).
"use strict";

const PALETTE = ["#4ea1ff", "#ffcc4d", "#ff6b6b", "#51d88a", "#c084fc", "#ff9f43", "#2dd4bf", "#f472b6"];
const TRADE_FADE_MS = 1500;
const HISTORY = 600;

const state = {
  markets: {},        // name -> {status, roster, view, metrics, history, reloads}
  selected: null,     // market name
  trades: [],         // {a: [x, y], b: [x, y], at}
  drawn: [],          // [{id, x, y, r, k}] of the last frame (canvas pixels)
  agent: null,        // selected agent id
  connected: false,
};

const $ = (id) => document.getElementById(id);
const fmt = (v, digits = 2) => (v === null || v === undefined || Number.isNaN(v) ? "–" : Number(v).toFixed(digits));
const count = (v) => (v === null || v === undefined ? "–" : String(Math.round(v)));

function market() {
  return state.markets[state.selected] || null;
}

function ensureMarket(name) {
  if (!state.markets[name]) {
    state.markets[name] = { name, status: null, roster: null, view: null, metrics: null, history: [], reloads: [] };
  }
  if (state.selected === null) state.selected = name;
  return state.markets[name];
}

// ------------------------------------------------------------------------------------------ events

function connect() {
  const events = new EventSource("events");
  events.onopen = () => { state.connected = true; renderConnection(); };
  events.onerror = () => { state.connected = false; renderConnection(); };
  events.addEventListener("snapshot", (e) => {
    const data = JSON.parse(e.data);
    state.markets = {};
    for (const [name, m] of Object.entries(data.markets)) Object.assign(ensureMarket(name), m);
    state.metricsError = data.metrics_error;
    state.metricsUrl = data.metrics_url;
    renderAll();
  });
  events.addEventListener("view", (e) => {
    const data = JSON.parse(e.data);
    const m = ensureMarket(data.market);
    m.view = data.view;
    m.history.push(data.point);
    if (m.history.length > HISTORY) m.history.splice(0, m.history.length - HISTORY);
    if (data.market === state.selected) addTrades(data.view);
    renderAll();
  });
  for (const kind of ["status", "roster", "metrics"]) {
    events.addEventListener(kind, (e) => {
      const data = JSON.parse(e.data);
      ensureMarket(data.market)[kind] = data[kind];
      renderAll();
    });
  }
  events.addEventListener("reload", (e) => {
    const data = JSON.parse(e.data);
    ensureMarket(data.market).reloads.push(data.reload);
    renderAll();
  });
}

function addTrades(view) {
  const now = performance.now();
  for (const [a, b] of view.trades) {
    state.trades.push({ a: view.positions[a], b: view.positions[b], at: now });
  }
  if (state.trades.length > 2000) state.trades.splice(0, state.trades.length - 2000);
}

// ------------------------------------------------------------------------------------------ grid

function drawGrid() {
  const canvas = $("grid");
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height;
  ctx.clearRect(0, 0, W, H);
  const m = market();
  const drawn = [];
  if (m && m.view) {
    const v = m.view;
    const scale = (W - 20) / v.world_size;
    const px = (p) => [10 + p[0] * scale, 10 + p[1] * scale];
    ctx.strokeStyle = "#1f2733";
    for (let g = 0; g <= 10; g++) {
      const at = 10 + (g * (W - 20)) / 10;
      ctx.beginPath(); ctx.moveTo(at, 10); ctx.lineTo(at, H - 10); ctx.moveTo(10, at); ctx.lineTo(W - 10, at); ctx.stroke();
    }
    const now = performance.now();
    state.trades = state.trades.filter((t) => now - t.at < TRADE_FADE_MS);
    for (const t of state.trades) {
      const [x1, y1] = px(t.a), [x2, y2] = px(t.b);
      ctx.strokeStyle = `rgba(255,255,255,${0.6 * (1 - (now - t.at) / TRADE_FADE_MS)})`;
      ctx.lineWidth = 1.2;
      ctx.beginPath(); ctx.moveTo(x1, y1); ctx.lineTo(x2, y2); ctx.stroke();
    }
    let lo = Infinity, hi = -Infinity;
    for (const f of v.fitness) { lo = Math.min(lo, f); hi = Math.max(hi, f); }
    const span = hi - lo || 1;
    v.agent_ids.forEach((id, k) => {
      const [x, y] = px(v.positions[k]);
      const r = 3 + 9 * ((v.fitness[k] - lo) / span);
      ctx.fillStyle = PALETTE[v.desired[k] % PALETTE.length];
      ctx.globalAlpha = 0.85;
      ctx.beginPath(); ctx.arc(x, y, r, 0, 2 * Math.PI); ctx.fill();
      ctx.globalAlpha = 1;
      if (id === state.agent) {
        ctx.strokeStyle = "#fff"; ctx.lineWidth = 2;
        ctx.beginPath(); ctx.arc(x, y, r + 4, 0, 2 * Math.PI); ctx.stroke();
      }
      drawn.push({ id, x, y, r, k });
    });
  } else {
    ctx.fillStyle = "#8a94a6";
    ctx.fillText("waiting for the simulator's market view (blockmarket simulate)…", 20, 30);
  }
  state.drawn = drawn;
}

function agentAt(event) {
  const canvas = $("grid");
  const box = canvas.getBoundingClientRect();
  const x = ((event.clientX - box.left) * canvas.width) / box.width;
  const y = ((event.clientY - box.top) * canvas.height) / box.height;
  let best = null, bestD = Infinity;
  for (const a of state.drawn) {
    const d = Math.hypot(a.x - x, a.y - y);
    if (d <= a.r + 4 && d < bestD) { best = a; bestD = d; }
  }
  return best;
}

function onHover(event) {
  const tip = $("tooltip");
  const a = agentAt(event);
  const m = market();
  if (!a || !m || !m.view) { tip.hidden = true; return; }
  const v = m.view;
  tip.hidden = false;
  tip.textContent = `${a.id} · wants ${v.items[v.desired[a.k]]} · fitness ${fmt(v.fitness[a.k])}`;
  const panel = $("grid").parentElement.getBoundingClientRect();
  tip.style.left = `${event.clientX - panel.left + 14}px`;
  tip.style.top = `${event.clientY - panel.top + 14}px`;
}

function onClick(event) {
  const a = agentAt(event);
  if (!a) return;
  state.agent = a.id;
  loadMatrix();
}

async function loadMatrix() {
  const m = market();
  if (!state.agent || !m) return;
  const url = `api/matrix?market=${encodeURIComponent(m.name)}&agent=${encodeURIComponent(state.agent)}`;
  const response = await fetch(url);
  $("matrix-agent").textContent = state.agent;
  if (!response.ok) {
    $("matrix").innerHTML = "";
    $("matrix-note").textContent = "no answer from the runtime for this agent yet";
    return;
  }
  renderMatrix(await response.json());
}

function renderMatrix(data) {
  const items = data.items || data.matrix.map((_, i) => `item ${i}`);
  const table = $("matrix");
  table.innerHTML = "";
  const head = table.insertRow();
  head.appendChild(document.createElement("th")).textContent = "give ↓ / get →";
  for (const item of items) head.appendChild(document.createElement("th")).textContent = item;
  data.matrix.forEach((line, i) => {
    const row = table.insertRow();
    row.appendChild(document.createElement("th")).textContent = items[i];
    line.forEach((value, j) => {
      const cell = row.insertCell();
      cell.textContent = value.toFixed(3);
      if (i === j) cell.className = "diag";
    });
  });
  table.dataset.agent = data.agent;
  $("matrix-note").textContent = `answer to tick ${data.tick}: units of the column item asked for one unit of the row item`;
}

// ------------------------------------------------------------------------------------------ curves

function drawCurve(canvasId, key, colour) {
  const canvas = $(canvasId);
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height, pad = 34;
  ctx.clearRect(0, 0, W, H);
  const m = market();
  const points = m ? m.history.filter((p) => p[key] !== null && p[key] !== undefined) : [];
  if (points.length < 2) return;
  const t0 = points[0].tick, t1 = points[points.length - 1].tick || t0 + 1;
  let lo = Math.min(...points.map((p) => p[key])), hi = Math.max(...points.map((p) => p[key]));
  if (hi - lo < 1e-9) { lo -= 1; hi += 1; }
  const X = (t) => pad + ((t - t0) / Math.max(t1 - t0, 1)) * (W - pad - 8);
  const Y = (v) => H - 18 - ((v - lo) / (hi - lo)) * (H - 30);
  ctx.fillStyle = "#8a94a6"; ctx.font = "11px system-ui";
  ctx.fillText(hi.toFixed(2), 2, 14); ctx.fillText(lo.toFixed(2), 2, H - 18);
  ctx.fillText(`tick ${t0}`, pad, H - 4); ctx.fillText(`tick ${t1}`, W - 70, H - 4);
  for (const r of m.reloads) {
    if (r.tick === null || r.tick < t0) continue;
    const x = X(r.tick);
    ctx.strokeStyle = "#ffcc4d"; ctx.setLineDash([4, 4]);
    ctx.beginPath(); ctx.moveTo(x, 4); ctx.lineTo(x, H - 16); ctx.stroke();
    ctx.setLineDash([]); ctx.fillStyle = "#ffcc4d"; ctx.fillText(`gen ${r.generation}`, x + 3, 12);
  }
  ctx.strokeStyle = colour; ctx.lineWidth = 1.6;
  ctx.beginPath();
  points.forEach((p, i) => (i ? ctx.lineTo(X(p.tick), Y(p[key])) : ctx.moveTo(X(p.tick), Y(p[key]))));
  ctx.stroke();
}

// ------------------------------------------------------------------------------------------ panels

function renderConnection() {
  const el = $("connection");
  el.textContent = state.connected ? "live" : "disconnected (retrying)";
  el.className = state.connected ? "good" : "bad";
}

function renderMarkets() {
  const select = $("market");
  const names = Object.keys(state.markets).sort();
  if (select.options.length !== names.length || names.some((n, i) => select.options[i].value !== n)) {
    select.innerHTML = "";
    for (const name of names) select.add(new Option(name, name));
  }
  if (state.selected !== null) select.value = state.selected;
}

function renderFigures() {
  const m = market() || {};
  const v = m.view, s = m.status, x = m.metrics;
  $("tick").textContent = v ? String(v.tick) : "–";
  const served = m.roster ? m.roster.agent_ids.length : s ? s.agents : null;
  $("agents").textContent = v ? `${v.agents_total} in the market, ${count(served)} served` : count(served);
  const counters = x || s || {};
  const pick = (metric, status) => (x ? x[metric] : s ? s[status] : null);
  $("served").textContent = count(pick("ticks_served", "ticks_served"));
  $("skipped").textContent = count(pick("ticks_skipped", "ticks_skipped"));
  const dropped = counters.dropped || {};
  const total = Object.values(dropped).reduce((a, b) => a + b, 0);
  $("dropped").textContent = total ? `${count(total)} (${Object.entries(dropped).map(([k, n]) => `${k} ${count(n)}`).join(", ")})` : "0";
  $("unpublished").textContent = count(pick("ticks_unpublished", "ticks_unpublished"));
  $("answered").textContent = v ? `${v.answered} of ${v.ticks_sent}` : "–";
  $("game-latency").textContent = v ? `${fmt(v.latency_p50_ms)} / ${fmt(v.latency_p99_ms)}` : "–";
  $("runtime-latency").textContent = s ? `${fmt(s.latency_p50_ms)} / ${fmt(s.latency_p99_ms)}` : "–";
  $("metrics-latency").textContent = x ? `${fmt(x.tick_p50_ms)} / ${fmt(x.tick_p99_ms)}` : "–";
}

function renderModels() {
  const m = market() || {};
  const versions = (m.metrics && Object.keys(m.metrics.models).length ? m.metrics.models : null)
    || (m.roster ? m.roster.model_versions : {});
  const models = $("models");
  models.innerHTML = "";
  const head = models.insertRow();
  for (const h of ["model", "version"]) head.appendChild(document.createElement("th")).textContent = h;
  for (const [model, version] of Object.entries(versions).sort()) {
    const row = models.insertRow();
    row.insertCell().textContent = model;
    row.insertCell().textContent = version;
  }
  const units = $("units");
  units.innerHTML = "";
  if (m.metrics && m.metrics.units.length) {
    const uh = units.insertRow();
    for (const h of ["unit", "provider", "agents", "nodes QNN / CPU"]) uh.appendChild(document.createElement("th")).textContent = h;
    for (const u of m.metrics.units) {
      const row = units.insertRow();
      row.insertCell().textContent = u.name;
      row.insertCell().textContent = (u.provider || "").replace("ExecutionProvider", "");
      row.insertCell().textContent = count(u.agents);
      row.insertCell().textContent = `${count(u.nodes_qnn)} / ${count(u.nodes_cpu)}`;
    }
  }
  const generation = m.roster ? m.roster.pool_generation : m.status ? m.status.pool_generation : null;
  const reloads = m.reloads ? m.reloads.length : 0;
  $("generation").textContent = generation === null ? "" : `pool generation ${generation}, ${reloads} reload(s) seen`;
  $("metrics-state").textContent = state.metricsError
    ? `metrics: ${state.metricsError}`
    : state.metricsUrl ? `metrics: ${state.metricsUrl}` : "metrics: no URL (dashboard.metrics_url)";
}

function renderLegend() {
  const m = market();
  const items = (m && m.view && m.view.items) || (m && m.roster && m.roster.items) || [];
  $("legend").innerHTML = items.map((item, i) => `<span><i style="background:${PALETTE[i % PALETTE.length]}"></i>${item}</span>`).join("");
}

let pending = false;
function renderAll() {
  if (pending) return;
  pending = true;
  requestAnimationFrame(() => {
    pending = false;
    renderMarkets();
    renderFigures();
    renderModels();
    renderLegend();
    drawCurve("fitness-curve", "fitness_mean", "#51d88a");
    drawCurve("trade-curve", "trade_rate", "#4ea1ff");
  });
}

function animate() {
  drawGrid();
  requestAnimationFrame(animate);
}

// For tests and the curious: what is on the page, in data.
window.dashboard = {
  state,
  drawnAgents: () => state.drawn.map((a) => a.id),
  agentPosition: (id) => {
    const a = state.drawn.find((d) => d.id === id);
    return a ? { x: a.x, y: a.y } : null;
  },
};

$("grid").addEventListener("mousemove", onHover);
$("grid").addEventListener("mouseleave", () => { $("tooltip").hidden = true; });
$("grid").addEventListener("click", onClick);
$("market").addEventListener("change", (e) => { state.selected = e.target.value; state.trades = []; renderAll(); });
setInterval(loadMatrix, 1000);  // the selected agent's matrix follows the answers
connect();
animate();
