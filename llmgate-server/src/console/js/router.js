// Hash routing (#models, #keys, #usage, #system, #playground): one page on screen, the
// sign-in page while no admin key is held.

import { $ } from "./dom.js";
import { adminKey, forgetKeys } from "./session.js";
import { bannerSource, clearError, showError } from "./banner.js";
import { stopPolling } from "./polling.js";
import * as models from "./pages/models.js";
import * as keys from "./pages/keys.js";
import * as usage from "./pages/usage.js";
import * as system from "./pages/system.js";
import * as playground from "./pages/playground.js";

const ENTER = {
  models: models.enter,
  keys: keys.enter,
  usage: usage.enter,
  system: system.enter,
  playground: playground.enter,
};

export const PAGES = Object.keys(ENTER);

let currentPage = null;

export function signOut(message) {
  forgetKeys();
  $("playground-key").value = "";
  keys.forgetSecret();
  for (const dialog of document.querySelectorAll("dialog[open]")) dialog.close("cancel");
  route();
  if (message) showError(message, "signin");
}

export function route() {
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
  ENTER[page]();
}
