// The operator page: polls the API (CONTRACT.md, "The operator page") and renders what it answers.
// No framework, no build step. Data is only ever inserted as text (textContent), never as HTML.
"use strict";

const STATS_EVERY_MS = 1000;
const LISTS_EVERY_MS = 2000;
const REQUEST_TIMEOUT_MS = 5000;
const NANOTON_PER_TON = 1000000000n;

const $ = (id) => document.getElementById(id);
const failures = new Map(); // source -> message, while that source fails

// Money never goes through a float: amounts (keys ending in "_nanoton") keep the digits of the JSON text
// where the browser exposes them (JSON.parse source text access), else the integer as parsed.
function parseJson(text) {
  return JSON.parse(text, function (key, value, context) {
    if (key.endsWith("_nanoton") && typeof value === "number") {
      return context && typeof context.source === "string" ? context.source : String(value);
    }
    return value;
  });
}

async function getJson(path) {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), REQUEST_TIMEOUT_MS);
  try {
    // no-cache: revalidate with the ETag each time (a 304 reuses the cached body).
    const response = await fetch(path, { cache: "no-cache", signal: abort.signal });
    const text = await response.text();
    if (!response.ok) {
      let detail = "";
      try { detail = parseJson(text).error.message; } catch (_) { /* not our error body */ }
      throw new Error(`${path}: HTTP ${response.status}${detail ? ": " + detail : ""}`);
    }
    return parseJson(text);
  } catch (e) {
    throw new Error(e.name === "AbortError" ? `${path}: no answer in ${REQUEST_TIMEOUT_MS / 1000} s` : e.message);
  } finally {
    clearTimeout(timer);
  }
}

// ---- formatting ----

function int(n) {
  return n === null || n === undefined ? "–" : String(n);
}

// "123456789012" (nanoton) -> "123.456789012"; exact, with BigInt.
function ton(nanoton) {
  if (nanoton === null || nanoton === undefined) return "–";
  const digits = String(nanoton);
  if (!/^-?\d+$/.test(digits)) return "?";
  let n = BigInt(digits);
  const sign = n < 0n ? "-" : "";
  if (n < 0n) n = -n;
  const frac = (n % NANOTON_PER_TON).toString().padStart(9, "0");
  return `${sign}${n / NANOTON_PER_TON}.${frac}`;
}

function rate(x) {
  return typeof x === "number" && isFinite(x) ? x.toFixed(2) : "–";
}

// RFC 3339 -> "2026-11-23 04:00:00Z" (to the second).
function when(ts) {
  if (!ts) return "–";
  const m = /^(\d{4}-\d{2}-\d{2})T(\d{2}:\d{2}:\d{2})/.exec(ts);
  return m ? `${m[1]} ${m[2]}Z` : String(ts);
}

function ago(ts) {
  const t = Date.parse(ts);
  if (!ts || isNaN(t)) return "–";
  const s = Math.max(0, Math.round((Date.now() - t) / 1000));
  if (s < 120) return `${s} s ago`;
  if (s < 7200) return `${Math.round(s / 60)} min ago`;
  return when(ts);
}

function short(id, n = 8) {
  return id ? String(id).slice(0, n) : "–";
}

function setText(id, text) {
  const el = $(id);
  if (el && el.textContent !== text) el.textContent = text;
}

function cell(text, cls, title) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  if (title) td.title = title;
  return td;
}

function fillTable(id, rows, columns, empty) {
  const body = $(id).tBodies[0];
  const fresh = document.createElement("tbody");
  if (rows.length === 0) {
    const tr = fresh.insertRow();
    const td = cell(empty, "empty");
    td.colSpan = columns;
    tr.appendChild(td);
  }
  for (const cells of rows) {
    const tr = fresh.insertRow();
    for (const c of cells) tr.appendChild(c);
  }
  body.replaceWith(fresh);
}

// ---- renderers ----

function renderStats(s) {
  const t = s.tasks || {}, by = t.by_status || {}, q = s.queue || {}, band = q.by_band || {};
  const th = s.throughput || {}, w = s.workers || {}, p = s.payments || {};
  setText("updated-at", s.generated_at || "–");
  setText("tasks-total", int(t.total));
  setText("tasks-completed", int(by.completed));
  setText("tasks-running", int(by.running));
  setText("tasks-failed", int(by.failed));
  setText("queue-high", int(band.high));
  setText("queue-medium", int(band.medium));
  setText("queue-low", int(band.low));
  setText("queue-waiting", int(q.waiting));
  setText("throughput-per-second", rate(th.completed_per_second));
  setText("throughput-completed-minute", int(th.completed_last_minute));
  setText("throughput-submitted-minute", int(th.submitted_last_minute));
  setText("dead-letters", int(s.dead_letters));
  $("dead-letters").classList.toggle("bad", Number(s.dead_letters) > 0);
  setText("workers-active", int(w.active));
  setText("workers-draining", int(w.draining));
  setText("workers-gpus", int(w.gpus));
  setText("workers-running-tasks", int(w.running_tasks));
  setText("payments-accrued", ton(p.accrued_nanoton));
  setText("payments-pending", ton(p.pending_nanoton));
  setText("payments-in-flight", ton(p.in_flight_nanoton));
  setText("payments-paid", ton(p.paid_nanoton));

  // One row per projection and stream, its partitions summed up: the furthest checkpoint, the stream's head,
  // the frames still to apply and how many partitions are behind.
  const groups = new Map();
  for (const r of s.projections || []) {
    const key = `${r.projection}\u0000${r.stream}`;
    const g = groups.get(key) || { projection: r.projection, stream: r.stream, partitions: 0, checkpoint: 0,
      head: 0, lag: 0, behind: 0 };
    g.partitions += 1;
    g.checkpoint = Math.max(g.checkpoint, Number(r.checkpoint) || 0);
    g.head = Math.max(g.head, Number(r.head) || 0);
    g.lag += Number(r.lag_frames) || 0;
    if (r.lag_frames > 0) g.behind += 1;
    groups.set(key, g);
  }
  const rows = [...groups.values()].map((g) => [
    cell(g.projection), cell(g.stream), cell(int(g.partitions), "n"), cell(int(g.checkpoint), "n"),
    cell(int(g.head), "n"), cell(int(g.lag), g.lag > 0 ? "n warn" : "n"), cell(int(g.behind), g.behind > 0 ? "n warn" : "n"),
  ]);
  fillTable("projections-table", rows, 7, "no projections yet");
}

function gpuList(gpus) {
  const td = document.createElement("td");
  const ul = document.createElement("ul");
  ul.className = "gpus";
  for (const g of gpus || []) {
    const li = document.createElement("li");
    const util = g.utilization_percent === null || g.utilization_percent === undefined ? "–" : `${g.utilization_percent}%`;
    const used = g.memory_used_mib === null || g.memory_used_mib === undefined ? "–" : g.memory_used_mib;
    li.textContent = `#${g.index} ${g.name} · ${used}/${int(g.memory_total_mib)} MiB · ${util}` +
      (g.simulated ? " [simulated]" : "");
    ul.appendChild(li);
  }
  if (!ul.firstChild) ul.textContent = "none";
  td.appendChild(ul);
  return td;
}

function renderWorkers(list) {
  const items = list.items || [];
  const rows = items.map((w) => [
    cell(w.worker_id, "id"),
    cell(w.status, `status-${w.status}`),
    cell(w.admission, w.admission === "attested" ? "" : "warn",
      w.attestation_valid_until ? `attestation valid until ${w.attestation_valid_until}` : ""),
    cell(w.region || "–"),
    cell(int(w.price_per_gpu_second), "n"),
    cell(`${int(w.running_tasks)}/${int(w.max_concurrent)}`, "n"),
    cell(ago(w.last_heartbeat_at), "", w.last_heartbeat_at || ""),
    gpuList(w.gpus),
  ]);
  fillTable("workers-table", rows, 8, "no workers registered");
  setText("workers-meta", `${items.length}${list.next_cursor ? "+" : ""} listed`);
}

function renderSettlements(list) {
  const rows = (list.items || []).map((s) => [
    cell(s.settlement_id || "–", "id"),
    cell(s.status, `status-${s.status}`, s.failure_reason || ""),
    cell(int(s.wallet_seqno), "n"),
    cell(int(Array.isArray(s.payouts) ? s.payouts.length : s.payouts), "n"),
    cell(ton(s.total_nanoton), "n"),
    cell(when(s.prepared_at)),
    cell(when(s.confirmed_at)),
    cell(s.tx_hash ? short(s.tx_hash, 12) + "…" : "–", "id", s.tx_hash || ""),
  ]);
  fillTable("settlements-table", rows, 8, "no settlements yet");
}

// ---- polling ----

function showStatus() {
  const banner = $("api-status");
  if (failures.size === 0) {
    banner.hidden = true;
    document.body.classList.remove("stale");
    return;
  }
  const [first, ...rest] = failures.values();
  const more = rest.length ? ` (and ${rest.length} more failing)` : "";
  banner.textContent = `API unreachable: ${first}${more}. Retrying; the figures below are stale.`;
  banner.hidden = false;
  document.body.classList.add("stale");
}

function poll(source, everyMs, load) {
  const tick = async () => {
    try {
      await load();
      failures.delete(source);
    } catch (e) {
      failures.set(source, e.message || String(e));
    }
    showStatus();
    setTimeout(tick, everyMs);
  };
  tick();
}

poll("stats", STATS_EVERY_MS, async () => renderStats(await getJson("/api/v1/stats")));
poll("workers", LISTS_EVERY_MS, async () => renderWorkers(await getJson("/api/v1/workers?limit=500")));
poll("settlements", LISTS_EVERY_MS, async () => renderSettlements(await getJson("/api/v1/settlements?limit=10")));
