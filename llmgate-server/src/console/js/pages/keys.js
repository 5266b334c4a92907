// The Keys page: create a key (its secret shown once), list keys, revoke one after a
// confirmation.

import { $, h } from "../dom.js";
import { ApiError, admin } from "../api.js";
import { adminKey } from "../session.js";
import { clearError, messageOf, showError } from "../banner.js";
import { fmtDateTime, fullFormat, parseTime, timeCell } from "../format.js";

let pendingRevoke = null;

export function init() {
  $("create-key-form").addEventListener("submit", createKey);
  $("copy-key").addEventListener("click", copySecret);
  $("new-key-done").addEventListener("click", forgetSecret);
  $("confirm-dialog").addEventListener("close", onConfirmClosed);
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
