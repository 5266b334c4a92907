/*
 * llmgate console: one page, hash routing (#models, #keys, #usage, #system, #playground),
 * plain DOM code, no libraries. Every API call carries the admin key from sessionStorage
 * (never a URL, never localStorage). The Content-Security-Policy forbids inline scripts
 * and styles, so widths are set through element.style and text always through textContent.
 *
 * Stable data-testid attributes for browser tests:
 *   Sign in:     signin-form, signin-key, signin-submit, signout
 *   Navigation:  nav-models, nav-keys, nav-usage, nav-system, nav-playground
 *   Pages:       page-signin, page-models, page-keys, page-usage, page-system, page-playground
 *   Errors:      error-banner (role=alert; its text is the message), error-dismiss
 *   Models:      model-form, model-name, model-backend, model-run, model-stop,
 *                model-state (badge; data-state holds the raw state), model-message,
 *                model-progress (data-percent when known), model-log
 *   Keys:        create-key-form, create-key-name, create-key-role, create-key-submit,
 *                new-key-panel, new-key-secret (the new secret; exists only while shown), copy-key,
 *                new-key-done,
 *                key-row (data-key-name, data-key-id, data-status="active"|"revoked"|"expired"),
 *                key-status, revoke-key (in each active row),
 *                confirm-dialog, confirm-cancel, confirm-revoke
 *   Usage:       usage-refresh, usage-chart, usage-chart-key, usage-range,
 *                usage-row (data-key-name, data-key-id), usage-requests,
 *                usage-prompt-tokens, usage-completion-tokens, usage-total-tokens
 *   System:      system-cpu, system-memory, system-gateway, system-model-server, system-gpu
 *   Playground:  playground-form, playground-key, playground-message, playground-send,
 *                playground-stop, playground-answer,
 *                playground-usage (data-requests, data-prompt-tokens,
 *                data-completion-tokens, data-total-tokens: the difference charged)
 */
"use strict";

(function () {
  const ADMIN_KEY = "llmgate.adminKey";
  const PLAYGROUND_KEY = "llmgate.playgroundKey";
  const PAGES = ["models", "keys", "usage", "system", "playground"];
  const SVG_NS = "http://www.w3.org/2000/svg";

  const $ = (id) => document.getElementById(id);

  // ---------- small helpers ----------

  /** Builds an element; children are nodes or strings (always text, never HTML). */
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") el.className = value;
      else if (name === "text") el.textContent = value;
      else if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
      else el.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return el;
  }

  function svg(tag, attrs, ...children) {
    const el = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined) continue;
      if (name === "text") el.textContent = value;
      else el.setAttribute(name, String(value));
    }
    for (const child of children.flat()) if (child) el.append(child);
    return el;
  }

  const numberFormat = new Intl.NumberFormat();
  const fmtInt = (n) => (n === null || n === undefined ? "—" : numberFormat.format(n));
  const fmtPercent = (p) => (typeof p === "number" && isFinite(p) ? `${p.toFixed(p < 10 ? 1 : 0)}%` : "—");

  function fmtBytes(bytes) {
    if (typeof bytes !== "number" || !isFinite(bytes)) return "—";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let value = bytes;
    let unit = 0;
    while (value >= 1024 && unit < units.length - 1) {
      value /= 1024;
      unit += 1;
    }
    return `${value.toFixed(unit === 0 || value >= 100 ? 0 : 1)} ${units[unit]}`;
  }

  function fmtCompact(n) {
    if (n >= 1e6) return `${+(n / 1e6).toFixed(1)}M`;
    if (n >= 1e4) return `${+(n / 1e3).toFixed(0)}k`;
    if (n >= 1e3) return `${+(n / 1e3).toFixed(1)}k`;
    return String(n);
  }

  const dateTimeFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" });
  const fullFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "full", timeStyle: "medium" });
  const timeFormat = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });
  const dayFormat = new Intl.DateTimeFormat(undefined, { day: "numeric", month: "short" });
  const dayTimeFormat = new Intl.DateTimeFormat(undefined, { day: "numeric", month: "short", hour: "2-digit", minute: "2-digit" });

  function parseTime(value) {
    if (!value) return null;
    const t = Date.parse(value);
    return isNaN(t) ? null : t;
  }

  function fmtDateTime(value) {
    const t = parseTime(value);
    return t === null ? "—" : dateTimeFormat.format(t);
  }

  function fmtAgo(value, never) {
    const t = parseTime(value);
    if (t === null) return never || "never";
    const seconds = Math.round((Date.now() - t) / 1000);
    if (seconds < 5) return "just now";
    if (seconds < 60) return `${seconds} s ago`;
    const minutes = Math.round(seconds / 60);
    if (minutes < 60) return `${minutes} min ago`;
    const hours = Math.round(minutes / 60);
    if (hours < 48) return `${hours} h ago`;
    return dateTimeFormat.format(t);
  }

  /** A time element: relative text, the full local time on hover. */
  function timeCell(value, never) {
    const t = parseTime(value);
    return h("time", { datetime: value || null, title: t === null ? null : fullFormat.format(t) }, fmtAgo(value, never));
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  // ---------- errors ----------

  class ApiError extends Error {
    constructor(status, message, code) {
      super(message);
      this.status = status;
      this.code = code || null;
    }
  }

  let bannerSource = null;

  /** Shows a message in the banner; `source` lets a later success clear only its own error. */
  function showError(message, source) {
    bannerSource = source || null;
    const text = String(message);
    $("error-text").textContent = text.charAt(0).toUpperCase() + text.slice(1);
    $("error-banner").hidden = false;
  }

  function clearError(source) {
    if (source === undefined || bannerSource === source) {
      $("error-banner").hidden = true;
      $("error-text").textContent = "";
      bannerSource = null;
    }
  }

  function messageOf(err) {
    if (err instanceof ApiError) return err.message;
    return `Something went wrong in the console: ${err && err.message ? err.message : err}`;
  }

  // ---------- API ----------

  function adminKey() {
    return sessionStorage.getItem(ADMIN_KEY);
  }

  async function errorFrom(response) {
    let message = null;
    let code = null;
    try {
      const body = await response.json();
      if (body && body.error) {
        message = body.error.message || null;
        code = body.error.code || null;
      }
    } catch (_) {
      // not JSON: fall back to the status line
    }
    return new ApiError(response.status, message || `The server answered ${response.status} ${response.statusText}.`.replace(" .", "."), code);
  }

  /** One request; throws ApiError with words a person can read. */
  async function request(method, path, options) {
    const opts = options || {};
    const headers = { Authorization: `Bearer ${opts.key || adminKey() || ""}` };
    if (opts.body !== undefined) headers["Content-Type"] = "application/json";
    let response;
    try {
      response = await fetch(path, {
        method,
        headers,
        body: opts.body === undefined ? undefined : JSON.stringify(opts.body),
        signal: opts.signal,
        cache: "no-store",
        credentials: "omit",
      });
    } catch (err) {
      if (err && err.name === "AbortError") throw err;
      throw new ApiError(0, "Could not reach llmgate. Check that the server is running and that this computer is online.");
    }
    if (opts.raw) {
      if (!response.ok) throw await errorFrom(response);
      return response;
    }
    if (!response.ok) throw await errorFrom(response);
    if (response.status === 204) return null;
    try {
      return await response.json();
    } catch (_) {
      throw new ApiError(response.status, "The server sent an answer the console could not read.");
    }
  }

  /** An admin call: a key that stops working (revoked, expired) signs the user out. */
  async function admin(method, path, body) {
    try {
      return await request(method, path, { body });
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) {
        signOut("Your admin key is no longer accepted (it may have been revoked or have expired). Sign in again.");
      } else if (err instanceof ApiError && err.status === 403) {
        signOut("That key is not an admin key. Sign in with an admin key.");
      }
      throw err;
    }
  }

  // ---------- polling: one loop for the page on screen ----------

  let pollGeneration = 0;
  let pollTimer = null;
  let pollCurrent = null;

  function startPolling(task, intervalMs) {
    stopPolling();
    pollCurrent = { task, intervalMs };
    const generation = pollGeneration;
    const tick = async () => {
      if (generation !== pollGeneration) return;
      if (!document.hidden) {
        try {
          await task();
        } catch (_) {
          // tasks report their own errors
        }
      }
      if (generation !== pollGeneration) return;
      pollTimer = setTimeout(tick, intervalMs);
    };
    tick();
  }

  function stopPolling() {
    pollGeneration += 1;
    clearTimeout(pollTimer);
    pollTimer = null;
    pollCurrent = null;
  }

  /** Runs the page's poll now (a Refresh button, a tab that comes back into view). */
  function pollNow() {
    if (pollCurrent) startPolling(pollCurrent.task, pollCurrent.intervalMs);
  }

  /** Runs a poll task; its error shows in the banner until the same task succeeds. */
  function polled(source, task) {
    return async () => {
      try {
        await task();
        clearError(source);
      } catch (err) {
        if (err && err.name === "AbortError") return;
        if (adminKey()) showError(messageOf(err), source);
      }
    };
  }

  // ---------- sign in / out, routing ----------

  function signOut(message) {
    sessionStorage.removeItem(ADMIN_KEY);
    sessionStorage.removeItem(PLAYGROUND_KEY);
    $("playground-key").value = "";
    forgetSecret();
    if ($("confirm-dialog").open) $("confirm-dialog").close("cancel");
    route();
    if (message) showError(message, "signin");
  }

  async function signIn(event) {
    event.preventDefault();
    const key = $("signin-key").value.trim();
    if (!key) {
      showError("Paste your admin key first.", "signin");
      $("signin-key").focus();
      return;
    }
    const button = $("signin-submit");
    button.disabled = true;
    button.textContent = "Checking…";
    try {
      await request("GET", "/admin/keys", { key });
      sessionStorage.setItem(ADMIN_KEY, key);
      $("signin-key").value = "";
      clearError();
      if (!PAGES.includes(location.hash.slice(1))) location.hash = "#models";
      route();
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) {
        showError("That key is not valid. Check that you pasted the whole key (it starts with sk-lg-) and that it has not been revoked.", "signin");
      } else if (err instanceof ApiError && err.status === 403) {
        showError("That key is not an admin key. Use a key created with role admin (llmgate keys create NAME --admin).", "signin");
      } else {
        showError(messageOf(err), "signin");
      }
      $("signin-key").select();
    } finally {
      button.disabled = false;
      button.textContent = "Sign in";
    }
  }

  let currentPage = null;

  function route() {
    stopPolling();
    const signedIn = Boolean(adminKey());
    $("nav").hidden = !signedIn;
    $("signout").hidden = !signedIn;
    let page = location.hash.slice(1);
    if (!PAGES.includes(page)) page = "models";
    if (!signedIn) page = "signin";
    if (page !== currentPage) {
      if (bannerSource !== "signin" || signedIn) clearError();
    }
    currentPage = page;
    for (const section of document.querySelectorAll("main > .page")) {
      section.hidden = section.id !== `page-${page}`;
    }
    for (const link of document.querySelectorAll("#nav a")) {
      if (link.dataset.page === page) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
    document.title = signedIn ? `${page[0].toUpperCase()}${page.slice(1)} · llmgate` : "Sign in · llmgate";
    if (page === "signin") {
      $("signin-key").focus();
      return;
    }
    const enter = {
      models: enterModels,
      keys: enterKeys,
      usage: enterUsage,
      system: enterSystem,
      playground: enterPlayground,
    }[page];
    enter();
  }

  // ---------- Models ----------

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
  let modelsBackendChosen = false;
  let lastLog = null;

  function enterModels() {
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

  // ---------- Keys ----------

  let pendingRevoke = null;

  function enterKeys() {
    loadKeys().catch((err) => showError(messageOf(err), "keys"));
  }

  async function loadKeys() {
    const keys = await admin("GET", "/admin/keys");
    renderKeys(keys);
    clearError("keys");
  }

  function keyStatus(key) {
    if (key.revoked_at) return "revoked";
    const expires = parseTime(key.expires_at);
    if (expires !== null && expires <= Date.now()) return "expired";
    return "active";
  }

  function renderKeys(keys) {
    const body = $("keys-body");
    const own = (adminKey() || "").slice(0, 10);
    body.replaceChildren(
      ...keys.map((key) => {
        const status = keyStatus(key);
        const isSelf = own && key.prefix === own && key.role === "admin" && status === "active";
        const statusBadge = h("span", { class: `badge ${status === "active" ? "ok" : "bad"}`, "data-testid": "key-status" }, status);
        return h(
          "tr",
          {
            "data-testid": "key-row",
            "data-key-name": key.name,
            "data-key-id": key.id,
            "data-status": status,
            class: status === "active" ? null : "revoked",
          },
          h("td", { class: "primary-cell", "data-label": "Name" }, key.name, isSelf ? h("span", { class: "sub" }, "you are signed in with this key") : null),
          h("td", { "data-label": "Prefix" }, h("code", {}, `${key.prefix}…`)),
          h("td", { "data-label": "Role" }, key.role),
          h("td", { "data-label": "Created" }, h("time", { datetime: key.created_at, title: fullFormat.format(parseTime(key.created_at) || 0) }, fmtDateTime(key.created_at))),
          h("td", { "data-label": "Last used" }, timeCell(key.last_used_at, "never")),
          h("td", { "data-label": "Status" }, h("div", { class: "stack" }, statusBadge, key.expires_at && status === "active" ? h("span", { class: "sub" }, `expires ${fmtDateTime(key.expires_at)}`) : null)),
          h(
            "td",
            { class: "actions-cell" },
            status === "revoked"
              ? null
              : h("button", { type: "button", class: "button small danger-outline", "data-testid": "revoke-key", onclick: () => askRevoke(key, isSelf) }, "Revoke"),
          ),
        );
      }),
    );
    $("keys-empty").hidden = keys.length > 0;
  }

  /**
   * The secret's element exists only while a secret is shown, so a test (or a person)
   * never reads the previous key while the next one is being created.
   */
  function showSecret(created) {
    forgetSecret();
    $("new-key-name").textContent = `${created.name} (${created.role})`;
    $("new-key-row").prepend(h("code", { class: "secret", id: "new-key-secret", "data-testid": "new-key-secret" }, created.key));
    $("copy-key-status").textContent = "";
    $("copy-key").textContent = "Copy";
    $("new-key-panel").hidden = false;
    $("copy-key").focus();
  }

  function forgetSecret() {
    const old = $("new-key-secret");
    if (old) old.remove();
    $("new-key-panel").hidden = true;
  }

  async function createKey(event) {
    event.preventDefault();
    const name = $("create-key-name").value.trim();
    if (!name) {
      showError("Give the key a name, such as the person or program that will use it.");
      $("create-key-name").focus();
      return;
    }
    const button = $("create-key-submit");
    button.disabled = true;
    forgetSecret();
    try {
      const created = await admin("POST", "/admin/keys", { name, role: $("create-key-role").value });
      clearError();
      $("create-key-name").value = "";
      $("create-key-role").value = "user";
      showSecret(created);
      await loadKeys();
    } catch (err) {
      if (err instanceof ApiError && err.status === 409) {
        showError(`An active key is already named “${name}”. Pick another name, or revoke that key first.`);
      } else if (err instanceof ApiError && err.status === 400) {
        showError(`That name cannot be used: ${err.message}`);
      } else {
        showError(messageOf(err));
      }
    } finally {
      button.disabled = false;
    }
  }

  async function copySecret() {
    const secret = $("new-key-secret");
    if (!secret) return;
    const text = secret.textContent;
    const status = $("copy-key-status");
    let copied = false;
    if (navigator.clipboard && window.isSecureContext) {
      try {
        await navigator.clipboard.writeText(text);
        copied = true;
      } catch (_) {
        copied = false;
      }
    }
    // Fallback (plain http on another host has no clipboard API): select the text.
    const selection = window.getSelection();
    const range = document.createRange();
    range.selectNodeContents(secret);
    selection.removeAllRanges();
    selection.addRange(range);
    if (!copied) {
      try {
        copied = document.execCommand("copy");
      } catch (_) {
        copied = false;
      }
    }
    if (copied) {
      $("copy-key").textContent = "Copied";
      status.textContent = "The key is on your clipboard.";
    } else {
      status.textContent = "The key is selected: press Ctrl+C (⌘C on a Mac) to copy it.";
    }
  }

  function askRevoke(key, isSelf) {
    pendingRevoke = key;
    $("confirm-text").textContent = `Revoke the key “${key.name}” (${key.prefix}…)? Programs using it are refused within a second. This cannot be undone.`;
    $("confirm-self").hidden = !isSelf;
    $("confirm-dialog").returnValue = "";
    $("confirm-dialog").showModal();
    $("confirm-cancel").focus();
  }

  async function onConfirmClosed() {
    const key = pendingRevoke;
    pendingRevoke = null;
    if (!key || $("confirm-dialog").returnValue !== "confirm") return;
    try {
      await admin("DELETE", `/admin/keys/${encodeURIComponent(key.id)}`);
      clearError();
      if (adminKey()) await loadKeys();
    } catch (err) {
      if (adminKey()) showError(`Could not revoke “${key.name}”: ${messageOf(err)}`);
    }
  }

  // ---------- Usage ----------

  const requestCache = new Map(); // key_id -> { stamp, rows }
  let usageRows = [];
  let lastUsageJson = null;

  function enterUsage() {
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
        );
      }),
    );
    $("usage-empty").hidden = rows.length > 0;
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

  function niceMax(value) {
    if (value <= 0) return 1;
    const magnitude = Math.pow(10, Math.floor(Math.log10(value)));
    for (const step of [1, 2, 2.5, 5, 10]) {
      if (step * magnitude >= value) return step * magnitude;
    }
    return 10 * magnitude;
  }

  /** A bar chart (stacked when several series) as inline SVG; hover a bar for its numbers. */
  function barChart({ width, title, buckets, size, label, series }) {
    const height = 150;
    const pad = { top: 24, right: 8, bottom: 22, left: 44 };
    const innerW = width - pad.left - pad.right;
    const innerH = height - pad.top - pad.bottom;
    const total = (b) => series.reduce((sum, s) => sum + b[s.key], 0);
    const max = Math.max(2, niceMax(Math.max(...buckets.map(total))));
    const y = (v) => pad.top + innerH - (v / max) * innerH;
    const step = innerW / buckets.length;
    const barW = Math.max(1, step * 0.78);
    const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img", "aria-label": title });
    root.append(svg("text", { x: 0, y: 12, class: "chart-title", text: title }));
    // Counts are whole numbers: no half-way line where it would read "2.5 requests".
    for (const v of Number.isInteger(max / 2) ? [0, max / 2, max] : [0, max]) {
      root.append(svg("line", { x1: pad.left, x2: width - pad.right, y1: y(v), y2: y(v), class: v === 0 ? "axis" : "grid-line" }));
      root.append(svg("text", { x: pad.left - 6, y: y(v) + 4, "text-anchor": "end", text: fmtCompact(Math.round(v * 10) / 10) }));
    }
    const labelEvery = Math.max(1, Math.ceil(buckets.length / Math.max(2, Math.floor(innerW / 80))));
    buckets.forEach((b, i) => {
      const x = pad.left + i * step + (step - barW) / 2;
      let base = 0;
      const group = svg("g", {});
      for (const s of series) {
        const v = b[s.key];
        if (v > 0) {
          group.append(svg("rect", { x, y: y(base + v), width: barW, height: Math.max(1, y(base) - y(base + v)), class: s.cls, rx: Math.min(2, barW / 3) }));
        }
        base += v;
      }
      const words = series.map((s) => `${fmtInt(b[s.key])} ${s.name}`).join(", ");
      const target = svg("rect", { x: pad.left + i * step, y: pad.top, width: step, height: innerH, class: "hover-target" });
      target.append(svg("title", { text: `${label(b.t)}–${label(b.t + size)}: ${words}` }));
      group.append(target);
      root.append(group);
      if (i % labelEvery === 0) {
        // Labels near either edge are anchored inside the chart so they are not cut off.
        const center = pad.left + i * step + step / 2;
        let anchor = "middle";
        let x = center;
        if (center - 32 < 0) {
          anchor = "start";
          x = Math.max(0, pad.left + i * step);
        } else if (center + 32 > width) {
          anchor = "end";
          x = width - 1;
        }
        root.append(svg("text", { x, y: height - 6, "text-anchor": anchor, text: label(b.t) }));
      }
    });
    return root;
  }

  // ---------- System ----------

  function enterSystem() {
    startPolling(polled("system", loadSystem), 2000);
  }

  async function loadSystem() {
    renderSystem(await admin("GET", "/admin/system"));
  }

  function setMeter(fill, percent) {
    const p = Math.max(0, Math.min(100, Number(percent) || 0));
    fill.style.width = `${p}%`;
    fill.parentElement.classList.toggle("hot", p >= 90);
  }

  function facts(list, pairs) {
    list.replaceChildren(...pairs.flatMap(([name, value]) => [h("dt", {}, name), h("dd", {}, value)]));
  }

  function renderSystem(report) {
    const cpu = report.cpu || {};
    $("system-cpu-total").textContent = fmtPercent(cpu.usage_percent);
    setMeter($("system-cpu-fill"), cpu.usage_percent);
    $("system-cpu-cores").textContent = cpu.cores ? `${cpu.cores} core${cpu.cores === 1 ? "" : "s"}` : "";
    $("system-cpu-percore").replaceChildren(
      ...(cpu.per_core_percent || []).map((p, i) => {
        return h("div", { class: "core", title: `core ${i}: ${fmtPercent(p)}` }, `#${i} ${fmtPercent(p)}`, h("div", { class: "meter" }, meterFill(p)));
      }),
    );

    const memory = report.memory || {};
    const memPercent = memory.total_bytes ? (memory.used_bytes / memory.total_bytes) * 100 : 0;
    const used = $("system-memory-used");
    used.replaceChildren(fmtBytes(memory.used_bytes), " ", h("small", {}, `of ${fmtBytes(memory.total_bytes)}`));
    setMeter($("system-memory-fill"), memPercent);
    $("system-memory-detail").textContent = `${fmtPercent(memPercent)} used · ${fmtBytes(Math.max(0, memory.total_bytes - memory.used_bytes))} free`;

    const gateway = report.gateway;
    facts($("system-gateway-facts"), gateway ? [["PID", String(gateway.pid)], ["Memory", fmtBytes(gateway.memory_bytes)], ["CPU", fmtPercent(gateway.cpu_percent)]] : [["State", "unknown"]]);

    const server = report.model_server;
    if (server) {
      facts($("system-model-facts"), [["PID", String(server.pid)], ["Memory", fmtBytes(server.memory_bytes)], ["CPU", fmtPercent(server.cpu_percent)]]);
    } else {
      $("system-model-facts").replaceChildren(h("p", { class: "muted" }, "No model server is running under llmgate."));
    }

    const gpu = report.gpu || {};
    const devices = gpu.devices || [];
    $("system-gpu-list").replaceChildren(...devices.map(gpuCard));
    const gpuMessage = gpu.message || "no GPU found";
    $("system-gpu-message").textContent = devices.length ? "" : gpuMessage[0].toUpperCase() + gpuMessage.slice(1);
  }

  /** A meter's fill for a new element (no transition: it is drawn at its width at once). */
  function meterFill(percent) {
    const fill = h("div", { class: "meter-fill" });
    fill.style.width = `${Math.max(0, Math.min(100, Number(percent) || 0))}%`;
    return fill;
  }

  function gpuCard(device) {
    const memPercent = device.memory_total_bytes ? (device.memory_used_bytes / device.memory_total_bytes) * 100 : null;
    const dl = h("dl", { class: "facts" });
    facts(dl, [
      ["Temperature", typeof device.temperature_celsius === "number" ? `${Math.round(device.temperature_celsius)} °C` : "—"],
      ["Power", typeof device.power_watts === "number" ? `${device.power_watts.toFixed(0)} W` : "—"],
    ]);
    return h(
      "div",
      { class: "card gpu", "data-testid": "system-gpu-device" },
      h("h3", {}, `#${device.index} ${device.name || "GPU"}`),
      h("div", { class: "core" }, `Utilisation ${fmtPercent(device.utilization_percent)}`),
      h("div", { class: "meter" }, meterFill(device.utilization_percent)),
      h("div", { class: "core" }, `Memory ${fmtBytes(device.memory_used_bytes)} of ${fmtBytes(device.memory_total_bytes)}`),
      h("div", { class: "meter" }, meterFill(memPercent)),
      dl,
    );
  }

  // ---------- Playground ----------

  let playgroundAbort = null;

  function enterPlayground() {
    const saved = sessionStorage.getItem(PLAYGROUND_KEY);
    if (saved && !$("playground-key").value) $("playground-key").value = saved;
  }

  function playgroundError(err) {
    if (err instanceof ApiError) {
      if (err.status === 401) return "That key is not valid (unknown, revoked or expired). Create a user key on the Keys page and paste it here.";
      if (err.status === 503 && err.code === "model_not_running") return "No model is running. Start one on the Models page, then send again.";
      if (err.status === 503) return `The model is not available right now: ${err.message}`;
      if (err.status === 502) return `The model server could not be reached. (${err.message})`;
      if (err.status === 504) return `The model server took too long to answer. (${err.message})`;
      if (err.status === 429) return `Too many requests right now; try again shortly. (${err.message})`;
    }
    return messageOf(err);
  }

  async function sendPlayground(event) {
    event.preventDefault();
    if (playgroundAbort) return;
    const key = $("playground-key").value.trim();
    const message = $("playground-message").value.trim();
    if (!key) {
      showError("Paste a key into the User key field first. You can create one on the Keys page.", "playground");
      $("playground-key").focus();
      return;
    }
    if (!message) {
      showError("Type a message for the model first.", "playground");
      $("playground-message").focus();
      return;
    }
    sessionStorage.setItem(PLAYGROUND_KEY, key);
    clearError();

    const answer = $("playground-answer");
    const charged = $("playground-usage");
    const status = $("playground-status");
    answer.textContent = "";
    charged.hidden = true;
    const controller = new AbortController();
    playgroundAbort = controller;
    $("playground-send").disabled = true;
    $("playground-stop").hidden = false;
    status.textContent = "Sending…";

    let before = null;
    let finished = false;
    try {
      before = await request("GET", "/v1/me/usage", { key, signal: controller.signal });
      const response = await request("POST", "/v1/chat/completions", {
        key,
        raw: true,
        signal: controller.signal,
        body: { model: "any", messages: [{ role: "user", content: message }], stream: true },
      });
      status.textContent = "The model is answering…";
      answer.classList.add("streaming");
      await readAnswer(response, answer);
      finished = true;
      status.textContent = "";
    } catch (err) {
      if (err && err.name === "AbortError") {
        status.textContent = "Stopped.";
      } else {
        status.textContent = "";
        showError(playgroundError(err), "playground");
      }
    } finally {
      answer.classList.remove("streaming");
      playgroundAbort = null;
      $("playground-send").disabled = false;
      $("playground-stop").hidden = true;
    }
    if (before) await showCharged(key, before, finished);
  }

  /** Reads a streamed (SSE) or plain JSON chat answer into the page as it arrives. */
  async function readAnswer(response, answer) {
    const type = response.headers.get("content-type") || "";
    if (!type.includes("text/event-stream")) {
      const body = await response.json().catch(() => null);
      const text = body && body.choices && body.choices[0] && body.choices[0].message ? body.choices[0].message.content : null;
      answer.textContent = text || "(The model sent no text.)";
      return;
    }
    if (!response.body) {
      throw new ApiError(0, "This browser cannot read streamed answers.");
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let done = false;
    while (!done) {
      const chunk = await reader.read();
      if (chunk.done) break;
      buffer += decoder.decode(chunk.value, { stream: true });
      let boundary;
      while ((boundary = buffer.search(/\r?\n\r?\n/)) !== -1) {
        const rawEvent = buffer.slice(0, boundary);
        buffer = buffer.slice(boundary).replace(/^\r?\n\r?\n/, "");
        const data = rawEvent
          .split(/\r?\n/)
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""))
          .join("\n");
        if (!data) continue;
        if (data === "[DONE]") {
          done = true;
          break;
        }
        let event;
        try {
          event = JSON.parse(data);
        } catch (_) {
          continue;
        }
        if (event.error) {
          throw new ApiError(0, `The model stopped with an error: ${event.error.message || "unknown error"}`);
        }
        const choice = event.choices && event.choices[0];
        const piece = choice && choice.delta ? choice.delta.content : null;
        if (piece) answer.append(piece);
      }
    }
    if (done) reader.cancel().catch(() => {});
    if (!answer.textContent) answer.textContent = "(The model sent no text.)";
  }

  /** The key's totals after minus before; usage is written in the background, so retry briefly. */
  async function showCharged(key, before, finished) {
    const charged = $("playground-usage");
    let after = null;
    for (let attempt = 0; attempt < 8; attempt += 1) {
      try {
        after = await request("GET", "/v1/me/usage", { key });
      } catch (_) {
        after = null;
      }
      if (after && after.requests > before.requests) break;
      await sleep(250);
    }
    if (!after) return;
    const diff = {
      requests: after.requests - before.requests,
      prompt: after.prompt_tokens - before.prompt_tokens,
      completion: after.completion_tokens - before.completion_tokens,
      total: after.total_tokens - before.total_tokens,
      unknown: (after.requests_without_usage || 0) - (before.requests_without_usage || 0),
    };
    charged.dataset.requests = diff.requests;
    charged.dataset.promptTokens = diff.prompt;
    charged.dataset.completionTokens = diff.completion;
    charged.dataset.totalTokens = diff.total;
    const parts = [
      "Charged to this key: ",
      h("strong", {}, `+${fmtInt(diff.requests)} request${diff.requests === 1 ? "" : "s"}`),
      " · ",
      h("strong", {}, `${fmtInt(diff.prompt)} prompt`),
      " + ",
      h("strong", {}, `${fmtInt(diff.completion)} completion`),
      " = ",
      h("strong", {}, `${fmtInt(diff.total)} tokens`),
    ];
    if (diff.unknown > 0) parts.push(" (the model server did not report tokens for this request; it is counted without them)");
    if (!finished && diff.requests > 0) parts.push(" (the answer was cut short, but the request still counts)");
    if (diff.requests === 0) parts.splice(0, parts.length, "Nothing was charged to this key yet; the usage may appear on the Usage page in a moment.");
    charged.replaceChildren(...parts);
    charged.hidden = false;
  }

  // ---------- start ----------

  function start() {
    $("signin-form").addEventListener("submit", signIn);
    $("signout").addEventListener("click", () => signOut());
    $("error-dismiss").addEventListener("click", () => clearError());
    $("model-form").addEventListener("submit", runModel);
    $("model-stop").addEventListener("click", stopModel);
    $("model-backend").addEventListener("change", () => {
      modelsBackendChosen = true;
    });
    $("create-key-form").addEventListener("submit", createKey);
    $("copy-key").addEventListener("click", copySecret);
    $("new-key-done").addEventListener("click", forgetSecret);
    $("confirm-dialog").addEventListener("close", onConfirmClosed);
    $("usage-refresh").addEventListener("click", () => {
      lastUsageJson = null;
      pollNow();
    });
    $("usage-chart-key").addEventListener("change", renderChart);
    $("usage-range").addEventListener("change", renderChart);
    $("playground-form").addEventListener("submit", sendPlayground);
    $("playground-stop").addEventListener("click", () => playgroundAbort && playgroundAbort.abort());
    $("playground-message").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("playground-form").requestSubmit();
    });
    let resizeTimer = null;
    window.addEventListener("resize", () => {
      clearTimeout(resizeTimer);
      resizeTimer = setTimeout(() => currentPage === "usage" && renderChart(), 150);
    });
    document.addEventListener("visibilitychange", () => {
      // Catch up at once when the tab comes back instead of waiting for the next tick.
      if (!document.hidden) pollNow();
    });
    window.addEventListener("hashchange", route);
    route();
  }

  start();
})();
