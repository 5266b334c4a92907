/*
 * llmgate console: one page, hash routing (#models, #keys, #usage, #system, #playground),
 * plain DOM code in ES modules, no libraries and no build step. Every API call carries the
 * admin key from sessionStorage (never a URL, never localStorage). The
 * Content-Security-Policy forbids inline scripts and styles, so widths are set through
 * element.style and text always through textContent.
 *
 * Modules: dom.js (building elements), format.js (numbers and times), session.js (the
 * keys held), api.js (calls), banner.js (errors), polling.js (the page's refresh loop),
 * chart.js (SVG bar charts), router.js (which page is on screen, signing out), and one
 * module per page in pages/: `init` wires its controls once, `enter` runs each time the
 * router puts it on screen.
 *
 * Stable data-testid attributes for browser tests:
 *   Sign in:     signin-form, signin-key, signin-submit, signout
 *   Navigation:  nav-models, nav-keys, nav-usage, nav-system, nav-playground
 *   Pages:       page-signin, page-models, page-keys, page-usage, page-system, page-playground
 *   Errors:      error-banner (role=alert; its text is the message), error-dismiss
 *   Models:      models-table, models-memory,
 *                model-row (data-model = the name, data-state, data-kind="local"|"upstream"),
 *                in each row: model-state (badge; data-state holds the raw state),
 *                model-message, model-progress (data-percent when known), model-memory,
 *                model-last-used, model-requests, model-in-flight, model-queued (data-count),
 *                model-settings, model-load, model-unload (local models only), model-remove,
 *                model-log (in the row after it);
 *                model-remove-dialog, model-remove-cancel, model-remove-confirm;
 *                model-add-form, model-add-name, model-add-aliases, model-add-kind,
 *                model-add-source, model-add-runner, model-add-backend, model-add-n-ctx,
 *                model-add-upstream, model-add-upstream-key, model-add-ttl,
 *                model-add-max-concurrency, model-add-preload, model-add-submit,
 *                model-add-error (the server's message when adding fails)
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
 *   Playground:  playground-form, playground-key, playground-model, playground-message, playground-send,
 *                playground-stop, playground-answer,
 *                playground-usage (data-requests, data-prompt-tokens,
 *                data-completion-tokens, data-total-tokens: the difference charged)
 */

import { $ } from "./dom.js";
import { onAdminKeyRefused } from "./api.js";
import { clearError } from "./banner.js";
import { pollNow } from "./polling.js";
import { route, signOut } from "./router.js";
import * as signin from "./pages/signin.js";
import * as models from "./pages/models.js";
import * as keys from "./pages/keys.js";
import * as usage from "./pages/usage.js";
import * as playground from "./pages/playground.js";

onAdminKeyRefused(signOut);
signin.init();
models.init();
keys.init();
usage.init();
playground.init();
$("signout").addEventListener("click", () => signOut());
$("error-dismiss").addEventListener("click", () => clearError());
document.addEventListener("visibilitychange", () => {
  // Catch up at once when the tab comes back instead of waiting for the next tick.
  if (!document.hidden) pollNow();
});
window.addEventListener("hashchange", route);
route();
