// The Usage page: totals per key (split by endpoint and by model) and charts of requests
// and tokens over time, polled every 5 seconds.

import { $, h } from "../dom.js";
import { admin } from "../api.js";
import { barChart } from "../chart.js";
import { dayFormat, dayTimeFormat, fmtInt, parseTime, timeCell, timeFormat } from "../format.js";
import { pollNow, polled, startPolling } from "../polling.js";

const requestCache = new Map(); // key_id -> { stamp, rows }
let usageRows = [];
let lastUsageJson = null;

export function init() {
  $("usage-refresh").addEventListener("click", () => {
    lastUsageJson = null;
    pollNow();
  });
  $("usage-chart-key").addEventListener("change", renderChart);
  $("usage-range").addEventListener("change", renderChart);
  let resizeTimer = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => !$("page-usage").hidden && renderChart(), 150);
  });
}

export function enter() {
  lastUsageJson = null;
  startPolling(polled("usage", loadUsage), 5000);
}

async function loadUsage() {
  const rows = await admin("GET", "/admin/usage");
  usageRows = rows;
  const json = JSON.stringify(rows);
  if (json !== lastUsageJson) {
    lastUsageJson = json;
    renderUsageTable(rows);
    renderChartKeyOptions(rows);
  }
  // Per-request rows only for keys whose totals changed since last time.
  const wanted = rows.filter((row) => row.requests > 0);
  await Promise.all(
    wanted.map(async (row) => {
      const stamp = `${row.requests}|${row.last_request_at}`;
      const cached = requestCache.get(row.key_id);
      if (cached && cached.stamp === stamp) return;
      const list = await admin("GET", `/admin/usage/${encodeURIComponent(row.key_id)}/requests?limit=1000`);
      requestCache.set(row.key_id, { stamp, rows: list });
    }),
  );
  renderChart();
  $("usage-updated").textContent = `Updated ${timeFormat.format(Date.now())}.`;
}

function renderUsageTable(rows) {
  $("usage-body").replaceChildren(
    ...rows.map((row) => {
      const endpoints = Object.entries(row.endpoints || {}).sort((a, b) => b[1] - a[1]);
      const models = Object.entries(row.models || {}).sort((a, b) => b[1].requests - a[1].requests || (a[0] < b[0] ? -1 : 1));
      const users = Object.entries(row.users || {}).sort((a, b) => b[1].requests - a[1].requests || (a[0] < b[0] ? -1 : 1));
      const unknown = row.requests_without_usage > 0 ? h("span", { class: "sub" }, `${fmtInt(row.requests_without_usage)} without token counts`) : null;
      return h(
        "tr",
        { "data-testid": "usage-row", "data-key-name": row.name, "data-key-id": row.key_id, class: row.revoked ? "revoked" : null },
        h("td", { class: "primary-cell", "data-label": "Key" }, row.name, h("span", { class: "sub" }, `${row.role}${row.revoked ? " · revoked" : ""}`)),
        h("td", { class: "num", "data-label": "Requests", "data-testid": "usage-requests" }, fmtInt(row.requests)),
        h("td", { class: "num", "data-label": "Prompt", "data-testid": "usage-prompt-tokens" }, fmtInt(row.prompt_tokens)),
        h("td", { class: "num", "data-label": "Completion", "data-testid": "usage-completion-tokens" }, fmtInt(row.completion_tokens)),
        h("td", { class: "num", "data-label": "Total tokens" }, h("div", { class: "stack" }, h("span", { "data-testid": "usage-total-tokens" }, fmtInt(row.total_tokens)), unknown)),
        h("td", { "data-label": "Last request" }, timeCell(row.last_request_at, "none yet")),
        h(
          "td",
          { "data-label": "Endpoints" },
          endpoints.length
            ? h("ul", { class: "endpoints" }, endpoints.map(([path, count]) => h("li", {}, h("code", {}, path), ` × ${fmtInt(count)}`)))
            : null,
        ),
        h("td", { "data-label": "Models", "data-testid": "usage-models" }, models.length ? h("ul", { class: "endpoints" }, models.map(modelItem)) : null),
        h("td", { "data-label": "End users", "data-testid": "usage-users" }, users.length ? h("ul", { class: "endpoints" }, users.map(userItem)) : null),
      );
    }),
  );
  $("usage-empty").hidden = rows.length > 0;
}

// One model's share of a key's usage: requests, tokens, and how many had no token counts.
function modelItem([name, usage]) {
  const tokens = fmtInt(usage.prompt_tokens + usage.completion_tokens);
  const unknown = usage.requests_without_usage > 0 ? `, ${fmtInt(usage.requests_without_usage)} without counts` : "";
  return h(
    "li",
    { "data-model": name, title: `${fmtInt(usage.prompt_tokens)} prompt + ${fmtInt(usage.completion_tokens)} completion tokens${unknown}` },
    h("code", {}, name),
    ` × ${fmtInt(usage.requests)} · ${tokens} tokens`,
  );
}

// One end user's share of a key's usage (the `user` of its requests, or Open WebUI's user header).
function userItem([name, usage]) {
  const tokens = fmtInt(usage.prompt_tokens + usage.completion_tokens);
  return h(
    "li",
    { "data-user": name, title: `${fmtInt(usage.prompt_tokens)} prompt + ${fmtInt(usage.completion_tokens)} completion tokens` },
    h("code", {}, name),
    ` × ${fmtInt(usage.requests)} · ${tokens} tokens`,
  );
}

function renderChartKeyOptions(rows) {
  const select = $("usage-chart-key");
  const chosen = select.value;
  const options = [h("option", { value: "" }, "All keys")];
  for (const row of rows) {
    if (row.requests > 0) options.push(h("option", { value: row.key_id }, row.name + (row.revoked ? " (revoked)" : "")));
  }
  select.replaceChildren(...options);
  select.value = options.some((o) => o.value === chosen) ? chosen : "";
}

const BUCKETS = [60e3, 5 * 60e3, 15 * 60e3, 3600e3, 3 * 3600e3, 6 * 3600e3, 86400e3, 7 * 86400e3];

function renderChart() {
  const container = $("usage-chart");
  const keyId = $("usage-chart-key").value;
  const range = $("usage-range").value;
  const now = Date.now();
  let rows = [];
  for (const [id, entry] of requestCache) {
    if (keyId && id !== keyId) continue;
    if (!usageRows.some((r) => r.key_id === id)) continue;
    rows = rows.concat(entry.rows);
  }
  const points = rows.map((r) => ({ t: parseTime(r.at), p: r.prompt_tokens || 0, c: r.completion_tokens || 0 })).filter((r) => r.t !== null);
  let start;
  if (range === "auto") {
    const earliest = points.reduce((min, r) => Math.min(min, r.t), now);
    start = Math.min(earliest, now - 30 * 60e3);
  } else {
    start = now - Number(range) * 1000;
  }
  const inRange = points.filter((r) => r.t >= start);
  if (inRange.length === 0) {
    container.replaceChildren(h("div", { class: "chart-empty" }, points.length ? "No requests in this period." : "No requests yet. Send one from the Playground."));
    return;
  }
  const span = now - start;
  const size = BUCKETS.find((b) => span / b <= 60) || BUCKETS[BUCKETS.length - 1];
  const first = Math.floor(start / size) * size;
  const count = Math.max(1, Math.floor((now - first) / size) + 1);
  const buckets = Array.from({ length: count }, (_, i) => ({ t: first + i * size, requests: 0, prompt: 0, completion: 0 }));
  for (const r of inRange) {
    const i = Math.floor((r.t - first) / size);
    if (i < 0 || i >= count) continue;
    buckets[i].requests += 1;
    buckets[i].prompt += r.p;
    buckets[i].completion += r.c;
  }
  const width = Math.max(280, container.clientWidth || 600);
  const label = (t) => (size >= 86400e3 ? dayFormat.format(t) : span > 86400e3 ? dayTimeFormat.format(t) : timeFormat.format(t));
  const sizeWords = size >= 86400e3 ? `${size / 86400e3} day` : size >= 3600e3 ? `${size / 3600e3} h` : `${size / 60e3} min`;
  const requestsChart = barChart({
    width,
    title: `Requests per ${sizeWords}`,
    buckets,
    size,
    label,
    series: [{ key: "requests", cls: "s-requests", name: "requests" }],
  });
  const tokensChart = barChart({
    width,
    title: `Tokens per ${sizeWords}`,
    buckets,
    size,
    label,
    series: [
      { key: "prompt", cls: "s-prompt", name: "prompt tokens" },
      { key: "completion", cls: "s-completion", name: "completion tokens" },
    ],
  });
  const legend = h("div", { class: "legend" }, h("span", { class: "l-prompt" }, "prompt tokens"), h("span", { class: "l-completion" }, "completion tokens"));
  container.replaceChildren(requestsChart, tokensChart, legend);
}
