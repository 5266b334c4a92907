// The Keys page: create a key with its limits (its secret shown once), list keys with
// their limits, edit a key's name, expiry and limits, rotate its secret (the new one shown
// once), revoke one after a confirmation.

import { $, h } from "../dom.js";
import { ApiError, admin } from "../api.js";
import { adminKey } from "../session.js";
import { clearError, messageOf, showError } from "../banner.js";
import { fmtDateTime, fullFormat, parseTime, timeCell } from "../format.js";

let pendingRevoke = null;
let pendingRotate = null;
let editing = null;

// A key's limits, as the admin API names them: [field, label, input type, hint].
const LIMITS = [
  ["models", "Models", "text", "all; e.g. gemma-*, smollm2"],
  ["rpm", "Requests / minute", "number", "no limit"],
  ["tpm", "Tokens / minute", "number", "no limit"],
  ["max_parallel", "Requests at once", "number", "no limit"],
  ["quota_tokens", "Token quota", "number", "no quota"],
  ["quota_period", "Quota period", "select", ""],
  ["weight", "Weight (share of a busy model)", "number", "1"],
  ["per_user_rpm", "Requests / minute per end user", "number", "no limit"],
  ["per_user_quota_tokens", "Token quota per end user", "number", "no quota"],
];

/** The limit inputs, ids `${prefix}-${field}`, into the element `${prefix}`. */
function buildLimitFields(prefix) {
  $(prefix).replaceChildren(
    ...LIMITS.map(([field, label, type, hint]) => {
      const id = `${prefix}-${field}`;
      const input =
        type === "select"
          ? h("select", { id, "data-testid": id }, h("option", { value: "" }, "default (month)"), ...["day", "week", "month"].map((p) => h("option", { value: p }, p)))
          : h("input", { id, "data-testid": id, type: type === "number" ? "text" : type, inputmode: type === "number" ? "numeric" : null, placeholder: hint, spellcheck: "false", autocapitalize: "off" });
      return h("div", { class: "field" }, h("label", { for: id }, label), input);
    }),
  );
}

/** The limits typed under `prefix`: each filled field, and (for a change) null for each empty one. */
function readLimits(prefix, emptyAsNull) {
  const limits = {};
  for (const [field, label, type] of LIMITS) {
    const raw = $(`${prefix}-${field}`).value.trim();
    if (!raw) {
      if (emptyAsNull) limits[field] = null;
      continue;
    }
    if (field === "models") {
      limits.models = raw.split(",").map((m) => m.trim()).filter(Boolean);
    } else if (type === "number") {
      if (!/^\d+$/.test(raw)) throw new Error(`${label} must be a whole number.`);
      limits[field] = Number(raw);
    } else {
      limits[field] = raw;
    }
  }
  return limits;
}

function fillLimits(prefix, key) {
  for (const [field] of LIMITS) {
    const value = key ? key[field] : undefined;
    $(`${prefix}-${field}`).value = value === undefined || value === null ? "" : Array.isArray(value) ? value.join(", ") : String(value);
  }
}

/** A key's own limits in a few words (a user key without its own has the defaults). */
export function limitsText(key) {
  const parts = [];
  if (key.models) parts.push(key.models.length ? `models ${key.models.join(", ")}` : "all models");
  if (key.rpm) parts.push(`${key.rpm} req/min`);
  if (key.tpm) parts.push(`${key.tpm} tokens/min`);
  if (key.max_parallel) parts.push(`${key.max_parallel} at once`);
  if (key.quota_tokens !== undefined) parts.push(`${key.quota_tokens} tokens/${key.quota_period || "month"}`);
  else if (key.quota_period) parts.push(`quota per ${key.quota_period}`);
  if (key.weight) parts.push(`weight ${key.weight}`);
  if (key.per_user_rpm) parts.push(`${key.per_user_rpm} req/min per user`);
  if (key.per_user_quota_tokens !== undefined) parts.push(`${key.per_user_quota_tokens} tokens/${key.quota_period || "month"} per user`);
  return parts.length ? parts.join(" · ") : key.role === "admin" ? "none" : "defaults";
}

export function init() {
  buildLimitFields("create-key-limits");
  buildLimitFields("key-edit-limits");
  $("create-key-form").addEventListener("submit", createKey);
  $("copy-key").addEventListener("click", copySecret);
  $("new-key-done").addEventListener("click", forgetSecret);
  $("confirm-dialog").addEventListener("close", onConfirmClosed);
  // Save is the form's only submit button, so Enter in a field saves (the browser
  // submits a form with its first submit button); Cancel and Escape close unsaved.
  $("key-edit-form").addEventListener("submit", (event) => {
    event.preventDefault();
    saveEdit();
  });
  $("key-edit-cancel").addEventListener("click", () => $("key-edit-dialog").close());
  $("key-rotate-dialog").addEventListener("close", onRotateClosed);
}

export function enter() {
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
        h("td", { class: "limits-cell", "data-label": "Limits", "data-testid": "key-limits" }, h("span", {}, limitsText(key))),
        h(
          "td",
          { class: "actions-cell" },
          status === "revoked"
            ? null
            : h(
                "div",
                { class: "row-actions" },
                h("button", { type: "button", class: "button small", "data-testid": "edit-key", onclick: () => openEdit(key) }, "Edit"),
                h("button", { type: "button", class: "button small", "data-testid": "rotate-key", onclick: () => askRotate(key) }, "Rotate"),
                h("button", { type: "button", class: "button small danger-outline", "data-testid": "revoke-key", onclick: () => askRevoke(key, isSelf) }, "Revoke"),
              ),
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

export function forgetSecret() {
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
  let limits;
  try {
    limits = readLimits("create-key-limits", false);
  } catch (err) {
    showError(err.message);
    return;
  }
  const button = $("create-key-submit");
  button.disabled = true;
  forgetSecret();
  try {
    const created = await admin("POST", "/admin/keys", { name, role: $("create-key-role").value, ...limits });
    clearError();
    $("create-key-name").value = "";
    $("create-key-role").value = "user";
    fillLimits("create-key-limits", null);
    showSecret(created);
    await loadKeys();
  } catch (err) {
    if (err instanceof ApiError && err.status === 409) {
      showError(`An active key is already named “${name}”. Pick another name, or revoke that key first.`);
    } else if (err instanceof ApiError && err.status === 400) {
      showError(`That key cannot be created: ${err.message}`);
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

function openEdit(key) {
  editing = key;
  $("key-edit-title").textContent = `Edit “${key.name}”`;
  $("key-edit-name").value = key.name;
  $("key-edit-expires").value = key.expires_at || "";
  fillLimits("key-edit-limits", key);
  $("key-edit-error").hidden = true;
  $("key-edit-dialog").showModal();
  $("key-edit-name").focus();
}

/** Saves the dialog as a merge patch: every field sent, an empty one as null (unset). */
async function saveEdit() {
  const key = editing;
  if (!key) return;
  const error = $("key-edit-error");
  let patch;
  try {
    patch = readLimits("key-edit-limits", true);
  } catch (err) {
    error.textContent = err.message;
    error.hidden = false;
    return;
  }
  const name = $("key-edit-name").value.trim();
  if (name !== key.name) patch.name = name;
  const expires = $("key-edit-expires").value.trim();
  if (expires !== (key.expires_at || "")) patch.expires_at = expires || null;
  const button = $("key-edit-save");
  button.disabled = true;
  try {
    await admin("PATCH", `/admin/keys/${encodeURIComponent(key.id)}`, patch);
    editing = null;
    $("key-edit-dialog").close();
    clearError();
    await loadKeys();
  } catch (err) {
    error.textContent = messageOf(err);
    error.hidden = false;
  } finally {
    button.disabled = false;
  }
}

function askRotate(key) {
  pendingRotate = key;
  $("key-rotate-text").textContent = `Give “${key.name}” (${key.prefix}…) a new secret? Its id, limits and usage stay; programs must switch to the new secret.`;
  $("key-rotate-grace").value = "0";
  $("key-rotate-dialog").returnValue = "";
  $("key-rotate-dialog").showModal();
  $("key-rotate-cancel").focus();
}

async function onRotateClosed() {
  const key = pendingRotate;
  pendingRotate = null;
  if (!key || $("key-rotate-dialog").returnValue !== "confirm") return;
  try {
    const rotated = await admin("POST", `/admin/keys/${encodeURIComponent(key.id)}/rotate`, { grace_secs: Number($("key-rotate-grace").value) });
    clearError();
    showSecret(rotated);
    if (adminKey()) await loadKeys();
  } catch (err) {
    if (adminKey()) showError(`Could not rotate “${key.name}”: ${messageOf(err)}`);
  }
}
