// One polling loop, for the page on screen: entering a page replaces the loop, and a
// hidden tab skips its ticks.

import { adminKey } from "./session.js";
import { clearError, messageOf, showError } from "./banner.js";

let pollGeneration = 0;
let pollTimer = null;
let pollCurrent = null;

export function startPolling(task, intervalMs) {
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

export function stopPolling() {
  pollGeneration += 1;
  clearTimeout(pollTimer);
  pollTimer = null;
  pollCurrent = null;
}

/** Runs the page's poll now (a Refresh button, a tab that comes back into view). */
export function pollNow() {
  if (pollCurrent) startPolling(pollCurrent.task, pollCurrent.intervalMs);
}

/** Runs a poll task; its error shows in the banner until the same task succeeds. */
export function polled(source, task) {
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
