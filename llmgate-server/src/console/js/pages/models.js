// The Models page: every model behind the gateway (state, memory, last use, requests),
// Load / Unload / Remove, and a form to add one; polled every 2 seconds.
//
// Each model keeps its rows across polls (a <tbody> per model, keyed by name), so an
// open log, its scroll position and the button under the pointer survive a refresh.

import { $, h } from "../dom.js";
import { ApiError, admin } from "../api.js";
import { clearError, messageOf, showError } from "../banner.js";
import { fmtBytes, fmtInt, timeCell } from "../format.js";
import { polled, startPolling } from "../polling.js";

const STATE_LABELS = {
  stopped: ["Stopped", ""],
  setting_up: ["Setting up", "busy"],
  downloading: ["Downloading", "busy"],
  loading: ["Loading", "busy"],
  ready: ["Ready", "ok"],
  unloading: ["Unloading", "busy"],
  failed: ["Failed", "bad"],
};
const LOADING_STATES = ["setting_up", "downloading", "loading"];
const MIB = 1024 * 1024;

/** name → the elements of that model's rows. */
const rows = new Map();
let pendingRemove = null;

export function init() {
  $("model-add-form").addEventListener("submit", addModel);
  $("model-add-kind").addEventListener("change", showKindFields);
  $("model-remove-dialog").addEventListener("close", onRemoveClosed);
  showKindFields();
}

export function enter() {
  startPolling(polled("models", loadModels), 2000);
}

async function loadModels() {
  render(await admin("GET", "/admin/models"));
}

function render(view) {
  const table = $("models-table");
  const names = new Set(view.models.map((model) => model.name));
  for (const [name, entry] of rows) {
    if (!names.has(name)) {
      entry.body.remove();
      rows.delete(name);
    }
  }
  // In the gateway's order, moving a model's rows only when they are out of place: a
  // moved element loses the focus, the selection and its log's scroll position.
  let previous = table.tHead;
  for (const model of view.models) {
    let entry = rows.get(model.name);
    if (!entry) {
      entry = buildRows(model.name);
      rows.set(model.name, entry);
    }
    updateRows(entry, model, view.default_model);
    if (previous.nextElementSibling !== entry.body) previous.after(entry.body);
    previous = entry.body;
  }
  $("models-empty").hidden = view.models.length > 0;
  renderMemory(view);
}

function renderMemory(view) {
  const memory = view.memory || {};
  const parts = [];
  if (typeof memory.ram_available_bytes === "number") parts.push(`${fmtBytes(memory.ram_available_bytes)} RAM free`);
  if (memory.reserve_bytes) parts.push(`${fmtBytes(memory.reserve_bytes)} kept free`);
  if (typeof memory.models_bytes === "number") {
    const limit = typeof memory.limit_bytes === "number" ? ` of ${fmtBytes(memory.limit_bytes)} allowed` : "";
    parts.push(`models running take about ${fmtBytes(memory.models_bytes)}${limit}`);
  }
  if (typeof view.max_loaded_models === "number") parts.push(`at most ${fmtInt(view.max_loaded_models)} loaded at once`);
  $("models-memory").textContent = parts.join(" · ");
}

/** A model's two rows: its facts and buttons, then its log (folded unless it failed). */
function buildRows(name) {
  const cells = {
    model: h("td", { class: "primary-cell", "data-label": "Model" }),
    state: h("td", { "data-label": "State" }),
    memory: h("td", { class: "num", "data-label": "Memory", "data-testid": "model-memory" }),
    lastUsed: h("td", { "data-label": "Last used", "data-testid": "model-last-used" }),
    requests: h("td", { class: "num", "data-label": "Requests", "data-testid": "model-requests" }),
    settings: h("td", { "data-label": "Settings", "data-testid": "model-settings" }),
  };
  const load = h("button", { type: "button", class: "button small", "data-testid": "model-load", onclick: () => act(name, "load", load) }, "Load");
  const unload = h("button", { type: "button", class: "button small", "data-testid": "model-unload", onclick: () => act(name, "unload", unload) }, "Unload");
  const remove = h("button", { type: "button", class: "button small danger-outline", "data-testid": "model-remove", onclick: () => askRemove(name) }, "Remove");
  const buttons = h("div", { class: "row-actions" }, load, unload, remove);
  const actions = h("td", { class: "actions-cell" }, buttons);
  const log = h("pre", { class: "log short", "data-testid": "model-log", tabindex: "0" });
  const details = h("details", { class: "model-log" }, h("summary", {}, "Log"), log);
  // Opened or closed by the user: a failure no longer opens it on the next poll.
  details.addEventListener("toggle", () => {
    if (entry.autoOpening) entry.autoOpening = false;
    else entry.userToggled = true;
  });
  const row = h("tr", { "data-testid": "model-row", "data-model": name }, ...Object.values(cells), actions);
  const logRow = h("tr", { class: "log-row" }, h("td", { colspan: "7" }, details));
  const body = h("tbody", { class: "model", "data-model": name }, row, logRow);
  const entry = { body, row, cells, load, unload, remove, buttons, details, log, lastLog: null, userToggled: false, autoOpening: false, busy: false };
  return entry;
}

function updateRows(entry, model, defaultModel) {
  const { cells } = entry;
  const local = model.kind === "local";
  entry.row.dataset.state = model.state;
  entry.row.dataset.kind = model.kind;

  const names = [h("strong", { class: "model-name" }, model.name)];
  if (model.name === defaultModel) names.push(h("span", { class: "badge info" }, "default"));
  const where = local ? model.source : model.upstream;
  const facts = [
    h("div", { class: "model-names" }, names),
    model.aliases && model.aliases.length ? h("span", { class: "sub" }, `also ${model.aliases.join(", ")}`) : null,
    h("span", { class: "sub where" }, `${local ? "local" : "upstream"}${where ? ` · ${where}` : ""}`),
    model.runner || model.backend ? h("span", { class: "sub" }, [model.runner, model.backend].filter(Boolean).join(" · ")) : null,
  ];
  // replaceChildren would write a null as the text "null".
  cells.model.replaceChildren(...facts.filter(Boolean));

  const [label, tone] = STATE_LABELS[model.state] || [model.state, ""];
  const stateParts = [h("span", { class: `badge ${tone}`, "data-testid": "model-state", "data-state": model.state }, label)];
  const percent = typeof model.percent === "number" && isFinite(model.percent) ? Math.max(0, Math.min(100, model.percent)) : null;
  if (percent !== null || LOADING_STATES.includes(model.state)) stateParts.push(progressBar(percent));
  if (model.message) stateParts.push(h("span", { class: "sub message", "data-testid": "model-message" }, model.message));
  if (model.pid) stateParts.push(h("span", { class: "sub" }, `process ${model.pid}`));
  cells.state.replaceChildren(h("div", { class: "stack" }, stateParts));

  cells.memory.textContent = typeof model.memory_bytes === "number" ? `${fmtInt(Math.round(model.memory_bytes / MIB))} MiB` : "—";
  cells.memory.title = local ? "Estimated from the file and its context length" : "An upstream model takes no memory here";
  cells.lastUsed.replaceChildren(timeCell(model.last_used, "never"));
  cells.requests.replaceChildren(
    h("div", { class: "stack" },
      h("span", { "data-testid": "model-in-flight", "data-count": model.in_flight }, `${fmtInt(model.in_flight)} in flight`),
      h("span", { class: "sub", "data-testid": "model-queued", "data-count": model.queued }, `${fmtInt(model.queued)} queued`)),
  );
  const settings = [
    model.ttl_secs ? `unloads after ${fmtDuration(model.ttl_secs)} idle` : local ? "never unloads when idle" : null,
    model.preload ? "preloaded" : null,
    model.max_concurrency ? `${fmtInt(model.max_concurrency)} at once` : "no limit at once",
    `queue ${fmtInt(model.max_queue)}`,
    model.max_concurrency ? (model.queue === "fifo" ? "waiters in arrival order" : "waiters take turns by key") : null,
  ].filter(Boolean);
  cells.settings.replaceChildren(h("div", { class: "stack" }, settings.map((s) => h("span", { class: "sub" }, s))));

  // Only llmgate's own model servers load and unload; an upstream is always there.
  entry.load.hidden = !local;
  entry.unload.hidden = !local;
  if (!entry.busy) {
    entry.load.disabled = !["stopped", "failed"].includes(model.state);
    entry.unload.disabled = !(model.state === "ready" || LOADING_STATES.includes(model.state));
    entry.remove.disabled = false;
  }

  const text = (model.log || []).join("\n");
  entry.details.hidden = !local && !text;
  if (text !== entry.lastLog) {
    const log = entry.log;
    const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 24;
    log.textContent = text || "No output yet.";
    if (atBottom || entry.lastLog === null) log.scrollTop = log.scrollHeight;
    entry.lastLog = text;
  }
  // A failure shows its log tail at once, unless the user folded it.
  if (model.state === "failed" && !entry.details.open && !entry.userToggled) {
    // The toggle event this fires (later, once) is ours, not the user's.
    entry.autoOpening = true;
    entry.details.open = true;
  }
}

function progressBar(percent) {
  const fill = h("div", { class: "progress-fill" });
  if (percent !== null) fill.style.width = `${percent}%`;
  return h(
    "div",
    { class: `progress${percent === null ? " indeterminate" : ""}`, "data-testid": "model-progress", "data-percent": percent === null ? null : percent.toFixed(1) },
    h("div", { class: "progress-bar" }, fill),
    h("span", { class: "progress-text" }, percent === null ? "" : `${percent.toFixed(percent < 10 ? 1 : 0)}%`),
  );
}

function fmtDuration(seconds) {
  if (seconds % 3600 === 0) return `${fmtInt(seconds / 3600)} h`;
  if (seconds % 60 === 0) return `${fmtInt(seconds / 60)} min`;
  return `${fmtInt(seconds)} s`;
}

async function act(name, action, button) {
  const entry = rows.get(name);
  if (entry) entry.busy = true;
  button.disabled = true;
  try {
    await admin("POST", `/admin/models/${encodeURIComponent(name)}/${action}`);
    clearError();
  } catch (err) {
    showError(`Could not ${action} “${name}”: ${messageOf(err)}`);
  } finally {
    if (entry) entry.busy = false;
  }
  await loadModels().catch((err) => showError(messageOf(err), "models"));
}

function askRemove(name) {
  pendingRemove = name;
  $("model-remove-text").textContent = `Remove the model “${name}”? Clients can no longer ask for it; its server stops once its requests end. The removal is kept across restarts.`;
  const dialog = $("model-remove-dialog");
  dialog.returnValue = "";
  dialog.showModal();
  $("model-remove-cancel").focus();
}

async function onRemoveClosed() {
  const name = pendingRemove;
  pendingRemove = null;
  if (!name || $("model-remove-dialog").returnValue !== "confirm") return;
  const entry = rows.get(name);
  if (entry) entry.remove.disabled = true;
  try {
    await admin("DELETE", `/admin/models/${encodeURIComponent(name)}`);
    clearError();
  } catch (err) {
    showError(`Could not remove “${name}”: ${messageOf(err)}`);
    if (entry) entry.remove.disabled = false;
  }
  await loadModels().catch((err) => showError(messageOf(err), "models"));
}

function showKindFields() {
  const upstream = $("model-add-kind").value === "upstream";
  $("model-add-local").hidden = upstream;
  $("model-add-remote").hidden = !upstream;
}

/** A whole number from a number field, or undefined when it is empty. */
function wholeNumber(id, what, min) {
  const raw = $(id).value.trim();
  if (raw === "") return undefined;
  const n = Number(raw);
  if (!Number.isInteger(n) || n < min) throw new Error(`${what} must be a whole number of at least ${min}.`);
  return n;
}

/** The form as a model's settings, leaving out what was left empty (the defaults). */
function formSettings() {
  const text = (id) => $(id).value.trim() || undefined;
  const aliases = $("model-add-aliases")
    .value.split(",")
    .map((alias) => alias.trim())
    .filter(Boolean);
  const settings = { name: $("model-add-name").value.trim(), aliases: aliases.length ? aliases : undefined };
  if ($("model-add-kind").value === "upstream") {
    settings.upstream = text("model-add-upstream");
    settings.upstream_key = text("model-add-upstream-key");
  } else {
    settings.source = text("model-add-source");
    settings.runner = text("model-add-runner");
    settings.backend = text("model-add-backend");
    settings.n_ctx = wholeNumber("model-add-n-ctx", "The context length", 1);
  }
  settings.ttl_secs = wholeNumber("model-add-ttl", "The idle time", 0);
  settings.max_concurrency = wholeNumber("model-add-max-concurrency", "Requests at once", 1);
  if ($("model-add-preload").checked) settings.preload = true;
  return settings;
}

function showAddError(message) {
  const error = $("model-add-error");
  error.textContent = message;
  error.hidden = false;
}

async function addModel(event) {
  event.preventDefault();
  const error = $("model-add-error");
  error.hidden = true;
  error.textContent = "";
  let settings;
  try {
    settings = formSettings();
  } catch (err) {
    showAddError(err.message);
    return;
  }
  if (!settings.name) {
    showAddError("Give the model a name: what clients will send as model.");
    $("model-add-name").focus();
    return;
  }
  const button = $("model-add-submit");
  button.disabled = true;
  try {
    // JSON.stringify leaves out the fields that are undefined.
    await admin("POST", "/admin/models", settings);
    $("model-add-form").reset();
    showKindFields();
    await loadModels();
  } catch (err) {
    if (err instanceof ApiError && err.status === 409) {
      showAddError(`${err.message} Pick another name, or remove that model first.`);
    } else {
      showAddError(`Could not add the model: ${messageOf(err)}`);
    }
  } finally {
    button.disabled = false;
  }
}
