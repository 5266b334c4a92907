// The Models page: the model llmgate runs, its state, progress and log, polled every second.

import { $ } from "../dom.js";
import { admin } from "../api.js";
import { clearError, messageOf, showError } from "../banner.js";
import { polled, startPolling } from "../polling.js";

const STATE_LABELS = {
  none: ["No model", ""],
  setting_up: ["Setting up", "busy"],
  downloading: ["Downloading", "busy"],
  starting: ["Starting", "busy"],
  ready: ["Ready", "ok"],
  restarting: ["Restarting", "busy"],
  failed: ["Failed", "bad"],
  stopping: ["Stopping", "busy"],
  stopped: ["Stopped", ""],
  external: ["External server", "info"],
};
const BUSY_STATES = ["setting_up", "downloading", "starting", "restarting"];
// The backend select follows the running model until the user picks one.
let modelsBackendChosen = false;
let lastLog = null;

export function init() {
  $("model-form").addEventListener("submit", runModel);
  $("model-stop").addEventListener("click", stopModel);
  $("model-backend").addEventListener("change", () => {
    modelsBackendChosen = true;
  });
}

export function enter() {
  modelsBackendChosen = false;
  lastLog = null;
  startPolling(polled("models", loadModels), 1000);
}

async function loadModels() {
  renderModels(await admin("GET", "/admin/models"));
}

function renderModels(view) {
  const [label, tone] = STATE_LABELS[view.state] || [view.state, ""];
  const badge = $("model-state");
  badge.textContent = label;
  badge.className = `badge ${tone}`;
  badge.dataset.state = view.state;

  const parts = [];
  if (view.model) parts.push(view.state === "external" ? `Upstream ${view.model}` : view.model);
  if (view.state !== "external" && view.backend) parts.push(`backend ${view.backend}`);
  if (view.runner) parts.push(view.runner);
  $("model-what").textContent = parts.join(" · ");
  $("model-message").textContent = view.message || "";

  const progress = $("model-progress");
  const fill = $("model-progress-fill");
  if (typeof view.percent === "number" && isFinite(view.percent)) {
    const percent = Math.max(0, Math.min(100, view.percent));
    progress.hidden = false;
    progress.classList.remove("indeterminate");
    progress.dataset.percent = percent.toFixed(1);
    fill.style.width = `${percent}%`;
    $("model-progress-text").textContent = `${percent.toFixed(percent < 10 ? 1 : 0)}%`;
  } else if (BUSY_STATES.includes(view.state)) {
    progress.hidden = false;
    progress.classList.add("indeterminate");
    delete progress.dataset.percent;
    fill.style.width = "";
    $("model-progress-text").textContent = "";
  } else {
    progress.hidden = true;
    delete progress.dataset.percent;
  }

  const busy = BUSY_STATES.includes(view.state) || view.state === "stopping";
  $("model-stop").disabled = ["none", "stopped", "stopping"].includes(view.state);
  $("model-run").disabled = busy && view.state !== "restarting";

  if (!modelsBackendChosen && view.backend && document.activeElement !== $("model-backend")) {
    $("model-backend").value = view.backend;
    modelsBackendChosen = true;
  }

  const text = (view.log || []).join("\n");
  if (text !== lastLog) {
    const log = $("model-log");
    const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 24;
    log.textContent = text || "No output yet.";
    if (atBottom || lastLog === null) log.scrollTop = log.scrollHeight;
    lastLog = text;
  }
}

async function runModel(event) {
  event.preventDefault();
  const button = $("model-run");
  button.disabled = true;
  try {
    const view = await admin("POST", "/admin/models/run", {
      model: $("model-name").value.trim(),
      backend: $("model-backend").value,
    });
    clearError();
    renderModels(view);
  } catch (err) {
    showError(`Could not start the model: ${messageOf(err)}`);
    button.disabled = false;
  }
}

async function stopModel() {
  const button = $("model-stop");
  button.disabled = true;
  try {
    renderModels(await admin("POST", "/admin/models/stop"));
    clearError();
  } catch (err) {
    showError(messageOf(err));
    button.disabled = false;
  }
}
