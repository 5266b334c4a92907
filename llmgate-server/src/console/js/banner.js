// The error banner under the top bar: one message at a time, in words a person can read.

import { $ } from "./dom.js";
import { ApiError } from "./api.js";

/** Who put the message up, so that only that task's success takes it down. */
export let bannerSource = null;

/** Shows a message in the banner; `source` lets a later success clear only its own error. */
export function showError(message, source) {
  bannerSource = source || null;
  const text = String(message);
  $("error-text").textContent = text.charAt(0).toUpperCase() + text.slice(1);
  $("error-banner").hidden = false;
}

export function clearError(source) {
  if (source === undefined || bannerSource === source) {
    $("error-banner").hidden = true;
    $("error-text").textContent = "";
    bannerSource = null;
  }
}

export function messageOf(err) {
  if (err instanceof ApiError) return err.message;
  return `Something went wrong in the console: ${err && err.message ? err.message : err}`;
}
