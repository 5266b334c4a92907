// The sign-in page: the pasted key is checked against the admin API before it is kept.

import { $ } from "../dom.js";
import { ApiError, request } from "../api.js";
import { rememberAdminKey } from "../session.js";
import { clearError, messageOf, showError } from "../banner.js";
import { PAGES, route } from "../router.js";

export function init() {
  $("signin-form").addEventListener("submit", signIn);
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
    rememberAdminKey(key);
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
