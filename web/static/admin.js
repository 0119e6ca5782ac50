// The admin page: polls the admin API every 2 s with the token kept in sessionStorage (this tab only)
// and sent as "Authorization: Bearer".
"use strict";

const API = "/api/v1/admin";
const POLL_MS = 2000;
const TOKEN_KEY = "imgsvc-admin-token";
let timer = null;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child ?? ""));
  return node;
}

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

async function call(path, options = {}) {
  const response = await fetch(API + path, {
    ...options,
    headers: { "Authorization": "Bearer " + token(), "Content-Type": "application/json" },
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error((body.error && body.error.message) || response.statusText);
    error.status = response.status;
    throw error;
  }
  return body;
}

const fmt = {
  ms: (v) => (v === null || v === undefined ? "–" : v < 1000 ? `${Math.round(v)} ms` : `${(v / 1000).toFixed(1)} s`),
  age: (s) => (s === null || s === undefined ? "–" : s < 60 ? `${s.toFixed(1)} s` : `${(s / 60).toFixed(1)} min`),
  bytes: (b) => (b >= 1 << 30 ? `${(b / (1 << 30)).toFixed(1)} GiB` : b >= 1 << 20 ? `${(b / (1 << 20)).toFixed(1)} MiB`
    : `${Math.round(b / 1024)} KiB`),
  pct: (r) => (r === null || r === undefined ? "–" : `${(r * 100).toFixed(0)} %`),
  ago: (t) => `${Math.max(0, Date.now() / 1000 - t).toFixed(0)} s ago`,
};

function setStatus(state, text) {
  const status = document.getElementById("status");
  status.dataset.state = state;
  status.textContent = text;
}

function tile(label, value) {
  return el("div", { class: "tile" }, el("div", { class: "value" }, value), el("div", { class: "label" }, label));
}

function renderTiles(workers, queues, stats) {
  const children = workers.reduce((n, w) => n + w.pool_size, 0);
  const one = stats.windows["1m"], five = stats.windows["5m"];
  const perSecond = Object.values(one.models).reduce((n, m) => n + m.per_second, 0);
  const p95 = Math.max(...Object.values(five.models).map((m) => m.latency_ms.p95 ?? -1));
  const waiting = queues.reduce((n, q) => n + q.depth, 0);
  const oldest = Math.max(...queues.map((q) => q.oldest_age_s ?? -1));
  document.getElementById("tiles").replaceChildren(
    tile("workers / children", `${workers.length} / ${children}`),
    tile("jobs done per second (1 min)", perSecond.toFixed(2)),
    tile("end-to-end p95 (5 min)", fmt.ms(p95 < 0 ? null : p95)),
    tile("waiting jobs", waiting),
    tile("oldest waiting", fmt.age(oldest < 0 ? null : oldest)),
    tile("cache hit rate (5 min)", fmt.pct(five.cache.hit_rate)),
    tile("cached results", `${stats.cache_size.entries} (${fmt.bytes(stats.cache_size.bytes)})`),
  );
}

function actionButtons(worker) {
  const buttons = [
    el("button", { type: "button", "data-action": "grow", "data-name": worker.name, title: "add a child" }, "+1"),
    el("button", { type: "button", "data-action": "shrink", "data-name": worker.name, title: "remove a child",
      disabled: worker.pool_size <= 1 }, "−1"),
  ];
  const drain = worker.status === "draining" ? "resume" : "drain";
  buttons.push(el("button", { type: "button", "data-action": drain, "data-name": worker.name }, drain));
  return buttons;
}

function renderWorkers(workers) {
  const rows = workers.map((w) => {
    const kids = w.children;
    const gpu = kids.filter((c) => c.gpu_memory && c.gpu_memory.total)
      .map((c) => `${fmt.bytes(c.gpu_memory.used)} / ${fmt.bytes(c.gpu_memory.total)}`).join(", ") || "–";
    const latency = kids.map((c) => `${fmt.ms(c.latency_ms.p50)} / ${fmt.ms(c.latency_ms.p95)}`).join(", ");
    const devices = kids.map((c) => `${c.device} (${c.device_name})`).filter((v, i, a) => a.indexOf(v) === i);
    const models = Object.entries(w.models).map(([name, version]) => `${name} ${version}`).join(", ");
    const seen = Math.max(...kids.map((c) => c.last_seen));
    return el("tr", { class: "worker-row", "data-name": w.name },
      el("td", {}, w.name), el("td", {}, el("span", { class: `badge ${w.status}` }, w.status)),
      el("td", { class: "num" }, w.pool_size), el("td", {}, devices.join(", ")), el("td", {}, models),
      el("td", { class: "num" }, `${w.jobs_done} / ${w.jobs_failed}`),
      el("td", { class: "num" }, kids.map((c) => c.current_batch).join(", ")),
      el("td", {}, latency), el("td", {}, gpu), el("td", {}, fmt.ago(seen)),
      el("td", {}, ...actionButtons(w)));
  });
  if (!rows.length) rows.push(el("tr", {}, el("td", { colSpan: 11 }, "No live worker.")));
  document.getElementById("workers-body").replaceChildren(...rows);
}

function renderWebhookWorkers(nodes) {
  const rows = nodes.map((n) => el("tr", { class: "webhook-row", "data-name": n.name },
    el("td", {}, n.name), el("td", { class: "num" }, n.concurrency ?? "–"),
    ...["delivered", "retrying", "failed", "endpoint_gone"].map((k) => el("td", { class: "num" }, n[k] || 0)),
    el("td", {}, fmt.ago(n.last_seen))));
  if (!rows.length) rows.push(el("tr", {}, el("td", { colSpan: 7 }, "No live webhook worker: callbacks wait in the webhooks queue.")));
  document.getElementById("webhook-workers-body").replaceChildren(...rows);
}

function renderQueues(queues, shares) {
  document.getElementById("queues-body").replaceChildren(...queues.map((q) =>
    el("tr", { "data-queue": q.name }, el("td", {}, q.name), el("td", { class: "num" }, q.depth),
      el("td", { class: "num" }, q.lanes ? q.lanes.interactive : "–"),
      el("td", { class: "num" }, q.lanes ? q.lanes.bulk : "–"),
      el("td", { class: "num" }, fmt.age(q.oldest_age_s)))));
  const rows = (shares || []).map((s) => el("tr", { "data-share": s.share }, el("td", {}, s.share),
    el("td", { class: "num" }, s.in_flight)));
  if (!rows.length) rows.push(el("tr", {}, el("td", { colSpan: 2 }, "Nothing in flight.")));
  document.getElementById("shares-body").replaceChildren(...rows);
}

function renderModels(stats) {
  const models = stats.windows["5m"].models;
  const rows = Object.entries(models).map(([name, m]) => el("tr", {}, el("td", {}, name),
    el("td", { class: "num" }, m.per_second.toFixed(2)), el("td", { class: "num" }, m.failed),
    el("td", { class: "num" }, `${fmt.ms(m.latency_ms.p50)} / ${fmt.ms(m.latency_ms.p95)}`)));
  document.getElementById("models-body").replaceChildren(...rows);
  const cache = stats.windows["60m"].cache;
  document.getElementById("cache-info").textContent =
    `${stats.cache_size.entries} results, about ${fmt.bytes(stats.cache_size.bytes)}; last hour ` +
    `${cache.hits} hits, ${cache.misses} misses (${fmt.pct(cache.hit_rate)})`;
}

function drawChart(id, values) {
  const svg = document.getElementById(id);
  const width = 300, height = 80, pad = 4;
  const max = Math.max(1, ...values.map((v) => v ?? 0));
  const step = width / Math.max(1, values.length - 1);
  const points = values.map((v, i) => `${(i * step).toFixed(1)},${(height - pad - ((v ?? 0) / max) * (height - 2 * pad)).toFixed(1)}`);
  const ns = "http://www.w3.org/2000/svg";
  const area = document.createElementNS(ns, "polygon");
  area.setAttribute("class", "area");
  area.setAttribute("points", `0,${height} ${points.join(" ")} ${width},${height}`);
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("points", points.join(" "));
  const label = document.createElementNS(ns, "title");
  label.textContent = `max ${Math.round(max)}`;
  svg.replaceChildren(area, line, label);
  const caption = svg.parentElement.querySelector("figcaption");
  caption.dataset.title = caption.dataset.title || caption.textContent;
  caption.replaceChildren(el("span", {}, caption.dataset.title), el("span", { class: "max" }, `max ${Math.round(max)} · last hour`));
}

function renderCharts(series) {
  drawChart("chart-throughput", series.map((p) => p.done));
  drawChart("chart-latency", series.map((p) => p.p95_ms));
  drawChart("chart-depth", series.map((p) => Object.values(p.queue_depth).reduce((a, b) => a + b, 0)));
}

async function refresh() {
  try {
    // One call first: a wrong token costs one of the address's 10 failures a minute, not three.
    const workers = await call("/workers");
    const [queues, stats] = await Promise.all([call("/queues"), call("/stats")]);
    renderTiles(workers.workers, queues.queues, stats);
    renderWorkers(workers.workers);
    renderWebhookWorkers(workers.webhook_workers || []);
    renderQueues(queues.queues, queues.shares);
    renderModels(stats);
    renderCharts(stats.series);
    setStatus("ok", `live · ${new Date().toLocaleTimeString()}`);
  } catch (error) {
    if (error.status === 401) sessionStorage.removeItem(TOKEN_KEY);  // a reload must not try it again
    if (error.status === 401 || error.status === 429) return showLogin(error.message);
    setStatus("error", `error: ${error.message}`);
  }
}

function showLogin(message) {
  clearInterval(timer);
  timer = null;
  document.getElementById("dashboard").hidden = true;
  document.getElementById("login").hidden = false;
  document.getElementById("login-error").textContent = message || "";
  setStatus("idle", "not connected");
}

function start() {
  document.getElementById("login").hidden = true;
  document.getElementById("dashboard").hidden = false;
  refresh();
  clearInterval(timer);
  timer = setInterval(refresh, POLL_MS);
}

async function act(event) {
  const button = event.target.closest("button[data-action]");
  if (!button) return;
  const { action, name } = button.dataset;
  const result = document.getElementById("action-result");
  button.disabled = true;
  try {
    await call(`/workers/${encodeURIComponent(name)}/${action}`, { method: "POST", body: "{}" });
    result.textContent = `${action} ${name}: done`;
  } catch (error) {
    result.textContent = `${action} ${name}: ${error.message}`;
  }
  refresh();
}

async function purge(event) {
  event.preventDefault();
  const model = document.getElementById("purge-model").value.trim();
  const version = document.getElementById("purge-version").value.trim();
  const result = document.getElementById("purge-result");
  try {
    const body = await call("/cache/purge", { method: "POST", body: JSON.stringify({ model, version }) });
    result.textContent = `deleted ${body.deleted} keys of ${model} ${version}`;
  } catch (error) {
    result.textContent = error.message;
  }
}

document.getElementById("login").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, document.getElementById("token-input").value.trim());
  start();
});
document.getElementById("forget-token").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  showLogin();
});
document.getElementById("workers-body").addEventListener("click", act);
document.getElementById("purge").addEventListener("submit", purge);

// The token is typed in, never taken from the URL (the server answers /admin?token= with 400).
if (token()) start(); else showLogin();
